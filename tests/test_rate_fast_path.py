"""``POST /v1/rate``'s fast path answers and counts exactly as the full path does.

``RatingApp.rate_post`` decides the simple case (no audit trail, no forwarding, no
Idempotency-Key, a store answering now) in one function and hands everything else
to ``rate_post_full``, the reference. Two apps over identical stores at identical
instants, one routing ``POST /v1/rate`` to each, get the same programs of requests
(grants, refusals, a shadow rule and a shadow key, near-limit grants, peeks,
malformed bodies and content types, unknown rules and keys, Idempotency-Key
retries): every answer must be the same bytes on the wire, and the decision,
near-limit, shadow, response and rejection counts the same.

The HTTP server does not call the ``Router`` itself but its hot entry, ``RateHot.answer``
(``api/hot.py``, compiled by Cython in the compiled build): the simple case in one
call, everything else handed to the router. The same programs go to it, and its answers
and counts must be the reference's too; in the compiled build that compares the compiled
callback with the pure-Python path (``Router`` and ``RatingApp`` are never compiled), and
``make test`` runs this file on the pure build as well.

A grant's answer is rendered from per-policy byte templates
(``DecisionRenderer.granted``); the reference is ``DecisionRenderer.response``
(msgspec's encoding of the Decision): the two must be the same bytes whatever the
key, rule, mode, region and numbers hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketmesh.api.hot import ascii_digits, below
from bucketmesh.api.routes import RatingApp
from bucketmesh.core.bucket import NS_PER_S, Decision
from bucketmesh.core.limiter import Limiter
from bucketmesh.core.rules import Rule
from bucketmesh.http.render import DecisionRenderer
from bucketmesh.http.router import Router
from bucketmesh.http.server import HttpServer, Request, Response, _Connection, _encode_response
from bucketmesh.storage.memory import MemoryStore
from bucketmesh.telemetry.audit import AuditLog
from bucketmesh.telemetry.metrics import NodeMetrics

START = 1_000 * NS_PER_S + 7
DATE = b"Date: Sat, 05 Dec 2026 00:00:00 GMT\r\nServer: bucketmesh\r\n"
RULES = [
    Rule.create("k-{{ .Request.Header.X-API-Key }}", 5, 2.0, name="k"),
    Rule.create("t-{{ .Request.Header.X-Team }}", 3, 0.5, name="t", shadow=True),
    Rule.create("l-{{ .Request.Header.X-Local }}", 4, 1.0, name="l", mode="local"),
]
SHADOW_KEY = "k-marked"


def wire(response: Response) -> bytes:
    """What the server writes for ``response`` on a keep-alive HTTP/1.1 connection."""
    return _encode_response(response, DATE, True, False, False)[0]


# -- the renderer's templates against msgspec's encoding ---------------------------

names = st.sampled_from(["k", "per-key", "a.b:c_d", "", "caf\u00e9", "x%d", "q\r\nX: 1"])
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
grants = st.builds(
    Decision,
    allowed=st.just(True),
    key=st.text(max_size=12) | st.sampled_from(["k-a", '"', "%s", "\\", "\x00", "\u2028"]),
    tokens_remaining=st.integers(min_value=-(2**40), max_value=2**62),
    capacity=st.integers(min_value=1, max_value=2**62),
    refill_rate=st.floats(min_value=1e-9, max_value=1e9) | st.sampled_from([0.5, 2.0, 1e9]),
    retry_after=st.sampled_from([0.0, -0.0, 0.25, 1.0]) | finite.map(abs),
    reset_after=st.sampled_from([0.0, 0.5]) | finite,
    mode=st.sampled_from(["shared", "local", "strict", "%%", '"']),
    rule=names,
)


@settings(max_examples=400, deadline=None)
@given(region=st.sampled_from(["eu", "%", 'a"b', "\u00e9"]), decisions=st.lists(grants, max_size=8))
def test_a_grant_rendered_from_its_templates_is_the_references_bytes(
    region: str, decisions: list[Decision]
) -> None:
    fast, reference = DecisionRenderer(region), DecisionRenderer(region)
    for decision in [*decisions, *decisions]:  # the second time from the caches
        try:
            expected: bytes | type[BaseException] = wire(reference.response(decision))
        except (ValueError, OverflowError) as error:  # a header the server refuses
            expected = type(error)
        try:
            got: bytes | type[BaseException] = wire(fast.granted(decision))
        except (ValueError, OverflowError) as error:
            got = type(error)
        assert got == expected


@settings(max_examples=400, deadline=None)
@given(region=st.sampled_from(["eu", "%", 'a"b', "\u00e9"]), decisions=st.lists(grants, max_size=8))
def test_the_callbacks_grant_is_the_references_bytes(
    region: str, decisions: list[Decision]
) -> None:
    """``RateHot.granted`` (the renderer's templates split into pieces and joined; the
    compiled build's C integers and zero ``retry_after``) against ``response``."""
    reference = DecisionRenderer(region)
    hot = make_app(False, Clock()).router.hot.__self__  # type: ignore[union-attr]
    hot.renderer = DecisionRenderer(region)
    hot.encode = hot.renderer.encoder.encode
    for decision in [*decisions, *decisions]:  # the second time from the kept pieces
        try:
            expected: bytes | type[BaseException] = wire(reference.response(decision))
        except (ValueError, OverflowError) as error:  # a header the server refuses
            expected = type(error)
        try:
            got: bytes | type[BaseException] = wire(
                hot.granted(decision, msgspec.structs.astuple(decision))
            )
        except (ValueError, OverflowError) as error:
            got = type(error)
        assert got == expected


# -- the two paths of POST /v1/rate -------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> int:
        return self.now


def make_app(
    full: bool, clock: Clock, *, audit: AuditLog | None = None, store: MemoryStore | None = None
) -> RatingApp:
    store = store or MemoryStore(Limiter(RULES, replica_id="r1", clock=clock))
    app = RatingApp(
        store, region="eu", node="n1", router=Router(NodeMetrics()), monotonic=lambda: 5.0
    )
    if audit is not None:
        app.outcomes.audit = app.audit = audit
    app.shadows.mark(SHADOW_KEY, True, rule=False)
    if full:  # the reference: every request through every step
        app.router.add_route("POST", "/v1/rate", "rate", app.rate_post_full)
        app.router.add_route("POST", "/rate", "rate", app.rate_post_full)
    return app


def counts(app: RatingApp) -> Any:
    metrics = app.metrics
    return (
        dict(metrics.decisions),
        dict(metrics.near_limit),
        dict(metrics.shadow_refused),
        dict(metrics.responses),
        dict(metrics.rejected),
        {route: histogram.count for route, histogram in metrics.durations.items()},
        len(app.idempotency),
    )


bodies = st.one_of(
    st.builds(
        lambda fields: msgspec.json.encode(fields),
        st.fixed_dictionaries(
            {},
            optional={
                "tokens": st.integers(min_value=-1, max_value=7),
                "key": st.sampled_from(["k-a", "k-b", "t-x", "l-z", SHADOW_KEY, "none", "k-%"]),
                "rule": st.sampled_from(["k", "t", "l", "nope"]),
            },
        ),
    ),
    st.sampled_from([b'{"tokens":1}', b'{"tokens":1}', b"", b"  ", b"{bad", b"[1]", b"null"]),
    st.sampled_from([b'{"tokens":"x"}', b'{"tokens":2,"extra":1}', b'{"tokens":1.5}', b"7"]),
)
requests = st.builds(
    lambda path, body, ctype, api_key, team, local, idem, step: (
        step,
        Request(
            "POST",
            path,
            {},
            {
                name: value
                for name, value in (
                    ("content-type", ctype),
                    ("x-api-key", api_key),
                    ("x-team", team),
                    ("x-local", local),
                    ("idempotency-key", idem),
                )
                if value is not None
            },
            body,
            "10.0.0.1",
            "1.1",
        ),
    ),
    st.sampled_from(["/v1/rate", "/v1/rate", "/rate"]),
    bodies,
    st.sampled_from([None, "application/json", "application/json", "text/plain"])
    | st.sampled_from(["application/json; charset=utf-8", "application/problem+json", ""]),
    st.sampled_from([None, "a", "a", "b", "marked", "", "%7", "caf\u00e9"]),
    st.sampled_from([None, None, "x", "y"]),
    st.sampled_from([None, None, "z"]),
    st.sampled_from([None] * 6 + ["i1", "i2", ""]),
    st.sampled_from([0, 0, 0, 1, NS_PER_S // 4, 3 * NS_PER_S]),
)


def answer(app: RatingApp, request: Request) -> bytes:
    response = app.router(request)
    assert isinstance(response, Response)  # a memory store without a log answers now
    return wire(response)


@settings(max_examples=300, deadline=None)
@given(program=st.lists(requests, max_size=30))
def test_the_fast_and_the_full_path_answer_and_count_alike(
    program: list[tuple[int, Request]],
) -> None:
    fast_clock, full_clock = Clock(), Clock()
    fast, full = make_app(False, fast_clock), make_app(True, full_clock)
    for step, request in program:
        fast_clock.now += step
        full_clock.now += step
        assert answer(fast, request) == answer(full, request)
    assert counts(fast) == counts(full)


def hot_answer(app: RatingApp, request: Request) -> bytes:
    hot = app.router.hot
    assert hot is not None
    response = hot(request)
    assert isinstance(response, Response)
    return wire(response)


@settings(max_examples=300, deadline=None)
@given(program=st.lists(requests, max_size=30), repeats=st.integers(min_value=1, max_value=3))
def test_the_hot_callback_answers_and_counts_as_the_full_path(
    program: list[tuple[int, Request]], repeats: int
) -> None:
    """Each request ``repeats`` times in a row: the first of a body goes through the
    router (which decodes it), the next ones through the callback's own path."""
    hot_clock, full_clock = Clock(), Clock()
    hot, full = make_app(False, hot_clock), make_app(True, full_clock)
    for step, request in program:
        for _ in range(repeats):
            hot_clock.now += step
            full_clock.now += step
            assert hot_answer(hot, request) == answer(full, request)
    assert counts(hot) == counts(full)


def test_the_hot_callback_answers_the_simple_case_itself_and_hands_the_rest_on() -> None:
    app = make_app(False, Clock())
    hot = app.router.hot
    assert hot is not None
    callback = hot.__self__  # type: ignore[attr-defined]  # RateHot, answer bound to it
    handed: list[Request] = []
    router = callback.fallback

    def recorded(request: Request) -> Any:
        handed.append(request)
        return router(request)

    callback.fallback = recorded
    first = simple()
    hot_answer(app, first)  # a body not decoded yet: the router decodes it
    assert handed == [first]
    decided = [
        simple(),  # a grant, the key from the template
        simple(**{"x-api-key": "b"}),  # another key
        simple(**{"x-api-key": "a", "content-type": "application/json"}),
        simple(**{"x-api-key": "marked"}),  # refused, the shadowed key: 200
        simple(**{"x-team": "x"}),  # the first rule's key still
    ]
    for request in decided:
        hot_answer(app, request)
    assert handed == [first]
    rest = [
        simple(**{"idempotency-key": "i1"}),
        simple(b'{"tokens":2}'),  # another body: the router decodes it
        simple(**{"content-type": "text/plain"}),
        simple(**{"x-api-key": ""}),  # no key from the first rule
        Request("GET", "/v1/rate", {}, {}, b"", "10.0.0.1", "1.1"),
        Request("POST", "/healthz", {}, {}, b"", "10.0.0.1", "1.1"),
    ]
    for request in rest:
        hot(request)
    assert handed == [first, *rest]
    # an audit trail or a forwarder set on the app later: the router's from then on
    app.audit = object()  # type: ignore[assignment]  # only its presence is read first
    app.rate_post_full = lambda request: Response(204)  # type: ignore[method-assign]
    audited = simple()
    assert hot(audited).status == 204  # type: ignore[union-attr]
    app.audit = None
    app.forwarder = object()  # type: ignore[assignment]
    forwarded = simple()
    assert hot(forwarded).status == 204  # type: ignore[union-attr]
    app.forwarder = None
    assert handed[-2:] == [audited, forwarded]
    del app.rate_post_full
    # a route served by something else than the app's rate_post: the router's
    app.router.add_route("POST", "/v1/rate", "rate", app.rate_post_full)
    last = simple()
    hot_answer(app, last)
    assert handed[-1] is last


@settings(max_examples=500, deadline=None)
@given(
    number=st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=-(2**54), max_value=2**54),
    bound=st.floats(allow_nan=False) | st.integers(min_value=-(2**70), max_value=2**70),
)
def test_the_callbacks_number_helpers_are_pythons_operators(number: int, bound: float) -> None:
    """``below`` and ``ascii_digits`` take C paths in the compiled build: they must
    still be ``<`` and ``b"%d" %``, whatever the numbers."""
    assert below(number, bound) == (number < bound)
    assert below(number, float(number)) == (number < float(number))
    assert ascii_digits(number) == b"%d" % number


def test_the_server_calls_the_routers_hot_entry() -> None:
    app = make_app(False, Clock())
    server = HttpServer(app.router)
    connection = _Connection(server, None)  # type: ignore[arg-type]
    assert connection._handler == app.router.hot


def simple(body: bytes = b'{"tokens":1}', **headers: str) -> Request:
    return Request(
        "POST",
        "/v1/rate",
        {},
        {"content-type": "application/json", "x-api-key": "a", **headers},
        body,
        "10.0.0.1",
        "1.1",
    )


def full_calls(app: RatingApp) -> list[Request]:
    """Record each request ``app.rate_post`` hands to ``rate_post_full``."""
    calls: list[Request] = []
    reference = app.rate_post_full

    def recorded(request: Request) -> Any:
        calls.append(request)
        return reference(request)

    app.rate_post_full = recorded  # type: ignore[method-assign]
    return calls


def test_the_simple_case_is_decided_without_the_full_path_and_the_rest_is_not() -> None:
    app = make_app(False, Clock())
    calls = full_calls(app)
    decided = [
        simple(),  # a grant, the key from the template
        simple(b'{"key":"k-b","tokens":2}'),  # the key in the body
        simple(b'{"tokens":9}'),  # more than the capacity: 400 naming tokens
        simple(b'{"tokens":3}', **{"x-api-key": "marked"}),  # refused, shadowed: 200
        simple(b'{"tokens":0}'),  # a peek
    ]
    for request in decided:
        answer(app, request)
    assert calls == []
    handed = [
        simple(**{"idempotency-key": "i1"}),
        simple(b""),  # no body: the defaults
        simple(b'{"tokens":-1}'),
        simple(b'{"key":"k-a","rule":"k"}'),
    ]
    for request in handed:
        answer(app, request)
    assert calls == handed


def test_a_node_that_forwards_takes_the_full_path() -> None:
    app = make_app(False, Clock())
    handed: list[Request] = []
    app.rate_post_full = lambda request: handed.append(request) or Response(204)  # type: ignore[method-assign]
    app.forwarder = object()  # type: ignore[assignment]  # only its presence is read here
    request = simple()
    assert app.rate_post(request).status == 204  # type: ignore[union-attr]
    assert handed == [request]


def test_with_the_audit_trail_both_paths_answer_and_write_the_same_events(tmp_path: Path) -> None:
    fast_clock, full_clock = Clock(), Clock()
    logs = AuditLog(tmp_path / "fast.jsonl"), AuditLog(tmp_path / "full.jsonl")
    fast = make_app(False, fast_clock, audit=logs[0])
    full = make_app(True, full_clock, audit=logs[1])
    for number in range(12):
        request = simple(
            b'{"tokens":2}', **{"x-request-id": f"req-{number}", "x-api-key": "ab"[number % 2]}
        )
        fast_clock.now += NS_PER_S // 8
        full_clock.now += NS_PER_S // 8
        assert answer(fast, request) == answer(full, request)
    assert counts(fast) == counts(full)
    events = [[msgspec.structs.replace(e, time=0) for e in log._events] for log in logs]
    assert events[0] == events[1] and len(events[0]) == 12


async def _answers(app: RatingApp, program: list[Request], clock: Clock) -> list[bytes]:
    out = []
    for request in program:
        clock.now += NS_PER_S // 3
        response = app.router(request)
        if not isinstance(response, Response):
            waited: Awaitable[Response] = response
            response = await waited
        out.append(wire(response))
    return out


def test_a_durable_store_answers_alike_once_its_barrier_lets_the_answer_leave(
    tmp_path: Path,
) -> None:
    def durable(name: str, clock: Clock) -> MemoryStore:
        store = MemoryStore.open(
            RULES, region="eu", node="n1", snapshot=tmp_path / name, durability="strict"
        )
        store.limiter.clock = clock
        return store

    program = [simple(), simple(b'{"tokens":4}'), simple(b'{"tokens":4}'), simple(b"{}")] * 3
    results = []
    for name, full in (("fast", False), ("full", True)):
        clock = Clock()
        store = durable(name, clock)
        app = make_app(full, clock, store=store)
        run: Callable[[], Awaitable[list[bytes]]] = lambda: _answers(app, program, clock)  # noqa: E731, B023
        results.append((asyncio.run(run()), counts(app)))
        store.close()
    assert results[0] == results[1]
