"""Deterministic simulation of the sync mesh (docs/design.md section 12): ``bucketmesh sim``.

Ten thousand seeded random schedules (2–5 replicas, skewed clocks, a network
that drops, duplicates, reorders, delays and partitions, configure calls, all
three modes) must each hold every invariant the simulator checks; then named
scenarios pin down the behaviours one at a time, and mutants of the core prove
that the checker can fail. Bugs the simulator found in the core are pinned by
the named tests at the end (resurrection after expiry, strict-mode config
changes, a late config change), each with the seed that found it.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import msgspec
import pytest

from bucketmesh import _native
from bucketmesh.core.bucket import NS_PER_S, Bucket, BucketConfig, BucketDelta, Decision
from bucketmesh.core.limiter import DeltaBatch, Limiter
from bucketmesh.core.rules import Rule
from bucketmesh.tooling.sim import MS, InvariantViolation, Network, SimResult, Simulation, main, run

SCHEDULES = 10_000


def make_rule(
    capacity: int, rate: float, *, name: str = "api", mode: str = "shared", ttl: float = 3600.0
) -> Rule:
    return Rule.create(
        f"{name}-{{{{ .Request.Header.X-Key }}}}", capacity, rate, name=name, mode=mode, ttl=ttl
    )


def steady(sim: Simulation, start: int, end: int, every: int, key: str = "api-1") -> None:
    """Every replica asks for one token of ``key`` every ``every`` ns, staggered."""
    for replica in range(sim.n):
        at = start + replica * every // sim.n
        while at < end:
            sim.acquire(at, replica, key)
            at += every


def used_entries(limiter: Limiter, key: str) -> tuple[tuple[str, int], ...]:
    """A bucket's ``used`` map, whoever holds it."""
    bucket = limiter.bucket(key)
    assert bucket is not None
    return tuple(sorted((rid, n) for rid, n in bucket.used(limiter.replica_id).items() if n))


def finish(sim: Simulation, until: int) -> SimResult:
    sim.run(until)
    sim.quiesce()
    return sim.check()


# -- many random schedules -------------------------------------------------------------


def run_seeds(seeds: range) -> tuple[list[str], SimResult]:
    """Run ``seeds``; the violations (as text) and a result summing the counters."""
    failures: list[str] = []
    total = SimResult(seed=-1, replicas=0, keys=0)
    for seed in seeds:
        try:
            result = run(seed)
        except InvariantViolation as violation:
            failures.append(str(violation))
            continue
        for name in ("granted", "denied", "messages", "dropped", "duplicated", "reordered"):
            setattr(total, name, getattr(total, name) + getattr(result, name))
        total.partitions += result.partitions
        total.configures += result.configures
        total.late_adoptions += result.late_adoptions
        total.events += result.events
        total.worst_excess = max(total.worst_excess, result.worst_excess)
        total.worst_ratio = max(total.worst_ratio, result.worst_ratio)
        total.max_lag_ns = max(total.max_lag_ns, result.max_lag_ns)
    return failures, total


def test_ten_thousand_random_schedules_hold_every_invariant() -> None:
    workers = max(1, min(2, os.cpu_count() or 1))
    chunks = [range(first, SCHEDULES, workers) for first in range(workers)]
    if workers == 1:
        outcomes = [run_seeds(chunks[0])]
    else:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            outcomes = list(pool.map(run_seeds, chunks))
    failures = [failure for found, _ in outcomes for failure in found]
    assert not failures, f"{len(failures)} of {SCHEDULES} schedules failed:\n" + "\n".join(
        failures[:10]
    )
    # not vacuous: the faults happened and the error budget was actually used
    totals = [total for _, total in outcomes]
    assert sum(t.dropped for t in totals) > 1000
    assert sum(t.duplicated for t in totals) > 1000
    assert sum(t.reordered for t in totals) > 1000
    assert sum(t.partitions for t in totals) > 1000
    assert sum(t.configures for t in totals) > 1000
    # rule changes some replicas adopted in slices, deciding on the previous limits
    # meanwhile (a serving node's deferred adoption, core/limiter.py)
    assert sum(t.late_adoptions for t in totals) > 500
    assert max(t.worst_excess for t in totals) > 0.5
    assert max(t.worst_ratio for t in totals) > 2


def test_a_schedule_replays_identically() -> None:
    assert run(1234) == run(1234)
    assert run(1234) != run(1235)


# -- named scenarios -------------------------------------------------------------------


