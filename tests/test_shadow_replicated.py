"""The shadow mark set by PATCH is a replicated, persisted config field (issue 16).

``PATCH /v1/buckets/{rule or key}`` with ``{"shadow": ...}`` writes a new version of
the rule's (or key's) config, as a change of its limits does: it reaches every
region through the mesh, a Redis-backed region too (stored with the config in
Redis), survives a restart (WAL and snapshot), and the newest PATCH wins wherever
it was made. A change of the mark alone keeps every bucket's level and base.
Real ``serve`` processes and a real redis-server; in-process checks of the core.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis
from conftest import Mesh, ServerFactory, eventually, make_config

from bucketmesh.core.bucket import BucketConfig
from bucketmesh.core.limiter import Limiter
from bucketmesh.core.rules import Rule
from bucketmesh.replication.protocol import canonical

TOKEN = "shadow-mesh-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REGIONS = ["us-east-1", "eu-west-1", "ap-south-1"]
# 2 tokens, one per 1000 s: the third request of a key is refused, and stays so
RULES: list[dict[str, Any]] = [
    {"name": "trial", "key": "trial-{{ .Request.Query.t }}", "capacity": 2, "refillRate": 0.001},
    {"name": "enforced", "key": "user-{{ .Request.Query.u }}", "capacity": 2, "refillRate": 0.001},
]
NS = 1_000_000_000


def shadow_refused(client: httpx.Client, rule: str) -> float:
    text = client.get("/metrics").text
    prefix = f'bucketmesh_shadow_refused_total{{rule="{rule}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def patch(client: httpx.Client, name: str, shadow: bool) -> dict[str, Any]:
    answer = client.patch(f"/v1/buckets/{name}", json={"shadow": shadow}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def rule_is_shadow(client: httpx.Client, rule: str) -> bool:
    return client.get(f"/v1/buckets/{rule}").json().get("shadow") is True


def drain(client: httpx.Client, params: dict[str, str]) -> list[httpx.Response]:
    """Three requests on a 2-token bucket: the third is the one a limit refuses."""
    return [client.post("/v1/rate", params=params) for _ in range(3)]


def let_through(answer: httpx.Response) -> bool:
    return answer.status_code == 200 and answer.headers.get("Bucketmesh-Shadow") == "would-refuse"


# -- a memory mesh --------------------------------------------------------------------


@pytest.fixture
def mesh(serve: ServerFactory, tmp_path: Path) -> Mesh:
    overrides = {
        region: {"storage": {"snapshot": str(tmp_path / f"{region}.snapshot")}}
        for region in REGIONS
    }
    return Mesh(serve, REGIONS, buckets=RULES, admin_token=TOKEN, overrides=overrides).start()


def test_a_rule_patched_shadow_in_one_region_is_shadow_in_every_region(mesh: Mesh) -> None:
    first, second, third = (mesh.nodes[r] for r in REGIONS)
    body = patch(first.client, "trial", True)
    assert body["shadow"] is True and body["applies_to"] == "rule"
    for node in (second, third):
        eventually(
            lambda n=node: rule_is_shadow(n.client, "trial"),
            f"{node.name} holds the shadow mark",
        )
    for node in (first, second, third):
        answers = drain(node.client, {"t": node.region})
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert not any(let_through(a) for a in answers[:2])
        assert let_through(answers[2]), answers[2].headers
        assert shadow_refused(node.client, "trial") == 1
    # un-shadowed by a PATCH in another region: refused again everywhere
    patch(third.client, "trial", False)
    for node in (first, second, third):
        eventually(
            lambda n=node: not rule_is_shadow(n.client, "trial"),
            f"{node.name} dropped the shadow mark",
        )
        assert node.client.post("/v1/rate", params={"t": node.region}).status_code == 429
        assert shadow_refused(node.client, "trial") == 1


def test_a_key_patched_shadow_reaches_every_region_and_survives_a_restart(mesh: Mesh) -> None:
    first, second, third = (mesh.nodes[r] for r in REGIONS)
    answers = drain(third.client, {"u": "kim"})
    assert [a.status_code for a in answers] == [200, 200, 429]
    eventually(lambda: mesh.converged("user-kim", total=2), "user-kim converged")
    body = patch(second.client, "user-kim", True)
    assert body["shadow"] is True and body["applies_to"] == "key"

    def let_through_at(node: Any) -> None:
        answer = node.client.post("/v1/rate", params={"u": "kim"})
        assert let_through(answer), (node.name, answer.status_code, answer.headers)

    for node in (first, second, third):
        eventually(lambda n=node: let_through_at(n), f"{node.name} lets user-kim through")
    # another key of the rule is not shadow
    assert drain(first.client, {"u": "lee"})[2].status_code == 429
    # the mark is in the WAL / snapshot: a restarted node has it before any peer speaks
    for stop in (signal.SIGTERM, signal.SIGKILL):
        assert first.server is not None
        first.server.stop(stop)
        mesh.restart(first)
        let_through_at(first)
    eventually(mesh.connected, "the restarted node is back in the mesh")
    # un-shadowed where it was not set: every region refuses it again
    patch(first.client, "user-kim", False)
    for node in (first, second, third):
        eventually(
            lambda n=node: n.client.post("/v1/rate", params={"u": "kim"}).status_code == 429,
            f"{node.name} refuses user-kim again",
        )


def test_the_newest_patch_wins_whatever_the_order(mesh: Mesh) -> None:
    first, second, _ = (mesh.nodes[r] for r in REGIONS)
    patch(first.client, "enforced", True)
    patch(second.client, "enforced", False)  # later: wins everywhere once both arrived
    patch(first.client, "enforced", True)  # later still
    for node in mesh.nodes.values():
        eventually(
            lambda n=node: rule_is_shadow(n.client, "enforced"),
            f"{node.name} holds the newest mark",
        )


# -- a node alone: the WAL and the snapshot -------------------------------------------


def test_a_node_alone_keeps_the_marks_across_restarts(serve: ServerFactory, tmp_path: Path) -> None:
    config = make_config(RULES, storage={"backend": "memory", "snapshot": str(tmp_path / "s")})
    server = serve(config, admin_token=TOKEN)
    with server.client() as client:
        patch(client, "trial", True)
        assert drain(client, {"u": "max"})[2].status_code == 429
        patch(client, "user-max", True)
    port = server.port
    for stop in (signal.SIGKILL, signal.SIGTERM):  # the WAL alone, then the snapshot
        server.stop(stop)
        server = serve(config, admin_token=TOKEN, port=port)
        with server.client() as client:
            assert rule_is_shadow(client, "trial")
            assert client.get("/v1/buckets/user-max").json().get("shadow") is True
            assert let_through(client.post("/v1/rate", params={"u": "max"}))
            assert let_through(drain(client, {"t": f"after-{stop}"})[2])


# -- a Redis-backed region --------------------------------------------------------------


@pytest.fixture
def redis_mesh(serve: ServerFactory, redis_server: Any) -> Mesh:
    storage = {"backend": "redis", "redisUrl": redis_server.url, "redisTimeoutMs": 3000}
    return Mesh(
        serve,
        {"redis-a": "eu-west-1", "redis-b": "eu-west-1", "mem": "us-west-2"},
        buckets=RULES,
        admin_token=TOKEN,
        cluster_id="shadow-redis-mesh",
        overrides={
            "redis-a": {"node": "redis-a", "storage": storage},
            "redis-b": {"node": "redis-b", "storage": storage},
            "mem": {"node": "mem"},
        },
    ).start()


def test_a_redis_region_takes_the_marks_and_stores_them_with_the_config(
    redis_mesh: Mesh, redis_server: Any
) -> None:
    a, b, mem = (redis_mesh.nodes[name] for name in ("redis-a", "redis-b", "mem"))
    # a rule marked in the memory region: the Redis region lets its refusals through
    patch(mem.client, "trial", True)
    eventually(lambda: rule_is_shadow(a.client, "trial"), "redis-a")
    answers = drain(a.client, {"t": "r"})
    assert [x.status_code for x in answers] == [200, 200, 200] and let_through(answers[2])
    assert shadow_refused(a.client, "trial") == 1
    # a key marked on a Redis node: stored with its config in Redis, the level kept
    assert drain(a.client, {"u": "ray"})[2].status_code == 429
    eventually(lambda: redis_mesh.converged("user-ray", total=2), "user-ray converged")
    store = redis.Redis.from_url(redis_server.url, decode_responses=True)
    (name,) = [k for k in store.scan_iter("*user-ray*")]
    before = store.hgetall(name)
    assert "s" not in before
    patch(a.client, "user-ray", True)
    after = store.hgetall(name)
    assert after["s"] == "1" and after["vh"] != before["vh"]  # a new config version
    assert (after["bh"], after["bo"]) == (after["vh"], after["vo"])  # adopted: a new base
    assert a.state("user-ray")["tokens_remaining"] == 0  # ... keeping the level
    for node in (a, mem):
        eventually(
            lambda n=node: let_through(n.client.post("/v1/rate", params={"u": "ray"})),
            f"{node.name} lets user-ray through",
        )
    assert let_through(b.client.post("/v1/rate", params={"u": "ray"}))  # read back from Redis
    # un-shadowed in the memory region: the Redis region refuses again, Redis forgets it
    patch(mem.client, "user-ray", False)
    for node in (a, mem):
        eventually(
            lambda n=node: n.client.post("/v1/rate", params={"u": "ray"}).status_code == 429,
            f"{node.name} refuses user-ray again",
        )
    eventually(lambda: "s" not in store.hgetall(name), "s dropped")


# -- the core, in process ---------------------------------------------------------------


def rule() -> Rule:
    return Rule.create("k-{{ .Request.Query.k }}", 10, 1.0, name="r")


def test_a_change_of_the_mark_alone_keeps_the_level() -> None:
    limiter = Limiter([rule()], replica_id="a/n/1", clock=lambda: 10 * NS)
    for _ in range(7):
        assert limiter.acquire("k-1", now=10 * NS).allowed
    bucket = limiter.buckets["k-1"]
    before = (bucket.tat(), bucket.level(11 * NS), bucket.level(12 * NS))
    config = limiter.configure("k-1", shadow=True, now=11 * NS)
    assert config.shadow and bucket.config is config
    assert (bucket.tat(), bucket.level(11 * NS), bucket.level(12 * NS)) == before
    # adopted like any change (a base at the new version, the level kept): a base
    # another replica proposed for a concurrent config cannot win over it unchecked
    assert bucket.base_version == config.version
    assert limiter.shadowed("r", "k-1") and not limiter.shadowed("r", "k-2")
    limiter.configure("r", shadow=True, now=12 * NS)
    assert limiter.shadowed("r", "k-2") and bucket.tat() == before[0]


def test_marks_converge_last_writer_wins_and_old_encodings_decode() -> None:
    a = Limiter([rule()], replica_id="a/n/1", clock=lambda: 10 * NS)
    b = Limiter([rule()], replica_id="b/n/1", clock=lambda: 10 * NS)
    a.acquire("k-1", now=10 * NS)
    a.configure("k-1", shadow=True, now=11 * NS)
    b.merge(a.collect_deltas(), now=12 * NS)
    assert b.shadowed("r", "k-1")
    b.configure("k-1", shadow=False, now=13 * NS)
    a.configure("r", shadow=True, now=13 * NS)  # concurrent: versions order them
    batch_a, batch_b = a.collect_deltas(), b.collect_deltas()
    a.merge(batch_b, now=14 * NS)
    b.merge(batch_a, now=14 * NS)
    assert a.shadowed("r", "k-1") == b.shadowed("r", "k-1")
    assert a.rule_configs["r"] == b.rule_configs["r"]
    # a peer (or WAL, or snapshot) without the field: not shadow
    old = msgspec.msgpack.encode([5, NS, 60 * NS, "shared", [3, "x"]])
    assert msgspec.msgpack.decode(old, type=BucketConfig).shadow is False
    # and a config that is not shadow hashes as it did before the field existed
    delta = b.full_state(["k-1"]).deltas[0]
    plain = msgspec.structs.replace(
        delta, config=msgspec.structs.replace(delta.config, shadow=False)
    )
    marked = msgspec.structs.replace(
        delta, config=msgspec.structs.replace(plain.config, shadow=True)
    )
    five = msgspec.msgpack.encode(msgspec.structs.astuple(plain.config)[:5])
    assert five in canonical(plain) and canonical(marked) != canonical(plain)


def test_a_mark_concurrent_with_a_change_of_limits_hands_back_no_refill() -> None:
    """The simulator's seed 1526 (with a mark that kept the old base): A raises the
    refill (v1) while B, not knowing it, marks the rule shadow (v2 > v1, the old
    limits). v2 wins everywhere; B's base must win too, or A's base (proposed for the
    fast refill) read under the slow one refills B's empty bucket for free."""
    a = Limiter([rule()], replica_id="a/n/1", clock=lambda: 10 * NS)
    b = Limiter([rule()], replica_id="b/n/1", clock=lambda: 10 * NS)
    assert a.acquire("k-1", 10, now=10 * NS).allowed
    b.merge(a.collect_deltas(), now=10 * NS)
    a.configure("r", refill_rate=100.0, now=11 * NS)
    b.configure("r", shadow=True, now=12 * NS)
    at = 12 * NS + NS // 2
    level_b = b.buckets["k-1"].level(at)
    assert level_b == 2  # empty at 10 s, one token a second
    batch_a, batch_b = a.collect_deltas(), b.collect_deltas()
    a.merge(batch_b, now=at)
    b.merge(batch_a, now=at)
    a.merge(b.collect_deltas(), now=at)
    b.merge(a.collect_deltas(), now=at)
    assert a.rule_configs["r"] == b.rule_configs["r"] and b.rule_configs["r"].shadow
    assert a.buckets["k-1"].level(at) == b.buckets["k-1"].level(at) == level_b
