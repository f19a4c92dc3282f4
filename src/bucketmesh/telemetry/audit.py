"""The audit trail's writer: JSON lines off the hot path, bounded, never blocking.

A caller ``record``s an event (a dict) and returns at once: the event goes into a
bounded buffer, and a writer thread of its own drains it to a file (rotated by
size: ``audit.jsonl`` → ``audit.jsonl.1`` … ``.N``) or to stdout. A full buffer
drops the event and counts it (``dropped``): a decision never waits for a disk.

Two kinds of events:

- ``consume``: one decision (time, region, replica, rule, key — or its
  SHA-256 with ``hash_keys`` —, tokens, allowed, Idempotency-Key, request id,
  caller). Sampled: with ``sample`` < 1 only that share is kept (by a hash of
  the request id, so every event of one request is kept or none is).
- anything else (``patch``, ``fault``, ``reconcile-repair`` …): always kept
  whatever the sampling, with who did it and old → new, as the caller gives them.

This module reads the clock only to stamp events that carry no ``time``.
``tooling/ops/audit.py`` (``bucketmesh audit duplicates``) reads what it writes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import IO, Any, Final, TypeAlias

import msgspec

CONSUME: Final = "consume"
DEFAULT_BUFFER: Final = 10_000
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
DEFAULT_BACKUPS: Final = 5
#: how often the writer thread writes what the buffer holds (sooner once it is half full)
FLUSH_INTERVAL_S: Final = 0.1


class Consumed(msgspec.Struct, gc=False, omit_defaults=True):
    """A ``consume`` event as buffered and written (the fields in the order written;
    ``item`` and ``shadow`` only when set)."""

    event: str
    time: int | str
    region: str
    replica: str
    rule: str
    key: str
    tokens: int
    allowed: bool
    idempotency_key: str | None
    request_id: str | None
    caller: str | None
    item: int | None = None
    shadow: bool = False


Event: TypeAlias = "Consumed | Mapping[str, Any]"


def key_hash(key: str) -> str:
    """What a hashed key is written as: ``sha256:`` and the first 32 hex digits."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:32]


def token_identity(token: str | None) -> str:
    """Who a bearer token (an admin token, a caller's API key) is in the trail: never
    the secret itself, ``token:`` and the first 12 hex digits of its SHA-256 (stable,
    so two events by one token say so); ``anonymous`` without one."""
    if not token:
        return "anonymous"
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


_CALLERS: dict[tuple[str, str], str] = {}
_CALLERS_MAX = 10_000


def caller_of(headers: Mapping[str, str]) -> str | None:
    """The caller of a request, when it says: its bearer token (``token:…``) or its
    ``X-API-Key`` (``api-key:…``), hashed; None when it carries neither. (The hashes of
    the last 10,000 callers are kept: a busy caller is hashed once, not per request.)"""
    authorization = headers.get("authorization")
    if authorization and authorization[:7].lower() == "bearer ":
        kind, secret = "token", authorization[7:].strip()
    else:
        api_key = headers.get("x-api-key")
        if not api_key:
            return None
        kind, secret = "api-key", api_key
    known = _CALLERS.get((kind, secret))
    if known is None:
        if kind == "token":
            known = token_identity(secret)
        else:
            known = "api-key:" + hashlib.sha256(secret.encode()).hexdigest()[:12]
        if len(_CALLERS) >= _CALLERS_MAX:
            _CALLERS.clear()
        _CALLERS[(kind, secret)] = known
    return known


