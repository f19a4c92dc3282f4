"""Retries, regions and circuit breakers, without I/O: the client's decision procedure.

Theory of operation
-------------------
A *logical call* (one ``rate()``, one ``batch()``, ...) becomes one or more HTTP
*attempts*. :func:`attempts` is a generator that says what to do next — ``Send``
this request to that endpoint with this timeout, or ``Pause`` this long — and is
told what happened (a reply's status, or ``Failed``). ``Client`` and
``AsyncClient`` drive the same generator, one with blocking I/O and one with
asyncio; this module opens no socket, reads no clock it is not given and draws no
randomness it is not given, so the procedure is tested without a network.

The rules:

- **What is retried.** A transport failure (connection refused or reset, a
  timeout, a connection cut before the whole answer arrived) and the statuses
  502, 503 and 504. Nothing else: a 4xx is the server's answer about the request
  itself and comes back at once; a 429 is a decision.
- **Never twice charged on one node.** Every attempt of a logical call carries
  the same ``Idempotency-Key`` (the caller's job: the key is fixed before the
  first attempt). A failure *after the request was sent* (``Failed(sent=True)``,
  or a 502/503/504) is ambiguous — the node may have decided — so the next
  attempt goes to the **same** endpoint after a pause, where the node answers
  with its first decision instead of charging again. Only when that endpoint
  fails again does the call move on. A failure *before anything was sent*
  (refused, unreachable) moves on to the next endpoint at once.
- **Across nodes.** A node's Idempotency-Key cache is its own: when a call
  fails over after an ambiguous failure, the next region decides afresh, so the
  tokens may be charged in both. That errs toward denying (never toward
  over-admitting) and only happens when a node took the request and then became
  unreachable.
- **Backoff.** Exponential with full jitter: the n-th pause is uniform in
  ``[0, min(cap, base × 2^n)]``, and at least the ``Retry-After`` the server
  sent. A call ends after ``max_attempts`` attempts or ``total_timeout`` seconds
  (the seed's ``MaxElapsedTime = 5 s``), whichever comes first; no pause is
  started that would end past the deadline, and each attempt's timeout is cut to
  what is left.
- **Regions.** Endpoints are tried in preference order (the local region
  first). Each has a small circuit breaker (``CLOSED`` → ``OPEN`` after
  ``failures_to_open`` consecutive failures → ``HALF_OPEN`` after ``cooldown``
  seconds, when one call probes it → ``CLOSED`` on success, ``OPEN`` again on
  failure), so calls skip a dead region without paying for it, and go back to
  the preferred one once it answers again. When every endpoint's circuit is
  open, a call ends at once with ``Unavailable``; the client then fails open or
  closed as configured.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from bucketmesh.client.errors import Unavailable

#: Statuses that mean "not answered, try again" (from a proxy or a node that could not decide).
RETRY_STATUSES = frozenset({502, 503, 504})
#: The least time left in a call's budget that is worth an attempt.
MIN_ATTEMPT_S = 0.001


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often one logical call may try.

    ``max_attempts`` HTTP attempts at most, over ``total_timeout`` seconds at most
    (5 s, as the seed's ``MaxElapsedTime``); pauses grow from ``backoff_base`` by
    2× up to ``backoff_cap``, each drawn uniformly below that bound (full jitter).
    """

    max_attempts: int = 10
    total_timeout: float = 5.0
    backoff_base: float = 0.05
    backoff_cap: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        _positive("total_timeout", self.total_timeout)
        _positive("backoff_base", self.backoff_base, allow_zero=True)
        _positive("backoff_cap", self.backoff_cap, allow_zero=True)

    def backoff(self, retry: int, rng: random.Random) -> float:
        """The pause before the ``retry``-th retry (0-based): full jitter."""
        bound = min(self.backoff_cap, self.backoff_base * (2.0 ** min(retry, 62)))
        return rng.uniform(0.0, bound)


