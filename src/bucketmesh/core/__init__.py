"""The pure core: bucket state and its merge (``bucket``), the limiter of one replica
(``limiter``), the rules and key templates (``rules``), the limits validator
(``limits``) and the decision seam every front door depends on (``decisions``).

No sockets, clocks, files or Redis: time is an argument. Nothing here imports any
other part of bucketmesh (checked by import-linter)."""
