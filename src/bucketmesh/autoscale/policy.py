"""The controller's configuration: signals, forecast settings and policies, loaded
from YAML. Every problem is a ``PolicyError`` naming the file and the field
(``policies[0].expand.headroom``), never a traceback.

docs/autoscale.md documents every field; ``examples`` there is loaded by a test.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from bucketmesh.autoscale.forecast import ForecastSettings
from bucketmesh.telemetry.audit import why_unwritable

SignalKind = Literal["demand", "prometheus", "json"]
SIGNAL_KINDS: tuple[SignalKind, ...] = ("demand", "prometheus", "json")


class PolicyError(Exception):
    """A problem in the controller's config: ``file: field: message``."""

    def __init__(self, file: str, field: str, message: str) -> None:
        self.file = file
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        return (
            f"{self.file}: {self.field}: {self.message}"
            if self.field
            else (f"{self.file}: {self.message}")
        )


@dataclass(frozen=True)
class Signal:
    """Where one signal comes from and how old it may be."""

    name: str
    kind: SignalKind
    stale_after: float  # seconds
    forecast: bool = True  # False: the value is already a forecast (an external feed)
    rule: str = ""  # demand: the rule whose decisions are counted
    url: str = ""  # prometheus: the server; json: the document
    query: str = ""  # prometheus: an instant query answering one sample
    field: str = ""  # json: the dotted path of the number in the document
    # json: the dotted path of when the document's value was produced (Unix seconds
    # or ISO 8601); staleness counts from it rather than from the fetch
    timestamp_field: str = ""


@dataclass(frozen=True)
class Limits:
    capacity: int
    refill_rate: float


@dataclass(frozen=True)
class Expand:
    """Raise capacity and refill ahead of forecast demand (requests/s) by ``headroom``."""

    signal: str
    headroom: float = 1.25
    burst_seconds: float = 2.0  # capacity = refill rate × burst_seconds


@dataclass(frozen=True)
class Protect:
    """Lower the refill rate to ``refill_rate`` while the signal (now, or as forecast)
    is above ``threshold``; restore once both are below ``restore_below``. ``on``:
    ``forecast`` compares the point forecast, ``band`` its upper edge (earlier, and
    more often: a noisy signal's band is wide)."""

    signal: str
    threshold: float
    restore_below: float
    refill_rate: float
    on: Literal["forecast", "band"] = "forecast"
    capacity: int | None = None  # also cap the burst while protecting


@dataclass(frozen=True)
class Policy:
    name: str
    target: str  # a rule's name or one bucket key: what the PATCH names
    baseline: Limits
    minimum: Limits
    maximum: Limits
    expand: Expand | None = None
    protect: Protect | None = None
    cooldown: float = 30.0
    max_step: float = 2.0  # a change multiplies or divides a limit by at most this
    hysteresis: float = 0.1  # relative changes below this are not made

    def signals(self) -> list[str]:
        return [s.signal for s in (self.expand, self.protect) if s is not None]


@dataclass(frozen=True)
class Config:
    file: str
    interval: float
    horizon: float
    forecast: ForecastSettings
    signals: dict[str, Signal]
    policies: list[Policy]
    regions: dict[str, str] = field(default_factory=dict)  # region → node URL
    admin_token: str | None = None
    listen: str | None = None  # host:port of the controller's /metrics
    audit: str = "-"  # JSON lines of every change: a file, or "-" for stdout
    decisions: str | None = None  # the last decisions, read by `explain`
    dry_run: bool = False

    @property
    def horizon_steps(self) -> int:
        return max(1, math.ceil(self.horizon / self.interval - 1e-9))


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Reader:
    """Typed access to one YAML mapping, naming fields by their dotted path."""

    def __init__(self, file: str, path: str, data: Any) -> None:
        self.file = file
        self.path = path
        if not isinstance(data, Mapping):
            raise PolicyError(file, path or "(top level)", "expected a mapping")
        self.data = dict(data)
        self.used: set[str] = set()

    def where(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, message: str) -> PolicyError:
        return PolicyError(self.file, self.where(name), message)

    def raw(self, name: str, default: Any = None, *, required: bool = False) -> Any:
        self.used.add(name)
        if name not in self.data or self.data[name] is None:
            if required:
                raise self.fail(name, "is required")
            return default
        value = self.data[name]
        return _expand_env(value) if isinstance(value, str) else value

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        value = self.raw(name, default, required=required)
        if not isinstance(value, str) or (required and not value.strip()):
            raise self.fail(name, "expected a non-empty string")
        return value

    def number(
        self,
        name: str,
        default: float | None = None,
        *,
        low: float | None = None,
        high: float | None = None,
        above: float | None = None,
    ) -> float:
        value = self.raw(name, default, required=default is None)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(name, f"expected a number, got {value!r}")
        number = float(value)
        if not math.isfinite(number):
            raise self.fail(name, "must be finite")
        if low is not None and number < low:
            raise self.fail(name, f"must be ≥ {low:g}, got {number:g}")
        if above is not None and number <= above:
            raise self.fail(name, f"must be > {above:g}, got {number:g}")
        if high is not None and number > high:
            raise self.fail(name, f"must be ≤ {high:g}, got {number:g}")
        return number

    def duration(self, name: str, default: float | None = None) -> float:
        value = self.raw(name, default, required=default is None)
        if isinstance(value, bool):
            raise self.fail(name, f"expected a duration (30, 30s, 5m, 1h, 1d), got {value!r}")
        if isinstance(value, int | float):
            seconds = float(value)
        else:
            match = _DURATION.match(str(value))
            if match is None:
                raise self.fail(name, f"expected a duration (30, 30s, 5m, 1h, 1d), got {value!r}")
            seconds = float(match.group(1)) * _UNIT[match.group(2)]
        if not math.isfinite(seconds) or seconds <= 0:
            raise self.fail(name, f"must be a positive duration, got {value!r}")
        return seconds

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, f"expected true or false, got {value!r}")
        return value

    def child(self, name: str, *, required: bool = False) -> _Reader | None:
        value = self.raw(name, required=required)
        return None if value is None else _Reader(self.file, self.where(name), value)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.fail(str(unknown[0]), "unknown field")


