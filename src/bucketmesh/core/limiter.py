"""The in-process limiter: rules, the live buckets of one replica, and their deltas.

``Limiter`` is the surface the server, the sync mesh, the ASGI middleware and
embedding applications call. It owns the map of live buckets, finds the rule
that gives an ad-hoc key its limits, keeps the dirty set the sync mesh drains
(``collect_deltas``), merges what peers send (``merge``), expires idle
buckets, enforces the cap on live buckets, and snapshots its state. All the
bucket math lives in ``bucket.py``.

Durability hooks (the files themselves are ``wal.py``'s and ``serve.py``'s):
with ``journal`` set (``enable_journal``), every grant and every config change
records its key (rule) in ``journal.keys`` (``journal.rules``) until
``collect_journal`` turns them into one DeltaBatch of this replica's own
entries — the write-ahead log's group. ``replay`` max-merges such batches back
at start-up, every mode included, and ``snapshot_head`` / ``snapshot_part``
let a server write and read a snapshot in slices.

Time comes from an injected clock (``clock``, integer ns; ``time.time_ns`` by
default: refill follows the wall clock, so nodes need NTP) or as an explicit
``now`` argument; the simulator drives it with simulated clocks.

Modes: ``shared`` replicates; ``local`` keeps one independent bucket per
replica; ``strict`` gives each region a share of capacity and refill and never
replicates its counters, so the sum of all regions can never exceed the limit
however long a partition lasts. The share is a fixed, equal one, or, after
``enable_shares``, the rights the region holds in the key's ledger
(``core/shares.py``), which ``rebalance`` moves toward demand.
A per-key config change of a strict key does replicate: it travels as a
config-only delta (``strict_config_delta``; no counters, epoch 0, the key's
ledger with it) and every region takes its share of the new limits, newest
version winning.

Dropping an idle bucket forgets this replica's own ``used`` entry, but a peer
may still hold that generation (it knows later spending, or has not swept
it yet) and send it back. Re-created from the peer's copy, our entry would
restart at what the peer knew of it, below what we spent, and max-merge would
hide our next grants from replicas that knew more. So a dropped bucket in
which we spent leaves a *tombstone* (epoch, own count) for
``max(2·ttl, tombstone_ns)``; when that generation comes back, our entry in
it starts from the tombstone's count. At
most ``max(1000, max_buckets // 4)`` tombstones are kept; one evicted before its
horizon (a small cap, or many short-lived keys) folds its count into
``evicted`` — per epoch and slot of the key's hash (4096 slots), the largest
count forgotten — and a generation that comes back for a key without a
tombstone restores our entry from its slot: at least what we spent, perhaps
more (another key's count in the same slot), never less, so no grant is
hidden and replicas converge. A copy returning after the horizon itself (a
partition longer than ``max(2·ttl, 10 min)`` with a peer keeping the key
busy) can still restart our entry low — see docs/sync.md for the bound.

At the cap on live buckets (``max_buckets``), expired buckets are swept
first; if none can go, a request for a *new* key raises ``BucketCapReached``
(the server answers 503 with Retry-After). Existing keys keep being served and
no live bucket is ever evicted early, because evicting a bucket that is not
full would hand its spent tokens back.
"""

from __future__ import annotations

import hashlib
import re
import time
import zlib
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any, Final

import msgspec

from bucketmesh.core.bucket import (
    LOCAL,
    NS_PER_S,
    SHARED,
    STRICT,
    Bucket,
    BucketConfig,
    BucketDelta,
    Decision,
    Hlc,
    Version,
    interval_for,
)
from bucketmesh.core.decisions import Ask
from bucketmesh.core.heap import untrack
from bucketmesh.core.limits import MAX_KEY_BYTES, LimitError, check_burst, check_limits
from bucketmesh.core.rules import QUALIFIER, Rule
from bucketmesh.core.shares import (
    SCALE,
    Ledger,
    ShareReport,
    ShareState,
    burn_covered,
    burnt_limits,
    floor_parts,
    plan,
    region_of,
    share_limits,
)
from bucketmesh.core.structs import DeltaBatch as DeltaBatch
from bucketmesh.core.structs import Snapshot as Snapshot

SNAPSHOT_FORMAT: Final = 1
EVICTED_SLOTS: Final = 4096  # slots per epoch for the counts of tombstones evicted early
TOMBSTONE_NS: Final = 600 * NS_PER_S  # how long a dropped bucket's own count is kept, at least
DEMAND_ALPHA: Final = 0.25  # the weight of the last period in a strict key's demand
HEADROOM: Final = 1.05  # a strict region's need is its recent demand and 5 % (rebalancer)


class Journal:
    """What changed since the last write-ahead-log group: granted keys, changed rules,
    and keys where a merge folded retired incarnations away (logged whole)."""

    __slots__ = ("folds", "keys", "rules")

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.rules: set[str] = set()
        self.folds: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.keys or self.rules or self.folds)


class LimiterError(Exception):
    """Base of the errors a caller can act on. ``index`` is the position of the ask
    at fault in an ``acquire_many`` call (None for a single acquire)."""

    index: int | None = None

    def at(self, index: int) -> LimiterError:
        self.index = index
        return self


class NoRuleError(LimiterError):
    """No rule gives limits to this key (and none was named)."""


class BucketCapReached(LimiterError):
    """The live-bucket cap is reached and nothing could be reclaimed."""


class InvalidTokens(LimiterError):
    """``tokens`` is negative or larger than the bucket's capacity."""

    def __init__(self, message: str, capacity: int) -> None:
        super().__init__(message)
        self.capacity = capacity


class KeyTooLong(LimiterError):
    """A new key longer than ``MAX_KEY_BYTES``: it could never be replicated."""


class RuleMismatch(LimiterError):
    """One key asked for under two rules (or under another rule than its bucket's)."""


def check_key(key: str) -> None:
    """KeyTooLong unless ``key`` fits in ``MAX_KEY_BYTES`` (checked when a bucket is
    created: an existing key was checked then)."""
    if len(key) * 4 > MAX_KEY_BYTES and len(key.encode()) > MAX_KEY_BYTES:
        raise KeyTooLong(
            f"the key is {len(key.encode())} bytes; at most {MAX_KEY_BYTES} can be replicated"
        )


def rule_digest(rule: Rule) -> str:
    """What identifies a rule's limits in a file version: capacity, refill, ttl, mode
    (and ``shadow`` when set: the digests of rules without it stay as they were)."""
    text = f"{rule.capacity}|{rule.refill_rate!r}|{rule.ttl!r}|{rule.mode}"
    if rule.shadow:
        text += "|shadow"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def file_version(rule: Rule, stamp: int = 0) -> Version:
    """``(0, "rule:<name>:<stamp>:<digest>")``: clock 0, so any runtime change (PATCH)
    beats any file; among file versions of one rule the stamp (the HLC at which a node
    first loaded these limits, zero-padded so that strings sort as numbers) orders
    them by age, and the digest breaks the remaining ties."""
    return (0, f"rule:{rule.name}:{stamp:020d}:{rule_digest(rule)}")


_STAMPED: Final = re.compile(r":[0-9]{20}:[0-9a-f]{12}\Z")


def _loaded_file_version(version: Version, rule: Rule) -> Version | None:
    """``version`` if it is a stamped file version of ``rule`` with its limits
    (``file_version`` at a stamp above 0: some node loaded them), else None."""
    if version[0] != 0 or not _STAMPED.search(version[1]):
        return None
    head, stamp, digest = version[1].rsplit(":", 2)
    if head != f"rule:{rule.name}" or int(stamp) == 0 or digest != rule_digest(rule):
        return None
    return version


def legacy_file_version(version: Version) -> bool:
    """A file version written before file versions carried a stamp
    (``rule:<name>:<digest>``): older than any stamped one, whatever its digest."""
    return version[0] == 0 and version[1].startswith("rule:") and not _STAMPED.search(version[1])


def rule_config(rule: Rule, regions: int = 1, stamp: int = 0) -> BucketConfig:
    """The file config a rule gives its buckets (``file_version`` says how it orders)."""
    return BucketConfig(
        capacity=rule.capacity,
        interval_ns=interval_for(rule.refill_rate),
        ttl_ns=max(1, round(rule.ttl * NS_PER_S)),
        mode=rule.mode,
        version=file_version(rule, stamp),
        shadow=rule.shadow,
    )


def _credit(bucket: Bucket, tokens: int, now: int) -> None:
    """Give a strict bucket ``tokens`` more (never above its capacity): its base moves
    so that the level at ``now`` rises by them (strict buckets are never merged)."""
    interval = bucket.config.interval_ns
    backlog = bucket.tat() - now
    backlog = max(0, (backlog if backlog > 0 else 0) - tokens * interval)
    bucket.base_time = now + backlog
    bucket.base_used = bucket.total
    bucket.anchor = None
    bucket.marks = None
    bucket._derive_edge()
    bucket._recompute()


def share_of(config: BucketConfig, regions: int) -> BucketConfig:
    """Strict mode's per-region share: 1/regions of capacity and of refill."""
    if config.mode != STRICT or regions == 1:
        return config
    return msgspec.structs.replace(
        config, capacity=config.capacity // regions, interval_ns=config.interval_ns * regions
    )


# -- batches: the per-item work of a batch request, compiled with the core -------------


def batch_asks(items: Sequence[Any], rules: Container[str]) -> list[Ask] | None:
    """The asks of a batch's items (objects with ``key``, ``tokens`` and ``rule``), or
    None when an item's key is missing, its tokens are negative or its rule is not in
    ``rules``: the caller then takes each item in turn (and names the bad one)."""
    out: list[Ask] = []
    keep = out.append
    make = tuple.__new__  # Ask(...) runs a Python-level __new__
    for item in items:
        key = item.key
        tokens = item.tokens
        rule = item.rule
        if key is None or tokens < 0 or (rule is not None and rule not in rules):
            return None
        keep(make(Ask, (key, tokens, rule)))
    return out


def tally(decisions: Sequence[Decision], near_share: float) -> tuple[int, int, str | None]:
    """(allowed, allowed with fewer than ``near_share`` × capacity tokens left, the rule
    every decision is under or None if several): what a batch's metrics count."""
    allowed = 0
    near = 0
    rule: str | None = decisions[0].rule if decisions else None
    for decision in decisions:
        if decision.allowed:
            allowed += 1
            if decision.tokens_remaining < decision.capacity * near_share:
                near += 1
        if rule is not None and decision.rule != rule:
            rule = None
    return allowed, near, rule


