"""The simple ``POST /v1/rate`` in one call: what the HTTP server calls per request
instead of the ``Router`` (docs/targets.md P2, docs/build.md).

``RateHot.answer`` does, for the request wrk sends, what ``Router.__call__`` followed
by ``RatingApp.rate_post`` and ``DecisionRenderer.granted`` do: the route lookup, the
decision, the grant's bytes, the decision, response and duration counts. It takes
only the simple case: a ``POST`` to a route still served by the app's ``rate_post``,
without a guard; no audit trail, no forwarder, no ``Idempotency-Key``; the body the
app decoded last (a client's one body); a JSON or absent ``Content-Type``; the key
given in the body without a rule, or rendered by the first rule's template; a decider
answering now. Anything else goes to the ``Router`` (``fallback``) before anything
is spent, so the ``Router`` and ``rate_post`` stay the reference: both answer byte
for byte alike and count alike (tests/test_rate_fast_path.py, tests/test_http_compiled.py).

``make install`` compiles this module with Cython from this source (``CYTHONIZED`` in
``_native.py``; ``hot.pxd`` makes ``RateHot`` an extension type with typed fields and
locals); ``BUCKETMESH_PURE=1`` or a build without Cython runs it as Python.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import time
from typing import TYPE_CHECKING, Any

from msgspec.structs import astuple

from bucketmesh.core.bucket import Decision
from bucketmesh.core.limiter import LimiterError, NoRuleError
from bucketmesh.http.errors import JSON
from bucketmesh.http.server import Later, Request, Response

if TYPE_CHECKING:
    from bucketmesh.api.routes import RatingApp
    from bucketmesh.core.rules import KeyTemplate, Rule
    from bucketmesh.http.router import Answer, Handler
    from bucketmesh.http.wire import RateRequest

_perf_counter = time.perf_counter
_Future = asyncio.Future
_ceil = math.ceil
_copysign = math.copysign
_ZERO = b"0.0"  # msgspec's encoding of 0.0 (a grant's retry_after)
# a Decision's fields in order: ``astuple`` reads them in one call (nine attribute reads
# otherwise); a reordering of the struct must be seen here
_FIELDS = (
    "allowed",
    "key",
    "tokens_remaining",
    "capacity",
    "refill_rate",
    "retry_after",
    "reset_after",
    "mode",
    "rule",
)
# and a Request's first six
_REQUEST = ("method", "path", "query", "headers", "body", "client_ip")
if Request.__struct_fields__[:6] != _REQUEST:  # pragma: no cover (a change to http/server.py)
    raise ImportError(f"api/hot.py reads Request as {_REQUEST}, not {Request.__struct_fields__}")
if Decision.__struct_fields__ != _FIELDS:  # pragma: no cover (a change to core/structs.py)
    raise ImportError(f"api/hot.py reads Decision as {_FIELDS}, not {Decision.__struct_fields__}")
_SPEC = re.compile(rb"(%%|%[sd])")


def below(number: int, bound: float) -> bool:
    """``number < bound``; in the compiled build a comparison of C doubles for a float
    bound and an int that a double holds exactly (Python's int-float comparison takes
    ~450 instructions)."""
    # the literals are 2**53 (a module constant would be a global read and a negation)
    if type(bound) is float and -9007199254740992 < number < 9007199254740992:
        small = number  # a C long long, then C doubles in the compiled build (hot.pxd)
        exact = small  # exact below 2**53
        limit = bound
        return exact < limit
    return number < bound


def ascii_digits(number: int) -> bytes:
    """``b"%d" % number``; in the compiled build a C conversion for a 64-bit value (a
    Python int's ``str`` takes its general path, ~750 instructions)."""
    if -4611686018427387904 < number < 4611686018427387904:  # 2**62
        small = number  # a C long long in the compiled build (hot.pxd)
        return f"{small}".encode()
    return str(number).encode()


def pieces(template: bytes) -> tuple[bytes, ...]:
    """The literal pieces of a ``%``-template between its ``%s`` and ``%d`` (``%%`` as
    ``%``): ``b"".join`` of them with the values between gives ``template % values``."""
    out = [b""]
    for part in _SPEC.split(template):
        if part == b"%%":
            out[-1] += b"%"
        elif part == b"%s" or part == b"%d":
            out.append(b"")
        else:
            out[-1] += part
    return tuple(out)


class RateHot:
    """``POST /v1/rate``'s simple case for one ``RatingApp`` (see the module docstring)."""

    __slots__ = (
        "allowed",
        "answered",
        "app",
        "body",
        "capacity",
        "decider",
        "decisions",
        "durations",
        "encode",
        "fallback",
        "first",
        "first_name",
        "first_template",
        "given_key",
        "given_rule",
        "guards",
        "handler",
        "head",
        "header",
        "into",
        "key",
        "key_json",
        "metrics",
        "mode",
        "near",
        "near_capacity",
        "near_level",
        "other",
        "rate",
        "rendered",
        "renderer",
        "request",
        "responses",
        "router",
        "routes",
        "rule",
        "state",
        "template",
        "tokens",
        "value",
    )

    def __init__(self, app: RatingApp, handler: Handler) -> None:
        """``handler``: what ``app`` registered for ``POST /v1/rate`` (the object, so that
        a route served by anything else, a test's reference say, goes to the router)."""
        router = app.router
        self.app = app
        # read per request instead of getattr: RatingApp has no descriptor for the names
        # read here (audit, forwarder, _last_body, _last_rate, decider, near_limit), so
        # its instance dict is where they are, as set or patched
        self.state = app.__dict__
        self.handler: object = handler
        self.router = router
        self.fallback = router.__call__
        self.routes = router.routes
        self.guards = router.guards
        metrics = router.metrics
        self.metrics = metrics
        self.decisions = metrics.decisions
        self.responses = metrics.responses
        self.durations = metrics.durations
        self.renderer = app.renderer
        self.encode = app.renderer.encoder.encode
        # the last grant's policy and its templates (DecisionRenderer._grant_template's)
        self.rule = ""
        self.capacity: object = -1
        self.rate: object = -1.0
        self.mode = ""
        self.head: tuple[bytes, ...] = ()
        self.body: tuple[bytes, ...] = ()
        # the last key rendered from the first rule's template (when one header makes it)
        self.template: KeyTemplate | None = None
        self.other: KeyTemplate | None = None  # the last template that is not so
        self.header = ""
        self.value: str | None = None
        self.rendered = ""
        # the last body's request (its fields) and the last first rule (its template, name)
        self.request: RateRequest | None = None
        self.tokens = 0
        self.given_key: str | None = None
        self.given_rule: str | None = None
        self.first: Rule | None = None
        self.first_template: KeyTemplate | None = None
        self.first_name = ""
        # near_limit and the capacity of the last grant, and capacity × near_limit
        self.near: object = None
        self.near_capacity: object = None
        self.near_level: float = 0.0
        # the last labels counted (decisions, responses): the same tuple again is found
        # by identity in the metrics' dicts
        self.allowed: tuple[str, str] = ("", "allowed")
        self.answered: tuple[str, int] = ("", 0)
        # the last grant's key and its JSON
        self.key = ""
        self.key_json = b'""'
        # the last decider and its ``acquire_into`` (a store answering later through a
        # sink instead of a future: the Redis backend's), None without one
        self.decider: object = None
        self.into: Any = None

    def __call__(self, request: Request) -> Answer | Later:
        return self.answer(request)

    def answer(self, request: Request) -> Answer | Later:
        """The answer ``self.router(request)`` gives, counted as it counts it."""
        started = _perf_counter()
        method, path, query, headers, body, client_ip = astuple(request)[:6]
        if method != "POST":
            return self.fallback(request)
        found = self.routes.get(("POST", path))
        if found is None or found[1] is not self.handler:
            return self.fallback(request)
        route = found[0]
        guards = self.guards
        if guards and route in guards:
            return self.fallback(request)
        # RatingApp.rate_post, its simple case
        app = self.app
        state = self.state  # the app's attributes (its __dict__: a lookup, not getattr)
        if (
            state["audit"] is not None
            or state["forwarder"] is not None
            or "idempotency-key" in headers
        ):
            return self.fallback(request)
        if body != state["_last_body"]:  # the reference decodes it (and keeps it)
            return self.fallback(request)
        content_type = headers.get("content-type")
        if content_type is not None and content_type != JSON:
            return self.fallback(request)
        rate = state["_last_rate"]
        if rate is not self.request:  # a body decoded anew: its fields read once
            self.request = rate
            self.tokens, self.given_key, self.given_rule = rate.tokens, rate.key, rate.rule
        tokens = self.tokens
        if tokens < 0:
            return self.fallback(request)
        decider = state["decider"]
        if self.given_rule is not None:  # the rule named renders or owns the key
            return self.fallback(request)
        key = self.given_key
        rule: str | None
        if key is None:
            rules = decider.rules
            if not rules:
                return self.fallback(request)
            first = rules[0]
            if first is not self.first:  # Rule is frozen: its template and name read once
                self.first, self.first_template, self.first_name = first, first.template, first.name
            template: KeyTemplate = self.first_template  # type: ignore[assignment]  # set above
            if template is self.template and headers.get(self.header) == self.value:
                key = self.rendered  # the one header the key is made of holds what it held
            else:
                key = template.render(headers, query, client_ip)
                if key is None:
                    return self.fallback(request)
                if template is not self.other:
                    self._remember(template, headers, key)
            rule = self.first_name
        else:
            rule = None
        if decider is not self.decider:
            self.decider, self.into = decider, getattr(decider, "acquire_into", None)
        into = self.into
        try:
            if into is None:
                decision = decider.acquire(key, tokens, rule=rule)
            else:  # a store answering later through a sink: no future (LaterRate)
                later = Later()
                sink = LaterRate(self, later, route, started)
                decision = into(key, tokens, sink, rule=rule)
                if decision is sink:
                    return later
        except LimiterError as error:
            refusal = app.limiter_error(
                error, "rule" if rule and isinstance(error, NoRuleError) else None
            )
            self.metrics.count_rejection(refusal.reason)
            return self._counted(route, refusal.response(), started)
        if decision.__class__ is not Decision:  # an answer to wait for
            if decision.__class__ is _Future:  # a bare future: one done callback (LaterRate)
                later = Later()
                decision.add_done_callback(LaterRate(self, later, route, started))
                return later
            return self._counted(
                route, app._answer(decision, app._decision_response, None), started
            )
        response = self.respond(decision, state)
        barrier = decider.commit()
        if barrier is not None:
            return self._counted(route, app._after_barrier(barrier, response, None), started)
        self._observed(route, response, started)  # Router.__call__'s counting
        return response

    def respond(self, decision: Decision, state: dict[str, Any]) -> Response:
        """``RatingApp._decision_response(decision)`` (``state``: the app's attributes):
        a grant counted (decisions, near-limit) and rendered from the kept templates, a
        refusal by the reference itself."""
        fields = astuple(decision)
        if not fields[0]:  # refused
            return self.app._decision_response(decision)
        decided = fields[8]
        decisions = self.decisions
        label = self.allowed  # the last grant's label, if its rule's name is this one
        if label[0] is not decided:
            label = self.allowed = (decided, "allowed")
        decisions[label] = decisions.get(label, 0) + 1
        near = state["near_limit"]
        capacity = fields[3]
        if near is not self.near or capacity != self.near_capacity:
            self.near, self.near_capacity = near, capacity
            self.near_level = capacity * near
        if below(fields[2], self.near_level):  # tokens_remaining < capacity * near_limit
            self.metrics.count_near_limit(decided)
        return self.granted(decision, fields)

    def _remember(self, template: KeyTemplate, headers: dict[str, str], key: str) -> None:
        """Keep ``key`` as what ``template`` renders while the one header it reads holds
        what it holds now: a template reading one header and nothing else renders
        the same key from the same value (a pure function of it). Another template is
        remembered as such (``other``): its keys are rendered every time."""
        if template is not self.template:
            names = template.header_names
            if len(names) != 1 or template.query_names or template.uses_client_ip:
                self.other = template
                return
            self.template, self.header = template, names[0]
        self.value, self.rendered = headers[self.header], key

    def _counted(self, route: str, answer: Answer, started: float) -> Answer:
        """Counted as ``Router.__call__`` counts an answer other than the grant's."""
        if type(answer) is not Response:
            return self.router._finish(route, answer, started)  # type: ignore[arg-type]
        self.metrics.count_response(route, answer.status, _perf_counter() - started)
        return answer

    def _observed(self, route: str, response: Response, started: float) -> None:
        """The Router's count of an answer (``NodeMetrics.count_response`` and
        ``Histogram.observe``): ``Router.__call__``'s for one given now, ``_finish``'s
        for a later one."""
        elapsed = _perf_counter() - started
        histogram = self.durations.get(route)
        if histogram is None:  # the route's first answer: its histogram is made
            self.metrics.count_response(route, response.status, elapsed)
            return
        responses = self.responses
        status = response.status
        answered = self.answered  # the last answer's label, if the same route and status
        if answered[0] is not route or answered[1] is not status:
            answered = self.answered = (route, status)
        responses[answered] = responses.get(answered, 0) + 1
        # bisect_left(histogram.bounds, elapsed), as a loop over C doubles when compiled
        index = 0
        for bound in histogram.bounds:
            if bound >= elapsed:
                break
            index += 1
        histogram.counts[index] += 1
        histogram.count += 1
        histogram.total += elapsed

    def granted(self, decision: Decision, fields: tuple[Any, ...]) -> Response:
        """``DecisionRenderer.granted(decision)`` (``fields``: ``astuple(decision)``): the
        same bytes, from the same templates (the renderer makes them; the last policy's
        pieces are kept here)."""
        _, key, remaining, capacity, rate, retry_after, reset_after, mode, rule = fields
        if rule != self.rule or capacity != self.capacity or rate != self.rate or mode != self.mode:
            renderer = self.renderer
            template = renderer._grant_template(decision)
            if template is None:  # a rule name no header can hold: the reference's answer
                return renderer.response(decision)
            self.head, self.body = pieces(template[0]), pieces(template[1])
            self.rule, self.capacity, self.rate, self.mode = rule, capacity, rate, mode
        if key != self.key:  # the same client's key again: encoded once
            self.key, self.key_json = key, self.encode(key)
        digits = ascii_digits(remaining)
        wait = b"0" if retry_after == 0.0 else ascii_digits(_ceil(retry_after))
        encode = self.encode
        body = self.body
        head = self.head
        return Response(
            200,
            b"".join(
                (
                    body[0],
                    self.key_json,
                    body[1],
                    digits,
                    body[2],
                    _ZERO
                    if retry_after == 0.0
                    and type(retry_after) is float
                    and _copysign(1.0, retry_after) > 0.0
                    else encode(retry_after),
                    body[3],
                    encode(reset_after),
                    body[4],
                )
            ),
            JSON,
            None,
            b"".join((head[0], digits if remaining > 0 else b"0", head[1], wait, head[2])),
        )


class LaterRate:
    """A later decision of ``RateHot.answer`` (a store that answers later: Redis),
    answered in one call: what ``RatingApp._answer``'s done callback (``_rendered``:
    render, count, the commit barrier), the ``Router``'s (``_finish``: count the
    response) and the server's (``_on_response_done``: write) do, one after the other
    and a loop turn apart, for a grant or a refusal. The server's ``Later`` takes the
    Response; no future is made.

    It is the store's sink (``acquire_into``: ``done``, ``set_result``,
    ``set_exception``, called straight from the reply's done callback) or a bare
    future's done callback (``__call__``). What it does not cover — an error, a
    cancelled future, a commit barrier, anything but a ``Decision`` — takes the
    reference path from there, through ``RatingApp._answer`` and ``Router._finish``,
    the server following their future (``Later.follow``). It never raises: the store
    calls it among the other decisions of a reply."""

    __slots__ = ("finished", "hot", "later", "route", "started")

    def __init__(self, hot: RateHot, later: Later, route: str, started: float) -> None:
        self.hot = hot
        self.later = later
        self.route = route
        self.started = started
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def __call__(self, future: asyncio.Future[Any]) -> None:
        """A bare future's done callback: its Decision, or the reference path with it."""
        if self.finished:
            return
        if future.cancelled() or future.exception() is not None:
            self.finished = True
            self._reference(future)
            return
        self.set_result(future.result())

    def set_exception(self, error: BaseException) -> None:
        if self.finished:
            return
        self.finished = True
        self._handed(error, True)

    def _handed(self, outcome: Any, failed: bool) -> None:
        """``outcome`` (the store's error when ``failed``, else an answer other than a
        Decision) answered by the reference path, as its future's."""
        try:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            if failed:
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        except Exception as exc:
            self._failed(exc)
            return
        self._reference(future)

    def set_result(self, decision: Any) -> None:
        """The store's Decision: rendered, counted and written, as the reference does."""
        if self.finished:
            return
        self.finished = True
        hot = self.hot
        if decision.__class__ is not Decision:
            self._handed(decision, False)
            return
        later = self.later
        state = hot.state
        try:
            # RatingApp._rendered: _decision_response (RateHot.respond), then the
            # commit barrier
            response = hot.respond(decision, state)
            barrier = state["decider"].commit()
        except Exception as exc:  # the reference's answer: 500, reported (_failed)
            self._failed(exc)
            return
        if barrier is not None:
            self._after_barrier(barrier, response)
            return
        if later.cancelled:  # the connection is gone: Router._finish counts nothing
            return
        try:
            hot._observed(self.route, response, self.started)
        except Exception as exc:
            self._failed(exc)
            return
        try:
            later.resolve(response)
        except Exception as exc:  # the server's bug: as a failing done callback's
            asyncio.get_running_loop().call_exception_handler(
                {"message": "Exception in a later answer's write", "exception": exc}
            )

    def _reference(self, future: asyncio.Future[Any]) -> None:
        """The store's answer in ``future`` (done), answered by the reference path:
        ``RatingApp._answer``, ``Router._finish``, the server following their future."""
        hot = self.hot
        later = self.later
        try:
            app = hot.app
            answer = app._answer(future, app._decision_response, None)
            counted: Any = hot.router._finish(self.route, answer, self.started)  # type: ignore[arg-type]
        except Exception as exc:
            self._failed(exc)
            return
        if later.cancelled:
            counted.cancel()  # the connection cancelled it (Router._finish counts nothing)
        later.follow(counted)

    def _after_barrier(self, barrier: Any, response: Response) -> None:
        """A commit barrier to wait for: ``RatingApp._rendered``'s, then as above."""
        from bucketmesh.api.routes import _resolve

        hot = self.hot
        try:
            answer: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
            waited = asyncio.ensure_future(hot.app._after_barrier(barrier, response, None))
            waited.add_done_callback(functools.partial(_resolve, answer))
            counted: Any = hot.router._finish(self.route, answer, self.started)
        except Exception as exc:
            self._failed(exc)
            return
        if self.later.cancelled:
            counted.cancel()
        self.later.follow(counted)

    def _failed(self, error: BaseException) -> None:
        """A bug on the way (rendering, counting): the reference's answer to it, a
        future failing with it (the server reports it and answers 500); nothing once the
        connection is gone (the Router drops it then)."""
        if self.later.cancelled:
            return
        try:
            future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
            future.set_exception(error)
        except BaseException:
            return
        self.later.follow(future)
