"""RatingApp's route table: handlers added by other modules, sync or async.

The sync mesh and storage backends add routes whose answers wait for I/O; an
async handler's answer (and its ApiError) must reach the client, and the
metrics, exactly as a sync handler's does. Driven through a real HttpServer
on loopback.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from bucketmesh.api.routes import RatingApp
from bucketmesh.core.limiter import Limiter
from bucketmesh.core.rules import Rule
from bucketmesh.http.errors import ApiError
from bucketmesh.http.server import HttpServer, Request, Response, ServerLimits


def _app() -> RatingApp:
    rules = [Rule.create("k-{{ .Request.Header.X-Key }}", 5, 1.0)]
    return RatingApp(Limiter(rules, replica_id="r/n/1"), region="r", node="n")


async def _serve_and_get(app: RatingApp, paths: list[str]) -> list[httpx.Response]:
    # no lag shedding (as tests/test_http11.py's servers and conftest's nodes): the
    # client runs on the server's loop, and on a loaded machine creating it (its TLS
    # context) can stall that loop past 2 × shed_lag, so the next read is shed: a 503
    server = HttpServer(app, ServerLimits(shed_lag=3600.0))
    await server.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            return [await client.get(path) for path in paths]
    finally:
        await server.shutdown(1.0)


def test_async_handlers_answer_and_their_errors_render_as_problem_json() -> None:
    app = _app()

    async def slow_ok(request: Request) -> Response:
        await asyncio.sleep(0.01)
        return Response(200, b'{"ok":true}')

    async def slow_refusal(request: Request) -> Response:
        await asyncio.sleep(0.01)
        raise ApiError(409, "the store said no", reason="conflict")

    app.add_route("GET", "/x/ok", "x", slow_ok)
    app.add_route("GET", "/x/no", "x", slow_refusal)
    ok, no, healthz = asyncio.run(_serve_and_get(app, ["/x/ok", "/x/no", "/healthz"]))
    assert (ok.status_code, ok.json()) == (200, {"ok": True})
    assert no.status_code == 409
    assert no.headers["content-type"] == "application/problem+json"
    assert no.json()["detail"] == "the store said no"
    assert healthz.status_code == 200
    text = app.metrics_text(Request("GET", "/metrics", {}, {}, b"", "127.0.0.1", "1.1")).body
    assert b'route="x"' in text


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
