"""A node that restarts without the state of its previous life never grants that life's
tokens again (issue 12, cases 3, 4 and 11; issue 23, case 5). Real ``bucketmesh serve``
processes, killed with kill -9 and restarted, in meshes of two and three regions.

- strict mode (its counters never leave the region): a node restarted without a
  snapshot starts its strict buckets empty and lets them refill from its start;
- a node restarted without a snapshot while every peer is silent (a partition) does
  the same for its shared buckets;
- strict shares follow a change in the number of regions (restored buckets are
  rescaled keeping what they spent, a joining region starts empty);
- a strict key's per-key PATCH outlives the key's bucket going idle in one region.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Mesh, MeshNode, ServerFactory, eventually, make_config

ADMIN_TOKEN = "admin-token"


def strict_rule(capacity: int) -> dict[str, Any]:
    # one token per 1000 s over the whole mesh: no refill within a test
    return {"name": "s", "key": "s-{{ .Request.Query.k }}", "capacity": capacity,
            "refillRate": 0.001, "ttl": 3600, "mode": "strict"}  # fmt: skip


def granted(node: MeshNode, path: str, count: int) -> int:
    with httpx.Client(base_url=node.base_url, timeout=10.0) as client:
        return sum(client.post(path).status_code == 200 for _ in range(count))


@pytest.mark.parametrize("snapshot", [False, True], ids=["no-snapshot", "snapshot"])
def test_a_strict_region_killed_and_restarted_grants_nothing_twice(
    serve: ServerFactory, tmp_path: Path, snapshot: bool
) -> None:
    """Issue 12, case 3: limit 10 over two regions, each spends its 5, one is killed
    and restarted: it granted its 5 again. The first lives start with snapshot paths of
    their own that do not exist yet (a first start: full shares); the restart keeps its
    snapshot (restored exactly) or runs without one (its strict buckets start empty)."""
    regions = ["us-east-1", "eu-central-1"]
    overrides = {r: {"storage": {"snapshot": str(tmp_path / f"{r}.snap")}} for r in regions}
    mesh = Mesh(serve, regions, buckets=[strict_rule(10)], overrides=overrides).start()
    a, b = mesh[0], mesh[1]
    # each region starts with its share of 5. Ask both, one request each in turn,
    # until a round grants nothing: the rebalancer may move a right meanwhile, and a
    # moved right arrives without its token (docs/sync.md), so the first lives may
    # spend a little under 10 (8 once in a full run; what it must not do is spend
    # more after the restart)
    total = 0
    while True:
        round_ = granted(a, "/v1/rate?k=x", 1) + granted(b, "/v1/rate?k=x", 1)
        total += round_
        if not round_:
            break
    assert 6 <= total <= 10, total

    a.kill()
    if not snapshot:
        del a.config["storage"]["snapshot"]
    mesh.restart(a)
    total += granted(a, "/v1/rate?k=x", 8) + granted(b, "/v1/rate?k=x", 8)
    assert total <= 10, f"{total} granted against a strict limit of 10"


@pytest.mark.parametrize("policy", ["refill", "full"])
def test_a_node_restarted_without_a_snapshot_behind_a_partition_regrants_nothing(
    serve: ServerFactory, policy: str
) -> None:
    """Issue 23, case 5: killed and restarted while cut off from every peer, the node's
    start-up pull reaches nobody; it used to start with full buckets, which is now
    what ``sync.unrecoveredStart: full`` asks for (the default is ``refill``)."""
    rule = {"name": "g", "key": "g-{{ .Request.Query.k }}", "capacity": 100,
            "refillRate": 0.001, "ttl": 3600}  # fmt: skip
    regions = ["us-east-1", "eu-central-1"]
    # a silent peer is waited for 1 s at start (sync.unrecoveredWait), not the default 10 s
    sync = {"unrecoveredStart": policy, "unrecoveredWait": 1000}
    overrides = {r: {"sync": sync} for r in regions}
    mesh = Mesh(serve, regions, buckets=[rule], proxied=True, overrides=overrides).start()
    a, b = mesh[0], mesh[1]
    assert granted(b, "/v1/rate?k=x", 30) == 30
    eventually(lambda: a.state("g-x")["tokens_remaining"] == 70, "the grants reached a")
    mesh.cut(b.name)
    assert granted(b, "/v1/rate?k=x", 20) == 20  # never acknowledged by anyone

    b.kill()
    mesh.restart(b)  # still cut off: the pull times out
    again = granted(b, "/v1/rate?k=x", 100)
    assert "sync is enabled without storage.snapshot" in b.log()
    assert "no peer answered the start-up pull" in b.log(), b.log()
    if policy == "full":
        assert again == 100  # as asked: the previous life's 50 are granted again
        return
    assert again == 0, f"{again} tokens of its previous life granted again"
    # the other region, which knows the 30, still serves what is left
    assert granted(a, "/v1/rate?k=x", 100) == 70


def test_strict_shares_follow_a_region_joining(serve: ServerFactory, tmp_path: Path) -> None:
    """Issue 12, case 4: adding region c and restarting everyone left the restored
    buckets on the old half shares (6 + 6 + 4 for a limit of 12)."""
    two = ["us-east-1", "eu-central-1"]
    snap = {r: {"storage": {"snapshot": str(tmp_path / f"{r}.snap")}} for r in two}
    mesh = Mesh(serve, two, buckets=[strict_rule(12)], overrides=snap).start()
    total = sum(granted(node, "/v1/rate?k=x", 8) for node in mesh.nodes.values())
    # not exactly 12: the first region's demand may draw a right from the second
    # before the second is asked, and a moved right arrives without its token
    # (docs/sync.md), as in the first test; never more than the limit
    assert 6 <= total <= 12, total
    for node in mesh.nodes.values():
        assert node.server is not None and node.server.stop(signal.SIGTERM) == 0

    three = Mesh(serve, [*two, "ap-southeast-2"], buckets=[strict_rule(12)], overrides=snap)
    three.start()

    # issue 18: the key's rights ledger (founded by the two first regions) came back
    # with their snapshots: the added region starts from what it is given (its floor),
    # and the capacities together never exceed the limit
    # (waited for, not read once: the three are read at three instants while the two
    # give the added region its floor, and a gift counts at its giver first, so a
    # giver read before it gave and a receiver read after it received sum over the
    # limit for a moment; the defect this guards against, restored half shares beside
    # the new region's, holds at every instant)
    def capacities() -> list[int]:
        found = [node.state("s-x")["capacity"] for node in three.nodes.values()]
        assert sum(found) <= 12, found
        return found

    eventually(capacities, "the capacities together within the limit")
    total += sum(granted(node, "/v1/rate?k=x", 8) for node in three.nodes.values())
    assert total <= 12, f"{total} granted against a strict limit of 12"


def test_a_strict_keys_patch_outlives_its_bucket_going_idle(serve: ServerFactory) -> None:
    """Issue 12, case 11: the region where the key went idle for its ttl reverted to
    the rule's share (50) while the other kept the patched share (5)."""
    rule = {**strict_rule(100), "refillRate": 1000.0, "ttl": 1}  # refills at once, idles fast
    mesh = Mesh(serve, ["us-east-1", "eu-central-1"], buckets=[rule], admin_token=ADMIN_TOKEN)
    mesh.start()
    a, b = mesh[0], mesh[1]
    # A node without a snapshot starts blind: its strict buckets start empty and refill
    # (docs/sync.md), here within milliseconds; a 429 spends nothing, so ask again.
    eventually(lambda: granted(a, "/v1/rate?k=p", 1) == 1, "a first grant in us-east-1")
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    patched = a.client.patch("/v1/buckets/s-p", json={"capacity": 10}, headers=admin)
    # 202: a lowering not covered at its origin is pending (issue 18, docs/api.md)
    assert patched.status_code in (200, 202), patched.text
    eventually(lambda: granted(b, "/v1/rate?k=p", 1) == 1, "a first grant in eu-central-1")
    # (issue 18: a region's share of the patched 10 follows demand; the rule's would be
    # a share of 100)
    version = a.state("s-p")["config_version"]
    eventually(
        lambda: b.state("s-p")["config_version"] == version, "the patch reaches the other region"
    )
    assert 0 < b.state("s-p")["capacity"] <= 10

    eventually(lambda: not b.state("s-p")["live"], "the key goes idle and is dropped")
    eventually(lambda: granted(b, "/v1/rate?k=p", 1) == 1, "a grant once re-created")
    assert 0 < b.state("s-p")["capacity"] <= 10


