"""The ``bucketmesh serve`` process: one node of one region.

Owns everything with a side effect around the pure core: the event loop
(uvloop), the HTTP server, the replica's identity and its snapshot file, the
background sweeps, the sync mesh (``mesh.py``) and the signals. Start-up
order: restore the snapshot (under a new incarnation, see below), pull the
full state of every reachable peer region, start listening, start the mesh,
then serve until SIGTERM or SIGINT; shutdown stops accepting, lets in-flight
requests finish, sends what the mesh still has queued, and writes a final
snapshot.

With a snapshot file, the node also keeps a write-ahead log of its own grants
(``wal.py``; ``durability: relaxed`` survives kill -9, ``strict`` power loss):
start-up replays it over the snapshot, and every snapshot rotates it. A
snapshot is encoded in slices of ``SNAPSHOT_SLICE`` buckets with the event
loop running between them, so a million buckets neither stall decisions for
seconds nor need their whole encoding in memory at once. Such a snapshot is
"fuzzy" (buckets are captured at slightly different instants), which is sound
because the log segment started before the first slice holds every grant the
slices may have missed, and replay is a max-merge.

Replica identity is ``region/node/incarnation``. Every start takes a new
incarnation (one above the snapshot's, or the start time in ms when there is
no snapshot), so a restarted node can never reuse a ``used`` counter that its
previous life advanced past what the snapshot recorded: the old incarnation's
entries stay in the state as a peer's would, and nothing spent is granted
again (DESIGN.md section 4). Pulling the peers' state before listening is the
other half: what the previous incarnation spent and sent before a crash is
known again before the new one decides anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import msgspec

from bucketmesh.http.routes import RatingApp, SyncView
from bucketmesh.http.server import HttpServer, Response, ServerLimits
from bucketmesh.core.limiter import DeltaBatch, Limiter, Snapshot
from bucketmesh.replication.mesh import Mesh, MeshSettings
from bucketmesh.core.rules import Rule
from bucketmesh.storage.wal import Recovered, WriteAheadLog, pack, recover, replay_into, unpack_stream

if TYPE_CHECKING:
    from bucketmesh.integrations.envoy import EnvoyServer
    from bucketmesh.storage.redis_backend import RedisBackend

SWEEP_INTERVAL_S = 0.25
SWEEP_BUDGET = 20_000
SNAPSHOT_SLICE = 5_000
SNAPSHOT_MAGIC = b"bucketmesh-snapshot-2\n"
_SLICE_ENCODER = msgspec.msgpack.Encoder()
_SLICE_DECODER = msgspec.msgpack.Decoder(DeltaBatch)


@dataclass
class NodeSettings:
    """What one node needs to run; built from the config file, flags and env."""

    region: str
    node: str
    host: str
    port: int
    rules: Sequence[Rule]
    cluster_id: str = ""
    admin_token: str | None = None
    snapshot: str | None = None
    snapshot_interval_s: float = 5.0
    durability: str = "relaxed"
    max_buckets: int = 1_000_000
    limits: ServerLimits = field(default_factory=ServerLimits)
    version: str = "0"
    regions: int = 1
    sync: MeshSettings | None = None
    # storage.backend: redis (redis_backend.py); the snapshot file is not used then
    storage: str = "memory"
    redis_url: str = "redis://localhost:6379/0"
    redis_timeout_s: float = 0.1
    redis_connections: int = 4
    # envoyListen: the Envoy rate limit service's gRPC (host, port); off when None
    envoy_listen: tuple[str, int] | None = None


class SnapshotFile:
    """The embedded store's snapshot: written whole, fsynced, atomically replaced.

    Format: ``SNAPSHOT_MAGIC``, then frames (``wal.pack``): the first holds
    ``Limiter.snapshot_head()``, each other one a ``DeltaBatch`` slice of
    buckets, so that neither writing nor reading ever holds every bucket's
    encoding at once. A file without the magic is a whole ``Limiter.snapshot()``
    (what ``save`` writes, and what earlier versions wrote).
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._tmp_prefix = f".{self.path.name}.tmp-"

    def remove_stale(self) -> int:
        """Delete snapshots left half-written by a crash (each as large as a whole
        one); returns how many. Only this file's own temporaries are touched."""
        removed = 0
        if self.path.parent.is_dir():
            for stale in self.path.parent.glob(self._tmp_prefix + "*"):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
                    removed += 1
        return removed

    def read(self) -> tuple[bytes, Iterator[DeltaBatch]] | None:
        """The head and the bucket slices, read lazily; None if there is no file.
        Raises ValueError (or msgspec's errors) for a damaged file."""
        try:
            stream = self.path.open("rb")
        except FileNotFoundError:
            return None
        if stream.read(len(SNAPSHOT_MAGIC)) != SNAPSHOT_MAGIC:
            stream.close()
            data = self.path.read_bytes()
            return data, iter(())
        frames = unpack_stream(stream)
        head = next(frames, None)
        if head is None:
            stream.close()
            raise ValueError("no head frame")

        def slices() -> Iterator[DeltaBatch]:
            with stream:
                for payload in frames:
                    yield _SLICE_DECODER.decode(payload)

        return head, slices()

    def begin(self) -> SnapshotWriter:
        """A snapshot written piece by piece; ``commit`` replaces the file atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self._tmp_prefix, dir=self.path.parent)
        return SnapshotWriter(self.path, Path(tmp), os.fdopen(fd, "wb"))

    def save(self, data: bytes) -> None:
        """Write a whole ``Limiter.snapshot()``."""
        writer = self.begin()
        writer.write(data)
        writer.commit()


class SnapshotWriter:
    """A snapshot file being written (to a temporary name) in pieces."""

    def __init__(self, path: Path, tmp: Path, out: BinaryIO) -> None:
        self.path = path
        self.tmp = tmp
        self.out = out

    def write(self, data: bytes) -> None:
        self.out.write(data)

    def commit(self) -> None:
        try:
            self.out.flush()
            os.fsync(self.out.fileno())
            self.out.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abandon()
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def abandon(self) -> None:
        self.out.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def next_incarnation(previous_replica_id: str | None, *others: str) -> str:
    """One above the highest incarnation named (the snapshot's, the log's writers'),
    or the start time (ms) when none is known."""
    numbers = [
        int(last)
        for rid in (previous_replica_id, *others)
        if rid and (last := rid.rsplit("/", 1)[-1]).isdigit()
    ]
    if numbers:
        return str(max(numbers) + 1)
    return str(time.time_ns() // 1_000_000)


def open_limiter(
    settings: NodeSettings, store: SnapshotFile | None, regions: int = 1
) -> tuple[Limiter, Recovered | None]:
    """The node's limiter: its snapshot and write-ahead log replayed under a new
    incarnation, or fresh; and what the log held (None without a snapshot file)."""
    try:
        return _read_state(settings, store, regions)
    except (OSError, ValueError, msgspec.DecodeError, msgspec.ValidationError) as error:
        raise SystemExit(
            f"{settings.snapshot}: unreadable snapshot or write-ahead log: {error}"
        ) from None


def _read_state(
    settings: NodeSettings, store: SnapshotFile | None, regions: int
) -> tuple[Limiter, Recovered | None]:
    snapshot = None
    previous = None
    if store is not None:
        removed = store.remove_stale()
        if removed:
            print(
                f"bucketmesh: {settings.snapshot}: removed {removed} snapshot(s) a crash "
                "left half-written",
                file=sys.stderr,
                flush=True,
            )
        snapshot = store.read()
        if snapshot is not None:
            previous = msgspec.msgpack.decode(snapshot[0], type=Snapshot).replica_id
    recovered = recover(store.path) if store else None
    if recovered is not None and recovered.torn_bytes:
        print(
            f"bucketmesh: {settings.snapshot}: ignored a torn write-ahead log tail "
            f"({recovered.torn_bytes} bytes)",
            file=sys.stderr,
            flush=True,
        )
    writers = sorted(recovered.writers) if recovered else []
    replica_id = f"{settings.region}/{settings.node}/{next_incarnation(previous, *writers)}"
    if snapshot is not None:
        head, slices = snapshot
        limiter = Limiter.restore(
            head,
            settings.rules,
            replica_id=replica_id,
            max_buckets=settings.max_buckets,
            regions=regions,
        )
        for part in slices:
            limiter.replay(part)
    else:
        limiter = Limiter(
            settings.rules,
            replica_id=replica_id,
            max_buckets=settings.max_buckets,
            regions=regions,
        )
    if recovered is not None:
        replay_into(limiter, recovered)
    return limiter, recovered


class Node:
    """A running node: limiter + Rating API + background work."""

    def __init__(self, settings: NodeSettings, *, sync: SyncView | None = None) -> None:
        self.settings = settings
        self.backend: RedisBackend | None = None
        self.wal: WriteAheadLog | None = None
        self._snapshot_lock = asyncio.Lock()
        if settings.storage == "redis":
            from bucketmesh.storage.redis_backend import RedisBackend

            # The region's state lives in Redis; the limiter is this node's mirror of it.
            self.backend = RedisBackend(settings)
            self.store = None
            self.limiter: Limiter = self.backend.mirror
        else:
            self.store = SnapshotFile(settings.snapshot) if settings.snapshot else None
            self.limiter, _ = open_limiter(settings, self.store, settings.regions)
            if self.store is not None:
                self.wal = WriteAheadLog(self.store.path, self.limiter, settings.durability)
        self.mesh = Mesh(self.limiter, settings.sync) if settings.sync is not None else None
        if self.mesh is None and self.backend is None:
            self.limiter.keep_tombstones = False  # nothing will ever merge into it
        if sync is None:
            sync = self.mesh
        app_settings = {
            "region": settings.region,
            "node": settings.node,
            "cluster_id": settings.cluster_id,
            "admin_token": settings.admin_token,
            "sync": sync,
            "version": settings.version,
            "ready": self.readiness,
        }
        self.app = (
            RatingApp(self.limiter, **app_settings)  # type: ignore[arg-type]
            if self.backend is None
            else self.backend.rating_app(**app_settings)
        )
        if self.mesh is not None:
            self.mesh.install(self.app)
        if self.wal is not None:
            self.wal.install(self.app.metrics)
        handler = self.wal.guard(self.app) if self.wal is not None else self.app
        self.server = HttpServer(handler, settings.limits, on_error=self._log_error)
        self.envoy: EnvoyServer | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.stopping = asyncio.Event()
        self.serving = False

    def readiness(self) -> dict[str, str]:
        return {
            "config": "ok",
            "store": "ok" if self.backend is None else self.backend.readiness(),
            "listener": "ok" if self.serving else "not listening",
        }

    @staticmethod
    def _log_error(error: BaseException) -> None:
        print(f"bucketmesh: internal error: {error!r}", file=sys.stderr, flush=True)

    async def start(self) -> None:
        if self.backend is not None:
            await self.backend.start(self.app)
        if self.mesh is not None:
            await self.mesh.pull_at_start()
        await self.server.start(self.settings.host, self.settings.port)
        if self.settings.envoy_listen is not None:
            await self._start_envoy(*self.settings.envoy_listen)
        self.serving = True
        if self.mesh is not None:
            self.mesh.start()
        self.tasks.append(asyncio.create_task(self._sweep()))
        if self.store is not None:
            self.tasks.append(asyncio.create_task(self._snapshots()))

    async def _start_envoy(self, host: str, port: int) -> None:
        # imported here: grpc is only loaded by nodes that serve Envoy
        from bucketmesh.integrations.envoy import EnvoyServer, RateLimitServicer

        self.envoy = EnvoyServer(
            RateLimitServicer(self.limiter, self._durable if self.wal is not None else None),
            host,
            port,
        )
        await self.envoy.start()

    async def _durable(self) -> bool:
        """Wait for the write-ahead log group holding this tick's grants (gRPC answers
        wait like HTTP ones do); False if it could not be written."""
        wal = self.wal
        if wal is None or not wal.journal:
            return True
        mark = Response(200)
        return await wal.after_commit(mark) is mark

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.limiter.expire_step(budget=SWEEP_BUDGET)
            if self.mesh is None:
                # No mesh drains the dirty set: left alone it would grow to one
                # entry per live bucket (about 36 bytes each at a million).
                self.limiter.dirty.clear()
                self.limiter.dirty_rules.clear()

    async def _snapshots(self) -> None:
        while True:
            await asyncio.sleep(self.settings.snapshot_interval_s)
            try:
                await self.save_snapshot()
            except OSError as error:
                # the log keeps every grant meanwhile; the next interval tries again
                print(f"bucketmesh: snapshot failed: {error}", file=sys.stderr, flush=True)

    async def save_snapshot(self) -> None:
        """Rotate the log, write the snapshot in slices, then drop the log it covers."""
        if self.store is None:
            return
        async with self._snapshot_lock:
            loop = asyncio.get_running_loop()
            limiter = self.limiter
            retiring = self.wal.rotate() if self.wal is not None else []
            keys = list(limiter.buckets)
            writer: SnapshotWriter | None = None
            try:
                writer = await loop.run_in_executor(None, self.store.begin)
                writer.write(SNAPSHOT_MAGIC + pack(limiter.snapshot_head()))
                for start in range(0, len(keys), SNAPSHOT_SLICE):
                    part = limiter.snapshot_part(keys[start : start + SNAPSHOT_SLICE])
                    data = pack(_SLICE_ENCODER.encode(part))
                    await loop.run_in_executor(None, writer.write, data)
                await loop.run_in_executor(None, writer.commit)
            except BaseException:
                if writer is not None:
                    writer.abandon()
                if self.wal is not None:
                    self.wal.keep(retiring)
                raise
            if self.wal is not None:
                self.wal.retire(retiring)

    async def stop(self, grace: float = 10.0) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.envoy is not None:
            await self.envoy.stop(grace)
        await self.server.shutdown(grace)
        self.serving = False
        if self.mesh is not None:
            await self.mesh.stop()
        if self.backend is not None:
            await self.backend.stop()
        if self.store is not None:
            await self.save_snapshot()
        if self.wal is not None:
            self.wal.close()

    async def run(self, on_ready: Callable[[Node], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.start()
        if on_ready is not None:
            on_ready(self)
        await self.stopping.wait()
        await self.stop()


def run_node(settings: NodeSettings, on_ready: Callable[[Node], None] | None = None) -> None:
    """Run a node until SIGTERM/SIGINT, on uvloop when available."""

    async def main() -> None:
        await Node(settings).run(on_ready)

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        asyncio.run(main())
    else:
        uvloop.run(main())
