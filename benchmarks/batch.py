"""P3: decisions per second through ``POST /v1/rate/batch``, 100 decisions per request.

Target P3 (docs/targets.md): ≥ 1,000,000 decisions/s from one ``bucketmesh serve``
process. That target is absolute, so the same run also measures, for scale, the
same server answering one decision per ``POST /v1/rate`` and nginx
``limit_req`` (1 worker) on this machine — on the 2-core reference machine
nginx did ~116k requests/s, so 1,000,000 decisions/s is ~8.6× nginx there.

Contenders
    batch, 1 hot key: 100 items ``{"key": "hot", "rule": "bulk", "tokens": 1}``.
    batch, 100 keys: 100 items, keys ``k00`` … ``k99``.
    The rule ``bulk`` holds 10^12 tokens and refills 10^9/s: every item is allowed
    and, in shared mode, marks its key dirty for the sync loop.
    For scale: ``POST /v1/rate`` (one decision, ``X-API-Key``) on the same server,
    and nginx ``limit_req`` answering a small JSON body (as in benchmarks/http_rate.py).

Method
    wrk, 1 thread, 50 connections, 10 s per round (5 s with --quick), with a Lua
    script holding the prebuilt JSON body (``"atomic": false``), so wrk sends the
    same bytes over and over; decisions/s = requests/s × 100. One 1 s warm-up
    each, then alternating rounds (the order rotates), best and median per
    contender; the target is judged on the median. Counts that noise cannot move
    are checked after every round on bucketmesh's /metrics: requests answered
    within [wrk's count, + connections], 100 decisions per 200 response, none
    denied, no other status; at the end, from GET /v1/bucket/state, the hot key's
    Σ used is 100 × the hot batches answered, every one of the 100 keys has used
    the same count, and their sum is every allowed ``bulk`` decision. When P3 is
    missed, py-spy samples the server under each batch load and splits its time:
    decoding the body, validating items, deciding, building the result structs,
    encoding, and the HTTP layer around it.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/batch.py [--quick]`` (needs nginx, wrk).

The handler alone (``--handler``; no HTTP, no nginx, no wrk): the route's own work
for one 100-item batch — decode the body, validate, decide (``acquire_columns``:
columns, no object per item, when every item names a live bucket), render the
results — called in a loop in this process on a real ``RatingApp`` over a
``MemoryStore`` (journal on, as with a snapshot file), against ``limits``
MemoryStorage fixed-window ``hit`` called 100 times (one key) in the same
alternating rounds; ns per decision, medians, and their ratio. With
``--callgrind`` (valgrind installed) it also counts the instructions per decision
of each handler contender — (Ir of 300 batches − Ir of 100 batches) / 20,000,
valgrind's own counts, which the machine's load does not move. With ``--phases`` too, it
splits those instructions by step: decoding the body, deciding as columns
(``acquire_columns``), rendering the answer (``_columns_response``) and the rest of the
route, each counted as the difference of two loops that stop one step apart.
Run: ``PYTHONPATH=src .venv/bin/python benchmarks/batch.py --handler [--callgrind [--phases]]``.
"""

from __future__ import annotations

import argparse
import json
import linecache
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import _report
import http_rate as hb

BATCH = 100
P3_TARGET = 1_000_000
NGINX_REFERENCE = 116_000  # requests/s, docs/targets.md reference machine
CONNECTIONS = hb.CONNECTIONS
HOST = hb.HOST
BULK = "bulk"
HOT_KEY = "hot"
MANY_KEYS = [f"k{i:02d}" for i in range(BATCH)]
API_KEY = "bench"

RULES_YAML = (
    f'  - name: {hb.RULE}\n    key: "{hb.TEMPLATE}"\n    capacity: {10**12}\n'
    "    refillRate: 1e9\n    ttl: 3600\n    mode: shared\n"
    f'  - name: {BULK}\n    key: "bulk-{{{{ .Request.Header.X-Bulk-Key }}}}"\n'
    f"    capacity: {10**12}\n    refillRate: 1e9\n    ttl: 3600\n    mode: shared\n"
)


