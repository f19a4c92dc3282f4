"""The compiled core decides bit for bit as the pure-Python core (issue 19, item 3).

``make install`` compiles ``bucketmesh/_native.py``'s COMPILED modules with mypyc from
the same sources the pure build runs. Hypothesis generates programs of core
operations (acquires on hot and fresh keys, peeks, bad tokens, unknown rules,
batches atomic or not, batches decided as columns, deltas and full states
exchanged between two replicas, expiry, runtime config changes, journal groups);
each program runs in this process on the compiled build and in a worker process
on the pure one (``BUCKETMESH_PURE=1``: every module loaded from its ``.py``), and
every decision, error, delta and final state must encode to the same bytes
(floats included: msgpack carries them as IEEE doubles). Without a compiled build
(no compiler, or ``BUCKETMESH_PURE=1``) the comparison skips; the layout checks
below run on either build.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from core_programs import KEYS, run
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketmesh import _native
from bucketmesh.core.bucket import NS_PER_S

HERE = Path(__file__).resolve().parent

needs_compiled = pytest.mark.skipif(
    not _native.compiled(), reason="the pure core runs here: no compiled build to compare"
)

rule_name = st.sampled_from([None] * 6 + ["s", "l", "t", "h", "nope"])
tokens = st.integers(min_value=0, max_value=3) | st.integers(min_value=-1, max_value=12)
ask = st.tuples(st.sampled_from(KEYS), tokens, rule_name)
dt = st.sampled_from([0, 0, 1, 1_000, NS_PER_S // 7]) | st.integers(0, 3 * NS_PER_S)
who = st.integers(0, 1)
operation = st.one_of(
    st.tuples(st.just("acquire"), who, dt, ask),
    st.tuples(st.just("acquire"), who, dt, ask),
    st.tuples(
        st.just("many"),
        who,
        dt,
        st.tuples(
            st.lists(ask, max_size=6).flatmap(
                lambda a: st.integers(1, 30).map(lambda n: a + a[-1:] * n)
            ),
            st.booleans(),
        ),
    ),
    st.tuples(
        st.just("columns"),
        who,
        dt,
        st.lists(ask, max_size=6).flatmap(
            lambda a: st.integers(1, 30).map(lambda n: a + a[-1:] * n)
        ),
    ),
    st.tuples(st.sampled_from(["sync", "sync", "full", "expire", "journal"]), who, dt, st.none()),
    st.tuples(
        st.just("configure"),
        who,
        dt,
        st.tuples(
            st.sampled_from(["s", "h", "s-a", "l"]),
            st.integers(1, 20) | st.none(),
            st.sampled_from([0.5, 2.0, 7.0]) | st.none(),
        ),
    ),
)
programs = st.lists(operation, max_size=40)


@pytest.fixture(scope="module")
def pure_worker() -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, _native.PURE_ENV: "1"}
    worker = subprocess.Popen(
        [sys.executable, str(HERE / "core_programs.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=HERE,
    )
    assert worker.stdout is not None
    assert worker.stdout.readline() == b"pure\n"  # the worker really runs the .py sources
    yield worker
    assert worker.stdin is not None
    worker.stdin.close()
    worker.wait(timeout=60)


def run_pure(worker: subprocess.Popen[bytes], program: list[object]) -> bytes:
    assert worker.stdin is not None and worker.stdout is not None
    data = msgspec.msgpack.encode(program)
    worker.stdin.write(struct.pack("<I", len(data)) + data)
    worker.stdin.flush()
    (size,) = struct.unpack("<I", worker.stdout.read(4))
    return worker.stdout.read(size)


@needs_compiled
@settings(max_examples=1000, deadline=None)
@given(programs)
def test_the_compiled_core_decides_as_the_pure_one(
    pure_worker: subprocess.Popen[bytes], program: list[object]
) -> None:
    program = msgspec.msgpack.decode(msgspec.msgpack.encode(program))  # as the worker sees it
    compiled = run(program)
    pure = run_pure(pure_worker, program)
    if compiled != pure:
        mine, theirs = msgspec.msgpack.decode(compiled), msgspec.msgpack.decode(pure)
        first = next(i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b)
        where = program[first] if first < len(program) else "final state"
        raise AssertionError(f"{where}: compiled {mine[first]!r} != pure {theirs[first]!r}")


def test_the_compiled_modules_are_the_listed_sources() -> None:
    """Every COMPILED module runs as the build says (all compiled or all pure), and
    none defines a msgspec struct (mypyc drops the class options: core/structs.py)."""
    import importlib

    kinds = set()
    for relative in _native.COMPILED:
        name = relative[: -len(".py")].replace("/", ".")
        module = importlib.import_module(name)
        kinds.add((module.__file__ or "").endswith(".py"))
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, msgspec.Struct):
                assert value.__module__ != name, f"{name} defines the struct {value.__name__}"
    assert kinds == {not _native.compiled()}
    if os.environ.get(_native.PURE_ENV, "") not in ("", "0"):
        assert not _native.compiled()


def test_pure_env_loads_every_module_from_source() -> None:
    """``BUCKETMESH_PURE=1`` loads the sources even where the compiled build is installed."""
    code = (
        "import bucketmesh, sys; from bucketmesh import _native; "
        "from bucketmesh.core import bucket, limiter; "
        "print(_native.compiled(), bucket.__file__.endswith('.py'), "
        "limiter.__file__.endswith('.py'))"
    )
    env = {**os.environ, _native.PURE_ENV: "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "True", "True"]


@pytest.mark.parametrize(
    ("source", "built"),
    [
        pytest.param("core/bucket.py", "compiled", marks=needs_compiled),
        pytest.param(
            "http/server.py",
            "compiled_http",
            marks=pytest.mark.skipif(
                not _native.compiled_http(), reason="the pure HTTP server runs here"
            ),
        ),
    ],
)
def test_a_stale_build_is_never_used(tmp_path: Path, source: str, built: str) -> None:
    """In a checkout, a compiled module older than its source (edited since the build)
    falls back to the pure modules, with a warning to rebuild: a stale build never
    decides (the mypyc core) nor serves (the Cython HTTP server). Installed (no
    setup.py beside src/: a wheel, whose files pip writes in any order), it is not
    checked."""
    import shutil

    src = Path(_native.__file__).resolve().parent.parent
    copy = tmp_path / "src"
    shutil.copytree(src / "bucketmesh", copy / "bucketmesh")
    for shared in src.glob("*__mypyc*"):
        shutil.copy2(shared, copy / shared.name)
    shutil.copy2(src.parent / "setup.py", tmp_path / "setup.py")  # a checkout
    code = (
        "import warnings, sys; warnings.simplefilter('always'); import bucketmesh; "
        f"from bucketmesh import _native; print(_native.{built}())"
    )
    env = {**os.environ, "PYTHONPATH": str(copy)}
    env.pop(_native.PURE_ENV, None)
    fresh = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert fresh.stdout.split() == ["True"], fresh.stderr
    later = max(path.stat().st_mtime for path in copy.rglob("*.so")) + 60
    os.utime(copy / "bucketmesh" / source, (later, later))
    stale = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert stale.stdout.split() == ["False"]
    assert f"older than bucketmesh/{source}" in stale.stderr
    assert "make install" in stale.stderr
    (tmp_path / "setup.py").unlink()  # installed, as from a wheel
    installed = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert installed.stdout.split() == ["True"], installed.stderr
