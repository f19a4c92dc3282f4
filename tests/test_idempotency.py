"""A request retried with the same ``Idempotency-Key`` is charged once (issue 12, case 6):
when its copies arrive at once on one Redis-backed node, when the retry goes to the
region's other node, and when it comes after the memory node that answered was killed
with kill -9. Real ``bucketmesh serve`` processes, a real redis-server."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import httpx
from conftest import ServerFactory, make_config

RULE = {"name": "r", "key": "r-{{ .Request.Header.X-U }}", "capacity": 100, "refillRate": 0.001}
BODY = {"key": "k", "rule": "r", "tokens": 3}


def redis_config(url: str) -> dict[str, Any]:
    return make_config(
        [RULE], storage={"backend": "redis", "redisUrl": url, "redisTimeoutMs": 3000}
    )


def used(client: httpx.Client) -> int:
    state = client.get("/v1/bucket/state", params={"key": "k", "rule": "r"}).json()
    return sum(entry["used"] for entry in state["replicas"].values())


def test_concurrent_copies_on_one_redis_node_are_charged_once(
    serve: ServerFactory, redis_server: Any
) -> None:
    node = serve(redis_config(redis_server.url))

    async def copies() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=8)
        async with httpx.AsyncClient(base_url=node.base_url, timeout=30, limits=limits) as c:
            headers = {"Idempotency-Key": "same-request"}
            return await asyncio.gather(
                *(c.post("/v1/rate", json=BODY, headers=headers) for _ in range(8))
            )

    answers = asyncio.run(copies())
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    assert len({a.json()["tokens_remaining"] for a in answers}) == 1
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 7
    with node.client() as client:
        assert used(client) == 3  # one charge of 3 tokens, not up to eight


def test_a_retry_on_the_regions_other_redis_node_is_not_charged_again(
    serve: ServerFactory, redis_server: Any
) -> None:
    config = redis_config(redis_server.url)
    first, second = serve(config, node="node-a"), serve(config, node="node-b")
    headers = {"Idempotency-Key": "retried-elsewhere"}
    with first.client() as a, second.client() as b:
        answer = a.post("/v1/rate", json=BODY, headers=headers)
        assert answer.status_code == 200, answer.text
        retry = b.post("/v1/rate", json=BODY, headers=headers)
        assert retry.status_code == 200, retry.text
        assert retry.headers.get("idempotent-replayed") == "true"
        assert retry.json() == answer.json()
        assert used(a) == 3 and used(b) == 3
        # another key, or another body, is another request
        other = b.post("/v1/rate", json={**BODY, "tokens": 2}, headers=headers)
        assert other.status_code == 200 and "idempotent-replayed" not in other.headers
        assert used(b) == 5


def test_a_retry_after_kill_9_of_a_memory_node_is_not_charged_again(
    serve: ServerFactory, tmp_path: Path
) -> None:
    config = make_config([RULE], storage={"snapshot": str(tmp_path / "state.snap")})
    node = serve(config)
    headers = {"Idempotency-Key": "before-the-crash"}
    with node.client() as client:
        answer = client.post("/v1/rate", json=BODY, headers=headers)
        assert answer.status_code == 200, answer.text
    node.kill()  # SIGKILL: no final snapshot, nothing flushed

    node = serve(config)
    with node.client() as client:
        retry = client.post("/v1/rate", json=BODY, headers=headers)
        assert retry.status_code == 200, retry.text
        assert retry.headers.get("idempotent-replayed") == "true"
        assert retry.json() == answer.json()
        assert used(client) == 3
    # and across a clean restart too (the answers' file is compacted at each snapshot)
    assert node.stop(signal.SIGTERM) == 0
    node = serve(config)
    with node.client() as client:
        again = client.post("/v1/rate", json=BODY, headers=headers)
        assert again.headers.get("idempotent-replayed") == "true", again.text
        assert used(client) == 3
