"""Three real ``bucketmesh serve`` processes, one per region, syncing on loopback.

Every region reaches every other one through a small TCP proxy run by the test,
so a test can cut a region off (existing connections closed, new ones held
open and ignored, as a lost route would) and heal it. Nothing here asserts a
duration: every check polls until it holds or a generous deadline passes.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import yaml
from conftest import eventually, free_port, spawn_serve

from bucketmesh import sync
from bucketmesh.bucket import NS_PER_S, BucketConfig, BucketDelta
from bucketmesh.limiter import DeltaBatch

REGIONS = ("us-east-1", "eu-central-1", "ap-southeast-2")
CLUSTER_ID = "global-rate-limit-cluster"
SECRET = "test-secret-0123456789abcdef"
ADMIN_TOKEN = "admin-token"
DEADLINE_S = 30.0

BUCKETS: list[dict[str, Any]] = [
    # the seed rule's shape, refilling so slowly (1 token per 100 s) that counts are exact
    {
        "name": "global",
        "key": "agent-api-key-{{ .Request.Header.X-API-Key }}",
        "capacity": 5000,
        "refillRate": 0.01,
        "ttl": 3600,
    },
    {"name": "patchable", "key": "patch-{{ .Request.Query.who }}", "capacity": 10, "refillRate": 1},
    # small, and refilling one token per 1000 s (none within a test): a restarted node
    # that forgot what it spent would visibly grant it again
    {
        "name": "small",
        "key": "small-{{ .Request.Query.user }}",
        "capacity": 30,
        "refillRate": 0.001,
    },
    # strict: each of the 3 regions holds a fixed third; only per-key configs travel
    {
        "name": "fixed",
        "key": "fixed-{{ .Request.Query.tenant }}",
        "capacity": 30,
        "refillRate": 0.01,
        "mode": "strict",
    },
]


# -- a cuttable link between regions ------------------------------------------------


class Proxy:
    """Forwards one port to a node; ``cut`` drops every connection and ignores new ones."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cut = False
        self.streams: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.streams.add(writer)
        try:
            if self.cut:
                while await reader.read(65536):
                    pass  # a black hole: read and never answer
                return
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                return
            self.streams.add(up_writer)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
            self.streams.discard(writer)

    def set_cut(self, cut: bool) -> None:
        self.cut = cut
        for writer in list(self.streams):
            writer.close()
        self.streams.clear()


class Links:
    """The proxies of a mesh, on an event loop in a thread of their own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxies: dict[tuple[str, str], Proxy] = {}

    def route(self, source: str, target: str, target_port: int) -> int:
        """The port of the proxy from ``source`` to ``target`` (made on first use)."""
        proxy = self.proxies.get((source, target))
        if proxy is None:
            proxy = Proxy(target_port)
            asyncio.run_coroutine_threadsafe(proxy.start(), self.loop).result(10)
            self.proxies[(source, target)] = proxy
        proxy.target_port = target_port
        return proxy.port

    def isolate(self, region: str, cut: bool = True) -> None:
        async def apply() -> None:
            for (source, target), proxy in self.proxies.items():
                if region in (source, target):
                    proxy.set_cut(cut)

        asyncio.run_coroutine_threadsafe(apply(), self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# -- the processes ---------------------------------------------------------------------


class NodeExited(Exception):
    pass


class Node:
    def __init__(self, region: str, port: int, config: dict[str, Any], directory: Path) -> None:
        self.region = region
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.config_path = directory / f"{region}.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = directory / f"{region}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.base_url, timeout=10.0)

    def start(self) -> None:
        self.process = spawn_serve(self.config_path, self.log_path, BUCKETMESH_SYNC_SECRET=SECRET)

    def wait_ready(self) -> None:
        def ready() -> None:
            assert self.process is not None
            if self.process.poll() is not None:
                raise NodeExited(f"{self.region} exited:\n{self.log()}")
            # Our own process says it listens: not another test's server on a reused port.
            assert "listening on" in self.log().split("start-up state pulled")[-1]
            assert self.client.get("/readyz").status_code == 200

        eventually(ready, f"{self.region} ready")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(15)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> dict[str, Any]:
        return dict(self.client.get("/v1/status").json())

    def state(self, key: str) -> dict[str, Any]:
        response = self.client.get("/v1/bucket/state", params={"key": key})
        assert response.status_code == 200, response.text
        return dict(response.json())

    def metric(self, name: str, labels: str, *, required: bool = False) -> float:
        """The sample's value; 0 if /metrics has no such sample (unless ``required``)."""
        text = self.client.get("/metrics").text
        selector = re.escape(name) + (rf"\{{{re.escape(labels)}\}}" if labels else "")
        match = re.search(rf"^{selector} (\S+)$", text, re.M)
        assert match or not required, f"{self.region} exports no {name}{{{labels}}}"
        return float(match.group(1)) if match else 0.0


