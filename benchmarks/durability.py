"""The cost of durability: POST /v1/rate with ``durability: strict`` vs ``relaxed``.

Contenders, three ``bucketmesh serve`` processes started by this script, same
rules, same client, alternating rounds:

    memory only: no snapshot file, hence no write-ahead log (a kill -9 loses
        everything since the start; the baseline).
    relaxed: snapshot + log; each response waits for its grant's write(2)
        (survives kill -9, not power loss).
    strict: snapshot + log; responses wait for their group's fsync (survives
        power loss).

Method
    wrk, 1 thread, 50 connections, POST /v1/rate with one ``X-API-Key`` (one hot
    key whose rule holds 10^12 tokens, so every request is granted and logged),
    10 s rounds (4 s with --quick), a 1 s warm-up each, then alternating rounds;
    median and best per contender, and the ratios of medians; and the server's
    own CPU time per request (user + system from /proc, per round), which the
    neighbours' load moves far less than requests/s. Counts after the run: no
    non-2xx, no socket errors; for strict, the log's groups and fsyncs
    (``bucketmesh_wal_groups`` / ``bucketmesh_wal_fsyncs`` on /metrics), hence
    the average group size — how many grants one fsync carried. The snapshot
    and log live in a temporary directory on the file system of ``$TMPDIR``;
    fsync latency is the disk's, so strict figures depend on the machine's
    storage far more than on its CPU.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/durability.py [--quick]`` (needs wrk).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import _report
import http_rate as hb

API_KEY = "durable"
RULES = (
    '  - name: hot\n    key: "agent-api-key-{{ .Request.Header.X-API-Key }}"\n'
    "    capacity: 1000000000000\n    refillRate: 1000000000\n"
)


def service(workdir: Path, name: str, durability: str | None) -> hb.Service:
    port = hb.free_port()
    storage = "storage:\n  backend: memory\n"
    if durability is not None:
        storage += f"  snapshot: {workdir / name / 'state.snap'}\n  durability: {durability}\n"
    config = workdir / f"{name}.yaml"
    config.write_text(
        f"region: bench\nnode: {name}\nlisten: {hb.HOST}:{port}\n{storage}buckets:\n{RULES}",
        encoding="utf-8",
    )
    executable = hb.VENV_BIN / "bucketmesh"
    argv = [str(executable)] if executable.exists() else [sys.executable, "-m", "bucketmesh"]
    argv += ["serve", "--config", str(config)]
    return hb.Service(name, argv, workdir, port)


def metric(port: int, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    status, body = hb.http_request(port, "GET", "/metrics")
    assert status == 200
    return sum(
        value
        for sample, found, value in hb.parse_metrics(body.decode())
        if sample == name and labels.items() <= found.items()
    )


class CpuMeter:
    """The server's own CPU time (user + system, /proc) per request of each round:
    less moved by the neighbours' load than requests/s, though not immune to it."""

    def __init__(self, svc: hb.Service) -> None:
        self.svc = svc
        self.started = 0.0
        self.per_request_us: list[float] = []

    def cpu_s(self) -> float:
        with open(f"/proc/{self.svc.pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def before(self) -> None:
        self.started = self.cpu_s()

    def check(self, result: hb.WrkResult) -> list[str]:
        if result.requests:
            self.per_request_us.append((self.cpu_s() - self.started) / result.requests * 1e6)
        return []

    @property
    def median(self) -> float:
        return statistics.median(self.per_request_us or [0.0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short rounds")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (scripts/ensure-debian-packages.sh wrk)", file=sys.stderr)
        return 1
    seconds, rounds = (4.0, 2) if args.quick else (10.0, 3)
    machine = _report.machine()
    log: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bucketmesh-durability-") as tmp:
        workdir = Path(tmp)
        services = {
            "memory only": service(workdir, "none", None),
            "relaxed": service(workdir, "relaxed", "relaxed"),
            "strict": service(workdir, "strict", "strict"),
        }
        lua = hb.wrk_lua(workdir / "post.lua", body="", headers={"X-API-Key": API_KEY})
        try:
            for svc in services.values():
                svc.start("/readyz")
            meters = {label: CpuMeter(svc) for label, svc in services.items()}
            contenders = [
                hb.Contender(
                    label,
                    svc,
                    "/v1/rate",
                    lua,
                    check=meters[label].check,
                    before=meters[label].before,
                )
                for label, svc in services.items()
            ]
            problems = hb.interleave(contenders, rounds, seconds, 1.0, log)
            strict_port = services["strict"].port
            groups = metric(strict_port, "bucketmesh_wal_groups_total")
            fsyncs = metric(strict_port, "bucketmesh_wal_fsyncs_total")
            granted = metric(strict_port, "bucketmesh_decisions_total", result="allowed")
        finally:
            for svc in services.values():
                svc.stop()
    for contender in contenders:
        if contender.non2xx:
            problems.append(f"{contender.label}: {contender.non2xx} non-2xx responses")
        if contender.socket_errors:
            problems.append(f"{contender.label}: socket errors {contender.socket_errors}")
    by = {c.label: c for c in contenders}
    columns = [
        "contender",
        "median req/s",
        "best req/s",
        "p50 ms (median)",
        "p99 ms (median)",
        "server CPU µs/request (median)",
    ]
    rows = [
        [
            c.label,
            f"{c.median:,.0f}",
            f"{c.best:,.0f}",
            f"{c.p50_median:.2f}",
            f"{c.p99_median:.2f}",
            f"{meters[c.label].median:.1f}",
        ]
        for c in contenders
    ]
    _report.print_table("Durability cost, POST /v1/rate, 1 hot key", columns, rows)
    ratios = [
        ["relaxed / memory only", f"{by['relaxed'].median / by['memory only'].median:.2f}×"],
        ["strict / relaxed", f"{by['strict'].median / by['relaxed'].median:.2f}×"],
        ["strict / memory only", f"{by['strict'].median / by['memory only'].median:.2f}×"],
        [
            "server CPU per request, relaxed / memory only",
            f"{meters['relaxed'].median / meters['memory only'].median:.2f}×",
        ],
        [
            "server CPU per request, strict / relaxed",
            f"{meters['strict'].median / meters['relaxed'].median:.2f}×",
        ],
        [
            "strict: grants per fsync (group commit)",
            f"{granted / fsyncs if fsyncs else 0:.1f} "
            f"({granted:,.0f} grants, {groups:,.0f} groups, {fsyncs:,.0f} fsyncs)",
        ],
    ]
    _report.print_table("Ratios of medians", ["", ""], ratios)
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    if not args.no_record:
        body = (
            f"wrk 1 thread, {hb.CONNECTIONS} connections, {rounds} rounds of {seconds:g} s per "
            "contender, alternating; every request granted (and logged); "
            "`benchmarks/durability.py`.\n\n"
            + _report.markdown_table(columns, rows)
            + "\n\n"
            + _report.markdown_table(["ratio", "value"], ratios)
            + ("\n\nProblems: " + "; ".join(problems) if problems else "")
            + "\n"
        )
        _report.append_section("Durability cost (benchmarks/durability.py)", body, machine=machine)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
