"""P10: decisions per second through ``bucketmesh.client.AsyncClient``, with and
without coalescing, against one ``bucketmesh serve`` process.

Target P10 (docs/targets.md): coalescing reaches at least 5× the uncoalesced
client's decisions/s measured in the same run, and the batch path's throughput
(P3's 1,000,000 decisions/s once the batch path reaches it; P3 itself is measured
by benchmarks/batch.py).

Contenders
    uncoalesced: ``AsyncClient(coalesce=False)``, one ``POST /v1/rate`` per call.
    coalesced: ``AsyncClient()`` (default window), concurrent ``rate()`` calls
    gathered into ``POST /v1/rate/batch`` requests of up to 1000 items.
    Both: asyncio tasks in this process (uvloop when installed) — 8 uncoalesced
    (httpx's async pool is at its best there; more concurrent requests make it
    slower), 2000 coalesced — each calling ``rate(key)`` in a loop over 100 keys of
    one rule that holds 10^12 tokens and refills 10^9/s, so every call is allowed.

Method
    One 1 s warm-up each, then alternating rounds of ``ROUND_S`` seconds (3 s with
    --quick), the order rotating; decisions/s = decisions answered / round time;
    median and best per contender, the target judged on medians. Counts noise
    cannot move are checked at the end: every decision the client got was allowed,
    and Σ used over the 100 keys on the server (``GET /v1/bucket/state``) equals
    the decisions the client counted in every round and warm-up — a coalesced
    caller is charged exactly once.

The embedded member
    In the same run, in this process: ``bucketmesh.embed.Member`` (a slot of a
    mesh whose node is not running, so its mesh runs but has no peer up) deciding
    through its store (``member.decider.acquire``) on one hot key, against
    ``limits`` 5.x ``MemoryStorage`` with ``FixedWindowRateLimiter.hit`` on one key
    (the per-process storage Flask-Limiter and slowapi use by default); ``ITERATIONS``
    decisions each, alternating, best of 5; µs per decision. For context: the member
    is what makes those per-process limits shared, so it is compared with them.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/client.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import _report
import http_rate as hb
import httpx

from bucketmesh.client import AsyncClient, RetryPolicy

TARGET_RATIO = 5.0
P3_TARGET = 1_000_000
RULE = "bulk"
KEYS = [f"bulk-{i:02d}" for i in range(100)]
RULES_YAML = (
    f'  - name: {RULE}\n    key: "bulk-{{{{ .Request.Header.X-Bulk-Key }}}}"\n'
    f"    capacity: {10**12}\n    refillRate: 1e9\n    ttl: 3600\n    mode: shared\n"
)
#: The uncoalesced client's best concurrency on the reference box: httpx's async pool
#: slows down past ~8 concurrent requests (16: about half, 50: about a quarter).
UNCOALESCED_TASKS = 8
COALESCED_TASKS = 2000


async def _drive(client: AsyncClient, tasks: int, seconds: float) -> tuple[int, int, float]:
    """``tasks`` callers for ``seconds``: (decisions, denied, elapsed)."""
    stop = time.monotonic() + seconds
    counts = [0, 0]

    async def caller(offset: int) -> None:
        i = offset
        while time.monotonic() < stop:
            decision = await client.rate(KEYS[i % len(KEYS)])
            counts[0] += 1
            counts[1] += not decision.allowed
            i += 1

    start = time.monotonic()
    await asyncio.gather(*(caller(n) for n in range(tasks)))
    return counts[0], counts[1], time.monotonic() - start


def _runner() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return lambda coroutine: asyncio.Runner(loop_factory=uvloop.new_event_loop).run(coroutine)


def measure(url: str, coalesce: bool, seconds: float) -> tuple[int, int, float]:
    async def main() -> tuple[int, int, float]:
        policy = RetryPolicy(total_timeout=30.0)
        async with AsyncClient(
            url, coalesce=coalesce, retry=policy, timeout=30.0, max_connections=100
        ) as client:
            tasks = COALESCED_TASKS if coalesce else UNCOALESCED_TASKS
            return await _drive(client, tasks, seconds)

    result: tuple[int, int, float] = _runner()(main())
    return result


ITERATIONS = 200_000


def embedded_vs_limits(workdir: Path, rounds: int = 5) -> tuple[float, float]:
    """Best µs per decision: the embedded member's store, and limits' memory storage."""
    from limits import RateLimitItemPerSecond
    from limits.storage import MemoryStorage
    from limits.strategies import FixedWindowRateLimiter

    from bucketmesh.embed import Member

    slot_port, node_port = hb.free_port(), hb.free_port()
    config = workdir / "member.yaml"
    config.write_text(
        "region: bench\nsync:\n  enabled: true\n  secret: bench-secret\n"
        "  peers: [bench, bench.w0]\n  peerUrls:\n"
        f"    bench: http://{hb.HOST}:{node_port}\n    bench.w0: http://{hb.HOST}:{slot_port}\n"
        f"buckets:\n{RULES_YAML}",
        encoding="utf-8",
    )
    hit = FixedWindowRateLimiter(MemoryStorage()).hit
    item = RateLimitItemPerSecond(10**9)
    member_us: list[float] = []
    limits_us: list[float] = []

    async def main() -> None:
        member = Member(str(config))
        await member.start()
        try:
            acquire = member.decider.acquire
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(ITERATIONS):
                    acquire("bulk-hot", 1)
                member_us.append((time.perf_counter() - start) / ITERATIONS * 1e6)
                start = time.perf_counter()
                for _ in range(ITERATIONS):
                    hit(item, "bulk-hot")
                limits_us.append((time.perf_counter() - start) / ITERATIONS * 1e6)
                await asyncio.sleep(0.05)  # let the member's mesh collect
        finally:
            await member.stop()

    _runner()(main())
    return min(member_us), min(limits_us)


def server_used(url: str) -> int:
    total = 0
    with httpx.Client(base_url=url, timeout=30) as http:
        for key in KEYS:
            state = http.get("/v1/bucket/state", params={"key": key}).json()
            total += sum(entry["used"] for entry in state["replicas"].values())
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short rounds (3 s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    round_s = 3.0 if args.quick else 8.0
    machine = _report.machine()
    contenders = {"uncoalesced": False, "coalesced": True}
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    decided = 0
    denied = 0
    with tempfile.TemporaryDirectory(prefix="bm-client-bench-") as tmp:
        service = hb.bucketmesh_service(Path(tmp), "client-bench", RULES_YAML)
        service.start("/healthz")
        url = f"http://{hb.HOST}:{service.port}"
        try:
            for coalesce in contenders.values():  # warm-up
                n, d, _ = measure(url, coalesce, 1.0)
                decided, denied = decided + n, denied + d
            names = list(contenders)
            for round_ in range(args.rounds):
                order = names[round_ % 2 :] + names[: round_ % 2]
                for name in order:
                    n, d, elapsed = measure(url, contenders[name], round_s)
                    decided, denied = decided + n, denied + d
                    rates[name].append(n / elapsed)
                    print(f"round {round_ + 1} {name}: {n / elapsed:,.0f} decisions/s", flush=True)
            used = server_used(url)
        finally:
            service.stop()
        member_us, limits_us = embedded_vs_limits(Path(tmp))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratio = medians["coalesced"] / medians["uncoalesced"]
    counts_ok = denied == 0 and used == decided
    rows = [
        [
            name,
            f"{tasks:,}",
            f"{medians[name]:,.0f}",
            f"{max(rates[name]):,.0f}",
            " / ".join(f"{v:,.0f}" for v in rates[name]),
        ]
        for name, tasks in (("uncoalesced", UNCOALESCED_TASKS), ("coalesced", COALESCED_TASKS))
    ]
    columns = ["client", "tasks", "median decisions/s", "best", "rounds"]
    _report.print_table("P10: AsyncClient decisions/s against one node", columns, rows)
    met = ratio >= TARGET_RATIO
    reached = medians["coalesced"] >= P3_TARGET
    same = "equal (each caller charged once)" if used == decided else "DIFFERENT"
    verdict = (
        f"**coalesced / uncoalesced = {ratio:.1f}× (target ≥ {TARGET_RATIO:g}×): "
        f"{'met' if met else 'missed'}; {medians['coalesced']:,.0f} decisions/s coalesced vs "
        f"P3's {P3_TARGET:,} target ({'reached' if reached else 'not reached'})**"
    )
    checks = (
        f"Counts: {decided:,} decisions answered to the client, {denied} denied; "
        f"Σ used on the server {used:,}: {same}."
    )
    embedded = (
        f"Embedded member (`bucketmesh.embed.Member`, its store's `acquire`, one hot key): "
        f"{member_us:.2f} µs per decision ({1e6 / member_us:,.0f}/s); `limits` "
        f"MemoryStorage fixed window `hit`: {limits_us:.2f} µs ({1e6 / limits_us:,.0f}/s); "
        f"{limits_us / member_us:.2f}× in the member's favour (best of 5 × "
        f"{ITERATIONS:,}, same process, alternating)."
    )
    print(verdict.replace("**", ""))
    print(checks)
    print(embedded)
    body = "\n\n".join(
        [
            f"{args.rounds} alternating rounds × {round_s:g} s, one `bucketmesh serve` "
            f"(memory, one rule of 10^12 tokens), the client in one process "
            f"({'uvloop' if _runner() is not asyncio.run else 'asyncio'}), "
            f"httpx {httpx.__version__}, 100 keys.",
            _report.markdown_table(columns, rows),
            verdict,
            checks,
            embedded,
            "Command: `PYTHONPATH=src .venv/bin/python benchmarks/client.py`",
        ]
    )
    if not args.no_record:
        _report.append_section(
            "P10 client SDK: AsyncClient with and without coalescing; the embedded member",
            body,
            machine=machine,
        )
    return 0 if counts_ok else 1


if __name__ == "__main__":
    sys.exit(main())
