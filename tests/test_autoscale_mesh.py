"""The autoscale controller process (``bucketmesh autoscale``) beside real
``bucketmesh serve`` nodes of a three-region mesh: a signal change leads to a PATCH
visible in every region, from a JSON URL, from the mesh's own demand (every
region's /metrics) and from a real Prometheus queried through its HTTP API; dry
run changes nothing; a stale signal freezes the limits and ``explain`` says so.

The external systems (a forecast feed, the downstream inference service's
/metrics) are a real HTTP server in the test. Tests wait for events.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import Mesh, ServerFactory, eventually, free_port

from bucketmesh.client import Client

REGIONS = ["us-east-1", "eu-central-1", "ap-south-1"]
TOKEN = "autoscale-test-token"
RULE = {
    "name": "agents",
    "key": "agents-{{ .Request.Header.X-API-Key }}",
    "capacity": 10,
    "refillRate": 5,
}


class Feed:
    """The outside world, over real HTTP: ``/forecast.json`` (an external forecast)
    and ``/metrics`` (the downstream inference service's queue length)."""

    def __init__(self) -> None:
        self.forecast: float | None = 100.0
        self.stamp: str | None = None  # when the forecast was made; None: now, in Unix seconds
        self.queue = 0.0
        feed = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/forecast.json" and feed.forecast is not None:
                    stamp = time.time() if feed.stamp is None else feed.stamp
                    body = json.dumps({"agents": {"rps": feed.forecast, "at": stamp}}).encode()
                    kind = "application/json"
                elif self.path == "/metrics":
                    body = (
                        "# TYPE inference_queue_length gauge\n"
                        f"inference_queue_length {feed.queue}\n"
                    ).encode()
                    kind = "text/plain; version=0.0.4"
                else:
                    self.send_error(503)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def feed() -> Iterator[Feed]:
    f = Feed()
    yield f
    f.close()


@pytest.fixture
def mesh(serve: ServerFactory) -> Mesh:
    return Mesh(serve, REGIONS, buckets=[RULE], admin_token=TOKEN).start()


class Controller:
    """A ``bucketmesh autoscale`` process."""

    def __init__(self, tmp_path: Path, config: dict[str, Any], *args: str) -> None:
        self.path = tmp_path / "autoscale.yaml"
        self.audit = tmp_path / "audit.jsonl"
        self.decisions = tmp_path / "decisions.json"
        config = {
            "audit": str(self.audit),
            "decisions": str(self.decisions),
            # the controller binds a free port itself and logs it: no port chosen here
            # that another process could take before the controller binds it
            "listen": "127.0.0.1:0",
            **config,
        }
        self.path.write_text(yaml.safe_dump(config))
        self.log = (tmp_path / "autoscale.log").open("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bucketmesh", "autoscale", "--config", str(self.path), *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def events(self) -> list[dict[str, Any]]:
        assert self.process.poll() is None, self.output()
        if not self.audit.exists():
            return []
        # the lines written whole: a line still being appended has no newline yet
        text = self.audit.read_text()
        whole = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in whole.splitlines() if line]

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        """The audit events of ``kind``: at least one (an AssertionError until then)."""
        found = [e for e in self.events() if e["event"] == kind]
        assert found, f"no {kind} event yet"
        return found

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    @property
    def port(self) -> int:
        """The port the controller's /metrics listens on, from its start-up log line."""

        def logged() -> int:
            assert self.process.poll() is None, self.output()
            found = re.search(r"metrics on http://[^:]+:(\d+)/metrics", self.output())
            assert found, "the controller has not logged its metrics address yet"
            return int(found.group(1))

        return eventually(logged, what="the controller logged its metrics address")

    def explain(self) -> str:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bucketmesh",
                "autoscale",
                "explain",
                "--config",
                str(self.path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            assert self.process.wait(timeout=30) == 0, self.output()
        self.log.close()


@pytest.fixture
def controllers(tmp_path: Path) -> Iterator[list[Controller]]:
    started: list[Controller] = []
    yield started
    for c in started:
        c.stop()


def mesh_config(mesh: Mesh, signals: dict[str, Any], policy: dict[str, Any]) -> dict[str, Any]:
    return {
        "interval": 0.2,
        "horizon": 1,
        "mesh": {
            "regions": {n.region: n.base_url for n in mesh.nodes.values()},
            "adminToken": TOKEN,
        },
        "signals": signals,
        "policies": [
            {
                "name": "agents",
                "target": "agents",
                "baseline": {"capacity": 10, "refillRate": 5},
                "min": {"capacity": 2, "refillRate": 1},
                "max": {"capacity": 100000, "refillRate": 50000},
                "cooldown": 0.2,
                "maxStep": 100,
                **policy,
            }
        ],
    }


def limits_everywhere(mesh: Mesh) -> set[tuple[int, float]]:
    seen = set()
    for node in mesh.nodes.values():
        body = node.client.get("/v1/buckets/agents").json()
        seen.add((body["capacity"], body["refill_rate"]))
    return seen


def json_signal(feed: Feed) -> dict[str, Any]:
    return {
        "external": {
            "type": "json",
            "url": f"{feed.url}/forecast.json",
            "field": "agents.rps",
            "forecast": False,
            "staleAfter": 1,
        }
    }


def test_a_forecast_change_patches_every_region(
    mesh: Mesh, feed: Feed, controllers: list[Controller], tmp_path: Path
) -> None:
    policy = {"expand": {"signal": "external", "headroom": 1.0, "burstSeconds": 2}}
    controller = Controller(tmp_path, mesh_config(mesh, json_signal(feed), policy))
    controllers.append(controller)
    eventually(lambda: limits_everywhere(mesh) == {(200, 100.0)}, "the first forecast applied")
    feed.forecast = 400.0
    eventually(lambda: limits_everywhere(mesh) == {(800, 400.0)}, "the new forecast everywhere")

    # The controller records the set (event log, metrics) once its PATCH is answered;
    # the regions may show the new limit first (replication can beat the controller's
    # next step on a loaded machine): waited for, not read once.
    def recorded() -> list[dict[str, Any]]:
        sets = controller.events_of("set")
        assert (sets[-1]["capacity"], sets[-1]["refill_rate"]) == (800, 400.0), sets
        return sets

    sets = eventually(recorded, "the controller recorded the set")
    assert sets[-1]["reason"] == "expand" and sets[-1]["version"]
    assert sets[-1]["previous"] == {"capacity": 200, "refill_rate": 100.0}

    def exported() -> None:
        metrics = httpx.get(f"http://127.0.0.1:{controller.port}/metrics").text
        assert 'bucketmesh_autoscale_refill_rate{policy="agents",target="agents"} 400.0' in metrics
        assert 'bucketmesh_autoscale_signal{signal="external"} 400.0' in metrics
        assert (
            'bucketmesh_autoscale_actions_total{action="set",policy="agents",reason="expand"}'
            in metrics
        )

    eventually(exported, "the controller's metrics")

    # The feed breaks: the signal goes stale, the limits stay where they are.
    feed.forecast = None
    eventually(lambda: "STALE" in controller.explain(), "explain reports the stale signal")
    assert limits_everywhere(mesh) == {(800, 400.0)}
    explained = controller.explain()
    assert "hold agents (stale)" in explained and "HTTPStatusError" in explained
    assert "SET  agents (expand): capacity 200 → 800, refill 100 → 400/s" in explained


def test_demand_read_from_every_region_expands_the_rule(
    mesh: Mesh, controllers: list[Controller], tmp_path: Path
) -> None:
    signals = {"demand": {"type": "demand", "rule": "agents", "staleAfter": 2}}
    policy = {"expand": {"signal": "demand", "headroom": 2.0, "burstSeconds": 2}}
    controller = Controller(tmp_path, mesh_config(mesh, signals, policy))
    controllers.append(controller)
    stop = threading.Event()

    def traffic(url: str) -> None:
        with Client(url, timeout=5.0) as client:
            while not stop.is_set():
                client.rate("agents-k1")

    # Agents call two regions; the rule allows 5/s, so most of it is denied: demand
    # counts allowed and denied alike.
    threads = [threading.Thread(target=traffic, args=(n.base_url,)) for n in (mesh[0], mesh[2])]
    for t in threads:
        t.start()
    try:
        eventually(
            lambda: (
                all(r > 20 for _, r in limits_everywhere(mesh))
                and len(limits_everywhere(mesh)) == 1
            ),
            "the rule expanded in every region",
        )
    finally:
        stop.set()
        for t in threads:
            t.join()

    def expanded() -> list[dict[str, Any]]:
        # written once the controller's PATCH is answered: waited for, not read once
        found = [e for e in controller.events_of("set") if e["reason"] == "expand"]
        assert found, "no expand event yet"
        return found

    assert eventually(expanded, "the expand recorded")[0]["signals"]["demand"]["value"] > 10


def test_dry_run_reports_and_changes_nothing(
    mesh: Mesh, feed: Feed, controllers: list[Controller], tmp_path: Path
) -> None:
    policy = {"expand": {"signal": "external", "headroom": 1.0}}
    controller = Controller(tmp_path, mesh_config(mesh, json_signal(feed), policy), "--dry-run")
    controllers.append(controller)
    would = eventually(lambda: controller.events_of("would-set"), "a would-set event")
    assert would[0]["refill_rate"] == 100.0
    assert limits_everywhere(mesh) == {(10, 5.0)}
    versions = {n.client.get("/v1/buckets/agents").json()["version"] for n in mesh.nodes.values()}
    assert all(v.startswith("0@rule:agents") for v in versions)
    assert "dry run: nothing below was applied" in controller.explain()


def test_an_operators_change_is_adopted_not_fought(
    mesh: Mesh, feed: Feed, controllers: list[Controller], tmp_path: Path
) -> None:
    policy = {"expand": {"signal": "external", "headroom": 1.0}, "cooldown": 3600}
    controller = Controller(tmp_path, mesh_config(mesh, json_signal(feed), policy))
    controllers.append(controller)
    eventually(lambda: limits_everywhere(mesh) == {(200, 100.0)}, "the first forecast applied")
    with Client(mesh[1].base_url, admin_token=TOKEN) as client:
        client.configure("agents", capacity=33, refill_rate=7)
    adopted = eventually(lambda: controller.events_of("adopted"), "the change adopted")
    assert adopted[0]["capacity"] == 33 and adopted[0]["refill_rate"] == pytest.approx(7.0)
    feed.forecast = 900.0
    eventually(lambda: "(cooldown)" in controller.explain(), "a cooldown hold after the adoption")

    # every region on the operator's limit (waited for: the controller adopts it once
    # one region shows it, and the last may still be hearing of it)
    def operators_limit_everywhere() -> None:
        found = limits_everywhere(mesh)
        assert len(found) == 1, found
        [(capacity, refill)] = found
        assert capacity == 33 and refill == pytest.approx(7.0), found

    eventually(operators_limit_everywhere, "every region on the operator's limit")


PROMETHEUS = shutil.which("prometheus")


def test_a_real_prometheus_query_protects_and_restores(
    mesh: Mesh, feed: Feed, controllers: list[Controller], tmp_path: Path
) -> None:
    assert PROMETHEUS is not None, "prometheus is missing: make test installs it (Debian package)"
    port = free_port()
    scrape = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "inference",
                "static_configs": [{"targets": [feed.url.removeprefix("http://")]}],
            },
            {
                "job_name": "bucketmesh",
                "static_configs": [
                    {"targets": [n.base_url.removeprefix("http://") for n in mesh.nodes.values()]}
                ],
            },
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(scrape))
    log = (tmp_path / "prometheus.log").open("w")
    prometheus = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        query = f"{url}/api/v1/query"

        def scraped() -> list[Any]:
            answer = httpx.get(query, params={"query": "inference_queue_length"})
            assert answer.status_code == 200, answer.text
            result: list[Any] = answer.json()["data"]["result"]
            assert result, "nothing scraped yet"
            return result

        eventually(scraped, "Prometheus has scraped the inference service")
        signals = {
            "queue": {
                "type": "prometheus",
                "url": url,
                "query": 'max(inference_queue_length{job="inference"})',
                "staleAfter": 2,
            }
        }
        policy = {
            "protect": {"signal": "queue", "threshold": 100, "restoreBelow": 50, "refillRate": 1}
        }
        controller = Controller(tmp_path, mesh_config(mesh, signals, policy))
        controllers.append(controller)
        eventually(lambda: "queue: now 0" in controller.explain(), "the controller reads the queue")
        assert limits_everywhere(mesh) == {(10, 5.0)}
        feed.queue = 500.0
        eventually(lambda: limits_everywhere(mesh) == {(10, 1.0)}, "refill capped in every region")
        feed.queue = 0.0
        eventually(lambda: limits_everywhere(mesh) == {(10, 5.0)}, "refill restored everywhere")
        reasons = [e["reason"] for e in controller.events() if e["event"] == "set"]
        assert reasons == ["protect", "restore"]
        # Prometheus scraped the nodes too: the demand it sees is the mesh's.
        up = httpx.get(query, params={"query": 'count(up{job="bucketmesh"} == 1)'}).json()
        assert up["data"]["result"][0]["value"][1] == "3"
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        log.close()


def test_an_external_forecast_made_long_ago_is_stale(
    mesh: Mesh, feed: Feed, controllers: list[Controller], tmp_path: Path
) -> None:
    signals = json_signal(feed)
    signals["external"]["timestampField"] = "agents.at"
    policy = {"expand": {"signal": "external", "headroom": 1.0, "burstSeconds": 2}}
    controller = Controller(tmp_path, mesh_config(mesh, signals, policy))
    controllers.append(controller)
    eventually(lambda: limits_everywhere(mesh) == {(200, 100.0)}, "a fresh forecast applied")
    # The feed still answers, but its forecast was made months ago (ISO 8601).
    feed.stamp = "2026-01-01T00:00:00Z"
    feed.forecast = 5000.0
    eventually(lambda: "STALE" in controller.explain(), "the old forecast reported stale")
    assert limits_everywhere(mesh) == {(200, 100.0)}
    assert [e for e in controller.events() if e["event"] == "set"][-1]["refill_rate"] == 100.0
