"""A real Redis Cluster on loopback for the redis backend's tests: six ``redis-server``
processes in cluster mode (3 masters, 3 replicas) joined with ``redis-cli --cluster
create``. No persistence; a short ``cluster-node-timeout`` so a killed master's replica
is promoted within a couple of seconds. Every wait is bounded; ``stop()`` kills every
process this module started (by its own Popen handle).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis
from redis_server import redis_server_binary

START_TIMEOUT_S = 60.0
NODE_TIMEOUT_MS = 1000


def _until(ready: Callable[[], bool], failure: str, timeout: float = START_TIMEOUT_S) -> None:
    """Poll ``ready`` (a Redis error counts as not yet) until it answers True; raise
    RuntimeError(``failure``) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.RedisError):
            if ready():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(failure)
        time.sleep(0.02)


def _cli() -> str:
    found = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    if not Path(found).exists():
        raise RuntimeError("redis-cli is not installed (it comes with redis-server)")
    return found


def _free_cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (+10000) is free too, neither of them in
    ``taken`` (the ports and bus ports of the cluster's other nodes: the kernel may hand
    out a port again once the probing socket is closed); both are added to it."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 >= 65536 or port in taken or port + 10000 in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        taken.update((port, port + 10000))
        return port
    raise RuntimeError("no free port pair for a cluster node")


class ClusterNodeProcess:
    def __init__(self, directory: Path, taken: set[int]) -> None:
        self.port = _free_cluster_port(taken)
        self.directory = directory / f"node-{self.port}"
        self.directory.mkdir(parents=True)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self.directory / "nodes.conf"),
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
                "--save",
                "",
                "--appendonly",
                "no",
                # a replica's first full sync starts at once (the default waits 5 s for
                # more replicas), so a test may kill a master soon after the cluster forms
                "--repl-diskless-sync-delay",
                "0",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=10.0
        )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None


class RedisClusterProcesses:
    """Six cluster nodes; ``url`` is the bucketmesh form (redis-cluster://h:p,h:p)."""

    def __init__(self, directory: Path, size: int = 6) -> None:
        taken: set[int] = set()
        self.nodes = [ClusterNodeProcess(directory, taken) for _ in range(size)]
        self.url = "redis-cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        for node in self.nodes:
            _until(
                lambda node=node: bool(node.client().ping()),
                f"cluster node {node.port} not answering",
                max(0.0, deadline - time.monotonic()),
            )
        created = subprocess.run(
            [
                _cli(),
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed: {created.stdout}{created.stderr}"
            )
        self.wait_ok()
        self.wait_replicas_synced()

    def wait_replicas_synced(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until every live replica has finished its sync with its master: a replica
        that never synced holds no data and never stands for election, so a master
        killed before that would have no one to fail over to."""

        def synced() -> bool:
            infos = [n.client().info("replication") for n in self.nodes if n.process is not None]
            return all(
                info.get("role") != "slave" or info.get("master_link_status") == "up"
                for info in infos
            )

        _until(synced, "the cluster's replicas did not finish their first sync", timeout)

    def wait_ok(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until every live node says cluster_state:ok and every slot has a master."""

        def ok() -> bool:
            live = [n for n in self.nodes if n.process is not None]
            return all(n.client().cluster("info")["cluster_state"] == "ok" for n in live)

        _until(ok, "the cluster did not reach cluster_state:ok", timeout)

    def client(self) -> redis.RedisCluster:
        live = next(n for n in self.nodes if n.process is not None)
        return redis.RedisCluster(
            host="127.0.0.1", port=live.port, decode_responses=True, socket_timeout=10.0
        )

    def master_of(self, slot: int) -> ClusterNodeProcess:
        """The node that serves ``slot`` now."""
        live = next(n for n in self.nodes if n.process is not None)
        for start, end, master, *_ in live.client().execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                port = int(master[1])
                return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"slot {slot} has no master")

    def node_id(self, node: ClusterNodeProcess) -> str:
        return str(node.client().execute_command("CLUSTER", "MYID"))

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
