"""bucketmesh: a geo-replicated token-bucket rate limiter.

Every region decides locally, in microseconds; all regions share one bucket
per key by exchanging CRDT deltas. The public surface is re-exported here;
everything else is private and free to change.
"""

from bucketmesh import _native

_native.select()  # the compiled core, or the pure one (BUCKETMESH_PURE=1, a stale build)

from bucketmesh.core.bucket import Decision  # noqa: E402
from bucketmesh.core.limiter import (  # noqa: E402
    BucketCapReached,
    DeltaBatch,
    InvalidTokens,
    Limiter,
    LimiterError,
    NoRuleError,
)
from bucketmesh.core.rules import Rule, parse_rate  # noqa: E402
from bucketmesh.node.config import (  # noqa: E402
    Config,
    ConfigError,
    load_buckets,
    load_config,
    load_limiter,
)

__version__ = "0.1.0"

__all__ = [
    "BucketCapReached",
    "Config",
    "ConfigError",
    "Decision",
    "DeltaBatch",
    "InvalidTokens",
    "Limiter",
    "LimiterError",
    "NoRuleError",
    "Rule",
    "__version__",
    "load_buckets",
    "load_config",
    "load_limiter",
    "parse_rate",
]
