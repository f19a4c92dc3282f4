"""The ASGI middleware in a real uvicorn process, driven by httpx over real sockets.

``tests/asgi_app.py`` wraps a trivial application with ``RateLimitMiddleware``;
uvicorn serves it on a unix socket (``--uds``, as behind a reverse proxy: the ASGI
scope then has no client address) or on a loopback TCP port. What is checked:

- a limiter error never becomes a 500: ``tokens`` above a rule's capacity (as
  configured, or after a runtime change lowered it) and the live-bucket cap get the
  status and problem+json a real ``bucketmesh serve`` gives for the same case;
- without a client address a rule that needs ``{{ .Request.ClientIP }}`` does not
  match (the request falls through to ``unmatched``), and that is counted and
  warned about once;
- ``trusted_proxies``: the right-most untrusted hop of ``X-Forwarded-For`` (or
  ``Forwarded``) is the client, but only when the peer is a trusted proxy.

Nothing waits for a duration: the process is polled until it answers
(``eventually``), every other step is a request and its answer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn  # noqa: F401  (the dev extra: a missing uvicorn fails here, never skips)
from conftest import ServerFactory, eventually, free_port, make_config

TESTS = Path(__file__).resolve().parent
SLOW = 0.001  # one token per 1000 s: no refill while a test runs
PER_IP = {"key": "ip-{{ .Request.ClientIP }}", "capacity": 5, "refill_rate": SLOW, "name": "per-ip"}
PER_KEY = {
    "key": "api-{{ .Request.Header.X-API-Key }}",
    "capacity": 3,
    "refill_rate": SLOW,
    "name": "per-key",
}


class UvicornApp:
    """One ``uvicorn --factory asgi_app:create_app`` process and an httpx client on it."""

    def __init__(self, directory: Path, config: dict[str, Any], *, uds: bool) -> None:
        self.directory = directory
        self.log_path = directory / "uvicorn.log"
        self.socket = directory / "app.sock"
        args = [sys.executable, "-m", "uvicorn", "--factory", "asgi_app:create_app"]
        args += ["--app-dir", str(TESTS), "--log-level", "warning", "--no-access-log"]
        # uvicorn's own proxy-headers handling would rewrite the client address before
        # the middleware sees it: off, so that what is tested is the middleware's
        args += ["--no-proxy-headers"]
        if uds:
            args += ["--uds", str(self.socket)]
            transport = httpx.HTTPTransport(uds=str(self.socket))
            base_url = "http://proxied"
        else:
            port = free_port()
            args += ["--host", "127.0.0.1", "--port", str(port)]
            transport = httpx.HTTPTransport()
            base_url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "ASGI_APP_CONFIG": json.dumps(config)}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                args, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.http = httpx.Client(transport=transport, base_url=base_url, timeout=10)
        eventually(self._answers, "uvicorn serves the app", timeout=60)

    def _answers(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"uvicorn exited {self.process.returncode}:\n{self.log()}")
        assert self.http.get("/_test/state").status_code == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str = "/", **kwargs: Any) -> httpx.Response:
        return self.http.get(path, **kwargs)

    def state(self) -> dict[str, Any]:
        response = self.http.get("/_test/state")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def stop(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        assert "Traceback" not in self.log(), self.log()


@pytest.fixture
def uvicorn_app() -> Iterator[Any]:
    """``start(config, uds=True)``: a running ``UvicornApp``; all stopped at teardown.
    The socket lives in a short temporary directory (a unix socket path holds at most
    107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="bm-asgi-"))
    started: list[UvicornApp] = []

    def start(config: dict[str, Any], *, uds: bool = True) -> UvicornApp:
        home = directory / str(len(started))
        home.mkdir()
        app = UvicornApp(home, config, uds=uds)
        started.append(app)
        return app

    try:
        yield start
    finally:
        for app in started:
            app.stop()
        shutil.rmtree(directory, ignore_errors=True)


def config(*rules: dict[str, Any], **middleware: Any) -> dict[str, Any]:
    return {"rules": list(rules), "middleware": middleware}


# -- limiter errors are the Rating API's answers, never a 500 ---------------------------------


def _api_rules(*rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "name": r["name"],
            "key": r["key"],
            "capacity": r["capacity"],
            "refillRate": r["refill_rate"],
        }
        for r in rules
    ]


