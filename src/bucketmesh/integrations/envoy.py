"""Envoy's rate limit service (gRPC ``envoy.service.ratelimit.v3.RateLimitService``).

Owns the mapping from an Envoy ``RateLimitRequest`` onto the decision seam
(``core/decisions.py``: the in-memory limiter or the Redis backend) and the
grpc.aio server that answers it on its own port (``envoyListen``), on the node's
event loop but apart from the HTTP server's hot path. Decisions go through the
same store as the Rating API's, so they replicate like any other, are counted in
``bucketmesh_decisions_total`` like any other, and wait for the store's commit
barrier (the write-ahead log) before the answer leaves.

Mapping (README section "Envoy"): a descriptor with entries ``(k1, v1), (k2, v2)``
in domain ``d`` is the bucket key ``d:k1=v1,k2=v2``, with ``%``, ``,`` and ``=``
percent-escaped in each entry's key and value (``%`` and ``:`` in the domain), so
one entry can never spell two (``(user, "bob,plan=gold")`` is
``d:user=bob%2Cplan%3Dgold``); its limits come from the rule named ``d.k1.k2``
(the descriptor's keys), else from the rule named ``d``. When a rule's key
template could have produced that text, the key belongs to that rule: any other
rule uses it with ``%@<rule name>`` appended (``core.rules.own_key``), so a client
of the HTTP door cannot reach a descriptor's bucket, nor the other way round.
A descriptor no rule names is answered OK with no limit and charges nothing
(as Envoy's reference service does for descriptors without a configured
limit). Each limited descriptor is charged ``hits_addend`` (0 means 1); the
overall code is OVER_LIMIT if any descriptor is denied. Descriptors are
charged independently, as in the reference service: one denied descriptor
does not refund the others.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import msgspec
from google.protobuf.duration_pb2 import Duration

from bucketmesh.core.bucket import Decision
from bucketmesh.core.decisions import Decider
from bucketmesh.core.limiter import BucketCapReached, InvalidTokens
from bucketmesh.core.rules import Rule, escaper, own_key
from bucketmesh.http.tls import TlsContexts, TlsFiles
from bucketmesh.integrations.proto import rls_pb2, rls_pb2_grpc
from bucketmesh.telemetry.log import logger
from bucketmesh.telemetry.metrics import NodeMetrics
from bucketmesh.telemetry.outcomes import Outcomes

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
_Limit = rls_pb2.RateLimitResponse.RateLimit
# Envoy's units, largest first: a limit is reported in the smallest unit in
# which the refill rate is a whole number of tokens (else rounded, in days).
_UNITS = ((_Limit.SECOND, 1), (_Limit.MINUTE, 60), (_Limit.HOUR, 3600), (_Limit.DAY, 86400))
# Envoy sends short requests; anything larger is not a rate-limit request.
MAX_MESSAGE_BYTES = 64 * 1024
MAX_DESCRIPTORS = 64


class BadRequest(ValueError):
    """A request Envoy would never send; answered INVALID_ARGUMENT naming the field."""


_escape_domain = escaper(":")
_escape_entry = escaper(",=")


def descriptor_key(domain: str, entries: list[tuple[str, str]]) -> str:
    """The bucket text of one descriptor: ``domain:k1=v1,k2=v2``, injective: ``%``
    and the separators are percent-escaped where they occur in the parts."""
    return (
        _escape_domain(domain)
        + ":"
        + ",".join(f"{_escape_entry(k)}={_escape_entry(v)}" for k, v in entries)
    )


def rule_names(domain: str, entries: list[tuple[str, str]]) -> tuple[str, str]:
    """The rule names that give a descriptor its limits, most specific first."""
    return domain + "." + ".".join(k for k, _ in entries), domain


def _current_limit(decision: Decision) -> Any:
    rate = decision.refill_rate
    unit, per_unit = _Limit.DAY, rate * 86400
    for candidate, seconds in _UNITS:
        if rate * seconds >= 1 and math.isclose(
            rate * seconds, round(rate * seconds), rel_tol=1e-9
        ):
            unit, per_unit = candidate, rate * seconds
            break
    return _Limit(name=decision.rule, requests_per_unit=round(per_unit), unit=unit)


def _status(decision: Decision) -> Any:
    # Until reset: when denied, how long until the request could pass; when
    # allowed, how long until the bucket is full again.
    wait = decision.retry_after if not decision.allowed else decision.reset_after
    whole = math.floor(wait)
    return rls_pb2.RateLimitResponse.DescriptorStatus(
        code=OK if decision.allowed else OVER_LIMIT,
        current_limit=_current_limit(decision),
        limit_remaining=max(0, decision.tokens_remaining),
        duration_until_reset=Duration(seconds=whole, nanos=round((wait - whole) * 1e9) % 10**9),
    )


def parse(
    request: Any, rules: Sequence[Rule], rules_by_name: Mapping[str, Rule]
) -> list[tuple[str, str | None]]:
    """Each descriptor's bucket key and the rule that limits it (None: unlimited).

    Raises BadRequest for an empty domain, no descriptors or an empty entry list.
    """
    domain: str = request.domain
    if not domain:
        raise BadRequest("domain must not be empty")
    if not request.descriptors:
        raise BadRequest("descriptors must not be empty")
    if len(request.descriptors) > MAX_DESCRIPTORS:
        raise BadRequest(f"descriptors: at most {MAX_DESCRIPTORS}")
    parsed: list[tuple[str, str | None]] = []
    for index, descriptor in enumerate(request.descriptors):
        entries = [(e.key, e.value) for e in descriptor.entries]
        if not entries:
            raise BadRequest(f"descriptors[{index}].entries must not be empty")
        if any(not k for k, _ in entries):
            raise BadRequest(f"descriptors[{index}].entries: a key must not be empty")
        rule = next((n for n in rule_names(domain, entries) if n in rules_by_name), None)
        key = descriptor_key(domain, entries)
        parsed.append((key if rule is None else own_key(rules, key, rule), rule))
    return parsed


async def _settled(answer: Any) -> Any:
    """A decider's answer, now or later."""
    return await answer if hasattr(answer, "__await__") else answer


