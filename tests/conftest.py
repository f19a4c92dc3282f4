"""Shared fixtures: real ``bucketmesh serve`` processes on loopback ports.

``serve(config)`` writes the config as YAML into the test's temporary directory,
starts ``python -m bucketmesh serve --config FILE --listen 127.0.0.1:PORT``
(plus any flags asked for), waits until ``/readyz`` answers 200 and returns a
:class:`Server`. Every process a factory started is stopped at teardown
(SIGTERM, then SIGKILL). When a test fails, the stderr of its servers is
attached to the report; a server that logged an internal error or a traceback
fails its test at teardown, so a crash inside the server cannot pass unnoticed.

``serve`` is per test; ``serve_module`` starts servers shared by a whole module
(tests on them use keys of their own).

``Mesh(serve, ...)`` is the one way tests start several nodes that sync: every node
is a ``serve`` process (so its output is reported and checked like any other), its
config is ``cluster up``'s (``tooling.cluster.region_config``), and with
``proxied`` every node reaches each peer through a ``tooling.netproxy`` link, so a
test can cut a node off, heal it, or delay its traffic.

``eventually`` / ``eventually_async`` are the only polling loops: a check is retried
until it holds (the deadline only stops a hang). ``small_disk`` is a real tmpfs of
a few pages that a test can fill (ENOSPC) and free again (``small_disk.py``).
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

T = TypeVar("T")

SEED_KEY_TEMPLATE = "agent-api-key-{{ .Request.Header.X-API-Key }}"

#: The seed rule, as in the seed config: capacity 5000, 50 tokens/s.
SEED_RULE: dict[str, Any] = {
    "key": SEED_KEY_TEMPLATE,
    "capacity": 5000,
    "refillRate": 50,
    "ttl": 3600,
}

#: Rules every test server has unless the test gives its own. No catch-all rule,
#: so a request without X-API-Key (and without ?user=) matches nothing.
DEFAULT_BUCKETS: list[dict[str, Any]] = [
    SEED_RULE,
    # 2 tokens, one more every 4 s: the third quick request is denied
    {"name": "tiny", "key": "tiny-{{ .Request.Query.user }}", "capacity": 2, "refillRate": 0.25},
    # refills so slowly (one token per 100 s) that a test sees no refill at all
    {"name": "slow", "key": "slow-{{ .Request.Header.X-User }}", "capacity": 5, "refillRate": 0.01},
]

DEFAULT_CONFIG: dict[str, Any] = {
    "region": "us-east-1",
    "node": "node-a",
    "sync": {"enabled": False, "syncClusterId": "global-rate-limit-cluster"},
    "storage": {"backend": "memory"},
    "buckets": DEFAULT_BUCKETS,
}

#: http11.ServerLimits defaults, in seconds; see ``Server.timeouts``.
DEFAULT_TIMEOUTS = {"header_timeout": 10.0, "body_timeout": 30.0, "keepalive_timeout": 5.0}
#: How the config file spells them (``limits.headerTimeout`` ..., in ms).
TIMEOUT_FILE_NAMES = {
    "header_timeout": "headerTimeout",
    "body_timeout": "bodyTimeout",
    "keepalive_timeout": "keepaliveTimeout",
}

# Nodes started by anything else than the factory below (``cluster up``, ``xr``) inherit
# this: overload shedding (limits.shedLag, 100 ms by default) would answer 503 whenever
# a loaded CI box stalls a node's loop that long while a test counts its answers.
os.environ.setdefault("BUCKETMESH_LIMITS_SHED_LAG", "30000")

READY_TIMEOUT_S = 60.0  # hang guards only: a saturated box starts slowly
STOP_TIMEOUT_S = 30.0


def configurable_timeouts() -> set[str]:
    """The connection timeouts the config file accepts under ``limits`` (in ms)."""
    from bucketmesh.node.config import LimitsConfig

    fields = set(LimitsConfig.__struct_fields__)
    return {name for name in DEFAULT_TIMEOUTS if f"{name}_ms" in fields}


def make_config(buckets: list[dict[str, Any]] | None = None, **settings: Any) -> dict[str, Any]:
    """The default test config with ``buckets`` replaced and top-level sections merged."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    if buckets is not None:
        config["buckets"] = copy.deepcopy(buckets)
    return merge_config(config, settings)


