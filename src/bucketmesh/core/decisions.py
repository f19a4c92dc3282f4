"""The decision seam: what every front door asks of the place decisions are made.

The Rating API routes, the Envoy rate limit service and the ASGI middleware depend
on ``Decider`` only. Two stores implement it: the in-memory ``Limiter`` (with the
write-ahead log's commit barrier when the node is durable; ``storage``) and the
Redis backend (``storage.redis_backend``). Neither subclasses the other or the app.

Answering now or later: each call returns its value at once, or an awaitable of
it (``Later``) when the store must wait (a Redis script call). A front door that
can wait awaits it; one that cannot must be given a store that answers at once.

Errors are the core's (``limiter.py``): ``NoRuleError``, ``InvalidTokens``,
``BucketCapReached`` (and ``ValueError`` subclasses naming a field for a refused
configuration), raised at once or from the awaitable.

``commit()`` is the durability barrier: None when everything answered so far is
as durable as the store promises, else an awaitable that resolves True once it
is, or False if it could not be made so (the answer must then be withdrawn: the
tokens stay spent, the client is told to retry).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeAlias, TypeVar

from bucketmesh.core.bucket import Bucket, BucketConfig, Decision
from bucketmesh.core.rules import Rule

#: The problem+json ``type`` of a refusal at the bucket cap (``BucketCapReached``): a
#: 503 that answers for the new key it names, not a node that is down, so a client
#: neither retries it elsewhere nor counts it against the node (client/retry.py).
BUCKET_CAP_PROBLEM = "urn:bucketmesh:problem:bucket-cap"

if TYPE_CHECKING:  # limiter.py imports this module
    from bucketmesh.core.limiter import DecisionColumns

T = TypeVar("T")
Later: TypeAlias = T | Awaitable[T]


class Ask(NamedTuple):
    """One decision asked for: ``tokens`` from ``key``, under ``rule`` (or the first
    rule whose template matches the key when None)."""

    key: str
    tokens: int = 1
    rule: str | None = None


class Decider(Protocol):
    """Where decisions are made; see the module docstring."""

    @property
    def replica_id(self) -> str: ...

    @property
    def clock(self) -> Callable[[], int]:
        """The store's time, integer ns (what its buckets' levels are read at)."""
        ...

    @property
    def rules(self) -> Sequence[Rule]: ...

    @property
    def rules_by_name(self) -> Mapping[str, Rule]: ...

    def acquire(self, key: str, tokens: int = 1, *, rule: str | None = None) -> Later[Decision]:
        """Consume ``tokens`` from ``key``'s bucket if it holds them; 0 peeks."""
        ...

    def acquire_many(self, asks: Sequence[Ask], *, atomic: bool = False) -> Later[list[Decision]]:
        """The asks' decisions, in order. Every ask is validated before any is charged
        (a bad one raises and nothing is spent). ``atomic``: all are granted, or none
        is charged and every decision says how long until the whole batch fits."""
        ...

    def acquire_columns(self, items: Sequence[Any]) -> DecisionColumns | None:
        """A batch's common case at once, as columns (``Limiter.acquire_columns``):
        ``acquire_many`` of ``items`` (objects with ``key``, ``tokens``, ``rule``), not
        atomic, when every item names a live bucket it may ask of; else None, with
        nothing charged, and the caller takes ``acquire_many``. A store that cannot
        answer at once (Redis) always says None."""
        ...

    def inspect(self, key: str, *, rule: str | None = None) -> Later[Bucket]:
        """``key``'s bucket as it stands (a full one of its rule if it holds none)."""
        ...

    def rule_config(self, name: str) -> BucketConfig:
        """The config a rule gives its keys now (after any runtime change)."""
        ...

    def configure(
        self,
        key_or_rule: str,
        *,
        capacity: int | None = None,
        refill_rate: float | None = None,
        ttl: float | None = None,
        mode: str | None = None,
        shadow: bool | None = None,
    ) -> Later[BucketConfig]:
        """Change a rule's (or one key's) limits (or shadow mark) at runtime; the new
        config."""
        ...

    def shadowed(self, rule: str, key: str) -> bool:
        """Whether a decision of ``key`` under ``rule`` is advisory (shadow mode), as
        the replicated configs say here; cheap (asked on a refusal)."""
        ...

    def rule_of(self, key: str) -> str:
        """The name of the rule that gives ``key`` its limits here (NoRuleError)."""
        ...

    def holds(self, key: str) -> bool:
        """Whether ``key`` has a live bucket here (not only its rule's defaults)."""
        ...

    def live_buckets(self) -> int:
        """How many buckets the store holds in memory here."""
        ...

    def commit(self) -> Awaitable[bool] | None:
        """The durability barrier; see the module docstring."""
        ...
