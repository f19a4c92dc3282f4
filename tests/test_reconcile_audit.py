"""Nodes record the repairs ``bucketmesh reconcile --repair`` writes into them (issue 16).

Three real regions with ``audit.enabled``, cut off from each other so that they
diverge (as in ``test_reconcile.py``); reconcile repairs them, and each node's own
audit trail then holds one ``repair`` event per key it changed there: who did it
(the tool's authenticated sender and which sync secret signed it), the key and rule,
old -> new level and replica entries.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from conftest import MESH_CLUSTER_ID, Mesh, ServerFactory, eventually
from test_reconcile import REGIONS, RULE, TOKEN, partition, reconcile, spend, urls


def repairs(trail: Path) -> list[dict[str, Any]]:
    if not trail.exists():
        return []
    events = [json.loads(line) for line in trail.read_text().splitlines() if line.strip()]
    return [event for event in events if event["event"] == "repair"]


def recorded(trail: Path, key: str) -> list[dict[str, Any]]:
    """The repair events of ``key`` in ``trail``, once there is one (for ``eventually``)."""
    events = [event for event in repairs(trail) if event.get("key") == key]
    assert events, f"no repair of {key} in {trail.name} yet"
    return events


def test_each_node_records_the_repairs_written_into_it(
    serve: ServerFactory, tmp_path: Path
) -> None:
    trails = {region: tmp_path / f"{region}.audit.jsonl" for region in REGIONS}
    overrides = {
        region: {"audit": {"enabled": True, "path": str(trails[region])}} for region in REGIONS
    }
    mesh = Mesh(serve, REGIONS, buckets=[RULE], admin_token=TOKEN, overrides=overrides).start()
    east, west, central = (mesh.nodes[region] for region in REGIONS)
    ids = {node.region: node.status()["replica_id"] for node in mesh.nodes.values()}
    partition(mesh)
    spend(east, "rc-split", 10)
    spend(west, "rc-split", 20)
    spend(central, "rc-split", 30)
    spend(west, "rc-one", 7)

    status, out, err = reconcile(mesh, "--cluster", MESH_CLUSTER_ID, *urls(mesh))
    assert status == 1, out + err
    signer = "secret:" + hashlib.sha256(mesh.secret.encode()).hexdigest()[:12]
    joined = {ids["us-east-1"]: 10, ids["us-west-2"]: 20, ids["eu-central-1"]: 30}
    spent = {"us-east-1": 10, "us-west-2": 20, "eu-central-1": 30}
    for node in (east, west, central):
        events = eventually(
            lambda n=node: recorded(trails[n.region], "rc-split"),
            f"{node.name} recorded the repair of rc-split",
        )
        assert len(events) == 1, events
        event = events[0]
        assert event["who"].startswith("sync:@reconcile/"), event
        assert event["signed_by"] == signer
        assert event["rule"] == "rc" and event["region"] == node.region
        assert event["replica"] == ids[node.region]
        own = spent[node.region]
        assert event["old"] == {"tokens_remaining": 100 - own, "entries": {ids[node.region]: own}}
        assert event["new"] == {"tokens_remaining": 40, "entries": joined}
    # rc-one: new to east and central (no bucket there before), unchanged at west
    for node in (east, central):
        (event,) = eventually(
            lambda n=node: recorded(trails[n.region], "rc-one"), f"{node.name} recorded rc-one"
        )
        assert event["old"] is None
        assert event["new"] == {"tokens_remaining": 93, "entries": {ids["us-west-2"]: 7}}
    assert not [e for e in repairs(trails["us-west-2"]) if e.get("key") == "rc-one"]

    # nothing left to repair (exit 0): reconcile pushes nothing, so nothing is recorded
    before = {region: len(repairs(trail)) for region, trail in trails.items()}
    status, out, err = reconcile(mesh, "--cluster", MESH_CLUSTER_ID, *urls(mesh))
    assert status == 0, out + err
    assert {region: len(repairs(trail)) for region, trail in trails.items()} == before
