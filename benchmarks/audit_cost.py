"""What the audit trail costs on P2: ``bucketmesh serve`` under wrk, ``POST /v1/rate``,
with the trail off, sampled (``audit.sample: 0.1``) and complete (``1.0``).

Three ``bucketmesh serve`` processes, identical but for their ``audit:`` section (a
file in the run's temporary directory), each with the P2 "admit" rule (every
request allowed). After a 1 s warm-up of each, wrk (1 thread, 50 connections, the
static POST of ``benchmarks/http_rate.py``) drives them in interleaved rounds, the
order rotating every round, so that the load of a shared machine hits all three
alike; the table gives each one's median and best requests/s and median p99, and
the ratio of medians to the trail off. Checked after the run, from each node's
/metrics: the complete trail holds one line per decision, and no event was
dropped (``bucketmesh_audit_dropped_events_total``); the sampled one holds what
its sampling kept.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/audit_cost.py [--rounds N] [--seconds S]``
(needs wrk). Appends a section to BENCHMARKS.md unless ``--no-record``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _report
import http_rate

MODES = (("off", None), ("sampled 0.1", 0.1), ("complete", 1.0))


def metric(port: int, name: str) -> float:
    _, body = http_rate.http_request(port, "GET", "/metrics", timeout=5.0)
    return sum(
        value for sample, _, value in http_rate.parse_metrics(body.decode()) if sample == name
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds per mode (default 4)")
    parser.add_argument("--seconds", type=float, default=5.0, help="one wrk round (default 5)")
    parser.add_argument("--no-record", action="store_true", help="do not append BENCHMARKS.md")
    args = parser.parse_args(argv)
    if (missing := http_rate.require_tools()) is not None and "wrk" in missing:
        print(f"audit cost: {missing}", file=sys.stderr)
        return 2
    machine = _report.machine()
    print(
        f"audit trail on P2: wrk -t1 -c{http_rate.CONNECTIONS}, {args.rounds} rounds × "
        f"{args.seconds:g} s per mode, interleaved"
    )
    print(f"machine: {machine.describe()}")
    scenario = next(s for s in http_rate.SCENARIOS if s.name == "admit")
    results: dict[str, list[http_rate.WrkResult]] = {name: [] for name, _ in MODES}
    checks: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="bucketmesh-audit-cost-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        lua = http_rate.wrk_lua(
            workdir / "post.lua",
            body='{"tokens":1}',
            headers={"X-API-Key": http_rate.API_KEY, "Content-Type": "application/json"},
        )
        services: dict[str, tuple[http_rate.Service, Path | None]] = {}
        try:
            for name, sample in MODES:
                slug = name.split()[0]
                service = http_rate.bucketmesh_service(
                    workdir, f"bucketmesh-{slug}", http_rate.rule_yaml(scenario)
                )
                trail = None
                if sample is not None:
                    trail = workdir / f"{slug}.jsonl"
                    config = workdir / f"bucketmesh-{slug}.yaml"
                    config.write_text(
                        config.read_text()
                        + f"audit:\n  enabled: true\n  path: {trail}\n  sample: {sample}\n"
                    )
                service.start("/healthz")
                services[name] = (service, trail)
            for service, _ in services.values():
                http_rate.run_wrk(f"http://{http_rate.HOST}:{service.port}/v1/rate", lua, 1.0)
            names = list(services)
            for number in range(args.rounds):
                order = names[number % 3 :] + names[: number % 3]
                for name in order:
                    service, _ = services[name]
                    url = f"http://{http_rate.HOST}:{service.port}/v1/rate"
                    result, _ = http_rate.run_wrk(url, lua, args.seconds)
                    results[name].append(result)
                    print(
                        f"  round {number + 1}  {name:<12} {result.rps:>10,.0f} req/s  "
                        f"p99 {result.p99_ms:7.2f} ms"
                    )
            for name, (service, trail) in services.items():
                port = service.port
                allowed = metric(port, "bucketmesh_decisions_total")
                dropped = metric(port, "bucketmesh_audit_dropped_events_total")
                service.stop()  # the trail is flushed before the process exits
                if trail is None:
                    continue
                files = [trail, *trail.parent.glob(trail.name + ".*")]  # rotated ones too
                lines = sum(sum(1 for _ in path.open()) for path in files if path.exists())
                expected = f"= decisions {allowed:,.0f}" if name == "complete" else "≤ decisions"
                ok = lines == allowed if name == "complete" else 0 < lines < allowed
                checks.append(
                    [
                        name,
                        f"{lines:,}",
                        expected,
                        f"{dropped:,.0f}",
                        "ok" if ok and dropped == 0 else "WRONG",
                    ]
                )
        finally:
            for service, _ in services.values():
                service.stop()

    base = statistics.median(r.rps for r in results["off"])
    rows = []
    for name, _ in MODES:
        runs = results[name]
        median = statistics.median(r.rps for r in runs)
        rows.append(
            [
                name,
                f"{max(r.rps for r in runs):,.0f}",
                f"{median:,.0f}",
                f"{median / base:.2f}×",
                f"{statistics.median(r.p99_ms for r in runs):.2f}",
                ", ".join(f"{r.rps:,.0f}" for r in runs),
            ]
        )
    columns = ["audit", "best req/s", "median req/s", "÷ off", "p99 ms (median)", "rounds"]
    _report.print_table("POST /v1/rate, audit trail off / sampled / complete", columns, rows)
    check_columns = ["trail", "lines", "expected", "dropped", "result"]
    _report.print_table("Trail checks", check_columns, checks)
    if not args.no_record:
        body = (
            f"Command: `benchmarks/audit_cost.py --rounds {args.rounds} --seconds "
            f"{args.seconds:g}` — three `bucketmesh serve` (P2 admit rule) identical but for "
            "`audit:` (off; a file, `sample: 0.1`; a file, complete), wrk -t1 -c50 static "
            "POST, rounds interleaved in rotating order.\n\n"
            + _report.markdown_table(columns, rows)
            + "\n\n"
            + _report.markdown_table(check_columns, checks)
            + "\n"
        )
        path = _report.append_section(
            f"Audit trail on P2: off / sampled / complete, {args.rounds}×{args.seconds:g} s",
            body,
            machine=machine,
        )
        print(f"recorded in {path}")
    return 0 if all(row[-1] == "ok" for row in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
