"""The Limiter's own behaviour: bucket lifecycle, the cap, validation, snapshots."""

from __future__ import annotations

import pytest

from bucketmesh import BucketCapReached, InvalidTokens, Limiter, NoRuleError, Rule, load_limiter
from bucketmesh.core.bucket import Bucket, BucketConfig
from bucketmesh.core.limits import LimitError
from bucketmesh.tooling.demo import demonstrate

S = 1_000_000_000
T0 = 1_700_000_000 * S


def rules(ttl: float = 3600.0) -> list[Rule]:
    return [
        Rule.create("api-{{ .Request.Header.X-API-Key }}", 10, 1.0, ttl=ttl),
        Rule.create("ip-{{ .Request.ClientIP }}", 100, 10.0, name="per-ip", mode="local"),
    ]


def test_peek_at_unknown_key_creates_no_bucket() -> None:
    limiter = Limiter(rules(), replica_id="a")
    decision = limiter.peek("api-k", now=T0)
    assert (decision.allowed, decision.tokens_remaining, decision.capacity) == (True, 10, 10)
    assert len(limiter) == 0


def test_key_without_rule_is_refused_with_a_clear_error() -> None:
    limiter = Limiter(rules(), replica_id="a")
    with pytest.raises(NoRuleError, match="no rule matches key 'zzz'"):
        limiter.acquire("zzz", now=T0)
    assert limiter.acquire("zzz", rule="per-ip", now=T0).capacity == 100


@pytest.mark.parametrize("tokens", [-1, 11])
def test_tokens_outside_zero_to_capacity_are_invalid(tokens: int) -> None:
    limiter = Limiter(rules(), replica_id="a")
    limiter.acquire("api-k", now=T0)
    for key in ("api-k", "api-new"):
        with pytest.raises(InvalidTokens) as caught:
            limiter.acquire(key, tokens, now=T0)
        assert caught.value.capacity == 10
    assert limiter.bucket("api-k").total == 1  # type: ignore[union-attr]


def test_a_long_full_bucket_still_holds_only_its_capacity() -> None:
    config = BucketConfig(10, S, 3600 * S, "shared", (0, "r"))
    bucket = Bucket(config, T0, "r")
    decision = bucket.acquire("k", 11, T0 + 10_000 * S)
    assert not decision.allowed and decision.tokens_remaining == 10
    assert bucket.total == 0


def test_denied_request_and_peek_do_not_mark_the_bucket_dirty() -> None:
    limiter = Limiter(rules(), replica_id="a")
    for _ in range(10):
        assert limiter.acquire("api-k", now=T0).allowed
    limiter.collect_deltas()
    assert not limiter.acquire("api-k", now=T0).allowed
    limiter.peek("api-k", now=T0)
    assert limiter.collect_deltas().deltas == []


def test_collect_deltas_with_a_limit_takes_a_slice_and_leaves_the_rest_dirty() -> None:
    """A collector takes a large dirty set a slice at a time: each key's delta once, the
    same deltas as one whole collect, and the changed rule configs with the first slice."""
    limiter = Limiter(rules(), replica_id="a")
    whole = Limiter(rules(), replica_id="a")
    for n in range(10):
        limiter.acquire(f"api-{n}", now=T0)
        whole.acquire(f"api-{n}", now=T0)
    name = limiter.rules[0].name
    limiter.configure(name, capacity=20, now=T0 + 1)
    whole.configure(name, capacity=20, now=T0 + 1)
    slices = [limiter.collect_deltas(4) for _ in range(4)]
    assert [len(s.deltas) for s in slices] == [4, 4, 2, 0]
    assert [sorted(s.rules) for s in slices] == [[name], [], [], []]
    taken = [d for s in slices for d in s.deltas]
    assert sorted((d.key, d.config, d.used) for d in taken) == sorted(
        (d.key, d.config, d.used) for d in whole.collect_deltas().deltas
    )
    # a key changed again after its slice was taken is dirty again, once
    limiter.acquire("api-3", now=T0 + 2)
    assert [d.key for d in limiter.collect_deltas(4).deltas] == ["api-3"]
    assert limiter.collect_deltas(None).deltas == []


