"""The pure autoscale controller on recorded traces: it expands before a forecast
ramp, protects before a forecast queue breach, holds on stale signals, never leaves
[min, max], respects cooldown and step, and replays to the same decisions. Also the
forecasters and the policy loader's errors. No sockets, no clock: time is an
argument of every tick.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketmesh.autoscale import (
    Config,
    Controller,
    Decision,
    Forecaster,
    ForecastSettings,
    Limits,
    PolicyError,
    Reading,
    load,
    parse,
    replay,
)

Trace = list[tuple[float, Mapping[str, Reading | None]]]


def config(**overrides: Any) -> Config:
    """A controller config ticking every second with one policy on rule 'agents'."""
    policy: dict[str, Any] = {
        "name": "agents",
        "target": "agents",
        "baseline": {"capacity": 200, "refillRate": 100},
        "min": {"capacity": 50, "refillRate": 20},
        "max": {"capacity": 2000, "refillRate": 1000},
        "expand": {"signal": "demand", "headroom": 1.25, "burstSeconds": 2},
        "protect": {
            "signal": "queue",
            "threshold": 200,
            "restoreBelow": 100,
            "refillRate": 60,
        },
        "cooldown": 5,
        "maxStep": 2,
        "hysteresis": 0.05,
    }
    policy.update(overrides.pop("policy", {}))
    for name in [k for k, v in policy.items() if v is None]:
        del policy[name]
    data: dict[str, Any] = {
        "interval": 1,
        "horizon": 20,
        "mesh": {"regions": {"us-east-1": "http://127.0.0.1:1"}},
        "signals": {
            "demand": {"type": "demand", "rule": "agents", "staleAfter": 3},
            "queue": {
                "type": "prometheus",
                "url": "http://127.0.0.1:9090",
                "query": "sum(queue)",
                "staleAfter": 3,
            },
        },
        "policies": [policy],
    }
    data.update(overrides)
    return parse(data, "test.yaml")


def trace(demand: list[float | None], queue: list[float | None]) -> Trace:
    """One tick a second; None: no reading that second."""
    out: Trace = []
    for t, (d, q) in enumerate(zip(demand, queue, strict=True)):
        out.append(
            (
                float(t),
                {
                    "demand": None if d is None else Reading(d, float(t)),
                    "queue": None if q is None else Reading(q, float(t)),
                },
            )
        )
    return out


def limits_in_effect(decisions: list[Decision], at: float, start: Limits) -> Limits:
    current = start
    for d in decisions:
        if d.at > at:
            break
        current = Limits(d.capacity, d.refill_rate)
    return current


RAMP = [60.0] * 30 + [60.0 + 3 * i for i in range(1, 114)] + [400.0] * 30  # +3/s each second
TIGHT = {"expand": {"signal": "demand", "headroom": 1.05, "burstSeconds": 2}}


def behind(decisions: list[Decision], demand: list[float]) -> list[int]:
    """The seconds when the refill rate in effect was below the demand arriving."""
    start = Limits(200, 100.0)
    return [
        t
        for t in range(len(demand))
        if limits_in_effect(decisions, t, start).refill_rate < demand[t]
    ]


def test_expands_before_a_forecast_ramp() -> None:
    decisions = replay(config(policy=TIGHT), trace(RAMP, [0.0] * len(RAMP)))
    expands = [d for d in decisions if d.action == "set" and d.reason == "expand"]
    assert expands, "never expanded"
    # Once the trend has been seen (a cooldown into the ramp), every raise already
    # covers the demand that arrives before the next change may be made.
    learned = [d for d in expands if 36 <= d.at < 140]
    assert learned
    for d in learned:
        assert d.refill_rate >= RAMP[int(d.at) + 5], d
    assert [t for t in behind(decisions, RAMP) if t >= 36] == []


def test_a_reactive_controller_falls_behind_the_same_ramp() -> None:
    """The control case for the test above: with the forecast's trend switched off
    (beta 0: the forecast is the level), the same policy lets demand overtake the
    refill all along the ramp — so the forecast is what keeps it ahead."""
    decisions = replay(config(policy=TIGHT, forecast={"beta": 0.0}), trace(RAMP, [0.0] * len(RAMP)))
    assert len([t for t in behind(decisions, RAMP) if t >= 36]) >= 10


def test_protects_before_a_forecast_queue_breach() -> None:
    # The downstream queue grows by 8 a second from 0 toward its threshold of 200.
    queue = [0.0] * 20 + [8.0 * i for i in range(1, 40)]
    demand = [80.0] * len(queue)
    decisions = replay(config(), trace(demand, queue))
    protects = [d for d in decisions if d.action == "set" and d.reason == "protect"]
    assert protects, "never protected"
    first = protects[0]
    assert queue[int(first.at)] < 200, "protection came only after the breach"
    assert first.refill_rate < 80 and first.protecting
    assert first.refill_rate >= 60  # the cap, possibly reached over several steps


def test_restores_as_the_queue_forecast_recedes() -> None:
    queue = [0.0] * 10 + [300.0] * 20 + [300.0 - 15 * i for i in range(1, 21)] + [0.0] * 30
    demand = [80.0] * len(queue)
    decisions = replay(config(), trace(demand, queue))
    reasons = [d.reason for d in decisions if d.action == "set"]
    assert "protect" in reasons and "restore" in reasons
    assert reasons.index("protect") < reasons.index("restore")
    restore = next(d for d in decisions if d.reason == "restore" and d.action == "set")
    assert queue[int(restore.at)] < 100 and not restore.protecting
    assert decisions[-1].refill_rate >= 80 * 1.25 * 0.95  # demand back in charge


def test_holds_on_stale_signals() -> None:
    # Demand readings stop at t=20, then one arrives stamped long ago; the limits stay.
    demand: list[float | None] = [100.0] * 20 + [None] * 20
    queue: list[float | None] = [0.0] * 40
    recorded = trace(demand, queue)
    recorded[30] = (30.0, {"demand": Reading(5000.0, 2.0), "queue": Reading(0.0, 30.0)})
    decisions = replay(config(), recorded)
    before = [d for d in decisions if d.at < 20]
    after = [d for d in decisions if d.at >= 24]  # staleAfter 3 s
    held = limits_in_effect(decisions, 19, Limits(200, 100.0))
    assert all(d.action == "hold" and d.reason == "stale" for d in after)
    assert all((d.capacity, d.refill_rate) == (held.capacity, held.refill_rate) for d in after)
    assert "demand" in after[0].why and after[0].signals["demand"].stale
    assert any(d.action == "set" for d in before)


def test_a_signal_missing_from_the_start_holds_the_baseline() -> None:
    decisions = replay(config(), trace([None] * 10, [0.0] * 10))
    assert {(d.action, d.reason) for d in decisions} == {("hold", "stale")}
    assert {(d.capacity, d.refill_rate) for d in decisions} == {(200, 100.0)}


def test_a_stale_downstream_signal_freezes_protection_too() -> None:
    queue: list[float | None] = [0.0] * 10 + [None] * 10
    decisions = replay(config(), trace([500.0] * 20, queue))
    late = [d for d in decisions if d.at >= 14]
    assert late and all(d.reason == "stale" for d in late)
    assert "queue" in late[0].why


def test_replay_is_deterministic() -> None:
    demand = [50 + 40 * math.sin(t / 7) + (300 if 60 < t < 70 else 0) for t in range(150)]
    queue = [max(0.0, 250 * math.sin(t / 11)) for t in range(150)]
    first = replay(config(), trace(list(demand), list(queue)))
    second = replay(config(), trace(list(demand), list(queue)))
    assert [d.as_dict() for d in first] == [d.as_dict() for d in second]


def test_cooldown_holds_and_says_what_it_would_do() -> None:
    demand = [60.0] * 5 + [600.0] * 20
    decisions = replay(config(), trace(demand, [0.0] * len(demand)))
    sets = [d for d in decisions if d.action == "set"]
    cooled = [d for d in decisions if d.reason == "cooldown"]
    assert len(sets) >= 2 and cooled
    assert "cooldown 5s" in cooled[0].why and "would expand" in cooled[0].why


samples = st.one_of(
    st.none(),
    st.floats(min_value=0, max_value=1e7, allow_nan=False),
    st.sampled_from([0.0, 1e-9, 1e12]),
)


@settings(max_examples=150, deadline=None)
@given(
    demand=st.lists(samples, min_size=1, max_size=120),
    queue=st.lists(samples, min_size=120, max_size=120),
    step=st.sampled_from([1.1, 2.0, 10.0]),
    cooldown=st.sampled_from([1, 3, 10]),
)
def test_bounds_cooldown_and_step_hold_on_any_trace(
    demand: list[float | None], queue: list[float | None], step: float, cooldown: int
) -> None:
    queue = queue[: len(demand)]
    policy = {"maxStep": step, "cooldown": cooldown}
    decisions = replay(config(policy=policy), trace(demand, queue))
    previous = Limits(200, 100.0)
    last_change: float | None = None
    for d in decisions:
        assert 50 <= d.capacity <= 2000 and 20 <= d.refill_rate <= 1000, d
        if d.action == "set":
            if last_change is not None:
                assert d.at - last_change >= cooldown
            assert d.refill_rate <= previous.refill_rate * step * (1 + 1e-5)
            assert d.refill_rate >= previous.refill_rate / step * (1 - 1e-5)
            assert d.capacity <= previous.capacity * step + 1
            assert d.capacity >= previous.capacity / step - 1
            previous = Limits(d.capacity, d.refill_rate)
            last_change = d.at
        else:
            assert (d.capacity, d.refill_rate) == (previous.capacity, previous.refill_rate)


def test_adopting_an_outside_change_starts_a_cooldown() -> None:
    controller = Controller(config())
    readings = {"demand": Reading(100.0, 0.0), "queue": Reading(0.0, 0.0)}
    controller.tick(0.0, readings)
    controller.adopt("agents", Limits(300, 150.0), 1.0)
    [held] = controller.tick(1.0, {"demand": Reading(900.0, 1.0), "queue": Reading(0.0, 1.0)})
    assert held.reason == "cooldown" and (held.capacity, held.refill_rate) == (300, 150.0)


# -- forecasters --------------------------------------------------------------------


def test_holt_continues_a_linear_trend_exactly() -> None:
    f = Forecaster(ForecastSettings(alpha=0.5, beta=0.3, phi=1.0))
    for t in range(50):
        f.observe(10.0 + 2.5 * t)
    forecast = f.forecast(10)
    assert forecast.value == pytest.approx(10.0 + 2.5 * 59)
    assert forecast.low == pytest.approx(forecast.value, abs=1e-6)  # no error seen, no band


def test_holt_winters_learns_a_season_that_holt_cannot() -> None:
    def series() -> Iterator[float]:
        for t in range(24 * 20):
            yield 100 + 50 * math.sin(2 * math.pi * t / 24)

    def error(s: ForecastSettings) -> float:
        f = Forecaster(s)
        total = 0.0
        values = list(series())
        for t, v in enumerate(values):
            if t >= 24 * 15 and t + 6 < len(values):
                total += abs(f.forecast(6).value - values[t + 5])
            f.observe(v)
        return total

    seasonal = error(ForecastSettings(alpha=0.5, beta=0.1, gamma=0.3, season=24))
    plain = error(ForecastSettings(alpha=0.5, beta=0.1))
    assert seasonal < plain / 5


def test_the_band_widens_with_noise_and_covers_most_of_it() -> None:
    import random

    rng = random.Random(7)
    f = Forecaster(ForecastSettings(alpha=0.3, beta=0.05, z=2.0))
    inside = total = 0
    values = [100 + rng.gauss(0, 10) for _ in range(2000)]
    for t, v in enumerate(values):
        if t > 100:
            forecast = f.forecast(1)
            total += 1
            inside += forecast.low <= v <= forecast.high
        f.observe(v)
    assert 0.85 < inside / total < 0.995


# -- the loader ---------------------------------------------------------------------


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "autoscale.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def good() -> dict[str, Any]:
    return {
        "interval": "5s",
        "mesh": {"regions": {"us-east-1": "http://127.0.0.1:8081"}},
        "signals": {"demand": {"type": "demand", "rule": "agents"}},
        "policies": [
            {
                "name": "agents",
                "target": "agents",
                "baseline": {"capacity": 100, "refillRate": 50},
                "min": {"capacity": 10, "refillRate": 5},
                "max": {"capacity": 1000, "refillRate": 500},
                "expand": {"signal": "demand"},
            }
        ],
    }


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (lambda c: c.update(interval="soon"), "interval", "expected a duration"),
        (lambda c: c["signals"]["demand"].update(type="magic"), "signals.demand.type", "one of"),
        (lambda c: c["signals"]["demand"].pop("rule"), "signals.demand.rule", "is required"),
        (
            lambda c: c["signals"].update(
                q={"type": "prometheus", "url": "localhost", "query": "x"}
            ),
            "signals.q.url",
            "http(s)://",
        ),
        (
            lambda c: c["policies"][0]["expand"].update(signal="nope"),
            "policies[0].expand.signal",
            "no signal named 'nope'",
        ),
        (
            lambda c: c["policies"][0]["expand"].update(headroom=0.5),
            "policies[0].expand.headroom",
            "must be ≥ 1",
        ),
        (
            lambda c: c["policies"][0]["min"].update(refillRate="fast"),
            "policies[0].min.refillRate",
            "expected a number",
        ),
        (
            lambda c: c["policies"][0]["baseline"].update(capacity=5000),
            "policies[0].baseline.capacity",
            "within",
        ),
        (lambda c: c["policies"][0].update(maxStep=1), "policies[0].maxStep", "must be > 1"),
        (lambda c: c["policies"][0].update(colour="red"), "policies[0].colour", "unknown field"),
        (lambda c: c["policies"][0].pop("expand"), "policies[0].expand", "needs expand"),
        (lambda c: c.pop("mesh"), "mesh", "list mesh.regions"),
        (lambda c: c.update(listen="9464"), "listen", "host:port"),
        (
            lambda c: c["policies"][0].update(
                protect={"signal": "demand", "threshold": 10, "restoreBelow": 20, "refillRate": 1}
            ),
            "policies[0].protect.restoreBelow",
            "must be ≤ threshold",
        ),
    ],
)
def test_a_bad_config_names_file_and_field(
    tmp_path: Path, change: Any, field: str, message: str
) -> None:
    data = good()
    change(data)
    path = write(tmp_path, data)
    with pytest.raises(PolicyError) as raised:
        load(path)
    assert raised.value.file == str(path)
    assert raised.value.field == field
    assert message in raised.value.message
    assert str(path) in str(raised.value) and field in str(raised.value)


def test_a_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "interval: 5s\nsignals: [\n")
    with pytest.raises(PolicyError, match=r"autoscale\.yaml: line \d+: not valid YAML"):
        load(path)


def test_a_good_config_loads(tmp_path: Path) -> None:
    loaded = load(write(tmp_path, good()))
    assert loaded.interval == 5.0 and loaded.horizon_steps == 12
    assert loaded.policies[0].expand is not None


def test_the_config_in_the_docs_loads(tmp_path: Path) -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "autoscale.md").read_text()
    example = docs.split("```yaml\n", 1)[1].split("```", 1)[0]
    loaded = load(write(tmp_path, example))
    assert [s.kind for s in loaded.signals.values()] == ["demand", "prometheus", "json"]
    [policy] = loaded.policies
    assert policy.expand is not None and policy.protect is not None
    assert loaded.interval == 15 and loaded.horizon_steps == 8


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bucketmesh", "autoscale", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_command_refuses_a_bad_config_naming_file_and_field(tmp_path: Path) -> None:
    data = good()
    data["policies"][0]["cooldown"] = "a while"
    path = write(tmp_path, data)
    done = run_cli("--config", str(path))
    assert done.returncode == 2
    assert f"{path}: policies[0].cooldown: expected a duration" in done.stderr
    assert "Traceback" not in done.stderr


def test_explain_without_a_decisions_file_says_so(tmp_path: Path) -> None:
    path = write(tmp_path, good())
    done = run_cli("explain", "--config", str(path))
    assert done.returncode == 2
    assert "decisions: not set" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("field", ["audit", "decisions"])
def test_an_output_it_cannot_write_stops_the_command_before_any_change(
    tmp_path: Path, field: str
) -> None:
    """Before: the controller applied its first change, then died writing it down
    (FileNotFoundError, exit 1), the example of docs/autoscale.md included."""
    data = good()
    data[field] = str(tmp_path / "missing" / "out.json")
    done = run_cli("--config", str(write(tmp_path, data)), "--ticks", "1")
    assert done.returncode == 2, done.stderr
    assert f"{field}: is in a directory that does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_listen_port_out_of_range_is_a_config_error(tmp_path: Path) -> None:
    data = good()
    data["listen"] = "127.0.0.1:99999"
    with pytest.raises(PolicyError, match="the port must be 0 to 65535"):
        load(write(tmp_path, data))


@pytest.mark.parametrize("text", ["[1, 2]", '{"policies": 5}', '{"policies": {"p": [{}]}}'])
def test_explain_on_a_file_of_another_shape_says_so(tmp_path: Path, text: str) -> None:
    decisions = tmp_path / "decisions.json"
    decisions.write_text(text)
    data = good()
    data["decisions"] = str(decisions)
    done = run_cli("explain", "--config", str(write(tmp_path, data)))
    assert done.returncode == 2, done.stderr
    assert "not a decisions file of the controller" in done.stderr
    assert "Traceback" not in done.stderr
