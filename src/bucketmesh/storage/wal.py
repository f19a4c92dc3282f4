"""The memory backend's write-ahead log: segments on disk, group commit, replay.

A snapshot alone loses every grant made after it when the process dies; the
log closes that gap for this node's *own* consumption (peers hold, and send
back at start-up, what they were told). Files sit beside the snapshot:
``<snapshot>.wal.<seq>``. Each segment is a sequence of frames
``[length u32][crc32 u32][msgpack DeltaBatch]``; a frame holds one group —
this replica's own ``used`` entry, ``base`` and ``config`` of every bucket
granted (or reconfigured) since the previous group, and the rules changed.
These are absolute values, so replay is a max-merge (``Limiter.replay``):
order, duplicates and groups already inside the snapshot do no harm. The
first frame of a segment names the incarnation that writes it, so the next
start never reuses an incarnation that may have spent tokens.

Group commit, per ``durability``:

The log is a commit barrier (``barrier``): a front door that answered a grant (or
that is about to replay one while grants are uncommitted) awaits the barrier's
future before its response leaves; at the end of the event-loop tick
(``call_soon``) every grant of the tick is written in one frame, then:

``relaxed``
    the futures resolve True as soon as write(2) returns: no response leaves the
    process before its grant is in the OS page cache, so a kill -9 (or any
    crash of the process) loses no granted token. Power loss or a kernel crash
    can lose what the OS had not yet written back.
``strict``
    the frame is fsynced in a helper thread and the futures resolve when the
    fsync returns. Grants made while an fsync is in flight form the next
    group. Survives power loss.

A group that cannot be written (or fsynced) resolves its futures False: the
front door withdraws the answer (503, "not durable") and forgets any answer it
cached for an Idempotency-Key retry; the tokens stay spent in memory.

A bare future per request (no task) and one write per tick cost less than a
write(2) per request did (``benchmarks/durability.py``).

Rotation: a snapshot first starts a new segment (``rotate``), then encodes the
buckets; once the snapshot file is durably replaced, the older segments are
deleted (``retire``). Every grant is thus in the snapshot or in a segment
still on disk.

Recovery (``recover``) reads every frame of every segment. A damaged frame that
valid frames follow is skipped: the reader finds the next frame (where the
damaged one says it ends, else where a payload's first bytes next appear) and
reads on, and the skipped bytes are reported; since frames hold absolute values,
what is lost is only what that one group alone held. Bytes at the end of a
segment that hold no frame are ignored when they are shaped like a write cut
short (by a crash, a power loss, or a full disk: in strict mode nobody was
answered for them); a whole frame that fails its check with nothing readable
after it is damage, and stops the node (``DamagedLog``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final, Literal, get_args

import msgspec

from bucketmesh.core.limiter import DeltaBatch, Limiter
from bucketmesh.telemetry.log import logger
from bucketmesh.telemetry.metrics import NodeMetrics

log = logger("wal")

# The durability levels, defined once (config, flags and the log read them here).
Durability = Literal["relaxed", "strict"]
DURABILITIES: Final[tuple[str, ...]] = get_args(Durability)
_FRAME: Final = struct.Struct("<II")
_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(DeltaBatch)


def pack(payload: bytes) -> bytes:
    """One frame: length, crc32, payload."""
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def frame(batch: DeltaBatch) -> bytes:
    return pack(_ENCODER.encode(batch))


def unpack_stream(stream: BinaryIO) -> Iterator[bytes]:
    """The payloads of the frames in ``stream``, read one at a time; ValueError on a
    torn or corrupt frame (for files replaced atomically, where that means damage)."""
    while head := stream.read(_FRAME.size):
        if len(head) < _FRAME.size:
            raise ValueError("truncated frame header")
        length, crc = _FRAME.unpack(head)
        payload = stream.read(length)
        if len(payload) < length or zlib.crc32(payload) != crc:
            raise ValueError("torn or corrupt frame")
        yield payload


class DamagedLog(ValueError):
    """A segment holds damage that nothing readable follows and that is not shaped
    like a write a crash cut short: what it held cannot be counted."""


@dataclass
class SegmentRead:
    """What one segment's bytes hold: the groups of its valid frames, the damaged
    stretches read past (offset, length: valid frames follow each), and the tail
    (offset, length) if the segment ends in bytes that hold no frame, with whether
    that tail is shaped like a write cut short (``tail_torn``)."""

    batches: list[DeltaBatch]
    skipped: list[tuple[int, int]]
    tail: tuple[int, int] | None = None
    tail_torn: bool = True


def _frame_at(data: bytes, offset: int) -> tuple[DeltaBatch, int] | None:
    """The group of the whole, valid frame that starts at ``offset``, and where that
    frame ends; None if none starts there."""
    start = offset + _FRAME.size
    if start > len(data):
        return None
    length, crc = _FRAME.unpack_from(data, offset)
    end = start + length
    payload = memoryview(data)[start:end]
    if end > len(data) or zlib.crc32(payload) != crc:
        return None
    try:
        return _DECODER.decode(payload), end
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _payload_head(origin: str) -> bytes:
    """The bytes a group's payload starts with: its array header and its origin."""
    whole = _ENCODER.encode(DeltaBatch(origin, []))
    return whole[: len(whole) - len(_ENCODER.encode([])) - len(_ENCODER.encode({}))]


