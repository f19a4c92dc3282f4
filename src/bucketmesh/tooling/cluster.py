"""``bucketmesh cluster up``: a whole mesh on one machine, one ``bucketmesh serve`` per region.

For trying the mesh and for demos. Every region listens on loopback, from
``--base-port`` up; the regions share one generated secret, handed to the
nodes through the environment and never written to disk; their configs live
in a temporary directory removed on exit. Node output is prefixed with its
region. Ctrl-C (or SIGTERM) stops every node; if one node dies, the others
are stopped too.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any

import yaml

from bucketmesh.tooling.netproxy import Faults, NetProxy, link_name

DEFAULT_REGIONS = ("us-east-1", "eu-central-1", "ap-southeast-2")
DEFAULT_BASE_PORT = 8081
DEFAULT_CLUSTER_ID = "bucketmesh-local"
#: The rules a mesh gets without ``--buckets``: package data (src/bucketmesh/examples/),
#: so a wheel has them too; each mesh copies them into its directory.
EXAMPLE_BUCKETS = resources.files("bucketmesh") / "examples" / "buckets.yaml"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


@dataclass
class RegionNode:
    region: str
    port: int
    config: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def region_config(
    region: str,
    ports: dict[str, int],
    *,
    cluster_id: str,
    buckets: str,
    peer_urls: dict[str, str] | None = None,
    snapshot: str | None = None,
) -> dict[str, Any]:
    """The bucketmesh.yaml of one region of a loopback mesh. ``peer_urls`` (other
    region → URL) replaces the direct loopback URLs, e.g. with proxies' URLs."""
    urls = peer_urls or {r: f"http://127.0.0.1:{p}" for r, p in ports.items() if r != region}
    storage: dict[str, Any] = {"backend": "memory"}
    if snapshot:
        storage["snapshot"] = snapshot
    return {
        "region": region,
        "node": "node-a",
        "listen": f"127.0.0.1:{ports[region]}",
        "sync": {
            "enabled": True,
            "syncClusterId": cluster_id,
            "peers": list(ports),
            "peerUrls": urls,
            "secret": "${BUCKETMESH_SYNC_SECRET}",
        },
        "storage": storage,
        "admin": {"token": "${BUCKETMESH_ADMIN_TOKEN:-}"},
        "buckets": buckets,
    }


def burst_example(nodes: Sequence[RegionNode]) -> str:
    first, second = nodes[0], nodes[1 % len(nodes)]
    ports = " ".join(str(n.port) for n in nodes)
    return f"""\
Try a burst split across two regions (100 requests to {first.region}, 100 to {second.region},
all at once), then read the one global bucket from every region:

  {{ for i in $(seq 100); do
      curl -s -o /dev/null -w '%{{http_code}}\\n' -H 'X-API-Key: demo' {first.url}/v1/rate &
      curl -s -o /dev/null -w '%{{http_code}}\\n' -H 'X-API-Key: demo' {second.url}/v1/rate &
    done; wait; }} | sort | uniq -c

  for port in {ports}; do
    curl -s "http://127.0.0.1:$port/v1/bucket/state?key=agent-api-key-demo"; echo
  done

Every region reports the same tokens_remaining (5000 − 200, plus refill at 50/s since) and
the same used counters ({first.region} 100, {second.region} 100).
Sync state: {first.url}/v1/status   metrics: {first.url}/metrics   (Ctrl-C stops all)
"""


def _relay(stream: IO[bytes], region: str, out: IO[str]) -> None:
    for line in iter(stream.readline, b""):
        out.write(f"[{region}] {line.decode(errors='replace')}")
        out.flush()


