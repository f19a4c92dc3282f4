"""Prometheus metrics for one node.

The hot path only bumps plain integers (a dict entry per bounded label set, a
list slot per histogram bucket); prometheus-client reads them at scrape time
through a custom collector. This costs tens of nanoseconds per request where
``Counter.labels(...).inc()`` and ``Histogram.observe`` cost microseconds.
Label values are bounded: rule names come from the config, results and
statuses from fixed sets; there is never a per-key label.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

LATENCY_BOUNDS = (
    0.000005,
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)


class Histogram:
    """A fixed-bucket histogram of seconds, cheap to observe."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((repr(bound), float(running)))
        out.append(("+Inf", float(self.count)))
        return out

    def quantile(self, q: float) -> float | None:
        """An upper bound on the q-quantile (the bucket edge it falls in)."""
        if not self.count:
            return None
        rank = q * self.count
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            if running >= rank:
                return bound
        return float("inf")


class NodeMetrics(Collector):
    """Every metric this node exports, as counters the handlers bump directly."""

    def __init__(self) -> None:
        self.decisions: dict[tuple[str, str], int] = {}
        self.responses: dict[tuple[str, int], int] = {}
        self.durations: dict[str, Histogram] = {}
        self.rejected: dict[str, int] = {}
        # per rule: grants that left less than the near-limit share of capacity, and
        # refusals a shadow rule (or key) let through
        self.near_limit: dict[str, int] = {}
        self.shadow_refused: dict[str, int] = {}
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.counters: dict[str, tuple[str, Callable[[], float]]] = {}
        self.labelled: list[Callable[[], Iterator[Metric]]] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def count_decision(self, rule: str, allowed: bool, n: int = 1) -> None:
        label = (rule, "allowed" if allowed else "denied")
        self.decisions[label] = self.decisions.get(label, 0) + n

    def count_near_limit(self, rule: str, n: int = 1) -> None:
        self.near_limit[rule] = self.near_limit.get(rule, 0) + n

    def count_shadow_refused(self, rule: str, n: int = 1) -> None:
        self.shadow_refused[rule] = self.shadow_refused.get(rule, 0) + n

    def count_response(self, route: str, status: int, seconds: float) -> None:
        label = (route, status)
        self.responses[label] = self.responses.get(label, 0) + 1
        histogram = self.durations.get(route)
        if histogram is None:
            histogram = self.durations[route] = Histogram()
        histogram.observe(seconds)

    def count_rejection(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (documentation, read)

    def counter(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self.counters[name] = (documentation, read)

    def collect(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily(
            "bucketmesh_decisions",
            "Rate-limit decisions by rule and result",
            labels=["rule", "result"],
        )
        for (rule, result), n in sorted(self.decisions.items()):
            decisions.add_metric([rule, result], n)
        yield decisions
        near = CounterMetricFamily(
            "bucketmesh_near_limit",
            "Grants that left less than the near-limit share of the bucket's capacity, by rule",
            labels=["rule"],
        )
        for rule, n in sorted(self.near_limit.items()):
            near.add_metric([rule], n)
        yield near
        shadow = CounterMetricFamily(
            "bucketmesh_shadow_refused",
            "Requests a shadow rule or key would have refused and let through, by rule",
            labels=["rule"],
        )
        for rule, n in sorted(self.shadow_refused.items()):
            shadow.add_metric([rule], n)
        yield shadow
        responses = CounterMetricFamily(
            "bucketmesh_http_responses",
            "HTTP responses by route and status",
            labels=["route", "status"],
        )
        for (route, status), n in sorted(self.responses.items()):
            responses.add_metric([route, str(status)], n)
        yield responses
        durations = HistogramMetricFamily(
            "bucketmesh_http_request_duration_seconds",
            "Time spent handling a request (parse to response), by route",
            labels=["route"],
        )
        for route, histogram in sorted(self.durations.items()):
            durations.add_metric([route], histogram.buckets(), histogram.total)
        yield durations
        rejected = CounterMetricFamily(
            "bucketmesh_rejected_requests",
            "Requests refused before a decision (auth, validation, overload, cap)",
            labels=["reason"],
        )
        for reason, n in sorted(self.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        for name, (doc, read) in self.gauges.items():
            yield GaugeMetricFamily(name, doc, value=read())
        for name, (doc, read) in self.counters.items():
            yield CounterMetricFamily(name, doc, value=read())
        for produce in self.labelled:
            yield from produce()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
