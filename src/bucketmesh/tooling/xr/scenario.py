"""Scenario files: what ``bucketmesh xr run SCENARIO.yaml`` does, and the SLOs it must meet.

A scenario is a YAML mapping; ``phases`` is a list run in order, each item a
mapping with exactly one key naming the phase::

    name: partition-30s
    regions: [us-east-1, eu-central-1, ap-southeast-2]
    network: {latency_ms: 40, jitter_ms: 4, loss: 0}   # local mesh: the proxies' faults
    bucket: {capacity: 5000, refillRate: 50}            # local mesh: the rule under test
    failover: true          # a request whose region is unreachable goes to the next region
    phases:
      - load: {duration: 90, rate: 300, background: true}   # rate per region, or {region: rate}
      - wait: 20
      - partition: {region: ap-southeast-2, duration: 30}   # blocks for the duration, then heals
      - crash: {region: busiest, down: 1}                   # kill -9, wait, restart
      - wait_load: {}                                       # until background loads end
      - verify: {tolerance: 0, settle: 2}
    slo: {latency_p50_ms: 100, convergence_s: 1.5}          # see SLO below; omitted → default

Durations are seconds. ``--scale F`` multiplies every duration (load,
wait, partition, crash down-time, settle), so a test can run a shipped
scenario in a tenth of its time. A malformed scenario raises
:class:`ScenarioError` naming the file and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from bucketmesh.core.limits import error_location


class ScenarioError(Exception):
    def __init__(self, file: str, field: str, message: str) -> None:
        super().__init__(f"{file}: {field}: {message}" if field else f"{file}: {message}")
        self.file = file
        self.field = field


class Network(msgspec.Struct, forbid_unknown_fields=True):
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    proxy: bool = True


class BucketRule(msgspec.Struct, forbid_unknown_fields=True):
    capacity: int = 5000
    refillRate: float = 50.0


class Load(msgspec.Struct, forbid_unknown_fields=True):
    duration: float
    rate: float | dict[str, float] = 200.0
    background: bool = False
    connections: int = 4


class Partition(msgspec.Struct, forbid_unknown_fields=True):
    region: str
    duration: float
    background: bool = False


class Crash(msgspec.Struct, forbid_unknown_fields=True):
    region: str = "busiest"
    down: float = 1.0


class Verify(msgspec.Struct, forbid_unknown_fields=True):
    """Read the bucket in every region after ``settle`` s; pass when the spread is
    within ``tolerance``, re-reading for up to ``within`` s (not scaled) first."""

    tolerance: float = 1.0
    settle: float = 0.0
    within: float = 0.0


class WaitLoad(msgspec.Struct, forbid_unknown_fields=True):
    pass


class Heal(msgspec.Struct, forbid_unknown_fields=True):
    pass


class SLO(msgspec.Struct, forbid_unknown_fields=True):
    """Thresholds; the seed's first, then ours (docs/targets.md R2, R3, R7)."""

    latency_p50_ms: float = 100.0
    latency_p95_ms: float = 200.0
    consumption_pct: float = 5.0
    replication_lag_ms: float = 150.0
    failover_error_rate_pct: float = 5.0
    convergence_s: float = 2.0
    #: over-admission may use at most this share of the documented bound (1.0 = the bound)
    over_admission_bound_share: float = 1.0
    #: which connected bound applies (docs/sync.md): "steady" traffic, (n−1)(1 + r·d), or
    #: "worst", (n−1)(C + r·d), for bursts that several regions fire at once
    over_admission_model: Literal["steady", "worst"] = "steady"
    restart_s: float = 2.0


PHASES: dict[str, type[Any]] = {
    "load": Load,
    "wait": float,
    "partition": Partition,
    "crash": Crash,
    "verify": Verify,
    "wait_load": WaitLoad,
    "heal": Heal,
}


