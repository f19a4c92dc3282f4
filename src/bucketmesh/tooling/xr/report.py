"""The report of a scenario run: one HTML file, PNG plots (matplotlib) and CSVs.

Layout of the output directory::

    report.html              summary, SLO table, events, per-region figures, the plots
    slo.csv                  the SLO table
    latency.png              p50/p95/p99 per second, per region
    decisions.png            allowed / denied / errors per second, per region
    tokens.png               tokens_remaining per region: divergence and re-convergence
    replication_lag.png      p99 and mean replication lag per scrape interval, per region
    csv/requests_per_second.csv   the load generator's time series
    csv/bucket_state.csv     the key's state in every region, every 250 ms
    csv/events.csv           partition, heal, kill, restart, verify...
    csv/metrics/<family>.csv every scraped Prometheus family, one file each

Fault windows (partitions, crashes) are shaded in every plot.
"""

from __future__ import annotations

import csv
import html
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from bucketmesh.tooling.xr.slo import SLOResult, histogram_quantile, lag_intervals

if TYPE_CHECKING:
    from bucketmesh.tooling.xr.runner import RunResult

WINDOW_COLOURS = {"partition": "#f4b183", "crash": "#c9a0dc"}


def per_second_rows(result: RunResult) -> list[list[object]]:
    rows: list[list[object]] = []
    for region, record in sorted(result.recorder.regions.items()):
        for second, data in sorted(record.seconds.items()):
            h = data.latency
            answered = h.get_total_count()

            def pct(q: float, h=h, answered=answered) -> object:  # type: ignore[no-untyped-def]
                return round(h.get_value_at_percentile(q) / 1000, 3) if answered else ""

            rows.append(
                [
                    second,
                    region,
                    data.allowed,
                    data.denied,
                    data.errors,
                    data.failed_over,
                    pct(50),
                    pct(95),
                    pct(99),
                    round(h.get_max_value() / 1000, 3) if answered else "",
                ]
            )
    return rows


def write_csvs(result: RunResult, slos: list[SLOResult], out: Path) -> list[Path]:
    directory = out / "csv"
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    path = directory / "requests_per_second.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "second",
                "region",
                "allowed",
                "denied",
                "errors",
                "failed_over",
                "p50_ms",
                "p95_ms",
                "p99_ms",
                "max_ms",
            ]
        )
        writer.writerows(per_second_rows(result))
    written.append(path)
    written.append(result.watcher.write_csv(directory / "bucket_state.csv"))
    path = directory / "events.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["t_s", "event", "region", "detail"])
        for event in result.events:
            writer.writerow([round(event.t, 3), event.kind, event.region, event.detail])
    written.append(path)
    path = out / "slo.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slo", "threshold", "measured", "verdict", "note"])
        for s in slos:
            writer.writerow([s.name, s.threshold, s.measured, s.verdict, s.note])
    written.append(path)
    written.extend(result.scraper.write_csv(directory / "metrics"))
    return written


def _shade(ax: Axes, result: RunResult) -> None:
    for window in result.windows:
        ax.axvspan(
            window.start,
            window.end,
            color=WINDOW_COLOURS.get(window.kind, "#dddddd"),
            alpha=0.35,
            label=f"{window.kind} {window.region}",
        )
    for event in result.events:
        if event.kind in ("heal", "restart"):
            ax.axvline(event.t, color="#555555", linestyle=":", linewidth=1)


def _legend(ax: Axes) -> None:
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")


