"""The wheel works on its own: built from this checkout, installed into a fresh venv.

``bucketmesh run --single`` and ``bucketmesh run`` are started from a directory
outside the checkout with PYTHONPATH unset, so every file they read (the example
configs, the Redis store's Lua scripts) must come from the installed package. Each
served node decides one request; SIGINT / SIGTERM stop them.

The wheel is built from a copy of the checkout (setuptools writes ``build/`` and
``*.egg-info`` next to the sources, and a stale ``build/lib`` would leak into the
wheel). Dependencies are installed from the package index by pip (its cache makes
later runs quick); the venv has no pip of its own: this interpreter's pip installs
into it (``pip --python``). Ports are the kernel's free ones (``--listen
127.0.0.1:0``, ``--base-port 0``). Waits are on what the processes print, each under
a generous hang guard; nothing sleeps.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Hang guards only: building, resolving dependencies and starting are slow on a
#: busy 2-core box with a cold pip cache. Nothing waits for them to pass.
INSTALL_TIMEOUT_S = 600.0
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
#: What the copy of the checkout leaves out: VCS data, venvs, build output, caches.
NOT_COPIED = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    ".mypy_cache",
    ".ruff_cache",
    "data",
    "bench-results",
)

pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT_S + 3 * (READY_TIMEOUT_S + STOP_TIMEOUT_S))


def _run(args: list[str]) -> None:
    done = subprocess.run(
        args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
    )
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stderr}"


def _clean_env() -> dict[str, str]:
    """This environment without anything that would point Python at the checkout."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("BUCKETMESH_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Venv:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.bin = path / "bin"
        self.python = self.bin / "python"
        self.bucketmesh = self.bin / "bucketmesh"

    def package_files(self) -> set[Path]:
        """Every file of the installed package, bytecode caches left out."""
        (site,) = (self.path / "lib").glob("python3*/site-packages")
        package = site / "bucketmesh"
        return {p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=NOT_COPIED)
    dist = work / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "--no-deps", "--quiet", "-w", str(dist), str(source)])
    (wheel,) = dist.glob("bucketmesh-*.whl")
    env = Venv(work / "venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(env.path)])
    _run([*pip, "--python", str(env.python), "install", "--quiet", str(wheel)])
    return env


class Process:
    """A command of the installed venv, its output read line by line by a thread
    (so the pipe never fills) and waited for by content."""

    def __init__(self, venv: Venv, args: list[str], cwd: Path) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.stderr_path = cwd / "stderr.log"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [str(venv.bucketmesh), *args],
                cwd=cwd,
                env=_clean_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def describe(self) -> str:
        return (
            f"exit {self.process.poll()}; stdout:\n"
            + "\n".join(self.seen)
            + f"\nstderr:\n{self.stderr_path.read_text(errors='replace')}"
        )

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The first line from now on that ``pattern`` matches."""
        while True:
            try:
                line = self.lines.get(timeout=READY_TIMEOUT_S)
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r}: {self.describe()}") from None
            if line is None:
                raise AssertionError(f"exited before {pattern!r}: {self.describe()}")
            self.seen.append(line)
            found = re.search(pattern, line)
            if found:
                return found

    def stop(self, sig: signal.Signals) -> int:
        self.process.send_signal(sig)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"still running {STOP_TIMEOUT_S}s after {sig.name}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A working directory that is not the checkout nor inside it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    assert ROOT not in cwd.resolve().parents
    yield cwd


def _running(venv: Venv) -> list[str]:
    """Command lines of the processes running the venv's Python (Linux: /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if any(arg.startswith(os.fsencode(venv.path)) for arg in args):
            found.append(" ".join(a.decode(errors="replace") for a in args))
    return found


def _decides(url: str) -> None:
    """One request to the node at ``url``: it takes a token of the seed bucket."""
    response = httpx.post(
        f"{url}/v1/rate", headers={"X-API-Key": "wheel-test"}, json={"tokens": 1}, timeout=30.0
    )
    assert response.status_code == 200, response.text
    body = response.json()
    hashed = hashlib.sha256(b"wheel-test").hexdigest()[:32]  # the example rule's | sha256
    assert body["allowed"] is True and body["key"] == f"agent-api-key-{hashed}", body
    assert body["capacity"] == 5000, body


def test_the_wheel_carries_its_data_and_imports_from_the_venv(venv: Venv, outside: Path) -> None:
    files = {str(p).split("/site-packages/", 1)[1] for p in venv.package_files()}
    for data in (
        "bucketmesh/examples/bucketmesh.yaml",
        "bucketmesh/examples/buckets.yaml",
        "bucketmesh/storage/lua/common.lua",
        "bucketmesh/storage/lua/acquire.lua",
        "bucketmesh/storage/lua/merge.lua",
        "bucketmesh/storage/lua/rule.lua",
    ):
        assert data in files
    probe = (
        "import bucketmesh, bucketmesh.storage.redis_store as s; "
        "print(bucketmesh.__file__); print(len(s.ACQUIRE_LUA))"
    )
    done = subprocess.run(
        [str(venv.python), "-c", probe],
        cwd=outside,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT_S,
        check=True,
    )
    location, length = done.stdout.split()
    assert Path(location).is_relative_to(venv.path), location
    assert int(length) > 0


def test_run_single_serves_the_packaged_example(
    venv: Venv, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(outside / "state"))  # not the real home
    before = venv.package_files()
    node = Process(venv, ["run", "--single", "--listen", "127.0.0.1:0"], outside)
    try:
        found = node.wait_for(
            r"serving region us-east-1 on (http://127\.0\.0\.1:(\d+)) \(3 rules\)"
        )
        url, port = found.group(1), int(found.group(2))
        assert port != 0
        # the quick start's curl commands name the port it got
        node.wait_for(re.escape(f"curl -s -X POST {url}/v1/rate"))
        _decides(url)
        assert node.stop(signal.SIGINT) == 0, node.describe()
    finally:
        node.kill()
    # the snapshot goes to the state directory ($XDG_STATE_HOME/bucketmesh), written
    # there on the way out, not into the working directory; nothing is written into
    # the installed package
    assert (outside / "state" / "bucketmesh" / "state.snap").is_file()
    assert not (outside / "data").exists()
    assert venv.package_files() == before
    assert _running(venv) == []


def test_run_starts_a_three_region_mesh_on_free_ports(venv: Venv, outside: Path) -> None:
    mesh = Process(venv, ["run", "--base-port", "0"], outside)
    try:
        mesh.wait_for(r"^bucketmesh cluster: one mesh of 3 regions")
        urls = {}
        for region in ("us-east-1", "eu-central-1", "ap-southeast-2"):
            found = mesh.wait_for(rf"^  {re.escape(region)}\s+(http://127\.0\.0\.1:\d+)$")
            urls[region] = found.group(1)
        assert len(set(urls.values())) == 3
        mesh.wait_for(r"\(Ctrl-C stops all\)$")
        for url in urls.values():
            _decides(url)
        assert mesh.stop(signal.SIGTERM) == 0, mesh.describe()
    finally:
        mesh.kill()
    # `run` stopped its nodes and waited for them before it exited
    assert _running(venv) == []
