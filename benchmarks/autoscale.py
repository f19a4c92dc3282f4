"""P11: predictive throttling and dynamic bucket scaling (issue 17) on AI-agent traffic:
static limits against the autoscale controller, replayed through the pure
controller (``bucketmesh.autoscale.Controller``) and the real bucket math
(``bucketmesh.core.bucket.Bucket``: acquire, reconfigure as a PATCH does).

Traces (seeded, so every run replays the same traffic)
    One tenant's agent fleet calling an LLM inference service through one bucket.
    Demand (requests/s) = a daily cycle (a "day" compressed to 2 h; 30 → 90 req/s)
    + ramps (the fleet scaling up: +120 to +200 req/s over 10 min, a 15 min plateau,
    10 min back down; three a day at random times) + sudden spikes (5–10× the
    daily level for 1–3 min; four a day) + Poisson arrivals in 100 ms steps.
    Admitted requests join the downstream inference service's queue; it serves a
    fixed 500 req/s shared with other tenants' work (20 → 100 req/s on its own
    daily cycle, plus two 10 min batch jobs of 150 req/s a day). The queue length
    is the protect signal (threshold 500 = one second of work).

Contenders
    static, daily peak   capacity 200, refill 100/s.
    static, fleet peak   capacity 600, refill 300/s.
    static, generous     capacity 1200, refill 600/s (refuses nothing in ramps).
    generous + protect   the generous limits, and protect: refill and capacity
                         capped at 100 from when the queue (now or its forecast)
                         crosses 500 until both are below 250.
    expand, reactive     expand only (headroom 1.2, burst 2 s, refill in
                         [50, 600]/s) with the trend switched off (beta 0: the
                         forecast is the smoothed level): what forecasting adds.
    expand               expand with Holt's trend.
    expand + protect     both.
    The controller ticks every 5 s (the demand signal is the mean arrival rate of
    the last interval, as differencing /metrics counters gives it; the queue is
    sampled then, as a Prometheus scrape would), forecasts 30 s ahead with Holt's
    damped trend (alpha 0.5, beta 0.05, phi 0.9, band ±2σ; tuned on another
    seed's trace), cooldown 10 s, max step 2×, hysteresis 15 %.

Reported
    refused during ramps (legitimate requests denied while a fleet ramp is under
    way or on its plateau, outside spikes), refused during spikes and overall;
    seconds the downstream queue spends above its threshold; limit changes; the forecast error
    (30 s ahead, MAE and MAPE, band coverage) of Holt, Holt–Winters (season = one
    compressed day) and the naive "no change" forecast, on demand and on the queue.
    Everything is a count or an error of a deterministic replay: noise cannot move it.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/autoscale.py [--quick] [--no-record]``
(--quick: one compressed day instead of three).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import _report
import httpx
import yaml

from bucketmesh.autoscale import (
    Config,
    Controller,
    Forecaster,
    ForecastSettings,
    Reading,
    parse,
)
from bucketmesh.client import AsyncClient, Client
from bucketmesh.core.bucket import NS_PER_S, Bucket, BucketConfig, interval_for
from bucketmesh.tooling.cluster import LocalMesh, free_ports

DAY_S = 7200  # one compressed day
SUBSTEP_S = 0.1
INTERVAL_S = 5
HORIZON_S = 30
DOWNSTREAM_RPS = 500.0
QUEUE_THRESHOLD = 500.0  # one second of the downstream's work
PROTECT_RPS = 100.0
SEED = 17


@dataclass
class Trace:
    demand: list[float]  # this tenant's agents, requests/s, one per second
    background: list[float]  # the downstream's other work (other tenants), requests/s
    ramp: list[bool]  # a fleet ramp (or its plateau) is under way (spikes counted apart)
    spike: list[bool]


def daily(t: int) -> float:
    return 60 - 30 * math.cos(2 * math.pi * t / DAY_S)


def make_trace(days: int, seed: int = SEED) -> Trace:
    rng = random.Random(seed)
    n = days * DAY_S
    demand = [daily(t) for t in range(n)]
    background = [60 - 40 * math.cos(2 * math.pi * (t - DAY_S / 4) / DAY_S) for t in range(n)]
    ramp = [False] * n
    spike = [False] * n
    for day in range(days):
        start = day * DAY_S
        for _ in range(3):
            t0 = start + rng.randrange(0, DAY_S - 2100)
            height = rng.uniform(120, 200)
            for t in range(t0, min(n, t0 + 2100)):
                s = t - t0
                level = min(1.0, s / 600) if s < 1500 else max(0.0, (2100 - s) / 600)
                demand[t] += height * level
                ramp[t] = ramp[t] or s < 1500
        for _ in range(4):
            t0 = start + rng.randrange(0, DAY_S - 180)
            length = rng.randrange(60, 181)
            factor = rng.uniform(5, 10)
            for t in range(t0, min(n, t0 + length)):
                demand[t] += (factor - 1) * daily(t)
                spike[t] = True
        for _ in range(2):  # another tenant's batch job
            t0 = start + rng.randrange(0, DAY_S - 600)
            for t in range(t0, t0 + 600):
                background[t] += 150
    return Trace(demand, background, ramp, spike)


def poisson(rng: random.Random, mean: float) -> int:
    if mean > 30:  # the normal approximation, plenty for counts this size
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


# Tuned on another seed's trace (18: the lowest 30 s-ahead MAE in ramps over
# alpha 0.2…0.7, beta 0.02…0.3, phi 0.9 / 0.98), reported on this one.
ALPHA, BETA, PHI = 0.5, 0.05, 0.9


def controller_config(
    expand: bool, protect: bool, baseline: tuple[int, float], trend: bool = True
) -> Config:
    policy: dict[str, object] = {
        "name": "agents",
        "target": "agents",
        "baseline": {"capacity": baseline[0], "refillRate": baseline[1]},
        "min": {"capacity": 100, "refillRate": 50},
        "max": {"capacity": 1200, "refillRate": 600},
        "cooldown": 10,
        "maxStep": 2,
        "hysteresis": 0.15,
    }
    if expand:
        policy["expand"] = {"signal": "demand", "headroom": 1.2, "burstSeconds": 2}
    if protect:
        policy["protect"] = {
            "signal": "queue",
            "threshold": QUEUE_THRESHOLD,
            "restoreBelow": QUEUE_THRESHOLD / 2,
            "refillRate": PROTECT_RPS,
            "capacity": int(PROTECT_RPS),
        }
    return parse(
        {
            "interval": INTERVAL_S,
            "horizon": HORIZON_S,
            "forecast": {"alpha": ALPHA, "beta": BETA if trend else 0.0, "phi": PHI, "z": 2},
            "mesh": {"regions": {"sim": "http://sim.invalid"}},
            "signals": {
                "demand": {"type": "demand", "rule": "agents", "staleAfter": 15},
                "queue": {
                    "type": "prometheus",
                    "url": "http://sim.invalid",
                    "query": "inference_queue_length",
                    "staleAfter": 15,
                },
            },
            "policies": [policy],
        },
        "benchmarks/autoscale.py",
    )


@dataclass
class Outcome:
    name: str
    offered: int = 0
    refused: int = 0
    refused_ramp: int = 0
    offered_ramp: int = 0
    refused_spike: int = 0
    offered_spike: int = 0
    above_threshold_s: float = 0.0
    peak_queue: float = 0.0
    changes: int = 0
    demand_signal: list[float] = field(default_factory=list)
    queue_signal: list[float] = field(default_factory=list)


def bucket_config(capacity: int, refill: float, version: int) -> BucketConfig:
    return BucketConfig(capacity, interval_for(refill), 3600 * NS_PER_S, "shared", (version, "sim"))


def replay(
    name: str, trace: Trace, capacity: int, refill: float, controller: Controller | None
) -> Outcome:
    """Arrivals through the bucket into the downstream queue, the controller changing
    the bucket's limits (a PATCH's reconfigure) every interval."""
    rng = random.Random(SEED + 1)  # the same arrivals for every contender
    out = Outcome(name)
    bucket = Bucket(bucket_config(capacity, refill, 0), 0, "agents")
    queue = 0.0
    version = 0
    arrived_in_interval = 0
    for t, rate in enumerate(trace.demand):
        for sub in range(int(1 / SUBSTEP_S)):
            now_ns = round((t + sub * SUBSTEP_S) * NS_PER_S)
            arrivals = poisson(rng, rate * SUBSTEP_S)
            arrived_in_interval += arrivals
            # n one-token requests at one instant: the bucket admits min(n, level)
            admitted = min(arrivals, max(0, bucket.level(now_ns)))
            if admitted:
                bucket.acquire("agents", admitted, now_ns)
            refused = arrivals - admitted
            out.offered += arrivals
            out.refused += refused
            if trace.ramp[t] and not trace.spike[t]:
                out.offered_ramp += arrivals
                out.refused_ramp += refused
            if trace.spike[t]:
                out.offered_spike += arrivals
                out.refused_spike += refused
            other = trace.background[t] * SUBSTEP_S
            queue = max(0.0, queue + admitted + other - DOWNSTREAM_RPS * SUBSTEP_S)
            out.peak_queue = max(out.peak_queue, queue)
            if queue > QUEUE_THRESHOLD:
                out.above_threshold_s += SUBSTEP_S
        if (t + 1) % INTERVAL_S == 0:
            now = float(t + 1)
            demand = arrived_in_interval / INTERVAL_S
            arrived_in_interval = 0
            out.demand_signal.append(demand)
            out.queue_signal.append(queue)
            if controller is None:
                continue
            readings = {"demand": Reading(demand, now), "queue": Reading(queue, now)}
            for decision in controller.tick(now, readings):
                if decision.changed:
                    version += 1
                    out.changes += 1
                    bucket.reconfigure(
                        bucket_config(decision.capacity, decision.refill_rate, version),
                        round(now * NS_PER_S),
                    )
    return out


@dataclass
class ForecastError:
    mae: float
    mae_ramps: float  # over the samples whose target lies in a ramp (outside spikes)
    mape: float
    coverage: float | None  # share of actuals inside the band


def forecast_error(
    series: list[float],
    make: Callable[[], Forecaster] | None,
    steps: int,
    skip: int,
    ramp: list[bool],
) -> ForecastError:
    """``steps``-ahead error over ``series`` (after ``skip`` warm-up samples);
    ``make`` None: the naive forecast (the last value)."""
    forecaster = make() if make is not None else None
    errors: list[float] = []
    in_ramps: list[float] = []
    relative: list[float] = []
    inside = 0
    for i, value in enumerate(series):
        if forecaster is not None:
            forecaster.observe(value)
        target = i + steps
        if i < skip or target >= len(series):
            continue
        actual = series[target]
        if forecaster is None:
            predicted, low, high = value, value, value
        else:
            f = forecaster.forecast(steps)
            predicted, low, high = max(0.0, f.value), f.low, f.high
        errors.append(abs(predicted - actual))
        if ramp[target]:
            in_ramps.append(abs(predicted - actual))
        if actual > 1:
            relative.append(abs(predicted - actual) / actual)
        inside += low <= actual <= high
    return ForecastError(
        mae=sum(errors) / len(errors),
        mae_ramps=sum(in_ramps) / max(1, len(in_ramps)),
        mape=100 * sum(relative) / max(1, len(relative)),
        coverage=None if forecaster is None else 100 * inside / len(errors),
    )


def pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


# -- the end-to-end run -------------------------------------------------------------------

E2E_REGIONS = ("us-east-1", "eu-central-1", "ap-south-1")
E2E_TOKEN = "bench-autoscale-admin"
E2E_CAPACITY_RPS = 100.0  # the simulated inference service
E2E_THRESHOLD = 60.0
E2E_PROTECT_RPS = 15.0


def e2e_rate(t: float, scale: float) -> tuple[float, str]:
    """Requests/s at ``t`` and the phase: base, a ramp to 90/s, a plateau, a 250/s
    spike, base again (durations × ``scale``)."""
    edges = [15 * scale, 45 * scale, 60 * scale, 70 * scale]
    if t < edges[0]:
        return 15.0, "base"
    if t < edges[1]:
        return 15 + 75 * (t - edges[0]) / (edges[1] - edges[0]), "ramp"
    if t < edges[2]:
        return 90.0, "ramp"
    if t < edges[3]:
        return 250.0, "spike"
    return 15.0, "base"


class Downstream:
    """The inference service: admitted calls join a queue served at a fixed rate,
    whose length it exports on /metrics for Prometheus."""

    def __init__(self) -> None:
        self.queue = 0.0
        self.arrived = 0
        self.lock = threading.Lock()
        self.above_s = 0.0
        self.peak = 0.0
        self.stop = threading.Event()
        downstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = (
                    "# TYPE inference_queue_length gauge\n"
                    f"inference_queue_length {downstream.queue}\n"
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        threading.Thread(target=self._serve_queue, daemon=True).start()

    def admit(self) -> None:
        with self.lock:
            self.arrived += 1

    def reset(self) -> None:
        with self.lock:
            self.queue, self.arrived, self.above_s, self.peak = 0.0, 0, 0.0, 0.0

    def _serve_queue(self) -> None:
        step = 0.1
        while not self.stop.wait(step):
            with self.lock:
                self.queue = max(0.0, self.queue + self.arrived - E2E_CAPACITY_RPS * step)
                self.arrived = 0
                self.peak = max(self.peak, self.queue)
                if self.queue > E2E_THRESHOLD:
                    self.above_s += step

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@dataclass
class E2eOutcome:
    name: str
    offered: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    above_s: float = 0.0
    peak: float = 0.0
    changes: int = 0
    first_expand_s: float | None = None
    first_protect_s: float | None = None


async def drive(
    urls: dict[str, str], key: str, scale: float, downstream: Downstream, out: E2eOutcome
) -> None:
    """Open-loop arrivals (Poisson per 100 ms) spread over the regions' clients."""
    rng = random.Random(SEED + 2)
    clients = [AsyncClient(url, timeout=2.0) for url in urls.values()]
    pending: set[asyncio.Task[None]] = set()

    async def call(client: AsyncClient, phase: str) -> None:
        decision = await client.rate(key)
        out.offered[phase] = out.offered.get(phase, 0) + 1
        if decision.allowed:
            downstream.admit()
        else:
            out.refused[phase] = out.refused.get(phase, 0) + 1

    start = time.monotonic()
    tick = 0
    end = 85 * scale
    while (now := time.monotonic() - start) < end:
        rate, phase = e2e_rate(now, scale)
        for _ in range(poisson(rng, rate * SUBSTEP_S)):
            task = asyncio.create_task(call(clients[tick % len(clients)], phase))
            tick += 1
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.sleep(
            max(0.0, start + (math.floor(now / SUBSTEP_S) + 1) * SUBSTEP_S - time.monotonic())
        )
    await asyncio.gather(*pending)
    for client in clients:
        await client.aclose()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"end-to-end run: {what}: not within {timeout:g} s")
        time.sleep(0.2)


