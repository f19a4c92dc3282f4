"""What every benchmark script shares: the machine it ran on, its tables, BENCHMARKS.md.

Machines here are shared and noisy, so a figure means little without the
machine, the date and the commit beside it; ``machine()`` gathers them once,
``print_table`` shows a table on the terminal (with ``rich`` when it is
installed, plain text otherwise), ``markdown_table`` renders the same rows for
the record, and ``append_section`` adds a dated section to ``BENCHMARKS.md`` at
the repository root, creating the file with its explanatory header the first
time; ``instructions`` counts what a command executes, under callgrind.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"

HEADER = """\
# bucketmesh benchmarks

Every section below was appended by a script under `benchmarks/` (all of them:
`make bench`, i.e. `benchmarks/run_all.py`; one alone:
`PYTHONPATH=src .venv/bin/python benchmarks/<script>.py`, `--quick` for short
rounds). The machines are shared and noisy, so a target is always a **ratio
against a comparator started by the same script in the same run** (or a count
that noise cannot move), never an absolute timing; absolute figures are kept
for context only. Contenders are measured in alternating rounds so that noise
hits them alike. Each section notes its date, the machine (CPU model, cores,
Python, load) and the commit it measured. Newest sections are at the bottom.
"""


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    usable_cores: int
    python: str
    system: str
    load: str
    date: str
    commit: str

    def describe(self) -> str:
        """One line for a terminal or a markdown section."""
        cores = f"{self.cores} cores"
        if self.usable_cores != self.cores:
            cores += f" ({self.usable_cores} usable)"
        return (
            f"{self.cpu}, {cores}, {self.python}, {self.system}, "
            f"load {self.load}, commit {self.commit}"
        )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                if name.strip() in ("model name", "Hardware", "cpu model"):
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _commit() -> str:
    head = _git("rev-parse", "--short", "HEAD") or "unknown"
    # Only the code under test counts: benchmark notes or docs in flight do not.
    if _git("status", "--porcelain", "--", "src"):
        head += " + uncommitted changes in src/"
    return head


def machine() -> Machine:
    """The machine, interpreter, load, date (UTC) and commit of this run."""
    cores = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = cores
    try:
        load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except (AttributeError, OSError):
        load = "n/a"
    return Machine(
        cpu=_cpu_model(),
        cores=cores,
        usable_cores=usable,
        python=f"{platform.python_implementation()} {platform.python_version()}",
        system=f"{platform.system()} {platform.release()} {platform.machine()}",
        load=load,
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=_commit(),
    )


def versions(*distributions: str) -> str:
    """``"limits 5.8.0, pyrate-limiter 4.5.1"``: installed versions, for the record."""
    found = []
    for name in distributions:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def instructions(argv: Sequence[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``argv`` under callgrind (``valgrind`` must be installed): the instructions it
    executed, which the machine's load does not move, and its standard output. The hash
    seed is fixed (``PYTHONHASHSEED=0``) so two runs hash alike; ``env`` adds to (or
    overrides) the environment."""
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "0", **(env or {})},
    )
    return int(out.stderr.split("Collected : ")[1].split()[0]), out.stdout


def _is_numeric(cell: str) -> bool:
    stripped = cell.replace(",", "").replace("×", "").replace("%", "").strip()
    try:
        float(stripped)
    except ValueError:
        return False
    return True


def _alignments(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Right-align a column whose cells are all numbers; left-align the rest."""
    aligns = []
    for index in range(len(columns)):
        cells = [row[index] for row in rows if row[index] not in ("", "—")]
        aligns.append("right" if cells and all(_is_numeric(c) for c in cells) else "left")
    return aligns


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Show a table on stdout: with rich when it is installed, plain text otherwise."""
    aligns = _alignments(columns, rows)
    widths = [max(len(columns[i]), *(len(row[i]) for row in rows)) for i in range(len(columns))]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:

        def line(cells: Sequence[str]) -> str:
            return "  ".join(
                cell.rjust(width) if align == "right" else cell.ljust(width)
                for cell, width, align in zip(cells, widths, aligns, strict=True)
            ).rstrip()

        print(f"\n{title}")
        print(line(columns))
        print("  ".join("-" * width for width in widths))
        for row in rows:
            print(line(row))
        print()
        return
    table = Table(title=title, title_justify="left")
    for column, align in zip(columns, aligns, strict=True):
        table.add_column(column, justify="right" if align == "right" else "left")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:
        # Piped into a log (run_all, CI): rich would wrap at 80 columns.
        console = Console(width=max(80, sum(widths) + 3 * len(columns) + 1))
    console.print(table)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    aligns = _alignments(columns, rows)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    rule = "|" + "|".join("---:" if align == "right" else "---" for align in aligns) + "|"
    return "\n".join([line(columns), rule, *(line(row) for row in rows)])


def append_section(title: str, body: str, *, machine: Machine, path: Path = BENCHMARKS_MD) -> Path:
    """Append ``## title — date`` with the machine line and ``body`` to BENCHMARKS.md."""
    if not path.exists():
        path.write_text(HEADER, encoding="utf-8")
    section = f"\n## {title} — {machine.date}\n\nMachine: {machine.describe()}\n\n{body.strip()}\n"
    with path.open("a", encoding="utf-8") as out:
        out.write(section)
    return path


def record_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    note: str,
    *,
    machine: Machine,
) -> Path:
    """One table on the terminal, then appended to BENCHMARKS.md with ``note`` below it."""
    print_table(title, columns, rows)
    body = f"{markdown_table(columns, rows)}\n\n{note}"
    return append_section(title, body, machine=machine)


def bucket_count(argv: list[str] | None, doc: str, *, quick: int = 200_000) -> int:
    """How many buckets a script's run holds: ``--buckets N``, or ``quick`` with
    ``--quick``, or 1,000,000 (what P7 and R3 are stated for)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{quick:,} buckets")
    parser.add_argument("--buckets", type=int, help="how many buckets (default 1,000,000)")
    args = parser.parse_args(argv)
    return int(args.buckets or (quick if args.quick else 1_000_000))