def merge_config(config: dict[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with each top-level section of ``settings`` merged into it (a mapping
    updates the section, anything else replaces it)."""
    for name, value in settings.items():
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name].update(copy.deepcopy(value))
        else:
            config[name] = copy.deepcopy(value)
    return config


def eventually(check: Callable[[], T], what: str, timeout: float = 60.0) -> T:
    """``check()``'s result once it stops raising AssertionError / HTTP errors (and,
    for a check that answers a bool, once it answers True: ``lambda: x == y`` works)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result is False:
                raise AssertionError(f"{what}: not yet")
            return result
        except (AssertionError, httpx.HTTPError) as error:
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout}s: {what}: {error}") from error
        time.sleep(0.05)


async def eventually_async(
    check: Callable[[], T | Awaitable[T]], what: str, timeout: float = 60.0
) -> T:
    """``eventually`` inside an event loop (for nodes run in this process): the loop
    keeps running between tries."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
            if result is False:
                raise AssertionError(f"{what}: not yet")
            return result  # type: ignore[return-value]
        except (AssertionError, httpx.HTTPError) as error:
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout}s: {what}: {error}") from error
        await asyncio.sleep(0.005)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerFailedToStart(RuntimeError):
    pass


class PortTaken(ServerFailedToStart):
    """The port asked for was taken by another process before the server bound it."""


class Server:
    """One running ``bucketmesh serve`` process."""

    def __init__(
        self,
        name: str,
        args: list[str],
        directory: Path,
        config_path: Path,
        config: dict[str, Any],
        timeouts: dict[str, float],
        env: dict[str, str],
        port: int | None = None,
    ) -> None:
        self.name = name
        self.directory = directory
        self.config_path = config_path
        self.config = config
        #: The connection timeouts this process runs with (seconds).
        self.timeouts = timeouts
        self.stdout_path = directory / f"{name}.stdout"
        self.stderr_path = directory / f"{name}.stderr"
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.base_url = f"http://{self.host}:{self.port}"
        self.args = [*args, "--listen", f"{self.host}:{self.port}"]
        self._env = env
        self._stdout = open(self.stdout_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._stderr = open(self.stderr_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            self.args,
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=self._stderr,
        )

    # -- observing ------------------------------------------------------------

    def url(self, path: str) -> str:
        return self.base_url + path

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 10.0)
        return httpx.Client(base_url=self.base_url, **kwargs)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stdout(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        code = self.process.poll()
        state = "running" if code is None else f"exited with {code}"
        return (
            f"$ {' '.join(self.args)}\n({state}; config {self.config_path})\n"
            f"--- config ---\n{self.config_path.read_text()}"
            f"--- stdout ---\n{self.stdout()}--- stderr ---\n{self.stderr()}"
        )

    def listening(self) -> bool:
        """This very process says it listens on its port (not another one that took it)."""
        return re.search(rf"\b{re.escape(self.host)}:{self.port}\b", self.stdout()) is not None

    def internal_errors(self) -> list[str]:
        """What stderr says of a bug the server hit (never expected): each line
        naming an internal error, and each traceback whole, so a failure names its
        cause rather than only that there was one."""
        found: list[str] = []
        lines = self.stderr().splitlines()
        index = 0
        while index < len(lines):
            line = lines[index]
            index += 1
            if "Traceback" in line:
                # the line before says what failed (a log record's message)
                block = [lines[index - 2], line] if index >= 2 else [line]
                # a traceback's frames are indented; its last line (the exception) is not
                while index < len(lines) and lines[index].startswith((" ", "\t")):
                    block.append(lines[index])
                    index += 1
                if index < len(lines):
                    block.append(lines[index])
                    index += 1
                found.append("\n".join(block))
            elif "internal error" in line:
                found.append(line)
        return found

    # -- lifecycle --------------------------------------------------------------

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        last_error: object = None
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise ServerFailedToStart(f"server {self.name} exited before ready")
                try:
                    response = client.get(self.url("/readyz"))
                    if response.status_code == 200 and self.listening():
                        return
                    last_error = f"/readyz answered {response.status_code}: {response.text}"
                except httpx.HTTPError as error:
                    last_error = error
                time.sleep(0.03)
        raise ServerFailedToStart(
            f"server {self.name} not ready after {timeout}s ({last_error})\n{self.describe()}"
        )

    def send_signal(self, sig: int) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        return self.process.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Ask the process to stop (SIGTERM: graceful) and return its exit code.

        Raises ``subprocess.TimeoutExpired`` if it did not stop in time (and kills it).
        """
        self.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._close_logs()

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait(STOP_TIMEOUT_S)
        self._close_logs()

    def _close_logs(self) -> None:
        if self.process.poll() is not None:
            self._stdout.close()
            self._stderr.close()

    def __repr__(self) -> str:
        return f"Server({self.name}, {self.base_url}, pid {self.process.pid})"


