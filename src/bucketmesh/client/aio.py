"""``AsyncClient``: the asyncio client, with the same surface as ``Client``, and
coalescing: concurrent ``rate()`` calls made within a short window go to the node as
one ``POST /v1/rate/batch`` and each caller gets its own decision back.

Coalescing, in detail: the first ``rate(key)`` of a window starts a timer of
``coalesce_window`` seconds (0: the next turn of the event loop); every
``rate(key)`` made before it fires joins the same batch, which is sent at once when
it reaches ``max_batch`` items or ``max_batch_bytes`` of body. A batch is one
logical call (one Idempotency-Key, retried like any other) and never atomic, so
every item is decided as if alone. One bad item fails a whole batch on the server
(nothing charged): its caller gets that 400 as its own (``field`` ``tokens``,
``rule`` or ``key``) and the rest are sent again without it. Calls with request
headers instead of a key, or with an ``idempotency_key`` of the caller's, are sent
on their own.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import httpx

from bucketmesh.client import _calls
from bucketmesh.client._calls import KeyOrHeaders, NodesSpec, OnUnavailable, UrlSpec
from bucketmesh.client.errors import ApiError, RateLimited, Unavailable
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

#: Default coalescing window: well under a millisecond, so a lone call barely waits.
COALESCE_WINDOW = 0.0002
#: Default cap on a coalesced batch's body: under the nodes' default
#: ``limits.maxBodyBytes`` (65536), which answers a larger body with 413.
MAX_BATCH_BYTES = 60_000


class AsyncClient:
    """The asyncio twin of ``Client`` (same arguments, same methods, awaited), plus
    ``coalesce`` (default on), ``coalesce_window`` (seconds), ``max_batch`` (at most
    1000, the server's limit) and ``max_batch_bytes`` (keep it under the nodes'
    ``limits.maxBodyBytes``). With ``nodes`` (key affinity) calls are not coalesced:
    a batch would span keys that different nodes own."""

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
        max_connections: int = 100,
        coalesce: bool = True,
        coalesce_window: float = COALESCE_WINDOW,
        max_batch: int = _calls.MAX_BATCH,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        nodes: NodesSpec = None,
    ) -> None:
        if not (isinstance(max_batch, int) and 1 <= max_batch <= _calls.MAX_BATCH):
            raise ValueError(
                f"max_batch must be an integer in 1..{_calls.MAX_BATCH}, got {max_batch!r}"
            )
        if not (isinstance(max_batch_bytes, int) and max_batch_bytes >= 1024):
            raise ValueError(f"max_batch_bytes must be an integer >= 1024, got {max_batch_bytes!r}")
        if not (isinstance(coalesce_window, (int, float)) and 0 <= coalesce_window <= 1):
            raise ValueError(f"coalesce_window must be 0 to 1 seconds, got {coalesce_window!r}")
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
        self._http = httpx.AsyncClient(
            headers=self._settings.headers,
            timeout=timeout,
            limits=_calls.pool_limits(max_connections),
        )
        self._coalescer = (
            _Coalescer(self, coalesce_window, max_batch, max_batch_bytes)
            if coalesce and not self._settings.rings  # a batch would span keys' owners
            else None
        )

    @property
    def stats(self) -> ClientStats:
        return self._settings.stats

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._settings.endpoints)

    async def _perform(self, call: _calls.Call) -> Answered:
        s = self._settings
        plan = attempts(
            s.retry, s.endpoints, s.stats, clock=s.clock, rng=s.rng, attempt_timeout=s.timeout
        )
        step = next(plan)
        while True:
            if isinstance(step, Pause):
                await self._sleep(step.seconds)
                outcome: Any = None
            else:
                try:
                    response = await self._http.request(
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

    async def rate(
        self,
        key: KeyOrHeaders,
        tokens: int = 1,
        rule: str | None = None,
        *,
        wait: bool = False,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> Decision:
        """As ``Client.rate``; concurrent calls with a key are coalesced into batches."""
        coalescer = self._coalescer
        if coalescer is not None and not wait and type(key) is str and not idempotency_key:
            # the hot path: one item into the next batch, its decision back
            item = _calls.Item(key=key, rule=rule, tokens=_calls.checked_tokens(tokens))
            return await coalescer.submit(item)
        s = self._settings
        deadline = s.clock() + _calls.wait_budget(s, timeout)
        waited = 0.0
        made = 0
        round_ = 0
        coalesce = self._coalescer is not None and isinstance(key, str) and not idempotency_key
        while True:
            if coalesce:
                assert self._coalescer is not None and isinstance(key, str)
                decision = await self._coalescer.submit(
                    _calls.batch_items([(key, tokens, rule)])[0]
                )
                made += decision.attempts
                decision.attempts = made
            else:
                ikey = idempotency_key or _calls.new_idempotency_key()
                if idempotency_key and round_:
                    ikey = f"{idempotency_key}.{round_}"
                call = _calls.rate_call(key, tokens, rule, ikey)
                try:
                    answered = await self._perform(call)
                except Unavailable as error:
                    return _calls.fallback(s, error, key, rule, made + error.attempts, waited)
                made += answered.attempts
                decision = _calls.decision_of(answered.response, answered.endpoint, made)
                s.stats.replayed += decision.replayed
            decision.waits, decision.waited = round_, waited
            if decision.allowed or not wait or decision.fallback is not None:
                return decision
            pause = decision.retry_after
            if s.clock() + pause > deadline:
                return decision
            s.stats.waits += 1
            await self._sleep(pause)
            waited += pause
            round_ += 1

    async def acquire_blocking(
        self, key: KeyOrHeaders, tokens: int = 1, rule: str | None = None, *, timeout: float
    ) -> Decision:
        return await self.rate(key, tokens, rule, wait=True, timeout=timeout)

    async def batch(
        self, items: Iterable[_calls.BatchItem], *, atomic: bool = False
    ) -> BatchResult:
        return await self._batch(_calls.batch_items(items), atomic)

    async def _batch(self, found: list[_calls.Item], atomic: bool) -> BatchResult:
        s = self._settings
        call = _calls.batch_call(found, atomic, _calls.new_idempotency_key())
        try:
            answered = await self._perform(call)
        except Unavailable as error:
            return _calls.batch_fallback(s, error, found, error.attempts)
        result = _calls.batch_of(answered.response, answered.endpoint, answered.attempts)
        s.stats.batches += 1
        s.stats.replayed += result.replayed
        return result

    # -- inspection and operation ---------------------------------------------------

    async def state(self, key: str, rule: str | None = None) -> BucketState:
        answered = await self._perform(_calls.state_call(key, rule))
        return _calls.state_of(answered.response, answered.endpoint)

    async def status(self, key: str | None = None) -> Status:
        answered = await self._perform(_calls.status_call(key))
        return _calls.status_of(answered.response, answered.endpoint)

    async def configure(
        self,
        key_or_rule: str,
        *,
        capacity: int | None = None,
        refill_rate: float | None = None,
        ttl: float | None = None,
        mode: str | None = None,
    ) -> RuleConfig:
        call = _calls.configure_call(key_or_rule, capacity, refill_rate, ttl, mode)
        answered = await self._perform(call)
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
    ) -> AsyncLimit:
        """``async with client.limit("per-user", key="user-alice"):`` or, on an async
        function, ``@client.limit(...)``: takes tokens first, raises ``RateLimited``
        when denied."""
        return AsyncLimit(self, rule_or_key, key, tokens, wait, timeout)

    async def aclose(self) -> None:
        if self._coalescer is not None:
            await self._coalescer.drain()
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


class _Coalescer:
    """Gathers concurrent ``rate()`` calls into batches (see the module's docstring)."""

    def __init__(self, client: AsyncClient, window: float, max_batch: int, max_bytes: int) -> None:
        self.client = client
        self.window = window
        self.max_batch = max_batch
        self.max_bytes = max_bytes
        self.size = 0  # the pending items' bytes in a batch body
        self.pending: list[tuple[_calls.Item, asyncio.Future[Decision]]] = []
        self.timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self.sending: set[asyncio.Task[None]] = set()

    def submit(self, item: _calls.Item) -> asyncio.Future[Decision]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Decision] = loop.create_future()
        size = len(_calls.encode(item)) + 1  # and its comma
        if self.pending and self.size + size > self.max_bytes:
            self.flush()  # the node would refuse a larger body (413)
        self.pending.append((item, future))
        self.size += size
        if len(self.pending) >= self.max_batch:
            self.flush()
        elif self.timer is None:
            if self.window:
                self.timer = loop.call_later(self.window, self.flush)
            else:
                self.timer = loop.call_soon(self.flush)
        return future

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.pending:
            return
        batch, self.pending, self.size = self.pending, [], 0
        task = asyncio.get_running_loop().create_task(self.send(batch))
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    async def send(self, batch: list[tuple[_calls.Item, asyncio.Future[Decision]]]) -> None:
        stats = self.client.stats
        while batch:
            try:
                result = await self.client._batch([item for item, _ in batch], False)
            except ApiError as error:  # a 400, or a new key refused at the bucket cap
                index = _calls.bad_item_index(error, len(batch))
                if index is None:
                    _fail(batch, error)
                    return
                # the server refused the whole batch for this item: it is that caller's error
                _, future = batch.pop(index)
                if not future.done():
                    future.set_exception(_calls.item_error(error, index))
                continue
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as error:  # every caller learns what happened to its call
                _fail(batch, error)
                return
            stats.coalesced += len(batch)
            for (_, future), decision in zip(batch, result.results, strict=True):
                if not future.done():
                    future.set_result(decision)
            return

    async def drain(self) -> None:
        self.flush()
        if self.sending:
            await asyncio.gather(*self.sending, return_exceptions=True)


def _fail(batch: list[tuple[Any, asyncio.Future[Decision]]], error: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)


class AsyncLimit:
    """``AsyncClient.limit(...)``: ``async with`` or a decorator of async functions."""

    def __init__(
        self,
        client: AsyncClient,
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
        self.decision: Decision | None = None

    async def take(self, key: str) -> Decision:
        decision = await self.client.rate(
            key, self.tokens, self.rule, wait=self.wait, timeout=self.timeout
        )
        self.decision = decision
        if not decision.allowed:
            raise RateLimited(decision)
        return decision

    async def __aenter__(self) -> Decision:
        if callable(self.key):
            raise TypeError("a key function needs the decorated call's arguments: decorate")
        return await self.take(self.key)

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __call__(
        self, func: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        if not inspect.iscoroutinefunction(func):
            raise TypeError(f"{func.__qualname__} is not async: decorate it with Client.limit")

        @functools.wraps(func)
        async def limited(*args: P.args, **kwargs: P.kwargs) -> R:
            key = self.key(*args, **kwargs) if callable(self.key) else self.key
            await self.take(key)
            return await func(*args, **kwargs)

        return limited


__all__ = ["COALESCE_WINDOW", "AsyncClient", "AsyncLimit"]
