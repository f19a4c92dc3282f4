"""The replicated bucket is a join-semilattice (docs/design.md sections 2 and 8).

Bucket states are grown the way replicas grow them: random sequences of local
acquires, config changes (fresh HLC versions), merges of deltas and of full
states between three replicas, and re-creation in a later epoch. On the
states so reached, merge must be commutative, associative, idempotent and
inflationary; a delta must carry a local mutation exactly; the wire structs
must survive msgpack and JSON; two replicas holding the same state must give
the same answers; and at the Limiter level, the order and repetition of the
batches a replica merges must not matter. States are compared "replica
neutrally": through a replica that holds no entry of its own, with zero
entries of ``used`` dropped.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import msgspec
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bucketmesh.core.bucket import (
    NS_PER_S,
    SHARED,
    Bucket,
    BucketConfig,
    BucketDelta,
    delta_tat,
    slice_ns,
)
from bucketmesh.core.limiter import DeltaBatch, InvalidTokens, Limiter, Snapshot
from bucketmesh.core.rules import Rule

KEY = "k"
NEUTRAL = "~neutral"
REPLICAS = ("a/n/1", "b/n/1", "c/n/1")
START = 1_000 * NS_PER_S
TTL_NS = 3_600 * NS_PER_S

Neutral = tuple[Any, ...]


def neutral(delta: BucketDelta) -> Neutral:
    used = tuple(sorted((rid, n) for rid, n in delta.used.items() if n))
    anchors = tuple(sorted(delta.anchors.items()))
    marks = tuple(sorted((rid, tuple(m)) for rid, m in delta.marks.items() if m))
    return (
        delta.epoch,
        delta.config,
        delta.base_version,
        delta.base_time,
        delta.base_used,
        used,
        anchors,
        marks,
        delta.rule,
    )


def join(x: BucketDelta, y: BucketDelta) -> BucketDelta:
    bucket = Bucket.from_delta(x, NEUTRAL)
    bucket.merge(y, NEUTRAL)
    return bucket.full_state(KEY, NEUTRAL)


def at_least(bigger: BucketDelta, smaller: BucketDelta) -> bool:
    """``bigger`` is above ``smaller`` in the lattice order."""
    if bigger.epoch != smaller.epoch:
        return bigger.epoch > smaller.epoch
    return (
        all(bigger.used.get(rid, 0) >= n for rid, n in smaller.used.items())
        and base_key(bigger) >= base_key(smaller)
        and bigger.config.version >= smaller.config.version
        and all(
            rid in bigger.anchors and bigger.anchors[rid][0] >= anchor[0]
            for rid, anchor in smaller.anchors.items()
        )
    )


def base_key(delta: BucketDelta) -> tuple[Any, ...]:
    """The base's place in its max-register: (version, time − used·T, time)."""
    g = delta.base_time - delta.base_used * delta.config.interval_ns
    return (delta.base_version, g, delta.base_time)


# -- growing states ------------------------------------------------------------------

replica = st.integers(0, len(REPLICAS) - 1)
intervals = st.one_of(st.integers(1, 50), st.integers(10**6, 10**9))
op = st.one_of(
    st.tuples(st.just("acquire"), replica, st.integers(1, 4), st.integers(0, 3 * 10**9)),
    st.tuples(st.just("acquire"), replica, st.integers(1, 4), st.integers(0, 5)),
    st.tuples(st.just("configure"), replica, st.integers(1, 12), intervals),
    st.tuples(st.just("merge_full"), replica, replica, st.just(0)),
    st.tuples(st.just("merge_delta"), replica, replica, st.just(0)),
    st.tuples(st.just("recreate"), replica, st.just(0), st.just(0)),
)
ops = st.lists(op, max_size=40)
# ... and ops aimed at the edges of a state: the delta of a peer that spent nothing (its
# base alone, counting spending this replica may not have heard of), and a grant at
# the replica's TAT or base, a few ns either side (never back in time)
edge_ops = st.lists(
    st.one_of(
        op,
        st.tuples(st.just("merge_base"), replica, replica, st.just(0)),
        st.tuples(st.just("acquire_at_tat"), replica, st.integers(1, 4), st.integers(-2, 2)),
        st.tuples(st.just("acquire_at_base"), replica, st.integers(1, 4), st.integers(-2, 2)),
    ),
    max_size=40,
)


