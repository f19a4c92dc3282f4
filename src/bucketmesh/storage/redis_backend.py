"""The redis backend of one API node: decisions in Redis, failure policies, replication.

Several stateless ``bucketmesh serve`` nodes of one region share one Redis
(``storage.backend: redis``). This module is the node's side of it; the
scripts and the wire to Redis are in ``redis_store.py``.

Theory of operation
-------------------
Decisions
    A request's decision is queued; one flush per event-loop turn sends every
    queued decision of this node in ONE script call (``RedisStore.acquire``),
    which decides them in order, atomically. While ``calls_in_flight`` calls
    (``storage.redisCallsInFlight``, default 2) are in flight, new decisions wait
    and go together in the next call, so 50 concurrent connections cost a
    handful of round trips, not 50.
The region's replica
    Every node of the region writes the same ``used`` entry, the store's
    replica id ``<region>/redis/<incarnation>``; Redis serialises them.
Replication (the mesh is unchanged)
    The mesh talks to a ``Limiter``: here a ``RegionMirror``, this node's copy
    of the region state of the keys it decided on or heard of. Every sync
    interval the node reads the keys it decided on since the last round from
    Redis in one pipeline and joins them into the mirror, which marks them
    dirty for the mesh. What peers send is joined into the mirror and queued
    for the merge script. Two nodes of a region that both decided on a key
    both send its delta: absolute values of one replica id, so the second is
    a no-op at the receiver (max-merge); only nodes that decided on a key send
    it, so a key hot on one node is sent by that node alone.
Store failures
    Every call has a tight timeout (``storage.redisTimeoutMs``). A failed call
    marks the store down; while it is down nothing waits on Redis: each
    rule's ``onStoreFailure`` decides (``allow``, ``deny``, or ``local``: an
    in-memory ``Limiter`` under this node's own replica id, seeded with the
    mirror's copy of the region state). A probe runs every 100 ms; when Redis
    answers, what the local buckets spent is merged into Redis under that
    replica id (nothing spent is forgotten), queued remote deltas are merged,
    and decisions go to Redis again. ``/readyz`` says ``store: ...`` while
    down; ``bucketmesh_store_*`` metrics count it all.
Lost data
    If Redis comes back empty, the incarnation key is gone: the next
    acquire is refused by the script and the store is marked down (the
    policy decides); the recovery takes a new incarnation (SET NX, so all
    nodes agree) and merges the mirror back into Redis BEFORE deciding there
    again, so the old incarnation's counts are known again (peers hold them
    too) and no fresh bucket of a newer epoch shadows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any, Final

import hiredis
import msgspec
from prometheus_client.core import CounterMetricFamily, Metric
from redis.exceptions import RedisError

from bucketmesh.core.bucket import (
    NS_PER_S,
    SHARED,
    STRICT,
    Bucket,
    BucketConfig,
    BucketDelta,
    Decision,
    interval_for,
)
from bucketmesh.core.decisions import Ask as Wanted
from bucketmesh.core.heap import untrack
from bucketmesh.core.limiter import (
    BucketCapReached,
    DeltaBatch,
    InvalidTokens,
    KeyTooLong,
    Limiter,
    LimiterError,
    RuleMismatch,
    check_key,
    share_of,
)
from bucketmesh.core.rules import STORE_FAILURE_POLICIES, Rule
from bucketmesh.core.shares import Ledger, ShareState
from bucketmesh.http.idempotency import IDEMPOTENCY_TTL_S, CacheKey, Record, record_of
from bucketmesh.http.server import Response
from bucketmesh.storage import REDIS_CALLS_IN_FLIGHT
from bucketmesh.storage.memory import install_limiter_metrics
from bucketmesh.storage.redis_store import (
    ALLOWED,
    INVALID_TOKENS,
    RECONFIGURE,
    Ask,
    RedisStore,
    StaleIncarnation,
    StoreUnavailable,
    Verdict,
    check_exact,
)
from bucketmesh.telemetry.log import logger
from bucketmesh.telemetry.metrics import NodeMetrics
from bucketmesh.telemetry.tasks import Supervisor, cancel_and_wait

log = logger("redis")

POLICIES: Final = STORE_FAILURE_POLICIES
MAX_DECISIONS_PER_CALL: Final = 500
MAX_CACHED_ASKS: Final = 65_536  # RedisBackend.asks: emptied when full
PROBE_INTERVAL_S: Final = 0.1
CHECK_INTERVAL_S: Final = 0.5
EVICTION_CHECK_EVERY: Final = 20  # health checks between reads of maxmemory-policy (10 s)
REFRESH_INTERVAL_S: Final = 0.25  # without a mesh: keeps the mirror fresh for `local`
MAX_REFRESH_KEYS: Final = 5000
MAX_QUEUED_MERGES: Final = 100_000
MERGE_CHUNK: Final = 200
#: keys of the mirror encoded at a time when it is merged into Redis whole (after Redis
#: lost its data, or a peer's flood of deltas over MAX_QUEUED_MERGES)
MIRROR_SLICE: Final = 2000
DENY_RETRY_S: Final = 1.0
REBALANCE_PERIOD_S: Final = 0.25  # RegionShares.step's period (node/serve.py runs it)
MAX_REFUSED_SHADOW: Final = 4096  # keys whose last refusal's shadow mark is kept

# A queued decision and the future its Decision (or its error) resolves once known.
Waiter = tuple[Ask, asyncio.Future[Decision]]
_tuple_new = tuple.__new__  # an Ask built without NamedTuple.__new__'s Python frame


#: A claim's lifetime before its answer is recorded: a node that dies while deciding
#: holds the key no longer than this (a retry then decides again).
IDEMPOTENCY_CLAIM_S: Final = 10.0
_PENDING: Final = "pending"


class RegionIdempotency:
    """Idempotency records in the region's Redis (``http.idempotency.SharedIdempotency``):
    ``SET NX`` claims a request before it is decided, the answer replaces the claim for
    ``IDEMPOTENCY_TTL_S``; every node of the region sees both."""

    def __init__(self, store: RedisStore, ttl_s: float = IDEMPOTENCY_TTL_S) -> None:
        self.store = store
        self.ttl_ms = int(ttl_s * 1000)
        self.claim_ms = int(IDEMPOTENCY_CLAIM_S * 1000)
        self.prefix = f"bm:{store.region}:idem:"
        self.unavailable = 0

    def _key(self, key: CacheKey) -> str:
        return self.prefix + key.hex()

    async def claim(self, key: CacheKey) -> Response | bool | None:
        redis, name = self.store.redis, self._key(key)
        try:
            if await self.store._call(redis.set(name, _PENDING, nx=True, px=self.claim_ms)):
                return True
            value = await self.store._call(redis.get(name))
        except StoreUnavailable:
            self.unavailable += 1
            return None
        if value is None:  # the claim expired in between: try again
            return False
        if value == _PENDING:
            return False
        try:
            return msgspec.json.decode(value, type=Record).response()
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    async def record(self, key: CacheKey, response: Response) -> None:
        expires_ns = time.time_ns() + self.ttl_ms * 1_000_000
        value = msgspec.json.encode(record_of(key, response, expires_ns)).decode()
        try:
            await self.store._call(self.store.redis.set(self._key(key), value, px=self.ttl_ms))
        except StoreUnavailable:
            self.unavailable += 1

    async def release(self, key: CacheKey) -> None:
        name = self._key(key)
        with contextlib.suppress(StoreUnavailable):
            if await self.store._call(self.store.redis.get(name)) == _PENDING:
                await self.store._call(self.store.redis.delete(name))


class CrossSlotBatch(KeyTooLong):
    """An atomic batch whose keys are in several Redis Cluster slots (a 400 naming the
    key, as the API answers a key it cannot take)."""


class InexactConfig(ValueError):
    """A runtime config outside the range the Redis scripts compute exactly."""

    def __init__(self, detail: str, field: str) -> None:
        super().__init__(detail)
        self.field = field


class RegionMirror:
    """This node's copy of the region's Redis state: what the sync mesh reads and merges.

    It never decides (decisions are made in Redis): it holds a ``Limiter`` only as
    the replica the mesh replicates. What a peer sends (``merge``) is joined here
    and handed to ``forward``, which queues it for the store; what this node reads
    back from Redis is joined with ``absorb``, which marks changed shared buckets
    dirty for the mesh.
    """

    def __init__(
        self,
        rules: Iterable[Rule],
        *,
        forward: Callable[[DeltaBatch], None],
        replica_id: str,
        max_buckets: int = 1_000_000,
        regions: int = 1,
    ) -> None:
        self.limiter = Limiter(
            list(rules), replica_id=replica_id, max_buckets=max_buckets, regions=regions
        )
        self.forward = forward
        self.inexact_skipped = 0  # configs from peers outside the exact range
        self.shares = False  # strict keys in the region's rights ledger (RegionShares)
        #: the region, once its strict keys run on its ledger: the mesh then reports the
        #: sender of every sync message here (``observe_replica``), a pull first of all
        self.share_region: str | None = None
        #: puts what ``observe_replica`` saw into Redis (``RegionShares.freeze``): the mesh
        #: awaits it before it answers a pull
        self.share_freeze: Callable[[], Awaitable[bool]] | None = None
        #: a node that is not the region's writer: the region's ledgers as Redis holds
        #: them (each share hash's committed ``L`` joined with every node's heard
        #: ``m:<node>``), read by ``share_freeze`` before it answers a pull, so that the
        #: answer carries them (its mirror has none, or old ones: only the writer's is
        #: kept current). Never merged into the mirror (a ledger reaches a writer's
        #: mirror through Redis only); sent, as every ledger is, as a join of counters
        #: each written by its owner
        self.pull_ledgers: dict[str, ShareState] = {}

    def observe_replica(self, replica_id: str) -> None:
        """A sync message from ``replica_id`` (region/node/incarnation), seen by the mesh
        before it merges it or answers a pull: a newer incarnation of a node freezes its
        older ones' gift counters in this mirror at once, as in an embedded region
        (core/shares.py), and ``RegionShares`` puts it into Redis for every writer of
        the region, which freezes them too before it merges what the nodes heard."""
        self.limiter.observe_replica(replica_id)

    # -- what the mesh replicates (replication.mesh.Replica) ----------------------------

    @property
    def replica_id(self) -> str:
        return self.limiter.replica_id

    @property
    def key_configs(self) -> dict[str, BucketConfig]:
        return self.limiter.key_configs

    @property
    def buckets(self) -> dict[str, Bucket]:
        return self.limiter.buckets

    @property
    def rule_configs(self) -> dict[str, BucketConfig]:
        return self.limiter.rule_configs

    @property
    def ledgers(self) -> dict[str, Any]:
        """The strict keys with a ledger (the mesh sends them in a pull's answer)."""
        if not self.pull_ledgers:
            return self.limiter.ledgers
        return {**self.pull_ledgers, **self.limiter.ledgers}

    def full_state(self, keys: Iterable[str] | None = None) -> DeltaBatch:
        batch = self.limiter.full_state(keys)
        pulled = self.pull_ledgers
        if not pulled:
            return batch
        limiter = self.limiter
        seen: set[str] = set()
        deltas: list[BucketDelta] = []
        for delta in batch.deltas:
            state = pulled.get(delta.key)
            if state is not None:
                seen.add(delta.key)
                if delta.shares is not None:
                    state = _join_states(state, delta.shares)
                delta = msgspec.structs.replace(delta, shares=state)
            deltas.append(delta)
        chosen = pulled.keys() if keys is None else (k for k in keys if k in pulled)
        for key in chosen:
            if key in seen:
                continue
            rule = limiter._rule_name(key)
            if rule is None and key not in limiter.key_configs:
                continue
            delta = limiter.strict_config_delta(key, rule or "")
            deltas.append(msgspec.structs.replace(delta, shares=pulled[key]))
        return DeltaBatch(batch.origin, deltas, batch.rules)

    def state_keys(self) -> list[str]:
        """Every key ``full_state()`` covers, for taking it a slice at a time."""
        limiter = self.limiter
        keys = list(limiter.buckets)
        others = limiter.key_configs.keys() | limiter.ledgers.keys() | self.pull_ledgers.keys()
        keys.extend(others - limiter.buckets.keys())
        return keys

    def merge(self, batch: DeltaBatch, *, now: int | None = None) -> int:
        # A config outside the range the scripts compute exactly (a peer region on
        # the memory backend accepts it) is skipped here, and so never reaches Redis.
        deltas = [d for d in batch.deltas if check_exact(d.config) is None]
        rules = {name: c for name, c in batch.rules.items() if check_exact(c) is None}
        if len(deltas) != len(batch.deltas) or len(rules) != len(batch.rules):
            self.inexact_skipped += len(batch.deltas) - len(deltas) + len(batch.rules) - len(rules)
            batch = DeltaBatch(batch.origin, deltas, rules)
        if self.shares and any(d.shares is not None for d in batch.deltas):
            # a strict key's ledger reaches the region's writer through Redis only (the
            # heard ledgers, RegionShares), merged there after the writer has read every
            # incarnation the region's nodes froze: never straight into a writer's mirror,
            # which may not know yet of a newer incarnation another node saw
            plain = [
                d if d.shares is None else msgspec.structs.replace(d, shares=None)
                for d in batch.deltas
            ]
            changed = self.limiter.merge(DeltaBatch(batch.origin, plain, batch.rules), now=now)
        else:
            changed = self.limiter.merge(batch, now=now)
        self.forward(batch)
        return changed

    def collect_deltas(self, limit: int | None = None) -> DeltaBatch:
        """Like ``Limiter.collect_deltas`` (``limit`` as there), but each delta carries
        every entry of this region (``<region>/...``): besides the store's own, what
        ``local`` fallbacks spent (merged into Redis under node-local ids) and an older
        incarnation's counts. Only this region can send them, and max-merge makes
        resending them harmless; a peer region's entries stay that region's to send."""
        batch = self.limiter.collect_deltas(limit)
        prefix = self.replica_id.split("/", 1)[0] + "/"
        for delta in batch.deltas:
            bucket = self.limiter.buckets.get(delta.key)
            if delta.epoch and bucket is not None:
                used = bucket.used(self.replica_id)
                delta.used = {rid: n for rid, n in used.items() if rid.startswith(prefix)}
        return batch

    # -- what the backend does with it ----------------------------------------------------

    def configure(
        self,
        key_or_rule: str,
        *,
        capacity: int | None = None,
        refill_rate: float | None = None,
        ttl: float | None = None,
        mode: str | None = None,
        now: int | None = None,
        shadow: bool | None = None,
    ) -> BucketConfig:
        """``Limiter.configure``, refusing a config the scripts cannot compute exactly
        (the check the node runs on its rules at start)."""
        limiter = self.limiter
        rule = limiter.rules_by_name.get(key_or_rule)
        if rule is not None:
            current = limiter.rule_configs[rule.name]
        else:
            bucket = limiter.buckets.get(key_or_rule)
            if bucket is not None:
                current = limiter.key_configs.get(key_or_rule) or bucket.config
            else:
                current = limiter.rule_configs[limiter.resolve_rule(key_or_rule, None).name]
        if capacity is not None or refill_rate is not None or ttl is not None:
            candidate = BucketConfig(
                current.capacity if capacity is None else capacity,
                current.interval_ns if refill_rate is None else interval_for(refill_rate),
                current.ttl_ns if ttl is None else max(1, round(ttl * NS_PER_S)),
                current.mode,
                current.version,
            )
            problem = check_exact(candidate)
            if problem is not None:
                given = [
                    name
                    for name, value in (
                        ("capacity", capacity),
                        ("refillRate", refill_rate),
                        ("ttl", ttl),
                    )
                    if value is not None
                ]
                raise InexactConfig(problem, given[0])
        return limiter.configure(
            key_or_rule,
            capacity=capacity,
            refill_rate=refill_rate,
            ttl=ttl,
            mode=mode,
            now=now,
            shadow=shadow,
        )

    def absorb(self, deltas: Iterable[BucketDelta], now: int) -> None:
        limiter = self.limiter
        for delta in deltas:
            if self.shares and delta.config.mode == STRICT:
                # a strict bucket in Redis runs on its region's share (RegionShares),
                # not on the key's whole limit: never taken for the key's config
                continue
            changed = limiter.merge(DeltaBatch(limiter.replica_id, [delta]), now=now)
            if changed and delta.config.mode == SHARED:
                limiter.dirty.add(delta.key)

    def rename(self, replica_id: str) -> None:
        """Run under a new store incarnation; the old id's entries stay, as a peer's."""
        limiter = self.limiter
        old = limiter.replica_id
        for key, bucket in list(limiter.buckets.items()):
            state = bucket.full_state(key, old)
            state.used = {rid: n for rid, n in state.used.items() if n}
            limiter.buckets[key] = Bucket.from_delta(state, replica_id)
        untrack(limiter.buckets)  # every store into a dict tracks it again (Limiter.__init__)
        limiter.replica_id = replica_id
        # a tombstone's count was the old id's: the old id's entry carries it now
        limiter.tombstones.clear()


SHARE_LEASE_MS: Final = 2_000  # the strict-shares writer's lease (renewed every round)
SHARE_PULL_RETRY_S: Final = 2.0  # a blind writer pulls its peers again this often
_encode_state = msgspec.json.Encoder().encode
_decode_state = msgspec.json.Decoder(ShareState).decode
_decode_config = msgspec.json.Decoder(BucketConfig).decode


def _join_states(a: ShareState, b: ShareState) -> ShareState:
    ledger = Ledger.from_state(a)
    ledger.merge(Ledger.from_state(b))
    return ledger.state()


class RegionShares:
    """Strict mode's rights ledger for a region whose nodes share Redis (docs/sync.md,
    "Redis regions").

    The region holds, spends, gives and receives rights like an embedded-store region;
    what would live in one node's memory lives in Redis, per key, in its share hash
    (``RedisStore.share_key``, hash-tagged with the bucket):

    ``c`` ``i`` ``vh`` ``vo`` ``w``
        the share config the region's bucket runs on (capacity, interval, version) and
        the tokens a bucket created now lacks (rights received arrive without tokens):
        the acquire script creates a strict bucket from them, never from a node's view;
    ``L``
        the region's ledger as its writer last committed it (JSON ``ShareState``);
    ``q``
        the sequence number of the writer's writes (share.lua: a write based on an
        older reading is refused);
    ``a`` ``n`` ``m:<node>``
        tokens asked and a denial since the writer last read them, from every node,
        and the ledgers a node heard from peer regions.

    Every node counts its demand and pushes it with what it heard; the node holding
    the region's lease (the *writer*) merges all of it into its mirror's ledgers and
    runs the rebalancer there (``Limiter.rebalance``), on the region's replica id
    ``<region>/redis/<incarnation>``. A gift is computed, then taken back out of the
    mirror (nothing of it can leave yet), and committed in this order: the smaller
    share config (new buckets), the existing bucket reconfigured to it (level kept,
    clamped: what is above the new capacity is destroyed), the ledger ``L``; only then
    does it go back into the mirror, which the mesh replicates. So no region can
    spend rights before this region's bucket has stopped spending them, and a writer
    that dies between two steps leaves the region holding less than its ledger says
    (the next writer, reading ``L``, puts it right), never more.
    """

    def __init__(
        self,
        backend: RedisBackend,
        region: str,
        founders: Sequence[str],
        node: str,
        connected: Callable[[], bool],
        pull: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.backend = backend
        self.store = backend.store
        self.limiter = backend.mirror.limiter
        self.region = region
        self.founders = tuple(founders)
        self.node = node
        self.connected = connected
        self.writer = False
        self.asked: dict[str, int] = {}
        self.denied: set[str] = set()
        self.heard: dict[str, Ledger] = {}  # key -> the join of ledgers peers sent
        self.heard_dirty: set[str] = set()
        self.configs: dict[str, BucketConfig] = {}  # key -> its newest whole config heard
        self.configs_dirty: set[str] = set()
        #: key -> the whole config a lowering PATCHed here replaced (pending_lowering)
        self.lowered: dict[str, BucketConfig] = {}
        self.commits = 0
        self.conflicts = 0
        #: pulls every peer region's state (True when every one answered): what a writer
        #: blind after Redis lost its data learns the region's holdings from
        self.pull = pull
        self.pulled_for: str | None = None  # the incarnation a pull completed under
        self.ready_for: str | None = None  # the incarnation the share hashes are marked in
        self.next_pull = 0.0
        self.blind_rounds = 0
        #: (store incarnation, node -> newest incarnation) this node last put into Redis
        self.newest_pushed: tuple[str | None, dict[str, int]] = (None, {})

    # -- every node --------------------------------------------------------------

    def count(self, key: str, tokens: int, allowed: bool) -> None:
        self.asked[key] = self.asked.get(key, 0) + tokens
        if tokens and not allowed:
            self.denied.add(key)

    def heard_config(self, key: str, config: BucketConfig) -> None:
        """A strict key's own whole config (a PATCH here, or one a peer sent): the
        writer must divide it, wherever the region heard it."""
        known = self.configs.get(key)
        if known is None or config.version > known.version:
            self.configs[key] = config
            self.configs_dirty.add(key)

    def heard_from_peer(self, key: str, state: ShareState) -> None:
        known = self.heard.get(key)
        other = Ledger.from_state(state)
        if known is None:
            self.heard[key] = other
            self.heard_dirty.add(key)
        elif known.merge(other):
            self.heard_dirty.add(key)

    async def freeze(self) -> bool:
        """Put every node incarnation this node has seen into Redis (the mesh awaits it
        before answering a pull, so every writer of the region freezes the puller's
        older incarnations' gifts before it can merge one heard after the answer);
        False when Redis did not take it (the pull is refused, and tried again). With
        no strict key there is nothing to freeze: True at once (a pull of shared
        buckets is answered from the mirror while Redis is down, as before). A node
        that is not the writer then reads the region's ledgers from Redis for the
        answer (``RegionMirror.pull_ledgers``)."""
        if not self._strict():
            return True
        if not self.backend.up:
            return False
        try:
            await self._push_newest()
            if self.writer:
                self.backend.mirror.pull_ledgers = {}
            else:
                # not the writer: the answer's ledgers come from Redis (MirrorLimiter.
                # pull_ledgers), as current as the writer's mirror (docs/sync.md)
                self.backend.mirror.pull_ledgers = self._redis_ledgers(
                    await self.store.read_shares()
                )
        except (StoreUnavailable, StaleIncarnation):
            return False
        return True

    @staticmethod
    def _redis_ledgers(rows: dict[str, dict[str, str]]) -> dict[str, ShareState]:
        """Per key, the join of its share hash's committed ``L`` and every node's heard
        ``m:<node>``: every ledger entry the writer's mirror holds came from one of them
        (or is a gift of the region's own, which reaches the mirror only after ``L``)."""
        joined: dict[str, Ledger] = {}
        for key, row in rows.items():
            for field, value in row.items():
                if field != "L" and not field.startswith("m:"):
                    continue
                with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                    other = Ledger.from_state(_decode_state(value.encode()))
                    known = joined.get(key)
                    if known is None:
                        joined[key] = other
                    else:
                        known.merge(other)
        return {key: ledger.state() for key, ledger in joined.items()}

    async def _push_newest(self) -> None:
        newest = dict(self.limiter.share_newest)
        if newest and (self.store.incarnation, newest) != self.newest_pushed:
            await self.store.push_newest(f"{node}/{n}" for node, n in newest.items())
            self.newest_pushed = (self.store.incarnation, newest)

    async def _read_newest(self) -> None:
        for replica in await self.store.read_newest():
            self.limiter.observe_replica(replica)

    async def step(self) -> None:
        """One round: push this node's demand and what it heard; the writer then
        rebalances and commits."""
        if not self.backend.up:
            return
        try:
            await self._step()
        except (StoreUnavailable, StaleIncarnation) as error:
            self.backend._mark_down(error)

    def _strict(self) -> bool:
        limiter = self.limiter
        return any(c.mode == STRICT for c in limiter.rule_configs.values()) or any(
            c.mode == STRICT for c in limiter.key_configs.values()
        )

    async def _step(self) -> None:
        limiter = self.limiter
        if not self._strict():
            return  # no strict key: nothing to hold (no lease taken, no round)
        asked, denied = self.asked, self.denied
        self.asked, self.denied = {}, set()
        pushed = {
            key: (f"m:{self.node}", _encode_state(self.heard[key].state()).decode())
            for key in self.heard_dirty
        }
        self.heard_dirty = set()
        configs = {key: self.configs[key] for key in self.configs_dirty}
        self.configs_dirty = set()
        try:
            # the incarnations this node has seen, before what it heard since: a writer
            # merging the node's heard ledgers has read them first
            await self._push_newest()
            await self.store.push_shares(asked, denied, pushed)
            for key, config in configs.items():
                # into the share hash for the writer, the newest by version (rule.lua)
                await self.store.save_key_config(key, config)
        except BaseException:
            self.heard_dirty.update(pushed)
            self.configs_dirty.update(configs)
            raise
        self.writer = await self.store.share_lease(self.node, SHARE_LEASE_MS)
        if not self.writer:
            # only the writer speaks for the region (its reports carry the region's
            # demand); the others forward what they hear
            limiter.share_region = None
            return
        self.backend.mirror.pull_ledgers = {}  # the writer answers from its mirror
        if limiter.share_region is None:
            # the incarnations the region froze, before this mirror takes any ledger
            await self._read_newest()
            limiter.enable_shares(self.region, self.founders)
        await self._write_round()

    # -- the writer ------------------------------------------------------------------

    async def _write_round(self) -> None:
        limiter = self.limiter
        store = self.store
        incarnation = store.incarnation
        if incarnation is None or await store.current_incarnation() != incarnation:
            # Redis lost its data since this node last looked: nothing is written from a
            # view of the old incarnation (the store goes down and recovers first)
            raise StaleIncarnation("Redis holds another incarnation (it lost its data?)")
        ready = self.ready_for == incarnation
        if not ready and await store.shares_ready() == incarnation:
            ready = True
            self.ready_for = incarnation
        rows = await store.read_shares()
        # Every incarnation a node of the region has seen (read after the rows: one a
        # node saw before it heard a gift is in Redis before that gift is): an older
        # incarnation's gift counters are frozen here as in the node that saw the newer
        # one, a pull it answered first of all, so a gift of a dead life still in flight
        # when the pull was answered never counts (docs/sync.md, "Redis regions")
        await self._read_newest()
        now = limiter.clock()
        taken: dict[str, tuple[int, bool]] = {}
        for key, row in rows.items():
            for field, value in row.items():
                if field == "L" or field.startswith("m:"):
                    # ``L``, the region's own commits, was taken before any freeze of its
                    # counters: never frozen out (a new writer would lose those rights)
                    with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                        state = _decode_state(value.encode())
                        limiter._merge_ledger(key, state, now, frozen=field != "L")
                elif field == "c:K":
                    with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                        config = _decode_config(value.encode())
                        rule = limiter._rule_name(key)
                        if rule is not None and config.mode == STRICT:
                            delta = BucketDelta(key, 0, config, config.version, 0, {}, rule)
                            limiter._merge_strict_config(delta, now)
            tokens = int(row.get("a", "0") or 0)
            denied = "n" in row
            if tokens > 0 or denied:
                taken[key] = (max(0, tokens), denied)
                limiter.share_asked[key] = limiter.share_asked.get(key, 0) + max(0, tokens)
                if denied:
                    limiter.share_denied.add(key)
        await self.store.take_demand(taken)
        if not ready and self.pulled_for != incarnation:
            # Redis lost its data (or this region starts): the committed ledgers are
            # gone and this node's view may lack gifts the region made, so it is blind
            # (spends its floor less what it gives) until it has pulled every peer
            # region, each of which froze the older incarnations' gifts first
            # (core/shares.py), then every share hash is written again from that view
            limiter.share_blind = True
            self.blind_rounds += 1
            if self.pull is not None and time.monotonic() >= self.next_pull:
                self.next_pull = time.monotonic() + SHARE_PULL_RETRY_S
                if await self.pull():
                    self.pulled_for = incarnation
                    now = limiter.clock()
                    # what the pull brought (this node heard it: not in Redis yet)
                    for key, heard in self.heard.items():
                        limiter._merge_ledger(key, heard.state(), now)
        if ready or self.pulled_for == incarnation:
            limiter.shares_pulled()  # no-op unless blind
        # the round on the mirror; gifts taken back out of it until committed
        before = {key: ledger.state() for key, ledger in limiter.ledgers.items()}
        connected = self.connected() and not limiter.share_blind
        limiter.rebalance(now, period_s=REBALANCE_PERIOD_S, connected=connected)
        rid = limiter.replica_id
        gave: dict[str, ShareState] = {}
        for key, ledger in list(limiter.ledgers.items()):
            old = before.get(key)
            own = {p: n for p, n in ledger.given.items() if p[0] == rid}
            was = {} if old is None else Ledger.from_state(old).given
            if any(n > was.get(p, 0) for p, n in own.items()):
                gave[key] = ledger.state()
                if old is None:
                    del limiter.ledgers[key]
                else:
                    limiter.ledgers[key] = Ledger.from_state(old)
                limiter.dirty.discard(key)
        written = True
        for key in sorted(set(rows) | set(limiter.ledgers) | set(gave)):
            written = (
                await self._commit(key, rows.get(key, {}), gave.get(key), now, ready) and written
            )
        if not ready and not limiter.share_blind and written:
            # every key with a ledger in this (pulled) view has its share hash: a key
            # without one is on the initial split again (acquire.lua)
            await store.mark_shares_ready(incarnation)
            self.ready_for = incarnation

    async def _commit(
        self, key: str, row: dict[str, str], gift: ShareState | None, now: int, ready: bool
    ) -> bool:
        """Write ``key``'s share hash (and a gift) as the mirror has it now; False when
        another writer wrote it since this round read it."""
        limiter = self.limiter
        rule = limiter._rule_name(key)
        if rule is None:
            return True
        whole = limiter._whole(key, rule)
        if whole.mode != STRICT:
            return True
        kept = limiter.ledgers.get(key)
        if gift is not None:  # the share as it is once the gift is made
            limiter.ledgers[key] = Ledger.from_state(gift)
        try:
            share = limiter._share(key, whole)
            missing = limiter._received_worth(key, share.capacity)
            ledger = limiter.ledgers.get(key)
            committed = None if ledger is None else _encode_state(ledger.state()).decode()
        finally:
            if gift is not None:
                if kept is None:
                    limiter.ledgers.pop(key, None)
                else:
                    limiter.ledgers[key] = kept
        if not row:
            # a key the writer knows from peers only: listed, so the next round reads
            # its share hash (and its sequence number) back
            await self.store.push_shares({}, (), {key: ("k", "1")})
        seq = int(row.get("q", "0") or 0)
        # A share hash first written while the region is blind (Redis lost its data,
        # and with it the bucket and its level): a bucket created from it counts as
        # empty at that instant and refills from there, as a strict bucket of a node
        # restarted without a snapshot does, so no lost spending is granted again
        since = row.get("z")
        if since is None and not ready:
            since = str(now)
        if since is not None and share.capacity > 0:
            refilled = max(0, now - int(since)) // share.interval_ns
            missing = max(missing, min(share.capacity, share.capacity - refilled))
        same = (
            row.get("c") == str(share.capacity)
            and row.get("i") == str(share.interval_ns)
            and row.get("w") == str(missing)
            and row.get("z") == since
        )
        if not same:
            version = (limiter.hlc.tick(now), limiter.replica_id)
            config = msgspec.structs.replace(share, version=version)
            fields = {
                "c": str(config.capacity),
                "i": str(config.interval_ns),
                "vh": str(version[0]),
                "vo": version[1],
                "w": str(missing),
            }
            if since is not None:
                fields["z"] = since
            seq = await self.store.write_share(key, seq, fields)
            if seq < 0:
                self.conflicts += 1
                return False  # another writer wrote since: nothing more this round
            ask = Ask(key, rule, config, 0, shares=True)
            await self.backend._reconfigure([ask], now)
        if committed is not None and committed != row.get("L"):
            seq = await self.store.write_share(key, seq, {"L": committed})
            if seq < 0:
                self.conflicts += 1
                return False
            self.commits += 1
        if gift is not None:
            # committed: the mirror (and the mesh) may have it now
            limiter._merge_ledger(key, gift, now)
            limiter.dirty.add(key)
        return True


class RedisBackend:
    """The decision seam (core/decisions.py) on Redis: decides through Redis, falls
    back per rule, and keeps the mirror and Redis joined."""

    def __init__(
        self,
        rules: Sequence[Rule],
        *,
        region: str,
        node: str,
        url: str,
        timeout_s: float = 0.1,
        connections: int = 4,
        calls_in_flight: int = REDIS_CALLS_IN_FLIGHT,
        max_buckets: int = 1_000_000,
        regions: int = 1,
        sync_interval_s: float | None = None,
    ) -> None:
        self.region = region
        self.regions = regions
        self.store = RedisStore(url, region, timeout_s=timeout_s, connections=connections)
        self.idempotency = RegionIdempotency(self.store)
        #: at most this many acquire calls in flight (storage.redisCallsInFlight): what
        #: arrives meanwhile waits and goes in the next call
        self.max_inflight = calls_in_flight
        self.rules_named = {rule.name: rule for rule in rules}
        started_ms = time.time_ns() // 1_000_000
        self.mirror = RegionMirror(
            rules,
            forward=self._queue_remote,
            replica_id=f"{region}/redis/unknown",
            max_buckets=max_buckets,
            regions=regions,
        )
        self.synced = sync_interval_s is not None
        for name, config in self.mirror.limiter.rule_configs.items():
            problem = check_exact(config)
            if problem is not None:
                raise SystemExit(f"rule {name!r}: {problem}")
        # The `local` policy's buckets: this node's own replica id, new every start.
        self.local = Limiter(
            rules,
            replica_id=f"{region}/{node}-local/{started_ms}",
            max_buckets=max_buckets,
            regions=regions,
        )
        # Keys read back into the mirror after a grant, for every rule: the mesh
        # replicates them, `local` seeds its fallback buckets from them, and if Redis
        # loses its data the mirror is merged back, so no policy hands spent tokens back.
        self.tracked = {rule.name for rule in rules}
        self.refresh_interval_s = sync_interval_s or REFRESH_INTERVAL_S
        self.up = False
        self.last_error = "not connected yet"
        self.eviction_warning: str | None = None
        self.checks = 0
        #: the decisions queued for the next script call, in order, and where each unit
        #: of more than one decision (a batch: it never splits across calls) lies in it
        self.pending: list[Waiter] = []
        self.pending_units: list[tuple[int, int]] = []
        #: key -> the last Ask made for it and the rule it was asked under (None: the
        #: key's own); immutable, reused while the rule's config object, the tokens
        #: and the key's place in the mirror are the same
        self.asks: dict[str, tuple[Ask, str | None]] = {}
        self.inflight = 0
        self.flush_scheduled = False
        self.touched: set[str] = set()
        # keys granted in Redis, not in the mirror until the next read-back: they
        # count against max_buckets, so the mirror has room for them then
        self.unmirrored: set[str] = set()
        #: key -> the shadow mark Redis held with its config at the key's last refusal
        #: (exact where the mirror may lag: a PATCH on another node of the region)
        self.refused_shadow: dict[str, bool] = {}
        # keys being read back right now (out of ``touched``, not yet in the mirror)
        self.reading = 0
        self.local_spent: set[str] = set()
        self.seeded: set[str] = set()
        self.remote: list[BucketDelta] = []
        self.remote_rules: dict[str, BucketConfig] = {}
        self.resync = False
        self.merge_back = False
        self.remote_wake = asyncio.Event()
        self.health_wake = asyncio.Event()
        #: strict keys in the region's rights ledger (``enable_shares``), else None:
        #: the static 1/regions split
        self.shares: RegionShares | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.running: set[asyncio.Task[None]] = set()
        self.groups = itertools.count(1)
        # metrics
        self.fallbacks: dict[str, int] = dict.fromkeys(POLICIES, 0)
        self.outages = 0
        self.recoveries = 0
        self.calls = 0
        self.decided = 0
        self.reconfigured = 0

    def enable_shares(
        self,
        founders: Sequence[str],
        node: str,
        connected: Callable[[], bool],
        pull: Callable[[], Awaitable[bool]] | None = None,
    ) -> RegionShares:
        """Strict keys hold, spend, give and receive rights in the region's ledger
        (``RegionShares``; ``node``: this process's id for the writer's lease,
        ``connected``: every peer region is up, ``pull``: pulls every peer region's
        state, True when each answered)."""
        self.shares = RegionShares(self, self.region, founders, node, connected, pull)
        self.asks.clear()  # a strict key's Ask says it runs on the ledger now
        self.mirror.shares = True
        self.mirror.share_region = self.region
        self.mirror.share_freeze = self.shares.freeze
        return self.shares

    # -- the decision seam: what the front doors see -----------------------------------

    @property
    def replica_id(self) -> str:
        return self.mirror.replica_id

    @property
    def rules(self) -> list[Rule]:
        return self.mirror.limiter.rules

    @property
    def rules_by_name(self) -> dict[str, Rule]:
        return self.mirror.limiter.rules_by_name

    clock = staticmethod(time.time_ns)

    def rule_config(self, name: str) -> BucketConfig:
        return self.mirror.limiter.rule_configs[name]

    def rule_of(self, key: str) -> str:
        return self.mirror.limiter.rule_of(key)

    def shadowed(self, rule: str, key: str) -> bool:
        """Shadow mode of a refusal: as the config in Redis said when the script refused
        it (front doors ask right after the refusal), else (a fallback decision) as the
        mirror's configs say."""
        found = self.refused_shadow.get(key)
        if found is not None:
            return found
        return self.mirror.limiter.shadowed(rule, key)

    def holds(self, key: str) -> bool:
        return key in self.mirror.buckets

    def live_buckets(self) -> int:
        return len(self.mirror.buckets)

    def commit(self) -> None:
        """Decisions are as durable as Redis makes them once its script has answered."""
        return None

    def acquire(
        self, key: str, tokens: int = 1, *, rule: str | None = None
    ) -> Decision | asyncio.Future[Decision]:
        """One decision, made in Redis with the others of this loop turn (a future), or
        at once by the rule's ``onStoreFailure`` policy while Redis is down."""
        made: Decision | asyncio.Future[Decision] = self.acquire_into(key, tokens, None, rule=rule)
        return made

    def acquire_into(self, key: str, tokens: int, sink: Any, *, rule: str | None = None) -> Any:
        """``acquire``, answered through ``sink``: the Decision now (the store is down:
        the rule's policy answers), or ``sink`` itself, waiting in the queue for the
        decision (or its error). ``sink`` has a future's ``done()``,
        ``set_result(decision)`` and ``set_exception(error)``, or is None for a new
        future (``acquire``); every path that answers a queued decision (``_replied``,
        the task's, the policy's) calls them at once, so a grant goes from the reply's
        done callback to the sink without a future or a loop turn (api/hot.py's later
        answer, issue 19 P6). ``sink`` must not raise: the decisions answered after it
        in the same reply would get its error."""
        if tokens < 0:
            raise self._invalid_ask(key, rule, tokens)
        made = self.asks.get(key)
        limiter = self.mirror.limiter
        if (
            made is None
            or made[1] != rule
            or made[0][3] != tokens
            or made[0][2] is not limiter.rule_configs[made[0][1]]
            or (key not in limiter.buckets and key not in self.unmirrored)
        ):
            # ``ask`` does it all; the Ask it made for the same ``rule`` argument is
            # what it would make again while none of the above changes (the rules,
            # and so the rule a key resolves to, are fixed; a key in the mirror or
            # being read back into it passes the cap's check)
            ask = self.ask(key, rule, tokens)
            asks = self.asks
            if len(asks) >= MAX_CACHED_ASKS:
                asks.clear()
            asks[key] = (ask, rule)
        else:
            ask = made[0]
        if not self.up:
            return self._fallback(ask)
        # The hot path: the sink answered straight from the script's answer
        # (``enqueue`` and ``_schedule`` inlined). The loop is looked up only when
        # needed: on Python 3.11 ``get_running_loop`` is a getpid(2) system call.
        if sink is None:
            sink = asyncio.get_running_loop().create_future()
        self.pending.append((ask, sink))
        if not self.flush_scheduled and self.inflight < self.max_inflight:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return sink

    def acquire_columns(self, items: Sequence[Any]) -> None:
        """Never at once: every batch takes ``acquire_many`` (core/decisions.py)."""
        return None

    def acquire_many(
        self, asks: Sequence[Wanted], *, atomic: bool = False
    ) -> list[Decision] | asyncio.Future[list[Decision]]:
        """A batch's decisions in one script call; every item is checked against the
        mirror's view first (its rule, its tokens, room under the cap)."""
        request = next(self.groups)
        group = request if atomic else 0
        out: list[Ask] = []
        rule_of: dict[str, str] = {}
        for index, (key, tokens, rule) in enumerate(asks):
            try:
                if tokens < 0:
                    raise self._invalid_ask(key, rule, tokens)
                ask = self.ask(key, rule, tokens, group, request)
                named = rule_of.setdefault(key, ask.rule)
                if ask.rule != named:
                    raise RuleMismatch(
                        f"key {key!r} is asked for under rules {named!r} and {ask.rule!r}; "
                        "a key has one bucket, under one rule"
                    )
                # a strict key in the rights ledger: its whole limit (above the region's
                # share but within it is a denial, the share may grow), as the embedded
                # store checks it
                capacity = (
                    self._whole_capacity(ask) if ask.shares else self._key_config(ask).capacity
                )
                if tokens > capacity:
                    raise _invalid(tokens, capacity)
            except LimiterError as error:
                raise error.at(index) from None
            out.append(ask)
        if atomic and self.store.cluster and len({self.store.slot_of(a.key) for a in out}) > 1:
            # one script call decides a group atomically, and a script's keys must
            # share one Cluster slot
            slot = self.store.slot_of(out[0].key)
            index = next(j for j, a in enumerate(out) if self.store.slot_of(a.key) != slot)
            raise CrossSlotBatch(
                "on Redis Cluster the keys of an atomic batch must share one hash slot: "
                f"{out[index].key!r} is not in the slot of {out[0].key!r} "
                "(docs/storage-redis.md, Redis Cluster)"
            ).at(index)
        if not self.up:
            return self._fallback_many(out, atomic)
        return asyncio.ensure_future(self._submit(out))

    def _invalid_ask(self, key: str, rule: str | None, tokens: int) -> InvalidTokens:
        limiter = self.mirror.limiter
        config = limiter.rule_configs[limiter.resolve_rule(key, rule).name]
        return _invalid(tokens, config.capacity)

    async def inspect_now(self, key: str, rule: str | None = None) -> Bucket:
        # A read answers from the mirror after joining Redis's state into it; with
        # Redis down it answers from the mirror as it stands (the last known state).
        if self.up:
            with contextlib.suppress(StoreUnavailable, StaleIncarnation):
                await self.refresh([key])
        return self.mirror.limiter.inspect(key, rule=rule)

    def inspect(self, key: str, *, rule: str | None = None) -> Bucket | asyncio.Future[Bucket]:
        limiter = self.mirror.limiter
        if key not in limiter.buckets:
            limiter.resolve_rule(key, rule)  # NoRuleError now, not from the future
        if not self.up:
            return limiter.inspect(key, rule=rule)
        return asyncio.ensure_future(self.inspect_now(key, rule))

    def configure(
        self,
        key_or_rule: str,
        *,
        capacity: int | None = None,
        refill_rate: float | None = None,
        ttl: float | None = None,
        mode: str | None = None,
        shadow: bool | None = None,
    ) -> asyncio.Future[BucketConfig]:
        """A runtime change: joined into the mirror (the mesh replicates it) and put into
        Redis for the region's other nodes (when Redis is back, if it is down)."""
        return asyncio.ensure_future(
            self._configure(key_or_rule, capacity, refill_rate, ttl, mode, shadow)
        )

    async def _configure(
        self,
        key: str,
        capacity: int | None,
        refill_rate: float | None,
        ttl: float | None,
        mode: str | None,
        shadow: bool | None = None,
    ) -> BucketConfig:
        is_rule = key in self.mirror.limiter.rules_by_name
        if not is_rule and self.up:
            with contextlib.suppress(StoreUnavailable, StaleIncarnation):
                await self.refresh([key])
        old = None
        if self.shares is not None and not is_rule:
            limiter = self.mirror.limiter
            rule_name = limiter._rule_name(key)
            old = None if rule_name is None else limiter._whole(key, rule_name)
        config = self.mirror.configure(
            key, capacity=capacity, refill_rate=refill_rate, ttl=ttl, mode=mode, shadow=shadow
        )
        if self.shares is not None and not is_rule and config.mode == STRICT:
            self.shares.heard_config(key, config)
            if old is not None and (
                config.capacity < old.capacity or config.interval_ns > old.interval_ns
            ):
                self.shares.lowered[key] = old
        if self.up:
            try:
                await self.publish(key, is_rule)
                return config
            except (StoreUnavailable, StaleIncarnation) as error:
                self._mark_down(error)
        # Accepted and replicated by the mesh; Redis gets it when it is back.
        if is_rule:
            self.remote_rules[key] = self.mirror.limiter.rule_configs[key]
        else:
            self.resync = True
        return config

    def sweep(self, budget: int) -> None:
        """The node's periodic sweep of idle buckets in the mirror."""
        limiter = self.mirror.limiter
        limiter.expire_step(budget=budget)
        if not self.synced:
            limiter.dirty.clear()
            limiter.dirty_rules.clear()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, supervisor: Supervisor | None = None) -> None:
        """Take the store's incarnation if Redis answers (else start down and retry),
        then run the health, merge and read-back loops under ``supervisor`` (a loop that
        fails is logged, counted, shown and restarted: ``telemetry/tasks.py``)."""
        try:
            await self._rejoin(timeout_s=max(1.0, self.store.timeout_s))
            self.up = True
            await self._check_eviction(timeout_s=max(1.0, self.store.timeout_s))
        except (StoreUnavailable, StaleIncarnation) as error:
            self._mark_down(error)
        tasks = supervisor or Supervisor(log)
        self.tasks = [
            tasks.run("redis-health", self._health_loop),
            tasks.run("redis-merge", self._remote_loop),
            tasks.run("redis-refresh", self._refresh_loop),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(self.tasks)
        if self.up and (self.remote or self.resync):
            with contextlib.suppress(StoreUnavailable, StaleIncarnation):
                await self._merge_remote()
        await self.store.close()

    def readiness(self) -> str:
        """``ok`` (with a warning after ``;`` when Redis would evict bucket state), or
        why the store is unavailable."""
        if not self.up:
            return f"redis unavailable: {self.last_error}"
        return "ok" if self.eviction_warning is None else f"ok; warning: {self.eviction_warning}"

    async def _check_eviction(self, timeout_s: float | None = None) -> None:
        """Warn (log, /readyz) when Redis's maxmemory-policy may evict bucket hashes or
        the incarnation key: docs/storage-redis.md says it must be noeviction."""
        policy = await self.store.eviction_policy(timeout_s)
        warning = None
        if policy is not None and policy != "noeviction":
            warning = (
                f"Redis maxmemory-policy is {policy}: it may evict bucket state (spent tokens "
                "come back); run Redis with maxmemory-policy noeviction"
            )
        if warning is not None and warning != self.eviction_warning:
            log.warning("%s", warning)
        self.eviction_warning = warning

    def _mark_down(self, error: BaseException) -> None:
        self.refused_shadow.clear()  # the policy decides now: the mirror's marks
        self.last_error = str(error) or type(error).__name__
        if self.up:
            self.outages += 1
            log.warning("redis store down: %s", self.last_error)
        self.up = False
        self.seeded.clear()
        self.health_wake.set()

    # -- decisions -----------------------------------------------------------------

    def ask(
        self, key: str, rule_name: str | None, tokens: int, group: int = 0, request: int = 0
    ) -> Ask:
        limiter = self.mirror.limiter
        buckets = limiter.buckets
        held = buckets.get(key) if rule_name is None else None
        if held is not None and held.rule in limiter.rules_by_name:
            # a live bucket decides under its rule, as the embedded store's does (a key
            # no template produces, created under a rule named then)
            rule = limiter.rules_by_name[held.rule]
        else:
            rule = limiter.resolve_rule(key, rule_name)
        if key not in buckets:
            check_key(key)
            if (
                rule.name in self.tracked
                and key not in self.unmirrored
                and len(buckets) + len(self.unmirrored) >= limiter.max_buckets
            ):
                self._refuse_at_cap()
        whole = limiter.rule_configs[rule.name]
        config = whole if self.regions == 1 else share_of(whole, self.regions)
        if self.shares is not None and whole.mode == STRICT:
            return Ask(key, rule.name, config, tokens, group, request, True)
        return _tuple_new(Ask, (key, rule.name, config, tokens, group, request, False))

    def _refuse_at_cap(self) -> None:
        """A new key while the mirror is full: refused (503 + Retry-After, as the memory
        backend does), since the mirror could not hold it when it is read back from
        Redis and the key would never be replicated."""
        mirror = self.mirror.limiter
        mirror.expire()
        if len(mirror.buckets) + len(self.unmirrored) >= mirror.max_buckets:
            mirror.cap_rejections += 1
            raise BucketCapReached(
                f"{len(mirror.buckets)} live buckets (+{len(self.unmirrored)} being read "
                "back from Redis): the cap (max_buckets) is reached"
            )

    async def _submit(self, asks: list[Ask]) -> list[Decision]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Decision]] = [loop.create_future() for _ in asks]
        self.enqueue(list(zip(asks, futures, strict=True)))
        return [await future for future in futures]

    def enqueue(self, unit: list[Waiter]) -> None:
        """Queue decisions for the next script call; each future is resolved with the
        Decision or the error (InvalidTokens, ...) once it is known. A unit never splits."""
        if len(unit) > 1:
            start = len(self.pending)
            self.pending_units.append((start, start + len(unit)))
        self.pending.extend(unit)
        self._schedule()

    def _schedule(self) -> None:
        if not self.flush_scheduled and self.inflight < self.max_inflight and self.pending:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send what is queued, as one script call (a group never splits across two)."""
        self.flush_scheduled = False
        if not self.pending or self.inflight >= self.max_inflight:
            return
        batch = self.pending
        if len(batch) <= MAX_DECISIONS_PER_CALL:
            # the usual case: everything queued fits in one call
            self.pending = []
            if self.pending_units:
                self.pending_units = []
        else:
            # the first MAX_DECISIONS_PER_CALL, and the rest of a unit they cut into
            cut = MAX_DECISIONS_PER_CALL
            for start, end in self.pending_units:
                if start < cut < end:
                    cut = end
                    break
            batch, self.pending = batch[:cut], batch[cut:]
            self.pending_units = [(s - cut, e - cut) for s, e in self.pending_units if s >= cut]
        self.inflight += 1
        if self.up:
            # the usual case: the call written at once on the open raw link, its reply
            # answered by a done callback (no task, no coroutine, no timer per call)
            now = time.time_ns()
            sent = self.store.send_acquire([waiter[0] for waiter in batch], now)
            if sent is not None:
                reply, keys = sent
                reply.add_done_callback(partial(self._replied, batch, keys, now))
                return
        self._start(batch)

    def _start(self, batch: list[Waiter], reconfigure_at: int | None = None) -> None:
        """Decide ``batch`` in a task (the store's coroutines: opening the link, Cluster,
        TLS, a NOSCRIPT, a reconfiguration); it ends the call ``_flush`` counted."""
        task = asyncio.get_running_loop().create_task(self._decide(batch, reconfigure_at))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    def _replied(
        self, batch: list[Waiter], keys: dict[str, int], now: int, reply: asyncio.Future[Any]
    ) -> None:
        """The reply to a call ``send_acquire`` wrote: ``_decide`` without its task, for
        the usual case; the same answers and the same failures."""
        store = self.store
        left = batch  # the decisions not answered yet (see _decide)
        handed = False  # to a task, which ends the call
        try:
            try:
                raw = reply.result()
                if isinstance(raw, hiredis.ReplyError):
                    if str(raw).startswith("NOSCRIPT"):
                        # the script did not run (Redis restarted, SCRIPT FLUSH): the
                        # task's path loads it
                        handed = True
                        self._start(batch)
                        return
                    raise RedisError(str(raw))
            except (RedisError, OSError) as error:  # OSError: TimeoutError, ConnectionError
                raise store.unavailable(error) from None
            if len(raw) == 1:
                store.verdicts(raw, [waiter[0] for waiter in batch], keys)  # raises if stale
            self.calls += 1
            redo: list[Waiter] = []
            tracked = self.tracked
            touched = self.touched
            mirrored = self.mirror.limiter.buckets
            # each key's part of the reply (capacity, interval, mode, rule, shadow) once
            base = 4 * len(batch)
            key_parts = [raw[base + 5 * k : base + 5 * k + 5] for k in range(len(keys))]
            rates = [NS_PER_S / part[1] for part in key_parts]
            j = 0
            granted = 0
            last: Ask | None = None  # the Ask the grant below last looked up
            key = mode = rule = ""
            capacity = 0
            rate = 0.0
            for waiter in batch:
                ask = waiter[0]
                status = raw[j]
                if status == ALLOWED and not ask.shares:
                    # the hot path (_answer's first branch, Verdict.decision inlined);
                    # a key's Ask is reused (acquire), so a run of one key's grants
                    # looks its key up once
                    granted += 1
                    if ask is not last:
                        last = ask
                        key = ask.key
                        if ask.tokens and ask.rule in tracked:
                            touched.add(key)
                            if key not in mirrored:
                                self.unmirrored.add(key)
                        k = keys[key] - 1
                        part = key_parts[k]
                        capacity, mode, rule = part[0], part[2], part[3]
                        rate = rates[k]
                    future = waiter[1]
                    if not future.done():
                        future.set_result(
                            Decision(
                                True,
                                key,
                                raw[j + 1],
                                capacity,
                                rate,
                                raw[j + 2] / NS_PER_S,
                                raw[j + 3] / NS_PER_S,
                                mode,
                                rule,
                            )
                        )
                elif status == RECONFIGURE:
                    redo.append(waiter)
                else:
                    part = key_parts[keys[ask.key] - 1]
                    verdict = Verdict(
                        raw[j],
                        raw[j + 1],
                        raw[j + 2],
                        raw[j + 3],
                        part[0],
                        part[1],
                        part[2],
                        part[3],
                        part[4] == 1,
                    )
                    self._answer(waiter, verdict)
                j += 4
            self.decided += granted
            left = []
            if redo:
                # adopt the newer config first, then decide those again: a task
                handed = True
                self._start(redo, now)
        except BaseException as error:
            if not self._call_failed(left, error):
                raise
        finally:
            if not handed:
                self._end_call(left)

    def _call_failed(self, left: list[Waiter], error: BaseException) -> bool:
        """A script call failed with ``error``, ``left`` unanswered: a store failure
        marks the store down and sends them to the rules' policies (True: handled);
        anything else answers each with ``error``, never leaving a request hanging
        (False: the caller raises it)."""
        if isinstance(error, (StoreUnavailable, StaleIncarnation)):
            self._mark_down(error)
            self._resolve_by_policy(left)
            return True
        for _, future in left:
            _settle(future, error)
        return False

    def _end_call(self, left: list[Waiter]) -> None:
        """A call is over: refusals for anything still unanswered, the next call."""
        self.inflight -= 1
        for ask, future in left:
            _settle(future, self._refusal(ask))
        self._schedule()

    async def _decide(self, batch: list[Waiter], reconfigure_at: int | None = None) -> None:
        # `left`: the decisions not answered yet (the store answers some, then may
        # fail while redoing the others: only those go to the policy, no double charge)
        left = list(batch)
        try:
            await self._decide_in_store(left, reconfigure_at)
        except BaseException as error:
            if not self._call_failed(left, error):
                raise
        finally:
            # Whatever went wrong above, nothing stays unanswered: a refusal for
            # anything left (a future resolved twice keeps its first answer).
            self._end_call(left)

    async def _decide_in_store(self, left: list[Waiter], reconfigure_at: int | None) -> None:
        """Decide ``left`` in the store; what is answered is removed from it.
        ``reconfigure_at``: the script answered RECONFIGURE for all of them at that time
        (``_replied``): adopt the newer configs before the first try."""
        batch = list(left)
        tries = 4
        if reconfigure_at is not None:
            await self._reconfigure({ask.key: ask for ask, _ in batch}.values(), reconfigure_at)
            tries = 3
        for _ in range(tries):
            if not self.up:
                raise StoreUnavailable(self.last_error)
            now = time.time_ns()
            asks = [ask for ask, _ in batch]
            # StaleIncarnation (Redis lost its data) goes to the policy: the store
            # stays down until the mirror has been merged back under the new
            # incarnation (_recover), or a fresh bucket would be created here and
            # the merge-back of the older epoch ignored.
            try:
                verdicts: Sequence[Verdict | None] = await self.store.acquire(asks, now)
            except (StoreUnavailable, StaleIncarnation) as error:
                if error.verdicts is None:
                    raise
                # Redis Cluster: some slots answered, others failed. The answered
                # decisions keep their answer; the rest (and any redo) go to the policy.
                unanswered: list[Waiter] = []
                for waiter, verdict in zip(batch, error.verdicts, strict=True):
                    if verdict is None or verdict.status == RECONFIGURE:
                        unanswered.append(waiter)
                    else:
                        self._answer(waiter, verdict)
                left[:] = unanswered
                raise
            self.calls += 1
            redo: list[Waiter] = []
            for waiter, verdict in zip(batch, verdicts, strict=True):
                assert verdict is not None
                if verdict[0] == RECONFIGURE:
                    redo.append(waiter)
                else:
                    self._answer(waiter, verdict)
            left[:] = redo
            if not redo:
                return
            await self._reconfigure({ask.key: ask for ask, _ in redo}.values(), now)
            batch = redo
        raise StoreUnavailable("a bucket kept changing its config under this node")

    def _answer(self, waiter: Waiter, verdict: Verdict) -> None:
        ask, future = waiter
        self.decided += 1
        status = verdict[0]
        if status == ALLOWED and not ask.shares:
            # the hot path: a grant
            if ask.tokens and ask.rule in self.tracked:
                key = ask.key
                self.touched.add(key)
                if key not in self.mirror.buckets:
                    self.unmirrored.add(key)
            _settle(future, verdict.decision(ask.key))
            return
        if ask.shares and self.shares is not None:
            self.shares.count(ask.key, ask.tokens, verdict.status == ALLOWED)
            if verdict.status == INVALID_TOKENS and ask.tokens <= self._whole_capacity(ask):
                # above the region's share, not above the key's limit: a denial (the
                # share may grow), as the embedded store answers it
                _settle(future, self._refusal(ask))
                return
        if verdict.status == INVALID_TOKENS:
            # above what the key can ever take: its whole limit when its rights move
            # between regions (as the embedded store names it), else its capacity here
            whole = ask.shares and self.shares is not None
            capacity = self._whole_capacity(ask) if whole else verdict.capacity
            _settle(future, _invalid(ask.tokens, capacity))
            return
        if verdict.status == ALLOWED:
            if ask.tokens and ask.rule in self.tracked:
                self.touched.add(ask.key)
                if ask.key not in self.mirror.buckets:
                    self.unmirrored.add(ask.key)
        else:
            shadows = self.refused_shadow
            if len(shadows) >= MAX_REFUSED_SHADOW:
                shadows.clear()
            shadows[ask.key] = verdict.shadow
        _settle(future, verdict.decision(ask.key))

    async def _reconfigure(self, asks: Iterable[Ask], now: int) -> None:
        """Adopt the rule's newer config in Redis: ``bucket.py`` computes the base that
        keeps the level at this instant, the merge script joins it in (a proposal like
        any other replica's: concurrent ones from other nodes join harmlessly)."""
        asks = list(asks)
        by_key = {ask.key: ask for ask in asks}
        rid = self.store.replica_id or self.mirror.replica_id
        proposals = []
        for state in await self.store.read(list(by_key)):
            bucket = Bucket.from_delta(state, rid)
            config = by_key[state.key].config
            if config.version > bucket.config.version:
                bucket.reconfigure(config, now)
                proposals.append(bucket.full_state(state.key, rid))
        self.reconfigured += len(proposals)
        await self.store.merge(proposals, now)

    # -- failure policies ------------------------------------------------------------

    def _policy(self, ask: Ask) -> str:
        return self.rules_named[ask.rule].on_store_failure

    def _resolve_by_policy(self, batch: list[Waiter]) -> None:
        groups: dict[int, list[Waiter]] = {}
        for ask, future in batch:
            if ask.group:
                groups.setdefault(ask.group, []).append((ask, future))
                continue
            try:
                _settle(future, self._fallback(ask))
            except (InvalidTokens, BucketCapReached) as error:
                _settle(future, error)
        # Each group on its own: one group's error must not leave the next unanswered.
        for items in groups.values():
            try:
                decisions = self._fallback_many([ask for ask, _ in items], atomic=True)
            except (InvalidTokens, BucketCapReached) as error:
                for _, future in items:
                    _settle(future, error)
                continue
            for (_, future), decision in zip(items, decisions, strict=True):
                _settle(future, decision)

    def pending_lowering(self, key: str) -> dict[str, object] | None:
        """A lowering PATCHed here of a strict key in the region's rights ledger: never
        in force at once, the region's writer burns it from its next round (api/routes.py
        answers 202; docs/sync.md, "Redis regions"). None otherwise."""
        if self.shares is None:
            return None
        old = self.shares.lowered.pop(key, None)
        if old is None:
            return None
        return {
            "bound": {"capacity": old.capacity, "refill_rate": NS_PER_S / old.interval_ns},
            "cut": [],
            "waiting": sorted(set(self.shares.founders)),
        }

    def _whole_capacity(self, ask: Ask) -> int:
        limiter = self.mirror.limiter
        return limiter._whole(ask.key, ask.rule).capacity

    @staticmethod
    def _refusal(ask: Ask, config: BucketConfig | None = None) -> Decision:
        """A plain refusal (``Retry-After: 1``), for a decision nothing else could answer
        and for the ``deny`` policy; ``config`` defaults to the ask's."""
        cfg = config or ask.config
        rate = NS_PER_S / cfg.interval_ns
        return Decision(
            False, ask.key, 0, cfg.capacity, rate, DENY_RETRY_S, 0.0, cfg.mode, ask.rule
        )

    def _key_config(self, ask: Ask) -> BucketConfig:
        """The key's own config as the mirror knows it (a PATCH may have changed it),
        else the rule's: what the fallback checks tokens against."""
        bucket = self.mirror.buckets.get(ask.key)
        if bucket is not None and bucket.rule == ask.rule:
            return bucket.config
        return ask.config

    def _fallback(self, ask: Ask) -> Decision:
        """The decision ``onStoreFailure`` gives while Redis is unavailable."""
        policy = self._policy(ask)
        if policy == "local" and ask.shares:
            # a strict key in the rights ledger: what the region holds is in Redis, and
            # a node's own bucket on 1/R (once per node) could spend more than that
            policy = "deny"
        self.fallbacks[policy] += 1
        config = self._key_config(ask)
        if ask.shares:
            config = msgspec.structs.replace(config, capacity=self._whole_capacity(ask))
        if ask.tokens > config.capacity:
            raise _invalid(ask.tokens, config.capacity)
        if policy == "local":
            return self._local(ask)
        rate = NS_PER_S / config.interval_ns
        if policy == "allow":
            remaining = config.capacity - ask.tokens
            return Decision(
                True, ask.key, remaining, config.capacity, rate, 0.0, 0.0, config.mode, ask.rule
            )
        return self._refusal(ask, config)

    def _local(self, ask: Ask) -> Decision:
        key = ask.key
        if key not in self.seeded:
            # Start from the region's state as this node last saw it, not from full.
            self.seeded.add(key)
            if key in self.mirror.buckets:
                self.local.merge(self.mirror.full_state([key]))
        decision = self.local.acquire(key, ask.tokens, rule=ask.rule)
        if decision.allowed and ask.tokens:
            self.local_spent.add(key)
        return decision

    def _fallback_many(self, asks: list[Ask], atomic: bool) -> list[Decision]:
        if not atomic:
            return [self._fallback(ask) for ask in asks]
        # All or nothing without the store: granted whole only when every item's
        # policy is `allow`; anything else is refused whole (the safe side).
        if all(self._policy(ask) == "allow" for ask in asks):
            return [self._fallback(ask) for ask in asks]
        for ask in asks:
            self.fallbacks[self._policy(ask)] += 1
        return [self._refusal(ask) for ask in asks]

    # -- health and recovery ----------------------------------------------------------

    async def _rejoin(self, timeout_s: float | None = None) -> None:
        """Take the store's incarnation; if it changed, run the mirror under it and put
        the mirror's copy of the region state back into Redis."""
        previous = self.store.incarnation
        await self.store.join(timeout_s)
        rid = self.store.replica_id
        assert rid is not None
        if rid != self.mirror.replica_id:
            self.mirror.rename(rid)
            if previous is not None:
                # Merged back before any decision under the new incarnation (callers
                # keep the store down until this returns): a decision first would
                # create a fresh bucket with a newer epoch, and the merge of the
                # older epoch would then be ignored (a drained bucket refilled).
                self.merge_back = True
                await self._merge_back()
                log.warning(
                    "redis store incarnation changed (%s -> %s): Redis lost its data, "
                    "state merged back",
                    previous,
                    self.store.incarnation,
                )

    async def _merge_back(self) -> None:
        """Put the mirror's copy of the region state into Redis (after it lost it)."""
        await self._merge_mirror()
        self.merge_back = False

    async def _merge_mirror(self) -> None:
        """Join the mirror's copy of the region state into Redis, ``MIRROR_SLICE`` keys
        at a time: the whole mirror encoded in one piece stopped the node for as long as
        its size (3.7 s for 1,000,000 keys, benchmarks/patch_stall.py --redis)."""
        keys = self.mirror.state_keys()
        for first in range(0, len(keys), MIRROR_SLICE):
            state = self.mirror.full_state(keys[first : first + MIRROR_SLICE]).deltas
            for start in range(0, len(state), MERGE_CHUNK):
                await self.store.merge(state[start : start + MERGE_CHUNK], time.time_ns())
            await asyncio.sleep(0)  # a slice of strict keys only merges nothing: yield

    async def _recover(self) -> None:
        await self.store.ping()
        current = await self.store.current_incarnation()
        if current is None or current != self.store.incarnation or self.store.slot_lost:
            await self._rejoin()
        elif self.store.cluster and self.mirror.buckets:
            # A Cluster failover (a replica promoted) forgets the writes the master
            # acknowledged but had not replicated yet: what the mirror read back
            # before goes back in (max-merge: harmless where nothing was lost), in the
            # background while decisions go to Redis again. The buckets are still
            # there (same epoch, a little behind), so the merge joins whenever it
            # lands; meanwhile at most the unreplicated grants can be granted again.
            self.resync = True
        if self.merge_back:  # a merge-back an earlier attempt did not finish
            await self._merge_back()
        for name, config in self.mirror.limiter.rule_configs.items():
            if config.version[0] > 0:
                await self.store.save_rule(name, config)
        # Local decisions go on while this runs: repeat until nothing is left, then
        # switch back without an await in between, so no local spending is stranded.
        while self.local_spent:
            spent = list(self.local_spent)
            self.local_spent.clear()
            states = []
            for key in spent:
                bucket = self.local.bucket(key)
                if bucket is not None:
                    states.append(bucket.full_state(key, self.local.replica_id))
            try:
                for start in range(0, len(states), MERGE_CHUNK):
                    await self.store.merge(states[start : start + MERGE_CHUNK], time.time_ns())
            except BaseException:
                self.local_spent.update(spent)
                raise
            self.touched.update(spent)
        self.up = True
        self.recoveries += 1
        self.remote_wake.set()
        log.warning("redis store back")

    async def _health_loop(self) -> None:
        while True:
            if self.up:
                self.health_wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.health_wake.wait(), CHECK_INTERVAL_S)
                if not self.up:
                    continue
                try:
                    await self._check()
                except (StoreUnavailable, StaleIncarnation) as error:
                    self._mark_down(error)
            else:
                await asyncio.sleep(PROBE_INTERVAL_S)
                with contextlib.suppress(StoreUnavailable, StaleIncarnation):
                    await self._recover()
            self.local.expire_step(budget=20_000)

    async def _check(self) -> None:
        """While up: notice a wiped Redis, and learn rule configs other nodes changed."""
        current = await self.store.current_incarnation()
        if current != self.store.incarnation:
            # down until _recover has taken the new incarnation and merged back
            raise StaleIncarnation(f"Redis holds incarnation {current}, not ours")
        self.checks += 1
        if self.checks % EVICTION_CHECK_EVERY == 0:
            await self._check_eviction()
        now = time.time_ns()
        for name, config in (await self.store.load_rules()).items():
            if name in self.mirror.limiter.rule_configs:
                self.mirror.limiter.merge_rule(name, config, now)
                self.local.merge_rule(name, config, now)

    # -- replication -------------------------------------------------------------------

    def _queue_remote(self, batch: DeltaBatch) -> None:
        """What a peer sent, for the merge script (the mirror has joined it already)."""
        for name, config in batch.rules.items():
            known = self.remote_rules.get(name)
            if known is None or config.version > known.version:
                self.remote_rules[name] = config
        if self.shares is not None:
            for delta in batch.deltas:
                if delta.config.mode == STRICT and delta.epoch == 0:
                    if delta.shares is not None:
                        self.shares.heard_from_peer(delta.key, delta.shares)
                    if delta.config.version[0] > 0:  # a PATCH's, not the file's
                        self.shares.heard_config(delta.key, delta.config)
        shared = [delta for delta in batch.deltas if delta.config.mode == SHARED]
        if len(self.remote) + len(shared) > MAX_QUEUED_MERGES:
            # The mirror holds all of it: merge the mirror whole instead.
            self.remote.clear()
            self.resync = True
        else:
            self.remote.extend(shared)
        self.remote_wake.set()

    async def _merge_remote(self) -> None:
        now = time.time_ns()
        while self.remote_rules:
            name, config = next(iter(self.remote_rules.items()))
            await self.store.save_rule(name, config)
            if self.remote_rules.get(name) is config:
                del self.remote_rules[name]
        if self.resync:
            self.resync = False
            self.remote.clear()
            try:
                await self._merge_mirror()
            except BaseException:
                self.resync = True
                raise
        while self.remote:
            chunk = self.remote[:MERGE_CHUNK]
            await self.store.merge_remote(chunk, now, self.mirror.replica_id)
            del self.remote[: len(chunk)]

    async def _remote_loop(self) -> None:
        while True:
            await self.remote_wake.wait()
            self.remote_wake.clear()
            if not self.up:
                continue
            try:
                await self._merge_remote()
            except (StoreUnavailable, StaleIncarnation) as error:
                self._mark_down(error)

    async def _refresh_loop(self) -> None:
        """Read back the keys this node decided on, for the mesh and for `local`."""
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            if not self.up or not self.touched:
                continue
            keys = list(itertools.islice(self.touched, MAX_REFRESH_KEYS))
            self.touched.difference_update(keys)
            self.reading = len(keys)
            try:
                await self.refresh(keys)
            except (StoreUnavailable, StaleIncarnation) as error:
                self.touched.update(keys)
                self._mark_down(error)
            finally:
                self.reading = 0

    async def refresh(self, keys: list[str]) -> None:
        """Join Redis's state of ``keys`` into the mirror."""
        states = await self.store.read(keys)
        self.mirror.absorb(states, time.time_ns())
        self.unmirrored.difference_update(keys)

    async def publish(self, key: str, is_rule: bool) -> None:
        """Put a runtime config change (PATCH) into Redis for the region's other nodes."""
        if is_rule:
            await self.store.save_rule(key, self.mirror.limiter.rule_configs[key])
        else:
            await self.store.merge(self.mirror.full_state([key]).deltas, time.time_ns())

    # -- metrics ---------------------------------------------------------------------------

    def install(self, metrics: NodeMetrics) -> None:
        """Expose the store's gauges and counters on /metrics."""
        install_limiter_metrics(metrics, self.mirror.limiter)
        metrics.gauge(
            "bucketmesh_store_up", "1 while the Redis store answers", lambda: float(self.up)
        )
        metrics.counter(
            "bucketmesh_store_failures",
            "Redis calls that failed or timed out",
            lambda: self.store.failures,
        )
        metrics.counter(
            "bucketmesh_store_outages",
            "Times the Redis store was marked down",
            lambda: self.outages,
        )
        metrics.counter(
            "bucketmesh_store_recoveries",
            "Times the Redis store came back (local spending merged into it)",
            lambda: self.recoveries,
        )
        metrics.counter(
            "bucketmesh_store_script_calls",
            "Acquire script calls (each decides a batch of requests)",
            lambda: self.calls,
        )
        metrics.counter(
            "bucketmesh_store_decisions", "Decisions made in Redis", lambda: self.decided
        )
        metrics.counter(
            "bucketmesh_store_redirections",
            "Redis Cluster script calls answered MOVED/ASK/TRYAGAIN on the direct connection "
            "and finished through the cluster client (a slot moved or a failover)",
            lambda: self.store.redirected,
        )
        metrics.gauge(
            "bucketmesh_store_keys_awaiting_readback",
            "Keys granted on in Redis since they were last read back into the node's mirror: "
            "what a loss of Redis's data now would forget (docs/storage-redis.md)",
            lambda: float(len(self.touched) + self.reading),
        )
        metrics.gauge(
            "bucketmesh_store_queued_merges",
            "Remote deltas waiting for the merge script",
            lambda: len(self.remote),
        )
        metrics.labelled.append(self._fallback_family)

    def _fallback_family(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "bucketmesh_store_fallback_decisions",
            "Decisions made by a rule's onStoreFailure policy while Redis was unavailable",
            labels=["policy"],
        )
        for policy, count in self.fallbacks.items():
            family.add_metric([policy], count)
        yield family


def _settle(future: asyncio.Future[Decision], result: Decision | BaseException) -> None:
    """Resolve ``future`` with ``result`` (its Decision or its error), unless it is done
    already: the first answer stands."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _invalid(tokens: int, capacity: int) -> InvalidTokens:
    return InvalidTokens(
        f"tokens must be between 0 and the capacity {capacity}, got {tokens}", capacity
    )
