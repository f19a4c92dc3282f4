"""How the processes end (issue 22, items 5 and 6): real processes, real signals.

- ``bucketmesh serve`` treats SIGHUP as a graceful stop (as SIGTERM): the final
  snapshot holds every grant, and the process exits 0 (it used to die at once,
  status 129, with no snapshot).
- A node started with ``--lifeline-fd`` stops gracefully when the supervisor's end
  of that pipe closes.
- ``bucketmesh cluster up`` killed with SIGKILL takes its whole mesh with it: the
  ``serve`` children, the proxy process and the janitor end, their ports are free,
  and the temporary directory is gone (it used to leave three nodes listening and
  the next ``make run`` failed with "port taken"). SIGHUP stops it gracefully.

Nothing waits for a duration: each check polls (``eventually``) for an event, a
line of output, a process gone, a port free.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ServerFactory, eventually, make_config

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc"
)

# -- the process tree, from /proc --------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet has exited too)."""
    fields = _stat(pid)
    return fields is None or fields[0] in ("Z", "X")


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        parents, frontier = frontier, set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) in parents and not gone(int(entry.name)):
                frontier.add(int(entry.name))
        found |= frontier
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}


def port_free(port: int) -> bool:
    """Nothing listens on the port, and a new server could bind it."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


# -- SIGHUP ------------------------------------------------------------------------------


def test_sighup_stops_serve_gracefully_and_the_snapshot_keeps_the_grants(
    serve: ServerFactory, tmp_path: Path
) -> None:
    """Before: SIGHUP's default action killed the node at once (status 129 from a
    shell, -1 here) and no snapshot was written."""
    snapshot = tmp_path / "state" / "node.snap"
    # no periodic snapshot during the test: only the shutdown can write one
    storage = {"backend": "memory", "snapshot": str(snapshot), "snapshotInterval": 3_600_000}
    config = make_config(storage=storage)
    server = serve(config)
    with server.client() as client:
        for _ in range(3):  # the "slow" rule: 5 tokens, one back every 100 s
            assert client.post("/v1/rate", headers={"X-User": "hup"}).status_code == 200
    server.send_signal(signal.SIGHUP)
    assert server.wait() == 0, server.describe()
    assert "SIGHUP: stopping gracefully" in server.stderr()
    assert "does not reload" in server.stderr()
    assert snapshot.is_file(), "no final snapshot"

    # The final snapshot alone must hold the grants: drop the log segments beside it
    # (after a graceful stop they hold nothing the snapshot lacks).
    for segment in snapshot.parent.glob(snapshot.name + ".wal.*"):
        segment.unlink()
    again = serve(config)
    with again.client() as client:
        state = client.get("/v1/bucket/state", params={"key": "slow-hup"}).json()
    assert sum(entry["used"] for entry in state["replicas"].values()) == 3, state


def test_serve_help_documents_the_signals() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bucketmesh", "serve", "--help"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "SIGHUP" in text and "does not reload the configuration" in text


# -- the lifeline ----------------------------------------------------------------------------


def test_serve_stops_gracefully_when_its_lifeline_closes(tmp_path: Path) -> None:
    snapshot = tmp_path / "node.snap"
    config = tmp_path / "node.yaml"
    config.write_text(
        "region: us-east-1\nlisten: 127.0.0.1:0\n"
        f"storage: {{backend: memory, snapshot: {snapshot}, snapshotInterval: 3600000}}\n"
        "buckets: [{key: 'k-{{ .Request.Header.X-K }}', capacity: 5, refillRate: 0.01}]\n"
    )
    read_end, write_end = os.pipe()
    output = tmp_path / "node.out"
    with open(output, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                *("-m", "bucketmesh", "serve", "--config", str(config)),
                *("--lifeline-fd", str(read_end)),
            ],
            pass_fds=(read_end,),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
    os.close(read_end)
    try:

        def listening() -> int:
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", output.read_text())
            assert match, output.read_text()
            return int(match.group(1))

        port = eventually(listening, "the node says where it listens")
        response = httpx.post(f"http://127.0.0.1:{port}/v1/rate", headers={"X-K": "a"})
        assert response.status_code == 200
        os.close(write_end)  # the supervisor is gone
        write_end = -1
        assert process.wait(60) == 0, output.read_text()
        assert "lifeline closed" in output.read_text()
        assert snapshot.is_file(), "no final snapshot"
    finally:
        if write_end >= 0:
            os.close(write_end)
        if process.poll() is None:
            process.kill()
            process.wait()


# -- cluster up -------------------------------------------------------------------------


class Cluster:
    """A real ``bucketmesh cluster up`` process with its own TMPDIR."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.tmpdir = tmp_path / "tmp"
        self.tmpdir.mkdir()
        self.output = tmp_path / "cluster.out"
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bucketmesh", "cluster", "up", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=clean_env(TMPDIR=str(self.tmpdir)),
            )
        self.family: set[int] = set()

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_ready(self) -> None:
        def banner() -> None:
            assert "uniq -c" in self.text(), self.text()

        eventually(banner, "cluster up prints its banner once every node is ready")

    def ports(self) -> set[int]:
        banner = self.text().split("bucketmesh cluster: one mesh of", 1)[1]
        return {int(port) for port in re.findall(r"127\.0\.0\.1:(\d+)", banner)}

    def nodes(self) -> list[int]:
        return [pid for pid in self.family if "bucketmesh serve" in command_line(pid)]

    def directories(self) -> list[Path]:
        return list(self.tmpdir.iterdir())

    def close(self) -> None:
        """Kill (by pid) whatever this cluster left running, so a failing test leaks nothing."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in self.family:
            if not gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[list[Cluster]]:
    clusters: list[Cluster] = []
    yield clusters
    for cluster in clusters:
        cluster.close()


def start_cluster(clusters: list[Cluster], tmp_path: Path, *args: str) -> Cluster:
    cluster = Cluster(tmp_path, *args)
    clusters.append(cluster)
    cluster.wait_ready()
    cluster.family = descendants(cluster.process.pid)
    return cluster


def test_kill_9_of_cluster_up_takes_the_nodes_proxy_and_directory_with_it(
    cluster_factory: list[Cluster], tmp_path: Path
) -> None:
    """Before: the three ``serve`` children kept running and listening, and the
    temporary directory stayed, after the owner was killed with SIGKILL."""
    cluster = start_cluster(cluster_factory, tmp_path, "--base-port", "0", "--latency-ms", "1")
    nodes = cluster.nodes()
    assert len(nodes) == 3, [command_line(pid) for pid in cluster.family]
    ports = cluster.ports()
    assert len(ports) >= 3 + 6, cluster.text()  # three nodes, a proxy link per ordered pair
    secret = environment(nodes[0])["BUCKETMESH_SYNC_SECRET"].encode()
    assert len(cluster.directories()) == 1, cluster.directories()

    cluster.process.kill()
    cluster.process.wait()

    def all_gone() -> None:
        alive = [f"{pid}: {command_line(pid)}" for pid in cluster.family if not gone(pid)]
        assert not alive, alive

    eventually(all_gone, "every process the cluster started ends with it")

    def ports_free() -> None:
        taken = sorted(port for port in ports if not port_free(port))
        assert not taken, taken

    eventually(ports_free, "every port of the mesh is free again")

    def directory_removed() -> None:
        assert cluster.directories() == [], cluster.directories()

    eventually(directory_removed, "the mesh's temporary directory is removed")
    for path in cluster.tmpdir.rglob("*"):  # nothing anywhere holds the secret
        assert not path.is_file() or secret not in path.read_bytes(), path


def test_sighup_stops_cluster_up_gracefully(cluster_factory: list[Cluster], tmp_path: Path) -> None:
    """Before: a hang-up (the terminal closing) killed the owner at once."""
    cluster = start_cluster(cluster_factory, tmp_path, "--base-port", "0")
    ports = cluster.ports()
    cluster.process.send_signal(signal.SIGHUP)
    assert cluster.process.wait(60) == 0, cluster.text()
    # cluster up waits for its nodes, its proxy and its janitor before it returns
    nodes = [pid for pid in cluster.family if "multiprocessing" not in command_line(pid)]
    alive = [command_line(pid) for pid in nodes if not gone(pid)]
    assert not alive, alive
    assert all(port_free(port) for port in ports)
    assert cluster.directories() == []
    assert "Traceback" not in cluster.text()
