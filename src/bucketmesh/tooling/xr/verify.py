"""``bucketmesh xr verify``: does every region hold the same bucket?

Reads ``GET /v1/bucket/state?key=K`` from every region at once (concurrently,
so refill between the reads is negligible) and compares ``tokens_remaining``:
the regions agree when the spread (max − min) is within the tolerance
(default ±1 token; ±0 is what a quiescent mesh must show) or when their
``replicas`` counters are identical — exact agreement: the same state gives
the same level at the same instant, and only the refill between two reads a
few milliseconds apart can make the levels read differ.

:func:`caught_up` is the stricter check used for convergence after a heal:
every region knows at least what every replica had spent, as seen by that
replica's own region, at a given moment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class RegionView:
    region: str
    tokens_remaining: float | None = None
    used: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def used_total(self) -> int:
        return sum(self.used.values())


@dataclass
class Verdict:
    key: str
    tolerance: float
    views: list[RegionView]

    @property
    def errors(self) -> list[str]:
        return [f"{v.region}: {v.error}" for v in self.views if v.error]

    @property
    def spread(self) -> float | None:
        levels = [v.tokens_remaining for v in self.views if v.tokens_remaining is not None]
        if len(levels) != len(self.views) or not levels:
            return None
        return max(levels) - min(levels)

    @property
    def replicas_identical(self) -> bool:
        return all(v.used == self.views[0].used for v in self.views)

    @property
    def passed(self) -> bool:
        """Within tolerance — or identical state: regions holding the same counters hold
        the same level at any one instant, whatever refill happened between the reads."""
        if self.errors:
            return False
        spread = self.spread
        return spread is not None and (spread <= self.tolerance or self.replicas_identical)

    @property
    def judged(self) -> str:
        """The figure ``passed`` went by: the spread when it is within the tolerance,
        else whether the replicas are identical (levels read a few ms apart differ by
        the refill between the reads, and ``spread 1`` beside PASS read as a contradiction)."""
        spread = self.spread
        if spread is None:  # say which region could not be read, and why
            return "unreadable: " + "; ".join(self.errors) if self.errors else "unreadable"
        if spread <= self.tolerance:
            return f"spread {spread:g}"
        if self.replicas_identical:
            return f"replicas identical (levels read {spread:g} apart: refill between reads)"
        return f"spread {spread:g}, replicas differ"

    def lines(self) -> list[str]:
        out = [f"key {self.key}: tolerance ±{self.tolerance:g} token(s)"]
        for view in self.views:
            if view.error:
                out.append(f"  {view.region:<18} ERROR {view.error}")
            else:
                out.append(
                    f"  {view.region:<18} tokens_remaining {view.tokens_remaining:>10g}"
                    f"   used {view.used_total:>8} over {len(view.used)} replica(s)"
                )
        judged = self.judged
        if "replicas" not in judged:
            judged += f"; replicas {'identical' if self.replicas_identical else 'differ'}"
        out.append(f"{judged}: {'PASS' if self.passed else 'FAIL'}")
        return out


async def read_view(client: httpx.AsyncClient, region: str, url: str, key: str) -> RegionView:
    try:
        reply = await client.get(f"{url}/v1/bucket/state", params={"key": key})
    except httpx.HTTPError as error:
        return RegionView(region, error=f"{type(error).__name__}: {error}")
    if reply.status_code == 404:
        # a bucket this region never saw is full: the same as a fresh one
        return RegionView(region, error="no such bucket here (404)")
    if reply.status_code != 200:
        return RegionView(region, error=f"HTTP {reply.status_code}: {reply.text[:200]}")
    body: dict[str, Any] = reply.json()
    used = {rid: int(entry.get("used", 0)) for rid, entry in body.get("replicas", {}).items()}
    return RegionView(region, float(body["tokens_remaining"]), used)


async def read_views(
    client: httpx.AsyncClient, urls: Mapping[str, str], key: str
) -> list[RegionView]:
    return list(await asyncio.gather(*(read_view(client, r, u, key) for r, u in urls.items())))


async def verify(
    urls: Mapping[str, str], key: str, tolerance: float = 1.0, timeout_s: float = 5.0
) -> Verdict:
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        return Verdict(key, tolerance, await read_views(client, urls, key))


def own_counters(views: list[RegionView]) -> dict[str, int]:
    """What each replica has spent, as its own region sees it (the freshest value)."""
    own: dict[str, int] = {}
    for view in views:
        for rid, used in view.used.items():
            if rid.split("/", 1)[0] == view.region:
                own[rid] = max(own.get(rid, 0), used)
    return own


def caught_up(views: list[RegionView], target: Mapping[str, int]) -> bool:
    """Every region knows at least ``target`` of every replica."""
    return all(
        view.error is None and all(view.used.get(rid, 0) >= n for rid, n in target.items())
        for view in views
    )
