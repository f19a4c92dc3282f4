"""Issue 16: ``bucketmesh reconcile`` against a node holding 1,000,000 buckets: how long the
run takes, the node's CPU, and how long the node's decisions stall meanwhile, for this tree
and for a baseline tree (``--baseline REV``) in the same run.

Method
    One node (region ``east``, sync enabled, a generated secret; its peer ``west`` is a
    closed port), memory backend with a snapshot file (written at stop only:
    ``snapshotInterval`` a day, as the default 5 s would have the node snapshotting a
    million buckets through the whole run). It is filled once with N buckets
    through ``POST /v1/rate/batch`` (500 keys per request, shaped like the seed's
    ``agent-api-key-<hex>``) and stopped (final snapshot). For each contender, a copy of
    that snapshot is restored by a fresh node started from the contender's ``src/``
    (so both serve the same state; the restore is the bulk load after which this tree
    calls ``gc.freeze``). Then:

    1. idle: decisions probed back to back (one keep-alive connection, ``GET /v1/rate``
       on one key) for ``--idle`` seconds;
    2. reconcile: the same probe while ``bucketmesh reconcile --dry-run`` (this tree's
       tool, default ``--page-keys`` 20,000) reads every range from the node.

    Per contender: pulls, run time, the node's CPU (user + system) over the run, and the
    probe's p50 / p99 / max latency idle and during the run (the longest stall of a
    decision). The baseline is ``git archive REV src`` unpacked into a temporary directory.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/reconcile.py [--quick] [--baseline REV]
[--append]`` (``--quick``: 100,000 buckets).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import _report

HOST = "127.0.0.1"
BATCH = 500
CLUSTER = "reconcile-bench"
HERE_SRC = _report.REPO_ROOT / "src"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def write_config(workdir: Path, port: int, snapshot: Path, n: int) -> Path:
    config = workdir / f"east-{port}.yaml"
    config.write_text(
        f"region: east\nnode: n1\nlisten: {HOST}:{port}\n"
        "sync:\n  enabled: true\n"
        f"  syncClusterId: {CLUSTER}\n  peers: [east, west]\n"
        f"  peerUrls: {{west: 'http://{HOST}:{free_port()}'}}\n"
        "  secret: ${BUCKETMESH_SYNC_SECRET}\n"
        # the snapshot is the bulk load; none is written during the run (one of a million
        # buckets every 5 s, the default, would be most of the node's work)
        f"storage:\n  backend: memory\n  snapshot: {snapshot}\n  durability: relaxed\n"
        "  snapshotInterval: 86400000\n"
        # no shedding: the probe measures stalls, and a 503 would hide one
        f"limits:\n  maxBuckets: {n + 1000}\n  shedLag: 3600000\n"
        "buckets:\n  - name: flood\n"
        '    key: "agent-api-key-{{ .Request.Header.X-API-Key }}"\n'
        "    capacity: 5000\n    refillRate: 50\n    ttl: 86400\n    mode: shared\n",
        encoding="utf-8",
    )
    return config


class Node:
    def __init__(self, config: Path, port: int, src: Path, env: dict[str, str]) -> None:
        self.port = port
        log = config.with_suffix(".log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bucketmesh", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**env, "PYTHONPATH": str(src)},
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(OSError):
                if request(port, "GET", "/readyz")[0] == 200:
                    return
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise SystemExit(f"reconcile bench: the node did not start; see {config}.log")
            time.sleep(0.1)

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Probe(threading.Thread):
    """Decisions back to back on one keep-alive connection; each one's latency in ms."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[float] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
        while not self.stopping.is_set():
            started = time.perf_counter()
            conn.request("GET", "/v1/rate", headers={"X-API-Key": "probe"})
            conn.getresponse().read()
            self.latencies.append((time.perf_counter() - started) * 1000)
        conn.close()

    def finish(self) -> tuple[float, float, float]:
        self.stopping.set()
        self.join()
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        return statistics.median(ordered), p99, ordered[-1]


def fill(workdir: Path, n: int, env: dict[str, str]) -> Path:
    """A snapshot of a node holding ``n`` buckets."""
    snapshot = workdir / "seed.snap"
    port = free_port()
    node = Node(write_config(workdir, port, snapshot, n), port, HERE_SRC, env)
    try:
        for first in range(0, n, BATCH):
            items = [
                {"key": f"agent-api-key-{i:016x}", "rule": "flood", "tokens": 1}
                for i in range(first, min(n, first + BATCH))
            ]
            status, body = request(
                port, "POST", "/v1/rate/batch", json.dumps({"requests": items}).encode()
            )
            if status != 200:
                raise SystemExit(f"reconcile bench: filling failed: {status} {body[:300]!r}")
    finally:
        node.stop()
    return snapshot


