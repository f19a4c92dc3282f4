"""R6: one ``bucketmesh serve`` flooded at 1×, 2× and 3× its capacity by an open-loop C client,
with sync and admin traffic served meanwhile.

Target R6 (docs/targets.md): under 3× the request rate the node can serve it sheds early
with 503 + Retry-After; the p99 of the requests it does serve stays bounded; memory stays
under the configured cap with 1,000,000 distinct keys arriving; the process lives; sync and
admin traffic keep a reserved share.

Method
    The client is ``benchmarks/openloop.c`` (built here with gcc): one epoll thread, 256
    keep-alive connections, constant rate (request *n* is due at t0 + n / rate whatever the
    server does, and written when due: ``-P 0``, pipelined without limit, so the node sees
    the offered rate as it would from that many more clients; with one request in flight
    per connection, wrk2's way, the queue would sit in the client and the node could never
    tell it is overloaded); latency counted from the due time. ``GET /v1/rate`` with a
    distinct ``X-API-Key`` per request (every request creates a bucket, the costliest
    decision). A few µs of client CPU per request, so the node, not the client, saturates
    (the Python client of ``benchmarks/overload.py`` could not).

    Two regions on loopback, ``east`` (flooded) and ``west``, syncing (20 ms interval, a
    generated secret): every bucket the flood creates on ``east`` is replicated to ``west``,
    and a prober grants on ``west`` 4 times a second, replicated to ``east``. The prober also
    PATCHes a rule on ``east`` with the admin token and reads ``east``'s ``/v1/status`` 4
    times a second. ``east`` has a reserved listener (``adminListen``): ``west`` sends its
    sync there and the prober its PATCHes and status reads, while the flood goes to the
    main listener (``--no-admin-listen``: everything on the flooded port, as before). A
    fresh pair per row.

    The client reads its answers with one ``memmove`` per read (it used to move the rest of
    its 64 KiB buffer after every answer: once behind, it read full buffers, fell further
    behind, and the queue it measured was its own: 35 MB of answers in its receive queues
    and 220 MB in the node's send queues at 165,000/s on a loaded box). It writes the
    requests that became due in one pass of its loop with one send per connection at the
    end of the pass, and asks epoll for writability only when that changes (it sent
    each request on its own and switched EPOLLOUT off after each: two system calls per
    request, 87 % of its CPU in the kernel, and at 3x the answers it could not read in
    time piled up in the node's send queues, ~1 MB per connection, until requests
    waited past the 10 s timeout).

    1. Capacity, measured in this run: ``east`` with shedding off is offered far more than
       it can serve (``--probe`` requests/s) for a few seconds; capacity = answers / time
       to the last answer.
    2. Rows: shedding on (the defaults: ``limits.shedLag`` 50 ms, ``maxInFlight`` 4096) at
       1×, 2×, 3× the capacity, shedding off at 3× for contrast, and shedding on with
       ``shedLag`` at ``--low-lag`` (25 ms) at 2× and 3× (a shorter serving share per
       turn of the loop: a lower p99 of served). The 3× shedding-on row
       runs until 1,000,000 distinct keys have arrived (``limits.maxBuckets`` at its
       default, 1,000,000: the configured cap). Per row: offered and served (200/429) per
       second, shed (503 from shedding, from the node's counters: lag, in-flight cap, and
       turns yielded to the sync sender), refused at the bucket
       cap, p99 of served and of shed (from the due time), peak RSS (VmHWM), live buckets,
       the node's CPU and the client's over the row, errors (another status, a reset, a
       timeout of 10 s, an answer never received), alive; and the reserved traffic:
       PATCHes answered 200 of those sent and their worst latency, sync messages
       ``east`` sent to ``west`` and failed sends, and the replication lag p99 each way
       (the nodes' own ``/v1/status`` windows, worst seen during the row).

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/r6.py [--quick] [--append]`` (needs gcc).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import _report
import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

HOST = "127.0.0.1"
HERE = Path(__file__).resolve().parent
RULE = {
    "name": "flood",
    "key": "agent-api-key-{{ .Request.Header.X-API-Key }}",
    "capacity": 10**9,
    "refillRate": 10**6,
    "ttl": 3600,
}
PROBE_RULE = {"name": "probe", "key": "probe-{{ .Request.Header.X-Probe }}", "capacity": 10**9,
              "refillRate": 10**6}  # fmt: skip
NEVER_MS = 3_600_000
CONNECTIONS = 256
TIMEOUT_S = 10.0
ADMIN_TOKEN = "r6-admin-" + secrets.token_hex(8)
MILLION = 1_000_000
SETTLE_S = 120.0  # how long the script waits for the flooded node to answer after a flood
#: ``--stalls DIR``: every node runs with the loop-stall detector (benchmarks/stallwatch)
#: writing DIR/<region>-<port>.jsonl, and its log is copied there at its stop
STALLS: dict[str, Path | None] = {"dir": None}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def build_client(workdir: Path) -> Path:
    """Compile openloop.c; a clear message when there is no C compiler."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise SystemExit("r6: needs gcc to build benchmarks/openloop.c (apt-get install gcc)")
    binary = workdir / "openloop"
    subprocess.run(
        [compiler, "-O2", "-Wall", "-o", str(binary), str(HERE / "openloop.c")], check=True
    )
    return binary


