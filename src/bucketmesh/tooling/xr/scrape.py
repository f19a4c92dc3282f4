"""What a scenario run watches besides its own requests: every node's
``/metrics`` and the shared bucket's state in every region, at fixed intervals.

:class:`MetricsScraper` stores every sample of the ``bucketmesh_*``,
``crdt_*`` and ``process_*`` families with its time (seconds since the run's
origin), region and labels; :meth:`MetricsScraper.write_csv` writes one CSV
per family, for spreadsheet or pandas analysis. :class:`StateWatcher` reads
``/v1/bucket/state`` of the scenario's key in every region, concurrently,
which is what shows the divergence during a partition and the re-convergence
after it. A region that does not answer (killed, partitioned from us) is a
gap in the series, never a stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bucketmesh.tooling.xr.verify import RegionView, read_views

FAMILIES = re.compile(r"^(bucketmesh_|crdt_|process_)")


@dataclass
class Sample:
    t: float
    region: str
    name: str
    labels: dict[str, str]
    value: float


class MetricsScraper:
    """Scrapes every region's ``/metrics`` every ``interval_s``; keeps every sample."""

    def __init__(self, urls: Mapping[str, str], t0: float, interval_s: float = 1.0) -> None:
        self.urls = dict(urls)
        self.t0 = t0
        self.interval_s = interval_s
        self.families: dict[str, list[Sample]] = {}
        self.failures: dict[str, int] = {}

    async def scrape_once(self, client: httpx.AsyncClient) -> None:
        async def one(region: str, url: str) -> None:
            try:
                reply = await client.get(f"{url}/metrics")
                reply.raise_for_status()
            except httpx.HTTPError:
                self.failures[region] = self.failures.get(region, 0) + 1
                return
            t = time.monotonic() - self.t0
            for family in text_string_to_metric_families(reply.text):
                if not FAMILIES.match(family.name):
                    continue
                rows = self.families.setdefault(family.name, [])
                for s in family.samples:
                    rows.append(Sample(round(t, 3), region, s.name, dict(s.labels), s.value))

        await asyncio.gather(*(one(r, u) for r, u in self.urls.items()))

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=max(1.0, self.interval_s)) as client:
            while not stop.is_set():
                started = time.monotonic()
                await self.scrape_once(client)
                wait = self.interval_s - (time.monotonic() - started)
                if wait > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), wait)
            await self.scrape_once(client)  # the end of the run, however short it was

    def write_csv(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name, rows in sorted(self.families.items()):
            label_names = sorted({k for row in rows for k in row.labels})
            path = directory / f"{name}.csv"
            with path.open("w", newline="") as out:
                writer = csv.writer(out)
                writer.writerow(["t_s", "region", "sample", *label_names, "value"])
                for row in rows:
                    writer.writerow(
                        [
                            row.t,
                            row.region,
                            row.name,
                            *(row.labels.get(k, "") for k in label_names),
                            repr(row.value),
                        ]
                    )
            written.append(path)
        return written


@dataclass
class StatePoint:
    t: float
    region: str
    tokens_remaining: float
    used_total: int
    replicas: int
    #: tokens other regions have spent that this region has not heard of yet (what
    #: the freshest view of every replica knows, minus this view): 0 when converged
    unseen: int = 0


@dataclass
class StateWatcher:
    """Polls the key's state in every region every ``interval_s``."""

    urls: Mapping[str, str]
    key: str
    t0: float
    interval_s: float = 0.25
    points: list[StatePoint] = field(default_factory=list)
    latest: list[RegionView] = field(default_factory=list)
    #: every poll's per-replica counts: (t, region, {replica id: used})
    replicas_seen: list[tuple[float, str, dict[str, int]]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=1.0) as client:
            while not stop.is_set():
                started = time.monotonic()
                views = await read_views(client, self.urls, self.key)
                self.latest = views
                t = round(time.monotonic() - self.t0, 3)
                freshest: dict[str, int] = {}
                for view in views:
                    for rid, n in view.used.items():
                        freshest[rid] = max(freshest.get(rid, 0), n)
                for view in views:
                    if view.tokens_remaining is not None:
                        level, used = view.tokens_remaining, view.used_total
                        unseen = sum(n - view.used.get(rid, 0) for rid, n in freshest.items())
                        self.points.append(
                            StatePoint(t, view.region, level, used, len(view.used), unseen)
                        )
                        self.replicas_seen.append((t, view.region, dict(view.used)))
                wait = self.interval_s - (time.monotonic() - started)
                if wait > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), wait)

    def write_csv(self, path: Path) -> Path:
        with path.open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(
                ["t_s", "region", "tokens_remaining", "used_total", "replicas", "unseen"]
            )
            for p in self.points:
                writer.writerow(
                    [p.t, p.region, p.tokens_remaining, p.used_total, p.replicas, p.unseen]
                )
        return path
