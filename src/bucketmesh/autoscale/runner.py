"""The controller process: the I/O around the pure ``Controller``.

Every ``interval``: read each signal (``signals.py``), read each target's current
limits from the mesh (to notice a change someone else made), ``tick`` the
controller, apply each ``set`` through the client's ``configure`` (a versioned
PATCH the mesh replicates to every region), write an audit event per change,
rewrite the decisions file ``explain`` reads, and update the /metrics gauges.

Several controllers do not fight: a controller adopts, and waits a cooldown
after, any config of its target with a newer version than its own last write
(docs/autoscale.md, "One controller per cluster").
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO, Any
from urllib.parse import quote

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from bucketmesh.autoscale.controller import Controller, Decision, Reading
from bucketmesh.autoscale.policy import Config, Limits, Policy
from bucketmesh.autoscale.signals import SignalReader, reader_for
from bucketmesh.client import BucketmeshError, Client
from bucketmesh.telemetry.log import logger

log = logger("autoscale")

KEEP_DECISIONS = 20  # per policy, in the decisions file
KEEP_CHANGES = 5  # the last changes per policy, however long ago


class ControllerMetrics:
    """The controller's own /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.signal = Gauge("bucketmesh_autoscale_signal", "Latest reading", ["signal"], registry=r)
        self.stale = Gauge(
            "bucketmesh_autoscale_signal_stale",
            "1 while a signal is stale or missing",
            ["signal"],
            registry=r,
        )
        self.forecast = Gauge(
            "bucketmesh_autoscale_forecast", "Forecast at the horizon", ["signal"], registry=r
        )
        self.low = Gauge(
            "bucketmesh_autoscale_forecast_low",
            "Lower edge of the forecast band",
            ["signal"],
            registry=r,
        )
        self.high = Gauge(
            "bucketmesh_autoscale_forecast_high",
            "Upper edge of the forecast band",
            ["signal"],
            registry=r,
        )
        self.capacity = Gauge(
            "bucketmesh_autoscale_capacity",
            "Capacity the controller set (or would, dry run)",
            ["policy", "target"],
            registry=r,
        )
        self.refill = Gauge(
            "bucketmesh_autoscale_refill_rate",
            "Refill rate the controller set (or would)",
            ["policy", "target"],
            registry=r,
        )
        self.protecting = Gauge(
            "bucketmesh_autoscale_protecting",
            "1 while protect caps the refill rate",
            ["policy"],
            registry=r,
        )
        self.actions = Counter(
            "bucketmesh_autoscale_actions",
            "Decisions by policy, action and reason",
            ["policy", "action", "reason"],
            registry=r,
        )
        self.failures = Counter(
            "bucketmesh_autoscale_patch_failures",
            "Changes the mesh did not take",
            ["policy"],
            registry=r,
        )
        self.ticks = Counter("bucketmesh_autoscale_ticks", "Control intervals run", registry=r)

    def record(self, decisions: list[Decision]) -> None:
        self.ticks.inc()
        for d in decisions:
            self.actions.labels(d.policy, d.action, d.reason).inc()
            self.capacity.labels(d.policy, d.target).set(d.capacity)
            self.refill.labels(d.policy, d.target).set(d.refill_rate)
            self.protecting.labels(d.policy).set(1 if d.protecting else 0)
            for name, view in d.signals.items():
                self.stale.labels(name).set(1 if view.stale else 0)
                if view.value is not None:
                    self.signal.labels(name).set(view.value)
                if view.forecast is not None:
                    self.forecast.labels(name).set(view.forecast)
                if view.low is not None:
                    self.low.labels(name).set(view.low)
                if view.high is not None:
                    self.high.labels(name).set(view.high)


def _hlc(version: str) -> int:
    try:
        return int(version.partition("@")[0])
    except ValueError:
        return 0