def test_local_mode_never_produces_deltas() -> None:
    limiter = Limiter(rules(), replica_id="a")
    limiter.acquire("ip-1.2.3.4", now=T0)
    assert limiter.collect_deltas().deltas == []
    assert limiter.full_state().deltas == []


def test_cap_refuses_new_keys_but_serves_existing_ones() -> None:
    limiter = Limiter(rules(), replica_id="a", max_buckets=2)
    limiter.acquire("api-1", now=T0)
    limiter.acquire("api-2", now=T0)
    with pytest.raises(BucketCapReached):
        limiter.acquire("api-3", now=T0)
    assert limiter.acquire("api-1", now=T0).allowed
    assert limiter.cap_rejections == 1


def test_cap_reclaims_expired_buckets_first() -> None:
    limiter = Limiter(rules(ttl=5), replica_id="a", max_buckets=2)
    limiter.acquire("api-1", now=T0)
    limiter.acquire("api-2", now=T0)
    # full again after 1 s, expired 5 s after that
    assert limiter.acquire("api-3", now=T0 + 7 * S).allowed
    assert sorted(limiter.buckets) == ["api-3"]
    assert limiter.expired_total == 2


def test_incremental_sweep_drops_only_expired_buckets() -> None:
    limiter = Limiter(rules(ttl=5), replica_id="a")
    for i in range(50):
        limiter.acquire(f"api-{i}", 10 if i % 2 else 1, now=T0)
    dropped = sum(limiter.expire_step(now=T0 + 7 * S, budget=7) for _ in range(8))
    assert dropped == 25  # one token refills in 1 s; ten take 10 s
    assert all(int(k.split("-")[1]) % 2 for k in limiter.buckets)


def test_recreated_bucket_starts_a_new_epoch_and_ignores_its_old_life() -> None:
    a = Limiter(rules(ttl=5), replica_id="a")
    b = Limiter(rules(ttl=5), replica_id="b")
    a.acquire("api-k", 10, now=T0)
    stale = a.full_state()
    a.expire(now=T0 + 20 * S)
    assert len(a) == 0
    a.acquire("api-k", 3, now=T0 + 20 * S)
    b.merge(stale, now=T0 + 20 * S)
    b.merge(a.full_state(), now=T0 + 20 * S)
    a.merge(stale, now=T0 + 20 * S)  # a stale copy of the old life changes nothing
    for replica in (a, b):
        assert replica.peek("api-k", now=T0 + 20 * S).tokens_remaining == 7


def test_configure_rule_applies_to_existing_and_future_keys() -> None:
    limiter = Limiter(rules(), replica_id="a")
    for _ in range(4):
        limiter.acquire("api-old", now=T0)
    config = limiter.configure("api", capacity=20, refill_rate=2.0, now=T0)
    assert config.version[1] == "a" and config.version[0] >= T0
    old = limiter.peek("api-old", now=T0)
    assert (old.capacity, old.tokens_remaining, old.refill_rate) == (20, 6, 2.0)
    assert limiter.peek("api-new", now=T0).tokens_remaining == 20


def spent_limiter(defer: int | None) -> tuple[Limiter, list[int]]:
    """A limiter with 7 keys of rule ``api`` spent to different levels (and one key
    of the other rule), deferring rule changes above ``defer`` live buckets."""
    limiter = Limiter(rules(), replica_id="a")
    limiter.defer_adoption_above = defer
    calls: list[int] = []
    limiter.on_adoption = lambda: calls.append(limiter.adoption_pending())
    for n in range(7):
        limiter.acquire(f"api-{n}", n % 4 + 1, now=T0)
    limiter.acquire("ip-1", now=T0)
    return limiter, calls