class Cluster:
    """Three regions; every link goes through a ``Proxy`` when ``proxied``.

    ``peer_timeout_ms`` is how long a node waits for a peer (a send, the start-up
    pull) before it gives up on it and decides on its own view.
    """

    def __init__(self, directory: Path, *, proxied: bool, peer_timeout_ms: int = 500) -> None:
        self.directory = directory
        self.links = Links() if proxied else None
        self.peer_timeout_ms = peer_timeout_ms
        self.nodes: dict[str, Node] = {}
        self._configure()

    def _configure(self) -> None:
        ports = {region: free_port() for region in REGIONS}
        for node in self.nodes.values():
            node.client.close()
        self.nodes = {}
        for region in REGIONS:
            urls = {}
            for peer in REGIONS:
                if peer == region:
                    continue
                port = (
                    ports[peer]
                    if self.links is None
                    else self.links.route(region, peer, ports[peer])
                )
                urls[peer] = f"http://127.0.0.1:{port}"
            config = {
                "region": region,
                "node": "node-a",
                "listen": f"127.0.0.1:{ports[region]}",
                "sync": {
                    "enabled": True,
                    "syncClusterId": CLUSTER_ID,
                    "peers": list(REGIONS),
                    "peerUrls": urls,
                    "secret": "${BUCKETMESH_SYNC_SECRET}",
                    "interval": 20,
                    "peerTimeout": self.peer_timeout_ms,
                },
                "admin": {"token": ADMIN_TOKEN},
                "buckets": BUCKETS,
            }
            self.nodes[region] = Node(region, ports[region], config, self.directory)

    def __getitem__(self, index: int) -> Node:
        return self.nodes[REGIONS[index]]

    def start(self) -> None:
        for attempt in range(3):
            for node in self.nodes.values():
                node.start()
            try:
                for node in self.nodes.values():
                    node.wait_ready()
                break
            except NodeExited:
                # a port picked as free was taken before the node bound it: new ports
                if attempt == 2 or "cannot listen" not in self.logs():
                    raise
                for node in self.nodes.values():
                    node.stop()
                self._configure()
        eventually(self.all_connected, "every region sees every other one up")

    def all_connected(self) -> None:
        for node in self.nodes.values():
            sync_status = node.status()["sync"]
            assert not sync_status["local_only"], (node.region, sync_status)
            states = {peer: s["state"] for peer, s in sync_status["peers"].items()}
            assert set(states.values()) == {"up"}, (node.region, states)

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()
            node.client.close()
        if self.links is not None:
            self.links.close()

    def logs(self) -> str:
        return "\n".join(f"--- {n.region} ---\n{n.log()}" for n in self.nodes.values())

    def quiescent(self) -> None:
        """Nothing queued or in flight between regions: every delta collected so far has
        been acknowledged, so merged, by every peer."""
        for node in self.nodes.values():
            for peer in REGIONS:
                if peer != node.region:
                    labels = f'peer="{peer}"'
                    pending = node.metric("bucketmesh_sync_pending_deltas", labels, required=True)
                    assert pending == 0, (node.region, peer, pending)

    def converged(self, key: str, total: int | None = None) -> dict[str, Any]:
        """The state every region reports for ``key``, once all agree (and Σ used = total)."""
        states = [node.state(key) for node in self.nodes.values()]
        for state in states:  # a replica that never spent here may be listed with 0 or not
            state["replicas"] = {r: e for r, e in state["replicas"].items() if e["used"]}
        views = [(s["tokens_remaining"], s["capacity"], s["replicas"]) for s in states]
        assert all(view == views[0] for view in views), views
        if total is not None:
            used = sum(entry["used"] for entry in states[0]["replicas"].values())
            assert used == total, (used, total)
        return states[0]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("mesh"), proxied=True)
    try:
        cluster.start()
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def hammer(node: Node, path: str, count: int, headers: dict[str, str] | None = None) -> list[int]:
    with httpx.Client(base_url=node.base_url, timeout=10.0) as client:
        return [client.get(path, headers=headers).status_code for _ in range(count)]


