"""What a bucket's limits may be, checked in one place, and errors that name a field.

``check_limits`` is the one validator of capacity, refill rate, ttl and mode:
config loading, ``Rule``, the runtime PATCH, the limiter and the storage
backends all call it, so a value is accepted everywhere or nowhere. It raises
``LimitError``, which carries the field's user-facing name (``refillRate``) and
the requirement as data; callers that report the problem (problem+json, a config
error) take the field from the error, never from its sentence.

``error_location`` is the one place that reads msgspec's English: msgspec puts
the path of an invalid field only inside its ``ValidationError`` message
(``Expected `int`, got `str` - at `$.buckets[0].capacity```), so the path is
parsed here, once, into data, and every caller gets it from here.

This module does no I/O and reads no clock.
"""

from __future__ import annotations

import math
import re
from types import EllipsisType
from typing import Final, NamedTuple

import msgspec

from bucketmesh.core.bucket import MODES, NS_PER_S, interval_for

__all__ = [
    "INT64_MAX",
    "MAX_CAPACITY",
    "MAX_KEY_BYTES",
    "MAX_REFILL_RATE",
    "MAX_SPAN_NS",
    "MAX_TTL",
    "MIN_CAPACITY",
    "MIN_REFILL_RATE",
    "MIN_TTL",
    "MODES",
    "ErrorLocation",
    "LimitError",
    "check_burst",
    "check_limits",
    "check_tokens",
    "error_location",
]

# -- the bounds ---------------------------------------------------------------
#
# Why these: a bucket's state is integers of nanoseconds (emission interval
# T = 1e9 / refill rate, ttl, and absolute times such as ``base_time`` = now ± a
# span) and travels between regions in msgpack, whose integers are int64. Every
# span a limit turns into (T, ttl) is kept at or below MAX_SPAN_NS = 1e18 ns
# (~31.7 years), so "now" (~1.8e18 ns in 2027) plus such a span stays far below
# 2^63 − 1 (~9.2e18). Values outside these ranges did load from a config file
# before but could not be carried (msgpack refuses ints beyond 64 bits; a refill
# rate above 1e9/s was silently clamped to 1 ns).
#
# These are the ranges the runtime PATCH accepted (capacity 1..1e15, refillRate
# 1e-9..1e9, ttl 0.001..1e8), widened where config accepted more and the state
# can still carry it: ttl up to 1e9 s and down to 1 ns, capacity up to 2^53 − 1.
# They bound each limit alone; ``check_burst`` bounds the product capacity × T
# (the time a drained bucket takes to refill, also a span of the state) by
# MAX_SPAN_NS, whichever way a config is reached (a file, a PATCH of one field).
# With that, every integer the state stores is a count of tokens or a time within
# MAX_SPAN_NS of now: ``Bucket.reconfigure`` also clamps the backlog it carries to
# MAX_SPAN_NS, so no sequence of acquires, PATCHes and merges leaves int64
# (tests/test_limits.py proves it with Hypothesis, through the msgpack encoder).
# The Redis backend's exact-arithmetic range (``storage.redis_store.check_exact``)
# is narrower still.

INT64_MAX: Final = 2**63 - 1
"""The largest integer msgpack's int64 carries (the sync wire format)."""

MAX_SPAN_NS: Final = 10**18
"""The longest span of nanoseconds a limit may turn into (interval, ttl)."""

MIN_CAPACITY: Final = 1
MAX_CAPACITY: Final = 2**53 - 1
"""Capacity is reported as a JSON number (bodies, RateLimit headers); 2^53 − 1 is the
largest integer every JSON client reads exactly, and far inside int64."""

MIN_REFILL_RATE: Final = NS_PER_S / MAX_SPAN_NS  # 1e-9/s: T = 1e18 ns at most
MAX_REFILL_RATE: Final = float(NS_PER_S)  # 1e9/s: T is a whole number of ns, at least 1

MIN_TTL: Final = 1 / NS_PER_S  # 1 ns: the state's resolution
MAX_TTL: Final = MAX_SPAN_NS / NS_PER_S  # 1e9 s

MAX_KEY_BYTES: Final = 8192
"""The longest bucket key (UTF-8 bytes). Every key that can be decided must replicate,
and a delta (key, config, one entry per replica) must fit one sync message (64 KiB by
default) with room for hundreds of replica entries: a longer key is refused at the
door, never granted in every region on its own."""


class LimitError(ValueError):
    """A limit out of its range. ``field`` is the user-facing name (``capacity``,
    ``refillRate``, ``ttl``, ``mode``, ``tokens``), ``requirement`` what the value
    must be (``must be >= 1``), ``value`` the value refused; ``problem`` is
    ``"<requirement>, got <value>"`` and ``str()`` reads ``"<field> <problem>"``."""

    def __init__(self, field: str, requirement: str, value: object) -> None:
        self.field = field
        self.requirement = requirement
        self.value = value
        self.problem = f"{requirement}, got {value!r}"
        super().__init__(f"{field} {self.problem}")


