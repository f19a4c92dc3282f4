"""P2: ``bucketmesh serve`` under wrk, POST /v1/rate, against nginx ``limit_req``.

Target P2 (docs/targets.md): one ``bucketmesh serve`` process answering
``POST /v1/rate`` at ≥ 0.6× the requests/s of nginx ``limit_req`` (1 worker)
started by this script in the same run, with p99 ≤ 5 ms at 50 connections.

Contenders, per scenario (each scenario starts its own pair of servers)
    bucketmesh: ``bucketmesh serve`` on a free loopback port with a temporary
    config holding one rule, ``agent-api-key-{{ .Request.Header.X-API-Key }}``.
    nginx: 1 worker, ``limit_req_zone $http_x_api_key``, ``limit_req ... nodelay``,
    the answer a small JSON body, access log off, keep-alive unbounded.
    Scenario "admit" (judged): capacity 10^12, refill 10^9/s — every request is
    allowed (200); nginx at 10^7 r/s with a burst of 10^5, also always admitting.
    Scenario "deny" (context): capacity 1000, refill 1000/s on both — nearly every
    request is denied (429 with a JSON body), which is a real load too.

    nginx runs ``return`` in its rewrite phase, *before* ``limit_req`` (preaccess
    phase): a location holding both never consults the limiter. So the limited
    location here answers through ``try_files /.none @allowed`` (try_files runs
    after preaccess), and ``@allowed`` returns the body; the deny scenario shows
    that limit_req really is consulted (its 429s are counted).

Method
    wrk, 1 thread, 50 connections, 10 s per round (5 s with --quick), with a Lua
    script that sets a static POST (``X-API-Key``, ``Content-Type``, body
    ``{"tokens":1}``) so wrk prebuilds it; ``--latency`` for p50/p99. After a 1 s
    warm-up of each, the two servers are driven in alternating rounds (the order
    flips every round) so noise hits both alike; best and median requests/s per
    contender, the target judged on the ratio of medians and on bucketmesh's
    median p99. Counts that noise cannot move are checked on bucketmesh after
    every round, from its /metrics once it is quiet: decisions counted within
    [wrk's requests, + connections] (requests in flight when wrk stops are
    answered but not counted by wrk), one response per decision, 200s equal to
    allowed decisions, 429s matching wrk's non-2xx count, no other status; at the
    end Σ used of the key (GET /v1/bucket/state) equals every allowed decision,
    and in the deny scenario the admitted tokens stay within capacity + refill ×
    elapsed. wrk's socket errors and non-2xx counts are reported for both servers.
    When P2 is missed, py-spy samples the bucketmesh process under the same load
    and the output says where its time goes.

Everything listens on 127.0.0.1, every wait is bounded, and every process this
script starts is stopped in ``finally``.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/http_rate.py [--quick]`` (needs nginx, wrk).

The Python work per request alone (``--wire``; no socket, no nginx, no wrk, needs
valgrind): callgrind's instruction count of one ``POST /v1/rate`` fed to
``_Connection.data_received`` in-process through the real Router and RatingApp, beside
the same server answering a constant and a bare httptools protocol (the floor). The
machine's load does not move these counts, so they show what a change saves.
Run: ``PYTHONPATH=src .venv/bin/python benchmarks/http_rate.py --wire``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import linecache
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import _report

HOST = "127.0.0.1"
CONNECTIONS = 50
P2_RATIO = 0.6
P2_P99_MS = 5.0
API_KEY = "bench"
TEMPLATE = "agent-api-key-{{ .Request.Header.X-API-Key }}"
BUCKET_KEY = f"agent-api-key-{API_KEY}"
RULE = "bench"
START_TIMEOUT_S = 15.0
SETTLE_TIMEOUT_S = 5.0
VENV_BIN = _report.REPO_ROOT / ".venv" / "bin"


# -- processes ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Service:
    """A server process of this run: its own session, output to a log file, always stopped."""

    def __init__(self, name: str, argv: Sequence[str], cwd: Path, port: int) -> None:
        self.name = name
        self.argv = list(argv)
        self.cwd = cwd
        self.port = port
        self.log_path = cwd / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready_path: str = "/") -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start: {self.log_tail()}")
            try:
                status, _ = http_request(self.port, "GET", ready_path, timeout=1.0)
                if status < 500:
                    return
                last = status
            except OSError as error:
                last = error
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not answering on port {self.port}: {last}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, up to 10 s to finish, then SIGKILL to the session it was started in."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: leftovers (nginx workers)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def bucketmesh_service(workdir: Path, name: str, rules_yaml: str) -> Service:
    port = free_port()
    config = workdir / f"{name}.yaml"
    config.write_text(
        f"region: bench\nnode: {name}\nlisten: {HOST}:{port}\n"
        "storage:\n  backend: memory\n  snapshot: ''\n"
        f"buckets:\n{rules_yaml}",
        encoding="utf-8",
    )
    executable = VENV_BIN / "bucketmesh"
    argv = [str(executable)] if executable.exists() else [sys.executable, "-m", "bucketmesh"]
    argv += ["serve", "--config", str(config), "--listen", f"{HOST}:{port}"]
    return Service(name, argv, workdir, port)


def nginx_service(workdir: Path, name: str, locations: str, zones: str) -> Service:
    """nginx, 1 worker, in the foreground, everything under ``workdir``."""
    port = free_port()
    prefix = workdir / name
    (prefix / "empty").mkdir(parents=True, exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    temps = " ".join(
        f"{kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""{user}worker_processes 1;
daemon off;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  {temps}
  keepalive_requests 1000000000;
  keepalive_timeout 60s;
  open_file_cache max=16; open_file_cache_valid 3600s; open_file_cache_errors on;
  limit_req_status 429;
  limit_req_log_level info;
  {zones}
  server {{
    listen {HOST}:{port};
    default_type application/json;
    root {prefix / "empty"};
    {locations}
  }}
}}
""",
        encoding="utf-8",
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return Service(name, [nginx, "-c", str(conf), "-p", f"{prefix}/"], workdir, port)


