"""Over-admission of a saturated burst, with and without MurmurHash3 key affinity.

Starts a mesh of 3 regions × 3 nodes on the embedded store (nine ``bucketmesh
serve`` processes on loopback, each node a slot ``<region>.<node>`` of the mesh,
docs/scale.md; ``bucketmesh.tooling.cluster.LocalMesh``), optionally with a one-way
delay on every sync link (``--delay-ms``). Each trial takes a fresh key of a bucket
of capacity ``CAPACITY`` refilling ``REFILL``/s and fires a burst at it: every
region sends ``PER_REGION`` decisions at once, as three batches of 40 (so the burst
is denser than the sync interval even on a loaded machine).

* **without affinity** the region's requests are spread over its three nodes
  (round robin, as a plain load balancer would), so nine replicas decide the key;
* **with affinity** they all go to the key's owner on the ring
  (``core/affinity.py``, as ``Client(nodes=...)`` or a ring-hash balancer does),
  so three replicas decide it, one per region.

Over-admission = 200s counted by the clients − (capacity + refill × burst
duration). The contenders alternate trial by trial so that noise hits both alike.
The count, not a timing, is the result; the bound it is held to is docs/scale.md's:
``(replicas − 1) × (capacity + refill × d)``.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/affinity.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import _report
import httpx

from bucketmesh.core.affinity import Ring
from bucketmesh.tooling.cluster import LocalMesh
from bucketmesh.tooling.netproxy import Faults

REGIONS = ("us-east-1", "eu-central-1", "ap-southeast-2")
NODES = ("node-a", "node-b", "node-c")
CAPACITY = 100
REFILL = 1.0  # tokens/s: the burst, not the refill, is what is measured
PER_REGION = 120  # requests per region per burst: more than the whole bucket
BATCHES = 3  # per region, sent at once
READY_TIMEOUT_S = 60.0

BUCKETS_YAML = f"""\
- name: burst
  key: "b-{{{{ .Request.Header.X-Key }}}}"
  capacity: {CAPACITY}
  refillRate: {REFILL}
  ttl: 3600
  mode: shared
"""


@contextlib.contextmanager
def mesh(workdir: Path, delay_ms: float) -> Iterator[dict[str, str]]:
    """Slot → base URL of the 3 × 3 mesh."""
    buckets = workdir / "buckets.yaml"
    buckets.write_text(BUCKETS_YAML)
    slots = [f"{region}.{node}" for region in REGIONS for node in NODES]
    faults = Faults(latency_s=delay_ms / 1000) if delay_ms > 0 else None
    local = LocalMesh(
        slots, directory=str(workdir), buckets=str(buckets), cluster_id="bench", faults=faults
    )
    try:
        if not local.start():
            logs = "\n".join(p.read_text(errors="replace") for p in workdir.glob("*.log"))
            raise SystemExit(f"the mesh did not start:\n{logs}")
        urls = {name: f"http://127.0.0.1:{node.port}" for name, node in local.nodes.items()}
        wait_peers_up(list(urls.values()))
        yield urls
    finally:
        local.stop()


def wait_peers_up(urls: list[str]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            states = [client.get(url + "/v1/status").json()["sync"]["peers"] for url in urls]
            if all(p["state"] == "up" for peers in states for p in peers.values()):
                return
            time.sleep(0.1)
    raise SystemExit("peers not all up after start")


async def burst(urls: dict[str, str], key: str, affinity: bool) -> tuple[int, float]:
    """(admitted, seconds from the first request sent to the last answer).

    Each region sends ``BATCHES`` batches of ``PER_REGION / BATCHES`` decisions of
    the key at once (``POST /v1/rate/batch``, not atomic): a burst denser than the
    sync interval, whichever machine runs it. Without affinity batch ``i`` goes to
    the region's node ``i``; with affinity every batch goes to the key's owner."""
    owner = Ring(NODES).owner(key)
    size = PER_REGION // BATCHES
    targets = [
        urls[f"{region}.{owner if affinity else NODES[i % len(NODES)]}"]
        for region in REGIONS
        for i in range(BATCHES)
    ]
    body = {"requests": [{"key": f"b-{key}", "rule": "burst"}] * size}
    async with httpx.AsyncClient(timeout=30.0) as client:
        # warm the connections so the burst measures decisions, not handshakes
        await asyncio.gather(*(client.get(url + "/healthz") for url in set(targets)))
        started = time.monotonic()
        responses = await asyncio.gather(
            *(client.post(url + "/v1/rate/batch", json=body) for url in targets)
        )
        seconds = time.monotonic() - started
    for response in responses:
        assert response.status_code == 200, response.text
    return sum(int(r.json()["allowed"]) for r in responses), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials (4 per contender)")
    parser.add_argument("--trials", type=int, help="trials per contender (default 10)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way sync link delay")
    parser.add_argument("--no-record", action="store_true", help="do not append BENCHMARKS.md")
    args = parser.parse_args(argv)
    trials = args.trials or (4 if args.quick else 10)
    machine = _report.machine()
    print(f"machine: {machine.describe()}", flush=True)
    results: dict[bool, list[tuple[int, float]]] = {False: [], True: []}
    with (
        tempfile.TemporaryDirectory(prefix="bucketmesh-affinity-") as tmp,
        mesh(Path(tmp), args.delay_ms) as urls,
    ):
        for trial in range(trials):
            for affinity in (False, True) if trial % 2 == 0 else (True, False):
                key = f"t{trial}-{'on' if affinity else 'off'}"
                results[affinity].append(asyncio.run(burst(urls, key, affinity)))
    columns = [
        "contender",
        "replicas deciding",
        "trials",
        "admitted median",
        "over-admission median",
        "over-admission max",
        "burst s median",
    ]
    rows = []
    for affinity in (False, True):
        found = results[affinity]
        over = [a - (CAPACITY + REFILL * s) for a, s in found]
        rows.append(
            [
                "with affinity (key → its owner)" if affinity else "without (round robin)",
                str(len(REGIONS) * (1 if affinity else len(NODES))),
                str(len(found)),
                f"{statistics.median(a for a, _ in found):.0f}",
                f"{statistics.median(over):+.1f}",
                f"{max(over):+.1f}",
                f"{statistics.median(s for _, s in found):.2f}",
            ]
        )
    title = "Over-admission of a saturated burst, 3 regions × 3 nodes"
    _report.print_table(title, columns, rows)
    if not args.no_record:
        command = " ".join(
            ["benchmarks/affinity.py", *(argv if argv is not None else sys.argv[1:])]
        )
        body = "\n".join(
            [
                f"Command: `{command}` — 9 `bucketmesh serve` processes on loopback (3 regions "
                f"× 3 nodes, each node a slot), sync interval 20 ms, one-way link delay "
                f"{args.delay_ms:g} ms; bucket capacity {CAPACITY}, refill {REFILL:g}/s; each "
                f"burst {PER_REGION} decisions per region at once as {BATCHES} batches "
                "(`POST /v1/rate/batch`), a fresh key per burst, contenders alternating. "
                "Over-admission = admitted − (capacity + refill × burst duration).",
                "",
                _report.markdown_table(columns, rows),
            ]
        )
        _report.append_section(title, body, machine=machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
