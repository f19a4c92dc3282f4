"""``bucketmesh xr``: ``load``, ``verify`` and ``run`` — the cross-region test framework's commands.

Exit status: 0 when everything passed, 1 when a check or an SLO failed, 2 for
a usage or scenario error (the message names the argument, or the file and
field). Every argument is checked before anything is sent or started.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

from bucketmesh.core.limits import MAX_KEY_BYTES
from bucketmesh.telemetry.log import logger
from bucketmesh.tooling.xr import DEFAULT_KEY_TEMPLATE, bucket_key

T = TypeVar("T")
log = logger("xr")

#: Bounds of the load flags: a generator past a million requests/s per region is a
#: mistake (one core sends some tens of thousands), a run longer than a day too.
MAX_RATE = 1_000_000.0
MAX_DURATION_S = 86_400.0
MAX_CONNECTIONS = 1000
#: An X-API-Key value the generator can put in a request head as it is.
MAX_API_KEY_CHARS = 1024


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    error: Callable[[str], NoReturn] = args.usage_error
    error(message)


# -- argument types: each raises ArgumentTypeError, which argparse reports as
# -- "argument --flag: message" with exit status 2 --------------------------------------


def _url(value: str) -> tuple[str, str]:
    """``REGION=http://host:port`` → (region, URL without a trailing slash)."""
    usage = f"expected REGION=http://host:port, got {value!r}"
    region, sep, url = value.partition("=")
    region = region.strip()
    if not sep or not region or any(c.isspace() for c in region):
        raise argparse.ArgumentTypeError(usage)
    try:
        parts = urlsplit(url)
        _ = parts.port  # validates the port
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{usage} ({error})") from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or any(c.isspace() or not c.isprintable() for c in url)
    ):
        raise argparse.ArgumentTypeError(usage)
    return region, url.rstrip("/")


