"""A short, bounded run of each coverage-guided fuzz target (tests/fuzz/, atheris).

Each target starts from its committed seed corpus (tests/fuzz/corpus/<target>) and
runs a fixed number of inputs (bounded by count, not time) with a fixed seed and a
fixed PYTHONHASHSEED, so a run is repeatable. Inputs it finds are kept in a
temporary directory, never in the committed corpus. A finding makes libFuzzer stop
with a non-zero status and leave the input in ``crash-*``; the test fails showing
it. ``make fuzz`` runs the same targets for longer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris ships wheels for Linux only")

FUZZ = Path(__file__).parent / "fuzz"
RUNS = {"fuzz_http": 5000, "fuzz_sync": 30000}


@pytest.mark.parametrize("target", sorted(RUNS))
@pytest.mark.timeout(300)
def test_fuzz_target_finds_nothing_in_a_bounded_run(target: str, tmp_path: Path) -> None:
    found = tmp_path / "found"
    found.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(FUZZ / f"{target}.py"),
            f"-runs={RUNS[target]}",
            "-seed=1",
            "-max_len=4096",
            f"-artifact_prefix={tmp_path}/",
            str(found),
            str(FUZZ / "corpus" / target.removeprefix("fuzz_")),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        # string hashing decides set and dict order, so coverage: fixed, a run repeats
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    crashes = sorted(tmp_path.glob("crash-*")) + sorted(tmp_path.glob("timeout-*"))
    assert result.returncode == 0 and not crashes, (
        f"{target} found a failing input {[c.read_bytes()[:300] for c in crashes]!r}:\n"
        + result.stderr[-4000:]
    )
    assert f"Done {RUNS[target]} runs" in result.stderr, result.stderr[-2000:]
