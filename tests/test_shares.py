"""Strict mode's transferable shares (issue 18): the ledger's laws, the rebalancer's
policy, a limiter that spends only what it holds, and the simulator's strict-shares
schedules (never above the global limit over any window).

The simulator test runs 400 schedules (about 15-30 s on a loaded 2-core box);
``bucketmesh sim --kind strict-shares --seeds 10000`` runs the full 10,000
(docs/sync.md gives the result).
Before this change there was no ledger (core/shares.py did not exist) and strict
shares were a fixed 1/R: the utilisation test below delivered about 1/3."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketmesh.core.bucket import NS_PER_S, interval_for
from bucketmesh.core.decisions import Ask
from bucketmesh.core.limiter import DeltaBatch, InvalidTokens, Limiter
from bucketmesh.core.rules import Rule
from bucketmesh.core.shares import (
    SCALE,
    Ledger,
    burn_covered,
    burnt_limits,
    floor_parts,
    plan,
    share_limits,
    targets,
)
from bucketmesh.tooling import sim_shares

FOUNDERS = ("a", "b", "c")
gifts = st.lists(
    st.tuples(
        st.sampled_from(["a/n/1", "b/n/1", "c/n/1", "a/n/2"]),
        st.sampled_from(FOUNDERS),
        st.integers(0, 1000),
    ),
    max_size=8,
)


def ledger_of(entries: list[tuple[str, str, int]]) -> Ledger:
    ledger = Ledger(FOUNDERS)
    for giver, region, parts in entries:
        if not giver.startswith(region):
            ledger.give(giver, region, parts, parts // 10)
    return ledger


@settings(max_examples=200, deadline=None)
@given(gifts, gifts, gifts)
def test_the_ledger_merge_is_a_join(a: list, b: list, c: list) -> None:  # type: ignore[type-arg]
    x, y, z = ledger_of(a), ledger_of(b), ledger_of(c)

    def join(p: Ledger, q: Ledger) -> Ledger:
        out = Ledger.from_state(p.state())
        out.merge(q)
        return out

    assert join(x, y).state() == join(y, x).state()
    assert join(join(x, y), z).state() == join(x, join(y, z)).state()
    assert join(x, x).state() == x.state()
    # a wire round trip changes nothing
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(x.state()), type=type(x.state()))
    assert Ledger.from_state(wire).state() == x.state()


def test_gifts_never_create_rights_whatever_the_views() -> None:
    rng = random.Random(7)
    truth = Ledger(FOUNDERS)
    views = {r: Ledger(FOUNDERS) for r in FOUNDERS}
    for _ in range(500):
        giver = rng.choice(FOUNDERS)
        view = views[giver]
        to = rng.choice([r for r in FOUNDERS if r != giver])
        spare = view.holding(giver) - SCALE // 50
        if spare > 0:
            parts = rng.randint(0, spare)
            view.give(f"{giver}/n/1", to, parts)
            truth.give(f"{giver}/n/1", to, parts)
        # a random, partial, possibly stale delivery
        src, dst = rng.sample(FOUNDERS, 2)
        if rng.random() < 0.5:
            views[dst].merge(Ledger.from_state(views[src].state()))
        used = sum(views[r].holding(r) for r in FOUNDERS)
        assert used <= SCALE
        assert all(views[r].holding(r) >= 0 for r in FOUNDERS)


def test_share_limits_never_sum_above_the_limit() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        capacity, interval = rng.randint(1, 10_000), rng.randint(1, 10**9)
        cuts = sorted(rng.randint(0, SCALE) for _ in range(3))
        parts = [cuts[0], cuts[1] - cuts[0], cuts[2] - cuts[1], SCALE - cuts[2]]
        limits = [share_limits(capacity, interval, p) for p in parts]
        assert sum(c for c, _ in limits) <= capacity
        assert sum(1 / i for c, i in limits if c) <= 1 / interval * (1 + 1e-9)


def test_fair_share_with_a_floor_and_a_region_only_gives() -> None:
    floor = floor_parts(3, 100)
    goal = targets(FOUNDERS, {"a": SCALE, "b": SCALE // 100}, SCALE, floor)
    assert goal["b"] >= floor and goal["c"] >= floor
    assert goal["a"] > 0.9 * SCALE
    assert sum(goal.values()) <= SCALE
    # the busy region holds little: it gives nothing; a quiet one gives to it
    equal = {r: SCALE // 3 for r in FOUNDERS}
    assert plan("a", SCALE // 3, FOUNDERS, equal, demand_parts={"a": SCALE}, floor=floor) == {}
    out = plan("b", SCALE // 3, FOUNDERS, equal, demand_parts={"a": SCALE}, floor=floor)
    assert set(out) == {"a"} and 0 < out["a"] <= SCALE // 3 - floor


def three_regions(capacity: int = 30, rate: float = 30.0) -> dict[str, Limiter]:
    rule = Rule.create("k-{{ .Request.ClientIP }}", capacity, rate, name="s", mode="strict")
    out = {}
    for region in FOUNDERS:
        limiter = Limiter([rule], replica_id=f"{region}/n/1", regions=3)
        limiter.enable_shares(region, FOUNDERS)
        out[region] = limiter
    return out


def exchange(limiters: dict[str, Limiter], now: int) -> None:
    batches = {r: msgspec.msgpack.encode(lim.collect_deltas()) for r, lim in limiters.items()}
    for src, data in batches.items():
        for dst, lim in limiters.items():
            if dst != src:
                lim.merge(msgspec.msgpack.decode(data, type=DeltaBatch), now=now)


def test_rights_follow_demand_to_95_percent_and_stop_during_a_partition() -> None:
    """90 % of the demand in one region (twice the limit in all): after rebalancing
    the total served reaches 95 % of the limit; partitioned, nothing moves."""
    limiters = three_regions()
    now = 1_700_000_000 * NS_PER_S
    step = 10_000_000  # 10 ms
    served: list[int] = []
    rng = random.Random(1)
    for tick in range(1500):
        now += step
        got = 0
        for region, share in (("a", 0.9), ("b", 0.05), ("c", 0.05)):
            asked = 2 * 30 * share * step / NS_PER_S  # twice the limit, skewed
            for _ in range(int(asked) + (rng.random() < asked - int(asked))):
                got += limiters[region].acquire("k-1", 1, now=now).allowed
        served.append(got)
        if tick % 10 == 0:
            for lim in limiters.values():
                lim.rebalance(now, period_s=0.1, connected=True)
        exchange(limiters, now)
    last = sum(served[-500:]) / (500 * step / NS_PER_S)  # tokens per second
    assert last >= 0.95 * 30, f"{last:.1f}/s served of 30/s"
    held = {r: lim.spendable("k-1", 30) for r, lim in limiters.items()}
    assert sum(held.values()) <= SCALE
    assert held["a"] > 0.7 * SCALE  # the others keep about their demand (10 % each)
    # partitioned: no transfer (connected=False), every side keeps what it holds
    before = dict(held)
    for lim in limiters.values():
        lim.rebalance(now + step, period_s=0.1, connected=False)
    assert {r: lim.spendable("k-1", 30) for r, lim in limiters.items()} == before


def test_strict_shares_simulator_never_exceeds_the_global_limit() -> None:
    runs, violations = sim_shares.run_many(range(400))
    assert runs == 400
    assert not violations, violations[:3]


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 2 * SCALE)),
    st.integers(1, 100),
)
def test_targets_sum_to_the_limit_and_keep_every_floor(demand: dict, capacity: int) -> None:  # type: ignore[type-arg]
    members = ["a", "b", "c", "d"]
    floor = floor_parts(len(members), capacity)
    goal = targets(members, demand, SCALE, floor)
    assert sum(goal.values()) <= SCALE
    assert all(goal[m] >= floor for m in members)
    # and a region's plan never takes it below its floor, nor gives more than it holds
    for me in members:
        held = goal[me] + SCALE // 10
        out = plan(me, held, members, goal, demand_parts=demand, floor=floor)
        assert sum(out.values()) <= held - floor
        assert me not in out


def test_a_burning_region_keeps_the_regions_within_the_lower_limit() -> None:
    """Whoever holds what, one region on the new (lower) limit burning the excess and
    every other on the old one: the capacities and refill rates sum to at most the
    new limit while the burner's share covers the excess (``burn_covered``)."""
    rng = random.Random(18)
    for _ in range(3000):
        old_cap, new_cap = sorted((rng.randint(3, 500), rng.randint(3, 500)), reverse=True)
        old_int, new_int = sorted((rng.randint(10**6, 10**9), rng.randint(10**6, 10**9)))
        cuts = sorted(rng.randint(0, SCALE) for _ in range(2))
        held = [cuts[0], cuts[1] - cuts[0], SCALE - cuts[1]]
        burner = rng.randrange(3)
        caps, rates = 0, 0.0
        for i, parts in enumerate(held):
            if i == burner:
                cap, interval = burnt_limits(new_cap, new_int, parts, old_cap, old_int)
            else:
                cap, interval = share_limits(old_cap, old_int, parts)
            caps += cap
            rates += NS_PER_S / interval if cap else 0.0
        if burn_covered(new_cap, new_int, held[burner], old_cap, old_int):
            assert caps <= new_cap
            assert rates <= NS_PER_S / new_int * (1 + 1e-9)
        # never above its share of the new limit, covered or not
        cap, interval = burnt_limits(new_cap, new_int, held[burner], old_cap, old_int)
        assert cap <= share_limits(new_cap, new_int, held[burner])[0]


