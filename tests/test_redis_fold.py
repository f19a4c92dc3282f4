"""Folds of retired incarnations on the Redis backend (issue 16): the merge script joins
fold records as ``Bucket.fold`` does, on a real redis-server, and ``bucketmesh
reconcile`` folds across a mesh of memory and Redis-backed regions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from conftest import Mesh, ServerFactory, eventually
from test_reconcile_fold import KEY, reconcile, settled, spend

from bucketmesh.core.bucket import Bucket, BucketDelta
from bucketmesh.core.limiter import Limiter
from bucketmesh.core.rules import Rule
from bucketmesh.storage.redis_store import RedisStore

NS = 1_000_000_000
# test_reconcile_fold's hot rule, within the Redis backend's exact range (C·T + ttl < 2^51 ns)
RULE = {
    "name": "hot",
    "key": "hot-{{ .Request.Header.X-User }}",
    "capacity": 200,
    "refillRate": 0.0001,
    "ttl": 3600,
}


@pytest.fixture
def store(redis_server: Any) -> Iterator[tuple[RedisStore, asyncio.AbstractEventLoop]]:
    loop = asyncio.new_event_loop()
    store = RedisStore(redis_server.url, "fold", timeout_s=5.0)
    loop.run_until_complete(store.join())
    yield store, loop
    loop.run_until_complete(store.close())
    loop.close()


def state_of(limiters: list[Limiter], key: str) -> BucketDelta:
    """The join every limiter's state of ``key`` (as one region would hold it)."""
    join = limiters[0].buckets[key]
    for other in limiters[1:]:
        join.merge(other.full_state([key]).deltas[0], limiters[0].replica_id)
    return join.full_state(key, limiters[0].replica_id)


def comparable(delta: BucketDelta, now: int) -> tuple[Any, ...]:
    bucket = Bucket.from_delta(delta, "x/y/0")
    used = {rid: n for rid, n in delta.used.items() if n}
    return (used, dict(delta.folds), bucket.level(now), bucket.tat())


def test_the_merge_script_folds_as_bucket_fold_does(
    store: tuple[RedisStore, asyncio.AbstractEventLoop],
) -> None:
    redis_store, loop = store
    rule = Rule.create("f-{{ .Request.Query.k }}", 50, 0.01, name="f")
    t0 = 10_000 * NS  # epoch 7200 s (ttl 3600 s): an epoch-0 delta is config-only
    # three incarnations of one node and a peer, each spending (anchors and marks too)
    replicas = [Limiter([rule], replica_id=f"a/n/{n}", clock=lambda: t0) for n in (1, 2, 3)]
    replicas.append(Limiter([rule], replica_id="b/m/7", clock=lambda: t0))
    for step, limiter in enumerate(replicas):
        for j in range(3 + step):
            assert limiter.acquire("f-1", 2, now=t0 + (step * 10 + j) * NS).allowed
    joined = state_of(replicas, "f-1")
    now = t0 + 100 * NS
    loop.run_until_complete(redis_store.merge([joined], now))
    (stored,) = loop.run_until_complete(redis_store.read(["f-1"]))
    assert comparable(stored, now) == comparable(joined, now)

    # fold a/n/1 and a/n/2 (a/n/3 runs): what Bucket.fold gives, Redis holds
    plan = {"a/n": (3, joined.used["a/n/1"] + joined.used["a/n/2"])}
    reference = Bucket.from_delta(joined, "c/view/0")
    reference.fold(dict(plan), "c/view/0")
    folded = reference.full_state("f-1", "c/view/0")
    loop.run_until_complete(redis_store.merge([folded], now))
    (stored,) = loop.run_until_complete(redis_store.read(["f-1"]))
    assert stored.folds == plan
    assert not {"a/n/1", "a/n/2"} & set(stored.used)
    assert comparable(stored, now) == comparable(folded, now)
    level = Bucket.from_delta(stored, "x/y/0").level(now)
    assert level == Bucket.from_delta(joined, "x/y/0").level(now)  # the fold changes no level

    # a late delta bringing a folded entry back changes nothing; a record covering the
    # store's own incarnation is never taken
    loop.run_until_complete(redis_store.merge([joined], now))
    own = redis_store.replica_id
    assert own is not None
    node, _, number = own.rpartition("/")
    mine = msgspec.structs.replace(folded, folds={node: (int(number) + 1, 0)})
    loop.run_until_complete(redis_store.merge([mine], now))
    (again,) = loop.run_until_complete(redis_store.read(["f-1"]))
    assert comparable(again, now) == comparable(stored, now)
    # a state new to the store keeps its records, never an entry they cover
    stale = msgspec.structs.replace(folded, key="f-2", used={**folded.used, "a/n/1": 6})
    loop.run_until_complete(redis_store.merge([stale], now))
    (fresh,) = loop.run_until_complete(redis_store.read(["f-2"]))
    assert comparable(fresh, now) == comparable(folded, now)


@pytest.fixture
def mixed_mesh(serve: ServerFactory, redis_server: Any, tmp_path: Path) -> Mesh:
    storage = {"backend": "redis", "redisUrl": redis_server.url, "redisTimeoutMs": 3000}
    return Mesh(
        serve,
        {"us-east-1": "us-east-1", "redis-a": "us-west-2", "eu-central-1": "eu-central-1"},
        buckets=[RULE],
        overrides={
            "us-east-1": {"storage": {"snapshot": str(tmp_path / "us-east-1.snapshot")}},
            "redis-a": {"node": "redis-a", "storage": storage},
        },
    ).start()


def test_reconcile_folds_across_memory_and_redis_regions(
    mixed_mesh: Mesh, redis_server: Any
) -> None:
    mesh = mixed_mesh
    restarted, store_node = mesh.nodes["us-east-1"], mesh.nodes["redis-a"]
    incarnations = [restarted.status()["replica_id"]]
    for _ in range(4):
        spend(restarted)
        spend(store_node)
        assert restarted.server is not None
        assert restarted.server.stop() == 0
        mesh.restart(restarted)
        incarnations.append(restarted.status()["replica_id"])
    spend(restarted)
    eventually(mesh.connected, "the restarted node is back")
    levels = settled(mesh)
    retired = set(incarnations[:-1])
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    (name,) = list(client.scan_iter(f"*{KEY}*"))
    assert {f"u:{rid}" for rid in retired} <= set(client.hgetall(name))

    _, report, err = reconcile(mesh)
    assert report["folds"]["mode"] == "folded", (report, err)
    assert report["folds"]["entries"] >= len(retired), report
    row = client.hgetall(name)
    assert not {f"u:{rid}" for rid in retired} & set(row), row
    node = incarnations[0].rsplit("/", 1)[0]
    watermark, _ = (int(x) for x in row[f"f:{node}"].split(","))
    assert watermark == int(incarnations[-1].rsplit("/", 1)[1])
    assert settled(mesh) == levels  # no level moved, in any region
    # the Redis node restarts: the store keeps the fold, nothing comes back
    assert store_node.server is not None
    assert store_node.server.stop() == 0
    mesh.restart(store_node)
    eventually(mesh.connected, "the Redis node is back")
    spend(store_node)
    assert settled(mesh) == {region: level - 1 for region, level in levels.items()}
    assert not {f"u:{rid}" for rid in retired} & set(client.hgetall(name))
