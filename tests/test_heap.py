"""Buckets kept out of the cyclic garbage collector (core/heap.py), and the collector's
pauses as a metric of a serve process.

A full collection walks every tracked container; a node holds one bucket per live key,
and one entries list in each bucket another replica touched. In the compiled build
every bucket and every such list is untracked when it is made, whichever way it is
made (a decision on a new key, a peer's delta, a snapshot restored), so a full
collection no longer walks them. The pure build (BUCKETMESH_PURE=1) keeps them tracked:
``untrack`` is the identity there, and nothing a decision sees differs.
"""

from __future__ import annotations

import gc
import os
import sys

from conftest import ServerFactory, eventually, make_config

from bucketmesh import _native
from bucketmesh.core import heap
from bucketmesh.core.bucket import Bucket
from bucketmesh.core.limiter import Limiter
from bucketmesh.core.rules import Rule
from bucketmesh.node import gcpacing
from bucketmesh.node.gcpacing import GcPacer
from bucketmesh.telemetry.metrics import NodeMetrics

NOW = 1_700_000_000 * 10**9
KEYS = [f"agent-{i}" for i in range(40)]


def rule() -> Rule:
    return Rule.create("{{ .Request.Header.X-K }}", 100, 10.0, name="r", mode="shared")


def tracked(limiter: Limiter) -> list[object]:
    """The buckets of ``limiter``, their entries lists and the map holding them, that the
    collector walks."""
    out: list[object] = [limiter.buckets] if gc.is_tracked(limiter.buckets) else []
    for bucket in limiter.buckets.values():
        out += [held for held in (bucket, bucket._entries) if gc.is_tracked(held)]
    return out


def walked(limiter: Limiter) -> list[object]:
    """What the collector should walk of ``limiter``: nothing where heap.c is built;
    the map, every bucket and every entries list on the pure build (untrack is the
    identity there)."""
    if heap.COMPILED:
        return []
    held: list[object] = [limiter.buckets]
    for bucket in limiter.buckets.values():
        held += [bucket] + ([bucket._entries] if isinstance(bucket._entries, list) else [])
    return held


def lists(limiter: Limiter) -> int:
    return sum(isinstance(bucket._entries, list) for bucket in limiter.buckets.values())


def test_the_compiled_helper_is_built_with_the_core() -> None:
    """``make install`` builds heap.c with the mypyc core (and where mypyc is missing,
    heap.c alone); BUCKETMESH_PURE=1 loads neither."""
    if _native.compiled():
        assert heap.COMPILED
    if os.environ.get(_native.PURE_ENV, "") not in ("", "0"):
        assert not heap.COMPILED


def test_untrack_is_the_identity_that_leaves_pure_objects_tracked() -> None:
    held = [1, "a"]
    assert heap.untrack(held) is held
    assert gc.is_tracked(held) is not heap.COMPILED
    assert heap.untrack(7) == 7  # not a container: returned as it is


def test_every_way_a_bucket_is_made_leaves_it_and_its_entries_out_of_the_collector() -> None:
    east = Limiter([rule()], replica_id="east")
    west = Limiter([rule()], replica_id="west")
    for i, key in enumerate(KEYS):  # new keys: Limiter._fresh
        assert east.acquire(key, 1, rule="r", now=NOW + i).allowed
    assert len(east.buckets) == len(KEYS) and tracked(east) == walked(east)

    west.merge(east.collect_deltas(), now=NOW + 100)  # Bucket.from_delta: a lone entry
    assert len(west.buckets) == len(KEYS) and tracked(west) == walked(west)
    for i, key in enumerate(KEYS):  # a grant beside the lone entry unpacks it to a list
        assert west.acquire(key, 1, rule="r", now=NOW + 200 + i).allowed
    assert lists(west) == len(KEYS) and tracked(west) == walked(west)

    east.merge(west.collect_deltas(), now=NOW + 300)  # a new replica's entry appended
    assert lists(east) == len(KEYS) and tracked(east) == walked(east)

    restored = Limiter.restore(east.snapshot(), [rule()], replica_id="east/2")
    assert len(restored.buckets) == len(KEYS) and lists(restored) == len(KEYS)
    assert tracked(restored) == walked(restored)

    # nothing the collector skipped is lost: a full collection, then every bucket still
    # holds both replicas' grants (100 capacity, 2 spent) and decides
    gc.collect()
    for i, key in enumerate(KEYS):
        decision = restored.acquire(key, 0, rule="r", now=NOW + 300 + i)
        assert decision.allowed and decision.tokens_remaining == 98, (key, decision)


