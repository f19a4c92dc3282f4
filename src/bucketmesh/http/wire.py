"""The Rating API's wire structs, declared once: request validation, response
encoding and the OpenAPI document (``openapi_document``) all come from here.

docs/api.md is the contract; this module is its machine-readable form.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from bucketmesh.core.bucket import Decision
from bucketmesh.core.bucket import ModeName as Mode
from bucketmesh.core.limits import error_location


class RateRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Body of ``POST /v1/rate``; every field optional (the key may come from headers)."""

    key: str | None = None
    rule: str | None = None
    tokens: int = 1


class BatchRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /v1/rate/batch``: up to 1000 decisions in one request.

    ``atomic``: all-or-nothing — either every item is granted, or none is
    charged and every item reports ``allowed: false``.
    """

    requests: list[RateRequest]
    atomic: bool = False


class DecisionBody(Decision, frozen=True):
    """A decision as the API returns it: the limiter's Decision plus the region."""

    region: str


class QuotaExceeded(DecisionBody, frozen=True):
    """The 429 body: problem+json of type ``quota-exceeded`` with the decision's fields."""

    type: str
    title: str
    status: int
    detail: str


class BatchResponse(msgspec.Struct):
    results: list[DecisionBody]
    allowed: int
    denied: int


FaultDirection = Literal["both", "outbound", "inbound"]


class FaultRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /v1/admin/faults``: drop sync traffic with ``peers`` for ``seconds``."""

    peers: list[str]
    seconds: float
    direction: FaultDirection = "both"


class ActiveFault(msgspec.Struct):
    peer: str
    direction: FaultDirection
    remaining_s: float


class FaultList(msgspec.Struct):
    region: str
    faults: list[ActiveFault]


class PatchRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Body of ``PATCH /v1/buckets/{key}``: any of these; ``refill_rate`` is an alias."""

    capacity: int | None = None
    refillRate: float | None = None
    refill_rate: float | None = None
    ttl: float | None = None
    mode: Mode | None = None


class BucketConfigBody(msgspec.Struct):
    key: str
    rule: str
    capacity: int
    refill_rate: float
    ttl: float
    mode: str
    version: str
    applies_to: Literal["key", "rule"]


class ReplicaEntry(msgspec.Struct):
    used: int


class ShareLimit(msgspec.Struct):
    """The whole limit a region reports running a strict key on."""

    capacity: int
    refill_rate: float


class ShareEntry(msgspec.Struct):
    """A region's rights over a strict key (a part of the global limit, 0..1) and its
    last reported demand (tokens/s) as this node knows them."""

    rights: float
    demand: float
    reported: bool
    limit: ShareLimit | None = None


class BucketStateBody(msgspec.Struct):
    key: str
    rule: str
    tokens_remaining: int
    capacity: int
    refill_rate: float
    ttl: float
    mode: str
    config_version: str
    reset_after: float
    epoch: int
    replicas: dict[str, ReplicaEntry]
    live: bool
    #: strict keys with transferable shares: region -> rights and demand
    shares: dict[str, ShareEntry] | None = None


class PeerStatus(msgspec.Struct):
    state: str
    lag_ms_p99: float | None = None
    last_seen: str | None = None


class SyncStatus(msgspec.Struct):
    enabled: bool
    local_only: bool
    peers: dict[str, PeerStatus]


class TaskStatus(msgspec.Struct):
    """A background task of the node: ``ok``, ``failing`` (retried with backoff) or
    ``stopped``; its failures so far and the last one's error."""

    state: str
    failures: int
    last_error: str | None = None


class StatusBody(msgspec.Struct):
    region: str
    node: str
    replica_id: str
    cluster_id: str
    sync: SyncStatus
    buckets: int
    version: str
    uptime_s: float
    bucket: BucketStateBody | None = None
    tasks: dict[str, TaskStatus] = {}


class Health(msgspec.Struct):
    status: str
    checks: dict[str, str] = {}


class Problem(msgspec.Struct, omit_defaults=True):
    type: str
    title: str
    status: int
    detail: str
    field: str | None = None


def version_text(version: tuple[int, str]) -> str:
    """A config version as one opaque, ordered-looking string: ``<hlc>@<origin>``."""
    return f"{version[0]}@{version[1]}"


def error_field(error: msgspec.ValidationError | msgspec.DecodeError) -> str | None:
    """The JSON path of the field a msgspec validation error is about, as
    ``requests[2].tokens`` (an unknown or missing field included)."""
    if not isinstance(error, msgspec.ValidationError):
        return None
    return error_location(error).field or None


def _problem_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        },
    }


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def _faults_path() -> dict[str, Any]:
    """``/v1/admin/faults``: served by nodes with a sync mesh (404 elsewhere)."""
    refused = {
        "200": _json("FaultList", "The faults now active on this node"),
        "401": _problem_response("Admin token required"),
        "403": _problem_response("Wrong admin token, or no admin token configured"),
        "404": _problem_response("This node has no sync mesh"),
    }
    return {
        "post": {
            "summary": "Drop this node's sync traffic with named peers for N seconds",
            "security": [{"admin": []}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/FaultRequest"}}
                },
            },
            "responses": {
                **refused,
                "400": _problem_response("Invalid field (unknown peer, seconds out of range)"),
                "413": _problem_response("Body too large"),
                "415": _problem_response("Body is not JSON"),
            },
        },
        "get": {"summary": "The active faults", "security": [{"admin": []}], "responses": refused},
        "delete": {"summary": "Heal now", "security": [{"admin": []}], "responses": refused},
    }


