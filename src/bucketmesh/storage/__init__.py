"""Where state lives beyond memory: the snapshot file and write-ahead log of the embedded store, and the Redis backend."""