def test_partitioned_replicas_converge_after_heal() -> None:
    """Both sides of a partition keep serving (local-only mode) and over-admit by at
    most one side's C + r·P; after healing, the merged counters put the bucket in
    debt, refill repays it, and over the whole run the total matches the limit."""
    capacity, rate = 10, 10.0  # T = 100 ms
    sim = Simulation(
        1,
        3,
        [make_rule(capacity, rate)],
        {"api-1": "api"},
        skews_ns=[0, 0, 0],
        network=Network(1 * MS, 5 * MS),
        sync_interval_ns=10 * MS,
        anti_entropy_interval_ns=50 * MS,
    )
    t0, partition = sim.start_ns, 500 * MS
    sim.partition(t0, t0 + partition, [[0], [1, 2]])
    steady(sim, t0, t0 + partition - 10 * MS, 5 * MS)
    sim.run(t0 + partition - 1)
    alone, pair = sim.limiters[0].bucket("api-1"), sim.limiters[1].bucket("api-1")
    assert alone is not None and pair is not None
    assert alone.others is None  # r0 heard nothing from the other side
    assert set(pair.used("r1/n/1")) == {"r1/n/1", "r2/n/1"}
    ledger = next(iter(sim.ledgers.values()))
    one_side = capacity + rate * partition / NS_PER_S
    assert ledger.own["r0/n/1"] >= one_side - 1
    assert ledger.own["r1/n/1"] + ledger.own["r2/n/1"] >= one_side - 1

    sim.run(t0 + partition + 200 * MS)  # healed: anti-entropy repairs what was lost
    assert len({used_entries(limiter, "api-1") for limiter in sim.limiters}) == 1
    debt = sim.limiters[0].peek("api-1", rule="api", now=sim.now)
    excess = ledger.granted - (capacity + rate * (sim.now - t0) / NS_PER_S)
    assert debt.tokens_remaining < 0
    assert abs(debt.tokens_remaining + excess) <= 2
    assert excess <= one_side + 2 * (capacity + rate * 0.015)  # (k−1)(C+rP) + (n−1)(C+rd)

    # traffic resumes long enough to repay the debt: the long-run total matches the limit
    steady(sim, t0 + partition + 200 * MS, t0 + 5 * NS_PER_S, 5 * MS)
    result = finish(sim, t0 + 5 * NS_PER_S)
    duration = (sim.now - t0) / NS_PER_S
    assert result.granted <= capacity + rate * duration + 2 * (capacity + rate * 0.015)
    assert result.granted >= rate * duration - capacity


def test_duplicated_and_reordered_deltas_are_harmless() -> None:
    sim = Simulation(
        2,
        4,
        [make_rule(8, 20.0)],
        {"api-1": "api", "api-2": "api"},
        network=Network(0, 60 * MS, duplicate=0.5),
        sync_interval_ns=5 * MS,
        record=True,
    )
    t0 = sim.start_ns
    steady(sim, t0, t0 + 600 * MS, 7 * MS, "api-1")
    steady(sim, t0, t0 + 600 * MS, 11 * MS, "api-2")
    result = finish(sim, t0 + 700 * MS)
    assert result.duplicated > 20 and result.reordered > 20
    # every message once more, newest first: nothing changes anywhere
    assert sim.delivered is not None
    before = [limiter.snapshot() for limiter in sim.limiters]
    for dst, data in reversed(sim.delivered):
        batch = msgspec.msgpack.decode(data, type=DeltaBatch)
        assert sim.limiters[dst].merge(batch, now=sim.local_time(dst)) == 0
    assert [limiter.snapshot() for limiter in sim.limiters] == before


def test_config_change_wins_everywhere() -> None:
    """Concurrent configure calls on both sides of a partition: the highest HLC version
    wins on every replica, for the rule and for every bucket of it; a later per-key
    change beats the rule for that key only."""
    sim = Simulation(
        3,
        3,
        [make_rule(10, 10.0)],
        {"api-1": "api", "api-2": "api"},
        skews_ns=[4 * MS, -5 * MS, 0],
        network=Network(1 * MS, 10 * MS, drop=0.2),
    )
    t0 = sim.start_ns
    steady(sim, t0, t0 + 1_200 * MS, 9 * MS, "api-1")
    steady(sim, t0, t0 + 1_200 * MS, 13 * MS, "api-2")
    sim.partition(t0 + 250 * MS, t0 + 600 * MS, [[0, 2], [1]])
    sim.configure(t0 + 100 * MS, 2, "api-1", capacity=20)
    sim.configure(t0 + 300 * MS, 0, "api", capacity=4, refill_rate=2.0)
    sim.configure(t0 + 320 * MS, 1, "api", capacity=30, refill_rate=50.0)
    sim.configure(t0 + 900 * MS, 2, "api-2", refill_rate=5.0)
    finish(sim, t0 + 1_300 * MS)
    key_config, rule_a, rule_b, late_key_config = sim.configs
    winner = max(rule_a, rule_b, key=lambda config: config.version)
    assert winner is rule_b  # r1 configured later, on a clock 5 ms behind: HLC still orders
    assert winner.version > key_config.version
    for limiter in sim.limiters:
        assert limiter.rule_configs["api"] == winner
        assert bucket_config(limiter, "api-1") == winner
        assert bucket_config(limiter, "api-2") == late_key_config
    assert late_key_config.capacity == winner.capacity  # built on the rule's winning config


def bucket_config(limiter: Limiter, key: str) -> BucketConfig:
    bucket = limiter.bucket(key)
    assert bucket is not None
    return bucket.config


