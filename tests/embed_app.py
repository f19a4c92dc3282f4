"""An ASGI application whose rate limits are decided by an embedded mesh member, for
``uvicorn --workers N embed_app:app --app-dir tests``: every worker process claims a
slot of the mesh in the config named by ``EMBED_CONFIG`` and decides in-process
(``bucketmesh.embed.Member``); the sync secret comes from ``BUCKETMESH_SYNC_SECRET``.
"""

from __future__ import annotations

import os
from typing import Any

from bucketmesh.embed import Member


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


app = Member(os.environ["EMBED_CONFIG"]).asgi(hello)
