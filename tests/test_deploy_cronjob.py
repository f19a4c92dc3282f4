"""The chart's reconcile CronJob (reconcile.enabled): rendered by Helm's own engine,
validated against the Kubernetes schemas, scanned by checkov, and run.

Running it reproduces the pods as tests/test_deploy_pods.py does (its ``Pod`` and
mount table), with this checkout's venv standing where the image installs
bucketmesh: three regions booted from their renderings, then the CronJob's
container of one region started with its rendered args — the seed's line,
``["reconcile", "--cluster", "global‑rate‑limit‑cluster"]`` with U+2011 hyphens —
and its rendered environment. The one thing rewritten is the in-cluster DNS name
of the region's own Service, which is its loopback port here (no cluster DNS).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import eventually, free_port
from test_deploy_chart import (
    ADMIN_TOKEN,
    CHART,
    KUBE_VERSIONS,
    REGIONS,
    Rendering,
    everything_on,
    helm,
    kubernetes_validate,
    redis_region,
    region_sets,
    render,
    render_error,
    run_checkov,
    seed_region,
    values_from_sets,
)
from test_deploy_pods import (
    MESH_TIMEOUT_S,
    Mounts,
    Pod,
    dockerfile_stages,
    meshed,
    start_pod,
    state_of,
)
from test_wheel import Venv

SEED_ARGS = ["reconcile", "--cluster", "global\u2011rate\u2011limit\u2011cluster"]
CRONJOB_TIMEOUT_S = 120.0  # hang guard only


def with_reconcile(values: dict[str, Any], **reconcile: Any) -> dict[str, Any]:
    merged = dict(values)
    merged["reconcile"] = {"enabled": True, **reconcile}
    return merged


def cronjob(rendering: Rendering) -> dict[str, Any]:
    (job,) = rendering.of_kind("CronJob")
    return job


def job_container(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_no_cronjob_unless_enabled() -> None:
    assert render(seed_region("us-east-1")).of_kind("CronJob") == []


def test_helm_lint_is_clean_with_the_cronjob() -> None:
    values = with_reconcile(everything_on(seed_region("eu-central-1")), timeZone="Etc/UTC")
    report = helm.lint(CHART, values, strict=True)
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_reconcile_without_sync_fails_naming_the_value() -> None:
    message = render_error(with_reconcile(values_from_sets("region=us-east-1")))
    assert "reconcile.enabled needs sync.enabled" in message, message


@pytest.mark.parametrize("backend", ["memory", "redis"])
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_the_cronjob_is_valid_kubernetes(backend: str, kube_version: str) -> None:
    values = seed_region("us-east-1") if backend == "memory" else redis_region("us-east-1")
    rendering = render(with_reconcile(values, timeZone="Etc/UTC", extraArgs=["--format", "json"]))
    kubernetes_validate.validate(cronjob(rendering), kube_version, strict=True)


def test_the_cronjob_runs_the_seed_line_nightly_and_fails_to_alert() -> None:
    job = cronjob(render(with_reconcile(seed_region("us-east-1"))))
    assert job["spec"]["schedule"] == "0 2 * * *"
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    assert job["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0
    container = job_container(job)
    assert container["args"] == ["reconcile", "--cluster", "global-rate-limit-cluster"]
    env = {e["name"]: e for e in container["env"]}
    assert env["BUCKETMESH_CONFIG"]["value"] == "/etc/bucketmesh/bucketmesh.yaml"
    assert env["BUCKETMESH_RECONCILE_URLS"]["value"] == ("us-east-1=http://bucketmesh.bm.svc:8080")
    assert env["BUCKETMESH_SYNC_SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "sync-secret"
    assert "BUCKETMESH_ADMIN_TOKEN" not in env  # reconcile needs the sync secret only

    seeded = cronjob(
        render(
            with_reconcile(
                seed_region("us-east-1"),
                clusterId="global\u2011rate\u2011limit\u2011cluster",
                schedule="30 3 * * 0",
            )
        )
    )
    assert job_container(seeded)["args"] == SEED_ARGS  # the seed's line, as printed
    assert seeded["spec"]["schedule"] == "30 3 * * 0"
    dry = cronjob(render(with_reconcile(seed_region("us-east-1"), dryRun=True)))
    assert job_container(dry)["args"][-1] == "--dry-run"


def test_no_service_pdb_or_policy_of_the_node_selects_the_reconcile_pod() -> None:
    values = with_reconcile(seed_region("us-east-1"), networkPolicy={"enabled": True})
    rendering = render(values)
    labels = cronjob(rendering)["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    selectors = [s["spec"]["selector"] for s in rendering.of_kind("Service")]
    selectors += [
        p["spec"]["selector"]["matchLabels"] for p in rendering.of_kind("PodDisruptionBudget")
    ]
    selectors += [
        p["spec"]["podSelector"]["matchLabels"] for p in rendering.of_kind("NetworkPolicy")
    ]
    assert selectors
    for selector in selectors:
        assert not all(labels.get(k) == v for k, v in selector.items()), selector
    pod = cronjob(rendering)["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert job_container(cronjob(rendering))["securityContext"]["readOnlyRootFilesystem"] is True


def test_checkov_finds_nothing_unexplained_in_the_cronjob(tmp_path: Path) -> None:
    job = cronjob(render(with_reconcile(seed_region("us-east-1"))))
    (tmp_path / "cronjob.yaml").write_text(yaml.safe_dump(job))
    run_checkov(tmp_path, "kubernetes")


# -- run against three regions booted from the chart --------------------------------------


def run_cronjob(
    rendering: Rendering, directory: Path, own_url: str, name: str
) -> subprocess.CompletedProcess[str]:
    """The CronJob's container, started as the kubelet would start it; waits for it."""
    _, image = dockerfile_stages()
    job = cronjob(rendering)
    container = job_container(job)
    pod_spec = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    table: dict[str, Path] = {
        "/opt/bucketmesh": Path(sys.prefix),  # this checkout's venv, where the image has it
        image.last("WORKDIR"): directory / "workdir",  # in the image's own filesystem
    }
    for mount in container["volumeMounts"]:
        table[mount["mountPath"]] = directory / mount["name"]
    mounts = Mounts(table)
    for mount in container["volumeMounts"]:
        if "configMap" in volumes[mount["name"]]:
            for key, text in rendering.config_files().items():
                (directory / mount["name"] / key).write_text(mounts.host(text))
    secrets = rendering.secret_data()
    env: dict[str, str] = {}
    for entry in container["env"]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        env[entry["name"]] = secrets[ref["key"]] if ref else entry["value"]
    region, _, in_cluster = env["BUCKETMESH_RECONCILE_URLS"].partition("=")
    assert in_cluster.endswith(".svc:8080"), in_cluster
    env["BUCKETMESH_RECONCILE_URLS"] = f"{region}={own_url}"  # cluster DNS → loopback
    pod = Pod(name, image, container, mounts, env, directory)
    try:
        pod.process.wait(CRONJOB_TIMEOUT_S)
    finally:
        if pod.process.poll() is None:
            pod.process.kill()
    return subprocess.CompletedProcess(
        pod.argv,
        pod.process.returncode,
        pod.stdout_path.read_text(),
        pod.stderr_path.read_text(),
    )