def restart_scenario(seed: int) -> tuple[Simulation, dict[str, bytes]]:
    """r0 spends 4 tokens, is snapshotted, spends 6 more (the bucket is empty and
    refills one token per 100 s); the peers hear of all 10."""
    sim = Simulation(
        seed,
        3,
        [make_rule(10, 0.01)],
        {"api-1": "api"},
        skews_ns=[0, 0, 0],
        network=Network(1 * MS, 2 * MS),
        sync_interval_ns=10 * MS,
    )
    t0 = sim.start_ns
    snapshots: dict[str, bytes] = {}
    for i in range(4):
        sim.acquire(t0 + i * MS, 0, "api-1")
    sim.at(t0 + 50 * MS, lambda s: snapshots.setdefault("old", s.limiters[0].snapshot()))
    for i in range(6):
        sim.acquire(t0 + 100 * MS + i * MS, 0, "api-1")
    sim.run(t0 + 300 * MS)
    for peer in sim.limiters[1:]:
        assert peer.bucket("api-1") is not None
        assert peer.peek("api-1", now=sim.now).tokens_remaining == 0
    return sim, snapshots


def test_restart_with_new_incarnation_never_regrants() -> None:
    sim, snapshots = restart_scenario(4)
    sim.restart(0, snapshots["old"])
    restored = sim.limiters[0]
    assert restored.replica_id == "r0/n/2"
    assert restored.peek("api-1", now=sim.local_time(0)).tokens_remaining == 6  # stale view
    # a restarted peer gets a full-state transfer before it serves (docs/design.md section 9)
    sim.inject(0, sim.limiters[1].full_state())
    t = sim.now
    for i in range(5):
        sim.acquire(t + i * MS, 0, "api-1")
        sim.acquire(t + i * MS, 1, "api-1")
    result = finish(sim, t + 200 * MS)
    assert result.granted == 10  # C + r·D: nothing re-granted
    bucket = restored.bucket("api-1")
    assert bucket is not None
    assert bucket.used(restored.replica_id) == {"r0/n/1": 10}


def test_restart_serving_before_catch_up_loses_no_consumption() -> None:
    """Serving from a stale snapshot before hearing from peers over-admits like a
    partition would (the view misses 6 tokens), but the new incarnation's counter
    starts fresh, so nothing is hidden by max-merge: after convergence the bucket
    owes every token (debt) and Σ used equals what was granted."""
    sim, snapshots = restart_scenario(5)
    sim.restart(0, snapshots["old"])
    t = sim.now
    for i in range(8):
        sim.acquire(t + i * 100, 0, "api-1")
    result = finish(sim, t + 200 * MS)
    assert result.granted == 16
    debt = sim.limiters[1].peek("api-1", now=sim.now)
    assert debt.tokens_remaining == -6


def test_restart_reusing_the_replica_id_is_caught() -> None:
    """The hazard incarnations exist for (docs/design.md section 6): an old snapshot resumed
    under the same id restarts its counter below what peers hold, and max-merge
    would hide what it spends next. The simulator must flag it."""
    sim, snapshots = restart_scenario(6)
    sim.restart(0, snapshots["old"], new_incarnation=False)
    sim.acquire(sim.now, 0, "api-1")
    with pytest.raises(InvariantViolation, match="no lost consumption"):
        finish(sim, sim.now + 200 * MS)


def test_expired_bucket_recreated_in_new_epoch() -> None:
    """Idle longer than its ttl, a bucket is dropped everywhere; new traffic re-creates
    it in a later epoch, which replaces any stale copy of the old one wholesale."""
    sim = Simulation(
        7,
        3,
        [make_rule(5, 10.0, ttl=1.0)],
        {"api-1": "api"},
        skews_ns=[0, 1 * MS, -1 * MS],
        network=Network(1 * MS, 5 * MS),
        sync_interval_ns=10 * MS,
        anti_entropy_interval_ns=100 * MS,
        expire_interval_ns=100 * MS,
    )
    t0 = sim.start_ns
    stale: list[DeltaBatch] = []
    steady(sim, t0, t0 + 200 * MS, 10 * MS)
    sim.at(t0 + 250 * MS, lambda s: stale.append(s.limiters[1].full_state()))
    sim.run(t0 + 2_900 * MS)
    assert all(limiter.bucket("api-1") is None for limiter in sim.limiters)
    steady(sim, t0 + 3_000 * MS, t0 + 3_200 * MS, 10 * MS)
    sim.run(t0 + 3_300 * MS)
    (old,) = stale[0].deltas
    assert sim.inject(0, stale[0]) == 0  # the old generation is ignored
    result = finish(sim, t0 + 3_400 * MS)
    epochs = sorted({epoch for _, epoch in sim.ledgers})
    assert len(epochs) == 2 and epochs[0] == old.epoch
    for limiter in sim.limiters:
        bucket = limiter.bucket("api-1")
        assert bucket is not None and bucket.epoch == epochs[1]
    assert result.granted == sum(ledger.granted for ledger in sim.ledgers.values())


