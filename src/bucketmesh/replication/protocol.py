"""The sync protocol: what regions say to each other, and how a node knows who said it.

Theory of operation
-------------------
Every sync message is one *envelope*, msgpack-encoded, carried as the body of
an HTTP POST (``mesh.py`` owns the sockets; this module sees only bytes)::

    [version, cluster_id, kind, sender, region, sent_ns, nonce, reply_to, body, mac]

``body`` is the msgpack payload of ``kind`` (a ``DeltaPush``, ``DigestRequest``
...), ``sender`` the replica id (region/node/incarnation), ``sent_ns`` the
sender's wall clock at sealing, ``nonce`` 16 random bytes, ``reply_to`` the
request's nonce in a reply (empty in a request) and ``mac`` an HMAC-SHA256
with the mesh's shared secret over every other field::

    mac = HMAC-SHA256(secret, "bucketmesh-sync/1" ‖ msgpack([version … body]))

msgpack frames every field with its length, so no two field lists share an
encoding. A receiver accepts a message only if, in this order: it decodes
(else 400 ``malformed``), names this cluster (else 403 ``wrong_cluster``),
carries a MAC (else 401 ``unsigned``) that verifies (else 401
``bad_signature``), has the kind the endpoint expects (400 ``wrong_kind``),
was sealed within ``window`` of the receiver's clock (401 ``stale``) and
carries a nonce not seen within that window (401 ``replay``). A reply must
also echo the request's nonce, which binds it to its request, so replies need
no replay memory. The nonce memory only has to outlive the window: a replayed
message older than that is stale anyway.

The payloads reuse the core's structs: a ``DeltaPush`` carries a
``limiter.DeltaBatch`` of ``bucket.BucketDelta``; merging is the core's job.

Anti-entropy
------------
Keys fall into ``RANGES`` ranges by ``crc32(key) % RANGES``. A range's hash is
the XOR of 64-bit BLAKE2b hashes of the canonical encoding of each *settled*
bucket in it (``entry_hash``): a bucket at rest (TAT + settle ≤ now) and not
yet expired (now < TAT + ttl). Two replicas holding the same state agree on
every range hash, whatever order they hold keys in. Busy buckets are left
out on purpose: their deltas are in flight and would make every range look
different; each delta carries its sender's absolute entry, so a later delta
of a busy bucket heals a lost earlier one, and a bucket that went quiet is
covered once it has refilled. A replica missing an entry computes a lower
TAT, so the bucket is settled on one side only, which also shows as a
difference. Rule-level configs are not hashed; they travel with every state
transfer.

This module does no I/O and reads no clock: time and randomness are arguments.
"""

from __future__ import annotations

import hashlib
import hmac
import zlib
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Final

import msgspec

from bucketmesh.core.bucket import NS_PER_S, BucketConfig, BucketDelta, delta_tat
from bucketmesh.core.limiter import DeltaBatch
from bucketmesh.core.limits import MAX_SPAN_NS, LimitError, check_burst, check_limits

WIRE_VERSION: Final = 1
CONTENT_TYPE: Final = "application/vnd.bucketmesh.replication.protocol+msgpack"
NONCE_BYTES: Final = 16
DEFAULT_WINDOW_NS: Final = 30 * NS_PER_S
RANGES: Final = 256
_MAC_CONTEXT: Final = b"bucketmesh-sync/1"


def _signed_fields(env: Envelope) -> tuple[object, ...]:
    """What an envelope's MAC covers: every field but the MAC itself, in wire order."""
    return (
        env.version,
        env.cluster_id,
        env.kind,
        env.sender,
        env.region,
        env.sent_ns,
        env.nonce,
        env.reply_to,
        env.body,
    )


# Kinds, and the path each request kind is posted to.
DELTAS: Final = "deltas"
DIGEST: Final = "digest"
PULL: Final = "pull"
ACK: Final = "ack"
DIGEST_REPLY: Final = "digest-reply"
STATE: Final = "state"
PATHS: Final = {DELTAS: "/v1/sync/deltas", DIGEST: "/v1/sync/digest", PULL: "/v1/sync/pull"}
REPLY_KIND: Final = {DELTAS: ACK, DIGEST: DIGEST_REPLY, PULL: STATE}


