"""The ASGI middleware: an in-process limiter in front of any ASGI application.

Driven through httpx's ASGI transport (the ASGI protocol, no mocks): what a
client of the wrapped application sees. tests/test_asgi_uvicorn.py runs it in a
real uvicorn process (unix socket, trusted proxies, the Rating API's answers).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from bucketmesh import Limiter, Rule
from bucketmesh.api.routes import limiter_error
from bucketmesh.core.limiter import (
    BucketCapReached,
    InvalidTokens,
    KeyTooLong,
    LimiterError,
    NoRuleError,
)
from bucketmesh.integrations.asgi import (
    Message,
    RateLimitMiddleware,
    Receive,
    Scope,
    Send,
    limiter_problem,
)

NOW_CLOCK = 1_000 * 10**9


class Upstream:
    """A trivial ASGI app that counts the requests that reached it."""

    def __init__(self) -> None:
        self.calls = 0
        self.scopes: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope["type"])
        if scope["type"] == "lifespan":
            message = await receive()
            assert message["type"] == "lifespan.startup"
            await send({"type": "lifespan.startup.complete"})
            return
        self.calls += 1
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": b"hello"})


def limiter(capacity: int = 3, replica: str = "eu-west-1/web-1/1", **kwargs: Any) -> Limiter:
    rules = [
        Rule.create("api-{{ .Request.Header.X-API-Key }}", capacity, 0.001, name="per-key"),
        Rule.create("ip-{{ .Request.ClientIP }}", 100, 1.0, name="per-ip", mode="local"),
    ]
    return Limiter(rules, replica_id=replica, clock=lambda: NOW_CLOCK, **kwargs)


def client(app: RateLimitMiddleware, ip: str = "203.0.113.7") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def test_allowed_requests_reach_the_app_with_ratelimit_headers_and_denied_ones_get_429() -> None:
    upstream = Upstream()
    app = RateLimitMiddleware(upstream, limiter(capacity=3))

    async def scenario() -> list[httpx.Response]:
        async with client(app) as http:
            return [await http.get("/things", headers={"X-API-Key": "k1"}) for _ in range(5)]

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429]
    assert upstream.calls == 3
    first, denied = responses[0], responses[3]
    assert first.text == "hello"
    assert first.headers["ratelimit-policy"] == '"per-key";q=3;w=3000'
    assert first.headers["ratelimit"] == '"per-key";r=2;t=0'
    assert denied.headers["content-type"] == "application/problem+json"
    assert int(denied.headers["retry-after"]) >= 999
    body = denied.json()
    assert body["type"] == "quota-exceeded" and body["status"] == 429
    assert body["key"] == "api-k1" and body["allowed"] is False
    assert body["region"] == "eu-west-1"


def test_a_request_no_rule_matches_passes_through_or_is_refused() -> None:
    only_api_key = [Rule.create("api-{{ .Request.Header.X-API-Key }}", 1, 1.0)]
    upstream = Upstream()
    passing = RateLimitMiddleware(upstream, Limiter(only_api_key, replica_id="r/n/1"))
    strict = RateLimitMiddleware(
        upstream, Limiter(only_api_key, replica_id="r/n/1"), unmatched="deny"
    )

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with client(passing) as a, client(strict) as b:
            return await a.get("/"), await b.get("/")

    passed, refused = asyncio.run(scenario())
    assert passed.status_code == 200 and "ratelimit" not in passed.headers
    assert refused.status_code == 400
    assert refused.json()["detail"] == "no rate-limit rule matches this request"


def test_the_client_ip_rule_applies_when_no_header_is_given() -> None:
    upstream = Upstream()
    app = RateLimitMiddleware(upstream, limiter())

    async def scenario() -> httpx.Response:
        async with client(app, ip="198.51.100.9") as http:
            return await http.get("/")

    response = asyncio.run(scenario())
    assert response.status_code == 200
    assert response.headers["ratelimit"].startswith('"per-ip";r=99;')
    assert app.limiter.bucket("ip-198.51.100.9") is not None


def test_new_keys_at_the_bucket_cap_get_503_and_known_keys_keep_working() -> None:
    upstream = Upstream()
    app = RateLimitMiddleware(upstream, limiter(capacity=10, max_buckets=1))

    async def scenario() -> list[int]:
        async with client(app) as http:
            known = await http.get("/", headers={"X-API-Key": "a"})
            new = await http.get("/", headers={"X-API-Key": "b"})
            again = await http.get("/", headers={"X-API-Key": "a"})
            assert new.headers["retry-after"] == "1"
            return [known.status_code, new.status_code, again.status_code]

    assert asyncio.run(scenario()) == [200, 503, 200]


def test_lifespan_and_websocket_scopes_pass_through() -> None:
    upstream = Upstream()
    app = RateLimitMiddleware(upstream, limiter())
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app({"type": "lifespan"}, receive, send))
    assert upstream.scopes == ["lifespan"]
    assert sent == [{"type": "lifespan.startup.complete"}]


def test_two_apps_in_two_regions_share_one_bucket_through_deltas() -> None:
    a = RateLimitMiddleware(Upstream(), limiter(capacity=4, replica="us-east-1/web/1"))
    b = RateLimitMiddleware(Upstream(), limiter(capacity=4, replica="eu-west-1/web/1"))

    async def spend(app: RateLimitMiddleware, n: int) -> list[int]:
        async with client(app) as http:
            return [
                (await http.get("/", headers={"X-API-Key": "shared"})).status_code for _ in range(n)
            ]

    assert asyncio.run(spend(a, 3)) == [200, 200, 200]
    b.limiter.merge(a.limiter.collect_deltas())  # the embedding app's own sync step
    assert asyncio.run(spend(b, 2)) == [200, 429]


def test_tokens_must_be_positive() -> None:
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        RateLimitMiddleware(Upstream(), limiter(), tokens=0)
    # before: accepted, then every request raised TypeError (a 500 under uvicorn)
    with pytest.raises(TypeError, match="tokens must be an integer"):
        RateLimitMiddleware(Upstream(), limiter(), tokens=1.5)  # type: ignore[arg-type]


def test_tokens_above_the_capacity_are_a_400_not_an_exception() -> None:
    upstream = Upstream()
    app = RateLimitMiddleware(upstream, limiter(capacity=3), tokens=5)

    async def scenario() -> httpx.Response:
        async with client(app) as http:
            return await http.get("/", headers={"X-API-Key": "k"})

    response = asyncio.run(scenario())
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == "tokens"
    assert upstream.calls == 0


@pytest.mark.parametrize(
    ("error", "field"),
    [
        (InvalidTokens("tokens must be between 0 and the capacity 3, got 5", 3), None),
        (NoRuleError("unknown rule 'gone'"), "rule"),
        (BucketCapReached("1 live buckets: the cap (max_buckets) is reached"), None),
        # was a 503 with Retry-After here (an endless retry), a 400 naming key there
        (KeyTooLong("the key is 9004 bytes; at most 8192 can be replicated"), None),
    ],
)
def test_every_limiter_error_is_answered_as_the_rating_api_answers_it(
    error: LimiterError, field: str | None
) -> None:
    # the middleware always names the rule, as a Rating API request with "rule" does
    ours = limiter_problem(error)
    theirs = limiter_error(error, field).response()
    assert (ours.status, ours.content_type, ours.body, ours.headers) == (
        theirs.status,
        theirs.content_type,
        theirs.body,
        theirs.headers,
    )


def test_a_bad_trusted_proxy_entry_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33' is not an address"):
        RateLimitMiddleware(Upstream(), limiter(), trusted_proxies=["unix", "10.0.0.0/33"])
    with pytest.raises(ValueError, match="must be a list"):
        RateLimitMiddleware(Upstream(), limiter(), trusted_proxies="10.0.0.1")
    with pytest.raises(ValueError, match="forwarded_header"):
        RateLimitMiddleware(Upstream(), limiter(), forwarded_header="X-Real-IP")


# -- text: decoded as `bucketmesh serve` decodes it -------------------------------------

AGENT = "my\u2011agent"  # a non-breaking hyphen, as a typed key often carries


async def _call(app: RateLimitMiddleware, headers: list[tuple[bytes, bytes]], query: bytes) -> Any:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/things",
        "query_string": query,
        "headers": headers,
        "client": ("203.0.113.7", 40000),
    }
    await app(scope, receive, send)
    start, body = sent[0], sent[-1]
    return start["status"], body["body"]


def text_limiter() -> Limiter:
    rules = [
        Rule.create("api-{{ .Request.Header.X-API-Key }}", 10, 0.001, name="per-key"),
        Rule.create("user-{{ .Request.Query.user }}", 10, 0.001, name="per-user"),
    ]
    return Limiter(rules, replica_id="eu-west-1/web-1/1", clock=lambda: NOW_CLOCK)


def test_a_non_ascii_key_reaches_the_same_bucket_as_through_serve(serve: Any) -> None:
    limits = text_limiter()
    app = RateLimitMiddleware(Upstream(), limits)
    utf8 = AGENT.encode()

    async def scenario() -> list[Any]:
        return [
            await _call(app, [(b"x-api-key", utf8)], b""),
            await _call(app, [], b"user=" + utf8),  # raw bytes, as curl sends a typed key
            await _call(app, [], b"user=my%E2%80%91agent"),  # percent-escaped
        ]

    assert [status for status, _ in asyncio.run(scenario())] == [200, 200, 200]
    header_bucket, query_bucket = limits.bucket(f"api-{AGENT}"), limits.bucket(f"user-{AGENT}")
    assert header_bucket is not None and query_bucket is not None
    assert limits.peek(f"user-{AGENT}").tokens_remaining == 8

    # serve builds the very same keys from the same bytes
    from conftest import make_config

    server = serve(
        make_config(
            [
                {
                    "name": "per-key",
                    "key": "api-{{ .Request.Header.X-API-Key }}",
                    "capacity": 10,
                    "refillRate": 0.001,
                },
                {
                    "name": "per-user",
                    "key": "user-{{ .Request.Query.user }}",
                    "capacity": 10,
                    "refillRate": 0.001,
                },
            ]
        )
    )
    with server.client() as http:
        assert http.post("/v1/rate", headers={"X-API-Key": utf8}, json={}).status_code == 200
        assert http.post("/v1/rate?user=my%E2%80%91agent", json={}).status_code == 200
        for key in (f"api-{AGENT}", f"user-{AGENT}"):
            state = http.get("/v1/bucket/state", params={"key": key})
            assert state.status_code == 200, state.text
            assert state.json()["tokens_remaining"] == 9


def test_bytes_that_are_not_utf8_get_a_400_naming_the_header_or_parameter() -> None:
    upstream = Upstream()
    app = RateLimitMiddleware(upstream, text_limiter())

    async def scenario() -> list[Any]:
        return [
            await _call(app, [(b"x-api-key", b"caf\xe9")], b""),
            await _call(app, [], b"user=caf%E9"),
            await _call(app, [], b"user=caf\xe9"),
        ]

    answers = asyncio.run(scenario())
    assert [status for status, _ in answers] == [400, 400, 400]
    import json

    fields = [json.loads(body).get("field") for _, body in answers]
    assert fields == ["x-api-key", "user", None]
    assert "not UTF-8" in json.loads(answers[0][1])["detail"]
    assert upstream.calls == 0
