"""The Rating API of docs/api.md, through a real ``bucketmesh serve`` process and httpx.

Most tests share one server (``server``) and use keys of their own; a test that
changes rules, needs flags, counts metrics or restarts the process gets its own
(``serve``). The default rules (tests/conftest.py): the seed rule
``agent-api-key-{{ .Request.Header.X-API-Key }}`` (5000, 50/s), ``tiny``
(``tiny-{{ .Request.Query.user }}``, 2 tokens, one per 4 s) and ``slow``
(``slow-{{ .Request.Header.X-User }}``, 5 tokens, one per 100 s), and no
catch-all, so a request carrying none of those matches no rule.

No outcome here may depend on the machine's speed. A test that needs a bucket
to stay empty while it makes several requests uses ``slow``: a test lives at
most 60 s (its timeout), too short for ``slow`` to refill one token. ``tiny``
refills within 4 s, so a test that needs its refill to be precise measures the
time around its requests and, should the box be too slow for tiny's window,
tries again with a fresh key rather than asserting on a token that came back.
"""

from __future__ import annotations

import itertools
import json
import math
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SEED_RULE, Server, ServerFactory, eventually, make_config
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(60)

PROBLEM = "application/problem+json"
SEED_API_KEY = "my-agent-key"
SEED_BUCKET = "agent-api-key-my-agent-key"
#: The decision fields docs/api.md shows for 200 (and, with allowed false, for 429).
DECISION_FIELDS = {
    "allowed": bool,
    "key": str,
    "tokens_remaining": int,
    "capacity": int,
    "refill_rate": float,
    "retry_after": float,
    "reset_after": float,
    "mode": str,
    "region": str,
}
ADMIN_TOKEN = "s3cret-admin-token"

_counter = itertools.count()


def fresh(prefix: str = "k") -> str:
    """A name no other test uses, for keys on the shared server."""
    return f"{prefix}{next(_counter)}{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def server(serve_module: ServerFactory) -> Server:
    return serve_module()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


# -- helpers -------------------------------------------------------------------


