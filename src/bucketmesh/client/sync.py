"""``Client``: the blocking client (one httpx connection pool, every call retried safely)."""

from __future__ import annotations

import functools
import inspect
import random
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import httpx

from bucketmesh.client import _calls
from bucketmesh.client._calls import KeyOrHeaders, NodesSpec, OnUnavailable, UrlSpec
from bucketmesh.client.errors import RateLimited, Unavailable
from bucketmesh.client.results import BatchResult, BucketState, Decision, RuleConfig, Status
from bucketmesh.client.retry import (
    Answered,
    BreakerPolicy,
    ClientStats,
    Endpoint,
    Pause,
    RetryPolicy,
    attempts,
)

P = ParamSpec("P")
R = TypeVar("R")


class Client:
    """A blocking client of one or more bucketmesh regions.

    ``url`` is one base URL, a list of them in preference order (the local region
    first), or a mapping region → URL; without it, ``$BUCKETMESH_URL`` (a
    comma-separated list), else ``http://127.0.0.1:8080``. ``timeout`` bounds each
    attempt; ``retry`` bounds each call (attempts, total time, backoff); ``breaker``
    says when a region is skipped and for how long. When no region answers,
    ``on_unavailable`` decides: ``"raise"`` (``Unavailable``), ``"open"`` (allow) or
    ``"closed"`` (deny); the decision says so (``fallback``) and ``stats`` counts it.
    ``admin_token`` (default ``$BUCKETMESH_ADMIN_TOKEN``) is sent for ``configure``.
    ``nodes`` (region → its nodes' URLs, a list or a mapping name → URL) turns on key
    affinity: ``rate(key)`` goes to the key's owner on a MurmurHash3 ring over the
    region's nodes (``core/affinity.py``, docs/scale.md), the same node name in every
    region; other calls, and regions not in ``nodes``, use the region's URL.

    Use it as a context manager, or call ``close()``: it holds pooled keep-alive
    connections.
    """

    def __init__(
        self,
        url: UrlSpec = None,
        *,
        timeout: float = 1.0,
        retry: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
        on_unavailable: OnUnavailable = "raise",
        admin_token: str | None = None,
        headers: Mapping[str, str] | None = None,
        max_connections: int = 10,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        nodes: NodesSpec = None,
    ) -> None:
        self._settings = _calls.settings(
            url,
            timeout=timeout,
            retry=retry,
            breaker=breaker,
            on_unavailable=on_unavailable,
            admin_token=admin_token,
            headers=headers,
            clock=clock,
            rng=rng,
            nodes=nodes,
        )
        self._sleep = sleep
        self._http = httpx.Client(
            headers=self._settings.headers,
            timeout=timeout,
            limits=_calls.pool_limits(max_connections),
        )

    # -- plumbing -------------------------------------------------------------------

    @property
    def stats(self) -> ClientStats:
        """Counters: calls, attempts, retries, failovers, replayed, failed_open, ..."""
        return self._settings.stats

    @property
    def endpoints(self) -> list[Endpoint]:
        """The regions in preference order, each with its circuit breaker's state."""
        return list(self._settings.endpoints)

    def _perform(self, call: _calls.Call) -> Answered:
        s = self._settings
        plan = attempts(
            s.retry,
            s.endpoints,
            s.stats,
            clock=s.clock,
            rng=s.rng,
            attempt_timeout=s.timeout,
        )
        step = next(plan)
        while True:
            if isinstance(step, Pause):
                self._sleep(step.seconds)
                outcome: Any = None
            else:
                try:
                    response = self._http.request(
                        call.method,
                        s.url_for(call, step.endpoint),
                        params=call.params,
                        content=call.content,
                        headers=call.http_headers(),
                        timeout=step.timeout,
                    )
                    outcome = _calls.outcome_of(response)
                except httpx.TransportError as error:
                    outcome = _calls.failure_of(error)
            try:
                step = plan.send(outcome)
            except StopIteration as done:
                answered: Answered = done.value
                return answered

    # -- decisions ------------------------------------------------------------------

    def rate(
        self,
        key: KeyOrHeaders,
        tokens: int = 1,
        rule: str | None = None,
        *,
        wait: bool = False,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> Decision:
        """Take ``tokens`` from a bucket: ``key`` is the bucket key (``rule`` names its
        rule when no template produces it; naming another rule than the one that owns
        the key's text decides on that rule's own bucket, ``<key>%@<rule>``), or a
        mapping of request headers the node's rules render the key from (``rule``: the
        rule that renders it). Retried safely (one Idempotency-Key for every
        attempt). A denial is a ``Decision`` with ``allowed=False``; with ``wait=True``
        the client sleeps ``retry_after`` and asks again until ``timeout`` seconds
        (default: the retry budget) have passed.
        """
        s = self._settings
        budget = _calls.wait_budget(s, timeout)
        deadline = s.clock() + budget
        waited = 0.0
        made = 0
        round_ = 0
        while True:
            ikey = idempotency_key or _calls.new_idempotency_key()
            if idempotency_key and round_:
                ikey = f"{idempotency_key}.{round_}"  # a replay of the 429 would never end
            call = _calls.rate_call(key, tokens, rule, ikey)
            try:
                answered = self._perform(call)
            except Unavailable as error:
                return _calls.fallback(s, error, key, rule, made + error.attempts, waited)
            made += answered.attempts
            decision = _calls.decision_of(answered.response, answered.endpoint, made)
            decision.waits, decision.waited = round_, waited
            s.stats.replayed += decision.replayed
            if decision.allowed or not wait:
                return decision
            pause = decision.retry_after
            if s.clock() + pause > deadline:
                return decision
            s.stats.waits += 1
            self._sleep(pause)
            waited += pause
            round_ += 1

    def acquire_blocking(
        self, key: KeyOrHeaders, tokens: int = 1, rule: str | None = None, *, timeout: float
    ) -> Decision:
        """``rate(..., wait=True, timeout=timeout)``: block until granted or out of time."""
        return self.rate(key, tokens, rule, wait=True, timeout=timeout)

    def batch(self, items: Iterable[_calls.BatchItem], *, atomic: bool = False) -> BatchResult:
        """Up to 1000 decisions in one request (``POST /v1/rate/batch``). Items are keys,
        ``(key, tokens)``, ``(key, tokens, rule)`` or mappings with those fields. With
        ``atomic=True`` all are granted or none is charged."""
        found = _calls.batch_items(items)
        s = self._settings
        call = _calls.batch_call(found, atomic, _calls.new_idempotency_key())
        try:
            answered = self._perform(call)
        except Unavailable as error:
            return _calls.batch_fallback(s, error, found, error.attempts)
        result = _calls.batch_of(answered.response, answered.endpoint, answered.attempts)
        s.stats.batches += 1
        s.stats.replayed += result.replayed
        return result

    # -- inspection and operation ---------------------------------------------------

    def state(self, key: str, rule: str | None = None) -> BucketState:
        """``GET /v1/bucket/state``: the bucket's replicated state on the answering node."""
        answered = self._perform(_calls.state_call(key, rule))
        return _calls.state_of(answered.response, answered.endpoint)

    def status(self, key: str | None = None) -> Status:
        """``GET /v1/status`` of the answering node (with ``key``, that bucket too)."""
        answered = self._perform(_calls.status_call(key))
        return _calls.status_of(answered.response, answered.endpoint)

    def configure(
        self,
        key_or_rule: str,
        *,
        capacity: int | None = None,
        refill_rate: float | None = None,
        ttl: float | None = None,
        mode: str | None = None,
    ) -> RuleConfig:
        """``PATCH /v1/buckets/{key}``: change a rule's (or one key's) limits in every
        region. Retried like any call: a PATCH sets absolute values, so a repeat after
        an ambiguous failure leaves the same limits."""
        call = _calls.configure_call(key_or_rule, capacity, refill_rate, ttl, mode)
        answered = self._perform(call)
        return _calls.config_of(answered.response, answered.endpoint)

    # -- ergonomics -----------------------------------------------------------------

    def limit(
        self,
        rule_or_key: str,
        *,
        key: str | Callable[..., str] | None = None,
        tokens: int = 1,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Limit:
        """A context manager and decorator that takes tokens on entry and raises
        ``RateLimited`` when denied: ``limit("per-user", key="user-alice")`` (a rule
        and a key of it) or ``limit("user-alice")`` (a key alone). As a decorator,
        ``key`` may be a function of the decorated function's arguments."""
        return Limit(self, rule_or_key, key, tokens, wait, timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Limit:
    """``Client.limit(...)``: ``with client.limit(...)`` or ``@client.limit(...)``."""

    def __init__(
        self,
        client: Client,
        rule_or_key: str,
        key: str | Callable[..., str] | None,
        tokens: int,
        wait: bool,
        timeout: float | None,
    ) -> None:
        self.client = client
        self.rule = rule_or_key if key is not None else None
        self.key = key if key is not None else rule_or_key
        self.tokens = tokens
        self.wait = wait
        self.timeout = timeout
        #: the last decision taken on entry
        self.decision: Decision | None = None

    def take(self, key: str) -> Decision:
        decision = self.client.rate(
            key, self.tokens, self.rule, wait=self.wait, timeout=self.timeout
        )
        self.decision = decision
        if not decision.allowed:
            raise RateLimited(decision)
        return decision

    def __enter__(self) -> Decision:
        if callable(self.key):
            raise TypeError("a key function needs the decorated call's arguments: decorate")
        return self.take(self.key)

    def __exit__(self, *exc: object) -> None:
        return None

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        if inspect.iscoroutinefunction(func):
            raise TypeError(f"{func.__qualname__} is async: decorate it with AsyncClient.limit")

        @functools.wraps(func)
        def limited(*args: P.args, **kwargs: P.kwargs) -> R:
            key = self.key(*args, **kwargs) if callable(self.key) else self.key
            self.take(key)
            return func(*args, **kwargs)

        return limited


__all__ = ["Client", "Limit"]
