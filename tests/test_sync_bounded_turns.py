"""Replication work is done in bounded pieces per turn of the event loop (R6: a flooded
node's served p99 and its own sync lag).

Each of these was measured as a stall of the flooded node or its peer with
``benchmarks/r6.py --stalls`` (docs/targets.md R6): a digest reply merged whole (1.6-1.8 s
on the peer, whose acks of the flooded node's deltas then waited as long), the range
index's synchronous full pass after a rebuild that a flood outran (0.45 s), and a flooded
node encoding the full state of nearly every range for a digest request while its deltas
to the asker were still queued. The tests count work per loop turn with a callback that
re-schedules itself (one run per turn) and assert counts, never durations."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from conftest import eventually_async, free_port
from test_mesh import CLUSTER_ID, SECRET, in_process_node, met_pair

from bucketmesh.core.bucket import NS_PER_S, BucketDelta, epoch_for
from bucketmesh.core.limiter import DeltaBatch
from bucketmesh.http.errors import ApiError
from bucketmesh.http.server import HttpServer, Request
from bucketmesh.replication import keyindex
from bucketmesh.replication import mesh as mesh_module
from bucketmesh.replication import protocol as sync
from bucketmesh.replication.keyindex import RangeIndex

EAST, WEST = "us-east-1", "eu-central-1"


class Turns:
    """Counts turns of the running loop: a callback that schedules itself again runs
    once per turn (asyncio and uvloop run only the callbacks ready when a turn began)."""

    def __init__(self) -> None:
        self.turn = 0
        self._on = True
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self.turn += 1
        if self._on:
            asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._on = False


def ghosts(node: Any, count: int, tag: str) -> None:
    """``count`` settled buckets only ``node`` knows, merged without marking them dirty:
    no delta carries them, only the digest exchange or a pull."""
    config = node.limiter.rule_configs["global"]
    now = time.time_ns()
    deltas = [
        BucketDelta(
            f"agent-api-key-{tag}-{i}",
            epoch_for(now, config.ttl_ns),
            config,
            config.version,
            now - 600 * NS_PER_S,
            {f"{EAST}/ghost/1": 5},
            "global",
        )
        for i in range(count)
    ]
    node.limiter.merge(DeltaBatch(f"{EAST}/ghost/1", deltas))


def record_merges(node: Any, turns: Turns) -> Counter[int]:
    """Deltas ``node``'s mesh merges, by loop turn."""
    merged: Counter[int] = Counter()
    inner: Callable[[DeltaBatch], int] = node.mesh._merge

    def merge(batch: DeltaBatch) -> int:
        merged[turns.turn] += len(batch.deltas)
        return inner(batch)

    node.mesh._merge = merge
    return merged


async def meet(nodes: dict[str, Any]) -> None:
    for node in nodes.values():
        await node.start()
    links = [nodes[EAST].mesh.peers[WEST], nodes[WEST].mesh.peers[EAST]]

    def met() -> None:
        assert all(p.full_transfers and not p.full_wanted for p in links)

    await eventually_async(met, "the peers meet")


def pair(**mesh: Any) -> dict[str, Any]:
    ports = {EAST: free_port(), WEST: free_port()}
    return {
        region: in_process_node(
            region,
            port,
            {r: f"http://127.0.0.1:{p}" for r, p in ports.items() if r != region},
            **mesh,
        )
        for region, port in ports.items()
    }


# A digest group is 64 of the 256 ranges, a pull 32: 24,000 buckets make each digest reply
# ~6,000 deltas and each pull reply ~3,000, merged whole before (one turn each).
GHOSTS = 24_000
# a slice (mesh._MERGE_SLICE, 1,000) and what a delta message merged in the same turn may
# add (~330 deltas)
PER_TURN = 2000


def test_a_digest_reply_is_merged_in_slices_never_a_whole_range_group_per_turn() -> None:
    async def scenario() -> None:
        nodes = pair(digest_interval_s=0.2, settle_s=0.5)
        try:
            await meet(nodes)
            east, west = nodes[EAST], nodes[WEST]
            turns = Turns()
            merged = record_merges(west, turns)
            ghosts(east, GHOSTS, "digest")

            def repaired() -> None:
                have = sum(1 for key in west.limiter.buckets if "-digest-" in key)
                assert have == GHOSTS, f"{have} of {GHOSTS} repaired"

            await eventually_async(repaired, "the digest repairs every bucket", timeout=120)
            turns.stop()
            assert sum(merged.values()) >= GHOSTS
            assert max(merged.values()) <= PER_TURN, merged.most_common(3)
        finally:
            for node in nodes.values():
                await node.stop(grace=1.0)

    asyncio.run(scenario())


