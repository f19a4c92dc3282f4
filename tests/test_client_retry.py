"""The client's retry procedure (bucketmesh.client.retry), driven by hand: which
endpoint each attempt goes to, when it pauses, when it gives up. No network: the
procedure does no I/O (the clients drive it), and time is a counter advanced by the
pauses it asks for.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from bucketmesh.client.errors import Unavailable
from bucketmesh.client.retry import (
    Answered,
    BreakerPolicy,
    Circuit,
    ClientStats,
    Endpoints,
    Failed,
    Pause,
    Replied,
    RetryPolicy,
    Send,
    attempts,
    retry_after_seconds,
)

REFUSED = Failed(sent=False, reason="ConnectError: refused")
CUT = Failed(sent=True, reason="RemoteProtocolError: cut mid-answer")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ok(status: int = 200, retry_after: float | None = None) -> Replied:
    return Replied(status, retry_after, f"answer {status}")


def run(
    outcomes: list[Any],
    *,
    regions: int = 2,
    policy: RetryPolicy | None = None,
    breaker: BreakerPolicy | None = None,
    endpoints: Endpoints | None = None,
    clock: Clock | None = None,
) -> tuple[list[str], Answered | Unavailable, Endpoints, ClientStats]:
    """Drive one call: each Send gets the next outcome; returns the trace (endpoint
    names and pauses), how the call ended, the endpoints and the counters."""
    clock = clock or Clock()
    endpoints = endpoints or Endpoints(
        [(f"r{i}", f"http://r{i}") for i in range(regions)], breaker or BreakerPolicy()
    )
    stats = ClientStats()
    plan = attempts(
        policy or RetryPolicy(backoff_base=0.1, backoff_cap=1.0),
        endpoints,
        stats,
        clock=clock,
        rng=random.Random(7),
        attempt_timeout=1.0,
    )
    trace: list[str] = []
    pending = list(outcomes)
    try:
        step = next(plan)
        while True:
            if isinstance(step, Pause):
                trace.append("pause")
                clock.now += step.seconds
                step = plan.send(None)
            else:
                assert isinstance(step, Send)
                trace.append(step.endpoint.name)
                step = plan.send(pending.pop(0))
    except StopIteration as done:
        return trace, done.value, endpoints, stats
    except Unavailable as error:
        return trace, error, endpoints, stats


def test_an_answer_ends_the_call_at_once() -> None:
    trace, end, _, stats = run([ok()])
    assert trace == ["r0"]
    assert isinstance(end, Answered) and end.attempts == 1 and end.endpoint.name == "r0"
    assert stats.retries == 0


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 415, 429, 500])
def test_a_client_error_or_a_429_is_an_answer_never_retried(status: int) -> None:
    trace, end, _, _ = run([ok(status)])
    assert trace == ["r0"] and isinstance(end, Answered)
    assert end.response == f"answer {status}"


def test_refused_moves_to_the_next_region_without_pausing() -> None:
    trace, end, _, stats = run([REFUSED, ok()])
    assert trace == ["r0", "r1"]
    assert isinstance(end, Answered) and end.endpoint.name == "r1" and end.attempts == 2
    assert stats.failovers == 1


def test_a_cut_after_sending_retries_the_same_region_after_a_pause() -> None:
    # the node may have decided: only it can replay the first decision
    trace, end, _, stats = run([CUT, ok()])
    assert trace == ["r0", "pause", "r0"]
    assert isinstance(end, Answered) and end.endpoint.name == "r0"
    assert stats.retries == 1 and stats.failovers == 0


@pytest.mark.parametrize("status", [502, 503, 504])
def test_gateway_and_unavailable_statuses_retry_in_place(status: int) -> None:
    trace, end, _, _ = run([ok(status), ok()])
    assert trace == ["r0", "pause", "r0"] and isinstance(end, Answered)


def test_a_second_ambiguous_failure_fails_over() -> None:
    trace, end, _, _ = run([CUT, CUT, ok()])
    assert trace == ["r0", "pause", "r0", "r1"]
    assert isinstance(end, Answered) and end.endpoint.name == "r1"


def test_retry_after_is_the_least_pause() -> None:
    clock = Clock()
    trace, end, _, _ = run([ok(503, retry_after=1.5), ok()], clock=clock)
    assert trace == ["r0", "pause", "r0"] and isinstance(end, Answered)
    assert clock.now - 1000.0 >= 1.5


def test_a_retry_after_past_the_deadline_ends_the_call() -> None:
    trace, end, _, _ = run([ok(503, retry_after=30)], policy=RetryPolicy(total_timeout=5.0))
    assert trace == ["r0"]
    assert isinstance(end, Unavailable) and "Retry-After" in str(end)


def test_the_call_ends_after_max_attempts() -> None:
    trace, end, _, _ = run(
        [REFUSED] * 10,
        regions=1,
        policy=RetryPolicy(max_attempts=3, backoff_base=0.01),
        breaker=BreakerPolicy(failures_to_open=100),
    )
    assert [t for t in trace if t != "pause"] == ["r0"] * 3
    assert isinstance(end, Unavailable) and end.attempts == 3
    assert "ConnectError" in end.errors["http://r0"]


def test_the_call_ends_at_its_deadline() -> None:
    clock = Clock()
    policy = RetryPolicy(max_attempts=1000, total_timeout=2.0, backoff_base=0.1, backoff_cap=0.5)
    _trace, end, _, _ = run(
        [REFUSED] * 1000,
        regions=1,
        policy=policy,
        breaker=BreakerPolicy(failures_to_open=10_000),
        clock=clock,
    )
    assert isinstance(end, Unavailable)
    assert clock.now - 1000.0 <= 2.0  # no pause ends past the deadline
    assert 3 < end.attempts < 1000


def test_full_jitter_backoff_stays_under_its_growing_bound() -> None:
    policy = RetryPolicy(backoff_base=0.1, backoff_cap=1.0)
    rng = random.Random(1)
    for retry, bound in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (60, 1.0)]:
        draws = [policy.backoff(retry, rng) for _ in range(200)]
        assert all(0 <= d <= bound for d in draws)
        assert max(draws) > bound / 2  # jittered over the whole range, not a constant


def test_a_circuit_opens_after_consecutive_failures_and_calls_skip_it() -> None:
    breaker = BreakerPolicy(failures_to_open=2, cooldown=10.0)
    endpoints = Endpoints([("near", "http://near"), ("far", "http://far")], breaker)
    clock = Clock()
    for _ in range(2):
        trace, _end, _, _ = run([REFUSED, ok()], endpoints=endpoints, clock=clock)
        assert trace == ["near", "far"]
    assert endpoints.all[0].circuit is Circuit.OPEN
    trace, _end, _, _ = run([ok()], endpoints=endpoints, clock=clock)
    assert trace == ["far"]  # skipped while open


def test_the_preferred_region_gets_calls_back_after_its_cooldown() -> None:
    breaker = BreakerPolicy(failures_to_open=1, cooldown=10.0)
    endpoints = Endpoints([("near", "http://near"), ("far", "http://far")], breaker)
    clock = Clock()
    run([REFUSED, ok()], endpoints=endpoints, clock=clock)
    clock.now += 10.0
    trace, _end, _, _ = run([ok()], endpoints=endpoints, clock=clock)  # the probe
    assert trace == ["near"] and endpoints.all[0].circuit is Circuit.CLOSED


def test_a_failed_probe_opens_the_circuit_again() -> None:
    breaker = BreakerPolicy(failures_to_open=3, cooldown=10.0)
    endpoints = Endpoints([("near", "http://near"), ("far", "http://far")], breaker)
    near = endpoints.all[0]
    clock = Clock()
    near.circuit, near.until = Circuit.OPEN, clock.now
    trace, _, _, _ = run([REFUSED, ok()], endpoints=endpoints, clock=clock)
    assert trace == ["near", "far"]
    assert near.circuit is Circuit.OPEN and near.until == clock.now + 10.0


def test_every_circuit_open_ends_the_call_without_an_attempt() -> None:
    breaker = BreakerPolicy(failures_to_open=1, cooldown=60.0)
    endpoints = Endpoints([("a", "http://a"), ("b", "http://b")], breaker)
    clock = Clock()
    _, first, _, _ = run([REFUSED, REFUSED], endpoints=endpoints, clock=clock)
    assert isinstance(first, Unavailable) and first.attempts == 2
    trace, second, _, stats = run([], endpoints=endpoints, clock=clock)
    assert trace == [] and isinstance(second, Unavailable)
    assert "every circuit is open" in str(second) and stats.unavailable == 1


def test_policies_refuse_nonsense_naming_the_field() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="total_timeout"):
        RetryPolicy(total_timeout=float("nan"))
    with pytest.raises(ValueError, match="cooldown"):
        BreakerPolicy(cooldown=-1)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("1", 1.0), (" 2.5 ", 2.5), ("-1", None), ("soon", None), (None, None), ("inf", None)],
)
def test_retry_after_header(header: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(header) == seconds
