"""The sync mesh: the pure sync protocol, the peer outbox, the HTTP link and the loops, and injected sync faults."""
