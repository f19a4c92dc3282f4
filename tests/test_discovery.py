"""A region's nodes find each other in the DNS of a headless Service (``sync.discovery``,
replication/discovery.py), re-resolved while they run.

A real authoritative DNS server on loopback (PyPI ``dnslib``) publishes the SRV and
A records Kubernetes publishes for a StatefulSet behind a headless Service; the test
changes them while real ``bucketmesh serve`` processes run: a pod added, a pod
rescheduled (new address), a pod removed. Each node is pointed at that server with
``sync.discovery.resolver`` (in Kubernetes the system resolver is used).
"""

from __future__ import annotations

import secrets
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import SEED_RULE, Server, ServerFactory, eventually, free_port, make_config
from dnslib import QTYPE, RCODE, RR, SRV, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from bucketmesh.node.config import ConfigError, parse_config

SERVICE = "bucketmesh-headless.bm.svc.cluster.local"
SRV_NAME = f"_http._tcp.{SERVICE}."
CAPACITY = 20
BUCKETS: list[dict[str, Any]] = [
    SEED_RULE,
    {
        "name": "global",
        "key": "g-{{ .Request.Query.k }}",
        "capacity": CAPACITY,
        "refillRate": 0.001,
    },
]


class Zone(BaseResolver):  # type: ignore[misc]
    """The headless Service's records: pod → (address, port); changed by the test."""

    def __init__(self) -> None:
        self.pods: dict[str, tuple[str, int]] = {}
        self.lock = threading.Lock()

    def publish(self, pod: str, port: int, address: str = "127.0.0.1") -> None:
        with self.lock:
            self.pods[pod] = (address, port)

    def withdraw(self, pod: str) -> None:
        with self.lock:
            del self.pods[pod]

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname)
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            pods = dict(self.pods)
        if name == SRV_NAME:
            if qtype == "SRV":
                for pod, (_, port) in sorted(pods.items()):
                    target = f"{pod}.{SERVICE}."
                    reply.add_answer(RR(name, QTYPE.SRV, rdata=SRV(0, 100, port, target), ttl=5))
            return reply
        pod = name.split(".", 1)[0]
        if name == f"{pod}.{SERVICE}." and pod in pods:
            if qtype == "A":
                reply.add_answer(RR(name, QTYPE.A, rdata=A(pods[pod][0]), ttl=5))
            return reply
        reply.header.rcode = RCODE.NXDOMAIN
        return reply


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def zone() -> Iterator[tuple[Zone, int]]:
    records = Zone()
    port = free_udp_port()
    quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data")
    server = DNSServer(records, port=port, address="127.0.0.1", tcp=False, logger=quiet)
    server.start_thread()
    try:
        yield records, port
    finally:
        server.stop()


SECRET = secrets.token_urlsafe(24)


def start(serve: ServerFactory, pod: str, port: int, dns_port: int) -> Server:
    config = make_config(
        BUCKETS,
        region=f"us-east-1.{pod}",
        node=pod,
        sync={
            "enabled": True,
            "peers": [],
            "interval": 20,
            "peerTimeout": 500,
            "discovery": {
                "dns": SERVICE,
                "resolver": f"127.0.0.1:{dns_port}",
                "interval": 100,
            },
        },
    )
    return serve(config, port=port, name=pod, env={"BUCKETMESH_SYNC_SECRET": SECRET})


def peers_up(server: Server) -> set[str]:
    with server.client() as client:
        peers = client.get("/v1/status").json()["sync"]["peers"]
    return {slot for slot, peer in peers.items() if peer["state"] == "up"}


def peers(server: Server) -> set[str]:
    with server.client() as client:
        return set(client.get("/v1/status").json()["sync"]["peers"])


def remaining(server: Server, key: str) -> int:
    with server.client() as client:
        response = client.get("/v1/bucket/state", params={"key": key})
    assert response.status_code == 200, response.text
    return int(response.json()["tokens_remaining"])


def spend(server: Server, key: str, n: int) -> None:
    with server.client() as client:
        for _ in range(n):
            response = client.post("/v1/rate", json={"key": key, "rule": "global"})
            assert response.status_code == 200, response.text


