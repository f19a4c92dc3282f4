"""The server's inlined hot path (``_Connection.on_message_complete`` answering a plain
keep-alive HTTP/1.1 request itself) and its general path (``_dispatch``, ``_deliver``)
answer any input byte for byte alike: the reference run forces every request through
the general path (``_plain`` always false), on real sockets."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_http11 import HANG_S, serving

from bucketmesh.http import server as server_module
from bucketmesh.http.server import Request, Response

pytestmark = pytest.mark.timeout(300)


def _echo(request: Request) -> bytes:
    headers = ";".join(f"{k}={v}" for k, v in sorted(request.headers.items()))
    query = ";".join(f"{k}={v}" for k, v in sorted(request.query.items()))
    return (
        f"{request.method} {request.path} ?{query} {request.http_version} [{headers}] ".encode()
        + request.body
    )


def handler(request: Request) -> Response | asyncio.Future[Response]:
    """Answers in every shape a handler may: encoded header lines, header pairs, later,
    by raising, asking to close, with a bytearray body, with 204, with a non-Response."""
    path = request.path
    body = _echo(request)
    if path == "/pairs":
        return Response(200, body, "text/plain", [("X-A", "1")])
    if path == "/later":

        async def later() -> Response:
            return Response(200, body, "text/plain", None, b"Content-Type: text/plain\r\n")

        return later()  # type: ignore[return-value]
    if path == "/raise":
        raise RuntimeError("handler failure (expected by the test)")
    if path == "/close":
        return Response(200, body, "text/plain", [("Connection", "close")])
    if path == "/bytearray":
        return Response(200, bytearray(body), "text/plain", None, b"X-B: 2\r\n")  # type: ignore[arg-type]
    if path == "/empty":
        return Response(204, b"", "text/plain", None, b"X-C: 3\r\n")
    if path == "/weird":
        return "not a response"  # type: ignore[return-value]
    if path == "/teapot":
        return Response(418, body, "text/plain", None, b"Content-Type: text/plain\r\n")
    return Response(200, body, "text/plain", None, b"Content-Type: text/plain\r\n")


_LINES = st.sampled_from(
    [
        f"{method} {target} {version}"
        for method in ("GET", "POST", "HEAD")
        for target in (
            "/v1/rate",
            "/v1/rate?key=a%41",
            "/pairs",
            "/raise",
            "/close",
            "/bytearray",
            "/empty",
            "/weird",
            "/teapot",
        )
        for version in ("HTTP/1.1", "HTTP/1.1", "HTTP/1.0")
    ]
)
_HEADERS = st.lists(
    st.sampled_from(
        [
            "Host: t",
            "X-API-Key: k1",
            "x-api-key: k2",
            "x-tab:\tv ",
            "Content-Type: application/json",
            "Connection: close",
            "Connection: keep-alive",
            "Expect: 100-continue",
            "Content-Length: 3",
            "Transfer-Encoding: chunked",
            "Bad Header: x",
        ]
    ),
    max_size=4,
)


@st.composite
def _inputs(draw: st.DrawFn) -> bytes:
    """Pipelined requests, well formed or not, possibly cut short. (Not ``/later``: whether
    its answer is written before or after the client's end of input arrives decides its
    ``Connection: close``, on either path; ``test_answers_awaited_...`` covers it.)"""
    out = b""
    for _ in range(draw(st.integers(1, 6))):
        headers = draw(_HEADERS)
        head = "\r\n".join([draw(_LINES), *headers]).encode() + b"\r\n\r\n"
        lowered = [h.lower() for h in headers]
        if "transfer-encoding: chunked" in lowered:
            head += b"3\r\nabc\r\n0\r\n\r\n"
        elif "content-length: 3" in lowered:
            head += b"abc"
        out += head
    cut = draw(st.integers(0, len(out)))
    return out[: len(out) - cut] if draw(st.booleans()) else out


class _General(server_module._Connection):
    """A connection of the reference server takes the general path for every request."""

    __slots__ = ()
    reference: server_module.HttpServer | None = None

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self._server is _General.reference:
            self._plain = False


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[int, int]]:
    original = server_module._Connection
    server_module._Connection = _General  # type: ignore[misc]
    try:
        with serving(handler) as hot, serving(handler) as general:
            _General.reference = general.server
            yield hot.port, general.port
    finally:
        server_module._Connection = original  # type: ignore[misc]
        _General.reference = None


def _answers(port: int, data: bytes) -> bytes:
    """Everything the server sends for ``data`` (then end of input), Date lines removed."""
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_S) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return re.sub(rb"Date: [^\r]*\r\n", b"", received)


def test_the_general_path_is_taken_by_the_reference_server(servers: tuple[int, int]) -> None:
    """The patch holds (the class is looked up when a connection is made)."""
    assert server_module._Connection is _General and _General.reference is not None
    request = b"GET /v1/rate HTTP/1.1\r\nHost: t\r\n\r\n"
    assert _answers(servers[0], request) == _answers(servers[1], request)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_inputs())
def test_the_hot_path_answers_any_input_as_the_general_path_does(
    servers: tuple[int, int], data: bytes
) -> None:
    hot, general = servers
    assert _answers(hot, data) == _answers(general, data)


def test_answers_awaited_among_plain_ones_keep_their_order_on_both_paths(
    servers: tuple[int, int],
) -> None:
    """A later answer queues the plain ones behind it; the last request closes."""
    data = (
        b"GET /v1/rate HTTP/1.1\r\nX-API-Key: a\r\n\r\n"
        b"POST /later HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /v1/rate?key=b HTTP/1.1\r\n\r\n"
        b"GET /later HTTP/1.1\r\n\r\n"
        b"GET /close HTTP/1.1\r\n\r\n"
    )

    def answers(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=HANG_S) as sock:
            sock.sendall(data)  # no end of input: the last answer closes
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        return re.sub(rb"Date: [^\r]*\r\n", b"", received)

    hot, general = answers(servers[0]), answers(servers[1])
    assert hot == general
    assert hot.count(b"HTTP/1.1 200 OK") == 5 and hot.index(b"POST /later") < hot.index(b"key=b")
