"""A full garbage collection on a node holding a million buckets made at runtime.

CPython's cyclic collector walks every tracked container in a full (generation 2)
collection, and runs one each time what survived into generation 2 grew by a quarter;
the process answers nothing meanwhile. core/heap.py keeps buckets and their entries
lists out of those walks in the compiled build. This script builds, in one process, the
heap of a node whose keys arrived at runtime (not restored, so not frozen by
``serve``'s start-up ``gc.freeze()``) and times full collections over it:

    one region   one limiter, N keys decided (a bucket each, no other replica's entry)
    two regions  two limiters of N keys each, both deciding on every key and merging
                 each other's deltas (a bucket and an entries list each): what each
                 region of a mesh holds, twice, as one process would hold two nodes

For each: the containers the collector tracks above the bare interpreter's, and the
median of ROUNDS full collections (``gc.collect()``), against the same collection over
the bare heap measured first in the same process. Run it on an older tree (without
core/heap.py) for the before; the script imports nothing that tree lacks. Context for
docs/operations.md, not a target: pauses are timings of one machine.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/gc_pause.py [--quick]``
(``--quick``: 200,000 buckets instead of 1,000,000).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time

import _report

from bucketmesh import _native
from bucketmesh.core.limiter import Limiter
from bucketmesh.core.rules import Rule

ROUNDS = 5
NOW = 1_700_000_000 * 10**9


def _full_collections() -> float:
    """The median pause of ROUNDS full collections, in ms."""
    pauses = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        gc.collect()
        pauses.append((time.perf_counter() - started) * 1e3)
    return statistics.median(pauses)


def _tracked() -> int:
    return len(gc.get_objects())


def _rule() -> Rule:
    return Rule.create("{{ .Request.Header.X-K }}", 10**6, 1000.0, name="flood", mode="shared")


def _decide_all(limiter: Limiter, keys: list[str], at: int) -> None:
    for i, key in enumerate(keys):
        limiter.acquire(key, 1, rule="flood", now=at + i)


def run(n: int) -> list[list[str]]:
    keys = [f"agent-api-key-{i:016x}" for i in range(n)]
    gc.collect()
    bare_objects, bare_ms = _tracked(), _full_collections()
    rows = [["bare interpreter (the script's own objects)", "-", "0", f"{bare_ms:.1f}"]]

    started = time.perf_counter()
    east = Limiter([_rule()], replica_id="east")
    _decide_all(east, keys, NOW)
    made = time.perf_counter() - started
    rows.append(
        [
            f"one region: {n:,} buckets",
            f"{made:.2f}",
            f"{_tracked() - bare_objects:,}",
            f"{_full_collections():.1f}",
        ]
    )

    started = time.perf_counter()
    west = Limiter([_rule()], replica_id="west")
    west.merge(east.collect_deltas(), now=NOW + n)
    _decide_all(west, keys, NOW + 2 * n)
    east.merge(west.collect_deltas(), now=NOW + 3 * n)
    made = time.perf_counter() - started
    rows.append(
        [
            f"two regions: 2 × {n:,} buckets, each with the other's entry",
            f"{made:.2f}",
            f"{_tracked() - bare_objects:,}",
            f"{_full_collections():.1f}",
        ]
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    n = _report.bucket_count(argv, __doc__ or "")
    machine = _report.machine()
    build = "compiled (mypyc)" if _native.compiled() else "pure Python"
    rows = run(n)
    columns = ["heap", "made in (s)", "tracked containers", "full collection (ms, median)"]
    title = f"A full garbage collection over {n:,} runtime buckets ({build} core)"
    note = (
        f"Median of {ROUNDS} `gc.collect()` after each step, in one process. "
        "Command: `PYTHONPATH=src .venv/bin/python benchmarks/gc_pause.py`"
    )
    _report.record_table(title, columns, rows, note, machine=machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