def test_a_patch_of_mode_reaches_every_region_whatever_its_epoch(
    serve: ServerFactory, tmp_path: Path
) -> None:
    """Issue 12, case 12: ``mode=local`` was ignored by the peer, and the patched region
    kept merging the peer's spending; a change back to shared was ignored by a region
    whose own bucket had been re-created in a later epoch."""
    # 10 tokens, one every 2 s; a full bucket idles out after 1 s
    rule = {"name": "m", "key": "m-{{ .Request.Query.k }}", "capacity": 10,
            "refillRate": 0.5, "ttl": 1}  # fmt: skip
    regions = ["us-east-1", "eu-central-1"]
    snap = {r: {"storage": {"snapshot": str(tmp_path / f"{r}.snap")}} for r in regions}
    mesh = Mesh(serve, regions, buckets=[rule], admin_token=ADMIN_TOKEN, overrides=snap).start()
    a, b = mesh[0], mesh[1]
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    assert granted(a, "/v1/rate?k=x", 1) == 1
    eventually(lambda: b.state("m-x")["tokens_remaining"] == 9, "b sees a's grant")
    patched = a.client.patch("/v1/buckets/m-x", json={"mode": "local"}, headers=admin)
    assert patched.status_code == 200, patched.text
    eventually(lambda: b.state("m-x")["mode"] == "local", "the peer takes mode=local")

    # what each region spends now is its own: a drains its bucket (in debt ~20 s), b
    # keeps its level, idles out and comes back in a later epoch than a's bucket
    assert granted(a, "/v1/rate?k=x", 12) == 9
    eventually(lambda: not b.state("m-x")["live"], "b's bucket idles out")
    assert granted(b, "/v1/rate?k=x", 3) == 3
    state_a, state_b = a.state("m-x"), b.state("m-x")
    assert state_a["live"] and state_b["mode"] == "local"
    assert state_b["epoch"] > state_a["epoch"]
    assert all(rid.startswith("us-east-1/") for rid in state_a["replicas"]), state_a

    # back to shared, from the region whose bucket has the lower epoch
    patched = a.client.patch("/v1/buckets/m-x", json={"mode": "shared"}, headers=admin)
    assert patched.status_code == 200, patched.text
    eventually(lambda: b.state("m-x")["mode"] == "shared", "the change wins over b's epoch")


