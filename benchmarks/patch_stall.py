"""A rule PATCH over a million buckets: how long the nodes' event loops stop.

Two regions on loopback, ``east`` and ``west``, syncing (r6.py's pair, memory backend,
``east`` without lag shedding), each with the loop-stall detector of ``benchmarks/stallwatch`` (a
heartbeat every 5 ms; a turn of the loop later than 100 ms is written down with the
stacks sampled meanwhile). ``east`` is filled with N buckets of the ``flood`` rule
through ``POST /v1/rate/batch`` (500 per request) and ``west`` gets them by sync. Then
the stall records are cleared, the rule is PATCHed on ``east`` (capacity doubled), and
for SETTLE_S seconds the nodes adopt it, collect a delta for every bucket, send, merge.
The table gives each node's stalls over 100 ms after the PATCH: how many, the longest,
and where the longest's most frequent sampled stack was (a sample is taken when the
watchdog gets the GIL, so a full garbage collection shows as whatever Python line it
interrupted); and the full garbage collections the node ran in that time, with their
summed pause (its ``bucketmesh_gc_pause_seconds{generation="2"}``; "-" on a tree
that does not export it). Context for docs/sync.md ("Outboxes"), not a target: stall lengths are
timings of one machine.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/patch_stall.py [--quick] [--redis]``
(``--quick``: 200,000 buckets instead of 1,000,000; ``--redis``: ``east`` is a Redis
node, on a redis-server of its own, and the stalls are those of its mirror, which holds
every key it granted).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _report
import httpx
import r6

BATCH = 500
SETTLE_S = 15.0
SYNCED_S = 300.0


def _stalls(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _row(region: str, answered: str, found: list[dict[str, Any]]) -> list[str]:
    """A node's stalls: how many, the longest, and its most frequent sampled stack."""
    longest = max(found, key=lambda stall: float(stall["gap_ms"]), default=None)
    if longest is None:
        return [region, answered, "0", "-", "-"]
    where = " ← ".join(longest["stacks"][0][1][:2]) if longest["stacks"] else "-"
    return [region, answered, str(len(found)), f"{float(longest['gap_ms']):,.0f}", where]


def _full_collections(client: httpx.Client, url: str) -> tuple[float, float] | None:
    """A node's full collections so far and their summed pause (s), from /metrics."""
    found: dict[str, float] = {}
    for line in client.get(url + "/metrics").text.splitlines():
        for part in ("count", "sum"):
            if line.startswith(f'bucketmesh_gc_pause_seconds_{part}{{generation="2"}}'):
                found[part] = float(line.split()[-1])
    return (found["count"], found["sum"]) if len(found) == 2 else None


def _collections_between(
    before: tuple[float, float] | None, after: tuple[float, float] | None
) -> list[str]:
    if before is None or after is None:
        return ["-", "-"]
    return [f"{after[0] - before[0]:.0f}", f"{(after[1] - before[1]) * 1e3:,.0f}"]


def _redis_server(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server of east's own on a free loopback port, no persistence."""
    port = r6.free_port()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", r6.HOST, "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return process, f"redis://{r6.HOST}:{port}/0"


def run(n: int, workdir: Path, on_redis: bool = False) -> list[list[str]]:
    stalls = workdir / "stalls"
    stalls.mkdir()
    r6.STALLS["dir"] = stalls
    redis_process = None
    storage = None
    if on_redis:
        redis_process, url = _redis_server(workdir)
        storage = {"backend": "redis", "redisUrl": url, "redisTimeoutMs": 5000}
    # r6's pair: east without lag shedding, both up and pulled before it returns (the
    # Redis node waits for its redis-server to answer before it is ready)
    try:
        pair = r6.Pair(workdir, shedding=False, reserved_listener=False, max_buckets=n + 1000,
                       east_storage=storage)  # fmt: skip
    except BaseException:
        if redis_process is not None:
            redis_process.kill()
        raise
    east, west = pair.east, pair.west
    try:
        with httpx.Client(timeout=120) as client:
            for first in range(0, n, BATCH):
                items = [
                    {"key": f"agent-api-key-{i:016x}", "rule": "flood", "tokens": 1}
                    for i in range(first, min(n, first + BATCH))
                ]
                answer = client.post(east.url + "/v1/rate/batch", json={"requests": items})
                if answer.status_code != 200:
                    raise SystemExit(f"patch_stall: the fill got {answer.status_code}")
            deadline = time.monotonic() + SYNCED_S
            # west gets them by sync; a Redis east reads them back into its mirror
            for node in (east, west):
                while client.get(node.url + "/v1/status").json()["buckets"] < n:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"patch_stall: {node.region} lacks the {n:,} buckets")
                    time.sleep(0.1)
            for node in (east, west):  # what the fill stalled is not the PATCH's
                (stalls / f"{node.region}-{node.port}.jsonl").write_text("")
            collected = [_full_collections(client, node.url) for node in (east, west)]
            started = time.monotonic()
            patched = client.patch(
                east.url + "/v1/buckets/flood",
                json={"capacity": 2 * int(r6.RULE["capacity"])},
                headers={"Authorization": f"Bearer {r6.ADMIN_TOKEN}"},
            )
            answered = time.monotonic() - started
            if patched.status_code != 200:
                raise SystemExit(f"patch_stall: the PATCH got {patched.status_code}")
            time.sleep(SETTLE_S)  # a benchmark's fixed observation window, not a test's wait
            after = [_full_collections(client, node.url) for node in (east, west)]
    finally:
        pair.stop()
        if redis_process is not None:
            redis_process.kill()
            redis_process.wait()
    return [
        _row("east", f"{answered:.2f}", _stalls(stalls / f"east-{east.port}.jsonl"))
        + _collections_between(collected[0], after[0]),
        _row("west", "-", _stalls(stalls / f"west-{west.port}.jsonl"))
        + _collections_between(collected[1], after[1]),
    ]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    on_redis = "--redis" in argv
    if on_redis:
        argv.remove("--redis")
    n = _report.bucket_count(argv, __doc__ or "")
    machine = _report.machine()
    with tempfile.TemporaryDirectory(prefix="bench-patch-") as tmp:
        rows = run(n, Path(tmp), on_redis)
    columns = [
        "node",
        "PATCH answered (s)",
        "stalls > 100 ms",
        "longest (ms)",
        "where",
        "full collections",
        "their pause (ms)",
    ]
    title = f"A rule PATCH over {n:,} buckets, 2 regions: event-loop stalls"
    if on_redis:
        title += " (east on Redis)"
    note = (
        f"Stalls over 100 ms in the {SETTLE_S:g} s after the PATCH (benchmarks/stallwatch). "
        "Command: `PYTHONPATH=src .venv/bin/python benchmarks/patch_stall.py`"
    )
    _report.record_table(title, columns, rows, note, machine=machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
