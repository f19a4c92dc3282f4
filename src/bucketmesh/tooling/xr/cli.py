"""``bucketmesh xr``: ``load``, ``verify`` and ``run`` — the cross-region test framework's commands.

Exit status: 0 when everything passed, 1 when a check or an SLO failed, 2 for
a usage or scenario error (the message names the file and field).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Coroutine
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from bucketmesh.tooling.xr import DEFAULT_KEY_TEMPLATE

T = TypeVar("T")


def _urls(values: list[str] | None) -> dict[str, str]:
    urls: dict[str, str] = {}
    for value in values or []:
        region, sep, url = value.partition("=")
        if not sep or not region or not url.startswith(("http://", "https://")):
            raise argparse.ArgumentTypeError(f"--url {value!r}: expected REGION=http://host:port")
        urls[region] = url.rstrip("/")
    return urls


def _rates(value: str, regions: list[str]) -> dict[str, float]:
    if "=" not in value:
        return dict.fromkeys(regions, float(value))
    rates = {}
    for part in value.split(","):
        region, _, rate = part.partition("=")
        rates[region.strip()] = float(rate)
    return rates


def _run_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def cmd_load(args: argparse.Namespace) -> int:
    from bucketmesh.tooling.xr.live import table
    from bucketmesh.tooling.xr.load import LoadGenerator, Recorder, Target

    urls = _urls(args.url)
    if not urls:
        print("bucketmesh xr load: give at least one --url REGION=URL", file=sys.stderr)
        return 2
    try:
        rates = _rates(args.rate, list(urls))
    except ValueError:
        print(f"bucketmesh xr load: --rate {args.rate!r} is not a number", file=sys.stderr)
        return 2
    unknown = set(rates) - set(urls)
    if unknown:
        print(
            f"bucketmesh xr load: --rate names unknown regions {sorted(unknown)}", file=sys.stderr
        )
        return 2
    recorder = Recorder(time.monotonic())
    generator = LoadGenerator(
        [Target(r, urls[r], rate) for r, rate in rates.items() if rate > 0],
        key=args.key,
        duration_s=args.duration,
        recorder=recorder,
        connections=args.connections,
        failover=args.failover,
        all_urls=urls,
    )

    async def main() -> None:
        from rich.console import Console
        from rich.live import Live

        console = Console(file=sys.stderr)
        if console.is_terminal:
            with Live(table(recorder, {}, 0.0), console=console, refresh_per_second=2) as live:
                await generator.run(
                    lambda: live.update(table(recorder, {}, time.monotonic() - recorder.t0))
                )
        else:
            await generator.run()

    _run_loop(main())
    from rich.console import Console

    Console().print(table(recorder, {}, time.monotonic() - recorder.t0))
    total = recorder.totals()
    h = total.latency
    print(
        f"{total.sent} requests: {total.allowed} allowed, {total.denied} denied, "
        f"{total.errors} errors; latency p50 {h.get_value_at_percentile(50) / 1000:.2f} ms, "
        f"p95 {h.get_value_at_percentile(95) / 1000:.2f} ms, "
        f"p99 {h.get_value_at_percentile(99) / 1000:.2f} ms, max {h.get_max_value() / 1000:.2f} ms"
    )
    return 0 if total.errors == 0 else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from bucketmesh.tooling.xr.verify import verify

    urls = _urls(args.url)
    if len(urls) < 1:
        print("bucketmesh xr verify: give every region as --url REGION=URL", file=sys.stderr)
        return 2
    verdict = _run_loop(verify(urls, args.key, args.tolerance))
    for line in verdict.lines():
        print(line)
    return 0 if verdict.passed else 1


def cmd_run(args: argparse.Namespace) -> int:
    from bucketmesh.tooling.xr.report import write_report
    from bucketmesh.tooling.xr.runner import RunError, Runner
    from bucketmesh.tooling.xr.scenario import ScenarioError, load_scenario
    from bucketmesh.tooling.xr.slo import evaluate, passed

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as error:
        print(f"bucketmesh xr: scenario error: {error}", file=sys.stderr)
        return 2
    if args.slo:
        try:
            scenario = scenario.with_slo(dict(item.partition("=")[::2] for item in args.slo))
        except (ScenarioError, ValueError) as error:
            print(f"bucketmesh xr: --slo: {error}", file=sys.stderr)
            return 2
    urls = _urls(args.url)
    if urls and set(urls) != set(scenario.regions):
        scenario.regions = list(urls)
    factor = args.scale
    if args.duration is not None:
        factor = args.duration / max(scenario.nominal_duration, 1e-9)
    if factor != 1.0:
        scenario = scenario.scaled(factor)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else Path("xr-reports") / f"{scenario.name}-{stamp}"
    runner = Runner(
        scenario,
        out,
        urls=urls or None,
        admin_token=args.admin_token,
        key_template=args.key_template,
        live=not args.no_live,
        metrics_port=args.metrics_port,
    )
    try:
        result = _run_loop(runner.run())
    except RunError as error:
        print(f"bucketmesh xr: {error}", file=sys.stderr)
        return 1
    slos = evaluate(result)
    report = write_report(result, slos, out)
    from rich.console import Console
    from rich.table import Table

    grid = Table(title=f"SLOs — {scenario.name}")
    for column in ("SLO", "threshold", "measured", "verdict"):
        grid.add_column(column)
    for s in slos:
        colour = {"PASS": "green", "FAIL": "red"}.get(s.verdict, "white")
        grid.add_row(s.name, s.threshold, s.measured, f"[{colour}]{s.verdict}[/{colour}]")
    Console(width=120).print(grid)
    failed = [s.name for s in slos if s.passed is False]
    print(f"report: {report}")
    if failed:
        print(f"SLO FAILED: {', '.join(failed)}")
        return 1
    print("every SLO met")
    return 0 if passed(slos) else 1


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    xr = sub.add_parser(
        "xr", help="cross-region tests: load, verify, run SCENARIO.yaml (SLOs, report)"
    )
    xr_sub = xr.add_subparsers(dest="xr_command", required=True)
    url_help = "REGION=URL of one region (repeat for every region)"

    load = xr_sub.add_parser("load", help="open-loop traffic on one key, with live progress")
    load.add_argument("--url", action="append", required=True, help=url_help)
    load.add_argument(
        "--rate", default="500", help="requests/s per region, or REGION=N,REGION=N (default 500)"
    )
    load.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    load.add_argument("--key", default="xr-load", help="the X-API-Key sent (default xr-load)")
    load.add_argument("--connections", type=int, default=4, help="keep-alive connections/region")
    load.add_argument(
        "--failover", action="store_true", help="send to another region when one is unreachable"
    )
    load.set_defaults(func=cmd_load)

    check = xr_sub.add_parser("verify", help="do all regions agree on one bucket?")
    check.add_argument("--url", action="append", required=True, help=url_help)
    check.add_argument("--key", required=True, help="the bucket key, e.g. agent-api-key-demo")
    check.add_argument(
        "--tolerance", type=float, default=1.0, help="allowed spread in tokens (default 1)"
    )
    check.set_defaults(func=cmd_verify)

    run = xr_sub.add_parser("run", help="play a scenario, check its SLOs, write a report")
    run.add_argument("scenario", help="scenario YAML (see scenarios/)")
    run.add_argument("--out", help="report directory (default xr-reports/<name>-<time>)")
    run.add_argument(
        "--url",
        action="append",
        help=url_help + "; without --url the runner starts a local mesh with injected latency",
    )
    run.add_argument("--admin-token", help="admin token of the nodes (partitions via the API)")
    run.add_argument(
        "--key-template",
        default=DEFAULT_KEY_TEMPLATE,
        help="bucket key for the X-API-Key sent, {} = the key (default %(default)s)",
    )
    scale = run.add_mutually_exclusive_group()
    scale.add_argument("--scale", type=float, default=1.0, help="multiply every duration")
    scale.add_argument("--duration", type=float, help="scale the scenario to about S seconds")
    run.add_argument(
        "--slo",
        action="append",
        metavar="NAME=VALUE",
        help="override one SLO threshold of the scenario, e.g. latency_p95_ms=50 (repeatable)",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        help="serve the runner's own series (tokens per region, outcomes, faults) for "
        "Prometheus on 127.0.0.1:PORT during the run (deploy/grafana/)",
    )
    run.add_argument("--no-live", action="store_true", help="no live table, log lines instead")
    run.set_defaults(func=cmd_run)
