"""The core's msgspec structs: a bucket's config, a decision, a delta, a sync batch and a
snapshot. Their home modules (``bucket.py``, ``limiter.py``) re-export them.

They live here because this module is never compiled (``bucketmesh/_native.py``):
mypyc builds a class with a metaclass such as msgspec's without its class keywords,
so ``frozen``, ``array_like`` and ``gc`` would be lost and the wire format with them.
"""

from __future__ import annotations

import msgspec

from bucketmesh.core.shares import ShareState

Version = tuple[int, str]
"""(hybrid logical clock, origin): origin is a replica id, or ``rule:<digest>``."""


class BucketConfig(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One generation of a bucket's limits. ``interval_ns`` is T = 1e9 / refill rate.

    ``shadow``: the bucket's refusals are advisory (shadow mode, set in the file or by
    PATCH). It rides in the config register like the limits (same version, same
    last-writer-wins order, adopted the same way: ``reconfigure`` keeps the level).
    Trailing with a default: an encoding without it (an older peer, WAL or snapshot)
    decodes as False, and an older decoder ignores it."""

    capacity: int
    interval_ns: int
    ttl_ns: int
    mode: str
    version: Version
    shadow: bool = False

    @property
    def refill_rate(self) -> float:
        return 1_000_000_000 / self.interval_ns  # NS_PER_S

    def view(self) -> dict[str, object]:
        """The limits as the API, the audit trail and the sync view show them."""
        return {
            "capacity": self.capacity,
            "refill_rate": self.refill_rate,
            "ttl": self.ttl_ns / 1_000_000_000,
            "mode": self.mode,
            "shadow": self.shadow,
        }


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
    (a full-state transfer); merge treats both alike. ``anchor_*`` and ``marks``
    hold, per replica, its records (see "History" in bucket.py's docstring): its
    anchor ``anchor_at[r]`` with ``anchor_used[r]`` used then and
    ``anchor_begun[r]`` used when that slice began (three flat maps of integers:
    no container the garbage collector must track), ``marks[r] = [first grant's instant in a
    slice, used before it, ...]`` sorted by instant. ``base_time``/``base_used`` are the base
    (version ``base_version``): full at ``base_time`` with ``base_used`` spent.
    """

    key: str
    epoch: int
    config: BucketConfig
    base_version: Version
    base_time: int
    used: dict[str, int]
    rule: str = ""
    base_used: int = 0
    anchor_at: dict[str, int] = {}
    anchor_used: dict[str, int] = {}
    anchor_begun: dict[str, int] = {}
    marks: dict[str, tuple[int, ...]] = {}
    #: node (``region/node``) -> (W, F): its incarnations below W are folded into F
    #: tokens (see "Retired incarnations" in bucket.py's docstring); older readers
    #: ignore this trailing field
    folds: dict[str, tuple[int, int]] = {}
    #: a strict key's rights ledger (core/shares.py), on its config-only deltas
    shares: ShareState | None = None

    @property
    def anchors(self) -> dict[str, tuple[int, int, int]]:
        """Each replica's anchor as (time, used then, used when its slice began)."""
        used, begun = self.anchor_used, self.anchor_begun
        return {
            rid: (at, used.get(rid, 0), begun.get(rid, 0)) for rid, at in self.anchor_at.items()
        }


class DeltaBatch(msgspec.Struct, array_like=True, gc=False):
    """One message's worth of replication: bucket deltas and rule-level config."""

    origin: str
    deltas: list[BucketDelta]
    rules: dict[str, BucketConfig] = {}


class Snapshot(msgspec.Struct, array_like=True):
    format: int
    replica_id: str
    hlc: int
    rules: dict[str, BucketConfig]
    buckets: list[BucketDelta]
    #: rule name -> the version this node gave its file's limits (``stamp_file_rules``)
    files: dict[str, Version] = {}
    #: per-key configs of strict keys, whole (``Limiter.key_configs``)
    keys: dict[str, BucketConfig] = {}
    #: strict keys' rights ledgers (core/shares.py)
    shares: dict[str, ShareState] = {}
    #: a blind replica (started without its previous life's state; core/shares.py)
    #: stays blind across snapshots
    blind: bool = False
    #: (unknown_since, recovery_until) of a replica that started without its previous
    #: life's state, while its strict buckets still start empty (``begin_recovery``)
    recovery: tuple[int, int] | None = None
    #: region/node -> the newest incarnation seen (older ones' strict gifts are frozen)
    newest: dict[str, int] = {}
