"""``Idempotency-Key``: a retried request gets its first answer back instead of being
decided (and charged) again. Answers are kept per key *and* per caller and request
(path, client address, body, query, the headers keys are built from), so the same key
sent by someone else, or with another body, is a different request.

Three places a retry can land, and what keeps it from being charged twice (for
``IDEMPOTENCY_TTL_S``, ten minutes, after the first answer; docs/api.md):

- **the same node, at the same time** (concurrent identical requests): the first
  one's decision is *in flight* (``IdempotencyCache.inflight``); the others wait for
  it and get its answer;
- **another node of the region** (Redis backend): the record is claimed in Redis with
  ``SET NX`` before the decision and holds the answer after it
  (``SharedIdempotency``, ``storage/redis_backend.py``); a retry that finds the claim
  still pending waits for the answer;
- **the same node after a crash** (memory backend with a snapshot): each answer is
  appended to ``<snapshot>.idempotency`` once its grant is durable
  (``IdempotencyLog``), and read back at start-up.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Final, Protocol

import msgspec

from bucketmesh.http.errors import bad_request
from bucketmesh.http.server import Request, Response
from bucketmesh.telemetry.log import logger

IDEMPOTENCY_TTL_S = 600.0
IDEMPOTENCY_MAX = 100_000
MAX_IDEMPOTENCY_KEY = 256
NS_PER_S: Final = 1_000_000_000

#: A request's identity for replays: a 16-byte digest of its path, key and scope.
CacheKey = bytes

log = logger("idempotency")


def replayed(response: Response) -> Response:
    """The copy of a first decision that an Idempotency-Key retry gets back."""
    headers = [*(response.headers or ()), ("Idempotent-Replayed", "true")]
    return Response(response.status, response.body, response.content_type, headers)


def idempotency_key(request: Request, scope_headers: Iterable[str]) -> CacheKey | None:
    """The cache key of a request carrying ``Idempotency-Key`` (None without one)."""
    value = request.headers.get("idempotency-key")
    if value is None:
        return None
    if not value or len(value) > MAX_IDEMPOTENCY_KEY:
        raise bad_request(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters", "Idempotency-Key"
        )
    headers = request.headers
    digest = hashlib.blake2b(digest_size=16)
    for part in (
        request.path,
        value,
        request.client_ip,
        repr(sorted(request.query.items())),
        *(headers.get(name, "") for name in scope_headers),
    ):
        digest.update(part.encode("utf-8", "surrogatepass") + b"\x00")
    digest.update(request.body)
    return digest.digest()


class Record(msgspec.Struct, array_like=True):
    """One kept answer, as the log file and Redis hold it."""

    key: bytes
    expires_ns: int  # wall clock
    status: int
    body: bytes
    content_type: str
    headers: list[tuple[str, str]]

    def response(self) -> Response:
        return Response(self.status, self.body, self.content_type, list(self.headers))


def record_of(key: CacheKey, response: Response, expires_ns: int) -> Record:
    return Record(
        key,
        expires_ns,
        response.status,
        bytes(response.body),
        response.content_type or "",
        [(str(k), str(v)) for k, v in (response.headers or ())],
    )


_FRAME: Final = 8  # length u32, crc32 u32
_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(Record)


def _frame(record: Record) -> bytes:
    payload = _ENCODER.encode(record)
    return len(payload).to_bytes(4, "little") + zlib.crc32(payload).to_bytes(4, "little") + payload


def _records(data: bytes) -> Iterator[Record]:
    """The whole, valid frames of a log; stops at the first torn or damaged one."""
    offset = 0
    while offset + _FRAME <= len(data):
        length = int.from_bytes(data[offset : offset + 4], "little")
        crc = int.from_bytes(data[offset + 4 : offset + 8], "little")
        payload = data[offset + _FRAME : offset + _FRAME + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            return
        try:
            yield _DECODER.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        offset += _FRAME + length


class IdempotencyLog:
    """``<snapshot>.idempotency``: the answers kept for retries, appended as they become
    durable (write(2): survives kill -9 as the write-ahead log's ``relaxed`` does) and
    rewritten with only the live ones at every snapshot (``compact``). A torn tail is
    ignored; a failed write is logged and costs only that record's protection."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.errors = 0

    def load(self, now_ns: int) -> list[Record]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        return [record for record in _records(data) if record.expires_ns > now_ns]

    def append(self, record: Record) -> None:
        # opened per record: holds no descriptor between requests (and none to leak)
        data = _frame(record)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                written = os.write(fd, data)
            finally:
                os.close(fd)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
        except OSError as error:
            self.errors += 1
            log.error("%s: an idempotency record could not be written: %s", self.path, error)

    def compact(self, records: Iterable[Record]) -> None:
        """Replace the file with ``records`` (atomically). Raises OSError."""
        records = list(records)
        if not records and not self.path.exists():
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "wb") as out:
            for record in records:
                out.write(_frame(record))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)