class Node:
    def __init__(self, workdir: Path, region: str, port: int, peers: dict[str, int],
                 limits: dict[str, int], secret: str,
                 admin_port: int | None = None,
                 storage: dict[str, object] | None = None) -> None:  # fmt: skip
        self.region = region
        self.port = port
        self.admin_port = admin_port if admin_port is not None else port
        config: dict[str, object] = {
            "region": region,
            "node": "n1",
            "listen": f"{HOST}:{port}",
            "sync": {
                "enabled": True,
                "syncClusterId": "r6",
                "peers": [region, *peers],
                "peerUrls": {r: f"http://{HOST}:{p}" for r, p in peers.items()},
                "secret": secret,
            },
            "storage": storage or {"backend": "memory"},
            "admin": {"token": ADMIN_TOKEN},
            "buckets": [RULE, PROBE_RULE],
            "limits": limits,
        }
        if admin_port is not None:
            config["adminListen"] = f"{HOST}:{admin_port}"
        path = workdir / f"{region}-{port}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{region}-{port}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        env = None
        stalls = STALLS["dir"]
        if stalls is not None:
            env = dict(os.environ)
            paths = [str(HERE / "stallwatch"), env.get("PYTHONPATH", "")]
            env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
            env["BUCKETMESH_STALLWATCH"] = str(stalls / f"{region}-{port}.jsonl")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bucketmesh", "serve", "--config", str(path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
        )

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def pulled_its_peer(self) -> bool:
        """Whether this node has pulled its peer's state. A node started before its peer
        (``east`` here) pulls no one at start and then, without a snapshot, pulls every
        peer's full state every 2 s until it has (``share-pull``: strict rights wait for
        it); a flood started before that pull lands runs into it: a full-state merge on
        the flooded loop, a stall of seconds on a loaded box."""
        self.log.flush()
        text = self.log_path.read_text(errors="replace")
        return any(
            "start-up state pulled from" in line and "from no peer" not in line
            for line in text.splitlines()
        )

    @property
    def admin_url(self) -> str:
        """The reserved listener (``adminListen``), or the main one without it."""
        return f"http://{HOST}:{self.admin_port}"

    def status(self, client: httpx.Client) -> dict[str, object]:
        return client.get(self.url + "/v1/status").json()  # type: ignore[no-any-return]

    def metrics(self, client: httpx.Client) -> dict[str, float]:
        """Every sample of /metrics by name and labels (``name{k=v}``)."""
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(client.get(self.url + "/metrics").text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        stalls = STALLS["dir"]
        if stalls is not None:
            shutil.copy(self.log_path, stalls / self.log_path.name)


class Pair:
    """``east`` (flooded) and ``west``, syncing with each other."""

    def __init__(self, workdir: Path, shedding: bool, shed_lag_ms: int | None = None,
                 reserved_listener: bool = True,
                 max_buckets: int | None = None,
                 east_storage: dict[str, object] | None = None) -> None:  # fmt: skip
        ports = {"east": free_port(), "west": free_port()}
        # east's reserved listener: west sends its sync there, the prober its admin calls
        admin_port = free_port() if reserved_listener else None
        secret = secrets.token_urlsafe(32)
        limits = {} if shedding else {"shedLag": NEVER_MS, "maxInFlight": 10**9}
        if shedding and shed_lag_ms is not None:
            limits["shedLag"] = shed_lag_ms
        # both nodes' bucket cap (limits.maxBuckets), when the default is not enough
        cap = {} if max_buckets is None else {"maxBuckets": max_buckets}
        self.east = Node(workdir, "east", ports["east"], {"west": ports["west"]},
                         {**limits, **cap}, secret, admin_port, east_storage)  # fmt: skip
        to_east = admin_port if admin_port is not None else ports["east"]
        self.west = Node(workdir, "west", ports["west"], {"east": to_east}, cap, secret)
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=2) as client:
            while True:
                try:
                    if all(
                        all(p["state"] == "up" for p in n.status(client)["sync"]["peers"].values())  # type: ignore[index]
                        for n in (self.east, self.west)
                    ) and all(n.pulled_its_peer() for n in (self.east, self.west)):
                        return
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                if not (self.east.alive() and self.west.alive()) or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"r6: the nodes did not start (logs in {workdir})")
                time.sleep(0.1)

    def stop(self) -> None:
        self.east.stop()
        self.west.stop()