def test_digest_requests_group_ranges_by_the_askers_buckets() -> None:
    groups = mesh_module._digest_groups
    # few buckets: 64 ranges a request, every range once
    assert groups([10] * sync.RANGES) == [list(range(s, s + 64)) for s in range(0, 256, 64)]
    # a million buckets (~3,900 a range): 5 ranges a request, within _DIGEST_KEYS
    many = groups([3_900] * sync.RANGES)
    assert [r for group in many for r in group] == list(range(sync.RANGES))
    assert {len(group) for group in many[:-1]} == {5}
    # a range alone above the limit still gets a request of its own
    assert groups([0, 50_000, 0]) == [[0], [1], [2]]


def test_a_digest_reply_carries_the_state_of_a_bounded_number_of_buckets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node answering a digest sends the full state of every differing range in one
    reply, encoded and signed in one piece: 64 ranges of a million buckets, all
    differing after a rule PATCH, stopped it for 0.5-0.6 s (benchmarks/patch_stall.py).
    Now a reply stops at ``_DIGEST_KEYS`` buckets; the rest differs again at the asker's
    next round, until every bucket is repaired. Here the asker holds none of them (so
    its own grouping does not bound the reply) and the limit is lowered to 1,000."""
    monkeypatch.setattr(mesh_module, "_DIGEST_KEYS", 1_000)
    ghost_count = 6_000

    async def scenario() -> None:
        # only the empty side (west) asks for digests
        async with met_pair({EAST: 3600.0, WEST: 0.2}) as (east, west, _links):
            replies: list[int] = []
            inner = east.mesh._state_of_ranges

            async def state_of_ranges(ranges: Any) -> DeltaBatch:
                batch: DeltaBatch = await inner(ranges)
                replies.append(len(batch.deltas))
                return batch

            east.mesh._state_of_ranges = state_of_ranges
            ghosts(east, ghost_count, "capped")

            def repaired() -> None:
                have = sum(1 for key in west.limiter.buckets if "-capped-" in key)
                assert have == ghost_count, f"{have} of {ghost_count} repaired"

            await eventually_async(repaired, "the digest repairs every bucket", timeout=120)
            largest_range = max(len(r) for r in east.mesh._range_index().ranges)
            assert max(replies) <= 1_000 + largest_range, replies
            assert sum(replies) >= ghost_count

    asyncio.run(scenario())


def test_a_pull_of_a_peers_state_is_merged_in_slices() -> None:
    """What a blind node's ``share-pull`` does every 2 s until it has pulled every peer:
    on a flooded node, each reply (a peer's state of 32 ranges) was one merge."""

    async def scenario() -> None:
        nodes = pair(digest_interval_s=3600.0)  # no digest repairs them first
        try:
            await meet(nodes)
            east, west = nodes[EAST], nodes[WEST]
            ghosts(east, GHOSTS, "pull")
            turns = Turns()
            merged = record_merges(west, turns)
            outcome = await west.mesh.pull_at_start(30.0)
            turns.stop()
            assert outcome.pulled == [EAST]
            assert sum(1 for key in west.limiter.buckets if "-pull-" in key) == GHOSTS
            assert max(merged.values()) <= PER_TURN, merged.most_common(3)
        finally:
            for node in nodes.values():
                await node.stop(grace=1.0)

    asyncio.run(scenario())


def digest_request(ranges: list[int], hashes: list[int], *extra: int) -> Request:
    """A digest request from WEST: ``[settle_ns, ranges, hashes, *extra]`` (``extra``: the
    asker's instant, ``at_ns``, or nothing as from an older asker)."""
    auth = sync.SyncAuth(CLUSTER_ID, SECRET, window_ns=30 * NS_PER_S)
    settle = 2 * NS_PER_S
    body = auth.seal(
        sync.DIGEST,
        msgspec.msgpack.encode([settle, ranges, hashes, *extra]),
        sender=f"{WEST}/node-a/1",
        region=WEST,
        now_ns=time.time_ns(),
        nonce=os.urandom(sync.NONCE_BYTES),
    )
    return Request("POST", sync.PATHS[sync.DIGEST], {}, {}, body, "127.0.0.1", "1.1")


def test_a_node_behind_on_its_deltas_to_a_peer_answers_its_digest_later() -> None:
    async def scenario() -> None:
        node = in_process_node(EAST, free_port(), {WEST: f"http://127.0.0.1:{free_port()}"})
        mesh = node.mesh
        peer = mesh.peers[WEST]
        peer.state = mesh_module.UP
        for n in range(3000):  # a flood of new keys, queued for the peer
            node.limiter.acquire(f"agent-api-key-f{n}", 1)
        mesh.collect()
        assert mesh.backlogged()  # (behind: more queued than the pipeline carries)
        every = list(range(64))
        with pytest.raises(ApiError) as refused:
            await mesh.receive_digest(digest_request(every, [0] * 64))
        assert refused.value.status == 503
        assert refused.value.reason == "sync_behind"
        assert any(name == "Retry-After" for name, _ in refused.value.headers or [])
        assert peer.digests_deferred == 1

        # caught up (everything acknowledged): the digest is answered again
        keys, chunks, _ = peer.take(len(peer.outbox) * 1000)
        peer.acknowledge(keys, chunks, {})
        assert not mesh.backlogged()
        reply = await mesh.receive_digest(digest_request(every, [0] * 64))
        assert reply.status == 200

    asyncio.run(scenario())


def test_the_range_index_indexes_at_most_a_slice_per_turn_while_a_flood_outruns_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rebuild's slices let a flood insert more keys than a catch-up took in one go; the
    index then indexed every key in one synchronous pass (0.45 s on the flooded node)."""
    monkeypatch.setattr(keyindex, "REBUILD_SLICE", 500)
    monkeypatch.setattr(keyindex, "CATCH_UP_LIMIT", 2000)

    async def scenario() -> None:
        buckets: dict[str, object] = {f"k-{i}": object() for i in range(6000)}
        index = RangeIndex(buckets)  # type: ignore[arg-type]
        added: Counter[int] = Counter()
        turn = 0
        flooding = True
        serial = len(buckets)

        def flood() -> None:  # 700 new keys a turn: more than a slice indexes
            nonlocal turn, serial
            turn += 1
            for _ in range(700):
                buckets[f"k-{serial}"] = object()
                serial += 1
            if flooding:
                asyncio.get_running_loop().call_soon(flood)

        inner = index._add

        def add(keys: Any) -> None:
            keys = list(keys)
            added[turn] += len(keys)
            inner(keys)

        index._add = add  # type: ignore[method-assign]
        every = set(range(sync.RANGES))
        before = set(buckets)
        asyncio.get_running_loop().call_soon(flood)
        first = await index.live(every)
        again = await index.live(every)  # the flood still runs: catches up, in slices
        flooding = False
        await asyncio.sleep(0)
        assert before <= set(first)
        assert set(first) <= set(again) <= set(buckets)
        assert max(added.values()) <= keyindex.REBUILD_SLICE, added.most_common(3)
        final = await index.live(every)
        assert sorted(final) == sorted(buckets)

    asyncio.run(scenario())


def test_the_collector_queues_a_large_dirty_set_a_slice_per_turn_and_loses_none() -> None:
    """A dirty set of thousands of keys (a flood's turn, a PATCH of a rule every flood
    bucket belongs to) was encoded and queued in one turn of the collector."""

    async def scenario() -> None:
        node = in_process_node(EAST, free_port(), {WEST: f"http://127.0.0.1:{free_port()}"})
        mesh = node.mesh
        peer = mesh.peers[WEST]
        await node.start()  # the peer refuses: everything stays queued
        try:
            turns = Turns()
            offered: Counter[int] = Counter()
            inner = peer.offer

            def offer(encoded: Any, *args: Any) -> bool:
                offered[turns.turn] += len(encoded)
                return bool(inner(encoded, *args))

            peer.offer = offer
            for n in range(7000):
                node.limiter.acquire(f"agent-api-key-c{n}", 1)

            def queued() -> None:
                assert len(peer.outbox) == 7000, len(peer.outbox)

            await eventually_async(queued, "the collector queues every delta")
            turns.stop()
            assert max(offered.values()) <= 2000, offered.most_common(3)
        finally:
            await node.stop(grace=1.0)

        # cancelled between slices (a stop): what was drained is queued all the same
        for n in range(5000):
            node.limiter.acquire(f"agent-api-key-d{n}", 1)
        task = asyncio.ensure_future(mesh.collect_sliced())
        await asyncio.sleep(0)  # one slice, then it yields
        assert 0 < sum(1 for key in peer.outbox if "-d" in key) < 5000
        # built a slice at a time too: the rest is still dirty in the limiter
        assert 0 < len(node.limiter.dirty) < 5000
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sum(1 for key in peer.outbox if "-d" in key) == 5000

    asyncio.run(scenario())


def test_a_digest_is_hashed_at_the_askers_instant_so_buckets_settling_meanwhile_agree() -> None:
    """The receiver hashed at its own now: every bucket that settled between the asker's
    hashing and the receiver's (under a flood, thousands a second) made its range differ,
    and each round swapped the full state of nearly every range both ways."""

    async def scenario() -> None:
        node = in_process_node(EAST, free_port(), {WEST: f"http://127.0.0.1:{free_port()}"})
        config = node.limiter.rule_configs["global"]
        now = time.time_ns()
        at = now - NS_PER_S  # the asker hashed a second ago
        settle = 2 * NS_PER_S
        epoch = epoch_for(now, config.ttl_ns)

        def ghost(i: int, tat: int) -> BucketDelta:
            used = {f"{WEST}/ghost/1": 5}
            probe = BucketDelta(
                f"agent-api-key-s{i}", epoch, config, config.version, 0, used, "global"
            )
            offset = sync.delta_tat(probe)  # the TAT of base time 0
            return BucketDelta(
                probe.key, epoch, config, config.version, tat - offset, used, "global"
            )

        settled_long_ago = [ghost(i, at - 60 * NS_PER_S) for i in range(300)]
        # at rest since just before the receiver's now, not yet at the asker's instant
        settling = [ghost(i, at - settle + NS_PER_S // 2) for i in range(300, 600)]
        node.limiter.merge(DeltaBatch(f"{WEST}/ghost/1", settled_long_ago + settling))
        ranges = list(range(64))
        keys = [d.key for d in settled_long_ago + settling]
        same_state = node.limiter.full_state(keys).deltas  # what the asker holds too
        hashes = sync.digest(same_state, ranges, at, settle)

        def differing(response: Any) -> list[int]:
            env = msgspec.msgpack.decode(response.body, type=sync.Envelope)
            reply = sync.decode_body(env)
            assert isinstance(reply, sync.DigestReply)
            return list(reply.differing)

        answer = await node.mesh.receive_digest(digest_request(ranges, hashes, at))
        assert differing(answer) == []
        # an older asker (no instant): the receiver's now, and the settling buckets differ
        older = await node.mesh.receive_digest(digest_request(ranges, hashes))
        assert differing(older) != []

    asyncio.run(scenario())


def test_a_sender_several_rounds_behind_says_it_is_far_behind() -> None:
    """``Mesh.backlogged`` (the server's ``yield_to``): 1 while more deltas are queued for
    an up peer, not in flight, than one round of its connections carries; ``FAR_BEHIND``
    beyond four rounds, where decisions yield to the sender whatever a turn's length
    (at 1x the flooded node's turns stayed short, it admitted 42,000 new keys/s and sent
    ~30,000 deltas/s, and its backlog reached the cap within seconds)."""

    async def scenario() -> None:
        node = in_process_node(EAST, free_port(), {WEST: f"http://127.0.0.1:{free_port()}"})
        mesh = node.mesh
        peer = mesh.peers[WEST]
        for n in range(3000):
            node.limiter.acquire(f"agent-api-key-b{n}", 1)
        mesh.collect()
        assert mesh.backlogged() == 0, "a peer that is not up does not count"
        peer.state = mesh_module.UP
        assert mesh.backlogged() == 1
        real = mesh.clock
        mesh.clock = lambda: real() + NS_PER_S  # its oldest delta waits a second: far
        assert mesh.backlogged() == HttpServer.FAR_BEHIND
        mesh.clock = real
        for n in range(3000, 9000):
            node.limiter.acquire(f"agent-api-key-b{n}", 1)
        mesh.collect()
        assert mesh.backlogged() == HttpServer.FAR_BEHIND
        keys, chunks, _ = peer.take(len(peer.outbox) * 1000)  # all in flight: not behind
        assert mesh.backlogged() == 0
        peer.unsent(keys, chunks)  # the message failed: queued again
        assert mesh.backlogged() == HttpServer.FAR_BEHIND

    asyncio.run(scenario())