@dataclass
class Result:
    contender: str
    pulls: int
    keys: int
    run_s: float
    cpu_s: float
    idle: tuple[float, float, float]
    during: tuple[float, float, float]


def measure(
    name: str, src: Path, seed: Path, workdir: Path, n: int, idle_s: float, env: dict[str, str]
) -> Result:
    snapshot = workdir / f"{name}.snap"
    shutil.copyfile(seed, snapshot)
    port = free_port()
    node = Node(write_config(workdir, port, snapshot, n), port, src, env)
    try:
        probe = Probe(port)
        probe.start()
        time.sleep(idle_s)  # the idle figure is a duration by definition
        idle = probe.finish()
        secret_file = workdir / "secret"
        secret_file.write_text(env["BUCKETMESH_SYNC_SECRET"])
        probe = Probe(port)
        probe.start()
        cpu0 = node.cpu_s()
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "bucketmesh", "reconcile", "--cluster", CLUSTER,
             "--url", f"east=http://{HOST}:{port}", "--secret-file", str(secret_file),
             "--dry-run", "--format", "json", "--quiet", "--timeout", "120"],
            capture_output=True, text=True, env={**env, "PYTHONPATH": str(HERE_SRC)},
            check=False,
        )  # fmt: skip
        run_s = time.monotonic() - started
        cpu_s = node.cpu_s() - cpu0
        during = probe.finish()
    finally:
        node.stop()
    if done.returncode not in (0, 1):
        raise SystemExit(f"reconcile failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    region = report["regions"]["east"]
    return Result(name, region["requests"], region["keys"], run_s, cpu_s, idle, during)


def baseline_src(rev: str, workdir: Path) -> Path:
    archive = subprocess.run(
        ["git", "archive", rev, "src"], cwd=_report.REPO_ROOT, capture_output=True, check=True
    ).stdout
    target = workdir / f"baseline-{rev}"
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target / "src"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 buckets")
    parser.add_argument("--buckets", type=int, default=None, help="default 1,000,000")
    parser.add_argument("--baseline", help="a git revision to compare with (its src/)")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle probing")
    parser.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args(argv)
    n = args.buckets or (100_000 if args.quick else 1_000_000)
    env = dict(os.environ, BUCKETMESH_SYNC_SECRET=secrets.token_urlsafe(32))
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bucketmesh-reconcile-") as tmp:
        workdir = Path(tmp)
        started = time.monotonic()
        seed = fill(workdir, n, env)
        print(f"filled {n:,} buckets in {time.monotonic() - started:.0f} s", flush=True)
        contenders = [("this tree", HERE_SRC)]
        if args.baseline:
            contenders.append((args.baseline, baseline_src(args.baseline, workdir)))
        for name, src in contenders:
            results.append(measure(name.replace(" ", "-"), src, seed, workdir, n, args.idle, env))
            results[-1].contender = name
            print(results[-1], flush=True)
    columns = ["contender", "buckets", "pulls", "run s", "node CPU s",
               "idle p50 / p99 / max ms", "during p50 / p99 / max ms"]  # fmt: skip
    cells = [
        [r.contender, f"{r.keys:,}", f"{r.pulls}", f"{r.run_s:.1f}", f"{r.cpu_s:.1f}",
         " / ".join(f"{v:.1f}" for v in r.idle), " / ".join(f"{v:.1f}" for v in r.during)]
        for r in results
    ]  # fmt: skip
    title = f"Reconcile at {n:,} buckets: run time, node CPU, decision stalls"
    _report.print_table(title, columns, cells)
    if args.append:
        body = (
            "One node restored from the same snapshot per contender; `bucketmesh reconcile "
            "--dry-run` (default `--page-keys` 20,000) against it while one connection "
            "probes decisions back to back (its latencies: p50 / p99 / max, the max being "
            "the longest stall of a decision).\n\n"
            + _report.markdown_table(columns, cells)
            + "\n\nCommand: `PYTHONPATH=src .venv/bin/python benchmarks/reconcile.py"
            + (" --quick" if args.quick else "")
            + (f" --baseline {args.baseline}" if args.baseline else "")
            + " --append`\n"
        )
        _report.append_section(title, body, machine=_report.machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
