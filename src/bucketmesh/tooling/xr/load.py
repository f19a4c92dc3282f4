"""The open-loop load generator of ``bucketmesh xr load`` and of scenario ``load`` phases.

Open loop: request *i* to a region is due at ``start + i / rate`` and is sent
then, whether or not earlier ones have been answered, so a slow or dead
region cannot slow the generator down and hide its own slowness (no
coordinated omission). Latency is measured from the due time, not from the
moment the bytes left, for the same reason.

Each region gets a few keep-alive HTTP/1.1 connections; requests are
pipelined on them round-robin (the server answers in order), written in one
batch per tick (1 ms). The client is a bare asyncio protocol with httptools
parsing: measured on the shared 2-core box against one ``bucketmesh serve``,
8,000 requests/s open loop cost it about a quarter of a core (p50 1.5 ms),
where an ``httpx.AsyncClient`` (50 concurrent, closed loop) used a whole core
for about 100 requests/s.

Outcomes: ``200`` allowed, ``429`` denied, anything else — another status, a
connection refused or reset, no answer within ``timeout_s`` — an error. With
``failover``, a request whose region cannot be reached (no open connection)
is sent to the next region instead, as a multi-region client or load balancer
would; it is counted as failed over, and is an error only when no region is
reachable. Everything lands in a :class:`Recorder`: an HDR histogram per
region and per-second time series.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools
from hdrh.histogram import HdrHistogram

TICK_S = 0.001
CONNECT_RETRY_S = 0.1
MAX_LATENCY_US = 60_000_000


def new_histogram(digits: int = 3) -> HdrHistogram:
    """Latencies in microseconds, 1 µs to 60 s."""
    return HdrHistogram(1, MAX_LATENCY_US, digits)


@dataclass
class Second:
    """One region's outcomes in one second of the run."""

    allowed: int = 0
    denied: int = 0
    errors: int = 0
    failed_over: int = 0
    latency: HdrHistogram = field(default_factory=lambda: new_histogram(2))


@dataclass
class RegionRecord:
    """Everything measured for the requests first aimed at one region."""

    sent: int = 0
    allowed: int = 0
    denied: int = 0
    errors: int = 0
    failed_over: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    latency: HdrHistogram = field(default_factory=new_histogram)
    seconds: dict[int, Second] = field(default_factory=dict)


class Recorder:
    """Outcomes and latencies of every request, by region and by second of the run.

    ``t0`` is the run's origin on ``time.monotonic()``; "second" = whole seconds
    since ``t0`` of the request's due time.
    """

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.regions: dict[str, RegionRecord] = {}
        #: per key: allowed decisions (for consumption checks)
        self.allowed_by_key: dict[str, int] = {}
        #: when the first answered request was due, and when the last answer came
        #: (monotonic s): the span in which the bucket could grant anything
        self.first_due: float | None = None
        self.last_answer: float | None = None

    def region(self, name: str) -> RegionRecord:
        record = self.regions.get(name)
        if record is None:
            record = self.regions[name] = RegionRecord()
        return record

    def _second(self, record: RegionRecord, due: float) -> Second:
        index = int(due - self.t0)
        second = record.seconds.get(index)
        if second is None:
            second = record.seconds[index] = Second()
        return second

    def answered(
        self, region: str, key: str, due: float, now: float, status: int, failed_over: bool
    ) -> None:
        record = self.region(region)
        second = self._second(record, due)
        if self.first_due is None or due < self.first_due:
            self.first_due = due
        if self.last_answer is None or now > self.last_answer:
            self.last_answer = now
        latency_us = min(MAX_LATENCY_US, max(1, int((now - due) * 1e6)))
        if failed_over:
            record.failed_over += 1
            second.failed_over += 1
        if status == 200:
            record.allowed += 1
            second.allowed += 1
            self.allowed_by_key[key] = self.allowed_by_key.get(key, 0) + 1
        elif status == 429:
            record.denied += 1
            second.denied += 1
        else:
            self.failed(region, due, f"HTTP {status}")
            return
        record.latency.record_value(latency_us)
        second.latency.record_value(latency_us)

    def failed(self, region: str, due: float, kind: str) -> None:
        record = self.region(region)
        record.errors += 1
        record.error_kinds[kind] = record.error_kinds.get(kind, 0) + 1
        self._second(record, due).errors += 1

    def totals(self) -> RegionRecord:
        total = RegionRecord()
        for record in self.regions.values():
            total.sent += record.sent
            total.allowed += record.allowed
            total.denied += record.denied
            total.errors += record.errors
            total.failed_over += record.failed_over
            total.latency.add(record.latency)
            for kind, n in record.error_kinds.items():
                total.error_kinds[kind] = total.error_kinds.get(kind, 0) + n
        return total

    def errors_between(self, start: float, end: float) -> tuple[int, int]:
        """(errors, requests) due in ``[start, end)`` seconds since ``t0``, all regions."""
        errors = requests = 0
        for record in self.regions.values():
            for index, second in record.seconds.items():
                if math.floor(start) <= index < math.ceil(end):
                    errors += second.errors
                    requests += second.allowed + second.denied + second.errors
        return errors, requests


@dataclass(frozen=True)
class Target:
    """Where one region's load goes, and at what rate (requests/s)."""

    region: str
    url: str
    rate: float


