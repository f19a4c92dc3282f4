"""The admin token check of operator endpoints (PATCH, fault injection)."""

from __future__ import annotations

import hmac

from bucketmesh.http.errors import ApiError
from bucketmesh.http.server import Request


class AdminAuth:
    """``Authorization: Bearer <token>`` when a token is configured (else open)."""

    def __init__(self, token: str | None) -> None:
        self.token = token or None

    def require(self, request: Request, *, always: str | None = None) -> None:
        """401 without a bearer token, 403 with a wrong one. ``always`` names an
        action that is refused (403) when this node has no admin token at all."""
        token = self.token
        if token is None:
            if always is not None:
                raise ApiError(
                    403,
                    f"{always} needs an admin token: set admin.token on this node",
                    field="Authorization",
                    reason="forbidden",
                )
            return
        supplied = request.headers.get("authorization", "")
        if not supplied.lower().startswith("bearer "):
            raise ApiError(
                401,
                "this endpoint needs Authorization: Bearer <admin token>",
                field="Authorization",
                headers=[("WWW-Authenticate", 'Bearer realm="bucketmesh"')],
                reason="unauthenticated",
            )
        if not hmac.compare_digest(supplied[7:].strip().encode(), token.encode()):
            raise ApiError(
                403, "the admin token is wrong", field="Authorization", reason="forbidden"
            )
