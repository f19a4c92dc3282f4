"""Strict mode: utilisation of the global limit, the static split against the rebalancer.

Three regions run the real ``Limiter`` (``core/limiter.py``, ``core/shares.py``) in
simulated time: each region's decisions are local; every 20 ms a region sends its
deltas to the others, which receive them 50 ms later (one-way delay); every 250 ms
each region runs the rebalancer (as ``bucketmesh serve`` does). The key's limit is
capacity ``CAPACITY``, refill ``RATE``/s; the demand is ``DEMAND`` times the limit in
all, split over the regions by the skew (requests of one token, Poisson arrivals from
a seeded generator). Skews: 33/33/33, 60/20/20, 90/5/5, 100/0/0, and 90/5/5 whose busy
region moves every 30 s.

* **static** — shares off: each region holds a fixed third (what strict mode was);
* **rebalancer** — transferable shares (docs/sync.md, "Strict mode").

Reported per cell: utilisation = admitted / (refill × duration) after the first 10 s;
time to reach 95 % (the first instant whose trailing 2 s admitted ≥ 95 % of the refill,
"never" if none; for the moving skew, the worst over the moves); and the total admitted
against what the limit allows, ``max over windows W of admitted(W) / (C + r·|W|)``
over every window of whole 10 ms ticks (must be ≤ 100.0 %: the script fails otherwise).

Simulated time, so the figures are counts that machine noise cannot move.
Run: ``PYTHONPATH=src .venv/bin/python benchmarks/strict_shares.py [--quick]``.
"""

from __future__ import annotations

import argparse
import random
import sys

import _report
import msgspec

from bucketmesh.core.bucket import NS_PER_S, STRICT
from bucketmesh.core.limiter import DeltaBatch, Limiter
from bucketmesh.core.rules import Rule

REGIONS = ("us-east-1", "eu-central-1", "ap-southeast-2")
CAPACITY, RATE = 100, 100.0
DEMAND = 1.5  # total demand, times the limit
TICK_NS = 10_000_000
SYNC_TICKS, DELAY_TICKS, REBALANCE_TICKS = 2, 5, 25
SKEWS: dict[str, tuple[float, float, float]] = {
    "33/33/33": (1 / 3, 1 / 3, 1 / 3),
    "60/20/20": (0.6, 0.2, 0.2),
    "90/5/5": (0.9, 0.05, 0.05),
    "100/0/0": (1.0, 0.0, 0.0),
    "90/5/5 moving every 30 s": (0.9, 0.05, 0.05),
}
MOVE_TICKS = 3000  # 30 s

_decode = msgspec.msgpack.Decoder(DeltaBatch).decode
_encode = msgspec.msgpack.Encoder().encode