@dataclass
class World:
    """Three replicas of one bucket, one shared true clock (skew does not matter here)."""

    now: int = START
    hlc: int = 0
    buckets: list[Bucket] = field(default_factory=list)
    seen: list[BucketDelta] = field(default_factory=list)

    def state(self, index: int) -> BucketDelta:
        return self.buckets[index].full_state(KEY, REPLICAS[index])

    def apply(self, op: tuple[str, int, int, int]) -> None:
        kind, r, x, y = op
        bucket = self.buckets[r]
        if kind == "acquire":
            self.now += y
            if x <= bucket.config.capacity:
                bucket.acquire(KEY, x, self.now)
        elif kind == "configure":
            self.hlc += 1
            config = BucketConfig(x, y, TTL_NS, SHARED, (self.hlc, REPLICAS[r]))
            bucket.reconfigure(config, self.now)
        elif kind == "merge_full":
            bucket.merge(self.state(x), REPLICAS[r])
        elif kind == "merge_delta":
            bucket.merge(self.buckets[x].delta(KEY, REPLICAS[x]), REPLICAS[r])
        elif kind == "merge_base":
            delta = self.buckets[x].delta(KEY, REPLICAS[x])
            empty: dict[str, Any] = {}
            bucket.merge(
                msgspec.structs.replace(
                    delta,
                    used={REPLICAS[x]: 0},
                    anchor_at=empty,
                    anchor_used=empty,
                    anchor_begun=empty,
                    marks=empty,
                ),
                REPLICAS[r],
            )
        elif kind.startswith("acquire_at"):
            point = bucket.tat() if kind == "acquire_at_tat" else bucket.base_time
            self.now = max(self.now, point + y)
            if x <= bucket.config.capacity:
                bucket.acquire(KEY, x, self.now)
        else:  # dropped after its ttl, re-created in a later epoch
            self.now += TTL_NS
            self.buckets[r] = Bucket(bucket.config, self.now, bucket.rule)
        self.seen.append(self.state(r))


def grow(program: list[tuple[str, int, int, int]]) -> World:
    config = BucketConfig(5, 200_000_000, TTL_NS, SHARED, (0, "rule:r:0"))
    world = World()
    world.buckets = [Bucket(config, START, "r") for _ in REPLICAS]
    world.seen = [world.state(i) for i in range(len(REPLICAS))]
    for op in program:
        world.apply(op)
    return world


def three_states(world: World, data: st.DataObject) -> tuple[BucketDelta, ...]:
    pick = st.sampled_from(world.seen)
    return (data.draw(pick), data.draw(pick), data.draw(pick))


# -- the lattice laws ----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(program=ops, data=st.data())
def test_merge_is_commutative_associative_idempotent(
    program: list[tuple[str, int, int, int]], data: st.DataObject
) -> None:
    x, y, z = three_states(grow(program), data)
    assert neutral(join(x, y)) == neutral(join(y, x))
    assert neutral(join(join(x, y), z)) == neutral(join(x, join(y, z)))
    assert neutral(join(x, x)) == neutral(x)
    assert neutral(join(join(x, y), y)) == neutral(join(x, y))


@settings(max_examples=300, deadline=None)
@given(program=ops, data=st.data())
def test_merge_is_inflationary(
    program: list[tuple[str, int, int, int]], data: st.DataObject
) -> None:
    x, y, _ = three_states(grow(program), data)
    merged = join(x, y)
    assert at_least(merged, x)
    assert at_least(merged, y)


@settings(max_examples=300, deadline=None)
@given(program=ops, data=st.data())
def test_a_replica_never_moves_down_the_lattice(
    program: list[tuple[str, int, int, int]], data: st.DataObject
) -> None:
    """Every op (acquire, configure, merge, re-create) only ever inflates a replica."""
    world = grow([])
    for op in program:
        before = world.state(op[1])
        world.apply(op)
        assert at_least(world.state(op[1]), before)


local_mutations = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(1, 4), st.integers(0, 3 * 10**9)),
        st.tuples(st.just("configure"), st.integers(1, 12), intervals),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(program=ops, owner=replica, mutations=local_mutations)
