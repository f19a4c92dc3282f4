"""``bucketmesh xr run``: play a scenario against a mesh and judge it.

Locally (no ``--url``) the runner starts the mesh itself — a
:class:`~bucketmesh.tooling.cluster.LocalMesh`, the same as ``bucketmesh cluster up``,
with a fault-injecting proxy between every pair of regions — and partitions
by cutting proxy links, crashes by ``kill -9`` and restart. Against a real
deployment (``--url region=URL`` for each region, ``--admin-token``) it
partitions with ``POST /v1/admin/faults`` on the isolated region's node, and
cannot crash nodes (a ``crash`` phase is an error there).

Everything is timed on one clock, seconds since the run's origin: requests
(:class:`~bucketmesh.tooling.xr.load.Recorder`), scrapes and state polls
(:mod:`bucketmesh.tooling.xr.scrape`) and the run's events (partition, heal, kill,
restart, verify), which the report draws and the SLOs use to find the
failover windows. Convergence after a heal is measured, not assumed: at the
heal the runner reads what every replica has spent as its own region sees it,
then polls until every region knows at least that much.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import yaml

from bucketmesh.tooling.xr import DEFAULT_KEY_TEMPLATE, bucket_key
from bucketmesh.tooling.xr.load import LoadGenerator, Recorder, Target
from bucketmesh.tooling.xr.scenario import Scenario
from bucketmesh.tooling.xr.scrape import MetricsScraper, StateWatcher
from bucketmesh.tooling.xr.verify import Verdict, caught_up, own_counters, read_views, verify

CONVERGENCE_POLL_S = 0.02
CONVERGENCE_LIMIT_S = 60.0
#: after a heal or a restart, lag samples are the backlog catching up, not steady lag
SETTLE_AFTER_FAULT_S = 3.0


@dataclass
class Event:
    t: float
    kind: str
    region: str = ""
    detail: str = ""


@dataclass
class Window:
    """A fault, from its start until the mesh should be whole again (seconds since t0)."""

    kind: str
    region: str
    start: float
    end: float  # healed / serving again
    settled: float  # end + SETTLE_AFTER_FAULT_S: lag until then is catch-up


@dataclass
class LoadRun:
    api_key: str
    rates: dict[str, float]
    start: float
    end: float = 0.0


@dataclass
class RunResult:
    scenario: Scenario
    urls: dict[str, str]
    key: str
    capacity: float
    refill_rate: float
    recorder: Recorder
    scraper: MetricsScraper
    watcher: StateWatcher
    events: list[Event] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    loads: list[LoadRun] = field(default_factory=list)
    convergence: list[tuple[float, float | None]] = field(default_factory=list)
    restarts: list[tuple[str, float | None]] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    partitions: list[float] = field(default_factory=list)  # their durations
    duration: float = 0.0
    local: bool = True


class RunError(Exception):
    pass


def buckets_file(scenario: Scenario, directory: Path) -> Path:
    """The rule under test, for a local mesh: the seed's key template with the
    scenario's capacity and refill."""
    path = directory / "buckets.yaml"
    rule = {
        "name": "agent-api-key",
        "key": "agent-api-key-{{ .Request.Header.X-API-Key | sha256 }}",
        "capacity": scenario.bucket.capacity,
        "refillRate": scenario.bucket.refillRate,
        "ttl": 3600,
    }
    path.write_text(yaml.safe_dump([rule], sort_keys=False))
    return path