def _ready(node: RegionNode) -> bool:
    try:
        with urllib.request.urlopen(node.url + "/readyz", timeout=1.0) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _stop(nodes: Sequence[RegionNode]) -> None:
    running = [n.process for n in nodes if n.process is not None and n.process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in running:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports the kernel says are free on loopback now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class LocalMesh:
    """A mesh of ``bucketmesh serve`` processes on loopback, one per region.

    With ``faults`` (or ``proxy``), a :class:`~bucketmesh.tooling.netproxy.NetProxy`
    link sits between every ordered pair of regions and every peer URL points
    at it, so latency, jitter and loss apply to sync traffic and a region can
    be cut off (:meth:`cut`). Nodes keep a snapshot file in the mesh's
    directory, so :meth:`kill` (SIGKILL) then :meth:`restart` is a crash and a
    recovery. Used by ``cluster up`` and by the scenario runner (``xr``).
    """

    def __init__(
        self,
        regions: Sequence[str] = DEFAULT_REGIONS,
        *,
        directory: str,
        base_port: int = 0,
        buckets: str | None = None,
        cluster_id: str = DEFAULT_CLUSTER_ID,
        faults: Faults | None = None,
        proxy: bool = False,
        admin_token: str | None = None,
        out: IO[str] | None = None,
    ) -> None:
        if not regions or len(set(regions)) != len(regions):
            raise ValueError("--regions must name distinct regions")
        if buckets and not Path(buckets).is_file():
            raise ValueError(f"no buckets file at {buckets}; give --buckets FILE")
        self.regions = list(regions)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if buckets:
            self.buckets = Path(buckets)
        else:
            self.buckets = self.directory / "example-buckets.yaml"
            self.buckets.write_text(EXAMPLE_BUCKETS.read_text(encoding="utf-8"), encoding="utf-8")
        self.cluster_id = cluster_id
        self.out = out
        self.admin_token = admin_token
        ports = (
            free_ports(len(regions))
            if base_port == 0
            else [base_port + i for i in range(len(regions))]
        )
        self.ports = dict(zip(self.regions, ports, strict=True))
        self.nodes = {
            region: RegionNode(region, port, self.directory / f"{region}.yaml")
            for region, port in self.ports.items()
        }
        self.proxy: NetProxy | None = None
        if faults is not None or proxy:
            self.proxy = NetProxy()
            for source in self.regions:
                for destination in self.regions:
                    if source != destination:
                        self.proxy.add(
                            source,
                            destination,
                            ("127.0.0.1", self.ports[destination]),
                            faults,
                        )
        self.env = {
            **os.environ,
            "BUCKETMESH_SYNC_SECRET": secrets.token_urlsafe(32),
            "BUCKETMESH_ADMIN_TOKEN": admin_token or "",
            "PYTHONUNBUFFERED": "1",
        }
        for region, node in self.nodes.items():
            peer_urls = None
            if self.proxy is not None:
                peer_urls = {
                    other: f"http://127.0.0.1:{self.proxy.links[link_name(region, other)].port}"
                    for other in self.regions
                    if other != region
                }
            config = region_config(
                region,
                self.ports,
                cluster_id=cluster_id,
                buckets=str(self.buckets.resolve()),
                peer_urls=peer_urls,
                snapshot=str(self.directory / f"{region}.snap"),
            )
            node.config.write_text(yaml.safe_dump(config, sort_keys=False))
        #: Regions stopped on purpose (kill/stop), not to be reported as deaths.
        self.stopped: set[str] = set()

    @property
    def urls(self) -> dict[str, str]:
        return {region: node.url for region, node in self.nodes.items()}

    def _spawn(self, node: RegionNode) -> None:
        # Without an output stream the node's output goes to <region>.log in the
        # mesh's directory (the child keeps its own copy of the descriptor).
        with open(self.directory / f"{node.region}.log", "ab") as log:
            node.process = subprocess.Popen(
                [sys.executable, "-m", "bucketmesh", "serve", "--config", str(node.config)],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.out is not None else log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us; we stop the nodes in order
            )
        if self.out is not None:
            assert node.process.stdout is not None
            threading.Thread(
                target=_relay, args=(node.process.stdout, node.region, self.out), daemon=True
            ).start()
        self.stopped.discard(node.region)

    def start(self, stopping: threading.Event | None = None) -> bool:
        """Start every node and wait until all are ready."""
        for node in self.nodes.values():
            self._spawn(node)
        return _wait_ready(list(self.nodes.values()), stopping or threading.Event())

    def dead(self) -> list[RegionNode]:
        """Nodes that exited without being stopped on purpose."""
        return [
            n
            for n in self.nodes.values()
            if n.region not in self.stopped
            and n.process is not None
            and n.process.poll() is not None
        ]

    def kill(self, region: str) -> None:
        """SIGKILL the region's node: a crash, no final snapshot, nothing flushed."""
        node = self.nodes[region]
        self.stopped.add(region)
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            node.process.wait()

    def restart(self, region: str, stopping: threading.Event | None = None) -> bool:
        """Start the region's node again (after :meth:`kill`) and wait until it is ready."""
        node = self.nodes[region]
        if node.process is not None and node.process.poll() is None:
            raise RuntimeError(f"{region} is still running")
        self._spawn(node)
        return _wait_ready([node], stopping or threading.Event())

    def cut(self, regions: Sequence[str]) -> list[str]:
        """Cut every proxy link to and from ``regions``."""
        if self.proxy is None:
            raise RuntimeError("this mesh has no proxies between regions (start it with proxy)")
        return self.proxy.cut(regions)

    def heal(self, regions: Sequence[str] | None = None) -> None:
        if self.proxy is not None:
            self.proxy.heal(regions)

    def stop(self) -> None:
        _stop(list(self.nodes.values()))
        if self.proxy is not None:
            self.proxy.close()


def up(
    regions: Sequence[str] = DEFAULT_REGIONS,
    *,
    base_port: int = DEFAULT_BASE_PORT,
    buckets: str | None = None,
    cluster_id: str = DEFAULT_CLUSTER_ID,
    faults: Faults | None = None,
    admin_token: str | None = None,
    out: IO[str] = sys.stdout,
) -> int:
    """Run the mesh until interrupted; returns the exit status."""
    stopping = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stopping.set())
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    with tempfile.TemporaryDirectory(prefix="bucketmesh-cluster-") as directory:
        try:
            mesh = LocalMesh(
                regions,
                directory=directory,
                base_port=base_port,
                buckets=buckets,
                cluster_id=cluster_id,
                faults=faults,
                admin_token=admin_token,
                out=out,
            )
        except ValueError as error:
            print(f"bucketmesh cluster: {error}", file=sys.stderr)
            return 2
        try:
            if not mesh.start(stopping):
                return 0 if stopping.is_set() else 1
            nodes = list(mesh.nodes.values())
            out.write(
                f"\nbucketmesh cluster: one mesh of {len(nodes)} regions, "
                f"cluster id {cluster_id!r}\n"
            )
            for node in nodes:
                out.write(f"  {node.region:<16} {node.url}\n")
            if mesh.proxy is not None and faults is not None:
                out.write(
                    f"\nsync traffic goes through a proxy per pair of regions: "
                    f"{faults.latency_s * 1000:g} ms one way, "
                    f"jitter ±{faults.jitter_s * 1000:g} ms, loss {faults.loss:.1%}\n"
                )
                for name, link in mesh.proxy.links.items():
                    out.write(f"  {name:<36} 127.0.0.1:{link.port} -> {link.target[1]}\n")
            out.write("\n" + burst_example(nodes))
            out.flush()
            while not stopping.wait(0.2):
                dead = mesh.dead()
                if dead:
                    process = dead[0].process
                    print(
                        f"bucketmesh cluster: {dead[0].region} exited "
                        f"({process.returncode if process else '?'}); stopping the others",
                        file=sys.stderr,
                    )
                    return 1
            return 0
        finally:
            mesh.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _wait_ready(nodes: Sequence[RegionNode], stopping: threading.Event) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    waiting = list(nodes)
    while waiting:
        if stopping.is_set():
            return False
        for node in list(waiting):
            if node.process is not None and node.process.poll() is not None:
                print(
                    f"bucketmesh cluster: {node.region} exited before it was ready "
                    f"(port {node.port} taken? try --base-port)",
                    file=sys.stderr,
                )
                return False
            if _ready(node):
                waiting.remove(node)
        if time.monotonic() > deadline:
            names = ", ".join(n.region for n in waiting)
            print(
                f"bucketmesh cluster: {names} not ready after {READY_TIMEOUT_S:g}s", file=sys.stderr
            )
            return False
        time.sleep(0.05)
    return True
