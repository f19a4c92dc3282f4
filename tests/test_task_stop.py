"""Stopping background tasks: a graceful stop ends even when a task swallows its
cancellation once (``asyncio.wait_for`` may, Python < 3.12), as a real node's Redis
health loop did in CI (SIGTERM ignored for 30 s, the process killed)."""

from __future__ import annotations

import asyncio
import logging

from bucketmesh.telemetry.tasks import Supervisor, cancel_and_wait

HANG_GUARD_S = 30.0  # a hang guard only: the stop ends after one more cancellation


async def _stubborn(cancellations: list[int]) -> None:
    """A loop whose wait loses the first cancellation, as wait_for's race does."""
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        cancellations.append(1)  # swallowed: the loop goes on
    await asyncio.Event().wait()


def test_a_supervisor_stops_a_task_that_swallowed_its_first_cancellation() -> None:
    async def scenario() -> list[int]:
        supervisor = Supervisor(logging.getLogger("test"))
        cancellations: list[int] = []
        task = supervisor.run("stubborn", lambda: _stubborn(cancellations))
        await asyncio.sleep(0)  # the task is waiting
        await asyncio.wait_for(supervisor.stop(), HANG_GUARD_S)
        assert task.cancelled()
        return cancellations

    assert asyncio.run(scenario()) == [1]


def test_cancel_and_wait_reports_the_tasks_that_had_failed() -> None:
    async def scenario() -> list[str]:
        async def fails() -> None:
            raise ValueError("broken")

        failed = asyncio.ensure_future(fails())
        waiting = asyncio.ensure_future(asyncio.Event().wait())
        await asyncio.sleep(0)
        errors = await asyncio.wait_for(cancel_and_wait([failed, waiting]), HANG_GUARD_S)
        assert waiting.cancelled()
        return [repr(error) for error in errors]

    assert asyncio.run(scenario()) == ["ValueError('broken')"]