def _expand_env(text: str) -> str:
    return _ENV.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), text)


def _limits(reader: _Reader, name: str) -> Limits:
    block = reader.child(name, required=True)
    assert block is not None
    capacity = block.number("capacity", low=1, high=1e15)
    if capacity != int(capacity):
        raise block.fail("capacity", f"expected an integer, got {capacity:g}")
    limits = Limits(int(capacity), block.number("refillRate", low=1e-9, high=1e9))
    block.done()
    return limits


def _signal(reader: _Reader, name: str) -> Signal:
    kind = reader.string("type", required=True)
    if kind not in SIGNAL_KINDS:
        raise reader.fail("type", f"expected one of {', '.join(SIGNAL_KINDS)}, got {kind!r}")
    stale_after = reader.duration("staleAfter", 30.0)
    forecast = reader.boolean("forecast", True)
    if kind == "demand":
        signal = Signal(
            name, "demand", stale_after, forecast, rule=reader.string("rule", required=True)
        )
    elif kind == "prometheus":
        signal = Signal(
            name,
            "prometheus",
            stale_after,
            forecast,
            url=_url(reader, "url"),
            query=reader.string("query", required=True),
        )
    else:
        signal = Signal(
            name,
            "json",
            stale_after,
            forecast,
            url=_url(reader, "url"),
            field=reader.string("field", required=True),
            timestamp_field=reader.string("timestampField", ""),
        )
    reader.done()
    return signal


def _url(reader: _Reader, name: str) -> str:
    url = reader.string(name, required=True).strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise reader.fail(name, f"expected http(s)://host[:port]..., got {url!r}")
    return url


def _optional_capacity(block: _Reader) -> int | None:
    if block.raw("capacity") is None:
        return None
    capacity = block.number("capacity", low=1, high=1e15)
    if capacity != int(capacity):
        raise block.fail("capacity", f"expected an integer, got {capacity:g}")
    return int(capacity)


def _policy(reader: _Reader, signals: Mapping[str, Signal]) -> Policy:
    name = reader.string("name", required=True)
    target = reader.string("target", required=True)
    baseline = _limits(reader, "baseline")
    minimum = _limits(reader, "min")
    maximum = _limits(reader, "max")
    if minimum.capacity > maximum.capacity:
        raise reader.fail("min.capacity", "must be ≤ max.capacity")
    if minimum.refill_rate > maximum.refill_rate:
        raise reader.fail("min.refillRate", "must be ≤ max.refillRate")
    if not minimum.capacity <= baseline.capacity <= maximum.capacity:
        raise reader.fail("baseline.capacity", "must be within [min.capacity, max.capacity]")
    if not minimum.refill_rate <= baseline.refill_rate <= maximum.refill_rate:
        raise reader.fail("baseline.refillRate", "must be within [min.refillRate, max.refillRate]")

    def known(block: _Reader) -> str:
        signal = block.string("signal", required=True)
        if signal not in signals:
            raise block.fail("signal", f"no signal named {signal!r} under signals")
        return signal

    expand = None
    if (block := reader.child("expand")) is not None:
        expand = Expand(
            known(block),
            block.number("headroom", 1.25, low=1.0, high=100.0),
            block.number("burstSeconds", 2.0, above=0.0, high=1e6),
        )
        block.done()
    protect = None
    if (block := reader.child("protect")) is not None:
        signal = known(block)
        threshold = block.number("threshold")
        restore_below = block.number("restoreBelow", threshold)
        if restore_below > threshold:
            raise block.fail("restoreBelow", "must be ≤ threshold")
        on = block.string("on", "forecast")
        if on not in ("forecast", "band"):
            raise block.fail("on", f"expected forecast or band, got {on!r}")
        protect = Protect(
            signal,
            threshold,
            restore_below,
            block.number("refillRate", low=1e-9, high=1e9),
            "band" if on == "band" else "forecast",
            _optional_capacity(block),
        )
        block.done()
    if expand is None and protect is None:
        raise reader.fail("expand", "a policy needs expand, protect or both")
    policy = Policy(
        name=name,
        target=target,
        baseline=baseline,
        minimum=minimum,
        maximum=maximum,
        expand=expand,
        protect=protect,
        cooldown=reader.duration("cooldown", 30.0),
        max_step=reader.number("maxStep", 2.0, above=1.0, high=1000.0),
        hysteresis=reader.number("hysteresis", 0.1, low=0.0, high=0.9),
    )
    reader.done()
    return policy


