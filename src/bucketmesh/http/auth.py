"""The admin token check of operator endpoints (PATCH, fault injection)."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from bucketmesh.http.errors import ApiError
from bucketmesh.http.server import Request


class AdminAuth:
    """``Authorization: Bearer <token>`` when a token is configured (else open).

    Several tokens may be valid at once (rotation, docs/security.md): any of them
    is accepted; ``set_tokens`` replaces them on a running node."""

    def __init__(self, token: str | Sequence[str] | None) -> None:
        self.tokens: tuple[bytes, ...] = ()
        self.set_tokens(token)

    @property
    def token(self) -> str | None:
        """The first token (None: no token, the endpoints are open)."""
        return self.tokens[0].decode() if self.tokens else None

    def set_tokens(self, token: str | Sequence[str] | None) -> None:
        tokens = (token,) if isinstance(token, str) else tuple(token or ())
        self.tokens = tuple(t.encode() for t in tokens if t)

    def require(self, request: Request, *, always: str | None = None) -> None:
        """401 without a bearer token, 403 with a wrong one. ``always`` names an
        action that is refused (403) when this node has no admin token at all."""
        if not self.tokens:
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
        given = supplied[7:].strip().encode()
        accepted = False
        for token in self.tokens:  # every token is compared: the time taken tells nothing
            accepted = hmac.compare_digest(given, token) or accepted
        if not accepted:
            raise ApiError(
                403, "the admin token is wrong", field="Authorization", reason="forbidden"
            )
