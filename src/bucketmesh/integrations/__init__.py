"""Other front doors onto the same decisions: the ASGI middleware and the Envoy rate limit service."""