def end_to_end(scale: float) -> tuple[list[str], list[list[str]], str]:
    """Three real regions, a real Prometheus scraping them and the downstream, the
    controller acting through the client; static limits against autoscaled."""
    prometheus = shutil.which("prometheus")
    assert prometheus is not None, "main() checks"
    work = Path(tempfile.mkdtemp(prefix="bucketmesh-autoscale-bench-"))
    buckets = work / "buckets.yaml"
    buckets.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "agents",
                    "key": "agents-{{ .Request.Header.X-API-Key }}",
                    "capacity": 40,
                    "refillRate": 20,
                }
            ]
        )
    )
    mesh = LocalMesh(
        E2E_REGIONS,
        directory=str(work),
        buckets=str(buckets),
        cluster_id="bench-autoscale",
        admin_token=E2E_TOKEN,
        out=open(work / "mesh.log", "w"),  # noqa: SIM115
    )
    downstream = Downstream()
    processes: list[subprocess.Popen[bytes]] = []
    outcomes: list[E2eOutcome] = []
    try:
        if not mesh.start():
            raise SystemExit(f"end-to-end run: the mesh did not start (logs in {work})")
        [prometheus_port] = free_ports(1)
        scrape = {
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [
                {"job_name": "inference", "static_configs": [{"targets": [downstream.address]}]},
                {
                    "job_name": "bucketmesh",
                    "static_configs": [
                        {"targets": [u.removeprefix("http://") for u in mesh.urls.values()]}
                    ],
                },
            ],
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(scrape))
        processes.append(
            subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={work / 'prometheus.yml'}",
                    f"--storage.tsdb.path={work / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                ],
                stdout=open(work / "prometheus.log", "w"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
            )
        )
        prometheus_url = f"http://127.0.0.1:{prometheus_port}"
        wait_for(
            lambda: (
                httpx.get(
                    f"{prometheus_url}/api/v1/query", params={"query": "count(up == 1)"}
                ).json()["data"]["result"][0]["value"][1]
                == "4"
            ),
            "Prometheus scraping the three nodes and the downstream",
        )
        runs = [
            ("static (40, 20/s)", (40, 20.0), False),
            ("static, generous (600, 300/s)", (600, 300.0), False),
            ("autoscaled from (40, 20/s)", (40, 20.0), True),
        ]
        for index, (name, (capacity, refill), autoscaled) in enumerate(runs):
            with Client(mesh.urls, admin_token=E2E_TOKEN) as admin:
                admin.configure("agents", capacity=capacity, refill_rate=refill)
            downstream.reset()
            out = E2eOutcome(name)
            controller = None
            audit = work / f"audit-{index}.jsonl"
            if autoscaled:
                config = {
                    "interval": 1,
                    "horizon": 5,
                    "audit": str(audit),
                    "listen": f"127.0.0.1:{free_ports(1)[0]}",
                    "mesh": {"regions": mesh.urls, "adminToken": E2E_TOKEN},
                    "forecast": {"alpha": ALPHA, "beta": BETA, "phi": PHI},
                    "signals": {
                        "demand": {"type": "demand", "rule": "agents", "staleAfter": 3},
                        "queue": {
                            "type": "prometheus",
                            "url": prometheus_url,
                            "query": 'max(inference_queue_length{job="inference"})',
                            "staleAfter": 3,
                        },
                    },
                    "policies": [
                        {
                            "name": "agents",
                            "target": "agents",
                            "baseline": {"capacity": capacity, "refillRate": refill},
                            "min": {"capacity": 10, "refillRate": 10},
                            "max": {"capacity": 600, "refillRate": 300},
                            "expand": {"signal": "demand", "headroom": 1.2, "burstSeconds": 2},
                            "protect": {
                                "signal": "queue",
                                "threshold": E2E_THRESHOLD,
                                "restoreBelow": E2E_THRESHOLD / 2,
                                "refillRate": E2E_PROTECT_RPS,
                                "capacity": int(E2E_PROTECT_RPS),
                            },
                            "cooldown": 2,
                            "maxStep": 3,
                            "hysteresis": 0.1,
                        }
                    ],
                }
                (work / "autoscale.yaml").write_text(yaml.safe_dump(config))
                controller = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bucketmesh",
                        "autoscale",
                        "--config",
                        str(work / "autoscale.yaml"),
                    ],
                    stdout=open(work / "autoscale.log", "w"),  # noqa: SIM115
                    stderr=subprocess.STDOUT,
                )
                processes.append(controller)
                # ready once both signals are fresh (demand is a rate: two reads)
                metrics_url = f"http://{config['listen']}/metrics"

                def ready(
                    process: subprocess.Popen[bytes] = controller, url: str = metrics_url
                ) -> bool:
                    if process.poll() is not None:
                        return True
                    text = httpx.get(url).text
                    return all(
                        f'bucketmesh_autoscale_signal_stale{{signal="{name}"}} 0.0' in text
                        for name in ("demand", "queue")
                    )

                wait_for(ready, "the controller reading both signals", 30)
                if controller.poll() is not None:
                    raise SystemExit(f"end-to-end run: the controller exited (log in {work})")
            started = time.time()
            asyncio.run(drive(mesh.urls, f"agents-run-{index}", scale, downstream, out))
            if controller is not None:
                controller.send_signal(signal.SIGTERM)
                controller.wait(timeout=30)
                events = [json.loads(line) for line in audit.read_text().splitlines() if line]
                sets = [e for e in events if e["event"] == "set" and e["at"] >= started]
                out.changes = len(sets)
                ramp_at = started + 15 * scale
                spike_at = started + 60 * scale
                expands = [
                    e["at"] - ramp_at
                    for e in sets
                    if e["reason"] == "expand" and e["at"] >= ramp_at
                ]
                protects = [
                    e["at"] - spike_at
                    for e in sets
                    if e["reason"] == "protect" and e["at"] >= spike_at
                ]
                out.first_expand_s = expands[0] if expands else None
                out.first_protect_s = protects[0] if protects else None
            out.above_s, out.peak = downstream.above_s, downstream.peak
            outcomes.append(out)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)
        downstream.close()
        mesh.stop()
        shutil.rmtree(work, ignore_errors=True)

    columns = [
        "limits",
        "refused in ramp",
        "refused in spike",
        f"s queue > {E2E_THRESHOLD:g}",
        "peak queue",
        "changes",
        "first expand after ramp start",
        "first protect after spike start",
    ]

    def share(out: E2eOutcome, phase: str) -> str:
        offered, refused = out.offered.get(phase, 0), out.refused.get(phase, 0)
        return f"{refused:,} of {offered:,} ({pct(refused, offered)})"

    def seconds(value: float | None, autoscaled: bool) -> str:
        return "-" if not autoscaled else ("none" if value is None else f"{value:.1f} s")

    rows = [
        [
            o.name,
            share(o, "ramp"),
            share(o, "spike"),
            f"{o.above_s:.1f}",
            f"{o.peak:,.0f}",
            str(o.changes),
            seconds(o.first_expand_s, i == 2),
            seconds(o.first_protect_s, i == 2),
        ]
        for i, o in enumerate(outcomes)
    ]
    note = (
        f"Three `bucketmesh serve` regions on loopback, a real Prometheus "
        f"(`prometheus` {_prometheus_version(prometheus)}) scraping them and a simulated "
        f"inference service ({E2E_CAPACITY_RPS:g} req/s, queue threshold {E2E_THRESHOLD:g}) "
        f"every second, agents calling the three regions through `AsyncClient` "
        f"(Poisson, 15 req/s, a ramp to 90 req/s over {30 * scale:g} s, a "
        f"{15 * scale:g} s plateau, a {10 * scale:g} s spike of 250 req/s); the controller "
        "(`bucketmesh autoscale`, every 1 s, horizon 5 s, demand from the three nodes' "
        "/metrics, the queue through Prometheus' HTTP API, protect at "
        f"{E2E_PROTECT_RPS:g}/s) acting through the client's PATCH. One run each, "
        "so timings here are indicative (a shared machine)."
    )
    return columns, rows, note


