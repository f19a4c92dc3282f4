"""``bucketmesh cluster up``: a whole mesh on one machine, one ``bucketmesh serve`` per region.

For trying the mesh and for demos. Every region listens on loopback, from
``--base-port`` up; the regions share one generated secret, handed to the
nodes through the environment and never written to disk; their configs live
in a temporary directory removed on exit. Node output is prefixed with its
region. Ctrl-C (or SIGTERM, or SIGHUP) stops every node; if one node dies, the
others are stopped too.

Nothing outlives the process that started the mesh, however it ends (kill -9
included):

- **The nodes** inherit the read end of a *lifeline* pipe whose write end only
  the owner holds (``serve --lifeline-fd``). When the owner is gone the kernel
  closes it, each node reads end of file and stops gracefully (final
  snapshot, as on SIGTERM). A pipe, not ``prctl(PR_SET_PDEATHSIG)``: that
  fires when the *thread* that forked exits (the scenario runner starts nodes
  from worker threads) and exists on Linux only.
- **The proxy process** (``netproxy.NetProxy``) stops when its command pipe
  from the owner reaches end of file, for the same reason.
- **The temporary directory** of ``cluster up`` (configs, snapshots, logs) is
  made and removed by a small *janitor* process (:class:`JanitorDirectory`).
  The owner and every node hold the write end of a second pipe; the janitor
  blocks on its read end and removes the directory once the last holder is
  gone, whichever of them outlives the others. The janitor makes the directory
  itself, so there is no moment at which it exists without someone to remove it.
- **The sync secret** is never on disk: the configs say
  ``${BUCKETMESH_SYNC_SECRET}`` and the nodes get the value in their
  environment, which dies with them.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any

import yaml

from bucketmesh.core.rules import hashed_value
from bucketmesh.telemetry.log import logger
from bucketmesh.tooling.netproxy import Faults, NetProxy, link_name

log = logger("cluster")
DEFAULT_REGIONS = ("us-east-1", "eu-central-1", "ap-southeast-2")
DEFAULT_BASE_PORT = 8081
DEFAULT_CLUSTER_ID = "bucketmesh-local"
#: The rules a mesh gets without ``--buckets``: package data (src/bucketmesh/examples/),
#: so a wheel has them too; each mesh copies them into its directory.
EXAMPLE_BUCKETS = resources.files("bucketmesh") / "examples" / "buckets.yaml"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
#: The nodes' ``sync.peerTimeout`` (the config's default, which ``region_config``
#: keeps): a sync request that takes longer has failed.
PEER_TIMEOUT_MS = 1000.0
#: The most one-way delay (latency + jitter) a proxy link may add: from half the
#: peer timeout on, every sync round trip times out and the regions never meet.
MAX_ONE_WAY_DELAY_MS = PEER_TIMEOUT_MS / 2
#: A region name: what ``node/config.py`` accepts for ``region``, and so also a
#: safe file name for the region's config, snapshot and log.
REGION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def region_problem(region: str) -> str | None:
    """Why ``region`` cannot name a region of a local mesh; None when it can."""
    if REGION_NAME.fullmatch(region) is None:
        shown = region if len(region) <= 40 else region[:37] + "..."
        return (
            f"{shown!r} is not a region name (1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit)"
        )
    return None


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


#: The example rule's bucket for ``X-API-Key: demo``: the key holds the API key's hash
#: (``| sha256``), so the printed state URL names the hash.
DEMO_KEY = "agent-api-key-" + hashed_value("demo")


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
    curl -s "http://127.0.0.1:$port/v1/bucket/state?key={DEMO_KEY}"; echo
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
        inherit_fds: Sequence[int] = (),
    ) -> None:
        if not regions or len(set(regions)) != len(regions):
            raise ValueError("--regions must name distinct regions")
        for region in regions:
            problem = region_problem(region)
            if problem is not None:
                raise ValueError(f"--regions: {problem}")
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
        #: Descriptors every node inherits, and so holds open while it runs.
        self.inherit_fds = tuple(inherit_fds)
        #: The lifeline pipe (read end, write end): made by the first spawn.
        self._lifeline: tuple[int, int] | None = None
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

    def _lifeline_fd(self) -> int:
        """The read end of the lifeline every node watches (``serve --lifeline-fd``).
        Only this process holds the write end (os.pipe's descriptors are not
        inherited, and every child is started with close_fds), so the nodes read
        end of file exactly when this process is gone or :meth:`stop` closes it."""
        if self._lifeline is None:
            self._lifeline = os.pipe()
        return self._lifeline[0]

    def _close_lifeline(self) -> None:
        if self._lifeline is not None:
            for fd in self._lifeline:
                os.close(fd)
            self._lifeline = None

    def _spawn(self, node: RegionNode) -> None:
        # Without an output stream the node's output goes to <region>.log in the
        # mesh's directory (the child keeps its own copy of the descriptor).
        lifeline = self._lifeline_fd()
        command = [sys.executable, "-m", "bucketmesh", "serve", "--config", str(node.config)]
        with open(self.directory / f"{node.region}.log", "ab") as output:
            node.process = subprocess.Popen(
                [*command, "--lifeline-fd", str(lifeline)],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.out is not None else output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us; we stop the nodes in order
                pass_fds=(lifeline, *self.inherit_fds),
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
        self._close_lifeline()


#: The janitor's whole program (``python -c``; argv: the holders pipe's read end, the
#: directory's prefix). It makes the directory and says its path on stdout, then
#: blocks until every holder of the pipe's write end is gone, then removes it.
#: Terminal signals are not for it: it ends when its holders do.
_JANITOR = """\
import os, shutil, signal, sys, tempfile
for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTSTP):
    signal.signal(sig, signal.SIG_IGN)