async def decide(
    decider: Decider,
    request: Any,
    metrics: NodeMetrics | None = None,
    outcomes: Outcomes | None = None,
) -> Any:
    """The RateLimitResponse for ``request``: each limited descriptor charged on its
    own, as Envoy's reference service does. Raises BadRequest (see ``parse``).
    ``outcomes`` (instead of ``metrics``) also counts near_limit, writes the audit
    trail and answers a shadow rule's refusal OK (Envoy ratelimit's shadow_mode)."""
    hits = request.hits_addend or 1
    statuses = []
    overall = OK
    for key, rule in parse(request, decider.rules, decider.rules_by_name):
        if rule is None:
            statuses.append(rls_pb2.RateLimitResponse.DescriptorStatus(code=OK))
            continue
        try:
            decision: Decision = await _settled(decider.acquire(key, hits, rule=rule))
        except InvalidTokens:
            # more hits than the bucket can ever hold: never allowed
            peek: Decision = await _settled(decider.acquire(key, 0, rule=rule))
            decision = msgspec.structs.replace(peek, allowed=False, retry_after=math.inf)
        if outcomes is not None:
            if outcomes.observe(decision, hits):  # shadow: counted, answered OK
                decision = msgspec.structs.replace(decision, allowed=True)
        elif metrics is not None:
            metrics.count_decision(decision.rule, decision.allowed)
        if not decision.allowed:
            overall = OVER_LIMIT
        status = _status(decision) if math.isfinite(decision.retry_after) else None
        if status is None:
            status = rls_pb2.RateLimitResponse.DescriptorStatus(
                code=OK if decision.allowed else OVER_LIMIT,  # OK: shadow
                current_limit=_current_limit(decision),
                limit_remaining=max(0, decision.tokens_remaining),
            )
        statuses.append(status)
    return rls_pb2.RateLimitResponse(overall_code=overall, statuses=statuses)


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    """Answers ShouldRateLimit from the decision seam, once the store's commit barrier
    says the grants are durable (else UNAVAILABLE: the tokens stay spent)."""

    def __init__(
        self,
        decider: Decider,
        metrics: NodeMetrics | None = None,
        *,
        outcomes: Outcomes | None = None,
    ) -> None:
        self.decider = decider
        self.metrics = metrics
        self.outcomes = outcomes

    async def ShouldRateLimit(self, request: Any, context: Any) -> Any:  # the gRPC method's name
        try:
            response = await decide(self.decider, request, self.metrics, self.outcomes)
        except BadRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except BucketCapReached as error:
            # Envoy's failure_mode_deny decides what an unavailable service means
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        barrier = self.decider.commit()
        if barrier is not None and not await barrier:
            # the tokens stay spent in memory (erring toward safety); Envoy is told no
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the decision could not be made durable; retry"
            )
        return response