class ServerFactory:
    """Starts servers in one directory and stops all of them on ``close``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[Server] = []
        self._cleanups: list[Callable[[], None]] = []

    def on_close(self, cleanup: Callable[[], None]) -> None:
        """Call ``cleanup`` at ``close``, once every server is stopped."""
        self._cleanups.append(cleanup)

    def __call__(
        self,
        config: dict[str, Any] | None = None,
        *,
        raw_config: str | None = None,
        admin_token: str | None = None,
        snapshot: str | os.PathLike[str] | None = None,
        region: str | None = None,
        node: str | None = None,
        max_buckets: int | None = None,
        timeouts: dict[str, float] | None = None,
        env: dict[str, str] | None = None,
        config_name: str | None = None,
        wait_ready: bool = True,
        name: str | None = None,
        port: int | None = None,
        flags: Sequence[str] = (),
    ) -> Server:
        """Start a server with ``config`` (default: ``make_config()``) and wait for /readyz.

        ``raw_config`` is YAML text written as it is, instead of ``config``. ``flags``
        are more command-line flags. ``port`` is the one to listen on (default: a free
        one, and another if it is taken before the server binds it; a port asked for
        is not replaced: ``PortTaken``). ``name`` names its output files (made unique).

        ``timeouts`` (header_timeout, body_timeout, keepalive_timeout in seconds) are
        written into ``limits`` only for those the config file supports; the rest
        stay at their defaults, and ``Server.timeouts`` tells which apply.
        """
        config = copy.deepcopy(config) if config is not None else make_config()
        effective = dict(DEFAULT_TIMEOUTS)
        if timeouts and raw_config is None:
            supported = configurable_timeouts()
            limits = config.setdefault("limits", {})
            for name, seconds in timeouts.items():
                if name in supported:
                    limits[TIMEOUT_FILE_NAMES[name]] = round(seconds * 1000)
                    effective[name] = seconds
            if not limits:
                del config["limits"]
        name = self._unique(name or f"server-{len(self.servers) + 1}")
        config_path = self.directory / (config_name or f"{name}.yaml")
        if raw_config is not None:
            config_path.write_text(raw_config)
            config = yaml.safe_load(raw_config)
        else:
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        args = [sys.executable, "-m", "bucketmesh", "serve", "--config", str(config_path)]
        for flag, value in (
            ("--admin-token", admin_token),
            ("--snapshot", snapshot),
            ("--region", region),
            ("--node", node),
            ("--max-buckets", max_buckets),
        ):
            if value is not None:
                args += [flag, str(value)]
        args += flags
        environment = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")}
        environment["PYTHONUNBUFFERED"] = "1"
        limits = config.get("limits") if isinstance(config, dict) else None
        if not (isinstance(limits, dict) and "shedLag" in limits):
            # Overload shedding answers 503 once the event loop runs limits.shedLag late
            # (500 ms by default). A CI box at load 15 on 2 cores gets there while a test
            # counts its 200s; only the tests about shedding set shedLag and see it.
            environment["BUCKETMESH_LIMITS_SHED_LAG"] = "30000"
        environment.update(env or {})
        for attempt in range(3):
            server = Server(
                name if not attempt else f"{name}-retry{attempt}",
                args,
                self.directory,
                config_path,
                config,
                effective,
                environment,
                port,
            )
            self.servers.append(server)
            if not wait_ready:
                return server
            try:
                server.wait_ready()
                return server
            except ServerFailedToStart:
                server.kill()
                if "cannot listen" in server.stderr():
                    if port is not None:
                        raise PortTaken(server.describe()) from None
                    if attempt < 2:
                        continue  # taken between probing and binding: try another
                raise ServerFailedToStart(server.describe()) from None
        raise AssertionError("unreachable")

    def _unique(self, name: str) -> str:
        taken = {server.name for server in self.servers}
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}-{n}"
        return unique

    def close(self) -> list[str]:
        """Stop every server; returns the internal errors any of them logged."""
        problems: list[str] = []
        for server in self.servers:
            try:
                if server.alive():
                    server.stop(signal.SIGTERM, timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                problems.append(f"{server.name} ignored SIGTERM for {STOP_TIMEOUT_S}s; killed")
            finally:
                if server.alive():
                    server.kill()
                server._close_logs()
            errors = server.internal_errors()
            if errors:
                problems.append(f"{server.name} logged:\n" + "\n".join(errors[:20]))
        cleanups, self._cleanups = self._cleanups, []
        for cleanup in cleanups:
            try:
                cleanup()
            except Exception as error:  # reported, and the other cleanups still run
                problems.append(f"cleanup {cleanup!r} failed: {error!r}")
        return problems


# -- a mesh of nodes ----------------------------------------------------------------------

MESH_CLUSTER_ID = "global-rate-limit-cluster"


class MeshNode:
    """One node of a :class:`Mesh`: its name, region, port and config, the ``serve``
    process running it now (a new one after ``Mesh.restart``) and a client."""

    def __init__(self, name: str, region: str, port: int, config: dict[str, Any]) -> None:
        self.name = name
        self.region = region
        self.port = port
        self.config = config
        self.base_url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.base_url, timeout=10.0)
        self.server: Server | None = None

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self.server is not None, f"{self.name} was never started"
        return self.server.process

    def log(self) -> str:
        """The output of the process running the node now."""
        return "" if self.server is None else self.server.stdout() + self.server.stderr()

    def kill(self) -> None:
        """SIGKILL: a crash (nothing flushed, no goodbye to the peers)."""
        assert self.server is not None
        self.server.kill()

    def status(self) -> dict[str, Any]:
        return dict(self.client.get("/v1/status").json())

    def state(self, key: str) -> dict[str, Any]:
        response = self.client.get("/v1/bucket/state", params={"key": key})
        assert response.status_code == 200, response.text
        return dict(response.json())

    def metric(self, name: str, labels: str = "", *, required: bool = False) -> float:
        """The sample's value; 0 if /metrics has no such sample (unless ``required``)."""
        text = self.client.get("/metrics").text
        selector = re.escape(name) + (rf"\{{{re.escape(labels)}\}}" if labels else "")
        match = re.search(rf"^{selector} (\S+)$", text, re.M)
        assert match or not required, f"{self.name} exports no {name}{{{labels}}}"
        return float(match.group(1)) if match else 0.0

    def __repr__(self) -> str:
        return f"MeshNode({self.name}, {self.region}, {self.base_url})"


