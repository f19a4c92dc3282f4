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
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

DEFAULT_REGIONS = ("us-east-1", "eu-central-1", "ap-southeast-2")
DEFAULT_BASE_PORT = 8081
DEFAULT_CLUSTER_ID = "bucketmesh-local"
EXAMPLE_BUCKETS = Path(__file__).resolve().parents[2] / "examples" / "buckets.yaml"
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
    region: str, ports: dict[str, int], *, cluster_id: str, buckets: str
) -> dict[str, Any]:
    """The bucketmesh.yaml of one region of a loopback mesh."""
    return {
        "region": region,
        "node": "node-a",
        "listen": f"127.0.0.1:{ports[region]}",
        "sync": {
            "enabled": True,
            "syncClusterId": cluster_id,
            "peers": list(ports),
            "peerUrls": {r: f"http://127.0.0.1:{p}" for r, p in ports.items() if r != region},
            "secret": "${BUCKETMESH_SYNC_SECRET}",
        },
        "storage": {"backend": "memory"},
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


def up(
    regions: Sequence[str] = DEFAULT_REGIONS,
    *,
    base_port: int = DEFAULT_BASE_PORT,
    buckets: str | None = None,
    cluster_id: str = DEFAULT_CLUSTER_ID,
    out: IO[str] = sys.stdout,
) -> int:
    """Run the mesh until interrupted; returns the exit status."""
    if len(set(regions)) != len(regions) or not regions:
        print("bucketmesh cluster: --regions must name distinct regions", file=sys.stderr)
        return 2
    buckets_file = Path(buckets) if buckets else EXAMPLE_BUCKETS
    if not buckets_file.is_file():
        print(
            f"bucketmesh cluster: no buckets file at {buckets_file}; give --buckets FILE",
            file=sys.stderr,
        )
        return 2
    ports = {region: base_port + i for i, region in enumerate(regions)}
    stopping = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stopping.set())
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    env = {
        **os.environ,
        "BUCKETMESH_SYNC_SECRET": secrets.token_urlsafe(32),
        "PYTHONUNBUFFERED": "1",
    }
    nodes: list[RegionNode] = []
    with tempfile.TemporaryDirectory(prefix="bucketmesh-cluster-") as directory:
        try:
            for region in regions:
                path = Path(directory) / f"{region}.yaml"
                config = region_config(
                    region, ports, cluster_id=cluster_id, buckets=str(buckets_file.resolve())
                )
                path.write_text(yaml.safe_dump(config, sort_keys=False))
                node = RegionNode(region, ports[region], path)
                node.process = subprocess.Popen(
                    [sys.executable, "-m", "bucketmesh.cli", "serve", "--config", str(path)],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches us; we stop the nodes in order
                )
                assert node.process.stdout is not None
                threading.Thread(
                    target=_relay, args=(node.process.stdout, region, out), daemon=True
                ).start()
                nodes.append(node)
            if not _wait_ready(nodes, stopping):
                return 0 if stopping.is_set() else 1
            out.write(
                f"\nbucketmesh cluster: one mesh of {len(nodes)} regions, "
                f"cluster id {cluster_id!r}\n"
            )
            for node in nodes:
                out.write(f"  {node.region:<16} {node.url}\n")
            out.write("\n" + burst_example(nodes))
            out.flush()
            while not stopping.wait(0.2):
                dead = [n for n in nodes if n.process is not None and n.process.poll() is not None]
                if dead:
                    print(
                        f"bucketmesh cluster: {dead[0].region} exited "
                        f"({dead[0].process.returncode if dead[0].process else '?'}); "
                        "stopping the others",
                        file=sys.stderr,
                    )
                    return 1
            return 0
        finally:
            _stop(nodes)
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
