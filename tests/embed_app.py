"""An ASGI application whose rate limits are decided by an embedded mesh member, for
``uvicorn --workers N embed_app:app --app-dir tests``: every worker process claims a
slot of the mesh in the config named by ``EMBED_CONFIG`` and decides in-process
(``bucketmesh.embed.Member``); the sync secret comes from ``BUCKETMESH_SYNC_SECRET``.
docs/client.md shows this file as its example (tests/test_embed.py checks they match).
"""

import os

from bucketmesh.embed import Member


async def hello(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


app = Member(os.environ["EMBED_CONFIG"]).asgi(hello)