def test_a_deferred_rule_change_moves_the_buckets_in_slices_as_at_once() -> None:
    """Above ``defer_adoption_above`` live buckets a rule change only queues its keys
    (a serving node adopts them a slice per turn of its loop): each bucket ends where
    adopting it at once at the same instant would put it."""
    eager, _ = spent_limiter(None)
    deferred, calls = spent_limiter(3)
    for limiter in (eager, deferred):
        limiter.configure("api", capacity=30, refill_rate=3.0, now=T0 + S)
    assert calls == [8] and not eager.adoption_pending()
    # not moved yet: they decide on the previous limits, as a region the change has
    # not reached yet does; a new key takes the new ones
    assert deferred.peek("api-0", now=T0 + S).capacity == 10
    assert deferred.peek("api-new", now=T0 + S).capacity == 30
    slices = 0
    while not deferred.adopt_pending(2, now=T0 + S):
        slices += 1
    assert slices == 3  # 8 keys, 2 a slice: the last slice empties the queue
    for n in range(7):
        key = f"api-{n}"
        assert deferred.peek(key, now=T0 + 2 * S) == eager.peek(key, now=T0 + 2 * S)
        assert deferred.buckets[key].full_state(key, "a") == eager.buckets[key].full_state(key, "a")
    assert deferred.peek("ip-1", now=T0 + S).capacity == 100  # another rule: untouched
    assert {f"api-{n}" for n in range(7)} <= deferred.dirty  # replicated as they move


def test_a_newer_change_while_one_is_deferred_ends_on_the_newest() -> None:
    limiter, _ = spent_limiter(0)
    limiter.configure("api", capacity=30, now=T0 + S)
    limiter.adopt_pending(3, now=T0 + S)
    newest = limiter.configure("api", capacity=40, refill_rate=4.0, now=T0 + 2 * S)
    while not limiter.adopt_pending(1, now=T0 + 2 * S):
        pass
    assert all(limiter.buckets[f"api-{n}"].config == newest for n in range(7))
    # a change the limiter adopts at once (below the threshold) drops the queue
    limiter.defer_adoption_above = None
    limiter.configure("api", capacity=35, refill_rate=4.0, now=T0 + 3 * S)
    assert not limiter.adoption_pending()


def test_a_bucket_moved_by_a_later_slice_keeps_its_level_at_that_instant() -> None:
    """A slice moves a bucket when it reaches it: the level it keeps is the one at
    that instant under the previous limits, as where the change arrives late."""
    late, _ = spent_limiter(0)
    late.configure("api", capacity=30, refill_rate=3.0, now=T0 + S)
    late.acquire("api-3", 2, now=T0 + 2 * S)  # not moved yet: the previous limits
    assert late.buckets["api-3"].config.capacity == 10
    while not late.adopt_pending(2, now=T0 + 3 * S):
        pass
    reference, _ = spent_limiter(None)
    reference.acquire("api-3", 2, now=T0 + 2 * S)
    reference.configure("api", capacity=30, refill_rate=3.0, now=T0 + 3 * S)
    for n in range(7):
        key = f"api-{n}"
        assert (
            late.peek(key, now=T0 + 4 * S).tokens_remaining
            == reference.peek(key, now=T0 + 4 * S).tokens_remaining
        )


def test_a_key_patch_while_its_rule_change_is_deferred_builds_on_the_new_rule() -> None:
    """Found in review: a per-key PATCH of a bucket not moved yet copied the rule's
    previous limits into the key's own config, which then outranked the rule's."""
    limiter, _ = spent_limiter(0)
    limiter.configure("api", refill_rate=5.0, ttl=7.0, now=T0 + S)
    key_config = limiter.configure("api-1", capacity=20, now=T0 + S)
    assert (key_config.capacity, key_config.interval_ns, key_config.ttl_ns) == (
        20,
        200_000_000,
        7 * S,
    )


def test_changes_of_many_rules_during_a_pass_copy_the_keys_once_more_not_once_each() -> None:
    limiter = Limiter(
        [
            Rule.create(f"r{n}-{{{{ .Request.Header.X-K }}}}", 10, 1.0, name=f"r{n}")
            for n in range(5)
        ],
        replica_id="a",
    )
    limiter.defer_adoption_above = 0
    for n in range(5):
        limiter.acquire(f"r{n}-x", now=T0)
    for n in range(5):
        limiter.configure(f"r{n}", capacity=20, now=T0 + S)
    assert limiter.adoption_pending() == 5 + 5  # this pass, and one more for the rest
    while not limiter.adopt_pending(1, now=T0 + S):
        pass
    assert all(limiter.buckets[f"r{n}-x"].config.capacity == 20 for n in range(5))


