"""Several nodes per region on the embedded store, no Redis: each node is its own
replica of the mesh, a slot named ``<region>.<node>`` exactly as an embedded
member's (``embed.py``), listed among ``sync.peers`` with its URL. Real ``serve``
processes: 2 regions × 2 nodes share one global bucket and converge, and the
client's key affinity lands each key on one node per region.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import SEED_RULE, Mesh, ServerFactory, eventually

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
