"""R6: one ``bucketmesh serve`` under open-loop load at 1×, 2× and 3× its capacity.

Target R6 (docs/targets.md): at 3× the rate a node can serve it sheds early with
503 + Retry-After instead of queueing without bound; the p99 of the requests it
does serve stays bounded and the process lives, its memory bounded.

Method
    ``wrk`` is closed loop: a slow server slows it down and it never offers 3× of
    anything. This uses the open-loop generator of ``bucketmesh xr``
    (tooling/xr/load.py, wrk2-style: request *i* is due at start + i / rate and sent
    then, answered or not; latency counted from the due time). GET /v1/rate with
    ``X-API-Key`` on a rule that admits everything, 4 keep-alive connections.

    1. Capacity, measured in this run: a fresh node with shedding off is offered far
       more than it can serve (``--probe`` requests/s) for a few seconds; capacity =
       answers / time until the last answer (it queues, so it works flat out).
    2. For shedding on (``limits.shedLag`` 500 ms, the default) and off (``shedLag``
       an hour: never), a fresh node per row, offered 1×, 2×, 3× the capacity for
       ``--seconds``: offered per second, served (200/429) per second until the last
       answer, shed (503), p99 of served, peak RSS (VmHWM), the node's CPU (user +
       system over the same span: below ~100 % the node was not saturated and the
       single-process generator was the bottleneck), errors (anything else: another
       status, a reset, no answer within 10 s), and whether the process was still alive at the end.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/overload.py [--quick] [--append]``
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import _report
import yaml
from hdrh.histogram import HdrHistogram

from bucketmesh.tooling.xr.load import LoadGenerator, Recorder, Target, new_histogram

HOST = "127.0.0.1"
RULE = {
    "name": "bench",
    "key": "agent-api-key-{{ .Request.Header.X-API-Key }}",
    "capacity": 10**12,
    "refillRate": 10**9,
}
NEVER_MS = 3_600_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Node:
    def __init__(self, workdir: Path, shedding: bool) -> None:
        self.port = free_port()
        limits = {} if shedding else {"shedLag": NEVER_MS, "maxInFlight": 10**9}
        config = {
            "region": "bench",
            "node": "n1",
            "sync": {"enabled": False},
            "storage": {"backend": "memory"},
            "buckets": [RULE],
            "limits": limits,
        }
        path = workdir / f"node-{self.port}.yaml"
        path.write_text(yaml.safe_dump(config))
        argv = [sys.executable, "-m", "bucketmesh", "serve", "--config", str(path)]
        argv += ["--listen", f"{HOST}:{self.port}"]
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=workdir
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=1)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    conn.close()
                    break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the node did not start: {self.process.stderr!r}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_s(self) -> float:
        """User + system CPU seconds the node used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Row:
    shedding: str
    multiple: str
    offered: float
    served: float
    shed: int
    p99_ms: float
    rss_mb: float
    cpu_pct: float
    errors: int
    alive: bool


@dataclass
class Offered:
    """What one or more generator processes saw (summed)."""

    sent: int = 0
    served: int = 0
    shed: int = 0
    errors: int = 0
    span_s: float = 0.0  # from the first due time to the last answer
    histogram: bytes = b""


def _offer_one(url: str, rate: float, seconds: float, t_start: float) -> Offered:
    """One generator process: open loop at ``rate`` from wall clock ``t_start``."""
    time.sleep(max(0.0, t_start - time.time()))
    t0 = time.monotonic()
    recorder = Recorder(t0)
    generator = LoadGenerator(
        [Target("node", url, rate)],
        key="overload",
        duration_s=seconds,
        recorder=recorder,
        connections=4,
        timeout_s=10.0,
    )
    asyncio.run(generator.run())
    total = recorder.totals()
    shed = total.error_kinds.get("HTTP 503", 0)
    return Offered(
        total.sent,
        total.allowed + total.denied,
        shed,
        total.errors - shed,
        (recorder.last_answer or time.monotonic()) - t0,
        total.latency.encode(),
    )