class SharedIdempotency(Protocol):
    """Idempotency records every node of the region sees (the Redis backend's)."""

    async def claim(self, key: CacheKey) -> Response | bool | None:
        """True: claimed, decide now. A Response: the first answer, replay it. False: the
        first request is still being decided elsewhere. None: the store cannot say (it is
        down); decide as this node alone would."""
        ...

    async def record(self, key: CacheKey, response: Response) -> None: ...

    async def release(self, key: CacheKey) -> None: ...


class IdempotencyCache:
    """First decisions by Idempotency-Key: bounded in size, each kept for a while;
    the decisions in flight; and, with a ``log``, a copy on disk."""

    def __init__(
        self,
        ttl_s: float = IDEMPOTENCY_TTL_S,
        max_entries: int = IDEMPOTENCY_MAX,
        *,
        log: IdempotencyLog | None = None,
        shared: SharedIdempotency | None = None,
        wall: Callable[[], int] | None = None,
    ):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.entries: OrderedDict[CacheKey, tuple[float, Response]] = OrderedDict()
        self.inflight: dict[CacheKey, asyncio.Future[None]] = {}
        self.log = log
        self.shared = shared
        self.wall = wall or time.time_ns

    def restore(self, now: float) -> int:
        """Load what the log kept (their remaining lifetime carried over); how many."""
        if self.log is None:
            return 0
        wall = self.wall()
        records = self.log.load(wall)
        for record in records:
            expires = now + (record.expires_ns - wall) / NS_PER_S
            self.entries[record.key] = (expires, record.response())
        return len(records)

    def get(self, key: CacheKey, now: float) -> Response | None:
        found = self.entries.get(key)
        if found is None:
            return None
        if found[0] < now:
            del self.entries[key]
            return None
        return found[1]

    def put(self, key: CacheKey, response: Response, now: float) -> None:
        entries = self.entries
        entries[key] = (now + self.ttl_s, response)
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        # expire from the old end while it is stale, so idle memory drains
        while entries:
            oldest = next(iter(entries.values()))
            if oldest[0] >= now:
                break
            entries.popitem(last=False)

    def persist(self, key: CacheKey, now: float) -> None:
        """Append ``key``'s answer to the log (once its grant is durable)."""
        found = self.entries.get(key)
        if self.log is not None and found is not None:
            expires_ns = self.wall() + int((found[0] - now) * NS_PER_S)
            self.log.append(record_of(key, found[1], expires_ns))

    def compact(self, now: float) -> None:
        """Rewrite the log with the live answers only. Raises OSError."""
        if self.log is None:
            return
        wall = self.wall()
        self.log.compact(
            record_of(key, response, wall + int((expires - now) * NS_PER_S))
            for key, (expires, response) in list(self.entries.items())
            if expires >= now
        )

    def forget(self, key: CacheKey) -> None:
        self.entries.pop(key, None)

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()
