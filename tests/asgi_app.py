"""An ASGI application wrapped by ``RateLimitMiddleware``, for a real uvicorn process.

``uvicorn --factory asgi_app:create_app --app-dir tests`` builds it from the JSON in
the environment variable ``ASGI_APP_CONFIG``::

    {"rules": [{"key": ..., "capacity": ..., "refill_rate": ..., "name": ...}],
     "middleware": {...keyword arguments of RateLimitMiddleware...},
     "max_buckets": 1000000, "metrics": false}

Every request outside ``/_test/`` goes through the middleware to a trivial upstream
(``200 hello``). ``/_test/`` is the test's window into the process, answered beside
the middleware: ``GET /_test/state`` (what the middleware counted, the warnings
bucketmesh logged, and ``/metrics`` text when a ``NodeMetrics`` is passed) and
``POST /_test/configure?rule=R&capacity=N`` (a runtime change of the rule, as a
PATCH makes it).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any
from urllib.parse import parse_qsl

from bucketmesh import Limiter, Rule
from bucketmesh.integrations.asgi import Message, RateLimitMiddleware, Receive, Scope, Send
from bucketmesh.telemetry.metrics import NodeMetrics

CONFIG_VARIABLE = "ASGI_APP_CONFIG"


class _Collected(logging.Handler):
    """Keeps the messages of bucketmesh's warnings (and worse)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": b"hello"})


async def _json(send: Send, status: int, document: Any) -> None:
    body = json.dumps(document).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app() -> Any:
    config = json.loads(os.environ[CONFIG_VARIABLE])
    rules = [Rule.create(**rule) for rule in config["rules"]]
    limiter = Limiter(
        rules, replica_id="us-east-1/web-1/1", max_buckets=config.get("max_buckets", 1_000_000)
    )
    metrics = NodeMetrics() if config.get("metrics") else None
    options = dict(config.get("middleware", {}))
    if metrics is not None:
        options["metrics"] = metrics
    middleware = RateLimitMiddleware(upstream, limiter, **options)
    collected = _Collected()
    logging.getLogger("bucketmesh").addHandler(collected)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/_test/"):
            await middleware(scope, receive, send)
            return
        message: Message = await receive()  # the (empty) request body
        assert message["type"] == "http.request"
        if path == "/_test/state":
            await _json(
                send,
                200,
                {
                    "no_client_address": getattr(middleware, "no_client_address", None),
                    "warnings": collected.messages,
                    "client": scope.get("client"),
                    "metrics": metrics.exposition().decode() if metrics is not None else None,
                },
            )
        elif path == "/_test/configure":
            query = dict(parse_qsl(scope.get("query_string", b"").decode()))
            changed = limiter.configure(query["rule"], capacity=int(query["capacity"]))
            await _json(send, 200, {"capacity": changed.capacity})
        else:
            await _json(send, 404, {"path": path})

    return app