def _number(low: float, high: float, *, above_low: bool = False) -> Callable[[str], float]:
    """A finite number in ``[low, high]`` (``(low, high]`` with ``above_low``)."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (above_low and value == low):
            bounds = f"> {low:g}" if above_low else f">= {low:g}"
            if math.isfinite(high):
                bounds += f" and <= {high:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {bounds}, got {text}")
        return value

    return convert


def _integer(low: int, high: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {text}")
        return value

    return convert


def _rate(value: str) -> float | dict[str, float]:
    """Requests/s per region: one number for every region, or ``REGION=N,REGION=N``."""
    if "=" not in value:
        return _number(0.0, MAX_RATE, above_low=True)(value)
    rates: dict[str, float] = {}
    for part in value.split(","):
        region, _, rate = part.partition("=")
        region = region.strip()
        if not region:
            raise argparse.ArgumentTypeError(f"expected REGION=N,REGION=N, got {value!r}")
        if region in rates:
            raise argparse.ArgumentTypeError(f"names region {region!r} twice")
        try:
            rates[region] = _number(0.0, MAX_RATE)(rate.strip())
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"{region}: {error}") from None
    if not any(rates.values()):
        raise argparse.ArgumentTypeError(f"gives no region a rate above 0: {value!r}")
    return rates


def _api_key(value: str) -> str:
    """An X-API-Key value: visible ASCII, as the request head carries it verbatim."""
    if not value or len(value) > MAX_API_KEY_CHARS:
        raise argparse.ArgumentTypeError(
            f"must be 1-{MAX_API_KEY_CHARS} characters, got {len(value)}"
        )
    if not all("!" <= c <= "~" for c in value):
        raise argparse.ArgumentTypeError(
            "must be visible ASCII characters (no spaces or control characters)"
        )
    return value


def _bucket_key(value: str) -> str:
    """A bucket key as the nodes accept it: 1 to MAX_KEY_BYTES bytes of UTF-8."""
    size = len(value.encode("utf-8", "surrogatepass"))
    if not value or size > MAX_KEY_BYTES:
        raise argparse.ArgumentTypeError(f"must be 1-{MAX_KEY_BYTES} bytes, got {size}")
    return value


def _key_template(value: str) -> str:
    """A bucket key with one ``{}`` where the X-API-Key goes, or one ``{sha256}``
    where its hash goes (a rule written with ``| sha256``)."""
    try:
        rendered: str | None = bucket_key(value, "k")
    except (IndexError, KeyError, ValueError):
        rendered = None
    if rendered is None or value.count("{}") + value.count("{sha256}") != 1:
        raise argparse.ArgumentTypeError(
            "must hold one {} where the X-API-Key goes or one {sha256} where its hash goes "
            f"(and no other braces), got {value!r}"
        )
    return value


def _slo(value: str) -> tuple[str, str]:
    """``NAME=VALUE``; a numeric threshold must be a finite number >= 0."""
    name, sep, threshold = value.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    name = name.strip()
    if name != "over_admission_model":
        try:
            number = float(threshold)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number >= 0):
            raise argparse.ArgumentTypeError(
                f"{name}: the threshold must be a finite number >= 0, got {threshold!r}"
            )
    return name, threshold.strip()


def _scenario_file(value: str) -> str:
    path = Path(value)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise argparse.ArgumentTypeError(f"{value} {what}; give a scenario YAML file")
    return value


def _urls(args: argparse.Namespace) -> dict[str, str]:
    """The ``--url`` values as region → URL; a region given twice is a usage error."""
    urls: dict[str, str] = {}
    for region, url in args.url or []:
        if region in urls:
            _usage_error(args, f"argument --url: region {region!r} is given twice")
        urls[region] = url
    return urls


def _run_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def cmd_load(args: argparse.Namespace) -> int:
    from bucketmesh.tooling.xr.live import table
    from bucketmesh.tooling.xr.load import LoadGenerator, Recorder, Target

    urls = _urls(args)
    rates = args.rate if isinstance(args.rate, dict) else dict.fromkeys(urls, args.rate)
    unknown = set(rates) - set(urls)
    if unknown:
        _usage_error(args, f"argument --rate: names regions no --url gives: {sorted(unknown)}")
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

    urls = _urls(args)
    verdict = _run_loop(verify(urls, args.key, args.tolerance))
    for line in verdict.lines():
        print(line)
    return 0 if verdict.passed else 1


def region_mapping(scenario: list[str], deployment: list[str]) -> dict[str, str] | None:
    """How a scenario's regions map onto a deployment's (``--url`` order): a name
    both have stays itself, the others pair up in order. None when the counts
    differ: a phase could name a region the deployment does not have."""
    if len(scenario) != len(deployment):
        return None
    spare = iter([region for region in deployment if region not in scenario])
    return {region: region if region in deployment else next(spare) for region in scenario}


def cmd_run(args: argparse.Namespace) -> int:
    from bucketmesh.tooling.cluster import region_problem
    from bucketmesh.tooling.xr.report import write_report
    from bucketmesh.tooling.xr.runner import RunError, Runner
    from bucketmesh.tooling.xr.scenario import ScenarioError, load_scenario
    from bucketmesh.tooling.xr.slo import evaluate, passed

    urls = _urls(args)
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as error:
        _usage_error(args, f"scenario error: {error}")
    except (UnicodeDecodeError, OSError) as error:
        _usage_error(args, f"scenario error: {args.scenario}: cannot read it: {error}")
    if args.slo:
        try:
            scenario = scenario.with_slo(dict(args.slo))
        except (ScenarioError, ValueError) as error:
            _usage_error(args, f"argument --slo: {str(error).removeprefix('--slo: ')}")
    if urls and set(urls) != set(scenario.regions):
        names = region_mapping(scenario.regions, list(urls))
        if names is None:
            _usage_error(
                args,
                f"argument --url: the scenario {scenario.name} has {len(scenario.regions)} "
                f"regions ({', '.join(scenario.regions)}) and --url gives {len(urls)} "
                f"({', '.join(urls)}); give one --url per scenario region (its phases "
                "name them), e.g. --url "
                + " --url ".join(f"{region}=URL" for region in scenario.regions),
            )
        scenario = scenario.renamed(names)
        log.info(
            "scenario regions → deployment regions: %s",
            ", ".join(f"{old} → {new}" for old, new in names.items() if old != new),
        )
    if not urls:  # the runner starts a local mesh: the names become its files
        for region in scenario.regions:
            problem = region_problem(region)
            if problem is not None:
                _usage_error(args, f"scenario error: {args.scenario}: regions: {problem}")
    factor = args.scale
    if args.duration is not None:
        factor = args.duration / max(scenario.nominal_duration, 1e-9)
    if scenario.nominal_duration * factor > MAX_DURATION_S:
        flag = "--duration" if args.duration is not None else "--scale"
        _usage_error(
            args,
            f"argument {flag}: the run would last {scenario.nominal_duration * factor:g} s, "
            f"more than {MAX_DURATION_S:g}",
        )
    if factor != 1.0:
        scenario = scenario.scaled(factor)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else Path("xr-reports") / f"{scenario.name}-{stamp}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        flag = "--out" if args.out else "the report directory"
        _usage_error(args, f"argument {flag}: cannot make {str(out)!r}: {error.strerror or error}")
    if args.metrics_port:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", args.metrics_port))
            except OSError as error:
                _usage_error(
                    args,
                    f"argument --metrics-port: cannot listen on 127.0.0.1:{args.metrics_port}: "
                    f"{error.strerror or error}",
                )
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
        log.error("xr: %s", error)
        return 1
    except KeyboardInterrupt:  # the run's cleanup (faults lifted, nodes stopped) ran
        log.error("xr: interrupted; no report written")
        return 130
    except OSError as error:  # the machine failed the run (a port, the disk): no traceback
        log.error("xr: the run failed: %s", error)
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
    load.add_argument("--url", type=_url, action="append", required=True, help=url_help)
    load.add_argument(
        "--rate",
        type=_rate,
        default="500",
        help=f"requests/s per region, or REGION=N,REGION=N (default 500, at most {MAX_RATE:g})",
    )
    load.add_argument(
        "--duration",
        type=_number(0.0, MAX_DURATION_S, above_low=True),
        default=10.0,
        help=f"seconds (default 10, at most {MAX_DURATION_S:g})",
    )
    load.add_argument(
        "--key", type=_api_key, default="xr-load", help="the X-API-Key sent (default xr-load)"
    )
    load.add_argument(
        "--connections",
        type=_integer(1, MAX_CONNECTIONS),
        default=4,
        help="keep-alive connections/region",
    )
    load.add_argument(
        "--failover", action="store_true", help="send to another region when one is unreachable"
    )
    load.set_defaults(func=cmd_load, usage_error=load.error)

    check = xr_sub.add_parser("verify", help="do all regions agree on one bucket?")
    check.add_argument("--url", type=_url, action="append", required=True, help=url_help)
    check.add_argument(
        "--key",
        type=_bucket_key,
        required=True,
        help="the bucket key, e.g. agent-api-key-<the API key's | sha256>",
    )
    check.add_argument(
        "--tolerance",
        type=_number(0.0, math.inf),
        default=1.0,
        help="allowed spread in tokens (default 1)",
    )
    check.set_defaults(func=cmd_verify, usage_error=check.error)

    run = xr_sub.add_parser("run", help="play a scenario, check its SLOs, write a report")
    run.add_argument("scenario", type=_scenario_file, help="scenario YAML (see scenarios/)")
    run.add_argument("--out", help="report directory (default xr-reports/<name>-<time>)")
    run.add_argument(
        "--url",
        type=_url,
        action="append",
        help=url_help + "; without --url the runner starts a local mesh with injected latency",
    )
    run.add_argument("--admin-token", help="admin token of the nodes (partitions via the API)")
    run.add_argument(
        "--key-template",
        type=_key_template,
        default=DEFAULT_KEY_TEMPLATE,
        help="bucket key for the X-API-Key sent: {} = the key, {sha256} = its hash as "
        "| sha256 writes it (default %(default)s)",
    )
    scale = run.add_mutually_exclusive_group()
    scale.add_argument(
        "--scale",
        type=_number(0.0, math.inf, above_low=True),
        default=1.0,
        help=f"multiply every duration (the run may last at most {MAX_DURATION_S:g} s)",
    )
    scale.add_argument(
        "--duration",
        type=_number(0.0, MAX_DURATION_S, above_low=True),
        help="scale the scenario to about S seconds",
    )
    run.add_argument(
        "--slo",
        type=_slo,
        action="append",
        metavar="NAME=VALUE",
        help="override one SLO threshold of the scenario, e.g. latency_p95_ms=50 (repeatable)",
    )
    run.add_argument(
        "--metrics-port",
        type=_integer(0, 65535),
        help="serve the runner's own series (tokens per region, outcomes, faults) for "
        "Prometheus on 127.0.0.1:PORT during the run (deploy/grafana/; 0: a free port)",
    )
    run.add_argument("--no-live", action="store_true", help="no live table, log lines instead")
    run.set_defaults(func=cmd_run, usage_error=run.error)
