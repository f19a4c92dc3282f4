"""``bucketmesh reconcile`` folds retired incarnations away, against three real
regions (issue 16 item 2).

One node is restarted ten times (SIGTERM, then a new process resuming its
snapshot file under a new incarnation) while every region serves a steady load
on one hot key, so the hot bucket holds an entry for each of its eleven
incarnations. Once the mesh is quiet, reconcile folds the ten retired ones: the
bucket then holds one entry per live replica, in every region, and every
region's ``tokens_remaining`` is what it was (the rule refills one token per
10,000 s, so levels are exact). ``--dry-run`` reports the entries it would fold
and folds nothing. A further restart of the folded node does not bring a folded
entry back (the fold is in its snapshot and in its peers' state).

``--fold-wait 1``: the wait between reconcile's two looks must exceed how long a
sync message can be in flight (the default, 35 s, covers the mesh's 30 s
window); these nodes talk over loopback with no proxy, so nothing is in flight
for a second, and reconcile still checks that no node restarted in between.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import MESH_CLUSTER_ID, Mesh, MeshNode, ServerFactory, eventually

REGIONS = ["us-east-1", "us-west-2", "eu-central-1"]
KEY = "hot-alice"
RULE = {
    "name": "hot",
    "key": "hot-{{ .Request.Header.X-User }}",
    "capacity": 100_000,
    "refillRate": 0.0001,
    "ttl": 3600,
}


class Load:
    """A client asking every region for the hot key in turn, until stopped."""

    def __init__(self, mesh: Mesh) -> None:
        self.urls = [node.base_url for node in mesh.nodes.values()]
        self.granted = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while not self.stopped.is_set():
                for url in self.urls:
                    try:
                        reply = client.post(
                            f"{url}/v1/rate", json={"key": KEY, "rule": "hot", "tokens": 1}
                        )
                    except httpx.HTTPError:
                        continue  # the node restarting
                    if reply.status_code == 200 and reply.json()["allowed"]:
                        self.granted += 1

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        self.thread.join(10)


@pytest.fixture
def mesh(serve: ServerFactory, tmp_path: Path) -> Iterator[Mesh]:
    overrides = {"us-east-1": {"storage": {"snapshot": str(tmp_path / "us-east-1.snapshot")}}}
    yield Mesh(serve, REGIONS, buckets=[RULE], overrides=overrides).start()


def spend(node: MeshNode) -> None:
    reply = node.client.post("/v1/rate", json={"key": KEY, "rule": "hot", "tokens": 1})
    assert reply.status_code == 200 and reply.json()["allowed"], reply.text


def reconcile(mesh: Mesh, *args: str) -> tuple[int, dict[str, Any], str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")}
    environment["BUCKETMESH_SYNC_SECRET"] = mesh.secret
    flags = []
    for node in mesh.nodes.values():
        flags += ["--url", f"{node.region}={node.base_url}"]
    done = subprocess.run(
        [
            *(sys.executable, "-m", "bucketmesh", "reconcile", "--cluster", MESH_CLUSTER_ID),
            *(*flags, "--format", "json", "--fold-wait", "1", *args),
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout), done.stderr


def entries(node: MeshNode) -> set[str]:
    return {rid for rid, entry in node.state(KEY)["replicas"].items() if entry["used"]}


def settled(mesh: Mesh) -> dict[str, int]:
    """Wait until nothing is in flight and every region agrees; their levels."""
    eventually(mesh.quiescent, "nothing in flight")
    eventually(lambda: mesh.converged(KEY), "every region holds the same hot bucket")
    return {node.region: node.state(KEY)["tokens_remaining"] for node in mesh.nodes.values()}


def live(mesh: Mesh) -> set[str]:
    return {node.status()["replica_id"] for node in mesh.nodes.values()}


def test_restarts_under_load_then_reconcile_leaves_one_entry_per_live_replica(
    mesh: Mesh,
) -> None:
    restarted = mesh[0]
    incarnations = [restarted.status()["replica_id"]]
    with Load(mesh) as load:
        for _ in range(10):
            spend(restarted)  # every incarnation has spent on the hot key
            eventually(lambda: load.granted > 0, "the load is being served")
            assert restarted.server is not None
            assert restarted.server.stop() == 0
            mesh.restart(restarted)
            incarnations.append(restarted.status()["replica_id"])
        spend(restarted)
    assert len(set(incarnations)) == 11, incarnations
    levels = settled(mesh)
    for node in mesh.nodes.values():
        assert set(incarnations) <= entries(node), (node.name, entries(node))
        assert len(entries(node)) == 13, entries(node)

    status, dry, err = reconcile(mesh, "--dry-run")
    assert status == 0, (dry, err)
    assert dry["folds"]["mode"] == "dry-run"
    assert dry["folds"]["foldable_entries"] == 10
    assert dry["folds"]["entries"] == 0
    assert all(len(entries(node)) == 13 for node in mesh.nodes.values())

    status, report, err = reconcile(mesh)
    assert status == 0, (report, err)
    folds = report["folds"]
    assert folds["mode"] == "folded", folds
    assert folds["keys"] == 1 and folds["entries"] == 10, folds
    assert folds["incarnations"] == sorted(incarnations[:-1]), folds
    running = live(mesh)
    for node in mesh.nodes.values():
        eventually(lambda n=node: entries(n) == running, f"{node.name} holds the live replicas")
        assert node.state(KEY)["tokens_remaining"] == levels[node.region], node.name
    assert settled(mesh) == levels

    # the fold survives a restart: no folded entry comes back, and nothing is re-granted
    assert restarted.server is not None
    assert restarted.server.stop() == 0
    mesh.restart(restarted)
    assert settled(mesh) == levels
    for node in mesh.nodes.values():
        assert not entries(node) & set(incarnations[:-1]), entries(node)

    # a second run folds the incarnation that just retired, and only that one
    spend(restarted)
    levels = settled(mesh)
    status, again, err = reconcile(mesh)
    assert status == 0, (again, err)
    assert again["folds"]["incarnations"] == [incarnations[-1]], again["folds"]
    running = live(mesh)
    for node in mesh.nodes.values():
        eventually(lambda n=node: entries(n) == running, f"{node.name} holds the live replicas")
    assert settled(mesh) == levels