def test_state_joined_with_its_delta_is_the_mutated_state(
    program: list[tuple[str, int, int, int]],
    owner: int,
    mutations: list[tuple[str, int, int]],
) -> None:
    """s ⊔ delta(s') == s' when s' is s mutated by its owner (acquires, config changes)."""
    world = grow(program)
    before = world.state(owner)
    for kind, x, y in mutations:
        world.apply((kind, owner, x, y))
    after = world.state(owner)
    delta = world.buckets[owner].delta(KEY, REPLICAS[owner])
    assert neutral(join(before, delta)) == neutral(after)
    # and a replica that already knew s' learns nothing from the delta again
    assert neutral(join(after, delta)) == neutral(after)


@settings(max_examples=200, deadline=None)
@given(
    program=ops,
    data=st.data(),
    offsets=st.lists(st.integers(-(10**10), 10**11), min_size=1, max_size=5),
    tokens=st.integers(0, 12),
)
def test_replicas_holding_the_same_state_answer_alike(
    program: list[tuple[str, int, int, int]],
    data: st.DataObject,
    offsets: list[int],
    tokens: int,
) -> None:
    world = grow(program)
    state = data.draw(st.sampled_from(world.seen))
    one, other = Bucket.from_delta(state, "p/n/1"), Bucket.from_delta(state, "q/n/1")
    for offset in offsets:
        t = world.now + offset
        assert one.level(t) == other.level(t)
        assert one.retry_after_ns(tokens, t) == other.retry_after_ns(tokens, t)
        assert one.reset_after_ns(t) == other.reset_after_ns(t)
        assert one.expired(t) == other.expired(t)
        assert one.acquire(KEY, 0, t) == other.acquire(KEY, 0, t)
    # two live replicas that exchanged full state hold the same state, bit for bit
    a, b = world.buckets[0], world.buckets[1]
    a.merge(world.state(1), REPLICAS[0])
    b.merge(world.state(0), REPLICAS[1])
    assert neutral(world.state(0)) == neutral(world.state(1))
    t = world.now + offsets[0]
    assert a.acquire(KEY, tokens, t) == b.acquire(KEY, tokens, t)


def cached(bucket: Bucket) -> tuple[int, int, int | None, int]:
    """What a bucket caches besides its state: its TAT's terms and its slice edge."""
    return bucket.tat(), bucket.g, bucket.unc, bucket.edge


# found by this test: a replica alone re-bases 1 ns before its anchor (its clock
# stepped back) — the shortcut for a re-base in the anchor's slice moved the anchor
# back a slice and dropped the later one's mark, leaving an edge the state no longer says
@example(
    program=[
        ("acquire", 0, 1, 0),
        ("acquire", 1, 2, 0),
        ("merge_full", 2, 1, 0),
        ("configure", 2, 1, 1_000_000),
        ("merge_delta", 0, 2, 0),
    ]
)
@settings(max_examples=1000, deadline=None)
@given(program=edge_ops)
def test_a_replica_caches_what_its_state_recomputes(
    program: list[tuple[str, int, int, int]],
) -> None:
    """After every op, a replica's cached TAT (``g``, ``unc``) and edge are those a copy
    decoded from its state computes (what a restart from its snapshot holds): the
    O(1) shortcuts of ``acquire`` are the sweep's result, never another formula. (A
    replica alone that re-based a grant before a base a peer's config change had set
    ahead of its TAT kept the grant's exact GCRA TAT, 1 ns or more above the sweep's,
    which ignores records before the base.)"""
    world = grow([])
    for op in program:
        world.apply(op)
        r = op[1]
        state = world.state(r)
        assert cached(world.buckets[r]) == cached(Bucket.from_delta(state, REPLICAS[r]))
        # and a grant at an edge of that state (its TAT, its base, its epoch, ±1 ns)
        bucket = world.buckets[r]
        for point in {bucket.tat(), bucket.base_time, bucket.epoch}:
            for at in (point - 1, point, point + 1):
                copy = Bucket.from_delta(state, REPLICAS[r])
                copy.acquire(KEY, 1, at)
                again = Bucket.from_delta(copy.full_state(KEY, REPLICAS[r]), REPLICAS[r])
                assert cached(copy) == cached(again)


