"""The ``bucketmesh serve`` process: one node of one region.

Owns everything with a side effect around the pure core: the event loop
(uvloop), the HTTP server, the replica's identity and its snapshot file, the
background sweeps, the sync mesh (``mesh.py``) and the signals. Start-up
order: restore the snapshot (under a new incarnation, see below), pull the
full state of every reachable peer region, start listening, start the mesh,
then serve until SIGTERM or SIGINT; shutdown stops accepting, lets in-flight
requests finish, sends what the mesh still has queued, and writes a final
snapshot.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from bucketmesh.app import RatingApp, SyncView
from bucketmesh.http11 import HttpServer, ServerLimits
from bucketmesh.limiter import Limiter, Snapshot
from bucketmesh.mesh import Mesh, MeshSettings
from bucketmesh.rules import Rule

if TYPE_CHECKING:
    from bucketmesh.redis_backend import RedisBackend

SWEEP_INTERVAL_S = 0.25
SWEEP_BUDGET = 20_000


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


class SnapshotFile:
    """The embedded store's snapshot: written whole, fsynced, atomically replaced."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def load(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def save(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".snap-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def next_incarnation(previous_replica_id: str | None) -> str:
    """One above the previous incarnation, or the start time (ms) when unknown."""
    if previous_replica_id:
        last = previous_replica_id.rsplit("/", 1)[-1]
        if last.isdigit():
            return str(int(last) + 1)
    return str(time.time_ns() // 1_000_000)


def open_limiter(settings: NodeSettings, store: SnapshotFile | None, regions: int = 1) -> Limiter:
    """The node's limiter: restored from its snapshot under a new incarnation, or fresh."""
    data = store.load() if store else None
    previous = None
    if data:
        try:
            previous = msgspec.msgpack.decode(data, type=Snapshot).replica_id
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise SystemExit(f"{settings.snapshot}: unreadable snapshot: {error}") from None
    replica_id = f"{settings.region}/{settings.node}/{next_incarnation(previous)}"
    if data:
        return Limiter.restore(
            data,
            settings.rules,
            replica_id=replica_id,
            max_buckets=settings.max_buckets,
            regions=regions,
        )
    return Limiter(
        settings.rules, replica_id=replica_id, max_buckets=settings.max_buckets, regions=regions
    )


class Node:
    """A running node: limiter + Rating API + background work."""

    def __init__(self, settings: NodeSettings, *, sync: SyncView | None = None) -> None:
        self.settings = settings
        self.backend: RedisBackend | None = None
        if settings.storage == "redis":
            from bucketmesh.redis_backend import RedisBackend

            # The region's state lives in Redis; the limiter is this node's mirror of it.
            self.backend = RedisBackend(settings)
            self.store = None
            self.limiter: Limiter = self.backend.mirror
        else:
            self.store = SnapshotFile(settings.snapshot) if settings.snapshot else None
            self.limiter = open_limiter(settings, self.store, settings.regions)
        self.mesh = Mesh(self.limiter, settings.sync) if settings.sync is not None else None
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
        self.server = HttpServer(self.app, settings.limits, on_error=self._log_error)
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
        self.serving = True
        if self.mesh is not None:
            self.mesh.start()
        self.tasks.append(asyncio.create_task(self._sweep()))
        if self.store is not None:
            self.tasks.append(asyncio.create_task(self._snapshots()))

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.limiter.expire_step(budget=SWEEP_BUDGET)

    async def _snapshots(self) -> None:
        while True:
            await asyncio.sleep(self.settings.snapshot_interval_s)
            await self.save_snapshot()

    async def save_snapshot(self) -> None:
        if self.store is None:
            return
        data = self.limiter.snapshot()
        await asyncio.get_running_loop().run_in_executor(None, self.store.save, data)

    async def stop(self, grace: float = 10.0) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.shutdown(grace)
        self.serving = False
        if self.mesh is not None:
            await self.mesh.stop()
        if self.backend is not None:
            await self.backend.stop()
        if self.store is not None:
            self.store.save(self.limiter.snapshot())

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
