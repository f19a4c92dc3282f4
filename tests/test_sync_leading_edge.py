"""The collector's leading edge (issue 19 P4, docs/sync.md "Replication"): a grant on a
quiet node is collected at once — on the next turn of the loop — instead of waiting up
to an interval for the periodic collect, and the keys dirtied after it wait for the
periodic collect as before, so collects that queue deltas stay an interval apart.

The nodes run in this process on loopback with a sync interval of an hour: the periodic
collect never comes within a test, so whatever reaches the peer was collected by the
leading edge (or by the test's own ``collect()``, standing in for the periodic one).
The tests count collects, messages and loop turns, never durations."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from conftest import eventually_async
from test_sync_bounded_turns import EAST, WEST, Turns, meet, pair

from bucketmesh.core.decisions import Ask
from bucketmesh.core.limiter import Limiter
from bucketmesh.core.rules import Rule

HOUR = 3600.0


class FakeMonotonic:
    """The mesh's monotonic clock, moved by the test (the leading edge's interval)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def delta_messages(peer: Any) -> list[int]:
    """The sizes (keys) of the delta messages taken from ``peer``'s outbox from now on."""
    sizes: list[int] = []
    inner: Callable[[int], tuple[list[str], list[bytes], int | None]] = peer.take

    def take(budget: int) -> tuple[list[str], list[bytes], int | None]:
        keys, chunks, origin = inner(budget)
        if keys:
            sizes.append(len(keys))
        return keys, chunks, origin

    peer.take = take
    return sizes


def knows(node: Any, key: str, region: str) -> bool:
    bucket = node.limiter.buckets.get(key)
    return bucket is not None and any(
        rid.startswith(region + "/") and n >= 1
        for rid, n in bucket.used(node.limiter.replica_id).items()
    )


async def settle(nodes: dict[str, Any]) -> None:
    """Until the two nodes have met and run on the same rule configs: each stamps its
    rules file at start, and the newer stamp, arriving with the peer's full transfer,
    is adopted by every bucket of the rule, marking it dirty (not a grant)."""
    await meet(nodes)
    east, west = nodes[EAST], nodes[WEST]

    def same_rules() -> None:
        assert east.limiter.rule_configs == west.limiter.rule_configs

    await eventually_async(same_rules, "both nodes run on the newer stamp of the rules")


async def turns_pass(count: int) -> None:
    """Until ``count`` turns of the loop have run (whatever they take)."""
    turns = Turns()
    while turns.turn < count:
        await asyncio.sleep(0)
    turns.stop()


def test_a_grant_on_a_quiet_node_is_sent_at_once_in_one_message_without_the_tick() -> None:
    async def scenario() -> None:
        nodes = pair(interval_s=HOUR)
        try:
            await settle(nodes)
            east, west = nodes[EAST], nodes[WEST]
            sent = delta_messages(east.mesh.peers[WEST])
            east.limiter.acquire("agent-api-key-quiet", 1)
            await eventually_async(
                lambda: knows(west, "agent-api-key-quiet", EAST),
                "the grant reaches the peer before the hour's tick",
                timeout=20,
            )
            # the only collect so far (the first periodic one is an hour away)
            assert east.mesh.collects == 1
            assert east.mesh.leading_collects == 1
            assert sent == [1]
        finally:
            for node in nodes.values():
                await node.stop(grace=1.0)

    asyncio.run(scenario())


def test_a_burst_after_the_leading_edge_waits_for_the_next_collect_and_goes_in_one() -> None:
    async def scenario() -> None:
        nodes = pair(interval_s=HOUR)
        try:
            await settle(nodes)
            east, west = nodes[EAST], nodes[WEST]
            peer = east.mesh.peers[WEST]
            sent = delta_messages(peer)
            collects = east.mesh.collects
            east.limiter.acquire("agent-api-key-burst-0", 1)  # the leading edge
            await eventually_async(
                lambda: knows(west, "agent-api-key-burst-0", EAST), "the first grant is sent"
            )
            for n in range(1, 51):  # within the interval the leading collect began
                east.limiter.acquire(f"agent-api-key-burst-{n}", 1)
            await turns_pass(200)
            # nothing more collected, queued or sent: the burst waits for the next collect
            assert east.mesh.collects == collects + 1
            assert sent == [1]
            assert set(peer.outbox) <= {"agent-api-key-burst-0"}  # (its ack may be due)
            assert not any(knows(west, f"agent-api-key-burst-{n}", EAST) for n in range(1, 51))
            assert east.mesh.collect() == 50  # the periodic collect: all of them at once
            await eventually_async(
                lambda: all(knows(west, f"agent-api-key-burst-{n}", EAST) for n in range(1, 51)),
                "the burst reaches the peer",
            )
            assert east.mesh.collects == collects + 2
            assert sent == [1, 50]
        finally:
            for node in nodes.values():
                await node.stop(grace=1.0)

    asyncio.run(scenario())