class DecisionColumns:
    """A batch's decisions column by column (row ``i`` is ask ``i``): what
    ``Limiter.acquire_columns`` answers, so that a batch route renders its response
    from a few lists instead of one ``Decision`` per item. ``decision(i)`` is the
    ``Decision`` that row stands for (``acquire_many``'s, field for field)."""

    __slots__ = (
        "allowed",
        "capacity",
        "keys",
        "mode",
        "refill_rate",
        "remaining",
        "reset_after",
        "retry_after",
        "rule",
    )

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.allowed: list[bool] = []
        self.remaining: list[int] = []
        self.capacity: list[int] = []
        self.refill_rate: list[float] = []
        self.retry_after: list[float] = []
        self.reset_after: list[float] = []
        self.mode: list[str] = []
        self.rule: list[str] = []

    def __len__(self) -> int:
        return len(self.allowed)

    def decision(self, index: int) -> Decision:
        return Decision(
            self.allowed[index],
            self.keys[index],
            self.remaining[index],
            self.capacity[index],
            self.refill_rate[index],
            self.retry_after[index],
            self.reset_after[index],
            self.mode[index],
            self.rule[index],
        )

    def decisions(self) -> list[Decision]:
        return [self.decision(index) for index in range(len(self.allowed))]

    def tally(self, near_share: float) -> tuple[int, int, str | None]:
        """``tally`` of the decisions these columns hold."""
        allowed = 0
        near = 0
        remaining = self.remaining
        capacity = self.capacity
        for index, granted in enumerate(self.allowed):
            if granted:
                allowed += 1
                if remaining[index] < capacity[index] * near_share:
                    near += 1
        rules = self.rule
        rule: str | None = rules[0] if rules else None
        if rule is not None and rules.count(rule) != len(rules):
            rule = None
        return allowed, near, rule


