"""The pure controller: signal readings in, limit decisions out.

Theory of operation
-------------------
Every ``interval`` the shell hands ``tick(now, readings)`` the latest reading of
each signal (a value and the instant it was observed, or nothing). The
controller feeds each fresh reading to its signal's forecaster, forecasts
``horizon`` ahead, and for each policy decides one of:

``set``   new limits (reason ``expand``, ``shrink``, ``protect`` or ``restore``);
``hold``  keep the limits (reason ``stale``, ``warming-up``, ``cooldown``,
          ``hysteresis`` or ``steady``), saying why.

The rules, in order: a stale or missing signal of the policy holds the limits
where they are (it never drives them anywhere); a forecaster with fewer than two
samples holds; the target is computed (below); a change within ``cooldown`` of
the previous one holds; the target is moved at most ``maxStep``× from the
current limits and clamped to ``[min, max]``; a change smaller than
``hysteresis`` (relative) holds.

Target: ``expand`` sets refill = headroom × max(demand now, forecast demand),
capacity = refill × burstSeconds; without expand, the baseline. ``protect``
caps the refill at its ``refillRate`` from when the downstream signal, now or
as forecast (the point forecast, or with ``on: band`` the band's upper edge),
crosses ``threshold`` until both are back below ``restoreBelow``.

Everything here is a deterministic function of the readings, the policy and
``now``: no clock, no I/O, no randomness, so a recorded trace replays to the
same decisions (``replay``), in tests and in benchmarks/autoscale.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from bucketmesh.autoscale.forecast import Forecast, Forecaster
from bucketmesh.autoscale.policy import Config, Limits, Policy

Action = Literal["set", "hold"]


@dataclass(frozen=True)
class Reading:
    """One signal's value, observed at ``at`` (seconds, the shell's clock)."""

    value: float
    at: float


@dataclass(frozen=True)
class SignalView:
    """What the controller knew of a signal when it decided."""

    value: float | None
    at: float | None
    stale: bool
    forecast: float | None = None
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class Decision:
    policy: str
    target: str
    at: float
    action: Action
    reason: str
    why: str
    capacity: int  # the limits after the decision
    refill_rate: float
    previous: Limits
    protecting: bool
    signals: dict[str, SignalView] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.action == "set"

    def as_dict(self) -> dict[str, object]:
        return {
            "at": self.at,
            "policy": self.policy,
            "target": self.target,
            "action": self.action,
            "reason": self.reason,
            "why": self.why,
            "capacity": self.capacity,
            "refill_rate": self.refill_rate,
            "previous": {
                "capacity": self.previous.capacity,
                "refill_rate": self.previous.refill_rate,
            },
            "protecting": self.protecting,
            "signals": {name: vars(view) for name, view in self.signals.items()},
        }


@dataclass
class _PolicyState:
    current: Limits
    last_change: float | None = None
    protecting: bool = False


@dataclass
class _SignalState:
    forecaster: Forecaster
    last: Reading | None = None
    fed_at: float | None = None


class Controller:
    """The decisions of every policy in ``config``, one ``tick`` at a time."""

    def __init__(self, config: Config, initial: Mapping[str, Limits] | None = None) -> None:
        self.config = config
        self._signals = {name: _SignalState(Forecaster(config.forecast)) for name in config.signals}
        start = dict(initial or {})
        self._policies = {
            p.name: _PolicyState(start.get(p.target, p.baseline)) for p in config.policies
        }

    def limits(self, policy: str) -> Limits:
        """The limits the controller believes ``policy``'s target has now."""
        return self._policies[policy].current

    def adopt(self, policy: str, limits: Limits, now: float) -> None:
        """Someone else changed the target's limits (an operator, another controller):
        take them as current and wait a cooldown before changing them again."""
        state = self._policies[policy]
        if limits != state.current:
            state.current = limits
            state.last_change = now

    def forecast(self, signal: str) -> Forecast | None:
        state = self._signals[signal]
        if state.forecaster.samples < 2:
            return None
        return state.forecaster.forecast(self.config.horizon_steps)

    def tick(self, now: float, readings: Mapping[str, Reading | None]) -> list[Decision]:
        views: dict[str, SignalView] = {}
        for name, spec in self.config.signals.items():
            state = self._signals[name]
            reading = readings.get(name)
            if reading is not None and (state.last is None or reading.at > state.last.at):
                state.last = reading
            last = state.last
            stale = last is None or now - last.at > spec.stale_after
            if last is not None and not stale and (state.fed_at is None or last.at > state.fed_at):
                state.forecaster.observe(last.value)
                state.fed_at = last.at
            predicted = self._predicted(name) if not stale else None
            views[name] = SignalView(
                value=None if last is None else last.value,
                at=None if last is None else last.at,
                stale=stale,
                forecast=None if predicted is None else predicted.value,
                low=None if predicted is None else predicted.low,
                high=None if predicted is None else predicted.high,
            )
        return [self._decide(policy, now, views) for policy in self.config.policies]

    def _predicted(self, name: str) -> Forecast | None:
        if not self.config.signals[name].forecast:
            last = self._signals[name].last
            assert last is not None
            return Forecast(last.value, last.value, last.value, 0)
        return self.forecast(name)

    def _decide(self, policy: Policy, now: float, views: Mapping[str, SignalView]) -> Decision:
        state = self._policies[policy.name]
        current = state.current
        seen = {name: views[name] for name in policy.signals()}

        def hold(reason: str, why: str) -> Decision:
            return Decision(
                policy.name,
                policy.target,
                now,
                "hold",
                reason,
                why,
                current.capacity,
                current.refill_rate,
                current,
                state.protecting,
                seen,
            )

        stale = sorted(name for name, view in seen.items() if view.stale)
        if stale:
            return hold("stale", "no fresh reading of " + ", ".join(stale) + ": limits frozen")
        cold = sorted(name for name, view in seen.items() if view.forecast is None)
        if cold:
            return hold("warming-up", "too few samples to forecast " + ", ".join(cold))

        refill = policy.baseline.refill_rate
        capacity = float(policy.baseline.capacity)
        why = "baseline"
        if policy.expand is not None:
            view = seen[policy.expand.signal]
            assert view.value is not None and view.forecast is not None
            demand = max(view.value, view.forecast, 0.0)
            refill = policy.expand.headroom * demand
            capacity = refill * policy.expand.burst_seconds
            why = (
                f"{policy.expand.signal} now {view.value:.4g}, forecast {view.forecast:.4g} "
                f"in {self.config.horizon:g}s: refill {policy.expand.headroom:g}× {demand:.4g}"
            )
        protecting = state.protecting
        if policy.protect is not None:
            view = seen[policy.protect.signal]
            assert view.value is not None and view.high is not None and view.forecast is not None
            ahead = view.high if policy.protect.on == "band" else view.forecast
            pressure = max(view.value, ahead)
            if not protecting and pressure > policy.protect.threshold:
                protecting = True
            elif protecting and pressure < policy.protect.restore_below:
                protecting = False
            if protecting:
                refill = min(refill, policy.protect.refill_rate)
                if policy.protect.capacity is not None:
                    capacity = min(capacity, float(policy.protect.capacity))
                why += (
                    f"; {policy.protect.signal} now {view.value:.4g}, forecast "
                    f"{view.forecast:.4g} (band up to {view.high:.4g}), threshold "
                    f"{policy.protect.threshold:g}: refill capped at {policy.protect.refill_rate:g}"
                )
        reason = (
            "protect"
            if protecting
            else "restore"
            if state.protecting
            else "expand"
            if refill >= current.refill_rate
            else "shrink"
        )

        if state.last_change is not None and now - state.last_change < policy.cooldown:
            return hold(
                "cooldown",
                f"last change {now - state.last_change:.4g}s ago, cooldown {policy.cooldown:g}s "
                f"(would {reason}: {why})",
            )
        # At most max_step× per change, then within [min, max].
        step = policy.max_step
        refill = min(max(refill, current.refill_rate / step), current.refill_rate * step)
        capacity = min(max(capacity, current.capacity / step), current.capacity * step)
        refill = min(max(refill, policy.minimum.refill_rate), policy.maximum.refill_rate)
        new_capacity = int(
            min(max(math.floor(capacity), policy.minimum.capacity), policy.maximum.capacity)
        )
        new_refill = float(f"{refill:.6g}")
        new_refill = min(max(new_refill, policy.minimum.refill_rate), policy.maximum.refill_rate)
        protect_changed = protecting != state.protecting
        state.protecting = protecting
        relative = max(
            abs(new_refill - current.refill_rate) / current.refill_rate,
            abs(new_capacity - current.capacity) / current.capacity,
        )
        if relative == 0 or (relative < policy.hysteresis and not protect_changed):
            return hold(
                "hysteresis" if relative else "steady",
                f"target within {policy.hysteresis:g} of the current limits ({why})",
            )
        state.current = Limits(new_capacity, new_refill)
        state.last_change = now
        return Decision(
            policy.name,
            policy.target,
            now,
            "set",
            reason,
            why,
            new_capacity,
            new_refill,
            current,
            protecting,
            seen,
        )


def replay(
    config: Config,
    trace: Iterable[tuple[float, Mapping[str, Reading | None]]],
    initial: Mapping[str, Limits] | None = None,
) -> list[Decision]:
    """Every decision the controller makes over a recorded trace of readings."""
    controller = Controller(config, initial)
    decisions: list[Decision] = []
    for now, readings in trace:
        decisions.extend(controller.tick(now, readings))
    return decisions
