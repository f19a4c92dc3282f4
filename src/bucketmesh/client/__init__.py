"""The Python client of bucketmesh: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

::

    from bucketmesh.client import Client

    with Client("http://127.0.0.1:8080") as client:
        decision = client.rate({"X-API-Key": "my-agent-key"})  # the node renders the key
        if decision.allowed:
            ...

Every call is retried safely (one ``Idempotency-Key`` for all its attempts, backoff
with full jitter, within 5 s by default), fails over between regions with a circuit
breaker per region, and, when no region answers, raises or fails open / closed as
configured. ``AsyncClient`` coalesces concurrent ``rate()`` calls into batches.
docs/client.md is the guide; ``retry.py`` explains the retry rules.
"""

from bucketmesh.client.aio import AsyncClient, AsyncLimit
from bucketmesh.client.errors import (
    ApiError,
    BadRequest,
    BucketmeshError,
    Forbidden,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from bucketmesh.client.results import (
    BatchResult,
    BucketState,
    Decision,
    RuleConfig,
    Status,
)
from bucketmesh.client.retry import BreakerPolicy, Circuit, ClientStats, RetryPolicy
from bucketmesh.client.sync import Client, Limit

__all__ = [
    "ApiError",
    "AsyncClient",
    "AsyncLimit",
    "BadRequest",
    "BatchResult",
    "BreakerPolicy",
    "BucketState",
    "BucketmeshError",
    "Circuit",
    "Client",
    "ClientStats",
    "Decision",
    "Forbidden",
    "Limit",
    "NotFound",
    "RateLimited",
    "RetryPolicy",
    "RuleConfig",
    "Status",
    "Unauthorized",
    "Unavailable",
]