def run(skew: str, shares: bool, seconds: int, seed: int) -> tuple[float, float | None, float]:
    """(utilisation after 10 s, seconds to reach 95 % or None, worst admitted/allowed)."""
    rng = random.Random(seed)
    rule = Rule.create("q-{{ .Request.ClientIP }}", CAPACITY, RATE, name="q", mode=STRICT)
    now = 1_700_000_000 * NS_PER_S
    limiters = []
    for region in REGIONS:
        limiter = Limiter([rule], replica_id=f"{region}/n/1", regions=len(REGIONS))
        if shares:
            limiter.enable_shares(region, REGIONS)
        limiters.append(limiter)
    weights = list(SKEWS[skew])
    moving = "moving" in skew
    in_flight: list[tuple[int, int, bytes]] = []
    admitted: list[int] = []
    ticks = seconds * NS_PER_S // TICK_NS
    per_tick = DEMAND * RATE * TICK_NS / NS_PER_S
    moves = [0]
    for tick in range(ticks):
        now += TICK_NS
        if moving and tick and tick % MOVE_TICKS == 0:
            weights = weights[-1:] + weights[:-1]  # the busy region moves
            moves.append(tick)
        due = [m for m in in_flight if m[0] <= tick]
        in_flight = [m for m in in_flight if m[0] > tick]
        for _, dst, data in due:
            limiters[dst].merge(_decode(data), now=now)
        got = 0
        for index, limiter in enumerate(limiters):
            mean = per_tick * weights[index]
            # Poisson arrivals: a Knuth draw (mean is small per tick)
            count, bound, product = 0, pow(2.718281828459045, -mean), rng.random()
            while product > bound:
                count += 1
                product *= rng.random()
            for _ in range(count):
                got += limiter.acquire("q-1", 1, now=now).allowed
        admitted.append(got)
        if shares and tick % REBALANCE_TICKS == 0:
            for limiter in limiters:
                limiter.rebalance(
                    now, period_s=REBALANCE_TICKS * TICK_NS / NS_PER_S, connected=True
                )
        if tick % SYNC_TICKS == 0:
            for index, limiter in enumerate(limiters):
                data = _encode(limiter.collect_deltas())
                for dst in range(len(limiters)):
                    if dst != index:
                        in_flight.append((tick + DELAY_TICKS, dst, data))
    per_tick_rate = RATE * TICK_NS / NS_PER_S
    warm = 10 * NS_PER_S // TICK_NS
    utilisation = sum(admitted[warm:]) / (per_tick_rate * (ticks - warm))
    window = 2 * NS_PER_S // TICK_NS
    reached: list[float | None] = []
    for start in moves:
        found = None
        total = sum(admitted[start : start + window])
        for end in range(start + window, min(ticks, start + MOVE_TICKS if moving else ticks)):
            if total >= 0.95 * per_tick_rate * window:
                found = (end - start) * TICK_NS / NS_PER_S
                break
            total += admitted[end] - admitted[end - window]
        reached.append(found)
    to_95 = None if any(r is None for r in reached) else max(r for r in reached if r is not None)
    # worst window: max over t1 < t2 of (A(t2) − A(t1)) / (C + r·(t2 − t1))
    prefix = [0]
    for value in admitted:
        prefix.append(prefix[-1] + value)
    worst = 0.0
    step = max(1, ticks // 400)  # window starts sampled; every end
    for t1 in range(0, ticks, step):
        for t2 in range(t1 + 1, ticks + 1):
            allowed = CAPACITY + per_tick_rate * (t2 - t1)
            ratio = (prefix[t2] - prefix[t1]) / allowed
            if ratio > worst:
                worst = ratio
    return utilisation, to_95, worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 s instead of 120 s simulated")
    parser.add_argument("--no-record", action="store_true", help="do not append BENCHMARKS.md")
    args = parser.parse_args(argv)
    seconds = 60 if args.quick else 120
    machine = _report.machine()
    columns = [
        "skew",
        "static: utilisation",
        "rebalancer: utilisation",
        "rebalancer: time to 95 %",
        "static: admitted / allowed",
        "rebalancer: admitted / allowed",
    ]
    rows = []
    over = False
    for index, skew in enumerate(SKEWS):
        static = run(skew, False, seconds, seed=index)
        moving = run(skew, True, seconds, seed=index)
        over = over or static[2] > 1.0 or moving[2] > 1.0
        rows.append(
            [
                skew,
                f"{100 * static[0]:.1f} %",
                f"{100 * moving[0]:.1f} %",
                "never" if moving[1] is None else f"{moving[1]:.2f} s",
                f"{100 * static[2]:.1f} %",
                f"{100 * moving[2]:.1f} %",
            ]
        )
    title = "Strict mode: utilisation of the global limit, static split vs rebalancer"
    _report.print_table(title, columns, rows)
    if not args.no_record:
        command = " ".join(
            ["benchmarks/strict_shares.py", *(argv if argv is not None else sys.argv[1:])]
        )
        body = "\n".join(
            [
                f"Command: `{command}` — 3 regions of the real `Limiter` in simulated time "
                f"({seconds} s, 10 ms ticks), deltas every 20 ms arriving 50 ms later, the "
                f"rebalancer every 250 ms; limit capacity {CAPACITY}, refill {RATE:g}/s; "
                f"Poisson demand {DEMAND:g}× the limit split by the skew. Utilisation = "
                "admitted / (refill × time) after the first 10 s; time to 95 % = first "
                "trailing 2 s at ≥ 95 % (worst over the moves of the moving skew); "
                "admitted / allowed = the worst window's admitted / (C + r·|W|), which "
                "must stay ≤ 100.0 %.",
                "",
                _report.markdown_table(columns, rows),
            ]
        )
        _report.append_section(title, body, machine=machine)
    if over:
        print("FAILED: a cell admitted more than the limit allows", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
