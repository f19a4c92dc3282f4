"""The compiled HTTP server and its pure-Python source answer alike.

``make install`` compiles ``http/server.py`` with Cython (``_native.CYTHONIZED``; the
types of its connection's fields in ``http/server.pxd``). The source stays the
reference: ``BUCKETMESH_PURE=1`` runs it, and here Hypothesis sends the same bytes —
pipelined requests, malformed ones, chunked and Content-Length bodies, heads and bodies
beyond the limits, keep-alive and close, HTTP/1.0, cut short — to the compiled server in
this process and to the pure one in a worker process, on real sockets, and requires every
answer to be byte for byte the same (Date lines aside). Also: the build is what
``_native`` says, ``BUCKETMESH_PURE=1`` loads the source, a stale build is never used."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_http11 import HANG_S, serving
from test_http_dispatch_paths import handler

from bucketmesh import _native
from bucketmesh.http import server as server_module

pytestmark = pytest.mark.timeout(300)

needs_compiled = pytest.mark.skipif(
    not _native.compiled_http(),
    reason="the pure HTTP server runs here (BUCKETMESH_PURE=1, or no Cython): nothing to compare",
)

# small limits, so that generated input reaches them: 431, 413
LIMITS: dict[str, float] = {
    "max_header_bytes": 400,
    "max_headers": 8,
    "max_body_bytes": 48,
    "shed_lag": 3600.0,  # no lag shedding: a loaded machine must not change an answer
}
_TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[int, int]]:
    """(the compiled server's port, in this process; the pure one's, in a worker)."""
    env = {**os.environ, _native.PURE_ENV: "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_TESTS), env.get("PYTHONPATH")]))
    worker = subprocess.Popen(
        [sys.executable, str(_TESTS / "http_reference_server.py"), json.dumps(LIMITS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert worker.stdin is not None and worker.stdout is not None
    try:
        port, module_file = worker.stdout.readline().split()
        assert module_file.endswith("server.py"), module_file  # the reference: the source
        with serving(handler, **LIMITS) as compiled:
            yield compiled.port, int(port)
    finally:
        worker.stdin.close()
        try:
            worker.wait(HANG_S)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _answers(port: int, data: bytes) -> bytes:
    """Everything the server sends for ``data`` (then end of input), Date lines removed."""
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_S) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return re.sub(rb"Date: [^\r]*\r\n", b"", received)


_LINES = st.sampled_from(
    [
        f"{method} {target} {version}".encode()
        for method in ("GET", "POST", "HEAD", "PUT")
        for target in (
            "/v1/rate",
            "/v1/rate?key=a%41&key=b",
            "/pairs",
            "/raise",
            "/close",
            "/bytearray",
            "/empty",
            "/weird",
            "/teapot",
            "/p%FFq",
            "http://h/abs?x=1",
        )
        for version in ("HTTP/1.1", "HTTP/1.1", "HTTP/1.0")
    ]
    + [b"CONNECT h:1 HTTP/1.1", b"GET /v1/rate HTTP/2.0", b"G@T / HTTP/1.1", b"GET /x HTTP/1.1x"]
)
# well-formed header lines (most requests), and ones that break a request
_CLEAN = [
    b"Host: t",
    b"X-API-Key: k1",
    b"x-api-key: k2",
    b"x-tab:\tv ",
    b"Content-Type: application/json",
    b"Connection: close",
    b"Connection: keep-alive",
    b"Expect: 100-continue",
]
_BROKEN = [
    b"Connection: Upgrade",
    b"Upgrade: websocket",
    b"Content-Length: x",
    b"Content-Length: 99999999999999999999999",
    b"Bad Header: x",
    b"X-Bytes: \xff\xfe",
    b"X-Long: " + b"v" * 300,
    *(b"X-N%d: n" % n for n in range(9)),
]
_HEADERS = st.one_of(
    st.lists(st.sampled_from(_CLEAN), max_size=4),
    st.lists(st.sampled_from(_CLEAN + _BROKEN), max_size=10),
)
# how the body is framed: none, Content-Length (within the limit or beyond), chunked
# (one chunk, two with an extension, a malformed size, one beyond the limit)
_FRAMING = st.sampled_from(
    [
        (b"", b""),
        (b"Content-Length: 3", b"abc"),
        (b"Content-Length: 99", b"b" * 99),
        (b"Transfer-Encoding: chunked", b"3\r\nabc\r\n0\r\n\r\n"),
        (b"Transfer-Encoding: chunked", b"2\r\nab\r\n1;x=y\r\nc\r\n0\r\n\r\n"),
        (b"Transfer-Encoding: chunked", b"zz\r\n"),
        (b"Transfer-Encoding: chunked", b"40\r\n" + b"a" * 64 + b"\r\n0\r\n\r\n"),
    ]
)


@st.composite
def _inputs(draw: st.DrawFn) -> bytes:
    """Pipelined requests, well formed or not, possibly cut short (not ``/later``: when
    its answer is written against the client's end of input is a race on either build)."""
    out = b""
    for _ in range(draw(st.integers(1, 5))):
        headers = draw(_HEADERS)
        framing, body = draw(_FRAMING)
        if framing:
            headers = [*headers, framing]
        out += b"\r\n".join([draw(_LINES), *headers]) + b"\r\n\r\n" + body
    cut = draw(st.integers(0, len(out)))
    return out[: len(out) - cut] if draw(st.booleans()) else out


@needs_compiled
def test_the_server_is_compiled_with_its_fields_typed() -> None:
    """The build ran: the module is an extension module and the connection an extension
    type (its fields C slots, not a ``__dict__`` or Python ``__slots__``)."""
    assert not (server_module.__file__ or "").endswith(".py")
    # a static type (no Py_TPFLAGS_HEAPTYPE): made by the build, not by a class statement
    assert server_module._Connection.__flags__ & (1 << 9) == 0
    # its header limits are C integers: a float is refused, as no code of server.py sets one
    connection = server_module._Connection(server_module.HttpServer(handler), None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        connection._head_room = 1.5  # type: ignore[assignment]


@needs_compiled
def test_the_rate_callback_is_compiled_with_its_fields_typed() -> None:
    """api/hot.py (POST /v1/rate's simple case in one call) is built too: an extension
    module, RateHot an extension type with typed fields. That it answers as the pure
    path does: tests/test_rate_fast_path.py."""
    from bucketmesh.api import hot

    assert not (hot.__file__ or "").endswith(".py")
    assert hot.RateHot.__flags__ & (1 << 9) == 0  # a static type, made by the build
    assert _native.stale() == []


@needs_compiled
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_inputs())
def test_the_compiled_server_answers_any_input_as_the_pure_one(
    servers: tuple[int, int], data: bytes
) -> None:
    compiled, pure = servers
    assert _answers(compiled, data) == _answers(pure, data)


@needs_compiled
def test_hot_requests_pipelined_answer_alike(servers: tuple[int, int]) -> None:
    """Many plain keep-alive requests in one read (wrk's, pipelined), then a close."""
    one = (
        b"POST /v1/rate HTTP/1.1\r\nHost: t\r\nX-API-Key: bench\r\n"
        b"Content-Type: application/json\r\nContent-Length: 12\r\n\r\n" + b'{"tokens":1}'
    )
    data = one * 50 + b"GET /close HTTP/1.1\r\n\r\n"
    compiled = _answers(servers[0], data)
    assert compiled == _answers(servers[1], data)
    assert compiled.count(b"HTTP/1.1 200 OK") == 51


def test_the_build_is_what_native_says() -> None:
    """``compiled_http()`` tells which server runs; ``BUCKETMESH_PURE=1`` loads its source
    even where the build is installed."""
    assert _native.compiled_http() == (not (server_module.__file__ or "").endswith(".py"))
    if os.environ.get(_native.PURE_ENV, "") not in ("", "0"):
        assert not _native.compiled_http()
    code = "from bucketmesh import _native; print(_native.compiled_http())"
    env = {**os.environ, _native.PURE_ENV: "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False"]
