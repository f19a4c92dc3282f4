"""P6: the redis backend — ``bucketmesh serve`` on Redis (1 and 2 nodes) vs ``limits``.

Target P6 (docs/targets.md): one region on one Redis with 2 API nodes; no
over-admission inside the region; throughput ≥ 3× ``limits`` RedisStorage with
a fixed window at the same client concurrency, measured in the same run.

Contenders (one redis-server started by this script, no persistence, shared)
    limits: ``limits`` (aio) ``RedisStorage`` on redis-py, ``FixedWindowRateLimiter``,
    ``hit()`` on one key from 50 concurrent asyncio tasks in one process on uvloop
    (its own process, like a client of Redis would be) — the library's fastest
    way to make 50 concurrent decisions; it never goes through HTTP.
    bucketmesh ×1: one ``bucketmesh serve`` (storage.backend: redis) under wrk,
    1 thread, 50 connections, POST /v1/rate on one key.
    bucketmesh ×2: two such nodes of one region on the same Redis, each under its
    own wrk with 25 connections (50 in all), at the same time; requests/s summed.
    Scenario "admit" (judged): limits that are never reached (every decision is
    a grant, so every one writes to Redis on both sides).

Method
    Rounds alternate the three contenders (the order rotates) so noise hits them
    alike; 8 s each (3 s with --quick), after a warm-up. The ratio of medians
    decides; bucketmesh's decisions/s are the grants its nodes counted over wrk's
    duration (a 503 of overload shedding is an answer, not a decision). Counts noise
    cannot move, checked every round: every decision bucketmesh counted is a grant,
    and Σ used of the key in Redis (read through GET /v1/bucket/state) equals the
    grants of both nodes together.
    Two kinds of checks: over-admission (the deny bound, Σ used = grants) and the
    run's health (answers that were not decisions: 503s of overload shedding on a
    loaded machine, other non-2xx, wrk's socket errors by kind; Redis calls that
    failed); each is reported as what it is.
    Context, not judged: CPU time per decision of the deciding processes (the
    limits client; the bucketmesh node(s), HTTP included) and of redis-server,
    from /proc — on an oversubscribed machine throughput follows the scheduler's
    share of each contender (wrk + nodes vs one client process), CPU per decision
    much less; the nodes' kernel share of it (their HTTP and Redis syscalls); and
    the machine's idle CPU during each run (/proc/stat): what the contender left
    unused of the cores, its request-reply chain waiting (a node on Redis, wrk on
    a node) with nothing else runnable.
    Scenario "deny" (over-admission, counted): capacity 1000, refill 1000/s, both
    nodes under wrk; grants must stay within capacity + refill × elapsed (elapsed
    measured around the whole run, so the bound is generous only by the time the
    processes take to start and stop sending) and equal Σ used in Redis.

Everything listens on 127.0.0.1, every wait is bounded, and every process this
script starts is stopped in ``finally``.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/redis.py [--quick]`` (needs redis-server, wrk).
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named redis.py: run as a script, its folder is sys.path[0] and the file
# would shadow the redis client package (which limits and bucketmesh import). Look in
# the folder last instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import _report  # noqa: E402
import http_rate as bench_http  # noqa: E402

HOST = bench_http.HOST
CONNECTIONS = 50
P6_RATIO = 3.0
KEY = "hot"
RULE = "bench"


# -- the limits client (run as: redis.py --limits-client URL SECONDS CONCURRENCY) --------


async def limits_client(url: str, seconds: float, concurrency: int) -> dict[str, float]:
    from limits import parse
    from limits.aio.storage import RedisStorage
    from limits.aio.strategies import FixedWindowRateLimiter

    if url.startswith("redis-cluster://"):
        from limits.aio.storage import RedisClusterStorage

        storage: Any = RedisClusterStorage(
            url.replace("redis-cluster://", "async+redis+cluster://"), implementation="redispy"
        )
    else:
        storage = RedisStorage(url.replace("redis://", "async+redis://"), implementation="redispy")
    limiter = FixedWindowRateLimiter(storage)
    item = parse("1000000000/hour")
    await limiter.hit(item, "bench")
    count = 0
    allowed = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal count, allowed
        while time.monotonic() < stop:
            allowed += await limiter.hit(item, "bench")
            count += 1

    started = time.monotonic()
    cpu = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    cpu = time.process_time() - cpu
    return {
        "hits": count,
        "allowed": allowed,
        "seconds": elapsed,
        "rps": count / elapsed,
        "cpu_us": cpu / count * 1e6,
    }


def run_limits(url: str, seconds: float) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--limits-client", url, str(seconds), str(CONNECTIONS)],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"limits client failed: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout))


# -- redis-server and the bucketmesh nodes -------------------------------------------------


class RedisProcess:
    def __init__(self, workdir: Path) -> None:
        self.port = bench_http.free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--logfile",
                str(workdir / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        self.client = client

    def flush(self) -> None:
        self.client.flushall()

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class ClusterProcesses:
    """--cluster: a Redis Cluster of 6 redis-server processes (3 masters, 3 replicas),
    the one tests/test_redis_cluster.py runs; both contenders use it."""

    def __init__(self, workdir: Path) -> None:
        sys.path.append(str(_HERE.parent / "tests"))
        from redis_cluster import RedisClusterProcesses

        self.cluster = RedisClusterProcesses(workdir / "cluster")
        self.cluster.start()
        self.url = self.cluster.url

    def flush(self) -> None:
        for node in self.cluster.nodes:
            client = node.client()
            if client.execute_command("ROLE")[0] == "master":
                client.flushall()

    def cpu(self) -> float:
        return sum(cpu_seconds(n.process.pid) for n in self.cluster.nodes if n.process)

    def stop(self) -> None:
        self.cluster.stop()


def node(
    workdir: Path, name: str, redis_url: str, capacity: int, rate: float, calls: int | None
) -> object:
    port = bench_http.free_port()
    config = workdir / f"{name}.yaml"
    config.write_text(
        f"region: bench\nnode: {name}\nlisten: {HOST}:{port}\n"
        f"storage:\n  backend: redis\n  redisUrl: {redis_url}\n"
        # generous: a loaded machine must not look like a store failure (then the
        # failure policy would decide, and a timed-out call may still be charged)
        "  redisTimeoutMs: 2000\n"
        + (f"  redisCallsInFlight: {calls}\n" if calls is not None else "")
        + f"buckets:\n  - name: {RULE}\n    key: 'hot-{{{{ .Request.Header.X-K }}}}'\n"
        f"    capacity: {capacity}\n    refillRate: {rate}\n",
        encoding="utf-8",
    )
    executable = bench_http.VENV_BIN / "bucketmesh"
    argv = [str(executable)] if executable.exists() else [sys.executable, "-m", "bucketmesh"]
    argv += ["serve", "--config", str(config), "--listen", f"{HOST}:{port}"]
    service = bench_http.Service(name, argv, workdir, port)
    service.start("/healthz")
    return service


def wrk_together(services: list[object], lua: Path, seconds: float) -> list[object]:
    """One wrk per service, all at once, CONNECTIONS split between them."""
    per = CONNECTIONS // len(services)
    procs = []
    for service in services:
        argv = [
            "wrk",
            "-t1",
            f"-c{per}",
            f"-d{seconds:g}s",
            "--timeout",
            "5s",
            "--latency",
            "-s",
            str(lua),
            f"http://{HOST}:{service.port}/v1/rate",
        ]  # type: ignore[attr-defined]
        procs.append(
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed: {err or out}")
        results.append(bench_http.parse_wrk(out))
    return results


def cpu_ticks() -> tuple[int, int]:
    """The machine's (all, idle) CPU time so far, in clock ticks (/proc/stat)."""
    with open("/proc/stat", encoding="ascii") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    return sum(values), values[3] + values[4]  # idle + iowait


