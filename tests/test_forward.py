"""Forwarding a key to the node of its region that owns it (``affinity.forward``,
api/forward.py). A real region of three ``serve`` processes, slots
``us-east-1.node-{a,b,c}``, every request sent to node-a: each key is decided by its
owner on the MurmurHash3 ring, a forwarded request is never forwarded again, an
Idempotency-Key retry through any node is decided once, and with the owner gone the
entry node decides itself (counted) instead of failing.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import SEED_RULE, Mesh, MeshNode, ServerFactory, eventually

from bucketmesh.core.affinity import Ring

SLOTS = [f"us-east-1.node-{x}" for x in "abc"]
RING = Ring([slot.split(".", 1)[1] for slot in SLOTS])
CAPACITY = 50
BUCKETS: list[dict[str, Any]] = [
    SEED_RULE,
    {
        "name": "global",
        "key": "g-{{ .Request.Query.k }}",
        "capacity": CAPACITY,
        "refillRate": 0.001,
    },
]


@pytest.fixture(scope="module")
def mesh(serve_module: ServerFactory) -> Mesh:
    overrides = {
        slot: {"node": slot.split(".", 1)[1], "affinity": {"forward": True, "forwardTimeout": 2000}}
        for slot in SLOTS
    }
    started = Mesh(serve_module, SLOTS, buckets=BUCKETS, overrides=overrides).start()
    eventually(started.connected, "the three nodes mesh")
    return started


def owned_by(node: str, count: int = 2, prefix: str = "g-fwd") -> list[str]:
    keys = (f"{prefix}-{i}" for i in range(10_000))
    return [key for key in keys if RING.owner(key) == node][:count]


def spenders(node: MeshNode, key: str) -> dict[str, int]:
    state = node.state(key)
    return {r.split("/")[0]: e["used"] for r, e in state["replicas"].items() if e["used"]}


def test_every_key_is_decided_by_its_owner_whichever_node_gets_it(mesh: Mesh) -> None:
    entry = mesh.nodes["us-east-1.node-a"]
    keys = owned_by("node-a") + owned_by("node-b") + owned_by("node-c")
    for key in keys:
        for _ in range(2):
            response = entry.client.post("/v1/rate", json={"key": key, "rule": "global"})
            assert response.status_code == 200, response.text
            owner = f"us-east-1.{RING.owner(key)}"
            assert response.json()["region"] == owner  # the owner decided it
            assert response.headers["RateLimit"].startswith('"global"')
    for key in keys:
        owner = f"us-east-1.{RING.owner(key)}"
        eventually(lambda key=key, owner=owner: spenders(entry, key) == {owner: 2}, key)
    assert entry.metric("bucketmesh_forwarded_requests_total") == 8
    for slot in ("us-east-1.node-b", "us-east-1.node-c"):
        assert mesh.nodes[slot].metric("bucketmesh_forward_received_requests_total") == 4


def test_a_forwarded_request_is_decided_where_it_lands(mesh: Mesh) -> None:
    entry = mesh.nodes["us-east-1.node-a"]
    (key,) = owned_by("node-b", 1, prefix="g-landed")
    response = entry.client.post(
        "/v1/rate",
        json={"key": key, "rule": "global"},
        headers={"X-Bucketmesh-Forwarded": "us-east-1.node-c"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["region"] == "us-east-1.node-a"  # no second hop, no loop


def test_an_idempotent_retry_through_any_node_is_decided_once(mesh: Mesh) -> None:
    (key,) = owned_by("node-b", 1, prefix="g-idem")
    first, other = mesh.nodes["us-east-1.node-a"], mesh.nodes["us-east-1.node-c"]
    headers = {"Idempotency-Key": "order-17"}
    body = {"key": key, "rule": "global", "tokens": 5}
    answers = [
        node.client.post("/v1/rate", json=body, headers=headers) for node in (first, first, other)
    ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[1].headers.get("Idempotent-Replayed") == "true"
    assert answers[2].headers.get("Idempotent-Replayed") == "true"  # the owner's replay
    assert {a.json()["tokens_remaining"] for a in answers} == {CAPACITY - 5}
    mesh_node = mesh.nodes["us-east-1.node-b"]
    eventually(lambda: spenders(mesh_node, key) == {"us-east-1.node-b": 5}, "charged once")


def test_with_the_owner_gone_the_entry_node_decides_and_counts_it(mesh: Mesh) -> None:
    entry = mesh.nodes["us-east-1.node-a"]
    (key,) = owned_by("node-c", 1, prefix="g-gone")
    gone = mesh.nodes["us-east-1.node-c"]
    assert gone.server is not None
    gone.server.kill()
    before = sum(
        entry.metric("bucketmesh_forward_fallbacks_total", f'reason="{reason}"')
        for reason in ("owner_down", "timeout", "unreachable", "owner_error")
    )
    response = entry.client.post("/v1/rate", json={"key": key, "rule": "global"})
    assert response.status_code == 200, response.text
    assert response.json()["region"] == "us-east-1.node-a"
    after = sum(
        entry.metric("bucketmesh_forward_fallbacks_total", f'reason="{reason}"')
        for reason in ("owner_down", "timeout", "unreachable", "owner_error")
    )
    assert after == before + 1
    assert spenders(entry, key) == {"us-east-1.node-a": 1}


def test_a_silent_owner_costs_at_most_the_forward_timeout(serve: ServerFactory) -> None:
    """The link to the owner is a black hole (a real TCP proxy that stops passing
    bytes): the entry node waits ``forwardTimeout`` for it, then decides itself."""
    overrides = {
        slot: {"node": slot.split(".", 1)[1], "affinity": {"forward": True, "forwardTimeout": 300}}
        for slot in SLOTS[:2]
    }
    # (a peer timeout long enough that the mesh does not mark the owner down first)
    mesh = Mesh(
        serve, SLOTS[:2], buckets=BUCKETS, overrides=overrides, proxied=True, peer_timeout_ms=10_000
    ).start()
    eventually(mesh.connected, "the two nodes mesh")
    entry = mesh.nodes["us-east-1.node-a"]
    ring = Ring(["node-a", "node-b"])
    key = next(f"g-silent-{i}" for i in range(1000) if ring.owner(f"g-silent-{i}") == "node-b")
    mesh.cut("us-east-1.node-b")
    response = entry.client.post("/v1/rate", json={"key": key, "rule": "global"})
    assert response.status_code == 200, response.text
    assert response.json()["region"] == "us-east-1.node-a"
    assert entry.metric("bucketmesh_forward_fallbacks_total", 'reason="timeout"') == 1