def test_a_lowering_patch_is_never_above_the_new_limit_while_it_spreads() -> None:
    """The region holding most lowers the limit: until the others have heard it, it
    burns their excess (the three buckets' capacities and rates sum to at most the
    new limit) and gives nothing; once every region reports the new limit it runs its
    plain share of it. Before this change it ran its share of the new limit at once
    while the others still ran theirs of the old: 1.3x the new capacity in all."""
    limiters = three_regions()
    now = 1_700_000_000 * NS_PER_S
    a = limiters["a"]
    # a holds 80 %: b and c give it most of theirs
    for region in ("b", "c"):
        limiters[region].acquire("k-1", 1, now=now)
        limiters[region]._ledger("k-1").give(limiters[region].replica_id, "a", SCALE // 4)
        limiters[region].dirty.add("k-1")
    a.acquire("k-1", 1, now=now)
    exchange(limiters, now)
    assert a.spendable("k-1", 30) >= 0.8 * SCALE
    # the PATCH: 30 -> 10 tokens, 30/s -> 10/s, heard by nobody yet
    a.configure("k-1", capacity=10, refill_rate=10.0, now=now)

    def totals() -> tuple[int, float]:
        configs = [lim.buckets["k-1"].config for lim in limiters.values()]
        caps = sum(c.capacity for c in configs)
        return caps, sum(NS_PER_S / c.interval_ns for c in configs if c.capacity)

    caps, rates = totals()
    assert caps <= 10 and rates <= 10.0 * (1 + 1e-9), (caps, rates)
    assert a.buckets["k-1"].config.capacity > 0  # it still serves
    assert a.rebalance(now, period_s=0.1, connected=True) == 0  # no gift meanwhile
    # everyone hears it and reports: a runs its plain share of the new limit
    for _ in range(3):
        now += 10_000_000
        exchange(limiters, now)
        for lim in limiters.values():
            lim.rebalance(now, period_s=0.1, connected=True)
    assert a._ceiling("k-1", a._whole("k-1", "s")) is None
    assert (
        a.buckets["k-1"].config.capacity
        == share_limits(10, interval_for(10.0), a.spendable("k-1", 10))[0]
    )
    caps, rates = totals()
    assert caps <= 10 and rates <= 10.0 * (1 + 1e-9), (caps, rates)


def test_a_removed_regions_rights_are_handed_over_once_everyone_acknowledged() -> None:
    """c is removed: a and b drop it from their lists; its rights move only once both
    have acknowledged (with the same list), every region computes the same handover,
    the holdings still sum to the limit, and c, hearing of it, spends nothing. A late
    message from c is not taken by a region that dropped it. Before this change c's
    rights stayed stranded (a and b held two thirds between them)."""
    limiters = three_regions()
    now = 1_700_000_000 * NS_PER_S
    for lim in limiters.values():
        lim.acquire("k-1", 1, now=now)
        lim.rebalance(now, period_s=0.1, connected=True)
    exchange(limiters, now)
    a, b, c = limiters["a"], limiters["b"], limiters["c"]
    # c's last gift, sent before it stopped, still in flight
    c._ledger("k-1").give(c.replica_id, "a", SCALE // 30)
    c.dirty.add("k-1")
    late = msgspec.msgpack.encode(c.collect_deltas())
    c_snapshot = c.snapshot()
    del limiters["c"]
    a.set_share_regions(["a", "b"])
    a.rebalance(now, period_s=0.1, connected=True)  # a acknowledges; b has not yet
    assert ("a", "c") in a.ledgers["k-1"].acks
    assert a.spendable("k-1", 30) == SCALE // 3  # nothing handed over yet
    a.merge(msgspec.msgpack.decode(late, type=DeltaBatch), now=now)  # dropped c: not taken
    assert a.spendable("k-1", 30) == SCALE // 3
    exchange(limiters, now)
    b.set_share_regions(["a", "b"])
    for _ in range(3):
        now += 10_000_000
        for lim in limiters.values():
            lim.rebalance(now, period_s=0.1, connected=True)
        exchange(limiters, now)
    held = {r: lim.spendable("k-1", 30) for r, lim in limiters.items()}
    assert sum(held.values()) == SCALE, held
    assert a.ledgers["k-1"].given == b.ledgers["k-1"].given  # the same handover
    assert a.ledgers["k-1"].given[("c/handover", "a")] > 0
    assert a.ledgers["k-1"].holding("c") == 0
    # c comes back from its snapshot on its old list: it pulls a first, spends nothing
    back = Limiter.restore(c_snapshot, a.rules, replica_id="c/n/2", regions=3)
    back.enable_shares("c", FOUNDERS)
    back.merge(a.full_state(), now=now)
    assert back.spendable("k-1", 30) == 0
    assert not back.acquire("k-1", 1, now=now).allowed


def test_rights_received_arrive_without_tokens_but_a_bucket_that_expired_full_had_them() -> None:
    """b gives c half of its rights while c has no bucket: c's first bucket is full on
    its own third only (b's bucket may have been empty: the gift's tokens would be
    new). Once c's bucket has expired full, it comes back full on all it holds.
    Before this change c's first bucket started full on everything it held."""
    rule = Rule.create("k-{{ .Request.ClientIP }}", 30, 30.0, name="s", mode="strict", ttl=1)
    limiters = {}
    for region in FOUNDERS:
        limiter = Limiter([rule], replica_id=f"{region}/n/1", regions=3)
        limiter.enable_shares(region, FOUNDERS)
        limiters[region] = limiter
    now = 1_700_000_000 * NS_PER_S
    b, c = limiters["b"], limiters["c"]
    assert b.acquire("k-1", 10, now=now).allowed  # b's bucket is empty
    b._ledger("k-1").give(b.replica_id, "c", SCALE // 6)
    b._reshare("k-1", now)
    b.dirty.add("k-1")
    exchange(limiters, now)
    assert c.spendable("k-1", 30) == SCALE // 2
    bucket = c.inspect("k-1", now=now)
    assert bucket.config.capacity == 15
    assert bucket.level(now) == 10  # its own third; the gift's 5 refill
    # idle: full, then expired; created again it is full on all it holds
    later = now + 10 * NS_PER_S
    assert c.acquire("k-1", 1, now=later).allowed
    c.expire(later + 5 * NS_PER_S)
    assert "k-1" not in c.buckets
    assert c.inspect("k-1", now=later + 5 * NS_PER_S).level(later + 5 * NS_PER_S) == 15


def test_tokens_above_a_strict_keys_whole_limit_are_refused_naming_that_limit() -> None:
    """A region's share (here 10 of 30) grows toward demand up to the whole limit: an
    ask between the two is a denial, and one above the whole limit is a bad request
    whose message names the whole limit (it named the share)."""
    limiter = three_regions(capacity=30)["a"]
    denied = limiter.acquire("k-1", 20)
    assert not denied.allowed and denied.capacity == 10
    for ask in (limiter.acquire, lambda key, tokens: limiter.acquire_many([Ask(key, tokens)])):
        with pytest.raises(InvalidTokens, match="the capacity 30, got 31") as refused:
            ask("k-1", 31)
        assert refused.value.capacity == 30
    with pytest.raises(InvalidTokens, match="the capacity 30, got -1"):
        limiter.acquire("k-2", -1)
    with pytest.raises(InvalidTokens, match="the capacity 30, got 31"):
        limiter.acquire("k-3", 31)  # a key without a bucket yet
