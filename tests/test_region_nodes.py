"""Several nodes per region on the embedded store, no Redis: each node is its own
replica of the mesh, a slot named ``<region>.<node>`` exactly as an embedded
member's (``embed.py``), listed among ``sync.peers`` with its URL. Real ``serve``
processes: 2 regions × 2 nodes share one global bucket and converge, and the
client's key affinity lands each key on one node per region.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import SEED_RULE, Mesh, ServerFactory, eventually, free_port

from bucketmesh.client import Client, RetryPolicy
from bucketmesh.core.affinity import Ring

FAST = RetryPolicy(total_timeout=20.0, backoff_base=0.01, backoff_cap=0.05)
SLOTS = ["us-east-1.node-a", "us-east-1.node-b", "eu-west-1.node-a", "eu-west-1.node-b"]
CAPACITY = 20
BUCKETS: list[dict[str, Any]] = [
    SEED_RULE,
    # refills so slowly (one token per 1000 s) that a test sees no refill at all
    {
        "name": "global",
        "key": "g-{{ .Request.Query.k }}",
        "capacity": CAPACITY,
        "refillRate": 0.001,
    },
]


@pytest.fixture(scope="module")
def mesh(serve_module: ServerFactory) -> Mesh:
    return Mesh(serve_module, SLOTS, buckets=BUCKETS).start()


def rate(mesh: Mesh, slot: str, key: str) -> bool:
    response = mesh.nodes[slot].client.post("/v1/rate", json={"key": key, "rule": "global"})
    assert response.status_code in (200, 429), response.text
    return response.status_code == 200


def test_each_node_is_a_replica_syncing_with_every_other(mesh: Mesh) -> None:
    for node in mesh.nodes.values():
        status = node.status()
        assert status["region"] == node.region  # the slot names the node's replica
        peers = set(status["sync"]["peers"])
        assert peers == set(SLOTS) - {node.region}, (node.name, peers)


def test_four_nodes_share_one_global_bucket_and_converge(mesh: Mesh) -> None:
    key = "g-shared"
    share = CAPACITY // len(SLOTS)
    for slot in SLOTS:
        for _ in range(share):
            assert rate(mesh, slot, key), slot
        eventually(mesh.quiescent, f"{slot}'s spending reached every node")
    state = eventually(lambda: mesh.converged(key, total=CAPACITY), "the nodes converge")
    assert state["tokens_remaining"] == 0
    assert {replica.split("/")[0] for replica in state["replicas"]} == set(SLOTS)
    for slot in SLOTS:  # the bucket is global: every node of every region is out
        assert not rate(mesh, slot, key), slot


def test_client_affinity_lands_a_key_on_one_node_per_region(mesh: Mesh) -> None:
    ring = Ring(["node-a", "node-b"])
    nodes = {
        region: {
            slot.split(".", 1)[1]: mesh.nodes[slot].base_url
            for slot in SLOTS
            if slot.startswith(region + ".")
        }
        for region in ("us-east-1", "eu-west-1")
    }
    url = {region: urls["node-a"] for region, urls in nodes.items()}
    keys = [f"g-affine-{i}" for i in range(12)]
    with Client(url, nodes=nodes, retry=FAST) as client:
        for key in keys:
            for _ in range(3):
                assert client.rate(key, rule="global").allowed
    assert {ring.owner(k) for k in keys} == {"node-a", "node-b"}
    for key in keys:
        state = eventually(lambda key=key: mesh.converged(key, total=3), f"{key} converges")
        spenders = {replica.split("/")[0] for replica in state["replicas"]}
        assert spenders == {f"us-east-1.{ring.owner(key)}"}, (key, spenders)


# -- the Helm chart's rendering: a memory region of several pods boots ------------------------


def test_the_charts_memory_rendering_of_two_pods_per_region_boots_one_mesh(
    serve: ServerFactory, tmp_path: Path
) -> None:
    """Two regions, each the chart rendered with ``replicaCount=2`` on the memory
    backend, run as four ``serve`` processes with the pods' environment
    (``BUCKETMESH_NODE`` the pod name; ``BUCKETMESH_REGION`` as Kubernetes expands
    ``<region>.$(BUCKETMESH_NODE)``). Loopback stands in for the cluster's DNS:
    each headless-Service URL of the rendering is mapped to its pod's port."""
    from test_deploy_chart import SYNC_SECRET, render, values_from_sets

    regions = ("us-east-1", "eu-west-1")
    pods = [f"bucketmesh-{i}" for i in range(2)]
    slots = [f"{region}.{pod}" for region in regions for pod in pods]
    ports = {slot: free_port() for slot in slots}
    servers: dict[str, Any] = {}
    for region in regions:
        others = [slot for slot in slots if not slot.startswith(region + ".")]
        values = values_from_sets(
            f"region={region}",
            "sync.enabled=true",
            f"sync.peers={{{','.join(others)}}}",
            f"secret.syncSecret={SYNC_SECRET}",
            "replicaCount=2",
            "sync.discovery.enabled=false",  # the static list (DNS: tests/test_discovery.py)
            "sync.interval=20",
            "sync.peerTimeout=500",
            # a slot's dots are escaped: --set would read them as nesting
            *(
                f"sync.peerUrls.{slot.replace('.', chr(92) + '.')}=http://127.0.0.1:{ports[slot]}"
                for slot in others
            ),
        )
        rendering = render(values, namespace="bm")
        files = rendering.config_files()
        (container,) = rendering.workload["spec"]["template"]["spec"]["containers"]
        region_value = next(
            e["value"] for e in container["env"] if e["name"] == "BUCKETMESH_REGION"
        )
        assert rendering.workload["spec"]["replicas"] == 2
        for pod in pods:
            config = yaml.safe_load(files["bucketmesh.yaml"])
            config["buckets"] = yaml.safe_load(files["buckets.yaml"])["buckets"]
            config["storage"]["snapshot"] = str(tmp_path / f"{region}.{pod}.snap")
            # the reserved listener (the sync Service's target): a port of each pod's
            # own here, as each pod has an address of its own in a cluster
            assert config["adminListen"] == "0.0.0.0:8090"
            config["adminListen"] = f"127.0.0.1:{free_port()}"
            dns = {  # the headless Service's names → loopback
                f"http://{p}.bucketmesh-headless.bm.svc:8080": f"http://127.0.0.1:{ports[f'{region}.{p}']}"
                for p in pods
            }
            config["sync"]["peerUrls"] = {
                peer: dns.get(url, url) for peer, url in config["sync"]["peerUrls"].items()
            }
            slot = region_value.replace("$(BUCKETMESH_NODE)", pod)
            env = {
                "BUCKETMESH_NODE": pod,
                "BUCKETMESH_REGION": slot,
                "BUCKETMESH_SYNC_SECRET": SYNC_SECRET,
            }
            servers[slot] = serve(config, env=env, port=ports[slot], name=slot, wait_ready=False)
    for server in servers.values():
        server.wait_ready()

    def meshed() -> None:
        for slot, server in servers.items():
            status = httpx.get(server.base_url + "/v1/status", timeout=10).json()
            assert status["region"] == slot
            states = {p: e["state"] for p, e in status["sync"]["peers"].items()}
            assert states == dict.fromkeys(set(slots) - {slot}, "up"), (slot, states)

    eventually(meshed, "every pod sees the other three up")
    for server in servers.values():  # the seed rule: 10 tokens on each pod, one bucket
        for _ in range(10):
            response = httpx.post(
                server.base_url + "/v1/rate", headers={"X-API-Key": "pods"}, timeout=10
            )
            assert response.status_code == 200, response.text

    def converged() -> None:
        for server in servers.values():
            state = httpx.get(
                server.base_url + "/v1/bucket/state",
                params={"key": "agent-api-key-pods"},
                timeout=10,
            ).json()
            used = {r.split("/")[0]: e["used"] for r, e in state["replicas"].items() if e["used"]}
            assert used == dict.fromkeys(slots, 10), used

    eventually(converged, "every pod sees the 40 tokens spent on the four")
