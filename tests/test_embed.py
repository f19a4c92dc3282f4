"""Embedded members of the mesh (``bucketmesh.embed``): an ASGI app served by
``uvicorn --workers 4`` whose workers each decide in-process on a replica of their
own, plus a ``bucketmesh serve`` node in their region and one in another, all
syncing over the mesh with the shared HMAC secret. Hammered through HTTP, the
total admitted stays within the mesh's documented bound, every replica converges
to the same state, and a worker that stops flushes its last grants to the node
before it exits.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import ServerFactory, eventually, free_port, make_config

from bucketmesh.embed import Member, NoFreeSlot
from bucketmesh.node.config import ConfigError

TESTS = Path(__file__).resolve().parent
WORKERS = 4
CAPACITY = 40
REFILL = 0.01  # a token per 100 s: no refill within a test
SLOTS = [f"us-east-1.w{i}" for i in range(WORKERS)]
BUCKETS = [
    {
        "key": "agent-api-key-{{ .Request.Header.X-API-Key }}",
        "capacity": CAPACITY,
        "refillRate": REFILL,
    },
]


def mesh_config(
    node_port: int, remote_port: int, slot_ports: list[int], interval_ms: int
) -> dict[str, Any]:
    urls = {
        "us-east-1": f"http://127.0.0.1:{node_port}",
        "eu-central-1": f"http://127.0.0.1:{remote_port}",
    }
    urls.update(
        {slot: f"http://127.0.0.1:{port}" for slot, port in zip(SLOTS, slot_ports, strict=True)}
    )
    return make_config(
        BUCKETS,
        sync={
            "enabled": True,
            "syncClusterId": "embed-test",
            "peers": ["us-east-1", "eu-central-1", *SLOTS],
            "peerUrls": urls,
            "interval": interval_ms,
            "peerTimeout": 500,
            "secret": "${BUCKETMESH_SYNC_SECRET}",
        },
    )


class Uvicorn:
    def __init__(
        self, directory: Path, config_path: Path, secret: str, workers: int, port: int
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / f"uvicorn-{config_path.stem}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")}
        env.update(EMBED_CONFIG=str(config_path), BUCKETMESH_SYNC_SECRET=secret)
        args = [sys.executable, "-m", "uvicorn", "embed_app:app", "--app-dir", str(TESTS)]
        args += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)]
        args += ["--lifespan", "on", "--no-access-log"]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                args,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # kill() reaches the workers too
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL to uvicorn and its workers (their own process group)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
            raise


def distinct_free_ports(count: int) -> list[int]:
    """``count`` ports free now and different from each other (each socket is held
    open until all are chosen: ``free_port`` twice in a row may answer the same port)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def mesh(serve: ServerFactory, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Nodes of us-east-1 and eu-central-1, and a uvicorn of 4 embedded workers in
    us-east-1: yields (node, remote node, uvicorn, slot URLs)."""
    interval_ms = getattr(request, "param", 20)
    secret = secrets.token_urlsafe(32)
    seen: list[str] = []
    for attempt in range(3):
        node_port, remote_port, app_port, *slot_ports = distinct_free_ports(3 + WORKERS)
        config = mesh_config(node_port, remote_port, slot_ports, interval_ms)
        config_path = tmp_path / f"mesh-{attempt}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        node = serve(config, port=node_port, env={"BUCKETMESH_SYNC_SECRET": secret})
        remote = serve(
            config, port=remote_port, region="eu-central-1", env={"BUCKETMESH_SYNC_SECRET": secret}
        )
        app = Uvicorn(tmp_path, config_path, secret, WORKERS, app_port)
        peers: dict[str, Any] = {}

        def every_slot_up(
            app: Uvicorn = app, node: Any = node, peers: dict[str, Any] = peers
        ) -> bool:
            if app.process.poll() is not None or "no free member slot" in app.log():
                return True  # reported below
            peers.update(httpx.get(node.url("/v1/status"), timeout=10).json()["sync"]["peers"])
            return all(peers[slot]["state"] == "up" for slot in SLOTS)

        try:
            eventually(every_slot_up, "every worker joined the mesh", timeout=60)
        except AssertionError as error:
            joined = False
            why = f"{error}; the node's peers: {peers}"
        else:
            joined = "no free member slot" not in app.log() and app.process.poll() is None
            why = "a worker found no free member slot (a port chosen as free was taken)"
        if joined:
            break
        # Start again on other ports: a port chosen as free can be taken by another
        # process (an outgoing connection's ephemeral port) before a worker binds it.
        app.kill()
        node.kill()
        remote.kill()
        seen.append(f"attempt {attempt}: {why}\n{app.log()[-4000:]}")
    else:
        raise AssertionError("the embedded workers never all joined:\n" + "\n".join(seen))
    try:
        yield node, remote, app, [f"http://127.0.0.1:{port}" for port in slot_ports]
    finally:
        app.stop()


def hammer(url: str, api_key: str, requests: int) -> int:
    """``requests`` requests, each on a new connection (so the kernel spreads them over
    the workers), 8 at a time; the number answered 200."""

    def one(_: int) -> int:
        response = httpx.get(url, headers={"X-API-Key": api_key, "Connection": "close"}, timeout=30)
        assert response.status_code in (200, 429), response.text
        return response.status_code == 200

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(one, range(requests)))


def states(urls: list[str], key: str) -> list[dict[str, Any]]:
    found = []
    for url in urls:
        state = httpx.get(url + "/v1/bucket/state", params={"key": key}, timeout=10).json()
        state["replicas"] = {r: e for r, e in state["replicas"].items() if e["used"]}
        found.append(state)
    return found


def test_workers_share_one_limit_with_the_regions_and_converge(mesh: Any) -> None:
    node, remote, app, slot_urls = mesh
    key = "agent-api-key-shared"

    def rate(server: Any) -> bool:
        response = httpx.post(server.url("/v1/rate"), json={"key": key}, timeout=10)
        return response.status_code == 200

    remote_grants = sum(rate(remote) for _ in range(10))  # another region spends first
    assert remote_grants == 10
    eventually(
        lambda: all(s["tokens_remaining"] <= CAPACITY - 10 for s in states(slot_urls, key)),
        "every worker sees what eu-central-1 spent",
    )
    admitted = hammer(app.url + "/work", "shared", 6 * CAPACITY)
    node_grants = sum(rate(node) for _ in range(5))  # the region's node, same bucket
    replicas = 2 + WORKERS
    bound = CAPACITY + (replicas - 1) * CAPACITY  # docs: (n − 1)·(capacity + refill·d) over
    total = remote_grants + admitted + node_grants
    assert CAPACITY <= total <= bound, (remote_grants, admitted, node_grants)

    def converged() -> dict[str, Any]:
        views = states([node.base_url, remote.base_url, *slot_urls], key)
        shape = [(s["tokens_remaining"], s["replicas"]) for s in views]
        assert all(view == shape[0] for view in shape), shape
        return views[0]

    state = eventually(converged, "both regions and every worker agree", timeout=60)
    assert sum(e["used"] for e in state["replicas"].values()) == total  # each grant once
    print(f"eu {remote_grants} + workers {admitted} + us {node_grants}: {state['replicas']}")
    spenders = {rid.split("/", 1)[0] for rid in state["replicas"]}
    assert len(spenders & set(SLOTS)) >= 2, state["replicas"]  # several workers decided


@pytest.mark.parametrize("mesh", [60_000], indirect=True)  # deltas every 60 s: only a flush
def test_a_stopping_worker_flushes_its_grants(mesh: Any) -> None:
    node, _, app, _ = mesh
    key = "agent-api-key-flushed"
    admitted = hammer(app.url + "/work", "flushed", CAPACITY // 2)
    assert admitted == CAPACITY // 2
    assert app.stop() == 0, app.log()  # SIGTERM: each worker's lifespan stops its member
    state = httpx.get(node.url("/v1/bucket/state"), params={"key": key}, timeout=10).json()
    assert sum(e["used"] for e in state["replicas"].values()) == admitted


def test_a_member_needs_slots_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "no-slots.yaml"
    config = make_config(
        BUCKETS,
        sync={
            "enabled": True,
            "peers": ["us-east-1", "eu-central-1"],
            "peerUrls": {"eu-central-1": "http://127.0.0.1:1"},
            "secret": "s",
        },
    )
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"sync\.peers"):
        Member(str(path))
    path.write_text(yaml.safe_dump(make_config(BUCKETS)))
    with pytest.raises(ConfigError, match=r"sync\.enabled"):
        Member(str(path))


def one_slot_config(tmp_path: Path) -> tuple[Path, int]:
    """A config with one slot (``us-east-1.w0``) and its port; no node of the region
    runs (no peer is up)."""
    slot_port = free_port()
    config = make_config(
        BUCKETS,
        sync={
            "enabled": True,
            "peers": ["us-east-1", "us-east-1.w0"],
            "peerUrls": {
                "us-east-1": f"http://127.0.0.1:{free_port()}",
                "us-east-1.w0": f"http://127.0.0.1:{slot_port}",
            },
            "secret": "s",
        },
    )
    path = tmp_path / "one-slot.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, slot_port


def test_a_member_decides_in_process_and_the_slot_is_its_own(tmp_path: Path) -> None:
    path, slot_port = one_slot_config(tmp_path)

    async def main() -> None:
        first, second = Member(str(path)), Member(str(path))
        await first.start()
        try:
            assert first.slot == "us-east-1.w0"
            assert first.replica_id.startswith("us-east-1.w0/embedded-")
            decision = first.decider.acquire("agent-api-key-inproc", 3)
            assert decision.allowed and decision.tokens_remaining == CAPACITY - 3
            with pytest.raises(NoFreeSlot, match=r"us-east-1\.w0"):
                await second.start()
            state = await asyncio.to_thread(
                httpx.get,
                f"http://127.0.0.1:{slot_port}/v1/bucket/state",
                params={"key": "agent-api-key-inproc"},
            )
            assert state.json()["tokens_remaining"] == CAPACITY - 3
        finally:
            await first.stop()

    asyncio.run(main())


async def lifespan(app: Any, *messages: str) -> list[dict[str, Any]]:
    """Drive ``app``'s lifespan as an ASGI server does; the answers it sends."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for message in messages:
        inbox.put_nowait({"type": f"lifespan.{message}"})
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send)
    return sent


