"""bucketmesh: a geo-replicated token-bucket rate limiter.

Every region decides locally, in microseconds; all regions share one bucket
per key by exchanging CRDT deltas. The public surface is re-exported here;
everything else is private and free to change.
"""

from bucketmesh.core.bucket import Decision
from bucketmesh.core.limiter import (
    BucketCapReached,
    DeltaBatch,
    InvalidTokens,
    Limiter,
    LimiterError,
    NoRuleError,
)
from bucketmesh.core.rules import Rule, parse_rate
from bucketmesh.node.config import Config, ConfigError, load_buckets, load_config, load_limiter

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
