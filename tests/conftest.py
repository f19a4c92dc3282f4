"""Shared fixtures: real ``bucketmesh serve`` processes on loopback ports.

``serve(config)`` writes the config as YAML into the test's temporary directory,
starts ``python -m bucketmesh serve --config FILE --listen 127.0.0.1:PORT``
(plus any flags asked for), waits until ``/readyz`` answers 200 and returns a
:class:`Server`. Every process a factory started is stopped at teardown
(SIGTERM, then SIGKILL). When a test fails, the stderr of its servers is
attached to the report; a server that logged an internal error or a traceback
fails its test at teardown, so a crash inside the server cannot pass unnoticed.

``serve`` is per test; ``serve_module`` starts servers shared by a whole module
(tests on them use keys of their own).
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

T = TypeVar("T")

SEED_KEY_TEMPLATE = "agent-api-key-{{ .Request.Header.X-API-Key }}"

#: The seed rule, as in the seed config: capacity 5000, 50 tokens/s.
SEED_RULE: dict[str, Any] = {
    "key": SEED_KEY_TEMPLATE,
    "capacity": 5000,
    "refillRate": 50,
    "ttl": 3600,
}

#: Rules every test server has unless the test gives its own. No catch-all rule,
#: so a request without X-API-Key (and without ?user=) matches nothing.
DEFAULT_BUCKETS: list[dict[str, Any]] = [
    SEED_RULE,
    # 2 tokens, one more every 4 s: the third quick request is denied
    {"name": "tiny", "key": "tiny-{{ .Request.Query.user }}", "capacity": 2, "refillRate": 0.25},
    # refills so slowly (one token per 100 s) that a test sees no refill at all
    {"name": "slow", "key": "slow-{{ .Request.Header.X-User }}", "capacity": 5, "refillRate": 0.01},
]

DEFAULT_CONFIG: dict[str, Any] = {
    "region": "us-east-1",
    "node": "node-a",
    "sync": {"enabled": False, "syncClusterId": "global-rate-limit-cluster"},
    "storage": {"backend": "memory"},
    "buckets": DEFAULT_BUCKETS,
}

#: http11.ServerLimits defaults, in seconds; see ``Server.timeouts``.
DEFAULT_TIMEOUTS = {"header_timeout": 10.0, "body_timeout": 30.0, "keepalive_timeout": 5.0}
#: How the config file would spell them (``limits.headerTimeout`` ...), once it can.
TIMEOUT_FILE_NAMES = {
    "header_timeout": "headerTimeout",
    "body_timeout": "bodyTimeout",
    "keepalive_timeout": "keepaliveTimeout",
}

READY_TIMEOUT_S = 60.0  # hang guards only: a saturated box starts slowly
STOP_TIMEOUT_S = 30.0


def configurable_timeouts() -> set[str]:
    """The connection timeouts the config file accepts under ``limits`` (maybe none yet)."""
    from bucketmesh.node.config import LimitsConfig

    return set(LimitsConfig.__struct_fields__) & set(DEFAULT_TIMEOUTS)


def make_config(buckets: list[dict[str, Any]] | None = None, **settings: Any) -> dict[str, Any]:
    """The default test config with ``buckets`` replaced and top-level sections merged."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    if buckets is not None:
        config["buckets"] = copy.deepcopy(buckets)
    for name, value in settings.items():
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name].update(copy.deepcopy(value))
        else:
            config[name] = copy.deepcopy(value)
    return config


def spawn_serve(config_path: Path, log_path: Path, **env: str) -> subprocess.Popen[bytes]:
    """``bucketmesh serve --config config_path``, output appended to ``log_path``, with
    no BUCKETMESH_* variable of ours leaking in (``env`` adds the ones it needs)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")}
    clean.update(env, PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "bucketmesh", "serve", "--config", str(config_path)],
            env=clean,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def eventually(check: Callable[[], T], what: str, timeout: float = 60.0) -> T:
    """``check()``'s result once it stops raising AssertionError / HTTP errors."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, httpx.HTTPError) as error:
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout}s: {what}: {error}") from error
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerFailedToStart(RuntimeError):
    pass


