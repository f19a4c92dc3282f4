"""``bucketmesh metrics export``: the Prometheus families of one or more nodes, as CSV.

Two sources, one output: one CSV file per family in ``--out``, a row per sample
with its time (``t_s``, seconds from the start), region, labels and value.

- ``--url REGION=URL``: the nodes themselves, scraped now. The scraping is
  ``bucketmesh xr``'s (``tooling.xr.scrape.MetricsScraper``): every
  ``bucketmesh_*``, ``crdt_*`` and ``process_*`` sample of every node. With
  ``--duration`` it scrapes every ``--interval`` seconds for that long (and once
  more at the end); without, once. A node that does not answer is a gap in the
  series and is named on stderr; the export fails (exit 1) only if no node
  answered at all.
- ``--prometheus URL --start T --end T --step S``: the past, from a Prometheus
  server that scrapes the nodes, through its ``/api/v1/query_range`` API: every
  series of those families (narrowed with ``--match '{job="bucketmesh"}'``) at
  every step of the range. T is unix seconds, RFC 3339 (``2026-12-04T02:00:00Z``),
  ``now`` or relative to now (``-1h``, ``-30m``); S is seconds or ``15s``/``1m``/``1h``.
  The region column is the series' ``region`` label (``--region-label``), else
  its ``instance``. A long range is asked for in parts (Prometheus answers at
  most 11,000 points per series).

Exit status: 0 written, 1 no node (or Prometheus) answered or no series in the
range, 2 usage error (Prometheus refusing the query says why).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import signal
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from bucketmesh.telemetry.log import logger
from bucketmesh.tooling.ops.reconcile import UsageError, parse_urls
from bucketmesh.tooling.xr.scrape import MetricsScraper, Sample

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
        # Ctrl-C (or a TERM) ends the series early: what was scraped is still written
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await scraper.run(stop)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    return scraper


#: what a range export asks Prometheus for: the families a node scrape exports
RANGE_FAMILIES = "(bucketmesh|crdt|process)_.+"
#: Prometheus answers at most 11,000 points per series and query
MAX_POINTS = 11_000
_RELATIVE = re.compile(r"-\s*([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d)?")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SUFFIXES = ("_total", "_created", "_bucket", "_count", "_sum")


class PrometheusError(Exception):
    """Prometheus refused the query (its own words) or could not be read."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def parse_time(text: str, now: float, option: str) -> float:
    """Unix seconds of ``text``: unix seconds, RFC 3339, ``now`` or ``-<n>[smhd]``."""
    value = text.strip()
    if value == "now":
        return now
    relative = _RELATIVE.fullmatch(value)
    if relative is not None:
        return now - float(relative[1]) * _UNIT_S[relative[2]]
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
        raise UsageError(f"{option} must be a time after 1970, got {text!r}")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"{option} must be unix seconds, RFC 3339 (2026-12-04T02:00:00Z), now or "
            f"relative to now (-1h, -30m), got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def parse_step(text: str) -> float:
    found = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d)?", text.strip())
    if found is None or float(found[1]) <= 0:
        raise UsageError(f"--step must be a duration > 0 such as 15, 15s, 1m, got {text!r}")
    return float(found[1]) * _UNIT_S[found[2]]


def _family_of(name: str, families: dict[str, str]) -> str:
    """The family a sample name belongs to, named as a node scrape names it (a counter
    ``x_total`` → ``x``, a histogram's ``x_bucket`` → ``x``), by the types in Prometheus'
    metadata when it knows the name, else by the suffix alone."""
    kind = families.get(name)
    if kind is not None:
        if kind == "counter" and name.endswith("_total"):
            return name[: -len("_total")]
        return name
    for suffix in _SUFFIXES:
        base = name[: -len(suffix)]
        if name.endswith(suffix) and (base in families or not families):
            return base
    return name


def _prometheus_get(client: httpx.Client, url: str, params: dict[str, str]) -> Any:
    try:
        reply = client.get(url, params=params)
    except httpx.HTTPError as error:
        raise PrometheusError(f"{url}: {error}") from None
    try:
        answer = reply.json()
    except ValueError:
        raise PrometheusError(f"{url}: HTTP {reply.status_code}, not Prometheus' JSON") from None
    if reply.status_code != 200 or answer.get("status") != "success":
        problem = answer.get("error") or f"HTTP {reply.status_code}"
        raise PrometheusError(f"Prometheus refused the query: {problem}", usage=True)
    return answer.get("data")