# -- wrk ------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: dict[str, int]

    @property
    def socket_error_count(self) -> int:
        return sum(self.socket_errors.values())


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_wrk(text: str) -> WrkResult:
    """The figures of one ``wrk --latency`` run."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    quantiles = {
        q: float(v) * _UNITS[u]
        for q, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    }
    if not done or not rps or set(quantiles) != {"50", "99"}:
        raise RuntimeError(f"cannot parse wrk's output:\n{text}")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    socket_errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    if errors:
        socket_errors = dict(zip(socket_errors, map(int, errors.groups()), strict=True))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        requests=int(done.group(1)),
        seconds=float(done.group(2)) * _UNITS[done.group(3)] / 1000,
        rps=float(rps.group(1)),
        p50_ms=quantiles["50"],
        p99_ms=quantiles["99"],
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=socket_errors,
    )


def wrk_lua(path: Path, *, body: str, headers: dict[str, str]) -> Path:
    """A static POST: wrk builds the request once and sends it over and over."""
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{body}]==]"]
    lines += [f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_wrk(
    url: str, lua: Path, seconds: float, connections: int = CONNECTIONS
) -> tuple[WrkResult, str]:
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(lua),
        url,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout), done.stdout


def tool_versions() -> str:
    found = []
    for argv in (["nginx", "-v"], ["wrk", "-v"]):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            found.append(f"{argv[0]} (not found)")
            continue
        first = (out.stderr + out.stdout).strip().splitlines()
        text = first[0] if first else argv[0]
        found.append(text.replace("nginx version: ", "").split(" Copyright")[0].strip())
    return ", ".join(found)


def require_tools() -> str | None:
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if missing and "nginx" in missing and Path("/usr/sbin/nginx").exists():
        missing.remove("nginx")
    if missing:
        return (
            f"missing {', '.join(missing)}: apt-get install -y nginx wrk "
            "(or scripts/ensure-debian-packages.sh nginx wrk)"
        )
    return None


# -- bucketmesh's own counts -------------------------------------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match:
            labels = dict(_LABEL.findall(match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


@dataclass(frozen=True)
class Counts:
    """bucketmesh's counters for one route and one rule."""

    allowed: int
    denied: int
    statuses: dict[int, int]

    @property
    def decisions(self) -> int:
        return self.allowed + self.denied

    @property
    def responses(self) -> int:
        return sum(self.statuses.values())

    def minus(self, before: Counts) -> Counts:
        statuses = {
            s: n - before.statuses.get(s, 0)
            for s, n in self.statuses.items()
            if n != before.statuses.get(s, 0)
        }
        return Counts(self.allowed - before.allowed, self.denied - before.denied, statuses)


def read_counts(port: int, route: str, rule: str | None = None) -> Counts:
    status, body = http_request(port, "GET", "/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}")
    allowed = denied = 0
    statuses: dict[int, int] = {}
    for name, labels, value in parse_metrics(body.decode()):
        if name == "bucketmesh_decisions_total" and (rule is None or labels.get("rule") == rule):
            if labels.get("result") == "allowed":
                allowed += int(value)
            elif labels.get("result") == "denied":
                denied += int(value)
        elif name == "bucketmesh_http_responses_total" and labels.get("route") == route:
            statuses[int(labels["status"])] = int(value)
    return Counts(allowed, denied, statuses)


