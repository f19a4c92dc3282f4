"""P1: decisions per second in one process — bucketmesh against limits and pyrate-limiter.

Target P1 (docs/targets.md): ``Limiter.acquire`` on one hot key, shared mode,
replication bookkeeping on, at ≥ 10× ``limits`` MemoryStorage fixed window and
≥ 20× ``pyrate-limiter``'s in-memory limiter, same process, same run.

Contenders
    bucketmesh, one hot key: a shared-mode rule (capacity 10^10, refill 10^5/s:
    the bucket drains but never empties here, so every decision is allowed and
    marks the key dirty), with ``collect_deltas()`` run as the sync loop would,
    after every batch of at most 10,000 calls and at most 20 ms; its cost is
    inside the timing. Also the same on an exhausted bucket (denied path), and
    over 100,000 distinct keys created in a warm-up pass and then cycled.
    limits 5.x, MemoryStorage: FixedWindowRateLimiter.hit on one key and on
    100,000 keys, MovingWindowRateLimiter.hit on one key; 10^9 per second, so
    every hit is allowed (a moving window's cost grows with the hits it holds,
    here about one second's worth).
    pyrate-limiter 4.x: ``Limiter(InMemoryBucket([Rate(10**9, Duration.SECOND)]))``,
    ``try_acquire(key, 1, False)`` (non-blocking), every call allowed.

Method
    Each contender is the same plain loop, ``for key in keys: call(key)``, over a
    prebuilt batch of keys, with the call and its fixed arguments bound to
    locals; ``time.perf_counter_ns`` is read once per batch, never per call.
    Contenders run in alternating rounds (rotated order; garbage collected and
    background timer threads settled, outside timing, before each round), so
    machine noise hits all alike. Per contender: best and median µs per decision
    over the rounds; ratios are comparator time ÷ bucketmesh time, and a target
    is judged on the ratio of medians. Counts that noise cannot move are
    checked too: every timed bucketmesh call was granted (or, denied path, none),
    and the dirty set really was fed. When a target is missed, a cProfile of
    the hot loop shows where the time goes.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/inprocess.py [--quick]``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import _report

from bucketmesh.core.limiter import Limiter
from bucketmesh.core.rules import Rule

DISTINCT_KEYS = 100_000
SYNC_EVERY_CALLS = 10_000  # collect_deltas at least every N calls...
SYNC_EVERY_NS = 20_000_000  # ...and at least every 20 ms
MAX_BATCH = 10_000
MIN_BATCH = 100
CALIBRATION_OPS = 2_000
TARGETS = {"limits fixed window": 10.0, "pyrate-limiter": 20.0}

HOT_KEY = "bench-hot-k"
HOT_CAPACITY = 10**10
HOT_RATE = 100_000.0
COMPARATOR_LIMIT = 10**9  # per second: every comparator hit is allowed


@dataclass
class Contender:
    label: str
    library: str
    loop: Callable[[list[str]], None]
    """The timed loop: ``for key in keys: call(key)``."""
    decide: Callable[[str], bool]
    """One call, its answer as allowed/denied; only for checks, outside timing."""
    keys: list[str]
    allowed: bool
    """What every timed decision must answer."""
    after_batch: Callable[[], object] | None = None
    """Runs after each batch, inside timing (bucketmesh: the sync loop's collect)."""
    sync_bound: bool = False
    """Batches must also respect the 20 ms sync cadence."""
    grants: Callable[[], int] | None = None
    """Tokens granted so far, as the limiter itself counts them."""
    verify: Callable[[], str | None] | None = None
    """A last check after the rounds; returns what is wrong, if anything."""
    batches: list[list[str]] = field(default_factory=list)
    cursor: int = 0
    rounds_ns: list[float] = field(default_factory=list)
    measured_ops: int = 0

    @property
    def best(self) -> float:
        return min(self.rounds_ns)

    @property
    def median(self) -> float:
        return statistics.median(self.rounds_ns)

    def set_batch(self, size: int) -> None:
        if len(self.keys) == 1:
            self.batches = [self.keys * size]
        else:
            self.batches = [self.keys[i : i + size] for i in range(0, len(self.keys), size)]
        self.cursor = 0


# -- contenders ----------------------------------------------------------------


def _acquire_loop(acquire: Callable[[str], object]) -> Callable[[list[str]], None]:
    def loop(keys: list[str], acquire: Callable[[str], object] = acquire) -> None:
        for key in keys:
            acquire(key)

    return loop


def _bucketmesh(
    label: str, rule: Rule, keys: list[str], *, exhaust: bool = False
) -> tuple[Contender, Limiter]:
    limiter = Limiter([rule], replica_id="bench/inprocess/1")
    acquire = limiter.acquire
    # Buckets are created (and the denied one exhausted) before anything is timed.
    for key in keys:
        first = acquire(key, rule=rule.name)
        if not first.allowed:
            raise RuntimeError(f"{label}: the first acquire on {key!r} was denied")
        if exhaust:
            acquire(key, rule.capacity - 1)
    limiter.collect_deltas()

    def grants() -> int:
        return sum(bucket.mine for bucket in limiter.buckets.values())

    def verify() -> str | None:
        if len(limiter.buckets) != len(keys):
            return f"{len(limiter.buckets)} live buckets, expected {len(keys)}"
        if exhaust:
            return None
        limiter.collect_deltas()
        acquire(keys[0])
        if keys[0] not in limiter.dirty:
            return "an allowed acquire did not mark its key dirty: bookkeeping is off"
        batch = limiter.collect_deltas()
        if [delta.key for delta in batch.deltas] != [keys[0]]:
            return f"collect_deltas gave {len(batch.deltas)} deltas, expected 1"
        return None

    contender = Contender(
        label=label,
        library="bucketmesh",
        loop=_acquire_loop(acquire),
        decide=lambda key: acquire(key).allowed,
        keys=keys,
        allowed=not exhaust,
        after_batch=limiter.collect_deltas,
        sync_bound=True,
        grants=grants,
        verify=verify,
    )
    return contender, limiter


def bucketmesh_contenders(many_keys: list[str]) -> list[Contender]:
    template = "bench-{{ .Request.Header.X-API-Key }}"
    hot = Rule.create(template, HOT_CAPACITY, HOT_RATE, name="hot", mode="shared")
    # capacity 1, one token per ~11.6 days: empty after its first grant
    denied = Rule.create(template, 1, 1e-6, name="denied", mode="shared")
    return [
        _bucketmesh("bucketmesh acquire, 1 hot key", hot, [HOT_KEY])[0],
        _bucketmesh("bucketmesh acquire, 1 key, denied", denied, [HOT_KEY], exhaust=True)[0],
        _bucketmesh(f"bucketmesh acquire, {len(many_keys):,} keys", hot, many_keys)[0],
    ]


_limits_storages: list[object] = []


def _limits(label: str, strategy: str, keys: list[str]) -> Contender:
    from limits import RateLimitItemPerSecond
    from limits.storage import MemoryStorage
    from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

    storage = MemoryStorage()
    _limits_storages.append(storage)
    kind = FixedWindowRateLimiter if strategy == "fixed" else MovingWindowRateLimiter
    hit = kind(storage).hit
    item = RateLimitItemPerSecond(COMPARATOR_LIMIT)
    for key in keys:
        hit(item, key)

    def loop(keys: list[str], hit: Callable[..., bool] = hit, item: object = item) -> None:
        for key in keys:
            hit(item, key)

    return Contender(
        label=label,
        library=f"limits {strategy} window",
        loop=loop,
        decide=lambda key: hit(item, key),
        keys=keys,
        allowed=True,
    )


def limits_contenders(many_keys: list[str]) -> list[Contender]:
    return [
        _limits("limits fixed window hit, 1 key", "fixed", [HOT_KEY]),
        _limits(f"limits fixed window hit, {len(many_keys):,} keys", "fixed", many_keys),
        _limits("limits moving window hit, 1 key", "moving", [HOT_KEY]),
    ]


_pyrate_limiters: list[object] = []


def pyrate_contender() -> Contender:
    from pyrate_limiter import Duration, InMemoryBucket, Limiter, Rate

    limiter = Limiter(InMemoryBucket([Rate(COMPARATOR_LIMIT, Duration.SECOND)]))
    _pyrate_limiters.append(limiter)
    try_acquire = limiter.try_acquire

    def loop(keys: list[str], try_acquire: Callable[..., object] = try_acquire) -> None:
        for key in keys:
            try_acquire(key, 1, False)

    return Contender(
        label="pyrate-limiter try_acquire, 1 key",
        library="pyrate-limiter",
        loop=loop,
        decide=lambda key: bool(try_acquire(key, 1, False)),
        keys=[HOT_KEY],
        allowed=True,
    )


# -- measuring -----------------------------------------------------------------


def settle() -> None:
    """Outside timing: collect garbage and let limits' expiry timers finish their pass."""
    gc.collect()
    deadline = time.monotonic() + 1.0
    for storage in _limits_storages:
        timer = getattr(storage, "timer", None)
        while timer is not None and timer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.002)


