"""The HTTP side: the HTTP/1.1 server protocol, wire structs, problem+json errors, decision rendering, idempotency, and the Rating API routes."""
