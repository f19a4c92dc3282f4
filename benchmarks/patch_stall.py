"""A rule PATCH over a million buckets: how long the nodes' event loops stop.

Two regions on loopback, ``east`` and ``west``, syncing (r6.py's nodes, memory backend,
no lag shedding), each with the loop-stall detector of ``benchmarks/stallwatch`` (a
heartbeat every 5 ms; a turn of the loop later than 100 ms is written down with the
stacks sampled meanwhile). ``east`` is filled with N buckets of the ``flood`` rule
through ``POST /v1/rate/batch`` (500 per request) and ``west`` gets them by sync. Then
the stall records are cleared, the rule is PATCHed on ``east`` (capacity doubled), and
for SETTLE_S seconds the nodes adopt it, collect a delta for every bucket, send, merge.
The table gives each node's stalls over 100 ms after the PATCH: how many, the longest,
and where the longest's most frequent sampled stack was (a sample is taken when the
watchdog gets the GIL, so a full garbage collection shows as whatever Python line it
interrupted). Context for docs/sync.md ("Outboxes"), not a target: stall lengths are
timings of one machine.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/patch_stall.py [--quick]``
(``--quick``: 200,000 buckets instead of 1,000,000).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

import _report
import httpx
import r6

BATCH = 500
SETTLE_S = 15.0
READY_S = 60.0


def _wait(check: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"patch_stall: {what} within {seconds:g} s")


def _stalls(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(n: int, workdir: Path) -> list[list[str]]:
    stalls = workdir / "stalls"
    stalls.mkdir()
    r6.STALLS["dir"] = stalls
    east_port, west_port = r6.free_port(), r6.free_port()
    secret = secrets.token_urlsafe(32)
    limits = {"maxBuckets": n + 1000, "shedLag": r6.NEVER_MS}
    east = r6.Node(workdir, "east", east_port, {"west": west_port}, limits, secret)
    west = r6.Node(workdir, "west", west_port, {"east": east_port}, limits, secret)
    nodes = {"east": east, "west": west}
    try:
        with httpx.Client(timeout=120) as client:
            for node in nodes.values():
                _wait(
                    lambda node=node: client.get(node.url + "/readyz").status_code == 200,
                    READY_S,
                    f"{node.region} was not ready",
                )
            for first in range(0, n, BATCH):
                items = [
                    {"key": f"agent-api-key-{i:016x}", "rule": "flood", "tokens": 1}
                    for i in range(first, min(n, first + BATCH))
                ]
                answer = client.post(east.url + "/v1/rate/batch", json={"requests": items})
                if answer.status_code != 200:
                    raise SystemExit(f"patch_stall: the fill got {answer.status_code}")
            _wait(
                lambda: client.get(west.url + "/v1/status").json()["buckets"] >= n,
                300.0,
                f"west did not get the {n:,} buckets by sync",
            )
            for node in nodes.values():  # what the fill stalled is not the PATCH's
                (stalls / f"{node.region}-{node.port}.jsonl").write_text("")
            started = time.monotonic()
            patched = client.patch(
                east.url + "/v1/buckets/flood",
                json={"capacity": 2 * r6.RULE["capacity"]},  # type: ignore[operator]
                headers={"Authorization": f"Bearer {r6.ADMIN_TOKEN}"},
            )
            answered = time.monotonic() - started
            if patched.status_code != 200:
                raise SystemExit(f"patch_stall: the PATCH got {patched.status_code}")
            time.sleep(SETTLE_S)  # a benchmark's fixed observation window, not a test's wait
        rows = []
        for region, node in nodes.items():
            found = _stalls(stalls / f"{region}-{node.port}.jsonl")
            longest = max(found, key=lambda s: float(s["gap_ms"]), default=None)  # type: ignore[arg-type]
            where = "-"
            if longest is not None and longest["stacks"]:
                frames = longest["stacks"][0][1]  # type: ignore[index]
                where = " ← ".join(frames[:2])
            rows.append(
                [
                    region,
                    f"{answered:.2f}" if region == "east" else "-",
                    str(len(found)),
                    "-" if longest is None else f"{float(longest['gap_ms']):,.0f}",  # type: ignore[arg-type]
                    where,
                ]
            )
        return rows
    finally:
        for node in nodes.values():
            node.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200,000 buckets")
    parser.add_argument("--buckets", type=int, help="how many buckets (default 1,000,000)")
    args = parser.parse_args(argv)
    n = args.buckets or (200_000 if args.quick else 1_000_000)
    machine = _report.machine()
    with tempfile.TemporaryDirectory(prefix="bench-patch-") as tmp:
        rows = run(n, Path(tmp))
    columns = ["node", "PATCH answered (s)", "stalls > 100 ms", "longest (ms)", "where"]
    title = f"A rule PATCH over {n:,} buckets, 2 regions: event-loop stalls"
    _report.print_table(title, columns, rows)
    body = "\n\n".join(
        [
            _report.markdown_table(columns, rows),
            f"Stalls over 100 ms in the {SETTLE_S:g} s after the PATCH (benchmarks/stallwatch). "
            "Command: `PYTHONPATH=src .venv/bin/python benchmarks/patch_stall.py`",
        ]
    )
    _report.append_section(title, body, machine=machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
