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
        for part in self.signal.field.split("."):
            if isinstance(document, Mapping) and part in document:
                document = document[part]
            elif isinstance(document, list) and part.isdigit() and int(part) < len(document):
                document = document[int(part)]
            else:
                self.problem = f"no {self.signal.field!r} in the document"
                return None
        value = None if isinstance(document, bool) else _number(document)
        if value is None:
            self.problem = f"{self.signal.field!r} is not a number: {document!r}"
            return None
        self.problem = ""
        return Reading(value, now)


def reader_for(signal: Signal, regions: Mapping[str, str], http: httpx.Client) -> SignalReader:
    if signal.kind == "demand":
        return DemandReader(signal, regions, http)
    if signal.kind == "prometheus":
        return PrometheusReader(signal, http)
    return JsonReader(signal, http)