def _problem(response: httpx.Response) -> tuple[int, str, dict[str, Any], str | None]:
    return (
        response.status_code,
        response.headers["content-type"],
        response.json(),
        response.headers.get("retry-after"),
    )


def test_tokens_above_the_capacity_get_the_rating_apis_400(
    uvicorn_app: Any, serve: ServerFactory
) -> None:
    app = uvicorn_app(config(PER_KEY, tokens=5))
    api = serve(make_config(_api_rules(PER_KEY)))
    answer = app.get(headers={"X-API-Key": "k1"})
    with api.client() as client:
        reference = client.post("/v1/rate", headers={"X-API-Key": "k1"}, json={"tokens": 5})
    assert reference.status_code == 400, reference.text
    assert _problem(answer) == _problem(reference)
    assert answer.json()["field"] == "tokens"


def test_a_capacity_lowered_at_runtime_gets_the_rating_apis_400(
    uvicorn_app: Any, serve: ServerFactory
) -> None:
    app = uvicorn_app(config(PER_KEY, tokens=2))
    api = serve(make_config(_api_rules(PER_KEY)))
    assert app.get(headers={"X-API-Key": "k2"}).status_code == 200
    lowered = app.http.post("/_test/configure", params={"rule": "per-key", "capacity": 1})
    assert lowered.json() == {"capacity": 1}
    answer = app.get(headers={"X-API-Key": "k2"})
    with api.client() as client:
        assert client.post("/v1/rate", headers={"X-API-Key": "k2"}, json={"tokens": 2}).is_success
        patched = client.patch("/v1/buckets/per-key", json={"capacity": 1})
        assert patched.status_code == 200, patched.text
        reference = client.post("/v1/rate", headers={"X-API-Key": "k2"}, json={"tokens": 2})
    assert reference.status_code == 400, reference.text
    assert _problem(answer) == _problem(reference)


def test_a_new_key_at_the_bucket_cap_gets_the_rating_apis_503(
    uvicorn_app: Any, serve: ServerFactory
) -> None:
    app = uvicorn_app({**config(PER_KEY), "max_buckets": 1})
    api = serve(make_config(_api_rules(PER_KEY)), max_buckets=1)
    answers = [app.get(headers={"X-API-Key": key}) for key in ("a", "b", "a")]
    with api.client() as client:
        references = [client.post("/v1/rate", headers={"X-API-Key": key}) for key in ("a", "b")]
    assert [r.status_code for r in answers] == [200, 503, 200]
    assert references[1].status_code == 503, references[1].text
    assert _problem(answers[1]) == _problem(references[1])


# -- no client address (uvicorn --uds behind a proxy) -------------------------------------------


@pytest.mark.parametrize(("unmatched", "status"), [("allow", 200), ("deny", 400)])
def test_no_client_address_falls_through_to_unmatched_counted_and_warned_once(
    uvicorn_app: Any, unmatched: str, status: int
) -> None:
    app = uvicorn_app(config(PER_IP, unmatched=unmatched))
    # the proxy says who the client is, but nothing says to believe it
    answers = [app.get(headers={"X-Forwarded-For": "203.0.113.7"}) for _ in range(20)]
    assert [r.status_code for r in answers] == [status] * 20
    assert not any("ratelimit" in r.headers for r in answers)
    state = app.state()
    assert state["client"] is None  # uvicorn --uds: the scope has no client address
    assert state["no_client_address"] == 20
    (warning,) = state["warnings"]
    assert "per-ip" in warning and "trusted_proxies" in warning


def test_no_client_address_is_on_metrics_when_given_node_metrics(uvicorn_app: Any) -> None:
    app = uvicorn_app({**config(PER_KEY, PER_IP), "metrics": True})
    for _ in range(3):
        assert app.get().status_code == 200
    assert app.get(headers={"X-API-Key": "k"}).status_code == 200
    metrics = app.state()["metrics"]
    assert "bucketmesh_asgi_no_client_address_total 3.0" in metrics
    assert 'bucketmesh_decisions_total{result="allowed",rule="per-key"} 1.0' in metrics


def test_a_request_that_needs_no_address_is_not_counted(uvicorn_app: Any) -> None:
    app = uvicorn_app(config(PER_KEY, PER_IP))
    assert app.get(headers={"X-API-Key": "k"}).headers["ratelimit"].startswith('"per-key"')
    state = app.state()
    assert (state["no_client_address"], state["warnings"]) == (0, [])


