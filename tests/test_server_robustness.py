"""R4: malformed input never gets a 5xx, never kills the process, never hangs a connection.

One real ``bucketmesh serve`` process (``server``) takes everything in this
module: schemathesis cases generated from its OpenAPI document (positive and
negative, fixed seed, bounded), then raw sockets — malformed request lines,
oversized heads and bodies, smuggling attempts, 50 pipelined requests in one
write, slow clients and a seeded random-bytes fuzz. After every test the process
must be alive and ``/healthz`` must answer 200; at teardown its stderr must hold
no internal error (tests/conftest.py).

Slow clients need the server's own timeouts to pass, so the server runs with
short ones (``limits.headerTimeout`` / ``bodyTimeout`` / ``keepaliveTimeout``:
``SHORT_TIMEOUTS``), and the clients all start together when the module starts
and run in background threads while the other tests use the server; the tests
at the end of the module collect their outcomes.

Nothing here depends on the machine's speed: a connection counts as hung only when
it is still open ``HANG_S`` after the server should have closed it, a guard that a
passing test never waits for, and no test asserts how long anything took. A test
that needs the server to have done something (read a piece, stopped reading) sends
or polls until it has.
"""

from __future__ import annotations

import contextlib
import json
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest
import schemathesis
from conftest import Server, ServerFactory, make_config
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bucketmesh import __version__
from bucketmesh.http.wire import openapi_document

pytestmark = pytest.mark.timeout(120)

ADMIN_TOKEN = "robust-admin-token"
#: Short connection timeouts, used when the config file supports them.
SHORT_TIMEOUTS = {"header_timeout": 2.0, "body_timeout": 3.0, "keepalive_timeout": 2.0}
#: How long past the moment the server should answer or close a connection it may stay
#: silent or open before the test fails instead of hanging. Only a guard: a passing test
#: never waits this long, whatever the machine's speed or load.
HANG_S = 30.0
#: The server half-closes and lingers this long for the client's EOF (http11._LINGER_SECONDS).
LINGER_S = 2.0

CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
]

# -- the server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(serve_module: ServerFactory) -> Server:
    config = make_config(limits={"maxBodyBytes": 65536, "maxHeaderBytes": 16384})
    return serve_module(config, admin_token=ADMIN_TOKEN, timeouts=SHORT_TIMEOUTS)


def assert_serving(server: Server) -> None:
    assert server.alive(), f"the server died:\n{server.describe()}"
    response = httpx.get(server.url("/healthz"), timeout=HANG_S)
    assert response.status_code == 200, response.text


@pytest.fixture(autouse=True)
def still_serving_afterwards(server: Server) -> Iterator[None]:
    yield
    assert_serving(server)


# -- raw HTTP helpers ----------------------------------------------------------------


