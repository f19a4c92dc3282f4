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
import socket
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
from conftest import Mesh, ServerFactory, eventually, make_config

from bucketmesh.core.bucket import delta_tat
from bucketmesh.core.decisions import Ask


def redis_config(url: str, buckets: list[dict[str, Any]], **settings: Any) -> dict[str, Any]:
    return make_config(
        buckets, storage={"backend": "redis", "redisUrl": url, "redisTimeoutMs": 3000}, **settings
    )


def replicas(client: httpx.Client, key: str) -> dict[str, int]:
    response = client.get(f"/v1/buckets/{key}")
    assert response.status_code == 200, response.text
    return {rid: entry["used"] for rid, entry in response.json()["replicas"].items()}


class Answer(NamedTuple):
    sent_ns: int  # wall clock before the request was sent (the nodes' clock, too)
    received_ns: int  # wall clock once its answer was in
    status: int


def hammer_until_saturated(
    urls: list[str], path: str, capacity: int, threads_per_url: int = 4
) -> list[Answer]:
    """POST ``path`` from several threads per node until a request is denied after more
    than ``capacity`` + 3 grants (the refill is being spent too), or a generous deadline
    passes; every answer seen."""
    answers: list[Answer] = []
    granted = [0]
    lock = threading.Lock()
    saturated = threading.Event()
    deadline = time.monotonic() + 60.0

    def worker(url: str) -> None:
        with httpx.Client(base_url=url, timeout=10.0) as client:
            while not saturated.is_set() and time.monotonic() < deadline:
                sent = time.time_ns()
                status = client.post(path).status_code
                with lock:
                    answers.append(Answer(sent, time.time_ns(), status))
                    granted[0] += status == 200
                    if status == 429 and granted[0] > capacity + 3:
                        saturated.set()

    threads = [
        threading.Thread(target=worker, args=(url,)) for url in urls for _ in range(threads_per_url)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    return answers


def test_two_nodes_on_one_redis_grant_exactly_capacity_plus_refill(
    serve: ServerFactory, redis_server: Any
) -> None:
    """Two nodes hammer one key of one Redis until it is saturated; whatever the speed of
    the machine, every grant is in Redis under the region's one replica id, and the count
    is the bucket's capacity plus what refilled since its base time, to within the
    instants the client saw its decisions at."""
    from bucketmesh.storage.redis_store import parse_bucket

    capacity, rate = 40, 5
    rule = {"name": "hot", "key": "hot-{{ .Request.Query.k }}"}
    buckets = [{**rule, "capacity": capacity, "refillRate": rate}]
    config = redis_config(redis_server.url, buckets)
    nodes = [serve(config, node="node-a"), serve(config, node="node-b")]
    answers = hammer_until_saturated([n.base_url for n in nodes], "/v1/rate?k=one", capacity)
    ended_ns = time.time_ns()
    statuses = [answer.status for answer in answers]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    allowed = statuses.count(200)
    # Saturated (a denial), and the refill was spent too, not just the burst.
    assert statuses.count(429) > 0, f"the key was not saturated within 60 s: {allowed} grants"
    assert allowed > capacity
    # Every grant is recorded under the region's one replica id, no more, no less;
    # and both nodes read the same state from Redis.
    with nodes[0].client() as a, nodes[1].client() as b:
        used = replicas(a, "hot-one")
        assert used == replicas(b, "hot-one")
    assert len(used) == 1
    ((replica_id, count),) = used.items()
    assert re.fullmatch(r"us-east-1/redis/\d+", replica_id)
    assert count == allowed
    # One bucket for both nodes, exactly: GCRA on the final stored state (base B and
    # Σ used U, which only grow; emission interval T) says U·T ≤ C·T + (t − B) at the
    # last grant's instant t, and (U + 1)·T > C·T + (t − B) at any denial's. Each
    # decision was taken between its request's sending and its answer's arrival (the
    # nodes read the same clock as the test), so these hold at any speed.
    stored = parse_bucket("hot-one", redis_server.client().hgetall("bm:us-east-1:{hot-one}"))
    assert stored is not None
    interval = stored.config.interval_ns
    # GCRA's base B = TAT − U·T (docs/design.md section 3: the bucket's own anchor)
    base = delta_tat(stored) - sum(stored.used.values()) * interval
    assert sum(stored.used.values()) == allowed
    # the bucket's base is an instant of this test (its first decision, unless it filled up)
    assert min(answer.sent_ns for answer in answers) <= base <= ended_ns
    last_grant_received = max(answer.received_ns for answer in answers if answer.status == 200)
    last_denial_sent = max(answer.sent_ns for answer in answers if answer.status == 429)
    assert allowed * interval <= capacity * interval + (last_grant_received - base), "over-admitted"
    assert (allowed + 1) * interval > capacity * interval + (last_denial_sent - base), (
        "under-admitted"
    )


def unread_bytes(server_port: int, client_ports: set[int]) -> dict[int, int]:
    """Bytes the server on ``server_port`` has not read yet from each of these client
    connections (its side's receive queue, from Linux's /proc/net/tcp)."""
    unread: dict[int, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        if local_port == server_port and remote_port in client_ports:
            unread[remote_port] = int(fields[4].split(":")[1], 16)
    return unread


def test_decisions_are_batched_into_few_script_calls(
    serve: ServerFactory, redis_server: Any
) -> None:
    from bucketmesh.node.settings import NodeSettings

    buckets = [
        {"name": "wide", "key": "w-{{ .Request.Query.k }}", "capacity": 10**6, "refillRate": 1}
    ]
    # Redis is held below for as long as the test needs: no store timeout may fire meanwhile
    config = make_config(
        buckets,
        storage={"backend": "redis", "redisUrl": redis_server.url, "redisTimeoutMs": 120_000},
    )
    node = serve(config)
    connections = NodeSettings.__dataclass_fields__["redis_calls_in_flight"].default
    admin = redis_server.client()
    request = (
        b"POST /v1/rate?k=x HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n"
        b"Connection: close\r\n\r\n"
    )
    # Redis runs no script while paused: the node's first calls wait in it, at most
    # `connections` of them, and every decision that reaches the node meanwhile waits
    # for the next call. 50 requests at once, all read by the node before Redis resumes.
    admin.execute_command("CLIENT", "PAUSE", "120000", "WRITE")
    sockets: list[socket.socket] = []
    try:
        for _ in range(50):
            sock = socket.create_connection(node.address, timeout=30)
            sockets.append(sock)
            sock.sendall(request)
        ports = {sock.getsockname()[1] for sock in sockets}

        def all_read() -> None:
            unread = unread_bytes(node.port, ports)
            assert len(unread) == len(ports) and not any(unread.values()), unread

        eventually(all_read, "the node has read every request")
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
    statuses = []
    for sock in sockets:
        with sock:
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        statuses.append(int(reply.split(b" ", 2)[1]))
    assert statuses == [200] * 50
    with node.client() as client:
        text = client.get("/metrics").text
    calls = float(re.search(r"^bucketmesh_store_script_calls_total (\S+)$", text, re.M)[1])
    decided = float(re.search(r"^bucketmesh_store_decisions_total (\S+)$", text, re.M)[1])
    assert decided == len(statuses)
    # the calls held by Redis, then one for everything that waited
    assert calls <= connections + 1, (calls, connections)


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


@pytest.fixture
def two_regions(serve: ServerFactory, redis_server: Any) -> Mesh:
    """A Redis region of two nodes and a memory region of one. The memory region sends
    to the first node of the Redis region; each Redis node sends to the memory region."""
    buckets = [
        {"name": "g", "key": "g-{{ .Request.Query.k }}", "capacity": 1000, "refillRate": 0.01}
    ]
    redis = {
        "backend": "redis",
        "redisUrl": redis_server.url,
        "redisTimeoutMs": 3000,  # a loaded test box must not look like a failure
    }
    return Mesh(
        serve,
        {"redis-a": "eu-west-1", "redis-b": "eu-west-1", "mem": "us-west-2"},
        buckets=buckets,
        cluster_id="redis-mesh",
        overrides={
            "redis-a": {"node": "redis-a", "storage": redis},
            "redis-b": {"node": "redis-b", "storage": redis},
            "mem": {"node": "mem"},
        },
    ).start()


def test_a_redis_region_and_a_memory_region_converge_through_the_mesh(
    two_regions: Mesh,
) -> None:
    a, b, mem = (two_regions.nodes[name] for name in ("redis-a", "redis-b", "mem"))
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
    ("name", "value", "message"),
    [
        ("redisTimeoutMs", "0", "storage.redisTimeoutMs must be >= 1, got 0"),
        ("redisTimeoutMs", "soon", "storage.redisTimeoutMs: expected an integer, got 'soon'"),
        ("redisCallsInFlight", "0", "storage.redisCallsInFlight must be >= 1, got 0"),
        (
            "redisCallsInFlight",
            "many",
            "storage.redisCallsInFlight: expected an integer, got 'many'",
        ),
    ],
)
def test_a_bad_redis_setting_names_file_and_field(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    from bucketmesh.node.config import ConfigError, load_config

    path = tmp_path / "bucketmesh.yaml"
    path.write_text(f"storage:\n  backend: redis\n  {name}: {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == f"{path}: {message}"
    assert caught.value.field == f"storage.{name}"


def test_redis_calls_in_flight_reaches_the_backend_from_the_file(tmp_path: Path) -> None:
    """storage.redisCallsInFlight bounds the node's decision calls in flight; unset, the
    node's default is the backend's own."""
    from bucketmesh.core.rules import Rule
    from bucketmesh.node.assemble import node_settings
    from bucketmesh.node.config import load_config
    from bucketmesh.node.settings import NodeSettings
    from bucketmesh.storage import REDIS_CALLS_IN_FLIGHT as CALLS_IN_FLIGHT
    from bucketmesh.storage.redis_backend import RedisBackend

    path = tmp_path / "bucketmesh.yaml"
    path.write_text("storage:\n  backend: redis\n  redisCallsInFlight: 3\n")
    assert node_settings(load_config(str(path))).redis_calls_in_flight == 3
    path.write_text("storage:\n  backend: redis\n")
    assert node_settings(load_config(str(path))).redis_calls_in_flight == CALLS_IN_FLIGHT
    assert NodeSettings.__dataclass_fields__["redis_calls_in_flight"].default == CALLS_IN_FLIGHT
    backend = RedisBackend(
        [Rule.create("k-{{ .Request.Query.u }}", 5, 1.0, name="r")],
        region="eu",
        node="n1",
        url="redis://127.0.0.1:1/0",
        calls_in_flight=3,
    )
    assert backend.max_inflight == 3


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
        # long enough that no call times out before the freeze on a loaded machine
        storage={"backend": "redis", "redisUrl": redis_server.url, "redisTimeoutMs": 2000},
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


# -- review findings: one node's backend in process, on a real redis-server ----------


def _backend(url: str, *, region: str = "eu", node: str = "n1", **rule: Any) -> Any:
    from bucketmesh.core.rules import Rule
    from bucketmesh.storage.redis_backend import RedisBackend

    options = {"capacity": 10, "refill_rate": 0.01, "ttl": 3600.0, **rule}
    made = Rule.create(
        "k-{{ .Request.Query.user }}",
        options.pop("capacity"),
        options.pop("refill_rate"),
        name="r",
        **options,
    )
    return RedisBackend(
        [made], region=region, node=node, url=url, timeout_s=options.get("timeout_s", 2.0)
    )


async def settle(answer: Any) -> Any:
    """A decision-seam answer, now or later."""
    return await answer if hasattr(answer, "__await__") else answer


async def _joined(backend: Any) -> Any:
    await backend._rejoin()
    backend.up = True
    return backend


def _used(states: list[Any]) -> dict[str, int]:
    return {state.key: sum(state.used.values()) for state in states}


def test_a_redis_failure_under_atomic_batches_answers_every_request(redis_server: Any) -> None:
    """A3: the fallback of one atomic group raising (tokens above the rule's capacity
    but within the key's PATCHed one) must not leave that group or later ones hanging."""

    async def run() -> list[list[tuple[str, bool]]]:
        backend = await _joined(_backend(redis_server.url, on_store_failure="allow"))
        try:
            await settle(backend.acquire("A", 1, rule="r"))
            await backend.refresh(["A"])
            backend.mirror.configure("A", capacity=100)
            await backend.publish("A", False)
            # Redis stops running scripts (a long pause, until the test ends it): the
            # script call times out
            backend.store.timeout_s = 0.3
            redis_server.client().execute_command("CLIENT", "PAUSE", "120000", "WRITE")
            first = asyncio.ensure_future(backend.acquire_many([Ask("A", 50, "r")], atomic=True))
            second = asyncio.ensure_future(backend.acquire_many([Ask("B", 1, "r")], atomic=True))
            _, hanging = await asyncio.wait([first, second], timeout=10)
            for task in hanging:
                task.cancel()
            assert not hanging, "requests left unanswered"
            assert not backend.up
            return [[(d.key, d.allowed) for d in task.result()] for task in (first, second)]
        finally:
            redis_server.client().execute_command("CLIENT", "UNPAUSE")
            await backend.store.close()

    # `allow` under the key's own capacity (100): both granted by the policy
    assert asyncio.run(run()) == [[("A", True)], [("B", True)]]


def test_atomic_groups_in_one_script_call_are_judged_in_order(redis_server: Any) -> None:
    """A1: two atomic batches on one key in the same call: the first takes 6 of 10,
    so the second ([A:6, C:1]) must be refused whole, C included."""

    async def run() -> tuple[list[Any], list[Any], dict[str, int]]:
        backend = await _joined(_backend(redis_server.url))
        try:
            one = asyncio.ensure_future(
                backend.acquire_many([Ask("A", 6, "r"), Ask("B", 1, "r")], atomic=True)
            )
            two = asyncio.ensure_future(
                backend.acquire_many([Ask("A", 6, "r"), Ask("C", 1, "r")], atomic=True)
            )
            d1, d2 = await asyncio.wait_for(asyncio.gather(one, two), 10)
            assert backend.calls == 1  # both in one script call
            return d1, d2, _used(await backend.store.read(["A", "B", "C"]))
        finally:
            await backend.store.close()

    d1, d2, used = asyncio.run(run())
    assert [d.allowed for d in d1] == [True, True]
    assert [d.allowed for d in d2] == [False, False]
    assert used == {"A": 6, "B": 1}


def test_an_atomic_batch_with_a_key_to_reconfigure_is_redone_whole(redis_server: Any) -> None:
    """A2: the rule's capacity drops to 5 while A holds 8: [B:1, A:3, A:3] needs 6 of
    A after the reconfigure, so nothing of the batch may be granted (B included)."""

    async def run() -> tuple[list[bool], dict[str, int]]:
        backend = await _joined(_backend(redis_server.url))
        try:
            assert (await settle(backend.acquire("A", 2, rule="r"))).allowed
            backend.mirror.configure("r", capacity=5)
            batch = [Ask("B", 1, "r"), Ask("A", 3, "r"), Ask("A", 3, "r")]
            decisions = await asyncio.wait_for(settle(backend.acquire_many(batch, atomic=True)), 10)
            return [d.allowed for d in decisions], _used(await backend.store.read(["A", "B"]))
        finally:
            await backend.store.close()

    allowed, used = asyncio.run(run())
    assert allowed == [False, False, False]
    assert used == {"A": 2}


def test_a_failure_while_redoing_sends_only_the_unanswered_to_the_policy(
    redis_server: Any,
) -> None:
    """B7: B is granted by Redis, A must be reconfigured and the read for that fails:
    only A goes to the `local` policy; B is not charged a second time locally."""
    admin = redis_server.client()
    # a user that may run the scripts but not read buckets back: the reconfigure read fails
    admin.execute_command("ACL", "SETUSER", "noread", "on", ">pw", "~*", "+@all", "-hgetall")
    url = redis_server.url.replace("redis://", "redis://noread:pw@")

    async def run() -> tuple[list[bool], dict[str, int], dict[str, int]]:
        backend = await _joined(_backend(url, on_store_failure="local"))
        try:
            assert (await settle(backend.acquire("A", 2, rule="r"))).allowed
            backend.mirror.configure("r", capacity=5)
            decisions = await asyncio.wait_for(
                backend.acquire_many([Ask("B", 1, "r"), Ask("A", 1, "r")], atomic=False), 10
            )
            assert not backend.up
            fallbacks = dict(backend.fallbacks)
            admin.execute_command("ACL", "SETUSER", "noread", "+hgetall")
            await backend._recover()
            return [d.allowed for d in decisions], fallbacks, _used(await backend.store.read(["B"]))
        finally:
            await backend.store.close()

    allowed, fallbacks, used = asyncio.run(run())
    assert allowed == [True, True]
    assert fallbacks == {"allow": 0, "deny": 0, "local": 1}  # A only
    assert used == {"B": 1}  # one grant, counted once


def test_a_batch_refused_for_tokens_above_a_lowered_capacity_charges_nothing(
    redis_server: Any,
) -> None:
    """A6: node 2 lowers A's capacity to 5; node 1 (still knowing 10) sends [B:1, A:8]:
    the batch is refused (400) and B must not have been charged."""
    from bucketmesh.core.limiter import InvalidTokens

    async def run() -> dict[str, int]:
        one = await _joined(_backend(redis_server.url, node="n1"))
        two = await _joined(_backend(redis_server.url, node="n2"))
        try:
            await settle(two.acquire("A", 1, rule="r"))
            await two.refresh(["A"])
            two.mirror.configure("A", capacity=5)
            await two.publish("A", False)
            for atomic in (False, True):
                with pytest.raises(InvalidTokens):
                    await asyncio.wait_for(
                        one.acquire_many([Ask("B", 1, "r"), Ask("A", 8, "r")], atomic=atomic), 10
                    )
            return _used(await one.store.read(["A", "B"]))
        finally:
            await one.store.close()
            await two.store.close()

    assert asyncio.run(run()) == {"A": 1}


def test_the_mirror_sends_every_entry_of_its_region_to_the_mesh() -> None:
    """A5: what `local` fallbacks spent (merged into Redis under node-local ids) and
    an old incarnation's counts reach the mesh, not only the store's own entry."""
    from bucketmesh.core.bucket import BucketDelta
    from bucketmesh.core.rules import Rule
    from bucketmesh.storage.redis_backend import RegionMirror

    rule = Rule.create("k-{{ .Request.Query.user }}", 100, 1.0, name="r", ttl=3600)
    mirror = RegionMirror([rule], forward=lambda batch: None, replica_id="eu/redis/2")
    config = mirror.limiter.rule_configs["r"]
    now = time.time_ns()
    epoch = now - now % config.ttl_ns
    used = {"eu/redis/2": 50, "eu/n1-local/111": 60, "eu/redis/1": 7, "ap/redis/9": 3}
    state = BucketDelta("A", epoch, config, config.version, now - 150 * config.interval_ns, used)
    mirror.absorb([state], now)
    (delta,) = mirror.collect_deltas().deltas
    # every entry of this region; a peer region's entry is its own to send
    assert delta.used == {"eu/redis/2": 50, "eu/n1-local/111": 60, "eu/redis/1": 7}


def test_the_mirror_taken_in_slices_is_the_whole_mirror() -> None:
    """Merging the mirror into Redis whole (after Redis lost its data, or a flood of a
    peer's deltas) takes it ``MIRROR_SLICE`` keys at a time: the slices of
    ``state_keys`` hold exactly what ``full_state()`` holds in one piece, buckets and
    per-key configs of keys without a bucket alike."""
    from bucketmesh.core.rules import Rule
    from bucketmesh.storage.redis_backend import RegionMirror

    rule = Rule.create("k-{{ .Request.Query.user }}", 100, 1.0, name="r", ttl=3600)
    mirror = RegionMirror([rule], forward=lambda batch: None, replica_id="eu/redis/2")
    now = time.time_ns()
    for n in range(25):
        mirror.limiter.acquire(f"k-{n}", 1 + n % 3, now=now)
    mirror.configure("k-3", capacity=50)  # a live bucket's own config
    mirror.configure("k-idle", capacity=7)  # a key's config, no bucket
    whole = sorted(mirror.full_state().deltas, key=lambda d: d.key)
    keys = mirror.state_keys()
    assert len(keys) == len(set(keys)) == 26
    sliced = [
        d for first in range(0, 26, 4) for d in mirror.full_state(keys[first : first + 4]).deltas
    ]
    assert sorted(sliced, key=lambda d: d.key) == whole


def test_after_redis_lost_its_data_a_drained_bucket_stays_drained(redis_server: Any) -> None:
    """A4: Redis restarts empty in a later epoch window: the node must merge its mirror
    back (older epoch) before deciding again, or A would be re-created full."""
    admin = redis_server.client()

    async def run() -> tuple[int, int, int, int]:
        # (one token per 100 s: none refills while the test runs)
        backend = await _joined(
            _backend(redis_server.url, refill_rate=0.01, ttl=2.0, on_store_failure="deny")
        )
        try:
            granted = sum(
                [(await settle(backend.acquire("A", 1, rule="r"))).allowed for _ in range(12)]
            )
            await backend.refresh(["A"])
            old_epoch = backend.mirror.buckets["A"].epoch
            # into the next epoch window of the 2 s ttl (A stays live: ~1000 s of backlog)
            ttl = 2_000_000_000
            await asyncio.sleep((ttl - time.time_ns() % ttl) / 1e9 + 0.05)
            admin.flushall()
            after = (await settle(backend.acquire("A", 1, rule="r"))).allowed  # stale: the policy
            await backend._recover()
            after += sum(
                [(await settle(backend.acquire("A", 1, rule="r"))).allowed for _ in range(5)]
            )
            (state,) = await backend.store.read(["A"])
            return granted, after, old_epoch, state.epoch
        finally:
            await backend.store.close()

    granted, after, old_epoch, epoch = asyncio.run(run())
    assert granted == 10
    assert after == 0
    assert epoch == old_epoch


def test_a_patch_outside_the_exact_range_is_refused_naming_the_field(
    serve: ServerFactory, redis_server: Any
) -> None:
    """B8: the exactness check of the start applies to runtime PATCHes too."""
    buckets = [{"name": "x", "key": "x-{{ .Request.Query.u }}", "capacity": 10, "refillRate": 1}]
    node = serve(redis_config(redis_server.url, buckets))
    with node.client() as client:
        assert client.post("/v1/rate?u=1").status_code == 200
        for target in ("x", "x-1"):
            # 1e12 tokens at 1/s: capacity × interval ≈ 1e21 ns, far above 2^51
            refused = client.patch(f"/v1/buckets/{target}", json={"capacity": 10**12})
            assert refused.status_code == 400, refused.text
            assert refused.json()["field"] == "capacity"
            slow = client.patch(f"/v1/buckets/{target}", json={"refillRate": 1e-9})
            assert slow.status_code == 400, slow.text
            assert slow.json()["field"] == "refillRate"
            assert client.get(f"/v1/buckets/{target}").json()["capacity"] == 10
        # within the range: accepted
        assert client.patch("/v1/buckets/x-1", json={"capacity": 1000}).status_code == 200


def test_a_peer_config_outside_the_exact_range_is_skipped() -> None:
    """B8: a region on the memory backend may accept such a config; the mirror of a
    Redis region skips it, so it never reaches Redis."""
    from bucketmesh.core.bucket import BucketConfig, BucketDelta
    from bucketmesh.core.limiter import DeltaBatch
    from bucketmesh.core.rules import Rule
    from bucketmesh.storage.redis_backend import RegionMirror

    forwarded: list[Any] = []
    rule = Rule.create("k-{{ .Request.Query.user }}", 10, 1.0, name="r", ttl=3600)
    mirror = RegionMirror(
        [rule], forward=forwarded.append, replica_id="eu/redis/1", max_buckets=1000, regions=1
    )
    config = mirror.limiter.rule_configs["r"]
    huge = BucketConfig(10**12, 10**9, config.ttl_ns, config.mode, (10**15, "ap/n1"))
    now = time.time_ns()
    epoch = now - now % config.ttl_ns
    inexact = BucketDelta("A", epoch, huge, huge.version, now, {"ap/n1": 1}, "r")
    fine = BucketDelta("B", epoch, config, config.version, now, {"ap/n1": 1}, "r")
    mirror.merge(DeltaBatch("ap/n1", [inexact, fine], {"r": huge}), now=now)
    assert mirror.limiter.rule_configs["r"] == config
    assert "A" not in mirror.buckets and "B" in mirror.buckets
    (batch,) = forwarded
    assert [d.key for d in batch.deltas] == ["B"] and batch.rules == {}


def test_at_max_buckets_a_new_key_is_refused_rather_than_never_replicated(
    serve: ServerFactory, redis_server: Any
) -> None:
    """B9: the mirror holds at most maxBuckets keys; a key granted in Redis beyond that
    would be dropped when read back (never replicated), so it is refused: 503."""
    buckets = [{"name": "c", "key": "c-{{ .Request.Query.u }}", "capacity": 5, "refillRate": 1}]
    node = serve(redis_config(redis_server.url, buckets, limits={"maxBuckets": 3}))
    with node.client() as client:
        for user in ("1", "2", "3"):
            assert client.post(f"/v1/rate?u={user}").status_code == 200
        refused = client.post("/v1/rate?u=4")
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"]
        batch = client.post(
            "/v1/rate/batch", json={"requests": [{"key": "c-5", "rule": "c", "tokens": 1}]}
        )
        assert batch.status_code == 503, batch.text
        # known keys go on; every granted key is in the node's mirror
        assert client.post("/v1/rate?u=1").status_code == 200
        for user in ("1", "2", "3"):
            assert client.get(f"/v1/buckets/c-{user}").status_code == 200
        assert client.get("/v1/status").json()["buckets"] == 3
    assert redis_server.client().exists("bm:us-east-1:{c-4}", "bm:us-east-1:{c-5}") == 0


@pytest.mark.parametrize("policy", ["allkeys-lru", "noeviction"])
def test_an_evicting_maxmemory_policy_is_warned_about_at_start_and_in_readyz(
    serve: ServerFactory, redis_server: Any, policy: str
) -> None:
    """docs/storage-redis.md: an evicting policy silently drops bucket hashes (spent
    tokens come back). The node says so when it starts and in /readyz, and stays ready."""
    admin = redis_server.client()
    admin.config_set("maxmemory-policy", policy)
    try:
        config = redis_config(
            redis_server.url, [{"key": "w-{{ .Request.Query.k }}", "rate": "5/s"}]
        )
        node = serve(config)
        with node.client() as client:
            ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        store = ready.json()["checks"]["store"]
        if policy == "noeviction":
            assert store == "ok"
            assert "maxmemory-policy" not in node.stderr()
        else:
            assert store.startswith("ok; warning: ") and policy in store, store
            assert "noeviction" in store
            eventually(lambda: "maxmemory-policy is allkeys-lru" in node.stderr(), "a warning")
    finally:
        admin.config_set("maxmemory-policy", "noeviction")


@pytest.mark.parametrize("policy", ["deny", "allow", "local"])
def test_redis_losing_its_data_hands_no_spent_token_back_under_any_policy(
    serve: ServerFactory, redis_server: Any, policy: str
) -> None:
    """Issue 12, case 9: without a mesh, only `local` rules were read back into the
    node's mirror, so after FLUSHALL a drained `deny`/`allow` bucket came back full."""
    rule = {"name": "w", "key": "w-{{ .Request.Query.k }}", "capacity": 10}
    config = redis_config(
        redis_server.url, [{**rule, "refillRate": 0.001, "onStoreFailure": policy}]
    )
    node = serve(config)
    with node.client() as client:
        granted = [client.post("/v1/rate?k=a").status_code for _ in range(12)]
        assert granted == [200] * 10 + [429] * 2
        # the grants are read back into the node's mirror of the region's state
        eventually(lambda: client.get("/v1/status").json()["buckets"] == 1, "read back")
        # ... all of them (until then a wipe forgets them: the documented window)
        eventually(
            lambda: metric(client, "bucketmesh_store_keys_awaiting_readback") == 0,
            "every grant read back into the mirror",
        )
        recoveries = metric(client, "bucketmesh_store_recoveries_total")
        redis_server.client().flushall()
        eventually(
            lambda: metric(client, "bucketmesh_store_recoveries_total") > recoveries,
            "the node noticed the lost data and merged its mirror back",
        )
        state = client.get("/v1/bucket/state", params={"key": "w-a"}).json()
        assert state["tokens_remaining"] == 0, state
        assert client.post("/v1/rate?k=a").status_code == 429


def test_concurrent_decisions_on_many_keys_share_script_calls_and_keep_their_answers(
    redis_server: Any,
) -> None:
    """Item 7 of issue 19: the decisions that arrive in one loop turn go to Redis as one
    script call. 240 decisions at once over 6 keys of two rules (capacities 10 and 7,
    1 to 3 tokens each, interleaved), hardly any refill: each key grants exactly what
    fits, no more; Redis holds exactly the grants; and each answer is its own ask's:
    its key, its rule's capacity, and, in the order asked, the level falling by its
    tokens with each grant (an answer paired with another ask breaks the sequence)."""
    from bucketmesh.core.rules import Rule
    from bucketmesh.storage.redis_backend import RedisBackend

    rules = [
        Rule.create("a-{{ .Request.Query.u }}", 10, 0.0001, name="ra", ttl=3600.0),
        Rule.create("b-{{ .Request.Query.u }}", 7, 0.0001, name="rb", ttl=3600.0),
    ]
    keys = {"a-1": 1, "a-2": 2, "a-3": 3, "b-1": 1, "b-2": 2, "b-3": 3}  # key -> tokens
    capacity = {"a": 10, "b": 7}
    order = [key for _ in range(40) for key in keys]  # interleaved: a-1 a-2 ... b-3 a-1 ...

    async def run() -> tuple[list[Any], int, dict[str, int]]:
        backend = RedisBackend(rules, region="r", node="n", url=redis_server.url, timeout_s=5.0)
        await _joined(backend)
        try:
            answers = [backend.acquire(key, keys[key], rule=f"r{key[0]}") for key in order]
            decisions = await asyncio.wait_for(asyncio.gather(*answers), 30)
            return decisions, backend.calls, _used(await backend.store.read(list(keys)))
        finally:
            await backend.store.close()

    decisions, calls, used = asyncio.run(run())
    assert calls <= 2  # one call for the loop turn (two if a flush split it)
    granted = dict.fromkeys(keys, 0)
    level = {key: capacity[key[0]] for key in keys}
    for key, decision in zip(order, decisions, strict=True):
        tokens = keys[key]
        assert decision.key == key
        assert decision.rule == f"r{key[0]}"
        assert decision.capacity == capacity[key[0]]
        fits = level[key] >= tokens
        assert decision.allowed == fits, (key, level[key], decision)
        if fits:
            level[key] -= tokens
            granted[key] += tokens
        # the bucket's level after this decision (refill of 0.0001/s: none to speak of)
        assert decision.tokens_remaining == level[key], (key, decision)
    # exactly what fits in each bucket, no more, and Redis holds exactly that
    assert granted == {key: capacity[key[0]] // t * t for key, t in keys.items()}
    assert used == granted


def test_a_decision_call_on_the_open_link_runs_no_task_and_keeps_its_answers(
    redis_server: Any,
) -> None:
    """The usual script call is written at once and answered by a done callback: no
    task per call (on main a ``_decide`` task ran each one); grants, the refusal that
    follows them and the counts are what the task's path gave."""

    async def run() -> tuple[list[bool], int, int, dict[str, int]]:
        backend = await _joined(_backend(redis_server.url, capacity=5))
        try:
            assert (await settle(backend.acquire("A", 1, rule="r"))).allowed  # opens the link
            answers = [backend.acquire("A", 1, rule="r") for _ in range(6)]
            await asyncio.sleep(0)  # the flush: one call in flight
            in_flight, tasks = backend.inflight, len(backend.running)
            decisions = [await settle(a) for a in answers]
            assert backend.inflight == 0
            return (
                [d.allowed for d in decisions],
                in_flight,
                tasks,
                _used(await backend.store.read(["A"])),
            )
        finally:
            await backend.store.close()

    allowed, in_flight, tasks, used = asyncio.run(run())
    assert allowed == [True, True, True, True, False, False]
    assert (in_flight, tasks) == (1, 0)
    assert used == {"A": 5}


def test_a_script_flushed_from_redis_is_loaded_again_on_the_direct_path(
    redis_server: Any,
) -> None:
    """SCRIPT FLUSH (or a restarted Redis): the call written at once gets NOSCRIPT (the
    script did not run); it is sent again with EVAL, decided once, the store stays up."""

    async def run() -> tuple[list[bool], bool, dict[str, int]]:
        backend = await _joined(_backend(redis_server.url))
        try:
            assert (await settle(backend.acquire("A", 1, rule="r"))).allowed
            redis_server.client().execute_command("SCRIPT", "FLUSH")
            answers = [backend.acquire("A", 2, rule="r") for _ in range(3)]
            decisions = [await asyncio.wait_for(settle(a), 10) for a in answers]
            return (
                [d.allowed for d in decisions],
                backend.up,
                _used(await backend.store.read(["A"])),
            )
        finally:
            await backend.store.close()

    allowed, up, used = asyncio.run(run())
    assert allowed == [True, True, True]
    assert up
    assert used == {"A": 7}


def test_a_paused_redis_times_out_a_direct_call_and_the_policy_answers(
    redis_server: Any,
) -> None:
    """A call written at once on the link and never answered (scripts paused): within
    the store's timeout (the link's watch, no timer per call) the link fails, the store
    is marked down with a TimeoutError, and the policy answers every waiting decision."""

    async def run() -> tuple[list[bool], bool, str, int, bool]:
        backend = await _joined(_backend(redis_server.url, on_store_failure="deny"))
        try:
            assert (await settle(backend.acquire("A", 1, rule="r"))).allowed
            link = backend.store.link
            backend.store.timeout_s = 0.3
            redis_server.client().execute_command("CLIENT", "PAUSE", "120000", "WRITE")
            answers = [backend.acquire("A", 1, rule="r") for _ in range(3)]
            decisions = [await asyncio.wait_for(settle(a), 10) for a in answers]
            return (
                [d.allowed for d in decisions],
                backend.up,
                backend.last_error,
                backend.store.failures,
                link.lost,
            )
        finally:
            redis_server.client().execute_command("CLIENT", "UNPAUSE")
            await backend.store.close()

    allowed, up, error, failures, lost = asyncio.run(run())
    assert allowed == [False, False, False]  # `deny`
    assert not up
    assert "TimeoutError" in error
    assert failures == 1  # one call failed
    assert lost


def test_a_queue_above_one_calls_limit_splits_between_units_never_inside_one(
    redis_server: Any,
) -> None:
    """More than MAX_DECISIONS_PER_CALL queued: the first call takes that many, and the
    whole of an atomic batch the limit cuts into (a unit never splits); the rest goes
    in the next call. Every decision is answered once, in Redis."""
    from bucketmesh.storage.redis_backend import MAX_DECISIONS_PER_CALL

    async def run() -> tuple[list[int], list[bool], int, dict[str, int]]:
        backend = await _joined(_backend(redis_server.url, capacity=100_000, refill_rate=100.0))
        sizes: list[int] = []
        real = backend.store.acquire_args

        def spy(asks: Any, now_ns: int, incarnation_key: str) -> Any:
            sizes.append(len(asks))
            return real(asks, now_ns, incarnation_key)

        try:
            assert (await settle(backend.acquire("A", 1, rule="r"))).allowed
            backend.store.acquire_args = spy
            backend.inflight = backend.max_inflight  # hold the queue
            singles = [backend.acquire("A", 1, rule="r") for _ in range(MAX_DECISIONS_PER_CALL - 2)]
            batch = asyncio.ensure_future(backend.acquire_many([Ask("B", 1, "r")] * 5, atomic=True))
            await asyncio.sleep(0)  # the batch is queued
            later = [backend.acquire("A", 1, rule="r") for _ in range(10)]
            backend.inflight = 0
            backend._schedule()
            decisions = [await asyncio.wait_for(settle(a), 10) for a in singles + later]
            grouped = await asyncio.wait_for(batch, 10)
            allowed = [d.allowed for d in decisions + grouped]
            return sizes, allowed, backend.inflight, _used(await backend.store.read(["A", "B"]))
        finally:
            await backend.store.close()

    sizes, allowed, inflight, used = asyncio.run(run())
    assert sizes == [MAX_DECISIONS_PER_CALL + 3, 10]
    assert all(allowed) and len(allowed) == MAX_DECISIONS_PER_CALL - 2 + 10 + 5
    assert inflight == 0
    assert used == {"A": 1 + MAX_DECISIONS_PER_CALL - 2 + 10, "B": 5}


def test_a_key_asked_under_a_named_rule_then_under_its_own_gets_each_rule() -> None:
    """The Ask a backend reuses for a key is the one made for the same ``rule``
    argument: a key asked for under another rule by name, then without a rule, is
    decided under its own rule the second time (here by the `allow` policy: Redis is
    not up, and the key is being read back, as after a grant)."""
    from bucketmesh.core.rules import Rule
    from bucketmesh.storage.redis_backend import RedisBackend

    own = Rule.create("k-{{ .Request.Query.u }}", 10, 1.0, name="own", on_store_failure="allow")
    other = Rule.create("z-{{ .Request.Query.u }}", 5, 1.0, name="other", on_store_failure="allow")
    backend = RedisBackend([own, other], region="eu", node="n1", url="redis://127.0.0.1:1")
    backend.unmirrored.add("k-1")
    answers = [
        backend.acquire("k-1", 1, rule="other"),
        backend.acquire("k-1", 1),
        backend.acquire("k-1", 1),
        backend.acquire("k-1", 1, rule="other"),
    ]
    assert [(a.rule, a.capacity) for a in answers] == [  # type: ignore[union-attr]
        ("other", 5),
        ("own", 10),
        ("own", 10),
        ("other", 5),
    ]


def test_a_live_key_no_template_makes_is_decided_under_its_rule_without_one(
    redis_server: Any,
) -> None:
    """A key no template produces, created under a rule named then: a later request
    giving only the key is decided under its bucket's rule, as on the embedded store
    (a Redis node answered 400 "no rule matches key" while a memory node decided)."""

    async def run() -> list[tuple[str, int]]:
        backend = await _joined(_backend(redis_server.url, capacity=10))
        try:
            first = await settle(backend.acquire("zz4", 1, rule="r"))
            await backend.refresh(["zz4"])  # read back into the mirror, as after a grant
            second = await settle(backend.acquire("zz4", 1))
            return [(first.rule, first.tokens_remaining), (second.rule, second.tokens_remaining)]
        finally:
            await backend.stop()

    assert asyncio.run(run()) == [("r", 9), ("r", 8)]
