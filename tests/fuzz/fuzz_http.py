"""Fuzz target: raw bytes into the HTTP/1.1 server and the Rating API behind it.

A real ``HttpServer`` (http/server.py) listens on loopback with the real router and
``RatingApp`` (api/routes.py) over an in-memory ``Limiter``, wired as node/serve.py
wires them. Each input is written to a fresh connection, the write side is closed,
and everything the server sends back is read until it closes. Invariants: the
server reports no handler or protocol exception (``on_error``), answers no 5xx, and
what it sends is a sequence of well-formed HTTP/1.1 responses (status line, header
lines, a ``Content-Length`` body; HEAD and 1xx/204/304 answers bodiless).

Load shedding is left out of it (``shed_lag`` far beyond any pause here): whether a
request is shed depends on load, not on its bytes (tests/test_shedding.py).

    .venv/bin/python tests/fuzz/fuzz_http.py [libFuzzer flags] [corpus dirs]
"""

from __future__ import annotations

import asyncio
import re
import sys

import atheris

with atheris.instrument_imports():
    from bucketmesh.api.routes import RatingApp
    from bucketmesh.core.limiter import Limiter
    from bucketmesh.core.rules import Rule
    from bucketmesh.http.router import Router
    from bucketmesh.http.server import HttpServer, ServerLimits
    from bucketmesh.telemetry.metrics import NodeMetrics

ADMIN_TOKEN = "fuzz-admin-token"
_STATUS = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [^\r\n]*\r\n")
_HEADER = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+: [^\r\n]*\r\n")
_errors: list[BaseException] = []


class Finding(AssertionError):
    pass


def _app() -> Router:
    rules = [
        Rule.create("k-{{ .Request.Header.X-Key }}", 5, 1.0),
        Rule.create("agent-{{ .Request.Header.X-API-Key | sha256 }}", 10, 2.0, name="agent"),
    ]
    router = Router(NodeMetrics())
    RatingApp(
        Limiter(rules, replica_id="r/n/1"),
        region="r",
        node="n",
        cluster_id="fuzz",
        admin_token=ADMIN_TOKEN,
        router=router,
    )
    return router


def well_formed(reply: bytes, request: bytes) -> list[int]:
    """The statuses of the responses in ``reply``; raises ``Finding`` if it is not a
    sequence of well-formed HTTP/1.1 responses."""
    statuses: list[int] = []
    pos = 0
    while pos < len(reply):
        line = _STATUS.match(reply, pos)
        if line is None:
            raise Finding(f"not a status line at byte {pos}: {reply[pos : pos + 80]!r}")
        status = int(line.group(1))
        statuses.append(status)
        pos = line.end()
        length: int | None = None
        while not reply.startswith(b"\r\n", pos):
            header = _HEADER.match(reply, pos)
            if header is None:
                raise Finding(f"not a header line at byte {pos}: {reply[pos : pos + 80]!r}")
            name, _, value = header.group().partition(b": ")
            if name.lower() == b"content-length":
                if length is not None:
                    raise Finding("two Content-Length headers")
                length = int(value.strip())
            pos = header.end()
        pos += 2
        if status < 200 or status in (204, 304):
            continue
        if length is None:
            raise Finding(f"a {status} response without Content-Length")
        rest = reply[pos:]
        if length and b"HEAD" in request and (not rest or _STATUS.match(rest)):
            continue  # a HEAD answer: its Content-Length announces a body it does not carry
        if len(rest) < length:
            raise Finding(f"a body cut short: {len(rest)} of {length} bytes")
        pos += length
    return statuses


class Target:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        limits = ServerLimits(shed_lag=3600.0, header_timeout=5.0, body_timeout=5.0)
        self.server = HttpServer(_app(), limits, on_error=_errors.append)
        self.loop.run_until_complete(self.server.start("127.0.0.1", 0))

    async def _exchange(self, data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        try:
            writer.write(data)
            writer.write_eof()
            return await asyncio.wait_for(reader.read(), 30.0)
        except ConnectionResetError:
            return b""  # closed after a final answer with input still unread: a reset
        finally:
            writer.close()

    def check(self, data: bytes) -> None:
        reply = self.loop.run_until_complete(self._exchange(data))
        if _errors:
            raise Finding(f"the server reported an exception: {_errors[0]!r}") from _errors[0]
        for status in well_formed(reply, data):
            if status >= 500:
                raise Finding(f"a {status} answer to {data[:200]!r}: {reply[:400]!r}")


def main(argv: list[str]) -> None:
    target = Target()
    atheris.Setup(argv, lambda data: target.check(bytes(data)))
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
