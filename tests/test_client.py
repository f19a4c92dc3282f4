"""bucketmesh.client against real ``bucketmesh serve`` processes: the surface, safe
retries (a connection cut after the node answered is charged once), 429 with
``wait``, coalescing, failover between regions and back, and failing open or closed
when no region answers. Backoff pauses are made small through the policies; the
tests wait for events (``eventually``), never for durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest
from conftest import SEED_RULE, Mesh, Server, ServerFactory, eventually, make_config

from bucketmesh.client import (
    ApiError,
    AsyncClient,
    BadRequest,
    BreakerPolicy,
    Circuit,
    Client,
    Decision,
    Forbidden,
    NotFound,
    RateLimited,
    RetryPolicy,
    Unauthorized,
    Unavailable,
)
from bucketmesh.client import results as client_results
from bucketmesh.http import wire

ADMIN_TOKEN = "client-tests-token"
#: Pauses short enough for a test, a budget long enough for a busy box.
FAST = RetryPolicy(total_timeout=20.0, backoff_base=0.01, backoff_cap=0.05)

BUCKETS: list[dict[str, Any]] = [
    SEED_RULE,
    # one token every 50 ms: a 429 that a short wait turns into a grant
    {"name": "quick", "key": "quick-{{ .Request.Query.q }}", "capacity": 1, "refillRate": 20},
    # refills so slowly (one token per 100 s) that a test sees no refill at all
    {"name": "slow", "key": "slow-{{ .Request.Header.X-User }}", "capacity": 5, "refillRate": 0.01},
]


@pytest.fixture(scope="module")
def node(serve_module: ServerFactory) -> Server:
    return serve_module(make_config(BUCKETS), admin_token=ADMIN_TOKEN)


@pytest.fixture
def client(node: Server) -> Iterator[Client]:
    with Client(node.base_url, retry=FAST, admin_token=ADMIN_TOKEN) as c:
        yield c


def used(server_url: str, key: str) -> int:
    state = httpx.get(server_url + "/v1/bucket/state", params={"key": key}, timeout=10).json()
    return sum(entry["used"] for entry in state["replicas"].values())


def responses(server_url: str, route: str, status: int) -> float:
    text = httpx.get(server_url + "/metrics", timeout=10).text
    pattern = rf'^bucketmesh_http_responses_total\{{route="{route}",status="{status}"\}} (\S+)$'
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


# -- the surface ----------------------------------------------------------------------------


def test_rate_by_key_and_by_headers_share_one_bucket(client: Client) -> None:
    first = client.rate("agent-api-key-surface")
    assert first.allowed and first.key == "agent-api-key-surface"
    assert (first.rule, first.region, first.capacity) == ("agent-api-key", "us-east-1", 5000)
    assert first.tokens_remaining == 4999 and not first.retried and not first.replayed
    second = client.rate({"X-API-Key": "surface"}, tokens=10)
    # one bucket: the second call sees the first's token gone (the rule refills 50/s, so a
    # slow machine may add a token or two between the calls; ``used`` is exact)
    assert second.key == "agent-api-key-surface" and 4989 <= second.tokens_remaining < 4999
    assert client.state("agent-api-key-surface").used == 11


def test_a_429_is_a_decision_not_an_error(client: Client) -> None:
    for _ in range(5):
        assert client.rate("slow-denied").allowed
    denied = client.rate("slow-denied")
    assert not denied.allowed and denied.retry_after > 0 and denied.tokens_remaining == 0
    assert denied.attempts == 1  # a 429 is not retried


def test_batch_and_atomic_batch(client: Client) -> None:
    result = client.batch(["slow-b1", ("slow-b1", 2), {"key": "slow-b2", "tokens": 5}])
    assert [d.allowed for d in result] == [True, True, True] and result.allowed == 3
    assert [d.tokens_remaining for d in result] == [4, 2, 0]
    atomic = client.batch([("slow-b1", 2), ("slow-b2", 1)], atomic=True)
    assert atomic.allowed == 0 and atomic.denied == 2  # slow-b2 is empty: nothing charged
    assert client.state("slow-b1").used == 3


def test_state_status_and_configure(client: Client, node: Server) -> None:
    state = client.state("slow-never-used")
    assert not state.live and state.tokens_remaining == 5 and state.used == 0
    status = client.status()
    assert status.region == "us-east-1" and status.endpoint == node.base_url
    assert client.status(key="slow-never-used").bucket is not None
    changed = client.configure("slow-configured", capacity=2, refill_rate=0.5)
    assert (changed.capacity, changed.refill_rate, changed.applies_to) == (2, 0.5, "key")
    assert client.rate("slow-configured").capacity == 2


def test_client_errors_are_raised_at_once_naming_the_field(client: Client, node: Server) -> None:
    before = responses(node.base_url, "rate", 400)
    with pytest.raises(BadRequest) as error:
        client.rate("slow-x", tokens=6)  # above the capacity
    assert error.value.field == "tokens" and error.value.status == 400
    assert responses(node.base_url, "rate", 400) == before + 1  # sent once, never retried
    with pytest.raises(BadRequest) as error:
        client.rate("no-rule-makes-this")
    assert error.value.field == "key"
    with pytest.raises(BadRequest) as error:
        client.rate("x", rule="no-such-rule")
    assert error.value.field == "rule"
    with pytest.raises(NotFound):
        client.state("no-rule-makes-this")


def test_configure_needs_the_admin_token(node: Server) -> None:
    with (
        Client(node.base_url, retry=FAST, admin_token="") as anonymous,
        pytest.raises(Unauthorized),
    ):
        anonymous.configure("slow", ttl=100)
    with Client(node.base_url, retry=FAST, admin_token="wrong") as wrong, pytest.raises(Forbidden):
        wrong.configure("slow", ttl=100)


def test_bad_arguments_are_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueError, match="url"):
        Client("ftp://example.com")
    with pytest.raises(ValueError, match="on_unavailable"):
        Client("http://127.0.0.1:1", on_unavailable="maybe")  # type: ignore[arg-type]
    with Client("http://127.0.0.1:1") as c, pytest.raises(TypeError, match="tokens"):
        c.rate("k", tokens=1.5)  # type: ignore[arg-type]


def test_a_header_or_key_http_cannot_carry_is_the_callers_error_not_a_dead_node(
    node: Server,
) -> None:
    """Before: a trailing newline in a header value (a key read from a file) failed in
    httpx like a dead node, was retried, and opened the circuit, so a fail-open client
    then allowed every caller's request unchecked for the breaker's cooldown."""
    with Client(node.base_url, retry=FAST, on_unavailable="open") as c:
        for headers in ({"X-API-Key": "abc\n"}, {"X API Key": "abc"}, {"X-API-Key": "a\x00"}):
            with pytest.raises(ValueError, match="header"):
                c.rate(headers)
        with pytest.raises(ValueError, match="key is not valid UTF-8"):
            c.rate("agent-api-key-\udcff")  # a byte that was not UTF-8, surrogate-escaped
        with pytest.raises(ValueError, match="refill_rate must be a finite number"):
            c.configure("slow", capacity=7, refill_rate=float("nan"))
        # nothing was sent, the circuit is closed: the next call is a real decision
        decision = c.rate("agent-api-key-after-bad-headers")
        assert decision.allowed and decision.fallback is None and decision.attempts == 1
        # text that is not ASCII goes as UTF-8, as the node reads header values
        assert c.rate({"X-API-Key": "clé"}).key == "agent-api-key-clé"
        assert c.rate("agent-api-key-clé").tokens_remaining < 4999


def test_a_new_key_at_the_bucket_cap_is_that_callers_answer_not_a_dead_node(
    serve: ServerFactory,
) -> None:
    """Before: the node's 503 for one new key at its bucket cap opened the client's
    circuit (every caller then failed, or was let through fail-open), and a coalesced
    batch holding that key failed every caller in it."""
    capped = serve(make_config(BUCKETS, limits={"maxBuckets": 2}))
    with Client(capped.base_url, retry=FAST, on_unavailable="open") as c:
        assert c.rate("agent-api-key-one").allowed and c.rate("agent-api-key-two").allowed
        with pytest.raises(ApiError) as refused:
            c.rate("agent-api-key-three")
        assert (refused.value.status, refused.value.field) == (503, "key")
        assert refused.value.type == "urn:bucketmesh:problem:bucket-cap"
        after = c.rate("agent-api-key-one")
        assert after.allowed and after.fallback is None and after.attempts == 1

    async def coalesced() -> None:
        async with AsyncClient(capped.base_url, retry=FAST, coalesce=True) as ac:
            known, new = await asyncio.gather(
                ac.rate("agent-api-key-two"),
                ac.rate("agent-api-key-four"),
                return_exceptions=True,
            )
            assert isinstance(known, client_results.Decision) and known.allowed, known
            assert isinstance(new, ApiError) and new.status == 503, new

    asyncio.run(coalesced())


def test_the_cli_refuses_a_key_that_is_not_utf8_as_a_usage_error(node: Server) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bucketmesh",
            "rate",
            "agent-api-key-\udcff",
            "--url",
            node.base_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        errors="surrogateescape",
    )
    assert done.returncode == 2, done.stderr
    assert "not valid UTF-8" in done.stderr and "Traceback" not in done.stderr


def test_limit_as_context_manager_and_decorator(client: Client) -> None:
    with client.limit("slow-limited") as decision:
        assert decision.allowed

    calls: list[str] = []

    @client.limit("slow", key=lambda user: f"slow-deco-{user}", tokens=5)
    def work(user: str) -> str:
        calls.append(user)
        return user.upper()

    assert work("ann") == "ANN"
    with pytest.raises(RateLimited) as limited:
        work("ann")
    assert calls == ["ann"] and limited.value.decision.key == "slow-deco-ann"
    assert limited.value.retry_after > 0


def test_wait_turns_a_429_into_a_grant_after_the_refill(client: Client) -> None:
    assert client.rate("quick-w").allowed
    decision = client.rate("quick-w", wait=True, timeout=30)
    assert decision.allowed and decision.waits >= 1 and decision.waited > 0
    assert not decision.retried  # asking again after a 429 is not a retry
    assert client.stats.waits >= 1
    assert client.state("quick-w").used == 2
    again = client.acquire_blocking("quick-w", timeout=30)
    assert again.allowed


def test_wait_gives_up_when_the_refill_is_past_the_deadline(client: Client) -> None:
    for _ in range(5):
        client.rate("slow-wait")
    denied = client.rate("slow-wait", wait=True, timeout=1.0)  # a token takes 100 s
    assert not denied.allowed and denied.waits == 0


def test_client_results_carry_every_field_the_server_sends() -> None:
    pairs = [
        (client_results.Decision, wire.DecisionBody),
        (client_results.BucketState, wire.BucketStateBody),
        (client_results.RuleConfig, wire.BucketConfigBody),
        (client_results.Status, wire.StatusBody),
        (client_results.BatchResult, wire.BatchResponse),
    ]
    for ours, theirs in pairs:
        missing = set(theirs.__struct_fields__) - set(ours.__struct_fields__)
        assert not missing, (ours.__name__, missing)


# -- a connection cut after the node answered -----------------------------------------------


class CutFirstAnswer:
    """A TCP relay on loopback in front of a node. On the first connection, it passes
    the request on, waits until the node's answer starts arriving (the node has
    decided and charged), then resets the client's connection without passing the
    answer on. Every later connection is relayed both ways."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.cuts = 0
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    def __enter__(self) -> CutFirstAnswer:
        self.thread.start()
        assert self.ready.wait(30), "the relay did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            with contextlib.suppress(Exception):
                sink.close()

        upstream = asyncio.ensure_future(pump(reader, up_writer))
        if first:
            await up_reader.read(1)  # the node's answer has begun: it decided
            self.cuts += 1
            writer.transport.abort()  # RST to the client; the answer is lost
            upstream.cancel()
            up_writer.close()
            return
        await pump(up_reader, writer)
        upstream.cancel()