def test_a_members_asgi_app_runs_the_apps_own_lifespan_inside_the_members(
    tmp_path: Path,
) -> None:
    """Before, the wrapped app's lifespan never ran: an app opening its database pool
    at startup served without it."""
    path, _ = one_slot_config(tmp_path)
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            seen.append(message["type"])
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return

    async def main() -> None:
        member = Member(str(path))
        sent = await lifespan(member.asgi(app), "startup", "shutdown")
        assert seen == ["lifespan.startup", "lifespan.shutdown"]
        assert [m["type"] for m in sent] == [
            "lifespan.startup.complete",
            "lifespan.shutdown.complete",
        ]
        # the member was stopped at shutdown: its slot is free for another one
        again = Member(str(path))
        await again.start()
        await again.stop()

    asyncio.run(main())


def test_a_bad_middleware_option_fails_the_startup_and_leaves_the_member_stopped(
    tmp_path: Path,
) -> None:
    """Before, the ValueError was swallowed (uvicorn: "lifespan unsupported"), every
    request then got a 500 naming the wrong cause, and the member kept its slot."""
    path, _ = one_slot_config(tmp_path)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not reached")

    async def main() -> None:
        member = Member(str(path))
        sent = await lifespan(member.asgi(app, unmatched="block"), "startup")
        assert sent == [
            {
                "type": "lifespan.startup.failed",
                "message": "RateLimitMiddleware: unmatched must be 'allow' or 'deny', got 'block'",
            }
        ]
        again = Member(str(path))  # the slot was given back
        await again.start()
        await again.stop()

    asyncio.run(main())
