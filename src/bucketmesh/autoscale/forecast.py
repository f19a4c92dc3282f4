"""Short-horizon forecasts with an uncertainty band: Holt's damped linear trend and
additive Holt–Winters, updated one observation at a time.

Why written here rather than taken from a library (statsmodels' ``Holt`` /
``ExponentialSmoothing``): the controller needs a forecaster whose state is a fold
over the observations, O(1) per sample, with the smoothing parameters fixed by the
policy, so that a decision is a deterministic function of the signal history that
a test or the benchmark can replay bit for bit. The libraries refit every
parameter by numerical optimisation on every call (version-dependent optimiser
results, milliseconds per fit, numpy + scipy + pandas, about 150 MB, in the
controller's image); the recursions themselves are ten lines (Hyndman &
Athanasopoulos, *Forecasting: Principles and Practice*, §8.2–8.3). Nothing here
needs an optional extra, and ``serve`` never imports this package.

The band: the one-step errors' variance is tracked as an exponentially weighted
mean of squared residuals; the h-step variance grows as for Holt's method,
``σ²·(1 + Σ_{j<h} (α(1 + jβ))²)``, and the band is the forecast ± ``z·σ_h``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ForecastSettings:
    """Smoothing parameters (fixed: they are part of the policy, not fitted)."""

    alpha: float = 0.5  # level
    beta: float = 0.3  # trend
    phi: float = 0.9  # trend damping (1: undamped)
    gamma: float = 0.2  # seasonality (used when season > 0)
    season: int = 0  # season length in samples (0: Holt's linear trend alone)
    z: float = 2.0  # band half-width in standard deviations
    error_weight: float = 0.1  # weight of the newest squared residual in the variance


@dataclass(frozen=True)
class Forecast:
    """A forecast ``steps`` samples ahead and its band."""

    value: float
    low: float
    high: float
    steps: int


@dataclass
class Forecaster:
    """The state of one signal's forecaster: feed ``observe``, ask ``forecast``."""

    settings: ForecastSettings = field(default_factory=ForecastSettings)
    level: float | None = None
    trend: float = 0.0
    seasonal: list[float] = field(default_factory=list)
    samples: int = 0
    variance: float = 0.0
    first_season: list[float] = field(default_factory=list)

    def _season_term(self, steps_ahead: int) -> float:
        m = self.settings.season
        if m <= 0 or not self.seasonal:
            return 0.0
        # seasonal[i] belongs to sample index i mod m; the next sample has index `samples`
        return self.seasonal[(self.samples + steps_ahead - 1) % m]

    def _damped_sum(self, steps: int) -> float:
        phi = self.settings.phi
        if phi == 1.0:
            return float(steps)
        return phi * (1.0 - phi**steps) / (1.0 - phi)

    def point(self, steps: int) -> float:
        """The point forecast ``steps`` (≥ 1) samples ahead of the last observation."""
        if self.level is None:
            raise ValueError("no observation yet")
        return self.level + self._damped_sum(steps) * self.trend + self._season_term(steps)

    def observe(self, value: float) -> None:
        s = self.settings
        if self.level is None:
            self.level = value
            self.seasonal = [0.0] * s.season
            self.first_season = [value] if s.season > 0 else []
            self.samples = 1
            return
        error = value - self.point(1)
        # The second sample's error only says the trend was unknown; the variance
        # starts from the third's (the first forecast with a trend), not from zero.
        if self.samples == 2:
            self.variance = error * error
        elif self.samples > 2:
            self.variance += s.error_weight * (error * error - self.variance)
        season_index = self.samples % s.season if s.season > 0 else 0
        season_old = self.seasonal[season_index] if s.season > 0 else 0.0
        if s.season > 0 and self.samples < s.season:
            self.first_season.append(value)
        previous_level = self.level
        damped_trend = s.phi * self.trend
        if self.samples == 1:
            # the second sample sets the first trend (no smoothing over nothing)
            self.level = value - season_old
            self.trend = self.level - previous_level
        else:
            self.level = s.alpha * (value - season_old) + (1 - s.alpha) * (
                previous_level + damped_trend
            )
            self.trend = s.beta * (self.level - previous_level) + (1 - s.beta) * damped_trend
        if s.season > 0 and self.samples >= s.season:
            self.seasonal[season_index] = s.gamma * (value - self.level) + (1 - s.gamma) * (
                season_old
            )
        self.samples += 1
        if s.season > 0 and self.samples == s.season:
            # The first season seen whole sets the seasonal indices (each value's
            # distance from the season's mean) and the level; the trend restarts at 0.
            # Until then the forecaster is Holt's alone.
            mean = sum(self.first_season) / s.season
            self.seasonal = [v - mean for v in self.first_season]
            self.level = mean
            self.trend = 0.0
            self.first_season = []

    def forecast(self, steps: int) -> Forecast:
        s = self.settings
        value = self.point(steps)
        growth = sum((s.alpha * (1 + j * s.beta)) ** 2 for j in range(1, steps))
        spread = s.z * math.sqrt(self.variance * (1.0 + growth))
        return Forecast(value=value, low=value - spread, high=value + spread, steps=steps)
