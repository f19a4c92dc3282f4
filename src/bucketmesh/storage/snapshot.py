"""The embedded store's snapshot file: its format, and writing it whole and atomically.

Format: ``SNAPSHOT_MAGIC``, then frames (``wal.pack``: length, crc32, payload): the
first holds ``Limiter.snapshot_head()``, each other one a ``DeltaBatch`` slice of
buckets, so that neither writing nor reading ever holds every bucket's encoding at
once. A file without the magic is a whole ``Limiter.snapshot()``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Final

import msgspec

from bucketmesh.core.limiter import DeltaBatch
from bucketmesh.storage.wal import pack, unpack_stream

SNAPSHOT_MAGIC: Final = b"bucketmesh-snapshot-2\n"
SNAPSHOT_SLICE: Final = 5_000
_SLICE_ENCODER: Final = msgspec.msgpack.Encoder()
_SLICE_DECODER: Final = msgspec.msgpack.Decoder(DeltaBatch)


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
