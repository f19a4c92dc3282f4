"""R3's restore path (storage/memory.py ``Restoring``) with real ``bucketmesh serve``
processes: a format-3 snapshot (partitioned) is written at a graceful stop; the next
life serves at once and builds each partition on the first request for one of its
keys, while grants go to the write-ahead log; kill -9; the third life, asked right
after it starts, grants none of the spent tokens again and reports them spent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import make_config

from bucketmesh.storage.snapshot import PARTITION_BUCKETS, PARTITIONED_MAGIC

KEYS = [f"user-{i}" for i in range(6 * PARTITION_BUCKETS)]  # several partitions


def config(snapshot: Path) -> dict[str, Any]:
    return make_config(
        [
            {
                "key": "{{ .Request.Header.X-API-Key }}",
                "name": "r3",
                "capacity": 2,
                "refillRate": 0.0001,  # no token refills during the test
                "ttl": 86400,
            }
        ],
        storage={"backend": "memory", "snapshot": str(snapshot), "snapshotInterval": 600_000},
    )


def charge_all(server: Any) -> list[bool]:
    allowed = []
    with server.client() as client:
        for start in range(0, len(KEYS), 1000):
            batch = [{"key": k, "rule": "r3"} for k in KEYS[start : start + 1000]]
            answer = client.post("/v1/rate/batch", json={"requests": batch})
            assert answer.status_code == 200, answer.text
            allowed += [result["allowed"] for result in answer.json()["results"]]
    return allowed


def test_a_partitioned_snapshot_and_its_log_grant_no_token_twice(
    serve: Any, tmp_path: Path
) -> None:
    snapshot = tmp_path / "data" / "state.snap"
    first = serve(config(snapshot))
    assert charge_all(first) == [True] * len(KEYS)  # one of two tokens each
    assert first.stop() == 0  # a graceful stop writes the snapshot
    assert snapshot.read_bytes().startswith(PARTITIONED_MAGIC)

    second = serve(config(snapshot))
    # right after the start: each batch builds the partitions of its keys first
    assert charge_all(second) == [True] * len(KEYS)  # the second token each: in the log
    second.kill()

    third = serve(config(snapshot))
    assert charge_all(third) == [False] * len(KEYS)
    with third.client() as client:
        for key in (KEYS[0], KEYS[len(KEYS) // 2], KEYS[-1]):
            state = client.get("/v1/bucket/state", params={"key": key}).json()
            assert sum(entry["used"] for entry in state["replicas"].values()) == 2, state
    assert third.alive()


def test_what_walks_every_bucket_sees_the_partitions_not_built_yet(tmp_path: Path) -> None:
    """In one process, on real files: a store reopened from a format-3 snapshot has
    built nothing; a key's decision builds its partition only; what the mesh reads
    (its replica's buckets, full state) and a rule-wide change see every bucket."""
    import asyncio

    from bucketmesh.core.rules import Rule
    from bucketmesh.storage.memory import MemoryStore

    rule = Rule.create("k-{{ .Request.Query.k }}", 2, 0.0001, name="r3", ttl=86400)
    path = tmp_path / "state.snap"

    def reopen() -> MemoryStore:
        return MemoryStore.open([rule], region="r", node="n", snapshot=path)

    store = reopen()
    for key in KEYS:
        assert store.acquire(key, 2, rule="r3").allowed
    asyncio.run(store.save_snapshot())
    store.close()

    store = reopen()
    assert store.restoring is not None and len(store.limiter) == 0
    assert not store.acquire(KEYS[0], 1, rule="r3").allowed  # spent before: still spent
    assert 0 < len(store.limiter) < len(KEYS)  # only that key's partition
    replica = store.replica()
    assert set(replica.buckets) == set(KEYS)  # a walk builds everything first
    assert store.restoring is None
    store.close()

    store = reopen()
    state = store.replica().full_state()
    assert {delta.key for delta in state.deltas} == set(KEYS)
    store.close()

    store = reopen()
    store.configure("r3", capacity=5)  # a rule-wide change: every bucket moves to it
    assert store.restoring is None
    assert all(store.limiter.buckets[key].config.capacity == 5 for key in KEYS)
    # a bucket keeps its level across a change (Bucket.reconfigure): still empty
    decision = store.acquire(KEYS[-1], 1, rule="r3")
    assert (decision.allowed, decision.capacity) == (False, 5)
    store.close()


def test_a_partitioned_snapshot_reads_as_slices_too(tmp_path: Path) -> None:
    """``SnapshotFile.read`` (the whole restore, and tools reading the file) gives a
    format-3 file's head and partitions as slices: every bucket, nothing else."""
    import asyncio

    from bucketmesh.core.limiter import Limiter
    from bucketmesh.core.rules import Rule
    from bucketmesh.storage.memory import MemoryStore
    from bucketmesh.storage.snapshot import SnapshotFile

    rule = Rule.create("k-{{ .Request.Query.k }}", 2, 0.0001, name="r3", ttl=86400)
    path = tmp_path / "state.snap"
    store = MemoryStore.open([rule], region="r", node="n", snapshot=path)
    for key in KEYS[:1200]:
        store.acquire(key, 1, rule="r3")
    asyncio.run(store.save_snapshot())
    store.close()
    read = SnapshotFile(str(path)).read()
    assert read is not None
    head, slices = read
    limiter = Limiter.restore(head, [rule], replica_id="r/n/9")
    for part in slices:
        limiter.replay(part)
    assert set(limiter.buckets) == set(KEYS[:1200])
