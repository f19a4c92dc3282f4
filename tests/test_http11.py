"""The HTTP/1.1 layer over real sockets: a server on its own uvloop thread, raw clients.

No test here depends on the machine's speed: a test that needs the server to have
reached some state (a request read, a handler running, a connection gone) waits for
that state, and handlers that must stay in flight wait on an event the test sets
instead of sleeping. Time limits (``HANG_S``) only stop a broken test from hanging;
a passing test never waits for one. The only assertions about time are lower
bounds: a timeout must not fire before it is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import select
import socket
import threading
import time
from collections.abc import Awaitable, Iterator

import pytest
import uvloop
from conftest import eventually
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bucketmesh.http.server import (
    Handler,
    HttpServer,
    Request,
    Response,
    ServerLimits,
    problem,
)

pytestmark = pytest.mark.timeout(120)

#: How long a wait for something that should happen at once may last before the test
#: fails instead of hanging. Only a guard: a passing test never waits this long.
HANG_S = 30.0


class Running:
    def __init__(self, server: HttpServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.errors: list[BaseException] = []

    @property
    def port(self) -> int:
        return self.server.port

    def call(self, coroutine: Awaitable[object], timeout: float = HANG_S) -> object:
        async def wrapped() -> object:
            return await coroutine

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout)

    def open_connections(self) -> int:
        async def count() -> int:
            return self.server.open_connections

        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(HANG_S)

    def release(self, event: asyncio.Event) -> None:
        """Set ``event`` (one a handler waits on) on the server's loop."""
        self.loop.call_soon_threadsafe(event.set)

    def settle(self) -> None:
        """Return once the loop has run what was scheduled on it before this call."""
        self.call(asyncio.sleep(0))


