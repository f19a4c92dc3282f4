"""Retiring old incarnations (issue 16 item 2): the fold in the core, and the
simulator's ``retire`` schedules that check it (never a re-grant, never a double
count) and catch a planner without its safety conditions."""

from __future__ import annotations

import msgspec
import pytest

from bucketmesh.core.bucket import Bucket, BucketDelta, plan_folds
from bucketmesh.core.limiter import DeltaBatch, Limiter
from bucketmesh.core.rules import Rule
from bucketmesh.replication import protocol
from bucketmesh.tooling.sim import InvariantViolation, retire_run, run

S = 1_000_000_000
RULE = Rule.create("k-{{ .Request.Header.X-Key }}", 10, 5.0, name="k")
KEY = "k-x"


def restarted_mesh(restarts: int) -> tuple[list[Limiter], int]:
    """Region a restarted ``restarts`` times (from its snapshot) while a and b grant."""
    now = 1000 * S
    a = Limiter([RULE], replica_id="a/n/1")
    b = Limiter([RULE], replica_id="b/n/1")
    for number in range(2, restarts + 2):
        a.acquire(KEY, 1, rule="k", now=now)
        b.acquire(KEY, 1, rule="k", now=now + 1)
        exchange([a, b], now)
        a = Limiter.restore(a.snapshot(), [RULE], replica_id=f"a/n/{number}")
        now += S // 3
    a.acquire(KEY, 1, rule="k", now=now)
    exchange([a, b], now)
    return [a, b], now


def exchange(limiters: list[Limiter], now: int) -> None:
    states = [limiter.full_state() for limiter in limiters]
    for limiter in limiters:
        for state in states:
            limiter.merge(state, now=now)


def views(limiters: list[Limiter]) -> list[BucketDelta | None]:
    return [limiter.full_state([KEY]).deltas[0] for limiter in limiters]


def fold_push(limiters: list[Limiter]) -> BucketDelta:
    """What reconcile pushes: a region's full state with the planned folds."""
    state = views(limiters)[1]
    assert state is not None
    state.folds = plan_folds(views(limiters), [lim.replica_id for lim in limiters])
    return state


def test_a_fold_keeps_every_count_once_and_the_level() -> None:
    limiters, now = restarted_mesh(10)
    a = limiters[0]
    assert len(a.buckets[KEY].used(a.replica_id)) == 12  # 11 incarnations of a, and b
    before = [(lim.buckets[KEY].tat(), lim.buckets[KEY].total) for lim in limiters]
    push = fold_push(limiters)
    assert push.folds == {"a/n": (11, 10)}
    for limiter in limiters:
        limiter.merge(DeltaBatch("@reconcile/t/1", [push]), now=now)
    for limiter, (tat, total) in zip(limiters, before, strict=True):
        bucket = limiter.buckets[KEY]
        assert sorted(bucket.used(limiter.replica_id)) == ["a/n/11", "b/n/1"]
        assert (bucket.tat(), bucket.total) == (tat, total)
        assert bucket.level(now) == limiters[0].buckets[KEY].level(now)


def test_a_late_message_of_a_folded_incarnation_changes_nothing() -> None:
    limiters, now = restarted_mesh(3)
    stale = views(limiters)
    push = fold_push(limiters)
    for limiter in limiters:
        limiter.merge(DeltaBatch("@reconcile/t/1", [push]), now=now)
    states = [msgspec.msgpack.encode(lim.full_state()) for lim in limiters]
    for limiter in limiters:
        for old in stale:
            assert old is not None
            assert limiter.merge(DeltaBatch("a/n/1", [old]), now=now) == 0
        limiter.merge(DeltaBatch("@reconcile/t/1", [push]), now=now)  # duplicated
    assert [msgspec.msgpack.encode(lim.full_state()) for lim in limiters] == states


def test_folds_join_in_any_order_and_survive_a_snapshot() -> None:
    limiters, now = restarted_mesh(4)
    push = fold_push(limiters)
    a, b = limiters
    b.merge(DeltaBatch("@reconcile/t/1", [push]), now=now)
    # b's folded state reaches a by anti-entropy; a snapshot keeps the fold
    a.merge(b.full_state(), now=now)
    again = Limiter.restore(a.snapshot(), [RULE], replica_id="a/n/99")
    for limiter in (a, b, again):
        bucket = limiter.buckets[KEY]
        assert bucket.folds == {"a/n": (5, 4)}
    assert again.buckets[KEY].tat() == a.buckets[KEY].tat()
    assert protocol.canonical(b.full_state([KEY]).deltas[0]) == protocol.canonical(
        a.full_state([KEY]).deltas[0]
    )