def test_the_seed_cronjob_line_reconciles_three_regions_booted_from_the_chart(
    tmp_path: Path,
) -> None:
    _, image = dockerfile_stages()
    venv = Venv(Path(sys.prefix))  # this checkout's venv stands where the image installs
    ports = {region: free_port() for region in REGIONS}
    # each region's sync Service: its pod's reserved listener, where the job reaches it too
    sync_ports = {region: free_port() for region in REGIONS}
    renderings: dict[str, Rendering] = {}
    pods: dict[str, Pod] = {}
    try:
        for region in REGIONS:
            others = {p: f"http://127.0.0.1:{sync_ports[p]}" for p in REGIONS if p != region}
            values = values_from_sets(
                *region_sets(region, peer_urls=others),
                f"containerPorts.http={ports[region]}",
                f"containerPorts.sync={sync_ports[region]}",
            )
            values = with_reconcile(values, clusterId="global\u2011rate\u2011limit\u2011cluster")
            renderings[region] = render(values, namespace="bm")
            pods[region] = start_pod(renderings[region], image, venv, tmp_path / region, region)
        for pod in pods.values():
            pod.wait_ready()
        for pod in pods.values():
            eventually(lambda pod=pod: meshed(pod), f"{pod.name} meshed", MESH_TIMEOUT_S)
        east, west = pods["us-east-1"], pods["us-west-2"]
        east_rendering = renderings["us-east-1"]
        assert job_container(cronjob(east_rendering))["args"] == SEED_ARGS

        clean = run_cronjob(east_rendering, tmp_path / "job-1", east.url(), "reconcile-1")
        assert clean.returncode == 0, clean.stdout + clean.stderr
        assert "UNREACHABLE" not in clean.stdout

        # cut us-east-1 off (sync only), spend on both sides, and let the job repair it
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        cut = httpx.post(
            east.url("/v1/admin/faults"),
            json={"peers": ["us-west-2", "eu-central-1"], "seconds": 600},
            headers=admin,
            timeout=10.0,
        )
        assert cut.status_code == 200, cut.text
        key = "cronjob-drift"
        for pod, tokens in ((east, 3), (west, 4)):
            reply = httpx.post(
                pod.url("/v1/rate"), headers={"X-API-Key": key}, json={"tokens": tokens}, timeout=10
            )
            assert reply.status_code == 200, reply.text
        eventually(
            lambda: httpx.get(east.url("/v1/status"), timeout=10).json()["sync"]["local_only"],
            "us-east-1 cut off",
        )
        found = run_cronjob(east_rendering, tmp_path / "job-2", east.url(), "reconcile-2")
        assert found.returncode == 1, found.stdout + found.stderr
        assert "differing 1" in found.stdout, found.stdout
        used = [
            sorted(
                e["used"]
                for e in state_of(p, f"agent-api-key-{key}")["replicas"].values()
                if e["used"]
            )
            for p in pods.values()
        ]
        assert all(u == [3, 4] for u in used), used  # every region holds the join
        httpx.delete(east.url("/v1/admin/faults"), headers=admin, timeout=10.0)
    finally:
        for pod in pods.values():
            if pod.process.poll() is None:
                pod.process.kill()
                pod.process.wait()
