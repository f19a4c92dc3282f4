"""The sync mesh: the pure sync protocol (``protocol``: envelopes, HMAC, digests),
the mesh of one node (``mesh``: the HTTP link, peer outboxes, the push, digest and
pull loops, the sync endpoints) and injected sync faults (``faults``)."""