def settled_counts(port: int, route: str, rule: str | None = None) -> Counts:
    """The counts once they stop moving (requests in flight when wrk stopped are done)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last = read_counts(port, route, rule)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read_counts(port, route, rule)
        if now == last:
            return now
        last = now
    return last


def used_of(port: int, key: str) -> tuple[int, float]:
    """Σ used over replicas of ``key`` from GET /v1/bucket/state, and tokens remaining."""
    status, body = http_request(port, "GET", f"/v1/bucket/state?key={key}")
    if status != 200:
        raise RuntimeError(f"GET /v1/bucket/state?key={key} answered {status}: {body[:200]!r}")
    state = json.loads(body)
    return sum(entry["used"] for entry in state["replicas"].values()), state["tokens_remaining"]


def server_errors(service: Service) -> list[str]:
    """What a server logged that looks like a failure (bucketmesh: ``internal error``)."""
    try:
        text = service.log_path.read_text(errors="replace")
    except OSError:
        return []
    bad = ("internal error", "Traceback", "[emerg]", "[alert]", "[crit]")
    return [line for line in text.splitlines() if any(word in line for word in bad)]


# -- py-spy -------------------------------------------------------------------------


def find_py_spy() -> str | None:
    local = VENV_BIN / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def py_spy_stacks(pid: int, seconds: float, out: Path) -> list[tuple[list[str], int]]:
    """Sample ``pid`` for ``seconds`` (blocking mode: exact stacks, ~1 % overhead)."""
    spy = find_py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
    argv = [spy, "record", "--pid", str(pid), "--duration", f"{max(1, round(seconds))}"]
    argv += ["--rate", "250", "--full-filenames", "--format", "raw", "-o", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed: {(done.stderr or done.stdout).strip()[-400:]}")
    stacks = []
    for line in out.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append((frames.split(";"), int(count)))
    return stacks


_FRAME = re.compile(r"^(.*) \((.*?)(?::(\d+))?\)$")


def _frame(text: str) -> tuple[str, str, int]:
    match = _FRAME.match(text)
    if not match:
        return text, "", 0
    return match.group(1), match.group(2), int(match.group(3) or 0)


def _short(path: str) -> str:
    for marker in ("/src/", "/site-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    stdlib = re.search(r"/lib/python3\.\d+/(.*)$", path)
    return stdlib.group(1) if stdlib else os.path.basename(path)


def _where(name: str, path: str) -> str:
    return f"{name} ({_short(path)})" if path else name


def summarise_stacks(
    stacks: list[tuple[list[str], int]],
    *,
    split_functions: Sequence[str] = (),
    top: int = 12,
) -> list[str]:
    """Own time and inclusive time by function, and where inside ``split_functions``
    (by the line being run, which names the call it is in)."""
    total = sum(count for _, count in stacks)
    if not total:
        return ["py-spy took no samples"]
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    inside: dict[str, Counter[tuple[str, int]]] = {f: Counter() for f in split_functions}
    for frames, count in stacks:
        parsed = [_frame(f) for f in frames]
        name, path, _ = parsed[-1]
        own[_where(name, path)] += count
        for where in {_where(n, p) for n, p, _ in parsed}:
            inclusive[where] += count
        for target in split_functions:
            for n, p, line in reversed(parsed):
                if n == target or n.endswith("." + target):
                    inside[target][(p, line)] += count
                    break
    lines = [
        f"py-spy: {total:,} samples of the busy server thread (idle time not sampled). "
        "Time in C (uvloop's transport and loop, httptools, msgspec) is charged to the "
        "Python frame that called it; leaf Runner.run = the event loop's own C work "
        "(socket reads/writes, callbacks).",
        "",
        "own time by function:",
    ]
    lines += [f"  {n / total:6.1%}  {where}" for where, n in own.most_common(top)]
    lines += ["", "inclusive time by function (frames in every sample left out):"]
    shown = [(w, n) for w, n in inclusive.most_common() if n < 0.99 * total][:top]
    lines += [f"  {n / total:6.1%}  {where}" for where, n in shown]
    for target, by_line in inside.items():
        within = sum(by_line.values())
        if not within:
            continue
        lines += ["", f"inside {target} ({within / total:.1%} of all samples), by line:"]
        for (path, line), n in by_line.most_common(8):
            source = linecache.getline(path, line).strip() if path else ""
            lines.append(f"  {n / total:6.1%}  :{line}  {source[:88]}")
    return lines


def profile_under_load(
    service: Service,
    url: str,
    lua: Path,
    seconds: float,
    workdir: Path,
    *,
    split_functions: Sequence[str] = (),
) -> list[str]:
    """py-spy on ``service`` while wrk drives ``url`` (wrk runs a little longer)."""
    assert service.proc is not None
    out = workdir / f"py-spy-{service.name}.txt"
    wrk = subprocess.Popen(
        [
            "wrk",
            "-t1",
            f"-c{CONNECTIONS}",
            f"-d{seconds + 2:g}s",
            "-s",
            str(lua),
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        time.sleep(0.5)
        stacks = py_spy_stacks(service.pid, seconds, out)
    finally:
        if wrk.poll() is None:
            try:
                wrk.wait(timeout=seconds + 10)
            except subprocess.TimeoutExpired:
                wrk.kill()
                wrk.wait(timeout=5)
    return summarise_stacks(stacks, split_functions=split_functions)


# -- contenders and rounds ----------------------------------------------------------------


@dataclass
class Contender:
    label: str
    service: Service
    path: str
    lua: Path
    runs: list[WrkResult] = field(default_factory=list)
    check: Callable[[WrkResult], list[str]] | None = None
    """bucketmesh: reads its counters after a round; returns what is wrong."""
    before: Callable[[], None] | None = None
    """bucketmesh: reads its counters before a round."""

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.service.port}{self.path}"

    def rps(self) -> list[float]:
        return [r.rps for r in self.runs] or [0.0]  # no runs: the server died first

    @property
    def best(self) -> float:
        return max(self.rps())

    @property
    def median(self) -> float:
        return statistics.median(self.rps())

    @property
    def p99_median(self) -> float:
        return statistics.median([r.p99_ms for r in self.runs] or [0.0])

    @property
    def p99_worst(self) -> float:
        return max([r.p99_ms for r in self.runs] or [0.0])

    @property
    def p50_median(self) -> float:
        return statistics.median([r.p50_ms for r in self.runs] or [0.0])

    @property
    def non2xx(self) -> int:
        return sum(r.non2xx for r in self.runs)

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.runs)

    @property
    def socket_errors(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for run in self.runs:
            total.update(run.socket_errors)
        return {k: v for k, v in total.items() if v}


def interleave(
    contenders: Sequence[Contender], rounds: int, seconds: float, warmup: float, log: list[str]
) -> list[str]:
    """Warm each up, then alternate; every round is checked. Returns the problems seen."""
    problems: list[str] = []
    for contender in contenders:
        run_wrk(contender.url, contender.lua, warmup)
    for number in range(rounds):
        order = contenders if number % 2 == 0 else list(reversed(contenders))
        for contender in order:
            problems += interleave_one(contender, number, seconds, log)
            if not contender.service.alive():
                return problems
    return problems


def interleave_one(contender: Contender, number: int, seconds: float, log: list[str]) -> list[str]:
    """One checked round of one contender; returns what went wrong."""
    if contender.before is not None:
        contender.before()
    result, raw = run_wrk(contender.url, contender.lua, seconds)
    contender.runs.append(result)
    log.append(f"--- {contender.label}, round {number + 1}\n{raw}")
    print(
        f"  round {number + 1}  {contender.label:<44} {result.rps:>11,.0f} req/s  "
        f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms"
        + (f"  non-2xx {result.non2xx:,}" if result.non2xx else "")
        + (f"  socket errors {result.socket_errors}" if result.socket_error_count else ""),
        flush=True,
    )
    if not contender.service.alive():
        return [f"{contender.label}: the server died: {contender.service.log_tail()}"]
    if contender.check is None:
        return []
    return [f"{contender.label}, round {number + 1}: {p}" for p in contender.check(result)]


class BucketmeshWatch:
    """Per-round checks of bucketmesh's counters against wrk's counts."""

    def __init__(
        self, port: int, route: str, rule: str, connections: int, per_request: int = 1
    ) -> None:
        self.port = port
        self.route = route
        self.rule = rule
        self.connections = connections
        self.per_request = per_request
        """Decisions per request: 1 for /v1/rate; a batch's size (every item allowed)."""
        self.start: Counts | None = None
        self.served: list[int] = []
        """Requests the server answered in each checked round."""

    def before(self) -> None:
        self.start = settled_counts(self.port, self.route, self.rule)

    def check(self, result: WrkResult) -> list[str]:
        assert self.start is not None
        delta = settled_counts(self.port, self.route, self.rule).minus(self.start)
        per_request = self.per_request
        slack = self.connections
        problems = []
        served = delta.responses
        self.served.append(served)
        if not result.requests <= served <= result.requests + slack:
            problems.append(
                f"server answered {served:,} requests, wrk counted {result.requests:,} "
                f"(expected within +{slack} in flight)"
            )
        if delta.decisions != per_request * delta.statuses.get(200, 0) + delta.statuses.get(429, 0):
            problems.append(
                f"{delta.decisions:,} decisions for {delta.statuses} responses "
                f"({per_request} per 200)"
            )
        if per_request == 1 and delta.allowed != delta.statuses.get(200, 0):
            problems.append(
                f"{delta.allowed:,} allowed decisions but {delta.statuses.get(200, 0):,} 200s"
            )
        if per_request > 1 and delta.denied:
            problems.append(f"{delta.denied:,} batch items denied; every one should be allowed")
        others = {s: n for s, n in delta.statuses.items() if s not in (200, 429)}
        if others:
            problems.append(f"responses other than 200/429: {others}")
        refused = served - delta.statuses.get(200, 0)
        if not result.non2xx <= refused <= result.non2xx + slack:
            problems.append(
                f"server sent {refused:,} non-200s, wrk counted {result.non2xx:,} non-2xx"
            )
        return problems