def idle_share(before: tuple[int, int]) -> float:
    """Percent of the machine's CPU time left idle since ``before`` (``cpu_ticks``)."""
    after = cpu_ticks()
    return 100.0 * (after[1] - before[1]) / max(after[0] - before[0], 1)


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU time of a process so far, in seconds (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def kernel_seconds(pid: int) -> float:
    """System (kernel) CPU time of a process so far."""
    return cpu_times(pid)[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    return sum(cpu_times(pid))


def store_failures(services: list[object]) -> int:
    total = 0
    for service in services:
        _, body = bench_http.http_request(service.port, "GET", "/metrics")  # type: ignore[attr-defined]
        for name, _, value in bench_http.parse_metrics(body.decode()):
            if name == "bucketmesh_store_failures_total":
                total += int(value)
    return total


def sheds(services: list[object]) -> int:
    """Requests ``services`` answered 503 by overload shedding so far (loop lag,
    max_in_flight, yield: docs/targets.md R6), from their /metrics."""
    total = 0
    for service in services:
        _, body = bench_http.http_request(service.port, "GET", "/metrics")  # type: ignore[attr-defined]
        for name, _, value in bench_http.parse_metrics(body.decode()):
            if name.startswith("bucketmesh_http_shed_") and "unparsed" not in name:
                total += int(value)
    return total


def decisions_per_call(services: list[object]) -> float:
    """Decisions per acquire script call of ``services`` so far (their /metrics)."""
    decided, calls = decisions_and_calls(services)
    return decided / max(calls, 1.0)


def decisions_and_calls(services: list[object]) -> tuple[float, float]:
    """Decisions and acquire script calls of ``services`` so far (their /metrics)."""
    decided = calls = 0.0
    for service in services:
        _, body = bench_http.http_request(service.port, "GET", "/metrics")  # type: ignore[attr-defined]
        for name, _, value in bench_http.parse_metrics(body.decode()):
            if name == "bucketmesh_store_decisions_total":
                decided += float(value)
            elif name == "bucketmesh_store_script_calls_total":
                calls += float(value)
    return decided, calls


def children_cpu() -> float:
    """User + system CPU of this process's reaped children so far (wrk's, once waited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def grants(services: list[object]) -> tuple[int, int]:
    allowed = denied = 0
    for service in services:
        counts = bench_http.settled_counts(service.port, "rate", RULE)  # type: ignore[attr-defined]
        allowed += counts.allowed
        denied += counts.denied
    return allowed, denied


def used_in_redis(service: object) -> int:
    return int(bench_http.used_of(service.port, f"hot-{KEY}")[0])  # type: ignore[attr-defined]


# -- the per-request work on the node, in-process (--wire) ---------------------------------

WIRE_CONCURRENCY = int(os.environ.get("BENCH_WIRE_CONCURRENCY", "25"))  # per loop turn: one
# node's share of 50 connections
WIRE_CONTENDERS = {
    "http-memory": "POST /v1/rate through _Connection, Router, RatingApp on the memory backend",
    "http-future": "the same on the memory backend answering through a done future (the "
    "HTTP layer's path for a store that answers later, without Redis)",
    "http-redis": "POST /v1/rate through _Connection, Router, RatingApp on the redis backend",
    "backend": "RedisBackend.acquire alone (no HTTP): ask, queue, the script call written at "
    "once, the reply read by a done callback, futures",
    "store": "RedisStore.acquire alone (the coroutine path a task takes: Cluster, TLS, a "
    "reconfiguration), 25 distinct Asks: arguments, EVALSHA on the raw link, hiredis, verdicts",
    "link": "the raw link alone: the same EVALSHA's RESP encode, send, reply parse",
}


async def _wire_rounds(which: str, rounds: int, url: str) -> None:
    """``rounds`` turns of WIRE_CONCURRENCY decisions each, after 20 turns of warm-up:
    what callgrind counts (callgrind_main subtracts two round counts)."""
    import uvloop  # noqa: F401  (the loop the node runs on)

    from bucketmesh.api.routes import RatingApp
    from bucketmesh.core.limiter import Limiter
    from bucketmesh.core.rules import Rule
    from bucketmesh.http.router import Router
    from bucketmesh.http.server import HttpServer, _Connection
    from bucketmesh.storage.memory import MemoryStore
    from bucketmesh.storage.redis_backend import RedisBackend
    from bucketmesh.telemetry.metrics import NodeMetrics

    sys.path.append(str(_HERE))
    from http_rate import WIRE_REQUEST, _WireTransport

    rule = Rule.create(bench_http.TEMPLATE, 10**12, 1e9, name=bench_http.RULE, mode="shared")
    backend: RedisBackend | None = None
    if which not in ("http-memory", "http-future"):
        backend = RedisBackend([rule], region="wire", node="wire-1", url=url, timeout_s=5.0)
        await backend.start()
        assert backend.up, backend.last_error
        # the health and read-back loops run per interval of wall time, which valgrind
        # stretches ~50×: they would be charged to the decisions; not counted here
        for task in backend.tasks:
            task.cancel()
        await asyncio.gather(*backend.tasks, return_exceptions=True)
    n = WIRE_CONCURRENCY
    loop = asyncio.get_running_loop()
    turn: Any  # one round's work, awaited
    if which.startswith("http"):
        router = Router(NodeMetrics())
        decider: Any = backend or MemoryStore(Limiter([rule], replica_id="wire-1"))
        if which == "http-future":
            decide_now = decider.acquire

            def later(*args: Any, **kwargs: Any) -> Any:
                future = loop.create_future()
                future.set_result(decide_now(*args, **kwargs))
                return future

            decider.acquire = later
        RatingApp(decider, region="wire", node="wire-1", router=router)
        server = HttpServer(router)
        server._lag_due = float("inf")  # never started: no lag shedding
        waiting: list[asyncio.Future[None]] = []
        written = [0]

        class Transport(_WireTransport):
            def write(self, data: bytes) -> None:
                super().write(data)
                written[0] += 1
                if written[0] == n and waiting:
                    waiting.pop().set_result(None)

        feeds = []
        transports = []
        for _ in range(n):
            transport = Transport()
            connection = _Connection(server, loop)
            connection.connection_made(transport)  # type: ignore[arg-type]
            feeds.append(connection.data_received)
            transports.append(transport)

        async def turn() -> None:
            written[0] = 0
            done = loop.create_future()
            waiting.append(done)
            for feed in feeds:
                feed(WIRE_REQUEST)
            if written[0] < n:
                await done
            waiting.clear()

    elif which == "backend":
        assert backend is not None
        key = "agent-api-key-wire"

        async def turn() -> None:
            pending = [backend.acquire(key) for _ in range(n)]
            for future in pending:
                decision = await future  # type: ignore[misc]
                assert decision.allowed

    else:
        assert backend is not None
        asks = [backend.ask("agent-api-key-wire", None, 1) for _ in range(n)]
        store = backend.store
        if which == "store":

            async def turn() -> None:
                verdicts = await store.acquire(asks, time.time_ns())
                assert verdicts[-1].status == 1

        else:
            from bucketmesh.storage import redis_store

            captured: list[list[Any]] = []
            real = store._run_script

            async def capture(script: Any, keys: list[str], args: list[Any]) -> Any:
                captured.append([script, keys, args])
                return await real(script, keys, args)

            store._run_script = capture  # type: ignore[method-assign]
            await store.acquire(asks, time.time_ns())
            store._run_script = real  # type: ignore[method-assign]
            script, keys, args = captured[0]
            link = await store._open_link()
            command = ["EVALSHA", script.sha, len(keys), *keys, *args]

            async def turn() -> None:
                reply = await link.send(command)
                assert not isinstance(reply, redis_store.hiredis.ReplyError), reply

    for _ in range(20 + rounds):
        await turn()
    if which.startswith("http"):
        assert all(t.last.startswith(b"HTTP/1.1 200 ") for t in transports), transports[0].last
    if backend is not None:
        await backend.stop()


def wire_loop(which: str, rounds: int, url: str) -> None:
    import uvloop

    uvloop.run(_wire_rounds(which, rounds, url))


def _wire_instructions(which: str, rounds: int, url: str) -> int:
    return _report.instructions([sys.executable, __file__, "--wire-loop", which, str(rounds), url])[
        0
    ]


def _redis_usec(client: Any) -> tuple[int, int]:
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def wire_main() -> int:
    """Instructions per decision on the node (callgrind, (Ir of 120 turns − Ir of 40
    turns) ÷ 80 turns ÷ WIRE_CONCURRENCY) for each layer of a Redis decision, and
    redis-server's own time per decision in the script (INFO commandstats)."""
    if shutil.which("valgrind") is None:
        print("P6 --wire: valgrind is not installed", file=sys.stderr)
        return 2
    machine = _report.machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-redis-wire-") as tmp:
        redis_proc = RedisProcess(Path(tmp))
        try:
            for which, what in WIRE_CONTENDERS.items():
                low = _wire_instructions(which, 40, redis_proc.url)
                high = _wire_instructions(which, 120, redis_proc.url)
                per = (high - low) / 80 / WIRE_CONCURRENCY
                rows.append([which, what, f"{per:,.0f}"])
                print(f"{which}: {per:,.0f} Ir per decision", flush=True)
            # redis-server's time in the script, per decision (no valgrind: real speed)
            calls, usec = _redis_usec(redis_proc.client)
            wire_loop("store", 400, redis_proc.url)
            calls2, usec2 = _redis_usec(redis_proc.client)
            lua_us = (usec2 - usec) / max(calls2 - calls, 1) / WIRE_CONCURRENCY
            # the backend's own calls: a key's Ask reused, so one run of 25 per call
            wire_loop("backend", 400, redis_proc.url)
            calls3, usec3 = _redis_usec(redis_proc.client)
            lua_run_us = (usec3 - usec2) / max(calls3 - calls2, 1) / WIRE_CONCURRENCY
        finally:
            redis_proc.stop()
    rows.append(
        [
            "lua",
            "redis-server: acquire.lua per decision (INFO commandstats, µs), the store's "
            "25 distinct Asks of one key per call",
            f"{lua_us:.2f} µs",
        ]
    )
    rows.append(
        [
            "lua-run",
            "the same for the backend's calls: one key's Ask reused, one run of 25 per call",
            f"{lua_run_us:.2f} µs",
        ]
    )
    columns = ["layer", "what", "per decision"]
    title = (
        f"P6 per-decision work on a redis node, in-process ({WIRE_CONCURRENCY} decisions per "
        "loop turn, one key)"
    )
    _report.print_table(title, columns, rows)
    body = "\n\n".join(
        [
            _report.markdown_table(columns, rows),
            "Instructions per decision (callgrind, the node's process only: redis-server is "
            "not counted). Command: `PYTHONPATH=src .venv/bin/python benchmarks/redis.py --wire`",
        ]
    )
    _report.append_section(title, body, machine=machine)
    return 0


# --lua-parts: where a call's time in acquire.lua goes. The script is cut short (``return
# 1``) before the first top-level line holding each marker; each cut's µs per call, less
# the one before it, is that part's cost.
LUA_PARTS = (
    ("local nrules", "the incarnation check"),
    ("local cache, dirty", "ARGV's rules and asks parsed"),
    ("local settled = {}", "the script's helpers defined, groups indexed"),
    ("for k, now_rel in pairs(dirty)", "the decisions: the bucket's read, the first, the run"),
    ("for k = 2, nb + 1", "the save"),
    (None, "the reply"),
)


async def _captured_call(url: str, run: int) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the backend's usual call: one run of ``run`` asks of one key."""
    from bucketmesh.core.rules import Rule
    from bucketmesh.storage.redis_backend import RedisBackend

    rule = Rule.create(bench_http.TEMPLATE, 10**12, 1e9, name=bench_http.RULE, mode="shared")
    backend = RedisBackend([rule], region="parts", node="parts-1", url=url, timeout_s=5.0)
    await backend.start()
    try:
        assert backend.up, backend.last_error
        store = backend.store
        captured: list[tuple[list[str], list[Any]]] = []
        real = store._run_script

        async def capture(script: Any, keys: list[str], args: list[Any]) -> Any:
            captured.append((keys, args))
            return await real(script, keys, args)

        store._run_script = capture  # type: ignore[method-assign]
        ask = backend.ask("agent-api-key-parts", None, 1)
        await store.acquire([ask] * run, time.time_ns())  # the bucket made
        await store.acquire([ask] * run, time.time_ns())
        store._run_script = real  # type: ignore[method-assign]
        return captured[-1]
    finally:
        await backend.stop()


def lua_parts_main(runs: list[int], calls: int) -> int:
    """redis-server's µs per acquire.lua call (INFO commandstats), by part, for the
    backend's call of one run of N asks of one key, at each N of ``runs``."""
    from importlib import resources

    import uvloop

    from bucketmesh.storage import redis_store

    machine = _report.machine()
    source = redis_store._script("acquire")
    lines = source.split("\n")
    own = resources.files("bucketmesh.storage") / "lua" / "acquire.lua"
    body = len(lines) - len(own.read_text("utf-8").split("\n"))
    cuts: list[tuple[str, str]] = [
        ("return 1", "EVALSHA of a script answering 1"),
        ("\n".join(lines[:body]) + "\nreturn 1", "common.lua's definitions"),
    ]
    for marker, what in LUA_PARTS:
        if marker is None:
            cuts.append((source, what))
            continue
        at = next(i for i in range(body, len(lines)) if lines[i].startswith(marker))
        cuts.append(("\n".join(lines[:at]) + "\nreturn 1", what))
    table: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-redis-parts-") as tmp:
        redis_proc = RedisProcess(Path(tmp))
        try:
            client = redis_proc.client
            for run in runs:
                keys, args = uvloop.run(_captured_call(redis_proc.url, run))
                totals = []
                for script, _ in cuts:
                    sha = client.script_load(script)
                    client.config_resetstat()
                    for _ in range(calls):
                        client.evalsha(sha, len(keys), *keys, *args)
                    totals.append(
                        float(client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])
                    )
                table[run] = totals
        finally:
            redis_proc.stop()
    columns = ["part", *(f"run of {run}: µs per call" for run in runs)]
    rows = []
    for index, (_, what) in enumerate(cuts):
        label = what if index == 0 else f"+ {what}"
        cells = []
        for run in runs:
            totals = table[run]
            part = totals[index] - (totals[index - 1] if index else 0.0)
            cells.append(f"{part:.2f}")
        rows.append([label, *cells])
    rows.append(["whole call", *(f"{table[run][-1]:.2f}" for run in runs)])
    title = "P6 acquire.lua: where a call's time goes (one key, one run per call)"
    _report.print_table(title, columns, rows)
    command = " ".join(str(run) for run in runs)
    text = "\n\n".join(
        [
            _report.markdown_table(columns, rows),
            f"redis-server's µs per call (INFO commandstats, {calls:,} calls per cut, idle "
            "Redis, no persistence): the backend's real call for one run of N asks of one "
            "key, replayed with the script cut short before each part (a cut that saves "
            "nothing leaves the bucket as it was). Command: `PYTHONPATH=src "
            f".venv/bin/python benchmarks/redis.py --lua-parts {command}`",
        ]
    )
    _report.append_section(title, text, machine=machine)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--cluster", action="store_true", help="on a Redis Cluster (6 processes) instead"
    )
    parser.add_argument("--limits-client", nargs=3, metavar=("URL", "SECONDS", "CONCURRENCY"))
    parser.add_argument(
        "--wire", action="store_true", help="callgrind Ir per decision, layer by layer"
    )
    parser.add_argument("--wire-loop", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument(
        "--lua-parts",
        type=int,
        nargs="+",
        metavar="N",
        help="redis-server's µs per acquire.lua call by part, for one run of N asks",
    )
    parser.add_argument(
        "--calls-in-flight",
        type=int,
        default=None,
        help="the nodes' storage.redisCallsInFlight (default: the node's default)",
    )
    args = parser.parse_args()
    if args.wire_loop:
        wire_loop(args.wire_loop[0], int(args.wire_loop[1]), args.wire_loop[2])
        return 0
    if args.wire:
        return wire_main()
    if args.lua_parts:
        return lua_parts_main(args.lua_parts, 1000 if args.quick else 3000)
    if args.limits_client:
        url, seconds, concurrency = args.limits_client
        import uvloop

        print(json.dumps(uvloop.run(limits_client(url, float(seconds), int(concurrency)))))
        return 0
    for tool in ("redis-server", "wrk"):
        if shutil.which(tool) is None and not Path(f"/usr/bin/{tool}").exists():
            print(
                f"missing {tool}: scripts/ensure-debian-packages.sh redis-server wrk",
                file=sys.stderr,
            )
            return 2

    machine = _report.machine()
    seconds = 3.0 if args.quick else 8.0
    rounds = 2 if args.quick else 3
    # over-admission (judged, whatever the load): the deny bound, Σ used = grants
    problems: list[str] = []
    # the run's own health: answers that were not decisions (overload shedding's 503s,
    # other non-2xx, socket errors), Redis calls that failed; they make the figures
    # doubtful but are not over-admission
    run_problems: list[str] = []
    results: dict[str, list[float]] = {"limits": [], "bucketmesh x1": [], "bucketmesh x2": []}
    p99: dict[str, list[float]] = {"bucketmesh x1": [], "bucketmesh x2": []}
    # CPU per decision of the deciding process(es) and of redis-server: a figure that
    # an oversubscribed machine moves far less than throughput (context, not judged)
    cpu_us: dict[str, list[float]] = {name: [] for name in results}
    redis_us: dict[str, list[float]] = {name: [] for name in results}
    # bucketmesh only: wrk's CPU, redis-server's time inside the script (INFO
    # commandstats; not on Cluster), decisions per script call
    wrk_us: dict[str, list[float]] = {name: [] for name in results if name != "limits"}
    lua_us: dict[str, list[float]] = {name: [] for name in wrk_us}
    per_call_of: dict[str, list[float]] = {name: [] for name in wrk_us}
    # context for the figures: the machine's idle CPU during each run (what the
    # contender's processes left unused of the cores), and the nodes' kernel share
    idle_pct: dict[str, list[float]] = {name: [] for name in results}
    kernel_us: dict[str, list[float]] = {name: [] for name in wrk_us}
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        workdir = Path(tmp)
        lua = bench_http.wrk_lua(
            workdir / "post.lua",
            body='{"tokens":1}',
            headers={"X-K": KEY, "Content-Type": "application/json"},
        )
        redis_proc: Any = ClusterProcesses(workdir) if args.cluster else RedisProcess(workdir)
        services: list[object] = []
        try:
            calls = args.calls_in_flight
            a = node(workdir, "node-a", redis_proc.url, 10**12, 1e9, calls)
            b = node(workdir, "node-b", redis_proc.url, 10**12, 1e9, calls)
            services = [a, b]
            # warm-up
            run_limits(redis_proc.url, 1.0)
            wrk_together([a], lua, 1.0)
            contenders = ["limits", "bucketmesh x1", "bucketmesh x2"]
            for index in range(rounds):
                order = contenders[index % 3 :] + contenders[: index % 3]
                for name in order:
                    before = grants(services)
                    shed_before = sheds(services)
                    redis_cpu = redis_proc.cpu()
                    ticks = cpu_ticks()
                    if name == "limits":
                        figures = run_limits(redis_proc.url, seconds)
                        idle_pct[name].append(idle_share(ticks))
                        results[name].append(figures["rps"])
                        cpu_us[name].append(figures["cpu_us"])
                        redis_us[name].append(
                            (redis_proc.cpu() - redis_cpu) / figures["hits"] * 1e6
                        )
                        continue
                    chosen = [a] if name == "bucketmesh x1" else [a, b]
                    counted = decisions_and_calls(chosen)
                    script = None if args.cluster else _redis_usec(redis_proc.client)
                    wrk_cpu = children_cpu()
                    node_cpu = sum(cpu_seconds(s.pid) for s in chosen)  # type: ignore[attr-defined]
                    node_kernel = sum(kernel_seconds(s.pid) for s in chosen)  # type: ignore[attr-defined]
                    ticks = cpu_ticks()
                    runs = wrk_together(chosen, lua, seconds)
                    idle_pct[name].append(idle_share(ticks))
                    node_cpu = sum(cpu_seconds(s.pid) for s in chosen) - node_cpu  # type: ignore[attr-defined]
                    node_kernel = sum(kernel_seconds(s.pid) for s in chosen) - node_kernel  # type: ignore[attr-defined]
                    wrk_cpu = children_cpu() - wrk_cpu
                    decided = grants(services)[0] - before[0]
                    cpu_us[name].append(node_cpu / max(decided, 1) * 1e6)
                    kernel_us[name].append(node_kernel / max(decided, 1) * 1e6)
                    redis_us[name].append((redis_proc.cpu() - redis_cpu) / max(decided, 1) * 1e6)
                    wrk_us[name].append(wrk_cpu / max(decided, 1) * 1e6)
                    if script is not None:
                        usec = _redis_usec(redis_proc.client)[1] - script[1]
                        lua_us[name].append(usec / max(decided, 1))
                    after_count = decisions_and_calls(chosen)
                    per_call_of[name].append(
                        (after_count[0] - counted[0]) / max(after_count[1] - counted[1], 1)
                    )
                    # decisions/s: the grants the nodes counted (every admit decision is
                    # one), not wrk's responses/s, which would count a shed 503 too
                    results[name].append(decided / max(r.seconds for r in runs))
                    p99[name].append(max(r.p99_ms for r in runs))
                    after = grants(services)
                    if after[1] != before[1]:
                        run_problems.append(
                            f"{name}: {after[1] - before[1]} denials in the admit scenario"
                        )
                    shed = sheds(services) - shed_before
                    non2xx = sum(r.non2xx for r in runs)
                    socket_errors = {
                        kind: sum(r.socket_errors[kind] for r in runs)
                        for kind in runs[0].socket_errors
                    }
                    if shed or non2xx or any(socket_errors.values()):
                        run_problems.append(
                            f"{name}, round {index + 1}: {shed:,} requests answered 503 by "
                            f"overload shedding (docs/targets.md R6), {non2xx - shed:,} other "
                            f"non-2xx answers, wrk socket errors {socket_errors}, "
                            f"p99 {max(r.p99_ms for r in runs):.1f} ms"
                        )
            total_grants = grants(services)[0]
            per_call = decisions_per_call(services)
            used = used_in_redis(a)
            failures = store_failures(services)
            if failures:
                run_problems.append(f"admit: {failures} Redis calls failed (the policy decided)")
            if used != total_grants:
                problems.append(f"admit: Σ used in Redis {used} != grants {total_grants}")

            # deny scenario: over-admission inside the region
            for service in services:
                service.stop()  # type: ignore[attr-defined]
            redis_proc.flush()
            a = node(workdir, "deny-a", redis_proc.url, 1000, 1000, calls)
            b = node(workdir, "deny-b", redis_proc.url, 1000, 1000, calls)
            services = [a, b]
            started = time.monotonic()
            deny_runs = wrk_together([a, b], lua, seconds)
            elapsed = time.monotonic() - started
            allowed, denied = grants(services)
            bound = 1000 + 1000 * elapsed
            used = used_in_redis(a)
            if allowed > bound:
                problems.append(
                    f"deny: {allowed} grants > capacity + refill × elapsed = {bound:.0f}"
                )
            if used != allowed:
                problems.append(f"deny: Σ used in Redis {used} != grants {allowed}")
            failures = store_failures(services)
            if failures:
                run_problems.append(f"deny: {failures} Redis calls failed (the policy decided)")
        finally:
            for service in services:
                with contextlib.suppress(Exception):
                    service.stop()  # type: ignore[attr-defined]
            redis_proc.stop()

    limits_median = statistics.median(results["limits"])
    rows = []
    for name, values in results.items():
        median = statistics.median(values)
        ratio = median / limits_median
        rows.append(
            [
                name,
                f"{median:,.0f}",
                f"{max(values):,.0f}",
                f"{statistics.median(p99[name]):.1f}" if name in p99 else "-",
                f"{ratio:.2f}×",
                f"{statistics.median(cpu_us[name]):.0f}",
                f"{statistics.median(kernel_us[name]):.1f}" if kernel_us.get(name) else "-",
                f"{statistics.median(redis_us[name]):.1f}",
                f"{statistics.median(lua_us[name]):.1f}" if lua_us.get(name) else "-",
                f"{statistics.median(wrk_us[name]):.1f}" if name in wrk_us else "-",
                (f"{statistics.median(per_call_of[name]):.1f}" if per_call_of.get(name) else "-"),
                f"{statistics.median(idle_pct[name]):.0f}",
            ]
        )
    ratio_2 = statistics.median(results["bucketmesh x2"]) / limits_median
    ratio_1 = statistics.median(results["bucketmesh x1"]) / limits_median
    met = ratio_2 >= P6_RATIO and not problems and not run_problems
    columns = [
        "contender",
        "median decisions/s",
        "best",
        "p99 ms",
        "vs limits",
        "client/node CPU µs per decision",
        "of it in the kernel (µs)",
        "redis CPU µs per decision",
        "of it in the script (µs)",
        "wrk CPU µs per decision",
        "decisions per call",
        "machine idle %",
    ]
    title = (
        f"P6 redis backend{' on Redis Cluster (3 masters, 3 replicas)' if args.cluster else ''}, "
        f"admit, {CONNECTIONS} concurrent clients, "
        f"{rounds} rounds × {seconds:g} s"
        + (f", redisCallsInFlight {args.calls_in_flight}" if args.calls_in_flight else "")
    )
    _report.print_table(title, columns, rows)
    deny_line = (
        f"deny scenario (capacity 1000, refill 1000/s, 2 nodes, {elapsed:.1f} s): "
        f"{allowed:,} granted, {denied:,} denied, bound {bound:,.0f}, Σ used in Redis {used:,}; "
        f"wrk {sum(r.rps for r in deny_runs):,.0f} requests/s"
    )
    verdict = (
        f"P6 {'MET' if met else 'MISSED'}: 2 nodes at {ratio_2:.2f}× limits "
        f"(1 node {ratio_1:.2f}×), target ≥ {P6_RATIO:g}×; "
        f"over-admission checks {'passed' if not problems else 'FAILED'}; "
        f"run checks {'clean' if not run_problems else 'NOT clean (below)'}"
    )
    per_call_line = f"admit: {per_call:.1f} decisions per script call (both nodes, all rounds)"
    print(per_call_line)
    print(deny_line)
    print(verdict)
    for problem in problems:
        print("OVER-ADMISSION:", problem)
    for problem in run_problems:
        print("RUN:", problem)
    body = "\n\n".join(
        [
            _report.markdown_table(columns, rows),
            per_call_line,
            deny_line,
            verdict
            + "".join(f"\n\n- over-admission: {p}" for p in problems)
            + "".join(f"\n\n- run: {p}" for p in run_problems),
            f"limits: {_report.versions('limits', 'redis')}, "
            f"aio {'RedisClusterStorage' if args.cluster else 'RedisStorage'} (redis-py), "
            f"FixedWindowRateLimiter, {CONNECTIONS} asyncio tasks on uvloop; bucketmesh: wrk -t1, "
            f"POST /v1/rate, {CONNECTIONS} connections in all; "
            + (
                "one Redis Cluster (6 redis-server processes) for everything, limits on its "
                "RedisClusterStorage. "
                if args.cluster
                else "one redis-server for everything. "
            )
            + "Command: `PYTHONPATH=src .venv/bin/python benchmarks/redis.py"
            + (" --cluster" if args.cluster else "")
            + (f" --calls-in-flight {args.calls_in_flight}" if args.calls_in_flight else "")
            + (" --quick`" if args.quick else "`"),
        ]
    )
    _report.append_section(title, body, machine=machine)
    return 0 if not (problems or run_problems) else 1


if __name__ == "__main__":
    sys.exit(main())
