"""The Redis scripts do exactly what ``bucket.py`` does, on a real redis-server.

Hypothesis drives one bucket through acquires, peeks, merges of other replicas'
entries and config changes, on the store and on an in-memory ``Limiter`` that
runs under the store's replica id; every decision and the final state must be
equal, bit for bit.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bucketmesh.core.bucket import BucketConfig, BucketDelta, interval_for
from bucketmesh.core.limiter import DeltaBatch, Limiter
from bucketmesh.core.rules import Rule
from bucketmesh.storage.redis_store import ALLOWED, INVALID_TOKENS, Ask, RedisStore, check_exact

T0 = 1_763_900_000_123_456_789  # an absolute ns time well above 2^53
_names = itertools.count()


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def store(redis_server_module: Any, loop: asyncio.AbstractEventLoop) -> Iterator[RedisStore]:
    store = RedisStore(redis_server_module.url, "equiv", timeout_s=5.0)
    loop.run_until_complete(store.join())
    yield store
    loop.run_until_complete(store.close())


def _rule(capacity: int, rate: float, ttl: float) -> Rule:
    return Rule.create("k-{{ .Request.Query.user }}", capacity, rate, name="r", ttl=ttl)


operation = st.one_of(
    st.tuples(st.just("acquire"), st.integers(0, 12), st.integers(0, 3_000_000_000)),
    st.tuples(
        st.just("merge"),
        st.sampled_from(["eu/n/1", "ap/n/7"]),
        st.integers(0, 20),
        st.integers(-2_000_000_000, 2_000_000_000),
        # the peer's records (docs/design.md section 3, "History"): an anchor, and
        # marks at slice-like points, as (shift from now, tokens before it)
        st.one_of(
            st.none(), st.tuples(st.integers(-3_000_000_000, 500_000_000), st.integers(0, 20))
        ),
        st.lists(
            st.tuples(st.integers(-4_000_000_000, 500_000_000), st.integers(0, 20)), max_size=4
        ),
    ),
    st.tuples(st.just("configure"), st.integers(1, 15), st.sampled_from([0.5, 3.0, 7.0, 1000.0])),
    # a peer's per-key config change, with the base it proposed there
    st.tuples(
        st.just("peerconfig"),
        st.integers(1, 15),
        st.sampled_from([0.5, 3.0, 1000.0]),
        st.integers(-3_000_000_000, 3_000_000_000),
    ),
    # a peer's copy of a later generation of the bucket (re-created after expiry there)
    st.tuples(st.just("epoch"), st.integers(1, 3), st.integers(0, 9)),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    capacity=st.integers(1, 10),
    rate=st.sampled_from([0.3, 1.0, 2.5, 10.0, 333.0]),
    ttl=st.sampled_from([0.5, 5.0, 3600.0]),
    ops=st.lists(operation, min_size=1, max_size=25),
)
def test_scripts_decide_and_merge_exactly_like_bucket_py(
    store: RedisStore,
    loop: asyncio.AbstractEventLoop,
    capacity: int,
    rate: float,
    ttl: float,
    ops: list[tuple[Any, ...]],
) -> None:
    run = loop.run_until_complete
    key = f"key-{next(_names)}"
    rule = _rule(capacity, rate, ttl)
    assert store.replica_id is not None
    memory = Limiter([rule], replica_id=store.replica_id)
    now = T0
    hlc = T0
    others: dict[str, int] = {}
    for op in ops:
        if op[0] == "acquire":
            _, tokens, dt = op
            now += dt
            config = memory.rule_configs["r"]
            ask = Ask(key, "r", config, tokens)
            verdict = run(store.acquire([ask], now))[0]
            if tokens > memory.inspect(key, rule="r", now=now).config.capacity:
                assert verdict.status == INVALID_TOKENS
                continue
            expected = memory.acquire(key, tokens, rule="r", now=now)
            assert verdict.status in (0, ALLOWED)
            assert verdict.decision(key) == expected
        elif op[0] == "merge":
            _, rid, more, base_shift, anchor, marks = op
            bucket = memory.bucket(key)
            if bucket is None:
                continue
            others[rid] = others.get(rid, 0) + more
            flat: list[int] = []
            for shift, before in sorted(set(marks)):
                flat += [now + shift, min(before, others[rid])]
            delta = BucketDelta(
                key,
                bucket.epoch,
                bucket.config,
                bucket.base_version,
                bucket.base_time + base_shift,
                {rid: others[rid]},
                "r",
                bucket.base_used,
                {} if anchor is None else {rid: now + anchor[0]},
                {} if anchor is None else {rid: min(anchor[1], others[rid])},
                {} if anchor is None else {rid: anchor[1] // 2},
                {rid: tuple(flat)} if flat else {},
            )
            memory.merge(DeltaBatch(rid, [delta]), now=now)
            run(store.merge([delta], now))
        elif op[0] == "peerconfig":
            _, new_capacity, new_rate, base_shift = op
            bucket = memory.bucket(key)
            if bucket is None:
                continue
            hlc += 1
            config = BucketConfig(
                new_capacity,
                interval_for(new_rate),
                bucket.config.ttl_ns,
                "shared",
                (hlc, "eu/n/1"),
            )
            if check_exact(config) is not None:
                return
            delta = BucketDelta(
                key, bucket.epoch, config, config.version, now + base_shift, {}, "r"
            )
            memory.merge(DeltaBatch("eu/n/1", [delta]), now=now)
            run(store.merge_remote([delta], now, store.replica_id))
        elif op[0] == "epoch":
            _, generations, spent = op
            bucket = memory.bucket(key)
            if bucket is None:
                continue
            epoch = bucket.epoch + generations * bucket.config.ttl_ns
            # the peer re-created the key after it expired there: not before its epoch
            # (a generation far in our future would be clock skew beyond anything real,
            # and its debt at a slow rate leaves the scripts' exact range, see the docs)
            now = max(now, epoch)
            delta = BucketDelta(
                key, epoch, bucket.config, bucket.config.version, epoch, {"eu/n/9": spent}, "r"
            )
            memory.merge(DeltaBatch("eu/n/9", [delta]), now=now)
            run(store.merge([delta], now))
        else:
            _, new_capacity, new_rate = op
            bucket = memory.bucket(key)
            config = memory.configure("r", capacity=new_capacity, refill_rate=new_rate, now=now)
            if check_exact(config) is not None:
                return
            if bucket is not None:
                # the node's reconfigure path: bucket.py proposes, the store merges
                run(store.merge([bucket.full_state(key, store.replica_id)], now))
        stored = run(store.read([key]))
        bucket = memory.bucket(key)
        if bucket is None:
            assert stored == []
        else:
            assert stored == [bucket.full_state(key, store.replica_id)]


def test_a_stale_incarnation_is_refused(store: RedisStore, loop: asyncio.AbstractEventLoop) -> None:
    from bucketmesh.storage.redis_store import StaleIncarnation

    run = loop.run_until_complete
    config = Limiter([_rule(3, 1.0, 60.0)], replica_id="x").rule_configs["r"]
    real = store.incarnation
    store.incarnation = "1"
    try:
        with pytest.raises(StaleIncarnation):
            run(store.acquire([Ask("inc-key", "r", config, 1)], T0))
    finally:
        store.incarnation = real
    assert run(store.acquire([Ask("inc-key", "r", config, 1)], T0))[0].status == ALLOWED


def test_a_flushed_script_cache_is_reloaded(
    store: RedisStore, loop: asyncio.AbstractEventLoop, redis_server_module: Any
) -> None:
    run = loop.run_until_complete
    config = Limiter([_rule(3, 1.0, 60.0)], replica_id="x").rule_configs["r"]
    assert run(store.acquire([Ask("flushed", "r", config, 1)], T0))[0].status == ALLOWED
    redis_server_module.client().script_flush()
    assert run(store.acquire([Ask("flushed", "r", config, 1)], T0))[0].status == ALLOWED
    assert run(store.read(["flushed"]))[0].used == {store.replica_id: 2}


def test_replies_are_parsed_by_hiredis(store: RedisStore, loop: asyncio.AbstractEventLoop) -> None:
    """Decisions go over the raw link, whose replies hiredis parses; redis-py's own
    connections (reads, merges, the incarnation) use its hiredis parser too, which
    it picks only when the package is installed (pyproject.toml lists it)."""
    import hiredis
    from redis._parsers.hiredis import _AsyncHiredisParser

    config = Limiter([_rule(3, 1.0, 60.0)], replica_id="x").rule_configs["r"]
    verdicts = loop.run_until_complete(store.acquire([Ask("hiredis", "r", config, 1)] * 2, T0))
    assert [v.status for v in verdicts] == [ALLOWED, ALLOWED]
    assert store.raw and store.link is not None
    assert isinstance(store.link.reader, hiredis.Reader)
    connection = store.redis.connection_pool.make_connection()
    assert isinstance(connection._parser, _AsyncHiredisParser)


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.text(max_size=12), min_size=1, max_size=4),
    tokens=st.lists(st.integers(0, 2**40), min_size=1, max_size=6),
    now=st.integers(0, 2**62),
)
def test_the_link_packs_an_acquire_call_byte_for_byte_as_the_reference(
    keys: list[str], tokens: list[int], now: int
) -> None:
    """The raw link packs a command with hiredis's C packer where it can: the bytes must
    be those of the Python reference (``str()`` of every argument, UTF-8), for the acquire
    call of any keys (non-ASCII, empty) and any numbers; a bool goes to the reference."""
    from bucketmesh.storage import redis_store

    store = RedisStore("redis://127.0.0.1:1", "eu")
    store.incarnation = "1733440000000"
    config = BucketConfig(10, interval_for(1.0), 3_600_000_000_000, "shared", (7, "eu/n1"))
    asks = [Ask(keys[j % len(keys)], "r", config, n, j % 2, j % 3) for j, n in enumerate(tokens)]
    names, argv, _ = store.acquire_args(asks, now, store.incarnation_key)
    command = ["EVALSHA", "0" * 40, len(names), *names, *argv]
    assert redis_store._pack(command) == redis_store._pack_python(command)
    assert redis_store._pack(["SELECT", True]) == b"*2\r\n$6\r\nSELECT\r\n$4\r\nTrue\r\n"


# one script call of many decisions: runs of one key's Ask (the object RedisBackend
# reuses), several keys interleaved, another replica's entries on one key
call = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 4), st.integers(1, 12)), min_size=1, max_size=6
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    capacity=st.integers(1, 40),
    rate=st.sampled_from([0.3, 2.5, 50.0, 1000.0, 1e9]),
    ttl=st.sampled_from([0.5, 3600.0]),
    calls=st.lists(
        st.tuples(call, st.integers(0, 2_000_000_000), st.one_of(st.none(), st.integers(0, 9))),
        min_size=1,
        max_size=8,
    ),
)
def test_a_call_of_many_runs_decides_in_order_exactly_like_bucket_py(
    store: RedisStore,
    loop: asyncio.AbstractEventLoop,
    capacity: int,
    rate: float,
    ttl: float,
    calls: list[tuple[list[tuple[int, int, int]], int, int | None]],
) -> None:
    """The script decides a call's asks in order, a run of one Ask (sent as one item
    with its count) as that many decisions: each decision and every bucket's state
    afterwards are those of ``bucket.py`` deciding them one by one at the call's time."""
    run = loop.run_until_complete
    names = [f"many-{next(_names)}" for _ in range(3)]
    rule = _rule(capacity, rate, ttl)
    assert store.replica_id is not None
    memory = Limiter([rule], replica_id=store.replica_id)
    now = T0
    peer = 0
    for runs, dt, peer_spent in calls:
        now += dt
        config = memory.rule_configs["r"]
        asks: list[Ask] = []
        for which, tokens, count in runs:
            ask = Ask(names[which], "r", config, tokens)
            asks += [ask] * count
        verdicts = run(store.acquire(asks, now))
        assert len(verdicts) == len(asks)
        for ask, verdict in zip(asks, verdicts, strict=True):
            if ask.tokens > config.capacity:
                assert verdict.status == INVALID_TOKENS
                continue
            assert verdict.decision(ask.key) == memory.acquire(
                ask.key, ask.tokens, rule="r", now=now
            )
        bucket = memory.bucket(names[0])
        if peer_spent is not None and bucket is not None:
            # another replica spent on the first key: its count joins the bucket
            peer += peer_spent
            delta = BucketDelta(
                names[0],
                bucket.epoch,
                bucket.config,
                bucket.base_version,
                bucket.base_time,
                {"eu/n/1": peer},
                "r",
                bucket.base_used,
            )
            memory.merge(DeltaBatch("eu/n/1", [delta]), now=now)
            run(store.merge([delta], now))
        for name in names:
            stored = run(store.read([name]))
            held = memory.bucket(name)
            assert stored == ([] if held is None else [held.full_state(name, store.replica_id)])