def test_a_rule_change_to_or_from_strict_mode_is_never_deferred() -> None:
    limiter, calls = spent_limiter(0)
    limiter.configure("api", mode="strict", capacity=30, now=T0 + S)
    assert not calls and limiter.buckets["api-0"].config.mode == "strict"
    limiter.configure("api", mode="shared", now=T0 + 2 * S)
    assert not calls and limiter.buckets["api-0"].config.mode == "shared"


def test_a_rule_change_merged_from_a_peer_is_deferred_too() -> None:
    peer = Limiter(rules(), replica_id="b")
    peer.configure("api", capacity=50, now=T0 + S)
    limiter, calls = spent_limiter(0)
    limiter.merge(peer.collect_deltas(), now=T0 + S)
    assert calls == [8] and limiter.rule_configs["api"].capacity == 50
    assert limiter.buckets["api-0"].config.capacity == 10
    assert limiter.adopt_pending(100, now=T0 + S)
    assert all(limiter.buckets[f"api-{n}"].config.capacity == 50 for n in range(7))


def test_configure_lowering_capacity_clamps_the_level() -> None:
    limiter = Limiter(rules(), replica_id="a")
    limiter.acquire("api-k", 2, now=T0)
    limiter.configure("api-k", capacity=5, now=T0)
    assert limiter.peek("api-k", now=T0).tokens_remaining == 5
    assert limiter.peek("api-other", now=T0).capacity == 10  # only that key changed


def test_rule_config_change_reaches_a_replica_through_merge() -> None:
    a = Limiter(rules(), replica_id="a")
    b = Limiter(rules(), replica_id="b")
    b.acquire("api-k", now=T0)
    a.configure("api", capacity=50, now=T0)
    b.merge(a.collect_deltas(), now=T0 + 1)
    assert b.peek("api-k", now=T0 + 1).capacity == 50
    assert b.peek("api-fresh", now=T0 + 1).capacity == 50


def test_restore_under_new_incarnation_keeps_what_the_old_one_spent() -> None:
    old = Limiter(rules(), replica_id="r/n/1")
    for _ in range(10):
        old.acquire("api-k", now=T0)
    snapshot = old.snapshot()
    new = Limiter.restore(snapshot, rules(), replica_id="r/n/2")
    assert not new.acquire("api-k", now=T0).allowed
    assert new.bucket("api-k").used("r/n/2") == {"r/n/1": 10}  # type: ignore[union-attr]
    assert new.acquire("api-k", now=T0 + S).allowed


def test_restore_keeps_runtime_rule_config() -> None:
    limiter = Limiter(rules(), replica_id="a")
    limiter.configure("api", capacity=42, now=T0)
    restored = Limiter.restore(limiter.snapshot(), rules(), replica_id="a2")
    assert restored.peek("api-x", now=T0).capacity == 42


def test_strict_mode_gives_each_region_an_equal_share() -> None:
    rule = Rule.create("s-{{ .Request.ClientIP }}", 90, 9.0, name="s", mode="strict")
    limiter = Limiter([rule], replica_id="a", regions=3)
    decision = limiter.peek("s-1", now=T0)
    assert decision.capacity == 30
    # three shares refill exactly as fast as the rule's integer emission interval
    assert limiter.bucket("s-1") is None
    full = Limiter([rule], replica_id="b").peek("s-1", now=T0)
    assert decision.refill_rate * 3 == pytest.approx(full.refill_rate, rel=1e-15)
    with pytest.raises(ValueError, match="strict mode needs capacity >= regions"):
        Limiter(
            [Rule.create("t-{{ .Request.ClientIP }}", 2, 1.0, mode="strict")],
            replica_id="a",
            regions=3,
        )
    # a PATCH to a strict capacity below one token per region, or to strict mode with
    # one, is refused naming capacity (400), and the rule keeps its limits
    for change in ({"capacity": 2, "refill_rate": 1.0}, {"mode": "strict"}):
        shared = Rule.create("u-{{ .Request.ClientIP }}", 2, 1.0, name="u")
        patched = Limiter([rule, shared], replica_id="a", regions=3)
        name = "u" if "mode" in change else "s"
        before = patched.rule_configs[name]
        with pytest.raises(LimitError) as raised:
            patched.configure(name, now=T0, **change)  # type: ignore[arg-type]
        assert raised.value.field == "capacity"
        assert patched.rule_configs[name] == before