_ARRAY_HEAD: Final = _payload_head("")[:1]


def _resync(data: bytes, offset: int, origin: str | None) -> int | None:
    """Where the first whole, valid frame after the bad one at ``offset`` starts, or
    None if no frame follows it.

    Tried first where the bad frame's header says it ends (the damage was inside its
    payload, and nothing in that payload is taken for a frame); then, the length
    itself being damaged, at every later place a payload's first bytes appear: the
    segment's writer's name (one writer per segment) where it is known, else the
    array header of any group.
    """
    size = len(data)
    if offset + _FRAME.size <= size:
        length: int = _FRAME.unpack_from(data, offset)[0]
        end = offset + _FRAME.size + length
        if end < size and _frame_at(data, end) is not None:
            return end
    heads = [_payload_head(origin), _ARRAY_HEAD] if origin is not None else [_ARRAY_HEAD]
    for head in heads:
        at = data.find(head, offset + 1 + _FRAME.size)
        while at >= 0:
            if _frame_at(data, at - _FRAME.size) is not None:
                return at - _FRAME.size
            at = data.find(head, at + 1)
    return None


def _cut_short(data: bytes, offset: int) -> bool:
    """Whether the bytes from ``offset`` to the end are shaped like a write cut short:
    less than a header, a frame that claims more bytes than there are, or bytes that
    end in zeros (a file grown by a write whose data never reached the disk). A whole
    frame that fails its check is not: a valid frame's payload never ends in 0."""
    if len(data) - offset < _FRAME.size:
        return True
    length, _ = _FRAME.unpack_from(data, offset)
    return offset + _FRAME.size + length > len(data) or data[-1] == 0


def read_segment(data: bytes) -> SegmentRead:
    """Every whole, valid frame in a segment's bytes, reading on past damage: frames
    hold absolute values, so what follows a damaged frame is as good as ever."""
    read = SegmentRead([], [])
    offset = 0
    size = len(data)
    origin: str | None = None
    while offset < size:
        found = _frame_at(data, offset)
        if found is not None:
            batch, offset = found
            read.batches.append(batch)
            origin = batch.origin
            continue
        resumed = _resync(data, offset, origin)
        if resumed is None:
            read.tail = (offset, size - offset)
            read.tail_torn = _cut_short(data, offset)
            break
        read.skipped.append((offset, resumed - offset))
        offset = resumed
    return read


def segments(snapshot: str | Path) -> list[tuple[int, Path]]:
    """The log segments of ``snapshot``, oldest first."""
    snapshot = Path(snapshot)
    prefix = snapshot.name + ".wal."
    found = []
    if snapshot.parent.is_dir():
        for path in snapshot.parent.iterdir():
            suffix = path.name[len(prefix) :]
            if path.name.startswith(prefix) and suffix.isdigit():
                found.append((int(suffix), path))
    return sorted(found)


@dataclass
class Unread:
    """Bytes of a segment file that hold no readable frame."""

    path: Path
    offset: int
    length: int


@dataclass
class Recovered:
    """What the segments on disk hold: their groups, the incarnations that wrote them,
    the damaged stretches read past (``skipped``) and the torn tails ignored."""

    batches: list[DeltaBatch]
    writers: set[str]
    skipped: list[Unread] = field(default_factory=list)
    torn: list[Unread] = field(default_factory=list)

    @property
    def torn_bytes(self) -> int:
        return sum(tail.length for tail in self.torn)

    @property
    def skipped_bytes(self) -> int:
        return sum(stretch.length for stretch in self.skipped)