def batch_body(keys: list[str]) -> str:
    items = [{"key": key, "rule": BULK, "tokens": 1} for key in keys]
    return json.dumps({"requests": items, "atomic": False}, separators=(",", ":"))


# -- the in-process split, from py-spy stacks ---------------------------------------------

PHASES = (
    "decode body (msgspec)",
    "validate & resolve items",
    "decide (Limiter.acquire)",
    "build result structs + metrics",
    "encode response (msgspec)",
    "other inside rate_batch",
    "HTTP: write response (encode head, send)",
    "HTTP: parse request, dispatch",
    "event loop / other",
)
_DECIDE = ("_acquire", "Limiter.acquire", "Bucket.acquire", "_batch_atomic")


def _phase(parsed: list[tuple[str, str, int]]) -> str:
    names = [name for name, _, _ in parsed]
    for depth in range(len(parsed) - 1, -1, -1):
        name, path, line = parsed[depth]
        if not (name == "RatingApp.rate_batch" or name.endswith(".rate_batch")):
            continue
        below = names[depth + 1 :]
        source = linecache.getline(path, line)
        # the comprehension's own frame counts as deciding, like the calls beneath it
        if any(n.endswith(d) for n in below for d in _DECIDE) or any(
            d in source for d in ("_acquire", "_batch_atomic")
        ):
            return "decide (Limiter.acquire)"
        if any(n.endswith("count_decision") for n in below):
            return "build result structs + metrics"
        if "decode" in source:
            return "decode body (msgspec)"
        if "encode" in source:
            return "encode response (msgspec)"
        if any(w in source for w in ("DecisionBody", "astuple", "results", "for decision", "+=")):
            return "build result structs + metrics"
        if any(w in source for w in ("item", "resolved", "rule", "key")):
            return "validate & resolve items"
        return "other inside rate_batch"
    if any(n.endswith(w) for n in names for w in ("_write_response", "_write_out", "_flush")):
        return "HTTP: write response (encode head, send)"
    if any(n.endswith("data_received") for n in names):
        return "HTTP: parse request, dispatch"
    return "event loop / other"


def split_lines(stacks: list[tuple[list[str], int]], label: str) -> list[str]:
    total = sum(count for _, count in stacks) or 1
    phases: Counter[str] = Counter()
    for frames, count in stacks:
        phases[_phase([hb._frame(f) for f in frames])] += count
    lines = [f"cost split, {label} ({total:,} py-spy samples of the busy server):"]
    lines += [f"  {phases[p] / total:6.1%}  {p}" for p in PHASES if phases[p]]
    return lines


def profile_batches(
    service: object, loads: list[tuple[str, Path]], seconds: float, workdir: Path
) -> list[str]:
    """py-spy on the server while wrk drives each batch body in turn."""
    lines: list[str] = []
    for label, lua in loads:
        out = workdir / f"py-spy-{label.replace(' ', '-')}.txt"
        url = f"http://{HOST}:{service.port}/v1/rate/batch"  # type: ignore[attr-defined]
        wrk = subprocess.Popen(
            ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds + 2:g}s", "-s", str(lua), url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            time.sleep(0.5)
            stacks = hb.py_spy_stacks(service.pid, seconds, out)  # type: ignore[attr-defined]
        finally:
            try:
                wrk.wait(timeout=seconds + 10)
            except subprocess.TimeoutExpired:
                wrk.kill()
                wrk.wait(timeout=5)
        lines += [f"--- {label}", ""]
        lines += split_lines(stacks, label)
        lines.append("")
        lines += hb.summarise_stacks(stacks, split_functions=("RatingApp.rate_batch",), top=10)
        lines.append("")
    return lines


