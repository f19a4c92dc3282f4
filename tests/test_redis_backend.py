"""The redis backend end to end: real ``bucketmesh serve`` nodes on a real redis-server.

Two API nodes of one region share one Redis; they are hammered concurrently,
Redis is killed and restarted under them, and a Redis region replicates with a
memory region through the sync mesh. Nothing asserts a duration: checks poll
until they hold or a generous deadline passes, and counts are exact.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from conftest import ServerFactory, free_port, make_config, spawn_serve

DEADLINE_S = 30.0
SECRET = "redis-test-secret-0123456789abcdef"
T = TypeVar("T")


def eventually(check: Callable[[], T], what: str, timeout: float = DEADLINE_S) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, httpx.HTTPError) as error:
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout}s: {what}: {error}") from error
        time.sleep(0.05)


def redis_config(url: str, buckets: list[dict[str, Any]], **settings: Any) -> dict[str, Any]:
    return make_config(
        buckets, storage={"backend": "redis", "redisUrl": url, "redisTimeoutMs": 3000}, **settings
    )


def replicas(client: httpx.Client, key: str) -> dict[str, int]:
    response = client.get(f"/v1/buckets/{key}")
    assert response.status_code == 200, response.text
    return {rid: entry["used"] for rid, entry in response.json()["replicas"].items()}


def hammer(urls: list[str], path: str, seconds: float, threads_per_url: int = 4) -> list[int]:
    """POST ``path`` from several threads per node for ``seconds``; every status seen."""
    statuses: list[int] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker(url: str) -> None:
        seen = []
        with httpx.Client(base_url=url, timeout=10.0) as client:
            while time.monotonic() < stop:
                seen.append(client.post(path).status_code)
        with lock:
            statuses.extend(seen)

    threads = [
        threading.Thread(target=worker, args=(url,)) for url in urls for _ in range(threads_per_url)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    return statuses


def test_two_nodes_on_one_redis_grant_exactly_capacity_plus_refill(
    serve: ServerFactory, redis_server: Any
) -> None:
    buckets = [
        {"name": "hot", "key": "hot-{{ .Request.Query.k }}", "capacity": 40, "refillRate": 20}
    ]
    config = redis_config(redis_server.url, buckets)
    nodes = [serve(config, node="node-a"), serve(config, node="node-b")]
    started = time.time_ns()
    statuses = hammer([n.base_url for n in nodes], "/v1/rate?k=one", seconds=2.5)
    elapsed_s = (time.time_ns() - started) / 1e9
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    allowed = statuses.count(200)
    assert statuses.count(429) > 0, "the key was not saturated"
    # Never more than the bucket holds plus what refilled while the test ran.
    assert allowed <= 40 + 20 * elapsed_s
    # Every grant is recorded under the region's one replica id, no more, no less;
    # and both nodes read the same state from Redis.
    with nodes[0].client() as a, nodes[1].client() as b:
        used = replicas(a, "hot-one")
        assert used == replicas(b, "hot-one")
    assert len(used) == 1
    ((replica_id, count),) = used.items()
    assert re.fullmatch(r"us-east-1/redis/\d+", replica_id)
    assert count == allowed
    # Saturated: the refill was spent too, not just the burst.
    assert allowed > 40


def test_decisions_are_batched_into_few_script_calls(
    serve: ServerFactory, redis_server: Any
) -> None:
    buckets = [
        {"name": "wide", "key": "w-{{ .Request.Query.k }}", "capacity": 10**6, "refillRate": 1}
    ]
    node = serve(redis_config(redis_server.url, buckets))

    async def burst() -> list[int]:
        # 200 requests over 50 connections at once: however slow the machine, many
        # of them wait in the node's sockets together, as under real load
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
        async with httpx.AsyncClient(base_url=node.base_url, limits=limits, timeout=30) as c:
            answers = await asyncio.gather(*(c.post("/v1/rate?k=x") for _ in range(200)))
        return [answer.status_code for answer in answers]

    statuses = asyncio.run(burst())
    assert set(statuses) == {200}
    with node.client() as client:
        text = client.get("/metrics").text
    calls = float(re.search(r"^bucketmesh_store_script_calls_total (\S+)$", text, re.M)[1])
    decided = float(re.search(r"^bucketmesh_store_decisions_total (\S+)$", text, re.M)[1])
    assert decided == len(statuses)
    assert calls < decided  # several concurrent decisions shared one script call


POLICY_BUCKETS = [
    {
        "name": "open",
        "key": "open-{{ .Request.Query.u }}",
        "capacity": 1,
        "refillRate": 0.001,
        "onStoreFailure": "allow",
    },
    {
        "name": "closed",
        "key": "closed-{{ .Request.Query.u }}",
        "capacity": 100,
        "refillRate": 0.001,
        "onStoreFailure": "deny",
    },
    {
        "name": "own",
        "key": "own-{{ .Request.Query.u }}",
        "capacity": 5,
        "refillRate": 0.001,
        "onStoreFailure": "local",
    },
]


def metric(client: httpx.Client, selector: str) -> float:
    text = client.get("/metrics").text
    match = re.search(rf"^{re.escape(selector)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_redis_stopped_and_restarted_each_policy_does_what_it_says(
    serve: ServerFactory, redis_server: Any
) -> None:
    node = serve(redis_config(redis_server.url, POLICY_BUCKETS))
    with node.client() as client:

        def rate(path: str) -> httpx.Response:
            response = client.post(path)
            assert response.status_code < 500, response.text
            return response

        # Before: everything is decided in Redis.
        first = [
            client.post("/v1/rate", json={"key": "open-1", "rule": "open"}).status_code
            for _ in range(2)
        ]
        assert first == [200, 429]
        assert (
            client.post("/v1/rate", json={"key": "closed-1", "rule": "closed"}).status_code == 200
        )
        own = [
            client.post("/v1/rate", json={"key": "own-1", "rule": "own"}).status_code
            for _ in range(2)
        ]
        assert own == [200, 200]
        assert replicas(client, "own-1") != {}  # the mirror has read the region state

        # Traffic keeps flowing while Redis dies.
        errors: list[int] = []
        stop = threading.Event()

        def background() -> None:
            with node.client() as bg:
                while not stop.is_set():
                    status = bg.post(
                        "/v1/rate", json={"key": "closed-bg", "rule": "closed"}
                    ).status_code
                    if status >= 500:
                        errors.append(status)

        thread = threading.Thread(target=background)
        thread.start()
        try:
            redis_server.stop()
            eventually(lambda: _assert_status(client, "/readyz", 503), "readyz reports the store")
            assert "redis unavailable" in client.get("/readyz").json()["checks"]["store"]

            # allow: fail open, even on a bucket Redis had emptied
            for _ in range(3):
                assert (
                    client.post("/v1/rate", json={"key": "open-1", "rule": "open"}).status_code
                    == 200
                )
            # deny: fail closed, with a Retry-After
            denied = client.post("/v1/rate", json={"key": "closed-1", "rule": "closed"})
            assert denied.status_code == 429 and "Retry-After" in denied.headers
            # local: the same limits from a local bucket seeded with the region state:
            # 2 of 5 were spent in Redis, so 3 more, then 429
            local = [
                client.post("/v1/rate", json={"key": "own-1", "rule": "own"}).status_code
                for _ in range(5)
            ]
            assert local == [200, 200, 200, 429, 429]
            assert metric(client, 'bucketmesh_store_fallback_decisions_total{policy="allow"}') >= 3
            assert metric(client, 'bucketmesh_store_fallback_decisions_total{policy="deny"}') >= 1
            assert metric(client, 'bucketmesh_store_fallback_decisions_total{policy="local"}') == 5
            assert metric(client, "bucketmesh_store_up") == 0.0

            # Redis comes back (empty: no persistence); the node recovers by itself.
            redis_server.start()
            eventually(lambda: _assert_status(client, "/readyz", 200), "readyz after recovery")
        finally:
            stop.set()
            thread.join(30)
        assert errors == []
        assert metric(client, "bucketmesh_store_recoveries_total") >= 1
        # What the local bucket spent was merged into Redis under the node's own id,
        # and the region's own count came back from the node's mirror: 5 of 5 spent.
        used = replicas(client, "own-1")
        assert sum(used.values()) == 5, used
        assert any("-local/" in rid for rid in used), used
        assert client.post("/v1/rate", json={"key": "own-1", "rule": "own"}).status_code == 429
        # and decisions are made in Redis again: the deny rule grants
        assert (
            client.post("/v1/rate", json={"key": "closed-2", "rule": "closed"}).status_code == 200
        )
        assert redis_server.client().exists("bm:us-east-1:{closed-2}") == 1


def _assert_status(client: httpx.Client, path: str, status: int) -> None:
    got = client.get(path)
    assert got.status_code == status, got.text


# -- a Redis region and a memory region, through the mesh ------------------------------


class MeshNode:
    """A ``bucketmesh serve`` process on a port chosen before its peers start."""

    def __init__(self, name: str, config: dict[str, Any], directory: Path) -> None:
        self.name = name
        self.config_path = directory / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = directory / f"{name}.log"
        self.base_url = "http://" + config["listen"]
        self.process = spawn_serve(self.config_path, self.log_path, BUCKETMESH_SYNC_SECRET=SECRET)
        self.client = httpx.Client(base_url=self.base_url, timeout=10.0)

    def ready(self) -> None:
        assert self.process.poll() is None, self.log_path.read_text()
        assert self.client.get("/readyz").status_code == 200

    def stop(self) -> str:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def two_regions(tmp_path: Path, redis_server: Any) -> Iterator[dict[str, MeshNode]]:
    buckets = [
        {"name": "g", "key": "g-{{ .Request.Query.k }}", "capacity": 1000, "refillRate": 0.01}
    ]
    ports = {"redis-a": free_port(), "redis-b": free_port(), "mem": free_port()}
    regions = {"redis-a": "eu-west-1", "redis-b": "eu-west-1", "mem": "us-west-2"}
    nodes: dict[str, MeshNode] = {}
    for name, port in ports.items():
        region = regions[name]
        # the memory region sends to one node of the Redis region; each Redis node sends
        # to the memory region
        peer_urls = (
            {"eu-west-1": f"http://127.0.0.1:{ports['redis-a']}"}
            if region == "us-west-2"
            else {"us-west-2": f"http://127.0.0.1:{ports['mem']}"}
        )
        config = make_config(
            buckets,
            region=region,
            node=name,
            listen=f"127.0.0.1:{port}",
            sync={
                "enabled": True,
                "syncClusterId": "redis-mesh",
                "peers": ["eu-west-1", "us-west-2"],
                "peerUrls": peer_urls,
                "secret": "${BUCKETMESH_SYNC_SECRET}",
                "interval": 20,
                "peerTimeout": 500,
            },
        )
        if region == "eu-west-1":
            config["storage"] = {
                "backend": "redis",
                "redisUrl": redis_server.url,
                "redisTimeoutMs": 3000,  # a loaded test box must not look like a failure
            }
        nodes[name] = MeshNode(name, config, tmp_path)
    try:
        for node in nodes.values():
            eventually(node.ready, f"{node.name} ready")
        yield nodes
    finally:
        logs = {name: node.stop() for name, node in nodes.items()}
        for name, log in logs.items():
            assert "Traceback" not in log and "internal error" not in log, f"{name}:\n{log}"


def test_a_redis_region_and_a_memory_region_converge_through_the_mesh(
    two_regions: dict[str, MeshNode],
) -> None:
    a, b, mem = two_regions["redis-a"], two_regions["redis-b"], two_regions["mem"]
    for node, count in ((a, 7), (b, 5), (mem, 11)):
        for _ in range(count):
            assert node.client.post("/v1/rate?k=shared").status_code == 200

    def converged() -> dict[str, int]:
        seen = [replicas(node.client, "g-shared") for node in (a, b, mem)]
        assert seen[0] == seen[1] == seen[2], seen
        assert sum(seen[0].values()) == 23, seen
        return seen[0]

    used = eventually(converged, "both regions hold every grant of the key")
    # one entry for the whole Redis region (both nodes), one for the memory node
    redis_ids = [rid for rid in used if rid.startswith("eu-west-1/redis/")]
    assert len(redis_ids) == 1 and used[redis_ids[0]] == 12
    assert sum(n for rid, n in used.items() if rid.startswith("us-west-2/")) == 11
    # and the level agrees everywhere: 1000 − 23
    for node in (a, b, mem):
        body = node.client.get("/v1/buckets/g-shared").json()
        assert body["tokens_remaining"] == 1000 - 23


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "storage.redisTimeoutMs must be >= 1, got 0"),
        ("soon", "storage.redisTimeoutMs: expected an integer, got 'soon'"),
    ],
)
def test_a_bad_redis_timeout_names_file_and_field(tmp_path: Path, value: str, message: str) -> None:
    from bucketmesh.config import ConfigError, load_config

    path = tmp_path / "bucketmesh.yaml"
    path.write_text(f"storage:\n  backend: redis\n  redisTimeoutMs: {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == f"{path}: {message}"
    assert caught.value.field == "storage.redisTimeoutMs"


def test_a_frozen_redis_times_out_and_the_node_recovers_when_it_thaws(
    serve: ServerFactory, redis_server: Any
) -> None:
    """SIGSTOP: connections stay open and nothing answers, the slow-Redis case."""
    buckets = [
        {
            "name": "closed",
            "key": "c-{{ .Request.Query.u }}",
            "capacity": 100,
            "refillRate": 0.001,
            "onStoreFailure": "deny",
        },
    ]
    config = make_config(
        buckets,
        storage={"backend": "redis", "redisUrl": redis_server.url, "redisTimeoutMs": 300},
    )
    node = serve(config)
    with node.client() as client:
        assert client.post("/v1/rate?u=1").status_code == 200
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            # the first decision waits at most the timeout, then the policy answers
            first = client.post("/v1/rate?u=1")
            assert first.status_code == 429, first.text
            eventually(lambda: _assert_status(client, "/readyz", 503), "readyz reports it")
            assert "TimeoutError" in client.get("/readyz").json()["checks"]["store"]
            assert metric(client, "bucketmesh_store_failures_total") >= 1
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        eventually(lambda: _assert_status(client, "/readyz", 200), "readyz after SIGCONT")
        assert client.post("/v1/rate?u=1").status_code == 200
        used = replicas(client, "c-1")
        # The call that timed out was still in Redis's socket buffer and ran on SIGCONT:
        # a decision refused by the policy may still have been charged (the safe way).
        assert sum(used.values()) in (2, 3), used


def test_batches_on_redis_are_one_call_and_atomic_ones_all_or_nothing(
    serve: ServerFactory, redis_server: Any
) -> None:
    buckets = [{"name": "b", "key": "b-{{ .Request.Query.u }}", "capacity": 5, "refillRate": 0.001}]
    node = serve(redis_config(redis_server.url, buckets))
    with node.client() as client:

        def batch(atomic: bool, *items: tuple[str, int]) -> dict[str, Any]:
            body = {
                "atomic": atomic,
                "requests": [{"key": k, "rule": "b", "tokens": t} for k, t in items],
            }
            response = client.post("/v1/rate/batch", json=body)
            assert response.status_code == 200, response.text
            return dict(response.json())

        # x holds 5, y holds 5: 3 + 3 of x cannot be served whole, so nothing is spent
        refused = batch(True, ("b-x", 3), ("b-y", 1), ("b-x", 3))
        assert refused["allowed"] == 0 and refused["denied"] == 3
        assert client.get("/v1/buckets/b-x").json()["tokens_remaining"] == 5
        assert client.get("/v1/buckets/b-y").json()["tokens_remaining"] == 5
        served = batch(True, ("b-x", 2), ("b-y", 1), ("b-x", 3))
        assert served["allowed"] == 3
        assert client.get("/v1/buckets/b-x").json()["tokens_remaining"] == 0
        empty = batch(True, ("b-x", 1), ("b-y", 1))
        assert empty["allowed"] == 0 and empty["results"][0]["retry_after"] > 0
        # not atomic: item by item, in order
        mixed = batch(False, ("b-y", 3), ("b-y", 3), ("b-y", 1))
        assert [r["allowed"] for r in mixed["results"]] == [True, False, True]
        assert replicas(client, "b-y") == {next(iter(replicas(client, "b-x"))): 1 + 3 + 1}
        # a bad item fails the whole batch with nothing spent
        bad = client.post(
            "/v1/rate/batch", json={"requests": [{"key": "b-z", "rule": "b", "tokens": 9}]}
        )
        assert bad.status_code == 400 and bad.json()["field"] == "requests[0].tokens"


def test_a_node_started_without_redis_serves_by_policy_and_joins_when_it_appears(
    serve: ServerFactory, tmp_path: Path
) -> None:
    from redis_server import RedisServer

    later = RedisServer(tmp_path)  # its port is chosen; nothing listens there yet
    node = serve(redis_config(later.url, POLICY_BUCKETS), wait_ready=False)
    try:
        with node.client() as client:
            eventually(lambda: _assert_status(client, "/healthz", 200), "node listening")
            assert client.get("/readyz").status_code == 503
            assert (
                client.post("/v1/rate", json={"key": "open-9", "rule": "open"}).status_code == 200
            )
            assert (
                client.post("/v1/rate", json={"key": "closed-9", "rule": "closed"}).status_code
                == 429
            )
            assert client.post("/v1/rate", json={"key": "own-9", "rule": "own"}).status_code == 200
            later.start()
            eventually(lambda: _assert_status(client, "/readyz", 200), "joined the store")
            # the local grant made before Redis existed is in Redis now
            assert sum(replicas(client, "own-9").values()) == 1
            assert (
                client.post("/v1/rate", json={"key": "closed-9", "rule": "closed"}).status_code
                == 200
            )
            assert replicas(client, "closed-9") == {
                rid: 1 for rid in replicas(client, "closed-9") if "/redis/" in rid
            }
    finally:
        later.stop()


def test_a_patch_on_one_node_reaches_the_regions_other_nodes_through_redis(
    serve: ServerFactory, redis_server: Any
) -> None:
    buckets = [
        {"name": "p", "key": "p-{{ .Request.Query.u }}", "capacity": 10, "refillRate": 0.001}
    ]
    config = redis_config(redis_server.url, buckets)
    a, b = serve(config, node="node-a"), serve(config, node="node-b")
    with a.client() as ca, b.client() as cb:
        for _ in range(4):
            assert ca.post("/v1/rate?u=1").status_code == 200
        # a per-key change keeps the level (raising capacity never refills): 10 − 4 = 6 left
        patched = ca.patch("/v1/buckets/p-1", json={"capacity": 20})
        assert patched.status_code == 200, patched.text
        assert cb.get("/v1/buckets/p-1").json()["capacity"] == 20
        granted = [cb.post("/v1/rate?u=1").status_code for _ in range(7)]
        assert granted == [200] * 6 + [429]
        # a rule change reaches node b's new buckets (it polls the rules every 0.5 s)
        assert ca.patch("/v1/buckets/p", json={"capacity": 3}).status_code == 200

        def b_uses_the_new_rule() -> None:
            assert cb.get("/v1/buckets/p").json()["capacity"] == 3

        eventually(b_uses_the_new_rule, "node b learns the rule config")
        fresh = [cb.post("/v1/rate?u=2").status_code for _ in range(4)]
        assert fresh == [200, 200, 200, 429]