# -- the seed check ----------------------------------------------------------------------


def test_a_burst_split_across_two_regions_drains_one_global_bucket(mesh: Cluster) -> None:
    headers = {"X-API-Key": "seed-burst"}
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda n: hammer(n, "/v1/rate", 100, headers), (mesh[0], mesh[1])))
    assert [code for codes in results for code in codes] == [200] * 200
    state = eventually(lambda: mesh.converged("agent-api-key-seed-burst", total=200), "converge")
    assert state["tokens_remaining"] == 4800
    assert {rid.split("/")[0]: e["used"] for rid, e in state["replicas"].items()} == {
        "us-east-1": 100,
        "eu-central-1": 100,
    }
    # quiescent (no delta left in any outbox or in flight): still the same, to the token
    eventually(mesh.quiescent, "every delta acknowledged")
    assert mesh.converged("agent-api-key-seed-burst", total=200)["tokens_remaining"] == 4800


def test_status_and_metrics_show_the_peers(mesh: Cluster) -> None:
    hammer(mesh[0], "/v1/rate", 5, {"X-API-Key": "lag-probe"})
    eventually(lambda: mesh.converged("agent-api-key-lag-probe", total=5), "converge")
    node = mesh[1]
    status = node.status()
    assert status["cluster_id"] == CLUSTER_ID
    assert set(status["sync"]["peers"]) == {"us-east-1", "ap-southeast-2"}

    def shown() -> None:
        # (a peer that answered slower than the peer timeout is "down" until it answers
        # again: on a loaded machine, wait for "up" rather than expect it)
        status = node.status()
        peers = status["sync"]["peers"]
        assert peers["us-east-1"]["state"] == "up", peers
        assert peers["us-east-1"]["lag_ms_p99"] is not None
        assert peers["us-east-1"]["last_seen"].endswith("Z")
        assert node.metric("bucketmesh_sync_peer_up", 'peer="us-east-1"', required=True) == 1.0
        assert node.metric("bucketmesh_sync_local_only", "", required=True) == 0.0
        lags = node.metric("crdt_sync_duration_seconds_count", 'peer="us-east-1"', required=True)
        assert lags >= 1

    eventually(shown, "the status and /metrics show the peer up, with its lag")


# -- security ---------------------------------------------------------------------------------


def push(
    auth: sync.SyncAuth,
    key: str,
    used: dict[str, int],
    *,
    sent_ns: int | None = None,
    nonce: bytes | None = None,
) -> tuple[bytes, bytes]:
    config = BucketConfig(5000, 100 * NS_PER_S, 3600 * NS_PER_S, "shared", (0, "rule:global:test"))
    now = time.time_ns() if sent_ns is None else sent_ns
    delta = BucketDelta(
        key, now - now % (3600 * NS_PER_S), config, config.version, now - NS_PER_S, used, "global"
    )
    body = sync.encode(sync.DeltaPush(now, False, DeltaBatch("tester/x/1", [delta])))
    nonce = nonce or os.urandom(sync.NONCE_BYTES)
    return auth.seal(
        "deltas", body, sender="tester/x/1", region="tester", now_ns=now, nonce=nonce
    ), nonce


