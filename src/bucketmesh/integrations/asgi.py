"""ASGI middleware: rate-limit any ASGI application with an in-process ``Limiter``
(or any store behind the decision seam, ``core/decisions.py``).

The limiter is the same one ``bucketmesh serve`` runs (same rules, same key
templates, same replicated buckets), decided in the application's own
process: no network hop. Every HTTP request renders a bucket key from the
first rule whose template it satisfies (headers, query parameters, client
IP) and takes ``tokens`` from it. An allowed request goes on to the
application with the IETF ``RateLimit-Policy`` / ``RateLimit`` headers added
to its response; a denied one is answered here, ``429`` problem+json with
``Retry-After``, exactly as the Rating API answers it. A request no rule
matches passes through untouched (or is refused, with ``unmatched="deny"``).
At the live-bucket cap a new key gets ``503`` with ``Retry-After``.
WebSocket and lifespan scopes pass through.

Replication is the embedding application's choice: call
``limiter.collect_deltas()`` / ``limiter.merge()`` from its own sync task,
or run ``bucketmesh serve`` instead and call it over HTTP.

    from bucketmesh import Limiter, load_buckets
    from bucketmesh.asgi import RateLimitMiddleware

    limiter = Limiter(load_buckets("buckets.yaml"), replica_id="eu-west-1/web-1/1")
    app = RateLimitMiddleware(app, limiter)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal
from urllib.parse import parse_qsl

from bucketmesh.core.bucket import Decision
from bucketmesh.core.decisions import Decider
from bucketmesh.core.limiter import BucketCapReached
from bucketmesh.core.rules import first_match
from bucketmesh.http.errors import PROBLEM
from bucketmesh.http.render import DecisionRenderer
from bucketmesh.http.server import problem

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RateLimitMiddleware:
    """Wraps ``app``; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        limiter: Decider,
        *,
        tokens: int = 1,
        unmatched: Literal["allow", "deny"] = "allow",
        region: str | None = None,
    ) -> None:
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        self.app = app
        self.limiter = limiter
        self.tokens = tokens
        self.unmatched = unmatched
        self.renderer = DecisionRenderer(region or limiter.replica_id.split("/", 1)[0])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        client = scope.get("client")
        found = first_match(self.limiter.rules, headers, query, client[0] if client else "")
        if found is None:
            if self.unmatched == "allow":
                await self.app(scope, receive, send)
            else:
                await _answer(send, 400, "no rate-limit rule matches this request")
            return
        key, rule = found
        try:
            answer = self.limiter.acquire(key, self.tokens, rule=rule)
            decision: Decision = await answer if hasattr(answer, "__await__") else answer
        except BucketCapReached as error:
            await _answer(send, 503, str(error), [(b"retry-after", b"1")])
            return
        extra = [(n.lower().encode(), v.encode()) for n, v in self.renderer.headers(decision)]
        if not decision.allowed:
            body = self.renderer.denied_body(decision)
            await _send(send, 429, PROBLEM, body, extra)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _headers(scope: Scope) -> dict[str, str]:
    """Lower-cased names, repeated headers joined with ", " (as the server does)."""
    out: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", ()):
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        previous = out.get(name)
        out[name] = value if previous is None else f"{previous}, {value}"
    return out


async def _answer(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    response = problem(status, _TITLES[status], detail)
    await _send(send, status, PROBLEM, response.body, headers or [])


async def _send(
    send: Send, status: int, content_type: str, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


_TITLES = {400: "Bad Request", 503: "Service Unavailable"}

__all__ = ["RateLimitMiddleware"]