def test_strict_mode_never_over_admits_whatever_the_partitions() -> None:
    capacity, rate = 12, 6.0
    sim = Simulation(
        8,
        3,
        [make_rule(capacity, rate, mode="strict")],
        {"api-1": "api"},
        network=Network(1 * MS, 5 * MS, drop=0.1),
        record=True,
    )
    t0 = sim.start_ns
    sim.partition(t0, t0 + 2 * NS_PER_S, [[0], [1], [2]])
    steady(sim, t0, t0 + 2 * NS_PER_S, 4 * MS)
    result = finish(sim, t0 + 2 * NS_PER_S)
    ledger = next(iter(sim.ledgers.values()))
    duration = (max(max(times) for times, _ in ledger.log.values()) - ledger.first_ns) / NS_PER_S
    assert result.granted <= capacity + rate * duration
    assert result.granted >= capacity + rate * duration - 3 * 2  # each share used, minus rounding
    assert sim.delivered is not None
    for _, data in sim.delivered:
        assert not msgspec.msgpack.decode(data, type=DeltaBatch).deltas


def test_local_mode_never_replicates() -> None:
    sim = Simulation(
        9,
        3,
        [make_rule(5, 1.0, mode="local")],
        {"api-1": "api"},
        network=Network(1 * MS, 5 * MS),
        record=True,
    )
    t0 = sim.start_ns
    steady(sim, t0, t0 + NS_PER_S, 10 * MS)
    finish(sim, t0 + NS_PER_S)
    assert sim.delivered is not None
    for _, data in sim.delivered:
        assert not msgspec.msgpack.decode(data, type=DeltaBatch).deltas
    ledger = next(iter(sim.ledgers.values()))
    assert all(own >= 5 for own in ledger.own.values())  # three independent buckets
    for limiter in sim.limiters:
        bucket = limiter.bucket("api-1")
        assert bucket is not None and bucket.others is None


def test_steady_traffic_without_faults_stays_tight() -> None:
    """Connected, no loss, steady demand: over-admission is bounded by what the other
    replicas are asked for within one information lag, far below (n−1)·(C + r·d)."""
    capacity, rate, every = 20, 50.0, 10 * MS  # each replica asks 100 tokens/s
    sim = Simulation(
        10,
        3,
        [make_rule(capacity, rate)],
        {"api-1": "api"},
        max_skew_ns=1 * MS,
        network=Network(1 * MS, 3 * MS),
        sync_interval_ns=5 * MS,
    )
    t0 = sim.start_ns
    steady(sim, t0, t0 + 2 * NS_PER_S, every)
    result = finish(sim, t0 + 2 * NS_PER_S)
    lag = result.max_lag_ns
    assert 0 < lag <= 10 * MS
    per_lag = math.ceil(lag / every) + 1  # what one replica can be asked for in a lag
    skew = rate * sim.skew_spread / NS_PER_S
    assert result.excess_tokens <= 2 * per_lag + skew
    assert result.excess_tokens < (capacity + rate * lag / NS_PER_S) / 4


# -- the checker is not vacuous ----------------------------------------------------------

original_merge = Bucket.merge
original_reconfigure = Bucket.reconfigure
original_acquire = Bucket.acquire


def merge_dropping_used(
    self: Bucket, delta: BucketDelta, replica_id: str, now_ns: int | None = None
) -> bool:
    forgetful = msgspec.structs.replace(delta, used={})
    return original_merge(self, forgetful, replica_id, now_ns)


def reconfigure_refilling(self: Bucket, config: BucketConfig, now_ns: int) -> None:
    original_reconfigure(self, config, now_ns)
    self.base_time, self.base_used = now_ns, self.total  # full again: free tokens
    self._recompute()


def acquire_never_rebasing(self: Bucket, key: str, tokens: int, now_ns: int) -> Decision:
    kept = (self.anchor, self.anchor_used, self.anchor_slice, self.marks)
    decision = original_acquire(self, key, tokens, now_ns)
    # the refill a full bucket could not hold is not forgotten
    self.anchor, self.anchor_used, self.anchor_slice, self.marks = kept
    self._recompute()
    return decision


def acquire_rebasing_the_shared_base(self: Bucket, key: str, tokens: int, now_ns: int) -> Decision:
    """Issue 23's defect: a grant on a bucket full in this view raises one shared
    max-register to "full now, given what I know", charging every token spent
    elsewhere and not yet heard of again on top of it."""
    full = self.tat() < now_ns
    before = self.total
    decision = original_acquire(self, key, tokens, now_ns)
    if decision.allowed and tokens and full:
        candidate = (now_ns, before)
        current = (self.base_time, self.base_used)
        key_of = self._base_key
        if key_of(self.base_version, *candidate) > key_of(self.base_version, *current):
            self.base_time, self.base_used = candidate
            self._recompute()
    return decision


def acquire_one_too_many(self: Bucket, key: str, tokens: int, now_ns: int) -> Decision:
    honest = self.config
    self.config = msgspec.structs.replace(honest, capacity=honest.capacity + 1)
    try:
        return original_acquire(self, key, tokens, now_ns)
    finally:
        self.config = honest