def test_a_grant_alone_before_a_peers_base_counts_as_the_state_says() -> None:
    """c spends 3; b hears it and changes the config (base: full at t + 3T once 3 were
    spent); a, which spent nothing and heard of nobody's spending, learns b's base
    from b's own delta (b's entry is 0): a's TAT is the base's t, 3T before the base.
    A grant there 1 ns past the TAT re-bases a record the sweep ignores (it lies
    before the base); a caches what its state recomputes, so its snapshot restores
    the same TAT (before: ``acquire``'s shortcut for a replica alone kept the grant's
    exact GCRA TAT, t + 1 + T, against the restored copy's t + T)."""
    t, interval = START, 200_000_000
    config = BucketConfig(5, interval, TTL_NS, SHARED, (0, "rule:r:0"))
    a, b, c = (Bucket(config, t, "r") for _ in REPLICAS)
    for _ in range(3):
        assert c.acquire(KEY, 1, t).allowed
    b.merge(c.full_state(KEY, REPLICAS[2]), REPLICAS[1])
    b.reconfigure(BucketConfig(5, interval, TTL_NS, SHARED, (1, REPLICAS[1])), t)
    a.merge(b.delta(KEY, REPLICAS[1]), REPLICAS[0])
    assert a.entries is None and a.total == 0 and a.base_time == t + 3 * interval
    assert a.tat() == t
    assert a.acquire(KEY, 1, t + 1).allowed
    restored = Bucket.from_delta(a.full_state(KEY, REPLICAS[0]), REPLICAS[0])
    assert a.tat() == restored.tat() == t + interval
    # once a hears c's spending, the grant is charged after the base
    a.merge(c.delta(KEY, REPLICAS[2]), REPLICAS[0])
    assert a.tat() == t + 4 * interval


# -- the wire ------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(program=ops)
def test_wire_structs_round_trip_through_msgpack_and_json(
    program: list[tuple[str, int, int, int]],
) -> None:
    world = grow(program)
    batch = DeltaBatch(REPLICAS[0], world.seen, {"r": world.seen[-1].config})
    for encode, decode in (
        (msgspec.msgpack.encode, msgspec.msgpack.decode),
        (msgspec.json.encode, msgspec.json.decode),
    ):
        for delta in world.seen:
            assert decode(encode(delta), type=BucketDelta) == delta
        assert decode(encode(batch), type=DeltaBatch) == batch


# -- the Limiter: order and repetition of batches ------------------------------------

RULES = [
    Rule.create("x-{{ .Request.Header.X-Key }}", 6, 4.0, name="x"),
    Rule.create("y-{{ .Request.Header.X-Key }}", 3, 0.5, name="y"),
]
LIMITER_KEYS = ("x-1", "x-2", "y-1")

limiter_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("acquire"),
            replica,
            st.sampled_from(LIMITER_KEYS),
            st.integers(1, 3),
            st.integers(0, 2 * 10**9),
        ),
        st.tuples(
            st.just("configure"),
            replica,
            st.sampled_from(LIMITER_KEYS),
            st.integers(1, 9),
            st.integers(1, 20),
        ),
        st.tuples(st.just("deltas"), replica, replica, st.just(0), st.just(0)),
        st.tuples(st.just("full"), replica, replica, st.just(0), st.just(0)),
    ),
    max_size=40,
)


def limiter_states(limiter: Limiter) -> dict[str, Neutral]:
    return {
        key: neutral(bucket.full_state(key, limiter.replica_id))
        for key, bucket in limiter.buckets.items()
    }