def test_the_leading_edge_waits_for_an_interval_in_which_no_collect_queued_anything() -> None:
    """A busy node (every interval queues deltas: a flood) never takes the leading edge;
    it comes back only after an interval whose collects found nothing."""

    async def scenario() -> None:
        nodes = pair(interval_s=HOUR)
        try:
            await settle(nodes)
            east, west = nodes[EAST], nodes[WEST]
            mesh = east.mesh
            clock = mesh.monotonic = FakeMonotonic()
            leading = mesh.leading_collects
            east.limiter.acquire("agent-api-key-busy-0", 1)  # quiet so far: leading
            await eventually_async(lambda: mesh.leading_collects == leading + 1, "leading")
            for n in range(1, 6):
                # the periodic collects of a busy node, each a little less than an
                # interval after the one before (what ``dirtied`` sees)
                clock.now += HOUR * 0.99
                east.limiter.acquire(f"agent-api-key-busy-{n}", 1)
                await turns_pass(50)
                assert mesh.leading_collects == leading + 1
                assert mesh.collect() == 1
            clock.now += HOUR * 1.01  # a whole interval without a collect that queued
            east.limiter.acquire("agent-api-key-busy-6", 1)
            await eventually_async(
                lambda: mesh.leading_collects == leading + 2, "leading after a quiet interval"
            )
            await eventually_async(
                lambda: all(knows(west, f"agent-api-key-busy-{n}", EAST) for n in range(7)),
                "every grant reaches the peer",
            )
        finally:
            for node in nodes.values():
                await node.stop(grace=1.0)

    asyncio.run(scenario())


# -- the core's side: Limiter.on_dirty --------------------------------------------------


def limiter() -> tuple[Limiter, list[int]]:
    rules = [
        Rule.create("s-{{ .Request.Header.X-Key }}", 10, 1.0, name="shared", mode="shared"),
        Rule.create("t-{{ .Request.Header.X-Key }}", 10, 1.0, name="strict", mode="strict"),
    ]
    lim = Limiter(rules, replica_id="r/n/1", regions=1)
    calls: list[int] = []
    lim.on_dirty = lambda: calls.append(len(lim.dirty))
    return lim, calls


def test_on_dirty_is_called_once_when_a_grant_dirties_an_empty_set() -> None:
    lim, calls = limiter()
    lim.acquire("s-a", 1, rule="shared")  # a new key
    lim.acquire("s-a", 1)
    lim.acquire("s-b", 1, rule="shared")
    assert calls == [0]  # before the first key went in; not again while dirty
    lim.collect_deltas()
    lim.acquire("s-a", 0)  # a peek dirties nothing
    assert calls == [0]
    lim.acquire("s-a", 1)
    assert calls == [0, 0]


def test_on_dirty_ignores_denials_and_strict_keys_and_covers_batches() -> None:
    lim, calls = limiter()
    lim.acquire("t-x", 1, rule="strict")  # strict counters never travel
    lim.acquire("s-full", 10, rule="shared")
    lim.collect_deltas()
    calls.clear()
    assert not lim.acquire("s-full", 1).allowed  # a denial dirties nothing
    assert calls == []
    lim.acquire_many([Ask("t-x", 1, None)])
    assert calls == []
    lim.acquire_many([Ask("s-a", 1, "shared")])  # a new key: the general path
    assert calls == [0]
    lim.collect_deltas()
    lim.acquire_many([Ask("s-a", 1, None), Ask("s-a", 1, None), Ask("t-x", 1, None)])  # live path
    assert calls == [0, 0]
    lim.collect_deltas()

    class Item:
        def __init__(self, key: str) -> None:
            self.key, self.tokens, self.rule = key, 1, None

    assert lim.acquire_columns([Item("s-a"), Item("s-a")]) is not None
    assert calls == [0, 0, 0]
    assert lim.dirty == {"s-a"}


def test_a_failing_collect_is_counted_and_shown_and_the_collector_carries_on() -> None:
    """The collector is a loop of its own now (it was a ``Supervisor.every`` step): a
    collect that raises (a delta the wire format cannot carry) still marks the task
    failing and counts it, the other keys still go, and the next collect recovers."""

    async def scenario() -> None:
        nodes = pair()  # the default interval
        try:
            await settle(nodes)
            east, west = nodes[EAST], nodes[WEST]
            state = east.supervisor.tasks["sync-collect"]
            east.limiter.acquire("agent-api-key-bad", 1)
            east.limiter.buckets["agent-api-key-bad"].epoch = 2**70  # beyond msgpack's ints
            east.limiter.acquire("agent-api-key-good", 1)  # (the same turn: one collect)
            await eventually_async(lambda: state.failures == 1, "the failure is counted")
            assert "agent-api-key-bad" in (state.last_error or "")
            await eventually_async(
                lambda: knows(west, "agent-api-key-good", EAST), "the good key still goes"
            )
            east.limiter.acquire("agent-api-key-after", 1)
            await eventually_async(
                lambda: knows(west, "agent-api-key-after", EAST), "later grants go too"
            )
            await eventually_async(
                lambda: east.readiness()["tasks"] == "ok", "the collector is ok again"
            )
            assert state.failures == 1
        finally:
            for node in nodes.values():
                await node.stop(grace=1.0)

    asyncio.run(scenario())