# A mutant patched into the core is bypassed by the compiled build's native calls:
# these run on the pure core (make test's BUCKETMESH_PURE=1 pass).
pure_core_only = pytest.mark.skipif(
    _native.compiled(), reason="patches the core: runs on the pure core (BUCKETMESH_PURE=1)"
)


@pytest.mark.parametrize(
    ("method", "broken", "invariant"),
    [
        ("merge", merge_dropping_used, "merge is the join of everything delivered"),
        ("reconfigure", reconfigure_refilling, "admission bound"),
        ("acquire", acquire_one_too_many, "admission bound"),
        ("acquire", acquire_never_rebasing, "admission bound"),
        ("acquire", acquire_rebasing_the_shared_base, "no under-admission"),
    ],
    ids=[
        "merge-drops-used",
        "config-change-refills",
        "one-token-over-capacity",
        "no-rebase",
        "shared-base-register",
    ],
)
@pure_core_only
def test_simulator_detects_a_broken_core(
    monkeypatch: pytest.MonkeyPatch, method: str, broken: Callable[..., object], invariant: str
) -> None:
    monkeypatch.setattr(Bucket, method, broken)
    found: list[InvariantViolation] = []
    for seed in range(200):
        try:
            run(seed)
        except InvariantViolation as violation:
            found.append(violation)
    assert found, "the simulator did not notice a broken core"
    assert any(v.invariant == invariant for v in found), {v.invariant for v in found}
    assert f"bucketmesh sim --seed {found[0].seed})" in str(found[0])


@pure_core_only
def test_simulator_detects_a_broken_merge_in_one_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Bucket, "merge", merge_dropping_used)
    with pytest.raises(InvariantViolation, match="seed 3"):
        run(3)


def test_command_line_summarises_a_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seeds", "20", "--replicas", "3"]) == 0
    out = capsys.readouterr().out
    # each seed runs the random schedule and one of the issue-12 case generators
    assert out.startswith("40 schedules (20 random, ") and "0 violations" in out


# -- expiry and resurrection: a dropped bucket's own count survives as a tombstone -------


def test_bucket_resurrected_by_a_peer_delta_keeps_its_own_count() -> None:
    rule = make_rule(5, 1.0, ttl=10.0)
    a = Limiter([rule], replica_id="a/n/1", clock=lambda: 0)
    b = Limiter([rule], replica_id="b/n/1", clock=lambda: 0)
    t = 1_000 * NS_PER_S
    granted = sum(a.acquire("api-1", now=t).allowed for _ in range(5))
    b.merge(a.collect_deltas(), now=t)
    t += 30 * NS_PER_S  # idle, full for longer than the ttl
    assert a.expire(t) == 1  # a sweeps; b has not swept yet...
    granted += b.acquire("api-1", now=t).allowed  # ...and spends on the same epoch
    a.merge(b.collect_deltas(), now=t)  # a re-creates the bucket from b's delta: a = 0
    granted += sum(a.acquire("api-1", now=t).allowed for _ in range(3))  # a = 1, 2, 3
    for _ in range(2):
        b.merge(a.full_state(), now=t)
        a.merge(b.full_state(), now=t)
    for limiter in (a, b):
        bucket = limiter.bucket("api-1")
        assert bucket is not None
        # 9 (5 + 1 + 3): a's tombstone restores its 5, so its 3 new tokens show above it
        assert sum(bucket.used(limiter.replica_id).values()) == granted


def test_bucket_resurrected_from_a_fresher_full_state_keeps_its_own_count() -> None:
    rule = make_rule(5, 10.0, ttl=1.0)  # T = 100 ms
    a, b, c = (Limiter([rule], replica_id=f"{x}/n/1", clock=lambda: 0) for x in "abc")
    t = 1_000 * NS_PER_S + 100 * MS
    granted = a.acquire("api-1", now=t).allowed
    first = a.collect_deltas()
    granted += a.acquire("api-1", now=t + 1 * MS).allowed
    second = a.collect_deltas()
    for peer in (b, c):
        peer.merge(first, now=t + 2 * MS)
    c.merge(second, now=t + 2 * MS)  # b never gets a's second delta
    granted += b.acquire("api-1", now=t + 600 * MS).allowed  # c hears of it, a does not
    c.merge(b.collect_deltas(), now=t + 601 * MS)
    assert a.expire(t + 1_300 * MS) == 1  # a's copy expired; b's (fresher) is not
    a.merge(b.full_state(), now=t + 1_300 * MS)  # a re-learns it with a = 1 (it spent 2)
    granted += a.acquire("api-1", now=t + 1_301 * MS).allowed
    c.merge(a.collect_deltas(), now=t + 1_302 * MS)
    bucket = c.bucket("api-1")
    assert bucket is not None
    # 4: without a's tombstone its new token would hide under the 2 c already knew
    assert sum(bucket.used("c/n/1").values()) == granted