def sent_batches(
    program: list[tuple[str, int, str | int, int, int]], rule_level_configs: bool
) -> tuple[list[bytes], int]:
    """Run ``program`` on three limiters; every batch sent, msgpack-encoded, and the time."""
    limiters = [Limiter(RULES, replica_id=rid, clock=lambda: 0) for rid in REPLICAS]
    now = START
    sent: list[bytes] = []
    for kind, r, x, y, z in program:
        limiter = limiters[r]
        if kind == "acquire":
            now += z
            with contextlib.suppress(InvalidTokens):
                limiter.acquire(str(x), y, now=now)
        elif kind == "configure":
            target = str(x)
            if rule_level_configs and y % 2:
                target = limiter.rule_for(target).name
            limiter.configure(target, capacity=y, refill_rate=float(z), now=now)
        else:
            batch = limiter.collect_deltas() if kind == "deltas" else limiter.full_state()
            data = msgspec.msgpack.encode(batch)
            sent.append(data)
            dst = limiters[int(x)]
            if dst is not limiter:
                dst.merge(msgspec.msgpack.decode(data, type=DeltaBatch), now=now)
    for limiter in limiters:
        sent.append(msgspec.msgpack.encode(limiter.collect_deltas()))
    return sent, now


def observe(batches: list[bytes], now: int) -> Limiter:
    observer = Limiter(RULES, replica_id="observer/n/1", clock=lambda: 0)
    for data in batches:
        observer.merge(msgspec.msgpack.decode(data, type=DeltaBatch), now=now)
    return observer