# -- P2 ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    judged: bool
    capacity: int
    refill: float
    nginx_rate: str
    nginx_burst: int
    expect_denials: bool


SCENARIOS = (
    Scenario("admit", True, 10**12, 1e9, "10000000r/s", 100_000, False),
    Scenario("deny", False, 1000, 1000.0, "1000r/s", 1000, True),
)

NGINX_ALLOWED = '{"allowed":true,"key":"agent-api-key-bench","tokens_remaining":1,"region":"nginx"}'
NGINX_DENIED = '{"allowed":false,"key":"agent-api-key-bench","tokens_remaining":0,"region":"nginx"}'


@dataclass
class ScenarioResult:
    scenario: Scenario
    bucketmesh: Contender
    nginx: Contender
    problems: list[str]
    checks: list[list[str]]


def rule_yaml(scenario: Scenario) -> str:
    return (
        f'  - name: {RULE}\n    key: "{TEMPLATE}"\n    capacity: {scenario.capacity}\n'
        f"    refillRate: {scenario.refill:g}\n    ttl: 3600\n    mode: shared\n"
    )


def run_scenario(
    scenario: Scenario, workdir: Path, rounds: int, seconds: float, log: list[str]
) -> ScenarioResult:
    name = scenario.name
    bm = bucketmesh_service(workdir, f"bucketmesh-{name}", rule_yaml(scenario))
    zone = f"limit_req_zone $http_x_api_key zone=rate:1m rate={scenario.nginx_rate};"
    locations = (
        f"location = /v1/rate {{ limit_req zone=rate burst={scenario.nginx_burst} nodelay; "
        "error_page 429 = @denied; try_files /.none @allowed; }\n"
        f"    location @allowed {{ return 200 '{NGINX_ALLOWED}'; }}\n"
        f"    location @denied {{ return 429 '{NGINX_DENIED}'; }}"
    )
    ngx = nginx_service(workdir, f"nginx-{name}", locations, zone)
    lua = wrk_lua(
        workdir / "post.lua",
        body='{"tokens":1}',
        headers={"Content-Type": "application/json", "X-API-Key": API_KEY},
    )
    headers = {"Content-Type": "application/json", "X-API-Key": API_KEY}
    checks: list[list[str]] = []
    problems: list[str] = []
    try:
        bm.start("/healthz")
        ngx.start("/healthz-none")  # any answer (404) means it is up
        started = time.monotonic()
        # One request each by hand: the shape of the answer, before any load.
        status, body = http_request(bm.port, "POST", "/v1/rate", b'{"tokens":1}', headers)
        if status != 200 or b'"allowed":true' not in body:
            problems.append(f"bucketmesh's first POST /v1/rate answered {status}: {body[:200]!r}")
        status, body = http_request(ngx.port, "POST", "/v1/rate", b'{"tokens":1}', headers)
        if status != 200:
            problems.append(f"nginx's first POST /v1/rate answered {status}: {body[:200]!r}")
        watch = BucketmeshWatch(bm.port, "rate", RULE, CONNECTIONS)
        ours = Contender(
            f"bucketmesh serve, {name}", bm, "/v1/rate", lua, check=watch.check, before=watch.before
        )
        theirs = Contender(f"nginx limit_req, {name}", ngx, "/v1/rate", lua)
        print(f"scenario {name}: bucketmesh on :{bm.port}, nginx on :{ngx.port}", flush=True)
        problems += interleave([ours, theirs], rounds, seconds, 1.0, log)
        if bm.alive():
            final = settled_counts(bm.port, "rate", RULE)
            used, _remaining = used_of(bm.port, BUCKET_KEY)
            elapsed = time.monotonic() - started
            ok = used == final.allowed
            checks.append(
                [
                    f"{name}: Σ used of {BUCKET_KEY} (bucket state) = allowed decisions (metrics)",
                    f"{final.allowed:,}",
                    f"{used:,}",
                    "ok" if ok else "WRONG",
                ]
            )
            if not ok:
                problems.append(f"Σ used {used:,} != {final.allowed:,} allowed decisions")
            served = final.statuses.get(200, 0) + final.statuses.get(429, 0)
            checks.append(
                [
                    f"{name}: responses 200 + 429 = decisions (metrics)",
                    f"{final.decisions:,}",
                    f"{served:,}",
                    "ok" if served == final.decisions else "WRONG",
                ]
            )
            if scenario.expect_denials:
                bound = scenario.capacity + scenario.refill * elapsed
                ok = used <= bound + 1
                checks.append(
                    [
                        f"{name}: tokens granted ≤ capacity + refill × {elapsed:.1f} s",
                        f"≤ {bound:,.0f}",
                        f"{used:,} ({used / bound:.1%})",
                        "ok" if ok else "OVER-ADMITTED",
                    ]
                )
                if not ok:
                    problems.append(f"over-admission: {used:,} granted, bound {bound:,.0f}")
                denied_share = final.denied / max(final.decisions, 1)
                checks.append(
                    [
                        f"{name}: share of bucketmesh decisions denied",
                        "most",
                        f"{denied_share:.2%}",
                        "—",
                    ]
                )
                nginx_allowed = theirs.requests - theirs.non2xx
                checks.append(
                    [
                        f"{name}: nginx requests admitted (wrk: total − non-2xx)",
                        "≈ 1000/s",
                        f"{nginx_allowed:,} of {theirs.requests:,}",
                        "—",
                    ]
                )
        for service in (bm, ngx):
            for line in server_errors(service):
                problems.append(f"{service.name} logged: {line}")
        for contender in (ours, theirs):
            if contender.socket_errors:
                problems.append(f"{contender.label}: wrk socket errors {contender.socket_errors}")
            if not scenario.expect_denials and contender.non2xx:
                problems.append(f"{contender.label}: {contender.non2xx:,} non-2xx responses")
        return ScenarioResult(scenario, ours, theirs, problems, checks)
    finally:
        bm.stop()
        ngx.stop()


