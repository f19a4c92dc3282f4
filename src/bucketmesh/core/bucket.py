"""The replicated token bucket: its state, its math and its merge, in one place.

Theory of operation
-------------------
Every region holds a replica of each bucket and decides locally from its own
view; replicas exchange *deltas* and merge them. A bucket's state is a product
of join-semilattices, joined part by part, so merge is commutative,
associative and idempotent, and duplicated, reordered or re-sent deltas do no
harm:

``epoch``
    The bucket's generation (integer ns, see "Garbage" below). States of a
    higher epoch replace states of a lower one wholesale (a lexicographic
    product: a total order over a lattice is still a lattice).
``config`` = (capacity C, emission interval T ns/token, ttl, mode, version)
    A last-writer-wins register ordered by ``version`` = (hybrid logical
    clock, origin). Rules loaded at start-up have clock 0; ``configure``
    (PATCH) stamps a fresh HLC value, so a runtime change beats the file.
``used[replica]``
    Tokens ever consumed at that replica in this epoch: a grow-only counter,
    merged by per-entry max. Only the owner writes its entry.
``base`` = (version, time)
    A max-register ordered by (config version, time): the instant from which
    the bucket refills, as proposed by whoever last saw it full.

GCRA form, in integer nanoseconds and integer tokens::

    TAT  = base.time + (Σ used) · T                  theoretical arrival time
    L(t) = C − ceil(max(0, TAT − t) / T)             level; never above C
    acquire n at t:  allowed  ⇔  L(t) ≥ n  ⇔  TAT + n·T − t ≤ C·T
                     if TAT < t: base := max(base, t − (Σ used)·T)   (was full)
                     then used[self] += n
    retry_after(n) = max(0, TAT + n·T − C·T − t)
    reset_after    = max(0, TAT − t)                 until the bucket is full

Because ``T`` is an integer carried inside ``config``, two replicas holding
the same state compute the same level at the same instant, bit for bit. A
delta is "my entry of ``used`` is now N, ``base`` is B, ``config`` is K":
absolute values, never increments, so a later delta subsumes an earlier one.

Config changes keep the level at the change instant: the replica adopting
version v proposes ``base = (v, t)`` such that L(t) under the new config
equals min(L(t) under the old one, new C) — raising capacity never refills
the bucket for free. ``base`` of a higher version dominates, so replicas
converge in whatever order they learn things; ``used`` that arrives late from
the old version is charged at the new rate, never lost. A replica that learns
a newer config from a peer adopts it the same way before merging (the
limiter does it: a local write keeping the level it sees then), so the
proposer's older base cannot hand back refill that this replica forgot when
it re-based a full bucket meanwhile; the later of the two proposals wins.

Error terms (documented, measured in the simulator and benchmarks, not hidden)
-----------------------------------------------------------------------------
* Connected, one-way delay d, n regions: over-admission is at most about
  (n−1)·(C + r·d) in the worst case (each region may spend what it has not
  yet heard the others spend) and far less under steady traffic. A lagging
  replica can only over-raise ``base``, which under-admits briefly (safe).
* A partition of k groups lasting P admits up to (k−1)·(C + r·P) extra
  (local-only mode). After healing, the merged ``used`` puts the bucket into
  debt (L < 0), which refill repays, so the long-run total matches the limit.
* Clock skew ε between regions shifts ``base`` proposals: about r·ε tokens.

Garbage
-------
A bucket full for longer than its ttl (TAT + ttl ≤ now) may be dropped:
dropping a full bucket is the same as keeping it for *local* decisions, but
its ``used`` entries are gone, so a re-created bucket must not be merged
with the old generation (the owner's counter would restart below the max
others still hold, hiding new consumption). Hence ``epoch``: a bucket
created at t gets epoch ``t − t mod ttl``. Replicas that create a key at
about the same time agree on the epoch; a bucket can only be dropped at
least one ttl after its epoch began, so its re-creation always has a higher
epoch and replaces any stale copy instead of merging with it. The price: in
the rare race where a region still spends on the old generation after
another region re-created the key, or creations straddle an epoch boundary
under clock skew, the losing generation's spending within one sync delay is
forgotten (≤ C + r·d, inside the connected bound above).
A replica that dropped a generation it spent in and then learns that same
generation back from a peer restores its own entry from a tombstone the
limiter keeps (``limiter.py``), not from the peer's possibly older view.

This module does no I/O and reads no clock: time is always an argument.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

import msgspec

# The modes, defined once: the wire structs' type (and the OpenAPI enum), the
# validator (core.limits) and the code all read them from here.
ModeName = Literal["shared", "strict", "local"]
MODES: Final[tuple[str, ...]] = get_args(ModeName)
SHARED: Final = "shared"
STRICT: Final = "strict"
LOCAL: Final = "local"

NS_PER_S: Final = 1_000_000_000

Version = tuple[int, str]
"""(hybrid logical clock, origin): origin is a replica id, or ``rule:<digest>``."""


class BucketConfig(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One generation of a bucket's limits. ``interval_ns`` is T = 1e9 / refill rate."""

    capacity: int
    interval_ns: int
    ttl_ns: int
    mode: str
    version: Version

    @property
    def refill_rate(self) -> float:
        return NS_PER_S / self.interval_ns