class Runner:
    def __init__(
        self,
        scenario: Scenario,
        out_dir: Path,
        *,
        urls: Mapping[str, str] | None = None,
        admin_token: str | None = None,
        key_template: str = DEFAULT_KEY_TEMPLATE,
        console: IO[str] = sys.stderr,
        live: bool = True,
        metrics_port: int | None = None,
    ) -> None:
        self.scenario = scenario
        self.out_dir = out_dir
        self.remote_urls = dict(urls) if urls else None
        self.admin_token = admin_token or (None if urls else secrets.token_urlsafe(16))
        self.key_template = key_template
        self.console = console
        self.live = live
        self.mesh: Any = None
        self.t0 = time.monotonic()  # reset when the run proper starts
        self.background: list[asyncio.Task[Any]] = []
        self.load_tasks: list[asyncio.Task[None]] = []
        self.active_rates: dict[str, float] = {}
        #: (kind, region) of the faults held now, for the exporter
        self.active_faults: set[tuple[str, str]] = set()
        self.metrics_port = metrics_port

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        self.console.write(f"[xr {self.now():7.2f}s] {text}\n")
        self.console.flush()

    # -- the mesh ----------------------------------------------------------------

    def _start_local(self) -> dict[str, str]:
        from bucketmesh.tooling.cluster import LocalMesh
        from bucketmesh.tooling.netproxy import Faults

        net = self.scenario.network
        directory = self.out_dir / "mesh"
        directory.mkdir(parents=True, exist_ok=True)
        faults = Faults(net.latency_ms / 1000, net.jitter_ms / 1000, net.loss)
        self.mesh = LocalMesh(
            self.scenario.regions,
            directory=str(directory),
            buckets=str(buckets_file(self.scenario, directory)),
            faults=faults if net.proxy else None,
            admin_token=self.admin_token,
        )
        if not self.mesh.start():
            self.mesh.stop()
            raise RunError(f"the local mesh did not start; see the logs in {directory}")
        return dict(self.mesh.urls)

    # -- phases --------------------------------------------------------------------

    async def run(self) -> RunResult:
        scenario = self.scenario
        self.out_dir.mkdir(parents=True, exist_ok=True)
        local = self.remote_urls is None
        if local:
            self.say(
                f"starting a local mesh of {len(scenario.regions)} regions "
                f"({scenario.network.latency_ms:g} ms one way between them)"
            )
            urls = await asyncio.to_thread(self._start_local)
        else:
            assert self.remote_urls is not None
            urls = self.remote_urls
        api_key = f"xr-{scenario.name}-{secrets.token_hex(4)}"
        key = bucket_key(self.key_template, api_key)
        self.t0 = time.monotonic()
        recorder = Recorder(self.t0)
        result = RunResult(
            scenario,
            urls,
            key,
            float(scenario.bucket.capacity),
            float(scenario.bucket.refillRate),
            recorder,
            MetricsScraper(urls, self.t0, scenario.metrics_interval),
            StateWatcher(urls, key, self.t0),
            local=local,
        )
        self.result = result
        self.api_key = api_key
        if self.metrics_port is not None:
            from bucketmesh.tooling.xr.exporter import serve

            port = serve(self, self.metrics_port)
            self.say(f"runner metrics for Prometheus on http://127.0.0.1:{port}/metrics")
        stop = asyncio.Event()
        watchers = [
            asyncio.create_task(result.scraper.run(stop)),
            asyncio.create_task(result.watcher.run(stop)),
        ]
        progress = asyncio.create_task(self._progress(stop))
        try:
            for phase in scenario.phases:
                await getattr(self, f"_phase_{phase.kind}")(phase.spec)
            await self._phase_wait_load(None)
            for task in self.background:
                await task
            await self._read_bucket_config(result)
        finally:
            for task in self.load_tasks:
                task.cancel()
            # a run stopped mid-partition (Ctrl-C, an error) must not leave a real
            # region cut off: its fault would otherwise last the phase's duration
            await self._lift_faults()
            stop.set()
            for task in (*watchers, progress):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            result.duration = self.now()
            if self.mesh is not None:
                await asyncio.to_thread(self.mesh.stop)
        return result

    async def _read_bucket_config(self, result: RunResult) -> None:
        """The limits actually in force (a real deployment's rule may differ from the file)."""
        async with httpx.AsyncClient(timeout=5) as client:
            for url in result.urls.values():
                with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                    reply = await client.get(f"{url}/v1/bucket/state", params={"key": result.key})
                    if reply.status_code == 200:
                        body = reply.json()
                        result.capacity = float(body["capacity"])
                        result.refill_rate = float(body["refill_rate"])
                        return

    async def _phase_load(self, spec: Any) -> None:
        regions = self.scenario.regions
        rates = (
            {r: float(spec.rate.get(r, 0.0)) for r in regions}
            if isinstance(spec.rate, dict)
            else dict.fromkeys(regions, float(spec.rate))
        )
        targets = [Target(r, self.result.urls[r], rate) for r, rate in rates.items() if rate > 0]
        generator = LoadGenerator(
            targets,
            key=self.api_key,
            duration_s=spec.duration,
            recorder=self.result.recorder,
            connections=spec.connections,
            failover=self.scenario.failover,
            all_urls=self.result.urls,
        )
        run = LoadRun(self.result.key, rates, self.now())
        self.result.loads.append(run)
        self.result.events.append(Event(run.start, "load", "", f"{spec.duration:g} s, {rates}"))
        self.say(f"load: {sum(rates.values()):g} req/s for {spec.duration:g} s {rates}")
        for region, rate in rates.items():
            self.active_rates[region] = self.active_rates.get(region, 0.0) + rate

        async def drive() -> None:
            try:
                await generator.run()
            finally:
                run.end = self.now()
                for region, rate in rates.items():
                    self.active_rates[region] -= rate
                self.result.events.append(Event(run.end, "load-end"))

        task = asyncio.create_task(drive())
        self.load_tasks.append(task)
        if not spec.background:
            await task

    async def _phase_wait(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def _phase_wait_load(self, _spec: Any) -> None:
        for task in self.load_tasks:
            await task

    async def _phase_heal(self, _spec: Any) -> None:
        await self._heal(None)

    async def _phase_partition(self, spec: Any) -> None:
        task = asyncio.create_task(self._partition(spec.region, spec.duration))
        self.background.append(task)
        if not spec.background:
            await task

    async def _partition(self, region: str, duration: float) -> None:
        others = [r for r in self.scenario.regions if r != region]
        start = self.now()
        self.result.events.append(Event(start, "partition", region, f"{duration:g} s"))
        self.say(f"partition: {region} cut off from {', '.join(others)} for {duration:g} s")
        self.active_faults.add(("partition", region))
        if self.mesh is not None and self.mesh.proxy is not None:
            await asyncio.to_thread(self.mesh.cut, [region])
        else:
            await self._admin_fault(region, others, duration)
        await asyncio.sleep(duration)
        self.active_faults.discard(("partition", region))
        healed = await self._heal(region)
        self.result.partitions.append(duration)
        self.result.windows.append(
            Window("partition", region, start, healed, healed + SETTLE_AFTER_FAULT_S)
        )

    async def _lift_faults(self) -> None:
        """Remove the partitions still in force on the regions given by ``--url``."""
        if self.remote_urls is None:
            return
        headers = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
        regions = [region for kind, region in self.active_faults if kind == "partition"]
        async with httpx.AsyncClient(timeout=5) as client:
            for region in regions:
                with contextlib.suppress(httpx.HTTPError):
                    await client.delete(
                        f"{self.result.urls[region]}/v1/admin/faults", headers=headers
                    )
                self.active_faults.discard(("partition", region))

    async def _admin_fault(self, region: str, peers: list[str], seconds: float) -> None:
        url = self.result.urls[region]
        headers = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
        async with httpx.AsyncClient(timeout=5) as client:
            try:
                reply = await client.post(
                    f"{url}/v1/admin/faults",
                    json={"peers": peers, "seconds": seconds},
                    headers=headers,
                )
            except httpx.HTTPError as error:  # the region is down or unreachable
                raise RunError(
                    f"POST {url}/v1/admin/faults ({region}): {type(error).__name__}: {error}"
                ) from None
        if reply.status_code != 200:
            raise RunError(
                f"POST {url}/v1/admin/faults answered {reply.status_code}: {reply.text[:300]}"
            )

    async def _heal(self, region: str | None) -> float:
        if self.mesh is not None and self.mesh.proxy is not None:
            await asyncio.to_thread(self.mesh.heal, None if region is None else [region])
        elif region is not None and self.remote_urls is not None:
            # the fault expires by itself; DELETE makes the heal instant exact
            url = self.result.urls[region]
            headers = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
            async with httpx.AsyncClient(timeout=5) as client:
                with contextlib.suppress(httpx.HTTPError):
                    await client.delete(f"{url}/v1/admin/faults", headers=headers)
        healed = self.now()
        self.result.events.append(Event(healed, "heal", region or ""))
        self.say(f"heal{': ' + region if region else ''}")
        converged = await self._convergence(healed)
        self.result.convergence.append((healed, converged))
        self.say(
            f"converged {converged:.3f} s after the heal"
            if converged is not None
            else f"NOT converged {CONVERGENCE_LIMIT_S:g} s after the heal"
        )
        return healed

    async def _convergence(self, since: float) -> float | None:
        """Seconds from ``since`` until every region knows what every replica had
        spent, in its own region's view, at the heal."""
        urls = self.result.urls
        async with httpx.AsyncClient(timeout=1.0) as client:
            target = own_counters(await read_views(client, urls, self.result.key))
            while self.now() - since < CONVERGENCE_LIMIT_S:
                views = await read_views(client, urls, self.result.key)
                if caught_up(views, target):
                    return self.now() - since
                await asyncio.sleep(CONVERGENCE_POLL_S)
        return None

    async def _phase_crash(self, spec: Any) -> None:
        if self.mesh is None:
            raise RunError("a crash phase needs the local mesh (kill -9 and restart)")
        region = spec.region
        if region == "busiest":
            region = max(self.scenario.regions, key=lambda r: self.active_rates.get(r, 0.0))
        start = self.now()
        self.result.events.append(Event(start, "kill", region, "SIGKILL"))
        self.say(f"crash: kill -9 {region}, restart after {spec.down:g} s")
        self.active_faults.add(("crash", region))
        await asyncio.to_thread(self.mesh.kill, region)
        await asyncio.sleep(spec.down)
        restart = self.now()
        self.result.events.append(Event(restart, "restart", region))
        ok = await asyncio.to_thread(self.mesh.restart, region)
        ready = self.now()
        self.active_faults.discard(("crash", region))
        self.result.restarts.append((region, ready - restart if ok else None))
        self.result.events.append(Event(ready, "ready", region, f"{ready - restart:.2f} s"))
        self.say(f"{region} serving again {ready - restart:.2f} s after its restart")
        self.result.windows.append(
            Window("crash", region, start, ready, ready + SETTLE_AFTER_FAULT_S)
        )

    async def _phase_verify(self, spec: Any) -> None:
        if spec.settle:
            await asyncio.sleep(spec.settle)
        started = self.now()
        verdict = await verify(self.result.urls, self.result.key, spec.tolerance)
        # Within the window, wait for identical replicas too (what a quiet mesh shows),
        # not only for levels that happen to agree while a delta is still in flight.
        while not (verdict.passed and verdict.replicas_identical) and (
            self.now() - started < spec.within
        ):
            await asyncio.sleep(0.05)
            verdict = await verify(self.result.urls, self.result.key, spec.tolerance)
        self.result.verdicts.append(verdict)
        self.result.events.append(
            Event(self.now(), "verify", "", "PASS" if verdict.passed else "FAIL")
        )
        for line in verdict.lines():
            self.say(line)

    # -- live progress ---------------------------------------------------------

    async def _progress(self, stop: asyncio.Event) -> None:
        from bucketmesh.tooling.xr.live import progress

        await progress(self.result, stop, self.console, live=self.live)
