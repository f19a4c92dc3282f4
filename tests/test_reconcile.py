"""``bucketmesh reconcile`` against three real regions.

Divergence is made on purpose: every region is cut off from the others with
``/v1/admin/faults`` (sync only: the tool, which is no region, still reaches
each of them), spends on its own, and reconcile runs while the partition
holds, so the mesh cannot have repaired anything itself. The report must give
the exact numbers (levels are exact: the rule refills one token per 10,000 s),
``--dry-run`` must change nothing, the repair must leave every region holding
the join, and a second run must find nothing. A clean mesh exits 0, a region
that does not answer exits 2, a wrong cluster id exits 2, and the seed's
CronJob line (``--cluster global‑rate‑limit‑cluster`` with U+2011 hyphens) runs
as printed, with the regions, URLs and secret taken from a node's config file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MESH_CLUSTER_ID, Mesh, MeshNode, ServerFactory, eventually, free_port

TOKEN = "reconcile-admin-token"
REGIONS = ["us-east-1", "us-west-2", "eu-central-1"]
RULE = {
    "name": "rc",
    "key": "rc-{{ .Request.Header.X-User }}",
    "capacity": 100,
    "refillRate": 0.0001,
    "ttl": 3600,
}
SEED_CLUSTER = "global\u2011rate\u2011limit\u2011cluster"  # as the articles print it


@pytest.fixture(scope="module")
def mesh(serve_module: ServerFactory) -> Iterator[Mesh]:
    yield Mesh(serve_module, REGIONS, buckets=[RULE], admin_token=TOKEN).start()


def spend(node: MeshNode, key: str, tokens: int) -> None:
    reply = node.client.post("/v1/rate", json={"key": key, "rule": "rc", "tokens": tokens})
    assert reply.status_code == 200 and reply.json()["allowed"], reply.text


def partition(mesh: Mesh) -> None:
    """Cut every region's sync off from every other (until the test heals it)."""
    for node in mesh.nodes.values():
        others = [r for r in REGIONS if r != node.region]
        reply = node.client.post(
            "/v1/admin/faults",
            json={"peers": others, "seconds": 600},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert reply.status_code == 200, reply.text
    for node in mesh.nodes.values():
        eventually(lambda n=node: n.status()["sync"]["local_only"], f"{node.name} cut off")


def heal(mesh: Mesh) -> None:
    for node in mesh.nodes.values():
        reply = node.client.delete("/v1/admin/faults", headers={"Authorization": f"Bearer {TOKEN}"})
        assert reply.status_code == 200, reply.text


def reconcile(mesh: Mesh, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``bucketmesh reconcile ARGS`` as a process; (status, stdout, stderr)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")}
    environment["BUCKETMESH_SYNC_SECRET"] = mesh.secret
    environment.update(env or {})
    done = subprocess.run(
        [sys.executable, "-m", "bucketmesh", "reconcile", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout, done.stderr


def urls(mesh: Mesh, **replaced: str) -> list[str]:
    flags = []
    for node in mesh.nodes.values():
        flags += ["--url", f"{node.region}={replaced.get(node.region, node.base_url)}"]
    return flags


def report(mesh: Mesh, *args: str) -> tuple[int, dict[str, Any]]:
    status, out, err = reconcile(
        mesh, "--cluster", MESH_CLUSTER_ID, *urls(mesh), "--format", "json", *args
    )
    assert out, err
    return status, json.loads(out)


def levels(mesh: Mesh, key: str) -> list[int]:
    return [node.state(key)["tokens_remaining"] for node in mesh.nodes.values()]


def replica_ids(mesh: Mesh) -> dict[str, str]:
    return {node.region: node.status()["replica_id"] for node in mesh.nodes.values()}


def test_a_clean_mesh_exits_0(mesh: Mesh) -> None:
    spend(mesh[0], "rc-clean", 3)
    eventually(lambda: mesh.converged("rc-clean", total=3), "rc-clean converged")
    eventually(mesh.quiescent, "nothing in flight")
    status, out, err = reconcile(mesh, "--cluster", MESH_CLUSTER_ID, *urls(mesh))
    assert status == 0, out + err
    assert "keys compared 1, differing 0" in out, out
    assert "UNREACHABLE" not in out


def test_divergence_is_reported_exactly_and_repaired_to_the_join(
    mesh: Mesh, tmp_path: Path
) -> None:
    east, west, central = list(mesh.nodes.values())
    ids = replica_ids(mesh)
    spend(east, "rc-same", 5)
    eventually(lambda: mesh.converged("rc-same", total=5), "rc-same converged")
    partition(mesh)
    spend(east, "rc-split", 10)
    spend(west, "rc-split", 20)
    spend(central, "rc-split", 30)
    spend(west, "rc-one", 7)
    assert levels(mesh, "rc-split") == [90, 80, 70]

    status, dry = report(mesh, "--dry-run")
    assert status == 1, dry
    assert dry["mode"] == "dry-run"
    assert dry["keys_compared"] == 4  # rc-clean, rc-same, rc-split, rc-one
    assert dry["keys_differing"] == 2
    assert dry["unreachable"] == []
    largest = dry["largest_divergence"]
    assert largest["key"] == "rc-split"
    # the join has spent 60: east sees 90 left, the join 40
    assert largest["tokens"] == 50
    assert largest["region"] == "us-east-1"
    assert largest["regions"] == {"us-east-1": 50, "us-west-2": 40, "eu-central-1": 30}
    assert largest["replicas"] == sorted(ids.values())
    one = next(k for k in dry["divergent_keys"] if k["key"] == "rc-one")
    assert one["regions"] == {"us-east-1": 7, "eu-central-1": 7}
    assert one["replicas"] == [ids["us-west-2"]]
    assert dry["regions"]["us-east-1"]["keys_behind"] == 2
    assert dry["regions"]["us-west-2"]["keys_behind"] == 1
    assert dry["regions"]["us-east-1"]["max_tokens_behind"] == 50
    assert levels(mesh, "rc-split") == [90, 80, 70]  # a dry run changes nothing

    trail = tmp_path / "audit.jsonl"
    status, repaired = report(mesh, "--audit", str(trail))
    assert status == 1, repaired  # found (and repaired): a CronJob alerts on it
    assert repaired["mode"] == "repair"
    assert repaired["keys_differing"] == 2
    changed = {r: repaired["regions"][r]["buckets_changed"] for r in REGIONS}
    assert changed == {"us-east-1": 2, "us-west-2": 1, "eu-central-1": 2}
    # still partitioned: every region holds the join because reconcile pushed it
    assert all(n.status()["sync"]["local_only"] for n in mesh.nodes.values())
    assert levels(mesh, "rc-split") == [40, 40, 40]
    assert levels(mesh, "rc-one") == [93, 93, 93]
    mesh.converged("rc-split", total=60)
    for node in mesh.nodes.values():
        assert node.metric("bucketmesh_sync_foreign_entries") == 0  # the tool adds no entry
    repairs = [json.loads(line) for line in trail.read_text().splitlines()]
    assert len(repairs) == 5 and {e["event"] for e in repairs} == {"reconcile-repair"}
    east_split = next(e for e in repairs if e["region"] == "us-east-1" and e["key"] == "rc-split")
    assert east_split["old"] == {"tokens_remaining": 90}
    assert east_split["new"] == {"tokens_remaining": 40}
    assert east_split["who"].startswith("@reconcile/")

    status, again = report(mesh)
    assert status == 0, again
    assert again["keys_differing"] == 0 and again["keys_compared"] == 4
    heal(mesh)


def test_an_unreachable_region_exits_2(mesh: Mesh) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    status, out, err = reconcile(
        mesh,
        "--cluster",
        MESH_CLUSTER_ID,
        *urls(mesh, **{"eu-central-1": closed}),
        "--format",
        "json",
        "--dry-run",
    )
    assert status == 2, out + err
    found = json.loads(out)
    assert found["unreachable"] == ["eu-central-1"]
    assert "connection refused" in found["regions"]["eu-central-1"]["error"]
    assert found["regions"]["us-east-1"]["reachable"]
    assert found["keys_compared"] >= 1  # the regions that answered were still compared


def test_another_cluster_id_is_refused_with_2(mesh: Mesh) -> None:
    status, out, err = reconcile(mesh, "--cluster", "some-other-cluster", *urls(mesh))
    assert status == 2, out + err
    assert "wrong_cluster" in out and "403" in out
    status, _, err = reconcile(
        mesh, "--cluster", MESH_CLUSTER_ID, *urls(mesh), env={"BUCKETMESH_SYNC_SECRET": "nope"}
    )
    assert status == 2


def test_the_seed_cronjob_line_runs_as_printed(mesh: Mesh) -> None:
    """``args: ["reconcile", "--cluster", "global‑rate‑limit‑cluster"]``: regions, URLs
    and secret from a node's config file (BUCKETMESH_CONFIG, as the chart's CronJob
    sets it), the U+2011 hyphens matching the mesh's ASCII id."""
    east = mesh[0]
    assert east.server is not None
    status, out, err = reconcile(
        mesh, "--cluster", SEED_CLUSTER, env={"BUCKETMESH_CONFIG": str(east.server.config_path)}
    )
    assert status in (0, 1), out + err
    for region in REGIONS:
        assert region in out
    assert "UNREACHABLE" not in out
    status, _, err = reconcile(
        mesh,
        "--cluster",
        "another\u2011cluster",
        env={"BUCKETMESH_CONFIG": str(east.server.config_path)},
    )
    assert status == 2 and "is not this mesh" in err


def test_usage_errors_exit_2_naming_the_argument(mesh: Mesh) -> None:
    status, _, err = reconcile(mesh, "--cluster", MESH_CLUSTER_ID)
    assert status == 2 and "no region to reconcile" in err
    status, _, err = reconcile(mesh, "--cluster", MESH_CLUSTER_ID, "--url", "nourl")
    assert status == 2 and "--url" in err
    status, _, err = reconcile(mesh, "--cluster", MESH_CLUSTER_ID, "--page-keys", "0")
    assert status == 2 and "--page-keys" in err
    status, _, err = reconcile(
        mesh, *urls(mesh), "--cluster", MESH_CLUSTER_ID, env={"BUCKETMESH_SYNC_SECRET": ""}
    )
    assert status == 2 and "no sync secret" in err


def test_a_region_that_is_down_exits_2(mesh: Mesh) -> None:
    """Last in this module: it kills eu-central-1."""
    east, _, central = list(mesh.nodes.values())
    assert east.server is not None
    central.kill()
    status, out, err = reconcile(
        mesh,
        "--cluster",
        SEED_CLUSTER,
        "--format",
        "json",
        env={"BUCKETMESH_CONFIG": str(east.server.config_path)},
    )
    assert status == 2, out + err
    found = json.loads(out)
    assert found["unreachable"] == ["eu-central-1"]
    assert found["regions"]["us-east-1"]["reachable"] and found["regions"]["us-west-2"]["reachable"]
    assert found["keys_compared"] >= 4  # the two regions that answered were still compared


def test_an_audit_trail_it_cannot_write_stops_it_before_any_repair(tmp_path: Path) -> None:
    """Before: the repairs were pushed and only a warning said the trail missed them."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")}
    environment["BUCKETMESH_SYNC_SECRET"] = "s" * 32
    regions = [f"--url=r{n}=http://127.0.0.1:{free_port()}" for n in (1, 2)]
    audit = ["--audit", str(tmp_path / "missing" / "audit.jsonl")]
    done = subprocess.run(
        [sys.executable, "-m", "bucketmesh", "reconcile", "--cluster", "c", *regions, *audit],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "--audit is in a directory that does not exist" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_run_reports_what_it_did_without_a_traceback(sig: signal.Signals) -> None:
    """Before: Ctrl-C gave a CancelledError traceback and empty output; a CronJob's
    deadline (TERM) ended it with no report either."""
    hung = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    port = hung.getsockname()[1]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")}
    environment["BUCKETMESH_SYNC_SECRET"] = "s" * 32
    regions = [f"--url=r1=http://127.0.0.1:{port}", f"--url=r2=http://127.0.0.1:{port}"]
    command = [sys.executable, "-m", "bucketmesh", "reconcile", "--cluster", "c", *regions]
    run = subprocess.Popen(
        [*command, "--timeout", "600", "--format", "json"],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        hung.settimeout(60)  # a hang guard: waits for the event (it connected)
        connection, _ = hung.accept()
        run.send_signal(sig)
        out, err = run.communicate(timeout=60)
        connection.close()
    finally:
        hung.close()
        if run.poll() is None:
            run.kill()
    assert run.returncode == 128 + sig, err
    assert f"stopped by {sig.name}" in err and "Traceback" not in err
    assert json.loads(out)["cluster"] == "c"


def test_a_region_of_several_pods_is_reconciled_through_one_of_them(
    serve: ServerFactory,
) -> None:
    """The chart runs a region's pods on the memory store as ``<region>.<pod>``
    (BUCKETMESH_REGION); reconcile, pointed at the region's Service, refused the pod
    that answered ("not a node of us-east-1") and exited 2 every night."""
    pods = Mesh(serve, ["us-east-1.bucketmesh-0", "us-west-2"], buckets=[RULE]).start()
    by_region = {"us-east-1": pods.nodes["us-east-1.bucketmesh-0"], "us-west-2": pods[1]}
    flags = [arg for r, n in by_region.items() for arg in ("--url", f"{r}={n.base_url}")]
    status, out, err = reconcile(pods, "--cluster", MESH_CLUSTER_ID, *flags, "--format", "json")
    assert status == 0, out + err
    assert json.loads(out)["regions"]["us-east-1"]["reachable"]