def openapi_document(version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the Rating API, schemas generated from the structs."""
    (_, components) = msgspec.json.schema_components(
        [
            RateRequest,
            BatchRequest,
            DecisionBody,
            QuotaExceeded,
            BatchResponse,
            PatchRequest,
            BucketConfigBody,
            BucketStateBody,
            StatusBody,
            Health,
            Problem,
            FaultRequest,
            FaultList,
        ],
        ref_template="#/components/schemas/{name}",
    )
    api_key = {
        "name": "X-API-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "Fills `{{ .Request.Header.X-API-Key }}` in key templates.",
    }
    idem = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "maxLength": 256},
    }
    key_q = {"name": "key", "in": "query", "required": False, "schema": {"type": "string"}}
    tokens_q = {
        "name": "tokens",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 0},
    }
    rule_q = {"name": "rule", "in": "query", "required": False, "schema": {"type": "string"}}
    decision_responses = {
        "200": _json("DecisionBody", "Allowed"),
        "400": _problem_response("Invalid request, or no rule matches"),
        "413": _problem_response("Body too large"),
        "415": _problem_response("Body is not JSON"),
        "429": {
            "description": "Denied: quota exceeded",
            "content": {
                "application/problem+json": {
                    "schema": {"$ref": "#/components/schemas/QuotaExceeded"}
                }
            },
        },
        "503": _problem_response("Bucket cap reached or overloaded; retry later"),
    }
    rate_post = {
        "summary": "Consume tokens (tokens: 0 peeks)",
        "parameters": [api_key, idem],
        "requestBody": {
            "required": False,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/RateRequest"}}
            },
        },
        "responses": decision_responses,
    }
    bucket_key = {"name": "key", "in": "path", "required": True, "schema": {"type": "string"}}
    paths: dict[str, Any] = {
        "/v1/rate": {
            "post": rate_post,
            "get": {
                "summary": "Consume tokens, for plain GET traffic generators",
                "parameters": [api_key, key_q, tokens_q, rule_q],
                "responses": decision_responses,
            },
        },
        "/v1/rate/batch": {
            "post": {
                "summary": "Up to 1000 decisions in one request",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/BatchRequest"}
                        }
                    },
                },
                "responses": {
                    "200": _json("BatchResponse", "Decisions, in request order"),
                    "400": _problem_response("Invalid request"),
                    "413": _problem_response("Body too large"),
                    "415": _problem_response("Body is not JSON"),
                    "503": _problem_response("Bucket cap reached"),
                },
            }
        },
        "/v1/bucket/state": {
            "get": {
                "summary": "One bucket's replicated state",
                "description": "Without key: the bucket the config's defaultStateKey "
                "template renders from this request (400 naming the setting when unset).",
                "parameters": [key_q, rule_q],
                "responses": {
                    "200": _json("BucketStateBody", "The bucket"),
                    "400": _problem_response("Missing key and no defaultStateKey"),
                    "404": _problem_response("No rule matches the key"),
                },
            }
        },
        "/v1/status": {
            "get": {
                "summary": "This node; with ?key= also that bucket",
                "parameters": [key_q],
                "responses": {
                    "200": _json("StatusBody", "Node status"),
                    "404": _problem_response("No rule matches the key"),
                },
            }
        },
        "/status": {
            "get": {
                "summary": "Alias of /v1/status",
                "parameters": [key_q],
                "responses": {
                    "200": _json("StatusBody", "Node status"),
                    "404": _problem_response("No rule matches the key"),
                },
            }
        },
        "/v1/buckets/{key}": {
            "get": {
                "summary": "A bucket's (or a rule's) config and state",
                "parameters": [bucket_key],
                "responses": {
                    "200": {
                        "description": "A rule's config (when {key} is a rule name) or a bucket",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/BucketConfigBody"},
                                        {"$ref": "#/components/schemas/BucketStateBody"},
                                    ]
                                }
                            }
                        },
                    },
                    "404": _problem_response("Neither a rule nor a key of a rule"),
                },
            },
            "patch": {
                "summary": "Change limits at runtime, in every region",
                "parameters": [bucket_key],
                "security": [{"admin": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/PatchRequest"}
                        }
                    },
                },
                "responses": {
                    "200": _json("BucketConfigBody", "The new config and its version"),
                    "202": _json(
                        "BucketConfigBody",
                        "A strict lowering not in force yet: the config, plus `pending` "
                        "(docs/api.md)",
                    ),
                    "400": _problem_response("Invalid field"),
                    "401": _problem_response("Admin token required"),
                    "403": _problem_response("Wrong admin token"),
                    "404": _problem_response("Neither a rule nor a key of a rule"),
                    "415": _problem_response("Body is not JSON"),
                },
            },
        },
        "/v1/admin/faults": _faults_path(),
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _json("Health", "Up")}}},
        "/readyz": {
            "get": {
                "summary": "Readiness: config loaded, store reachable",
                "responses": {
                    "200": _json("Health", "Ready"),
                    "503": _json("Health", "Not ready"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    # the unversioned aliases the seed's articles use, answered exactly as their /v1 paths
    paths["/rate"] = {**paths["/v1/rate"]}
    paths["/bucket/state"] = {**paths["/v1/bucket/state"]}
    paths["/buckets/{key}"] = {"patch": paths["/v1/buckets/{key}"]["patch"]}
    return {
        "openapi": "3.1.0",
        "info": {"title": "bucketmesh Rating API", "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
        },
    }