def test_load_limiter_loads_the_example(tmp_path: object) -> None:
    limiter = load_limiter("src/bucketmesh/examples/bucketmesh.yaml", replica_id="us-east-1/a/1")
    assert [r.name for r in limiter.rules] == ["agent-api-key", "small", "per-ip"]
    assert limiter.acquire("agent-api-key-k1").capacity == 5000


def test_demo_shows_three_regions_converging() -> None:
    lines: list[str] = []
    levels = demonstrate(lines.append)
    assert levels == [4760, 4760, 4760]
    assert "identical" in lines[-1]


def test_a_key_qualified_with_its_rule_resolves_to_that_rule_without_naming_it() -> None:
    """A key another rule's template also claims carries ``%@<rule>``; reading or
    configuring it needs no ``rule=`` (before, rule_for picked the claiming rule)."""
    from bucketmesh.core.rules import QUALIFIER

    wide = Rule.create("k-{{ .Request.Header.X }}", 10, 1.0, name="wide")
    narrow = Rule.create("k-{{ .Request.Header.X }}-{{ .Request.Header.Y }}", 3, 1.0, name="nar")
    limiter = Limiter([wide, narrow], replica_id="r/n/1")
    qualified = "k-a-b" + QUALIFIER + "nar"
    assert limiter.rule_for("k-a-b").name == "wide"
    assert limiter.rule_for(qualified).name == "nar"
    assert limiter.inspect(qualified).config.capacity == 3
    assert limiter.configure(qualified, capacity=5).capacity == 5
    assert limiter.acquire(qualified, 3).allowed  # raising capacity never refills for free
    assert limiter.bucket(qualified) is not None and limiter.bucket("k-a-b") is None


def test_an_evicted_tombstone_never_hides_grants_and_replicas_converge() -> None:
    """Issue 23 item 4: with limits.maxBuckets 2000 the tombstone cap (1000) is exhausted
    within seconds by 1,100 short-lived keys. The generation a peer sends back must
    still restore this region's whole count (13), not the peer's older echo (3), so the
    grants made after it reach the peer and both converge."""
    NS = 1_000_000_000
    rule = Rule.create("api-{{ .Request.Header.X-API-Key }}", 20, 1.0, ttl=2.0)
    a = Limiter([rule], replica_id="a/n/1", max_buckets=2000)
    b = Limiter([rule], replica_id="b/n/1", max_buckets=2000)
    now = 1_000 * NS + 123
    for _ in range(3):
        assert a.acquire("api-k", now=now).allowed
    b.merge(a.collect_deltas(), now=now)  # b knows a:3; then the partition begins
    for _ in range(10):
        assert a.acquire("api-k", now=now).allowed
    assert b.acquire("api-k", now=now).allowed
    later = now + 30 * NS  # k is full again on a, and expires there
    a.expire(later)
    assert "api-k" not in a.buckets and "api-k" in a.tombstones
    for i in range(1_100):  # short-lived keys exhaust the tombstone cap
        assert a.acquire(f"api-{i}", now=later).allowed
    a.expire(later + 30 * NS)
    assert "api-k" not in a.tombstones  # evicted within seconds, before its horizon
    # the partition heals: b sends its copy of k's generation (it still holds a:3)
    heal = later + 31 * NS
    b.buckets["api-k"].acquire("api-k", 1, heal - NS)  # b kept k busy
    a.merge(b.full_state(["api-k"]), now=heal)
    bucket = a.bucket("api-k")
    assert bucket is not None and bucket.mine >= 13  # not the echo's 3
    assert a.acquire("api-k", now=heal).allowed
    b.merge(a.collect_deltas(), now=heal)
    a.merge(b.full_state(["api-k"]), now=heal)
    b.merge(a.full_state(["api-k"]), now=heal)
    assert a.buckets["api-k"].used("a/n/1") == b.buckets["api-k"].used("b/n/1")
    assert b.buckets["api-k"].used("b/n/1")["a/n/1"] >= 14
