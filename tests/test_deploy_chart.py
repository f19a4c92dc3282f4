"""The Helm chart (deploy/helm/bucketmesh), rendered by Helm's own engine.

``helm-python-sdk`` ships Helm's library (``libhelm_c.so``): the chart is linted and
rendered exactly as ``helm install`` would, offline, and ``--set`` expressions are
parsed by Helm's own ``strvals`` parser. Every rendered manifest is validated
against the Kubernetes 1.27 and the newest schemas (``kubernetes-validate``,
strict: an unknown field fails), checkov scans the rendering, and the config file
the chart renders is loaded by the node's own loader. That real processes boot
from the rendering is tests/test_deploy_pods.py.

The helpers here (``values_from_sets``, ``render``, ``Rendering``) are shared with
test_deploy_pods.py.
"""

from __future__ import annotations

import base64
import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

# helm-python-sdk ships Helm's library for Linux only (a dev dependency there)
helm = pytest.importorskip("helm_python", reason="helm-python-sdk exists for Linux only")

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "bucketmesh"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
CHECKOV_CONFIG = ROOT / "deploy" / "checkov.yaml"
DOCS = ROOT / "docs" / "deploy.md"
#: The seed's three regions.
REGIONS = ("us-east-1", "us-west-2", "eu-central-1")
#: The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest
#: kubernetes-validate knows.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
#: Kinds of the prometheus-operator CRDs: no schema in kubernetes-validate; checked here.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
SYNC_SECRET = "chart-test-sync-secret"
ADMIN_TOKEN = "chart-test-admin-token"
REDIS_URL = "redis://redis.example.internal:6379/0"


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` merged into a copy of ``base`` the way Helm coalesces values."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def values_from_sets(*expressions: str) -> dict[str, Any]:
    """The values ``helm install --set E1 --set E2 ...`` gives (Helm's own parser)."""
    values: dict[str, Any] = {}
    for expression in expressions:
        values = deep_merge(values, helm.parse_set_string(expression))
    return values


def region_sets(region: str, *, peer_urls: dict[str, str] | None = None) -> list[str]:
    """The ``--set`` flags docs/deploy.md gives for one region of the seed's mesh."""
    sets = [
        f"region={region}",
        "sync.enabled=true",
        "sync.peers={us-east-1,us-west-2,eu-central-1}",
        f"secret.syncSecret={SYNC_SECRET}",
        f"secret.adminToken={ADMIN_TOKEN}",
    ]
    if peer_urls is None:
        sets.append("sync.peerUrlTemplate=https://bucketmesh-sync.{region}.example.com")
    else:
        sets += [f"sync.peerUrls.{peer}={url}" for peer, url in peer_urls.items()]
    return sets


@dataclass
class Rendering:
    """The manifests of one ``helm template``, parsed."""

    manifests: list[dict[str, Any]]
    notes: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [m for m in self.of_kind(kind) if name is None or m["metadata"]["name"] == name]
        assert len(found) == 1, (kind, name, [m["metadata"]["name"] for m in self.of_kind(kind)])
        return found[0]

    @property
    def workload(self) -> dict[str, Any]:
        (workload,) = self.of_kind("StatefulSet") + self.of_kind("Deployment")
        return workload

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.workload["spec"]["template"]["spec"]["containers"]
        return dict(container)

    def config_files(self) -> dict[str, str]:
        """The ConfigMap's files, by key."""
        return dict(self.one("ConfigMap")["data"])

    def secret_data(self) -> dict[str, str]:
        """The created Secret's values, decoded."""
        secret = self.one("Secret")
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def render(
    values: dict[str, Any], *, release: str = "bucketmesh", namespace: str = "bm"
) -> Rendering:
    """The chart rendered with ``values`` as ``helm install`` would (schema checked)."""
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        files = chart.render(values, name=release, namespace=namespace, is_install=True)
    manifests: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Rendering(manifests, notes)


def render_error(values: dict[str, Any]) -> str:
    """The message rendering ``values`` fails with."""
    with pytest.raises(helm.HelmError) as failure:
        render(values)
    return str(failure.value)


def seed_region(region: str, **extra: Any) -> dict[str, Any]:
    return deep_merge(values_from_sets(*region_sets(region)), extra)


def redis_region(region: str) -> dict[str, Any]:
    return seed_region(region, storage={"backend": "redis", "redisUrl": REDIS_URL}, replicaCount=3)


def everything_on(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every optional part of the chart switched on."""
    return deep_merge(
        values,
        {
            "envoy": {"enabled": True},
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
            "networkPolicy": {
                "enabled": True,
                "syncCIDRs": ["203.0.113.0/24"],
                "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
                "apiFrom": [{"namespaceSelector": {"matchLabels": {"name": "gateway"}}}],
                "egressCIDRs": ["198.51.100.0/24"],
            },
            "sync": {
                "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["203.0.113.0/24"]}
            },
        },
    )


BACKENDS = {"memory": seed_region, "redis": redis_region}


# -- lint and schema ---------------------------------------------------------------------


@pytest.mark.parametrize("region", REGIONS)
def test_helm_lint_is_clean_for_each_region(region: str) -> None:
    report = helm.lint(CHART, everything_on(seed_region(region)), strict=True)
    assert report["errors"] == [], report
    # severity 2 is a warning, 3 an error; 1 (info) is only "icon is recommended"
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("region", REGIONS)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_manifest_is_valid_kubernetes(backend: str, region: str, kube_version: str) -> None:
    rendering = render(everything_on(BACKENDS[backend](region)))
    kinds = {m["kind"] for m in rendering.manifests}
    assert {"ConfigMap", "Secret", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    assert kinds >= OPERATOR_KINDS
    for manifest in rendering.manifests:
        if manifest["kind"] in OPERATOR_KINDS:
            continue  # no schema for CRDs; test_the_prometheus_rule_is_the_alerts_file
        kubernetes_validate.validate(manifest, kube_version, strict=True)


def test_a_manifest_with_an_unknown_field_fails_the_validation() -> None:
    # the validation above is strict: it would catch a typo in a template
    workload = copy.deepcopy(render(seed_region("us-east-1")).workload)
    workload["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(workload, KUBE_VERSIONS[0], strict=True)


def test_values_of_the_wrong_type_fail_the_schema() -> None:
    message = render_error(seed_region("us-east-1", storage={"backend": "disk"}))
    assert "storage/backend" in message, message


# -- storage backends ---------------------------------------------------------------------


def test_memory_is_a_statefulset_of_one_pod_with_a_claim_for_its_state() -> None:
    rendering = render(seed_region("us-east-1"))
    workload = rendering.workload
    assert workload["kind"] == "StatefulSet"
    assert workload["spec"]["replicas"] == 1
    (claim,) = workload["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state"
    mounts = {m["name"]: m["mountPath"] for m in rendering.container["volumeMounts"]}
    config = yaml.safe_load(rendering.config_files()["bucketmesh.yaml"])
    assert config["storage"]["snapshot"].startswith(mounts["state"] + "/")
    assert rendering.one("Service", "bucketmesh-headless")["spec"]["clusterIP"] == "None"
    assert workload["spec"]["serviceName"] == "bucketmesh-headless"


def test_memory_without_persistence_keeps_the_state_in_an_empty_dir() -> None:
    workload = render(
        seed_region("us-east-1", storage={"persistence": {"enabled": False}})
    ).workload
    assert "volumeClaimTemplates" not in workload["spec"]
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["state"]


def memory_region_of_pods(region: str, pods: int, *, discovery: bool = False) -> dict[str, Any]:
    """Several memory pods; with the static list of slots unless ``discovery`` (the
    default of the chart: tests/test_discovery.py renders and boots that one)."""
    return seed_region(region, replicaCount=pods, sync={"discovery": {"enabled": discovery}})


def test_memory_with_several_pods_is_a_statefulset_each_pod_a_slot_of_the_mesh() -> None:
    rendering = render(memory_region_of_pods("us-east-1", 3))
    workload = rendering.workload
    assert workload["kind"] == "StatefulSet"
    assert workload["spec"]["replicas"] == 3
    (claim,) = workload["spec"]["volumeClaimTemplates"]  # a volume per pod
    assert claim["metadata"]["name"] == "state"
    env = [e["name"] for e in rendering.container["env"]]
    region_env = next(e for e in rendering.container["env"] if e["name"] == "BUCKETMESH_REGION")
    assert region_env["value"] == "us-east-1.$(BUCKETMESH_NODE)"
    # Kubernetes expands $(VAR) only from variables defined earlier in the list
    assert env.index("BUCKETMESH_NODE") < env.index("BUCKETMESH_REGION")
    config = yaml.safe_load(rendering.config_files()["bucketmesh.yaml"])
    slots = [f"us-east-1.bucketmesh-{i}" for i in range(3)]
    assert config["sync"]["peers"] == [*slots, "us-west-2", "eu-central-1"]
    for i, slot in enumerate(slots):
        assert (
            config["sync"]["peerUrls"][slot]
            == f"http://bucketmesh-{i}.bucketmesh-headless.bm.svc:8080"
        )
    assert "{region}" in config["sync"]["peerUrlTemplate"]  # the other regions


def test_each_pod_loads_the_rendered_config_as_its_own_slot(tmp_path: Path) -> None:
    from bucketmesh.node.config import apply_overrides, env_overrides, load_config

    rendering = render(memory_region_of_pods("us-east-1", 3))
    for name, text in rendering.config_files().items():
        (tmp_path / name).write_text(text)
    secrets = rendering.secret_data()
    for pod in ("bucketmesh-0", "bucketmesh-2"):
        environ = {"BUCKETMESH_NODE": pod, "BUCKETMESH_REGION": f"us-east-1.{pod}"}
        for entry in rendering.container["env"]:
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["key"] in secrets:
                environ[entry["name"]] = secrets[ref["key"]]
        config = load_config(tmp_path / "bucketmesh.yaml", environ=environ)
        config = apply_overrides(config, env_overrides(environ))
        assert config.region == f"us-east-1.{pod}"
        slots = {f"us-east-1.bucketmesh-{i}" for i in range(3)}
        assert set(config.remote_peers) == (slots - {config.region}) | {"us-west-2", "eu-central-1"}


def test_several_pods_on_memory_without_sync_fail_naming_sync_enabled() -> None:
    values = seed_region("us-east-1", replicaCount=2, sync={"enabled": False})
    message = render_error(values)
    assert "replicaCount 2 on storage.backend=memory needs sync.enabled" in message, message


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_a_memory_region_of_several_pods_is_valid_kubernetes(kube_version: str) -> None:
    rendering = render(everything_on(memory_region_of_pods("eu-central-1", 3)))
    for manifest in rendering.manifests:
        if manifest["kind"] not in OPERATOR_KINDS:
            kubernetes_validate.validate(manifest, kube_version, strict=True)


def test_redis_is_a_deployment_of_replica_count_pods_with_the_url_from_the_secret() -> None:
    rendering = render(redis_region("us-west-2"))
    workload = rendering.workload
    assert workload["kind"] == "Deployment"
    assert workload["spec"]["replicas"] == 3
    assert rendering.secret_data()["redis-url"] == REDIS_URL
    env = {e["name"]: e for e in rendering.container["env"]}
    assert env["BUCKETMESH_STORAGE_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "redis-url"
    assert REDIS_URL not in json.dumps(rendering.config_files())
    assert not rendering.of_kind("StatefulSet")


def test_redis_without_a_url_fails_naming_the_value() -> None:
    message = render_error(seed_region("us-east-1", storage={"backend": "redis"}))
    assert "storage.redisUrl" in message, message


def test_restricted_egress_still_lets_a_regions_pods_sync_with_each_other() -> None:
    """Before: with egressCIDRs, only DNS and those CIDRs were allowed out, so the pods of
    a memory region (replicaCount > 1) could not reach each other's sync port."""
    values = everything_on(seed_region("us-east-1", replicaCount=3))
    rendering = render(values)
    egress = rendering.one("NetworkPolicy")["spec"]["egress"]
    selector = rendering.workload["spec"]["selector"]["matchLabels"]
    own = [rule for rule in egress if any("podSelector" in to for to in rule.get("to", []))]
    assert own and own[0]["to"][0]["podSelector"]["matchLabels"] == selector, egress


def test_a_redis_url_beside_an_existing_secret_fails_naming_where_it_goes() -> None:
    """Before: no Secret was rendered to hold it, the URL was dropped, and the pod
    waited for a redis-url key the existing Secret (Terraform's) did not have."""
    values = seed_region(
        "us-east-1",
        storage={"backend": "redis", "redisUrl": "redis://r:6379"},
        secret={"existingSecret": "bucketmesh-secrets"},
    )
    message = render_error(values)
    assert "storage.redisUrl is not used with secret.existingSecret" in message, message
    assert '"redis-url"' in message


def test_a_numeric_image_tag_renders_as_the_tag() -> None:
    """``--set image.tag=20261206`` parses as a number: it rendered
    ``bucketmesh:%!s(float64=2.0261206e+07)``, an invalid image."""
    (tag,) = values_from_sets("image.tag=20261206")["image"].values()
    rendering = render(seed_region("us-east-1", image={"tag": tag}))
    assert rendering.container["image"].endswith(":20261206"), rendering.container["image"]


# -- the seed's values, and --set ---------------------------------------------------------


def test_the_seeds_comma_separated_set_is_an_error_in_helm_itself() -> None:
    # `--set sync.peers="us-west-2,eu-central-1"`: the shell drops the quotes, and
    # helm reads a second key "eu-central-1" without a value
    with pytest.raises(helm.HelmValuesError, match="eu-central-1"):
        helm.parse_set_string("sync.peers=us-west-2,eu-central-1")


def test_peers_as_a_list_or_a_comma_separated_string_render_the_same_config() -> None:
    as_list = values_from_sets(*region_sets("us-east-1"))
    as_string = deep_merge(
        as_list, values_from_sets(r"sync.peers=us-east-1\, us-west-2\,eu-central-1")
    )
    assert as_string["sync"]["peers"] == "us-east-1, us-west-2,eu-central-1"
    list_config = yaml.safe_load(render(as_list).config_files()["bucketmesh.yaml"])
    string_config = yaml.safe_load(render(as_string).config_files()["bucketmesh.yaml"])
    assert list_config["sync"]["peers"] == list(REGIONS)
    assert string_config == list_config


def test_the_seed_values_shape_is_what_the_chart_reads() -> None:
    config = yaml.safe_load(render(seed_region("eu-central-1")).config_files()["bucketmesh.yaml"])
    assert config["region"] == "eu-central-1"
    assert config["sync"]["enabled"] is True
    assert config["sync"]["syncClusterId"] == "global-rate-limit-cluster"
    assert config["sync"]["peerUrls"] == "https://bucketmesh-sync.{region}.example.com"
    assert config["buckets"] == "buckets.yaml"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({}, "region is required"),
        ({"region": "us east"}, 'region "us east"'),
        ({"region": "us-east-1", "sync": {"enabled": True}}, "sync secret"),
        (
            {"region": "us-east-1", "sync": {"enabled": True}, "secret": {"syncSecret": "s"}},
            "sync.enabled needs sync.peers",
        ),
        (
            {
                "region": "us-east-1",
                "sync": {"enabled": True, "peers": ["us-east-1", "us-west-2"]},
                "secret": {"syncSecret": "s"},
            },
            'sync.peers lists "us-west-2" but neither sync.peerUrls nor sync.peerUrlTemplate',
        ),
        (
            {
                "region": "us-east-1",
                "sync": {"enabled": True, "peers": "us-west-2", "peerUrlTemplate": "http://x"},
                "secret": {"syncSecret": "s"},
            },
            "must contain {region}",
        ),
    ],
)
def test_values_the_binary_would_refuse_fail_to_render_naming_the_value(
    values: dict[str, Any], named: str
) -> None:
    message = render_error(values)
    assert named in message, message


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("region", REGIONS)
def test_the_node_loads_the_rendered_config(backend: str, region: str, tmp_path: Path) -> None:
    """The config files, with the environment the pod gets from the Secret, load
    through the node's own loader (the whole boot is test_deploy_pods.py)."""
    from bucketmesh.node.config import apply_overrides, env_overrides, load_config

    rendering = render(BACKENDS[backend](region))
    for name, text in rendering.config_files().items():
        (tmp_path / name).write_text(text)
    secrets = rendering.secret_data()
    environ = {"BUCKETMESH_NODE": "bucketmesh-0"}
    for entry in rendering.container["env"]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref and ref["key"] in secrets:
            environ[entry["name"]] = secrets[ref["key"]]
    config = load_config(tmp_path / "bucketmesh.yaml", environ=environ)
    config = apply_overrides(config, env_overrides(environ))
    assert config.region == region
    assert config.node == "bucketmesh-0"
    assert config.sync.enabled and config.sync.secret == SYNC_SECRET
    assert config.admin.token == ADMIN_TOKEN
    assert set(config.remote_peers) == set(REGIONS) - {region}
    assert config.storage.backend == backend
    if backend == "redis":
        assert config.storage.redis_url == REDIS_URL
    assert [rule.name for rule in config.buckets][-1] == "per-ip"
    assert config.listen_port == rendering.container["ports"][0]["containerPort"]


# -- the pod -----------------------------------------------------------------------------


def test_the_pod_is_restricted_and_probed() -> None:
    rendering = render(everything_on(seed_region("us-east-1")))
    pod = rendering.workload["spec"]["template"]["spec"]
    container = rendering.container
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    # restoring a large snapshot + log and the start-up pull take minutes, not seconds
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 300
    assert pod["terminationGracePeriodSeconds"] >= 30
    assert {"requests", "limits"} <= set(container["resources"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "sync": 8090, "grpc-envoy": 8081}
    config = yaml.safe_load(rendering.config_files()["bucketmesh.yaml"])
    assert config["envoyListen"] == "0.0.0.0:8081"
    assert config["adminListen"] == "0.0.0.0:8090"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/bucketmesh"]["readOnly"] is True
    assert "/tmp" in mounts  # the only writable places: the state volume and /tmp
    annotations = rendering.workload["spec"]["template"]["metadata"]["annotations"]
    assert {"checksum/config", "checksum/secret"} <= set(annotations)


def test_a_service_for_the_api_and_one_for_sync() -> None:
    rendering = render(everything_on(seed_region("us-west-2")))
    api = rendering.one("Service", "bucketmesh")
    sync = rendering.one("Service", "bucketmesh-sync")
    assert {p["name"] for p in api["spec"]["ports"]} == {"http", "grpc-envoy"}
    assert sync["spec"]["type"] == "LoadBalancer"
    assert sync["spec"]["loadBalancerSourceRanges"] == ["203.0.113.0/24"]
    # the nodes' reserved listener: deltas and admin calls only, never shed
    assert [p["targetPort"] for p in sync["spec"]["ports"]] == ["sync"]
    policy = rendering.one("NetworkPolicy", "bucketmesh")
    from_peers = [rule for rule in policy["spec"]["ingress"] if "ipBlock" in rule["from"][0]]
    assert [rule["ports"] for rule in from_peers] == [[{"port": "sync", "protocol": "TCP"}]]


def test_without_a_reserved_port_the_sync_service_targets_the_http_port() -> None:
    rendering = render(values_from_sets(*region_sets("us-east-1"), "containerPorts.sync=0"))
    sync = rendering.one("Service", "bucketmesh-sync")
    assert [p["targetPort"] for p in sync["spec"]["ports"]] == ["http"]
    assert "adminListen" not in yaml.safe_load(rendering.config_files()["bucketmesh.yaml"])
    assert {p["name"] for p in rendering.container["ports"]} == {"http"}
    # without sync there is nothing for the reserved listener to take
    alone = render(values_from_sets("region=us-east-1"))
    assert "adminListen" not in yaml.safe_load(alone.config_files()["bucketmesh.yaml"])


@pytest.mark.parametrize(
    "clash", ["containerPorts.http=8090", "envoy.enabled=true,envoy.port=8090"]
)
def test_a_reserved_port_shared_with_another_fails_naming_it(clash: str) -> None:
    message = render_error(values_from_sets(*region_sets("us-east-1"), clash))
    assert "containerPorts.sync 8090 is" in message, message


def test_an_existing_secret_is_used_and_none_is_created() -> None:
    values = values_from_sets(
        "region=us-east-1",
        "sync.enabled=true",
        "sync.peers={us-east-1,us-west-2}",
        "sync.peerUrls.us-west-2=https://bm.us-west-2.example.com",
        "secret.existingSecret=bucketmesh-secrets",
    )
    rendering = render(values)
    assert not rendering.of_kind("Secret")
    refs = [
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in rendering.container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    ]
    assert refs and set(refs) == {"bucketmesh-secrets"}


def test_the_prometheus_rule_is_the_alerts_file_and_the_monitor_labels_the_region() -> None:
    rendering = render(everything_on(seed_region("eu-central-1")))
    rule = rendering.one("PrometheusRule")
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())
    monitor = rendering.one("ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    relabel = {r["targetLabel"]: r.get("replacement") for r in endpoint["relabelings"]}
    assert relabel["region"] == "eu-central-1"
    api = rendering.one("Service", "bucketmesh")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= api["metadata"]["labels"].items()


# -- checkov -------------------------------------------------------------------------------


def checkov_command() -> list[str]:
    """checkov lives in a venv of its own (its pins clash with the dev tools): make install."""
    candidates = [
        ROOT / ".venv" / "checkov" / "bin" / "checkov",
        Path(sys.prefix) / "checkov" / "bin" / "checkov",
    ]
    for candidate in candidates:
        if candidate.exists():
            return [str(candidate)]
    found = shutil.which("checkov")
    assert found, "checkov is not installed: `make install` puts it in .venv/checkov"
    return [found]


def run_checkov(directory: Path, framework: str) -> dict[str, Any]:
    """checkov's JSON report of ``directory`` with the skips of deploy/checkov.yaml."""
    done = subprocess.run(
        [
            *checkov_command(),
            "--config-file",
            str(CHECKOV_CONFIG),
            "--directory",
            str(directory),
            "--framework",
            framework,
            "--output",
            "json",
            "--quiet",
            "--compact",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert done.stdout.strip(), f"checkov printed nothing (exit {done.returncode}):\n{done.stderr}"
    report = json.loads(done.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [
        f"{check['check_id']} {check['check_name']} ({check['resource']})"
        for one in reports
        for check in one.get("results", {}).get("failed_checks", [])
    ]
    passed = sum(one.get("summary", {}).get("passed", 0) for one in reports)
    assert failed == [], "checkov findings not explained in deploy/checkov.yaml:\n" + "\n".join(
        failed
    )
    assert passed > 0, report
    return {"passed": passed}


def explained_skips() -> Iterator[str]:
    """The check ids deploy/checkov.yaml skips."""
    config = yaml.safe_load(CHECKOV_CONFIG.read_text())
    yield from config["skip-check"]


def test_checkov_finds_nothing_unexplained_in_the_rendering(tmp_path: Path) -> None:
    for backend, values in BACKENDS.items():
        rendering = render(everything_on(values("us-east-1")))
        out = tmp_path / backend
        out.mkdir()
        for index, manifest in enumerate(rendering.manifests):
            if manifest["kind"] in OPERATOR_KINDS:
                continue
            name = f"{index:02d}-{manifest['kind']}-{manifest['metadata']['name']}.yaml"
            (out / name).write_text(yaml.safe_dump(manifest))
    run_checkov(tmp_path, "kubernetes")


def test_every_skipped_checkov_check_is_explained_in_the_docs() -> None:
    docs = DOCS.read_text()
    skipped = list(explained_skips())
    assert skipped
    for check in skipped:
        assert check in docs, (
            f"{check} is skipped in deploy/checkov.yaml but docs/deploy.md does not say why"
        )
