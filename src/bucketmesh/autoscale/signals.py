"""Signal readers: the I/O half of a signal. Each ``read(now)`` answers a
``Reading`` or ``None`` (and says why in ``problem``); a reader never raises for a
signal that is down, and the pure controller decides what a missing reading means.

* ``DemandReader`` — requests per second a rule receives in the whole mesh: the
  counters ``bucketmesh_decisions_total{rule=..., result="allowed"|"denied"}``
  scraped from every region's ``/metrics``, differenced between two reads.
  A region that does not answer makes the mesh's sum unknown: no reading.
* ``PrometheusReader`` — an instant query through Prometheus' HTTP API
  (``GET /api/v1/query``) whose answer is one sample (a scalar or a vector of one).
* ``JsonReader`` — a number at a dotted path of a JSON document (an external
  forecast another system publishes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bucketmesh.autoscale.controller import Reading
from bucketmesh.autoscale.policy import Signal


class SignalReader:
    signal: Signal
    problem: str = ""

    def read(self, now: float) -> Reading | None:
        raise NotImplementedError


def decisions_of(text: str, rule: str) -> float:
    """allowed + denied decisions of ``rule`` in one node's /metrics text."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "bucketmesh_decisions":
            continue
        for sample in family.samples:
            if sample.name == "bucketmesh_decisions_total" and sample.labels.get("rule") == rule:
                total += sample.value
    return total


class DemandReader(SignalReader):
    def __init__(self, signal: Signal, regions: Mapping[str, str], http: httpx.Client) -> None:
        self.signal = signal
        self.regions = dict(regions)
        self.http = http
        self._previous: dict[str, tuple[float, float]] = {}  # region → (at, total)

    def read(self, now: float) -> Reading | None:
        totals: dict[str, float] = {}
        problems: list[str] = []
        for region, url in self.regions.items():
            try:
                response = self.http.get(f"{url}/metrics")
                response.raise_for_status()
                totals[region] = decisions_of(response.text, self.signal.rule)
            except (httpx.HTTPError, ValueError) as error:
                problems.append(f"{region}: {type(error).__name__}: {error}")
        if problems:
            self.problem = "; ".join(problems)
            return None
        rate = 0.0
        complete = True
        for region, total in totals.items():
            before = self._previous.get(region)
            self._previous[region] = (now, total)
            if before is None or total < before[1] or now <= before[0]:
                complete = False  # first read, or the node restarted (its counter reset)
                continue
            rate += (total - before[1]) / (now - before[0])
        if not complete:
            self.problem = "first read of a region's counters (or a counter reset)"
            return None
        self.problem = ""
        return Reading(rate, now)


class PrometheusReader(SignalReader):
    def __init__(self, signal: Signal, http: httpx.Client) -> None:
        self.signal = signal
        self.http = http

    def read(self, now: float) -> Reading | None:
        try:
            response = self.http.get(
                f"{self.signal.url}/api/v1/query", params={"query": self.signal.query}
            )
            body = response.json()
        except (httpx.HTTPError, ValueError) as error:
            self.problem = f"{type(error).__name__}: {error}"
            return None
        if body.get("status") != "success":
            self.problem = f"{body.get('errorType', 'error')}: {body.get('error', response.text)}"
            return None
        data = body.get("data", {})
        result = data.get("result")
        if data.get("resultType") == "scalar":
            sample = result
        elif data.get("resultType") == "vector" and isinstance(result, list) and len(result) == 1:
            sample = result[0].get("value")
        else:
            self.problem = f"the query must answer one sample, got {_describe(data)}"
            return None
        value = _number(sample[1]) if isinstance(sample, list) and len(sample) == 2 else None
        if value is None:
            self.problem = f"not a number: {sample!r}"
            return None
        self.problem = ""
        # Prometheus stamps the sample with the query's evaluation instant, on its own
        # clock; the reading is as fresh as this answer.
        return Reading(value, now)


def _describe(data: Mapping[str, Any]) -> str:
    result = data.get("result")
    size = len(result) if isinstance(result, list) else "?"
    return f"{data.get('resultType')} of {size} samples"


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class JsonReader(SignalReader):
    def __init__(self, signal: Signal, http: httpx.Client) -> None:
        self.signal = signal
        self.http = http

    def read(self, now: float) -> Reading | None:
        try:
            response = self.http.get(self.signal.url)
            response.raise_for_status()
            document: Any = response.json()
        except (httpx.HTTPError, ValueError) as error:
            self.problem = f"{type(error).__name__}: {error}"
            return None
        found = _at_path(document, self.signal.field)
        value = None if isinstance(found, bool) else _number(found)
        if value is None:
            self.problem = (
                f"no {self.signal.field!r} in the document"
                if found is _MISSING
                else f"{self.signal.field!r} is not a number: {found!r}"
            )
            return None
        at = now
        if self.signal.timestamp_field:
            stamp = _timestamp(_at_path(document, self.signal.timestamp_field))
            if stamp is None:
                self.problem = f"{self.signal.timestamp_field!r} is not a timestamp"
                return None
            at = min(stamp, now)  # a clock ahead of ours makes it no fresher than now
        self.problem = ""
        return Reading(value, at)


_MISSING = object()


def _at_path(document: Any, path: str) -> Any:
    """The value at a dotted path (list indexes are numbers), or ``_MISSING``."""
    for part in path.split("."):
        if isinstance(document, Mapping) and part in document:
            document = document[part]
        elif isinstance(document, list) and part.isdigit() and int(part) < len(document):
            document = document[int(part)]
        else:
            return _MISSING
    return document


def _timestamp(value: Any) -> float | None:
    """Unix seconds, or an ISO 8601 instant with its offset (``Z`` accepted)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            return None
        return parsed.timestamp()
    return None


def reader_for(signal: Signal, regions: Mapping[str, str], http: httpx.Client) -> SignalReader:
    if signal.kind == "demand":
        return DemandReader(signal, regions, http)
    if signal.kind == "prometheus":
        return PrometheusReader(signal, http)
    return JsonReader(signal, http)
