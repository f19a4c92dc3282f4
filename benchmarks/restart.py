"""R3: a restart with 1,000,000 buckets, from a format-2 (slices, restored whole) and a
format-3 snapshot (partitions, restored lazily): time until the store answers, and
the first decisions after it.

Target R3 (docs/targets.md): serving again within 2 s with 1,000,000 buckets, no
spent token granted again. Each contender writes the same state (every bucket of a
capacity-3 rule charged 3 times, so every key is empty), then the store is opened
from it in this process (``MemoryStore.open``, what ``bucketmesh serve`` does
before it listens), and 1,000 random keys are charged: every one must be denied
(nothing re-granted). Format 2 and format 3 alternate, ``--rounds`` times.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/restart.py [--buckets N] [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _report
from http_rate import HOST, Service, free_port, http_request

from bucketmesh.core.rules import Rule
from bucketmesh.storage.memory import MemoryStore
from bucketmesh.storage.snapshot import SNAPSHOT_MAGIC, SNAPSHOT_SLICE, slice_frame
from bucketmesh.storage.wal import pack

RULE = Rule.create("k-{{ .Request.Query.k }}", 3, 0.0001, name="r3", ttl=86400)


def fill(path: Path, buckets: int, *, partitioned: bool) -> None:
    store = MemoryStore.open(
        [RULE], region="r", node="n", snapshot=path, max_buckets=buckets + 1000
    )
    limiter = store.limiter
    for index in range(buckets):
        key = f"k-{index}"
        for _ in range(3):
            limiter.acquire(key, 1, rule="r3")
    assert store.wal is not None
    store.wal.write_pending()  # the grants in the log's segment the snapshot retires
    if partitioned:
        asyncio.run(store.save_snapshot())
    else:  # the format-2 writer as it was (slices in key order)
        writer = store.snapshot.begin()  # type: ignore[union-attr]
        writer.write(SNAPSHOT_MAGIC + pack(limiter.snapshot_head()))
        keys = list(limiter.buckets)
        for start in range(0, len(keys), SNAPSHOT_SLICE):
            writer.write(slice_frame(limiter.snapshot_part(keys[start : start + SNAPSHOT_SLICE])))
        writer.commit()
        store.wal.retire(store.wal.rotate())
    store.close()


def reopen(path: Path, buckets: int) -> tuple[float, float, int]:
    gc.collect()
    started = time.perf_counter()
    store = MemoryStore.open(
        [RULE], region="r", node="n", snapshot=path, max_buckets=buckets + 1000
    )
    opened = time.perf_counter() - started
    rng = random.Random(7)
    granted = 0
    started = time.perf_counter()
    for _ in range(1000):
        decision = store.acquire(f"k-{rng.randrange(buckets)}", 1, rule="r3")
        granted += decision.allowed
    first = (time.perf_counter() - started) / 1000
    asyncio.run(store.finish_restore())
    assert len(store.limiter) == buckets, len(store.limiter)
    store.close()
    return opened, first, granted


def serve_from(path: Path, buckets: int) -> tuple[float, float, int, float]:
    """``bucketmesh serve`` on the snapshot at ``path``: seconds from the process's
    start until /readyz answers 200, then 200 random keys charged over HTTP (the
    mean seconds each, and how many were granted: none should be)."""
    port = free_port()
    config = path.parent / "serve.yaml"
    config.write_text(
        f"region: r\nnode: n\nlisten: {HOST}:{port}\n"
        f"storage:\n  backend: memory\n  snapshot: {path}\n  snapshotInterval: 600000\n"
        f"limits:\n  maxBuckets: {buckets + 1000}\n"
        'buckets:\n  - name: r3\n    key: "k-{{ .Request.Query.k }}"\n'
        "    capacity: 3\n    refillRate: 0.0001\n    ttl: 86400\n",
        encoding="utf-8",
    )
    node = Service(
        "serve",
        [sys.executable, "-m", "bucketmesh", "serve", "--config", str(config)],
        path.parent,
        port,
    )
    started = time.monotonic()
    node.start("/readyz")
    ready = time.monotonic() - started
    # on a loaded machine the wall clock is mostly waiting for a core: the CPU time
    # the process used until ready is what an idle machine would take, near enough
    stat = Path(f"/proc/{node.pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    rng = random.Random(11)
    granted = 0
    started = time.monotonic()
    try:
        for _ in range(200):
            body = json.dumps({"key": f"k-{rng.randrange(buckets)}", "rule": "r3"})
            status, _ = http_request(
                port,
                "POST",
                "/v1/rate",
                body=body.encode(),
                headers={"Content-Type": "application/json"},
            )
            granted += status == 200
        first = (time.monotonic() - started) / 200
    finally:
        assert node.proc is not None
        os.killpg(node.proc.pid, signal.SIGKILL)  # no final snapshot: not measured here
        node.proc.wait()
    return ready, first, granted, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--buckets", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--lazy-only", action="store_true", help="leave format 2 out")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 2)
    machine = _report.machine()
    print(f"R3 restart, {args.buckets:,} buckets, {rounds} rounds; {machine.describe()}")
    results: dict[str, list[tuple[float, float, int]]] = {
        "format 2 (whole)": [],
        "format 3 (lazy)": [],
    }
    with tempfile.TemporaryDirectory(prefix="bucketmesh-r3-") as tmp:
        paths = {}
        for name, partitioned in (("format 2 (whole)", False), ("format 3 (lazy)", True)):
            if args.lazy_only and not partitioned:
                del results[name]
                continue
            paths[name] = Path(tmp) / name.split()[1] / "state.snap"
            fill(paths[name], args.buckets, partitioned=partitioned)
            print(f"{name}: {paths[name].stat().st_size / 1e6:.0f} MB", flush=True)
        for _ in range(rounds):
            for name, path in paths.items():
                results[name].append(reopen(path, args.buckets))
                print(name, results[name][-1], flush=True)
        served = serve_from(paths["format 3 (lazy)"], args.buckets)
        print("bucketmesh serve, format 3:", served, flush=True)
    columns = [
        "snapshot",
        "open (s), median",
        "first decisions, mean µs (1,000 in-process; 200 over HTTP)",
        "granted again",
    ]
    rows = [
        [
            name,
            f"{statistics.median(r[0] for r in runs):.2f}",
            f"{statistics.median(r[1] for r in runs) * 1e6:.0f}",
            str(sum(r[2] for r in runs)),
        ]
        for name, runs in results.items()
    ]
    rows.append(
        [
            "format 3, `bucketmesh serve` (process start → /readyz 200; 200 random keys over HTTP)",
            f"{served[0]:.2f} (CPU {served[3]:.2f})",
            f"{served[1] * 1e6:.0f}",
            str(served[2]),
        ]
    )
    _report.print_table("R3: reopening the store", columns, rows)
    lazy = statistics.median(r[0] for r in results["format 3 (lazy)"])
    regranted = sum(r[2] for runs in results.values() for r in runs) + served[2]
    verdict = (
        f"format 3: the store opens in {lazy:.2f} s with {args.buckets:,} buckets, "
        f"`bucketmesh serve` is ready {served[0]:.2f} s after its start, having used "
        f"{served[3]:.2f} s of CPU (target ≤ 2 s), "
        f"{regranted} tokens granted again: R3 "
        f"{'met' if served[0] <= 2 and regranted == 0 else 'missed'}"
    )
    print(verdict)
    if not args.no_record:
        body = _report.markdown_table(columns, rows) + f"\n\n**{verdict}**\n"
        _report.append_section("R3 restart with many buckets", body, machine=machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
