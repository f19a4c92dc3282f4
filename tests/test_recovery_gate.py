"""The core of a start without the previous life's state (``Limiter.begin_recovery``):
time is an argument here, so the refill from zero at the start is exact. The real
processes are in ``tests/test_recovery.py``."""

from __future__ import annotations

from bucketmesh.core.bucket import NS_PER_S
from bucketmesh.core.decisions import Ask
from bucketmesh.core.limiter import Limiter
from bucketmesh.core.rules import Rule

START = 1_000 * NS_PER_S


def limiter(mode: str, *, shared: bool = True, regions: int = 1) -> Limiter:
    rule = Rule.create("k-{{ .Request.Query.k }}", 10, 1.0, name="r", mode=mode)
    made = Limiter([rule], replica_id="a/n/2", clock=lambda: START, regions=regions)
    made.begin_recovery(START, shared=shared)
    return made


def test_strict_and_local_buckets_refill_from_zero_at_the_start() -> None:
    for mode in ("strict", "local"):
        lim = limiter(mode, shared=False)
        assert not lim.acquire("k-x", 1, now=START).allowed
        assert lim.acquire("k-x", 3, now=START + 3 * NS_PER_S).allowed  # 3 s of refill
        assert not lim.acquire("k-x", 1, now=START + 3 * NS_PER_S).allowed
        # a full bucket's refill time later, a new key starts full again
        assert lim.acquire("k-y", 10, now=START + 11 * NS_PER_S).allowed


def test_shared_buckets_are_gated_and_their_state_is_not_touched() -> None:
    lim = limiter("shared")
    assert not lim.acquire("k-x", 1, now=START).allowed
    decision = lim.acquire("k-x", 2, now=START + 2 * NS_PER_S)
    assert decision.allowed and decision.tokens_remaining == 0
    bucket = lim.buckets["k-x"]
    assert bucket.level(START + 2 * NS_PER_S) == 8  # what replicates: only the real grants
    lim.end_shared_recovery()
    assert lim.acquire("k-x", 8, now=START + 2 * NS_PER_S).allowed


def test_an_atomic_batch_while_gated_charges_nothing_or_everything() -> None:
    lim = limiter("shared")
    later = START + 2 * NS_PER_S  # the gates hold 2 tokens each
    lim.acquire("k-a", 1, now=later)
    asks = [Ask("k-b", 2, None), Ask("k-a", 2, None)]  # k-a's gate has 1 left
    decisions = lim.acquire_many(asks, atomic=True, now=later)
    assert not any(d.allowed for d in decisions)
    assert "k-b" not in lim.buckets or lim.buckets["k-b"].mine == 0