@dataclass(frozen=True)
class BreakerPolicy:
    """When an endpoint's circuit opens, and for how long."""

    failures_to_open: int = 2
    cooldown: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.failures_to_open, int) or self.failures_to_open < 1:
            raise ValueError(
                f"failures_to_open must be an integer >= 1, got {self.failures_to_open!r}"
            )
        _positive("cooldown", self.cooldown, allow_zero=True)


class Circuit(enum.Enum):
    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls skip this endpoint until the cooldown ends
    HALF_OPEN = "half_open"  # the cooldown ended: one call probes it


@dataclass(eq=False)
class Endpoint:
    """One region's base URL and its circuit breaker."""

    name: str
    url: str
    policy: BreakerPolicy = field(default_factory=BreakerPolicy)
    circuit: Circuit = Circuit.CLOSED
    failures: int = 0
    #: OPEN: when the cooldown ends; HALF_OPEN: when an unanswered probe is given up
    until: float = 0.0

    def allows(self, now: float) -> bool:
        if self.circuit is Circuit.CLOSED:
            return True
        return now >= self.until  # OPEN after its cooldown, or a stale HALF_OPEN probe

    def take(self, now: float) -> None:
        """A call is about to try this endpoint."""
        if self.circuit is not Circuit.CLOSED:
            # the probe: others skip this endpoint until it answers (or a cooldown passes)
            self.circuit = Circuit.HALF_OPEN
            self.until = now + max(self.policy.cooldown, 1e-3)

    def succeeded(self) -> None:
        self.circuit = Circuit.CLOSED
        self.failures = 0

    def failed(self, now: float) -> None:
        self.failures += 1
        if self.circuit is Circuit.HALF_OPEN or self.failures >= self.policy.failures_to_open:
            self.circuit = Circuit.OPEN
            self.until = now + self.policy.cooldown


class Endpoints:
    """The regions a client talks to, in preference order."""

    def __init__(self, named_urls: Sequence[tuple[str, str]], breaker: BreakerPolicy) -> None:
        if not named_urls:
            raise ValueError("at least one endpoint URL is needed")
        self.all = [Endpoint(name, url.rstrip("/"), breaker) for name, url in named_urls]

    def choose(self, now: float, exclude: set[Endpoint]) -> Endpoint | None:
        """The most preferred endpoint not in ``exclude`` whose circuit lets a call through."""
        for endpoint in self.all:
            if endpoint not in exclude and endpoint.allows(now):
                return endpoint
        return None

    def __iter__(self) -> Any:
        return iter(self.all)


@dataclass
class ClientStats:
    """Counters of what the client did, since it was made (``client.stats``)."""

    calls: int = 0
    attempts: int = 0
    retries: int = 0
    failovers: int = 0
    replayed: int = 0
    unavailable: int = 0
    failed_open: int = 0
    failed_closed: int = 0
    waits: int = 0
    batches: int = 0
    coalesced: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Send:
    """Send the request to ``endpoint``; give up on it after ``timeout`` seconds."""

    endpoint: Endpoint
    timeout: float


@dataclass(frozen=True)
class Pause:
    seconds: float


@dataclass(frozen=True)
class Failed:
    """An attempt that got no HTTP answer. ``sent``: the request may have reached the
    node (a read failed, the connection was cut mid-answer); otherwise it certainly
    did not (refused, unreachable, no connection from the pool)."""

    sent: bool
    reason: str


@dataclass(frozen=True)
class Replied:
    """An attempt that got an HTTP answer (``response`` is the driver's own object)."""

    status: int
    retry_after: float | None
    response: Any
    #: a 502/503/504 that is the node's answer about the request, not its failure (a
    #: new key refused at the bucket cap): returned as it is, not retried elsewhere,
    #: and not counted against the node's circuit
    final: bool = False


@dataclass(frozen=True)
class Answered:
    """How a logical call ended: the answer, the endpoint and the number of attempts."""

    response: Any
    endpoint: Endpoint
    attempts: int


