"""Run every benchmark script, each in its own process, in a fixed order (``make bench``).

The scripts are ``benchmarks/*.py`` except this one and private helpers
(``_*.py``). Those named in ``ORDER`` run first, in that order — the cheap
in-process figures before the ones that start servers — and any others follow
alphabetically. Each runs with this interpreter, ``src/`` first on PYTHONPATH
so that the working tree is what gets measured, and its output goes straight
to the terminal. A failing script is reported and the rest still run; the exit
status is non-zero if any failed. ``--quick`` is passed through to every script.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import _report

BENCHMARKS = Path(__file__).resolve().parent
ORDER = ("inprocess",)


def scripts() -> list[Path]:
    """The benchmark scripts in the order they run."""
    found = {
        path.stem: path
        for path in BENCHMARKS.glob("*.py")
        if not path.name.startswith("_") and path.name != Path(__file__).name
    }
    first = [found.pop(name) for name in ORDER if name in found]
    return first + [found[name] for name in sorted(found)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (passed to each script)")
    parser.add_argument("--list", action="store_true", help="print the scripts in order and exit")
    parser.add_argument("--timeout", type=float, help="seconds before a script is killed")
    parser.add_argument("only", nargs="*", help="run only these scripts (names without .py)")
    args = parser.parse_args(argv)

    chosen = scripts()
    if args.only:
        unknown = sorted(set(args.only) - {path.stem for path in chosen})
        if unknown:
            parser.error(f"no benchmark script named {', '.join(unknown)}")
        chosen = [path for path in chosen if path.stem in args.only]
    if args.list:
        print("\n".join(path.stem for path in chosen))
        return 0

    env = dict(os.environ)
    src = str(_report.REPO_ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    passed_on = ["--quick"] if args.quick else []

    results: list[list[str]] = []
    failed = 0
    for path in chosen:
        print(f"\n=== {path.name} {' '.join(passed_on)}".rstrip(), flush=True)
        start = time.monotonic()
        try:
            done = subprocess.run(
                [sys.executable, str(path), *passed_on],
                cwd=_report.REPO_ROOT,
                env=env,
                timeout=args.timeout,
                check=False,
            )
            status = "ok" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"FAILED (killed after {args.timeout:g} s)"
        except OSError as error:
            status = f"FAILED ({error})"
        if status != "ok":
            failed += 1
        results.append([path.name, status, f"{time.monotonic() - start:.1f}"])

    _report.print_table("Benchmark scripts", ["script", "result", "seconds"], results)
    if failed:
        print(f"{failed} of {len(chosen)} benchmark scripts failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