# -- run ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds × 5 s (a smoke run)")
    parser.add_argument("--rounds", type=int, help="rounds per contender (default 3)")
    parser.add_argument("--seconds", type=float, help="length of one wrk round (default 10)")
    parser.add_argument("--profile", action="store_true", help="py-spy even if P3 is met")
    parser.add_argument("--no-profile", action="store_true", help="never run py-spy")
    parser.add_argument("--no-record", action="store_true", help="do not append BENCHMARKS.md")
    parser.add_argument("--fail-on-miss", action="store_true", help="exit 1 when P3 is missed")
    parser.add_argument("--verbose", action="store_true", help="print every wrk output too")
    parser.add_argument("--handler", action="store_true", help="the route alone, in-process")
    parser.add_argument("--callgrind", action="store_true", help="with --handler: Ir/decision")
    parser.add_argument(
        "--phases",
        action="store_true",
        help="with --handler --callgrind: instructions per decision of each step",
    )
    parser.add_argument("--loop", nargs=2, metavar=("KEYS", "BATCHES"), help=argparse.SUPPRESS)
    parser.add_argument("--phase", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loop:
        handler_loop(args.loop[0], int(args.loop[1]))
        return 0
    if args.phase:
        phase_loop(args.phase[0], args.phase[1], int(args.phase[2]))
        return 0
    if args.handler:
        return handler_main(args)
    rounds = args.rounds or (2 if args.quick else 3)
    seconds = args.seconds or (5.0 if args.quick else 10.0)
    if (missing := hb.require_tools()) is not None:
        print(f"P3: {missing}", file=sys.stderr)
        return 2

    machine = _report.machine()
    print(
        f"P3 POST /v1/rate/batch, {BATCH} decisions per request: wrk -t1 -c{CONNECTIONS}, "
        f"{rounds} rounds × {seconds:g} s per contender, interleaved"
    )
    print(f"machine: {machine.describe()}")
    problems: list[str] = []
    checks: list[list[str]] = []
    profile_lines: list[str] = []
    log: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bucketmesh-p3-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        bm = hb.bucketmesh_service(workdir, "bucketmesh-batch", RULES_YAML)
        admit = hb.SCENARIOS[0]
        ngx = hb.nginx_service(
            workdir,
            "nginx-yardstick",
            "location = /v1/rate { limit_req zone=rate "
            f"burst={admit.nginx_burst} nodelay; try_files /.none @allowed; }}\n"
            f"    location @allowed {{ return 200 '{hb.NGINX_ALLOWED}'; }}",
            f"limit_req_zone $http_x_api_key zone=rate:1m rate={admit.nginx_rate};",
        )
        json_headers = {"Content-Type": "application/json"}
        hot_body = batch_body([HOT_KEY] * BATCH)
        many_body = batch_body(MANY_KEYS)
        hot_lua = hb.wrk_lua(workdir / "hot.lua", body=hot_body, headers=json_headers)
        many_lua = hb.wrk_lua(workdir / "many.lua", body=many_body, headers=json_headers)
        single_lua = hb.wrk_lua(
            workdir / "single.lua",
            body='{"tokens":1}',
            headers={**json_headers, "X-API-Key": API_KEY},
        )
        try:
            bm.start("/healthz")
            ngx.start("/healthz-none")
            print(f"bucketmesh on :{bm.port}, nginx on :{ngx.port}", flush=True)
            # Each body once by hand: 100 results, all allowed, before any load.
            for body in (hot_body, many_body):
                status, answer = hb.http_request(
                    bm.port, "POST", "/v1/rate/batch", body.encode(), json_headers
                )
                decoded = json.loads(answer) if status == 200 else {}
                if status != 200 or decoded.get("allowed") != BATCH:
                    problems.append(f"a first batch answered {status}: {answer[:200]!r}")
            hot_watch = hb.BucketmeshWatch(bm.port, "batch", BULK, CONNECTIONS, BATCH)
            many_watch = hb.BucketmeshWatch(bm.port, "batch", BULK, CONNECTIONS, BATCH)
            single_watch = hb.BucketmeshWatch(bm.port, "rate", hb.RULE, CONNECTIONS)
            hot = hb.Contender(
                f"batch of {BATCH}, 1 hot key",
                bm,
                "/v1/rate/batch",
                hot_lua,
                check=hot_watch.check,
                before=hot_watch.before,
            )
            many = hb.Contender(
                f"batch of {BATCH}, {BATCH} keys",
                bm,
                "/v1/rate/batch",
                many_lua,
                check=many_watch.check,
                before=many_watch.before,
            )
            single = hb.Contender(
                "POST /v1/rate, 1 decision (same server)",
                bm,
                "/v1/rate",
                single_lua,
                check=single_watch.check,
                before=single_watch.before,
            )
            nginx = hb.Contender("nginx limit_req, 1 decision", ngx, "/v1/rate", single_lua)
            contenders = [hot, many, single, nginx]
            problems += rotate(contenders, rounds, seconds, log)
            if args.verbose:
                print("\n".join(log))

            if bm.alive():
                checks, more = final_checks(bm.port)
                problems += more
            for service in (bm, ngx):
                problems += [f"{service.name} logged: {line}" for line in hb.server_errors(service)]
            for contender in contenders:
                if contender.socket_errors:
                    problems.append(
                        f"{contender.label}: wrk socket errors {contender.socket_errors}"
                    )
                if contender.non2xx:
                    problems.append(f"{contender.label}: {contender.non2xx:,} non-2xx responses")

            columns = [
                "contender",
                "best req/s",
                "median req/s",
                "best decisions/s",
                "median decisions/s",
                "p50 ms",
                "p99 ms",
                "non-2xx",
                "socket errors",
            ]
            rows = []
            for contender in contenders:
                per = BATCH if contender in (hot, many) else 1
                rows.append(
                    [
                        contender.label,
                        hb._n(contender.best),
                        hb._n(contender.median),
                        hb._n(contender.best * per),
                        hb._n(contender.median * per),
                        hb._ms(contender.p50_median),
                        hb._ms(contender.p99_median),
                        hb._n(contender.non2xx),
                        ", ".join(f"{k} {v}" for k, v in contender.socket_errors.items()) or "0",
                    ]
                )
            verdict_columns = ["figure", "median", "best", "P3", "result"]
            verdicts = []
            met = not problems
            for contender in (hot, many):
                median, best = contender.median * BATCH, contender.best * BATCH
                ok = median >= P3_TARGET
                met = met and ok
                verdicts.append(
                    [
                        f"decisions/s, {contender.label}",
                        hb._n(median),
                        hb._n(best),
                        f"≥ {P3_TARGET:,}",
                        "pass" if ok else "MISS",
                    ]
                )
            for contender in (hot, many):
                for other, what in ((single, "POST /v1/rate req/s"), (nginx, "nginx req/s")):
                    verdicts.append(
                        [
                            f"{contender.label}: decisions/s ÷ {what}",
                            f"{contender.median * BATCH / (other.median or 1.0):.2f}×",
                            f"{contender.best * BATCH / (other.best or 1.0):.2f}×",
                            f"{P3_TARGET / NGINX_REFERENCE:.1f}× (reference machine)"
                            if other is nginx
                            else "—",
                            "for context",
                        ]
                    )
            verdicts.append(
                [
                    "errors and count checks",
                    str(len(problems)),
                    "—",
                    "0",
                    "pass" if not problems else "FAIL",
                ]
            )
            _report.print_table(
                f"POST /v1/rate/batch ({BATCH} per request) under wrk", columns, rows
            )
            _report.print_table("P3", verdict_columns, verdicts)
            if checks:
                _report.print_table(
                    "Counts",
                    ["count check (bucketmesh, whole run)", "expected", "observed", "result"],
                    checks,
                )
            print("per-round checks and errors: " + ("none wrong" if not problems else ""))
            for problem in problems:
                print(f"  PROBLEM: {problem}")
            print(f"P3 {'met' if met else 'MISSED'}")

            if (not met or args.profile) and not args.no_profile and bm.alive():
                print("\nprofiling bucketmesh serve under each batch load (py-spy) ...", flush=True)
                try:
                    profile_lines = profile_batches(
                        bm,
                        [(hot.label, hot_lua), (many.label, many_lua)],
                        3.0 if args.quick else 6.0,
                        workdir,
                    )
                except (RuntimeError, OSError, subprocess.SubprocessError) as error:
                    profile_lines = [f"no profile: {error}"]
                print("\n".join(profile_lines))
        finally:
            bm.stop()
            ngx.stop()

    if not args.no_record:
        command = " ".join(["benchmarks/batch.py", *(argv if argv is not None else sys.argv[1:])])
        body = [
            f"Command: `{command}` — wrk -t1 -c{CONNECTIONS} --latency, {rounds} rounds × "
            f"{seconds:g} s per contender after a 1 s warm-up, interleaved (order rotated each "
            f"round); POST /v1/rate/batch with a prebuilt body of {BATCH} items "
            f'(`{{"key": …, "rule": "{BULK}", "tokens": 1}}`, `"atomic": false`, '
            f"{len(hot_body):,} bytes); decisions/s = requests/s × {BATCH}.",
            f"Versions: bucketmesh at the commit above, {hb.tool_versions()}.",
            f"Rule `{BULK}`: capacity 10^12, refill 10^9/s, shared mode — every item allowed. "
            "For scale, the same server on POST /v1/rate (one decision) and nginx `limit_req` "
            f"(1 worker) in the same rounds; on the reference machine nginx did "
            f"~{NGINX_REFERENCE // 1000}k requests/s, i.e. P3 is "
            f"~{P3_TARGET / NGINX_REFERENCE:.1f}× nginx there.",
            _report.markdown_table(columns, rows),
            _report.markdown_table(verdict_columns, verdicts),
        ]
        if checks:
            body.append(
                _report.markdown_table(
                    ["count check (bucketmesh, whole run)", "expected", "observed", "result"],
                    checks,
                )
            )
        body.append(
            "Per-round checks (bucketmesh /metrics vs wrk): "
            + ("all held." if not problems else "; ".join(problems))
        )
        body.append(f"**P3 {'met' if met else 'missed'}** (median decisions/s, no errors).")
        if profile_lines:
            body.append("```\n" + "\n".join(profile_lines).strip() + "\n```")
        path = _report.append_section(
            "P3 batch decisions over HTTP" + (" (quick)" if args.quick else ""),
            "\n\n".join(body),
            machine=machine,
        )
        print(f"appended to {path}")
    return 1 if args.fail_on_miss and not met else 0


def rotate(contenders: list[Any], rounds: int, seconds: float, log: list[str]) -> list[str]:
    """Warm each up, then run rounds, the order rotated by one every round."""
    problems: list[str] = []
    for contender in contenders:
        hb.run_wrk(contender.url, contender.lua, 1.0)
    for number in range(rounds):
        shift = number % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            problems += hb.interleave_one(contender, number, seconds, log)
            if not contender.service.alive():
                return problems
    return problems


def final_checks(port: int) -> tuple[list[list[str]], list[str]]:
    """Σ used per key (bucket state) against the decisions and responses counted."""
    rows: list[list[str]] = []
    problems: list[str] = []
    final = hb.settled_counts(port, "batch", BULK)
    answered = final.statuses.get(200, 0)
    hot_used, _ = hb.used_of(port, HOT_KEY)
    many_used = [hb.used_of(port, key)[0] for key in MANY_KEYS]
    same = len(set(many_used)) == 1
    rows.append(
        [
            f"every one of the {BATCH} keys used the same number of tokens",
            "1 distinct value",
            f"{len(set(many_used))} ({min(many_used):,}…{max(many_used):,})",
            "ok" if same else "WRONG",
        ]
    )
    if not same:
        problems.append(f"the {BATCH} keys used differing counts: {sorted(set(many_used))[:5]}")
    hot_batches, rest = divmod(hot_used, BATCH)
    rows.append(
        [
            f"hot key Σ used is a multiple of {BATCH}",
            "remainder 0",
            f"{hot_used:,} (remainder {rest})",
            "ok" if rest == 0 else "WRONG",
        ]
    )
    if rest:
        problems.append(f"hot key used {hot_used:,}, not a multiple of {BATCH}")
    batches = hot_batches + many_used[0]
    rows.append(
        [
            "batches seen in bucket state = batch 200 responses (metrics)",
            f"{answered:,}",
            f"{batches:,} (hot {hot_batches:,} + keys {many_used[0]:,})",
            "ok" if batches == answered else "WRONG",
        ]
    )
    if batches != answered:
        problems.append(f"{batches:,} batches in bucket state, {answered:,} batch 200 responses")
    used = hot_used + sum(many_used)
    rows.append(
        [
            f"Σ used of all {BATCH + 1} keys = allowed '{BULK}' decisions (metrics)",
            f"{final.allowed:,}",
            f"{used:,}",
            "ok" if used == final.allowed and not final.denied else "WRONG",
        ]
    )
    if used != final.allowed or final.denied:
        problems.append(
            f"Σ used {used:,} vs {final.allowed:,} allowed, {final.denied:,} denied decisions"
        )
    others = {s: n for s, n in final.statuses.items() if s != 200}
    rows.append(
        ["batch responses other than 200", "0", str(others or 0), "ok" if not others else "WRONG"]
    )
    if others:
        problems.append(f"batch responses other than 200: {others}")
    return rows, problems


# -- the handler alone, in-process (--handler) -------------------------------------------


def handler_app() -> tuple[Any, Any]:
    """A real RatingApp on a MemoryStore whose limiter journals (as with a snapshot)."""
    from bucketmesh.api.routes import RatingApp
    from bucketmesh.core.limiter import Limiter
    from bucketmesh.core.rules import Rule
    from bucketmesh.http.server import Request
    from bucketmesh.storage.memory import MemoryStore

    rule = Rule.create(
        "bulk-{{ .Request.Header.X-Bulk-Key }}", 10**12, 1e9, name=BULK, mode="shared"
    )
    limiter = Limiter([rule], replica_id="bench-1")
    limiter.enable_journal()
    app = RatingApp(MemoryStore(limiter), region="bench", node="bench-1")

    def request(keys: list[str]) -> Any:
        return Request(
            "POST",
            "/v1/rate/batch",
            {},
            {"content-type": "application/json"},
            batch_body(keys).encode(),
            "127.0.0.1",
            "1.1",
        )

    return app, request


HANDLER_KEYS = {"hot": [HOT_KEY] * BATCH, "many": MANY_KEYS}


def handler_loop(which: str, batches: int) -> None:
    """``batches`` calls of the batch handler (after 20 to warm up): what callgrind counts."""
    app, request = handler_app()
    req = request(HANDLER_KEYS[which])
    handle = app.rate_batch
    for _ in range(20 + batches):
        handle(req)


#: the handler's work in cumulative steps (``--phases``): each loop does its step and
#: every step before it, so the difference of two steps' counts is the later one's cost
PHASES_STEPS = ("decode", "decide", "render", "handler")


def phase_loop(which: str, step: str, batches: int) -> None:
    """``batches`` runs of the batch handler's work up to ``step`` (PHASES_STEPS): the
    body decoded (msgspec), the items decided as columns (``acquire_columns``: rule and
    bucket per item, the decisions, the dirty set and the journal), the answer rendered
    (``_columns_response``: metrics and the body), or the whole route (``rate_batch``:
    the checks around it and the commit barrier)."""
    app, request = handler_app()
    req = request(HANDLER_KEYS[which])
    body = req.body
    decode = app.batch_decoder.decode
    columns = app.decider.acquire_columns
    render = app._columns_response
    handle = app.rate_batch
    upto = PHASES_STEPS.index(step)
    handle(req)  # the buckets exist from here on: every later batch takes the columns
    for _ in range(20 + batches):
        if upto == 3:
            handle(req)
            continue
        items = decode(body).requests
        if upto >= 1:
            decided = columns(items)
            if upto >= 2:
                render(decided)


def _instructions(which: str, batches: int, step: str | None = None) -> int:
    loop = (
        ["--loop", which, str(batches)] if step is None else ["--phase", which, step, str(batches)]
    )
    return _report.instructions([sys.executable, __file__, *loop])[0]


def _core() -> str:
    """Which decision core this process runs (docs/build.md)."""
    from bucketmesh import _native

    return "compiled (mypyc)" if _native.compiled() else "pure-Python"


def handler_main(args: argparse.Namespace) -> int:
    import statistics
    import timeit

    from limits import RateLimitItemPerSecond
    from limits.storage import MemoryStorage
    from limits.strategies import FixedWindowRateLimiter

    rounds = args.rounds or (3 if args.quick else 7)
    machine = _report.machine()
    app, request = handler_app()
    limiter = FixedWindowRateLimiter(MemoryStorage())
    item = RateLimitItemPerSecond(10**9)

    def limits_batch() -> None:
        hit = limiter.hit
        for _ in range(BATCH):
            hit(item, HOT_KEY)

    contenders: dict[str, Any] = {
        "bucketmesh batch handler, 1 hot key": (app.rate_batch, request(HANDLER_KEYS["hot"])),
        "bucketmesh batch handler, 100 keys": (app.rate_batch, request(HANDLER_KEYS["many"])),
        "limits fixed window hit × 100, 1 key": (lambda _: limits_batch(), None),
    }
    per: dict[str, list[float]] = {name: [] for name in contenders}
    number = 100 if args.quick else 300
    for call, req in contenders.values():
        for _ in range(20):
            call(req)
    for r in range(rounds):
        names = list(contenders)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            call, req = contenders[name]
            seconds = timeit.timeit(lambda c=call, q=req: c(q), number=number)
            per[name].append(seconds / number / BATCH * 1e9)
    medians = {name: statistics.median(values) for name, values in per.items()}
    comparator = medians["limits fixed window hit × 100, 1 key"]
    rows = [
        [
            name,
            f"{medians[name]:,.0f}",
            f"{min(per[name]):,.0f}",
            f"{comparator / medians[name]:.2f}×",
        ]
        for name in contenders
    ]
    columns = ["contender", "ns/decision (median)", "best", "limits ÷ this"]
    _report.print_table("batch handler in-process, ns per decision", columns, rows)
    body = [
        f"Command: `PYTHONPATH=src .venv/bin/python benchmarks/batch.py --handler"
        f"{' --callgrind' if args.callgrind else ''}{' --quick' if args.quick else ''}`",
        "",
        f"The batch route's handler alone (decode, validate, decide — as columns, "
        f"``acquire_columns``, when every item names a live bucket — and render; no HTTP), "
        f"{rounds} alternating rounds of {number} batches of {BATCH}, against `limits` "
        f"MemoryStorage fixed window `hit` × {BATCH} in the same rounds. "
        f"{_report.versions('limits')}. Decision core: {_core()}.",
        "",
        _report.markdown_table(columns, rows),
    ]
    if args.callgrind:
        ir_rows = []
        for which, name in (("hot", "1 hot key"), ("many", "100 keys")):
            ir = (_instructions(which, 300) - _instructions(which, 100)) / (200 * BATCH)
            ir_rows.append([f"batch handler, {name}", f"{ir:,.0f}"])
        _report.print_table("callgrind", ["contender", "instructions/decision"], ir_rows)
        body += [
            "",
            "Instructions per decision (callgrind: Ir of 300 batches − Ir of 100, ÷ 20,000):",
            "",
            _report.markdown_table(["contender", "instructions/decision"], ir_rows),
        ]
    if args.callgrind and args.phases:
        step_names = {
            "decode": "decode the body (msgspec)",
            "decide": "decide as columns (acquire_columns: rule, bucket, dirty set, journal)",
            "render": "render the answer (_columns_response: metrics, body)",
            "handler": "the rest of the route (checks, commit barrier)",
        }
        phase_rows = []
        for which, name in (("hot", "1 hot key"), ("many", "100 keys")):
            before = 0.0
            for step in PHASES_STEPS:
                upto = (_instructions(which, 300, step) - _instructions(which, 100, step)) / (
                    200 * BATCH
                )
                phase_rows.append([name, step_names[step], f"{upto - before:,.0f}"])
                before = upto
            phase_rows.append([name, "total", f"{before:,.0f}"])
        phase_columns = ["batch", "step", "instructions/decision"]
        _report.print_table("callgrind, by step", phase_columns, phase_rows)
        body += [
            "",
            "By step (callgrind, each step's loop minus the previous step's, same counts):",
            "",
            _report.markdown_table(phase_columns, phase_rows),
        ]
    if not args.no_record:
        _report.append_section(
            "P3 batch handler in-process (benchmarks/batch.py --handler)",
            "\n".join(body),
            machine=machine,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