def profile_p2(workdir: Path, scenarios: Sequence[Scenario], seconds: float) -> list[str]:
    """py-spy on a fresh bucketmesh under each scenario's load."""
    lines: list[str] = []
    for scenario in scenarios:
        bm = bucketmesh_service(workdir, f"bucketmesh-profile-{scenario.name}", rule_yaml(scenario))
        try:
            bm.start("/healthz")
            lines += [f"--- bucketmesh serve, {scenario.name} load, {seconds:g} s", ""]
            lines += profile_under_load(
                bm,
                f"http://{HOST}:{bm.port}/v1/rate",
                workdir / "post.lua",
                seconds,
                workdir,
                split_functions=("_Connection._dispatch", "RatingApp.rate_post"),
            )
            lines.append("")
        finally:
            bm.stop()
    return lines


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _ms(value: float) -> str:
    return f"{value:.2f}"


# -- the per-request Python work, in-process (--wire) ------------------------------------

WIRE_REQUEST = (
    b"POST /v1/rate HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-API-Key: bench\r\n"
    b"Content-Type: application/json\r\nContent-Length: 12\r\n\r\n" + b'{"tokens":1}'
)
WIRE_CONTENDERS = {
    "server": "bucketmesh: POST /v1/rate through _Connection, Router.hot (api/hot.py), RatingApp",
    "constant": "bucketmesh server alone: _Connection, a handler answering a constant",
    "bare": "floor: a bare httptools protocol answering a constant",
}


class _WireTransport:
    """What _Connection writes to: counts the writes, keeps the last."""

    def __init__(self) -> None:
        self.writes = 0
        self.last = b""

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.last = data

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return (HOST, 50000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def wire_feeder(which: str) -> tuple[Callable[[bytes], None], _WireTransport]:
    """``data_received`` of one connection of ``which`` contender, and its transport;
    call it from inside a running (uv)loop."""
    import asyncio

    import httptools

    from bucketmesh.api.routes import RatingApp
    from bucketmesh.core.limiter import Limiter
    from bucketmesh.core.rules import Rule
    from bucketmesh.http.router import Router
    from bucketmesh.http.server import HttpServer, Response, _Connection
    from bucketmesh.storage.memory import MemoryStore
    from bucketmesh.telemetry.metrics import NodeMetrics

    transport = _WireTransport()
    if which == "bare":
        answer = b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"ok":true}'

        class Bare:
            def __init__(self) -> None:
                self.parser = httptools.HttpRequestParser(self)
                self.headers: dict[bytes, bytes] = {}

            def on_header(self, name: bytes, value: bytes) -> None:
                self.headers[name] = value

            def on_message_complete(self) -> None:
                transport.write(answer)

        return Bare().parser.feed_data, transport
    if which == "constant":
        constant = Response(200, b'{"ok":true}', "application/json")
        if "head" in Response.__slots__:  # header lines encoded once (issue 19)
            constant.head = b"Content-Type: application/json\r\n"
        server = HttpServer(lambda request: constant)
    else:
        rule = Rule.create(TEMPLATE, 10**12, 1e9, name=RULE, mode="shared")
        router = Router(NodeMetrics())
        RatingApp(
            MemoryStore(Limiter([rule], replica_id="bench-1")),
            region="bench",
            node="bench-1",
            router=router,
        )
        server = HttpServer(router)
    # never started: its lag timer would read as overdue and every request as shed (503)
    server._lag_due = float("inf")
    connection = _Connection(server, asyncio.get_running_loop())
    connection.connection_made(transport)  # type: ignore[arg-type]
    return connection.data_received, transport


def wire_loop(which: str, requests: int) -> None:
    """``requests`` requests, one per read, after 200 to warm up: what callgrind counts."""
    import uvloop

    async def run() -> None:
        feed, transport = wire_feeder(which)
        for _ in range(200 + requests):
            feed(WIRE_REQUEST)
        assert transport.writes == 200 + requests, transport.last[:200]
        assert transport.last.startswith(b"HTTP/1.1 200 "), transport.last[:200]

    uvloop.run(run())


def _wire_instructions(which: str, requests: int) -> int:
    return _report.instructions([sys.executable, __file__, "--wire-loop", which, str(requests)])[0]