class ScenarioFile(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    phases: list[dict[str, Any]]
    description: str = ""
    regions: list[str] = msgspec.field(
        default_factory=lambda: ["us-east-1", "eu-central-1", "ap-southeast-2"]
    )
    network: Network = msgspec.field(default_factory=Network)
    bucket: BucketRule = msgspec.field(default_factory=BucketRule)
    failover: bool = True
    sync_interval_ms: float = 20.0
    metrics_interval: float = 1.0
    slo: SLO = msgspec.field(default_factory=SLO)


@dataclass
class Phase:
    kind: str
    spec: Any
    field: str  # where it is in the file, for messages


@dataclass
class Scenario:
    name: str
    description: str
    regions: list[str]
    network: Network
    bucket: BucketRule
    failover: bool
    sync_interval_ms: float
    slo: SLO
    phases: list[Phase]
    path: str = ""
    metrics_interval: float = 1.0

    def with_slo(self, overrides: dict[str, str]) -> Scenario:
        """The same scenario with some SLO thresholds replaced (``--slo name=value``)."""
        fields = {**msgspec.structs.asdict(self.slo)}
        for name, value in overrides.items():
            if name not in fields:
                raise ScenarioError("--slo", name, f"unknown SLO; one of {', '.join(fields)}")
            fields[name] = value if name == "over_admission_model" else float(value)
        try:
            slo = msgspec.convert(fields, SLO)
        except msgspec.ValidationError as error:
            raise ScenarioError("--slo", "", str(error)) from None
        return Scenario(**{**self.__dict__, "slo": slo})

    def scaled(self, factor: float) -> Scenario:
        """The same scenario with every duration multiplied by ``factor``."""

        def scale(phase: Phase) -> Phase:
            spec = phase.spec
            if phase.kind == "wait":
                spec = spec * factor
            elif phase.kind in ("load", "partition"):
                spec = msgspec.structs.replace(spec, duration=spec.duration * factor)
            elif phase.kind == "crash":
                spec = msgspec.structs.replace(spec, down=spec.down * factor)
            elif phase.kind == "verify":
                spec = msgspec.structs.replace(spec, settle=spec.settle * factor)
            return Phase(phase.kind, spec, phase.field)

        copy = Scenario(**{**self.__dict__, "phases": [scale(p) for p in self.phases]})
        return copy

    def renamed(self, names: dict[str, str]) -> Scenario:
        """The same scenario with its regions renamed (``names``: scenario name →
        deployment name) everywhere a phase names one: ``regions``, a load's
        per-region rates, a partition's and a crash's region."""

        def rename(phase: Phase) -> Phase:
            spec = phase.spec
            if phase.kind == "load" and isinstance(spec.rate, dict):
                rates = {names.get(r, r): rate for r, rate in spec.rate.items()}
                spec = msgspec.structs.replace(spec, rate=rates)
            elif phase.kind in ("partition", "crash") and spec.region in names:
                spec = msgspec.structs.replace(spec, region=names[spec.region])
            return Phase(phase.kind, spec, phase.field)

        return Scenario(
            **{
                **self.__dict__,
                "regions": [names.get(r, r) for r in self.regions],
                "phases": [rename(p) for p in self.phases],
            }
        )

    @property
    def nominal_duration(self) -> float:
        """How long the scenario takes: its blocking phases, or its longest load."""
        blocking = 0.0
        longest = 0.0
        for phase in self.phases:
            if phase.kind == "load":
                longest = max(longest, blocking + phase.spec.duration)
                if not phase.spec.background:
                    blocking += phase.spec.duration
            elif phase.kind == "wait":
                blocking += phase.spec
            elif phase.kind == "partition" and not phase.spec.background:
                blocking += phase.spec.duration
            elif phase.kind == "crash":
                blocking += phase.spec.down
        return max(blocking, longest)


def _where(error: msgspec.ValidationError) -> tuple[str, str]:
    """(field, what is wrong) of a scenario file's validation error."""
    location = error_location(error)
    return location.field, location.detail


def parse_scenario(text: str, file: str = "<scenario>") -> Scenario:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ScenarioError(file, "", f"not YAML: {error}") from None
    if not isinstance(document, dict):
        raise ScenarioError(file, "", "expected a mapping with name and phases")
    _check_finite(file, document, "")
    try:
        raw = msgspec.convert(document, ScenarioFile)
    except msgspec.ValidationError as error:
        field, message = _where(error)
        raise ScenarioError(file, field, message) from None
    if len(set(raw.regions)) != len(raw.regions) or len(raw.regions) < 2:
        raise ScenarioError(file, "regions", "name at least two distinct regions")
    if not raw.phases:
        raise ScenarioError(file, "phases", "list at least one phase")
    phases = []
    for i, item in enumerate(raw.phases):
        where = f"phases[{i}]"
        if len(item) != 1:
            raise ScenarioError(file, where, f"one phase per item, one of {', '.join(PHASES)}")
        ((kind, value),) = item.items()
        if kind not in PHASES:
            raise ScenarioError(file, where, f"unknown phase {kind!r}; one of {', '.join(PHASES)}")
        try:
            spec = msgspec.convert({} if value is None else value, PHASES[kind])
        except msgspec.ValidationError as error:
            field, message = _where(error)
            path = f"{where}.{kind}{'.' + field if field else ''}"
            raise ScenarioError(file, path, message) from None
        _check(file, f"{where}.{kind}", kind, spec, raw.regions)
        phases.append(Phase(kind, spec, f"{where}.{kind}"))
    return Scenario(
        raw.name,
        raw.description,
        raw.regions,
        raw.network,
        raw.bucket,
        raw.failover,
        raw.sync_interval_ms,
        raw.slo,
        phases,
        file,
        raw.metrics_interval,
    )


def _check(file: str, where: str, kind: str, spec: Any, regions: list[str]) -> None:
    def region_known(name: str, field: str) -> None:
        if name not in regions:
            raise ScenarioError(
                file, field, f"{name!r} is not one of regions ({', '.join(regions)})"
            )

    if kind == "wait" and spec < 0:
        raise ScenarioError(file, where, "must be >= 0")
    if kind == "load":
        if spec.duration <= 0:
            raise ScenarioError(file, f"{where}.duration", "must be > 0")
        rates = spec.rate if isinstance(spec.rate, dict) else {}
        for region, rate in rates.items():
            region_known(region, f"{where}.rate.{region}")
            if rate < 0:
                raise ScenarioError(file, f"{where}.rate.{region}", "must be >= 0")
        if not isinstance(spec.rate, dict) and spec.rate <= 0:
            raise ScenarioError(file, f"{where}.rate", "must be > 0")
    if kind == "partition":
        region_known(spec.region, f"{where}.region")
        if spec.duration <= 0:
            raise ScenarioError(file, f"{where}.duration", "must be > 0")
    if kind == "crash" and spec.region != "busiest":
        region_known(spec.region, f"{where}.region")
    if kind == "crash" and spec.down < 0:
        raise ScenarioError(file, f"{where}.down", "must be >= 0")
    if kind == "verify":
        for name in ("tolerance", "settle", "within"):
            if getattr(spec, name) < 0:
                raise ScenarioError(file, f"{where}.{name}", "must be >= 0")


def _check_finite(file: str, value: Any, field: str) -> None:
    """No number in the file is NaN or infinite (YAML's .nan and .inf): a duration of
    NaN ran until killed, others failed deep inside the run."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ScenarioError(file, field, f"must be a finite number, got {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(file, item, f"{field}.{key}" if field else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_finite(file, item, f"{field}[{index}]")


def load_scenario(path: str) -> Scenario:
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ScenarioError(path, "", error.strerror or str(error)) from None
    return parse_scenario(text, path)
