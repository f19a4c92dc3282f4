"""The embedded store's snapshot file: its format, and writing it whole and atomically.

Format 3 (written since issue 19): ``PARTITIONED_MAGIC``, then frames (``wal.pack``:
length, crc32, payload): ``Limiter.snapshot_head()``, then ``[count]`` (msgpack),
then ``count`` frames, frame ``p`` a ``DeltaBatch`` of the buckets whose key is in
partition ``p`` (``partition_of``: crc32 of the key's UTF-8 modulo ``count``), then
``[hlc]``, the writer's clock after the last partition. A
reader can so restore one key's partition without decoding the others: the node
starts serving after reading the head and checking the frames, and builds each
partition's buckets when a key of it is first asked for, or in the background
(``storage/memory.py``, docs/storage.md "Restart").

Read as before: format 2, ``SNAPSHOT_MAGIC`` then the head and ``DeltaBatch``
slices in any order (restored whole before serving), and a file without either
magic, a whole ``Limiter.snapshot()``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

import msgspec

from bucketmesh.core.limiter import DeltaBatch
from bucketmesh.storage.wal import _FRAME, pack, unpack_stream

SNAPSHOT_MAGIC: Final = b"bucketmesh-snapshot-2\n"
SNAPSHOT_SLICE: Final = 5_000
PARTITIONED_MAGIC: Final = b"bucketmesh-snapshot-3\n"
#: about this many buckets per partition: restoring one on a key's first touch
#: costs a few milliseconds
PARTITION_BUCKETS: Final = 200
#: the most of the mapped file the check (crc32) keeps resident at once: the pages
#: read are let go every this many bytes, so a restart's peak resident memory never
#: holds the whole file (a million buckets: ~250 MB) besides what it builds
RELEASE_BYTES: Final = 8 << 20
_SLICE_ENCODER: Final = msgspec.msgpack.Encoder()
_SLICE_DECODER: Final = msgspec.msgpack.Decoder(DeltaBatch)


def partition_of(key: str, count: int) -> int:
    """The partition of ``key`` in a format-3 snapshot of ``count`` partitions."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % count


