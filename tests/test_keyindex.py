"""The sync pull path's range index (replication/keyindex.py): a pull of a few ranges reads
those ranges' keys, never misses a key inserted since the last pull, never returns one
dropped since, and does not rescan every bucket to get there (issue 16: a million buckets)."""

from __future__ import annotations

import asyncio
import random

import pytest

from bucketmesh import Limiter, Rule
from bucketmesh.replication import keyindex
from bucketmesh.replication import protocol as sync
from bucketmesh.replication.keyindex import RangeIndex

S = 1_000_000_000
T0 = 1_700_000_000 * S


def in_ranges(keys: object, ranges: set[int]) -> list[str]:
    return [key for key in keys if sync.range_of(key) in ranges]  # type: ignore[attr-defined]


def test_a_pull_of_some_ranges_sees_new_and_dropped_keys_without_rescanning() -> None:
    limiter = Limiter(
        [Rule.create("k-{{ .Request.Header.X-K }}", 10, 10.0, ttl=1.0)], replica_id="r/n/1"
    )
    for i in range(3000):
        limiter.acquire(f"k-old-{i}", now=T0)
    index = RangeIndex(limiter.buckets)
    every = set(range(sync.RANGES))
    assert sorted(asyncio.run(index.live(every))) == sorted(limiter.buckets)
    assert index.rebuilds == 1

    later = T0 + 60 * S
    for i in range(500):
        limiter.acquire(f"k-new-{i}", now=later)
    some = {3, 17, 200}
    got = asyncio.run(index.live(some))
    assert sorted(got) == sorted(in_ranges(limiter.buckets, some))
    assert any(key.startswith("k-new-") for key in got)
    assert index.rebuilds == 1, "new keys were caught up, not found by a full scan"

    # every old key expires; the newest key (the index's mark) is dropped and comes back
    # as a new bucket: the index cannot tell where new keys start and rebuilds
    limiter.expire(later + 30 * S)
    assert not limiter.buckets
    limiter.acquire("k-new-499", now=later + 31 * S)
    limiter.acquire("k-after", now=later + 31 * S)
    assert sorted(asyncio.run(index.live(every))) == ["k-after", "k-new-499"]
    assert index.rebuilds == 2
    assert index.size == 2, "the dropped keys were forgotten"


def test_random_inserts_drops_and_reinserts_never_make_the_index_miss_or_invent_a_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a small catch-up limit, so that some steps overflow it and take the rebuild path
    monkeypatch.setattr(keyindex, "CATCH_UP_LIMIT", 200)
    rng = random.Random(16)
    buckets: dict[str, object] = {}
    index = RangeIndex(buckets)  # type: ignore[arg-type]
    dropped: list[str] = []
    serial = 0
    for _ in range(200):
        keys = list(buckets)
        for _ in range(rng.choice((0, 1, 5, 50, 250))):
            action = rng.random()
            if action < 0.6 or not buckets:
                serial += 1
                buckets[f"key-{serial}"] = object()
            elif action < 0.85:
                # often the newest key: the index's mark
                key = next(reversed(buckets)) if rng.random() < 0.3 else rng.choice(keys)
                if key not in buckets:
                    continue
                del buckets[key]
                dropped.append(key)
            elif dropped:
                buckets[dropped.pop(rng.randrange(len(dropped)))] = object()
        ranges = set(rng.sample(range(sync.RANGES), rng.choice((1, 8, sync.RANGES))))
        got = asyncio.run(index.live(ranges))
        assert sorted(got) == sorted(in_ranges(buckets, ranges))
    assert index.rebuilds < 120, "most pulls caught up instead of rescanning"
