"""``xr run --metrics-port``: the runner's own view, for Prometheus and Grafana.

Prometheus scrapes the nodes for what they know; what only the test knows —
each region's view of the key under test, the client-side outcomes, which
fault is on — is served here during a run, so the Grafana dashboard
(``deploy/grafana/``) shows the same panels as the HTML report:

- ``bucketmesh_xr_tokens_remaining{region,key}`` — the key as each region sees it
- ``bucketmesh_xr_used{region,key}`` — what each region knows was spent on it
- ``bucketmesh_xr_unseen{region,key}`` — spend elsewhere this region has not seen yet
- ``bucketmesh_xr_requests_total{region,outcome}`` — allowed, denied, error, failed_over
- ``bucketmesh_xr_fault_active{kind,region}`` — 1 during a partition or a crash
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from bucketmesh.tooling.xr.runner import Runner


class RunCollector(Collector):
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def collect(self) -> Iterator[Metric]:
        # Called from the HTTP server's thread while the run mutates these: a scrape
        # that races with a new region or fault is skipped, never an error page.
        try:
            yield from list(self._families())
        except RuntimeError:
            return

    def _families(self) -> Iterator[Metric]:
        result = getattr(self.runner, "result", None)
        if result is None:
            return
        tokens = GaugeMetricFamily(
            "bucketmesh_xr_tokens_remaining",
            "tokens_remaining of the key under test, as each region sees it",
            labels=["region", "key"],
        )
        used = GaugeMetricFamily(
            "bucketmesh_xr_used",
            "Tokens spent on the key under test, all replicas, as each region knows it",
            labels=["region", "key"],
        )
        unseen = GaugeMetricFamily(
            "bucketmesh_xr_unseen",
            "Tokens other regions spent on the key under test that this region has not seen",
            labels=["region", "key"],
        )
        for view in result.watcher.latest:
            if view.tokens_remaining is not None:
                tokens.add_metric([view.region, result.key], view.tokens_remaining)
                used.add_metric([view.region, result.key], view.used_total)
        for point in result.watcher.points[-len(result.urls) :]:
            unseen.add_metric([point.region, result.key], point.unseen)
        yield tokens
        yield used
        yield unseen
        requests = CounterMetricFamily(
            "bucketmesh_xr_requests",
            "Requests of the load generator by the region they were aimed at, by outcome",
            labels=["region", "outcome"],
        )
        for region, record in sorted(result.recorder.regions.items()):
            for outcome, n in (
                ("allowed", record.allowed),
                ("denied", record.denied),
                ("error", record.errors),
                ("failed_over", record.failed_over),
            ):
                requests.add_metric([region, outcome], n)
        yield requests
        faults = GaugeMetricFamily(
            "bucketmesh_xr_fault_active",
            "1 while the runner holds a partition or a crash on the region",
            labels=["kind", "region"],
        )
        for kind, region in sorted(self.runner.active_faults):
            faults.add_metric([kind, region], 1.0)
        yield faults


def serve(runner: Runner, port: int, host: str = "127.0.0.1") -> int:
    """Serve the runner's metrics on ``host:port`` (0: any free port); returns the port."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(RunCollector(runner))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)
