"""``bucketmesh metrics export``: the Prometheus families of one or more nodes, as CSV.

The scraping is ``bucketmesh xr``'s (``tooling.xr.scrape.MetricsScraper``): every
``bucketmesh_*``, ``crdt_*`` and ``process_*`` sample of every node, with its
time, region and labels, one CSV file per family in ``--out``. With
``--duration`` it scrapes every ``--interval`` seconds for that long (and once
more at the end); without, once. A node that does not answer is a gap in the
series and is named on stderr; the export fails (exit 1) only if no node
answered at all.

Exit status: 0 written, 1 no node answered, 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from pathlib import Path
from typing import Any

import httpx

from bucketmesh.telemetry.log import logger
from bucketmesh.tooling.ops.reconcile import UsageError, parse_urls
from bucketmesh.tooling.xr.scrape import MetricsScraper

log = logger("metrics-export")

MAX_DURATION_S = 7 * 86_400.0


def _seconds(high: float) -> Any:
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
        if not math.isfinite(value) or not 0 < value <= high:
            raise argparse.ArgumentTypeError(f"must be > 0 and <= {high:g} seconds, got {text}")
        return value

    return convert


async def export(
    urls: dict[str, str], out: Path, *, interval_s: float, duration_s: float | None
) -> MetricsScraper:
    scraper = MetricsScraper(urls, time.monotonic(), interval_s)
    if duration_s is None:
        async with httpx.AsyncClient(timeout=max(1.0, interval_s)) as client:
            await scraper.scrape_once(client)
    else:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.call_later(duration_s, stop.set)
        await scraper.run(stop)
    return scraper


def cmd_export(args: argparse.Namespace) -> int:
    try:
        urls: dict[str, str] = {}
        for text in args.url:
            urls.update(parse_urls(text, "--url"))
    except UsageError as error:
        log.error("metrics export: error: %s", error)
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        log.error("metrics export: error: --out %s is not a directory", out)
        return 2
    scraper = asyncio.run(export(urls, out, interval_s=args.interval, duration_s=args.duration))
    for region, failures in sorted(scraper.failures.items()):
        log.warning("metrics export: %s did not answer %d time(s)", region, failures)
    if not scraper.families:
        log.error("metrics export: no node answered; nothing written")
        return 1
    try:
        written = scraper.write_csv(out)
    except OSError as error:
        log.error("metrics export: error: cannot write %s: %s", out, error)
        return 2
    samples = sum(len(rows) for rows in scraper.families.values())
    print(f"{len(written)} families, {samples} samples from {len(urls)} node(s) → {out}")
    return 0


def add_parser(sub: Any) -> None:
    metrics = sub.add_parser("metrics", help="export nodes' Prometheus metrics")
    metrics_sub = metrics.add_subparsers(dest="metrics_command", required=True)
    p = metrics_sub.add_parser(
        "export",
        help="the bucketmesh_*, crdt_* and process_* families of nodes, one CSV per family",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--url",
        action="append",
        required=True,
        metavar="REGION=URL",
        help="a node to scrape (repeatable, or comma-separated)",
    )
    p.add_argument("--out", required=True, help="the directory the CSV files go to")
    p.add_argument(
        "--interval",
        type=_seconds(3600.0),
        default=5.0,
        help="seconds between scrapes with --duration (default 5)",
    )
    p.add_argument(
        "--duration",
        type=_seconds(MAX_DURATION_S),
        help="scrape for this many seconds (default: once)",
    )
    p.set_defaults(func=cmd_export, usage_error=p.error)