def test_random_schedules_with_expiry_hold_every_invariant() -> None:
    for seed in range(1000):
        run(seed, expiry=True)


def test_an_older_generation_kept_by_a_peer_is_adopted_and_the_tombstone_waits() -> None:
    # a dropped generation E1 that no peer ever heard of; the peers still hold E0, not
    # expired: a must converge on E0 with them (seed 3331 with --expiry)
    rule = make_rule(5, 1.0, ttl=10.0)
    a = Limiter([rule], replica_id="a/n/1", clock=lambda: 0)
    b = Limiter([rule], replica_id="b/n/1", clock=lambda: 0)
    t = 1_000 * NS_PER_S
    b.acquire("api-1", now=t)
    t += 30 * NS_PER_S
    a.acquire("api-1", now=t)  # a's own bucket, a later epoch, never sent
    t += 30 * NS_PER_S
    assert a.expire(t) == 1 and a.tombstones["api-1"][1] == 1
    b_bucket = b.bucket("api-1")
    assert b_bucket is not None
    for _ in range(5):  # b's copy of the old epoch is kept busy
        b.acquire("api-1", now=t)
    assert a.merge(b.full_state(), now=t) == 1
    bucket = a.bucket("api-1")
    assert bucket is not None and bucket.epoch == b_bucket.epoch
    assert "api-1" in a.tombstones


def test_a_generation_replaced_while_live_keeps_our_count_when_it_comes_back() -> None:
    # seed 384 with --expiry and one more PATCH: a spent in E0, then c's later
    # generation E1 replaced E0 at a (a spent there too) and expired; b kept E0 busy and
    # sends it back. The key's tombstone holds E1 only: a's entry in E0 must restart at
    # what a spent in it, or max-merge hides a's next grants in E0 from b.
    rule = make_rule(5, 1.0, ttl=10.0)
    a, b, c = (Limiter([rule], replica_id=f"{x}/n/1", clock=lambda: 0) for x in "abc")
    t = 1_000 * NS_PER_S
    b.acquire("api-1", now=t)
    a.merge(b.collect_deltas(), now=t)
    assert a.acquire("api-1", now=t).allowed  # a = 1 in E0, never sent
    first = a.bucket("api-1")
    assert first is not None and first.mine == 1
    e0 = first.epoch
    t += 30 * NS_PER_S
    c.acquire("api-1", now=t)  # c's own bucket: a later generation E1
    assert a.merge(c.collect_deltas(), now=t) == 1
    replaced = a.bucket("api-1")
    assert replaced is not None and replaced.epoch > e0
    a.acquire("api-1", now=t)
    t += 30 * NS_PER_S
    assert a.expire(t) == 1 and a.tombstones["api-1"][0] == replaced.epoch
    for _ in range(5):  # b's copy of E0 is kept busy
        b.acquire("api-1", now=t)
    assert a.merge(b.full_state(), now=t) == 1
    back = a.bucket("api-1")
    assert back is not None and back.epoch == e0
    assert back.mine == 1  # was 0: a's grant in E0 forgotten
    # a's next grant in E0 reaches b above the 1 it spent before
    a.acquire("api-1", tokens=0, now=t)
    b.merge(a.full_state(), now=t)
    held = b.bucket("api-1")
    assert held is not None and held.used("b/n/1")["a/n/1"] >= 1


def test_tombstones_are_forgotten_after_their_horizon() -> None:
    rule = make_rule(5, 1.0, ttl=10.0)
    a = Limiter([rule], replica_id="a/n/1", clock=lambda: 0, tombstone_ns=60 * NS_PER_S)
    t = 1_000 * NS_PER_S
    for i in range(3):
        a.acquire(f"api-{i}", now=t)
    a.acquire("api-idle", tokens=0, now=t)  # a peek creates nothing, leaves nothing
    t += 30 * NS_PER_S
    assert a.expire_step(t) == 3
    assert sorted(a.tombstones) == ["api-0", "api-1", "api-2"]
    a.acquire("api-0", now=t)  # a new local bucket (a newer epoch) needs no tombstone
    assert sorted(a.tombstones) == ["api-1", "api-2"]
    a.expire_step(t + 59 * NS_PER_S)  # api-0 is idle again: a tombstone for its new epoch
    assert sorted(a.tombstones) == ["api-0", "api-1", "api-2"]
    a.expire_step(t + 61 * NS_PER_S)
    assert sorted(a.tombstones) == ["api-0"]
    a.expire_step(t + 200 * NS_PER_S)
    assert not a.tombstones


# -- strict mode: per-key config changes reach every region, counters never do --------


def test_strict_key_config_change_reaches_every_region() -> None:
    sim = Simulation(
        11,
        3,
        [make_rule(12, 6.0, mode="strict")],
        {"api-1": "api"},
        network=Network(1 * MS, 5 * MS),
    )
    t0 = sim.start_ns
    steady(sim, t0, t0 + 500 * MS, 10 * MS)
    sim.configure(t0 + 100 * MS, 0, "api-1", capacity=3)
    finish(sim, t0 + 500 * MS)
    shares = [bucket_config(limiter, "api-1") for limiter in sim.limiters]
    # every region holds a third of the new capacity (not [1, 4, 4]: only the changer's)
    assert [share.capacity for share in shares] == [1, 1, 1]


