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
Whatever the limiter raises is answered as the Rating API answers it, never a
500: ``tokens`` above a bucket's capacity (configured so, or lowered at
runtime) is ``400`` naming ``tokens``, a new key at the live-bucket cap ``503``
with ``Retry-After: 1``. WebSocket and lifespan scopes pass through.

Header values and the query string are decoded as ``bucketmesh serve`` decodes
them: UTF-8, raw bytes and percent-escapes alike, so a key typed with a non-ASCII
character (``my‑agent``, U+2011) reaches the same bucket through either; bytes
that are not UTF-8 get a ``400`` naming the header or parameter.

The client IP is the ASGI scope's client address. Behind a reverse proxy it is
the proxy's, or none at all (``uvicorn --uds``): ``trusted_proxies`` lists the
peers (addresses, networks, ``"unix"`` for a unix-socket peer, which has no
address) whose ``forwarded_header`` (``X-Forwarded-For`` or ``Forwarded``) is
believed; the client is the right-most hop that is not a trusted proxy. By
default no peer is trusted and the headers are never read. A request with no
client address does not match a rule whose key needs ``{{ .Request.ClientIP }}``:
it goes on to the later rules and then to ``unmatched``; each such request is
counted (``no_client_address``; ``bucketmesh_asgi_no_client_address_total`` when
``metrics`` is given) and the first one is logged as a warning.

Replication is the embedding application's choice: call
``limiter.collect_deltas()`` / ``limiter.merge()`` from its own sync task,
or run ``bucketmesh serve`` instead and call it over HTTP.

    from bucketmesh import Limiter, load_buckets
    from bucketmesh.asgi import RateLimitMiddleware

    limiter = Limiter(load_buckets("buckets.yaml"), replica_id="eu-west-1/web-1/1")
    app = RateLimitMiddleware(app, limiter)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Literal, TypeAlias