def test_nodes_follow_the_headless_services_dns_without_restarting(
    serve: ServerFactory, zone: tuple[Zone, int]
) -> None:
    records, dns_port = zone
    ports = {pod: free_port() for pod in ("bucketmesh-0", "bucketmesh-1", "bucketmesh-2")}
    records.publish("bucketmesh-0", ports["bucketmesh-0"])
    records.publish("bucketmesh-1", ports["bucketmesh-1"])
    a = start(serve, "bucketmesh-0", ports["bucketmesh-0"], dns_port)
    b = start(serve, "bucketmesh-1", ports["bucketmesh-1"], dns_port)
    eventually(lambda: peers_up(a) == {"us-east-1.bucketmesh-1"}, "0 found 1 in the DNS")
    eventually(lambda: peers_up(b) == {"us-east-1.bucketmesh-0"}, "1 found 0 in the DNS")
    key = "g-discovered"
    spend(a, key, 3)
    eventually(lambda: remaining(b, key) == CAPACITY - 3, "1 heard 0's spending")

    # a pod added: published, then started; the running nodes find it
    records.publish("bucketmesh-2", ports["bucketmesh-2"])
    c = start(serve, "bucketmesh-2", ports["bucketmesh-2"], dns_port)
    everyone = {f"us-east-1.bucketmesh-{i}" for i in range(3)}
    for node in (a, b, c):
        eventually(
            lambda node=node: peers_up(node) == everyone - {node.config["region"]},
            f"{node.name} meshes with the new pod",
        )
    eventually(lambda: remaining(c, key) == CAPACITY - 3, "the new pod has the state")

    # a pod rescheduled: the old process is gone, the new one answers at a new port
    b.kill()
    moved = free_port()
    records.publish("bucketmesh-1", moved)
    b2 = start(serve, "bucketmesh-1", moved, dns_port)
    for node in (a, c):
        eventually(
            lambda node=node: "us-east-1.bucketmesh-1" in peers_up(node),
            f"{node.name} reaches the rescheduled pod at its new address",
        )
    spend(b2, key, 2)
    for node in (a, c):
        eventually(
            lambda node=node: remaining(node, key) == CAPACITY - 5,
            f"{node.name} hears the rescheduled pod",
        )
    spend(a, key, 1)
    eventually(lambda: remaining(b2, key) == CAPACITY - 6, "the rescheduled pod hears 0")

    # a pod removed from the Service: the others stop syncing with it
    records.withdraw("bucketmesh-2")
    for node in (a, b2):
        eventually(
            lambda node=node: peers(node) == everyone - {node.config["region"], c.config["region"]},
            f"{node.name} dropped the withdrawn pod",
        )
    with a.client() as client:
        assert client.get("/readyz").status_code == 200
        metrics = client.get("/metrics").text
    assert "bucketmesh_discovery_peers 1.0" in metrics