def test_a_retry_after_a_connection_cut_mid_answer_charges_once(node: Server) -> None:
    key = "slow-cut-sync"
    with CutFirstAnswer(node.address) as relay, Client(relay.url, retry=FAST) as c:
        decision = c.rate(key, tokens=2)
    assert relay.cuts == 1 and relay.connections >= 2
    assert decision.allowed and decision.retried and decision.replayed
    assert decision.tokens_remaining == 3
    assert used(node.base_url, key) == 2  # charged once, not twice


def test_an_async_retry_after_a_connection_cut_charges_once(node: Server) -> None:
    key = "slow-cut-async"

    async def call(url: str) -> Decision:
        async with AsyncClient(url, retry=FAST, coalesce=False) as c:
            return await c.rate(key, tokens=2)

    with CutFirstAnswer(node.address) as relay:
        decision = asyncio.run(call(relay.url))
    assert relay.cuts == 1
    assert decision.allowed and decision.retried and decision.replayed
    assert used(node.base_url, key) == 2


def test_a_cut_batch_is_charged_once_too(node: Server) -> None:
    with CutFirstAnswer(node.address) as relay, Client(relay.url, retry=FAST) as c:
        result = c.batch([("slow-cut-b1", 1), ("slow-cut-b2", 3)])
    assert relay.cuts == 1 and result.replayed and result.retried
    assert used(node.base_url, "slow-cut-b1") == 1 and used(node.base_url, "slow-cut-b2") == 3


