"""A fault-injecting TCP proxy: the WAN between regions of a local mesh.

``cluster up --latency-ms/--jitter-ms/--loss`` and the cross-region test
framework (``bucketmesh.tooling.xr``) put one :class:`Link` between every ordered pair
of regions: region A's peer URL for region B points at the link "A→B", which
forwards to B's real port. Every byte going either way through a link is
delayed by the link's one-way latency, so a sync request sees one latency on
the way out and one on the way back (RTT = 2 × latency), as between
continents.

Theory of operation
-------------------
Delay
    Each direction of a connection is a pipe: a reader stamps every chunk it
    receives with a delivery time ``now + latency ± jitter`` and a writer
    delivers chunks at their time. Delivery times never go backwards within a
    pipe (TCP does not reorder a byte stream), so jitter stretches gaps but
    cannot swap chunks.
Loss
    TCP hides packet loss from the application as a retransmission: the lost
    segment arrives one retransmission timeout later and everything behind it
    waits. A chunk "lost" with probability ``loss`` is therefore delivered
    ``max(200 ms, 2 × latency)`` late (Linux's minimum RTO, or one RTT), which
    is what loss costs a TCP connection; bytes are never dropped, because a
    real TCP stream never drops them either.
Cut
    A cut link is a black hole, as a real partition is: established
    connections stop delivering (nothing is forwarded, nothing is closed),
    and new connections are accepted but go nowhere. The peers notice the way
    they would across a WAN — their requests time out. Healing closes the
    black-holed connections, so clients reconnect, and forwarding resumes.

The proxy is plain asyncio. :class:`NetProxy` runs its links in a process of
their own (so the owner's own work never delays forwarding) and takes
commands over a pipe, so synchronous code (``cluster up``, the scenario
runner) can cut and heal links from outside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import random
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

MIN_RTO_S = 0.2  # Linux TCP_RTO_MIN: the least a lost segment costs
CHUNK_BYTES = 65536


@dataclass(frozen=True)
class Faults:
    """What a link does to traffic: one-way latency and jitter (seconds), loss (0..1)."""

    latency_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0

    def __post_init__(self) -> None:
        for value in (self.latency_s, self.jitter_s):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError("latency and jitter must be finite numbers >= 0")
        if not (math.isfinite(self.loss) and 0.0 <= self.loss < 1.0):
            raise ValueError("loss must be a fraction in [0, 1)")

    def delay(self, rng: random.Random) -> float:
        """The one-way delay of one chunk."""
        delay = self.latency_s
        if self.jitter_s:
            delay += rng.uniform(-self.jitter_s, self.jitter_s)
        if self.loss and rng.random() < self.loss:
            delay += max(MIN_RTO_S, 2 * self.latency_s)
        return max(0.0, delay)


class _Pipe:
    """One direction of one proxied connection, delivering chunks on schedule."""

    def __init__(
        self,
        link: Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.link = link
        self.reader = reader
        self.writer = writer
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self.last_due = 0.0

    async def receive(self) -> None:
        while True:
            data = await self.reader.read(CHUNK_BYTES)
            if not data:
                self.queue.put_nowait((self.last_due, b""))
                return
            due = max(self.last_due, time.monotonic() + self.link.faults.delay(self.link.rng))
            self.last_due = due
            self.queue.put_nowait((due, data))

    async def deliver(self) -> None:
        while True:
            due, data = await self.queue.get()
            # Never before ``due`` on the real clock: uvloop's timers count whole
            # milliseconds of a clock read at the start of the loop's turn, so one
            # sleep can end up to a millisecond early (the netproxy test saw a 0.2 s
            # round trip take 0.19992 s); what is left is slept again.
            while (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            # A cut link holds everything: a black hole, not a reset.
            await self.link.open.wait()
            if not data:
                with contextlib.suppress(OSError):
                    self.writer.write_eof()
                return
            self.writer.write(data)
            await self.writer.drain()


class Link:
    """A listening port that forwards to ``target`` through :class:`Faults`.

    ``name`` is "source→destination": the traffic of the source region's peer
    connection to the destination region.
    """

    def __init__(
        self,
        name: str,
        target: tuple[str, int],
        faults: Faults | None = None,
        *,
        host: str = "127.0.0.1",
        seed: int | None = None,
    ) -> None:
        self.name = name
        self.target = target
        self.host = host
        self.faults = faults or Faults()
        self.rng = random.Random(seed)
        self.open = asyncio.Event()
        self.open.set()
        self.port = 0
        self.connections: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def cut(self) -> bool:
        return not self.open.is_set()

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def set_cut(self, cut: bool) -> None:
        if cut == self.cut:
            return
        if cut:
            self.open.clear()
            return
        # Healing: drop whatever was black-holed, so both ends start clean
        # (their requests have timed out long ago), then let traffic through.
        for task in list(self.connections):
            task.cancel()
        self.open.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self.connections):
            task.cancel()
        for task in list(self.connections):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            await self.open.wait()  # a connection made while cut goes nowhere
            up_reader, upstream = await asyncio.open_connection(*self.target)
            pipes = (_Pipe(self, reader, upstream), _Pipe(self, up_reader, writer))
            work = [asyncio.ensure_future(step()) for p in pipes for step in (p.receive, p.deliver)]
            try:
                # Both directions run until each has delivered its end of stream; a
                # reset on either side ends the connection, as in a real network.
                done, _ = await asyncio.wait(work, return_when=asyncio.FIRST_EXCEPTION)
                for task_done in done:
                    if not task_done.cancelled():
                        task_done.exception()  # retrieved: a reset is an ordinary ending
            finally:
                for step_task in work:
                    step_task.cancel()
        except OSError:
            pass  # the target refused: the client sees its connection closed
        except asyncio.CancelledError:
            pass  # healed or closed: this connection ends here, on purpose
        finally:
            self.connections.discard(task)
            for stream in (writer, upstream):
                if stream is not None:
                    with contextlib.suppress(Exception):
                        stream.close()


def link_name(source: str, destination: str) -> str:
    return f"{source}→{destination}"


@dataclass(frozen=True)
class LinkInfo:
    """What the owner of a :class:`NetProxy` knows of one of its links."""

    name: str
    port: int
    target: tuple[str, int]


class _Links:
    """The links of one proxy process and the commands it obeys."""

    def __init__(self, seed: int | None) -> None:
        self.links: dict[str, Link] = {}
        self.seed = seed

    def touching(self, regions: Iterable[str] | None) -> list[Link]:
        if regions is None:
            return list(self.links.values())
        names = set(regions)
        return [link for name, link in self.links.items() if set(name.split("→")) & names]

    async def run(self, command: str, args: tuple[Any, ...]) -> Any:
        if command == "add":
            source, destination, target, faults = args
            seed = None if self.seed is None else hash((self.seed, source, destination))
            link = Link(link_name(source, destination), tuple(target), faults, seed=seed)
            await link.start()
            self.links[link.name] = link
            return link.port
        if command == "cut":
            (regions,) = args
            cut = self.touching(regions)
            for link in cut:
                link.set_cut(True)
            return [link.name for link in cut]
        if command == "heal":
            (regions,) = args
            for link in self.touching(regions):
                link.set_cut(False)
            return None
        if command == "close":
            for link in self.links.values():
                await link.close()
            return None
        raise ValueError(f"unknown proxy command {command!r}")


def _serve(control: Connection, seed: int | None) -> None:
    """The proxy process: obey commands from ``control`` until "close" or EOF.

    End of file means the owner is gone, however it ended (kill -9 included): the
    proxy then closes its links and exits, so it never outlives its owner. The
    terminal's signals (Ctrl-C, a hang-up) are for the owner, which stops the proxy
    in its own time: the proxy shares the owner's process group, so it ignores them.
    """
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)

    async def main() -> None:
        links = _Links(seed)
        loop = asyncio.get_running_loop()
        commands: asyncio.Queue[tuple[str, tuple[Any, ...]] | None] = asyncio.Queue()

        def readable() -> None:
            try:
                commands.put_nowait(control.recv())
            except (EOFError, OSError):
                loop.remove_reader(control.fileno())
                commands.put_nowait(None)  # the owner is gone: stop

        loop.add_reader(control.fileno(), readable)
        while True:
            item = await commands.get()
            if item is None:
                await links.run("close", ())
                return
            command, args = item
            try:
                result = await links.run(command, args)
            except Exception as error:  # reported to the owner, who raises it
                control.send(("error", repr(error)))
            else:
                control.send(("ok", result))
            if command == "close":
                return

    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main())
    else:
        uvloop.run(main())


class NetProxy:
    """A set of :class:`Link`s served by a process of their own.

    A process, not a thread: the owner (``cluster up``, or the scenario runner,
    which also generates load) must not hold the GIL while sync traffic waits
    to be forwarded, or the proxy would add delay nobody asked for. Every
    method is safe to call from any thread of the owner.
    """

    def __init__(self, *, seed: int | None = None) -> None:
        self.links: dict[str, LinkInfo] = {}
        context = multiprocessing.get_context("spawn")
        self._control, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child, seed), daemon=True, name="bucketmesh-netproxy"
        )
        self._process.start()
        child.close()
        self._lock = threading.Lock()

    def _call(self, command: str, *args: Any) -> Any:
        with self._lock:
            self._control.send((command, args))
            if not self._control.poll(30):
                raise RuntimeError(f"the proxy process did not answer {command!r}")
            status, value = self._control.recv()
        if status != "ok":
            raise RuntimeError(f"proxy {command}: {value}")
        return value

    def add(
        self, source: str, destination: str, target: tuple[str, int], faults: Faults | None = None
    ) -> LinkInfo:
        """A new link source→destination forwarding to ``target``, listening on a free port."""
        port = self._call("add", source, destination, target, faults)
        info = LinkInfo(link_name(source, destination), int(port), target)
        self.links[info.name] = info
        return info

    def cut(self, regions: Iterable[str]) -> list[str]:
        """Cut every link to and from ``regions``; the names of the links cut."""
        return list(self._call("cut", list(regions)))

    def heal(self, regions: Iterable[str] | None = None) -> None:
        """Restore every cut link (or those touching ``regions``)."""
        self._call("heal", None if regions is None else list(regions))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call("close")
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)
        self._control.close()
