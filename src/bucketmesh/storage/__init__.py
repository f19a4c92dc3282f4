"""Where state lives beyond one decision: the embedded store (``memory``) with its
snapshot file (``snapshot``) and write-ahead log (``wal``), and the Redis backend
(``redis_store``: the scripts and the wire; ``redis_backend``: a node's side of it)."""