# -- coalescing -----------------------------------------------------------------------------


def test_coalesced_calls_each_get_their_own_decision(node: Server) -> None:
    keys = [f"slow-co-{i}" for i in range(10)]
    before = responses(node.base_url, "batch", 200), responses(node.base_url, "rate", 200)

    async def main() -> tuple[list[Any], AsyncClient]:
        async with AsyncClient(node.base_url, retry=FAST) as c:
            calls = [c.rate(key) for key in keys for _ in range(6)]
            calls.append(c.rate("slow-co-bad", tokens=99))  # above the capacity
            calls.append(c.rate("slow-co-x", rule="no-such-rule"))
            found = await asyncio.gather(*calls, return_exceptions=True)
            return found, c

    found, c = asyncio.run(main())
    decisions, bad_tokens, bad_rule = found[:-2], found[-2], found[-1]
    assert isinstance(bad_tokens, BadRequest) and bad_tokens.field == "tokens"
    assert isinstance(bad_rule, BadRequest) and bad_rule.field == "rule"
    for index, key in enumerate(keys):
        mine = decisions[index * 6 : index * 6 + 6]
        assert all(isinstance(d, Decision) and d.key == key for d in mine)
        assert sorted(d.tokens_remaining for d in mine if d.allowed) == [0, 1, 2, 3, 4]
        assert sum(not d.allowed for d in mine) == 1
        assert used(node.base_url, key) == 5
    # one batch for the sixty good calls (the two bad ones were refused in it first)
    assert c.stats.coalesced == 60
    after = responses(node.base_url, "batch", 200), responses(node.base_url, "rate", 200)
    assert after[0] - before[0] == 1 and after[1] == before[1]


