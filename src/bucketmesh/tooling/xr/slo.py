"""The SLO table of a scenario run: what was measured, against which threshold.

The seed's SLOs (p50 ≤ 100 ms, p95 ≤ 200 ms, consumption within ±5 % of
expected, replication lag ≤ 150 ms, error rate during failover ≤ 5 %) and
ours (convergence after heal, over-admission within the documented bound,
serving again after a crash, every verify phase).

Expected consumption, for one fresh key saturated over a window ``W`` (first
to last request of the run's loads): ``C + r·W`` — a full bucket, then the
refill — or every request when the load never empties the bucket. A
partition admits up to ``(k−1)·(C + r·P)`` more (docs/sync.md), but that is
debt the refill repays after the heal, so a run whose load continues long
enough after the heal must still land within ±5 %. Whatever debt is still
owed when the load ends — a shortened (``--scale``) run ends long before the
refill repays it — is added to the expected figure: the bucket's level below
zero at the last answer, read from the first state poll after it at which
every region has heard every spend (less the refill since). Over-admission is
``admitted − (C + r·W)`` and must stay within the documented bound: the
connected steady-state term ``(n−1)·(1 + r·d)`` (``d`` = sync interval + one-way
latency, or the measured lag p99 if longer), plus ``C + r·P`` per partition,
plus per crash what the dead node granted that no peer had received (measured
from the state polls, at least ``r·d``).

Replication lag is the p99 of ``crdt_sync_duration_seconds`` over the scrape
intervals outside fault windows (a partition or crash and a few seconds
after): what the backlog of a healed partition shows is catch-up, measured
as convergence time instead.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bucketmesh.tooling.xr.runner import RunResult, Window
    from bucketmesh.tooling.xr.scrape import StatePoint


@dataclass
class SLOResult:
    name: str
    threshold: str
    measured: str
    passed: bool | None  # None: not applicable in this run
    note: str = ""

    @property
    def verdict(self) -> str:
        return "n/a" if self.passed is None else ("PASS" if self.passed else "FAIL")


def histogram_quantile(bounds: list[float], counts: list[float], q: float) -> float | None:
    """The ``q`` quantile of a cumulative Prometheus histogram (linear in a bucket)."""
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return previous_bound
            share = (
                (rank - previous_count) / (count - previous_count) if count > previous_count else 1
            )
            return previous_bound + (bound - previous_bound) * share
        previous_bound, previous_count = bound, count
    return previous_bound


def _overlaps(start: float, end: float, windows: list[Window]) -> bool:
    return any(start < w.settled and end > w.start for w in windows)


def lag_intervals(result: RunResult) -> list[tuple[float, float, str, list[float], list[float]]]:
    """Per scrape interval and receiving region: (start, end, region, bounds, cumulative
    counts of lag observed in that interval), all peers together."""
    rows = [
        s
        for s in result.scraper.families.get("crdt_sync_duration_seconds", [])
        if s.name == "crdt_sync_duration_seconds_bucket"
    ]
    by_scrape: dict[tuple[str, float], dict[float, float]] = {}
    for s in rows:
        bound = float(s.labels["le"])
        series = by_scrape.setdefault((s.region, s.t), {})
        series[bound] = series.get(bound, 0.0) + s.value
    intervals = []
    for region in result.urls:
        times = sorted(t for (r, t) in by_scrape if r == region)
        for before, after in itertools.pairwise(times):
            a, b = by_scrape[(region, before)], by_scrape[(region, after)]
            bounds = sorted(b)
            counts = [b[x] - a.get(x, 0.0) for x in bounds]
            if counts and counts[-1] < 0:  # the node restarted: its counters did too
                counts = [b[x] for x in bounds]
            intervals.append((before, after, region, bounds, counts))
    return intervals


def steady_lag_p99(result: RunResult) -> tuple[float | None, int]:
    """p99 replication lag (seconds) outside fault windows, and how many deltas it covers."""
    total: dict[float, float] = {}
    for start, end, _region, bounds, counts in lag_intervals(result):
        if _overlaps(start, end, result.windows):
            continue
        for bound, count in zip(bounds, counts, strict=True):
            total[bound] = total.get(bound, 0.0) + count
    bounds = sorted(total)
    counts = [total[b] for b in bounds]
    return histogram_quantile(bounds, counts, 0.99), int(counts[-1]) if counts else 0


def unrepaid_debt(result: RunResult, end: float) -> float:
    """Tokens the bucket still owed at ``end`` (seconds since t0): a partition's
    over-admission the refill had not repaid yet. Read from the first state poll
    after ``end`` at which every region has heard every spend (the merged level
    then, less the refill since ``end``); 0 when there is none, or when the bucket
    was full again by then (the debt is repaid, whatever it was)."""
    polls: dict[float, list[StatePoint]] = {}
    for point in result.watcher.points:
        if point.t >= end:
            polls.setdefault(point.t, []).append(point)
    for t in sorted(polls):
        points = polls[t]
        if len(points) == len(result.urls) and all(p.unseen == 0 for p in points):
            level = min(p.tokens_remaining for p in points)
            if level >= result.capacity:
                return 0.0
            # whole tokens: the level is one, and half a token of refill is no debt
            return float(max(0, math.floor(result.refill_rate * (t - end) - level)))
    return 0.0


def consumption(result: RunResult) -> tuple[int, float, float, float, float]:
    """(admitted, expected, window W, over-admission vs C + r·W, unrepaid debt D).

    Expected is ``C + r·W + D`` (or every request, when fewer were made).

    W runs from the first request's due time to the last answer: the span in which
    the bucket could grant anything. (The load phases' own start and end also count
    opening connections and draining answers, which on a saturated machine adds
    refill no request could take.)"""
    loads = [load for load in result.loads if load.end > load.start]
    recorder = result.recorder
    admitted = recorder.allowed_by_key and sum(recorder.allowed_by_key.values())
    if not loads:
        return int(admitted or 0), 0.0, 0.0, 0.0, 0.0
    if recorder.first_due is not None and recorder.last_answer is not None:
        window = max(0.0, recorder.last_answer - recorder.first_due)
        end = recorder.last_answer - recorder.t0
    else:
        window = max(load.end for load in loads) - min(load.start for load in loads)
        end = max(load.end for load in loads)
    limit = result.capacity + result.refill_rate * window
    debt = unrepaid_debt(result, end) if result.partitions else 0.0
    totals = result.recorder.totals()
    expected = min(limit + debt, float(totals.allowed + totals.denied))
    return int(admitted or 0), expected, window, float(admitted or 0) - limit, debt


def sync_delay(result: RunResult) -> float:
    """``d`` of the bound, in seconds: the nominal one-way sync delay (interval +
    injected latency and jitter, plus a retransmission under loss), or the
    measured replication lag p99 when that was longer — the bound holds for the
    delay the mesh actually had, and the lag SLO judges that delay separately."""
    scenario = result.scenario
    net = scenario.network
    d = (scenario.sync_interval_ms + net.latency_ms + net.jitter_ms) / 1000
    if net.loss:
        d += max(0.2, 2 * net.latency_ms / 1000)  # a lost segment costs one retransmission
    measured, _ = steady_lag_p99(result)
    return max(d, measured or 0.0)


def over_admission_bound(result: RunResult) -> float:
    scenario = result.scenario
    n = len(result.urls)
    r, c = result.refill_rate, result.capacity
    per_region = c if scenario.slo.over_admission_model == "worst" else 1
    bound = (n - 1) * (per_region + r * sync_delay(result))
    bound += sum(c + r * p for p in result.partitions)
    bound += crash_grants(result)
    return bound


def crash_grants(result: RunResult) -> float:
    """The over-admission a crash allows: what the killed node granted that no peer
    had received (docs/sync.md, "Failure modes"), at least ``r·d``. Measured from the
    state polls: for each replica of the killed region seen before the kill, what
    it had granted in the end (the restarted node restores its log and sends it)
    less the most any other region had heard of it before the node was started
    again. A kill while the bucket still drains loses far more than
    ``r·d``: the node grants at its request rate until it dies."""
    d = sync_delay(result)
    seen = result.watcher.replicas_seen
    total = 0.0
    for window in result.windows:
        if window.kind != "crash":
            continue
        prefix = window.region + "/"
        lives = {
            rid
            for t, _region, used in seen
            if t < window.start
            for rid in used
            if rid.startswith(prefix)
        }
        # until the node is started again nothing can tell the others of its log
        restarts = [
            e.t
            for e in result.events
            if e.kind == "restart" and e.region == window.region and e.t >= window.start
        ]
        restarted = min(restarts, default=window.end)
        heard = dict.fromkeys(lives, 0)
        for t, region, used in seen:
            if region != window.region and t <= restarted:
                for rid in lives:
                    heard[rid] = max(heard[rid], used.get(rid, 0))
        final = {rid: max((used.get(rid, 0) for _t, _r, used in seen), default=0) for rid in lives}
        lost = sum(final[rid] - heard[rid] for rid in lives)
        total += max(lost, result.refill_rate * d)
    return total


def error_rate_during_failover(result: RunResult) -> tuple[int, int, str]:
    recorder = result.recorder
    if not result.windows:
        total = recorder.totals()
        return total.errors, total.allowed + total.denied + total.errors, "whole run (no fault)"
    errors = requests = 0
    for window in result.windows:
        e, n = recorder.errors_between(window.start, window.settled)
        errors += e
        requests += n
    return errors, requests, f"{len(result.windows)} fault window(s)"


def evaluate(result: RunResult) -> list[SLOResult]:
    slo = result.scenario.slo
    total = result.recorder.totals()
    out: list[SLOResult] = []
    answered = total.latency.get_total_count()
    for name, q, limit in (
        ("latency p50", 50, slo.latency_p50_ms),
        ("latency p95", 95, slo.latency_p95_ms),
    ):
        if not answered:
            out.append(SLOResult(name, f"≤ {limit:g} ms", "no answers", False))
            continue
        ms = total.latency.get_value_at_percentile(q) / 1000
        out.append(
            SLOResult(name, f"≤ {limit:g} ms", f"{ms:.2f} ms", ms <= limit, f"{answered} answers")
        )
    admitted, expected, window, over, debt = consumption(result)
    if expected > 0:
        deviation = (admitted - expected) / expected * 100
        owed = f" + unrepaid partition debt {debt:.0f}" if debt else ""
        out.append(
            SLOResult(
                "token consumption vs expected",
                f"within ±{slo.consumption_pct:g} %",
                f"{deviation:+.2f} %",
                abs(deviation) <= slo.consumption_pct,
                f"admitted {admitted}, expected {expected:.0f} "
                f"(C {result.capacity:g} + r {result.refill_rate:g}/s × W {window:.1f} s{owed})",
            )
        )
    else:
        out.append(SLOResult("token consumption vs expected", "±5 %", "no load", None))
    lag, samples = steady_lag_p99(result)
    if lag is None:
        out.append(
            SLOResult(
                "replication lag p99",
                f"≤ {slo.replication_lag_ms:g} ms",
                "no delta replicated outside fault windows",
                None,
            )
        )
    else:
        out.append(
            SLOResult(
                "replication lag p99",
                f"≤ {slo.replication_lag_ms:g} ms",
                f"{lag * 1000:.1f} ms",
                lag * 1000 <= slo.replication_lag_ms,
                f"{samples} delta batches outside fault windows",
            )
        )
    errors, requests, where = error_rate_during_failover(result)
    rate = errors / requests * 100 if requests else 0.0
    out.append(
        SLOResult(
            "error rate during failover",
            f"≤ {slo.failover_error_rate_pct:g} %",
            f"{rate:.2f} %",
            rate <= slo.failover_error_rate_pct,
            f"{errors} errors of {requests} requests, {where}; "
            f"{total.failed_over} requests failed over to another region",
        )
    )
    if result.convergence:
        worst = [c for _, c in result.convergence]
        measured = "never" if None in worst else f"{max(c for c in worst if c is not None):.3f} s"
        out.append(
            SLOResult(
                "convergence after heal",
                f"≤ {slo.convergence_s:g} s",
                measured,
                None not in worst and max(c for c in worst if c is not None) <= slo.convergence_s,
                f"{len(worst)} heal(s); every region knows every replica's spend at the heal",
            )
        )
    else:
        out.append(
            SLOResult("convergence after heal", f"≤ {slo.convergence_s:g} s", "no heal", None)
        )
    bound = over_admission_bound(result)
    limit = bound * slo.over_admission_bound_share
    out.append(
        SLOResult(
            "over-admission vs documented bound",
            f"≤ {limit:.0f} tokens",
            f"{over:+.0f} tokens",
            over <= limit if expected > 0 else None,
            f"bound = (n−1)({'C' if result.scenario.slo.over_admission_model == 'worst' else '1'}"
            " + r·d) + Σ partitions (C + r·P) + Σ crashes (grants no peer had heard of) "
            f"= {bound:.0f} with d = {sync_delay(result) * 1000:.0f} ms"
            + (
                f" × {slo.over_admission_bound_share:g}"
                if slo.over_admission_bound_share != 1
                else ""
            ),
        )
    )
    if result.restarts:
        times = [t for _, t in result.restarts]
        worst_restart = None if None in times else max(t for t in times if t is not None)
        out.append(
            SLOResult(
                "serving again after kill -9",
                f"≤ {slo.restart_s:g} s",
                "never" if worst_restart is None else f"{worst_restart:.2f} s",
                worst_restart is not None and worst_restart <= slo.restart_s,
                ", ".join(r for r, _ in result.restarts),
            )
        )
    for i, verdict in enumerate(result.verdicts):
        out.append(
            SLOResult(
                f"verify #{i + 1}: regions agree",
                f"spread ≤ {verdict.tolerance:g} token(s), or identical replicas",
                verdict.judged,
                verdict.passed,
                "; ".join(
                    f"{v.region} {v.tokens_remaining:g}"
                    if v.error is None
                    else f"{v.region} {v.error}"
                    for v in verdict.views
                )
                + ("; replicas identical" if verdict.replicas_identical else "; replicas differ"),
            )
        )
    return out


def passed(results: list[SLOResult]) -> bool:
    return all(r.passed is not False for r in results)