@dataclass
class Reserved:
    """What the prober saw of the reserved traffic during a flood."""

    patches: int = 0
    patches_ok: int = 0
    patch_ms: list[float] = field(default_factory=list)
    status_ok: int = 0
    grants_on_west: int = 0
    lag_east_from_west_ms: float = 0.0  # worst p99 seen: deltas west → east (east receives)
    lag_west_from_east_ms: float = 0.0  # deltas east → west (east sends)
    pending: list[tuple[float, list[str]]] = field(default_factory=list)  # --stalls only


class Prober(threading.Thread):
    """4 times a second: PATCH a rule on east (admin), read east's /v1/status, grant on west."""

    def __init__(self, pair: Pair) -> None:
        super().__init__(daemon=True)
        self.pair = pair
        self.seen = Reserved()
        self.stopping = threading.Event()

    def run(self) -> None:
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        i = 0
        with httpx.Client(timeout=TIMEOUT_S) as client:
            while not self.stopping.wait(0.25):
                i += 1
                seen = self.seen
                try:
                    started = time.perf_counter()
                    seen.patches += 1
                    reply = client.patch(
                        self.pair.east.admin_url + "/v1/buckets/probe",
                        json={"capacity": 10**9 - i % 2},
                        headers=admin,
                    )
                    seen.patch_ms.append((time.perf_counter() - started) * 1000)
                    seen.patches_ok += reply.status_code == 200
                    if STALLS["dir"] is not None:  # east's sync backlog over time
                        text = client.get(self.pair.east.admin_url + "/metrics").text
                        pending = [
                            line.split()[-1]
                            for line in text.splitlines()
                            if line.startswith("bucketmesh_sync_pending_deltas{")
                        ]
                        seen.pending.append((time.time(), pending))
                    status = client.get(self.pair.east.admin_url + "/v1/status").json()
                    seen.status_ok += 1
                    lag = status["sync"]["peers"]["west"]["lag_ms_p99"]  # type: ignore[index]
                    seen.lag_east_from_west_ms = max(seen.lag_east_from_west_ms, lag or 0.0)
                    west = self.pair.west
                    granted = client.get(west.url + "/v1/rate", headers={"X-Probe": f"p{i}"})
                    seen.grants_on_west += granted.status_code == 200
                    lag = west.status(client)["sync"]["peers"]["east"]["lag_ms_p99"]  # type: ignore[index]
                    seen.lag_west_from_east_ms = max(seen.lag_west_from_east_ms, lag or 0.0)
                except httpx.HTTPError:
                    pass