def rate(
    client: httpx.Client,
    api_key: str | None = None,
    body: Any = None,
    *,
    path: str = "/v1/rate",
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> httpx.Response:
    sent = dict(headers or {})
    if api_key is not None:
        sent["X-API-Key"] = api_key
    if body is None:
        return client.post(path, headers=sent, params=params)
    return client.post(path, headers=sent, params=params, json=body)


def state(client: httpx.Client, key: str) -> dict[str, Any]:
    response = client.get("/v1/bucket/state", params={"key": key})
    assert response.status_code == 200, response.text
    return response.json()


def used(bucket_state: dict[str, Any]) -> int:
    return sum(entry["used"] for entry in bucket_state["replicas"].values())


def assert_problem(
    response: httpx.Response, status: int, field: str | None = None
) -> dict[str, Any]:
    """``response`` is RFC 9457 problem+json with ``status`` (and names ``field``)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].split(";")[0] == PROBLEM, response.headers
    problem = response.json()
    for name, kind in (("type", str), ("title", str), ("status", int), ("detail", str)):
        assert isinstance(problem.get(name), kind), (name, problem)
    assert problem["status"] == status
    if field is not None:
        assert problem.get("field") == field, problem
    return problem


def assert_decision(body: dict[str, Any]) -> None:
    for name, kind in DECISION_FIELDS.items():
        assert name in body, (name, body)
        assert isinstance(body[name], kind), (name, body[name])


def metric_samples(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(server.url("/metrics"), timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def tiny(client: httpx.Client, user: str, tokens: int | None = None) -> httpx.Response:
    return rate(client, body=None if tokens is None else {"tokens": tokens}, params={"user": user})


def slow(client: httpx.Client, user: str, tokens: int = 1) -> httpx.Response:
    return rate(client, body={"tokens": tokens}, headers={"X-User": user})


# -- configuration ---------------------------------------------------------------

#: The seed config of docs/api.md, as written (only the peer URLs point at closed loopback ports).
SEED_CONFIG_YAML = """\
region: us-east-1
listen: 0.0.0.0:8080
sync:
  enabled: true
  syncClusterId: "global-rate-limit-cluster"
  peers:                      # region names; this node's own region may be listed and is skipped
    - "us-east-1"
    - "us-west-2"
    - "eu-central-1"
  peerUrls:                   # how to reach each region
    us-west-2: http://127.0.0.1:9
    eu-central-1: http://127.0.0.1:9
  secret: ${BUCKETMESH_SYNC_SECRET}
storage:
  backend: memory             # memory (default, snapshot file) | redis
  snapshot: ./data/state.snap
  redisUrl: redis://localhost:6379/0
admin:
  token: ${BUCKETMESH_ADMIN_TOKEN}
buckets:                      # may also be a separate buckets.yaml holding just this list
  - key: "agent-api-key-{{ .Request.Header.X-API-Key }}"
    capacity: 5000
    refillRate: 50            # tokens per second
    ttl: 3600                 # seconds a full, idle bucket is kept
  - name: per-ip
    key: "ip-{{ .Request.ClientIP }}"
    rate: "100/minute"        # shorthand: capacity 100, refill 100 per 60 s
    mode: strict              # shared (default) | strict | local
"""


def test_seed_config_is_served_as_written(serve: ServerFactory) -> None:
    env = {"BUCKETMESH_SYNC_SECRET": "seed-secret", "BUCKETMESH_ADMIN_TOKEN": ADMIN_TOKEN}
    server = serve(raw_config=SEED_CONFIG_YAML, env=env)
    with server.client() as c:
        status = c.get("/v1/status").json()
        decision = rate(c, SEED_API_KEY, {"tokens": 1})
        catch_all = c.post("/v1/rate")
        unauthorised = patch(c, "per-ip", {"capacity": 10}, token=None)
        authorised = patch(c, "per-ip", {"capacity": 90})
    assert status["region"] == "us-east-1"
    assert status["cluster_id"] == "global-rate-limit-cluster"
    # sync.enabled / peers in /v1/status come with the sync mesh (issue 4, tests/test_mesh.py)
    assert decision.status_code == 200, decision.text
    assert decision.json()["key"] == SEED_BUCKET
    assert decision.json()["tokens_remaining"] == 4999
    assert catch_all.status_code == 200  # no X-API-Key: the per-ip rule takes it
    assert catch_all.json()["key"] == "ip-127.0.0.1"
    assert catch_all.json()["mode"] == "strict"
    assert unauthorised.status_code == 401
    assert authorised.status_code == 200, authorised.text


def test_config_error_exits_non_zero_naming_file_and_field(serve: ServerFactory) -> None:
    config = make_config(
        buckets=[
            {"name": "broken", "key": "b-{{ .Request.Query.u }}", "capacity": -1, "refillRate": 1}
        ]
    )
    server = serve(config, wait_ready=False, config_name="broken.yaml")
    assert server.wait(20) != 0
    error = server.stderr()
    assert "broken.yaml" in error
    assert "capacity" in error
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url("/healthz"), timeout=2)


# -- decisions -----------------------------------------------------------------


def test_allowed_decision_has_every_field_of_the_contract(client: httpx.Client) -> None:
    api_key = fresh("agent")
    response = rate(client, api_key, {"tokens": 1})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].split(";")[0] == "application/json"
    body = response.json()
    assert_decision(body)
    assert body["allowed"] is True
    assert body["key"] == f"agent-api-key-{api_key}"
    assert body["tokens_remaining"] == 4999
    assert body["capacity"] == 5000
    assert body["refill_rate"] == 50.0
    assert body["retry_after"] == 0.0
    assert 0.0 < body["reset_after"] <= 0.02
    assert body["mode"] == "shared"
    assert body["region"] == "us-east-1"


def test_allowed_decision_carries_ietf_ratelimit_headers(client: httpx.Client) -> None:
    response = rate(client, fresh("agent"), {"tokens": 1})
    assert response.status_code == 200
    # w: seconds to refill the whole bucket (5000 / 50)
    assert response.headers["RateLimit-Policy"] == '"agent-api-key";q=5000;w=100'
    assert response.headers["RateLimit"] == '"agent-api-key";r=4999;t=0'


def test_rate_alias_path_decides_like_v1(client: httpx.Client) -> None:
    api_key = fresh("agent")
    first = rate(client, api_key, {"tokens": 2}, path="/rate")
    second = rate(client, api_key, {"tokens": 3}, path="/v1/rate")
    assert first.status_code == second.status_code == 200
    assert first.json()["key"] == second.json()["key"] == f"agent-api-key-{api_key}"
    assert first.json()["tokens_remaining"] == 4998
    assert 4995 <= second.json()["tokens_remaining"] <= 4997  # plus what refilled meanwhile
    assert used(state(client, f"agent-api-key-{api_key}")) == 5


def test_missing_body_takes_one_token(client: httpx.Client) -> None:
    api_key = fresh("agent")
    response = rate(client, api_key)
    assert response.status_code == 200, response.text
    assert response.json()["tokens_remaining"] == 4999
    assert used(state(client, f"agent-api-key-{api_key}")) == 1


def test_header_name_is_matched_case_insensitively(client: httpx.Client) -> None:
    api_key = fresh("agent")
    response = client.post("/v1/rate", headers={"x-api-key": api_key}, json={"tokens": 1})
    assert response.status_code == 200
    assert response.json()["key"] == f"agent-api-key-{api_key}"


def test_denied_decision_is_problem_json_of_type_quota_exceeded(client: httpx.Client) -> None:
    def two_grants_then_a_third() -> tuple[str, httpx.Response, float]:
        user = fresh("u")
        started = time.monotonic()
        assert tiny(client, user).status_code == 200
        assert tiny(client, user).status_code == 200
        third = tiny(client, user)
        elapsed = time.monotonic() - started
        if third.status_code != 429 and elapsed >= 4.0:
            # tiny gives a token back 4 s after the first grant: a box this slow may
            # grant the third, so again with a fresh user (under 4 s it must deny it)
            raise AssertionError(f"the three requests took {elapsed:.1f} s")
        return user, third, elapsed

    user, denied, elapsed = eventually(two_grants_then_a_third, "three requests within 4 s")
    problem = assert_problem(denied, 429)
    assert problem["type"] == "quota-exceeded"
    assert problem["title"]
    assert_decision(problem)
    assert problem["allowed"] is False
    assert problem["key"] == f"tiny-{user}"
    assert problem["tokens_remaining"] == 0
    assert problem["capacity"] == 2
    assert problem["refill_rate"] == 0.25
    assert problem["region"] == "us-east-1"
    # one token comes back 4 s after the first grant: a precise, fractional wait
    assert 4.0 - elapsed <= problem["retry_after"] <= 4.0
    assert problem["retry_after"] != math.floor(problem["retry_after"])
    assert denied.headers["Retry-After"] == str(math.ceil(problem["retry_after"]))
    assert denied.headers["RateLimit-Policy"] == '"tiny";q=2;w=8'
    assert denied.headers["RateLimit"] == f'"tiny";r=0;t={math.ceil(problem["retry_after"])}'


def test_retry_after_header_rounds_a_fraction_of_a_second_up(serve: ServerFactory) -> None:
    server = serve(
        make_config(
            buckets=[
                {
                    "name": "fast",
                    "key": "fast-{{ .Request.Query.u }}",
                    "capacity": 1,
                    "refillRate": 2.5,
                }
            ]
        )
    )
    with server.client() as c:

        def grant_then_deny() -> httpx.Response:
            user = fresh("f")
            started = time.monotonic()
            assert c.post("/v1/rate", params={"u": user}).status_code == 200
            second = c.post("/v1/rate", params={"u": user})
            elapsed = time.monotonic() - started
            if second.status_code != 429 and elapsed >= 0.4:
                # the token is back 0.4 s after the grant: a box this slow may grant the
                # second, so again with a fresh user (under 0.4 s it must deny it)
                raise AssertionError(f"the two requests took {elapsed:.2f} s")
            return second

        denied = eventually(grant_then_deny, "two requests within 0.4 s")
    problem = assert_problem(denied, 429)
    assert 0.0 < problem["retry_after"] <= 0.4
    assert denied.headers["Retry-After"] == "1"


def test_denied_request_charges_nothing(client: httpx.Client) -> None:
    user = fresh("u")
    assert slow(client, user, 4).status_code == 200
    assert slow(client, user).status_code == 200
    for _ in range(3):
        assert slow(client, user).status_code == 429
    assert used(state(client, f"slow-{user}")) == 5


def test_tokens_zero_peeks_without_consuming(client: httpx.Client) -> None:
    api_key = fresh("agent")
    key = f"agent-api-key-{api_key}"
    assert rate(client, api_key, {"tokens": 3}).status_code == 200
    for _ in range(5):
        peek = rate(client, api_key, {"tokens": 0})
        assert peek.status_code == 200
        assert peek.json()["allowed"] is True
        assert 4997 <= peek.json()["tokens_remaining"] <= 5000  # refill, never a charge
    assert used(state(client, key)) == 3


def test_peek_at_an_empty_bucket_reports_its_level_without_charging(client: httpx.Client) -> None:
    user = fresh("u")
    assert slow(client, user, 5).status_code == 200
    peek = slow(client, user, 0)
    assert peek.status_code == 200
    assert peek.json()["tokens_remaining"] == 0
    assert used(state(client, f"slow-{user}")) == 5


def test_peek_at_an_unknown_key_creates_no_bucket(client: httpx.Client) -> None:
    key = f"agent-api-key-{fresh('ghost')}"
    peek = client.post("/v1/rate", json={"key": key, "tokens": 0})
    assert peek.status_code == 200
    assert peek.json()["tokens_remaining"] == 5000
    after = state(client, key)
    assert after["live"] is False
    assert used(after) == 0


def test_get_rate_takes_key_and_tokens_from_the_query(client: httpx.Client) -> None:
    key = f"agent-api-key-{fresh('q')}"
    response = client.get("/v1/rate", params={"key": key, "tokens": "3"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert_decision(body)
    assert body["key"] == key
    assert body["tokens_remaining"] == 4997
    assert used(state(client, key)) == 3


def test_get_rate_renders_the_key_from_headers_and_defaults_to_one_token(
    client: httpx.Client,
) -> None:
    api_key = fresh("curl")
    response = client.get("/v1/rate", headers={"X-API-Key": api_key})
    assert response.status_code == 200
    assert response.json()["key"] == f"agent-api-key-{api_key}"
    assert response.json()["tokens_remaining"] == 4999


def test_get_rate_denies_with_429_like_post(client: httpx.Client) -> None:
    user = fresh("u")
    statuses = [client.get("/v1/rate", headers={"X-User": user}).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]


def test_key_is_rendered_from_the_x_api_key_header(client: httpx.Client) -> None:
    response = rate(client, SEED_API_KEY + "-render", {"tokens": 1})
    assert response.json()["key"] == "agent-api-key-my-agent-key-render"


def test_body_key_and_rule_choose_bucket_and_limits(client: httpx.Client) -> None:
    key = fresh("custom-")
    response = client.post("/v1/rate", json={"key": key, "rule": "tiny", "tokens": 1})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["key"] == key
    assert body["capacity"] == 2
    assert body["tokens_remaining"] == 1


def test_body_key_without_rule_takes_the_rule_its_template_matches(client: httpx.Client) -> None:
    key = f"tiny-{fresh('u')}"
    response = client.post("/v1/rate", json={"key": key})
    assert response.status_code == 200
    assert response.json()["capacity"] == 2


def test_body_key_matching_no_rule_is_400_on_field_key(client: httpx.Client) -> None:
    response = client.post("/v1/rate", json={"key": fresh("nothing-matches-")})
    assert_problem(response, 400, field="key")


def test_unknown_rule_in_body_is_400_on_field_rule(client: httpx.Client) -> None:
    response = client.post("/v1/rate", json={"key": fresh("x"), "rule": "no-such-rule"})
    assert_problem(response, 400, field="rule")


# -- request errors ------------------------------------------------------------


def test_missing_api_key_header_is_400_naming_the_header(client: httpx.Client) -> None:
    response = client.post("/v1/rate", json={"tokens": 1})
    problem = assert_problem(response, 400, field="X-API-Key")
    assert "X-API-Key" in problem["detail"]


def test_empty_api_key_header_is_400_naming_the_header(client: httpx.Client) -> None:
    response = client.post("/v1/rate", headers={"X-API-Key": ""}, json={"tokens": 1})
    assert_problem(response, 400, field="X-API-Key")


def test_missing_query_parameter_of_the_first_rule_is_400_naming_the_parameter(
    serve: ServerFactory,
) -> None:
    server = serve(
        make_config(
            buckets=[
                {
                    "name": "small",
                    "key": "small-{{ .Request.Query.user }}",
                    "capacity": 5,
                    "refillRate": 1,
                },
                SEED_RULE,
            ]
        )
    )
    with server.client() as c:
        response = c.post("/v1/rate", json={"tokens": 1})
    problem = assert_problem(response, 400, field="user")
    assert "user" in problem["detail"]


@pytest.mark.parametrize(
    ("tokens", "why"),
    [
        (-1, "negative"),
        (1.5, "not an integer"),
        ("3", "a string"),
        (True, "a boolean"),
        (None, "null"),
        (5001, "above the capacity"),
        (10**30, "far above the capacity"),
    ],
)
def test_invalid_tokens_in_body_is_400_on_field_tokens(
    client: httpx.Client, tokens: object, why: str
) -> None:
    api_key = fresh("agent")
    response = rate(client, api_key, {"tokens": tokens})
    assert_problem(response, 400, field="tokens")
    assert used(state(client, f"agent-api-key-{api_key}")) == 0, why


@pytest.mark.parametrize("tokens", ["-1", "1.5", "abc", "", "5001"])
def test_invalid_tokens_in_query_is_400_on_field_tokens(client: httpx.Client, tokens: str) -> None:
    key = f"agent-api-key-{fresh('q')}"
    response = client.get("/v1/rate", params={"key": key, "tokens": tokens})
    assert_problem(response, 400, field="tokens")
    assert used(state(client, key)) == 0


@pytest.mark.parametrize(
    "body",
    [b'{"tokens":', b'{"tokens": 1,}', b"{tokens: 1}", b'{"tokens": 1} trailing', b"[1, 2"],
)
def test_malformed_json_is_400(client: httpx.Client, body: bytes) -> None:
    response = client.post(
        "/v1/rate",
        headers={"X-API-Key": fresh("agent"), "Content-Type": "application/json"},
        content=body,
    )
    assert_problem(response, 400)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'"hello"', "body"),
        (b"[1, 2]", "body"),
        (b"null", "body"),
        (b'{"tokenz": 1}', "tokenz"),
        (b'{"key": 7}', "key"),
        (b'{"rule": ["tiny"]}', "rule"),
    ],
)
def test_wrongly_typed_body_is_400_naming_the_field(
    client: httpx.Client, body: bytes, field: str
) -> None:
    response = client.post(
        "/v1/rate",
        headers={"X-API-Key": fresh("agent"), "Content-Type": "application/json"},
        content=body,
    )
    assert_problem(response, 400, field=field)


def test_text_plain_body_is_415(client: httpx.Client) -> None:
    api_key = fresh("agent")
    response = client.post(
        "/v1/rate",
        headers={"X-API-Key": api_key, "Content-Type": "text/plain"},
        content=b"tokens=1",
    )
    assert_problem(response, 415)
    assert used(state(client, f"agent-api-key-{api_key}")) == 0


def test_json_body_labelled_text_plain_is_still_415(client: httpx.Client) -> None:
    response = client.post(
        "/v1/rate",
        headers={"X-API-Key": fresh("agent"), "Content-Type": "text/plain"},
        content=b'{"tokens": 1}',
    )
    assert_problem(response, 415)


def test_body_without_content_type_that_is_not_json_is_415(client: httpx.Client) -> None:
    response = client.post(
        "/v1/rate", headers={"X-API-Key": fresh("agent")}, content=b"hello world"
    )
    assert_problem(response, 415)


def test_body_larger_than_the_default_64_kib_is_413(client: httpx.Client) -> None:
    api_key = fresh("agent")
    body = b'{"tokens": 1}' + b" " * (65536 - 13 + 1)
    response = client.post(
        "/v1/rate",
        headers={"X-API-Key": api_key, "Content-Type": "application/json"},
        content=body,
    )
    assert_problem(response, 413)
    assert used(state(client, f"agent-api-key-{api_key}")) == 0


def test_body_of_exactly_64_kib_is_accepted(client: httpx.Client) -> None:
    body = b'{"tokens": 1}' + b" " * (65536 - 13)
    assert len(body) == 65536
    response = client.post(
        "/v1/rate",
        headers={"X-API-Key": fresh("agent"), "Content-Type": "application/json"},
        content=body,
    )
    assert response.status_code == 200, response.text


def test_max_body_bytes_is_configurable(serve: ServerFactory) -> None:
    server = serve(make_config(limits={"maxBodyBytes": 1024}))
    headers = {"X-API-Key": "small-bodies", "Content-Type": "application/json"}
    with server.client() as c:
        fits = c.post("/v1/rate", headers=headers, content=b'{"tokens":1}'.ljust(1024))
        too_big = c.post("/v1/rate", headers=headers, content=b'{"tokens":1}'.ljust(1025))
    assert fits.status_code == 200, fits.text
    assert_problem(too_big, 413)


def test_new_keys_beyond_max_buckets_get_503_and_existing_keys_keep_being_served(
    serve: ServerFactory,
) -> None:
    server = serve(max_buckets=2)
    with server.client() as c:
        assert rate(c, "one").status_code == 200
        assert rate(c, "two").status_code == 200
        refused = rate(c, "three")
        assert rate(c, "one").status_code == 200
        assert rate(c, "three", {"tokens": 0}).status_code == 200  # a peek creates nothing
    assert_problem(refused, 503)
    assert int(refused.headers["Retry-After"]) >= 1


# -- batch ---------------------------------------------------------------------


def test_batch_decides_each_item_in_order_with_mixed_results(client: httpx.Client) -> None:
    slow_key = f"slow-{fresh('u')}"
    agent_key = f"agent-api-key-{fresh('b')}"
    items = [
        {"key": slow_key, "tokens": 3},
        {"key": slow_key, "tokens": 2},
        {"key": slow_key},
        {"key": agent_key, "tokens": 7},
    ]
    response = client.post("/v1/rate/batch", json={"requests": items})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["allowed"] for r in body["results"]] == [True, True, False, True]
    assert [r["key"] for r in body["results"]] == [slow_key] * 3 + [agent_key]
    assert body["allowed"] == 3
    assert body["denied"] == 1
    for result in body["results"]:
        assert_decision(result)
        assert result["region"] == "us-east-1"
    assert body["results"][2]["retry_after"] > 0
    assert used(state(client, slow_key)) == 5
    assert used(state(client, agent_key)) == 7


def test_batch_items_without_key_are_rendered_from_the_request_headers(
    client: httpx.Client,
) -> None:
    api_key = fresh("agent")
    response = client.post(
        "/v1/rate/batch",
        headers={"X-API-Key": api_key},
        json={"requests": [{}, {"tokens": 2}]},
    )
    assert response.status_code == 200, response.text
    assert [r["key"] for r in response.json()["results"]] == [f"agent-api-key-{api_key}"] * 2
    assert used(state(client, f"agent-api-key-{api_key}")) == 3


def test_atomic_batch_charges_nothing_when_any_item_is_denied(client: httpx.Client) -> None:
    slow_key = f"slow-{fresh('u')}"
    agent_key = f"agent-api-key-{fresh('b')}"
    first = client.post("/v1/rate", json={"key": slow_key, "tokens": 4})
    assert first.status_code == 200  # 1 of 5 left
    before_slow = state(client, slow_key)
    items = [{"key": agent_key, "tokens": 10}, {"key": slow_key, "tokens": 2}]
    response = client.post("/v1/rate/batch", json={"requests": items, "atomic": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["allowed"] for r in body["results"]] == [False, False]
    assert body["allowed"] == 0
    assert body["denied"] == 2
    assert body["results"][1]["retry_after"] > 0
    assert used(state(client, agent_key)) == 0
    after_slow = state(client, slow_key)
    assert after_slow["replicas"] == before_slow["replicas"]


def test_atomic_batch_sums_what_it_asks_of_one_key(client: httpx.Client) -> None:
    tiny_key = f"tiny-{fresh('u')}"
    items = [{"key": tiny_key}, {"key": tiny_key}, {"key": tiny_key}]  # 3 > capacity 2
    response = client.post("/v1/rate/batch", json={"requests": items, "atomic": True})
    assert response.status_code == 200
    assert [r["allowed"] for r in response.json()["results"]] == [False] * 3
    assert used(state(client, tiny_key)) == 0


def test_atomic_batch_grants_every_item_when_all_fit(client: httpx.Client) -> None:
    tiny_key = f"tiny-{fresh('u')}"
    agent_key = f"agent-api-key-{fresh('b')}"
    items = [{"key": agent_key, "tokens": 10}, {"key": tiny_key}, {"key": tiny_key}]
    response = client.post("/v1/rate/batch", json={"requests": items, "atomic": True})
    assert response.status_code == 200
    body = response.json()
    assert [r["allowed"] for r in body["results"]] == [True, True, True]
    assert body["allowed"] == 3
    assert used(state(client, agent_key)) == 10
    assert used(state(client, tiny_key)) == 2


def test_batch_of_1000_items_is_accepted(client: httpx.Client) -> None:
    agent_key = f"agent-api-key-{fresh('b')}"
    response = client.post("/v1/rate/batch", json={"requests": [{"key": agent_key}] * 1000})
    assert response.status_code == 200, response.text
    assert response.json()["allowed"] == 1000
    assert used(state(client, agent_key)) == 1000


def test_batch_of_more_than_1000_items_is_400_and_charges_nothing(client: httpx.Client) -> None:
    agent_key = f"agent-api-key-{fresh('b')}"
    response = client.post("/v1/rate/batch", json={"requests": [{"key": agent_key}] * 1001})
    assert_problem(response, 400, field="requests")
    assert used(state(client, agent_key)) == 0


def test_an_empty_batch_is_400_naming_requests(client: httpx.Client) -> None:
    """docs/api.md: ``requests`` needs 1 item or more (it answered 200 with no result)."""
    response = client.post("/v1/rate/batch", json={"requests": []})
    assert_problem(response, 400, field="requests")


@pytest.mark.parametrize("atomic", [False, True])
def test_batch_with_an_invalid_item_is_400_and_charges_nothing(
    client: httpx.Client, atomic: bool
) -> None:
    tiny_key = f"tiny-{fresh('u')}"
    agent_key = f"agent-api-key-{fresh('b')}"
    items = [{"key": agent_key, "tokens": 3}, {"key": tiny_key, "tokens": 9}]
    response = client.post("/v1/rate/batch", json={"requests": items, "atomic": atomic})
    # nothing is charged, whatever the answer: not the valid item before the bad one
    assert used(state(client, agent_key)) == 0
    assert used(state(client, tiny_key)) == 0
    if atomic:
        # all or nothing: an item no bucket can ever grant is a denial or a 400
        assert response.status_code in (200, 400), response.text
        if response.status_code == 200:
            assert response.json()["allowed"] == 0
    else:
        assert_problem(response, 400, field="requests[1].tokens")


def test_batch_item_with_no_matching_rule_is_400_and_charges_nothing(client: httpx.Client) -> None:
    agent_key = f"agent-api-key-{fresh('b')}"
    items = [{"key": agent_key, "tokens": 3}, {"key": fresh("matches-nothing-")}]
    response = client.post("/v1/rate/batch", json={"requests": items})
    assert used(state(client, agent_key)) == 0
    assert_problem(response, 400, field="requests[1].key")


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"", 400),
        (b"{}", 400),
        (b'{"requests": {}}', 400),
        (b'{"requests": [{"tokens": -1, "key": "tiny-x"}]}', 400),
        (b'{"requests": [', 400),
        (b"not json", 415),
    ],
)
def test_malformed_batch_is_rejected(client: httpx.Client, body: bytes, status: int) -> None:
    response = client.post(
        "/v1/rate/batch", headers={"Content-Type": "application/json"}, content=body
    )
    assert_problem(response, status)


# -- PATCH /v1/buckets/{key} ------------------------------------------------------


def patch(
    client: httpx.Client,
    key: str,
    body: dict[str, Any],
    token: str | None = ADMIN_TOKEN,
    path: str = "/v1/buckets/",
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return client.patch(path + key, headers=headers, json=body)


def test_patch_by_rule_name_applies_to_existing_and_new_keys(serve: ServerFactory) -> None:
    server = serve(admin_token=ADMIN_TOKEN)
    with server.client() as c:
        assert slow(c, "old").status_code == 200
        response = patch(c, "slow", {"capacity": 50, "refillRate": 2})
        assert response.status_code == 200, response.text
        config = response.json()
        assert config["key"] == "slow"
        assert config["rule"] == "slow"
        assert config["applies_to"] == "rule"
        assert config["capacity"] == 50
        assert config["refill_rate"] == 2.0
        assert config["version"]
        existing = state(c, "slow-old")
        assert existing["capacity"] == 50
        assert existing["refill_rate"] == 2.0
        assert existing["config_version"] == config["version"]
        new = slow(c, "new")
        assert new.status_code == 200
        assert new.json()["capacity"] == 50
        assert new.json()["tokens_remaining"] == 49  # a new key starts full at the new size
        assert new.headers["RateLimit-Policy"] == '"slow";q=50;w=25'
        rule = c.get("/v1/buckets/slow").json()
        assert rule["capacity"] == 50
        assert rule["version"] == config["version"]


def test_patch_capacity_raise_keeps_the_level_and_does_not_refill(serve: ServerFactory) -> None:
    server = serve(admin_token=ADMIN_TOKEN)
    with server.client() as c:
        assert slow(c, "alice", 3).status_code == 200  # 2 of 5 left
        response = patch(c, "slow", {"capacity": 50})
        assert response.status_code == 200, response.text
        after = state(c, "slow-alice")
        assert after["capacity"] == 50
        assert after["tokens_remaining"] == 2
        assert slow(c, "alice", 3).status_code == 429
        assert slow(c, "alice", 2).status_code == 200
        assert slow(c, "alice", 1).status_code == 429


def test_patch_capacity_cut_caps_the_level(serve: ServerFactory) -> None:
    server = serve(admin_token=ADMIN_TOKEN)
    with server.client() as c:
        assert slow(c, "bob", 1).status_code == 200  # 4 of 5 left
        assert patch(c, "slow", {"capacity": 2}).status_code == 200
        after = state(c, "slow-bob")
        assert after["capacity"] == 2
        assert after["tokens_remaining"] == 2
        assert slow(c, "bob", 2).status_code == 200
        assert slow(c, "bob", 1).status_code == 429


def test_patch_by_concrete_key_changes_only_that_key(serve: ServerFactory) -> None:
    server = serve(admin_token=ADMIN_TOKEN)
    with server.client() as c:
        assert slow(c, "carol").status_code == 200
        assert slow(c, "dave").status_code == 200
        response = patch(c, "slow-carol", {"capacity": 7})
        assert response.status_code == 200, response.text
        config = response.json()
        assert config["applies_to"] == "key"
        assert config["rule"] == "slow"
        assert config["capacity"] == 7
        carol = state(c, "slow-carol")
        assert carol["capacity"] == 7
        assert carol["tokens_remaining"] == 4  # level kept
        assert carol["config_version"] == config["version"]
        assert state(c, "slow-dave")["capacity"] == 5
        assert c.get("/v1/buckets/slow").json()["capacity"] == 5
        assert slow(c, "erin").json()["capacity"] == 5


def test_patch_of_a_key_not_yet_seen_applies_when_it_is_used(serve: ServerFactory) -> None:
    server = serve(admin_token=ADMIN_TOKEN)
    with server.client() as c:
        assert patch(c, "slow-frank", {"capacity": 9}).status_code == 200
        first = slow(c, "frank")
        assert first.status_code == 200
        assert first.json()["capacity"] == 9
        assert used(state(c, "slow-frank")) == 1


def test_each_patch_returns_a_newer_version(serve: ServerFactory) -> None:
    server = serve(admin_token=ADMIN_TOKEN)
    with server.client() as c:
        original = c.get("/v1/buckets/tiny").json()["version"]
        first = patch(c, "tiny", {"capacity": 3}).json()["version"]
        second = patch(c, "tiny", {"refillRate": 1}).json()["version"]
    assert len({original, first, second}) == 3
    clock = [int(v.split("@", 1)[0]) for v in (original, first, second)]
    assert clock[0] < clock[1] < clock[2]


def test_patch_alias_path_and_refill_rate_spelling(serve: ServerFactory) -> None:
    server = serve(admin_token=ADMIN_TOKEN)
    with server.client() as c:
        response = patch(
            c, "tiny", {"refill_rate": 0.5, "ttl": 60, "mode": "local"}, path="/buckets/"
        )
        assert response.status_code == 200, response.text
        config = response.json()
        assert config["refill_rate"] == 0.5
        assert config["ttl"] == 60.0
        assert config["mode"] == "local"
        decision = tiny(c, "zed").json()
        assert decision["refill_rate"] == 0.5
        assert decision["mode"] == "local"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": -5}, "capacity"),
        ({"capacity": 2.5}, "capacity"),
        ({"refillRate": 0}, "refillRate"),
        ({"refillRate": -1}, "refillRate"),
        ({"ttl": 0}, "ttl"),
        ({"mode": "bogus"}, "mode"),
        ({"capacity": "10"}, "capacity"),
        ({"refillRate": 1, "refill_rate": 2}, "refillRate"),
    ],
)
def test_patch_with_an_invalid_field_is_400_and_changes_nothing(
    serve_module: ServerFactory, body: dict[str, Any], field: str
) -> None:
    server = _patch_target(serve_module)
    with server.client() as c:
        before = c.get("/v1/buckets/tiny").json()
        response = patch(c, "tiny", body)
        assert_problem(response, 400, field=field)
        assert c.get("/v1/buckets/tiny").json() == before


def _patch_target(factory: ServerFactory) -> Server:
    """One server (per module) that PATCH error tests share: they never change it."""
    for server in factory.servers:
        if "--admin-token" in server.args and server.alive():
            return server
    return factory(admin_token=ADMIN_TOKEN)


def test_patch_with_nothing_to_change_is_400(serve_module: ServerFactory) -> None:
    server = _patch_target(serve_module)
    with server.client() as c:
        assert_problem(patch(c, "tiny", {}), 400)


def test_patch_of_a_key_no_rule_matches_is_404(serve_module: ServerFactory) -> None:
    server = _patch_target(serve_module)
    with server.client() as c:
        assert_problem(patch(c, "matches-nothing", {"capacity": 3}), 404)


def test_patch_with_a_non_json_body_is_415(serve_module: ServerFactory) -> None:
    server = _patch_target(serve_module)
    with server.client() as c:
        response = c.patch(
            "/v1/buckets/tiny",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "text/plain"},
            content=b"capacity=3",
        )
    assert_problem(response, 415)


def test_patch_requires_the_admin_token(serve: ServerFactory) -> None:
    server = serve(admin_token=ADMIN_TOKEN)
    with server.client() as c:
        before = c.get("/v1/buckets/tiny").json()
        without = patch(c, "tiny", {"capacity": 99}, token=None)
        basic = c.patch(
            "/v1/buckets/tiny", headers={"Authorization": "Basic YTpi"}, json={"capacity": 99}
        )
        wrong = patch(c, "tiny", {"capacity": 99}, token="not-the-token")
        assert c.get("/v1/buckets/tiny").json() == before
        right = patch(c, "tiny", {"capacity": 99})
    assert_problem(without, 401, field="Authorization")
    assert "Bearer" in without.headers["WWW-Authenticate"]
    assert_problem(basic, 401)
    assert_problem(wrong, 403, field="Authorization")
    assert right.status_code == 200, right.text
    assert right.json()["capacity"] == 99
    samples = metric_samples(server)
    assert samples[("bucketmesh_rejected_requests_total", (("reason", "unauthenticated"),))] == 2
    assert samples[("bucketmesh_rejected_requests_total", (("reason", "forbidden"),))] >= 1


def test_refused_patches_are_counted_under_the_buckets_route(serve: ServerFactory) -> None:
    server = serve(admin_token=ADMIN_TOKEN)
    with server.client() as c:
        assert patch(c, "tiny", {"capacity": 3}, token=None).status_code == 401
        assert patch(c, "tiny", {"capacity": 3}, token="wrong").status_code == 403
        assert patch(c, "tiny", {"capacity": 0}).status_code == 400
        assert patch(c, "tiny", {"capacity": 3}).status_code == 200
    samples = metric_samples(server)
    by_route = {
        (dict(labels)["route"], dict(labels)["status"]): value
        for (name, labels), value in samples.items()
        if name == "bucketmesh_http_responses_total"
    }
    # like every other response, a refusal is counted under the route that refused it
    for status in ("401", "403", "400", "200"):
        assert by_route.get(("buckets", status)) == 1, by_route


def test_patch_without_a_configured_admin_token_is_open(serve: ServerFactory) -> None:
    server = serve()
    with server.client() as c:
        response = patch(c, "tiny", {"capacity": 4}, token=None)
    assert response.status_code == 200, response.text


# -- Idempotency-Key -----------------------------------------------------------


def test_idempotent_retry_returns_the_first_decision_and_charges_once(client: httpx.Client) -> None:
    # slow: a fresh decision would differ however long the retry takes (1 token left,
    # not 3), since no token comes back within a test
    headers = {"X-User": fresh("idem"), "Idempotency-Key": fresh("idem-")}
    first = rate(client, body={"tokens": 2}, headers=headers)
    retry = rate(client, body={"tokens": 2}, headers=headers)
    assert first.status_code == retry.status_code == 200
    assert first.json()["tokens_remaining"] == 3
    assert retry.json() == first.json()
    assert retry.headers["RateLimit"] == first.headers["RateLimit"]
    assert used(state(client, f"slow-{headers['X-User']}")) == 2


def test_idempotent_retry_of_a_denial_is_the_same_denial(client: httpx.Client) -> None:
    user = fresh("u")
    assert slow(client, user, 5).status_code == 200
    headers = {"X-User": user, "Idempotency-Key": fresh("idem-")}
    first = rate(client, body={"tokens": 1}, headers=headers)
    retry = rate(client, body={"tokens": 1}, headers=headers)
    assert first.status_code == retry.status_code == 429
    assert retry.json() == first.json()
    assert retry.headers["Retry-After"] == first.headers["Retry-After"]


def test_distinct_idempotency_keys_are_charged_separately(client: httpx.Client) -> None:
    api_key = fresh("agent")
    for _ in range(3):
        response = rate(client, api_key, {"tokens": 2}, headers={"Idempotency-Key": fresh("i-")})
        assert response.status_code == 200
    assert used(state(client, f"agent-api-key-{api_key}")) == 6


def test_idempotent_batch_retry_charges_once(client: httpx.Client) -> None:
    agent_key = f"agent-api-key-{fresh('b')}"
    headers = {"Idempotency-Key": fresh("idem-")}
    body = {"requests": [{"key": agent_key, "tokens": 4}]}
    first = client.post("/v1/rate/batch", headers=headers, json=body)
    retry = client.post("/v1/rate/batch", headers=headers, json=body)
    assert first.status_code == retry.status_code == 200
    assert retry.json() == first.json()
    assert used(state(client, agent_key)) == 4


def test_idempotency_key_of_one_client_does_not_answer_another(client: httpx.Client) -> None:
    shared = {"Idempotency-Key": fresh("same-idem-")}
    alice, mallory = fresh("alice"), fresh("mallory")
    first = rate(client, alice, {"tokens": 1}, headers=shared)
    other = rate(client, mallory, {"tokens": 7}, headers=shared)
    assert first.json()["key"] == f"agent-api-key-{alice}"
    assert other.status_code == 200 or other.status_code >= 400
    if other.status_code == 200:
        # a decision for mallory's own bucket, charged to it
        assert other.json()["key"] == f"agent-api-key-{mallory}"
        assert used(state(client, f"agent-api-key-{mallory}")) == 7


def test_too_long_idempotency_key_is_400(client: httpx.Client) -> None:
    response = rate(client, fresh("agent"), headers={"Idempotency-Key": "x" * 257})
    assert_problem(response, 400, field="Idempotency-Key")


# -- status, state, buckets ---------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/status", "/status"])
def test_status_describes_this_node(client: httpx.Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    body = response.json()
    assert body["region"] == "us-east-1"
    assert body["node"] == "node-a"
    assert isinstance(body["cluster_id"], str)
    assert body["sync"]["enabled"] is False
    assert body["sync"]["local_only"] is False
    assert body["sync"]["peers"] == {}
    assert isinstance(body["buckets"], int)
    assert isinstance(body["version"], str) and body["version"]


def test_status_counts_live_buckets(serve: ServerFactory) -> None:
    server = serve()
    with server.client() as c:
        assert c.get("/v1/status").json()["buckets"] == 0
        rate(c, "a")
        rate(c, "b")
        rate(c, "b")
        assert c.get("/v1/status").json()["buckets"] == 2


@pytest.mark.parametrize("path", ["/v1/status", "/status"])
def test_status_with_key_also_shows_that_bucket(client: httpx.Client, path: str) -> None:
    api_key = fresh("agent")
    rate(client, api_key, {"tokens": 4})
    body = client.get(path, params={"key": f"agent-api-key-{api_key}"}).json()
    bucket = body["bucket"]
    assert bucket["key"] == f"agent-api-key-{api_key}"
    assert bucket["replicas"] == {body["replica_id"]: {"used": 4}}
    assert 4996 <= bucket["tokens_remaining"] <= 5000


def test_status_of_a_key_no_rule_matches_is_404(client: httpx.Client) -> None:
    assert_problem(client.get("/v1/status", params={"key": "matches-nothing"}), 404)


def test_bucket_state_has_the_contract_fields_and_a_replicas_map(client: httpx.Client) -> None:
    api_key = fresh("agent")
    rate(client, api_key, {"tokens": 120})
    body = state(client, f"agent-api-key-{api_key}")
    replica_id = client.get("/v1/status").json()["replica_id"]
    assert body["key"] == f"agent-api-key-{api_key}"
    assert 4880 <= body["tokens_remaining"] <= 5000
    assert body["capacity"] == 5000
    assert body["refill_rate"] == 50.0
    assert body["mode"] == "shared"
    assert isinstance(body["config_version"], str) and body["config_version"]
    assert body["replicas"] == {replica_id: {"used": 120}}
    region, node, incarnation = replica_id.split("/")
    assert (region, node) == ("us-east-1", "node-a")
    assert incarnation.isdigit()


def test_bucket_state_of_an_untouched_key_is_full_and_not_live(client: httpx.Client) -> None:
    key = f"tiny-{fresh('u')}"
    body = state(client, key)
    assert body["tokens_remaining"] == 2
    assert body["live"] is False
    assert used(body) == 0
    assert state(client, key)["live"] is False  # reading creates nothing


def test_bucket_state_without_key_is_400(client: httpx.Client) -> None:
    assert_problem(client.get("/v1/bucket/state"), 400, field="key")


def test_bucket_state_of_a_key_no_rule_matches_is_404(client: httpx.Client) -> None:
    assert_problem(
        client.get("/v1/bucket/state", params={"key": "matches-nothing"}), 404, field="key"
    )
    # a ?rule= that names no rule is that parameter's fault (it said "key")
    unknown = client.get("/v1/bucket/state", params={"key": "anything", "rule": "nope"})
    assert_problem(unknown, 404, field="rule")


def test_region_and_node_flags_name_the_replicas(serve: ServerFactory) -> None:
    server = serve(region="eu-central-1", node="node-b")
    with server.client() as c:
        decision = rate(c, "flags", {"tokens": 1}).json()
        status = c.get("/v1/status").json()
        replicas = state(c, "agent-api-key-flags")["replicas"]
    assert decision["region"] == "eu-central-1"
    assert (status["region"], status["node"]) == ("eu-central-1", "node-b")
    assert list(replicas) == [status["replica_id"]]
    assert status["replica_id"].startswith("eu-central-1/node-b/")


def test_get_bucket_by_rule_name_shows_the_rule_config(client: httpx.Client) -> None:
    response = client.get("/v1/buckets/tiny")
    assert response.status_code == 200
    body = response.json()
    assert body["key"] == "tiny"
    assert body["capacity"] == 2
    assert body["refill_rate"] == 0.25
    assert body["mode"] == "shared"
    assert body["version"]


def test_get_bucket_by_key_shows_config_and_state(client: httpx.Client) -> None:
    user = fresh("u")
    assert slow(client, user).status_code == 200
    response = client.get(f"/v1/buckets/slow-{user}")
    assert response.status_code == 200
    body = response.json()
    assert body["key"] == f"slow-{user}"
    assert body["rule"] == "slow"
    assert body["capacity"] == 5
    assert body["tokens_remaining"] == 4
    assert used(body) == 1


def test_get_bucket_of_a_key_no_rule_matches_is_404(client: httpx.Client) -> None:
    assert_problem(client.get("/v1/buckets/matches-nothing"), 404)


# -- operator endpoints and errors ------------------------------------------------------


def test_healthz_and_readyz_answer_200(client: httpx.Client) -> None:
    health = client.get("/healthz")
    ready = client.get("/readyz")
    assert health.status_code == ready.status_code == 200
    assert health.json()["status"] == "ok"
    assert ready.json()["status"] == "ready"
    assert all(value == "ok" for value in ready.json()["checks"].values())


def test_openapi_document_lists_the_endpoints(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for path, method in [
        ("/v1/rate", "post"),
        ("/v1/rate", "get"),
        ("/rate", "post"),
        ("/v1/rate/batch", "post"),
        ("/v1/bucket/state", "get"),
        ("/v1/status", "get"),
        ("/status", "get"),
        ("/v1/buckets/{key}", "get"),
        ("/v1/buckets/{key}", "patch"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ]:
        assert method in paths.get(path, {}), (method, path)


@pytest.mark.parametrize("path", ["/nope", "/v1", "/v1/rate/", "/v1/rates", "/v2/rate"])
def test_unknown_path_is_404_problem_json(client: httpx.Client, path: str) -> None:
    assert_problem(client.get(path), 404)


def test_empty_bucket_key_in_path_is_404(client: httpx.Client) -> None:
    assert_problem(client.get("/v1/buckets/"), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/v1/rate", {"GET", "POST"}),
        ("PUT", "/v1/rate", {"GET", "POST"}),
        ("GET", "/v1/rate/batch", {"POST"}),
        ("POST", "/v1/status", {"GET"}),
        ("POST", "/healthz", {"GET"}),
        ("DELETE", "/v1/buckets/tiny", {"GET", "PATCH"}),
        ("DELETE", "/rate", {"GET", "POST"}),  # GET /rate is served, as GET /v1/rate is
        ("POST", "/bucket/state", {"GET"}),
    ],
)
def test_wrong_method_is_405_problem_json_with_allow(
    client: httpx.Client, method: str, path: str, allowed: set[str]
) -> None:
    response = client.request(method, path)
    assert_problem(response, 405)
    assert {m.strip() for m in response.headers["Allow"].split(",")} >= allowed


def test_head_is_answered_like_get_without_a_body(client: httpx.Client) -> None:
    response = client.head("/healthz")
    assert response.status_code == 200
    assert response.content == b""


# -- the seed scenario and metrics ---------------------------------------------------------


def test_seed_scenario_drains_exactly_200_tokens(serve: ServerFactory) -> None:
    server = serve(make_config(buckets=[SEED_RULE]))
    with server.client() as c:
        started = time.monotonic()
        remaining = []
        for _ in range(200):
            response = c.post("/rate", headers={"X-API-Key": SEED_API_KEY}, json={"tokens": 1})
            assert response.status_code == 200, response.text
            assert response.json()["allowed"] is True
            remaining.append(response.json()["tokens_remaining"])
        status = c.get("/status", params={"key": SEED_BUCKET})
        elapsed = time.monotonic() - started
    assert status.status_code == 200
    body = status.json()
    bucket = body["bucket"]
    assert bucket["key"] == SEED_BUCKET
    assert bucket["capacity"] == 5000
    assert bucket["refill_rate"] == 50.0
    # exactly 200 tokens charged, all by this node's one replica
    assert bucket["replicas"] == {body["replica_id"]: {"used": 200}}
    # and what is left is 5000 − 200 plus at most what 50/s refilled meanwhile
    assert 4800 <= bucket["tokens_remaining"] <= min(5000, 4800 + math.ceil(50 * elapsed))
    assert remaining[0] == 4999
    assert all(4800 <= r <= 5000 for r in remaining)


def test_metrics_decision_counters_match_the_requests_made(serve: ServerFactory) -> None:
    server = serve()
    with server.client() as c:
        for _ in range(3):
            assert rate(c, "m").status_code == 200
        assert [slow(c, "m").status_code for _ in range(6)] == [200] * 5 + [429]
        batch = c.post("/v1/rate/batch", json={"requests": [{"key": "agent-api-key-m2"}] * 4})
        assert batch.status_code == 200
        assert rate(c, "m", {"tokens": -1}).status_code == 400
        assert rate(c, "m", {"tokens": 0}).status_code == 200  # a peek is a decision too
        assert c.get("/v1/bucket/state", params={"key": "agent-api-key-m"}).status_code == 200
    samples = metric_samples(server)

    def decisions(rule: str, result: str) -> float:
        return samples.get(
            ("bucketmesh_decisions_total", (("result", result), ("rule", rule))), 0.0
        )

    def responses(route: str, status: int) -> float:
        return samples.get(
            ("bucketmesh_http_responses_total", (("route", route), ("status", str(status)))), 0.0
        )

    assert decisions("agent-api-key", "allowed") == 3 + 4 + 1
    assert decisions("agent-api-key", "denied") == 0
    assert decisions("slow", "allowed") == 5
    assert decisions("slow", "denied") == 1
    assert responses("rate", 200) == 3 + 5 + 1
    assert responses("rate", 429) == 1
    assert responses("rate", 400) == 1
    assert responses("batch", 200) == 1
    assert responses("state", 200) == 1
    assert samples[("bucketmesh_rejected_requests_total", (("reason", "invalid"),))] == 1
    assert samples[("bucketmesh_live_buckets", ())] == 3


# -- process lifecycle ---------------------------------------------------------------------


def test_snapshot_keeps_spent_tokens_across_a_graceful_restart(
    serve: ServerFactory, tmp_path: Path
) -> None:
    snapshot = tmp_path / "data" / "state.snap"
    first = serve(snapshot=snapshot)
    with first.client() as c:
        assert [slow(c, "saver").status_code for _ in range(6)] == [200] * 5 + [429]
        spent_at = time.monotonic()  # before the charge: the refill since is at most 50/s since
        assert rate(c, "saver", {"tokens": 1000}).status_code == 200
        old_replica = c.get("/v1/status").json()["replica_id"]
    assert first.stop() == 0
    assert snapshot.exists()

    second = serve(snapshot=snapshot)
    with second.client() as c:
        new_replica = c.get("/v1/status").json()["replica_id"]
        slow_state = state(c, "slow-saver")
        agent_state = state(c, "agent-api-key-saver")
        again = slow(c, "saver")
        refill = 50 * (time.monotonic() - spent_at)
    old_region, old_node, old_incarnation = old_replica.split("/")
    new_region, new_node, new_incarnation = new_replica.split("/")
    assert (new_region, new_node) == (old_region, old_node)
    assert int(new_incarnation) == int(old_incarnation) + 1
    # the spending survives, under the old incarnation; nothing is granted again
    assert slow_state["replicas"] == {old_replica: {"used": 5}}
    assert slow_state["tokens_remaining"] == 0
    assert agent_state["replicas"] == {old_replica: {"used": 1000}}
    assert agent_state["tokens_remaining"] <= 4000 + math.ceil(refill)
    assert again.status_code == 429


def test_spending_after_a_restart_counts_under_the_new_incarnation(
    serve: ServerFactory, tmp_path: Path
) -> None:
    snapshot = tmp_path / "state.snap"
    first = serve(snapshot=snapshot)
    with first.client() as c:
        assert slow(c, "two-lives", 2).status_code == 200
    assert first.stop() == 0
    second = serve(snapshot=snapshot)
    with second.client() as c:
        assert slow(c, "two-lives", 3).status_code == 200
        assert slow(c, "two-lives").status_code == 429
        body = state(c, "slow-two-lives")
        new_replica = c.get("/v1/status").json()["replica_id"]
    assert body["replicas"][new_replica] == {"used": 3}
    assert used(body) == 5
    assert len(body["replicas"]) == 2


def _read_response(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def _read_one_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(65536)
    assert len(body) == length, "more than one response"
    return head + b"\r\n\r\n" + body


def _listener_closed(server: Server) -> None:
    """Raises AssertionError while ``server`` still accepts connections."""
    try:
        with socket.create_connection(server.address, timeout=2):
            pass
    except OSError:
        return
    raise AssertionError(f"{server.name} still accepts connections")


def test_sigterm_answers_the_request_in_flight_then_exits(serve: ServerFactory) -> None:
    server = serve()
    body = json.dumps({"tokens": 1}).encode()
    head = (
        b"POST /v1/rate HTTP/1.1\r\nHost: test\r\nX-API-Key: inflight\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        assert _read_one_response(sock).startswith(b"HTTP/1.1 200")  # being read
        sock.sendall(head + body[:5])
        # A request answered on another connection, sent after those bytes were in
        # the server's socket buffer: the event loop has polled since they arrived,
        # and one poll reads every readable connection, so the server has read the
        # head and part of the body (the request is in flight, not an idle socket).
        assert httpx.get(server.url("/healthz"), timeout=10).status_code == 200
        server.send_signal(15)
        # shutdown has begun (the listener is closed) with the request half received
        eventually(lambda: _listener_closed(server), "the server closes its listener")
        assert server.alive(), "the server quit with a request half received"
        sock.sendall(body[5:])
        raw = _read_response(sock)
    status_line, _, rest = raw.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 200"), raw
    header_block, _, payload = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in header_block.lower()
    assert json.loads(payload)["key"] == "agent-api-key-inflight"
    assert server.wait(15) == 0


def test_sigterm_closes_idle_connections_and_exits_cleanly(serve: ServerFactory) -> None:
    server = serve()
    with socket.create_connection(server.address, timeout=10) as idle:
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        # answered, the keep-alive connection is idle: SIGTERM closes it (EOF, nothing more)
        assert _read_one_response(idle).startswith(b"HTTP/1.1 200")
        server.send_signal(15)
        assert _read_response(idle) == b""
    assert server.wait(15) == 0