def run_batches(contender: Contender, budget_ns: int) -> tuple[int, int]:
    """Run whole batches until ``budget_ns`` has passed; (decisions, elapsed ns)."""
    loop = contender.loop
    after = contender.after_batch
    batches = contender.batches
    count = len(batches)
    index = contender.cursor
    clock = time.perf_counter_ns
    ops = 0
    start = clock()
    while True:
        keys = batches[index]
        loop(keys)
        if after is not None:
            after()
        ops += len(keys)
        index += 1
        if index == count:
            index = 0
        elapsed = clock() - start
        if elapsed >= budget_ns:
            break
    contender.cursor = index
    return ops, elapsed


def warm_up(contender: Contender, round_ns: int) -> None:
    """Check the answers, then size the batch: ≤ 10,000 calls, ≤ 1/20 of a round,
    and for bucketmesh ≤ 20 ms, so collect_deltas keeps the sync loop's cadence."""
    keys = contender.keys
    sample = [keys[i % len(keys)] for i in range(MIN_BATCH)]
    answers = [contender.decide(key) for key in sample]
    if any(answer != contender.allowed for answer in answers):
        expected = "allowed" if contender.allowed else "denied"
        raise RuntimeError(f"{contender.label}: a warm-up decision was not {expected}")
    contender.set_batch(CALIBRATION_OPS)
    run_batches(contender, 0)
    ops, elapsed = run_batches(contender, 0)
    per_op = max(elapsed / ops, 1.0)
    size = min(MAX_BATCH, int(round_ns / 20 / per_op))
    if contender.sync_bound:
        size = min(size, SYNC_EVERY_CALLS, int(SYNC_EVERY_NS / per_op))
    contender.set_batch(max(MIN_BATCH, size))


