"""TLS cost on P2: ``bucketmesh serve`` requests/s over plain HTTP and over TLS, same run.

Method
    Two nodes from the same config (one rule that admits everything), one of them with
    ``tls.certFile``/``tls.keyFile`` (a CA and a certificate made by ``trustme`` for this
    run; ``clientAuth: none``). ``wrk`` (1 thread, 50 keep-alive connections, GET
    /v1/rate with ``X-API-Key``, ``--latency``) drives them in alternating rounds (the
    order flips every round) so that noise on the shared box hits both alike; median
    requests/s and p99 per contender, and the TLS/plain ratio. Keep-alive connections:
    the handshake happens once per connection, so this is the record-layer cost.

TLS cost on replication lag (issue 20)
    Three regions on loopback, three times over: plain ``http://`` peer URLs, TLS
    (``https://``, the peers' certificates verified against the CA, ``clientAuth: none``)
    and mTLS (``clientAuth: sync``, ``pinRegions``: a region's sync client presents its
    own certificate, which must name it). Default sync interval (20 ms), one generated
    secret (HMAC stays on in all three). All nine nodes run at once and the samples
    alternate between the three meshes, so noise hits them alike. A sample: one grant on
    a fresh key in region *i*, then region *i+1* read back to back over one keep-alive
    connection (https for TLS and mTLS) until it shows the grant; lag = first read that
    shows it − the grant's answer (what P4 calls the visibility lag). Also each mesh's
    own figure: the p99 of the last deltas each node received from each peer
    (``/v1/status`` ``lag_ms_p99``: receive time − the sender's collect time), the median
    and the worst of the six links. Connections between regions are kept alive, so this
    is the record layer's cost plus the occasional handshake.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/tls.py [--quick] [--append]
[--part p2|lag|both]`` (P2 needs wrk).
"""

from __future__ import annotations

import argparse
import http.client
import re
import secrets
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _report
import httpx
import trustme
import yaml