def export_range(
    url: str,
    *,
    start: float,
    end: float,
    step: float,
    match: str = "",
    region_label: str = "region",
    timeout_s: float = 30.0,
) -> MetricsScraper:
    """Every sample of the bucketmesh families between ``start`` and ``end`` (unix
    seconds) every ``step`` seconds, from the Prometheus at ``url``, in a scraper's
    families (so written as the interval mode writes them; ``t_s`` from ``start``)."""
    base = url.rstrip("/")
    selector = match.strip()
    if selector.startswith("{") and selector.endswith("}"):
        selector = selector[1:-1].strip()
    query = "{" + f'__name__=~"{RANGE_FAMILIES}"' + (f", {selector}" if selector else "") + "}"
    scraper = MetricsScraper({}, start)
    with httpx.Client(timeout=timeout_s) as client:
        metadata = _prometheus_get(client, f"{base}/api/v1/metadata", {})
        families: dict[str, str] = {}
        if isinstance(metadata, dict):
            for family, entries in metadata.items():
                if isinstance(entries, list) and entries and isinstance(entries[0], dict):
                    families[family] = str(entries[0].get("type", ""))
        seen: dict[tuple[str, tuple[tuple[str, str], ...]], set[float]] = {}
        part_start = start
        while part_start <= end:
            part_end = min(end, part_start + step * (MAX_POINTS - 1))
            params = {
                "query": query,
                "start": repr(part_start),
                "end": repr(part_end),
                "step": repr(step),
            }
            data = _prometheus_get(client, f"{base}/api/v1/query_range", params)
            for series in (data or {}).get("result", []):
                labels = dict(series.get("metric", {}))
                name = labels.pop("__name__", "")
                region = labels.get(region_label) or labels.get("instance", "")
                rows = scraper.families.setdefault(_family_of(name, families), [])
                times = seen.setdefault((name, tuple(sorted(labels.items()))), set())
                for stamp, value in series.get("values", []):
                    if stamp in times:
                        continue
                    times.add(stamp)
                    t = round(float(stamp) - start, 3)
                    rows.append(Sample(t, region, name, labels, float(value)))
            part_start = part_end + step
    for rows in scraper.families.values():
        rows.sort(key=lambda sample: (sample.t, sample.region, sample.name))
    return scraper


def cmd_export_range(args: argparse.Namespace) -> int:
    now = time.time()
    try:
        start = parse_time(args.start, now, "--start")
        end = parse_time(args.end, now, "--end")
        step = parse_step(args.step)
        if end < start:
            raise UsageError(f"--end ({args.end}) is before --start ({args.start})")
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", args.prometheus):
            raise UsageError(f"--prometheus must be http(s)://host:port, got {args.prometheus!r}")
    except UsageError as error:
        log.error("metrics export: error: %s", error)
        return 2
    out = _out_dir(args.out)
    if out is None:
        return 2
    try:
        scraper = export_range(
            args.prometheus,
            start=start,
            end=end,
            step=step,
            match=args.match or "",
            region_label=args.region_label,
        )
    except PrometheusError as error:
        log.error("metrics export: %s", error)
        return 2 if error.usage else 1
    if not scraper.families:
        log.error(
            "metrics export: Prometheus holds no bucketmesh series from %s to %s%s; "
            "nothing written",
            args.start,
            args.end,
            f" matching {args.match}" if args.match else "",
        )
        return 1
    try:
        written = scraper.write_csv(out)
    except OSError as error:
        log.error("metrics export: error: cannot write %s: %s", out, error)
        return 2
    samples = sum(len(rows) for rows in scraper.families.values())
    began = datetime.fromtimestamp(start, tz=timezone.utc).isoformat().replace("+00:00", "Z")
    print(
        f"{len(written)} families, {samples} samples from {args.prometheus} "
        f"({began} + {end - start:g} s every {step:g} s; t_s from {began}) → {out}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.prometheus is not None:
        if args.url:
            log.error("metrics export: error: give --url (scrape nodes) or --prometheus, not both")
            return 2
        if args.start is None:
            log.error("metrics export: error: --prometheus needs --start (and --end, --step)")
            return 2
        return cmd_export_range(args)
    if not args.url:
        log.error("metrics export: error: give --url REGION=URL, or --prometheus URL --start T")
        return 2
    if args.start is not None or args.match is not None:
        log.error("metrics export: error: --start, --end, --step and --match go with --prometheus")
        return 2
    try:
        urls: dict[str, str] = {}
        for text in args.url:
            for region, url in parse_urls(text, "--url").items():
                if region in urls:  # two nodes' samples would be mixed under one name
                    raise UsageError(f"--url: region {region!r} is given twice")
                urls[region] = url
    except UsageError as error:
        log.error("metrics export: error: %s", error)
        return 2
    out = _out_dir(args.out)
    if out is None:
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


def _out_dir(given: str) -> Path | None:
    """``--out`` as a directory to write into; None (the error logged) if it is a file."""
    out = Path(given)
    if out.exists() and not out.is_dir():
        log.error("metrics export: error: --out %s is not a directory", out)
        return None
    return out


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
        metavar="REGION=URL",
        help="a node to scrape (repeatable, or comma-separated)",
    )
    p.add_argument(
        "--prometheus",
        metavar="URL",
        help="read a time range from this Prometheus server (query_range) instead",
    )
    p.add_argument("--start", help="with --prometheus: the range's start (unix s, RFC 3339, -1h)")
    p.add_argument("--end", default="now", help="with --prometheus: the range's end (default now)")
    p.add_argument("--step", default="15s", help="with --prometheus: the resolution (default 15s)")
    p.add_argument(
        "--match",
        help="with --prometheus: more label matchers, e.g. '{job=\"bucketmesh\"}'",
    )
    p.add_argument(
        "--region-label",
        default="region",
        help="with --prometheus: the label naming a series' region (default region, "
        "else the instance)",
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