from bucketmesh.core.bucket import Decision
from bucketmesh.core.decisions import BUCKET_CAP_PROBLEM, Decider
from bucketmesh.core.limiter import (
    BucketCapReached,
    InvalidTokens,
    KeyTooLong,
    LimiterError,
    NoRuleError,
)
from bucketmesh.core.rules import Shadows, first_match
from bucketmesh.http.errors import PROBLEM, ApiError, bad_request
from bucketmesh.http.render import DecisionRenderer
from bucketmesh.http.server import NotText, Response, decode_header, decode_query, problem
from bucketmesh.telemetry.audit import AuditLog, caller_of
from bucketmesh.telemetry.log import logger
from bucketmesh.telemetry.metrics import NodeMetrics
from bucketmesh.telemetry.outcomes import (
    DEFAULT_NEAR_LIMIT,
    SHADOW_HEADER,
    SHADOW_VALUE,
    Outcomes,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

UNIX_PEER = "unix"
"""In ``trusted_proxies``: a peer on a unix socket (the ASGI scope has no client address)."""

log = logger("asgi")


def limiter_problem(error: LimiterError) -> Response:
    """The Rating API's answer to what the limiter raised for a request whose rule is
    named (api/routes.py ``limiter_error``): same status, problem+json and headers."""
    if isinstance(error, InvalidTokens):
        return bad_request(str(error), "tokens").response()
    if isinstance(error, NoRuleError):
        return bad_request(str(error), "rule").response()
    if isinstance(error, KeyTooLong):  # a key over 8 KiB: 400 naming it, as the API
        return bad_request(str(error), "key").response()
    if isinstance(error, BucketCapReached):
        detail = f"{error}; new keys are refused until idle buckets expire"
        return ApiError(
            503,
            detail,
            field="key",
            type_=BUCKET_CAP_PROBLEM,
            headers=[("Retry-After", "1")],
        ).response()
    # a LimiterError of a kind this module does not know yet: refused, retryable
    return ApiError(503, str(error), headers=[("Retry-After", "1")]).response()


class TrustedProxies:
    """The peers whose forwarded headers are believed; see the module docstring.

    Raises ValueError naming an entry that is neither an address, a network nor
    ``"unix"``."""

    def __init__(self, entries: Iterable[str]) -> None:
        if isinstance(entries, str):
            raise ValueError(f"trusted_proxies must be a list of addresses, got {entries!r}")
        self.unix = False
        self.networks: list[Network] = []
        for entry in entries:
            if entry == UNIX_PEER:
                self.unix = True
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except (ValueError, TypeError, AttributeError):
                raise ValueError(
                    f"trusted_proxies: {entry!r} is not an address, a network (CIDR) or "
                    f"{UNIX_PEER!r}"
                ) from None

    def __bool__(self) -> bool:
        return self.unix or bool(self.networks)

    def trusts(self, address: Address) -> bool:
        return any(address in network for network in self.networks)

    def trusts_peer(self, peer: str) -> bool:
        """Whether the connection's peer (``""``: a unix socket's) is a trusted proxy."""
        if not peer:
            return self.unix
        address = _address(peer)
        return address is not None and self.trusts(address)

    def client_of(self, hops: list[str]) -> str:
        """The right-most hop that is not a trusted proxy (the left-most if all are),
        as a canonical address; ``""`` when that hop is not an address (``unknown``,
        an obfuscated name, garbage) or there is no hop."""
        address: Address | None = None
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                return ""
            if not self.trusts(address):
                break
        return "" if address is None else str(address)


def _address(text: str) -> Address | None:
    """The address in a hop (``1.2.3.4``, ``1.2.3.4:80``, ``[2001:db8::1]:80``,
    ``2001:db8::1``), IPv4-mapped IPv6 as IPv4; None when it holds none."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        host = text[1:end] if end > 0 else ""
    elif text.count(":") == 1:
        host = text.partition(":")[0]
    else:
        host = text
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _split_unquoted(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside double quotes (RFC 7230 quoted-string)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _unquoted(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        out: list[str] = []
        escaped = False
        for char in inner:
            if char == "\\" and not escaped:
                escaped = True
                continue
            escaped = False
            out.append(char)
        return "".join(out)
    return value


def forwarded_hops(value: str) -> list[str]:
    """The ``for=`` of each element of a ``Forwarded`` header (RFC 7239), in order;
    ``""`` for an element without one."""
    hops: list[str] = []
    for element in _split_unquoted(value, ","):
        found = ""
        for pair in _split_unquoted(element, ";"):
            name, _, raw = pair.partition("=")
            if name.strip().lower() == "for":
                found = _unquoted(raw)
        hops.append(found)
    return hops


def x_forwarded_for_hops(value: str) -> list[str]:
    """The hops of an ``X-Forwarded-For`` header, in order."""
    return [hop.strip() for hop in value.split(",")]


class RateLimitMiddleware:
    """Wraps ``app``; see the module docstring.

    ``no_client_address`` counts the requests a rule needing the client IP could not
    limit because the request had no client address.
    """

    def __init__(
        self,
        app: ASGIApp,
        limiter: Decider,
        *,
        tokens: int = 1,
        unmatched: Literal["allow", "deny"] = "allow",
        region: str | None = None,
        trusted_proxies: Iterable[str] = (),
        forwarded_header: str = "X-Forwarded-For",
        metrics: NodeMetrics | None = None,
        near_limit: float = DEFAULT_NEAR_LIMIT,
        audit: AuditLog | None = None,
    ) -> None:
        if isinstance(tokens, bool) or not isinstance(tokens, int):
            raise TypeError(f"tokens must be an integer, got {tokens!r}")
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        if unmatched not in ("allow", "deny"):
            raise ValueError(f"unmatched must be 'allow' or 'deny', got {unmatched!r}")
        header = forwarded_header.lower()
        if header not in ("x-forwarded-for", "forwarded"):
            raise ValueError(
                f"forwarded_header must be X-Forwarded-For or Forwarded, got {forwarded_header!r}"
            )
        self.app = app
        self.limiter = limiter
        self.tokens = tokens
        self.unmatched = unmatched
        self.renderer = DecisionRenderer(region or limiter.replica_id.split("/", 1)[0])
        self.proxies = TrustedProxies(trusted_proxies)
        self.forwarded_header = header
        self._hops = forwarded_hops if header == "forwarded" else x_forwarded_for_hops
        self.metrics = metrics
        # near_limit counts, shadow rules (shadow: true) and the audit trail, as a node's
        self.outcomes = Outcomes(
            metrics,
            shadows=Shadows(limiter.rules, limiter.shadowed),
            near_limit=near_limit,
            audit=audit,
            region=region or limiter.replica_id.split("/", 1)[0],
            replica=limiter.replica_id,
        )
        self.no_client_address = 0
        self._warned = False
        rules = list(limiter.rules)
        self._position = {rule.name: index for index, rule in enumerate(rules)}
        # the first rule whose key needs the client IP (a request without one skips it)
        self._first_ip_rule = next(
            ((i, rule.name) for i, rule in enumerate(rules) if rule.template.uses_client_ip),
            None,
        )
        if metrics is not None:
            metrics.counter(
                "bucketmesh_asgi_no_client_address",
                "HTTP requests a rule needing the client IP could not limit: no client address",
                lambda: self.no_client_address,
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            headers = _headers(scope)
            query = decode_query(scope.get("query_string", b""))
        except NotText as error:
            await _answer(send, problem(400, None, error.detail, field=error.field))
            return
        client_ip = self._client_ip(scope, headers)
        found = first_match(self.limiter.rules, headers, query, client_ip)
        if not client_ip and self._first_ip_rule is not None:
            self._check_address(found)
        if found is None:
            if self.unmatched == "allow":
                await self.app(scope, receive, send)
            else:
                await _answer(send, problem(400, None, "no rate-limit rule matches this request"))
            return
        key, rule = found
        try:
            answer = self.limiter.acquire(key, self.tokens, rule=rule)
            decision: Decision = await answer if hasattr(answer, "__await__") else answer
        except LimiterError as error:
            await _answer(send, limiter_problem(error))
            return
        outcomes = self.outcomes
        if outcomes.audit is None:
            shadowed = outcomes.observe(decision, self.tokens)
        else:
            shadowed = outcomes.observe(
                decision,
                self.tokens,
                request_id=headers.get("x-request-id"),
                idempotency_key=headers.get("idempotency-key"),
                caller=caller_of(headers),
            )
        extra = [(n.lower().encode(), v.encode()) for n, v in self.renderer.headers(decision)]
        if shadowed:  # would have been refused: let through, and say so
            extra = [*extra[:2], (SHADOW_HEADER.lower().encode(), SHADOW_VALUE.encode())]
        elif not decision.allowed:
            body = self.renderer.denied_body(decision)
            await _send(send, 429, PROBLEM, body, extra)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _client_ip(self, scope: Scope, headers: dict[str, str]) -> str:
        """The client address (``""``: none); see the module docstring."""
        client = scope.get("client")
        peer = str(client[0]) if client and client[0] else ""
        if not self.proxies or not self.proxies.trusts_peer(peer):
            return peer
        forwarded = headers.get(self.forwarded_header)
        if forwarded is None:  # a trusted peer that forwarded nothing is the client itself
            return peer
        return self.proxies.client_of(self._hops(forwarded))

    def _check_address(self, found: tuple[str, str] | None) -> None:
        """A request without a client address: counted (and the first one warned about)
        when a rule needing the client IP came before the rule that took it, if any."""
        assert self._first_ip_rule is not None
        position, name = self._first_ip_rule
        if found is not None and self._position.get(found[1], -1) < position:
            return
        self.no_client_address += 1
        if not self._warned:
            self._warned = True
            log.warning(
                "a request without a client address reached rule %r, whose key needs "
                "{{ .Request.ClientIP }}: that rule did not limit it (it went on to the "
                "later rules, then unmatched=%r). Behind a proxy (e.g. uvicorn --uds), "
                "set trusted_proxies (%r for a unix-socket peer) so that %s names the "
                "client; such requests are counted in no_client_address (warned once)",
                name,
                self.unmatched,
                UNIX_PEER,
                "Forwarded" if self.forwarded_header == "forwarded" else "X-Forwarded-For",
            )


def _headers(scope: Scope) -> dict[str, str]:
    """Lower-cased names, values decoded as UTF-8, repeated headers joined with ", "
    (as the server does); raises NotText naming a header that is not UTF-8."""
    out: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", ()):
        name, value = decode_header(raw_name, raw_value)
        previous = out.get(name)
        out[name] = value if previous is None else f"{previous}, {value}"
    return out


async def _answer(send: Send, response: Response) -> None:
    headers = [
        (n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in response.headers or ()
    ]
    await _send(send, response.status, response.content_type, response.body, headers)


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


__all__ = ["UNIX_PEER", "RateLimitMiddleware", "TrustedProxies", "limiter_problem"]
