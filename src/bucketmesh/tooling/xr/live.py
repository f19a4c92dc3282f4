"""The live progress display of ``xr load`` and ``xr run`` (rich).

On a terminal: a table per region refreshed twice a second — requests sent,
allowed, denied, errors, failed over, the last full second's p50/p99, and the
shared bucket's ``tokens_remaining`` as that region sees it. Elsewhere (CI
logs) a one-line summary every five seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import IO, TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.table import Table

from bucketmesh.tooling.xr.load import Recorder

if TYPE_CHECKING:
    from bucketmesh.tooling.xr.runner import RunResult


def table(recorder: Recorder, levels: dict[str, float | None], elapsed: float) -> Table:
    grid = Table(title=f"bucketmesh xr — {elapsed:6.1f} s")
    for column in ("region", "sent", "allowed", "denied", "errors", "failed over"):
        grid.add_column(column, justify="right")
    grid.add_column("p50 / p99 (last s)", justify="right")
    grid.add_column("tokens_remaining", justify="right")
    second = int(elapsed) - 1
    for region in sorted(set(recorder.regions) | set(levels)):
        record = recorder.region(region)
        last = record.seconds.get(second)
        latency = "—"
        if last is not None and last.latency.get_total_count():
            p50 = last.latency.get_value_at_percentile(50) / 1000
            p99 = last.latency.get_value_at_percentile(99) / 1000
            latency = f"{p50:.1f} / {p99:.1f} ms"
        level = levels.get(region)
        grid.add_row(
            region,
            str(record.sent),
            str(record.allowed),
            str(record.denied),
            f"[red]{record.errors}[/red]" if record.errors else "0",
            str(record.failed_over),
            latency,
            "—" if level is None else f"{level:g}",
        )
    return grid


async def progress(result: RunResult, stop: asyncio.Event, out: IO[str], *, live: bool) -> None:
    recorder = result.recorder
    console = Console(file=out)

    def levels() -> dict[str, float | None]:
        return {v.region: v.tokens_remaining for v in result.watcher.latest}

    def elapsed() -> float:
        import time

        return time.monotonic() - recorder.t0

    if live and console.is_terminal:
        with Live(table(recorder, levels(), 0.0), console=console, refresh_per_second=2) as view:
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
                view.update(table(recorder, levels(), elapsed()))
        return
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 5.0)
        total = recorder.totals()
        shown = ", ".join(f"{r} {v:g}" for r, v in levels().items() if v is not None)
        out.write(
            f"[xr {elapsed():7.2f}s] sent {total.sent} allowed {total.allowed} "
            f"denied {total.denied} errors {total.errors} failed over {total.failed_over}"
            f" | tokens_remaining {shown}\n"
        )
        out.flush()