def test_strict_key_config_changes_accumulate_like_shared_ones() -> None:
    """A second PATCH of a strict key starts from the rule's config, not the key's:
    changing only the refill rate reverts an earlier capacity change."""
    for mode in ("shared", "strict"):
        limiter = Limiter([make_rule(12, 6.0, mode=mode)], replica_id="a/n/1", clock=lambda: 0)
        t = 1_000 * NS_PER_S
        limiter.acquire("api-1", now=t)
        limiter.configure("api-1", capacity=30, now=t)
        config = limiter.configure("api-1", refill_rate=3.0, now=t + 1)
        assert config.capacity == 30, mode  # not back to the rule's 12


def test_a_restarted_region_recovers_a_strict_key_config_from_its_peers() -> None:
    rule = make_rule(12, 6.0, mode="strict")
    a = Limiter([rule], replica_id="a/n/1", clock=lambda: 0, regions=3)
    t = 1_000 * NS_PER_S
    a.acquire("api-1", now=t)
    a.configure("api-1", capacity=30, now=t)
    b = Limiter([rule], replica_id="b/n/1", clock=lambda: 0, regions=3)
    b.merge(a.full_state(), now=t)
    # a restarts from its snapshot: the bucket (its share) and the whole config survive
    # (issue 12, case 11); the peers' copy changes nothing then
    restarted = Limiter.restore(a.snapshot(), [rule], replica_id="a/n/2", regions=3)
    assert restarted.key_configs["api-1"].capacity == 30
    restarted.merge(b.full_state(), now=t + 1)  # the start-up pull
    config = restarted.configure("api-1", refill_rate=3.0, now=t + 2)
    assert config.capacity == 30  # not the rule's 12


def test_a_new_region_learns_strict_key_configs_from_full_state() -> None:
    rule = make_rule(12, 6.0, mode="strict")
    a = Limiter([rule], replica_id="a/n/1", clock=lambda: 0, regions=3)
    b = Limiter([rule], replica_id="b/n/1", clock=lambda: 0, regions=3)
    t = 1_000 * NS_PER_S
    a.acquire("api-1", now=t)
    a.configure("api-1", capacity=30, now=t)
    assert a.merge(b.full_state(), now=t) == 0
    b.merge(a.full_state(), now=t)  # before b has the key at all
    b.acquire("api-1", now=t + 1)
    assert bucket_config(b, "api-1").capacity == 10  # a third of 30, not of 12
    bucket = b.bucket("api-1")
    assert bucket is not None and not bucket.others  # counters never travel


# -- a late per-key config change never hands back refill a replica already forgot -----


def test_late_config_change_does_not_refill_a_drained_bucket() -> None:
    """Found by the simulator as seed 58670 (bucketmesh sim --seed 58670)."""
    rule = make_rule(5, 10.0)  # T = 100 ms
    a = Limiter([rule], replica_id="a/n/1", clock=lambda: 0)
    b = Limiter([rule], replica_id="b/n/1", clock=lambda: 0)
    t = 1_000 * NS_PER_S
    b.configure("api-1", capacity=5, now=t)  # same limits, new version; b's copy is full
    late = b.collect_deltas()  # ...and this message is delayed (loss, partition)
    assert sum(a.acquire("api-1", now=t + 500 * MS).allowed for _ in range(5)) == 5
    a.merge(late, now=t + 510 * MS)
    second = sum(a.acquire("api-1", now=t + 510 * MS).allowed for _ in range(5))
    # 0.1 token refilled since the bucket was drained, not 5: a adopts the new version
    # keeping the level it sees, and that proposal outranks b's older one
    assert second == 0


# -- issue 23: a busy side and a quiet side of a partition -----------------------------


def busy_quiet(partition_ns: int, *, jump_ns: int = 0) -> tuple[Simulation, int, int, int]:
    """The issue's schedule: capacity 10, refill 10/s, two regions; region 0 asks 30 times
    a second for 46 s, region 1 once every 2 s; a partition of ``partition_ns`` from 3 s
    (or, with ``jump_ns``, no partition and region 1's clock stepped back by ``jump_ns``
    at 3 s and corrected 20 s later). Returns (sim, t0, heal, end)."""
    capacity, rate = 10, 10.0
    sim = Simulation(
        1,
        2,
        [make_rule(capacity, rate)],
        {"api-1": "api"},
        skews_ns=[0, 0],
        network=Network(1 * MS, 5 * MS),
        sync_interval_ns=20 * MS,
        anti_entropy_interval_ns=2 * NS_PER_S,
    )
    t0 = sim.start_ns
    begin, end = t0 + 3 * NS_PER_S, t0 + 46 * NS_PER_S
    heal = begin + (partition_ns if partition_ns else 20 * NS_PER_S)
    if partition_ns:
        sim.partition(begin, heal, [[0], [1]])
    if jump_ns:
        sim.jump(begin, 1, -jump_ns)
        sim.jump(heal, 1, jump_ns)
    at = t0
    while at < end:
        sim.acquire(at, 0, "api-1")
        at += NS_PER_S // 30
    at = t0 + 7 * MS
    while at < end:
        sim.acquire(at, 1, "api-1")
        at += 2 * NS_PER_S
    return sim, t0, heal, end