class Server:
    """One running ``bucketmesh serve`` process."""

    def __init__(
        self,
        name: str,
        args: list[str],
        directory: Path,
        config_path: Path,
        config: dict[str, Any],
        timeouts: dict[str, float],
        env: dict[str, str],
    ) -> None:
        self.name = name
        self.directory = directory
        self.config_path = config_path
        self.config = config
        #: The connection timeouts this process runs with (seconds).
        self.timeouts = timeouts
        self.stdout_path = directory / f"{name}.stdout"
        self.stderr_path = directory / f"{name}.stderr"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.base_url = f"http://{self.host}:{self.port}"
        self.args = [*args, "--listen", f"{self.host}:{self.port}"]
        self._env = env
        self._stdout = open(self.stdout_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._stderr = open(self.stderr_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            self.args,
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=self._stderr,
        )

    # -- observing ------------------------------------------------------------

    def url(self, path: str) -> str:
        return self.base_url + path

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 10.0)
        return httpx.Client(base_url=self.base_url, **kwargs)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stdout(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        code = self.process.poll()
        state = "running" if code is None else f"exited with {code}"
        return (
            f"$ {' '.join(self.args)}\n({state}; config {self.config_path})\n"
            f"--- config ---\n{self.config_path.read_text()}"
            f"--- stdout ---\n{self.stdout()}--- stderr ---\n{self.stderr()}"
        )

    def internal_errors(self) -> list[str]:
        """Lines of stderr that say the server hit a bug (never expected)."""
        return [
            line
            for line in self.stderr().splitlines()
            if "internal error" in line or "Traceback" in line
        ]

    # -- lifecycle --------------------------------------------------------------

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        last_error: object = None
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise ServerFailedToStart(f"server {self.name} exited before ready")
                try:
                    response = client.get(self.url("/readyz"))
                    if response.status_code == 200:
                        return
                    last_error = f"/readyz answered {response.status_code}: {response.text}"
                except httpx.HTTPError as error:
                    last_error = error
                time.sleep(0.03)
        raise ServerFailedToStart(
            f"server {self.name} not ready after {timeout}s ({last_error})\n{self.describe()}"
        )

    def send_signal(self, sig: int) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        return self.process.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Ask the process to stop (SIGTERM: graceful) and return its exit code.

        Raises ``subprocess.TimeoutExpired`` if it did not stop in time (and kills it).
        """
        self.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._close_logs()

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait(STOP_TIMEOUT_S)
        self._close_logs()

    def _close_logs(self) -> None:
        if self.process.poll() is not None:
            self._stdout.close()
            self._stderr.close()

    def __repr__(self) -> str:
        return f"Server({self.name}, {self.base_url}, pid {self.process.pid})"


class ServerFactory:
    """Starts servers in one directory and stops all of them on ``close``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[Server] = []

    def __call__(
        self,
        config: dict[str, Any] | None = None,
        *,
        raw_config: str | None = None,
        admin_token: str | None = None,
        snapshot: str | os.PathLike[str] | None = None,
        region: str | None = None,
        node: str | None = None,
        max_buckets: int | None = None,
        timeouts: dict[str, float] | None = None,
        env: dict[str, str] | None = None,
        config_name: str | None = None,
        wait_ready: bool = True,
    ) -> Server:
        """Start a server with ``config`` (default: ``make_config()``) and wait for /readyz.

        ``raw_config`` is YAML text written as it is, instead of ``config``.

        ``timeouts`` (header_timeout, body_timeout, keepalive_timeout in seconds) are
        written into ``limits`` only for those the config file supports; the rest
        stay at their defaults, and ``Server.timeouts`` tells which apply.
        """
        config = copy.deepcopy(config) if config is not None else make_config()
        effective = dict(DEFAULT_TIMEOUTS)
        if timeouts and raw_config is None:
            supported = configurable_timeouts()
            limits = config.setdefault("limits", {})
            for name, seconds in timeouts.items():
                if name in supported:
                    limits[TIMEOUT_FILE_NAMES[name]] = seconds
                    effective[name] = seconds
            if not limits:
                del config["limits"]
        index = len(self.servers) + 1
        name = f"server-{index}"
        config_path = self.directory / (config_name or f"{name}.yaml")
        if raw_config is not None:
            config_path.write_text(raw_config)
            config = yaml.safe_load(raw_config)
        else:
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        args = [sys.executable, "-m", "bucketmesh", "serve", "--config", str(config_path)]
        for flag, value in (
            ("--admin-token", admin_token),
            ("--snapshot", snapshot),
            ("--region", region),
            ("--node", node),
            ("--max-buckets", max_buckets),
        ):
            if value is not None:
                args += [flag, str(value)]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")}
        environment["PYTHONUNBUFFERED"] = "1"
        environment.update(env or {})
        for attempt in range(3):
            server = Server(
                name if not attempt else f"{name}-retry{attempt}",
                args,
                self.directory,
                config_path,
                config,
                effective,
                environment,
            )
            self.servers.append(server)
            if not wait_ready:
                return server
            try:
                server.wait_ready()
                return server
            except ServerFailedToStart:
                server.kill()
                # the free port was taken between probing and binding: try another
                if "cannot listen" in server.stderr() and attempt < 2:
                    continue
                raise ServerFailedToStart(server.describe()) from None
        raise AssertionError("unreachable")

    def close(self) -> list[str]:
        """Stop every server; returns the internal errors any of them logged."""
        problems: list[str] = []
        for server in self.servers:
            try:
                if server.alive():
                    server.stop(signal.SIGTERM, timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                problems.append(f"{server.name} ignored SIGTERM for {STOP_TIMEOUT_S}s; killed")
            finally:
                if server.alive():
                    server.kill()
                server._close_logs()
            errors = server.internal_errors()
            if errors:
                problems.append(f"{server.name} logged:\n" + "\n".join(errors[:20]))
        return problems


def _finish(factory: ServerFactory) -> None:
    problems = factory.close()
    if problems:
        pytest.fail("a bucketmesh server misbehaved:\n" + "\n\n".join(problems), pytrace=False)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start real ``bucketmesh serve`` processes for this test; all stopped at teardown."""
    factory = ServerFactory(tmp_path)
    yield factory
    _finish(factory)


@pytest.fixture(scope="module")
def serve_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Like ``serve``, for servers shared by every test of a module."""
    factory = ServerFactory(tmp_path_factory.mktemp("servers"))
    yield factory
    _finish(factory)


def _servers_of(item: pytest.Item) -> list[Server]:
    found: list[Server] = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, ServerFactory):
            found.extend(value.servers)
        elif isinstance(value, Server):
            found.append(value)
    return list(dict.fromkeys(found))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for server in _servers_of(item):
            report.sections.append((f"bucketmesh {server.name}", server.describe()))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A real redis-server on a free loopback port (no persistence), killed at teardown."""
    from redis_server import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_server_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Like ``redis_server``, shared by every test of a module (keys of their own)."""
    from redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