def test_async_limit_context_manager_and_decorator(node: Server) -> None:
    async def main() -> list[str]:
        seen: list[str] = []
        async with AsyncClient(node.base_url, retry=FAST) as c:
            async with c.limit("slow", key="slow-alimit") as decision:
                seen.append(f"entered {decision.tokens_remaining}")

            @c.limit("slow-alimit", tokens=4)
            async def work() -> str:
                return "done"

            seen.append(await work())
            try:
                await work()
            except RateLimited as limited:
                seen.append(f"limited {limited.decision.tokens_remaining}")
        return seen

    assert asyncio.run(main()) == ["entered 4", "done", "limited 0"]


# -- regions: failover, recovery, and none answering ----------------------------------------


def test_failover_when_the_preferred_region_dies_and_back_when_it_returns(
    serve: ServerFactory,
) -> None:
    mesh = Mesh(serve, ["us-east-1", "eu-central-1"], buckets=BUCKETS).start()
    near, far = mesh[0], mesh[1]
    regions = {"us-east-1": near.base_url, "eu-central-1": far.base_url}
    breaker = BreakerPolicy(failures_to_open=1, cooldown=0.05)
    with Client(regions, retry=FAST, breaker=breaker) as c:
        assert c.rate("agent-api-key-fo").region == "us-east-1"
        near.kill()
        moved = c.rate("agent-api-key-fo")
        assert moved.allowed and moved.region == "eu-central-1" and moved.endpoint == far.base_url
        assert c.stats.failovers >= 1
        assert c.endpoints[0].circuit is not Circuit.CLOSED
        mesh.restart(near)
        back = eventually(lambda: c.rate("agent-api-key-fo").region == "us-east-1", "calls go home")
        assert back
        assert c.endpoints[0].circuit is Circuit.CLOSED
    # every grant was charged once, wherever it was made
    eventually(lambda: mesh.converged("agent-api-key-fo"), "the regions agree")


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_fail_open_or_closed_when_every_region_is_down(serve: ServerFactory, mode: str) -> None:
    servers = [serve(make_config(BUCKETS)), serve(make_config(BUCKETS, region="eu-central-1"))]
    for server in servers:
        server.kill()
    policy = RetryPolicy(total_timeout=10.0, max_attempts=6, backoff_base=0.01)
    with Client([s.base_url for s in servers], retry=policy, on_unavailable=mode) as c:  # type: ignore[arg-type]
        decision = c.rate("agent-api-key-down")
        assert decision.fallback == mode and decision.allowed == (mode == "open")
        assert decision.failed_open == (mode == "open") and decision.attempts >= 2
        assert c.stats.unavailable == 1
        assert (c.stats.failed_open, c.stats.failed_closed) == (
            (1, 0) if mode == "open" else (0, 1)
        )
        # the circuits are open now: the next call decides without trying
        attempts_before = c.stats.attempts
        assert c.rate("agent-api-key-down").fallback == mode
        assert c.stats.attempts == attempts_before
        batch = c.batch(["agent-api-key-a", "agent-api-key-b"])
        assert batch.fallback == mode and len(batch) == 2

    async def coalesced() -> Decision:
        async with AsyncClient(servers[0].base_url, retry=policy, on_unavailable=mode) as ac:  # type: ignore[arg-type]
            return await ac.rate("agent-api-key-down")

    assert asyncio.run(coalesced()).fallback == mode