def interval_for(refill_rate: float) -> int:
    """The integer emission interval for a rate in tokens per second (at least 1 ns)."""
    if not refill_rate > 0:
        raise ValueError(f"refill rate must be > 0, got {refill_rate}")
    return max(1, round(NS_PER_S / refill_rate))


class Decision(msgspec.Struct, frozen=True, gc=False):
    """The answer to one acquire or peek; times in seconds (floats, ns precision)."""

    allowed: bool
    key: str
    tokens_remaining: int
    capacity: int
    refill_rate: float
    retry_after: float
    reset_after: float
    mode: str
    rule: str


class BucketDelta(msgspec.Struct, array_like=True, gc=False):
    """What replicas exchange: absolute values, so merging one twice is harmless.

    ``used`` carries the sender's own entry (a delta) or every entry it knows
    (a full-state transfer); merge treats both alike.
    """

    key: str
    epoch: int
    config: BucketConfig
    base_version: Version
    base_time: int
    used: dict[str, int]
    rule: str = ""


class Hlc:
    """Hybrid logical clock: stamps strictly above every stamp seen, near wall time."""

    __slots__ = ("last",)

    def __init__(self, last: int = 0) -> None:
        self.last = last

    def tick(self, now_ns: int) -> int:
        self.last = now_ns if now_ns > self.last else self.last + 1
        return self.last

    def observe(self, stamp: int) -> None:
        if stamp > self.last:
            self.last = stamp


def epoch_for(now_ns: int, ttl_ns: int) -> int:
    return now_ns - now_ns % ttl_ns