def _prometheus_version(binary: str) -> str:
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    text = (done.stdout or done.stderr).split()
    return text[2] if len(text) > 2 else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one compressed day, not three")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument(
        "--no-e2e", action="store_true", help="skip the end-to-end run on a real mesh"
    )
    args = parser.parse_args(argv)
    days = 1 if args.quick else 3
    machine = _report.machine()
    trace = make_trace(days)

    outcomes = [
        replay("static, daily peak (200, 100/s)", trace, 200, 100.0, None),
        replay("static, fleet peak (600, 300/s)", trace, 600, 300.0, None),
        replay("static, generous (1200, 600/s)", trace, 1200, 600.0, None),
    ]
    for name, expand, protect, baseline, trend in (
        ("generous + protect", False, True, (1200, 600.0), True),
        ("expand, reactive (no trend)", True, False, (200, 100.0), False),
        ("expand", True, False, (200, 100.0), True),
        ("expand + protect", True, True, (200, 100.0), True),
    ):
        controller = Controller(controller_config(expand, protect, baseline, trend))
        outcomes.append(replay(name, trace, baseline[0], baseline[1], controller))

    columns = [
        "limits",
        "refused in ramps",
        "refused in spikes",
        "refused overall",
        f"s queue > {QUEUE_THRESHOLD:g}",
        "peak queue",
        "changes",
    ]
    rows = [
        [
            o.name,
            f"{o.refused_ramp:,} ({pct(o.refused_ramp, o.offered_ramp)})",
            f"{o.refused_spike:,} ({pct(o.refused_spike, o.offered_spike)})",
            f"{o.refused:,} ({pct(o.refused, o.offered)})",
            f"{o.above_threshold_s:,.0f}",
            f"{o.peak_queue:,.0f}",
            str(o.changes),
        ]
        for o in outcomes
    ]
    _report.print_table("P11: static limits vs autoscale on AI-agent traces", columns, rows)

    # Forecast error on the signals the controller saw (the static run's: the
    # demand offered does not depend on the limits; the queue's does, so it is taken
    # from the expand+protect run, the one the controller acted on).
    steps = HORIZON_S // INTERVAL_S
    season = DAY_S // INTERVAL_S
    skip = season if days > 1 else 60
    holt = ForecastSettings(alpha=ALPHA, beta=BETA, phi=PHI, z=2)
    winters = ForecastSettings(alpha=ALPHA, beta=BETA, phi=PHI, gamma=0.2, season=season, z=2)
    error_rows = []
    # the sample taken at the end of each interval (as the controller saw it)
    ramp_samples = [
        trace.ramp[t] and not trace.spike[t]
        for t in range(INTERVAL_S - 1, len(trace.demand), INTERVAL_S)
    ]
    for label, series in (
        ("demand (req/s)", outcomes[0].demand_signal),
        ("queue length", outcomes[-1].queue_signal),
    ):
        for method, make in (
            ("Holt (damped)", lambda: Forecaster(holt)),
            ("Holt–Winters", lambda: Forecaster(winters)),
            ("naive (last value)", None),
        ):
            e = forecast_error(series, make, steps, skip, ramp_samples)
            error_rows.append(
                [
                    label,
                    method,
                    f"{e.mae:,.1f}",
                    f"{e.mae_ramps:,.1f}",
                    f"{e.mape:.1f} %" if label.startswith("demand") else "-",
                    "-" if e.coverage is None else f"{e.coverage:.1f} %",
                ]
            )
    error_columns = ["signal", "forecast", "MAE", "MAE in ramps", "MAPE", "inside ±2σ band"]
    _report.print_table("P11: forecast error, 30 s ahead", error_columns, error_rows)

    by_name = {o.name.split(" (")[0]: o for o in outcomes}
    daily_static = by_name["static, daily peak"]
    fleet_static = by_name["static, fleet peak"]
    generous = by_name["static, generous"]
    best = by_name["expand + protect"]
    static = daily_static
    reactive, predictive = by_name["expand, reactive"], by_name["expand"]

    def cut(new: float, old: float) -> str:
        return f"{100 * (1 - new / old):.0f} %" if old else "-"

    verdict = (
        f"expand + protect refuses {cut(best.refused_ramp, daily_static.refused_ramp)} fewer "
        f"legitimate requests in ramps than the static limit sized for the daily peak "
        f"({cut(best.refused_ramp, fleet_static.refused_ramp)} fewer than one sized for the "
        f"fleet's peak), and keeps the downstream queue above its threshold "
        f"{cut(best.above_threshold_s, generous.above_threshold_s)} less time than a static "
        f"limit generous enough to refuse nothing in ramps, with {best.changes} limit changes. "
        f"The trend adds nothing measurable to expand here ({predictive.refused_ramp:,} vs "
        f"{reactive.refused_ramp:,} refused in ramps without it): the 1.2 headroom covers "
        "these ramps; tests/test_autoscale_controller.py shows the case where it does matter."
    )
    print(verdict)
    e2e: tuple[list[str], list[list[str]], str] | None = None
    e2e_skipped = "skipped (--no-e2e)" if args.no_e2e else ""
    if not args.no_e2e and shutil.which("prometheus") is None:
        e2e_skipped = "not run: no `prometheus` binary (Debian's; `make test` installs it)"
        print(f"end-to-end run {e2e_skipped}", file=sys.stderr)
    if not e2e_skipped:
        e2e = end_to_end(0.5 if args.quick else 1.0)
        _report.print_table("P11: end to end, a real mesh and Prometheus", e2e[0], e2e[1])
    if not args.no_record:
        body = "\n\n".join(
            [
                f"{days} compressed day(s) of {DAY_S} s (seed {SEED}), "
                f"{static.offered:,} requests offered: a daily cycle 30 → 90 req/s, three "
                "fleet ramps a day (+120…200 req/s over 10 min, 15 min plateau), four "
                "5–10× spikes a day (1–3 min), Poisson arrivals per 100 ms; a downstream "
                f"serving {DOWNSTREAM_RPS:g} req/s shared with other tenants (20 → 100 "
                "req/s, two 10 min batch jobs of 150 req/s a day), queue threshold "
                f"{QUEUE_THRESHOLD:g}; protect caps refill and capacity at {PROTECT_RPS:g}. "
                f"Controller every {INTERVAL_S} s, horizon {HORIZON_S} s, Holt damped trend, "
                "cooldown 10 s, max step 2×, hysteresis 15 %. The real bucket math "
                "(`Bucket.acquire` / `reconfigure`).",
                _report.markdown_table(columns, rows),
                f"**{verdict}**",
                "Forecast error (each signal sampled every 5 s; MAPE over samples above 1; "
                "the band is the controller's ±2σ):",
                _report.markdown_table(error_columns, error_rows),
                "Holt–Winters' seasonal indices learn the ramps and spikes of the day they "
                "saw, which fall elsewhere the next day, and the daily cycle moves little "
                "within 30 s: at this horizon the damped trend alone does better, so the "
                "controller's default is Holt (a season is opt-in). On the spiky demand no "
                "model beats the naive forecast by MAE; on the queue Holt does.",
                *(
                    [f"End to end: {e2e_skipped}."]
                    if e2e is None
                    else ["End to end:", e2e[2], _report.markdown_table(e2e[0], e2e[1])]
                ),
                "Command: `PYTHONPATH=src .venv/bin/python benchmarks/autoscale.py"
                + (" --quick`" if args.quick else "`"),
            ]
        )
        _report.append_section(
            "P11 autoscale: static limits vs predictive (benchmarks/autoscale.py)",
            body,
            machine=machine,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