def test_no_region_answering_raises_by_default(serve: ServerFactory) -> None:
    server = serve(make_config(BUCKETS))
    server.kill()
    policy = RetryPolicy(max_attempts=3, backoff_base=0.01)
    with Client(server.base_url, retry=policy) as c, pytest.raises(Unavailable) as error:
        c.rate("agent-api-key-down")
    assert error.value.attempts >= 1 and server.base_url in error.value.errors


def test_a_bucket_cap_503_is_answered_at_once_not_waited_for(serve: ServerFactory) -> None:
    """The cap's 503 carries Retry-After: 1, past a 0.5 s budget; it is the answer for
    that key (a ``final`` reply), so it is neither waited for nor retried. The plan's
    handling of a Retry-After past the budget: tests/test_client_retry.py."""
    server = serve(make_config(BUCKETS), max_buckets=1)
    with Client(server.base_url, retry=RetryPolicy(total_timeout=0.5)) as c:
        assert c.rate("slow-first").allowed  # the one bucket the cap allows
        with pytest.raises(ApiError, match=r"the cap \(max_buckets\) is reached"):
            c.rate("slow-second")
    assert responses(server.base_url, "rate", 503) == 1


# -- the command line -----------------------------------------------------------------------


def bucketmesh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bucketmesh", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_cli_rate_state_configure(node: Server) -> None:
    url = ["--url", node.base_url]
    allowed = bucketmesh("rate", "slow-cli", "--tokens", "5", *url)
    assert allowed.returncode == 0, allowed.stderr
    decision = msgspec.json.decode(allowed.stdout)
    assert decision["allowed"] and decision["tokens_remaining"] == 0
    denied = bucketmesh("rate", "slow-cli", *url)
    assert denied.returncode == 1 and not msgspec.json.decode(denied.stdout)["allowed"]
    state = bucketmesh("state", "slow-cli", *url)
    assert state.returncode == 0 and msgspec.json.decode(state.stdout)["replicas"]
    refused = bucketmesh("rate", "nobody-makes-this", *url)
    assert refused.returncode == 2 and "(key)" in refused.stderr
    configured = bucketmesh(
        "configure", "slow-cli2", "--capacity", "9", "--admin-token", ADMIN_TOKEN, *url
    )
    assert configured.returncode == 0, configured.stderr
    assert msgspec.json.decode(configured.stdout)["capacity"] == 9
    unauthorized = bucketmesh("configure", "slow", "--ttl", "10", *url)
    assert unauthorized.returncode == 2 and "401" in unauthorized.stderr
    usage = bucketmesh("configure", "slow", *url)
    assert usage.returncode == 2 and "--capacity" in usage.stderr
    assert bucketmesh("rate", "k", "--url", "nonsense").returncode == 2