@contextlib.contextmanager
def serving(handler: Handler, **limits: float) -> Iterator[Running]:
    loop = uvloop.new_event_loop()
    errors: list[BaseException] = []
    # no lag shedding unless a test asks for it (as conftest's nodes): on a loaded
    # machine the loop can stall past shed_lag and answer a counted request 503
    # (test_http_dispatch_paths failed so in a fresh-clone CI); _force_shedding
    # still works, its overdue timer is infinitely late
    limits = {"shed_lag": 3600.0, **limits}
    server = HttpServer(
        handler,
        ServerLimits(**limits),  # type: ignore[arg-type]
        on_error=errors.append,
    )
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start("127.0.0.1", 0))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(HANG_S)
    running = Running(server, loop)
    running.errors = errors
    try:
        yield running
    finally:
        asyncio.run_coroutine_threadsafe(server.shutdown(grace=1.0), loop).result(HANG_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(HANG_S)
        loop.close()


class Client:
    """A raw HTTP/1.1 client: send bytes, read exact responses."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(HANG_S)
        self.sock.connect(("127.0.0.1", port))
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"EOF before {marker!r}; got {self.buffer!r}")
        head, _, self.buffer = self.buffer.partition(marker)
        return head + marker

    def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise ConnectionError(f"EOF after {len(self.buffer)} of {size} bytes")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def response(self, head_only: bool = False) -> tuple[str, dict[str, str], bytes]:
        """Status line, headers (lower-cased names), body."""
        lines = self.read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:-2]:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"duplicate header {name}"
            headers[name.lower()] = value.strip()
        size = 0 if head_only else int(headers.get("content-length", "0"))
        return lines[0], headers, self.read_exactly(size)

    def at_eof(self, timeout: float = HANG_S) -> bool:
        """True when the server closed (FIN or reset) and sent nothing more; then closes
        this side too. ``timeout`` only guards against a server that never closes."""
        self.sock.settimeout(timeout)
        try:
            while not self.buffer:
                if not self._fill():
                    self.close()
                    return True
        except ConnectionResetError:
            self.close()
            return True
        return False

    def close(self) -> None:
        self.sock.close()


def echo(request: Request) -> Response:
    document = {
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "headers": request.headers,
        "body": request.body.decode("latin-1"),
        "client_ip": request.client_ip,
        "http_version": request.http_version,
    }
    return Response(200, json.dumps(document, sort_keys=True).encode())


def path_echo(request: Request) -> Response:
    return Response(200, request.path.encode(), "text/plain")


def get(path: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: test", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_keep_alive_reuses_one_connection_and_every_response_is_framed() -> None:
    with serving(path_echo) as running:
        client = Client(running.port)
        for path in ("/one", "/two"):
            client.send(get(path))
            status, headers, body = client.response()
            assert status == "HTTP/1.1 200 OK"
            assert body == path.encode()
            assert headers["content-length"] == str(len(path))
            assert headers["content-type"] == "text/plain"
            assert headers["server"] == "bucketmesh"
            assert headers["date"].endswith(" GMT")
            assert "connection" not in headers
        assert running.open_connections() == 1
        client.close()


def test_request_fields_are_decoded() -> None:
    with serving(echo) as running:
        client = Client(running.port)
        client.send(
            b"POST /v1/buckets/a%2Fb%20c?key=x%2Fy&tokens=1&tokens=2&empty= HTTP/1.1\r\n"
            b"Host: test\r\nX-API-Key: k1  \r\nX-Api-Key: k2\r\nContent-Length: 5\r\n\r\nhello"
        )
        status, _, body = client.response()
        assert status == "HTTP/1.1 200 OK"
        assert json.loads(body) == {
            "method": "POST",
            "path": "/v1/buckets/a/b c",
            "query": {"key": "x/y", "tokens": "2", "empty": ""},
            "headers": {"host": "test", "x-api-key": "k1, k2", "content-length": "5"},
            "body": "hello",
            "client_ip": "127.0.0.1",
            "http_version": "1.1",
        }
        client.close()


def test_pipelined_requests_are_answered_in_order() -> None:
    with serving(path_echo) as running:
        client = Client(running.port)
        client.send(get("/a") + get("/b") + get("/c"))
        assert [client.response()[2] for _ in range(3)] == [b"/a", b"/b", b"/c"]
        client.close()


def test_slow_async_response_is_not_overtaken_by_later_sync_ones() -> None:
    handled: list[str] = []
    answer = asyncio.Event()

    def handler(request: Request) -> Response | Awaitable[Response]:
        handled.append(request.path)
        if request.path == "/slow":

            async def slow() -> Response:
                await answer.wait()
                return Response(200, b"/slow", "text/plain")

            return slow()
        return path_echo(request)

    with serving(handler) as running:
        client = Client(running.port)
        client.send(get("/slow") + get("/b") + get("/c"))

        def later_ones_handled() -> None:
            assert handled == ["/slow", "/b", "/c"]

        # /b and /c are answered (their responses ready) while /slow is still pending
        eventually(later_ones_handled, "the requests after /slow handled while it is pending")
        running.release(answer)
        assert [client.response()[2] for _ in range(3)] == [b"/slow", b"/b", b"/c"]
        client.close()


def test_async_handler_sleeping_on_first_request_only_keeps_order() -> None:
    started: list[str] = []
    answer_first = asyncio.Event()

    async def handler(request: Request) -> Response:
        started.append(request.path)
        if request.path == "/first":
            await answer_first.wait()
        return Response(200, request.path.encode(), "text/plain")

    with serving(handler) as running:
        client = Client(running.port)
        client.send(get("/first") + get("/second") + get("/third"))

        def later_ones_started() -> None:
            assert started == ["/first", "/second", "/third"]

        # /second and /third run (and finish) while /first is still waiting
        eventually(later_ones_started, "the requests after /first handled while it waits")
        running.release(answer_first)
        assert [client.response()[2] for _ in range(3)] == [b"/first", b"/second", b"/third"]
        client.send(get("/again"))
        assert client.response()[2] == b"/again"
        client.close()


@pytest.mark.parametrize(
    ("request_line", "connection", "version", "closes"),
    [
        ("GET / HTTP/1.1", "", "1.1", False),
        ("GET / HTTP/1.1", "Connection: keep-alive", "1.1", False),
        ("GET / HTTP/1.1", "Connection: close", "1.1", True),
        ("GET / HTTP/1.0", "", "1.0", True),
        ("GET / HTTP/1.0", "Connection: keep-alive", "1.0", False),
    ],
)
def test_http_version_and_persistence(
    request_line: str, connection: str, version: str, closes: bool
) -> None:
    with serving(echo) as running:
        client = Client(running.port)
        extra = f"{connection}\r\n" if connection else ""
        client.send(f"{request_line}\r\nHost: t\r\n{extra}\r\n".encode())
        status, headers, body = client.response()
        assert status == "HTTP/1.1 200 OK"
        assert json.loads(body)["http_version"] == version
        assert (headers.get("connection") == "close") == closes
        if closes:
            assert client.at_eof()
        else:
            client.send(get("/again"))
            assert client.response()[0] == "HTTP/1.1 200 OK"
            client.close()


def test_unsupported_http_version_gets_400() -> None:
    with serving(echo) as running:
        client = Client(running.port)
        client.send(b"GET / HTTP/2.0\r\nHost: t\r\n\r\n")
        status, _, body = client.response()
        assert status == "HTTP/1.1 400 Bad Request"
        assert json.loads(body)["detail"] == "HTTP/2.0 is not supported; use HTTP/1.1"
        assert client.at_eof()


def test_mangled_requests_never_get_a_5xx_and_the_server_keeps_serving() -> None:
    valid = [
        get("/v1/rate?key=a%2Fb", "X-API-Key: k"),
        b'POST /v1/rate HTTP/1.1\r\nHost: t\r\nContent-Length: 13\r\n\r\n{"tokens": 1}',
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ]
    rng = random.Random(7)
    cases = [rng.randbytes(rng.randrange(1, 200)) for _ in range(40)]
    for _ in range(120):
        mangled = bytearray(rng.choice(valid))
        for _ in range(rng.randrange(1, 4)):
            mangled[rng.randrange(len(mangled))] = rng.randrange(256)
        cases.append(bytes(mangled))

    with serving(path_echo) as running:
        clients = [Client(running.port) for _ in cases]
        for client, case in zip(clients, cases, strict=True):
            client.send(case)
            client.sock.shutdown(socket.SHUT_WR)  # so an incomplete request ends at once
        for client, case in zip(clients, cases, strict=True):
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := client.sock.recv(65536):
                    received += chunk
            client.close()
            statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", received)
            assert all(not status.startswith(b"5") for status in statuses), (case, received)
        assert running.errors == []
        client = Client(running.port)
        client.send(get("/still-here"))
        assert client.response()[2] == b"/still-here"
        client.close()


def test_more_pipelined_async_requests_than_the_limit_are_all_answered_in_order() -> None:
    in_flight: list[int] = []
    most = 0
    go_on = asyncio.Event()

    async def handler(request: Request) -> Response:
        nonlocal most
        in_flight.append(1)
        most = max(most, len(in_flight))
        await go_on.wait()  # held until the limit is reached, then free
        await asyncio.sleep(0)
        in_flight.pop()
        return Response(200, request.path.encode(), "text/plain")

    with serving(handler, max_pipelined=2) as running:
        client = Client(running.port)
        client.send(b"".join(get(f"/{i}") for i in range(20)))

        def limit_reached() -> None:
            assert len(in_flight) >= 2

        # all 20 requests are read at once; only 2 of them may be in the handler
        eventually(limit_reached, "two pipelined requests in the handler at once")
        running.settle()
        assert most == 2
        running.release(go_on)
        assert [client.response()[2] for _ in range(20)] == [f"/{i}".encode() for i in range(20)]
        assert most == 2
        client.close()


def test_interim_100_continue_keeps_its_place_among_deferred_requests() -> None:
    async def handler(request: Request) -> Response:
        await asyncio.sleep(0.05)
        return Response(200, request.path.encode() + request.body, "text/plain")

    with serving(handler, max_pipelined=1) as running:
        client = Client(running.port)
        client.send(
            get("/slow")
            + get("/b")
            + b"POST /post HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
            + b"Expect: 100-continue\r\n\r\ndata"
            + get("/c")
        )
        assert client.response()[2] == b"/slow"
        assert client.response()[2] == b"/b"
        assert client.read_until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert client.response()[2] == b"/postdata"
        assert client.response()[2] == b"/c"
        client.close()


def test_chunked_body_is_reassembled() -> None:
    with serving(echo) as running:
        client = Client(running.port)
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
        )
        status, _, body = client.response()
        assert status == "HTTP/1.1 200 OK"
        assert json.loads(body)["body"] == "hello world"
        client.close()


def test_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    with serving(echo) as running:
        client = Client(running.port)
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 4\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        assert client.read_until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(b"data")
        status, _, body = client.response()
        assert status == "HTTP/1.1 200 OK"
        assert json.loads(body)["body"] == "data"
        client.close()


def test_expect_100_continue_with_oversized_length_gets_413_instead() -> None:
    with serving(echo, max_body_bytes=10) as running:
        client = Client(running.port)
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 11\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        status, headers, body = client.response()
        assert status == "HTTP/1.1 413 Request Entity Too Large"
        assert headers["content-type"] == "application/problem+json"
        assert headers["connection"] == "close"
        assert json.loads(body) == {
            "type": "about:blank",
            "title": "Content Too Large",
            "status": 413,
            "detail": "the request body exceeds 10 bytes",
        }
        assert client.at_eof()


def test_http10_closes_after_the_response() -> None:
    with serving(path_echo) as running:
        client = Client(running.port)
        client.send(b"GET /old HTTP/1.0\r\n\r\n")
        status, headers, body = client.response()
        assert (status, headers["connection"], body) == ("HTTP/1.1 200 OK", "close", b"/old")
        assert client.at_eof()


def test_http10_keep_alive_is_honoured() -> None:
    with serving(path_echo) as running:
        client = Client(running.port)
        for path in ("/a", "/b"):
            client.send(f"GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
            status, headers, body = client.response()
            assert (status, headers["connection"], body) == (
                "HTTP/1.1 200 OK",
                "keep-alive",
                path.encode(),
            )
        client.close()


def test_connection_close_is_honoured_and_later_pipelined_requests_ignored() -> None:
    calls: list[str] = []

    def handler(request: Request) -> Response:
        calls.append(request.path)
        return path_echo(request)

    with serving(handler) as running:
        client = Client(running.port)
        client.send(get("/a", "Connection: close") + get("/b"))
        status, headers, body = client.response()
        assert (status, headers["connection"], body) == ("HTTP/1.1 200 OK", "close", b"/a")
        assert client.at_eof()
        assert calls == ["/a"]


def test_oversized_head_gets_431() -> None:
    with serving(echo, max_header_bytes=1024) as running:
        client = Client(running.port)
        client.send(get("/", "X-Big: " + "x" * 2000))
        status, headers, body = client.response()
        assert status == "HTTP/1.1 431 Request Header Fields Too Large"
        assert headers["connection"] == "close"
        assert json.loads(body)["status"] == 431
        assert client.at_eof()


def test_oversized_head_sent_in_pieces_gets_431() -> None:
    with serving(echo, max_header_bytes=1024) as running:
        client = Client(running.port)
        client.send(b"GET / HTTP/1.1\r\nX-Endless: ")
        # more pieces until the server answers: it counts the head across reads, and a
        # busy server may take many pieces in one read
        deadline = time.monotonic() + HANG_S
        while not select.select([client.sock], [], [], 0.02)[0]:
            assert time.monotonic() < deadline, "an endless head was never refused"
            client.send(b"x" * 400)
        status, _, _ = client.response()
        assert status == "HTTP/1.1 431 Request Header Fields Too Large"
        assert client.at_eof()


def test_too_many_headers_gets_431() -> None:
    with serving(echo, max_headers=10) as running:
        ok = Client(running.port)
        ok.send(get("/", *(f"X-H{i}: v" for i in range(9))))
        assert ok.response()[0] == "HTTP/1.1 200 OK"
        client = Client(running.port)
        client.send(get("/", *(f"X-H{i}: v" for i in range(10))))
        status, _, body = client.response()
        assert status == "HTTP/1.1 431 Request Header Fields Too Large"
        assert json.loads(body)["title"] == "Request Header Fields Too Large"
        assert client.at_eof()


def test_oversized_declared_body_gets_413() -> None:
    with serving(echo, max_body_bytes=10) as running:
        client = Client(running.port)
        client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\n" + b"x" * 11)
        status, headers, _ = client.response()
        assert status == "HTTP/1.1 413 Request Entity Too Large"
        assert headers["connection"] == "close"
        assert client.at_eof()


def test_oversized_chunked_body_gets_413() -> None:
    with serving(echo, max_body_bytes=10) as running:
        client = Client(running.port)
        client.send(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"6\r\nxxxxxx\r\n6\r\nxxxxxx\r\n0\r\n\r\n"
        )
        status, _, body = client.response()
        assert status == "HTTP/1.1 413 Request Entity Too Large"
        assert json.loads(body)["detail"] == "the request body exceeds 10 bytes"
        assert client.at_eof()


def test_garbage_gets_400_problem() -> None:
    with serving(echo) as running:
        client = Client(running.port)
        client.send(b"HELLO THERE\r\n\r\n")
        status, headers, body = client.response()
        assert status == "HTTP/1.1 400 Bad Request"
        assert headers["content-type"] == "application/problem+json"
        assert headers["connection"] == "close"
        assert json.loads(body) == {
            "type": "about:blank",
            "title": "Bad Request",
            "status": 400,
            "detail": "malformed HTTP request: Invalid method encountered",
        }
        assert client.at_eof()


def test_upgrade_is_ignored_and_the_request_answered() -> None:
    with serving(path_echo) as running:
        client = Client(running.port)
        client.send(get("/up", "Connection: Upgrade", "Upgrade: h2c") + get("/next"))
        assert client.response()[2] == b"/up"
        assert client.response()[2] == b"/next"
        client.close()


def test_slowloris_head_is_closed_with_408_after_header_timeout() -> None:
    head = b"GET / HTTP/1.1\r\nHost: test\r\nX-Slow: "
    with serving(echo, header_timeout=0.3) as running:
        client = Client(running.port)
        started = time.monotonic()
        # one byte every 50 ms, for ever: only a deadline that the bytes do not move ends it
        deadline = started + HANG_S
        sent = 0
        while not select.select([client.sock], [], [], 0.05)[0]:
            assert time.monotonic() < deadline, "the trickled head was never timed out"
            client.send(head[sent : sent + 1] or b"a")
            sent += 1
        status, headers, body = client.response()
        assert status == "HTTP/1.1 408 Request Timeout"
        assert headers["connection"] == "close"
        assert json.loads(body)["detail"] == "the request head was not received in time"
        assert time.monotonic() - started >= 0.25  # not early (libuv rounds to ms)
        assert client.at_eof()


def test_lying_content_length_is_closed_after_body_timeout() -> None:
    with serving(echo, body_timeout=0.3) as running:
        client = Client(running.port)
        started = time.monotonic()  # before sending: the server's clock starts after this
        client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        status, _, body = client.response()
        assert status == "HTTP/1.1 408 Request Timeout"
        assert json.loads(body)["detail"] == "the body was not received in time"
        assert time.monotonic() - started >= 0.25  # not early
        assert client.at_eof()


def test_idle_keep_alive_connection_is_closed() -> None:
    with serving(path_echo, keepalive_timeout=0.3) as running:
        client = Client(running.port)
        started = time.monotonic()  # before sending: the server's idle clock starts after this
        client.send(get("/a"))
        assert client.response()[0] == "HTTP/1.1 200 OK"
        assert client.at_eof()
        assert time.monotonic() - started >= 0.25  # not early

        def forgotten() -> None:
            assert running.open_connections() == 0

        eventually(forgotten, "the closed connection no longer counted")


def test_connections_beyond_the_cap_get_503() -> None:
    with serving(path_echo, max_connections=2) as running:
        kept = [Client(running.port) for _ in range(2)]
        for client in kept:
            client.send(get("/kept"))
            assert client.response()[2] == b"/kept"
        refused = Client(running.port)
        status, headers, body = refused.response()
        assert status == "HTTP/1.1 503 Service Unavailable"
        assert headers["retry-after"] == "1"
        assert headers["connection"] == "close"
        assert json.loads(body)["status"] == 503
        assert refused.at_eof()
        assert running.open_connections() == 2
        kept[0].close()

        def one_left() -> None:
            assert running.open_connections() == 1

        eventually(one_left, "the server noticed the closed connection")
        again = Client(running.port)
        again.send(get("/again"))
        assert again.response()[2] == b"/again"


def test_head_strips_the_body_and_keeps_its_length() -> None:
    calls: list[str] = []

    def handler(request: Request) -> Response:
        calls.append(request.method)
        return Response(200, b"0123456789", "text/plain")

    with serving(handler) as running:
        client = Client(running.port)
        client.send(b"HEAD /x HTTP/1.1\r\nHost: t\r\n\r\n" + get("/y"))
        status, headers, body = client.response(head_only=True)
        assert (status, headers["content-length"], body) == ("HTTP/1.1 200 OK", "10", b"")
        assert client.response()[2] == b"0123456789"  # the next response starts right after
        assert calls == ["HEAD", "GET"]
        client.close()


def test_handler_exception_gets_500_and_the_connection_survives() -> None:
    def handler(request: Request) -> Response | Awaitable[Response]:
        if request.path == "/boom":
            raise RuntimeError("boom")
        if request.path == "/async-boom":

            async def fail() -> Response:
                raise RuntimeError("async boom")

            return fail()
        return path_echo(request)

    with serving(handler) as running:
        client = Client(running.port)
        for path in ("/boom", "/async-boom"):
            client.send(get(path))
            status, headers, body = client.response()
            assert status == "HTTP/1.1 500 Internal Server Error"
            assert headers["content-type"] == "application/problem+json"
            assert json.loads(body)["title"] == "Internal Server Error"
        client.send(get("/fine"))
        assert client.response()[2] == b"/fine"
        assert [str(error) for error in running.errors] == ["boom", "async boom"]
        client.close()


def test_client_that_does_not_read_stops_being_read() -> None:
    calls: list[str] = []
    big = b"x" * (1 << 20)

    def handler(request: Request) -> Response:
        calls.append(request.path)
        return Response(200, big, "text/plain")

    with serving(handler) as running:
        client = Client(running.port, rcvbuf=4096)
        client.send(b"".join(get(f"/{i}") for i in range(20)))

        def read() -> None:
            assert calls

        # the 20 requests arrive in one read: once it is handled the server has done all
        # it will until the client reads
        eventually(read, "the requests read")
        running.settle()
        assert len(calls) < 10  # the rest waits, unparsed or unhandled, until the client reads
        for _ in range(20):
            assert client.response()[1]["content-length"] == str(len(big))
        assert calls == [f"/{i}" for i in range(20)]
        client.close()


def test_shutdown_answers_the_in_flight_request_and_closes_everything() -> None:
    started = threading.Event()
    answer = asyncio.Event()

    def handler(request: Request) -> Response | Awaitable[Response]:
        if request.path == "/slow":

            async def slow() -> Response:
                started.set()
                await answer.wait()
                return Response(200, b"done", "text/plain")

            return slow()
        return path_echo(request)

    with serving(handler) as running:
        port = running.port
        idle = Client(port)
        idle.send(get("/idle"))
        assert idle.response()[2] == b"/idle"
        busy = Client(port)
        busy.send(get("/slow"))
        assert started.wait(HANG_S)
        # a grace far beyond any test: shutdown must return once everything is closed
        shutdown = asyncio.run_coroutine_threadsafe(
            running.server.shutdown(grace=3600), running.loop
        )
        assert idle.at_eof()  # the idle connection is closed at once
        running.release(answer)  # the in-flight request completes during the shutdown
        status, headers, body = busy.response()
        assert (status, headers["connection"], body) == ("HTTP/1.1 200 OK", "close", b"done")
        assert busy.at_eof()
        shutdown.result(HANG_S)
        assert running.open_connections() == 0
        with pytest.raises(OSError):
            Client(port).send(get("/late"))


def test_shutdown_aborts_what_remains_after_grace() -> None:
    entered = threading.Event()

    async def never(request: Request) -> Response:
        entered.set()
        await asyncio.Event().wait()  # never answers
        return Response(200)

    with serving(never) as running:
        client = Client(running.port)
        client.send(get("/never"))
        assert entered.wait(HANG_S)  # the request is in flight
        began = time.monotonic()
        # returns at all only if it aborted the connection: the handler never ends
        running.call(running.server.shutdown(grace=0.3))
        assert time.monotonic() - began >= 0.25  # not before the grace ran out
        assert running.open_connections() == 0
        assert client.at_eof()


def test_client_gone_while_its_async_response_is_pending_is_forgotten() -> None:
    entered = threading.Event()
    finished = threading.Event()
    answer = asyncio.Event()

    async def slow(request: Request) -> Response:
        entered.set()
        try:
            await answer.wait()
            return Response(200, b"late", "text/plain")
        finally:
            finished.set()  # answered, or cancelled

    with serving(slow) as running:
        client = Client(running.port)
        client.send(get("/slow"))
        assert entered.wait(HANG_S)  # the response is pending
        client.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        client.close()  # a reset

        def forgotten() -> None:
            assert running.open_connections() == 0

        eventually(forgotten, "the reset connection no longer counted")
        running.release(answer)  # a handler still running answers now, to nobody
        assert finished.wait(HANG_S)
        running.settle()  # and what its end set off on the loop has run
        assert running.errors == []


def test_problem_document_shape() -> None:
    response = problem(
        429,
        "Too Many Requests",
        "bucket k is empty",
        type_="quota-exceeded",
        field="tokens",
        extra={"retry_after": 1.5},
        headers=[("Retry-After", "2")],
    )
    assert response.status == 429
    assert response.content_type == "application/problem+json"
    assert response.headers == [("Retry-After", "2")]
    assert json.loads(response.body) == {
        "type": "quota-exceeded",
        "title": "Too Many Requests",
        "status": 429,
        "detail": "bucket k is empty",
        "field": "tokens",
        "retry_after": 1.5,
    }


def test_handler_headers_are_written_and_framing_stays_the_servers() -> None:
    def handler(request: Request) -> Response:
        return Response(
            429,
            b"{}",
            headers=[("RateLimit", '"k";r=0;t=2'), ("Content-Length", "999")],
        )

    with serving(handler) as running:
        client = Client(running.port)
        client.send(get("/"))
        status, headers, body = client.response()
        assert status == "HTTP/1.1 429 Too Many Requests"
        assert headers["ratelimit"] == '"k";r=0;t=2'
        assert headers["content-length"] == "2"
        assert body == b"{}"
        client.close()


def test_handler_asking_to_close_closes_and_a_broken_response_gets_500() -> None:
    def handler(request: Request) -> Response:
        if request.path == "/bye":
            return Response(200, b"bye", "text/plain", [("Connection", "close")])
        return Response(200, b"x", "text/plain", [("X-Injected", "a\r\nSet-Cookie: evil=1")])

    with serving(handler) as running:
        client = Client(running.port)
        client.send(get("/injected"))
        status, headers, _ = client.response()
        assert status == "HTTP/1.1 500 Internal Server Error"
        assert "set-cookie" not in headers
        assert [type(error) for error in running.errors] == [ValueError]
        client.send(get("/bye"))
        status, headers, body = client.response()
        assert (status, headers["connection"], body) == ("HTTP/1.1 200 OK", "close", b"bye")
        assert client.at_eof()


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"ServerLimits\.max_headers must be positive"):
        ServerLimits(max_headers=0)


def test_header_values_and_the_target_are_decoded_as_utf8_alike() -> None:
    # U+2011 (non-breaking hyphen) typed in a header, percent-escaped in the path (as
    # curl sends a path) and raw in the query (as curl sends a query): one string
    # everywhere, never Latin-1 mojibake (the header read "my\xe2\x80\x91agent") and
    # never llhttp's 400 "Invalid char in url query".
    typed = "my\u2011agent"
    with serving(echo) as running:
        client = Client(running.port)
        for target in (
            f"/v1/buckets/my%e2%80%91agent?key={typed}",
            f"/v1/buckets/{typed}?key={typed}",
        ):
            client.send(
                f"GET {target} HTTP/1.1\r\nHost: test\r\nX-API-Key: {typed}\r\n\r\n".encode()
            )
            status, _, body = client.response()
            assert status == "HTTP/1.1 200 OK", body
            document = json.loads(body)
            assert document["headers"]["x-api-key"] == typed
            assert document["path"] == f"/v1/buckets/{typed}"
            assert document["query"] == {"key": typed}
        # a request line split across reads, raw bytes after the split too
        raw = f"GET /v1/buckets/{typed}?key={typed} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
        client.send(raw[:20])
        running.settle()
        client.send(raw[20:])
        status, _, body = client.response()
        assert json.loads(body)["query"] == {"key": typed}
        client.close()


@pytest.mark.parametrize(
    ("request_head", "field", "detail"),
    [
        (
            b"GET / HTTP/1.1\r\nHost: t\r\nX-API-Key: my\xe2agent\r\n\r\n",
            "X-API-Key",
            "header X-API-Key is not UTF-8 text; send its value encoded as UTF-8",
        ),
        (
            b"GET /?key=my%E2agent HTTP/1.1\r\nHost: t\r\n\r\n",
            "key",
            "query parameter key has percent-escapes that are not UTF-8",
        ),
        (
            b"GET /my%FF HTTP/1.1\r\nHost: t\r\n\r\n",
            None,
            "the request path has percent-escapes that are not UTF-8",
        ),
        (
            b"GET /my\xff HTTP/1.1\r\nHost: t\r\n\r\n",
            None,
            "the request path has percent-escapes that are not UTF-8",
        ),
    ],
)
def test_bytes_that_are_not_utf8_get_a_400_naming_where(
    request_head: bytes, field: str | None, detail: str
) -> None:
    with serving(echo) as running:
        client = Client(running.port)
        client.send(request_head)
        status, headers, body = client.response()
        assert status == "HTTP/1.1 400 Bad Request"
        assert headers["content-type"] == "application/problem+json"
        document = json.loads(body)
        assert document["detail"] == detail
        assert document.get("field") == field
        assert client.at_eof()
        assert running.errors == []


def test_shutdown_does_not_wait_for_a_client_that_keeps_a_closed_connection_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # After a Connection: close answer the server lingers, reading what the client
    # still sends; a shutdown must not wait for that (run --single took 1.6 s to
    # exit on Ctrl-C). A linger longer than any test shows the difference without
    # measuring time: shutdown returns only if it does not wait for it.
    monkeypatch.setattr("bucketmesh.http.server._LINGER_SECONDS", 3600.0)
    with serving(path_echo) as running:
        lingering = Client(running.port)
        lingering.send(get("/bye", "Connection: close"))
        status, headers, body = lingering.response()
        assert (status, headers["connection"], body) == ("HTTP/1.1 200 OK", "close", b"/bye")
        assert running.open_connections() == 1
        running.call(running.server.shutdown(grace=3600))
        assert running.open_connections() == 0
        assert lingering.at_eof()  # the client never closed its end


def _shed_mix() -> bytes:
    """Pipelined requests, in one write: decision requests the fast shed path answers
    unparsed, reserved ones it leaves to the parser, and requests after those."""
    body = b'{"key": "k"}'
    return b"".join(
        [
            get("/v1/rate?user=a"),
            b"POST /v1/rate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
            get("/v1/status"),
            get("/v1/rate?user=b"),
            b"POST /v1/rate HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n",
            b"PATCH /v1/buckets/x HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\n{}",
            get("/v1/sync/deltas"),
            get("/v1/rate?user=c", "Connection: close"),
        ]
    )


def _force_shedding(running: Running, on: bool) -> None:
    """Make the server shed as a lagging loop does (its lag timer overdue), or stop."""

    async def switch() -> None:
        server = running.server
        if server._lag_timer is not None:
            server._lag_timer.cancel()
            server._lag_timer = None
        if on:
            server._lag_due = float("-inf")  # overdue for ever: every read is shed
        else:
            server._lag_due = asyncio.get_running_loop().time()
            server._tick_lag()

    running.call(switch())


def test_while_shedding_pipelined_requests_get_503_in_order_unparsed_or_parsed_alike() -> None:
    """The fast shed path (503 without the parser) answers exactly what the parsed path
    answers, in the same order: reserved requests (status, sync, PATCH) still reach the
    handler, a request it does not follow (chunked) is shed by the parsed path."""
    answers: dict[bool, list[tuple[str, dict[str, str], bytes]]] = {}
    unparsed: dict[bool, int] = {}
    for fast in (True, False):
        with serving(path_echo) as running:
            running.server._fast_shed = fast
            _force_shedding(running, True)
            client = Client(running.port)
            client.send(_shed_mix())
            answers[fast] = [client.response() for _ in range(8)]
            assert client.at_eof()  # the last one asked to close
            unparsed[fast] = running.server.shed_unparsed
            _force_shedding(running, False)
            again = Client(running.port)
            again.send(get("/v1/rate"))
            assert again.response()[2] == b"/v1/rate"  # not shedding any more
            again.close()
    statuses = [status.split()[1] for status, _, _ in answers[True]]
    assert statuses == ["503", "503", "200", "503", "503", "200", "200", "503"], answers[True]
    for status, headers, body in answers[True]:
        if status.split()[1] == "503":
            assert headers["retry-after"] == "1"
            assert headers["content-type"] == "application/problem+json"
            assert json.loads(body)["status"] == 503
    assert [b for _, _, b in answers[True] if b[:1] == b"/"] == [
        b"/v1/status",
        b"/v1/buckets/x",
        b"/v1/sync/deltas",
    ]

    def without_date(
        answer: list[tuple[str, dict[str, str], bytes]],
    ) -> list[tuple[str, dict[str, str], bytes]]:
        return [(s, {k: v for k, v in h.items() if k != "date"}, b) for s, h, b in answer]

    assert without_date(answers[True]) == without_date(answers[False])
    assert unparsed[True] >= 1 and unparsed[False] == 0, unparsed


_SHED_LINES = st.sampled_from(
    [
        f"{method} {target} {version}"
        for method in ("GET", "POST", "HEAD", "PATCH")
        for target in ("/v1/rate", "/v1/rate?user=a%41", "/v1/status", "/v1/sync/deltas")
        for version in ("HTTP/1.1", "HTTP/1.0")
    ]
)
_SHED_HEADERS = st.lists(
    st.sampled_from(
        [
            "Host: t",
            "X-API-Key: k1",
            "x-tab:\tv ",
            "Content-Type: application/json",
            "Connection: close",
            "Connection: keep-alive",
            "Expect: 100-continue",
            "Content-Length: 3",
            "content-length:  2 ",
            "Transfer-Encoding: chunked",
            "Bad Header: x",
        ]
    ),
    max_size=4,
)


@st.composite
def _shed_inputs(draw: st.DrawFn) -> bytes:
    """Pipelined requests, well formed or not, possibly cut short."""
    out = b""
    for _ in range(draw(st.integers(1, 6))):
        headers = draw(_SHED_HEADERS)
        head = "\r\n".join([draw(_SHED_LINES), *headers]).encode() + b"\r\n\r\n"
        lowered = [h.lower() for h in headers]
        if "transfer-encoding: chunked" in lowered:
            head += b"3\r\nabc\r\n0\r\n\r\n"
        elif any(h.startswith("content-length") for h in lowered):
            lengths = [int(h.split(":")[1]) for h in lowered if h.startswith("content-length")]
            head += b"abc"[: lengths[-1]]
        out += head
    cut = draw(st.integers(0, len(out)))
    return out[: len(out) - cut] if draw(st.booleans()) else out


def _answers(running: Running, data: bytes, fast: bool) -> bytes:
    """Everything the server sends for ``data`` (then end of input), Date lines removed."""

    async def mode() -> None:
        running.server._fast_shed = fast

    running.call(mode())
    with socket.create_connection(("127.0.0.1", running.port), timeout=HANG_S) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return re.sub(rb"Date: [^\r]*\r\n", b"", received)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_shed_inputs())
def test_the_fast_shed_path_answers_any_input_as_the_parser_does(data: bytes) -> None:
    """Whatever arrives while the node sheds (well formed, malformed, cut short,
    reserved or not), the fast path's answers are byte for byte the parser's."""
    with serving(path_echo) as running:
        _force_shedding(running, True)
        assert _answers(running, data, True) == _answers(running, data, False)
