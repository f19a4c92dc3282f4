"""What the client hands back: typed results of the Rating API's answers.

The fields the server sends mirror ``bucketmesh.http.wire`` (a test keeps them in
step); unknown fields are ignored, so an older client reads a newer server. Each
decision also says how it was obtained: which endpoint answered, after how many
attempts, whether the server replayed it for an ``Idempotency-Key`` retry, whether
the client waited on a 429, and whether it is a fallback made because no region
answered (``fallback`` = ``"open"`` or ``"closed"``).
"""

from __future__ import annotations

from typing import Literal

import msgspec

Fallback = Literal["open", "closed"]


class Decision(msgspec.Struct, kw_only=True):
    """One decision, as ``POST /v1/rate`` answers it, plus how the client got it."""

    allowed: bool
    key: str
    tokens_remaining: int
    capacity: int
    refill_rate: float
    retry_after: float
    reset_after: float
    mode: str
    rule: str
    #: the region whose node decided (empty for a fallback)
    region: str = ""
    #: the base URL of the endpoint that answered (empty for a fallback)
    endpoint: str = ""
    #: HTTP attempts this call made (over every endpoint and every wait)
    attempts: int = 1
    #: the server answered a retry with the first attempt's decision (``Idempotent-Replayed``)
    replayed: bool = False
    #: 429s slept on (``wait=True``), and the seconds slept
    waits: int = 0
    waited: float = 0.0
    #: set when no region answered and the client decided by itself
    fallback: Fallback | None = None

    @property
    def retried(self) -> bool:
        """An attempt failed (no answer, or 502/503/504) and was made again; asking
        again after a 429 (``wait=True``) is not a retry."""
        return self.attempts > self.waits + 1

    @property
    def failed_open(self) -> bool:
        return self.fallback == "open"

    @property
    def failed_closed(self) -> bool:
        return self.fallback == "closed"


class BatchResult(msgspec.Struct, kw_only=True):
    """``POST /v1/rate/batch``: one decision per item, in order."""

    results: list[Decision]
    allowed: int
    denied: int
    endpoint: str = ""
    attempts: int = 1
    replayed: bool = False
    fallback: Fallback | None = None

    @property
    def retried(self) -> bool:
        return self.attempts > 1

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> Decision:
        return self.results[index]


class ReplicaUse(msgspec.Struct):
    used: int


class ShareRights(msgspec.Struct):
    """A region's rights over a strict key (a part of the global limit, 0..1), its
    last reported demand (tokens/s) and whether it reported at all."""

    rights: float
    demand: float
    reported: bool


class BucketState(msgspec.Struct, kw_only=True):
    """``GET /v1/bucket/state``: one bucket's replicated state."""

    key: str
    rule: str
    tokens_remaining: int
    capacity: int
    refill_rate: float
    ttl: float
    mode: str
    config_version: str
    reset_after: float
    epoch: int
    replicas: dict[str, ReplicaUse]
    live: bool
    #: a strict key whose rights move (docs/sync.md, "Strict mode: transferable
    #: shares"): region -> its rights and demand; None otherwise
    shares: dict[str, ShareRights] | None = None
    endpoint: str = ""

    @property
    def used(self) -> int:
        """Tokens spent in this epoch, over every replica."""
        return sum(replica.used for replica in self.replicas.values())


class RuleConfig(msgspec.Struct, kw_only=True):
    """A rule's or a key's limits, as ``PATCH`` / ``GET /v1/buckets/{key}`` answer them."""

    key: str
    rule: str
    capacity: int
    refill_rate: float
    ttl: float
    mode: str
    version: str
    applies_to: Literal["key", "rule"]
    endpoint: str = ""


class PeerStatus(msgspec.Struct, kw_only=True):
    state: str
    lag_ms_p99: float | None = None
    last_seen: str | None = None


class SyncStatus(msgspec.Struct, kw_only=True):
    enabled: bool
    local_only: bool
    peers: dict[str, PeerStatus]


class TaskStatus(msgspec.Struct, kw_only=True):
    """A background task of the node: ``ok``, ``failing`` (retried with backoff) or
    ``stopped``; its failures so far and the last one's error."""

    state: str
    failures: int
    last_error: str | None = None


class Status(msgspec.Struct, kw_only=True):
    """``GET /v1/status``: the node that answered (and a bucket with ``key``)."""

    region: str
    node: str
    replica_id: str
    cluster_id: str
    sync: SyncStatus
    buckets: int
    version: str
    uptime_s: float
    bucket: BucketState | None = None
    #: the node's background tasks by name (snapshot, sync collector, ...)
    tasks: dict[str, TaskStatus] = {}
    endpoint: str = ""


def fallback_decision(
    key: str, rule: str | None, fallback: Fallback, attempts: int, waited: float = 0.0
) -> Decision:
    """The decision the client makes by itself when no region answered: allowed when
    failing open, denied when failing closed; no bucket numbers (they are unknown)."""
    return Decision(
        allowed=fallback == "open",
        key=key,
        tokens_remaining=0,
        capacity=0,
        refill_rate=0.0,
        retry_after=0.0,
        reset_after=0.0,
        mode="",
        rule=rule or "",
        attempts=attempts,
        waited=waited,
        fallback=fallback,
    )


__all__ = [
    "BatchResult",
    "BucketState",
    "Decision",
    "Fallback",
    "PeerStatus",
    "ReplicaUse",
    "RuleConfig",
    "ShareRights",
    "Status",
    "SyncStatus",
    "fallback_decision",
]
