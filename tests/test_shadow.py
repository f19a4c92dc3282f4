"""Shadow mode and the near_limit outcome (issue 16 item 4), on real ``serve`` nodes,
the Envoy service and the ASGI middleware.

A shadow rule (``shadow: true`` in the file) or key (PATCH ``{"shadow": true}``)
is decided, charged and counted as any other, but never refuses: the request is
let through with ``Bucketmesh-Shadow: would-refuse``, and
``bucketmesh_shadow_refused_total{rule}`` counts exactly the refusals it let
through. ``bucketmesh_near_limit_total{rule}`` counts the grants that left less
than ``nearLimit`` (default 20 %) of the capacity.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import httpx
from conftest import ServerFactory, free_port, make_config
from prometheus_client.parser import text_string_to_metric_families

from bucketmesh.core.limiter import Limiter
from bucketmesh.core.rules import Rule
from bucketmesh.integrations.asgi import RateLimitMiddleware
from bucketmesh.integrations.proto import rls_pb2, rls_pb2_grpc
from bucketmesh.telemetry.metrics import NodeMetrics

TOKEN = "shadow-admin-token"
RULES: list[dict[str, Any]] = [
    # the new limit being rolled out: 4 tokens, one per 100 s, shadow
    {
        "name": "trial",
        "key": "trial-{{ .Request.Header.X-Tenant }}",
        "capacity": 4,
        "refillRate": 0.01,
        "shadow": True,
    },
    # an enforced one: 10 tokens, one per 100 s
    {
        "name": "enforced",
        "key": "user-{{ .Request.Query.user }}",
        "capacity": 10,
        "refillRate": 0.01,
    },
    # Envoy domain "edge": 3 tokens, shadow
    {
        "name": "edge",
        "key": "unused-{{ .Request.Query.e }}",
        "capacity": 3,
        "refillRate": 0.001,
        "shadow": True,
    },
]


def counters(server: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def count(server: Any, name: str, **labels: str) -> float:
    return counters(server).get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_shadow_rule_never_refuses_and_counts_exactly_what_it_would_have_refused(
    serve: ServerFactory,
) -> None:
    server = serve(make_config(RULES))
    with server.client() as client:
        answers = [client.post("/v1/rate", headers={"X-Tenant": "acme"}) for _ in range(10)]
        assert [a.status_code for a in answers] == [200] * 10
        marked = [a for a in answers if a.headers.get("Bucketmesh-Shadow") == "would-refuse"]
        assert len(marked) == 6  # 4 tokens: the 5th to 10th would have been refused
        assert all("Bucketmesh-Shadow" not in a.headers for a in answers[:4])
        body = marked[0].json()
        assert body["allowed"] is True and body["shadow"] == "would-refuse"
        assert body["tokens_remaining"] == 0 and body["rule"] == "trial"
        assert "Retry-After" not in marked[0].headers
        assert marked[0].headers["RateLimit"].startswith('"trial";r=0;')
        # a batch: the items beyond the bucket are let through too, and said so
        batch = client.post(
            "/v1/rate/batch",
            json={"requests": [{"key": "trial-batch", "rule": "trial"}] * 6},
        )
        assert batch.status_code == 200
        result = batch.json()
        assert result["allowed"] == 6 and result["denied"] == 0
        assert result["shadow_refused"] == 2
        assert [r.get("shadow") for r in result["results"]] == [None] * 4 + ["would-refuse"] * 2
        assert batch.headers["Bucketmesh-Shadow"] == "would-refuse"
        # an enforced rule still refuses
        enforced = [client.get("/v1/rate", params={"user": "bob"}) for _ in range(11)]
        assert [a.status_code for a in enforced] == [200] * 10 + [429]
    assert count(server, "bucketmesh_shadow_refused_total", rule="trial") == 8
    # counted as decided: refusals are refusals in bucketmesh_decisions_total
    assert count(server, "bucketmesh_decisions_total", rule="trial", result="denied") == 8
    assert count(server, "bucketmesh_decisions_total", rule="trial", result="allowed") == 8
    assert count(server, "bucketmesh_shadow_refused_total", rule="enforced") == 0
    # near_limit (20 %): trial's grants leaving 0 of 4 (< 0.8), twice (acme and the
    # batch key); enforced's leaving 1 and 0 of 10 (< 2)
    assert count(server, "bucketmesh_near_limit_total", rule="trial") == 2
    assert count(server, "bucketmesh_near_limit_total", rule="enforced") == 2


def test_near_limit_share_is_configurable(serve: ServerFactory) -> None:
    server = serve(make_config(RULES, nearLimit=0.5))
    with server.client() as client:
        for _ in range(10):
            assert client.get("/v1/rate", params={"user": "carol"}).status_code == 200
    # grants leaving 4, 3, 2, 1, 0 of 10 are below half
    assert count(server, "bucketmesh_near_limit_total", rule="enforced") == 5


def test_a_key_patched_shadow_lets_its_refusals_through_and_back(serve: ServerFactory) -> None:
    server = serve(make_config(RULES), admin_token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with server.client() as client:
        for _ in range(10):
            assert client.get("/v1/rate", params={"user": "dave"}).status_code == 200
        assert client.get("/v1/rate", params={"user": "dave"}).status_code == 429
        patched = client.patch("/v1/buckets/user-dave", json={"shadow": True}, headers=auth)
        assert patched.status_code == 200, patched.text
        assert patched.json()["shadow"] is True and patched.json()["applies_to"] == "key"
        let_through = client.get("/v1/rate", params={"user": "dave"})
        assert let_through.status_code == 200
        assert let_through.headers["Bucketmesh-Shadow"] == "would-refuse"
        # another key of the rule is not shadow
        for _ in range(10):
            client.get("/v1/rate", params={"user": "erin"})
        assert client.get("/v1/rate", params={"user": "erin"}).status_code == 429
        back = client.patch("/v1/buckets/user-dave", json={"shadow": False}, headers=auth)
        assert back.status_code == 200 and "shadow" not in back.json()
        assert client.get("/v1/rate", params={"user": "dave"}).status_code == 429
        # a whole rule, by PATCH
        rule = client.patch("/v1/buckets/enforced", json={"shadow": True}, headers=auth)
        assert rule.status_code == 200 and rule.json()["applies_to"] == "rule"
        assert client.get("/v1/buckets/enforced").json()["shadow"] is True
        assert client.get("/v1/rate", params={"user": "erin"}).status_code == 200
        # bad input: a 400 naming the field, a 401 without the token, a 404 for neither
        bad = client.patch("/v1/buckets/enforced", json={"shadow": "yes"}, headers=auth)
        assert bad.status_code == 400 and "shadow" in bad.text
        assert client.patch("/v1/buckets/enforced", json={"shadow": True}).status_code == 401
        unknown = client.patch("/v1/buckets/nothing-known", json={"shadow": True}, headers=auth)
        assert unknown.status_code == 404
    assert count(server, "bucketmesh_shadow_refused_total", rule="enforced") == 2


def test_envoy_answers_a_shadow_rule_ok_and_counts_it(serve: ServerFactory) -> None:
    port = free_port()
    server = serve(make_config(RULES, envoyListen=f"127.0.0.1:{port}"))
    request = rls_pb2.RateLimitRequest(
        domain="edge",
        descriptors=[
            rls_pb2.RateLimitDescriptor(
                entries=[rls_pb2.RateLimitDescriptor.Entry(key="remote_address", value="10.9.9.9")]
            )
        ],
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        answers = [stub.ShouldRateLimit(request, timeout=5) for _ in range(5)]
    ok = rls_pb2.RateLimitResponse.OK
    assert [a.overall_code for a in answers] == [ok] * 5
    assert [a.statuses[0].code for a in answers] == [ok] * 5
    assert count(server, "bucketmesh_shadow_refused_total", rule="edge") == 2
    assert count(server, "bucketmesh_decisions_total", rule="edge", result="denied") == 2


class Upstream:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hello"})


def test_the_asgi_middleware_lets_a_shadow_rule_through_and_counts_it() -> None:
    rules = [
        Rule.create("api-{{ .Request.Header.X-API-Key }}", 3, 0.001, name="api", shadow=True),
        Rule.create("ip-{{ .Request.ClientIP }}", 2, 0.001, name="per-ip"),
    ]
    limiter = Limiter(rules, replica_id="eu-west-1/web-1/1", clock=lambda: 1_000 * 10**9)
    metrics = NodeMetrics()
    upstream = Upstream()
    app = RateLimitMiddleware(upstream, limiter, metrics=metrics)

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response]]:
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            shadow = [await http.get("/", headers={"X-API-Key": "k"}) for _ in range(5)]
            enforced = [await http.get("/") for _ in range(3)]
        return shadow, enforced

    shadow, enforced = asyncio.run(scenario())
    assert [r.status_code for r in shadow] == [200] * 5
    assert [r.headers.get("bucketmesh-shadow") for r in shadow] == [None] * 3 + ["would-refuse"] * 2
    assert [r.status_code for r in enforced] == [200, 200, 429]
    assert upstream.calls == 7
    assert metrics.shadow_refused == {"api": 2}
    assert metrics.near_limit == {"api": 1, "per-ip": 1}  # the grants leaving 0 (< 20 %)
