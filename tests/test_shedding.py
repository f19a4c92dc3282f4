"""Overload shedding (docs/targets.md R6) on real processes: a node whose event loop
lags answers decision requests 503 + Retry-After at once instead of queueing them,
while the reserved traffic (sync, admin PATCH, status, metrics) is never shed: a
flooded node still replicates and can be reconfigured, and it lives.

The flood is pipelined bursts on raw sockets, each burst decided in one read: with
``limits.shedLag`` at 1 ms (the default is 50 ms) every burst makes the loop late
enough to shed, whatever the speed of the machine."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import Mesh, MeshNode, ServerFactory, eventually, free_port, make_config

from bucketmesh.http.server import HttpServer, Response, ServerLimits
from bucketmesh.node.config import ConfigError, parse_config
from bucketmesh.tooling.netproxy import Faults

ADMIN_TOKEN = "shed-admin-token"
RULES = [
    {
        "name": "flood",
        "key": "flood-{{ .Request.Query.user }}",
        "capacity": 1_000_000,
        "refillRate": 1,
    },
    {"name": "small", "key": "small-{{ .Request.Query.user }}", "capacity": 100, "refillRate": 1},
]
BURST = 300
STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")


class Flood:
    """Threads that send pipelined bursts of decision requests and read the answers;
    with ``fresh_keys`` every request names a key never seen before. Each thread stops
    when told or after ``max_bursts`` bursts (a flood that ends by itself)."""

    def __init__(
        self,
        node: MeshNode,
        connections: int = 6,
        *,
        fresh_keys: bool = False,
        max_bursts: int = 1_000_000,
    ) -> None:
        self.address = ("127.0.0.1", node.port)
        self.fresh_keys = fresh_keys
        self.max_bursts = max_bursts
        self.statuses: Counter[int] = Counter()
        self.retry_after: Counter[str] = Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(connections)
        ]

    def __enter__(self) -> Flood:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _burst(self, n: int, round_: int) -> bytes:
        prefix = b"u%d-%d" % (n, round_) if self.fresh_keys else b"u%d" % n
        return b"".join(
            b"GET /v1/rate?user=%s-%d HTTP/1.1\r\nHost: flood\r\n\r\n" % (prefix, i)
            for i in range(BURST)
        )

    def _run(self, n: int) -> None:
        burst = self._burst(n, 0)
        try:
            with socket.create_connection(self.address, timeout=30) as sock:
                for round_ in range(self.max_bursts):
                    if self._stop.is_set():
                        break
                    if self.fresh_keys and round_:
                        burst = self._burst(n, round_)
                    sock.sendall(burst)
                    received, answered = b"", 0
                    while answered < BURST:
                        chunk = sock.recv(1 << 20)
                        if not chunk:
                            raise ConnectionError("the server closed the connection")
                        received += chunk
                        answered = received.count(b"HTTP/1.1 ")
                    statuses = Counter(int(code) for code in STATUS.findall(received))
                    retry = Counter(re.findall(rb"Retry-After: (\S+)", received))
                    with self._lock:
                        self.statuses.update(statuses)
                        self.retry_after.update({k.decode(): c for k, c in retry.items()})
        except OSError as error:
            with self._lock:
                self.errors.append(repr(error))


def test_a_flooded_node_sheds_decisions_but_still_replicates_and_takes_admin_changes(
    serve: ServerFactory,
) -> None:
    mesh = Mesh(
        serve,
        ["us-east-1", "eu-west-1"],
        buckets=RULES,
        admin_token=ADMIN_TOKEN,
        overrides={"us-east-1": {"limits": {"shedLag": 1}}},
    ).start()
    flooded, peer = mesh[0], mesh[1]
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with Flood(flooded) as flood:
        eventually(
            lambda: flooded.metric("bucketmesh_http_shed_lag_requests_total") > 0,
            "the flooded node sheds",
        )
        # reserved traffic while it sheds: admin changes, status, and replication
        patched = flooded.client.patch("/v1/buckets/small", json={"capacity": 50}, headers=admin)
        assert patched.status_code == 200, patched.text
        assert flooded.client.get("/v1/status").status_code == 200
        eventually(
            lambda: peer.client.get("/v1/buckets/small").json()["capacity"] == 50,
            "the PATCH made on the flooded node reached the other region",
        )
        # what it does admit is decided and replicated as usual
        granted = 0
        while granted == 0:
            answer = flooded.client.post("/v1/rate", json={"key": "small-probe", "tokens": 3})
            assert answer.status_code in (200, 503), answer.text
            if answer.status_code == 503:
                assert answer.headers["retry-after"] == "1"
                assert answer.headers["content-type"] == "application/problem+json"
            granted = answer.status_code == 200
        eventually(
            lambda: sum(e["used"] for e in peer.state("small-probe")["replicas"].values()) == 3,
            "a grant made while shedding replicated",
        )
    assert flood.errors == [], flood.errors
    assert set(flood.statuses) <= {200, 503}, flood.statuses
    assert flood.statuses[503] > 0 and flood.statuses[200] > 0, flood.statuses
    assert flood.retry_after == Counter({"1": flood.statuses[503]})
    assert flooded.process.poll() is None
    assert peer.metric("bucketmesh_http_shed_lag_requests_total") == 0


def test_a_flood_of_new_keys_is_shed_unparsed_stays_under_the_cap_and_the_node_recovers(
    serve: ServerFactory,
) -> None:
    """R6 with a flood of distinct keys: while its loop lags the node answers decision
    requests 503 + Retry-After without parsing them (the fast shed path), refuses new
    keys beyond ``limits.maxBuckets`` (a counted 503), keeps taking admin changes and
    replicating, and once the flood (bounded: it stops by itself) is over it decides
    again at once."""
    cap = 400
    mesh = Mesh(
        serve,
        ["us-east-1", "eu-west-1"],
        buckets=RULES,
        admin_token=ADMIN_TOKEN,
        overrides={"us-east-1": {"limits": {"shedLag": 1, "maxBuckets": cap}}},
    ).start()
    flooded, peer = mesh[0], mesh[1]
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def known_granted() -> bool:
        # with a 1 ms shedLag a loaded box's stall sheds even this one (503 spends nothing)
        known = flooded.client.post("/v1/rate", json={"key": "small-known", "tokens": 1})
        assert known.status_code in (200, 503), known.text
        return known.status_code == 200

    eventually(known_granted, "the known key's first grant")
    with Flood(flooded, fresh_keys=True, max_bursts=2000) as flood:
        eventually(
            lambda: flooded.metric("bucketmesh_http_shed_unparsed_requests_total") > 0,
            "the flooded node sheds requests unparsed",
        )
        eventually(
            lambda: flooded.metric("bucketmesh_bucket_cap_rejections_total") > 0,
            "new keys beyond the cap are refused",
        )
        eventually(
            lambda: flooded.metric("bucketmesh_http_loop_lag_seconds") > 0.001,
            "the loop lag the node sheds on is exported",
        )
        patched = flooded.client.patch("/v1/buckets/small", json={"capacity": 60}, headers=admin)
        assert patched.status_code == 200, patched.text
        eventually(
            lambda: peer.client.get("/v1/buckets/small").json()["capacity"] == 60,
            "the PATCH made on the flooded node reached the other region",
        )
        assert flooded.status()["buckets"] <= cap
    assert flood.errors == [], flood.errors
    assert set(flood.statuses) <= {200, 503}, flood.statuses
    assert flood.statuses[503] > 0, flood.statuses
    assert flood.retry_after == Counter({"1": flood.statuses[503]})
    assert flooded.process.poll() is None
    # the flood is over: the node decides again (no shedding left over), under its cap
    eventually(
        lambda: flooded.client.post("/v1/rate", json={"key": "small-known"}).status_code == 200,
        "the node decides again after the flood",
    )
    assert flooded.status()["buckets"] <= cap
    eventually(
        lambda: sum(e["used"] for e in peer.state("small-known")["replicas"].values()) >= 2,
        "a grant made after the flood replicated",
    )


def test_a_flooded_node_answers_sync_and_admin_on_its_reserved_listener(
    serve: ServerFactory,
) -> None:
    """``adminListen``: a second socket serving only the reserved endpoints. While the
    main listener sheds a flood, the reserved one takes admin changes and status reads,
    and the other region sends its sync there (its peer URL names the reserved port),
    so replication goes on both ways; a decision sent to the reserved port is refused
    (404), so a flood cannot move there."""
    admin_port = free_port()
    reserved_url = f"http://127.0.0.1:{admin_port}"
    mesh = Mesh(
        serve,
        ["us-east-1", "eu-west-1"],
        buckets=RULES,
        admin_token=ADMIN_TOKEN,
        overrides={
            "us-east-1": {"adminListen": f"127.0.0.1:{admin_port}", "limits": {"shedLag": 1}},
            "eu-west-1": {"sync": {"peerUrls": {"us-east-1": reserved_url}}},
        },
    ).start()
    flooded, peer = mesh[0], mesh[1]
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=reserved_url, timeout=30) as reserved, Flood(flooded) as flood:
        eventually(
            lambda: flooded.metric("bucketmesh_http_shed_lag_requests_total") > 0,
            "the flooded node sheds",
        )
        patched = reserved.patch("/v1/buckets/small", json={"capacity": 40}, headers=admin)
        assert patched.status_code == 200, patched.text
        assert reserved.get("/v1/status").status_code == 200
        assert reserved.get("/readyz").status_code == 200
        refused = reserved.post("/v1/rate", json={"key": "small-x"})
        assert refused.status_code == 404, refused.text
        assert "adminListen" in refused.json()["detail"]
        eventually(
            lambda: peer.client.get("/v1/buckets/small").json()["capacity"] == 40,
            "the PATCH made on the reserved listener reached the other region",
        )
        # the other region's sync reaches the flooded node through the reserved port
        granted = peer.client.post("/v1/rate", json={"key": "small-from-west", "tokens": 2})
        assert granted.status_code == 200, granted.text
        eventually(
            lambda: (
                reserved.get("/v1/status").json()["sync"]["peers"]["eu-west-1"]["state"] == "up"
            ),
            "the flooded node sees the other region up",
        )
    assert flood.errors == [], flood.errors
    assert set(flood.statuses) <= {200, 503}, flood.statuses
    assert flood.statuses[503] > 0, flood.statuses
    assert flooded.process.poll() is None
    eventually(
        lambda: sum(e["used"] for e in flooded.state("small-from-west")["replicas"].values()) == 2,
        "a grant made in the other region replicated to the flooded node (sent to its "
        "reserved port)",
    )


def test_a_bad_admin_listen_is_a_config_error_naming_file_and_field(
    serve: ServerFactory, tmp_path: Path
) -> None:
    for value in ("nowhere", "127.0.0.1:99999"):
        with pytest.raises(ConfigError) as caught:
            parse_config(yaml.safe_dump(make_config(adminListen=value)), file="node.yaml")
        assert caught.value.field == "adminListen", caught.value
        assert "node.yaml" in str(caught.value)
    # the main listener's port again: a real node refuses to start, naming both
    port = free_port()
    server = serve(
        make_config(RULES, listen=f"127.0.0.1:{port}", adminListen=f"127.0.0.1:{port}"),
        port=port,
        config_name="same-port.yaml",
        wait_ready=False,
    )
    assert server.wait(timeout=20) != 0
    assert "adminListen" in server.stderr()
    assert "same-port.yaml" in server.stderr()


def test_a_turn_after_one_that_ran_past_twice_the_shed_lag_is_shed_whole() -> None:
    """What the sockets hold after a long turn of the loop (a stall, a node short of CPU)
    waited through it: the next turn is shed whole, not served for its first
    ``shed_lag`` (those answers would come after the bound). The lag timer fires at the
    start of a turn, so its lateness stands for the last turn's length: set here, not
    waited for. A turn that starts on time serves again."""

    async def check() -> None:
        server = HttpServer(lambda request: Response(200, b"{}"), ServerLimits(shed_lag=0.1))
        await server.start("127.0.0.1", 0)
        try:
            loop = asyncio.get_running_loop()
            server._lag_due = loop.time() - 0.5  # the last turn ran half a second
            server._tick_lag()
            assert server._shedding_now()
            server._lag_due = loop.time() - 0.15  # one serving share and some shedding
            server._tick_lag()
            assert not server._shedding_now()
        finally:
            await server.shutdown()

    asyncio.run(check())


def test_a_turn_after_a_long_one_is_shed_whole_while_reserved_work_is_behind() -> None:
    """``HttpServer.yield_to`` (a node's sync sender: more deltas queued for a peer than
    one round of its pipeline carries): after a turn that ran past half ``shed_lag``
    while it says so, the next turn is shed whole (counted as ``yield``), so that the
    sender, whose every message waits a turn for its ack, gets short turns. A short
    last turn, or a sender that is not behind, serves as before; a sender far behind
    (``FAR_BEHIND``: its oldest queued delta waits past its bound) gets every turn,
    however short; never with shedding off (a ``shed_lag`` of hours)."""

    async def check() -> None:
        behind = [1]

        def sender_behind() -> int:
            return behind[0]

        server = HttpServer(lambda request: Response(200, b"{}"), ServerLimits(shed_lag=0.1))
        server.yield_to = sender_behind
        await server.start("127.0.0.1", 0)
        try:
            loop = asyncio.get_running_loop()
            server._lag_due = loop.time() - 0.07  # the last turn ran 70 ms: past half
            server._tick_lag()
            assert server._shedding_now() and server._shed_cause == "yield"
            behind[0] = 0
            server._lag_due = loop.time() - 0.07
            server._tick_lag()
            assert not server._shedding_now()
            behind[0] = 1
            server._lag_due = loop.time() - 0.02  # a short turn: served while merely behind
            server._tick_lag()
            assert not server._shedding_now()
            behind[0] = HttpServer.FAR_BEHIND  # far behind: shed whole, however short
            server._lag_due = loop.time() - 0.002
            server._tick_lag()
            assert server._shedding_now() and server._shed_cause == "yield"
            behind[0] = 1
            server._lag_due = loop.time() - 0.02  # back within reach: served again
            server._tick_lag()
            assert not server._shedding_now()
            server._lag_due = loop.time() - 0.3  # a stall: shed whole for lag, as before
            server._tick_lag()
            assert server._shedding_now() and server._shed_cause == "lag"
        finally:
            await server.shutdown()
        off = HttpServer(lambda request: Response(200, b"{}"), ServerLimits(shed_lag=3600.0))
        off.yield_to = lambda: HttpServer.FAR_BEHIND
        await off.start("127.0.0.1", 0)
        try:  # shedding off: never shed, however far behind
            off._lag_due = asyncio.get_running_loop().time() - 0.002
            off._tick_lag()
            assert not off._shedding_now()
        finally:
            await off.shutdown()

    asyncio.run(check())


def test_a_flooded_node_yields_turns_to_its_own_sync_sender_and_answers_every_request(
    serve: ServerFactory,
) -> None:
    """R6, the flooded node's own replication: under a flood of new keys (every decision
    a new bucket to replicate) its sender falls behind, and the node sheds whole turns
    for it (``bucketmesh_http_shed_yield_requests_total``) instead of letting its deltas
    queue for seconds: its sync messages keep going out and succeeding while the flood
    goes on, a grant made meanwhile reaches the other region before the flood ends, the
    reserved listener answers, and every flood request gets 200 or 503 (none hangs: the
    flood's reads time out after 30 s and would be counted). The link between the
    regions has 200 ms of latency each way, so that the sender falls behind on any
    machine: 8 messages of ~256 deltas per 400 ms round trip, fewer than the node serves."""
    admin_port = free_port()
    reserved_url = f"http://127.0.0.1:{admin_port}"
    mesh = Mesh(
        serve,
        ["us-east-1", "eu-west-1"],
        buckets=RULES,
        admin_token=ADMIN_TOKEN,
        faults=Faults(latency_s=0.2),
        peer_timeout_ms=3000,
        overrides={
            "us-east-1": {"adminListen": f"127.0.0.1:{admin_port}", "limits": {"shedLag": 1}},
            "eu-west-1": {"sync": {"peerUrls": {"us-east-1": reserved_url}}},
        },
    ).start()
    flooded, peer = mesh[0], mesh[1]
    sent = 'bucketmesh_sync_messages_sent_total{peer="eu-west-1"}'
    with httpx.Client(base_url=reserved_url, timeout=30) as reserved:

        def metric(name: str) -> float:
            match = re.search(rf"^{re.escape(name)} (\S+)$", reserved.get("/metrics").text, re.M)
            return float(match.group(1)) if match else 0.0

        with Flood(flooded, connections=4, fresh_keys=True) as flood:
            eventually(
                lambda: metric("bucketmesh_http_shed_yield_requests_total") > 0,
                "the flooded node yields a turn to its sync sender",
            )
            before = metric(sent)
            eventually(
                lambda: metric(sent) >= before + 10,
                "the flooded node's sync messages keep succeeding during the flood",
            )
            granted = 0
            while granted == 0:
                answer = flooded.client.post("/v1/rate", json={"key": "small-in-flood"})
                assert answer.status_code in (200, 503), answer.text
                granted = answer.status_code == 200
            eventually(
                lambda: (
                    sum(e["used"] for e in peer.state("small-in-flood")["replicas"].values()) >= 1
                ),
                "a grant made on the flooded node reaches the other region during the flood",
            )
            assert reserved.get("/v1/status").status_code == 200
            assert not flood._stop.is_set()  # all of the above happened during the flood
    assert flood.errors == [], flood.errors
    assert set(flood.statuses) <= {200, 503}, flood.statuses
    assert flood.statuses[503] > 0 and flood.statuses[200] > 0, flood.statuses
    assert flood.retry_after == Counter({"1": flood.statuses[503]})
    assert flooded.process.poll() is None