def offer(binary: Path, port: int, rate: float, seconds: float, offset: int) -> dict[str, object]:
    argv = [str(binary), "-h", HOST, "-p", str(port), "-r", f"{rate:.0f}", "-d", f"{seconds:g}",
            "-c", str(CONNECTIONS), "-P", "0", "-k", str(10**12), "-o", str(offset),
            "-t", f"{TIMEOUT_S:g}"]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result: dict[str, object] = json.loads(done.stdout)
    # the client's own CPU: at 3x on a shared box it may be the client that is slow
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["client_cpu_pct"] = 100 * cpu_s / max(float(result["span_s"]), 1e-9)  # type: ignore[arg-type]
    return result


@dataclass
class Row:
    shedding: str
    multiple: str
    seconds: float
    client: dict[str, object]
    shed: float
    shed_yield: float  # of ``shed``, in turns shed whole for the sync sender
    cap_refused: float
    rss_mb: float
    buckets: int
    cpu_pct: float
    alive: bool
    reserved: Reserved
    sync_sent: float
    sync_failed: float
    settle_s: float  # from the end of the flood until /metrics answered


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def run_row(binary: Path, workdir: Path, shedding: bool, multiple: int, rate: float,
            seconds: float, shed_lag_ms: int | None = None,
            reserved_listener: bool = True) -> Row:  # fmt: skip
    pair = Pair(workdir, shedding, shed_lag_ms, reserved_listener)
    try:
        east = pair.east
        with httpx.Client(timeout=TIMEOUT_S) as client:
            before = east.metrics(client)
            cpu0 = east.cpu_s()
            prober = Prober(pair)
            prober.start()
            flood_start = time.time()
            result = offer(binary, east.port, rate, seconds, offset=secrets.randbelow(10**9))
            if STALLS["dir"] is not None:
                print(f"flood {flood_start:.3f} .. {time.time():.3f}", flush=True)
            prober.stopping.set()
            prober.join()
            span = float(result["span_s"])  # type: ignore[arg-type]
            cpu_pct = 100 * (east.cpu_s() - cpu0) / max(span, seconds)
            alive = east.alive()
            # the node may still be working off what the flood left (its sync outbox, a
            # collection): how long it takes to answer again is a figure of its own, and
            # a node that does not answer within SETTLE_S is reported so, not a crash
            settled = time.monotonic()
            after: dict[str, float] | None = None
            buckets = -1
            with httpx.Client(timeout=SETTLE_S) as patient:
                try:
                    after = east.metrics(patient)
                    buckets = int(east.status(patient)["buckets"])  # type: ignore[call-overload]
                except httpx.HTTPError as error:
                    print(f"r6: east did not answer after the flood: {error!r}", flush=True)
            settle_s = time.monotonic() - settled if after is not None else float("inf")
            if STALLS["dir"] is not None and after is not None:  # anti-entropy during the row
                west_after = pair.west.metrics(client)
                for name, samples in (("east", after), ("west", west_after)):
                    shown = {
                        k: v
                        for k, v in samples.items()
                        if any(w in k for w in ("repaired_ranges", "deferred", "full_transfers"))
                    }
                    print(f"{name}: {shown}", flush=True)
            rss = east.peak_rss_mb()
    finally:
        pair.stop()
    if after is None:
        after = {}
        shed = shed_yield = cap_refused = sync_sent = sync_failed = float("nan")
    else:
        shed = sum(
            _delta(after, before, f"bucketmesh_http_shed_{cause}_requests_total")
            for cause in ("lag", "in_flight", "yield")
        )
        shed_yield = _delta(after, before, "bucketmesh_http_shed_yield_requests_total")
        cap_refused = _delta(after, before, "bucketmesh_bucket_cap_rejections_total")
        sync_sent = _delta(after, before, "bucketmesh_sync_messages_sent_total{peer=west}")
        sync_failed = _delta(after, before, "bucketmesh_sync_send_failures_total{peer=west}")
    return Row(
        ("on" if shed_lag_ms is None else f"on, shedLag {shed_lag_ms} ms") if shedding else "off",
        f"{multiple}×",
        seconds,
        result,
        shed,
        shed_yield,
        cap_refused,
        rss,
        buckets,
        cpu_pct,
        alive,
        prober.seen,
        sync_sent,
        sync_failed,
        settle_s,
    )


