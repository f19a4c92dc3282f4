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