_log = logger("envoy")


def _server_credentials(files: TlsFiles) -> Any:
    """gRPC's TLS credentials from the node's certificate files (``tls:``), re-read
    when they change: gRPC asks before each handshake. With ``clientAuth: all`` a
    client certificate the CA signed is required (Envoy's own, in its cluster's
    ``transport_socket``); ``sync`` asks for none here, there being no sync on
    this port."""
    assert files.cert_file is not None
    paths = [p for p in (files.cert_file, files.key_file, files.ca_file) if p]

    def stamp() -> list[tuple[int, int, int]]:
        stamps = []
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                stamps.append((-1, -1, -1))
            else:
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return stamps

    def configuration() -> Any:
        with open(files.cert_file or "", "rb") as chain_file:
            chain = chain_file.read()
        with open(files.key_file or files.cert_file or "", "rb") as key_file:
            key = key_file.read()
        ca = None
        if files.ca_file is not None:
            with open(files.ca_file, "rb") as ca_file:
                ca = ca_file.read()
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

    seen = [stamp()]

    def fetch() -> Any:
        now = stamp()
        if now == seen[0]:
            return None  # unchanged: gRPC keeps what it has
        seen[0] = now
        try:
            return configuration()
        except OSError as error:
            _log.error("envoyListen: TLS files changed but cannot be read: %s", error)
            return None

    return grpc.dynamic_ssl_server_credentials(
        configuration(), fetch, require_client_authentication=files.client_auth == "all"
    )


class EnvoyServer:
    """The grpc.aio server on ``host:port``; ``port`` is the bound port after start."""

    def __init__(
        self,
        servicer: RateLimitServicer,
        host: str,
        port: int,
        *,
        tls: TlsContexts | None = None,
    ) -> None:
        self.servicer = servicer
        self.host = host
        self.port = port
        self.tls = tls if tls is not None and tls.files.serves else None
        self.server: Any = None

    async def start(self) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),  # a busy port is an error, not a shared one
            ]
        )
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(self.servicer, server)  # type: ignore[no-untyped-call]
        host = f"[{self.host}]" if ":" in self.host else (self.host or "0.0.0.0")
        # grpc reports a failed bind as RuntimeError or port 0; the CLI prints an OSError
        problem = OSError(f"cannot listen on {host}:{self.port} (envoyListen): address in use?")
        try:
            if self.tls is not None:
                bound = server.add_secure_port(
                    f"{host}:{self.port}", _server_credentials(self.tls.files)
                )
            else:
                bound = server.add_insecure_port(f"{host}:{self.port}")
        except RuntimeError:
            raise problem from None
        if not bound:
            raise problem
        self.port = bound
        await server.start()
        self.server = server

    async def stop(self, grace: float = 5.0) -> None:
        if self.server is not None:
            await asyncio.shield(self.server.stop(grace))
            self.server = None