def test_a_silent_dns_server_keeps_the_peers_and_the_node_ready(
    serve: ServerFactory, zone: tuple[Zone, int]
) -> None:
    records, dns_port = zone
    ports = {pod: free_port() for pod in ("bucketmesh-0", "bucketmesh-1")}
    for pod, port in ports.items():
        records.publish(pod, port)
    a = start(serve, "bucketmesh-0", ports["bucketmesh-0"], dns_port)
    b = start(serve, "bucketmesh-1", ports["bucketmesh-1"], dns_port)
    eventually(lambda: peers_up(a) == {"us-east-1.bucketmesh-1"}, "meshed")

    def answer_nothing(request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        reply.header.rcode = RCODE.SERVFAIL
        return reply

    records.resolve = answer_nothing  # type: ignore[method-assign]
    with a.client() as client:
        eventually(
            lambda: "bucketmesh_discovery_failures_total 0.0" not in client.get("/metrics").text,
            "a failed resolution is counted",
        )
        assert client.get("/readyz").status_code == 200
    assert peers(a) == {"us-east-1.bucketmesh-1"}  # kept
    # (and up: waited for, since a heartbeat late on a loaded machine marks it down
    # for a moment)
    eventually(lambda: peers_up(a) == {"us-east-1.bucketmesh-1"}, "still meshed")
    assert b.alive()


@pytest.mark.parametrize(
    ("discovery", "field", "problem"),
    [
        ({"dns": "not a name"}, "sync.discovery.dns", "must be a DNS name"),
        ({"dns": SERVICE, "resolver": "dns.local:53"}, "sync.discovery.resolver", "ip:port"),
        ({"dns": SERVICE, "portName": "a b"}, "sync.discovery.portName", "port's name"),
        ({"dns": SERVICE, "interval": 0}, "sync.discovery.interval", ""),
    ],
)
def test_a_bad_discovery_section_is_a_config_error_naming_the_field(
    discovery: dict[str, Any], field: str, problem: str
) -> None:
    import yaml

    text = yaml.safe_dump(
        {
            "region": "us-east-1.node-a",
            "node": "node-a",
            "sync": {"enabled": True, "secret": "s" * 32, "discovery": discovery},
            "buckets": [],
        }
    )
    with pytest.raises(ConfigError) as error:
        parse_config(text, file="bucketmesh.yaml")
    assert field in str(error.value)
    assert problem in str(error.value)


def test_discovery_needs_the_region_to_be_the_nodes_slot() -> None:
    text = (
        "region: us-east-1\nnode: node-a\n"
        f"sync: {{enabled: true, secret: {'s' * 32}, discovery: {{dns: {SERVICE}}}}}\n"
        "buckets: []\n"
    )
    with pytest.raises(ConfigError, match=r"sync\.discovery.*<region>\.node-a"):
        parse_config(text, file="bucketmesh.yaml")


# -- the Helm chart's rendering: a memory region of several pods on discovery --------------


def test_the_charts_memory_pods_find_each_other_in_the_headless_services_dns(
    serve: ServerFactory, zone: tuple[Zone, int], tmp_path: Any
) -> None:
    """The chart rendered with ``replicaCount=2`` on the memory backend (discovery is
    its default) runs as two ``serve`` processes with the pods' environment; the DNS
    server on loopback stands in for the cluster's, publishing the headless Service
    the rendering names, and a third pod scaled up later is found by the two."""
    import yaml
    from test_deploy_chart import SYNC_SECRET, render, values_from_sets

    records, dns_port = zone
    values = values_from_sets(
        "region=us-east-1",
        "sync.enabled=true",
        f"secret.syncSecret={SYNC_SECRET}",
        "replicaCount=2",
        "sync.interval=20",
        "sync.peerTimeout=500",
        "sync.discovery.interval=100",
    )
    rendering = render(values, namespace="bm")
    files = rendering.config_files()
    rendered = yaml.safe_load(files["bucketmesh.yaml"])
    assert rendered["sync"]["peers"] == []  # no static list of this region's pods
    assert rendered["sync"]["discovery"] == {
        "dns": SERVICE,  # bucketmesh-headless.bm.svc.cluster.local
        "portName": "http",
        "interval": 100,
    }
    servers: dict[str, Server] = {}

    def boot(pod: str) -> None:
        port = free_port()
        records.publish(pod, port)
        config = yaml.safe_load(files["bucketmesh.yaml"])
        config["buckets"] = yaml.safe_load(files["buckets.yaml"])["buckets"]
        config["storage"]["snapshot"] = str(tmp_path / f"{pod}.snap")
        # the reserved listener: a port of each pod's own (each pod has its own address)
        config["adminListen"] = f"127.0.0.1:{free_port()}"
        config["sync"]["discovery"]["resolver"] = f"127.0.0.1:{dns_port}"  # the cluster's DNS
        env = {
            "BUCKETMESH_NODE": pod,
            "BUCKETMESH_REGION": f"us-east-1.{pod}",  # as Kubernetes expands it
            "BUCKETMESH_SYNC_SECRET": SYNC_SECRET,
        }
        servers[pod] = serve(config, env=env, port=port, name=pod)

    for pod in ("bucketmesh-0", "bucketmesh-1"):
        boot(pod)
    boot("bucketmesh-2")  # scaled up: not in any rendering's list, found in the DNS
    slots = {f"us-east-1.{pod}" for pod in servers}
    for pod, server in servers.items():
        eventually(
            lambda server=server, pod=pod: peers_up(server) == slots - {f"us-east-1.{pod}"},
            f"{pod} meshes with the other pods",
        )