class Envelope(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One authenticated sync message; ``body`` is the msgpack payload of ``kind``."""

    version: int
    cluster_id: str
    kind: str
    sender: str
    region: str
    sent_ns: int
    nonce: bytes
    reply_to: bytes
    body: bytes
    mac: bytes


# -- payloads ---------------------------------------------------------------


class DeltaPush(msgspec.Struct, array_like=True, gc=False):
    """``deltas``: bucket deltas (or, with ``full``, full state) and rule configs.

    ``origin_ns`` is the sender's wall clock when the oldest delta in the batch
    was collected; the receiver records now − origin_ns as replication lag.
    An empty batch is a heartbeat.
    """

    origin_ns: int
    full: bool
    batch: DeltaBatch


class Ack(msgspec.Struct, array_like=True, gc=False):
    """Reply to ``deltas``: who merged it (a new replica id means a restarted peer)."""

    replica_id: str
    changed: int


class DigestRequest(msgspec.Struct, array_like=True, gc=False):
    """``digest``: the sender's hash of each listed range, over buckets settled for
    ``settle_ns`` at the instant ``at_ns`` (the sender's clock when it hashed); the
    receiver hashes its own buckets at that same instant and answers with the ranges
    whose hash differs. ``at_ns`` 0 (a sender from before the field; an older receiver
    ignores it): the receiver's own now, so every bucket that settles between the two
    instants (under a flood of new keys, thousands a second) makes its range differ."""

    settle_ns: int
    ranges: list[int]
    hashes: list[int]
    at_ns: int = 0


class DigestReply(msgspec.Struct, array_like=True, gc=False):
    """Reply to ``digest``: the differing ranges and the replier's full state of them."""

    replica_id: str
    differing: list[int]
    state: DeltaBatch


class PullRequest(msgspec.Struct, array_like=True, gc=False):
    """``pull``: ask for the full state of these ranges (a restarted node, at start-up)."""

    ranges: list[int]


class PullReply(msgspec.Struct, array_like=True, gc=False):
    """Reply to ``pull``."""

    replica_id: str
    state: DeltaBatch


class _RawBatch(msgspec.Struct, array_like=True, gc=False):
    """Encodes exactly like ``DeltaBatch``, from deltas encoded once beforehand."""

    origin: str
    deltas: list[msgspec.Raw]
    rules: dict[str, BucketConfig]


class _RawPush(msgspec.Struct, array_like=True, gc=False):
    origin_ns: int
    full: bool
    batch: _RawBatch


_encode = msgspec.msgpack.Encoder().encode
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
DECODERS: Final[dict[str, msgspec.msgpack.Decoder[Any]]] = {
    DELTAS: msgspec.msgpack.Decoder(DeltaPush),
    ACK: msgspec.msgpack.Decoder(Ack),
    DIGEST: msgspec.msgpack.Decoder(DigestRequest),
    DIGEST_REPLY: msgspec.msgpack.Decoder(DigestReply),
    PULL: msgspec.msgpack.Decoder(PullRequest),
    STATE: msgspec.msgpack.Decoder(PullReply),
}


def encode_delta(delta: BucketDelta) -> bytes:
    """One delta's wire form, to be queued for several peers and sent in ``encode_push``."""
    return _encode(delta)


def encode_push(
    origin_ns: int,
    full: bool,
    origin: str,
    deltas: Sequence[bytes],
    rules: dict[str, BucketConfig],
) -> bytes:
    """A ``DeltaPush`` body from pre-encoded deltas (the same bytes as encoding it whole)."""
    raw = _RawPush(origin_ns, full, _RawBatch(origin, [msgspec.Raw(d) for d in deltas], rules))
    return _encode(raw)


def encode(payload: msgspec.Struct) -> bytes:
    return _encode(payload)


# -- authentication -----------------------------------------------------------


class Rejected(Exception):
    """A message refused; ``reason`` is the metrics label, ``status`` the HTTP answer."""

    def __init__(self, reason: str, status: int, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.status = status
        self.detail = detail


class ReplayGuard:
    """The nonces of accepted messages, each kept as long as its message could pass
    the freshness check (at most two windows after arrival); bounded in size."""

    def __init__(self, window_ns: int = DEFAULT_WINDOW_NS, max_entries: int = 1_000_000) -> None:
        self.window_ns = window_ns
        self.max_entries = max_entries
        self._seen: set[bytes] = set()
        self._expiry: deque[tuple[int, bytes]] = deque()

    def admit(self, nonce: bytes, now_ns: int) -> None:
        """Remember ``nonce``, or raise ``Rejected`` if it was seen within the window."""
        expiry = self._expiry
        while expiry and expiry[0][0] <= now_ns:
            self._seen.discard(expiry.popleft()[1])
        if nonce in self._seen:
            raise Rejected("replay", 401, "this message was already received (replayed nonce)")
        if len(self._seen) >= self.max_entries:
            # Forgetting a live nonce would reopen replays: refuse instead (fails closed).
            raise Rejected("replay_cache_full", 503, "too many sync messages in the window")
        self._seen.add(nonce)
        expiry.append((now_ns + 2 * self.window_ns, nonce))

    def __len__(self) -> int:
        return len(self._seen)


class SyncAuth:
    """Seals and opens envelopes for one cluster. ``secret`` None is insecure mode:
    messages are neither signed nor verified (cluster, freshness and nonces still are).
    Several secrets (rotation, docs/security.md): messages are signed with the first
    and accepted when any of them verifies."""

    def __init__(
        self,
        cluster_id: str,
        secret: str | Sequence[str] | None,
        *,
        window_ns: int = DEFAULT_WINDOW_NS,
    ) -> None:
        self.cluster_id = cluster_id
        self.window_ns = window_ns
        self._keys: tuple[bytes, ...] = ()
        self._key: bytes | None = None
        self.set_secrets(secret)

    def set_secrets(self, secret: str | Sequence[str] | None) -> None:
        """Sign with the first of ``secret`` from now on, accept any of them."""
        secrets = (secret,) if isinstance(secret, str) else tuple(secret or ())
        self._keys = tuple(s.encode() for s in secrets if s)
        self._key = self._keys[0] if self._keys else None

    @property
    def insecure(self) -> bool:
        return self._key is None

    def _mac(self, fields: tuple[object, ...]) -> bytes:
        assert self._key is not None
        return hmac.new(self._key, _MAC_CONTEXT + _encode(fields), hashlib.sha256).digest()

    def _verifies(self, mac: bytes, fields: tuple[object, ...]) -> bool:
        encoded = _MAC_CONTEXT + _encode(fields)
        verified = False
        for key in self._keys:  # every key is tried: the time taken tells nothing
            expected = hmac.new(key, encoded, hashlib.sha256).digest()
            verified = hmac.compare_digest(mac, expected) or verified
        return verified

    def signer(self, env: Envelope) -> str:
        """Which secret signed an accepted ``env``, as the audit trail names it:
        ``secret:`` and the first 12 hex digits of its SHA-256 (never the secret);
        ``unsigned`` in insecure mode."""
        if self._key is None:
            return "unsigned"
        encoded = _MAC_CONTEXT + _encode(_signed_fields(env))
        for key in self._keys:
            if hmac.compare_digest(env.mac, hmac.new(key, encoded, hashlib.sha256).digest()):
                return "secret:" + hashlib.sha256(key).hexdigest()[:12]
        return "unknown"

    def seal(
        self,
        kind: str,
        body: bytes,
        *,
        sender: str,
        region: str,
        now_ns: int,
        nonce: bytes,
        reply_to: bytes = b"",
    ) -> bytes:
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"a nonce is {NONCE_BYTES} bytes, got {len(nonce)}")
        fields = (
            WIRE_VERSION,
            self.cluster_id,
            kind,
            sender,
            region,
            now_ns,
            nonce,
            reply_to,
            body,
        )
        mac = b"" if self._key is None else self._mac(fields)
        return _encode((*fields, mac))

    def open(
        self,
        data: bytes,
        *,
        kinds: Collection[str],
        now_ns: int,
        replay: ReplayGuard | None = None,
        reply_to: bytes | None = None,
    ) -> Envelope:
        """The envelope in ``data`` if it is authentic, fresh, new and of one of ``kinds``;
        raises ``Rejected`` otherwise. Nothing is remembered unless it is accepted."""
        try:
            env = _envelope_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise Rejected("malformed", 400, f"not a sync envelope: {error}") from None
        if env.version != WIRE_VERSION:
            raise Rejected("malformed", 400, f"unsupported sync wire version {env.version}")
        if len(env.nonce) != NONCE_BYTES:
            raise Rejected("malformed", 400, f"the nonce must be {NONCE_BYTES} bytes")
        if not hmac.compare_digest(env.cluster_id.encode(), self.cluster_id.encode()):
            raise Rejected(
                "wrong_cluster",
                403,
                f"this node belongs to another cluster than {env.cluster_id!r}",
            )
        if self._key is not None:
            if not env.mac:
                raise Rejected("unsigned", 401, "the message carries no signature")
            if not self._verifies(env.mac, _signed_fields(env)):
                raise Rejected("bad_signature", 401, "the signature does not verify")
        if env.kind not in kinds:
            raise Rejected("wrong_kind", 400, f"expected {' or '.join(kinds)}, got {env.kind!r}")
        skew = now_ns - env.sent_ns
        if not -self.window_ns <= skew <= self.window_ns:
            raise Rejected(
                "stale",
                401,
                f"sealed {skew / NS_PER_S:+.1f}s from this node's clock; the window is "
                f"±{self.window_ns / NS_PER_S:g}s",
            )
        if reply_to is not None and not hmac.compare_digest(env.reply_to, reply_to):
            raise Rejected("bad_reply", 401, "the reply does not answer this request")
        if replay is not None:
            replay.admit(env.nonce, now_ns)
        return env


def decode_body(env: Envelope) -> msgspec.Struct:
    """The payload of an opened envelope; raises ``Rejected`` if it does not decode."""
    try:
        payload: msgspec.Struct = DECODERS[env.kind].decode(env.body)
    except (msgspec.DecodeError, msgspec.ValidationError, KeyError) as error:
        raise Rejected("malformed", 400, f"bad {env.kind} payload: {error}") from None
    batch = getattr(payload, "batch", None) or getattr(payload, "state", None)
    if isinstance(batch, DeltaBatch):
        _check_configs(env.kind, batch)
    return payload


def _check_configs(kind: str, batch: DeltaBatch) -> None:
    """Raise ``Rejected`` for a config no rule could have: merged, a zero interval or
    capacity would divide by zero or stall the bucket (found by tests/fuzz/fuzz_sync.py)."""
    configs = [*(delta.config for delta in batch.deltas), *batch.rules.values()]
    for config in configs:
        try:
            check_limits(capacity=config.capacity, mode=config.mode)
            if not 1 <= config.interval_ns <= MAX_SPAN_NS:
                raise LimitError(
                    "interval_ns", f"must be in [1, {MAX_SPAN_NS}]", config.interval_ns
                )
            if not 1 <= config.ttl_ns <= MAX_SPAN_NS:
                raise LimitError("ttl_ns", f"must be in [1, {MAX_SPAN_NS}]", config.ttl_ns)
            check_burst(config.capacity, config.interval_ns)
        except LimitError as error:
            raise Rejected("malformed", 400, f"bad {kind} payload: a config's {error}") from None


# -- anti-entropy -------------------------------------------------------------


def range_of(key: str) -> int:
    return zlib.crc32(key.encode()) % RANGES


def canonical(delta: BucketDelta) -> bytes:
    """The lattice value of a full-state delta, encoded one way only: entries sorted,
    zero entries dropped (a replica lists its own zero entry, others do not), and
    the ``rule`` name left out (it is a label, not part of the replicated state)."""
    used = sorted((rid, n) for rid, n in delta.used.items() if n > 0)
    anchors = sorted(delta.anchors.items())
    marks = sorted((rid, m) for rid, m in delta.marks.items() if m)
    config = delta.config
    fields: tuple[Any, ...] = (
        delta.key,
        delta.epoch,
        # a config that is not shadow hashes as before the field existed (old peers agree)
        config if config.shadow else (*msgspec.structs.astuple(config)[:5],),
        delta.base_version,
        delta.base_time,
        used,
        delta.base_used,
        anchors,
        marks,
    )
    if delta.folds:  # retired incarnations folded away (only then: digests stay as they were)
        fields += (sorted((node, tuple(fold)) for node, fold in delta.folds.items()),)
    return _encode(fields)


def entry_hash(delta: BucketDelta) -> int:
    return int.from_bytes(hashlib.blake2b(canonical(delta), digest_size=8).digest(), "big")


def settled(delta: BucketDelta, now_ns: int, settle_ns: int) -> bool:
    """At rest for ``settle_ns`` (full since then) and not yet expired: in the digest."""
    tat = delta_tat(delta)
    return tat + settle_ns <= now_ns < tat + delta.config.ttl_ns


def digest(
    states: Iterable[BucketDelta], ranges: Sequence[int], now_ns: int, settle_ns: int
) -> list[int]:
    """The hash of each of ``ranges`` (in that order) over the settled ``states``."""
    index = {r: i for i, r in enumerate(ranges)}
    hashes = [0] * len(ranges)
    for delta in states:
        slot = index.get(range_of(delta.key))
        if slot is not None and settled(delta, now_ns, settle_ns):
            hashes[slot] ^= entry_hash(delta)
    return hashes


def differing(ranges: Sequence[int], mine: Sequence[int], theirs: Sequence[int]) -> list[int]:
    """The ranges whose hashes disagree (a length mismatch is malformed input)."""
    if not len(ranges) == len(mine) == len(theirs):
        raise Rejected("malformed", 400, "ranges and hashes differ in length")
    return [r for r, a, b in zip(ranges, mine, theirs, strict=True) if a != b]


__all__ = [
    "CONTENT_TYPE",
    "RANGES",
    "Ack",
    "DeltaPush",
    "DigestReply",
    "DigestRequest",
    "Envelope",
    "PullReply",
    "PullRequest",
    "Rejected",
    "ReplayGuard",
    "SyncAuth",
    "canonical",
    "differing",
    "digest",
    "encode_delta",
    "encode_push",
    "entry_hash",
    "range_of",
    "settled",
]
