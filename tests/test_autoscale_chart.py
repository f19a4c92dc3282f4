"""The Helm chart's optional autoscale controller (deploy/helm/bucketmesh/templates/
autoscale.yaml), rendered by Helm's own engine with the helpers of
tests/test_deploy_chart.py: off by default; when on, one pod replaced with Recreate,
valid Kubernetes, nothing checkov finds unexplained, and a config file the
controller's own loader accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy_chart import (
    KUBE_VERSIONS,
    OPERATOR_KINDS,
    deep_merge,
    kubernetes_validate,
    render,
    render_error,
    run_checkov,
    seed_region,
)

from bucketmesh.autoscale import load

POLICY = {
    "name": "agents",
    "target": "agent-api-key",
    "baseline": {"capacity": 5000, "refillRate": 50},
    "min": {"capacity": 1000, "refillRate": 20},
    "max": {"capacity": 50000, "refillRate": 1000},
    "expand": {"signal": "demand", "headroom": 1.25, "burstSeconds": 60},
    "protect": {
        "signal": "queue",
        "threshold": 500,
        "restoreBelow": 200,
        "refillRate": 20,
    },
}
SIGNALS = {
    "demand": {"type": "demand", "rule": "agent-api-key"},
    "queue": {
        "type": "prometheus",
        "url": "http://prometheus-operated.monitoring:9090",
        "query": "sum(inference_queue_length)",
    },
}


def with_autoscale(**extra: Any) -> dict[str, Any]:
    block = {"enabled": True, "config": {"signals": SIGNALS, "policies": [POLICY]}, **extra}
    return seed_region("us-east-1", autoscale=block)


def controller_of(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    rendering = render(values)
    [deployment] = [
        m for m in rendering.of_kind("Deployment") if m["metadata"]["name"].endswith("-autoscale")
    ]
    config_map = rendering.one("ConfigMap", "bucketmesh-autoscale")
    return deployment, config_map


def test_the_controller_is_off_by_default() -> None:
    rendering = render(seed_region("us-east-1"))
    names = [m["metadata"]["name"] for m in rendering.manifests]
    assert not [n for n in names if "autoscale" in n]


def test_one_controller_pod_never_two_at_once() -> None:
    deployment, _ = controller_of(with_autoscale())
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"] == [
        "autoscale",
        "--config",
        "/etc/bucketmesh-autoscale/autoscale.yaml",
    ]
    env = {e["name"]: e for e in container["env"]}
    assert env["BUCKETMESH_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "admin-token"


def test_no_selector_of_the_node_picks_the_controller_pod() -> None:
    rendering = render(
        deep_merge(
            with_autoscale(),
            {"networkPolicy": {"enabled": True}, "serviceMonitor": {"enabled": True}},
        )
    )
    deployment, _ = controller_of(with_autoscale())
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [s["spec"]["selector"] for s in rendering.of_kind("Service")]
    selectors += [
        m["spec"]["selector"]["matchLabels"]
        for m in rendering.of_kind("PodDisruptionBudget") + rendering.of_kind("ServiceMonitor")
    ]
    selectors += [
        m["spec"]["podSelector"]["matchLabels"]
        for m in rendering.of_kind("NetworkPolicy")
        if not m["metadata"]["name"].endswith("-autoscale")
    ]
    selectors += [rendering.one("StatefulSet")["spec"]["selector"]["matchLabels"]]
    assert len(selectors) >= 5
    for selector in selectors:
        assert not all(pod_labels.get(k) == v for k, v in selector.items()), selector


def test_the_rendered_config_loads_in_the_controller(tmp_path: Path) -> None:
    deployment, config_map = controller_of(with_autoscale(dryRun=True))
    path = tmp_path / "autoscale.yaml"
    path.write_text(config_map["data"]["autoscale.yaml"])
    config = load(path)
    assert config.dry_run and config.audit == "-" and config.listen == "0.0.0.0:9464"
    # mesh defaults to this release's API Service
    assert config.regions == {"us-east-1": "http://bucketmesh.bm.svc:8080"}
    assert config.policies[0].protect is not None
    assert config.decisions is not None
    mounts = {
        m["mountPath"]
        for m in deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    assert str(Path(config.decisions).parent) in mounts  # writable under a read-only root


def test_mesh_regions_given_are_kept(tmp_path: Path) -> None:
    regions = {"us-east-1": "http://a.example:8080", "eu-central-1": "http://b.example:8080"}
    values = with_autoscale()
    values["autoscale"]["config"]["mesh"] = {"regions": regions}
    _, config_map = controller_of(values)
    path = tmp_path / "autoscale.yaml"
    path.write_text(config_map["data"]["autoscale.yaml"])
    assert load(path).regions == regions


def test_enabled_without_policies_fails_naming_the_value() -> None:
    message = render_error(seed_region("us-east-1", autoscale={"enabled": True}))
    assert "autoscale.config.policies" in message, message


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_the_controller_manifests_are_valid_kubernetes(kube_version: str) -> None:
    for manifest in render(with_autoscale()).manifests:
        if manifest["kind"] not in OPERATOR_KINDS:
            kubernetes_validate.validate(manifest, kube_version, strict=True)


def test_checkov_finds_nothing_unexplained_in_the_controller(tmp_path: Path) -> None:
    deployment, config_map = controller_of(with_autoscale())
    policy = render(with_autoscale()).one("NetworkPolicy", "bucketmesh-autoscale")
    for manifest in (deployment, config_map, policy):
        name = f"{manifest['kind']}-{manifest['metadata']['name']}.yaml"
        (tmp_path / name).write_text(yaml.safe_dump(manifest))
    run_checkov(tmp_path, "kubernetes")
