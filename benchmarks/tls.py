"""TLS cost on P2: ``bucketmesh serve`` requests/s over plain HTTP and over TLS, same run.

Method
    Two nodes from the same config (one rule that admits everything), one of them with
    ``tls.certFile``/``tls.keyFile`` (a CA and a certificate made by ``trustme`` for this
    run; ``clientAuth: none``). ``wrk`` (1 thread, 50 keep-alive connections, GET
    /v1/rate with ``X-API-Key``, ``--latency``) drives them in alternating rounds (the
    order flips every round) so that noise on the shared box hits both alike; median
    requests/s and p99 per contender, and the TLS/plain ratio. Keep-alive connections:
    the handshake happens once per connection, so this is the record-layer cost.

    Not measured here (left for a later run): replication lag over ``https://`` peer URLs.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/tls.py [--quick] [--append]`` (needs wrk).
"""

from __future__ import annotations

import argparse
import http.client
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _report
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 3 s instead of 5 of 5 s")
    parser.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args(argv)
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
            + "\n\nReplication lag over `https://` peer URLs: not measured in this run.\n\n"
            + "Command: `PYTHONPATH=src .venv/bin/python benchmarks/tls.py"
            + (" --quick" if args.quick else "")
            + " --append`\n"
        )
        _report.append_section(title, body, machine=_report.machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