class _RequestIds:
    """16 random hex digits per process, then a counter; a forked child starts anew."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(1)


_ids = _RequestIds()
os.register_at_fork(after_in_child=_ids.reset)


def new_request_id() -> str:
    """A request id for a request that sent no ``X-Request-Id``: 32 hex digits, 16
    random per process and a 16-digit counter (unique without a syscall per request)."""
    return f"{_ids.prefix}{next(_ids.counter):016x}"


class AuditLog:
    """A bounded buffer of events and the thread that writes them (see the module doc).

    ``path`` None or ``"-"`` writes to stdout. ``start`` (or the first ``record``
    after it) runs the writer; ``close`` writes what is buffered and stops it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        buffer: int = DEFAULT_BUFFER,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        sample: float = 1.0,
        hash_keys: bool = False,
    ) -> None:
        if buffer < 1:
            raise ValueError(f"the audit buffer holds at least 1 event, got {buffer}")
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"the audit sample is a share in [0, 1], got {sample}")
        if max_bytes < 1 or backups < 0:
            raise ValueError("audit rotation needs max_bytes >= 1 and backups >= 0")
        self.path = None if path is None or str(path) == "-" else os.fspath(path)
        self.capacity = buffer
        self.max_bytes = max_bytes
        self.backups = backups
        self.sample = sample
        self.hash_keys = hash_keys
        self.dropped = 0
        self.sampled_out = 0
        self.written = 0
        self.write_errors = 0
        self._events: deque[Event] = deque()
        self._high_water = max(1, buffer // 2)
        self._second = -1  # the writer's last whole second, and its ISO 8601 text
        self._second_text = ""
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._thread: threading.Thread | None = None
        self._stream: IO[bytes] | _TextOut | None = None
        self._size = 0

    # -- the caller's side: never blocks on I/O --------------------------------------

    def record(self, event: Mapping[str, Any]) -> bool:
        """Buffer ``event``; False if it was sampled out or dropped (buffer full)."""
        if event.get("event") == CONSUME and self.sample < 1.0 and not self._kept(event):
            self.sampled_out += 1
            return False
        return self._push(event)

    def _push(self, event: Event) -> bool:
        # No lock and no wake-up per event (a deque's append is atomic): the writer
        # wakes every FLUSH_INTERVAL_S, or once the buffer is half full, and writes
        # what has gathered in one go. Waking it per event would hand the GIL back
        # and forth on every decision.
        events = self._events
        if len(events) >= self.capacity or self._closing:
            self.dropped += 1
            return False
        events.append(event)
        if len(events) == self._high_water:
            with self._lock:
                self._wake.notify()
        return True

    def consume(
        self,
        *,
        region: str,
        replica: str,
        rule: str,
        key: str,
        tokens: int,
        allowed: bool,
        idempotency_key: str | None = None,
        request_id: str | None = None,
        caller: str | None = None,
        at: str | None = None,
        presampled: bool = False,
        item: int | None = None,
        shadow: bool = False,
        **extra: Any,
    ) -> bool:
        """Record one decision. ``presampled``: the caller has asked ``keeps`` already
        (the event is kept whatever its ids); ``item``: a batch item's index,
        ``shadow``: a shadow refusal; ``extra`` fields are written as given."""
        # A Consumed (untracked by the garbage collector: thousands of them waiting
        # in the buffer cost a collection nothing) whose time stays an integer and key
        # as given until the writer thread formats the one and hashes the other.
        consumed = Consumed(
            CONSUME,
            at or time.time_ns(),
            region,
            replica,
            rule,
            key,
            tokens,
            allowed,
            idempotency_key,
            request_id,
            caller,
            item,
            shadow,
        )
        event: Event = consumed
        if extra:
            event = {**msgspec.structs.asdict(consumed), **extra}
        if presampled:
            return self._push(event)
        if self.sample < 1.0 and not self.keeps(str(request_id or idempotency_key or key)):
            self.sampled_out += 1
            return False
        return self._push(event)

    def change(self, event: str, *, who: str, old: Any, new: Any, **fields: Any) -> bool:
        """Record an administrative change (PATCH, fault, repair): always kept."""
        return self.record(
            {
                "event": event,
                "time": fields.pop("at", None) or clock_iso(),
                "who": who,
                "old": old,
                "new": new,
                **fields,
            }
        )

    def _kept(self, event: Mapping[str, Any]) -> bool:
        ident = event.get("request_id") or event.get("idempotency_key") or event.get("key")
        return self.keeps(str(ident))

    def keeps(self, ident: str) -> bool:
        """Whether the sampling keeps the events of the request ``ident`` (its request
        id): a front door asks first, and builds no event for one it would not keep."""
        if self.sample >= 1.0:
            return True
        digest = hashlib.blake2b(ident.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") < self.sample * 2**64

    # -- the writer thread ---------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._closing = False
            self._thread = threading.Thread(target=self._run, name="bucketmesh-audit", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is buffered (for at most ``timeout_s``), then stop."""
        with self._lock:
            self._closing = True
            self._wake.notify()
            thread = self._thread
        if thread is None:  # never started: write the buffer here
            self._drain()
        else:
            thread.join(timeout_s)
            self._thread = None
        if self._stream is not None and self.path is not None:
            self._stream.close()
        self._stream = None

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._events)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._closing:
                    self._wake.wait(FLUSH_INTERVAL_S)
                closing = self._closing
            self._drain()
            if closing and not self._events:
                return

    def _drain(self) -> None:
        events = self._events
        batch = [events.popleft() for _ in range(len(events))]
        if not batch:
            return
        try:
            stream = self._open()
            lines: list[bytes] = []
            for event in batch:
                line = _encode(self._finished(event)) + b"\n"
                size = len(line)
                if self.path is not None and self._size and self._size + size > self.max_bytes:
                    stream.write(b"".join(lines))
                    lines = []
                    stream = self._rotate()
                lines.append(line)
                self._size += size
                self.written += 1
            stream.write(b"".join(lines))  # one write per batch
            stream.flush()
        except OSError:
            self.write_errors += 1
            self._stream = None

    def _finished(self, event: Event) -> Event:
        """``event`` as written: an integer time (ns) in ISO 8601, a consumed key hashed
        when ``hash_keys`` says so (in place: the writer is the last to hold it)."""
        if isinstance(event, Consumed):
            if isinstance(event.time, int):
                event.time = self._iso(event.time)
            if self.hash_keys:
                event.key = key_hash(event.key)
            return event
        stamp = event.get("time")
        hashed = self.hash_keys and event.get("event") == CONSUME
        if not isinstance(stamp, int) and not hashed:
            return event
        done = event if isinstance(event, dict) else dict(event)
        if isinstance(stamp, int):
            done["time"] = self._iso(stamp)
        if hashed and isinstance(done.get("key"), str):
            done["key"] = key_hash(done["key"])
        return done

    def _iso(self, stamp: int) -> str:
        seconds, ns = divmod(stamp, 1_000_000_000)
        if seconds != self._second:
            self._second = seconds
            self._second_text = clock_iso(seconds * 1_000_000_000)[:19]
        return f"{self._second_text}.{ns // 1000:06d}Z"

    def _open(self) -> IO[bytes] | _TextOut:
        if self._stream is None:
            if self.path is None:
                buffer = getattr(sys.stdout, "buffer", None)
                self._stream = buffer if buffer is not None else _TextOut()
            else:
                self._stream = open(self.path, "ab")  # noqa: SIM115
                self._size = self._stream.tell()
        return self._stream

    def _rotate(self) -> IO[bytes] | _TextOut:
        assert self.path is not None
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self.backups == 0:
            os.remove(self.path)
        else:
            for n in range(self.backups - 1, 0, -1):
                older = f"{self.path}.{n}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{n + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._size = 0
        return self._open()


_ENCODER = msgspec.json.Encoder()


class _TextOut:
    """stdout when it has no binary buffer (replaced by a text stream)."""

    def write(self, data: bytes) -> int:
        return sys.stdout.write(data.decode())

    def flush(self) -> None:
        sys.stdout.flush()

    def close(self) -> None:
        """stdout is not this writer's to close."""


def why_unwritable(path: str) -> str | None:
    """Why a file at ``path`` cannot be appended to (created), or None: checked before
    a command acts, so that what it does is not left out of its own record."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"names a directory, {path!r}; give a file"
    if not os.path.isdir(directory):
        return f"is in a directory that does not exist, {directory!r}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"is in a directory this process cannot write, {directory!r}"
    return None


def _encode(event: Event) -> bytes:
    """One event's JSON (msgspec: a few times faster than json, in the writer thread);
    anything msgspec cannot encode is written as its ``str``."""
    try:
        return _ENCODER.encode(event)
    except TypeError:
        return json.dumps(event, ensure_ascii=False, separators=(",", ":"), default=str).encode()


def clock_iso(ns: int | None = None) -> str:
    """``ns`` (default: now) as the audit trail writes times."""
    seconds = time.time() if ns is None else ns / 1e9
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


__all__ = [
    "CONSUME",
    "AuditLog",
    "caller_of",
    "clock_iso",
    "key_hash",
    "new_request_id",
    "token_identity",
]