def test_a_run_of_one_ask_is_one_item_of_the_call() -> None:
    """RedisBackend asks a hot key with the same Ask object: a run of it is packed as
    one item with its count, so the script parses one item, not one per decision."""
    store = RedisStore("redis://127.0.0.1:1", "eu")
    store.incarnation = "1733440000000"
    config = BucketConfig(10, interval_for(1.0), 3_600_000_000_000, "shared", (7, "eu/n1"))
    hot, other = Ask("hot", "r", config, 1), Ask("other", "r", config, 2)
    _, argv, keys = store.acquire_args([hot] * 7 + [other, hot, hot], T0, store.incarnation_key)
    assert keys == {"hot": 1, "other": 2}
    assert argv[-2] == "1,1,1,0,0,7;2,1,2,0,0,1;1,1,1,0,0,2;"


def test_a_failed_eviction_check_counts_as_a_store_failure() -> None:
    """The maxmemory-policy check is a Redis call like the others: its failure is a
    StoreUnavailable counted in ``failures`` (bucketmesh_store_failures_total); a
    refused CONFIG (a managed Redis) is not a failure and answers None."""
    from bucketmesh.storage.redis_store import StoreUnavailable

    async def check() -> int:
        store = RedisStore("redis://127.0.0.1:1", "eu", timeout_s=5.0)  # nothing listens
        try:
            with pytest.raises(StoreUnavailable):
                await store.eviction_policy()
            return store.failures
        finally:
            await store.close()

    assert asyncio.run(check()) == 1