def recover(snapshot: str | Path) -> Recovered:
    """Every group in the log segments of ``snapshot``, oldest segment first.

    Damage that valid frames follow is read past and reported (``skipped``). Bytes at
    the end of a segment that hold no frame are ignored (``torn``) if they are shaped
    like a write cut short, which a crash, a power loss or a full disk can leave at
    the end of any segment. A whole frame that fails its check with nothing readable
    after it is damage, not a torn write: DamagedLog names the file and the offset,
    and the node must not start on a state that forgot what that frame held.
    """
    recovered = Recovered([], set())
    for _, path in segments(snapshot):
        read = read_segment(path.read_bytes())
        recovered.batches.extend(read.batches)
        recovered.skipped.extend(Unread(path, at, n) for at, n in read.skipped)
        if read.tail is None:
            continue
        at, n = read.tail
        if not read.tail_torn:
            raise DamagedLog(
                f"{path}: damaged write-ahead log frame at offset {at} ({n} bytes to "
                "the end of the file, no readable frame after it): the grants it holds "
                "cannot be counted, so the node will not start. If the machine lost "
                "power, or you accept that those grants may be made again, cut the "
                f"damage off (truncate -s {at} {path}) and start again"
            )
        recovered.torn.append(Unread(path, at, n))
    recovered.writers = {batch.origin for batch in recovered.batches}
    return recovered


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Segment:
    """One segment file; ``fd`` is -1 for a previous life's segment (only deleted) and
    once closed. ``size`` is the end of its last whole frame."""

    __slots__ = ("broken", "fd", "path", "size", "syncing")

    def __init__(self, path: Path, fd: int, size: int = 0) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.syncing = False
        self.broken = False  # a partial frame could not be cut off: write no more here

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class WriteAheadLog:
    """This node's log: the open segment, the group being formed, the fsync thread."""

    def __init__(
        self,
        snapshot: str | Path,
        limiter: Limiter,
        durability: str = "relaxed",
    ) -> None:
        """Open a new segment after those on disk (replayed already: ``recover``),
        which the first snapshot's ``retire`` deletes."""
        if durability not in DURABILITIES:
            raise ValueError(f"durability must be relaxed or strict, got {durability!r}")
        self.snapshot = Path(snapshot)
        self.limiter = limiter
        self.journal = limiter.enable_journal()
        self.strict = durability == "strict"
        existing = segments(self.snapshot)
        self.seq = existing[-1][0] + 1 if existing else 1
        self.groups = 0
        self.syncs = 0
        self.write_errors = 0
        #: the last write's error while writes fail (None once one succeeds again)
        self.failing: str | None = None
        self._retiring = [_Segment(path, -1) for _, path in existing]
        self._segment = self._open(self.seq)
        self._waiters: list[asyncio.Future[bool]] = []
        self._scheduled = False
        self._syncing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fsync_pool = concurrent.futures.ThreadPoolExecutor(1, "bucketmesh-wal")

    # -- segments --------------------------------------------------------------

    def _open(self, seq: int) -> _Segment:
        """Segment ``seq``, created with its header; on error nothing is left behind."""
        path = self.snapshot.with_name(f"{self.snapshot.name}.wal.{seq}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        header = frame(DeltaBatch(self.limiter.replica_id, []))
        try:
            # The header names the incarnation before it can grant anything; fsynced
            # (file and directory) even when relaxed: once per rotation, and it is
            # what stops a later start from reusing this incarnation.
            _write_all(fd, header)
            os.fsync(fd)
            _fsync_dir(path.parent)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        return _Segment(path, fd, len(header))

    def _switch(self) -> _Segment:
        """Write to a new segment from now on; returns the one written so far, which
        is closed (at once, or when its fsync in flight ends)."""
        segment = self._open(self.seq + 1)
        self.seq += 1
        old, self._segment = self._segment, segment
        if not old.syncing:
            old.close()
        return old

    def rotate(self) -> list[_Segment]:
        """Start a new segment; returns the older ones, to ``retire`` once a snapshot
        taken after this call is durable.

        The group being formed is *not* written here: it goes to the new segment
        with the next commit, which is the one that fsyncs it (strict). Segments
        kept from a snapshot that failed are handed out again without a new
        rotation, so a failing disk does not add a segment per interval.
        """
        if self._retiring:
            retiring, self._retiring = self._retiring, []
            return retiring
        self._retiring.append(self._switch())
        retiring, self._retiring = self._retiring, []
        return retiring

    def retire(self, old: list[_Segment]) -> None:
        """Delete segments a durable snapshot now covers (already closed, or closed
        by the fsync in flight when it ends: see ``_synced``)."""
        for segment in old:
            with contextlib.suppress(FileNotFoundError):
                segment.path.unlink()

    def install(self, metrics: NodeMetrics) -> None:
        """Expose the log's counters on /metrics."""
        metrics.counter(
            "bucketmesh_wal_groups", "Write-ahead log groups written", lambda: self.groups
        )
        metrics.counter(
            "bucketmesh_wal_fsyncs",
            "Write-ahead log fsyncs (durability: strict)",
            lambda: self.syncs,
        )
        metrics.counter(
            "bucketmesh_wal_errors",
            "Write-ahead log writes or fsyncs that failed (their requests got 503)",
            lambda: self.write_errors,
        )

    def keep(self, old: list[_Segment]) -> None:
        """Segments ``rotate`` handed out whose snapshot failed: retire them next time."""
        self._retiring[:0] = old

    def close(self) -> None:
        self.write_pending()
        self._fsync_pool.shutdown(wait=True)
        self._segment.close()

    # -- writing ---------------------------------------------------------------

    def write_pending(self) -> bool:
        """Write the group formed so far (write(2), no fsync); False if that failed.

        A failed write leaves the segment as it was (a partial frame is cut off,
        or, if even that fails, later groups go to a new segment) and puts the
        group back, so the next write carries it: no later group is ever
        written behind a torn frame, where recovery would not read it.
        """
        batch = self.limiter.collect_journal()
        if batch is None:
            return True
        try:
            data = frame(batch)
        except (msgspec.EncodeError, OverflowError, ValueError) as error:
            # A bug, not the disk: the group cannot be encoded. Its waiters get False
            # (503, nothing hangs), it is counted and shown in /readyz; putting it back
            # would fail the same way at every later write.
            self.write_errors += 1
            self.failing = f"a group could not be encoded: {error!r}"
            log.error("write-ahead log: %s", self.failing, exc_info=error)
            return False
        segment = self._segment
        try:
            if segment.broken:
                self._retiring.append(self._switch())  # its whole frames stay readable
                segment = self._segment
            _write_all(segment.fd, data)
        except OSError as error:
            self.write_errors += 1
            self.failing = str(error)
            log.error("write-ahead log: %s", error)
            self.journal.keys.update(d.key for d in batch.deltas)
            self.journal.rules.update(batch.rules)
            if not segment.broken:
                try:
                    os.ftruncate(segment.fd, segment.size)
                except OSError:
                    segment.broken = True
            return False
        segment.size += len(data)
        self.groups += 1
        self.failing = None
        return True

    def readiness(self) -> str:
        """``ok``, or why the last write failed (its requests got 503): not ready
        until a write succeeds again."""
        return "ok" if self.failing is None else f"write-ahead log failing: {self.failing}"

    def barrier(self) -> asyncio.Future[bool] | None:
        """None when every grant made so far is as durable as promised; else a future
        that resolves True once it is, or False if its group could not be written.

        While an fsync is in flight a barrier is needed even with nothing new to
        write: the caller may be about to replay an answer granted in that group."""
        if not self.journal and not self._syncing:
            return None
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        # A bare future, not a task: the HTTP server awaits it at no per-request cost
        # beyond the future itself.
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(waiter)
        if not self._scheduled and not self._syncing:
            self._scheduled = True
            loop.call_soon(self._commit)
        return waiter

    def _commit(self) -> None:
        """End of tick: write this tick's group; strict: fsync it in the helper thread."""
        self._scheduled = False
        try:
            written = self.write_pending()
        except Exception as error:  # never leave a waiter (a PATCH, a grant) hanging
            self.write_errors += 1
            self.failing = repr(error)
            log.error("write-ahead log: a group could not be written", exc_info=error)
            written = False
        waiters, self._waiters = self._waiters, []
        if not waiters:
            return
        if not written:
            _resolve(waiters, False)
            return
        if not self.strict:
            _resolve(waiters, True)
            return
        assert self._loop is not None
        segment = self._segment
        segment.syncing = self._syncing = True
        done = self._loop.run_in_executor(self._fsync_pool, os.fsync, segment.fd)
        done.add_done_callback(lambda future: self._synced(waiters, segment, future))

    def _synced(
        self,
        waiters: list[asyncio.Future[bool]],
        segment: _Segment,
        future: asyncio.Future[None],
    ) -> None:
        segment.syncing = self._syncing = False
        error = future.exception()
        if error is not None:
            self.write_errors += 1
            self.failing = str(error)
            log.error("write-ahead log fsync: %s", error)
            _resolve(waiters, False)
        else:
            self.syncs += 1
            _resolve(waiters, True)
        if segment is not self._segment:
            segment.close()  # rotated away while this fsync ran
        if self._waiters and not self._scheduled:
            self._commit()  # what queued up during the fsync is the next group


def _resolve(waiters: list[asyncio.Future[bool]], durable: bool) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(durable)


def replay_into(limiter: Limiter, recovered: Recovered) -> None:
    for batch in recovered.batches:
        limiter.replay(batch)


__all__ = [
    "DURABILITIES",
    "DamagedLog",
    "Recovered",
    "SegmentRead",
    "Unread",
    "WriteAheadLog",
    "frame",
    "pack",
    "read_segment",
    "recover",
    "replay_into",
    "unpack_stream",
]