def test_no_bucket_is_ever_in_a_reference_cycle() -> None:
    """What makes untracking safe: buckets, their entries lists and the map are freed by
    reference counting alone, on every path that makes or changes them. On the pure
    build (tracked, PURE_TESTS) a cycle through any of them would show up here as
    garbage the collector had to find; on the compiled one the same paths must run."""
    gc.collect()
    was = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        east = Limiter([rule()], replica_id="east/n/1")
        later = Limiter([rule()], replica_id="east/n/2")
        eu = Limiter([rule()], replica_id="eu/n/1")
        west = Limiter([rule()], replica_id="west/n/1")
        for i, key in enumerate(KEYS):
            for limiter in (east, later, eu, west):
                limiter.acquire(key, 1, rule="r", now=NOW + i)
        for peer in (east, later, eu):
            west.merge(peer.collect_deltas(), now=NOW + 100)
        west.configure("r", capacity=200, now=NOW + 200)
        west.configure(KEYS[0], capacity=50, now=NOW + 201)
        for bucket in west.buckets.values():  # east/n/1 retired into 1 token
            assert bucket.fold({"east/n": (2, 1)}, "west/n/1")
            if heap.COMPILED:
                assert not gc.is_tracked(bucket._entries)
        restored = Limiter.restore(west.snapshot(), [rule()], replica_id="west/n/2")
        assert restored.expire(NOW + 10**15) == len(KEYS)
        del east, later, eu, west, restored, bucket
        gc.collect()
        found = [held for held in gc.garbage if isinstance(held, (Bucket, Limiter))]
    finally:
        gc.set_debug(was)
        gc.garbage.clear()
    assert found == []


def test_a_bucket_is_freed_by_reference_counting_alone() -> None:
    """Untracked, a bucket its limiter drops is still freed at once: it is in no cycle,
    so reference counting frees it (and lets go of its config)."""
    limiter = Limiter([rule()], replica_id="east")
    limiter.acquire("gone", 1, rule="r", now=NOW)
    config = limiter.buckets["gone"].config
    held = sys.getrefcount(config)
    del limiter.buckets["gone"]
    assert sys.getrefcount(config) == held - 1


def test_the_collector_pauses_are_counted_by_generation() -> None:
    pacer = GcPacer()
    pacer.install()
    pacer.install()  # once only
    try:
        gc.collect()
        gc.collect(0)
        metrics = NodeMetrics()
        metrics.labelled.append(pacer.metrics)
        text = metrics.exposition().decode()
        shown = pacer.threshold
    finally:
        pacer.remove()
    full, young = pacer.by_generation[2].count, pacer.by_generation[0].count
    assert full >= 1 and young >= 1
    gc.collect()  # removed: no longer counted
    assert pacer.by_generation[2].count == full
    assert f'bucketmesh_gc_pause_seconds_count{{generation="2"}} {float(full)}' in text
    assert 'bucketmesh_gc_pause_seconds_bucket{generation="2",le="+Inf"}' in text
    assert f"bucketmesh_gc_full_threshold {float(shown)}" in text


def test_removing_the_pacer_leaves_a_threshold_someone_else_set() -> None:
    young, older, full = gc.get_threshold()
    pacer = GcPacer()
    pacer.install()
    try:
        pacer.pace(0.040, 0.200)
        assert gc.get_threshold()[2] >= 2 * full  # (more if a full collection came too)
        pacer.remove()
        assert gc.get_threshold() == (young, older, full)  # removed: as it was
        pacer.install()
        gc.set_threshold(young, older, 77)  # an operator's own choice meanwhile
        pacer.remove()
        assert gc.get_threshold() == (young, older, 77)
    finally:
        pacer.remove()
        gc.set_threshold(young, older, full)


def test_full_collections_are_spaced_out_past_the_budget_and_back_after_it() -> None:
    """Full collections taking more than BUDGET of the time double the generation-1
    collections before the next one, up to MOST; cheap ones halve it back to the
    interpreter's own threshold. Fed pauses, not timed: no test asserts a timing."""
    young, older, full = gc.get_threshold()
    pacer = GcPacer()  # not installed: only the pauses fed here move it
    try:
        pacer.pace(0.040, 0.200)  # 20 %: spaced out
        assert pacer.threshold == 2 * full and gc.get_threshold() == (young, older, 2 * full)
        for _ in range(20):
            pacer.pace(0.040, 0.200)
        assert pacer.threshold == gcpacing.MOST
        pacer.pace(0.001, 0.100)  # 1 %: within the budget, left as it is
        assert pacer.threshold == gcpacing.MOST
        for _ in range(20):
            pacer.pace(0.001, 10.0)  # 0.01 %: back
        assert pacer.threshold == full and gc.get_threshold() == (young, older, full)
    finally:
        gc.set_threshold(young, older, full)


def test_a_serve_process_reports_its_collections(serve: ServerFactory) -> None:
    node = serve(make_config())
    with node.client() as client:

        def collected() -> bool:
            for i in range(200):
                client.post("/v1/rate", headers={"X-API-Key": f"gc-{i}"})
            text = client.get("/metrics").text
            line = next(
                (
                    line
                    for line in text.splitlines()
                    if line.startswith('bucketmesh_gc_pause_seconds_count{generation="0"}')
                ),
                None,
            )
            assert line is not None, "a serve process exports bucketmesh_gc_pause_seconds"
            return float(line.split()[-1]) > 0

        eventually(collected, "a young collection of the serve process is counted")