def test_forged_unsigned_replayed_and_wrong_cluster_messages_change_nothing(
    mesh: Cluster,
) -> None:
    node = mesh[0]
    reasons = ("bad_signature", "unsigned", "replay", "wrong_cluster", "stale", "malformed")
    before = {r: node.metric("bucketmesh_sync_rejected_total", f'reason="{r}"') for r in reasons}

    def post(message: bytes) -> httpx.Response:
        return node.client.post(
            "/v1/sync/deltas", content=message, headers={"Content-Type": sync.CONTENT_TYPE}
        )

    genuine = sync.SyncAuth(CLUSTER_ID, SECRET)
    message, nonce = push(genuine, "agent-api-key-sec-genuine", {"tester/x/1": 7})
    accepted = post(message)
    assert accepted.status_code == 200
    reply = genuine.open(accepted.content, kinds=("ack",), now_ns=time.time_ns(), reply_to=nonce)
    assert msgspec.msgpack.decode(reply.body, type=sync.Ack).changed == 1

    refused = {
        "replay": post(message),
        "bad_signature": post(
            push(
                sync.SyncAuth(CLUSTER_ID, "guessed"),
                "agent-api-key-sec-forged",
                {"tester/x/1": 4000},
            )[0]
        ),
        "unsigned": post(
            push(sync.SyncAuth(CLUSTER_ID, None), "agent-api-key-sec-forged", {"tester/x/1": 4000})[
                0
            ]
        ),
        "wrong_cluster": post(
            push(
                sync.SyncAuth("another-cluster", SECRET),
                "agent-api-key-sec-forged",
                {"tester/x/1": 4000},
            )[0]
        ),
        "stale": post(
            push(
                genuine,
                "agent-api-key-sec-forged",
                {"tester/x/1": 4000},
                sent_ns=time.time_ns() - 120 * NS_PER_S,
            )[0]
        ),
        "malformed": post(b"\x00 definitely not an envelope"),
    }
    statuses = {reason: response.status_code for reason, response in refused.items()}
    assert statuses == {
        "replay": 401,
        "bad_signature": 401,
        "unsigned": 401,
        "wrong_cluster": 403,
        "stale": 401,
        "malformed": 400,
    }
    for response in refused.values():
        assert response.headers["content-type"] == "application/problem+json"

    assert node.state("agent-api-key-sec-forged")["replicas"] == {}
    assert node.state("agent-api-key-sec-forged")["live"] is False
    assert node.state("agent-api-key-sec-genuine")["replicas"] == {"tester/x/1": {"used": 7}}
    after = {r: node.metric("bucketmesh_sync_rejected_total", f'reason="{r}"') for r in reasons}
    assert {r: after[r] - before[r] for r in reasons} == dict.fromkeys(reasons, 1.0)


def test_a_wrong_kind_on_an_endpoint_is_refused(mesh: Cluster) -> None:
    auth = sync.SyncAuth(CLUSTER_ID, SECRET)
    message = auth.seal(
        "pull",
        sync.encode(sync.PullRequest([0])),
        sender="tester/x/1",
        region="tester",
        now_ns=time.time_ns(),
        nonce=os.urandom(16),
    )
    response = mesh[0].client.post("/v1/sync/deltas", content=message)
    assert response.status_code == 400


# -- configuration --------------------------------------------------------------------------


def test_a_patch_in_one_region_reaches_every_region(mesh: Cluster) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    response = mesh[1].client.patch("/v1/buckets/patchable", json={"capacity": 70}, headers=admin)
    assert response.status_code == 200, response.text
    started = time.monotonic()

    def everywhere() -> None:
        for node in mesh.nodes.values():
            assert node.client.get("/v1/buckets/patchable").json()["capacity"] == 70, node.region

    eventually(everywhere, "rule PATCH reaches every region")
    print(f"rule-level PATCH seen everywhere after {time.monotonic() - started:.3f}s")

    hammer(mesh[0], "/v1/rate?who=kp", 3)
    response = mesh[2].client.patch("/v1/buckets/patch-kp", json={"capacity": 5}, headers=admin)
    assert response.status_code == 200, response.text
    state = eventually(lambda: mesh.converged("patch-kp", total=3), "key PATCH converges")
    assert state["capacity"] == 5