def plot_latency(result: RunResult, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(10, 4))
    for region, record in sorted(result.recorder.regions.items()):
        seconds = sorted(s for s, d in record.seconds.items() if d.latency.get_total_count())
        for q, style in ((50, "-"), (95, "--"), (99, ":")):
            ax.plot(
                [s + 0.5 for s in seconds],
                [record.seconds[s].latency.get_value_at_percentile(q) / 1000 for s in seconds],
                style,
                label=f"{region} p{q}",
            )
    _shade(ax, result)
    ax.set_yscale("log")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("decision latency (ms, client side)")
    ax.set_title("Latency percentiles per second")
    _legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_decisions(result: RunResult, path: Path) -> Path:
    fig, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True)
    for region, record in sorted(result.recorder.regions.items()):
        seconds = sorted(record.seconds)
        x = [s + 0.5 for s in seconds]
        axes[0].plot(x, [record.seconds[s].allowed for s in seconds], label=region)
        axes[1].plot(x, [record.seconds[s].denied for s in seconds], label=region)
        axes[2].plot(x, [record.seconds[s].errors for s in seconds], label=region)
    for ax, title in zip(axes, ("allowed / s", "denied / s (429)", "errors / s"), strict=True):
        _shade(ax, result)
        ax.set_ylabel(title)
        _legend(ax)
    axes[0].axhline(result.refill_rate, color="black", linewidth=0.8, linestyle="--")
    axes[0].set_title(f"Decisions per second (dashed: refill rate {result.refill_rate:g}/s)")
    axes[2].set_xlabel("seconds since start (by due time)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_tokens(result: RunResult, path: Path) -> Path:
    """Two views of the one bucket per region: the level, and the spend the region
    has not heard of yet. A saturated bucket reads ~0 on both sides of a
    partition, and both sides spend the refill at the same rate, so the level
    hides the divergence; the unseen spend shows it growing during the
    partition and dropping to 0 when the regions converge (the level then dips
    into the debt the refill repays)."""
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for region in result.urls:
        points = [p for p in result.watcher.points if p.region == region]
        t = [p.t for p in points]
        style = {"marker": ".", "markersize": 2, "linewidth": 1, "label": region}
        axes[0].plot(t, [p.tokens_remaining for p in points], **style)
        axes[1].plot(t, [p.unseen for p in points], **style)
    for ax in axes:
        _shade(ax, result)
        _legend(ax)
    axes[0].axhline(0, color="black", linewidth=0.6)
    axes[0].set_ylabel("tokens_remaining")
    axes[0].set_title(f"The shared bucket {result.key} as each region sees it")
    axes[1].set_ylabel("tokens spent elsewhere,\nnot yet seen here")
    axes[1].set_xlabel("seconds since start")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_lag(result: RunResult, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(10, 4))
    by_region: dict[str, list[tuple[float, float]]] = {}
    for start, end, region, bounds, counts in lag_intervals(result):
        p99 = histogram_quantile(bounds, counts, 0.99)
        if p99 is not None:
            by_region.setdefault(region, []).append(((start + end) / 2, p99 * 1000))
    for region, points in sorted(by_region.items()):
        ax.plot([t for t, _ in points], [v for _, v in points], marker=".", label=f"{region} p99")
    _shade(ax, result)
    ax.axhline(result.scenario.slo.replication_lag_ms, color="red", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("replication lag into region (ms)")
    ax.set_title("Replication lag per scrape interval (dashed: SLO)")
    _legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def write_report(result: RunResult, slos: list[SLOResult], out: Path) -> Path:
    """Write everything; returns the HTML file's path."""
    out.mkdir(parents=True, exist_ok=True)
    csvs = write_csvs(result, slos, out)
    plots = [
        plot_latency(result, out / "latency.png"),
        plot_decisions(result, out / "decisions.png"),
        plot_tokens(result, out / "tokens.png"),
        plot_lag(result, out / "replication_lag.png"),
    ]
    ok = all(s.passed is not False for s in slos)
    total = result.recorder.totals()
    scenario = result.scenario
    net = scenario.network
    regions_rows = []
    for region, record in sorted(result.recorder.regions.items()):
        h = record.latency
        n = h.get_total_count()
        regions_rows.append(
            [
                region,
                str(record.sent),
                str(record.allowed),
                str(record.denied),
                str(record.errors),
                str(record.failed_over),
                *(
                    f"{h.get_value_at_percentile(q) / 1000:.2f}" if n else "—"
                    for q in (50, 95, 99, 99.9)
                ),
                ", ".join(f"{k}: {v}" for k, v in sorted(record.error_kinds.items())) or "—",
            ]
        )
    slo_table = _table(
        ["SLO", "threshold", "measured", "verdict", "how"],
        [[s.name, s.threshold, s.measured, s.verdict, s.note] for s in slos],
        ["pass" if s.passed else ("fail" if s.passed is False else "") for s in slos],
    )
    events_table = _table(
        ["t (s)", "event", "region", "detail"],
        [[f"{e.t:.2f}", e.kind, e.region, e.detail] for e in result.events],
    )
    region_table = _table(
        [
            "region",
            "sent",
            "allowed",
            "denied",
            "errors",
            "failed over",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "p99.9 ms",
            "error kinds",
        ],
        regions_rows,
    )
    where = "a local mesh started by the runner" if result.local else "the given region URLs"
    images = "".join(
        f'<figure><img src="{p.name}" alt="{p.stem}"><figcaption>{p.stem}</figcaption></figure>'
        for p in plots
    )
    files = "".join(
        f"<li><a href='{p.relative_to(out)}'>{p.relative_to(out)}</a></li>" for p in csvs
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>bucketmesh xr — {html.escape(scenario.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 90%; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
tr.pass td:nth-child(4) {{ color: #1a7f37; font-weight: bold; }}
tr.fail td:nth-child(4) {{ color: #cf222e; font-weight: bold; }}
.verdict {{ font-size: 140%; font-weight: bold; color: {"#1a7f37" if ok else "#cf222e"}; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>bucketmesh xr: {html.escape(scenario.name)}</h1>
<p>{html.escape(scenario.description)}</p>
<p class="verdict">{"every SLO met" if ok else "SLO FAILED"}</p>
<p>Against {where}: {", ".join(html.escape(f"{r} {u}") for r, u in result.urls.items())}.
Injected network (local mesh): {net.latency_ms:g} ms one way ± {net.jitter_ms:g} ms,
loss {net.loss:.1%}. Key <code>{html.escape(result.key)}</code>: capacity {result.capacity:g},
refill {result.refill_rate:g}/s. Duration {result.duration:.1f} s; {total.sent} requests,
{total.allowed} allowed, {total.denied} denied, {total.errors} errors.
Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} on {html.escape(platform.node())}.</p>
<h2>SLOs</h2>{slo_table}
<h2>Events</h2>{events_table}
<h2>Per region</h2>{region_table}
<h2>Plots</h2>{images}
<h2>CSV</h2><ul>{files}</ul>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