# -- trusted proxies ------------------------------------------------------------------------


def test_a_trusted_unix_proxy_gives_the_forwarded_client_its_bucket(uvicorn_app: Any) -> None:
    app = uvicorn_app(config(PER_IP, trusted_proxies=["unix"]))
    answers = [app.get(headers={"X-Forwarded-For": "203.0.113.7"}) for _ in range(20)]
    assert [r.status_code for r in answers] == [200] * 5 + [429] * 15
    assert answers[0].headers["ratelimit"] == '"per-ip";r=4;t=0'
    assert answers[5].json()["key"] == "ip-203.0.113.7"
    # another client, another bucket
    assert app.get(headers={"X-Forwarded-For": "203.0.113.8"}).status_code == 200
    # what the client wrote itself (left of the proxy's entry) is not believed
    spoofed = app.get(headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.7"})
    assert spoofed.status_code == 429
    assert spoofed.json()["key"] == "ip-203.0.113.7"
    # repeated headers are one list, in order
    repeated = app.get(
        headers=[("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "203.0.113.7")]
    )
    assert repeated.json()["key"] == "ip-203.0.113.7"
    assert app.state()["no_client_address"] == 0


def test_hops_through_trusted_proxies_are_skipped(uvicorn_app: Any) -> None:
    app = uvicorn_app(config(PER_IP, trusted_proxies=["unix", "10.0.0.0/8", "2001:db8:ffff::1"]))
    # client, then two proxies of ours appended what they saw
    chain = "192.0.2.1, 198.51.100.9, 10.1.2.3, 2001:db8:ffff::1"
    answers = [app.get(headers={"X-Forwarded-For": chain}) for _ in range(6)]
    assert [r.status_code for r in answers] == [200] * 5 + [429]
    assert answers[-1].json()["key"] == "ip-198.51.100.9"


def test_forwarded_header_when_the_proxy_sets_that_one(uvicorn_app: Any) -> None:
    app = uvicorn_app(
        config({**PER_IP, "capacity": 1}, trusted_proxies=["unix"], forwarded_header="Forwarded")
    )
    headers = {
        "Forwarded": 'for=192.0.2.60;proto=http, For="[2001:db8:cafe::17]:4711";by=unix',
        # not the header this proxy maintains: whatever the client wrote
        "X-Forwarded-For": "203.0.113.99",
    }
    assert app.get(headers=headers).status_code == 200
    denied = app.get(headers=headers)
    assert denied.status_code == 429
    assert denied.json()["key"] == "ip-2001:db8:cafe::17"


def test_an_unusable_forwarded_hop_is_no_client_address(uvicorn_app: Any) -> None:
    app = uvicorn_app(config(PER_IP, trusted_proxies=["unix"], unmatched="deny"))
    for value in ("unknown", "ip-203.0.113.7-x", ""):
        assert app.get(headers={"X-Forwarded-For": value}).status_code == 400
    # no header at all: the unix peer has no address either
    assert app.get().status_code == 400
    assert app.state()["no_client_address"] == 4


def test_forwarded_headers_from_an_untrusted_peer_are_ignored(uvicorn_app: Any) -> None:
    app = uvicorn_app(config({**PER_IP, "capacity": 1}), uds=False)
    first = app.get(headers={"X-Forwarded-For": "203.0.113.7"})
    second = app.get(headers={"X-Forwarded-For": "203.0.113.8"})
    assert (first.status_code, second.status_code) == (200, 429)
    assert second.json()["key"] == "ip-127.0.0.1"


def test_a_trusted_tcp_proxy_is_believed(uvicorn_app: Any) -> None:
    app = uvicorn_app(config({**PER_IP, "capacity": 1}, trusted_proxies=["127.0.0.0/8"]), uds=False)
    assert app.get(headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 200
    assert app.get(headers={"X-Forwarded-For": "203.0.113.8"}).status_code == 200
    denied = app.get(headers={"X-Forwarded-For": "203.0.113.7"})
    assert denied.status_code == 429
    assert denied.json()["key"] == "ip-203.0.113.7"
    # a trusted peer without the header is itself the client
    assert app.get().status_code == 200