class Mesh:
    """Real nodes syncing with each other on loopback, each a ``serve`` process.

    ``layout`` names the nodes: regions (one node each, named after its region) or a
    mapping node name → region. A node sends to every other region through that
    region's first node. With ``proxied``, each of those routes goes through a
    ``NetProxy`` link named "source→target" (node names), so ``cut`` and ``heal`` act
    on real TCP traffic (a cut is a black hole, as a lost route is), and ``faults``
    (latency, jitter, loss) applies to every link; without, a peer URL is the peer's
    own port.

    Every config is ``cluster up``'s (``region_config``) with these ``buckets``, a
    sync ``interval_ms`` and ``peer_timeout_ms`` short enough for tests, and the
    node's ``overrides`` (top-level sections merged, as ``make_config`` does); the
    sync secret (``secret``) and the admin token reach the nodes through the
    environment, as ``cluster up`` hands them over. The factory stops the nodes at
    its teardown, then the proxy; their output is reported like any server's.
    """

    def __init__(
        self,
        factory: ServerFactory,
        layout: Sequence[str] | Mapping[str, str],
        *,
        buckets: list[dict[str, Any]],
        proxied: bool = False,
        faults: Any = None,
        cluster_id: str = MESH_CLUSTER_ID,
        admin_token: str | None = None,
        interval_ms: int = 20,
        peer_timeout_ms: int = 500,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.factory = factory
        self.layout = dict(layout) if isinstance(layout, Mapping) else {r: r for r in layout}
        self.buckets = copy.deepcopy(buckets)
        self.proxied = proxied or faults is not None
        self.faults = faults
        self.cluster_id = cluster_id
        self.admin_token = admin_token
        self.interval_ms = interval_ms
        self.peer_timeout_ms = peer_timeout_ms
        self.overrides = dict(overrides or {})
        self.secret = secrets.token_urlsafe(32)
        self.env = {
            "BUCKETMESH_SYNC_SECRET": self.secret,
            "BUCKETMESH_ADMIN_TOKEN": admin_token or "",
        }
        self.proxy: Any = None  # a NetProxy when proxied
        self.nodes: dict[str, MeshNode] = {}
        factory.on_close(self._close)

    def __getitem__(self, index: int) -> MeshNode:
        return list(self.nodes.values())[index]

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> Mesh:
        """Start every node at once; wait until each is ready and sees every peer up."""
        for attempt in range(3):
            self._configure()
            nodes = list(self.nodes.values())
            for node in nodes:
                node.server = self._spawn(node, wait_ready=False)
            try:
                for node in nodes:
                    assert node.server is not None
                    node.server.wait_ready()
                break
            except ServerFailedToStart:
                taken = any(
                    n.server is not None and "cannot listen" in n.server.stderr() for n in nodes
                )
                for node in nodes:
                    assert node.server is not None
                    node.server.kill()
                if not taken or attempt == 2:
                    raise
                # a port chosen as free was taken before a node bound it: new ports
        eventually(self.connected, "every node sees every peer region up")
        return self

    def restart(self, node: MeshNode) -> None:
        """Start ``node`` again on its port (after ``kill``) and wait until it is ready."""
        assert node.server is None or not node.server.alive(), f"{node.name} is running"
        node.server = self._spawn(node, wait_ready=True)

    def _spawn(self, node: MeshNode, *, wait_ready: bool) -> Server:
        return self.factory(
            node.config,
            name=node.name,
            port=node.port,
            env=self.env,
            config_name=f"{node.name}.yaml",
            wait_ready=wait_ready,
        )

    def _configure(self) -> None:
        from bucketmesh.tooling.cluster import free_ports, region_config
        from bucketmesh.tooling.netproxy import NetProxy

        self._close()
        ports = dict(zip(self.layout, free_ports(len(self.layout)), strict=True))
        first: dict[str, str] = {}  # region -> the node its peers send to
        for name, region in self.layout.items():
            first.setdefault(region, name)
        self.proxy = NetProxy() if self.proxied else None
        self.nodes = {}
        for name, region in self.layout.items():
            urls = {}
            for peer_region, target in first.items():
                if peer_region != region:
                    port = ports[target]
                    if self.proxy is not None:
                        route = ("127.0.0.1", ports[target])
                        port = self.proxy.add(name, target, route, self.faults).port
                    urls[peer_region] = f"http://127.0.0.1:{port}"
            region_ports = {r: ports[target] for r, target in first.items()}
            region_ports[region] = ports[name]
            config = region_config(
                region, region_ports, cluster_id=self.cluster_id, buckets="", peer_urls=urls
            )
            config["buckets"] = copy.deepcopy(self.buckets)
            config["sync"].update(interval=self.interval_ms, peerTimeout=self.peer_timeout_ms)
            merge_config(config, self.overrides.get(name, {}))
            self.nodes[name] = MeshNode(name, region, ports[name], config)

    def _close(self) -> None:
        for node in self.nodes.values():
            node.client.close()
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None

    # -- the network ----------------------------------------------------------------

    def cut(self, *names: str) -> list[str]:
        """Cut every link to and from these nodes; the names of the links cut."""
        assert self.proxy is not None, "this mesh has no links to cut (proxied=False)"
        return list(self.proxy.cut(names))

    def heal(self, *names: str) -> None:
        """Restore the links of these nodes (of every node, given none)."""
        assert self.proxy is not None, "this mesh has no links to heal (proxied=False)"
        self.proxy.heal(names or None)

    # -- checks (for ``eventually``) ----------------------------------------------------

    def connected(self) -> None:
        """Every node reaches every peer region."""
        for node in self.nodes.values():
            sync_status = node.status()["sync"]
            assert not sync_status["local_only"], (node.name, sync_status)
            states = {peer: s["state"] for peer, s in sync_status["peers"].items()}
            assert set(states.values()) == {"up"}, (node.name, states)

    def quiescent(self) -> None:
        """Nothing queued or in flight between nodes: every delta collected so far has
        been acknowledged, so merged, by every peer."""
        for node in self.nodes.values():
            for peer_region in {n.region for n in self.nodes.values()} - {node.region}:
                labels = f'peer="{peer_region}"'
                pending = node.metric("bucketmesh_sync_pending_deltas", labels, required=True)
                assert pending == 0, (node.name, peer_region, pending)

    def converged(self, key: str, total: int | None = None) -> dict[str, Any]:
        """The state every node reports for ``key``, once all agree (and Σ used = total)."""
        states = [node.state(key) for node in self.nodes.values()]
        for state in states:  # a replica that never spent here may be listed with 0 or not
            state["replicas"] = {r: e for r, e in state["replicas"].items() if e["used"]}
        views = [(s["tokens_remaining"], s["capacity"], s["replicas"]) for s in states]
        assert all(view == views[0] for view in views), views
        if total is not None:
            used = sum(entry["used"] for entry in states[0]["replicas"].values())
            assert used == total, (used, total)
        return states[0]


def _finish(factory: ServerFactory) -> None:
    problems = factory.close()
    if problems:
        pytest.fail("a bucketmesh server misbehaved:\n" + "\n\n".join(problems), pytrace=False)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start real ``bucketmesh serve`` processes for this test; all stopped at teardown."""
    factory = ServerFactory(tmp_path)
    yield factory
    _finish(factory)


@pytest.fixture(scope="module")
def serve_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Like ``serve``, for servers shared by every test of a module."""
    factory = ServerFactory(tmp_path_factory.mktemp("servers"))
    yield factory
    _finish(factory)


def _servers_of(item: pytest.Item) -> list[Server]:
    found: list[Server] = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, ServerFactory):
            found.extend(value.servers)
        elif isinstance(value, Mesh):
            found.extend(value.factory.servers)
        elif isinstance(value, Server):
            found.append(value)
    return list(dict.fromkeys(found))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for server in _servers_of(item):
            report.sections.append((f"bucketmesh {server.name}", server.describe()))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A real redis-server on a free loopback port (no persistence), killed at teardown."""
    from redis_server import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_server_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Like ``redis_server``, shared by every test of a module (keys of their own)."""
    from redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Any]:
    """A tmpfs of 64 pages mounted for this test (``small_disk.SmallDisk``): fill it and
    the next write that needs a page fails with ENOSPC, for real. Skipped, naming the
    capability, where this process may not mount."""
    from small_disk import MountRefused, SmallDisk

    disk = SmallDisk(tmp_path / "disk")
    try:
        disk.mount()
    except MountRefused as refused:
        pytest.skip(f"needs to mount a tmpfs (root with CAP_SYS_ADMIN): {refused}")
    yield disk
    disk.unmount()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[Any]:
    """A real Redis Cluster: 6 redis-server processes on loopback (3 masters, 3
    replicas, ``redis-cli --cluster create``), all killed at teardown."""
    from redis_cluster import RedisClusterProcesses

    cluster = RedisClusterProcesses(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