def test_cli_exit_status_when_no_region_answers(serve: ServerFactory) -> None:
    server = serve(make_config(BUCKETS))
    server.kill()
    args = ["rate", "agent-api-key-cli", "--url", server.base_url, "--retry-for", "0.5"]
    down = bucketmesh(*args)
    assert down.returncode == 3 and "no region answered" in down.stderr
    opened = bucketmesh(*args, "--fail", "open")
    assert opened.returncode == 0 and msgspec.json.decode(opened.stdout)["fallback"] == "open"


def test_limit_refuses_the_other_kind_of_function(node: Server) -> None:
    async def coroutine_function() -> None:
        return None

    def plain_function() -> None:
        return None

    with Client(node.base_url) as c, pytest.raises(TypeError, match=r"AsyncClient\.limit"):
        c.limit("slow-kinds")(coroutine_function)

    async def main() -> None:
        async with AsyncClient(node.base_url) as ac:
            with pytest.raises(TypeError, match=r"Client\.limit"):
                ac.limit("slow-kinds")(plain_function)  # type: ignore[arg-type]

    asyncio.run(main())


def test_urls_from_the_environment_in_preference_order() -> None:
    from bucketmesh.client._calls import named_urls

    env = {"BUCKETMESH_URL": "us-east-1=http://10.0.0.1:8080, http://10.0.0.2:8080/"}
    assert named_urls(None, env) == [
        ("us-east-1", "http://10.0.0.1:8080"),
        ("10.0.0.2:8080", "http://10.0.0.2:8080"),
    ]
    assert named_urls(None, {}) == [("127.0.0.1:8080", "http://127.0.0.1:8080")]
    with pytest.raises(ValueError, match="BUCKETMESH_URL"):
        named_urls(None, {"BUCKETMESH_URL": "eu=10.0.0.3:8080"})
    with pytest.raises(ValueError, match=r"url\[1\]"):
        named_urls(["http://a:1", "http://b:notaport"])


def test_coalesced_batches_stay_under_the_nodes_body_limit(node: Server) -> None:
    # 300 keys of ~1 KB: one batch would be ~300 KB, far over limits.maxBodyBytes (64 KiB)
    keys = [f"slow-{'x' * 1000}-{i}" for i in range(300)]

    async def main() -> tuple[list[Decision], AsyncClient]:
        async with AsyncClient(node.base_url, retry=FAST) as c:
            return list(await asyncio.gather(*(c.rate(key) for key in keys))), c

    decisions, c = asyncio.run(main())
    assert [d.key for d in decisions] == keys and all(d.allowed for d in decisions)
    assert c.stats.coalesced == 300 and c.stats.batches >= 5


def test_headers_with_a_rule_are_rendered_by_that_rule(client: Client) -> None:
    """Headers that satisfy several rules: without ``rule`` the first renders the key,
    with it the rule named does (before, the client refused the pair)."""
    headers = {"X-API-Key": "client-rule-test", "X-User": "client-rule-test"}
    first = client.rate(headers)
    assert first.rule == "agent-api-key"  # the seed rule, first
    named = client.rate(headers, rule="slow")
    assert (named.rule, named.key) == ("slow", "slow-client-rule-test")