def wire_main(args: argparse.Namespace) -> int:
    """Instructions per request of each wire contender (callgrind): the load of the
    machine does not move them, so they show what a change to the hot path saves."""
    if shutil.which("valgrind") is None:
        print("P2 --wire: valgrind is not installed", file=sys.stderr)
        return 2
    machine = _report.machine()
    rows = []
    for which, label in WIRE_CONTENDERS.items():
        ir = (_wire_instructions(which, 1500) - _wire_instructions(which, 500)) / 1000
        rows.append([label, f"{ir:,.0f}"])
    columns = ["contender", "instructions/request"]
    _report.print_table("POST /v1/rate in-process, callgrind", columns, rows)
    if not args.no_record:
        body = [
            "Command: `PYTHONPATH=src .venv/bin/python benchmarks/http_rate.py --wire`",
            "",
            "The Python work of one `POST /v1/rate` (the request wrk sends, one per read) fed "
            "to `_Connection.data_received` in-process, no socket: callgrind's instruction "
            "count (Ir of 1,500 requests − Ir of 500, ÷ 1,000; PYTHONHASHSEED=0), which the "
            "machine's load does not move. The constant handler and the bare httptools "
            "protocol bound what the server's structure and the parser cost.",
            "",
            _report.markdown_table(columns, rows),
        ]
        _report.append_section(
            "P2 per-request work in-process (benchmarks/http_rate.py --wire)",
            "\n".join(body),
            machine=machine,
        )
    return 0


# -- the kernel's share per request (--kernel) ---------------------------------------

# what `perf stat` counts on the server's processes during a round (tracepoints: no PMU
# needed, which this VM lacks); the syscalls a server's request path makes
KERNEL_EVENTS = (
    "task-clock",
    "context-switches",
    "raw_syscalls:sys_enter",
    "syscalls:sys_enter_read",
    "syscalls:sys_enter_recvfrom",
    "syscalls:sys_enter_write",
    "syscalls:sys_enter_writev",
    "syscalls:sys_enter_sendto",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_epoll_pwait",
)