def test_a_patch_of_a_strict_key_gives_every_region_its_share(mesh: Cluster) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    hammer(mesh[0], "/v1/rate?tenant=s1", 2)
    response = mesh[1].client.patch("/v1/buckets/fixed-s1", json={"capacity": 9}, headers=admin)
    assert response.status_code == 200, response.text

    def shares() -> list[int]:
        capacities = [
            node.client.get("/v1/bucket/state", params={"key": "fixed-s1"}).json()["capacity"]
            for node in mesh.nodes.values()
        ]
        assert capacities == [3, 3, 3], capacities
        return capacities

    eventually(shares, "every region takes a third of the new capacity")
    # each region grants its own new share (a change keeps the level, capped at the new
    # capacity: region 0's 8 of 10 left become 3 of 3) and no more, whatever the others do
    granted = [hammer(node, "/v1/rate?tenant=s1", 5).count(200) for node in mesh.nodes.values()]
    assert granted == [3, 3, 3]


# -- partitions -------------------------------------------------------------------------------


def test_a_partitioned_region_keeps_serving_and_converges_after_healing(mesh: Cluster) -> None:
    assert mesh.links is not None
    isolated, other = mesh[2], mesh[0]
    mesh.links.isolate(isolated.region)
    try:

        def cut_off() -> None:
            assert isolated.status()["sync"]["local_only"] is True
            peers = other.status()["sync"]["peers"]
            assert peers[isolated.region]["state"] == "down", peers

        eventually(cut_off, "the isolated region goes local-only")
        assert isolated.metric("bucketmesh_sync_local_only", "") == 1.0
        headers = {"X-API-Key": "partitioned"}
        with ThreadPoolExecutor(2) as pool:
            results = list(
                pool.map(lambda n: hammer(n, "/v1/rate", 50, headers), (isolated, other))
            )
        assert [code for codes in results for code in codes] == [200] * 100
        key = "agent-api-key-partitioned"
        assert isolated.state(key)["tokens_remaining"] == 4950  # it only knows its own 50

        def still_connected() -> None:  # it still has one peer
            assert other.status()["sync"]["local_only"] is False

        eventually(still_connected, "the other region still reaches the third one")
    finally:
        mesh.links.isolate(isolated.region, cut=False)
    eventually(mesh.all_connected, "every region reconnects")
    state = eventually(lambda: mesh.converged(key, total=100), "regions converge after healing")
    assert state["tokens_remaining"] == 4900


def test_a_frozen_node_is_marked_down_and_catches_up_when_it_resumes(mesh: Cluster) -> None:
    frozen, other = mesh[1], mesh[0]
    assert frozen.process is not None
    frozen.process.send_signal(signal.SIGSTOP)
    try:

        def marked_down() -> None:
            for node in (mesh[0], mesh[2]):
                peers = node.status()["sync"]["peers"]
                assert peers[frozen.region]["state"] == "down", (node.region, peers)
                assert node.status()["sync"]["local_only"] is False

        eventually(marked_down, "the frozen region is marked down")
        codes = hammer(other, "/v1/rate", 20, {"X-API-Key": "frozen"})
        codes += hammer(mesh[2], "/v1/rate", 20, {"X-API-Key": "frozen"})
        assert codes == [200] * 40
    finally:
        frozen.process.send_signal(signal.SIGCONT)
    eventually(mesh.all_connected, "every region reconnects")
    state = eventually(lambda: mesh.converged("agent-api-key-frozen", total=40), "converge")
    assert state["tokens_remaining"] == 4960


# -- restarts -----------------------------------------------------------------------------------