class Limiter:
    """Token buckets for one replica (region/node/incarnation), replicated by deltas."""

    def __init__(
        self,
        rules: Sequence[Rule] = (),
        *,
        replica_id: str,
        clock: Callable[[], int] = time.time_ns,
        max_buckets: int = 1_000_000,
        regions: int = 1,
        tombstone_ns: int = TOMBSTONE_NS,
    ) -> None:
        if regions < 1:
            raise ValueError("regions must be >= 1")
        self.replica_id = replica_id
        self.clock = clock
        self.max_buckets = max_buckets
        self.regions = regions
        self.hlc = Hlc()
        self.rules: list[Rule] = list(rules)
        self.rules_by_name: dict[str, Rule] = {}
        self.rule_configs: dict[str, BucketConfig] = {}
        for rule in self.rules:
            if rule.name in self.rules_by_name:
                raise ValueError(f"duplicate rule name {rule.name!r}")
            if rule.mode == STRICT and rule.capacity < regions:
                raise ValueError(
                    f"rule {rule.name!r}: strict mode needs capacity >= regions ({regions})"
                )
            self.rules_by_name[rule.name] = rule
            self.rule_configs[rule.name] = rule_config(rule)
        # rule name -> the file version this node gave the limits its file holds for it
        # (stamp_file_rules); persisted in snapshots so an unchanged file keeps its age
        self.file_versions: dict[str, Version] = {}
        # key -> its bucket. Kept out of the cyclic collector where compiled, as the
        # buckets are (core/heap.py): a full collection would walk every entry. A dict
        # tracks itself again when a bucket is stored in it, so stores go through
        # ``_store`` (a bulk load untracks once after it); keys and buckets cannot hold
        # the map in a cycle.
        self.buckets: dict[str, Bucket] = {}
        self.dirty: set[str] = set()
        self.dirty_rules: set[str] = set()
        self.expired_total = 0
        self.cap_rejections = 0
        self._sweep: list[str] = []
        self.tombstone_ns = tombstone_ns
        # Per-key configs of strict keys, whole (a strict bucket holds only its share).
        self.key_configs: dict[str, BucketConfig] = {}
        # key -> (epoch, own used, forget after): dropped buckets we spent in, oldest first
        self.tombstones: dict[str, tuple[int, int, int]] = {}
        # Only a peer can send a dropped generation back: a replica that never
        # merges (a node without a mesh) turns this off and frees the memory
        # (a tombstone costs about two thirds of a bucket).
        self.keep_tombstones = True
        # A tombstone costs about what a bucket does: at most a quarter of the cap's
        # worth, the oldest forgotten first (they are the least likely to come back).
        self.max_tombstones = max(1_000, max_buckets // 4)
        # (epoch, crc32(key) % EVICTED_SLOTS) -> (largest own count, forget after) of
        # tombstones evicted before their horizon: a returning generation restores our
        # entry from here, so an exhausted cap costs over-charging, never hidden grants.
        self.evicted: dict[tuple[int, int], tuple[int, int]] = {}
        self.journal: Journal | None = None
        # Buckets created in the same ttl window share one epoch int object
        # (32 bytes each otherwise, a tenth of a bucket's footprint).
        self._epochs: dict[int, int] = {}
        # values decoded buckets share (see _compact); keys and values are equal
        self._shared: dict[Any, Any] = {}
        self._last_config: BucketConfig | None = None
        # Recovery (``begin_recovery``): a replica that started without its previous
        # life's state treats every bucket it creates as empty at ``unknown_since``
        # until ``recovery_until`` (strict and local buckets by their base, shared ones
        # through ``gates`` while ``gates`` is not None).
        self.unknown_since: int | None = None
        self.recovery_until = 0
        self.gates: dict[str, Bucket] | None = None
        #: called when ``acquire`` starts or stops being gated (a store rebinds it)
        self.on_acquire_changed: Callable[[], None] | None = None
        #: called when a grant of a shared bucket puts a key into an empty ``dirty``
        #: set (so once between two ``collect_deltas``, unless an expiry empties the
        #: set): the sync mesh's leading-edge collect (replication/mesh.py). Grants
        #: only; what configure, merge and the rebalancer mark dirty waits for the
        #: mesh's periodic collect.
        self.on_dirty: Callable[[], None] | None = None
        # A rule change (``configure`` of a rule, ``merge_rule``) moves every live
        # bucket of the rule onto the new config. Above ``defer_adoption_above`` live
        # buckets (None: never, the library's default), it only starts a pass over a
        # copy of the keys (``adoption_keys``, visited from the end; a change during a
        # pass asks for one more pass, ``adoption_again``, not one copy per rule) and
        # calls ``on_adoption``; ``adopt_pending`` visits them a slice at a time, moving
        # each bucket on an older config than its rule's, so that a serving node is not
        # stopped for the whole of it (0.6 s at a million buckets). A bucket not moved
        # yet decides on its previous config, as a region the change has not reached
        # yet does; a snapshot taken meanwhile is moved at restore (``stamp_file_rules``:
        # every bucket on an older config than its rule).
        self.defer_adoption_above: int | None = None
        self.adoption_keys: list[str] = []
        self.adoption_again = False
        self.on_adoption: Callable[[], None] | None = None
        # Strict mode's transferable shares (``enable_shares``; core/shares.py): None
        # keeps the static 1/regions split.
        self.share_region: str | None = None
        self.share_founders: tuple[str, ...] = ()
        # the regions this one runs with now (``set_share_regions``); a ledger naming
        # another has that region's rights handed over (``_hand_over``)
        self.share_regions: tuple[str, ...] = ()
        # key -> the parts this region had received when its strict bucket expired
        # full: a bucket created again is full on those, empty on later receipts
        self.share_received_full: dict[str, int] = {}
        self.ledgers: dict[str, Ledger] = {}
        self.share_blind = False  # started without its previous life's state: shares.py
        # region/node -> the newest incarnation seen: older ones' gifts are frozen here
        self.share_newest: dict[str, int] = {}
        self.share_asked: dict[str, int] = {}
        self.share_denied: set[str] = set()  # strict keys that denied since the last round
        self.share_demand: dict[str, float] = {}
        self.share_given_parts = 0
        self.share_given_tokens = 0
        self.share_gifts = 0
        self.share_received_tokens = 0
        # key -> the whole (capacity, interval) its strict bucket's share was cut from
        self.share_running: dict[str, tuple[int, int]] = {}

    # -- decisions -----------------------------------------------------------

    def acquire(
        self, key: str, tokens: int = 1, *, rule: str | None = None, now: int | None = None
    ) -> Decision:
        """Consume ``tokens`` from ``key``'s bucket if it holds them; ``tokens=0`` peeks.

        The hot path: one dict lookup, one call into the bucket; everything rare
        (a new key, a bad ``tokens``) is checked off it.
        """
        bucket = self.buckets.get(key)
        if bucket is None or tokens < 0 or self.gates is not None:
            return self._acquire_cold(key, tokens, rule, now)
        return self._decide(key, bucket, tokens, self.clock() if now is None else now)

    def _decide(self, key: str, bucket: Bucket, tokens: int, now: int) -> Decision:
        """``acquire`` on a live bucket, ``tokens`` ≥ 0: its decision and the bookkeeping."""
        decision = bucket.acquire(key, tokens, now)
        if self.share_region is not None and bucket.mode == STRICT:
            self.share_asked[key] = self.share_asked.get(key, 0) + tokens
            if tokens and not decision.allowed:
                self.share_denied.add(key)
        if decision.allowed:
            if tokens:
                if bucket.mode == SHARED:
                    dirty = self.dirty
                    # (len: PySet_GET_SIZE when compiled, where `not dirty` calls
                    # PyObject_IsTrue)
                    if len(dirty) == 0:
                        self._first_dirty()
                    dirty.add(key)
                journal = self.journal
                if journal is not None:
                    journal.keys.add(key)
        elif tokens > decision.capacity and not self._within_whole(key, bucket, tokens):
            raise self._too_many(key, bucket, tokens)
        return decision

    def _first_dirty(self) -> None:
        """A grant is about to put a key into the empty dirty set: tell ``on_dirty``
        (off the hot path: the set is empty only until the first grant after a
        collect)."""
        on_dirty = self.on_dirty
        if on_dirty is not None:
            on_dirty()

    def _acquire_open(self, key: str, tokens: int, rule: str | None, now: int) -> Decision:
        """``acquire`` past the recovery gate (what the gate itself decides with)."""
        bucket = self.buckets.get(key)
        if bucket is None or tokens < 0:
            return self._acquire_new(key, tokens, rule, now)
        return self._decide(key, bucket, tokens, now)

    def _acquire_cold(self, key: str, tokens: int, rule: str | None, now: int | None) -> Decision:
        if now is None:
            now = self.clock()
        if self.gates is not None:
            return self._acquire_gated(key, tokens, rule, now)
        return self._acquire_new(key, tokens, rule, now)

    def _acquire_new(self, key: str, tokens: int, rule: str | None, now: int) -> Decision:
        """``acquire`` of a key without a live bucket, or of a bad ``tokens``."""
        if tokens < 0:
            raise self._too_many(key, self.inspect(key, rule=rule, now=now), tokens)
        if not tokens:
            # A peek at an unknown key sees a full bucket and creates nothing,
            # so reads cannot fill the bucket cap.
            return self._fresh(key, rule, now).acquire(key, 0, now)
        fresh = self._fresh(key, rule, now)
        if tokens > fresh.config.capacity and not self._within_whole(key, fresh, tokens):
            raise self._too_many(key, fresh, tokens)
        self._create(key, rule, now)
        # the plain acquire, also while the recovery gate is up (which called it)
        return self._acquire_open(key, tokens, None, now)

    def peek(self, key: str, *, rule: str | None = None, now: int | None = None) -> Decision:
        return self.acquire(key, 0, rule=rule, now=now)

    def acquire_many(
        self, asks: Sequence[Ask], *, atomic: bool = False, now: int | None = None
    ) -> list[Decision]:
        """The asks' decisions in order, at one instant. Every ask is checked first (its
        rule, its tokens against the capacity, room for its new key under the cap), so a
        bad one raises (``error.index`` names it) with nothing charged. ``atomic``: every
        key must hold the sum asked of it, or nothing is charged and each decision is a
        denial saying when the whole batch would fit."""
        if now is None:
            now = self.clock()
        if not atomic and self.gates is None:
            decided = self._acquire_live(asks, now)
            if decided is not None:
                return decided
        new_keys: set[str] = set()
        wanted: dict[str, tuple[str | None, int]] = {}
        rule_of: dict[str, str] = {}
        for index, (key, tokens, rule) in enumerate(asks):
            try:
                bucket = self.buckets.get(key)
                if bucket is None:
                    bucket = self._fresh(key, rule, now)
                    if tokens:
                        check_key(key)
                        new_keys.add(key)
                elif rule is not None:
                    self.resolve_rule(key, rule)  # an unknown rule name is refused even so
                named = rule_of.setdefault(key, bucket.rule)
                if bucket.rule != named:
                    raise RuleMismatch(
                        f"key {key!r} is asked for under rules {named!r} and {bucket.rule!r}; "
                        "a key has one bucket, under one rule"
                    )
                if tokens < 0 or (
                    tokens > bucket.config.capacity and not self._within_whole(key, bucket, tokens)
                ):
                    raise self._too_many(key, bucket, tokens)
            except LimiterError as error:
                raise error.at(index) from None
            previous = wanted.get(key)
            wanted[key] = (rule, tokens + (previous[1] if previous else 0))
        if new_keys and len(self.buckets) + len(new_keys) > self.max_buckets:
            self.expire(now)
            if len(self.buckets) + len(new_keys) > self.max_buckets:
                self.cap_rejections += 1
                first = next(i for i, ask in enumerate(asks) if ask.key in new_keys)
                raise BucketCapReached(
                    f"{len(self.buckets)} live buckets: the cap (max_buckets) has no room "
                    f"for this batch's {len(new_keys)} new keys"
                ).at(first)
        if atomic:
            short: dict[str, int] = {}
            for key, (rule, total) in wanted.items():
                bucket = self.inspect(key, rule=rule, now=now)
                if self.gates is not None and bucket.config.mode == SHARED:
                    gate = self._gate(key, bucket, now)  # recovering: the tighter of both
                    if gate.level(now) < bucket.level(now):
                        bucket = gate
                if total > bucket.config.capacity or bucket.level(now) < total:
                    short[key] = bucket.retry_after_ns(min(total, bucket.config.capacity), now)
            if short:
                out = []
                for key, _, rule in asks:
                    peek = self.acquire(key, 0, rule=rule, now=now)
                    wait = short.get(key, 0) / NS_PER_S
                    out.append(msgspec.structs.replace(peek, allowed=False, retry_after=wait))
                return out
        return [self.acquire(key, tokens, rule=rule, now=now) for key, tokens, rule in asks]

    def _acquire_live(self, asks: Sequence[Ask], now: int) -> list[Decision] | None:
        """``acquire_many``'s common case in one pass, or None to take the general path.

        When every ask names a live bucket (under its own rule, or none named) with
        tokens within its capacity, nothing can raise, no key is created and the cap
        is not involved: each ask's decision is its bucket's ``acquire`` in order —
        what ``Limiter.acquire`` would answer; a run of one ask repeated is one
        ``Bucket.acquire_run``, decided alike — and the dirty set and the journal
        take each granted key once, after the loop. Not while shared buckets are
        gated (``begin_recovery``): the caller checks ``gates``.
        """
        get = self.buckets.get
        # runs of one ask repeated (a hot key): the key, tokens and bucket of each run,
        # and how many asks it holds
        runs: list[tuple[str, int, Bucket]] = []
        counts: list[int] = []
        last_key: str | None = None
        last_tokens = -1
        last_rule = ""
        for key, tokens, rule in asks:
            if tokens == last_tokens and key == last_key and (rule is None or rule == last_rule):
                counts[-1] += 1
                continue
            bucket = get(key)
            if (
                bucket is None
                or tokens < 0
                or tokens > bucket.capacity
                or (rule is not None and rule != bucket.rule)
            ):
                return None
            runs.append((key, tokens, bucket))
            counts.append(1)
            last_key, last_tokens, last_rule = key, tokens, bucket.rule
        out: list[Decision] = []
        keep = out.append
        extend = out.extend
        granted: dict[str, Bucket] = {}
        for (key, tokens, bucket), count in zip(runs, counts, strict=True):
            if self.share_region is not None and bucket.mode == STRICT:
                self.share_asked[key] = self.share_asked.get(key, 0) + tokens * count
            if count == 1:
                decision = bucket.acquire(key, tokens, now)
                keep(decision)
                if tokens and decision.allowed:
                    granted[key] = bucket
                elif tokens and self.share_region is not None and bucket.mode == STRICT:
                    self.share_denied.add(key)
            else:
                run = bucket.acquire_run(key, tokens, count, now)
                if (
                    tokens
                    and self.share_region is not None
                    and bucket.mode == STRICT
                    and not run[-1].allowed
                ):
                    self.share_denied.add(key)
                extend(run)
                if tokens and run[0].allowed:
                    granted[key] = bucket
        if granted:
            dirty = self.dirty
            for key, bucket in granted.items():
                if bucket.mode == SHARED:
                    if len(dirty) == 0:
                        self._first_dirty()
                    dirty.add(key)
            journal = self.journal
            if journal is not None:
                journal.keys.update(granted)
        return out

    def acquire_columns(
        self, items: Sequence[Any], now: int | None = None
    ) -> DecisionColumns | None:
        """``acquire_many`` of a batch's items (objects with ``key``, ``tokens`` and
        ``rule``, e.g. a decoded request), not atomic, written as columns; or None,
        with nothing charged, unless every item names a live bucket (under its own
        rule, or none named) with tokens within its capacity and no recovery gate is
        up — the caller then takes ``acquire_many``'s general path (which creates,
        validates and names the bad item). Decided as ``_acquire_live`` decides:
        runs of one ask repeated go to ``Bucket.acquire_into`` at once, and the dirty
        set and the journal take each granted key once."""
        if self.gates is not None:
            return None
        if now is None:
            now = self.clock()
        buckets = self.buckets
        # runs of one ask repeated (a hot key), as parallel lists: key, tokens, bucket,
        # and how many asks each holds
        run_keys: list[str] = []
        run_tokens: list[int] = []
        run_buckets: list[Bucket] = []
        counts: list[int] = []
        last_key: str | None = None
        last_tokens = -1
        last_rule = ""
        last: Any = None
        repeating = False
        for item in items:
            # Inside a run (a hot key), an item equal to the last one joins it unread:
            # three attribute reads of a decoded item cost more than one comparison;
            # outside one (other keys), the comparison would only cost.
            if repeating and item == last:
                counts[-1] += 1
                continue
            asked: str | None = item.key
            tokens: int = item.tokens
            named: str | None = item.rule
            last = item
            if (
                tokens == last_tokens
                and asked == last_key
                and (named is None or named == last_rule)
            ):
                counts[-1] += 1
                repeating = True
                continue
            repeating = False
            if asked is None:
                return None
            bucket = buckets.get(asked)
            if (
                bucket is None
                or tokens < 0
                or tokens > bucket.capacity
                or (named is not None and named != bucket.rule)
            ):
                return None
            run_keys.append(asked)
            run_tokens.append(tokens)
            run_buckets.append(bucket)
            counts.append(1)
            last_key, last_tokens, last_rule = asked, tokens, bucket.rule
        out = DecisionColumns()
        allowed = out.allowed
        remaining, retry_after, reset_after = out.remaining, out.retry_after, out.reset_after
        keys, modes, rules = out.keys, out.mode, out.rule
        # capacity and refill rate boxed once for every run of the same limits (the
        # columns hold Python objects: a native int or float appended is boxed anew)
        capacities: list[Any] = out.capacity
        rates: list[Any] = out.refill_rate
        capacity_box: Any = None
        rate_box: Any = None
        last_capacity = -1
        last_interval = -1
        strict_shares = self.share_region is not None
        # the dirty set and the journal take each granted key once (a set)
        dirty = self.dirty
        journal = self.journal
        journaled = journal.keys if journal is not None else None
        for index, key in enumerate(run_keys):
            tokens = run_tokens[index]
            bucket = run_buckets[index]
            count = counts[index]
            start = len(allowed)
            bucket.acquire_into(
                key, tokens, count, now, allowed, remaining, retry_after, reset_after
            )
            mode = bucket.mode
            if strict_shares and mode == STRICT:
                self.share_asked[key] = self.share_asked.get(key, 0) + tokens * count
                if tokens and not allowed[-1]:
                    self.share_denied.add(key)
            if tokens and allowed[start]:
                if mode == SHARED:
                    if len(dirty) == 0:
                        self._first_dirty()
                    dirty.add(key)
                if journaled is not None:
                    journaled.add(key)
            capacity = bucket.capacity
            interval = bucket.interval
            if capacity != last_capacity or interval != last_interval:
                last_capacity = capacity
                last_interval = interval
                capacity_box = capacity
                rate_box = NS_PER_S / interval
            rule = bucket.rule
            if count == 1:
                keys.append(key)
                capacities.append(capacity_box)
                rates.append(rate_box)
                modes.append(mode)
                rules.append(rule)
            else:
                keys.extend([key] * count)
                capacities.extend([capacity_box] * count)
                rates.extend([rate_box] * count)
                modes.extend([mode] * count)
                rules.extend([rule] * count)
        return out

    # -- the decision seam (core/decisions.py) ----------------------------------

    def rule_config(self, name: str) -> BucketConfig:
        return self.rule_configs[name]

    def live_buckets(self) -> int:
        return len(self.buckets)

    def shadowed(self, rule: str, key: str) -> bool:
        """Whether a decision of ``key`` under ``rule`` is advisory (shadow mode): the
        key's bucket's config says so, or (no bucket here) its rule's. Two lookups:
        front doors ask it only on a refusal."""
        bucket = self.buckets.get(key)
        if bucket is not None:
            return bucket.config.shadow
        config = self.rule_configs.get(rule)
        if self.key_configs:  # a strict or local key's own config, kept without a bucket
            own = self.key_configs.get(key)
            if own is not None and (config is None or own.version > config.version):
                return own.shadow
        return config is not None and config.shadow

    def rule_of(self, key: str) -> str:
        bucket = self.buckets.get(key)
        return bucket.rule if bucket is not None else self.rule_for(key).name

    def holds(self, key: str) -> bool:
        """Whether ``key`` has a live bucket here (not only its rule's defaults)."""
        return key in self.buckets

    def commit(self) -> None:
        """Memory alone promises no durability: nothing to wait for."""
        return None

    def rule_for(self, key: str) -> Rule:
        """The rule a ``key%@<rule>`` key names (``rules.QUALIFIER``: another rule's
        template claims its text), else the first rule whose template could have
        produced ``key``."""
        if QUALIFIER in key:
            named = self.rules_by_name.get(key.rpartition(QUALIFIER)[2])
            if named is not None:
                return named
        for rule in self.rules:
            if rule.template.matches(key):
                return rule
        raise NoRuleError(f"no rule matches key {key!r}; name one with rule=")

    def resolve_rule(self, key: str, rule_name: str | None) -> Rule:
        if rule_name is None:
            return self.rule_for(key)
        found = self.rules_by_name.get(rule_name)
        if found is None:
            raise NoRuleError(f"unknown rule {rule_name!r}")
        return found

    def _store(self, key: str, bucket: Bucket) -> Bucket:
        """``bucket`` stored as ``key``'s, the map kept out of the collector (__init__)."""
        buckets = self.buckets
        buckets[key] = bucket
        untrack(buckets)
        return bucket

    def _fresh(self, key: str, rule_name: str | None, now: int) -> Bucket:
        """A full bucket for ``key`` under its rule, not (yet) stored."""
        rule = self.resolve_rule(key, rule_name)
        config = self.rule_configs[rule.name]
        if self.key_configs:
            own = self.key_configs.get(key)
            if own is not None and own.version > config.version:
                config = own
        bucket = Bucket(self._share(key, config), now, rule.name)
        epochs = self._epochs
        shared = epochs.get(bucket.epoch)
        if shared is None:
            if len(epochs) > 64:
                epochs.clear()
            shared = epochs[bucket.epoch] = bucket.epoch
        bucket.epoch = bucket.base_time = bucket.g = shared
        # a strict or local bucket is never replicated: its base is its own to set
        if (
            self.unknown_since is not None
            and now < self.recovery_until
            and bucket.config.mode != SHARED
        ):
            bucket.base_time = bucket.g = max(bucket.epoch, self._empty_at_start(bucket.config))
        elif self.share_region is not None and bucket.config.mode == STRICT:
            # rights received (given or handed over) arrive without tokens: their
            # giver's bucket may have been empty; what it handed over is credited
            # apart (``_reshare``). A fresh bucket is full on the rest only.
            missing = self._received_worth(key, bucket.config.capacity)
            if missing:
                bucket.base_time = bucket.g = max(
                    bucket.base_time, now + missing * bucket.config.interval_ns
                )
        return bucket

    def _received_worth(self, key: str, capacity: int) -> int:
        """The part of a strict bucket's ``capacity`` that rights received by this
        region make up (rounded up), less those it held when its bucket last expired
        full (their tokens were there)."""
        ledger = self.ledgers.get(key)
        region = self.share_region
        if ledger is None or region is None or capacity <= 0:
            return 0
        held = ledger.holding(region)
        received = ledger.received(region) - self.share_received_full.get(key, 0)
        received = min(received, held)
        if received <= 0:
            return 0
        return min(capacity, -(-capacity * received // held))

    # -- recovery: a start without the previous life's state ---------------------

    def _empty_at_start(self, config: BucketConfig) -> int:
        """The base of a bucket that was empty at ``unknown_since``: it refills from
        zero at the share's rate from then on."""
        assert self.unknown_since is not None
        return self.unknown_since + config.capacity * config.interval_ns

    def begin_recovery(self, since: int, *, shared: bool) -> None:
        """This replica starts without what its previous life spent (no snapshot): it
        cannot know it, but that life ended before ``since``, and whatever it spent has
        refilled one full bucket later. Until then every bucket this replica creates
        counts as empty at ``since``: strict and local ones (their counters never leave
        this region, so nothing can bring them back) by their base, and, with ``shared``
        (no peer could be pulled yet), shared ones through a gate beside the bucket, so
        that nothing is replicated from it (``end_shared_recovery`` lifts it once a
        peer's state is merged)."""
        self.unknown_since = since
        horizon = max((c.capacity * c.interval_ns for c in self.rule_configs.values()), default=0)
        self.recovery_until = since + horizon
        if shared and horizon:
            self.gates = {}  # ``acquire`` goes through ``_acquire_gated`` while set
            if self.on_acquire_changed is not None:
                self.on_acquire_changed()

    def end_shared_recovery(self) -> None:
        """A peer's state is merged (or a bucket's time has passed): shared buckets
        decide on their own again."""
        if self.gates is None:
            return
        self.gates = None
        if self.on_acquire_changed is not None:
            self.on_acquire_changed()

    def _gate(self, key: str, bucket: Bucket, now: int) -> Bucket:
        """The recovery gate of a shared key: its bucket's limits, empty at
        ``unknown_since`` (created on first use, following the bucket's config)."""
        assert self.gates is not None
        config = bucket.config
        gate = self.gates.get(key)
        if gate is None:
            gate = self.gates[key] = Bucket(config, now, bucket.rule)
            gate.base_time = gate.g = max(gate.epoch, self._empty_at_start(config))
        elif gate.config is not config:
            gate.reconfigure(config, now)
        return gate

    def _acquire_gated(self, key: str, tokens: int, rule: str | None, now: int) -> Decision:
        """``acquire`` while shared buckets are gated: a grant needs the bucket and the
        key's gate (the same limits, empty at ``unknown_since``, never replicated)."""
        gates = self.gates
        if gates is None or now >= self.recovery_until:
            self.end_shared_recovery()
            return self._acquire_open(key, tokens, rule, now)
        if tokens <= 0:
            return self._acquire_open(key, tokens, rule, now)
        peek = self._acquire_open(key, 0, rule, now)
        if peek.mode != SHARED or tokens > peek.capacity or peek.tokens_remaining < tokens:
            return self._acquire_open(key, tokens, rule, now)
        gate = self._gate(key, self.inspect(key, rule=rule, now=now), now)
        gated = gate.acquire(key, tokens, now)
        if not gated.allowed:
            return gated
        decision = self._acquire_open(key, tokens, rule, now)
        if gated.tokens_remaining < decision.tokens_remaining:
            decision = msgspec.structs.replace(decision, tokens_remaining=gated.tokens_remaining)
        return decision

    def _create(self, key: str, rule_name: str | None, now: int) -> Bucket:
        check_key(key)
        if len(self.buckets) >= self.max_buckets:
            self.expire(now)
            if len(self.buckets) >= self.max_buckets:
                self.cap_rejections += 1
                raise BucketCapReached(
                    f"{len(self.buckets)} live buckets: the cap (max_buckets) is reached"
                )
        bucket = self._store(key, self._fresh(key, rule_name, now))
        if self.tombstones and key in self.tombstones:
            self._settle_tombstone(key, bucket)  # a newer epoch, unless the ttl grew meanwhile
        return bucket

    # -- configuration -------------------------------------------------------

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
        """Change limits at runtime, keeping each bucket's level at this instant.

        A rule name applies to the rule (every existing and future key of it);
        any other string is a concrete key, which must match a rule or exist.
        The new config carries a fresh HLC version, so it wins everywhere.
        ``shadow`` marks the rule or key shadow (or not) in the same register, adopted
        like any change: each bucket keeps its level at this instant (a new base).
        """
        if now is None:
            now = self.clock()
        check_limits(capacity=capacity, refill_rate=refill_rate, ttl=ttl, mode=mode)
        rule = self.rules_by_name.get(key_or_rule)
        if rule is not None:
            current = self.rule_configs[rule.name]
        else:
            bucket = self.buckets.get(key_or_rule) or self._create(key_or_rule, None, now)
            if self.adoption_keys or self.adoption_again:
                # a rule change this bucket has not been moved onto yet: first, so that
                # the key's own config is built on the rule's newest one
                newer = self.rule_configs.get(bucket.rule)
                if (
                    newer is not None
                    and newer.mode != STRICT
                    and bucket.config.version < newer.version
                ):
                    self._adopt(key_or_rule, bucket, newer, now)
            current = bucket.config
            if current.mode == STRICT and self.regions > 1:  # a share: start from the whole
                current = self.key_configs.get(key_or_rule) or self.rule_configs[bucket.rule]
        new = BucketConfig(
            capacity=current.capacity if capacity is None else capacity,
            interval_ns=current.interval_ns if refill_rate is None else interval_for(refill_rate),
            ttl_ns=current.ttl_ns if ttl is None else max(1, round(ttl * NS_PER_S)),
            mode=current.mode if mode is None else mode,
            version=(self.hlc.tick(now), self.replica_id),
            shadow=current.shadow if shadow is None else shadow,
        )
        changed = None
        if (capacity is None) != (refill_rate is None):
            changed = "capacity" if refill_rate is None else "refillRate"
        check_burst(new.capacity, new.interval_ns, changed=changed)
        if new.mode == STRICT and new.capacity < self.regions:
            raise LimitError(
                "capacity",
                f"must be >= the number of regions ({self.regions}) in strict mode",
                new.capacity,
            )
        if rule is not None:
            self.rule_configs[rule.name] = new
            self.dirty_rules.add(rule.name)
            if self.journal is not None:
                self.journal.rules.add(rule.name)
            self._adopt_rule(rule.name, current, new, now)
        else:
            bucket = self.buckets[key_or_rule]
            if new.mode != SHARED or bucket.config.mode != SHARED:
                self.key_configs[key_or_rule] = new  # replicated by collect_deltas
            self._adopt(key_or_rule, bucket, new, now)
            if new.mode != SHARED:
                self.dirty.add(key_or_rule)
        return new

    def _adopt_rule(
        self, name: str, previous: BucketConfig, config: BucketConfig, now: int
    ) -> None:
        """Move every live bucket of rule ``name`` on an older config onto ``config``:
        at once, or in ``adopt_pending``'s slices (``defer_adoption_above``). A change
        of the rule to or from strict mode is adopted at once: it moves rights between
        regions."""
        above = self.defer_adoption_above
        if (
            above is not None
            and len(self.buckets) > above
            and config.mode != STRICT
            and previous.mode != STRICT
        ):
            # every key, not only the rule's: filtering a million here would be the
            # stall this avoids; ``adopt_pending`` skips the others cheaply
            if self.adoption_keys:
                self.adoption_again = True
            else:
                self.adoption_keys = list(self.buckets)
            on_adoption = self.on_adoption
            if on_adoption is not None:
                on_adoption()
            return
        for key, bucket in self.buckets.items():
            if bucket.rule == name and bucket.config.version < config.version:
                self._adopt(key, bucket, config, now)

    def adoption_pending(self) -> int:
        """Keys a deferred rule change still has to visit (a pass asked for after the
        current one counts as every live key)."""
        return len(self.adoption_keys) + (len(self.buckets) if self.adoption_again else 0)

    def adopt_pending(self, budget: int, now: int | None = None) -> bool:
        """Visit up to ``budget`` keys of a deferred rule change, moving each live
        bucket on an older config than its rule's onto the rule's, keeping its level
        at ``now`` (strict rules are never deferred: their buckets are left to
        ``configure``); True when no visit is left to do."""
        if now is None:
            now = self.clock()
        buckets = self.buckets
        rule_configs = self.rule_configs
        while budget > 0:
            keys = self.adoption_keys
            if not keys:
                if not self.adoption_again:
                    return True
                self.adoption_again = False
                keys = self.adoption_keys = list(buckets)
                if not keys:
                    return True
            take = keys[-budget:]
            del keys[-budget:]
            budget -= len(take)
            for key in take:
                bucket = buckets.get(key)
                if bucket is None:
                    continue
                config = rule_configs.get(bucket.rule)
                if (
                    config is not None
                    and config.mode != STRICT
                    and bucket.config.version < config.version
                ):
                    self._adopt(key, bucket, config, now)
        return not self.adoption_keys and not self.adoption_again

    def _adopt(self, key: str, bucket: Bucket, config: BucketConfig, now: int) -> None:
        was_shared = bucket.config.mode == SHARED
        # say which limit this region runs on now (and ran on before) first: a raise
        # takes effect only once every region has said it adopted it
        if (
            self.share_region is not None
            and config.mode == STRICT
            and self._report(key, self._ledger(key), config, now)
        ):
            self.dirty.add(key)
        bucket.reconfigure(self._share(key, config), now)
        if was_shared or config.mode == SHARED:
            self.dirty.add(key)
        if self.journal is not None:
            self.journal.keys.add(key)

    def stamp_file_rules(self, now: int | None = None) -> list[str]:
        """Give every rule of the file the version of this node's first load of its
        limits, and move live buckets on an older file version of their rule to it.

        A rule whose limits (``rule_digest``) are those this node loaded before
        (``file_versions``, restored from the snapshot) keeps that version; changed
        limits, or no record, get a fresh HLC stamp, so an edited file wins over the
        old one in every region once it is loaded, whatever order restarts come in,
        while an unchanged file never overrides a newer one a peer loaded. Runtime
        configs (PATCH, clock > 0) still win over every file. Buckets keep their
        level (``Bucket.reconfigure``). Returns the names of the rules restamped."""
        if now is None:
            now = self.clock()
        restamped = []
        for rule in self.rules:
            known = self.file_versions.get(rule.name)
            if known is None or not known[1].endswith(":" + rule_digest(rule)):
                # no snapshot record of these limits (a node killed before its first
                # snapshot, or before the first one after an edit, replayed from its
                # write-ahead log): the file config in effect, logged or heard from a
                # peer, is a load of these very limits if its digest says so; else
                # this is a new load
                known = _loaded_file_version(self.rule_configs[rule.name].version, rule)
                if known is None:
                    known = file_version(rule, self.hlc.tick(now))
                    restamped.append(rule.name)
                self.file_versions[rule.name] = known
            config = msgspec.structs.replace(rule_config(rule), version=known)
            if config.version > self.rule_configs[rule.name].version:
                self.rule_configs[rule.name] = config
                self.dirty_rules.add(rule.name)
                if self.journal is not None:
                    self.journal.rules.add(rule.name)
        rule_configs = self.rule_configs
        for key, bucket in self.buckets.items():
            current = rule_configs.get(bucket.rule)
            if current is not None and (
                current.version > bucket.config.version
                or legacy_file_version(bucket.config.version)
            ):
                self._adopt(key, bucket, current, now)
        return restamped

    def rescale_shares(self, now: int | None = None) -> int:
        """Give restored strict buckets this replica's share of their whole config for
        the number of regions it runs with now (a region joined or left since the
        snapshot), keeping what they spent: the level becomes min(level, new share).
        Returns how many changed."""
        if now is None:
            now = self.clock()
        changed = 0
        for key, bucket in self.buckets.items():
            config = bucket.config
            if config.mode != STRICT:
                continue
            whole = self.key_configs.get(key)
            if whole is None or whole.version != config.version:
                whole = self.rule_configs.get(bucket.rule)
            if whole is None or whole.version != config.version:
                continue  # its whole config is a peer's to send back
            share = self._share(key, whole)
            if (share.capacity, share.interval_ns) != (config.capacity, config.interval_ns):
                bucket.reconfigure(share, now)
                if self.journal is not None:
                    self.journal.keys.add(key)
                changed += 1
        return changed

    # -- strict mode's transferable shares (core/shares.py) ------------------------

    def enable_shares(self, region: str, founders: Sequence[str]) -> None:
        """Strict buckets spend the rights this region holds in each key's ledger
        instead of a fixed 1/regions (``founders``: the regions the limits are first
        divided over; this region among them unless it joined later)."""
        self.share_region = region
        self.share_founders = tuple(sorted(set(founders)))
        self.share_regions = tuple(sorted({region, *founders}))
        if self.unknown_since is not None:
            self.share_blind = True
        self.rescale_shares()

    def strict_below_regions(self) -> list[tuple[str, int]]:
        """(rule or key, capacity) of every strict limit held here whose capacity is
        below one token per region: limits a PATCH set while the mesh had fewer regions,
        restored from a snapshot or the store. Each region's share of one would be 0
        tokens, so every request under it would be refused (``configure`` and the
        config file refuse such limits; these came in around them)."""
        regions = self.regions
        return [
            (name, config.capacity)
            for configs in (self.rule_configs, self.key_configs)
            for name, config in sorted(configs.items())
            if config.mode == STRICT and config.capacity < regions
        ]

    def set_share_regions(self, regions: Sequence[str]) -> None:
        """The region list changed (this region among them): a region no longer in
        it has its rights handed over by the rebalancer (``_hand_over``)."""
        self.share_regions = tuple(sorted(set(regions)))

    def _recovery_state(self) -> tuple[int, int] | None:
        if self.unknown_since is None:
            return None
        return (self.unknown_since, self.recovery_until)

    def _whole(self, key: str, rule: str) -> BucketConfig:
        """A strict key's whole config: its per-key one if newer than its rule's."""
        config = self.rule_configs[rule]
        own = self.key_configs.get(key)
        return own if own is not None and own.version > config.version else config

    def _too_many(self, key: str, bucket: Bucket, tokens: int) -> InvalidTokens:
        """The refusal of ``tokens`` beyond what ``key`` can ever take, naming that bound:
        a strict key's whole limit when its rights move between regions (its share
        grows toward demand, up to the whole), else its bucket's capacity."""
        capacity = bucket.config.capacity
        if self.share_region is not None and bucket.config.mode == STRICT:
            capacity = self._whole(key, bucket.rule).capacity
        return InvalidTokens(
            f"tokens must be between 0 and the capacity {capacity}, got {tokens}", capacity
        )

    def _within_whole(self, key: str, bucket: Bucket, tokens: int) -> bool:
        """A strict key's share is below ``tokens`` but its whole limit is not: a
        denial (the share may grow), not a bad request."""
        if self.share_region is None or bucket.config.mode != STRICT:
            return False
        return tokens <= self._whole(key, bucket.rule).capacity

    def _floor(self, capacity: int) -> int:
        return floor_parts(max(len(self.share_founders), self.regions), capacity)

    def spendable(self, key: str, capacity: int) -> int:
        """The parts of ``key``'s limit this region may spend now: its holding; a blind
        replica (core/shares.py) its floor less what it gave itself."""
        region = self.share_region
        assert region is not None
        ledger = self.ledgers.get(key)
        held = (
            ledger.holding(region)
            if ledger is not None
            else (SCALE // len(self.share_founders) if region in self.share_founders else 0)
        )
        if ledger is not None and any(gone == region for _, gone in ledger.acks):
            return 0  # removed from the region list: its rights are handed over
        if self.share_blind:
            # what this life gave counts; what the region received does not (a gift
            # its previous life took may still be in flight to it: docs/sync.md)
            own = 0 if ledger is None else ledger.given_by(region, self.replica_id)
            held = min(held, self._floor(capacity) - own)
        return max(0, held)

    def _effective(self, key: str, whole: BucketConfig) -> tuple[int, int]:
        """The limit this region divides: the lowest any region runs on (or ran on
        before, while one has not said which it runs on), so a raise takes effect
        only once every region has adopted it."""
        capacity, interval = whole.capacity, whole.interval_ns
        ledger = self.ledgers.get(key)
        if ledger is None:
            return capacity, interval
        retired = self._retired(ledger)
        reports = {r: report for r, report in ledger.reports.items() if r not in retired}
        missing = any(
            region not in reports
            for region in ledger.founders
            if region != self.share_region and region not in retired
        )
        for region, report in reports.items():
            if region != self.share_region:
                capacity = min(capacity, report.capacity)
                interval = max(interval, report.interval_ns)
            if missing:
                capacity = min(capacity, report.prev_capacity)
                interval = max(interval, report.prev_interval_ns)
        return capacity, interval

    def _ceiling(self, key: str, whole: BucketConfig) -> tuple[int, int] | None:
        """The highest limit another region may still run on for ``key`` (its report,
        or, while a region has not reported, the limits any region ran on before),
        when above the one this region divides: a lowering not yet adopted
        everywhere. None otherwise."""
        ledger = self.ledgers.get(key)
        if ledger is None:
            return None
        low = self._effective(key, whole)
        capacity, interval = low
        retired = self._retired(ledger)
        reports = {r: report for r, report in ledger.reports.items() if r not in retired}
        me = self.share_region
        members = (ledger.regions() | set(self.share_regions)) - retired
        missing = any(region not in reports for region in members if region != me)
        for region, report in reports.items():
            if region != me:
                capacity = max(capacity, report.capacity)
                interval = min(interval, report.interval_ns)
            if missing:
                capacity = max(capacity, report.prev_capacity)
                interval = min(interval, report.prev_interval_ns)
        if (capacity, interval) == low:
            return None
        return capacity, interval

    def _burner(self, whole: BucketConfig) -> bool:
        """This region made the change (``whole``'s version is its own): it burns the
        excess of a lowering until every region runs on it (docs/sync.md)."""
        return region_of(whole.version[1]) == self.share_region

    def _share(self, key: str, config: BucketConfig) -> BucketConfig:
        """The config of this region's bucket for ``key`` under the whole ``config``."""
        if self.share_region is None or config.mode != STRICT:
            return share_of(config, self.regions)
        self.share_running[key] = (config.capacity, config.interval_ns)
        capacity, interval = self._effective(key, config)
        parts = self.spendable(key, capacity)
        high = self._ceiling(key, config) if self._burner(config) else None
        if high is None:
            capacity, interval = share_limits(capacity, interval, parts)
        else:
            capacity, interval = burnt_limits(capacity, interval, parts, *high)
        return msgspec.structs.replace(config, capacity=capacity, interval_ns=interval)

    def _ledger(self, key: str) -> Ledger:
        ledger = self.ledgers.get(key)
        if ledger is None:
            ledger = self.ledgers[key] = Ledger(self.share_founders)
        return ledger

    def _report(self, key: str, ledger: Ledger, whole: BucketConfig, now: int) -> bool:
        """Say (again) what this region runs on, holds and wants for ``key``."""
        region = self.share_region
        assert region is not None
        known = ledger.reports.get(region)
        demand = round(self.share_demand.get(key, 0.0) * 1000)
        held = self.spendable(key, whole.capacity)
        prev = self.share_running.get(key, (whole.capacity, whole.interval_ns))
        if known is not None:
            prev = (known.capacity, known.interval_ns)
            if (known.capacity, known.interval_ns) != (whole.capacity, whole.interval_ns):
                pass
            elif known.held == held and abs(known.demand_milli - demand) <= max(
                50, known.demand_milli // 10
            ):
                return False  # nothing new worth a delta
            else:
                prev = (known.prev_capacity, known.prev_interval_ns)
        ledger.report(
            region,
            ShareReport(self.hlc.tick(now), demand, held, whole.capacity, whole.interval_ns, *prev),
        )
        return True

    def _reshare(self, key: str, now: int) -> None:
        """Give ``key``'s strict bucket the share this region holds now, and credit the
        tokens handed to it since the last time."""
        bucket = self.buckets.get(key)
        ledger = self.ledgers.get(key)
        if bucket is None or bucket.config.mode != STRICT or self.share_region is None:
            return
        whole = self._whole(key, bucket.rule)
        share = self._share(key, whole)
        if (share.capacity, share.interval_ns) != (
            bucket.config.capacity,
            bucket.config.interval_ns,
        ) or share.version != bucket.config.version:
            bucket.reconfigure(share, now)
        if self.journal is not None:
            self.journal.keys.add(key)
        if ledger is None or self.share_blind:
            return  # a blind replica credits no tokens: it cannot tell which were taken
        region = self.share_region
        pending = ledger.tokens_received(region) - ledger.taken.get(region, 0)
        if pending > 0:
            ledger.taken[region] = ledger.taken.get(region, 0) + pending
            room = bucket.config.capacity - bucket.level(now)
            credit = min(pending, max(0, room))
            if credit:
                _credit(bucket, credit, now)
                self.share_received_tokens += credit

    def observe_replica(self, replica_id: str) -> None:
        """A message from ``replica_id`` (region/node/incarnation): older incarnations
        of that node are superseded, their gift counters frozen here (shares.py)."""
        node, _, incarnation = replica_id.rpartition("/")
        if not incarnation.isdigit():
            return
        number = int(incarnation)
        known = self.share_newest.get(node)
        if known is None or number > known:
            self.share_newest[node] = number

    def _accepts_giver(self, giver: str) -> bool:
        node, _, incarnation = giver.rpartition("/")
        newest = self.share_newest.get(node)
        if newest is None or not incarnation.isdigit():
            return True
        # our own node's past lives always count: they are what this life gave
        return int(incarnation) >= newest or giver.startswith(self._own_node)

    @property
    def _own_node(self) -> str:
        return self.replica_id.rpartition("/")[0] + "/"

    def shares_pulled(self) -> None:
        """Every other region's state is merged (each froze our previous lives' gifts
        first): a blind replica spends its ledger holding again, forfeiting the tokens
        handed to its region so far (its previous life may have credited them)."""
        region = self.share_region
        if not self.share_blind or region is None:
            return
        self.share_blind = False
        for ledger in self.ledgers.values():
            ledger.taken[region] = max(ledger.taken.get(region, 0), ledger.tokens_received(region))
        self.rescale_shares()

    def _merge_ledger(self, key: str, state: ShareState, now: int, frozen: bool = True) -> bool:
        """Join a ledger in; ``frozen`` False: superseded incarnations' counters are taken
        too (a Redis region's own committed ledger: each was taken before the freeze)."""
        if self.share_region is None:
            return False
        other = Ledger.from_state(state)
        ledger = self.ledgers.get(key)
        if ledger is None:
            ledger = self.ledgers[key] = Ledger(other.founders or self.share_founders)
        changed = ledger.merge(other, self._accepts_giver if frozen else None)
        if changed:
            self._reshare(key, now)
            bucket = self.buckets.get(key)
            rule = bucket.rule if bucket is not None else self._rule_name(key)
            if rule is not None and self._report(key, ledger, self._whole(key, rule), now):
                self.dirty.add(key)
        return changed

    def _rule_name(self, key: str) -> str | None:
        try:
            return self.rule_for(key).name
        except NoRuleError:
            return None

    def _replay_ledger(self, key: str, state: ShareState) -> None:
        other = Ledger.from_state(state)
        ledger = self.ledgers.get(key)
        if ledger is None:
            self.ledgers[key] = other
        else:
            ledger.merge(other)

    def rebalance(self, now: int, *, period_s: float, connected: bool) -> int:
        """One round of the rebalancer (core/shares.py ``plan``) for every strict key:
        publish this region's demand (tokens asked over the last ``period_s``,
        smoothed), and, when ``connected`` (every peer up: no transfer during a
        partition), give a damped part of the excess over the target to the regions
        short of theirs. Returns how many gifts were made."""
        region = self.share_region
        if region is None:
            return 0
        asked = self.share_asked
        self.share_asked = {}
        denied = self.share_denied
        self.share_denied = set()
        gifts = 0
        for key, held in self.ledgers.items():
            if self._hand_over(held):
                self._reshare(key, now)
                self.dirty.add(key)
        # the keys asked for in this round and those with a ledger (an idle strict key
        # without one is on the initial split: nothing to do); a region without the
        # key's bucket (no demand here) still gives from its ledger
        for key in asked.keys() | self.ledgers.keys():
            bucket = self.buckets.get(key)
            rule = bucket.rule if bucket is not None else self._rule_name(key)
            if rule is None:
                continue
            whole = self._whole(key, rule)
            if whole.mode != STRICT:
                continue
            rate = asked.get(key, 0) / period_s
            old = self.share_demand.get(key)
            demand = rate if old is None else DEMAND_ALPHA * rate + (1 - DEMAND_ALPHA) * old
            if demand < 0.001:
                self.share_demand.pop(key, None)
                demand = 0.0
            else:
                self.share_demand[key] = demand
            ledger = self.ledgers.get(key)
            if ledger is None and demand == 0.0:
                continue  # an idle key with nothing moved: the static split is its ledger
            ledger = self._ledger(key)
            changed = self._report(key, ledger, whole, now)
            # a region that had to deny is short itself: it gives nothing this round;
            # nor while a lowering is not adopted everywhere (a gift would move rights
            # from a region on the new limit to one still on the old: docs/sync.md)
            if connected and key not in denied and self._ceiling(key, whole) is None:
                gifts += self._give(key, bucket, ledger, whole, now)
                changed = changed or gifts > 0
            if changed:
                self.dirty.add(key)
        return gifts

    def _removed(self, ledger: Ledger) -> list[str]:
        """The regions ``ledger`` names that this region does not run with."""
        return sorted(ledger.regions() - set(self.share_regions))

    def _retired(self, ledger: Ledger) -> set[str]:
        """Removed regions whose rights every remaining region agreed to hand over:
        they hold nothing (docs/sync.md), whatever limit they last reported."""
        removed = self._removed(ledger)
        if removed and ledger.handover_ready(removed, self.share_regions):
            return set(removed)
        return set()

    def _hand_over(self, ledger: Ledger) -> bool:
        """Acknowledge the removal of every region this one no longer runs with (it
        takes nothing more from them: ``merge``), and once every remaining region
        has acknowledged with the same region list, hand their rights over in equal
        parts (every remaining region writes the same, by max). Returns whether the
        ledger changed."""
        region = self.share_region
        assert region is not None
        removed = self._removed(ledger)
        if not removed:
            return False
        members = self.share_regions
        changed = False
        for gone in removed:
            if (region, gone) not in ledger.acks:
                ledger.acks[(region, gone)] = members
                changed = True
        if ledger.handover_ready(removed, members):
            for gone in removed:
                changed = ledger.write_handover(gone, ledger.handover(gone, members)) or changed
        return changed

    def _give(
        self, key: str, bucket: Bucket | None, ledger: Ledger, whole: BucketConfig, now: int
    ) -> int:
        region = self.share_region
        assert region is not None
        # the regions this one runs with: nothing goes to a removed one
        members = set(self.share_regions)
        rate = NS_PER_S / whole.interval_ns
        demand_parts = {
            name: min(SCALE, int(report.demand_milli / 1000 / rate * SCALE * HEADROOM))
            for name, report in ledger.reports.items()
        }
        demand_parts[region] = min(
            SCALE, int(self.share_demand.get(key, 0.0) / rate * SCALE * HEADROOM)
        )
        held = self.spendable(key, whole.capacity)
        # what the others hold as this ledger knows it: this region's own gifts count
        # at once (a report would lag them, and rights would be sent twice)
        holdings = {name: ledger.holding(name) for name in members}
        gifts = plan(
            region,
            held,
            members,
            holdings,
            demand_parts=demand_parts,
            floor=self._floor(whole.capacity),
        )
        if not gifts:
            return 0
        total = sum(gifts.values())
        # the tokens above the capacity left after the gift go with it
        capacity, interval = self._effective(key, whole)
        after, _ = share_limits(capacity, interval, held - total)
        # never more tokens than the parts given are worth (rounded down): the tokens
        # in flight and the levels together stay within the capacities of the rights
        worth, _ = share_limits(capacity, interval, total)
        level = 0 if bucket is None else bucket.level(now)
        surplus = max(0, min(level - after, worth))
        destroyed = max(0, level - after - surplus)
        if bucket is not None and surplus + destroyed:
            bucket.acquire(key, surplus + destroyed, now)  # out of this region's bucket
        handed = 0
        for index, (name, parts) in enumerate(sorted(gifts.items())):
            tokens = surplus - handed if index == len(gifts) - 1 else surplus * parts // total
            handed += tokens
            ledger.give(self.replica_id, name, parts, tokens)
            self.share_given_parts += parts
            self.share_given_tokens += tokens
        self.share_gifts += len(gifts)
        self._reshare(key, now)
        self._report(key, ledger, whole, now)
        return len(gifts)

    def pending_lowering(self, key: str) -> dict[str, Any] | None:
        """A lowering of strict ``key``'s limit made here that is not in force yet: the
        rights this region holds above its floor do not cover the excess
        (``shares.burn_covered``; docs/sync.md, "Runtime changes"), so the old limit
        bounds the key until every region runs on the new one. Returns the limit that
        bounds meanwhile, the regions that run on the new limit (``cut``) and those
        not yet (``waiting``); None when the change is in force (covered, a raise, or
        every region has cut), when shares are off, or when the key is not strict."""
        region = self.share_region
        if region is None:
            return None
        bucket = self.buckets.get(key)
        rule = bucket.rule if bucket is not None else self._rule_name(key)
        if rule is None:
            return None
        whole = self._whole(key, rule)
        if whole.mode != STRICT or not self._burner(whole):
            return None
        high = self._ceiling(key, whole)
        ledger = self.ledgers.get(key)
        if high is None or ledger is None:
            return None
        capacity, interval = self._effective(key, whole)
        # as the simulator bounds it: a restart without a snapshot leaves the origin
        # at least its floor, spent on the old limit until its pull
        floor = max(self._floor(high[0]), self._floor(whole.capacity))
        parts = self.spendable(key, high[0]) - floor
        if burn_covered(capacity, interval, parts, high[0], high[1]):
            return None
        members = (ledger.regions() | set(self.share_regions)) - self._retired(ledger)
        target = (whole.capacity, whole.interval_ns)
        cut: list[str] = []
        waiting: list[str] = []
        for name in sorted(members):
            report = ledger.reports.get(name)
            on_new = name == region or (
                report is not None and (report.capacity, report.interval_ns) == target
            )
            (cut if on_new else waiting).append(name)
        if not waiting:
            return None
        return {
            "bound": {"capacity": high[0], "refill_rate": NS_PER_S / high[1]},
            "cut": cut,
            "waiting": waiting,
        }

    def share_utilisation(self) -> float:
        """The mean part of their limits this region holds over its ledgers (0..1)."""
        region = self.share_region
        if region is None or not self.ledgers:
            return 0.0
        held = [max(0, ledger.holding(region)) / SCALE for ledger in self.ledgers.values()]
        return sum(held) / len(held)

    def share_view(self, key: str) -> dict[str, dict[str, Any]] | None:
        """Each region's rights and demand for a strict key, as this replica knows
        them (``/v1/bucket/state``); None when shares are off or the key is not strict."""
        if self.share_region is None:
            return None
        ledger = self.ledgers.get(key)
        # what this region may spend is judged against the whole limit (its floor is a
        # part of it), not against its bucket's share
        bucket = self.buckets.get(key)
        rule = bucket.rule if bucket is not None else self._rule_name(key)
        capacity = self._whole(key, rule).capacity if rule is not None else 0
        if ledger is None:
            names = set(self.share_founders)
            return {
                name: {
                    # this region's own entry: what it may spend now (a blind replica,
                    # restarted without a snapshot and not pulled yet, its floor)
                    "rights": (
                        self.spendable(key, max(1, capacity))
                        if name == self.share_region
                        else SCALE // len(self.share_founders)
                    )
                    / SCALE,
                    "demand": 0.0,
                    "reported": False,
                }
                for name in sorted(names)
            }
        out = {}
        for name in sorted(ledger.regions() | set(self.share_founders)):
            report = ledger.reports.get(name)
            held = ledger.holding(name)
            if name == self.share_region:
                held = self.spendable(key, max(1, capacity))
            out[name] = {
                "rights": held / SCALE,
                "demand": (report.demand_milli / 1000) if report is not None else 0.0,
                "reported": report is not None,
                # the whole limit the region last said it runs on: a PATCH is adopted
                # everywhere once every region's is the new one (docs/sync.md)
                "limit": None
                if report is None
                else {
                    "capacity": report.capacity,
                    "refill_rate": NS_PER_S / report.interval_ns,
                },
            }
        return out

    # -- replication ---------------------------------------------------------

    def collect_deltas(self, limit: int | None = None) -> DeltaBatch:
        """The deltas of every bucket changed since the last call (and clears the set).
        With ``limit``, of at most that many of them: the rest stay dirty for the next
        call (a caller with a million dirty keys, a PATCH of a rule every bucket belongs
        to, takes them a slice per event-loop turn instead of building them all in one).
        The changed rule configs come with the first call that finds them."""
        deltas = []
        buckets = self.buckets
        rid = self.replica_id
        dirty = self.dirty
        chosen: Iterable[str] = dirty
        if limit is not None and len(dirty) > limit:
            chosen = [dirty.pop() for _ in range(max(limit, 0))]
        for key in chosen:
            bucket = buckets.get(key)
            if bucket is None and key in self.ledgers:
                # a strict key's ledger changed where the key has no bucket
                rule = self._rule_name(key)
                if rule is not None:
                    deltas.append(self.strict_config_delta(key, rule))
            elif bucket is not None:
                if bucket.config.mode != SHARED:
                    deltas.append(self.strict_config_delta(key, bucket.rule))
                else:
                    deltas.append(bucket.delta(key, rid))
        if chosen is dirty:
            dirty.clear()
        rules = {name: self.rule_configs[name] for name in self.dirty_rules}
        self.dirty_rules.clear()
        return DeltaBatch(rid, deltas, rules)

    def full_state(self, keys: Iterable[str] | None = None) -> DeltaBatch:
        """Every shared bucket with every entry known here: for repair and new peers."""
        rid = self.replica_id
        buckets = self.buckets
        chosen = buckets.keys() if keys is None else keys
        deltas = []
        for key in chosen:
            bucket = buckets.get(key)
            if bucket is not None and bucket.config.mode == SHARED:
                deltas.append(bucket.full_state(key, rid))
        key_configs, ledgers = self.key_configs, self.ledgers
        if keys is None:
            strict: Iterable[str] = key_configs.keys() | ledgers.keys()
        else:  # per key of the slice: a slice costs its own size, not every strict key's
            strict = {key for key in keys if key in key_configs or key in ledgers}
        for key in strict:
            held = buckets.get(key)
            rule = held.rule if held else self._rule_name(key)
            if rule is not None or key in self.key_configs:
                deltas.append(self.strict_config_delta(key, rule or ""))
        return DeltaBatch(rid, deltas, dict(self.rule_configs))

    def strict_config_delta(self, key: str, rule: str) -> BucketDelta:
        """A strict key's per-key config, whole, without counters (they never leave)."""
        config = self.key_configs.get(key)
        if config is None:  # a strict bucket under its rule's config: nothing per key
            config = self.rule_configs[rule]
        ledger = self.ledgers.get(key)
        return BucketDelta(
            key,
            0,
            config,
            config.version,
            0,
            {},
            rule,
            shares=None if ledger is None else ledger.state(),
        )

    def _merge_strict_config(self, delta: BucketDelta, now: int) -> bool:
        """Adopt a peer's per-key config of a strict or local key if it is newer than
        ours (its counters never travel)."""
        key, config = delta.key, delta.config
        bucket = self.buckets.get(key)
        known = self.key_configs.get(key)
        if known is not None and known.version >= config.version:
            return False
        if bucket is not None and bucket.config.version > config.version:
            return False
        # Same version as our bucket's share: we restarted without a snapshot and lost
        # the whole config; peers send it back in the start-up pull.
        self.key_configs[key] = config
        if bucket is not None and bucket.config.version < config.version:
            self._adopt(key, bucket, config, now)
        return True

    def merge(self, batch: DeltaBatch, *, now: int | None = None) -> int:
        """Join a peer's batch into this replica; returns how many buckets changed."""
        if now is None:
            now = self.clock()
        rid = self.replica_id
        # the ledgers of a region this one does not run with (removed from its list, or
        # not added yet) are not taken: what it says reaches this region relayed by
        # the regions that do, and a removed region's counters stop here (handover)
        foreign = False
        if self.share_region is not None:
            self.observe_replica(batch.origin)
            foreign = region_of(batch.origin) not in self.share_regions
        for name, config in batch.rules.items():
            self.merge_rule(name, config, now)
        changed = 0
        buckets = self.buckets
        for delta in batch.deltas:
            self.hlc.observe(delta.config.version[0])
            if delta.config.mode != SHARED:
                # strict and local counters never travel: only their per-key config
                # (and a strict key's rights ledger)
                if self._merge_strict_config(delta, now):
                    changed += 1
                shares = delta.shares
                if shares is not None and foreign:
                    # only its acknowledgements (a removed region learns it is removed
                    # from whoever it hears)
                    shares = ShareState((), acks=shares.acks) if shares.acks else None
                if shares is not None and self._merge_ledger(delta.key, shares, now):
                    changed += 1
                continue
            bucket = buckets.get(delta.key)
            if (
                bucket is not None
                and bucket.config.mode != SHARED
                and bucket.config.version >= delta.config.version
            ):
                continue  # a strict or local bucket here (the newer config): never merged
            if bucket is None:
                fresh = self._compact(Bucket.from_delta(delta, rid))
                if fresh.expired(now):
                    # A stale copy of a bucket that is full for longer than its ttl:
                    # the same as no bucket. Re-creating it would restore our own
                    # entry from a peer's possibly older copy (below what we spent).
                    continue
                if len(buckets) >= self.max_buckets:
                    self.expire(now)
                    if len(buckets) >= self.max_buckets:
                        self.cap_rejections += 1
                        continue
                bucket = self._store(delta.key, fresh)
                folds_before = bucket.folds  # a bucket new here: its peers hold the fold
                changed += 1
                if self.evicted and (
                    delta.key not in self.tombstones
                    or self.tombstones[delta.key][0] != bucket.epoch
                ):
                    self._settle_evicted(delta.key, bucket)
            else:
                # a fold record this merge changes is logged (below); only then
                folds_before = dict(bucket.folds) if delta.folds and bucket.folds else None
                left_epoch, left_mine = bucket.epoch, bucket.mine
                left_shared = bucket.config.mode == SHARED
                if delta.config.version > bucket.config.version:
                    # A newer config orders by its version alone, whatever the epochs (a
                    # mode change back to shared must reach a region whose own bucket
                    # was re-created in a later epoch). Adopt it here first, as a local write
                    # keeping the level we see now, so that a base proposed before we
                    # drained the bucket cannot hand back refill we already forgot
                    # (the max of both proposals wins). Like a rule config's adoption,
                    # this makes the base depend on merge order until replicas exchange.
                    self._adopt(delta.key, bucket, delta.config, now)
                    if delta.key in self.key_configs:  # the per-key record follows
                        self.key_configs[delta.key] = delta.config
                    bucket.merge(delta, rid, now)
                    changed += 1
                elif bucket.merge(delta, rid, now):
                    changed += 1
                else:
                    continue
                if bucket.config is delta.config:
                    self._compact(bucket)
                if bucket.epoch != left_epoch and left_mine and left_shared:
                    # a later generation replaced one we spent in: if a peer sends that
                    # one back after the later one expired here, our entry in it must
                    # restart at what we spent (as a dropped bucket's tombstone does)
                    self._forgotten(delta.key, left_epoch, left_mine, now, bucket.config.ttl_ns)
            if delta.folds and self.journal is not None and bucket.folds != folds_before:
                self.journal.folds.add(delta.key)  # the fold is logged: it survives a crash
            if self.tombstones and delta.key in self.tombstones:
                self._settle_tombstone(delta.key, bucket)
            # A bucket that learned of data older than its rule's runtime config
            # takes the rule's config (the newest version wins everywhere).
            rule_cfg = self.rule_configs.get(bucket.rule)
            if rule_cfg is not None and rule_cfg.version > bucket.config.version:
                self._adopt(delta.key, bucket, rule_cfg, now)
        return changed

    def merge_rule(self, name: str, config: BucketConfig, now: int) -> None:
        current = self.rule_configs.get(name)
        if current is None or config.version <= current.version:
            return
        self.hlc.observe(config.version[0])
        self.rule_configs[name] = config
        if self.journal is not None:
            # logged as a PATCH here is: a node restarted from its log alone knows the
            # newest file load of these limits and keeps it (``stamp_file_rules``)
            self.journal.rules.add(name)
        self._adopt_rule(name, current, config, now)

    def _compact(self, bucket: Bucket) -> Bucket:
        """Make a decoded bucket share what equal buckets hold alike.

        A bucket decoded from a snapshot, a log or a peer's message owns fresh
        copies of its config, versions, rule name, replica ids and epoch —
        about 600 bytes that a million buckets would hold a million times over.
        Values are interned in one table, cleared when it grows past 100,000
        (only sharing is lost, never state).
        """
        shared = self._shared
        if len(shared) > 100_000:
            shared.clear()
        config = bucket.config
        # Slices decode runs of buckets with equal configs: compare with the last
        # one before hashing (a struct's hash walks all its fields).
        last = self._last_config
        if config is not last:
            if config == last:
                config = last
            else:
                config = self._last_config = shared.setdefault(config, config)
        bucket.config = config
        base_version = bucket.base_version
        bucket.base_version = (
            config.version
            if base_version == config.version
            else shared.setdefault(base_version, base_version)
        )
        bucket.rule = shared.setdefault(bucket.rule, bucket.rule)
        epoch = shared.setdefault(bucket.epoch, bucket.epoch)
        if bucket.base_time == epoch:
            bucket.base_time = epoch
        if bucket.g == epoch:
            bucket.g = epoch
        bucket.epoch = epoch
        bucket.share_ids(shared)
        return bucket

    # -- write-ahead log ---------------------------------------------------------

    def enable_journal(self) -> Journal:
        """Start recording grants and config changes for a write-ahead log."""
        if self.journal is None:
            self.journal = Journal()
            # the rules in effect open the log: a node killed before its first snapshot
            # replays them and keeps the file versions it loaded (``stamp_file_rules``)
            # instead of loading its file anew, which every peer would adopt again
            self.journal.rules.update(self.rule_configs)
        return self.journal

    def collect_journal(self) -> DeltaBatch | None:
        """This replica's own entry of every bucket granted (or reconfigured) since the
        last call, every mode, and the rules changed: one log group. None if nothing."""
        journal = self.journal
        if not journal:
            return None
        rid = self.replica_id
        buckets = self.buckets
        deltas = []
        for key in journal.keys - journal.folds:
            bucket = buckets.get(key)
            if bucket is not None:
                delta = bucket.delta(key, rid)
                ledger = self.ledgers.get(key)
                if ledger is not None:
                    delta.shares = ledger.state()
                deltas.append(delta)
        for key in journal.folds:
            # a fold (retired incarnations, docs/design.md "History") is logged with the
            # whole state it applies to: replay folds again, never below a peer's count
            bucket = buckets.get(key)
            if bucket is not None and bucket.folds:
                deltas.append(bucket.full_state(key, rid))
            elif bucket is not None and key in journal.keys:
                deltas.append(bucket.delta(key, rid))
        rules = {name: self.rule_configs[name] for name in journal.rules}
        journal.keys.clear()
        journal.rules.clear()
        journal.folds.clear()
        return DeltaBatch(rid, deltas, rules)

    def replay(self, batch: DeltaBatch, *, now: int | None = None) -> None:
        """Max-merge a write-ahead-log group (or any batch) at start-up.

        Unlike ``merge``: every mode, no cap, and nothing skipped as expired —
        a log entry holds only one replica's entry, so it may look full when the
        whole bucket is not; the sweep drops what really is idle.
        """
        if now is None:
            now = self.clock()
        rid = self.replica_id
        for name, config in batch.rules.items():
            self.merge_rule(name, config, now)
        buckets = self.buckets
        for delta in batch.deltas:
            self.hlc.observe(delta.config.version[0])
            if delta.shares is not None:
                self._replay_ledger(delta.key, delta.shares)
            bucket = buckets.get(delta.key)
            if bucket is None:
                self._store(delta.key, self._compact(Bucket.from_delta(delta, rid)))
            elif bucket.merge(delta, rid):
                self._compact(bucket)

    # -- garbage and inspection ---------------------------------------------

    def expire(self, now: int | None = None) -> int:
        """Drop buckets full for longer than their ttl; returns how many went."""
        if now is None:
            now = self.clock()
        dead = [key for key, bucket in self.buckets.items() if bucket.expired(now)]
        for key in dead:
            self._drop(key, now)
        self._forget_tombstones(now, len(self.tombstones))
        return len(dead)

    def _drop(self, key: str, now: int) -> None:
        """Drop an expired bucket, keeping its own count as a tombstone if we spent."""
        bucket = self.buckets.pop(key)
        self.dirty.discard(key)
        self.expired_total += 1
        ledger = self.ledgers.get(key)
        if ledger is not None and self.share_region is not None and bucket.config.mode == STRICT:
            self.share_received_full[key] = ledger.received(self.share_region)
        # A strict key's per-key config outlives its bucket (kept in key_configs, applied
        # when the key comes back): its region would otherwise revert to the rule's share
        # while the others keep the patched one.
        if bucket.mine and bucket.config.mode == SHARED and self.keep_tombstones:
            tombstones = self.tombstones
            tombstones.pop(key, None)  # re-inserted last: the dict stays oldest-first
            forget = now + max(2 * bucket.config.ttl_ns, self.tombstone_ns)
            tombstones[key] = (bucket.epoch, bucket.mine, forget)
            if len(tombstones) > self.max_tombstones:
                self._evict_tombstone(next(iter(tombstones)))

    def _evict_tombstone(self, key: str) -> None:
        """Forget a tombstone before its horizon (the cap is full), folding its count into
        ``evicted``: per (epoch, slot of the key's hash) the largest count forgotten, kept
        until the horizon. A generation that comes back for a key with no tombstone then
        restores our entry from its slot (at least what we spent: never hidden)."""
        epoch, mine, forget = self.tombstones.pop(key)
        self._fold_evicted(key, epoch, mine, forget)

    def _forgotten(self, key: str, epoch: int, mine: int, now: int, ttl_ns: int) -> None:
        """Remember our count in generation ``epoch`` of ``key``, which a later one
        replaced while the bucket lived (the key's tombstone slot holds at most one
        generation: the last one dropped), until the tombstone horizon."""
        if self.keep_tombstones:
            self._fold_evicted(key, epoch, mine, now + max(2 * ttl_ns, self.tombstone_ns))

    def _fold_evicted(self, key: str, epoch: int, mine: int, forget: int) -> None:
        slot = (epoch, zlib.crc32(key.encode()) % EVICTED_SLOTS)
        known = self.evicted.get(slot)
        if known is None or known[0] < mine or known[1] < forget:
            self.evicted[slot] = (
                mine if known is None or mine > known[0] else known[0],
                forget if known is None or forget > known[1] else known[1],
            )

    def _settle_evicted(self, key: str, bucket: Bucket) -> None:
        """A generation came back for a key whose tombstone may have been evicted."""
        found = self.evicted.get((bucket.epoch, zlib.crc32(key.encode()) % EVICTED_SLOTS))
        if found is not None:
            bucket.raise_own(found[0])

    def _settle_tombstone(self, key: str, bucket: Bucket) -> None:
        """A generation we dropped came back: our own count in it is what we spent."""
        epoch, mine, _ = self.tombstones[key]
        if epoch == bucket.epoch:
            bucket.raise_own(mine)
        if epoch <= bucket.epoch:
            del self.tombstones[key]
        # An older generation (a peer kept it while ours expired unseen) is kept
        # as peers hold it, so that every replica converges; the tombstone waits.

    def _forget_tombstones(self, now: int, budget: int) -> None:
        if self.evicted and budget >= len(self.evicted):
            self.evicted = {slot: v for slot, v in self.evicted.items() if v[1] > now}
        tombstones = self.tombstones
        while budget > 0 and tombstones:
            key = next(iter(tombstones))
            if tombstones[key][2] > now:
                return
            del tombstones[key]
            budget -= 1

    def expire_step(self, now: int | None = None, budget: int = 10_000) -> int:
        """Look at up to ``budget`` buckets for expiry, resuming where the last call
        stopped, so a server can sweep a million buckets without stalling its loop."""
        if now is None:
            now = self.clock()
        if not self._sweep:
            self._sweep = list(self.buckets)
        chunk = self._sweep[-budget:]
        del self._sweep[-budget:]
        buckets = self.buckets
        dropped = 0
        for key in chunk:
            bucket = buckets.get(key)
            if bucket is not None and bucket.expired(now):
                self._drop(key, now)
                dropped += 1
        self._forget_tombstones(now, budget)
        return dropped

    def bucket(self, key: str) -> Bucket | None:
        return self.buckets.get(key)

    def inspect(self, key: str, *, rule: str | None = None, now: int | None = None) -> Bucket:
        """The live bucket for ``key``, or the full one it would start as (not stored)."""
        bucket = self.buckets.get(key)
        if bucket is not None:
            return bucket
        return self._fresh(key, rule, self.clock() if now is None else now)

    def __len__(self) -> int:
        return len(self.buckets)

    # -- persistence -----------------------------------------------------------

    def snapshot_head(self) -> bytes:
        """A snapshot without buckets: this replica's id, hlc and rules.

        ``restore(snapshot_head())`` followed by ``replay(snapshot_part(keys))``
        for every slice of the keys rebuilds what ``restore(snapshot())`` would,
        a slice at a time: a server writes and reads its snapshot file so, with
        its event loop running in between and never the whole decoded state in
        memory at once.
        """
        return msgspec.msgpack.encode(
            Snapshot(
                SNAPSHOT_FORMAT,
                self.replica_id,
                self.hlc.last,
                dict(self.rule_configs),
                [],
                dict(self.file_versions),
                dict(self.key_configs),
                {key: ledger.state() for key, ledger in self.ledgers.items()},
                self.share_blind,
                self._recovery_state(),
                dict(self.share_newest),
            )
        )

    def snapshot_part(self, keys: Iterable[str]) -> DeltaBatch:
        """The buckets of ``keys`` still live, all modes, with every known entry."""
        rid = self.replica_id
        buckets = self.buckets
        deltas = []
        for key in keys:
            bucket = buckets.get(key)
            if bucket is not None:
                delta = bucket.full_state(key, rid)
                ledger = self.ledgers.get(key)
                if ledger is not None:
                    delta.shares = ledger.state()
                deltas.append(delta)
        return DeltaBatch(rid, deltas)

    def snapshot(self) -> bytes:
        """Every bucket (all modes) with every known entry, as msgpack."""
        rid = self.replica_id
        state = Snapshot(
            SNAPSHOT_FORMAT,
            rid,
            self.hlc.last,
            dict(self.rule_configs),
            [bucket.full_state(key, rid) for key, bucket in self.buckets.items()],
            dict(self.file_versions),
            dict(self.key_configs),
            {key: ledger.state() for key, ledger in self.ledgers.items()},
            self.share_blind,
            self._recovery_state(),
            dict(self.share_newest),
        )
        return msgspec.msgpack.encode(state)

    @classmethod
    def restore(
        cls,
        data: bytes,
        rules: Sequence[Rule] = (),
        *,
        replica_id: str | None = None,
        clock: Callable[[], int] = time.time_ns,
        max_buckets: int = 1_000_000,
        regions: int = 1,
    ) -> Limiter:
        """A limiter resuming a snapshot.

        With ``replica_id`` None the snapshot's own id is resumed: its entries
        continue from where they stopped. A different id (a new incarnation)
        keeps the old id's entries as a peer's, so nothing spent is re-granted.
        """
        snap = msgspec.msgpack.decode(data, type=Snapshot)
        if snap.format != SNAPSHOT_FORMAT:
            raise ValueError(f"unsupported snapshot format {snap.format}")
        limiter = cls(
            rules,
            replica_id=replica_id or snap.replica_id,
            clock=clock,
            max_buckets=max_buckets,
            regions=regions,
        )
        limiter.hlc.observe(snap.hlc)
        rid = limiter.replica_id
        limiter.file_versions = {
            name: (version[0], version[1]) for name, version in snap.files.items()
        }
        limiter.key_configs = dict(snap.keys)
        limiter.ledgers = {key: Ledger.from_state(state) for key, state in snap.shares.items()}
        limiter.share_blind = snap.blind
        limiter.share_newest = dict(snap.newest)
        if snap.recovery is not None:
            # strict and local buckets created before its end still start empty
            limiter.unknown_since, limiter.recovery_until = snap.recovery
        for name, config in snap.rules.items():
            # a runtime config, or another (stamped) file version this replica had adopted
            current = limiter.rule_configs.get(name)
            if (
                current is not None
                and config.version > current.version
                and not legacy_file_version(config.version)
            ):
                limiter.rule_configs[name] = config
        for delta in snap.buckets:
            # a snapshot written in slices may hold configs newer than its head's hlc
            limiter.hlc.observe(delta.config.version[0])
            limiter.buckets[delta.key] = limiter._compact(Bucket.from_delta(delta, rid))
        untrack(limiter.buckets)  # once for the whole load (``_store``)
        return limiter


__all__ = [
    "LOCAL",
    "SHARED",
    "STRICT",
    "BucketCapReached",
    "Decision",
    "DeltaBatch",
    "InvalidTokens",
    "Journal",
    "Limiter",
    "LimiterError",
    "NoRuleError",
]
