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

The server calls ``Router.hot`` (``api/hot.py``) instead of the router: a later
``POST /v1/rate`` decision is answered there by one ``LaterRate`` (render, count, write
through the server's ``Later``), the Redis backend handing it the decision straight from
the reply's callback (``acquire_into``), with no future and no loop turn per hop. The
reference is the chain above, through the ``Router`` itself (``router.hot`` unset:
``rate_post``, ``_answer``, ``_rendered``, ``DecisionRenderer``). Hypothesis programs of
pipelined requests — grants, refusals, a store's LimiterError, failures, cancellations,
HEAD, HTTP/1.0, answers given at once among them — go to both, on a store answering
later in memory and on a real redis-server (and one that dies mid-program): the same
bytes, the same counts.
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_http11 import HANG_S, Running, serving
from test_rate_fast_path import RULES, Clock, counts

from bucketmesh.api.hot import LaterRate
from bucketmesh.api.routes import RatingApp
from bucketmesh.core.limiter import Limiter
from bucketmesh.core.rules import Rule
from bucketmesh.http.router import Router
from bucketmesh.http.server import HttpServer, Later, Request, _Connection
from bucketmesh.storage.memory import MemoryStore
from bucketmesh.storage.redis_backend import RedisBackend
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


# -- the compiled later answer (api/hot.py LaterRate) against the Router's chain ---------


class Switch:
    """The server's handler, served by the app set last: the server reads ``hot`` once
    per connection, so each new connection takes the app at hand (its ``hot``: the
    compiled later path; None: the Router's own, the reference)."""

    def __init__(self) -> None:
        self.app: RatingApp | None = None
        self.hot: Any = None

    def use(self, app: RatingApp, hot: bool) -> None:
        self.app = app
        self.hot = app.router.hot if hot else None

    def __call__(self, request: Request) -> Any:
        assert self.app is not None
        return self.app.router(request)


def _request(line: str, key: str | None, tokens: int | None, extra: str = "") -> bytes:
    body = b"" if tokens is None else b'{"tokens":%d}' % tokens
    head = f"{line}\r\nHost: t\r\n"
    if key is not None:
        head += f"X-API-Key: {key}\r\n"
    if body:
        head += "Content-Type: application/json\r\n"
    return (head + extra).encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body


def requests_of(keys: list[str]) -> st.SearchStrategy[bytes]:
    """One pipelined request: mostly ``POST /v1/rate`` of ``keys`` (grants until the
    bucket is empty, then refusals; tokens above the capacity, a LimiterError; no
    key, the router's), among HTTP/1.0 ones kept alive, HEADs and answers given at once."""
    key = st.sampled_from(keys)
    tokens = st.sampled_from([None, 1, 1, 1, 0, 2, 4, 9])
    return st.one_of(
        st.builds(lambda k, n: _request("POST /v1/rate HTTP/1.1", k, n), key, tokens),
        st.builds(lambda k, n: _request("POST /v1/rate HTTP/1.1", k, n), key, tokens),
        st.builds(lambda k, n: _request("POST /rate HTTP/1.1", k, n), key, tokens),
        st.builds(
            lambda k, n: _request("POST /v1/rate HTTP/1.0", k, n, "Connection: keep-alive\r\n"),
            key,
            tokens,
        ),
        st.builds(lambda n: _request("POST /v1/rate HTTP/1.1", None, n), tokens),
        st.builds(lambda k: _request("HEAD /v1/rate?key=k-" + k + " HTTP/1.1", None, None), key),
        st.builds(lambda k: _request("GET /v1/rate?key=k-" + k + " HTTP/1.1", None, None), key),
        st.just(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"),
        st.just(b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n"),
    )


def _closing(key: str, http10: bool) -> bytes:
    if http10:  # an HTTP/1.0 request without keep-alive: its answer closes the connection
        return _request("POST /v1/rate HTTP/1.0", key, None)
    return _request("POST /v1/rate HTTP/1.1", key, None, "Connection: close\r\n")


async def _barrier(durable: bool) -> bool:
    await asyncio.sleep(0)
    return durable


@pytest.fixture(scope="module")
def switched() -> Iterator[tuple[Switch, Running]]:
    switch = Switch()
    with serving(switch) as running:
        yield switch, running


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    program=st.lists(requests_of(["a", "b", "c", BOOM, CANCEL]), min_size=1, max_size=14),
    last=st.sampled_from(["a", "b", BOOM, CANCEL]),
    http10=st.booleans(),
    durable=st.sampled_from([None, None, True, False]),
)
def test_the_compiled_later_answer_is_the_routers_chain_in_memory(
    switched: tuple[Switch, Running],
    program: list[bytes],
    last: str,
    http10: bool,
    durable: bool | None,
) -> None:
    """A store answering later (a bare future, resolved on the next loop turn): the
    compiled path (``RateHot`` -> ``LaterRate`` -> ``Later``) against the Router's chain,
    the same bytes and counts for every program; the store's failures reported alike.
    ``durable``: the store's commit barrier after each decision (None: none; True: the
    answer leaves once it resolves; False: a 503 instead)."""
    switch, running = switched
    data = b"".join(program) + _closing(last, http10)
    answers = []
    for hot in (True, False):
        app, _ = later_app(awaited=False)
        if durable is not None:
            app.decider.commit = lambda: _barrier(durable)  # type: ignore[assignment,method-assign]
        switch.use(app, hot)
        del running.errors[:]
        got = _received(running.server.port, data)
        answers.append((got, counts(app), [str(e) for e in running.errors]))
    assert answers[0] == answers[1]
    eventually(lambda: running.server._in_flight == 0, "nothing in flight")


def test_a_later_rate_answer_is_a_later_not_a_future() -> None:
    """The hot callback answers a later decision with the server's ``Later`` and hands
    the store's future one ``LaterRate`` as its only done callback (before: ``_answer``
    chained a future, the Router another; fails before the compiled later path)."""

    async def run() -> None:
        app, _ = later_app(awaited=False)
        hot = app.router.hot
        assert hot is not None
        first = Request(
            "POST", "/v1/rate", {}, {"x-api-key": "a"}, b'{"tokens":1}', "10.0.0.1", "1.1"
        )
        app.router(first)  # the router decodes the body; the next one is the callback's
        seen: list[Any] = []
        acquire = app.decider.acquire

        def watched(*args: Any, **kwargs: Any) -> Any:
            future = acquire(*args, **kwargs)
            real = future.add_done_callback
            future.add_done_callback = lambda callback: (seen.append(callback), real(callback))
            return future

        app.decider.acquire = watched  # type: ignore[method-assign]
        answer = hot(first)
        assert isinstance(answer, Later)
        assert [type(callback) for callback in seen] == [LaterRate]

    asyncio.run(run())


# -- on a real redis-server ---------------------------------------------------------------

REDIS_RULES = [
    Rule.create("k-{{ .Request.Header.X-API-Key }}", 10, 0.001, name="k"),
    Rule.create("q-{{ .Request.Query.key }}", 3, 0.001, name="q", on_store_failure="deny"),
]
_regions = iter(range(10**9))


def redis_apps(running: Running, url: str) -> tuple[tuple[RatingApp, RedisBackend], ...]:
    """Two apps on two fresh regions of one redis-server (started on the server's loop),
    answering as one region "r" (their bodies name it)."""
    made = []
    for _ in range(2):
        region = f"later{next(_regions)}"
        backend = RedisBackend(REDIS_RULES, region=region, node="n1", url=url, timeout_s=5.0)
        running.call(backend.start())
        assert backend.up, backend.last_error
        app = RatingApp(backend, region="r", node="n1", router=Router(NodeMetrics()))
        made.append((app, backend))
    return tuple(made)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    program=st.lists(requests_of(["a", "b", "c"]), min_size=1, max_size=14),
    last=st.sampled_from(["a", "b"]),
    http10=st.booleans(),
)
def test_the_compiled_later_answer_is_the_routers_chain_on_redis(
    switched: tuple[Switch, Running],
    redis_server_module: Any,
    program: list[bytes],
    last: str,
    http10: bool,
) -> None:
    """A real Redis backend (``acquire_into``: the decision handed from the reply's
    callback): the compiled path against the Router's chain on the same program, each
    on a fresh region of one redis-server: the same bytes but for the times in them
    (the instants differ), the same counts."""
    switch, running = switched
    data = b"".join(program) + _closing(last, http10)
    answers = []
    apps = redis_apps(running, redis_server_module.url)
    try:
        for (app, _), hot in zip(apps, (True, False), strict=True):
            switch.use(app, hot)
            del running.errors[:]
            got = _received(running.server.port, data)
            answers.append((_untimed(got), counts(app), list(running.errors)))
    finally:
        for _, backend in apps:
            running.call(backend.stop())
    assert answers[0] == answers[1]
    assert answers[0][2] == []


class _Transport:
    """What an in-process ``_Connection`` writes to: the writes, and whether each was
    made inside the Redis backend's reply callback (``inside``)."""

    def __init__(self, inside: list[bool], wrote: asyncio.Event | None = None) -> None:
        self.inside = inside
        self.wrote = wrote  # set at each write
        self.writes: list[tuple[bytes, bool]] = []

    def write(self, data: bytes) -> None:
        self.writes.append((data, self.inside[0]))
        if self.wrote is not None:
            self.wrote.set()

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("10.0.0.1", 50000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_redis_grant_is_written_from_the_stores_reply_callback(redis_server: Any) -> None:
    """A Redis node's grant goes from the script's reply to the wire in the reply's own
    done callback: no future resolved, no loop turn between the store and the write
    (before: three futures chained a loop turn apart; fails before acquire_into and the
    compiled later path). The counts are the Router's."""

    async def run() -> None:
        backend = RedisBackend(REDIS_RULES, region="inline", node="n1", url=redis_server.url)
        await backend.start()
        try:
            assert backend.up, backend.last_error
            app = RatingApp(backend, region="inline", node="n1", router=Router(NodeMetrics()))
            server = HttpServer(app.router)
            server._lag_due = float("inf")  # never started: no lag shedding
            inside = [False]
            replied = backend._replied

            def watched(*args: Any) -> None:
                inside[0] = True
                try:
                    replied(*args)
                finally:
                    inside[0] = False

            backend._replied = watched  # type: ignore[method-assign]
            loop = asyncio.get_running_loop()
            request = _request("POST /v1/rate HTTP/1.1", "u", 1)

            wrote = asyncio.Event()

            def connect() -> tuple[_Connection, _Transport]:
                transport = _Transport(inside, wrote)
                connection = _Connection(server, loop)
                connection.connection_made(transport)  # type: ignore[arg-type]
                return connection, transport

            async def answered(transports: list[_Transport], n: int) -> list[bytes]:
                """The writes, once they hold ``n`` answers (woken by each write)."""
                while True:
                    writes = [data for t in transports for data, _ in t.writes]
                    if b"".join(writes).count(b"HTTP/1.1 ") >= n:
                        return writes
                    wrote.clear()
                    await asyncio.wait_for(wrote.wait(), 30)  # a bound, never reached

            # the first body goes through the router (it decodes it), the rest through
            # the callback
            first, warm = connect()
            first.data_received(request)
            await answered([warm], 1)
            transports = []
            for _ in range(4):
                connection, transport = connect()
                transports.append(transport)
                connection.data_received(request * 2)  # two pipelined, both later grants
            await answered(transports, 8)
            writes = [write for transport in transports for write in transport.writes]
            assert b"".join(data for data, _ in writes).count(b"HTTP/1.1 200 ") == 8
            assert all(made_inside for _, made_inside in writes), writes
            assert app.metrics.decisions == {("k", "allowed"): 9}
            assert app.metrics.responses == {("rate", 200): 9}
            assert server._in_flight == 0
        finally:
            await backend.stop()

    asyncio.run(run())


def test_a_store_that_dies_mid_program_answers_as_the_routers_chain(
    switched: tuple[Switch, Running], redis_server: Any
) -> None:
    """redis-server stops with the program's decisions queued or in flight: the failed
    call's decisions go to the rules' ``onStoreFailure`` policies (through the sink on
    the compiled path) and the rest are decided by them at once: the same answers and
    counts as the Router's chain."""
    switch, running = switched
    program = b"".join(
        [
            _request("POST /v1/rate HTTP/1.1", "a", 1),
            _request("POST /v1/rate HTTP/1.1", "a", 4),
            _request("GET /v1/rate?key=q-1&tokens=2 HTTP/1.1", None, None),
            _request("POST /v1/rate HTTP/1.1", "b", 12),
            _request("POST /v1/rate HTTP/1.1", "a", 9),
            _request("POST /v1/rate HTTP/1.0", "b", 2, "Connection: keep-alive\r\n"),
            _request("GET /v1/rate?key=q-1&tokens=2 HTTP/1.1", None, None),
            _request("POST /v1/rate HTTP/1.1", "a", 1),
            _closing("a", False),
        ]
    )
    apps = redis_apps(running, redis_server.url)
    warm = _request("POST /v1/rate HTTP/1.1", "w", 1) + _closing("w", False)
    answers = []
    try:
        for (app, _), hot in zip(apps, (True, False), strict=True):
            switch.use(app, hot)
            _received(running.server.port, warm)  # the body decoded, the link open
        redis_server.stop()
        for (app, _), hot in zip(apps, (True, False), strict=True):
            switch.use(app, hot)
            del running.errors[:]
            got = _received(running.server.port, program)
            answers.append((_untimed(got), counts(app), list(running.errors)))
    finally:
        for _, backend in apps:
            running.call(backend.stop())
    assert answers[0] == answers[1]
    assert all(not backend.up for _, backend in apps)
    statuses = re.findall(rb"HTTP/1\.[01] (\d+) ", answers[0][0])
    assert len(statuses) == 9


def test_a_connection_lost_before_a_later_answer_counts_as_the_routers_chain() -> None:
    """The client is gone before the store answers (two pipelined requests: the first
    through the router, which decodes the body, the second through the callback): nothing
    is written, both decisions are counted (their tokens are spent), no response is,
    nothing stays in flight — on the compiled path as on the Router's chain."""

    async def run(hot: bool) -> tuple[Any, ...]:
        app, _ = later_app(awaited=False)
        if not hot:
            app.router.hot = None
        server = HttpServer(app.router)
        server._lag_due = float("inf")  # never started: no lag shedding
        transport = _Transport([False])
        connection = _Connection(server, asyncio.get_running_loop())
        connection.connection_made(transport)  # type: ignore[arg-type]
        connection.data_received(_rate("a", 1) * 2)
        in_flight = server._in_flight
        connection.connection_lost(None)
        for _ in range(10):  # the store's answer, then every chained callback
            await asyncio.sleep(0)
        return counts(app), transport.writes, in_flight, server._in_flight

    got, expected = asyncio.run(run(True)), asyncio.run(run(False))
    assert got == expected
    assert got[1:] == ([], 2, 0)
    assert got[0][0] == {("k", "allowed"): 2} and got[0][3] == {}
