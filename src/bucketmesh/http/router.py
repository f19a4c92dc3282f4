"""Which handler answers a request: exact and prefix routes, 404/405, and the one
place where an ``ApiError`` (raised at once or from an awaitable answer) becomes
problem+json and every answer is counted in the node's metrics.

The Rating API, the sync endpoints and the fault endpoints all register here; none
of them needs to know about the others."""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from typing import TypeAlias

from bucketmesh.http.errors import ApiError
from bucketmesh.http.server import Later, Request, Response, problem
from bucketmesh.telemetry.metrics import NodeMetrics

# What a route handler answers: a Response at once, or an awaitable of one (a handler
# that must wait, such as a Redis-backed decision or a durable grant).
Answer: TypeAlias = Response | Awaitable[Response]
Handler: TypeAlias = Callable[[Request], Answer]
PrefixHandler: TypeAlias = Callable[[Request, str], Answer]
_Future = asyncio.Future


class Router:
    """The handler ``http.server.HttpServer`` calls for every request."""

    def __init__(self, metrics: NodeMetrics | None = None) -> None:
        self.metrics = metrics or NodeMetrics()
        self.routes: dict[tuple[str, str], tuple[str, Handler]] = {}
        self.prefix_routes: list[tuple[str, str, str, PrefixHandler]] = []
        #: route label -> a check run before each handler of that route (raises ApiError)
        self.guards: dict[str, Callable[[Request], None]] = {}
        #: what the HTTP server calls instead of this router, if set: a handler that answers
        #: some requests itself exactly as the router would (a ``Later`` for an answer it
        #: gives later) and hands it the rest (``api/hot.py``: POST /v1/rate's simple
        #: case in one compiled call)
        self.hot: Callable[[Request], Answer | Later] | None = None

    def add_route(self, method: str, path: str, route: str, handler: Handler) -> None:
        """Serve ``method path`` with ``handler``; ``route`` is the bounded metrics
        label. A handler may raise ``ApiError`` (at once, or from the awaitable it
        returns) and may be a coroutine function."""
        self.routes[(method, path)] = (route, handler)

    def guard(self, route: str, check: Callable[[Request], None]) -> None:
        """Run ``check(request)`` before every handler whose route label is ``route``
        (the sync endpoints' client certificate check, ``http/tls.py``)."""
        self.guards[route] = check

    def add_prefix_route(
        self, method: str, prefix: str, route: str, handler: PrefixHandler
    ) -> None:
        """Serve ``method prefix<rest>`` with ``handler(request, rest)``."""
        self.prefix_routes.append((method, prefix, route, handler))

    def __call__(self, request: Request) -> Answer:
        started = time.perf_counter()
        found = self.routes.get((request.method, request.path))
        if found is not None and (not self.guards or found[0] not in self.guards):
            # the hot path, dispatch inlined: an exact route without a guard
            route = found[0]
            try:
                response = found[1](request)
            except ApiError as error:
                self.metrics.count_rejection(error.reason)
                response = error.response()
        else:
            route, response = self.dispatch(request)
        if type(response) is not Response:
            return self._finish(route, response, started)  # type: ignore[arg-type]
        elapsed = time.perf_counter() - started
        metrics = self.metrics
        histogram = metrics.durations.get(route)
        if histogram is None:  # the route's first answer: its histogram is made
            metrics.count_response(route, response.status, elapsed)
            return response
        # NodeMetrics.count_response and Histogram.observe, inlined: two calls less
        responses = metrics.responses
        label = (route, response.status)
        responses[label] = responses.get(label, 0) + 1
        histogram.counts[bisect_left(histogram.bounds, elapsed)] += 1
        histogram.count += 1
        histogram.total += elapsed
        return response

    def _finish(
        self, route: str, pending: Awaitable[Response], started: float
    ) -> Awaitable[Response]:
        """An async handler's answer, awaited; its ApiError renders like a sync one's. A
        bare future (a store's later decision, api/routes.py) is chained by a done
        callback into the answer's future, without a task or a coroutine."""
        if pending.__class__ is not _Future:
            return self._finish_awaited(route, pending, started)
        answer: asyncio.Future[Response] = pending.get_loop().create_future()
        metrics = self.metrics

        def finished(done: asyncio.Future[Response]) -> None:
            if answer.done():  # cancelled: the connection was lost
                return
            if done.cancelled():
                answer.cancel()
                return
            error = done.exception()
            try:
                if error is None:
                    response = done.result()
                elif isinstance(error, ApiError):
                    metrics.count_rejection(error.reason)
                    response = error.response()
                else:
                    answer.set_exception(error)
                    return
                metrics.count_response(route, response.status, time.perf_counter() - started)
            except Exception as exc:  # as awaiting it would raise (a handler's bug)
                answer.set_exception(exc)
                return
            answer.set_result(response)

        pending.add_done_callback(finished)
        return answer

    async def _finish_awaited(
        self, route: str, pending: Awaitable[Response], started: float
    ) -> Response:
        try:
            response = await pending
        except ApiError as error:
            self.metrics.count_rejection(error.reason)
            response = error.response()
        self.metrics.count_response(route, response.status, time.perf_counter() - started)
        return response

    def dispatch(self, request: Request) -> tuple[str, Answer]:
        method = "GET" if request.method == "HEAD" else request.method  # the server drops the body
        path = request.path
        route = "other"
        try:
            found = self.routes.get((method, path))
            if found is not None:
                route = found[0]
                if self.guards:
                    check = self.guards.get(route)
                    if check is not None:
                        check(request)
                return route, found[1](request)
            for route_method, prefix, prefix_route, handler in self.prefix_routes:
                if route_method == method and path.startswith(prefix) and len(path) > len(prefix):
                    route = prefix_route
                    return route, handler(request, path[len(prefix) :])
            return route, self.not_found_or_method(request)
        except ApiError as error:
            self.metrics.count_rejection(error.reason)
            return route, error.response()

    def not_found_or_method(self, request: Request) -> Response:
        path = request.path
        allowed = sorted(m for (m, p) in self.routes if p == path)
        allowed += sorted(
            {
                m
                for m, prefix, _, _ in self.prefix_routes
                if len(path) > len(prefix) and path.startswith(prefix)
            }
        )
        if allowed:
            return problem(
                405,
                None,
                f"{request.method} is not allowed on {path}; use {', '.join(allowed)}",
                headers=[("Allow", ", ".join(allowed))],
            )
        return problem(404, None, f"no endpoint at {path}")
