"""An HttpServer with tests/test_http_dispatch_paths.py's echo handler, in a process of its
own: tests/test_http_compiled.py runs it with ``BUCKETMESH_PURE=1`` (http/server.py from
its source, the reference) beside the compiled build in the test's process.

Prints ``<port> <server module file>`` once listening; serves until stdin closes."""

from __future__ import annotations

import asyncio
import json
import sys

import uvloop

from bucketmesh.http import server as server_module
from bucketmesh.http.server import HttpServer, ServerLimits


async def main(limits: dict[str, float]) -> None:
    from test_http_dispatch_paths import handler

    server = HttpServer(handler, ServerLimits(**limits))  # type: ignore[arg-type]
    await server.start("127.0.0.1", 0)
    print(server.port, server_module.__file__, flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the test closes stdin
    await server.shutdown(grace=1.0)


if __name__ == "__main__":
    uvloop.run(main(json.loads(sys.argv[1])))