def test_a_region_restarted_without_a_snapshot_pulls_back_a_strict_keys_patch(
    serve: ServerFactory,
) -> None:
    """Strict counters never travel, but a strict key's per-key config does: the
    start-up pull brings it back to a region that lost it with its memory."""
    rule = {**strict_rule(100), "refillRate": 1000.0}
    mesh = Mesh(serve, ["us-east-1", "eu-central-1"], buckets=[rule], admin_token=ADMIN_TOKEN)
    mesh.start()
    a, b = mesh[0], mesh[1]
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    patched = a.client.patch("/v1/buckets/s-q", json={"capacity": 10}, headers=admin)
    # 202: a lowering not covered at its origin is pending (issue 18, docs/api.md)
    assert patched.status_code in (200, 202), patched.text
    # (issue 18: a region's share of the patched 10 follows demand, at most 10)
    version = a.state("s-q")["config_version"]
    eventually(
        lambda: b.state("s-q")["config_version"] == version, "the patch reaches the other region"
    )
    assert 0 < b.state("s-q")["capacity"] <= 10

    b.kill()
    mesh.restart(b)
    assert "start-up state pulled from us-east-1" in b.log(), b.log()
    assert 0 < b.state("s-q")["capacity"] <= 10  # not a share of the rule's 100


def test_a_strict_patch_below_a_grown_mesh_stops_the_start_naming_it(
    serve: ServerFactory, tmp_path: Path
) -> None:
    """A PATCH made strict limit 3 over 3 regions; the mesh then grew to 4 and the node
    restarted from its snapshot: every region's share held 0 tokens and every request of
    the rule got 429, with no warning. Now the start stops naming the rule."""

    def config(regions: list[str]) -> dict[str, Any]:
        return make_config(
            [
                {
                    "name": "per-ip",
                    "key": "ip-{{ .Request.ClientIP }}",
                    "capacity": 10,
                    "refillRate": 1,
                }
            ],
            sync={
                "enabled": True,
                "secret": "s" * 32,
                "peers": regions,
                "peerUrls": "http://{region}.invalid:18990",
            },
        )

    snapshot = tmp_path / "state.snap"
    three = ["us-east-1", "r2", "r3"]
    node = serve(config(three), snapshot=snapshot)
    with node.client() as client:
        patched = client.patch("/v1/buckets/per-ip", json={"mode": "strict", "capacity": 3})
        assert patched.status_code == 200, patched.text
    assert node.stop(signal.SIGTERM) == 0

    grown = serve(config([*three, "r4"]), snapshot=snapshot, wait_ready=False)
    assert grown.wait() != 0
    assert "'per-ip' (capacity 3)" in grown.stderr()
    assert "at least 4" in grown.stderr()
    # the same snapshot in the mesh it was made for serves as before
    again = serve(config(three), snapshot=snapshot)
    with again.client() as client:
        assert client.post("/v1/rate").status_code == 200
