"""Answers that come later (a store deciding in Redis) answer exactly as before.

A decider that answers with a bare future (the Redis backend) has its answer chained by
done callbacks: ``RatingApp._answer`` renders it (``_rendered``), the Router counts it,
the server writes it (``_on_response_done``), with no task and no coroutine. The
reference is the general path every other awaitable takes: a coroutine awaited in a
task (``RatingApp._later``, ``Router._finish_awaited``, the server's task). Both must put
the same bytes on the wire in the same order, pipelined among answers given at once, for
grants, refusals, a store's LimiterError (problem+json naming the field), a store that
fails (500, reported) or whose future is cancelled (500), and count the same.

On real processes: a ``bucketmesh serve`` node on a real redis-server answers a pipelined
program as a memory node does (the same bytes, but for the times in them).
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ServerFactory, eventually, make_config
from test_http11 import HANG_S, Running, serving
from test_rate_fast_path import RULES, Clock, counts

from bucketmesh.api.routes import RatingApp
from bucketmesh.core.limiter import Limiter
from bucketmesh.http.router import Router
from bucketmesh.storage.memory import MemoryStore
from bucketmesh.telemetry.metrics import NodeMetrics

pytestmark = pytest.mark.timeout(300)

BOOM = "boom"  # the store fails this key's decision (a bug: 500, reported)
CANCEL = "cancel"  # the store cancels this key's future (500, not reported)


def _rate(key: str, tokens: int | None = None, close: bool = False) -> bytes:
    body = b"" if tokens is None else b'{"tokens":%d}' % tokens
    head = f"POST /v1/rate HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\n"
    if body:
        head += "Content-Type: application/json\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body


# grants, a refusal (capacity 5), tokens above the capacity (400 naming "tokens"), a
# store failure and a cancelled decision, answers given at once among them (/healthz, an
# unknown route), and the last request closes the connection
PROGRAM = (
    _rate("a")
    + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    + _rate("a", 4)
    + _rate("a")
    + _rate("b", 9)
    + _rate(BOOM)
    + b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n"
    + _rate(CANCEL)
    + _rate("b", 2)
    + _rate("c", 0)
    + _rate("a", close=True)
)


def later_app(awaited: bool) -> tuple[RatingApp, list[Any]]:
    """An app whose store decides at once (a fixed clock: both apps decide alike) and
    answers later: through a bare future resolved on the next loop turn, or (the
    reference, ``awaited``) through a coroutine awaiting such a future. Also: the task
    each grant was rendered in."""
    limiter = Limiter(RULES, replica_id="r1", clock=Clock())
    store = MemoryStore(limiter)
    rendered_in: list[Any] = []

    def acquire(key: str, tokens: int = 1, *, rule: str | None = None) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if key == f"k-{CANCEL}":
            loop.call_soon(future.cancel)
        elif key == f"k-{BOOM}":
            loop.call_soon(future.set_exception, RuntimeError("store failure (expected)"))
        else:
            try:
                loop.call_soon(future.set_result, limiter.acquire(key, tokens, rule=rule))
            except Exception as error:  # a LimiterError, answered later
                loop.call_soon(future.set_exception, error)
        if not awaited:
            return future

        async def decision() -> Any:
            return await future

        return decision()

    store.acquire = acquire  # type: ignore[method-assign]
    app = RatingApp(
        store, region="eu", node="n1", router=Router(NodeMetrics()), monotonic=lambda: 5.0
    )
    granted = app.renderer.granted

    def recording_granted(decision: Any) -> Any:
        rendered_in.append(asyncio.current_task())
        return granted(decision)

    app.renderer.granted = recording_granted  # type: ignore[method-assign]
    return app, rendered_in


def _received(port: int, data: bytes) -> bytes:
    """Everything the server sends for ``data`` until it closes, Date lines removed."""
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_S) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return re.sub(rb"Date: [^\r]*\r\n", b"", received)


@pytest.fixture
def two_servers() -> Iterator[tuple[tuple[Running, RatingApp, list[Any]], ...]]:
    bare, bare_rendered = later_app(awaited=False)
    reference, reference_rendered = later_app(awaited=True)
    with serving(bare) as bare_server, serving(reference) as reference_server:
        yield (
            (bare_server, bare, bare_rendered),
            (reference_server, reference, reference_rendered),
        )


def test_a_bare_future_answers_pipelined_requests_as_the_awaited_path_does(
    two_servers: tuple[tuple[Running, RatingApp, list[Any]], ...],
) -> None:
    (bare_server, bare, _), (reference_server, reference, _) = two_servers
    got = _received(bare_server.server.port, PROGRAM)
    expected = _received(reference_server.server.port, PROGRAM)
    assert got == expected
    statuses = re.findall(rb"HTTP/1\.1 (\d+) ", got)
    assert b" ".join(statuses) == b"200 200 200 429 400 500 404 500 200 200 429"
    assert b'"field":"tokens"' in got and got.endswith(b"}") and b"Connection: close" in got
    assert counts(bare) == counts(reference)
    # the store's failure is reported once on either path; a cancellation is not
    assert [str(e) for e in bare_server.errors] == ["store failure (expected)"]
    assert [str(e) for e in reference_server.errors] == ["store failure (expected)"]


def test_a_bare_future_is_answered_without_a_task(
    two_servers: tuple[tuple[Running, RatingApp, list[Any]], ...],
) -> None:
    """The reference renders each grant inside the task awaiting it; the bare future's
    answer is rendered in a plain done callback (fails before the chained path: every
    later answer was awaited in a task)."""
    (bare_server, _, bare_rendered), (reference_server, _, reference_rendered) = two_servers
    _received(bare_server.server.port, PROGRAM)
    _received(reference_server.server.port, PROGRAM)
    assert len(bare_rendered) == len(reference_rendered) == 4
    assert all(task is not None for task in reference_rendered)
    assert bare_rendered == [None] * 4


def test_a_lost_connection_cancels_a_bare_futures_answer(
    two_servers: tuple[tuple[Running, RatingApp, list[Any]], ...],
) -> None:
    """A client that sends and hangs up at once: nothing is written to it, the in-flight
    count returns to zero, the connection is forgotten and the next client is served."""
    (bare_server, _, _), _ = two_servers
    server = bare_server.server
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", server.port), timeout=HANG_S) as sock:
            sock.sendall(_rate("z") * 3)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert re.match(rb"HTTP/1\.1 200 ", _received(server.port, _rate("y", close=True)))
    eventually(lambda: (server._in_flight, server.open_connections) == (0, 0), "all settled")
    assert bare_server.errors == []


# -- real processes: a redis node answers as a memory node does ---------------------------

_TIMES = re.compile(
    rb'("retry_after":|"reset_after":)[-0-9.e+]+|(;t=)\d+|(Retry-After: )\d+'
    rb"|(Content-Length: )\d+|(retry after )[0-9.]+"
)


def _untimed(data: bytes) -> bytes:
    """``data`` without the figures that depend on the instant of the decision."""
    return _TIMES.sub(lambda m: b"".join(g for g in m.groups() if g) + b"#", data)


def test_a_redis_node_answers_a_pipelined_program_as_a_memory_node_does(
    serve: ServerFactory, redis_server: Any
) -> None:
    buckets = [
        {"name": "k", "key": "k-{{ .Request.Header.X-API-Key }}", "capacity": 5},
        {"name": "q", "key": "q-{{ .Request.Query.q }}", "capacity": 2},
    ]
    for bucket in buckets:
        bucket["refillRate"] = 0.001  # nothing refills while the test runs
    program = (
        _rate("a")
        + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
        + _rate("a", 4)
        + _rate("a")
        + _rate("b", 9)
        + b"POST /v1/rate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        + b'Content-Length: 27\r\n\r\n{"key":"k-x","rule":"nope"}'
        + b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n"
        + _rate("b", 2)
        + b"GET /v1/rate?key=q-1&tokens=2 HTTP/1.1\r\nHost: t\r\n\r\n"
        + _rate("c", 0)
        + b"GET /v1/rate?key=q-1 HTTP/1.1\r\nHost: t\r\n\r\n"
        + _rate("a", close=True)
    )
    memory = serve(make_config(buckets), node="memory")
    redis = serve(
        make_config(
            buckets,
            storage={"backend": "redis", "redisUrl": redis_server.url, "redisTimeoutMs": 3000},
        ),
        node="redis",
    )
    got = _received(redis.port, program)
    expected = _received(memory.port, program)
    assert _untimed(got) == _untimed(expected)
    statuses = re.findall(rb"HTTP/1\.1 (\d+) ", got)
    assert b" ".join(statuses) == b"200 200 200 429 400 400 404 200 200 200 429 429"
