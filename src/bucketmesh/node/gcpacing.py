"""The cyclic garbage collector in a ``serve`` process: its pauses measured, its full
collections paced.

While a collection runs the process answers nothing, and a full (generation 2) one
walks every container in generation 2. CPython starts one when the objects that
survived into generation 2 have grown by a quarter since the last, and at least ten
generation-1 collections (each after ten young ones) have passed: the count stands in
for the work. On a node it does not.
The buckets, their entries lists and the map of them are kept out of the collector
(core/heap.py), so what generation 2 counts is small, and a full collection starts
after a few thousand objects survive; but what it walks includes a node's big
short-lived containers (lists of a million keys to sync or to index, sets of dirty
keys), so one costs ~15–47 ms in a busy node with a million keys. Measured
(``benchmarks/patch_stall.py``, 1,000,000 keys filled, synced and PATCHed across two
regions, ~30 s, docs/operations.md): unpaced 169–246 full collections and ~3.5 s of
pauses per node, against 20–29 and 1.1–1.5 s when the buckets were tracked (but each
of those walked them all, up to 0.27 s); paced, 20–43 and ~0.3 s, the longest 23–39 ms.

So the process paces them: after each full collection, the share of time since the
previous one that it took is compared with ``BUDGET``. Above it, the number of
generation-1 collections before the next full one (the collector's third threshold)
doubles, up to ``MOST``; below a quarter of it, it halves, down to what it was when
the pacer was installed. Nothing is skipped: cyclic garbage among young objects is
collected by the young collections as before, and garbage that had lived into
generation 2 waits at most ``MOST`` generation-1 collections (~10 × ``MOST`` young
ones, about 9,000,000 container allocations). The threshold moves only at a full
collection, so a node left idle after a burst keeps the raised one until its next; an
idle node promotes little into generation 2. On Python 3.14 and later (the
incremental collector) the third threshold is not used: the pacer then only measures.
Each collection's pause is exported as ``bucketmesh_gc_pause_seconds{generation}``,
and the third threshold as ``bucketmesh_gc_full_threshold``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from bucketmesh.telemetry.metrics import LATENCY_BOUNDS, Histogram

#: a collection's pause can pass a second: a full one walks every tracked container
PAUSE_BOUNDS = (*LATENCY_BOUNDS, 2.5, 5.0)
#: the share of time full collections may take before they are spaced out
BUDGET = 0.02
#: the most generation-1 collections between two full ones (Python's default is 10)
MOST = 1280


class GcPacer:
    """Measures every collection's pause and paces the full ones (module doc).
    ``install`` in a ``serve`` process only: the collector is the whole process's."""

    __slots__ = ("by_generation", "floor", "last_full", "started", "threshold")

    def __init__(self) -> None:
        self.by_generation = tuple(Histogram(PAUSE_BOUNDS) for _ in range(3))
        self.started = 0.0
        self.last_full = time.perf_counter()
        #: the third threshold when installed: never paced below it, restored on remove
        self.floor = self.threshold = gc.get_threshold()[2]

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self.started = now
            return
        pause = now - self.started
        generation = info["generation"]
        self.by_generation[generation].observe(pause)
        if generation == 2:
            self.pace(pause, now - self.last_full)
            self.last_full = now

    def pace(self, pause: float, since: float) -> None:
        """After a full collection of ``pause`` seconds, ``since`` seconds after the end
        of the previous one (its pause included): the next one's threshold."""
        share = pause / since if since > 0 else 1.0
        if share > BUDGET:
            self.threshold = min(self.threshold * 2, MOST)
        elif share < BUDGET / 4:
            self.threshold = max(self.threshold // 2, self.floor)
        else:
            return
        young, older, _ = gc.get_threshold()
        gc.set_threshold(young, older, self.threshold)

    def install(self) -> None:
        if self not in gc.callbacks:
            self.floor = self.threshold = gc.get_threshold()[2]
            self.last_full = time.perf_counter()
            gc.callbacks.append(self)

    def remove(self) -> None:
        """Stop measuring and pacing; the third threshold back to what it was when
        installed, unless someone else has set it since."""
        if self not in gc.callbacks:
            return
        gc.callbacks.remove(self)
        young, older, full = gc.get_threshold()
        if full == self.threshold:
            gc.set_threshold(young, older, self.floor)
        self.threshold = self.floor

    def metrics(self) -> Iterator[Metric]:
        pauses = HistogramMetricFamily(
            "bucketmesh_gc_pause_seconds",
            "Pauses of the cyclic garbage collector (nothing is answered meanwhile), by "
            "generation (2: a full collection)",
            labels=["generation"],
        )
        for generation, histogram in enumerate(self.by_generation):
            pauses.add_metric([str(generation)], histogram.buckets(), histogram.total)
        yield pauses
        yield GaugeMetricFamily(
            "bucketmesh_gc_full_threshold",
            "Generation-1 collections before the next full one (paced: about "
            f"{BUDGET:.0%} of the time at most in full collections)",
            value=self.threshold,
        )