class Runner:
    """One controller process; ``run`` until ``stop`` is set."""

    def __init__(
        self,
        config: Config,
        *,
        dry_run: bool | None = None,
        clock: Callable[[], float] = time.time,
        out: IO[str] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.dry_run = config.dry_run if dry_run is None else dry_run
        self.clock = clock
        self.http = httpx.Client(timeout=max(0.5, min(5.0, config.interval / 2)))
        self.client = Client(config.regions, admin_token=config.admin_token, timeout=2.0)
        self.readers: dict[str, SignalReader] = {
            name: reader_for(signal, config.regions, self.http)
            for name, signal in config.signals.items()
        }
        self.metrics = ControllerMetrics()
        self.stop = stop or threading.Event()
        self._out = out or sys.stdout
        self._audit: IO[str] | None = None
        self._written: dict[str, int] = {}  # policy → HLC of our last PATCH
        self._recent: dict[str, deque[dict[str, Any]]] = {
            p.name: deque(maxlen=KEEP_DECISIONS) for p in config.policies
        }
        self._changes: dict[str, deque[dict[str, Any]]] = {
            p.name: deque(maxlen=KEEP_CHANGES) for p in config.policies
        }
        self.controller = Controller(config, self._current_limits())

    # -- the mesh's view ----------------------------------------------------------------

    def _read_config(self, policy: Policy) -> tuple[Limits, int] | None:
        """The target's limits and config version, from the first region that answers."""
        for url in self.config.regions.values():
            try:
                response = self.http.get(f"{url}/v1/buckets/{quote(policy.target, safe='')}")
            except httpx.HTTPError:
                continue
            if response.status_code != 200:
                continue
            body = response.json()
            version = body.get("version") or body.get("config_version") or ""
            return Limits(int(body["capacity"]), float(body["refill_rate"])), _hlc(version)
        return None

    def _current_limits(self) -> dict[str, Limits]:
        found: dict[str, Limits] = {}
        for policy in self.config.policies:
            read = self._read_config(policy)
            if read is not None:
                found[policy.target] = read[0]
                self._written[policy.name] = read[1]
        return found

    def _notice_changes(self, now: float) -> None:
        if self.dry_run:
            return
        for policy in self.config.policies:
            read = self._read_config(policy)
            if read is None:
                continue
            limits, hlc = read
            if hlc > self._written.get(policy.name, 0):
                self._written[policy.name] = hlc
                if limits != self.controller.limits(policy.name):
                    self._event(
                        {
                            "event": "adopted",
                            "policy": policy.name,
                            "target": policy.target,
                            "capacity": limits.capacity,
                            "refill_rate": limits.refill_rate,
                            "why": "the mesh holds a newer config than this controller's last",
                        },
                    )
                    self.controller.adopt(policy.name, limits, now)

    # -- one interval -------------------------------------------------------------------

    def tick(self) -> list[Decision]:
        now = self.clock()
        readings: dict[str, Reading | None] = {}
        for name, reader in self.readers.items():
            readings[name] = reader.read(now)
            if readings[name] is None and reader.problem:
                log.info("signal %s: %s", name, reader.problem)
        self._notice_changes(now)
        decisions = self.controller.tick(now, readings)
        for decision in decisions:
            record = {
                **decision.as_dict(),
                "problems": {
                    n: self.readers[n].problem for n in decision.signals if self.readers[n].problem
                },
            }
            if decision.changed:
                record["outcome"] = self._apply(decision, now)
                self._changes[decision.policy].append(record)
            self._recent[decision.policy].append(record)
        self.metrics.record(decisions)
        self._write_decisions()
        return decisions

    def _apply(self, decision: Decision, now: float) -> str:
        """Make the change (unless dry run); audit it; answer the audit event's kind."""
        event: dict[str, Any] = {
            "event": "would-set" if self.dry_run else "set",
            **decision.as_dict(),
        }
        if not self.dry_run:
            try:
                answer = self.client.configure(
                    decision.target, capacity=decision.capacity, refill_rate=decision.refill_rate
                )
                event["version"] = answer.version
                event["region"] = answer.endpoint
                self._written[decision.policy] = _hlc(answer.version)
            except BucketmeshError as error:
                self.metrics.failures.labels(decision.policy).inc()
                event["event"] = "failed"
                event["error"] = f"{type(error).__name__}: {error}"
                # the mesh kept the old limits: believe that, and retry after a cooldown
                self.controller.adopt(decision.policy, decision.previous, now)
        self._event(event)
        return str(event["event"])

    def _event(self, event: dict[str, Any]) -> None:
        event.setdefault("at", self.clock())
        event["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event["at"]))
        line = json.dumps(event, sort_keys=True) + "\n"
        if self.config.audit == "-":
            self._out.write(line)
            self._out.flush()
            return
        if self._audit is None:
            self._audit = open(self.config.audit, "a", encoding="utf-8")  # noqa: SIM115
        self._audit.write(line)
        self._audit.flush()

    def _write_decisions(self) -> None:
        if not self.config.decisions:
            return
        body = {
            "dry_run": self.dry_run,
            "policies": {k: list(v) for k, v in self._recent.items()},
            "changes": {k: list(v) for k, v in self._changes.items()},
        }
        temporary = f"{self.config.decisions}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(body, handle, indent=1, sort_keys=True)
        os.replace(temporary, self.config.decisions)

    # -- the loop -----------------------------------------------------------------------

    def serve_metrics(self) -> tuple[str, int] | None:
        if not self.config.listen:
            return None
        host, _, port = self.config.listen.rpartition(":")
        server, _thread = start_http_server(
            int(port), addr=host or "0.0.0.0", registry=self.metrics.registry
        )
        address = server.server_address
        return str(address[0]), int(address[1])

    def run(self, ticks: int | None = None) -> None:
        done = 0
        next_at = time.monotonic()
        while not self.stop.is_set() and (ticks is None or done < ticks):
            self.tick()
            done += 1
            next_at += self.config.interval
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def close(self) -> None:
        self.http.close()
        self.client.close()
        if self._audit is not None:
            self._audit.close()
