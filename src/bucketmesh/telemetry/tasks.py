"""Background tasks that cannot die silently: the node's supervisor.

Every background task of a node (the sweep, the snapshot, the sync mesh's
collector, senders and bulk loops) runs under a ``Supervisor``. A failure is
never swallowed by asyncio: it is logged (one line for an ``OSError``, which
is the environment's — a full disk, a closed socket —, a traceback for
anything else, which is a bug), counted per task
(``bucketmesh_background_task_failures_total{task}``), shown as the task's
state in ``/v1/status`` and makes ``/readyz`` answer 503 naming the task; and
the task runs again after a backoff (doubling from ``backoff_initial_s`` up to
``backoff_max_s``), so a transient fault heals by itself and readiness comes
back with it.

Two shapes of task:

``every(name, interval, step)``
    a step run every ``interval``: a step that succeeds marks the task ``ok``, one
    that raises marks it ``failing`` until a later step succeeds.
``run(name, loop)``
    a loop that runs until its owner stops it: one that raises is ``failing`` and
    restarted after the backoff; it is ``ok`` again once it has run for
    ``settle_s`` without failing.

A failing task's log line is written for the first failure of a streak and then
at most once per ``log_every_s`` (a step failing every 20 ms must not flood the
log); the counter counts every one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

OK: Final = "ok"
FAILING: Final = "failing"
STOPPED: Final = "stopped"


@dataclass
class TaskState:
    """What the supervisor knows of one task."""

    name: str
    failures: int = 0
    streak: int = 0
    last_error: str | None = None
    failed_at: float | None = None
    logged_at: float | None = None
    running_since: float | None = None
    stopped: bool = False


class Supervisor:
    """Runs a node's background tasks, restarting what fails and saying so."""

    def __init__(
        self,
        log: logging.Logger,
        *,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        settle_s: float = 5.0,
        log_every_s: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.settle_s = settle_s
        self.log_every_s = log_every_s
        self.monotonic = monotonic
        self.tasks: dict[str, TaskState] = {}
        self._running: dict[str, asyncio.Task[None]] = {}

    # -- starting -------------------------------------------------------------

    def every(
        self, name: str, interval_s: float, step: Callable[[], Awaitable[object] | object]
    ) -> asyncio.Task[None]:
        """Run ``step`` every ``interval_s`` (and sooner after a failure, by backoff)."""
        state = self._state(name)

        async def body() -> None:
            delay = interval_s
            while True:
                await asyncio.sleep(delay)
                try:
                    result = step()
                    if isinstance(result, Awaitable):
                        await result
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # every failure: counted, shown, retried
                    self.failed(name, error)
                    first = max(interval_s, self.backoff_initial_s)
                    doubled = first * 2 ** min(state.streak - 1, 30)
                    delay = min(doubled, max(interval_s, self.backoff_max_s))
                    continue
                self.succeeded(name)
                delay = interval_s

        return self._spawn(name, body)

    def run(self, name: str, loop: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run ``loop()`` until it returns (its owner stopped it) or is cancelled,
        restarting it (after a backoff) whenever it raises."""
        state = self._state(name)

        async def body() -> None:
            while True:
                state.running_since = self.monotonic()
                try:
                    await loop()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    ran = self.monotonic() - (state.running_since or 0.0)
                    if ran >= self.settle_s:
                        state.streak = 0  # it had recovered: a new streak begins
                    self.failed(name, error)
                await asyncio.sleep(self.backoff(state))

        return self._spawn(name, body)

    def _state(self, name: str) -> TaskState:
        state = self.tasks.get(name)
        if state is None:
            state = self.tasks[name] = TaskState(name)
        state.stopped = False
        return state

    def _spawn(self, name: str, body: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        state = self.tasks[name]

        async def supervised() -> None:
            try:
                await body()
            finally:
                state.stopped = True
                self._running.pop(name, None)

        task = asyncio.ensure_future(supervised())
        self._running[name] = task
        return task

    # -- what happened --------------------------------------------------------

    def backoff(self, state: TaskState) -> float:
        doubled: float = self.backoff_initial_s * 2 ** min(max(0, state.streak - 1), 30)
        return min(self.backoff_max_s, doubled)

    def failed(self, name: str, error: BaseException) -> None:
        """Record a failure of ``name`` (also for one-shot work the node runs itself)."""
        state = self._state(name)
        now = self.monotonic()
        state.failures += 1
        state.streak += 1
        state.last_error = f"{type(error).__name__}: {error}"
        state.failed_at = now
        if (
            state.streak == 1
            or state.logged_at is None
            or now - state.logged_at >= self.log_every_s
        ):
            state.logged_at = now
            retry = self.backoff(state)
            if isinstance(error, OSError):
                self.log.error(
                    "background task %s failed (%d in a row, %d in all): %s; retrying in %.2gs",
                    name,
                    state.streak,
                    state.failures,
                    state.last_error,
                    retry,
                )
            else:
                self.log.error(
                    "background task %s failed (%d in a row, %d in all); retrying in %.2gs",
                    name,
                    state.streak,
                    state.failures,
                    retry,
                    exc_info=error,
                )

    def succeeded(self, name: str) -> None:
        state = self._state(name)
        if state.streak:
            self.log.warning(
                "background task %s recovered after %d failures in a row", name, state.streak
            )
        state.streak = 0

    def state_of(self, name: str) -> str:
        state = self.tasks[name]
        if state.stopped and name not in self._running:
            return STOPPED
        if state.streak == 0:
            return OK
        # a restarted loop that has run for settle_s since its last failure is ok
        if (
            state.running_since is not None
            and state.failed_at is not None
            and state.running_since > state.failed_at
            and self.monotonic() - state.running_since >= self.settle_s
        ):
            state.streak = 0
            return OK
        return FAILING

    # -- what the node shows --------------------------------------------------

    def readiness(self) -> str:
        """``ok``, or ``failing: <task> (<error>), ...`` while a task is failing."""
        failing = [
            f"{name} ({state.last_error})"
            for name, state in sorted(self.tasks.items())
            if self.state_of(name) == FAILING
        ]
        return "ok" if not failing else "failing: " + ", ".join(failing)

    def metric_families(self) -> Iterator[Metric]:
        failures = CounterMetricFamily(
            "bucketmesh_background_task_failures",
            "Failures of a background task of this node (each was logged and retried)",
            labels=["task"],
        )
        up = GaugeMetricFamily(
            "bucketmesh_background_task_up",
            "1 while a background task runs without failing, 0 while it fails or is stopped",
            labels=["task"],
        )
        for name, state in sorted(self.tasks.items()):
            failures.add_metric([name], state.failures)
            up.add_metric([name], float(self.state_of(name) == OK))
        yield failures
        yield up

    def forget(self, name: str) -> None:
        """Drop a stopped task from the status, readiness and metrics (a sync peer that
        discovery no longer finds); a running one is left alone."""
        if name not in self._running:
            self.tasks.pop(name, None)

    async def stop(self) -> None:
        """Cancel every task and wait for them."""
        await cancel_and_wait(list(self._running.values()))


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> list[BaseException]:
    """Cancel ``tasks`` and wait until every one has ended; the exceptions the ones
    that had failed ended with. A task still running half a second after its
    cancellation is cancelled again: ``asyncio.wait_for`` may swallow a cancellation
    that races with the completion of what it waits for (Python < 3.12), and a loop
    around it would then run on, and a graceful stop would hang on it."""
    failures: list[BaseException] = []
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        done, pending = await asyncio.wait(pending, timeout=0.5)
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                failures.append(error)
    return failures


__all__ = ["FAILING", "OK", "STOPPED", "Supervisor", "TaskState", "cancel_and_wait"]
