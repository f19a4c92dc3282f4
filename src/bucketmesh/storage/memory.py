"""The embedded store (``storage.backend: memory``): the limiter in this process,
with its snapshot file and write-ahead log when ``storage.snapshot`` is set.

Start-up (``MemoryStore.open``): the snapshot is read (in slices) and the log
replayed over it under a *new* incarnation, one above every incarnation the
snapshot or the log names, so a restarted node never reuses a ``used`` counter
its previous life advanced past what was recorded. Decisions are the limiter's,
answered at once; ``commit`` is the log's barrier (see ``wal.py``), which every
front door awaits before a grant's answer leaves the process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from bucketmesh.core.limiter import Limiter, Snapshot
from bucketmesh.core.rules import Rule
from bucketmesh.storage.snapshot import (
    SNAPSHOT_MAGIC,
    SNAPSHOT_SLICE,
    SnapshotFile,
    SnapshotWriter,
    slice_frame,
)
from bucketmesh.storage.wal import Recovered, WriteAheadLog, pack, recover, replay_into
from bucketmesh.telemetry.log import logger
from bucketmesh.telemetry.metrics import NodeMetrics

log = logger("storage")


class UnreadableState(Exception):
    """The snapshot or the write-ahead log cannot be read: the node must not start."""


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
    rules: Sequence[Rule],
    *,
    region: str,
    node: str,
    snapshot: SnapshotFile | None,
    max_buckets: int = 1_000_000,
    regions: int = 1,
) -> tuple[Limiter, Recovered | None]:
    """The node's limiter: its snapshot and write-ahead log replayed under a new
    incarnation, or fresh; and what the log held (None without a snapshot file).
    Raises UnreadableState for a damaged snapshot or log."""
    try:
        return _read_state(rules, region, node, snapshot, max_buckets, regions)
    except (OSError, ValueError, msgspec.DecodeError, msgspec.ValidationError) as error:
        where = snapshot.path if snapshot is not None else "state"
        raise UnreadableState(f"{where}: unreadable snapshot or write-ahead log: {error}") from None


def _read_state(
    rules: Sequence[Rule],
    region: str,
    node: str,
    store: SnapshotFile | None,
    max_buckets: int,
    regions: int,
) -> tuple[Limiter, Recovered | None]:
    snapshot = None
    previous = None
    if store is not None:
        removed = store.remove_stale()
        if removed:
            log.warning("%s: removed %d snapshot(s) a crash left half-written", store.path, removed)
        snapshot = store.read()
        if snapshot is not None:
            previous = msgspec.msgpack.decode(snapshot[0], type=Snapshot).replica_id
    recovered = recover(store.path) if store else None
    if store is not None and recovered is not None and recovered.torn_bytes:
        log.warning(
            "%s: ignored a torn write-ahead log tail (%d bytes)", store.path, recovered.torn_bytes
        )
    writers = sorted(recovered.writers) if recovered else []
    replica_id = f"{region}/{node}/{next_incarnation(previous, *writers)}"
    if snapshot is not None:
        head, slices = snapshot
        limiter = Limiter.restore(
            head, rules, replica_id=replica_id, max_buckets=max_buckets, regions=regions
        )
        for part in slices:
            limiter.replay(part)
    else:
        limiter = Limiter(rules, replica_id=replica_id, max_buckets=max_buckets, regions=regions)
    if recovered is not None:
        replay_into(limiter, recovered)
    return limiter, recovered


def install_limiter_metrics(metrics: NodeMetrics, limiter: Limiter) -> None:
    """The live buckets of a node's in-memory replica (its limiter, or a Redis node's
    mirror) on /metrics: count, cap, expiries, refusals at the cap."""
    metrics.gauge("bucketmesh_live_buckets", "Buckets held in memory", lambda: len(limiter))
    metrics.gauge(
        "bucketmesh_bucket_cap", "Configured cap on live buckets", lambda: limiter.max_buckets
    )
    metrics.counter(
        "bucketmesh_expired_buckets",
        "Idle buckets dropped after their ttl",
        lambda: limiter.expired_total,
    )
    metrics.counter(
        "bucketmesh_bucket_cap_rejections",
        "New keys refused because the live-bucket cap was reached",
        lambda: limiter.cap_rejections,
    )


class MemoryStore:
    """The embedded store: a ``Limiter`` (the decision seam, answering at once), and,
    with a snapshot path, its snapshot file and write-ahead log."""

    def __init__(
        self,
        limiter: Limiter,
        snapshot: SnapshotFile | None = None,
        durability: str = "relaxed",
    ) -> None:
        self.limiter = limiter
        self.snapshot = snapshot
        self.wal = (
            WriteAheadLog(snapshot.path, limiter, durability) if snapshot is not None else None
        )
        self._snapshot_lock = asyncio.Lock()
        # The decision seam, straight to the limiter (no call in between on the hot path).
        self.acquire = limiter.acquire
        self.acquire_many = limiter.acquire_many
        self.inspect = limiter.inspect
        self.configure = limiter.configure
        self.rule_config = limiter.rule_config
        self.holds = limiter.holds
        self.rule_of = limiter.rule_of
        self.live_buckets = limiter.live_buckets
        self.commit = self.wal.barrier if self.wal is not None else limiter.commit

    @classmethod
    def open(
        cls,
        rules: Sequence[Rule],
        *,
        region: str,
        node: str,
        snapshot: str | Path | None,
        durability: str = "relaxed",
        max_buckets: int = 1_000_000,
        regions: int = 1,
    ) -> MemoryStore:
        """The store as the last life of this node left it (see the module docstring)."""
        file = SnapshotFile(str(snapshot)) if snapshot else None
        limiter, _ = open_limiter(
            rules, region=region, node=node, snapshot=file, max_buckets=max_buckets, regions=regions
        )
        return cls(limiter, file, durability)

    # -- the decision seam's read-only parts ----------------------------------------

    @property
    def replica_id(self) -> str:
        return self.limiter.replica_id

    @property
    def clock(self) -> Callable[[], int]:
        return self.limiter.clock

    @property
    def rules(self) -> list[Rule]:
        return self.limiter.rules

    @property
    def rules_by_name(self) -> dict[str, Rule]:
        return self.limiter.rules_by_name

    # -- metrics, snapshots, shutdown ------------------------------------------------

    def install(self, metrics: NodeMetrics) -> None:
        """Expose the store's gauges and counters on /metrics."""
        install_limiter_metrics(metrics, self.limiter)
        if self.wal is not None:
            self.wal.install(metrics)

    async def save_snapshot(self) -> None:
        """Rotate the log, write the snapshot in slices, then drop the log it covers."""
        if self.snapshot is None:
            return
        async with self._snapshot_lock:
            loop = asyncio.get_running_loop()
            limiter = self.limiter
            retiring = self.wal.rotate() if self.wal is not None else []
            keys = list(limiter.buckets)
            writer: SnapshotWriter | None = None
            try:
                writer = await loop.run_in_executor(None, self.snapshot.begin)
                writer.write(SNAPSHOT_MAGIC + pack(limiter.snapshot_head()))
                for start in range(0, len(keys), SNAPSHOT_SLICE):
                    data = slice_frame(limiter.snapshot_part(keys[start : start + SNAPSHOT_SLICE]))
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

    def close(self) -> None:
        if self.wal is not None:
            self.wal.close()