def measure(contenders: list[Contender], rounds: int, round_ns: int) -> None:
    for contender in contenders:
        warm_up(contender, round_ns)
    before = {id(c): c.grants() for c in contenders if c.grants is not None}
    for number in range(rounds):
        shift = number % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            settle()
            ops, elapsed = run_batches(contender, round_ns)
            contender.rounds_ns.append(elapsed / ops)
            contender.measured_ops += ops
    for contender in contenders:
        if contender.grants is not None:
            granted = contender.grants() - before[id(contender)]
            expected = contender.measured_ops if contender.allowed else 0
            if granted != expected:
                raise RuntimeError(
                    f"{contender.label}: {granted:,} tokens granted in "
                    f"{contender.measured_ops:,} timed calls, expected {expected:,}"
                )
        if contender.verify is not None and (problem := contender.verify()) is not None:
            raise RuntimeError(f"{contender.label}: {problem}")
        if contender.decide(contender.keys[0]) != contender.allowed:
            raise RuntimeError(f"{contender.label}: the last decision changed its answer")


def profile(contender: Contender, ops: int) -> list[str]:
    """The top functions, by own time, of the hot loop (with its collect_deltas)."""
    profiler = cProfile.Profile()
    loop, after, batch = contender.loop, contender.after_batch, contender.batches[0]
    done = 0
    profiler.enable()
    while done < ops:
        loop(batch)
        if after is not None:
            after()
        done += len(batch)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = sum(entry[2] for entry in stats.stats.values()) or 1.0  # type: ignore[attr-defined]
    top = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:8]  # type: ignore[attr-defined]
    lines = [f"cProfile of {done:,} hot-key calls (profiler overhead inflates every figure):"]
    lines.append(f"{'own time':>9} {'ns/decision':>11} {'calls':>10}  function")
    for (filename, line, name), (_, calls, own, _, _) in top:
        where = name if filename == "~" else f"{name} ({os.path.basename(filename)}:{line})"
        lines.append(f"{own / total:>9.1%} {own * 1e9 / done:>11.0f} {calls:>10,}  {where}")
    return lines


# -- reporting -----------------------------------------------------------------


def _us(ns: float) -> str:
    return f"{ns / 1000:.3f}"


def _per_s(ns: float) -> str:
    return f"{1e9 / ns:,.0f}"


def result_rows(contenders: list[Contender]) -> list[list[str]]:
    return [
        [c.label, _us(c.best), _us(c.median), _per_s(c.best), _per_s(c.median)] for c in contenders
    ]