def parse(data: Any, file: str) -> Config:
    """The config in ``data`` (parsed YAML) from ``file``."""
    top = _Reader(file, "", data)
    interval = top.duration("interval", 5.0)
    horizon = top.duration("horizon", 60.0)
    forecast = ForecastSettings()
    if (block := top.child("forecast")) is not None:
        season_seconds = block.raw("season")
        season = 0
        if season_seconds is not None:
            season = round(block.duration("season") / interval)
            if season < 2:
                raise block.fail("season", "must span at least two intervals")
        forecast = ForecastSettings(
            alpha=block.number("alpha", 0.5, above=0.0, high=1.0),
            beta=block.number("beta", 0.3, low=0.0, high=1.0),
            phi=block.number("phi", 0.9, above=0.0, high=1.0),
            gamma=block.number("gamma", 0.2, low=0.0, high=1.0),
            season=season,
            z=block.number("z", 2.0, low=0.0, high=10.0),
        )
        block.done()
    signals: dict[str, Signal] = {}
    raw_signals = top.raw("signals", required=True)
    if not isinstance(raw_signals, Mapping) or not raw_signals:
        raise top.fail("signals", "expected a mapping of signal name → signal")
    for name, spec in raw_signals.items():
        signals[str(name)] = _signal(_Reader(file, f"signals.{name}", spec), str(name))
    raw_policies = top.raw("policies", required=True)
    if not isinstance(raw_policies, list) or not raw_policies:
        raise top.fail("policies", "expected a non-empty list")
    policies = [
        _policy(_Reader(file, f"policies[{i}]", p), signals) for i, p in enumerate(raw_policies)
    ]
    seen: set[str] = set()
    for i, policy in enumerate(policies):
        if policy.target in seen:
            raise PolicyError(
                file, f"policies[{i}].target", f"{policy.target!r} has another policy already"
            )
        seen.add(policy.target)
    regions: dict[str, str] = {}
    admin_token = None
    if (mesh := top.child("mesh")) is not None:
        raw_regions = mesh.raw("regions", required=True)
        if not isinstance(raw_regions, Mapping) or not raw_regions:
            raise mesh.fail("regions", "expected a mapping region → URL")
        region_reader = _Reader(file, mesh.where("regions"), raw_regions)
        regions = {str(r): _url(region_reader, str(r)) for r in raw_regions}
        admin_token = mesh.raw("adminToken") or os.environ.get("BUCKETMESH_ADMIN_TOKEN") or None
        if admin_token is not None and not isinstance(admin_token, str):
            raise mesh.fail("adminToken", "expected a string")
        mesh.done()
    if not regions:
        raise top.fail(
            "mesh", "the controller reads and changes limits through the mesh: list mesh.regions"
        )
    listen = top.raw("listen")
    if listen is not None and not (isinstance(listen, str) and re.match(r"^[^:]*:\d+$", listen)):
        raise top.fail("listen", f"expected host:port, got {listen!r}")
    if listen is not None and not 0 <= int(listen.rsplit(":", 1)[1]) <= 65535:
        raise top.fail("listen", f"the port must be 0 to 65535, got {listen!r}")
    config = Config(
        file=file,
        interval=interval,
        horizon=horizon,
        forecast=forecast,
        signals=signals,
        policies=policies,
        regions=regions,
        admin_token=admin_token,
        listen=listen,
        audit=top.string("audit", "-"),
        decisions=top.raw("decisions"),
        dry_run=top.boolean("dryRun", False),
    )
    if config.decisions is not None and not isinstance(config.decisions, str):
        raise top.fail("decisions", "expected a file path")
    top.done()
    return config


def check_outputs(config: Config) -> None:
    """A PolicyError naming ``audit`` or ``decisions`` when its file cannot be written:
    the controller writes them after it applied a change, and died there (a command
    that runs the controller checks this before its first interval)."""
    for name, target in (("audit", config.audit), ("decisions", config.decisions)):
        if target is not None and target != "-":
            problem = why_unwritable(target)
            if problem is not None:
                raise PolicyError(config.file, name, problem)


def load(path: str | os.PathLike[str]) -> Config:
    """The config in the YAML file at ``path``."""
    file = os.fspath(path)
    try:
        with open(file, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as error:
        raise PolicyError(file, "", f"cannot read: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        raise PolicyError(
            file, where, f"not valid YAML: {getattr(error, 'problem', error)}"
        ) from error
    return parse(data, file)
