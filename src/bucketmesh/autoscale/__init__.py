"""Predictive throttling and dynamic bucket scaling: a controller beside the mesh.

``Controller`` (controller.py) is pure — readings, policy and time in, decisions
out — and ``Runner`` (runner.py) is the process around it: signal readers, PATCH
through ``bucketmesh.client``, audit events, /metrics. Only the command line
(``bucketmesh autoscale``) loads this package; docs/autoscale.md is the guide.
"""

from bucketmesh.autoscale.controller import Controller, Decision, Reading, SignalView, replay
from bucketmesh.autoscale.forecast import Forecast, Forecaster, ForecastSettings
from bucketmesh.autoscale.policy import (
    Config,
    Expand,
    Limits,
    Policy,
    PolicyError,
    Protect,
    Signal,
    load,
    parse,
)

__all__ = [
    "Config",
    "Controller",
    "Decision",
    "Expand",
    "Forecast",
    "ForecastSettings",
    "Forecaster",
    "Limits",
    "Policy",
    "PolicyError",
    "Protect",
    "Reading",
    "Signal",
    "SignalView",
    "load",
    "parse",
    "replay",
]