def ratio_rows(by_label: dict[str, Contender]) -> tuple[list[list[str]], bool]:
    """bucketmesh decisions/s ÷ the comparator's (= their µs ÷ ours), with P1's verdicts."""
    hot = "bucketmesh acquire, 1 hot key"
    many = f"bucketmesh acquire, {DISTINCT_KEYS:,} keys"
    comparisons = [
        ("1 hot key vs limits fixed window", hot, "limits fixed window hit, 1 key", True),
        ("1 hot key vs pyrate-limiter", hot, "pyrate-limiter try_acquire, 1 key", True),
        (
            f"{DISTINCT_KEYS:,} keys vs limits fixed window",
            many,
            f"limits fixed window hit, {DISTINCT_KEYS:,} keys",
            False,
        ),
        ("1 hot key vs limits moving window", hot, "limits moving window hit, 1 key", False),
    ]
    rows = []
    met = True
    for name, ours_label, theirs_label, judged in comparisons:
        ours, theirs = by_label[ours_label], by_label[theirs_label]
        median = theirs.median / ours.median
        best = theirs.best / ours.best
        if judged:
            goal = TARGETS[theirs.library]
            target = f"≥ {goal:g}×"
            verdict = "pass" if median >= goal else "MISS"
            met = met and median >= goal
        else:
            target, verdict = "—", "for context"
        rows.append([name, f"{median:.2f}×", f"{best:.2f}×", target, verdict])
    return rows, met


def _core() -> str:
    """Which decision core this process runs (docs/build.md)."""
    from bucketmesh import _native

    return "compiled (mypyc)" if _native.compiled() else "pure-Python"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 short rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, help="rounds per contender (default 5)")
    parser.add_argument("--seconds", type=float, help="length of one round (default 0.5 s)")
    parser.add_argument("--profile", action="store_true", help="profile even if P1 is met")
    parser.add_argument("--no-record", action="store_true", help="do not append BENCHMARKS.md")
    parser.add_argument("--fail-on-miss", action="store_true", help="exit 1 when P1 is missed")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    seconds = args.seconds or (0.15 if args.quick else 0.5)
    round_ns = int(seconds * 1e9)

    machine = _report.machine()
    print(f"P1 in-process decisions: {rounds} rounds × {seconds:g} s per contender, interleaved")
    print(f"machine: {machine.describe()}")
    many_keys = [f"bench-many-{i:06d}" for i in range(DISTINCT_KEYS)]
    contenders = [
        *bucketmesh_contenders(many_keys),
        *limits_contenders(many_keys),
        pyrate_contender(),
    ]
    measure(contenders, rounds, round_ns)

    by_label = {c.label: c for c in contenders}
    hot = contenders[0]
    columns = ["contender", "best µs", "median µs", "best ops/s", "median ops/s"]
    rows = result_rows(contenders)
    ratio_columns = ["bucketmesh speed-up (× decisions/s)", "median", "best", "P1", "result"]
    ratios, met = ratio_rows(by_label)
    _report.print_table("Decisions in one process", columns, rows)
    _report.print_table("Ratios", ratio_columns, ratios)
    sync_ms = len(hot.batches[0]) * hot.median / 1e6
    cadence = (
        f"collect_deltas() every {len(hot.batches[0]):,} calls "
        f"(~{sync_ms:.1f} ms at the median rate), inside the timing"
    )
    print(f"P1 {'met' if met else 'MISSED'}; bucketmesh hot key: {cadence}")

    profile_lines: list[str] = []
    if not met or args.profile:
        profile_lines = profile(hot, 20_000 if args.quick else 200_000)
        print("\n" + "\n".join(profile_lines))

    if not args.no_record:
        command = " ".join(
            ["benchmarks/inprocess.py", *(argv if argv is not None else sys.argv[1:])]
        )
        body = [
            f"Command: `{command}` — {rounds} rounds × {seconds:g} s per contender, "
            "interleaved; µs per decision, best and median over the rounds.",
            f"Versions: bucketmesh at the commit above ({_core()} core), "
            f"{_report.versions('limits', 'pyrate-limiter')}.",
            f"bucketmesh: shared mode, {cadence} (over {DISTINCT_KEYS:,} keys each collect "
            f"builds one delta per key touched); limits and pyrate-limiter at "
            f"{COMPARATOR_LIMIT:,}/s, every call allowed.",
            _report.markdown_table(columns, rows),
            _report.markdown_table(ratio_columns, ratios),
            f"**P1 {'met' if met else 'missed'}** (judged on the ratio of medians).",
        ]
        if profile_lines:
            body.append("```\n" + "\n".join(profile_lines) + "\n```")
        path = _report.append_section(
            "P1 in-process decisions" + (" (quick)" if args.quick else ""),
            "\n\n".join(body),
            machine=machine,
        )
        print(f"appended to {path}")

    for limiter in _pyrate_limiters:
        limiter.close()  # type: ignore[attr-defined]
    return 1 if args.fail_on_miss and not met else 0


if __name__ == "__main__":
    sys.exit(main())
