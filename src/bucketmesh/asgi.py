"""The documented import path of the ASGI middleware (``bucketmesh.asgi.RateLimitMiddleware``);
it lives in ``bucketmesh.integrations.asgi``."""

from bucketmesh.integrations.asgi import RateLimitMiddleware

__all__ = ["RateLimitMiddleware"]
