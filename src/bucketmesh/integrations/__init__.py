"""Other front doors onto the same decisions: the ASGI middleware (``asgi``) and the
Envoy rate limit service (``envoy``, with its protobuf code in ``proto``)."""
