"""The embedded store (``storage.backend: memory``): the limiter in this process,
with its snapshot file and write-ahead log when ``storage.snapshot`` is set.

Start-up (``MemoryStore.open``): the snapshot is read (in slices) and the log
replayed over it under a *new* incarnation, one above every incarnation the
snapshot or the log names, so a restarted node never reuses a ``used`` counter
its previous life advanced past what was recorded. Decisions are the limiter's,
answered at once; ``commit`` is the log's barrier (see ``wal.py``), which every
front door awaits before a grant's answer leaves the process.

Restart with many buckets (format-3 snapshots, ``snapshot.py``): only the head and
the write-ahead log are read before serving; each partition's buckets are built
(its snapshot frame, then its log entries, in log order) when a key of it is first
asked for, or by the background task ``finish_restore``. Every door on a key
restores the key's partition first (``Restoring.ensure``); everything that walks
all buckets waits for (or finishes) the whole restore: ``full_state`` (what the
mesh sends), snapshots, rule-wide changes. So no key is ever answered from a state
it has not recovered, and nothing spent is granted again.

The state files belong to one process: ``StateLock`` holds an exclusive ``flock``
on ``<snapshot>.lock`` from before the files are read until the store is closed
(or the process dies), and a second process on the same path refuses to start,
naming the holder the lock file records. Two nodes on one path would each delete
the other's log segments at their next snapshot.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from bucketmesh.core.bucket import Bucket, BucketConfig, BucketDelta, Decision
from bucketmesh.core.decisions import Ask
from bucketmesh.core.limiter import DeltaBatch, Limiter, Snapshot
from bucketmesh.core.rules import Rule
from bucketmesh.storage.snapshot import (
    PARTITIONED_MAGIC,
    Partitioned,
    SnapshotFile,
    SnapshotWriter,
    decode_part,
    partition_count,
    partition_of,
    slice_frame,
)
from bucketmesh.storage.wal import (
    DamagedLog,
    Recovered,
    WriteAheadLog,
    pack,
    recover,
    replay_into,
)
from bucketmesh.telemetry.log import logger
from bucketmesh.telemetry.metrics import NodeMetrics

log = logger("storage")


class UnreadableState(Exception):
    """The snapshot or the write-ahead log cannot be read: the node must not start."""


class StateLocked(UnreadableState):
    """Another process holds the state files: the node must not start."""


class StateLock:
    """An exclusive, non-blocking ``flock`` on ``<snapshot>.lock``, which names its holder.

    Held while the store is open; the kernel drops it when the process dies, however
    it dies, so a crash leaves nothing to clean up (the file stays, unlocked).
    """

    def __init__(self, snapshot: Path, holder: str) -> None:
        self.path = snapshot.with_name(snapshot.name + ".lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            said = os.pread(fd, 512, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StateLocked(
                f"{snapshot}: in use by {said or 'another process (not named yet)'}, which "
                f"holds {self.path}: two nodes must not share a storage.snapshot path "
                "(each would delete the other's write-ahead log); give this node a path "
                "of its own, or stop the other one"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # who holds it, for the next process that finds it taken
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{holder}\n".encode(), 0)
        except OSError as error:  # a full disk: the lock holds all the same, unnamed
            log.warning("%s: could not name the holder: %s", self.path, error)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the file drops the lock
            self.fd = -1


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


class Restoring:
    """The partitions of a format-3 snapshot not restored yet, with the log's entries
    for their keys: ``ensure(key)`` builds the key's partition's buckets if it is one
    of them; ``restore_all`` builds the rest.

    Memory: a partition's frame is decoded, its buckets built, and the decoded batch
    and the frame's view dropped at once; the pages of the mapped file that decoding
    read are let go every ``RELEASE_EVERY`` partitions (``release``), so the process
    holds the buckets built and at most a few hundred kB of the file, never the file
    beside them (``tests/test_restart_memory.py`` counts both)."""

    #: partitions built between two releases of the mapped file's pages (~200 buckets
    #: and ~50 kB of file each)
    RELEASE_EVERY = 32

    def __init__(
        self,
        limiter: Limiter,
        parts: list[memoryview],
        log: list[list[DeltaBatch]],
        release: Callable[[], None] | None = None,
    ) -> None:
        self.limiter = limiter
        self.count = len(parts)
        # views of the mapped snapshot file (unmapped once the last is released)
        self.parts: list[memoryview | None] = list(parts)
        self.log = log  # per partition: its keys' log entries, in log order
        self.left = self.count
        self.next = 0  # the background restore's place
        self.on_done: Callable[[], None] | None = None
        #: lets go of the mapped file's resident pages (None: nothing mapped)
        self.release = release
        self.built_since_release = 0

    @property
    def done(self) -> bool:
        return self.left == 0

    def ensure(self, key: str) -> None:
        index = partition_of(key, self.count)
        if self.parts[index] is not None:
            self.restore(index)

    def restore(self, index: int) -> None:
        """Build partition ``index``: the snapshot's buckets, then the log's entries,
        then the file's rules and this replica's shares applied to them, as a whole
        restore does (``_read_state``)."""
        payload = self.parts[index]
        if payload is None:
            return
        self.parts[index] = None
        limiter = self.limiter
        batch = decode_part(payload)
        payload.release()
        limiter.replay(batch)
        keys = [delta.key for delta in batch.deltas]
        for logged in self.log[index]:
            limiter.replay(logged)
            keys.extend(delta.key for delta in logged.deltas)
        self.log[index] = []
        # stamp_file_rules and rescale_shares walk ``limiter.buckets``: here, only the
        # buckets just built (the rules were stamped before serving; this only
        # moves these buckets onto them)
        everything = limiter.buckets
        limiter.buckets = {key: everything[key] for key in keys if key in everything}
        try:
            limiter.stamp_file_rules()
            limiter.rescale_shares()
        finally:
            limiter.buckets = everything
        self.left -= 1
        self.built_since_release += 1
        if self.built_since_release >= self.RELEASE_EVERY or self.done:
            self._release_pages()
        if self.done and self.on_done is not None:
            self.on_done()

    def _release_pages(self) -> None:
        self.built_since_release = 0
        release = self.release
        if release is not None:
            release()
            if self.done:
                self.release = None  # the mapping closes with its last view

    def restore_all(self) -> None:
        for index in range(self.count):
            self.restore(index)
        self.left = 0
        self._release_pages()
        if self.on_done is not None:
            self.on_done()

    def step(self, budget: int = 8) -> bool:
        """Build up to ``budget`` more partitions; True once every one is built."""
        while budget > 0 and self.next < self.count:
            if self.parts[self.next] is not None:
                self.restore(self.next)
                budget -= 1
            self.next += 1
        if self.next >= self.count and not self.done:
            self.restore_all()
        return self.done


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
    limiter, recovered, restoring = open_lazily(
        rules,
        region=region,
        node=node,
        snapshot=snapshot,
        max_buckets=max_buckets,
        regions=regions,
    )
    if restoring is not None:
        restoring.restore_all()
    return limiter, recovered


def open_lazily(
    rules: Sequence[Rule],
    *,
    region: str,
    node: str,
    snapshot: SnapshotFile | None,
    max_buckets: int = 1_000_000,
    regions: int = 1,
) -> tuple[Limiter, Recovered | None, Restoring | None]:
    """``open_limiter``, but a format-3 snapshot's partitions are left to restore
    (the ``Restoring``, None when everything is built)."""
    try:
        return _read_state(rules, region, node, snapshot, max_buckets, regions)
    except DamagedLog as error:
        raise UnreadableState(str(error)) from None
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
) -> tuple[Limiter, Recovered | None, Restoring | None]:
    snapshot = None
    partitioned = None
    previous = None
    if store is not None:
        removed = store.remove_stale()
        if removed:
            log.warning("%s: removed %d snapshot(s) a crash left half-written", store.path, removed)
        read = store.read_partitioned()
        if isinstance(read, Partitioned):
            partitioned = read
            previous = msgspec.msgpack.decode(read.head, type=Snapshot).replica_id
        elif read is not None:
            snapshot = read
            previous = msgspec.msgpack.decode(snapshot[0], type=Snapshot).replica_id
    recovered = recover(store.path) if store else None
    if recovered is not None:
        for damage in recovered.skipped:
            log.warning(
                "%s: skipped %d damaged bytes of the write-ahead log at offset %d and read "
                "on from the next whole frame (what only the damaged group held is lost)",
                damage.path,
                damage.length,
                damage.offset,
            )
        for tail in recovered.torn:
            log.warning(
                "%s: ignored a torn write-ahead log tail (%d bytes at offset %d)",
                tail.path,
                tail.length,
                tail.offset,
            )
    writers = sorted(recovered.writers) if recovered else []
    replica_id = f"{region}/{node}/{next_incarnation(previous, *writers)}"
    if partitioned is not None:
        limiter = Limiter.restore(
            partitioned.head,
            rules,
            replica_id=replica_id,
            max_buckets=max_buckets,
            regions=regions,
        )
        limiter.hlc.observe(partitioned.hlc)  # versions in partitions not built yet
        count = len(partitioned.parts)
        logged: list[list[DeltaBatch]] = [[] for _ in range(count)]
        for batch in recovered.batches if recovered is not None else []:
            if batch.rules:  # rule-level changes now, before any bucket exists
                limiter.replay(DeltaBatch(batch.origin, [], batch.rules))
            by_part: dict[int, list[BucketDelta]] = {}
            for delta in batch.deltas:
                by_part.setdefault(partition_of(delta.key, count), []).append(delta)
            for index, deltas in by_part.items():
                logged[index].append(DeltaBatch(batch.origin, deltas))
        changed = limiter.stamp_file_rules()
        limiter.rescale_shares()
        if changed:
            log.info("rules changed in the file since the last start: %s", ", ".join(changed))
        restoring = Restoring(limiter, partitioned.parts, logged, partitioned.release_pages)
        return limiter, recovered, (None if restoring.done else restoring)
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
    # The file's rules: an unchanged one keeps the version this node gave it before,
    # a changed one gets a fresh one, and restored buckets follow (docs/design.md).
    changed = limiter.stamp_file_rules()
    limiter.rescale_shares()  # strict shares follow the number of regions
    if changed and snapshot is not None:
        log.info("rules changed in the file since the last start: %s", ", ".join(changed))
    return limiter, recovered, None


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


class _RestoringBuckets(Mapping[str, Bucket]):
    """``limiter.buckets`` as the mesh must see it while partitions are left: a key
    read restores its partition; a walk restores every partition first. Its length
    is what is built (a digest's pacing), not a walk."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def __getitem__(self, key: str) -> Bucket:
        self.store._ensure(key)
        return self.store.limiter.buckets[key]

    def __iter__(self) -> Iterator[str]:
        self.store.finish_restore_now()
        return iter(self.store.limiter.buckets)

    def __len__(self) -> int:
        return len(self.store.limiter.buckets)


class RestoringReplica:
    """The mesh's ``Replica`` while a format-3 snapshot's partitions are left to
    restore: what it sends (the state a peer pulls, full transfers, digests) is never
    a partial state; what it merges joins partitions already restored."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.limiter = store.limiter

    @property
    def replica_id(self) -> str:
        return self.limiter.replica_id

    @property
    def buckets(self) -> Mapping[str, Bucket]:
        if self.store.restoring is None:
            return self.limiter.buckets
        return _RestoringBuckets(self.store)

    @property
    def rule_configs(self) -> Mapping[str, BucketConfig]:
        return self.store.limiter.rule_configs

    @property
    def key_configs(self) -> Mapping[str, BucketConfig]:
        return self.limiter.key_configs

    def collect_deltas(self, limit: int | None = None) -> DeltaBatch:
        return self.limiter.collect_deltas(limit)

    def full_state(self, keys: Iterable[str] | None = None) -> DeltaBatch:
        self.store.finish_restore_now()
        return self.limiter.full_state(keys)

    def merge(self, batch: DeltaBatch, *, now: int | None = None) -> int:
        for delta in batch.deltas:
            self.store._ensure(delta.key)
        return self.limiter.merge(batch, now=now)


class MemoryStore:
    """The embedded store: a ``Limiter`` (the decision seam, answering at once), and,
    with a snapshot path, its snapshot file and write-ahead log."""

    def __init__(
        self,
        limiter: Limiter,
        snapshot: SnapshotFile | None = None,
        durability: str = "relaxed",
        lock: StateLock | None = None,
        restoring: Restoring | None = None,
    ) -> None:
        self.limiter = limiter
        self.snapshot = snapshot
        self.lock = lock
        self.wal = (
            WriteAheadLog(snapshot.path, limiter, durability) if snapshot is not None else None
        )
        self._snapshot_lock = asyncio.Lock()
        #: a snapshot was cancelled (a stop): the next one rotates the log afresh
        self._rotate_afresh = False
        # The decision seam, straight to the limiter (no call in between on the hot path).
        self.acquire = limiter.acquire
        self.acquire_many = limiter.acquire_many
        self.inspect = limiter.inspect
        self.configure = limiter.configure
        self.rule_config = limiter.rule_config
        self.acquire_columns = limiter.acquire_columns
        self.holds = limiter.holds
        self.rule_of = limiter.rule_of
        self.live_buckets = limiter.live_buckets
        self.commit = self.wal.barrier if self.wal is not None else limiter.commit
        limiter.on_acquire_changed = self._rebind
        #: the partitions of the snapshot not restored yet (None: all are)
        self.restoring = restoring
        if restoring is not None:
            restoring.on_done = self._restored
            # every door on a key restores the key first; walks over every bucket
            # (the mesh's full state) restore everything first
            self.acquire = self._acquire_restoring  # type: ignore[assignment]
            self.acquire_many = self._acquire_many_restoring  # type: ignore[assignment]
            self.acquire_columns = self._acquire_columns_restoring  # type: ignore[assignment]
            self.inspect = self._inspect_restoring  # type: ignore[assignment]
            self.configure = self._configure_restoring
            self.holds = self._holds_restoring
            self.rule_of = self._rule_of_restoring

    def _rebind(self) -> None:
        """The limiter's recovery gate was set or lifted (``Limiter.begin_recovery``)."""
        if self.restoring is None:
            self.acquire = self.limiter.acquire
        # else _acquire_restoring calls whatever limiter.acquire is now

    # -- while partitions are left to restore ----------------------------------------

    def _restored(self) -> None:
        """Every partition is built: the doors go straight to the limiter again."""
        if self.restoring is None:
            return
        self.restoring = None
        limiter = self.limiter
        self.acquire = limiter.acquire
        self.acquire_many = limiter.acquire_many
        self.inspect = limiter.inspect
        self.configure = limiter.configure
        self.holds = limiter.holds
        self.acquire_columns = limiter.acquire_columns
        self.rule_of = limiter.rule_of
        log.info("restore finished: %d buckets", len(limiter))

    def _ensure(self, key: str) -> None:
        restoring = self.restoring
        if restoring is not None:
            restoring.ensure(key)

    def _acquire_restoring(self, key: str, tokens: int = 1, *, rule: str | None = None) -> Decision:
        self._ensure(key)
        return self.limiter.acquire(key, tokens, rule=rule)

    def _acquire_many_restoring(
        self, asks: Sequence[Ask], *, atomic: bool = False
    ) -> list[Decision]:
        for ask in asks:
            self._ensure(ask.key)
        return self.limiter.acquire_many(asks, atomic=atomic)

    def _acquire_columns_restoring(self, items: Sequence[Any]) -> None:
        """While restoring, batches take ``acquire_many`` (which restores their keys)."""
        return None

    def _inspect_restoring(self, key: str, *, rule: str | None = None) -> Bucket:
        self._ensure(key)
        return self.limiter.inspect(key, rule=rule)

    def _configure_restoring(self, key_or_rule: str, **changes: Any) -> BucketConfig:
        if key_or_rule in self.limiter.rules_by_name:
            self.finish_restore_now()  # a rule-wide change walks every bucket
        else:
            self._ensure(key_or_rule)
        return self.limiter.configure(key_or_rule, **changes)

    def shadowed(self, rule: str, key: str) -> bool:
        """Shadow mode as the replicated configs say (``Limiter.shadowed``)."""
        return self.limiter.shadowed(rule, key)

    def _holds_restoring(self, key: str) -> bool:
        self._ensure(key)
        return self.limiter.holds(key)

    def _rule_of_restoring(self, key: str) -> str:
        self._ensure(key)
        return self.limiter.rule_of(key)

    def replica(self) -> Limiter | RestoringReplica:
        """What the mesh replicates: the limiter, or while partitions are left to
        restore, a view of it that restores what the mesh reads first."""
        return RestoringReplica(self) if self.restoring is not None else self.limiter

    def finish_restore_now(self) -> None:
        """Build every partition still left, now (blocking the loop meanwhile)."""
        if self.restoring is not None:
            self.restoring.restore_all()

    async def finish_restore(self) -> None:
        """Build the partitions left, a few at a time, letting requests in between."""
        while self.restoring is not None and not self.restoring.step(budget=1):
            await asyncio.sleep(0)

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
        """The store as the last life of this node left it (see the module docstring).
        Raises UnreadableState for damaged state files, StateLocked if another process
        holds them."""
        if not snapshot:
            limiter, _ = open_limiter(
                rules,
                region=region,
                node=node,
                snapshot=None,
                max_buckets=max_buckets,
                regions=regions,
            )
            return cls(limiter)
        file = SnapshotFile(str(snapshot))
        holder = f"pid {os.getpid()} ({region}/{node} on host {socket.gethostname()})"
        try:
            lock = StateLock(file.path, holder)
        except OSError as error:
            raise UnreadableState(f"{file.path}: cannot lock the state files: {error}") from None
        try:
            limiter, _, restoring = open_lazily(
                rules,
                region=region,
                node=node,
                snapshot=file,
                max_buckets=max_buckets,
                regions=regions,
            )
            try:
                return cls(limiter, file, durability, lock, restoring)
            except OSError as error:
                raise UnreadableState(
                    f"{file.path}: cannot open a write-ahead log segment: {error}"
                ) from None
        except BaseException:
            lock.release()
            raise

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
            await self.finish_restore()  # what is not built yet is in no bucket
            loop = asyncio.get_running_loop()
            limiter = self.limiter
            retiring = self.wal.rotate() if self.wal is not None else []
            if self._rotate_afresh and self.wal is not None:
                # The segments a cancelled snapshot kept come back without a new
                # rotation (``rotate``: so a failing disk adds no segment per
                # interval), which would leave the segment it began, every grant
                # since, to replay at the next start, decoded (~1 kB a grant) until
                # its partition is built. A cancellation is no failing disk: this
                # snapshot covers that segment too.
                retiring += self.wal.rotate()
                self._rotate_afresh = False
            writer: SnapshotWriter | None = None
            try:
                # (inside the try: a cancellation here keeps the segments rotated out,
                # which otherwise nothing would ever retire)
                keys = list(limiter.buckets)
                count = partition_count(len(keys))
                parts: list[list[str]] = [[] for _ in range(count)]
                for start in range(0, len(keys), 50_000):  # a million keys: about 0.3 s
                    for key in keys[start : start + 50_000]:
                        parts[partition_of(key, count)].append(key)
                    await asyncio.sleep(0)
                writer = await loop.run_in_executor(None, self.snapshot.begin)
                index = msgspec.msgpack.encode((count,))
                writer.write(PARTITIONED_MAGIC + pack(limiter.snapshot_head()) + pack(index))
                for part in parts:
                    data = slice_frame(limiter.snapshot_part(part))
                    await loop.run_in_executor(None, writer.write, data)
                # what a version in the partitions may be up to (written after the head)
                writer.write(pack(msgspec.msgpack.encode((limiter.hlc.last,))))
                await loop.run_in_executor(None, writer.commit)
            except BaseException as error:
                if writer is not None:
                    writer.abandon()
                if self.wal is not None:
                    self.wal.keep(retiring)
                    if isinstance(error, asyncio.CancelledError):
                        self._rotate_afresh = True
                raise
            if self.wal is not None:
                self.wal.retire(retiring)

    def close(self) -> None:
        try:
            if self.wal is not None:
                self.wal.close()
        finally:
            if self.lock is not None:
                self.lock.release()