@dataclass
class Exchange:
    """What one raw connection got back."""

    data: bytes = b""
    closed: bool = False  # the server closed (FIN or reset)
    reset: bool = False
    seconds: float = 0.0  # from the last byte sent to the close (or the give-up)
    responses: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)

    @property
    def statuses(self) -> list[int]:
        return [status for status, _, _ in self.responses]


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Every complete response in ``data`` (the server always sends Content-Length)."""
    responses = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        assert parts[0] == "HTTP/1.1", lines[0]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        size = int(headers.get("content-length", "0"))
        if len(rest) < size:
            break
        status = int(parts[1])
        responses.append((status, headers, rest[:size]))
        data = rest[size:]
    return responses


def connect(server: Server, timeout: float = HANG_S) -> socket.socket:
    return socket.create_connection(server.address, timeout=timeout)


def read_until_closed(sock: socket.socket, limit_s: float) -> Exchange:
    """Read until the server closes or ``limit_s`` passes."""
    exchange = Exchange()
    started = time.monotonic()
    deadline = started + limit_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except (ConnectionResetError, BrokenPipeError):
            exchange.closed = exchange.reset = True
            break
        if not chunk:
            exchange.closed = True
            break
        exchange.data += chunk
    exchange.seconds = time.monotonic() - started
    exchange.responses = parse_responses(exchange.data)
    return exchange


def exchange(
    server: Server, payload: bytes, *, limit_s: float = HANG_S, shut_write: bool = False
) -> Exchange:
    with connect(server) as sock:
        try:
            sock.sendall(payload)
            if shut_write:
                sock.shutdown(socket.SHUT_WR)
        except (ConnectionResetError, BrokenPipeError):
            return Exchange(closed=True, reset=True)
        return read_until_closed(sock, limit_s)


def assert_problem_response(response: tuple[int, dict[str, str], bytes], status: int) -> None:
    got, headers, body = response
    assert got == status, (got, body)
    assert headers["content-type"].startswith("application/problem+json"), headers
    document = json.loads(body)
    assert document["status"] == status
    assert document["title"] and document["detail"]


def request(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- slow clients: started at module start, collected at the end --------------------------


def lying_content_length(server: Server) -> Exchange:
    """Says 100 bytes, sends 10, then stalls."""
    with connect(server) as sock:
        sock.sendall(
            b"POST /v1/rate HTTP/1.1\r\nHost: t\r\nX-API-Key: liar\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n" + b'{"tokens":'
        )
        return read_until_closed(sock, server.timeouts["body_timeout"] + HANG_S)


def stalled_head(server: Server) -> Exchange:
    """Half a request head, then nothing."""
    with connect(server) as sock:
        sock.sendall(b"GET /v1/status HTTP/1.1\r\nHost: t\r\n")
        return read_until_closed(sock, server.timeouts["header_timeout"] + HANG_S)


def slowloris(server: Server) -> Exchange:
    """A request head trickled one byte every 0.5 s, forever: the deadline must not move."""
    limit = server.timeouts["header_timeout"] + HANG_S
    with connect(server) as sock:
        sock.sendall(b"GET /v1/status HTTP/1.1\r\nHost: t\r\n")
        started = time.monotonic()
        result = Exchange()
        trickle = b"X-Slow-%d: y\r\n"
        sent = 0
        while time.monotonic() - started < limit:
            readable, _, _ = select.select([sock], [], [], 0.5)
            if readable:
                try:
                    chunk = sock.recv(65536)
                except (ConnectionResetError, BrokenPipeError):
                    result.closed = result.reset = True
                    break
                if not chunk:
                    result.closed = True
                    break
                result.data += chunk
                continue
            line = trickle % sent
            try:
                sock.send(line[sent % len(line) : sent % len(line) + 1])
            except (ConnectionResetError, BrokenPipeError):
                result.closed = result.reset = True
                break
            sent += 1
        result.seconds = time.monotonic() - started
        result.responses = parse_responses(result.data)
        return result


def idle_keep_alive(server: Server) -> Exchange:
    """One request answered, then the connection sits idle."""
    with connect(server) as sock:
        sock.sendall(request("GET", "/healthz"))
        return read_until_closed(sock, server.timeouts["keepalive_timeout"] + HANG_S)


def silent_connection(server: Server) -> Exchange:
    """Connects and never sends a byte."""
    with connect(server) as sock:
        return read_until_closed(sock, server.timeouts["keepalive_timeout"] + HANG_S)


SLOW_CLIENTS: dict[str, Callable[[Server], Exchange]] = {
    "lying_content_length": lying_content_length,
    "stalled_head": stalled_head,
    "slowloris": slowloris,
    "idle_keep_alive": idle_keep_alive,
    "silent_connection": silent_connection,
}


@pytest.fixture(scope="module", autouse=True)
def slow_clients(server: Server) -> Iterator[dict[str, Future[Exchange]]]:
    with ThreadPoolExecutor(len(SLOW_CLIENTS), thread_name_prefix="slow-client") as pool:
        yield {name: pool.submit(run, server) for name, run in SLOW_CLIENTS.items()}


# -- schemathesis --------------------------------------------------------------------------

# The document is the server's own (``api.openapi_document``); the first test below
# checks that the live /openapi.json is exactly it. (schemathesis' lazy loader,
# ``from_fixture``, does not run under pytest 9, so the live document cannot be
# fetched at collection time without a server running at import.)
SCHEMA_CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 20240601,
        "generation": {"max-examples": 30, "deterministic": True, "database": "none"},
        "headers": {"Authorization": f"Bearer {ADMIN_TOKEN}"},
    }
)
schema = schemathesis.openapi.from_dict(openapi_document(__version__), config=SCHEMA_CONFIG)


def test_live_openapi_document_is_the_one_fuzzed(server: Server) -> None:
    live = httpx.get(server.url("/openapi.json"), timeout=HANG_S)
    assert live.status_code == 200
    assert live.headers["content-type"].startswith("application/json")
    assert live.json() == json.loads(json.dumps(schema.raw_schema))


@schema.parametrize()
def test_no_generated_request_gets_a_5xx_or_breaks_its_schema(case, server: Server) -> None:  # type: ignore[no-untyped-def]
    case.call_and_validate(base_url=server.base_url, checks=CHECKS, timeout=HANG_S)


DOCUMENTED_CASES = [
    # (method, path template, {key}, query, body)
    ("GET", "/v1/buckets/{key}", "tiny", None, None),  # a rule name
    ("GET", "/v1/buckets/{key}", "tiny-documented", None, None),  # a live key
    ("GET", "/v1/buckets/{key}", "tiny-never-seen", None, None),
    ("GET", "/v1/buckets/{key}", "matches-no-rule", None, None),
    ("GET", "/v1/bucket/state", None, {"key": "tiny-documented"}, None),
    ("GET", "/v1/status", None, {"key": "tiny-documented"}, None),
    ("GET", "/status", None, None, None),
    ("POST", "/v1/rate", None, None, {"key": "tiny-documented", "tokens": 2}),  # 429
    ("GET", "/v1/rate", None, {"key": "agent-api-key-documented", "tokens": "1"}, None),
    ("POST", "/v1/rate/batch", None, None, {"requests": [{"key": "tiny-documented"}]}),
    ("PATCH", "/v1/buckets/{key}", "tiny-documented", None, {"capacity": 3}),
    ("GET", "/healthz", None, None, None),
    ("GET", "/readyz", None, None, None),
    ("GET", "/metrics", None, None, None),
]


@pytest.mark.parametrize(("method", "path", "key", "query", "body"), DOCUMENTED_CASES)
def test_documented_responses_match_their_schemas(
    server: Server,
    method: str,
    path: str,
    key: str | None,
    query: dict[str, str] | None,
    body: dict[str, object] | None,
) -> None:
    httpx.post(server.url("/v1/rate"), json={"key": "tiny-documented"}, timeout=HANG_S)
    case = schema[path][method].Case(
        path_parameters={"key": key} if key is not None else None,
        query=query,
        body=body if body is not None else NOT_SET,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        media_type="application/json" if body is not None else None,
    )
    response = case.call_and_validate(base_url=server.base_url, checks=CHECKS, timeout=HANG_S)
    assert response.status_code < 500


# -- raw HTTP: malformed and oversized ------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\nHost: t\r\n\r\n",
        b"GET /v1/status HTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /v1/\x00status HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /v1/status HTTP/1.1\r\nHost: t\r\nNo colon here\r\n\r\n",
        b"GET /v1/status HTTP/1.1\r\nHost: t\r\nBad\x01Name: x\r\n\r\n",
        b"GET /v1/status HTTP/1.1\r\nHost: t\r\n Folded: continuation\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)),  # a TLS ClientHello
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # the HTTP/2 preface
        b"POST /v1/rate HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/rate HTTP/1.1\r\nHost: t\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/rate HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST /v1/rate HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /v1/rate HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /v1/rate HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked, identity\r\n\r\n",
    ],
)
def test_malformed_request_gets_4xx_problem_and_the_connection_closes(
    server: Server, payload: bytes
) -> None:
    got = exchange(server, payload, limit_s=server.timeouts["header_timeout"] + HANG_S)
    assert got.closed, f"the connection hung: {got}"
    assert all(status < 500 for status in got.statuses), got
    assert len(got.responses) <= 1, got
    if got.responses:
        status = got.statuses[0]
        assert 400 <= status < 500 or status == 505, got
        assert_problem_response(got.responses[0], status)


def test_request_head_over_max_header_bytes_gets_431(server: Server) -> None:
    big = "X-Padding: " + "a" * 17000
    got = exchange(server, request("GET", "/v1/status", big), limit_s=LINGER_S + HANG_S)
    assert got.closed
    assert got.statuses == [431]
    assert_problem_response(got.responses[0], 431)


def test_request_target_over_max_header_bytes_gets_431_or_414(server: Server) -> None:
    path = "/v1/rate?key=" + "k" * 20000
    got = exchange(server, request("GET", path), limit_s=LINGER_S + HANG_S)
    assert got.closed
    assert got.statuses in ([431], [414])


def test_too_many_header_fields_get_431(server: Server) -> None:
    headers = [f"X-H{i}: v" for i in range(300)]
    got = exchange(server, request("GET", "/v1/status", *headers), limit_s=LINGER_S + HANG_S)
    assert got.closed
    assert got.statuses == [431]


def test_head_sent_in_small_pieces_past_the_limit_gets_431(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /v1/status HTTP/1.1\r\nHost: t\r\nX-Long: ")
        # pieces until the server answers: it counts the head across reads, and a busy
        # server may take many pieces in one read
        deadline = time.monotonic() + HANG_S
        try:
            while not select.select([sock], [], [], 0.005)[0]:
                assert time.monotonic() < deadline, "an endless head was never refused"
                sock.sendall(b"a" * 1000)
        except (ConnectionResetError, BrokenPipeError):
            pass
        got = read_until_closed(sock, LINGER_S + HANG_S)
    assert got.closed
    assert got.statuses == [431]


def test_declared_body_over_max_body_bytes_gets_413_without_reading_it(server: Server) -> None:
    head = (
        b"POST /v1/rate HTTP/1.1\r\nHost: t\r\nX-API-Key: big\r\n"
        b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
    )
    got = exchange(server, head, limit_s=LINGER_S + HANG_S)
    assert got.closed
    assert got.statuses == [413]
    assert_problem_response(got.responses[0], 413)


def test_chunked_body_over_max_body_bytes_gets_413(server: Server) -> None:
    chunk = b"%x\r\n%s\r\n" % (40000, b" " * 40000)
    payload = (
        b"POST /v1/rate HTTP/1.1\r\nHost: t\r\nX-API-Key: chunky\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3
    )
    got = exchange(server, payload, limit_s=LINGER_S + HANG_S)
    assert got.closed
    assert got.statuses == [413]
    used = httpx.get(
        server.url("/v1/bucket/state"), params={"key": "agent-api-key-chunky"}, timeout=HANG_S
    )
    assert used.json()["replicas"] == {}


def test_chunked_json_body_within_the_limit_is_decided(server: Server) -> None:
    body = b'{"tokens": 2}'
    payload = (
        b"POST /v1/rate HTTP/1.1\r\nHost: t\r\nX-API-Key: chunked-ok\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (5, body[:5])
        + b"%x\r\n%s\r\n" % (len(body) - 5, body[5:])
        + b"0\r\n\r\n"
    )
    got = exchange(server, payload)
    assert got.statuses == [200]
    assert json.loads(got.responses[0][2])["tokens_remaining"] == 4998


@pytest.mark.parametrize(
    "target",
    [
        "/v1/buckets/%ff%fe%00",
        "/v1/buckets/%",
        "/v1/buckets/..%2f..%2fetc%2fpasswd",
        "/v1/bucket/state?key=%ff%00",
        "/v1/bucket/state?key",
        "/v1/rate?key=agent-api-key-%00%ff&tokens=%ff",
        "/v1/status?key=%zz",
        "/v1/rate?" + "&".join(f"p{i}=v" for i in range(2000)),
        "http://example.com/v1/status",
        "*",
        "//v1//status",
    ],
)
def test_odd_request_targets_get_no_5xx(server: Server, target: str) -> None:
    got = exchange(
        server,
        request("GET", target, "X-API-Key: odd", "Connection: close"),
        limit_s=LINGER_S + HANG_S,
    )
    assert got.closed
    assert len(got.responses) == 1, got
    assert got.statuses[0] < 500, got


@pytest.mark.parametrize(
    "value",
    [b"\xff\xfe\xfd", b"caf\xe9", b"\x7f", b"a\tb", b'"quoted"', b"x" * 8000],
)
def test_odd_api_key_header_values_get_no_5xx(server: Server, value: bytes) -> None:
    payload = (
        b"POST /v1/rate HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-API-Key: " + value + b"\r\n"
        b'Content-Type: application/json\r\nContent-Length: 13\r\n\r\n{"tokens": 1}'
    )
    got = exchange(server, payload)
    assert got.closed
    assert len(got.responses) == 1, got
    status, _, body = got.responses[0]
    assert status < 500, body
    if status == 200:
        assert json.loads(body)["key"] == "agent-api-key-" + value.decode("latin-1")


@pytest.mark.parametrize(
    "body",
    [
        b'{"key": ' + b"[" * 20000 + b"]" * 20000 + b"}",
        b'{"requests": ' + b"[" * 30000 + b"]" * 30000 + b"}",
        b"[" * 60000,
        b'{"tokens": 1e999}',
        b'{"tokens": -0}',
        b'{"tokens": 18446744073709551616}',
        b'{"key": "\\ud800", "rule": "tiny"}',
        b'{"key": "agent-api-key-\\u0000", "tokens": 1}',
        b'\xef\xbb\xbf{"tokens": 1}',
        b'{"tokens": 1, "tokens": 2}',
        b"\xff\xfe{\x00}\x00",
        b'{"key": "' + b"k" * 60000 + b'", "rule": "tiny"}',
    ],
)
@pytest.mark.parametrize("path", ["/v1/rate", "/v1/rate/batch", "/v1/buckets/tiny"])
def test_hostile_json_bodies_get_no_5xx(server: Server, body: bytes, path: str) -> None:
    method = "PATCH" if path.startswith("/v1/buckets") else "POST"
    response = httpx.request(
        method,
        server.url(path),
        content=body,
        headers={
            "X-API-Key": "hostile",
            "Content-Type": "application/json",
            "Authorization": f"Bearer {ADMIN_TOKEN}",
        },
        timeout=HANG_S,
    )
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize(
    "patch",
    [
        {"capacity": 10**15, "refillRate": 1e-9},
        {"capacity": 1, "refillRate": 1e9},
        {"ttl": 0.001},
        {"ttl": 1e8},
        {"mode": "strict"},
        {"mode": "local"},
        {"capacity": 10**16},
        {"refillRate": float("1e308")},
    ],
)
def test_extreme_limits_via_patch_keep_decisions_working(
    serve: ServerFactory, patch: dict[str, object]
) -> None:
    server = serve()
    with server.client(timeout=HANG_S) as c:
        assert c.post("/v1/rate", params={"user": "before"}).status_code == 200
        changed = c.patch("/v1/buckets/tiny", json=patch)
        assert changed.status_code in (200, 400), changed.text
        for user in ("before", "after", "before"):
            for tokens in (0, 1, 2):
                decided = c.post("/v1/rate", params={"user": user}, json={"tokens": tokens})
                assert decided.status_code in (200, 400, 429), decided.text
        for path in (
            "/v1/bucket/state?key=tiny-before",
            "/v1/buckets/tiny",
            "/metrics",
            "/v1/status?key=tiny-after",
        ):
            assert c.get(path).status_code == 200, path
    assert_serving(server)


# -- pipelining ---------------------------------------------------------------------------


def test_fifty_pipelined_requests_in_one_write_are_answered_in_order(server: Server) -> None:
    pieces = []
    expected_keys = []
    for i in range(50):
        key = f"agent-api-key-pipe-{i}"
        expected_keys.append(key)
        if i % 3 == 0:
            body = json.dumps({"key": key, "tokens": 1}).encode()
            pieces.append(request("POST", "/v1/rate", "Content-Type: application/json", body=body))
        elif i % 3 == 1:
            pieces.append(request("GET", f"/v1/rate?key={key}&tokens=1"))
        else:
            pieces.append(request("GET", f"/v1/bucket/state?key={key}"))
    pieces.append(request("GET", "/healthz", "Connection: close"))
    got = exchange(server, b"".join(pieces), limit_s=server.timeouts["keepalive_timeout"] + HANG_S)
    assert got.closed
    assert len(got.responses) == 51, got.data[-500:]
    assert got.statuses == [200] * 51
    assert [json.loads(body)["key"] for _, _, body in got.responses[:50]] == expected_keys


def test_pipelined_requests_with_errors_in_between_keep_their_order(server: Server) -> None:
    pieces = [
        request("GET", "/v1/rate?key=agent-api-key-mix&tokens=1"),
        request("GET", "/nope"),
        request("POST", "/v1/rate", "Content-Type: text/plain", body=b"x"),
        request("GET", "/v1/rate?key=agent-api-key-mix&tokens=abc"),
        request("DELETE", "/v1/rate"),
        request("GET", "/v1/rate?key=agent-api-key-mix&tokens=2", "Connection: close"),
    ]
    got = exchange(server, b"".join(pieces))
    assert got.closed
    assert got.statuses == [200, 404, 415, 400, 405, 200]
    assert json.loads(got.responses[-1][2])["key"] == "agent-api-key-mix"


# -- abrupt clients -------------------------------------------------------------------------


def test_clients_that_vanish_mid_request_leave_the_server_serving(server: Server) -> None:
    payloads = [
        b'POST /v1/rate HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\n{"to',
        b"GET /v1/sta",
        request("GET", "/v1/status") * 20,
        request(
            "POST",
            "/v1/rate/batch",
            "Content-Type: application/json",
            body=json.dumps({"requests": [{"key": "agent-api-key-gone"}] * 1000}).encode(),
        ),
    ]
    for payload in payloads:
        for abort in (False, True):
            sock = connect(server)
            with contextlib.suppress(OSError):
                sock.sendall(payload)
            if abort:  # RST instead of FIN
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            sock.close()
    assert_serving(server)


def test_client_that_never_reads_its_answers_does_not_stall_others(server: Server) -> None:
    hog = connect(server)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    one = request("GET", "/openapi.json")
    try:
        hog.setblocking(False)
        deadline = time.monotonic() + HANG_S
        while True:
            assert time.monotonic() < deadline, "the server kept reading a client that never reads"
            try:
                hog.send(one * 50)
            except BlockingIOError:
                break  # the server stopped reading it: backpressure
            except OSError:
                break  # or dropped it
        for _ in range(5):
            assert httpx.get(server.url("/healthz"), timeout=HANG_S).status_code == 200
    finally:
        hog.close()


def test_hundreds_of_concurrent_connections_are_all_answered(server: Server) -> None:
    def one(i: int) -> list[int]:
        return exchange(
            server,
            request(
                "GET", f"/v1/rate?key=agent-api-key-crowd-{i % 7}&tokens=0", "Connection: close"
            ),
        ).statuses

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(300)))
    assert all(statuses == [200] for statuses in results), results


# -- random bytes ----------------------------------------------------------------------------

FUZZ_SEED = 424242
FUZZ_CONNECTIONS = 300
FUZZ_PREFIXES = [
    b"",
    b"GET ",
    b"POST /v1/rate HTTP/1.1\r\n",
    b"POST /v1/rate HTTP/1.1\r\nHost: f\r\nContent-Type: application/json\r\n"
    b"Content-Length: 40\r\n\r\n",
    b"PATCH /v1/buckets/tiny HTTP/1.1\r\nHost: f\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /v1/rate?key=",
    b"GET /v1/status HTTP/1.1\r\nHost: f\r\nX-API-Key: ",
]


def fuzz_payload(rng: random.Random) -> bytes:
    prefix = rng.choice(FUZZ_PREFIXES)
    size = rng.choice([1, 8, 64, 512, 4096, 20000])
    alphabet = rng.choice([None, b'\r\n:/ ?=&%{}"[]0123456789abcdefGET', b"\r\n"])
    if alphabet is None:
        noise = rng.randbytes(size)
    else:
        noise = bytes(rng.choice(alphabet) for _ in range(size))
    return prefix + noise


def test_random_bytes_on_hundreds_of_connections_get_no_5xx_and_no_hang(server: Server) -> None:
    rng = random.Random(FUZZ_SEED)
    payloads = [fuzz_payload(rng) for _ in range(FUZZ_CONNECTIONS)]
    lock = threading.Lock()
    failures: list[str] = []

    def one(payload: bytes) -> None:
        # the client closes its side after sending, so every connection must end
        got = exchange(server, payload, shut_write=True, limit_s=LINGER_S + HANG_S)
        problem = None
        if not got.closed:
            problem = "connection not closed"
        elif any(status >= 500 for status in got.statuses):
            problem = f"5xx: {got.statuses}"
        if problem:
            with lock:
                failures.append(f"{problem} for {payload[:120]!r}")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, payloads))
    assert not failures, "\n".join(failures[:20])


# -- slow clients: collected last ------------------------------------------------------------


def test_lying_content_length_then_stall_is_closed_within_the_body_timeout(
    server: Server, slow_clients: dict[str, Future[Exchange]]
) -> None:
    got = slow_clients["lying_content_length"].result()
    assert got.closed, f"still open after {got.seconds:.1f}s"
    assert got.statuses in ([408], [])
    liar = httpx.get(
        server.url("/v1/bucket/state"), params={"key": "agent-api-key-liar"}, timeout=HANG_S
    )
    assert liar.json()["replicas"] == {}


def test_stalled_request_head_is_closed_with_408_within_the_header_timeout(
    server: Server, slow_clients: dict[str, Future[Exchange]]
) -> None:
    got = slow_clients["stalled_head"].result()
    assert got.closed, f"still open after {got.seconds:.1f}s"
    assert got.statuses in ([408], [])


def test_slowloris_trickling_a_head_is_cut_off_at_the_header_timeout(
    server: Server, slow_clients: dict[str, Future[Exchange]]
) -> None:
    got = slow_clients["slowloris"].result()
    assert got.closed, f"still open after {got.seconds:.1f}s"
    assert got.statuses in ([408], [])


def test_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(
    server: Server, slow_clients: dict[str, Future[Exchange]]
) -> None:
    got = slow_clients["idle_keep_alive"].result()
    assert got.statuses == [200]
    assert got.closed, f"still open after {got.seconds:.1f}s"


def test_connection_that_never_speaks_is_closed(
    server: Server, slow_clients: dict[str, Future[Exchange]]
) -> None:
    got = slow_clients["silent_connection"].result()
    assert got.closed, f"still open after {got.seconds:.1f}s"
    assert got.responses == []
