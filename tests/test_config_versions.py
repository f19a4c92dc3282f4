"""A rule edited in the YAML file reaches live buckets after a restart, and wins over
the old file in every region whatever order the regions restart in (issue 12, case 5).

Against real ``bucketmesh serve`` processes with snapshots: a file rule's version is
the HLC at which this node first loaded those limits (kept in the snapshot), so an
edited file is newer than the old one, an unchanged file keeps its age, and restored
buckets on an older file version of their rule take the new limits (level kept).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from conftest import Mesh, ServerFactory, eventually, make_config


def rule(capacity: int) -> dict[str, Any]:
    # refills one token per 100 s: no refill within a test
    return {"name": "r", "key": "r-{{ .Request.Header.X-U }}", "capacity": capacity,
            "refillRate": 0.01, "ttl": 3600}  # fmt: skip


def grants(client: Any, key: str, count: int) -> int:
    return sum(
        client.post("/v1/rate", json={"key": key, "rule": "r"}).status_code == 200
        for _ in range(count)
    )


def test_an_edited_rule_reaches_the_restored_hot_key(serve: ServerFactory, tmp_path: Path) -> None:
    snapshot = str(tmp_path / "state.snap")
    node = serve(make_config([rule(100)], storage={"snapshot": snapshot}))
    with node.client() as client:
        assert grants(client, "hot", 50) == 50
    assert node.stop(signal.SIGTERM) == 0

    node = serve(make_config([rule(10)], storage={"snapshot": snapshot}))
    with node.client() as client:
        state = client.get("/v1/bucket/state", params={"key": "hot", "rule": "r"}).json()
        assert state["capacity"] == 10, state
        assert sum(e["used"] for e in state["replicas"].values()) == 50  # nothing forgotten
        # the level is kept, capped at the new capacity: at most 10 more, never 50
        assert grants(client, "hot", 30) <= 10
    # restarting with the same file changes nothing: the file keeps its version
    with node.client() as client:
        version = client.get("/v1/buckets/r").json()["version"]
    assert node.stop(signal.SIGTERM) == 0
    node = serve(make_config([rule(10)], storage={"snapshot": snapshot}))
    with node.client() as client:
        assert client.get("/v1/buckets/r").json()["version"] == version


def test_a_rolling_restart_with_an_edited_file_wins_in_every_region(
    serve: ServerFactory, tmp_path: Path
) -> None:
    """Before: file versions of equal clock were ordered by digest, and the old
    capacity's digest sorts above the new one's, so every region ended on the old file."""
    regions = ["us-east-1", "eu-central-1"]
    mesh = Mesh(
        serve,
        regions,
        buckets=[rule(100)],
        overrides={r: {"storage": {"snapshot": str(tmp_path / f"{r}.snap")}} for r in regions},
    ).start()
    assert grants(mesh[0].client, "k", 5) == 5
    eventually(mesh.quiescent, "the grants reached the other region")

    for node in mesh.nodes.values():  # one region after the other, each with the new file
        assert node.server is not None
        assert node.server.stop(signal.SIGTERM) == 0
        node.config["buckets"] = [rule(10)]
        mesh.restart(node)
        eventually(mesh.connected, "the restarted region is back in the mesh")

    def everywhere_the_new_file() -> None:
        for node in mesh.nodes.values():
            assert node.client.get("/v1/buckets/r").json()["capacity"] == 10, node
            assert node.state("k")["capacity"] == 10, node

    eventually(everywhere_the_new_file, "every region on the edited file")


def test_a_node_killed_before_its_first_snapshot_keeps_its_file_versions(
    serve: ServerFactory, tmp_path: Path
) -> None:
    """Killed before it wrote a snapshot, a node replays only its write-ahead log, which
    now opens with the rules in effect: restarted with the same file, it keeps the
    version it gave the file (before: a new load at every start, which every bucket of
    the rule, here and in every peer, adopted again; under traffic in two regions the
    mesh then granted 63–65 of 80 tokens, with a debt nobody spent). An edited file is
    still a new load."""
    storage = {"snapshot": str(tmp_path / "state.snap"), "snapshotInterval": 3_600_000}
    node = serve(make_config([rule(100)], storage=storage))
    with node.client() as client:
        version = client.get("/v1/buckets/r").json()["version"]
        assert grants(client, "k", 3) == 3  # answered after the log write (relaxed)
    assert node.stop(signal.SIGKILL) != 0
    assert not (tmp_path / "state.snap").exists()

    node = serve(make_config([rule(100)], storage=storage))
    with node.client() as client:
        assert client.get("/v1/buckets/r").json()["version"] == version
        state = client.get("/v1/bucket/state", params={"key": "k", "rule": "r"}).json()
        assert state["config_version"] == version and state["tokens_remaining"] == 97, state
    assert node.stop(signal.SIGKILL) != 0

    node = serve(make_config([rule(50)], storage=storage))
    with node.client() as client:
        edited = client.get("/v1/buckets/r").json()["version"]
        assert edited != version
        state = client.get("/v1/bucket/state", params={"key": "k", "rule": "r"}).json()
        # the level kept (97), capped at the new capacity
        assert (state["capacity"], state["tokens_remaining"]) == (50, 50), state


def test_an_edited_file_killed_before_its_next_snapshot_keeps_the_new_version(
    serve: ServerFactory, tmp_path: Path
) -> None:
    """The snapshot records the old limits; the edited file's load is in the log only:
    a restart with the edited file keeps the version of that load (it restamped it)."""
    storage = {"snapshot": str(tmp_path / "state.snap"), "snapshotInterval": 3_600_000}
    node = serve(make_config([rule(100)], storage=storage))
    assert node.stop(signal.SIGTERM) == 0  # a snapshot of the old limits
    assert (tmp_path / "state.snap").exists()
    node = serve(make_config([rule(50)], storage=storage))
    with node.client() as client:
        edited = client.get("/v1/buckets/r").json()["version"]
        assert grants(client, "k", 1) == 1  # the log's opening group goes out with it
    assert node.stop(signal.SIGKILL) != 0
    node = serve(make_config([rule(50)], storage=storage))
    with node.client() as client:
        assert client.get("/v1/buckets/r").json()["version"] == edited
