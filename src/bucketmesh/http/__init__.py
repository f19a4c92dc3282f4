"""The HTTP toolkit: the HTTP/1.1 server protocol (``server``), the router, errors
as values (``errors``), the admin token check (``auth``), decision rendering
(``render``), ``Idempotency-Key`` (``idempotency``) and the wire structs (``wire``).

It serves endpoints but defines none of its own: the Rating API is ``bucketmesh.api``,
the sync endpoints are ``bucketmesh.replication``."""