def partition_count(buckets: int) -> int:
    return max(1, -(-buckets // PARTITION_BUCKETS))


def decode_part(payload: bytes | memoryview) -> DeltaBatch:
    return _SLICE_DECODER.decode(payload)


@dataclass
class Partitioned:
    """A format-3 snapshot as read: the head and each partition's frame, checked
    (crc32) but not decoded."""

    head: bytes
    parts: list[memoryview]  # views of the mapped file
    #: the writer's clock after the last partition: every version in the file is at
    #: most this (the head's clock is read before the partitions are)
    hlc: int
    #: the mapping the views are of (None: not mapped); ``release_pages`` lets go of
    #: the pages decoding has read
    mapped: mmap.mmap | None = None

    def release_pages(self) -> None:
        """Let go of the mapped file's resident pages (``MADV_DONTNEED``: the page
        cache keeps them; a later read faults them back in). Decoded partitions read
        their frames' pages: without this, restoring every partition would leave the
        whole file resident beside the buckets built from it."""
        release_pages(self.mapped)


def release_pages(mapped: mmap.mmap | None, start: int = 0, length: int = 0) -> None:
    """``MADV_DONTNEED`` on ``mapped`` (from ``start``, a multiple of the page size, for
    ``length`` bytes; 0: to the end), where the platform has it."""
    if mapped is None or mapped.closed:
        return
    with contextlib.suppress(AttributeError, OSError, ValueError):  # not on every platform
        if length:
            mapped.madvise(mmap.MADV_DONTNEED, start, length)
        else:
            mapped.madvise(mmap.MADV_DONTNEED, start)


def _mapped_frames(
    data: memoryview, offset: int, mapped: mmap.mmap | None = None
) -> list[memoryview]:
    """The payloads of the frames in ``data`` from ``offset`` on, as views, each
    checked; ValueError on a torn or corrupt frame (as ``wal.unpack_stream``). With
    ``mapped`` (the mapping ``data`` views), the pages checked are let go every
    ``RELEASE_BYTES``."""
    frames = []
    end = len(data)
    header = _FRAME.size
    released = 0  # the pages before this offset were let go
    while offset < end:
        if mapped is not None and offset - released >= RELEASE_BYTES:
            upto = offset - offset % mmap.PAGESIZE
            release_pages(mapped, released, upto - released)
            released = upto
        if end - offset < header:
            raise ValueError("truncated frame header")
        length, crc = _FRAME.unpack_from(data, offset)
        payload = data[offset + header : offset + header + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            raise ValueError("torn or corrupt frame")
        frames.append(payload)
        offset += header + length
    return frames


def slice_frame(part: DeltaBatch) -> bytes:
    """One slice of buckets, framed as the file holds it."""
    return pack(_SLICE_ENCODER.encode(part))


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

    def read_partitioned(self) -> Partitioned | tuple[bytes, Iterator[DeltaBatch]] | None:
        """A format-3 file as ``Partitioned``; an older one as ``read`` gives it; None
        if there is no file. Raises ValueError (or msgspec's errors) for damage.

        The file is mapped, not read: each partition is a view of its frame, checked
        (crc32) here and decoded when it is built. The pages read for the check are
        let go at once (``MADV_DONTNEED``: the page cache keeps them, the process's
        resident memory does not), as they are checked (every ``RELEASE_BYTES``), and
        the mapping closes with the last view."""
        try:
            stream = self.path.open("rb")
        except FileNotFoundError:
            return None
        with stream:
            if stream.read(len(PARTITIONED_MAGIC)) != PARTITIONED_MAGIC:
                return self.read()
            mapped = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            frames = _mapped_frames(memoryview(mapped), len(PARTITIONED_MAGIC), mapped)
            release_pages(mapped)
        except BaseException:
            mapped.close()
            raise
        if len(frames) < 2:
            raise ValueError("no head or partition index frame")
        head, index, *parts = frames
        (count,) = msgspec.msgpack.decode(index, type=tuple[int])
        if count < 1 or len(parts) != count + 1:
            raise ValueError(f"{len(parts)} frames after the index, which says {count} + 1")
        (hlc,) = msgspec.msgpack.decode(parts.pop(), type=tuple[int])
        return Partitioned(bytes(head), parts, hlc, mapped)

    def read(self) -> tuple[bytes, Iterator[DeltaBatch]] | None:
        """The head and the bucket slices, read lazily; None if there is no file.
        Raises ValueError (or msgspec's errors) for a damaged file."""
        try:
            stream = self.path.open("rb")
        except FileNotFoundError:
            return None
        magic = stream.read(len(SNAPSHOT_MAGIC))  # as long as PARTITIONED_MAGIC
        if magic == PARTITIONED_MAGIC:  # the partitions, as slices
            frames = unpack_stream(stream)
            first = next(frames, None)
            index = next(frames, None)
            if first is None or index is None:
                stream.close()
                raise ValueError("no head or partition index frame")
            (count,) = msgspec.msgpack.decode(index, type=tuple[int])

            def partitions() -> Iterator[DeltaBatch]:
                with stream:
                    for _, payload in zip(range(count), frames, strict=False):
                        yield _SLICE_DECODER.decode(payload)

            return first, partitions()
        if magic != SNAPSHOT_MAGIC:
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
        """Close and delete the temporary file; never raises for a failed close.

        Closing flushes what is still buffered, which fails on a full disk (ENOSPC),
        after the descriptor is closed all the same; that data is being thrown away.
        The caller is already unwinding an error (or a cancellation, which an OSError
        raised here would replace): the file is deleted whatever the close said.
        """
        try:
            with contextlib.suppress(OSError):
                self.out.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)