def test_a_node_killed_mid_traffic_never_regrants_spent_tokens(tmp_path: Path) -> None:
    # A restarted node learns what its previous incarnation spent by pulling the peers'
    # state before it listens, waiting for a peer at most the peer timeout: generous
    # here, so that a loaded machine's slow answer is not taken for an absent peer.
    cluster = Cluster(tmp_path, proxied=False, peer_timeout_ms=10_000)
    try:
        cluster.start()
        victim, survivor = cluster[2], cluster[0]
        key, path = "small-crash", "/v1/rate?user=crash"
        capacity, refill = 30, 0.001
        started = time.monotonic()
        grants = hammer(victim, path, capacity).count(200)
        assert grants == capacity
        eventually(lambda: cluster.converged(key, total=capacity), "the drain reaches everyone")

        stop = threading.Event()
        answered = {"victim": 0, "survivor": 0}
        granted = {"victim": 0, "survivor": 0}
        unexpected: list[int] = []

        def traffic(node: Node, name: str) -> None:
            with httpx.Client(base_url=node.base_url, timeout=5.0) as client:
                while not stop.is_set():
                    try:
                        status = client.get(path).status_code
                    except httpx.HTTPError:  # the victim is down, or not listening yet
                        time.sleep(0.005)
                        continue
                    answered[name] += 1
                    granted[name] += status == 200
                    if status not in (200, 429):
                        unexpected.append(status)

        threads = [
            threading.Thread(target=traffic, args=(n, name))
            for n, name in ((victim, "victim"), (survivor, "survivor"))
        ]
        for thread in threads:
            thread.start()
        try:

            def answers(victim_at_least: int) -> None:
                assert answered["victim"] >= victim_at_least, answered
                assert answered["survivor"] >= 20, answered

            eventually(lambda: answers(20), "traffic flows through both regions")
            old_replica = victim.status()["replica_id"]
            victim.kill()
            before_restart = answered["victim"]
            victim.start()
            victim.wait_ready()
            pulled = victim.log().split("start-up state pulled from")[-1].splitlines()[0]
            assert not pulled.startswith(" no peer"), pulled
            # the new incarnation serves the traffic that kept coming
            eventually(lambda: answers(before_restart + 20), "the restarted node answers")
        finally:
            stop.set()
            for thread in threads:
                thread.join(15)
        elapsed = time.monotonic() - started

        assert unexpected == []
        grants += granted["victim"] + granted["survivor"]
        # No token refills before 1000 s have passed since the drain began; each of the
        # three replicas that served (the victim before and after the crash, the
        # survivor) could at worst spend each refilled token once. A restart that forgot
        # the 30 spent tokens would grant 30 more.
        allowed = capacity + 3 * math.floor(refill * elapsed)
        assert grants <= allowed, (answered, granted, allowed, cluster.logs())
        state = victim.state(key)
        assert old_replica in state["replicas"], state
        assert state["replicas"][old_replica]["used"] >= capacity
        assert victim.status()["replica_id"] != old_replica
        # every grant is accounted for, in every region
        eventually(lambda: cluster.converged(key, total=grants), "all converge after the restart")
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


# -- in-process: the mesh's own bookkeeping -------------------------------------------------


def in_process_node(region: str, port: int, peers: dict[str, str], **mesh: Any) -> Any:
    from bucketmesh.config import parse_config
    from bucketmesh.mesh import MeshSettings
    from bucketmesh.serve import Node, NodeSettings

    rules = parse_config(yaml.safe_dump({"buckets": BUCKETS})).buckets
    settings = MeshSettings(
        region=region, cluster_id=CLUSTER_ID, peers=peers, secret=SECRET, peer_timeout_s=0.5, **mesh
    )
    return Node(
        NodeSettings(
            region=region,
            node="node-a",
            host="127.0.0.1",
            port=port,
            rules=rules,
            regions=2,
            sync=settings,
        )
    )