def test_a_fold_is_logged_whole_in_the_write_ahead_log() -> None:
    limiters, now = restarted_mesh(2)
    a = limiters[0]
    a.enable_journal()
    a.merge(DeltaBatch("@reconcile/t/1", [fold_push(limiters)]), now=now)
    group = a.collect_journal()
    assert group is not None
    fresh = Limiter([RULE], replica_id="a/n/7")
    group = msgspec.msgpack.decode(msgspec.msgpack.encode(group), type=DeltaBatch)
    fresh.replay(group, now=now)
    assert fresh.buckets[KEY].folds == a.buckets[KEY].folds
    assert fresh.buckets[KEY].total == a.buckets[KEY].total


def test_nothing_is_folded_unless_every_region_holds_the_same_final_entry() -> None:
    limiters, _ = restarted_mesh(2)
    held = views(limiters)
    assert held[0] is not None and held[1] is not None
    held[1].used["a/n/1"] -= 1  # b has not heard a/n/1's last grant
    assert plan_folds(held, ["a/n/3", "b/n/1"]) == {}
    assert plan_folds([held[0], None], ["a/n/3", "b/n/1"]) == {}
    # never the running incarnation, whatever the views say
    assert plan_folds(views(limiters), ["a/n/3"]) == {"a/n": (3, 2)}


def test_a_fold_never_covers_the_replica_holding_it() -> None:
    limiters, now = restarted_mesh(2)
    a = limiters[0]
    push = fold_push(limiters)
    push.folds = {"a/n": (99, 1000)}
    before = a.buckets[KEY].total
    a.merge(DeltaBatch("@reconcile/t/1", [push]), now=now)
    assert a.buckets[KEY].folds is None
    assert a.buckets[KEY].total == before


def test_an_old_reader_ignores_the_fold_field() -> None:
    class OldDelta(msgspec.Struct, array_like=True):
        key: str
        epoch: int

    limiters, _ = restarted_mesh(2)
    push = fold_push(limiters)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(push), type=OldDelta)
    assert decoded.key == KEY


def test_retire_schedules_never_regrant_never_double_count() -> None:
    folded = 0
    for seed in range(40):
        sim = retire_run(seed)
        folded += sim.entries_folded
    assert folded > 100  # the schedules do fold, many times


def test_retire_is_a_kind_of_the_command() -> None:
    result = run(3, kind="retire")
    assert result.restarts > 0


@pytest.mark.parametrize("mutant", ["unfinal", "young"])
def test_the_simulator_catches_a_planner_without_its_safety_conditions(mutant: str) -> None:
    with pytest.raises(InvariantViolation, match="never a re-grant"):
        for seed in range(40):
            retire_run(seed, mutant=mutant)


def test_a_region_behind_on_a_folded_entry_charges_what_it_had_not_heard() -> None:
    now = 1000 * S
    a = Limiter([RULE], replica_id="a/n/1")
    b = Limiter([RULE], replica_id="b/n/1")
    a.acquire(KEY, 1, rule="k", now=now)
    b.merge(a.collect_deltas(), now=now)  # b hears a/n/1's first grant only
    for step in range(1, 6):
        a.acquire(KEY, 1, rule="k", now=now + step * S // 4)
    a = Limiter.restore(a.snapshot(), [RULE], replica_id="a/n/2")
    view = a.full_state([KEY]).deltas[0]
    plan = plan_folds([view], ["a/n/2"])
    assert plan == {"a/n": (2, 6)}
    # what reconcile pushes: the join (here a's view) with the fold applied, re-based
    join = Bucket.from_delta(view, "@reconcile/view/0")
    join.fold(plan, "@reconcile/view/0")
    push = join.full_state(KEY, "@reconcile/view/0")
    assert "a/n/1" not in push.used and push.folds == plan
    heard = Limiter.restore(b.snapshot(), [RULE])
    heard.merge(a.full_state(), now=now + 2 * S)  # b had it heard everything instead
    b.merge(DeltaBatch("@reconcile/t/1", [push]), now=now + 2 * S)
    assert b.buckets[KEY].total == heard.buckets[KEY].total == 6
    assert b.buckets[KEY].tat() >= heard.buckets[KEY].tat()


def test_a_replica_left_alone_by_a_fold_decides_as_its_state_says() -> None:
    now = 1000 * S
    a = Limiter([RULE], replica_id="a/n/1")
    for step in range(4):
        a.acquire(KEY, 1, rule="k", now=now + step * S)
    a = Limiter.restore(a.snapshot(), [RULE], replica_id="a/n/2")
    a.acquire(KEY, 1, rule="k", now=now + 10 * S)
    state = a.full_state([KEY]).deltas[0]
    state.folds = plan_folds([state], ["a/n/2"])
    a.merge(DeltaBatch("@reconcile/t/1", [state]), now=now + 10 * S)
    bucket = a.buckets[KEY]
    assert bucket.entries is None and bucket.folds == {"a/n": (2, 4)}
    # the folded tokens lie before a/n/2's records: one grant on a full bucket
    assert bucket.level(now + 10 * S) == RULE.capacity - 1
    again = Limiter.restore(a.snapshot(), [RULE])
    assert again.buckets[KEY].tat() == bucket.tat()
