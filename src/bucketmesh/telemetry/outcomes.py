"""What a front door does with a decision besides answering it.

Every front door (the Rating API routes, the Envoy service, the ASGI middleware)
hands each decision to one ``Outcomes``: it counts it (``bucketmesh_decisions``),
counts a grant that left less than ``near_limit`` of the capacity
(``bucketmesh_near_limit``), turns a refusal of a shadow rule or key into an
advisory one (counted in ``bucketmesh_shadow_refused``; the door lets the request
through and says it would have been refused), and writes the decision to the
audit trail when there is one (``telemetry/audit.py``: buffered, never blocking).

The Rating API's hot path inlines the cheap checks and calls in here only when
there is something to do (a refusal under shadows, an audit trail); the other
doors call ``observe`` for each decision.
"""

from __future__ import annotations

import random
from typing import Any, Final

from bucketmesh.core.bucket import Decision
from bucketmesh.core.rules import Shadows
from bucketmesh.telemetry.audit import AuditLog, new_request_id
from bucketmesh.telemetry.metrics import NodeMetrics

DEFAULT_NEAR_LIMIT: Final = 0.2
#: The response header of a request a shadow rule (or key) would have refused.
SHADOW_HEADER: Final = "Bucketmesh-Shadow"
SHADOW_VALUE: Final = "would-refuse"


class Outcomes:
    """Counts, shadow mode and the audit trail for one node's decisions."""

    def __init__(
        self,
        metrics: NodeMetrics | None = None,
        *,
        shadows: Shadows | None = None,
        near_limit: float = DEFAULT_NEAR_LIMIT,
        audit: AuditLog | None = None,
        region: str = "",
        replica: str = "",
    ) -> None:
        if not 0.0 <= near_limit <= 1.0:
            raise ValueError(f"near_limit is a share of capacity in [0, 1], got {near_limit}")
        self.metrics = metrics
        self.shadows = shadows if shadows is not None else Shadows()
        self.near_limit = near_limit
        self.audit = audit
        self.region = region
        self.replica = replica

    def observe(
        self,
        decision: Decision,
        tokens: int,
        *,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        caller: str | None = None,
        sampled: bool = False,
        **extra: object,
    ) -> bool:
        """Count and audit ``decision`` (``tokens`` asked); True when it is a refusal
        a shadow rule or key makes advisory: the door answers it as a grant.
        ``sampled``: the door has asked ``kept`` already (and was told yes)."""
        rule = decision.rule
        metrics = self.metrics
        if metrics is not None:
            metrics.count_decision(rule, decision.allowed)
        shadowed = False
        if decision.allowed:
            if (
                metrics is not None
                and decision.tokens_remaining < decision.capacity * self.near_limit
            ):
                metrics.count_near_limit(rule)
        elif self.shadows and self.shadows.covers(rule, decision.key):
            shadowed = True
            if metrics is not None:
                metrics.count_shadow_refused(rule)
        if self.audit is not None:
            self.write(
                decision,
                tokens,
                request_id or new_request_id(),
                idempotency_key,
                caller,
                shadowed,
                sampled=sampled,
                **extra,
            )
        return shadowed

    def kept(self, request_id: str | None) -> bool:
        """Whether the sampling keeps the request ``request_id`` (its ``X-Request-Id``;
        None: a request without one, kept by chance at the sampled share, before any id
        is made up for it)."""
        audit = self.audit
        if audit is None:
            return False
        if audit.sample >= 1.0:
            return True
        if request_id:
            return audit.keeps(request_id)
        return random.random() < audit.sample

    def write(
        self,
        decision: Decision,
        tokens: int,
        request_id: str,
        idempotency_key: str | None,
        caller: str | None,
        shadowed: bool = False,
        *,
        sampled: bool = False,
        **extra: Any,
    ) -> None:
        """Append ``decision`` to the audit trail (sampled by ``request_id`` unless
        ``sampled`` says the door has done it)."""
        audit = self.audit
        if audit is None:
            return
        if not sampled and not audit.keeps(request_id):
            audit.sampled_out += 1
            return
        if shadowed:
            extra["shadow"] = True
        audit.consume(
            region=self.region,
            replica=self.replica,
            rule=decision.rule,
            key=decision.key,
            tokens=tokens,
            allowed=decision.allowed,
            idempotency_key=idempotency_key,
            request_id=request_id,
            caller=caller,
            presampled=True,
            **extra,
        )


__all__ = ["DEFAULT_NEAR_LIMIT", "SHADOW_HEADER", "SHADOW_VALUE", "Outcomes"]