def session_pids(leader: int) -> list[int]:
    """The processes of the session ``leader`` started (nginx: master and worker)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == leader:  # field 6, the session id
            pids.append(int(entry))
    return pids


@dataclass
class CpuSample:
    utime: float  # seconds
    stime: float
    on_cpu: float  # schedstat: seconds run, seconds waited on the run queue
    waited: float
    voluntary: int  # context switches
    involuntary: int

    @classmethod
    def read(cls, pids: Sequence[int]) -> CpuSample:
        hz = os.sysconf("SC_CLK_TCK")
        total = cls(0.0, 0.0, 0.0, 0.0, 0, 0)
        for pid in pids:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total.utime += int(fields[11]) / hz
                total.stime += int(fields[12]) / hz
                run, wait, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
                total.on_cpu += int(run) / 1e9
                total.waited += int(wait) / 1e9
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches"):
                        total.voluntary += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        total.involuntary += int(line.split()[1])
        return total

    def minus(self, before: CpuSample) -> CpuSample:
        return CpuSample(
            self.utime - before.utime,
            self.stime - before.stime,
            self.on_cpu - before.on_cpu,
            self.waited - before.waited,
            self.voluntary - before.voluntary,
            self.involuntary - before.involuntary,
        )


def perf_counts(text: str) -> dict[str, float]:
    """``perf stat -x,`` output: event name -> count (task-clock in ms)."""
    counts = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].replace(".", "", 1).isdigit():
            counts[parts[2]] = float(parts[0])
    return counts


@dataclass
class KernelRound:
    requests: int
    rps: float
    cpu: CpuSample
    wrk_user: float
    wrk_sys: float
    perf: dict[str, float]


def kernel_round(service: Service, url: str, lua: Path, seconds: float) -> KernelRound:
    """One wrk round on ``service``, its processes' CPU and syscalls counted meanwhile."""
    import resource

    pids = session_pids(service.pid)
    perf_out = service.cwd / f"perf-{service.name}.txt"
    perf = None
    if shutil.which("perf") is not None:
        perf = subprocess.Popen(
            [
                *("perf", "stat", "-x,", "-o", str(perf_out)),
                *("-e", ",".join(KERNEL_EVENTS), "-p", ",".join(map(str, pids))),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)  # attached before the round starts
    before = CpuSample.read(pids)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result, _ = run_wrk(url, lua, seconds)
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = CpuSample.read(pids).minus(before)
    counts: dict[str, float] = {}
    if perf is not None:
        perf.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            perf.wait(timeout=10)
        with contextlib.suppress(OSError):
            counts = perf_counts(perf_out.read_text())
    return KernelRound(
        result.requests,
        result.rps,
        cpu,
        after_children.ru_utime - children.ru_utime,
        after_children.ru_stime - children.ru_stime,
        counts,
    )


def kernel_main(args: argparse.Namespace) -> int:
    """CPU per request in user space and in the kernel, and syscalls per request, of
    bucketmesh serve and nginx under the admit scenario's wrk load."""
    if (missing := require_tools()) is not None:
        print(f"P2 --kernel: {missing}", file=sys.stderr)
        return 2
    rounds = args.rounds or 2
    seconds = args.seconds or 5.0
    machine = _report.machine()
    load_before = os.getloadavg()
    scenario = SCENARIOS[0]
    with tempfile.TemporaryDirectory(prefix="bucketmesh-p2k-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        bm = bucketmesh_service(workdir, "bucketmesh", rule_yaml(scenario))
        zone = f"limit_req_zone $http_x_api_key zone=rate:1m rate={scenario.nginx_rate};"
        locations = (
            f"location = /v1/rate {{ limit_req zone=rate burst={scenario.nginx_burst} nodelay; "
            "error_page 429 = @denied; try_files /.none @allowed; }\n"
            f"    location @allowed {{ return 200 '{NGINX_ALLOWED}'; }}\n"
            f"    location @denied {{ return 429 '{NGINX_DENIED}'; }}"
        )
        ngx = nginx_service(workdir, "nginx", locations, zone)
        lua = wrk_lua(
            workdir / "post.lua",
            body='{"tokens":1}',
            headers={"Content-Type": "application/json", "X-API-Key": API_KEY},
        )
        found: dict[str, list[KernelRound]] = {"bucketmesh serve": [], "nginx limit_req": []}
        try:
            bm.start("/healthz")
            ngx.start("/healthz-none")
            services = {"bucketmesh serve": bm, "nginx limit_req": ngx}
            for service in services.values():
                run_wrk(f"http://{HOST}:{service.port}/v1/rate", lua, 1.0)
            for number in range(rounds):
                names = list(services) if number % 2 == 0 else list(reversed(services))
                for name in names:
                    service = services[name]
                    url = f"http://{HOST}:{service.port}/v1/rate"
                    got = kernel_round(service, url, lua, seconds)
                    found[name].append(got)
                    print(
                        f"  round {number + 1}  {name:<18} {got.rps:>9,.0f} req/s  "
                        f"{(got.cpu.on_cpu / got.requests) * 1e6:5.2f} µs CPU per request",
                        flush=True,
                    )
        finally:
            bm.stop()
            ngx.stop()
    load_after = os.getloadavg()

    def per(value: float, rounds_: list[KernelRound], scale: float = 1e6) -> str:
        requests = sum(r.requests for r in rounds_)
        return f"{value / requests * scale:.2f}" if requests else "—"

    columns = ["per request (sum of rounds)", *found]
    rows: list[list[str]] = []

    def row(label: str, pick: Callable[[KernelRound], float], scale: float = 1e6) -> None:
        rows.append([label, *(per(sum(pick(r) for r in rs), rs, scale) for rs in found.values())])

    rows.append(
        [
            "requests/s (median)",
            *(_n(statistics.median([r.rps for r in rs])) for rs in found.values()),
        ]
    )
    row("CPU µs on-CPU (schedstat)", lambda r: r.cpu.on_cpu)
    row("  user µs (utime)", lambda r: r.cpu.utime)
    row("  kernel µs (stime)", lambda r: r.cpu.stime)
    row("µs waited on the run queue", lambda r: r.cpu.waited)
    row("context switches, voluntary", lambda r: r.cpu.voluntary, 1)
    row("context switches, involuntary", lambda r: r.cpu.involuntary, 1)
    if all(r.perf for rs in found.values() for r in rs):
        row("syscalls, all", lambda r: r.perf.get("raw_syscalls:sys_enter", 0), 1)

        def syscalls(*names: str) -> Callable[[KernelRound], float]:
            return lambda r: sum(r.perf.get(f"syscalls:sys_enter_{name}", 0) for name in names)

        row("  read / recvfrom", syscalls("read", "recvfrom"), 1)
        row("  write / writev / sendto", syscalls("write", "writev", "sendto"), 1)
        row("  epoll_wait / epoll_pwait (loop turns)", syscalls("epoll_wait", "epoll_pwait"), 1)
    row("wrk's own CPU µs (user + kernel)", lambda r: r.wrk_user + r.wrk_sys)
    load = f"load {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    _report.print_table(f"CPU and syscalls per request under wrk ({load})", columns, rows)
    if not args.no_record:
        body = [
            "Command: `PYTHONPATH=src .venv/bin/python benchmarks/http_rate.py --kernel` — the "
            f"admit scenario, wrk -t1 -c{CONNECTIONS}, {rounds} rounds × {seconds:g} s per "
            f"server, interleaved; {load} (1-minute average). During each round the "
            "server's processes (nginx: master and worker) are read from /proc (utime and "
            "stime: user and kernel time; schedstat: time on a CPU and time runnable but "
            "waiting for one; context switches) and counted by `perf stat` tracepoints "
            "(syscalls by name, no strace overhead); wrk's own CPU from its rusage. "
            "Figures per request = totals over the rounds ÷ wrk's requests.",
            "",
            _report.markdown_table(columns, rows),
        ]
        _report.append_section(
            "P2 the kernel's share per request (benchmarks/http_rate.py --kernel)",
            "\n".join(body),
            machine=machine,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds × 5 s (a smoke run)")
    parser.add_argument("--rounds", type=int, help="rounds per contender (default 3)")
    parser.add_argument("--seconds", type=float, help="length of one wrk round (default 10)")
    parser.add_argument("--profile", action="store_true", help="py-spy even if P2 is met")
    parser.add_argument("--no-profile", action="store_true", help="never run py-spy")
    parser.add_argument("--no-record", action="store_true", help="do not append BENCHMARKS.md")
    parser.add_argument("--fail-on-miss", action="store_true", help="exit 1 when P2 is missed")
    parser.add_argument("--verbose", action="store_true", help="print every wrk output too")
    parser.add_argument(
        "--scenario", choices=[s.name for s in SCENARIOS], action="append", help="only these"
    )
    parser.add_argument("--wire", action="store_true", help="callgrind Ir/request in-process")
    parser.add_argument(
        "--kernel", action="store_true", help="CPU (user, kernel) and syscalls per request"
    )
    parser.add_argument("--wire-loop", nargs=2, metavar=("WHICH", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.wire_loop:
        wire_loop(args.wire_loop[0], int(args.wire_loop[1]))
        return 0
    if args.wire:
        return wire_main(args)
    if args.kernel:
        return kernel_main(args)
    rounds = args.rounds or (2 if args.quick else 3)
    seconds = args.seconds or (5.0 if args.quick else 10.0)
    if (missing := require_tools()) is not None:
        print(f"P2: {missing}", file=sys.stderr)
        return 2

    machine = _report.machine()
    print(
        f"P2 POST /v1/rate over HTTP: wrk -t1 -c{CONNECTIONS}, {rounds} rounds × {seconds:g} s "
        "per contender, interleaved"
    )
    print(f"machine: {machine.describe()}")
    chosen = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    results: list[ScenarioResult] = []
    log: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bucketmesh-p2-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        for scenario in chosen:
            results.append(run_scenario(scenario, workdir, rounds, seconds, log))

        columns = [
            "contender",
            "best req/s",
            "median req/s",
            "p50 ms (median)",
            "p99 ms (median)",
            "p99 ms (worst)",
            "requests",
            "non-2xx",
            "socket errors",
        ]
        rows = []
        for result in results:
            for c in (result.bucketmesh, result.nginx):
                rows.append(
                    [
                        c.label,
                        _n(c.best),
                        _n(c.median),
                        _ms(c.p50_median),
                        _ms(c.p99_median),
                        _ms(c.p99_worst),
                        _n(c.requests),
                        _n(c.non2xx),
                        ", ".join(f"{k} {v}" for k, v in c.socket_errors.items()) or "0",
                    ]
                )
        ratio_columns = ["bucketmesh ÷ nginx", "median", "best", "P2", "result"]
        ratio_rows = []
        met = True
        judged_any = False
        for result in results:
            ours, theirs = result.bucketmesh, result.nginx
            median = ours.median / (theirs.median or 1.0)
            best = ours.best / (theirs.best or 1.0)
            name = result.scenario.name
            if result.scenario.judged:
                judged_any = True
                ok = median >= P2_RATIO
                p99_ok = ours.p99_median <= P2_P99_MS
                clean = not result.problems
                met = met and ok and p99_ok and clean
                ratio_rows.append(
                    [
                        f"requests/s, {name}",
                        f"{median:.2f}×",
                        f"{best:.2f}×",
                        f"≥ {P2_RATIO:g}×",
                        "pass" if ok else "MISS",
                    ]
                )
                ratio_rows.append(
                    [
                        f"bucketmesh p99 ms, {name}",
                        _ms(ours.p99_median),
                        _ms(min([r.p99_ms for r in ours.runs] or [0.0])),
                        f"≤ {P2_P99_MS:g} ms",
                        "pass" if p99_ok else "MISS",
                    ]
                )
                ratio_rows.append(
                    [
                        f"errors and count checks, {name}",
                        str(len(result.problems)),
                        "—",
                        "0",
                        "pass" if clean else "FAIL",
                    ]
                )
            else:
                ratio_rows.append(
                    [f"requests/s, {name}", f"{median:.2f}×", f"{best:.2f}×", "—", "for context"]
                )
                ratio_rows.append(
                    [
                        f"bucketmesh p99 ms, {name}",
                        _ms(ours.p99_median),
                        _ms(min([r.p99_ms for r in ours.runs] or [0.0])),
                        "—",
                        "for context",
                    ]
                )
        if args.verbose:
            print("\n".join(log))
        check_columns = ["count check (bucketmesh, whole run)", "expected", "observed", "result"]
        check_rows = [row for result in results for row in result.checks]
        problems = [p for result in results for p in result.problems]

        _report.print_table("POST /v1/rate under wrk", columns, rows)
        _report.print_table(
            "Ratios (median of rounds; p99 columns: median, best)", ratio_columns, ratio_rows
        )
        if check_rows:
            _report.print_table("Counts", check_columns, check_rows)
        print("per-round checks and errors: " + ("none wrong" if not problems else ""))
        for problem in problems:
            print(f"  PROBLEM: {problem}")
        verdict = "met" if met and judged_any else ("not judged" if not judged_any else "MISSED")
        print(f"P2 {verdict}")

        profile_lines: list[str] = []
        if ((judged_any and not met) or args.profile) and not args.no_profile:
            print(
                "\nprofiling bucketmesh serve under each scenario's load (py-spy) ...", flush=True
            )
            try:
                profile_lines = profile_p2(workdir, chosen, 3.0 if args.quick else 6.0)
            except (RuntimeError, OSError, subprocess.SubprocessError) as error:
                profile_lines = [f"no profile: {error}"]
            print("\n".join(profile_lines))

    if not args.no_record:
        command = " ".join(
            ["benchmarks/http_rate.py", *(argv if argv is not None else sys.argv[1:])]
        )
        body = [
            f"Command: `{command}` — wrk -t1 -c{CONNECTIONS} --latency, {rounds} rounds × "
            f"{seconds:g} s per contender after a 1 s warm-up, interleaved (order flipped each "
            'round); POST /v1/rate, `X-API-Key: bench`, body `{"tokens":1}`.',
            f"Versions: bucketmesh at the commit above, {tool_versions()}.",
            "Scenarios: *admit* (judged) — bucketmesh capacity 10^12, refill 10^9/s; nginx "
            "`limit_req` rate 10^7 r/s burst 10^5 nodelay: everything allowed. *deny* (context) "
            "— both 1000 tokens, 1000/s: nearly everything answered 429 with a JSON body. "
            "nginx: 1 worker, access log off, keep-alive unbounded, answering through "
            "`try_files /.none @allowed` so that `limit_req` runs (`return` alone would answer "
            "in the rewrite phase, before limit_req).",
            _report.markdown_table(columns, rows),
            _report.markdown_table(ratio_columns, ratio_rows),
        ]
        if check_rows:
            body.append(_report.markdown_table(check_columns, check_rows))
        body.append(
            "Per-round checks (bucketmesh /metrics vs wrk): "
            + ("all held." if not problems else "; ".join(problems))
        )
        body.append(
            f"**P2 {'met' if verdict == 'met' else verdict.lower()}** "
            "(ratio of medians, median p99, no errors)."
        )
        if profile_lines:
            body.append("```\n" + "\n".join(profile_lines) + "\n```")
        path = _report.append_section(
            "P2 HTTP POST /v1/rate vs nginx limit_req" + (" (quick)" if args.quick else ""),
            "\n\n".join(body),
            machine=machine,
        )
        print(f"appended to {path}")
    return 1 if args.fail_on_miss and verdict != "met" else 0


if __name__ == "__main__":
    sys.exit(main())