def test_a_dead_peers_backlog_is_bounded_and_replaced_by_a_full_transfer() -> None:
    async def scenario() -> None:
        node = in_process_node(
            "us-east-1",
            free_port(),
            {"eu-central-1": f"http://127.0.0.1:{free_port()}"},
            max_pending=100,
        )
        assert node.mesh is not None
        peer = node.mesh.peers["eu-central-1"]
        for n in range(250):
            node.limiter.acquire(f"agent-api-key-k{n}", 1)
            node.mesh.collect()
            assert len(peer.outbox) <= 100
        assert peer.backlogs_dropped == 2
        assert peer.full_wanted

    asyncio.run(scenario())


def test_a_newer_delta_replaces_the_queued_one_and_survives_a_stale_ack() -> None:
    async def scenario() -> None:
        node = in_process_node(
            "us-east-1", free_port(), {"eu-central-1": f"http://127.0.0.1:{free_port()}"}
        )
        assert node.mesh is not None
        peer = node.mesh.peers["eu-central-1"]
        node.limiter.acquire("agent-api-key-a", 1)
        node.mesh.collect()
        keys, chunks, first_origin = peer.take(65536)
        node.limiter.acquire("agent-api-key-a", 1)
        node.mesh.collect()
        assert len(peer.outbox) == 1
        peer.acknowledge(keys, chunks, {})  # the ack of the older delta
        assert list(peer.outbox) == ["agent-api-key-a"]
        _, newer, origin = peer.take(65536)
        # the acknowledged message delivered every change up to its delta: the lag of
        # the newer one counts from its own collect (test_mesh_lag.py)
        assert newer != chunks and origin is not None and origin > first_origin
        decoded = msgspec.msgpack.decode(newer[0], type=BucketDelta)
        assert decoded.used == {node.limiter.replica_id: 2}

    asyncio.run(scenario())


def test_the_digest_exchange_repairs_state_that_no_delta_carried() -> None:
    from bucketmesh.bucket import epoch_for

    async def scenario() -> None:
        ports = {"us-east-1": free_port(), "eu-central-1": free_port()}
        nodes = {
            region: in_process_node(
                region,
                port,
                {r: f"http://127.0.0.1:{p}" for r, p in ports.items() if r != region},
                digest_interval_s=0.2,
                settle_s=0.5,
            )
            for region, port in ports.items()
        }
        # first contact: each side sends its full state once; record when that is done
        transferred: list[str] = []
        for node in nodes.values():
            transfer = node.mesh._transfer_full

            async def recorded(peer: Any, transfer: Any = transfer) -> None:
                await transfer(peer)
                transferred.append(peer.region)

            node.mesh._transfer_full = recorded
        for node in nodes.values():
            await node.start()
        try:
            source, target = nodes["us-east-1"], nodes["eu-central-1"]
            links = [source.mesh.peers["eu-central-1"], target.mesh.peers["us-east-1"]]
            deadline = time.monotonic() + DEADLINE_S
            while set(transferred) != {"eu-central-1", "us-east-1"}:
                assert time.monotonic() < deadline, ("the peers never met", transferred)
                await asyncio.sleep(0.05)
            config = source.limiter.rule_configs["global"]
            now = time.time_ns()
            # A bucket at rest that only us-east-1 knows, merged without marking it dirty:
            # no delta carries it, and the first-contact transfers are over (no other
            # one starts: asserted below), so only the digest exchange can.
            ghost = BucketDelta(
                "agent-api-key-ghost",
                epoch_for(now, config.ttl_ns),
                config,
                config.version,
                now - 600 * NS_PER_S,
                {"ghost/x/1": 5},
                "global",
            )
            source.limiter.merge(DeltaBatch("ghost/x/1", [ghost]))
            deadline = time.monotonic() + DEADLINE_S
            while target.limiter.bucket("agent-api-key-ghost") is None:
                assert time.monotonic() < deadline, "the digest never repaired the bucket"
                await asyncio.sleep(0.05)
            bucket = target.limiter.bucket("agent-api-key-ghost")
            assert bucket is not None
            assert bucket.used(target.limiter.replica_id) == {"ghost/x/1": 5}
            assert sum(p.repaired_ranges for p in links) >= 1
            assert [p.full_transfers for p in links] == [1, 1]
        finally:
            for node in nodes.values():
                await node.stop(grace=1.0)

    asyncio.run(scenario())