def check_limits(
    *,
    capacity: int | None = None,
    refill_rate: float | None = None,
    ttl: float | None = None,
    mode: str | None = None,
) -> None:
    """Raise LimitError for the first given limit out of its range (in this order);
    None means "not given" and is not checked.

    ``capacity`` is an integer in [MIN_CAPACITY, MAX_CAPACITY]; ``refill_rate``
    (tokens per second) a number in [MIN_REFILL_RATE, MAX_REFILL_RATE]; ``ttl``
    (seconds) a number in [MIN_TTL, MAX_TTL]; ``mode`` one of MODES.
    """
    if capacity is not None:
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise LimitError("capacity", "must be an integer", capacity)
        if capacity < MIN_CAPACITY:
            raise LimitError("capacity", f"must be >= {MIN_CAPACITY}", capacity)
        if capacity > MAX_CAPACITY:
            raise LimitError("capacity", f"must be <= {MAX_CAPACITY}", capacity)
    if refill_rate is not None:
        _check_span("refillRate", refill_rate, MIN_REFILL_RATE, MAX_REFILL_RATE)
    if ttl is not None:
        _check_span("ttl", ttl, MIN_TTL, MAX_TTL)
    if mode is not None and mode not in MODES:
        raise LimitError("mode", f"must be {_one_of(MODES)}", mode)
    if capacity is not None and refill_rate is not None:
        check_burst(capacity, interval_for(refill_rate), refill_rate=refill_rate)


def check_burst(
    capacity: int,
    interval_ns: int,
    *,
    refill_rate: float | None = None,
    changed: str | None = None,
) -> None:
    """Raise LimitError unless a drained bucket of ``capacity`` tokens at ``interval_ns``
    per token refills within MAX_SPAN_NS (~31.7 years): capacity × T is a span the
    state stores. ``changed`` names the field the caller changed (a PATCH of one
    field); else the refill rate is blamed when it is below 1/s, the capacity otherwise.
    """
    if capacity * interval_ns <= MAX_SPAN_NS:
        return
    rate = NS_PER_S / interval_ns if refill_rate is None else refill_rate
    field = changed or ("refillRate" if rate < 1 else "capacity")
    if field == "capacity":
        most = MAX_SPAN_NS // interval_ns
        raise LimitError(
            "capacity",
            f"must be <= {most} at refillRate {_number(rate)} "
            "(a drained bucket must refill within 1e9 s)",
            capacity,
        )
    raise LimitError(
        "refillRate",
        f"must be >= {_number(capacity * NS_PER_S / MAX_SPAN_NS)} for capacity {capacity} "
        "(a drained bucket must refill within 1e9 s)",
        rate,
    )


def check_tokens(tokens: int, capacity: int) -> None:
    """Raise LimitError (field ``tokens``) unless ``tokens`` is an integer in [0, capacity]."""
    if isinstance(tokens, bool) or not isinstance(tokens, int):
        raise LimitError("tokens", "must be an integer", tokens)
    if not 0 <= tokens <= capacity:
        raise LimitError("tokens", f"must be between 0 and the capacity {capacity}", tokens)


def _check_span(field: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LimitError(field, "must be a number", value)
    if not value > 0:  # NaN included
        raise LimitError(field, "must be > 0", value)
    if not math.isfinite(value):
        raise LimitError(field, "must be finite", value)
    if value < low:
        raise LimitError(field, f"must be >= {_number(low)}", value)
    if value > high:
        raise LimitError(field, f"must be <= {_number(high)}", value)


def _number(value: float) -> str:
    """A bound as people write it: ``1e-9``, ``1e9``, ``0.001``."""
    text = format(value, "g")
    mantissa, e, exponent = text.partition("e")
    if not e:
        return text
    return f"{mantissa}e{int(exponent)}"


def _one_of(choices: tuple[str, ...]) -> str:
    return ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]


# -- where a msgspec validation error points ----------------------------------

_AT: Final = " - at `"
_IN_KEY: Final = "key` in `"
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_NAMED = re.compile(r"Object (?:missing required|contains unknown) field `(.*)`", re.DOTALL)

PathStep = str | int | EllipsisType
"""A field name (as encoded), a list index, or ``...``: a value of a mapping that
msgspec does not name."""


class ErrorLocation(NamedTuple):
    """Where a ``msgspec.ValidationError`` points, as data.

    ``path`` leads from the decoded root to the value at fault; ``name`` is the
    field an unknown- or missing-field error names (a member of the object at
    ``path``, not part of it); ``in_key`` says a key of the mapping at ``path`` is
    at fault rather than a value; ``detail`` is msgspec's sentence without the
    location.
    """

    path: tuple[PathStep, ...]
    name: str | None
    in_key: bool
    detail: str

    @property
    def field(self) -> str:
        """The path with ``name`` as people write it: ``requests[2].tokens``,
        ``sync.peerUrls[...]``; empty for the root."""
        text = ""
        for step in (*self.path, *(() if self.name is None else (self.name,))):
            if isinstance(step, str):
                text = f"{text}.{step}" if text else step
            else:
                text += "[...]" if step is ... else f"[{step}]"
        return text


def error_location(error: msgspec.ValidationError) -> ErrorLocation:
    """Where ``error`` points. msgspec (through 0.23) offers no structured path, so this
    is the one parse of its message in the project; keep every caller on it."""
    message = str(error)
    detail, at, where = message.rpartition(_AT)
    if not at or not where.endswith("`"):
        detail, where = message, "$`"
    where = where[:-1]
    in_key = where.startswith(_IN_KEY)
    if in_key:
        where = where[len(_IN_KEY) :]
    path: list[PathStep] = []
    for name, index in _STEP.findall(where.removeprefix("$")):
        if name:
            path.append(name)
        else:
            path.append(... if index == "..." else int(index))
    named = _NAMED.fullmatch(detail)
    return ErrorLocation(tuple(path), named[1] if named else None, in_key, detail)
