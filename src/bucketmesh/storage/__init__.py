"""Where state lives beyond one decision: the embedded store (``memory``) with its
snapshot file (``snapshot``) and write-ahead log (``wal``), and the Redis backend
(``redis_store``: the scripts and the wire; ``redis_backend``: a node's side of it)."""

#: storage.redisCallsInFlight's default, the Redis backend's decision script calls in
#: flight per node: measured best under wrk, benchmarks/redis.py (docs/storage-redis.md,
#: "Batching"). Here, not in redis_backend, so the config loads without the redis client.
REDIS_CALLS_IN_FLIGHT = 2
