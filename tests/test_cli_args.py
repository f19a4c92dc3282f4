"""Hostile arguments on every command line (issue 22, item 9).

Each case runs the real ``bucketmesh`` command as a subprocess with one bad value
(negative, zero, huge, NaN, infinite, not a number, a path that cannot exist, a
name with '/' or far too long) and expects what the house rules promise: exit
status 2 before anything starts, a message naming the argument, and no traceback.
Before the fix these cases raised tracebacks (``FileNotFoundError`` for a region
``a/b``, ``argparse.ArgumentTypeError`` for an ``xr`` URL), blamed the wrong thing
("cannot listen" for a bad snapshot path, "port taken?" for port 70000), or were
accepted (``--jitter-ms 1e308``, ``xr load --rate -5`` exiting 0).

A case that wrongly starts something (a mesh, a load run) is stopped with SIGINT
once the hang guard expires, so a failing run leaks no process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = str(ROOT / "scenarios" / "burst-consistency.yaml")
HANG_GUARD_S = 60.0
LONG = "r" * 300

#: (arguments, the name the message must carry); {tmp} is the test's directory,
#: {config} a valid config (no snapshot, free port), {scenario} a scenario file.
CASES: list[tuple[list[str], str]] = [
    # serve: flags go through the config's validation, named as the flag
    (["serve", "-c", "{config}", "--snapshot", "/proc/nope/x.snap"], "--snapshot"),
    (["serve", "-c", "{config}", "--snapshot", "{tmp}"], "--snapshot"),
    (["serve", "-c", "{config}", "--snapshot", "{tmp}/" + "s" * 300], "--snapshot"),
    (["serve", "-c", "{config}", "--listen", "127.0.0.1:99999"], "--listen"),
    (["serve", "-c", "{config}", "--listen", "nonsense"], "--listen"),
    (["serve", "-c", "{config}", "--region", "a/b"], "--region"),
    (["serve", "-c", "{config}", "--node", LONG], "--node"),
    (["serve", "-c", "{config}", "--max-buckets", "0"], "--max-buckets"),
    (["serve", "-c", "{config}", "--max-buckets", "-1"], "--max-buckets"),
    (["serve", "-c", "{config}", "--max-buckets", "1" + "0" * 30], "--max-buckets"),
    # run: one node, or the mesh's flags
    (["run", "--single", "--snapshot", "/proc/nope/x.snap"], "--snapshot"),
    (["run", "--base-port", "-5"], "--base-port"),
    # cluster up
    (["cluster", "up", "--regions", "a/b"], "--regions"),
    (["cluster", "up", "--regions", LONG], "--regions"),
    (["cluster", "up", "--base-port", "70000"], "--base-port"),
    (["cluster", "up", "--base-port", "-5"], "--base-port"),
    (["cluster", "up", "--base-port", "65535"], "--base-port"),
    (["cluster", "up", "--base-port", "0", "--jitter-ms", "1e308"], "--jitter-ms"),
    (["cluster", "up", "--base-port", "0", "--latency-ms", "nan"], "--latency-ms"),
    (["cluster", "up", "--base-port", "0", "--latency-ms", "inf"], "--latency-ms"),
    (
        ["cluster", "up", "--base-port", "0", "--latency-ms", "300", "--jitter-ms", "300"],
        "--latency-ms",
    ),
    (["cluster", "up", "--base-port", "0", "--loss", "nan"], "--loss"),
    (["cluster", "up", "--base-port", "0", "--buckets", "{tmp}/bad-buckets.yaml"], "--buckets"),
    # xr load
    (["xr", "load", "--url", "nonsense"], "--url"),
    (["xr", "load", "--url", "a=http://127.0.0.1:99999"], "--url"),
    (["xr", "load", "--url", "a=http://127.0.0.1:9", "--rate", "-5", "--duration", "1"], "--rate"),
    (["xr", "load", "--url", "a=http://127.0.0.1:9", "--rate", "0", "--duration", "1"], "--rate"),
    (["xr", "load", "--url", "a=http://127.0.0.1:9", "--rate", "nan", "--duration", "1"], "--rate"),
    (["xr", "load", "--url", "a=http://127.0.0.1:9", "--rate", "inf", "--duration", "1"], "--rate"),
    (
        ["xr", "load", "--url", "a=http://127.0.0.1:9", "--rate", "1e308", "--duration", "1"],
        "--rate",
    ),
    (["xr", "load", "--url", "a=http://127.0.0.1:9", "--duration", "-1"], "--duration"),
    (["xr", "load", "--url", "a=http://127.0.0.1:9", "--duration", "nan"], "--duration"),
    (["xr", "load", "--url", "a=http://127.0.0.1:9", "--duration", "inf"], "--duration"),
    (
        ["xr", "load", "--url", "a=http://127.0.0.1:9", "--duration", "1", "--connections", "0"],
        "--connections",
    ),
    (
        ["xr", "load", "--url", "a=http://127.0.0.1:9", "--duration", "1", "--connections", "-3"],
        "--connections",
    ),
    (
        [
            "xr",
            "load",
            "--url",
            "a=http://127.0.0.1:9",
            "--duration",
            "1",
            "--connections",
            "100000000",
        ],
        "--connections",
    ),
    (["xr", "load", "--url", "a=http://127.0.0.1:9", "--duration", "1", "--key", ""], "--key"),
    (
        ["xr", "load", "--url", "a=http://127.0.0.1:9", "--duration", "1", "--key", "a\r\nX: y"],
        "--key",
    ),
    # xr verify
    (["xr", "verify", "--url", "a=ftp://x", "--key", "k"], "--url"),
    (["xr", "verify", "--url", "a=http://127.0.0.1:9", "--key", ""], "--key"),
    (
        ["xr", "verify", "--url", "a=http://127.0.0.1:9", "--key", "k", "--tolerance", "-1"],
        "--tolerance",
    ),
    (
        ["xr", "verify", "--url", "a=http://127.0.0.1:9", "--key", "k", "--tolerance", "nan"],
        "--tolerance",
    ),
    # xr run
    (["xr", "run", "{scenario}", "--url", "nonsense"], "--url"),
    (["xr", "run", "{scenario}", "--scale", "-1"], "--scale"),
    (["xr", "run", "{scenario}", "--scale", "nan"], "--scale"),
    (["xr", "run", "{scenario}", "--duration", "-5"], "--duration"),
    (["xr", "run", "{scenario}", "--metrics-port", "70000"], "--metrics-port"),
    (["xr", "run", "{scenario}", "--metrics-port", "-1"], "--metrics-port"),
    (["xr", "run", "{scenario}", "--out", "/proc/nope/x"], "--out"),
    (["xr", "run", "{scenario}", "--slo", "latency_p95_ms=nan"], "--slo"),
    (["xr", "run", "{scenario}", "--key-template", "nobraces"], "--key-template"),
    (["xr", "run", "{scenario}", "--key-template", "{x}"], "--key-template"),
    (["xr", "run", "{tmp}/slash-regions.yaml"], "regions"),
    (["xr", "run", "{tmp}/binary.yaml"], "binary.yaml"),
    # sim
    (["sim", "--seeds", "-5"], "--seeds"),
    (["sim", "--seeds", "0"], "--seeds"),
    (["sim", "--seeds", "1" + "0" * 12], "--seeds"),
    (["sim", "--seeds", "1", "--replicas", "0"], "--replicas"),
    (["sim", "--seeds", "1", "--replicas", "-1"], "--replicas"),
    (["sim", "--seeds", "1", "--replicas", "100000"], "--replicas"),
    (["sim", "--seeds", "1", "--events", "-1"], "--events"),
    (["sim", "--seeds", "1", "--first", "-1"], "--first"),
    (["sim", "--seed", "-1"], "--seed"),
]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "node.yaml"
    config.write_text(
        "region: us-east-1\nlisten: 127.0.0.1:0\n"
        "buckets: [{key: 'k-{{ .Request.Header.X-K }}', capacity: 5, refillRate: 1}]\n"
    )
    (tmp_path / "bad-buckets.yaml").write_text(
        "- key: 'x-{{ .Request.ClientIP }}'\n  capacity: -5\n  refillRate: 1\n"
    )
    (tmp_path / "slash-regions.yaml").write_text(
        "name: slashes\nregions: [a/b, c]\nphases:\n  - wait: 0.1\n"
    )
    (tmp_path / "binary.yaml").write_bytes(b"name: x\n\xff\xfe\x00\x81 not text\n")
    return {"tmp": str(tmp_path), "config": str(config), "scenario": SCENARIO}


def run_cli(args: list[str], cwd: Path) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "bucketmesh", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        # it started something it should have refused: stop it the way it stops
        # cleanly (every command handles SIGINT), then report
        process.send_signal(signal.SIGINT)
        try:
            out, err = process.communicate(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        pytest.fail(f"bucketmesh {' '.join(args)} ran instead of refusing:\n{out}\n{err}")
    return process.returncode, out, err


def fill(arg: str, files: dict[str, str]) -> str:
    """``arg`` with {tmp}, {config} and {scenario} replaced (other braces kept)."""
    for name, value in files.items():
        arg = arg.replace("{" + name + "}", value)
    return arg


def _id(case: tuple[list[str], str]) -> str:
    args, _name = case
    shown = " ".join(a if len(a) <= 24 else a[:12] + "..." for a in args)
    return shown.replace("{config}", "CFG").replace("{scenario}", "SCENARIO")


@pytest.mark.parametrize(("args", "name"), CASES, ids=[_id(c) for c in CASES])
def test_a_bad_argument_exits_2_naming_it(
    args: list[str], name: str, files: dict[str, str], tmp_path: Path
) -> None:
    argv = [fill(arg, files) for arg in args]
    status, out, err = run_cli(argv, tmp_path)
    assert "Traceback" not in out + err, err
    assert status == 2, f"status {status}\n{out}\n{err}"
    assert name in err, err


def test_run_single_keeps_its_state_in_a_documented_directory(tmp_path: Path) -> None:
    from bucketmesh.node.cli import state_dir

    assert state_dir({"BUCKETMESH_STATE_DIR": str(tmp_path)}) == tmp_path
    assert state_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "bucketmesh"
    assert state_dir({}) == Path.home() / ".local" / "state" / "bucketmesh"


@pytest.mark.parametrize("variable", ["BUCKETMESH_STATE_DIR", "XDG_STATE_HOME"])
def test_run_single_names_the_variable_that_chose_an_unusable_state_directory(
    variable: str, tmp_path: Path
) -> None:
    """Before, it blamed --snapshot, a flag the user never gave."""
    blocker = tmp_path / "a-file"
    blocker.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")}
    env.pop("XDG_STATE_HOME", None)
    env[variable] = str(blocker)
    done = subprocess.run(
        [sys.executable, "-m", "bucketmesh", "run", "--single"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert done.returncode == 2, done.stderr
    assert f"config error: {variable}: storage.snapshot cannot be created" in done.stderr