Step = Send | Pause
Outcome = Replied | Failed | None
Plan = Generator[Step, Outcome, Answered]


def attempts(
    policy: RetryPolicy,
    endpoints: Endpoints,
    stats: ClientStats,
    *,
    clock: Callable[[], float],
    rng: random.Random,
    attempt_timeout: float,
) -> Plan:
    """The attempts of one logical call (see the module's theory of operation).

    Yields ``Send`` (answer with ``Replied`` or ``Failed``) and ``Pause`` (answer
    with None); returns ``Answered`` for the first reply that is not 502/503/504,
    or raises ``Unavailable``.
    """
    deadline = clock() + policy.total_timeout
    made = 0
    pauses = 0
    tried: set[Endpoint] = set()  # since the last pause
    second_chance: set[Endpoint] = set()  # endpoints already retried in place
    errors: dict[str, str] = {}
    again: Endpoint | None = None  # retry this one in place (after an ambiguous failure)
    previous: Endpoint | None = None
    stats.calls += 1

    def unavailable(message: str) -> Unavailable:
        stats.unavailable += 1
        return Unavailable(message, attempts=made, errors=errors)

    while True:
        now = clock()
        if again is not None:
            endpoint: Endpoint | None = again
            again = None
        else:
            endpoint = endpoints.choose(now, tried)
        if endpoint is None:
            if not tried:
                raise unavailable(
                    "no region answered"
                    if errors
                    else "no region available (every circuit is open)"
                )
            # every endpoint that takes calls failed since the last pause: back off
            delay = policy.backoff(pauses, rng)
            if made >= policy.max_attempts or now + delay >= deadline:
                raise unavailable("no region answered")
            pauses += 1
            yield Pause(delay)
            tried.clear()
            continue
        remaining = deadline - now
        # an attempt with next to no time left would only time out and count against
        # a healthy endpoint's breaker
        if made >= policy.max_attempts or remaining < MIN_ATTEMPT_S:
            raise unavailable("no region answered")
        endpoint.take(now)
        made += 1
        stats.attempts += 1
        if made > 1:
            stats.retries += 1
            if endpoint is not previous:
                stats.failovers += 1
        previous = endpoint
        tried.add(endpoint)
        outcome = yield Send(endpoint, min(attempt_timeout, remaining))
        now = clock()
        retry_after = 0.0
        if isinstance(outcome, Replied):
            if outcome.status not in RETRY_STATUSES or outcome.final:
                endpoint.succeeded()
                return Answered(outcome.response, endpoint, made)
            errors[endpoint.url] = f"HTTP {outcome.status}"
            retry_after = outcome.retry_after or 0.0
            ambiguous = True
        else:
            assert isinstance(outcome, Failed), outcome
            errors[endpoint.url] = outcome.reason
            ambiguous = outcome.sent
        endpoint.failed(now)
        if not ambiguous or endpoint in second_chance:
            continue  # the next endpoint, at once (or a pause when none is left)
        # The node may have decided: ask it again, after a pause, with the same key.
        second_chance.add(endpoint)
        delay = max(policy.backoff(pauses, rng), retry_after)
        if made >= policy.max_attempts or now + delay >= deadline:
            if retry_after and now + retry_after >= deadline:
                raise unavailable(f"no region answered (Retry-After {retry_after:g}s is too late)")
            raise unavailable("no region answered")
        pauses += 1
        yield Pause(delay)
        tried.clear()
        again = endpoint


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (delta-seconds only; an HTTP date is ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


__all__ = [
    "RETRY_STATUSES",
    "Answered",
    "BreakerPolicy",
    "Circuit",
    "ClientStats",
    "Endpoint",
    "Endpoints",
    "Failed",
    "Pause",
    "Plan",
    "Replied",
    "RetryPolicy",
    "Send",
    "attempts",
    "retry_after_seconds",
]