holders = int(sys.argv[1])
directory = tempfile.mkdtemp(prefix=sys.argv[2])
try:
    print(directory, flush=True)
    sys.stdout.close()
    while os.read(holders, 65536):
        pass
finally:
    shutil.rmtree(directory, ignore_errors=True)
"""


class JanitorDirectory:
    """A temporary directory that cannot outlive the processes using it.

    A janitor process makes the directory and removes it once every holder of
    :attr:`hold_fd` is gone: this process, and every child that inherits the
    descriptor (pass it to them: ``LocalMesh(inherit_fds=...)``). Whichever of
    them ends last, and however (kill -9 included), the kernel closes its copy
    and the janitor, blocked reading the pipe, sees end of file only when the
    last copy is closed. :meth:`close` removes the directory at once.
    """

    def __init__(self, prefix: str) -> None:
        read_end, self.hold_fd = os.pipe()
        try:
            self._janitor = subprocess.Popen(
                [sys.executable, "-c", _JANITOR, str(read_end), prefix],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                pass_fds=(read_end,),
                start_new_session=True,  # Ctrl-C in the terminal is not for it
            )
        except BaseException:
            os.close(self.hold_fd)
            raise
        finally:
            os.close(read_end)
        assert self._janitor.stdout is not None
        self.path = self._janitor.stdout.readline().decode().strip()
        self._janitor.stdout.close()
        if not self.path:
            self.close()
            raise OSError("the janitor process could not make a temporary directory")

    def close(self) -> None:
        """Remove the directory now; the janitor ends once the other holders have."""
        if self.path:
            shutil.rmtree(self.path, ignore_errors=True)
        if self.hold_fd >= 0:
            os.close(self.hold_fd)
            self.hold_fd = -1
        # If a node still holds it, the janitor removes what that node leaves once it ends.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._janitor.wait(STOP_TIMEOUT_S)


def _taken_ports(ports: Iterable[int]) -> list[int]:
    """The ports of ``ports`` something already listens on (on 127.0.0.1)."""
    taken = []
    for port in ports:
        with socket.socket() as probe:
            # as the nodes bind: a port a stopped mesh left in TIME_WAIT is free
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                taken.append(port)
    return taken


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
    """Run the mesh until interrupted (SIGINT, SIGTERM, SIGHUP); returns the exit status."""
    stopping = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stopping.set())
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    directory: JanitorDirectory | None = None
    mesh: LocalMesh | None = None
    try:
        taken = _taken_ports(range(base_port, base_port + len(regions))) if base_port else []
        if taken:
            # another process (a mesh started before?) would answer for the region:
            # the banner would announce it as this one's
            log.error(
                "cluster: port %s already in use on 127.0.0.1 (another mesh still "
                "running?); stop it or give --base-port",
                ", ".join(str(port) for port in taken),
            )
            return 2
        try:
            directory = JanitorDirectory("bucketmesh-cluster-")
        except OSError as error:
            log.error("cluster: no temporary directory for the mesh: %s", error)
            return 1
        try:
            mesh = LocalMesh(
                regions,
                directory=directory.path,
                base_port=base_port,
                buckets=buckets,
                cluster_id=cluster_id,
                faults=faults,
                admin_token=admin_token,
                out=out,
                inherit_fds=(directory.hold_fd,),
            )
        except ValueError as error:
            log.error("cluster: %s", error)
            return 2
        if not mesh.start(stopping):
            return 0 if stopping.is_set() else 1
        nodes = list(mesh.nodes.values())
        out.write(
            f"\nbucketmesh cluster: one mesh of {len(nodes)} regions, cluster id {cluster_id!r}\n"
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
                log.error(
                    "cluster: %s exited (%s); stopping the others",
                    dead[0].region,
                    process.returncode if process else "?",
                )
                return 1
        return 0
    finally:
        if mesh is not None:
            mesh.stop()
        if directory is not None:
            directory.close()
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
                log.error(
                    "cluster: %s exited with status %s before it was ready (its output says "
                    "why; port %d taken? try --base-port 0)",
                    node.region,
                    node.process.returncode,
                    node.port,
                )
                return False
            if _ready(node):
                waiting.remove(node)
        if time.monotonic() > deadline:
            names = ", ".join(n.region for n in waiting)
            log.error("cluster: %s not ready after %gs", names, READY_TIMEOUT_S)
            return False
        time.sleep(0.05)
    return True