# -- the command line ----------------------------------------------------------------------


def assert_in(part: str, text: str) -> None:
    assert part in text


def consecutive_free_ports(count: int) -> int:
    for _ in range(100):
        base = free_port()
        try:
            for offset in range(count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
    raise RuntimeError("no consecutive free ports")


def test_cluster_up_runs_one_mesh_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    base = consecutive_free_ports(3)
    output = tmp_path / "cluster.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")}
    with open(output, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "bucketmesh.cli", "cluster", "up", "--base-port", str(base)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**env, "PYTHONUNBUFFERED": "1"},
        )
    try:
        eventually(lambda: assert_in("uniq -c", output.read_text()), "the banner")
        text = output.read_text()
        for offset, region in enumerate(REGIONS):
            assert f"{region}" in text and f"http://127.0.0.1:{base + offset}" in text
        with httpx.Client(timeout=10.0) as client:
            for port in (base, base + 1):
                response = client.post(
                    f"http://127.0.0.1:{port}/v1/rate", headers={"X-API-Key": "cluster-up"}
                )
                assert response.status_code == 200

            def one_bucket() -> None:
                views = [
                    client.get(
                        f"http://127.0.0.1:{base + i}/v1/bucket/state",
                        params={"key": "agent-api-key-cluster-up"},
                    ).json()["replicas"]
                    for i in range(3)
                ]
                assert all(len(v) == 2 and v == views[0] for v in views), views

            eventually(one_bucket, "one bucket seen by all three regions")
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0, output.read_text()
        for offset in range(3):  # the nodes are gone
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{base + offset}/healthz")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def serve_once(
    tmp_path: Path, sync_settings: dict[str, Any], *flags: str
) -> subprocess.Popen[bytes]:
    config = {
        "region": "us-east-1",
        "listen": f"127.0.0.1:{free_port()}",
        "sync": {
            "enabled": True,
            "syncClusterId": CLUSTER_ID,
            "peers": list(REGIONS),
            "peerUrls": "http://127.0.0.1:9/{region}",
            **sync_settings,
        },
        "buckets": BUCKETS,
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")}
    return subprocess.Popen(
        [sys.executable, "-m", "bucketmesh.cli", "serve", "--config", str(path), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def test_sync_without_a_secret_refuses_to_start(tmp_path: Path) -> None:
    process = serve_once(tmp_path, {})
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert b"sync.secret" in err and b"--insecure-sync" in err


def test_insecure_sync_starts_without_a_secret_and_says_so(tmp_path: Path) -> None:
    process = serve_once(tmp_path, {}, "--insecure-sync")
    try:
        port = int(yaml.safe_load((tmp_path / "node.yaml").read_text())["listen"].split(":")[1])

        def up() -> None:
            assert process.poll() is None
            status = httpx.get(f"http://127.0.0.1:{port}/v1/status").json()
            assert status["sync"]["enabled"] is True
            assert set(status["sync"]["peers"]) == {"eu-central-1", "ap-southeast-2"}

        eventually(up, "an insecure node serving")
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert b"WARNING: --insecure-sync" in err


def test_a_peer_url_that_reaches_this_node_itself_is_reported_not_synced_with() -> None:
    async def scenario() -> None:
        port = free_port()
        node = in_process_node("us-east-1", port, {"eu-central-1": f"http://127.0.0.1:{port}"})
        await node.start()
        try:
            assert node.mesh is not None
            peer = node.mesh.peers["eu-central-1"]
            deadline = time.monotonic() + DEADLINE_S
            while peer.state != "down":
                assert time.monotonic() < deadline, (peer.state, peer.last_error)
                await asyncio.sleep(0.05)
            assert "this very node" in peer.last_error
            assert node.mesh.local_only
        finally:
            await node.stop(grace=1.0)

    asyncio.run(scenario())