def capacity(binary: Path, workdir: Path, probe: float, seconds: float) -> float:
    pair = Pair(workdir, shedding=False)
    try:
        result = offer(binary, pair.east.port, probe, seconds, offset=0)
    finally:
        pair.stop()
    served = int(result["ok"]) + int(result["denied"])  # type: ignore[call-overload]
    return served / float(result["span_s"])  # type: ignore[arg-type]


def _count(value: float) -> str:
    """A counter's delta; "—" when the node did not answer after the flood."""
    return "—" if value != value else f"{value:,.0f}"


def _ms(value: object) -> str:
    number = float(value)  # type: ignore[arg-type]
    return "—" if number < 0 else f"{number:,.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="4 s rows; the 3× row 4 s too (no 1,000,000 keys)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=None, help="seconds per row (10)")
    parser.add_argument("--probe", type=float, default=60000.0, help="requests/s to find capacity")
    parser.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    parser.add_argument("--no-admin-listen", action="store_true",
                        help="no reserved listener: sync and admin calls go to the flooded "
                             "port, as before adminListen existed")  # fmt: skip
    parser.add_argument("--low-lag", type=int, default=25,
                        help="limits.shedLag (ms) of the last two rows (2x, 3x)")  # fmt: skip
    parser.add_argument("--rows", default=None,
                        help="only these rows, e.g. 'on:2,on:3,off:3,25:3' (on: shedding "
                             "with the default shedLag, off: none, a number: that shedLag "
                             "in ms)")  # fmt: skip
    parser.add_argument("--stalls", type=Path, default=None,
                        help="run every node with the loop-stall detector "
                             "(benchmarks/stallwatch): turns of the event loop longer than "
                             "BUCKETMESH_STALLWATCH_MS (100) with sampled stacks, and the "
                             "nodes' logs, into this directory")  # fmt: skip
    args = parser.parse_args(argv)
    if args.stalls is not None:
        args.stalls.mkdir(parents=True, exist_ok=True)
        STALLS["dir"] = args.stalls.resolve()
    seconds = args.seconds or (4.0 if args.quick else 10.0)
    with tempfile.TemporaryDirectory(prefix="bucketmesh-r6-") as tmp:
        workdir = Path(tmp)
        binary = build_client(workdir)
        cap = capacity(binary, workdir, args.probe, min(seconds, 5.0))
        print(f"capacity: {cap:,.0f} requests/s (shedding off, offered {args.probe:,.0f}/s)")
        rows = []
        plan: list[tuple[bool, int, int | None]] = [
            (True, 1, None), (True, 2, None), (True, 3, None), (False, 3, None),
            (True, 2, args.low_lag), (True, 3, args.low_lag),
        ]  # fmt: skip
        if args.rows:
            plan = []
            for spec in args.rows.split(","):
                kind, _, multiple = spec.partition(":")
                lag = None if kind in ("on", "off") else int(kind)
                plan.append((kind != "off", int(multiple), lag))
        for shedding, multiple, shed_lag_ms in plan:
            rate = multiple * cap
            length = seconds
            if shedding and multiple == 3 and not args.quick:
                length = max(seconds, MILLION / rate)  # 1,000,000 distinct keys arrive
            if STALLS["dir"] is not None:
                print(f"row start {time.time():.3f}: shedding {shedding} {multiple}x", flush=True)
            rows.append(run_row(binary, workdir, shedding, multiple, rate, length, shed_lag_ms,
                                not args.no_admin_listen))  # fmt: skip
            print(f"row {rows[-1].shedding} {rows[-1].multiple}: {rows[-1].client}", flush=True)
            if STALLS["dir"] is not None:
                samples = rows[-1].reserved.pending
                backlog = " ".join(f"{t % 100:.1f}:{'/'.join(p)}" for t, p in samples)
                print(f"east's sync backlog (time: pending deltas): {backlog}", flush=True)
    columns = ["shedding", "load", "s", "offered/s", "served/s", "shed 503", "of which yield",
               "cap 503",
               "p99 served ms", "p99 shed ms", "client late p99 ms", "peak RSS MB", "buckets",
               "node CPU %", "client CPU %", "errors", "alive"]  # fmt: skip
    cells = []
    reserved_cells = []
    for r in rows:
        c = r.client
        served = int(c["ok"]) + int(c["denied"])  # type: ignore[call-overload]
        errors = int(c["other_status"]) + int(c["errors"]) + int(c["unanswered"])  # type: ignore[call-overload]
        span = max(float(c["span_s"]), 1e-9)  # type: ignore[arg-type]
        cells.append([
            r.shedding, r.multiple, f"{r.seconds:.0f}", f"{int(c['offered']) / r.seconds:,.0f}",  # type: ignore[call-overload]
            f"{served / span:,.0f}", _count(r.shed), _count(r.shed_yield), _count(r.cap_refused),
            _ms(c["served_ms"]["p99"]), _ms(c["shed_ms"]["p99"]),  # type: ignore[index]
            _ms(c["write_late_ms"]["p99"]),  # type: ignore[index]
            f"{r.rss_mb:,.0f}", f"{r.buckets:,}" if r.buckets >= 0 else "—",
            f"{r.cpu_pct:.0f}", f"{float(c['client_cpu_pct']):.0f}", f"{errors:,}",  # type: ignore[arg-type]
            "yes" if r.alive else "NO",
        ])  # fmt: skip
        s = r.reserved
        worst_patch = max(s.patch_ms) if s.patch_ms else float("nan")
        reserved_cells.append([
            r.shedding, r.multiple, f"{s.patches_ok} / {s.patches}", f"{worst_patch:,.0f}",
            f"{s.status_ok} / {s.patches}", _count(r.sync_sent), _count(r.sync_failed),
            f"{s.lag_west_from_east_ms:,.1f}", f"{s.lag_east_from_west_ms:,.1f}",
            f"{r.settle_s:,.1f}" if r.settle_s < SETTLE_S else f"no answer in {SETTLE_S:.0f} s",
        ])  # fmt: skip
    reserved_columns = ["shedding", "load", "PATCH 200 / sent", "worst PATCH ms",
                        "status 200 / asked", "sync msgs east→west", "failed sends",
                        "lag p99 east→west ms", "lag p99 west→east ms",
                        "/metrics after the flood s"]  # fmt: skip
    title = f"R6 overload, open-loop C client: capacity {cap:,.0f} requests/s"
    _report.print_table(title, columns, cells)
    _report.print_table("Reserved traffic during the flood", reserved_columns, reserved_cells)
    if args.append:
        body = (
            f"Capacity measured in the same run: {cap:,.0f} requests/s (`east` with shedding "
            f"off offered {args.probe:,.0f}/s; answers / time to the last answer). Client "
            f"`benchmarks/openloop.c`: one epoll thread, {CONNECTIONS} keep-alive "
            "connections, constant rate, each request written when due (pipelined), latency "
            "from the due time, a distinct key per "
            "request; `east` syncs with `west` (every new bucket replicated) and is PATCHed "
            "4 times a second meanwhile"
            + (
                " (all on the flooded port: no `adminListen`)"
                if args.no_admin_listen
                else " (west's sync to east and the PATCHes and status reads go to east's "
                "reserved listener, `adminListen`)"
            )
            + '; a fresh pair per row. "shed 503" and "cap 503" '
            "are the node's counters (shedding; new keys beyond `limits.maxBuckets`), "
            '"of which yield" the turns shed whole while `east`\'s sync sender was behind, the '
            'p99s are the client\'s, from the due time; "client late" is how late the client '
            "handed its requests to their connection's buffer (a client short of CPU is late, "
            "or one whose 1 MB buffer per connection is full behind the node's receive "
            "window; its latencies include that).\n\n"
            + _report.markdown_table(columns, cells)
            + "\n\nReserved traffic (sync, admin, status) during the same rows:\n\n"
            + _report.markdown_table(reserved_columns, reserved_cells)
            + "\n\nCommand: `PYTHONPATH=src .venv/bin/python benchmarks/r6.py"
            + (" --quick" if args.quick else "")
            + (" --no-admin-listen" if args.no_admin_listen else "")
            + " --append`\n"
        )
        _report.append_section(title, body, machine=_report.machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