class _Connection(asyncio.Protocol):
    """One keep-alive connection; answers arrive in the order requests were sent."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.WriteTransport | None = None
        # (origin region, key, due time, failed over) of each request in flight
        self.pending: deque[tuple[str, str, float, bool]] = deque()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they write alike
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.abort("bad response")

    def on_message_complete(self) -> None:
        if not self.pending:
            return
        origin, key, due, failed_over = self.pending.popleft()
        self.pool.recorder.answered(
            origin,
            key,
            due,
            time.monotonic(),
            self.parser.get_status_code(),
            failed_over,
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail_pending("connection lost")
        self.closed = True
        self.pool.lost(self)

    def fail_pending(self, kind: str) -> None:
        while self.pending:
            origin, _key, due, _ = self.pending.popleft()
            self.pool.recorder.failed(origin, due, kind)

    def abort(self, kind: str) -> None:
        self.fail_pending(kind)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def send(self, batch: list[tuple[str, str, float, bool, bytes]]) -> None:
        assert self.transport is not None
        for origin, key, due, failed_over, _ in batch:
            self.pending.append((origin, key, due, failed_over))
        self.transport.write(b"".join(item[4] for item in batch))


class _Pool:
    """The keep-alive connections to one region."""

    def __init__(self, region: str, url: str, size: int, recorder: Recorder) -> None:
        parts = urlsplit(url)
        self.region = region
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.size = size
        self.recorder = recorder
        self.open: list[_Connection] = []
        self.filling = False
        self.next_attempt = 0.0
        self.turn = 0

    def usable(self) -> bool:
        return bool(self.open)

    async def fill(self) -> None:
        """Open connections up to ``size`` (pausing after a refused connect)."""
        if self.filling or time.monotonic() < self.next_attempt:
            return
        self.filling = True
        loop = asyncio.get_running_loop()
        try:
            while len(self.open) < self.size:
                try:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(self), self.host, self.port
                    )
                except OSError:
                    self.next_attempt = time.monotonic() + CONNECT_RETRY_S
                    return
                self.open.append(conn)
        finally:
            self.filling = False

    def lost(self, conn: _Connection) -> None:
        with contextlib.suppress(ValueError):
            self.open.remove(conn)

    def pick(self) -> _Connection:
        self.turn = (self.turn + 1) % len(self.open)
        return self.open[self.turn]

    def expire(self, now: float, timeout_s: float) -> None:
        for conn in list(self.open):
            if conn.pending and now - conn.pending[0][2] > timeout_s:
                conn.abort("timeout")
                self.lost(conn)

    def close(self) -> None:
        for conn in list(self.open):
            conn.abort("stopped")
        self.open.clear()


def request_bytes(url: str, key: str, *, path: str = "/v1/rate") -> bytes:
    host = urlsplit(url).netloc
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\n"
        "User-Agent: bucketmesh-xr\r\n\r\n"
    ).encode()


class LoadGenerator:
    """Open-loop load on one key (``X-API-Key``) across regions, for ``duration_s``."""

    def __init__(
        self,
        targets: Sequence[Target],
        *,
        key: str,
        duration_s: float,
        recorder: Recorder,
        connections: int = 4,
        timeout_s: float = 5.0,
        failover: bool = False,
        all_urls: dict[str, str] | None = None,
    ) -> None:
        self.targets = list(targets)
        self.key = key
        self.duration_s = duration_s
        self.recorder = recorder
        self.timeout_s = timeout_s
        self.failover = failover
        urls = dict(all_urls or {})
        for target in targets:
            urls.setdefault(target.region, target.url)
        self.pools = {
            region: _Pool(region, url, connections, recorder) for region, url in urls.items()
        }
        self.requests = {region: request_bytes(url, key) for region, url in urls.items()}
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def _route(self, origin: str) -> str | None:
        """The region a request first aimed at ``origin`` goes to now."""
        if self.pools[origin].usable():
            return origin
        if not self.failover:
            return None
        regions = list(self.pools)
        start = regions.index(origin)
        for step in range(1, len(regions)):
            other = regions[(start + step) % len(regions)]
            if self.pools[other].usable():
                return other
        return None

    async def run(self, on_tick: Callable[[], None] | None = None) -> None:
        for pool in self.pools.values():
            await pool.fill()
        start = time.monotonic()
        end = start + self.duration_s
        sent = {target.region: 0 for target in self.targets}
        last_housekeeping = start
        fills: set[asyncio.Future[None]] = set()
        try:
            while not self.stopped:
                now = time.monotonic()
                if now >= end:
                    break
                batches: dict[str, list[tuple[str, str, float, bool, bytes]]] = {}
                for target in self.targets:
                    due_count = int((now - start) * target.rate)
                    record = self.recorder.region(target.region)
                    for i in range(sent[target.region], due_count):
                        due = start + i / target.rate
                        record.sent += 1
                        region = self._route(target.region)
                        if region is None:
                            self.recorder.failed(target.region, due, "unreachable")
                            continue
                        batches.setdefault(region, []).append(
                            (
                                target.region,
                                self.key,
                                due,
                                region != target.region,
                                self.requests[region],
                            )
                        )
                    sent[target.region] = max(sent[target.region], due_count)
                for region, batch in batches.items():
                    pool = self.pools[region]
                    # spread the tick's requests over the pool's connections
                    per = max(1, -(-len(batch) // len(pool.open)))
                    for offset in range(0, len(batch), per):
                        pool.pick().send(batch[offset : offset + per])
                if now - last_housekeeping >= 0.05:
                    last_housekeeping = now
                    for pool in self.pools.values():
                        pool.expire(now, self.timeout_s)
                        if len(pool.open) < pool.size and not pool.filling:
                            fills.add(task := asyncio.ensure_future(pool.fill()))
                            task.add_done_callback(fills.discard)
                    if on_tick is not None:
                        on_tick()
                await asyncio.sleep(TICK_S)
            # let the answers of the last requests arrive
            deadline = time.monotonic() + self.timeout_s
            while time.monotonic() < deadline and any(
                conn.pending for pool in self.pools.values() for conn in pool.open
            ):
                await asyncio.sleep(0.01)
        finally:
            for pool in self.pools.values():
                pool.close()