def offer(url: str, rate: float, seconds: float, generators: int) -> tuple[Offered, float]:
    """``rate`` split over ``generators`` processes started together; the summed outcome
    and the p99 (ms) of the served requests."""
    t_start = time.time() + 1.0
    with multiprocessing.get_context("spawn").Pool(generators) as pool:
        parts = pool.starmap(_offer_one, [(url, rate / generators, seconds, t_start)] * generators)
    histogram = new_histogram()
    total = Offered()
    for part in parts:
        total.sent += part.sent
        total.served += part.served
        total.shed += part.shed
        total.errors += part.errors
        total.span_s = max(total.span_s, part.span_s)
        histogram.add(HdrHistogram.decode(part.histogram))
    p99 = histogram.get_value_at_percentile(99) / 1000 if total.served else float("nan")
    return total, p99


def capacity(workdir: Path, probe: float, seconds: float, generators: int) -> float:
    node = Node(workdir, shedding=False)
    try:
        total, _ = offer(node.url, probe, seconds, generators)
    finally:
        node.stop()
    return total.served / total.span_s if total.span_s > 0 else 0.0


def run_row(
    workdir: Path, shedding: bool, multiple: int, rate: float, seconds: float, generators: int
) -> Row:
    node = Node(workdir, shedding)
    try:
        cpu0 = node.cpu_s()
        total, p99 = offer(node.url, rate, seconds, generators)
        cpu_pct = 100 * (node.cpu_s() - cpu0) / (total.span_s + 1.0)
        alive = node.alive()
        rss = node.peak_rss_mb()
    finally:
        node.stop()
    return Row(
        "on" if shedding else "off",
        f"{multiple}×",
        total.sent / seconds,
        total.served / total.span_s,
        total.shed,
        p99,
        rss,
        cpu_pct,
        total.errors,
        alive,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s per row instead of 8 s")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--probe", type=float, default=20000.0, help="requests/s to find capacity")
    parser.add_argument("--generators", type=int, default=2, help="load generator processes")
    parser.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args(argv)
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    with tempfile.TemporaryDirectory(prefix="bucketmesh-overload-") as tmp:
        workdir = Path(tmp)
        cap = capacity(workdir, args.probe, min(seconds, 4.0), args.generators)
        print(f"capacity: {cap:,.0f} requests/s (shedding off, offered {args.probe:,.0f}/s)")
        rows = [
            run_row(workdir, shedding, multiple, multiple * cap, seconds, args.generators)
            for shedding in (True, False)
            for multiple in (1, 2, 3)
        ]
    columns = ["shedding", "load", "offered/s", "served/s", "shed (503)", "p99 served ms",
               "peak RSS MB", "node CPU %", "errors", "alive"]  # fmt: skip
    cells = [
        [r.shedding, r.multiple, f"{r.offered:,.0f}", f"{r.served:,.0f}", f"{r.shed:,}",
         f"{r.p99_ms:,.1f}", f"{r.rss_mb:,.0f}", f"{r.cpu_pct:.0f}", f"{r.errors:,}",
         "yes" if r.alive else "NO"]
        for r in rows
    ]  # fmt: skip
    title = f"R6 overload: capacity {cap:,.0f} requests/s, {seconds:g} s per row"
    _report.print_table(title, columns, cells)
    if args.append:
        body = (
            f"Capacity measured in the same run: {cap:,.0f} requests/s (a node with shedding "
            f"off offered {args.probe:,.0f}/s; answers / time to the last answer). Open loop "
            f"(tooling/xr/load.py) in {args.generators} processes, 4 connections each, "
            "GET /v1/rate, a fresh node per row. Node CPU below ~100 % means the node was "
            "not the bottleneck (the generators, on the same 2 shared cores, were).\n\n"
            + _report.markdown_table(columns, cells)
            + "\n\nCommand: `PYTHONPATH=src .venv/bin/python benchmarks/overload.py"
            + (" --quick" if args.quick else "")
            + " --append`\n"
        )
        _report.append_section(title, body, machine=_report.machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