class Bucket:
    """One replica's view of one bucket. ``mine`` is this replica's entry of ``used``.

    ``total`` caches Σ used so that a decision is O(1); ``others`` is None until
    another replica's entry is merged (most buckets never leave one region).

    Memory: other replicas' entries are held in ``entries``: None, then one
    ``(replica, used)`` tuple — the usual case: one other region, or this
    node's previous incarnation after a restart — and a dict only from the
    second on. A one-entry dict costs about three times the tuple, and a
    million buckets are the target (docs/targets.md P7).
    """

    __slots__ = (
        "base_time",
        "base_version",
        "config",
        "entries",
        "epoch",
        "mine",
        "rule",
        "total",
    )

    def __init__(self, config: BucketConfig, now_ns: int, rule: str = "") -> None:
        self.config = config
        self.epoch = epoch_for(now_ns, config.ttl_ns)
        self.base_version = config.version
        self.base_time = self.epoch  # TAT = epoch ≤ now: a new bucket is full
        self.mine = 0
        self.entries: tuple[str, int] | dict[str, int] | None = None
        self.total = 0
        self.rule = rule

    # -- reading -------------------------------------------------------------

    @property
    def others(self) -> dict[str, int] | None:
        """The other replicas' entries of ``used`` (a copy), or None if none is known."""
        entries = self.entries
        if entries is None:
            return None
        if isinstance(entries, tuple):
            return {entries[0]: entries[1]}
        return dict(entries)

    def tat(self) -> int:
        return self.base_time + self.total * self.config.interval_ns

    def level(self, now_ns: int) -> int:
        """Whole tokens available at ``now_ns``; negative while in debt after a partition."""
        interval = self.config.interval_ns
        backlog = self.base_time + self.total * interval - now_ns
        if backlog <= 0:
            return self.config.capacity
        return self.config.capacity - (-(-backlog // interval))

    def retry_after_ns(self, tokens: int, now_ns: int) -> int:
        cfg = self.config
        wait = self.tat() + tokens * cfg.interval_ns - cfg.capacity * cfg.interval_ns - now_ns
        return wait if wait > 0 else 0

    def reset_after_ns(self, now_ns: int) -> int:
        backlog = self.tat() - now_ns
        return backlog if backlog > 0 else 0

    def expired(self, now_ns: int) -> bool:
        """Full for longer than its ttl: safe to drop (see "Garbage" above)."""
        return self.tat() + self.config.ttl_ns <= now_ns

    def used(self, replica_id: str) -> dict[str, int]:
        entries = self.others or {}
        if self.mine or not entries:
            entries[replica_id] = self.mine
        return entries

    # -- writing -------------------------------------------------------------

    def acquire(self, key: str, tokens: int, now_ns: int) -> Decision:
        """Take ``tokens`` if the level allows (``tokens == 0`` only peeks) and say so.

        ``base`` moves only when a grant is made on a full bucket, so a denied
        request or a peek never changes the replicated state. This is the hot
        path: one pass, integer math, one allocation (the Decision).
        """
        cfg = self.config
        interval = cfg.interval_ns
        capacity = cfg.capacity
        spent = self.total * interval
        backlog = self.base_time + spent - now_ns  # TAT − t; negative: full since then
        need = tokens * interval
        if (backlog if backlog > 0 else 0) + need > capacity * interval:
            return Decision(
                False,
                key,
                capacity - (-(-backlog // interval)) if backlog > 0 else capacity,
                capacity,
                NS_PER_S / interval,
                ((backlog if backlog > 0 else 0) + need - capacity * interval) / NS_PER_S,
                backlog / NS_PER_S if backlog > 0 else 0.0,
                cfg.mode,
                self.rule,
            )
        if tokens > 0:
            if backlog < 0:
                self.base_time = now_ns - spent
                backlog = 0
            self.mine += tokens
            self.total += tokens
            backlog += need
        return Decision(
            True,
            key,
            capacity - (-(-backlog // interval)) if backlog > 0 else capacity,
            capacity,
            NS_PER_S / interval,
            0.0,
            backlog / NS_PER_S if backlog > 0 else 0.0,
            cfg.mode,
            self.rule,
        )

    def reconfigure(self, config: BucketConfig, now_ns: int) -> None:
        """Adopt a newer config, proposing the ``base`` that keeps the level at ``now_ns``.

        The backlog (time until full) is carried over in tokens, with the
        capacity delta added; ceil keeps the rounding on the safe side.
        """
        old = self.config
        backlog_old = self.tat() - now_ns
        if backlog_old < 0:
            backlog_old = 0
        # tokens missing, old rate → new rate; then the capacity change (clamped at full)
        backlog = -(-backlog_old * config.interval_ns // old.interval_ns)
        backlog += (config.capacity - old.capacity) * config.interval_ns
        if backlog < 0:
            backlog = 0
        self.config = config
        self.base_version = config.version
        self.base_time = now_ns + backlog - self.total * config.interval_ns

    def delta(self, key: str, replica_id: str) -> BucketDelta:
        """This replica's own entry, with ``base`` and ``config``: what a sync push carries."""
        return self._encoded(key, {replica_id: self.mine})

    def full_state(self, key: str, replica_id: str) -> BucketDelta:
        """Every entry known here: for repair, new peers and snapshots."""
        return self._encoded(key, self.used(replica_id))

    def _encoded(self, key: str, used: dict[str, int]) -> BucketDelta:
        return BucketDelta(
            key, self.epoch, self.config, self.base_version, self.base_time, used, self.rule
        )

    def raise_own(self, value: int) -> None:
        """Our own entry is at least ``value`` (what we spent in this epoch before
        dropping the bucket; see Limiter's tombstones)."""
        if value > self.mine:
            self.total += value - self.mine
            self.mine = value

    def merge(self, delta: BucketDelta, replica_id: str) -> bool:
        """Join ``delta`` into this state; returns whether anything changed."""
        if delta.epoch != self.epoch:
            if delta.epoch < self.epoch:
                return False
            self._replace(delta, replica_id)
            return True
        changed = False
        if delta.config.version > self.config.version:
            self.config = delta.config
            changed = True
        if (delta.base_version, delta.base_time) > (self.base_version, self.base_time):
            self.base_version = delta.base_version
            self.base_time = delta.base_time
            changed = True
        for rid, value in delta.used.items():
            if rid == replica_id:
                # Only an echo of our own past, or our snapshot restored elsewhere.
                if value > self.mine:
                    self.total += value - self.mine
                    self.mine = value
                    changed = True
                continue
            entries = self.entries
            if entries is None:
                if value > 0:
                    self.entries = (rid, value)
                    self.total += value
                    changed = True
            elif type(entries) is tuple:
                if entries[0] == rid:
                    if value > entries[1]:
                        self.entries = (entries[0], value)
                        self.total += value - entries[1]
                        changed = True
                elif value > 0:
                    self.entries = {entries[0]: entries[1], rid: value}
                    self.total += value
                    changed = True
            else:
                assert isinstance(entries, dict)
                current = entries.get(rid, 0)
                if value > current:
                    entries[rid] = value
                    self.total += value - current
                    changed = True
        if not self.rule and delta.rule:
            self.rule = delta.rule
        return changed

    def _replace(self, delta: BucketDelta, replica_id: str) -> None:
        self.epoch = delta.epoch
        self.config = delta.config
        self.base_version = delta.base_version
        self.base_time = delta.base_time
        used = delta.used
        mine = self.mine = used.get(replica_id, 0)
        # Restoring a million buckets goes through here: the usual shapes (no
        # other entry, or one) take no intermediate dict.
        size = len(used) - (replica_id in used)
        if size == 0:
            self.entries = None
            self.total = mine
        elif size == 1:
            for rid, value in used.items():
                if rid != replica_id:
                    self.entries = (rid, value)
                    self.total = mine + value
        else:
            others = {rid: v for rid, v in used.items() if rid != replica_id}
            self.entries = others
            self.total = mine + sum(others.values())
        if delta.rule:
            self.rule = delta.rule

    @classmethod
    def from_delta(cls, delta: BucketDelta, replica_id: str) -> Bucket:
        bucket = cls.__new__(cls)
        bucket.rule = delta.rule
        bucket._replace(delta, replica_id)
        return bucket
