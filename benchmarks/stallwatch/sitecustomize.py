"""A loop-stall detector for benchmark nodes (``benchmarks/r6.py --stalls DIR``).

Loaded as ``sitecustomize`` by a node started with this directory on ``PYTHONPATH`` and
``BUCKETMESH_STALLWATCH`` naming a file. It wraps ``uvloop.run``/``asyncio.run`` so that
the node's loop runs a heartbeat every 5 ms; a watchdog thread samples the main thread's
stack every 5 ms while the heartbeat is overdue by more than ``BUCKETMESH_STALLWATCH_MS``
(default 100); when the heartbeat comes back late by more than that, one JSON line is
written: when, how long the loop did not turn, and the sampled stacks, most frequent
first. A sample is taken when the watchdog gets the GIL: C code that holds it (a large
msgspec encode) shows as the Python line that called it, and as ``late_ms``, how much
later than asked the watchdog got to run. Benchmark tooling only: not imported by the
package, not used by tests.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
import threading
import time

_PATH = os.environ.get("BUCKETMESH_STALLWATCH")
_THRESHOLD_S = float(os.environ.get("BUCKETMESH_STALLWATCH_MS", "100")) / 1000
_BEAT_S = 0.005


class _Watch:
    def __init__(self, path: str) -> None:
        self.out = open(path, "a", buffering=1)  # noqa: SIM115
        self.last = time.monotonic()
        self.main = threading.get_ident()
        self.lock = threading.Lock()
        self.samples: list[tuple[float, tuple[str, ...]]] = []
        self.late_ms = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None

    def beat(self) -> None:
        assert self.loop is not None
        self.loop.call_later(_BEAT_S, self.beat)
        now = time.monotonic()
        gap = now - self.last
        self.last = now
        if gap > _THRESHOLD_S:
            with self.lock:
                samples, self.samples = self.samples, []
                late, self.late_ms = self.late_ms, 0.0
            counts = collections.Counter(stack for _, stack in samples)
            record = {
                "wall": time.time(),
                "gap_ms": round(gap * 1000, 1),
                "samples": len(samples),
                "watchdog_late_ms": round(late, 1),
                "stacks": [[n, list(stack)] for stack, n in counts.most_common(4)],
            }
            self.out.write(json.dumps(record) + "\n")
        else:
            with self.lock:
                self.samples.clear()
                self.late_ms = 0.0

    def watchdog(self) -> None:
        while True:
            asked = time.monotonic()
            time.sleep(_BEAT_S)
            now = time.monotonic()
            if now - self.last <= _THRESHOLD_S:
                continue
            frame = sys._current_frames().get(self.main)
            stack: list[str] = []
            while frame is not None and len(stack) < 40:
                code = frame.f_code
                stack.append(
                    f"{os.path.basename(code.co_filename)}:{code.co_name}:{frame.f_lineno}"
                )
                frame = frame.f_back
            with self.lock:
                self.samples.append((now, tuple(stack[:14])))
                self.late_ms = max(self.late_ms, (now - asked - _BEAT_S) * 1000)

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.last = time.monotonic()
        loop.call_later(_BEAT_S, self.beat)
        threading.Thread(target=self.watchdog, daemon=True, name="stallwatch").start()


def _wrap(run):  # type: ignore[no-untyped-def]
    def wrapped(main, *args, **kwargs):  # type: ignore[no-untyped-def]
        async def watched():  # type: ignore[no-untyped-def]
            assert _PATH is not None
            _Watch(_PATH).install(asyncio.get_running_loop())
            return await main

        return run(watched(), *args, **kwargs)

    return wrapped


if _PATH:
    asyncio.run = _wrap(asyncio.run)
    try:
        import uvloop

        uvloop.run = _wrap(uvloop.run)
    except ImportError:
        pass