def test_a_quiet_side_of_a_partition_does_not_erase_the_refill_that_paid_the_busy_side() -> None:
    """Issue 23: after the heal the debt is the real over-admission (about 9 tokens), not
    the busy side's whole spend (−163 before the fix), and over the run the regions admit
    the limit from below too (299 of 470 before the fix)."""
    sim, t0, heal, end = busy_quiet(20 * NS_PER_S)
    sim.run(heal)
    ledger = next(iter(sim.ledgers.values()))
    excess = ledger.granted - (10 + 10 * (sim.now - t0) / NS_PER_S)
    assert 5 <= excess <= 12  # B's ~10 grants unseen by A, less what B's gaps refilled
    # the two sides' states merged, as every replica holds them once the deltas are in
    states = [
        limiter.buckets["api-1"].full_state("api-1", limiter.replica_id) for limiter in sim.limiters
    ]
    merged = Bucket.from_delta(states[0], "observer")
    merged.merge(states[1], "observer")
    level = merged.acquire("api-1", 0, sim.now)
    # debt ≈ over-admission, within one slice of refill (S = C·T/8: 1.25 tokens)
    assert -excess - 2 <= level.tokens_remaining <= -excess + 2, (level, excess)
    assert level.reset_after < 3.0  # repaid within ~2 s, not 17 s
    result = finish(sim, end)
    limit = 10 + 10 * (end - t0) / NS_PER_S
    assert limit - 3 <= result.granted <= limit + excess + 2


def test_both_sides_busy_leave_the_same_debt_as_before() -> None:
    """The control: both sides loaded; the debt equals the excess (as documented)."""
    sim, t0, _, end = busy_quiet(20 * NS_PER_S)
    at = t0 + 11 * MS
    while at < end:
        sim.acquire(at, 1, "api-1")
        at += NS_PER_S // 30
    result = finish(sim, end)
    limit = 10 + 10 * (end - t0) / NS_PER_S
    assert limit - 3 <= result.granted <= limit + 10 + 10 * 20 + 3


def test_a_clock_stepped_back_and_corrected_leaves_no_debt() -> None:
    """Issue 23: region 1's clock steps back a minute and is corrected 20 s later; no
    token was over-admitted, so after the correction nothing is owed."""
    sim, t0, heal, end = busy_quiet(0, jump_ns=60 * NS_PER_S)
    sim.run(heal + NS_PER_S)
    ledger = next(iter(sim.ledgers.values()))
    assert ledger.granted <= 10 + 10 * (sim.now - t0) / NS_PER_S + 2
    for replica in (0, 1):
        level = sim.limiters[replica].peek("api-1", rule="api", now=sim.local_time(replica))
        assert level.tokens_remaining >= -3, level
    result = finish(sim, end)
    assert result.granted >= 10 + 10 * (end - t0) / NS_PER_S - 3


def test_a_partition_straddling_an_epoch_boundary_keeps_its_debt() -> None:
    """Issue 12 case 10: region 0 spends in the old generation during a partition, region 1
    first uses the key after the epoch boundary; the later generation wins, and region 0
    carries its share of the backlog into it, so the excess is still repaid."""
    capacity, rate = 10, 10.0
    sim = Simulation(
        1,
        2,
        [make_rule(capacity, rate, ttl=60.0)],
        {"api-1": "api"},
        skews_ns=[0, 0],
        network=Network(1 * MS, 5 * MS),
        sync_interval_ns=20 * MS,
    )
    t0 = sim.start_ns
    boundary = t0 - t0 % (60 * NS_PER_S) + 60 * NS_PER_S
    begin, heal = boundary - 30 * NS_PER_S, boundary + 5 * NS_PER_S
    sim.partition(begin, heal, [[0], [1]])
    at = begin
    while at < heal + 10 * NS_PER_S:
        sim.acquire(at, 0, "api-1")
        at += NS_PER_S // 30
    at = boundary + 100 * MS
    while at < heal + 10 * NS_PER_S:
        sim.acquire(at, 1, "api-1")
        at += NS_PER_S // 30
    sim.run(heal + NS_PER_S)
    held = [limiter.bucket("api-1") for limiter in sim.limiters]
    assert all(bucket is not None and bucket.epoch == boundary for bucket in held)
    # both regions spent their fill in the 5 s after the boundary: ~C + r·5 excess
    assert sim.result.carried > 0
    level = sim.limiters[1].peek("api-1", rule="api", now=sim.local_time(1))
    assert level.tokens_remaining <= -(capacity + 10 * 5) + 15, level
    finish(sim, heal + 10 * NS_PER_S)