HOST = "127.0.0.1"
RULE = {
    "name": "bench",
    "key": "agent-api-key-{{ .Request.Header.X-API-Key }}",
    "capacity": 10**12,
    "refillRate": 10**9,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start(
    workdir: Path, name: str, tls: dict[str, str] | None
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config: dict[str, object] = {
        "region": "bench",
        "node": name,
        "sync": {"enabled": False},
        "storage": {"backend": "memory"},
        "buckets": [RULE],
    }
    if tls:
        config["tls"] = tls
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "bucketmesh", "serve", "--config", str(path)]
    process = subprocess.Popen(
        [*argv, "--listen", f"{HOST}:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    context = ssl.create_default_context(cafile=tls["caFile"]) if tls else None
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = (
                http.client.HTTPSConnection(HOST, port, timeout=1, context=context)
                if context
                else http.client.HTTPConnection(HOST, port, timeout=1)
            )
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start")
        time.sleep(0.05)
    scheme = "https" if tls else "http"
    return process, f"{scheme}://{HOST}:{port}/v1/rate"


def wrk(url: str, seconds: float) -> tuple[float, float]:
    """requests/s and p99 (ms) of one wrk round."""
    out = subprocess.run(
        ["wrk", "-t1", "-c50", f"-d{seconds:g}s", "--latency", "-H", "X-API-Key: bench", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    p99 = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return rate, p99


# -- replication lag: plain, TLS, mTLS ---------------------------------------------------

REGIONS = ("us-east-1", "eu-central-1", "ap-southeast-2")
LAG_RULE = {
    "name": "shared",
    "key": "k-{{ .Request.Header.X-Key }}",
    "capacity": 10**6,
    "refillRate": 1000,
    "ttl": 3600,
    "mode": "shared",
}
LAG_MODES = ("plain", "TLS", "mTLS")


class LagMesh:
    """Three regions syncing over plain HTTP, TLS or mTLS."""

    def __init__(self, workdir: Path, mode: str, ca: trustme.CA, ca_file: Path) -> None:
        self.mode = mode
        ports = {region: free_port() for region in REGIONS}
        scheme = "http" if mode == "plain" else "https"
        self.urls = {r: f"{scheme}://{HOST}:{p}" for r, p in ports.items()}
        self.processes: list[subprocess.Popen[bytes]] = []
        self.context = ssl.create_default_context(cafile=str(ca_file)) if mode != "plain" else None
        secret = secrets.token_urlsafe(32)
        for region in REGIONS:
            config: dict[str, object] = {
                "region": region,
                "node": "n1",
                "listen": f"{HOST}:{ports[region]}",
                "sync": {
                    "enabled": True,
                    "syncClusterId": f"tls-bench-{mode}",
                    "peers": list(REGIONS),
                    "peerUrls": {r: u for r, u in self.urls.items() if r != region},
                    "secret": secret,
                },
                "storage": {"backend": "memory"},
                "buckets": [LAG_RULE],
            }
            if mode != "plain":
                leaf = ca.issue_cert(region, HOST, "localhost", common_name=region)
                chain = workdir / f"{mode}-{region}.pem"
                key = workdir / f"{mode}-{region}-key.pem"
                chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
                key.write_bytes(leaf.private_key_pem.bytes())
                config["tls"] = {
                    "certFile": str(chain),
                    "keyFile": str(key),
                    "caFile": str(ca_file),
                    "clientAuth": "none" if mode == "TLS" else "sync",
                    "pinRegions": mode == "mTLS",
                }
            path = workdir / f"{mode}-{region}.yaml"
            path.write_text(yaml.safe_dump(config))
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bucketmesh", "serve", "--config", str(path)],
                    stdout=subprocess.DEVNULL,
                    stderr=(workdir / f"{mode}-{region}.log").open("wb"),
                )
            )
        verify: ssl.SSLContext | bool = self.context if self.context is not None else False
        self.clients = {
            r: httpx.Client(base_url=u, verify=verify, timeout=5) for r, u in self.urls.items()
        }

    def wait_up(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                peers = [c.get("/v1/status").json()["sync"]["peers"] for c in self.clients.values()]
                if all(p["state"] == "up" for each in peers for p in each.values()):
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            if any(p.poll() is not None for p in self.processes):
                break
            time.sleep(0.1)
        raise SystemExit(f"tls bench: the {self.mode} mesh did not come up")

    def visibility_lag(self, i: int) -> float:
        """Seconds from a grant's answer in one region until the next region shows it."""
        source, target = REGIONS[i % 3], REGIONS[(i + 1) % 3]
        key = f"lag-{secrets.token_hex(6)}"
        granted = self.clients[source].post("/v1/rate", headers={"X-Key": key}, json={"tokens": 1})
        answered = time.perf_counter()
        if granted.status_code != 200:
            raise SystemExit(f"tls bench: a grant failed: {granted.text}")
        reader = self.clients[target]
        while True:
            reply = reader.get("/v1/bucket/state", params={"key": f"k-{key}"})
            if reply.status_code == 200 and any(
                name.startswith(source + "/") and entry["used"] >= 1
                for name, entry in reply.json()["replicas"].items()
            ):
                return time.perf_counter() - answered
            if time.perf_counter() - answered > 5.0:
                raise SystemExit(f"tls bench: a grant on k-{key} never reached {target}")

    def node_p99s(self) -> list[float]:
        """Every node's p99 lag of the deltas it received from each peer (ms)."""
        found = []
        for client in self.clients.values():
            for peer in client.get("/v1/status").json()["sync"]["peers"].values():
                if peer["lag_ms_p99"] is not None:
                    found.append(float(peer["lag_ms_p99"]))
        return found

    def stop(self) -> None:
        for client in self.clients.values():
            client.close()
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def lag_table(workdir: Path, samples: int) -> tuple[list[str], list[list[str]]]:
    ca = trustme.CA()
    ca_file = workdir / "lag-ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    meshes = [LagMesh(workdir, mode, ca, ca_file) for mode in LAG_MODES]
    lags: dict[str, list[float]] = {mode: [] for mode in LAG_MODES}
    try:
        for mesh in meshes:
            mesh.wait_up()
        for mesh in meshes:  # warm-up: every link carries a delta once
            for i in range(6):
                mesh.visibility_lag(i)
        for i in range(samples):
            order = meshes if i % 2 == 0 else list(reversed(meshes))
            for mesh in order:
                lags[mesh.mode].append(mesh.visibility_lag(i))
            time.sleep(0.005)
        nodes = {mesh.mode: mesh.node_p99s() for mesh in meshes}
    finally:
        for mesh in meshes:
            mesh.stop()
    columns = ["peer URLs", "samples", "visibility p50 ms", "visibility p99 ms",
               "p99 vs plain", "nodes' p99 ms (median / worst link)"]  # fmt: skip
    base = quantile(lags["plain"], 0.99)
    cells = []
    for mode in LAG_MODES:
        values, own = lags[mode], nodes[mode]
        own_text = f"{statistics.median(own):.1f} / {max(own):.1f}" if own else "—"
        p99 = quantile(values, 0.99)
        cells.append([
            {"plain": "http", "TLS": "https (TLS)", "mTLS": "https (mTLS, pinned)"}[mode],
            f"{len(values)}", f"{1000 * statistics.median(values):.1f}", f"{1000 * p99:.1f}",
            f"{p99 / base:.2f}×", own_text,
        ])  # fmt: skip
    return columns, cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 3 s instead of 5 of 5 s")
    parser.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    parser.add_argument("--part", choices=("p2", "lag", "both"), default="both")
    args = parser.parse_args(argv)
    if args.part in ("lag", "both"):
        samples = 60 if args.quick else 300
        with tempfile.TemporaryDirectory(prefix="bucketmesh-tls-lag-") as tmp:
            columns, cells = lag_table(Path(tmp), samples)
        title = "TLS cost on replication lag: 3 regions on loopback, plain vs TLS vs mTLS"
        _report.print_table(title, columns, cells)
        if args.append:
            body = (
                "Three meshes of three regions at once (default 20 ms sync interval, HMAC on "
                "in all), samples alternating between them; visibility lag = a grant's "
                "answer in one region until the next region's `/v1/bucket/state` shows it, "
                "read back to back over one keep-alive connection (https for TLS and mTLS). "
                "Nodes' p99: `/v1/status` `lag_ms_p99` of each of the six links (receive − "
                "the sender's collect time).\n\n"
                + _report.markdown_table(columns, cells)
                + "\n\nCommand: `PYTHONPATH=src .venv/bin/python benchmarks/tls.py --part lag"
                + (" --quick" if args.quick else "")
                + " --append`\n"
            )
            _report.append_section(title, body, machine=_report.machine())
        if args.part == "lag":
            return 0
    rounds, seconds = (3, 3.0) if args.quick else (5, 5.0)
    processes: list[subprocess.Popen[bytes]] = []
    results: dict[str, list[tuple[float, float]]] = {"plain": [], "TLS": []}
    try:
        with tempfile.TemporaryDirectory(prefix="bucketmesh-tls-") as tmp:
            workdir = Path(tmp)
            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1", "localhost")
            ca.cert_pem.write_to_path(str(workdir / "ca.crt"))
            cert.private_key_pem.write_to_path(str(workdir / "tls.key"))
            cert.cert_chain_pems[0].write_to_path(str(workdir / "tls.crt"))
            tls = {
                "certFile": str(workdir / "tls.crt"),
                "keyFile": str(workdir / "tls.key"),
                "caFile": str(workdir / "ca.crt"),
                "clientAuth": "none",
            }
            plain, plain_url = start(workdir, "plain", None)
            processes.append(plain)
            secure, tls_url = start(workdir, "tls", tls)
            processes.append(secure)
            urls = {"plain": plain_url, "TLS": tls_url}
            for url in urls.values():
                wrk(url, 1.0)  # warm-up
            for i in range(rounds):
                order = list(urls) if i % 2 == 0 else list(reversed(urls))
                for name in order:
                    results[name].append(wrk(urls[name], seconds))
    finally:
        for process in processes:
            process.terminate()
            process.wait(15)
    median = {n: statistics.median(r for r, _ in rs) for n, rs in results.items()}
    p99 = {n: statistics.median(p for _, p in rs) for n, rs in results.items()}
    columns = ["listener", "median req/s", "best req/s", "median p99 ms", "vs plain"]
    cells = [
        [
            name,
            f"{median[name]:,.0f}",
            f"{max(r for r, _ in results[name]):,.0f}",
            f"{p99[name]:.2f}",
            f"{median[name] / median['plain']:.2f}×",
        ]
        for name in results
    ]
    title = f"TLS cost on P2: plain vs TLS, wrk 1 thread 50 connections, {rounds}×{seconds:g} s"
    _report.print_table(title, columns, cells)
    if args.append:
        body = (
            "GET /v1/rate, keep-alive (one handshake per connection), alternating rounds; "
            "a trustme CA and certificate made for the run.\n\n"
            + _report.markdown_table(columns, cells)
            + "\n\nCommand: `PYTHONPATH=src .venv/bin/python benchmarks/tls.py --part p2"
            + (" --quick" if args.quick else "")
            + " --append`\n"
        )
        _report.append_section(title, body, machine=_report.machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