@settings(max_examples=150, deadline=None)
@given(program=limiter_ops, data=st.data())
def test_merge_order_and_duplicates_do_not_matter(
    program: list[tuple[str, int, str | int, int, int]], data: st.DataObject
) -> None:
    """Without config changes, merge is a join: order and duplicates change nothing."""
    program = [op for op in program if op[0] != "configure"]
    batches, now = sent_batches(program, rule_level_configs=False)
    reference = observe(batches, now)
    for _ in range(3):
        shuffled = data.draw(st.permutations(batches))
        repeated = data.draw(st.lists(st.sampled_from(batches), max_size=6)) if batches else []
        other = observe(shuffled + repeated + shuffled[: len(shuffled) // 2], now)
        assert limiter_states(other) == limiter_states(reference)
        assert other.rule_configs == reference.rule_configs


def assert_order_matters_only_until_exchange(
    batches: list[bytes], now: int, data: st.DataObject, *, duplicates: bool
) -> None:
    """Observers merging ``batches`` in different orders (and with duplicates) agree on
    configs and counters at once, and on everything once they exchange full state."""
    observers = [observe(batches, now)]
    for _ in range(2):
        order = data.draw(st.permutations(batches))
        if duplicates and batches:
            order += data.draw(st.lists(st.sampled_from(batches), max_size=6))
        observers.append(observe(order, now))
    pure = [{key: (s[0], s[1], s[5]) for key, s in limiter_states(o).items()} for o in observers]
    assert pure[1] == pure[0] and pure[2] == pure[0]
    assert all(o.rule_configs == observers[0].rule_configs for o in observers)
    for _ in range(2):
        for one in observers:
            for other in observers:
                if one is not other:
                    other.merge(one.full_state(), now=now)
    assert limiter_states(observers[1]) == limiter_states(observers[0])
    assert limiter_states(observers[2]) == limiter_states(observers[0])


@settings(max_examples=150, deadline=None)
@given(program=limiter_ops, data=st.data())
def test_key_config_adoption_depends_on_order_only_until_replicas_exchange(
    program: list[tuple[str, int, str | int, int, int]], data: st.DataObject
) -> None:
    """A newer *per-key* config is adopted on merge like a rule config: re-based at the
    receiver, keeping the level it sees then (so a late change cannot refill a bucket
    the receiver drained meanwhile). Configs and counters never depend on order or
    duplicates; receivers that exchange full state agree exactly."""
    batches, now = sent_batches(program, rule_level_configs=False)
    assert_order_matters_only_until_exchange(batches, now, data, duplicates=True)


@settings(max_examples=150, deadline=None)
@given(program=limiter_ops, data=st.data())
def test_rule_config_adoption_depends_on_order_only_until_replicas_exchange(
    program: list[tuple[str, int, str | int, int, int]], data: st.DataObject
) -> None:
    """A newer *rule* config is adopted on merge by re-basing at the receiver (a local
    write, keeping the level it sees then), so the base a receiver proposes depends on
    what it had merged before. Configs and counters never depend on order, and
    receivers that exchange full state agree exactly."""
    batches, now = sent_batches(program, rule_level_configs=True)
    assert_order_matters_only_until_exchange(batches, now, data, duplicates=False)


@settings(max_examples=100, deadline=None)
@given(program=limiter_ops)
def test_snapshot_round_trips_through_msgpack_and_json(
    program: list[tuple[str, int, str | int, int, int]],
) -> None:
    limiters = [Limiter(RULES, replica_id=rid, clock=lambda: 0) for rid in REPLICAS]
    now = START
    for kind, r, x, y, z in program:
        if kind == "acquire":
            now += z
            with contextlib.suppress(InvalidTokens):
                limiters[r].acquire(str(x), y, now=now)
        elif kind == "full":
            limiters[int(x)].merge(limiters[r].full_state(), now=now)
    for limiter in limiters:
        data = limiter.snapshot()
        snapshot = msgspec.msgpack.decode(data, type=Snapshot)
        assert msgspec.json.decode(msgspec.json.encode(snapshot), type=Snapshot) == snapshot
        restored = Limiter.restore(data, RULES, clock=lambda: 0)
        assert limiter_states(restored) == limiter_states(limiter)
        assert msgspec.msgpack.decode(restored.snapshot(), type=Snapshot) == snapshot


@settings(max_examples=300, deadline=None)
@given(program=ops, data=st.data())
def test_the_tat_of_a_delta_is_the_tat_of_the_bucket_holding_it(
    program: list[tuple[str, int, int, int]], data: st.DataObject
) -> None:
    """``delta_tat`` (digests, the Redis store's expiry flag) agrees with a Bucket."""
    state = data.draw(st.sampled_from(grow(program).seen))
    assert delta_tat(state) == Bucket.from_delta(state, NEUTRAL).tat()


# -- the merged TAT and the real history (issue 23) -----------------------------------

history_ops = st.lists(
    st.one_of(
        # replica r asks for n tokens after dt ns of its own clock
        st.tuples(st.just("ask"), replica, st.integers(1, 3), st.integers(0, 400_000_000)),
        st.tuples(st.just("merge"), replica, replica, st.booleans()),
    ),
    max_size=60,
)


def lindley(grants: list[tuple[int, int]], epoch: int, interval: int) -> int:
    """GCRA's TAT over one merged arrival sequence: max(epoch + T·N, max over arrivals
    of t_i + T·(tokens granted at or after t_i))."""
    total = sum(n for _, n in grants)
    tat = epoch + total * interval
    after = total
    for stamp, n in sorted(grants):
        tat = max(tat, stamp + after * interval)
        after -= n
    return tat


@settings(max_examples=400, deadline=None)
@given(program=history_ops, skews=st.lists(st.integers(0, 50_000_000), min_size=3, max_size=3))
def test_the_merged_tat_is_the_real_history_within_one_slice(
    program: list[tuple[str, int, int, Any]], skews: list[int]
) -> None:
    """Three replicas grant on their own (skewed, monotone) clocks and exchange deltas
    or full states in any pattern — partitions included. Once they exchange everything,
    the merged TAT is the GCRA TAT of every grant made anywhere (Lindley's recursion over
    the merged arrivals), never above it and at most one slice S below it."""
    config = BucketConfig(5, 200_000_000, TTL_NS, SHARED, (0, "rule:r:0"))
    buckets = [Bucket(config, START, "r") for _ in REPLICAS]
    clocks = [START + skew for skew in skews]
    grants: list[tuple[int, int]] = []
    for kind, r, x, y in program:
        if kind == "ask":
            clocks[r] += y
            if buckets[r].acquire(KEY, x, clocks[r]).allowed:
                grants.append((clocks[r], x))
        elif y:
            buckets[r].merge(buckets[x].full_state(KEY, REPLICAS[x]), REPLICAS[r])
        else:
            buckets[r].merge(buckets[x].delta(KEY, REPLICAS[x]), REPLICAS[r])
    for one in range(3):
        for other in range(3):
            buckets[one].merge(buckets[other].full_state(KEY, REPLICAS[other]), REPLICAS[one])
    tats = {bucket.tat() for bucket in buckets}
    assert len(tats) == 1
    (merged,) = tats
    real = lindley(grants, buckets[0].epoch, config.interval_ns)
    assert real - slice_ns(config) <= merged <= real
