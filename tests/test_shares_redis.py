"""A region on Redis in strict mode's rights ledger (issue 18): its two nodes share
one holding in Redis, the one holding the region's lease rebalances for it, and its
transfers replicate over the mesh like an embedded region's.

A mixed mesh: us-east-1 is two ``serve`` nodes on one real redis-server, the other
two regions embedded. With 90 % of the demand in the Redis region (split over its
two nodes), rights flow to it and the key serves >= 95 % of its limit, never more
than the limit (the two nodes spend one holding: each spending its own would show
as up to twice the region's part); cut off, nothing moves and neither side goes
over; healed, rights flow again. Before this change a Redis region kept a fixed
third (its rights never moved: the first ``eventually`` timed out)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from conftest import Mesh, ServerFactory, eventually
from test_shares_mesh import CAPACITY, KEY, RATE, RULE, Driver, rights

REDIS_REGION = "us-east-1"
TOKEN = "shares-redis-admin"
# a second strict rule (asked with ?h=): a large capacity against a slow refill, so that
# what a region spends is mostly what it holds, not what refilled
HARD_CAPACITY, HARD_RATE = 100, 1.0
HARD: dict[str, Any] = dict(
    RULE,
    name="hard",
    key="hard-{{ .Request.Query.h }}",
    capacity=HARD_CAPACITY,
    refillRate=HARD_RATE,
)
HARD_KEY = "hard-x"


@pytest.fixture(scope="module")
def region_mesh(
    serve_module: ServerFactory,
    redis_server_module: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Mesh]:
    """us-east-1: two nodes on one redis-server; eu-central-1 and ap-southeast-2
    embedded (with snapshots: a node started without one waits for silent proxied
    peers at its start). Shared by this module's tests, in order (the last one wipes
    Redis)."""
    path = tmp_path_factory.mktemp("region")
    redis = {"backend": "redis", "redisUrl": redis_server_module.url, "redisTimeoutMs": 3000}
    mesh = Mesh(
        serve_module,
        {
            "redis-a": REDIS_REGION,
            "redis-b": REDIS_REGION,
            "eu": "eu-central-1",
            "ap": "ap-southeast-2",
        },
        buckets=[RULE, HARD],
        proxied=True,
        cluster_id="shares-redis",
        admin_token=TOKEN,
        overrides={
            "redis-a": {"node": "redis-a", "storage": redis},
            "redis-b": {"node": "redis-b", "storage": redis},
            "eu": {"node": "eu", "storage": {"snapshot": str(path / "eu.snap")}},
            "ap": {"node": "ap", "storage": {"snapshot": str(path / "ap.snap")}},
        },
    ).start()
    yield mesh


def test_a_redis_region_holds_spends_and_gives_rights_like_an_embedded_one(
    region_mesh: Mesh,
) -> None:
    mesh = region_mesh
    a, b, eu, ap = (mesh.nodes[name] for name in ("redis-a", "redis-b", "eu", "ap"))
    # 90 % of the demand in the Redis region, half on each of its nodes; 130 % of
    # the limit in all (every region asks for more than its rights)
    driver = Driver([a, b, eu, ap], [0.45, 0.45, 0.05, 0.05], load=1.3)
    driver.start()
    try:
        eventually(
            lambda: rights(eu, REDIS_REGION) >= 0.85 and rights(ap, REDIS_REGION) >= 0.85,
            "rights flow to the Redis region",
            120,
        )
        state = eu.state(KEY)
        assert sum(e["rights"] for e in state["shares"].values()) <= 1.0 + 1e-9

        # a measured window: >= 95 % of r·W served, most of it by the two Redis nodes
        # together, and never more than C + r·W (one holding, spent by both)
        opened, asked = time.monotonic(), driver.asks()
        first = driver.counts()
        eventually(lambda: sum(driver.counts()) - sum(first) >= 5 * RATE, "a window", 120)
        last = driver.counts()
        span = time.monotonic() - opened
        served = [x - y for x, y in zip(last, first, strict=True)]
        assert sum(served) <= CAPACITY + RATE * span, (served, span)
        assert sum(served) >= 0.95 * driver.demand(asked, span), (served, span)
        assert served[0] + served[1] >= 0.85 * driver.demand(asked, span), (served, span)
        assert served[0] > 0 and served[1] > 0, served  # both nodes spend the holding

        # cut the Redis region off: nothing moves, and the total stays within the limit
        mesh.cut("redis-a", "redis-b")
        eventually(
            lambda: (
                eu.status()["sync"]["peers"][REDIS_REGION]["state"] == "down"
                and ap.status()["sync"]["peers"][REDIS_REGION]["state"] == "down"
                and a.status()["sync"]["local_only"] is True
                and b.status()["sync"]["local_only"] is True
            ),
            "the cut is seen on both sides",
        )
        transfers = [
            n.metric("bucketmesh_strict_share_transfers_total") for n in mesh.nodes.values()
        ]
        held = rights(eu, REDIS_REGION)
        before, started = driver.counts(), time.monotonic()
        driver.shift([0.025, 0.025, 0.9, 0.05])  # the demand moves to the other side
        eventually(lambda: driver.counts()[2] - before[2] >= 8, "the other side serves")
        after, elapsed = driver.counts(), time.monotonic() - started
        window = [x - y for x, y in zip(after, before, strict=True)]
        assert sum(window) <= CAPACITY + RATE * elapsed, (window, elapsed)
        assert rights(eu, REDIS_REGION) == held
        assert [
            n.metric("bucketmesh_strict_share_transfers_total") for n in mesh.nodes.values()
        ] == transfers

        # healed: rights flow again, toward where the demand is now
        mesh.heal()
        eventually(lambda: rights(eu, eu.region) >= 0.6, "rights flow after healing", 120)
        opened = time.monotonic()
        first = driver.counts()
        eventually(lambda: sum(driver.counts()) - sum(first) >= 2 * RATE, "a window", 120)
        span = time.monotonic() - opened
        served = [x - y for x, y in zip(driver.counts(), first, strict=True)]
        assert sum(served) <= CAPACITY + RATE * span, (served, span)

        # a per-key PATCH on each Redis node in turn (whichever holds the lease) reaches
        # the region's writer: every region runs on the last one, and the key stays
        # within it from then on
        for node, limit in ((a, 30), (b, 20)):
            patched = node.client.patch(
                f"/v1/buckets/{KEY}",
                json={"capacity": limit, "refillRate": float(limit)},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            # a Redis region's writer burns a lowering from its next round: pending
            assert patched.status_code == 202, patched.text
            assert REDIS_REGION in patched.json()["pending"]["waiting"]
        new = {"capacity": 20, "refill_rate": 20.0}
        eventually(
            lambda: (
                all(e["limit"] == new for e in eu.state(KEY)["shares"].values())
                and all(e["limit"] == new for e in ap.state(KEY)["shares"].values())
            ),
            "every region runs on the new limit",
            120,
        )
        opened = time.monotonic()
        first = driver.counts()
        eventually(lambda: sum(driver.counts()) - sum(first) >= 40, "a window", 120)
        span = time.monotonic() - opened
        served = [x - y for x, y in zip(driver.counts(), first, strict=True)]
        assert sum(served) <= 20 + 20.0 * span, (served, span)
    finally:
        mesh.heal()
        driver.stop.set()
        driver.join(timeout=30)


def test_the_share_hash_is_written_from_one_reading_and_one_bucket_takes_its_share(
    redis_server: Any,
) -> None:
    """share.lua refuses a write based on a reading someone wrote after (two nodes
    that both believe they hold the lease cannot both commit a transfer); lease.lua
    gives the lease to one node at a time; the acquire script creates a strict-shares
    bucket on the share hash's config, not on the node's (before this change the
    scripts did not exist and a bucket took the ask's config)."""
    import asyncio

    from bucketmesh.core.bucket import BucketConfig
    from bucketmesh.storage.redis_store import Ask, RedisStore

    async def run() -> None:
        store = RedisStore(redis_server.url, "eu", timeout_s=5.0)
        await store.join()
        try:
            assert await store.share_lease("node-a", 5_000)
            assert not await store.share_lease("node-b", 5_000)
            assert await store.share_lease("node-a", 5_000)  # renewed
            assert await store.write_share("k", 0, {"c": "3"}) == 1
            assert await store.write_share("k", 0, {"c": "30"}) == -1  # read before 1
            assert await store.write_share("k", 1, {"L": "x"}) == 2
            version = (1_000, "eu/redis/1")
            await store.write_share(
                "k", 2, {"c": "3", "i": "1000000000", "vh": "1000", "vo": "eu/redis/1", "w": "1"}
            )
            whole = BucketConfig(40, 25_000_000, 3_600_000_000_000, "strict", version)
            now = 1_763_900_000_123_456_789
            asks = [Ask("k", "r", whole, 1, shares=True) for _ in range(5)]
            verdicts = await store.acquire(asks, now)
            # the share's capacity 3, one token missing (received without tokens)
            assert [v.status for v in verdicts] == [1, 1, 0, 0, 0]
            assert {v.capacity for v in verdicts} == {3}
        finally:
            await store.close()

    asyncio.run(run())


def test_a_redis_region_freezes_a_restarted_nodes_older_gifts_from_its_pull_on(
    redis_server: Any,
) -> None:
    """Region B on Redis, region A's node restarted (``A/n/1`` -> ``A/n/2``). A gift of
    ``A/n/1`` counts at B; ``A/n/2`` pulls B (the mesh sees its sender, and awaits the
    mirror's ``share_freeze`` before answering); then a late or duplicated message of
    ``A/n/1`` raising its gift arrives: B's holding must not rise (the pull answered
    the lower gift, which is all ``A/n/2`` counts as given away), neither at the writer
    nor at a new writer (another process on the same Redis) that heard the late gift
    itself, and the new writer keeps the gift committed before the freeze. Before this
    change the Redis mirror saw no incarnation (no ``share_region``): 1.5x the gift."""
    import asyncio

    from bucketmesh.core.bucket import BucketDelta
    from bucketmesh.core.limiter import DeltaBatch
    from bucketmesh.core.rules import Rule
    from bucketmesh.core.shares import SCALE, ShareState
    from bucketmesh.storage.redis_backend import RedisBackend

    rule = Rule.create("s-{{ .Request.Query.u }}", 100, 1.0, name="s", mode="strict")
    key, gift = "s-1", SCALE // 10
    half = SCALE // 2

    def message(sender: str, parts: int, backend: RedisBackend) -> DeltaBatch:
        config = backend.mirror.limiter.rule_configs["s"]
        ledger = ShareState(("A", "B"), given={"A/n/1>B": parts})
        delta = BucketDelta(key, 0, config, config.version, 0, {}, "s", shares=ledger)
        return DeltaBatch(sender, [delta])

    async def receive(backend: RedisBackend, sender: str, batch: DeltaBatch | None) -> None:
        # what Mesh._open / receive_pull / _merge do with a sync message from ``sender``
        mirror = backend.mirror
        if getattr(mirror, "share_region", None) is not None:
            mirror.observe_replica(sender)
        if batch is None:  # a pull request
            freeze = getattr(mirror, "share_freeze", None)
            assert freeze is None or await freeze()
        else:
            mirror.merge(batch)

    async def pulled() -> bool:
        return True

    async def node(name: str) -> RedisBackend:
        backend = RedisBackend([rule], region="B", node=name, url=redis_server.url, timeout_s=5)
        await backend._rejoin()
        backend.up = True
        backend.enable_shares(("A", "B"), name, lambda: False, pulled)
        return backend

    def holding(backend: RedisBackend) -> int:
        return backend.mirror.limiter.ledgers[key].holding("B")

    async def committed(backend: RedisBackend) -> int:
        row = (await backend.store.read_shares())[key]
        return int(msgspec.json.decode(row["L"])[1].get("A/n/1>B", 0))

    async def run() -> None:
        first = await node("b1")
        second: RedisBackend | None = None
        try:
            await receive(first, "A/n/1", message("A/n/1", gift, first))
            await first.shares.step()  # type: ignore[union-attr]
            assert first.shares.writer  # type: ignore[union-attr]
            assert holding(first) == half + gift
            await receive(first, "A/n/2", None)  # the restarted node's pull
            await receive(first, "A/n/1", message("A/n/1", 2 * gift, first))  # late
            await first.shares.step()  # type: ignore[union-attr]
            assert holding(first) == half + gift
            assert await committed(first) == gift
            # another node of the region, which heard only the late message, writes next
            second = await node("b2")
            await receive(second, "A/n/1", message("A/n/1", 3 * gift, second))
            deadline = time.monotonic() + 30
            while not second.shares.writer:  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "b2 never took the lease"
                await second.shares.step()  # type: ignore[union-attr]
                await asyncio.sleep(0.05)
            await second.shares.step()  # type: ignore[union-attr]
            assert holding(second) == half + gift
            assert await committed(second) == gift
        finally:
            for backend in (first, second):
                if backend is not None:
                    await backend.store.close()

    asyncio.run(run())


def test_a_pull_answered_by_a_node_that_is_not_the_writer_carries_the_regions_ledger(
    redis_server: Any,
) -> None:
    """Region B on Redis, nodes ``b1`` (the writer) and ``b2``; a gift of region A's
    node ``A/n/1`` to B is committed in B's ledger ``L`` by ``b1``. ``A/n/1`` restarts
    without a snapshot as ``A/n/2`` and its pull reaches ``b2``: the answer must carry
    B's ledger with that gift (and what ``b2``'s peers' messages told the region), or
    ``A/n/2`` counts the rights it gave away as its own again. ``b2`` answers from Redis
    (the share hashes' ``L`` and ``m:<node>``), its mirror's ledgers being none or old.
    Before this change ``b2``'s answer had no ledger for the key at all."""
    import asyncio

    from bucketmesh.core.bucket import BucketDelta
    from bucketmesh.core.limiter import DeltaBatch
    from bucketmesh.core.rules import Rule
    from bucketmesh.core.shares import SCALE, ShareState
    from bucketmesh.storage.redis_backend import RedisBackend

    rule = Rule.create("s-{{ .Request.Query.u }}", 100, 1.0, name="s", mode="strict")
    key, gift = "s-1", SCALE // 10

    def message(parts: int, giver: str, backend: RedisBackend) -> DeltaBatch:
        config = backend.mirror.limiter.rule_configs["s"]
        ledger = ShareState(("A", "B"), given={f"{giver}>B": parts})
        delta = BucketDelta(key, 0, config, config.version, 0, {}, "s", shares=ledger)
        return DeltaBatch(giver, [delta])

    async def pulled() -> bool:
        return True

    async def node(name: str) -> RedisBackend:
        backend = RedisBackend([rule], region="B", node=name, url=redis_server.url, timeout_s=5)
        await backend._rejoin()
        backend.up = True
        backend.enable_shares(("A", "B"), name, lambda: False, pulled)
        return backend

    async def run() -> None:
        first = await node("b1")
        second: RedisBackend | None = None
        try:
            first.mirror.observe_replica("A/n/1")
            first.mirror.merge(message(gift, "A/n/1", first))
            await first.shares.step()  # type: ignore[union-attr]
            assert first.shares.writer  # type: ignore[union-attr]
            second = await node("b2")
            # b2 hears another node's gift (pushed into Redis as m:b2, not committed)
            second.mirror.merge(message(2 * gift, "A/m/1", second))
            await second.shares.step()  # type: ignore[union-attr]
            assert not second.shares.writer  # type: ignore[union-attr]
            # A/n/2's pull reaches b2 (what Mesh.receive_pull does)
            second.mirror.observe_replica("A/n/2")
            freeze = second.mirror.share_freeze
            assert freeze is not None and await freeze()
            answer = {d.key: d for d in second.mirror.full_state([key]).deltas}
            assert key in answer and answer[key].shares is not None, answer
            given = answer[key].shares.given
            assert given.get("A/n/1>B") == gift, given
            assert given.get("A/m/1>B") == 2 * gift, given
            # the mesh picks the key for the answer (Mesh._with_key_configs)
            assert key in second.mirror.ledgers
        finally:
            for backend in (first, second):
                if backend is not None:
                    await backend.store.close()

    asyncio.run(run())


def test_redis_losing_its_data_never_lets_the_region_spend_rights_it_gave_away(
    region_mesh: Mesh,
) -> None:
    """The Redis region gives almost all its rights away, then Redis loses its data
    (FLUSHALL) and both Redis nodes are hammered at once: the region spends nothing it
    no longer holds. A strict bucket without a share hash is not created until the
    region's writer, blind meanwhile, has pulled every peer region and written every
    share hash again (and one first written then counts as empty at that instant);
    `onStoreFailure: local` decides a strict key as `deny` while the store is down.
    Before this change the fallback and then the fresh bucket ran on the static 1/R
    split (a third of the limit here, against the ~4 % the region held): the total went
    over C + r·W at once.

    Also (the same mesh): an atomic batch asking more than the region's share but no
    more than the key's limit is a denial (200, ``allowed: false``) on a Redis node as
    on an embedded one, not a 400; above the whole limit it is a 400 on both."""
    import redis as redis_client

    mesh = region_mesh
    capacity, rate = HARD_CAPACITY, HARD_RATE
    a, b, eu = (mesh.nodes[name] for name in ("redis-a", "redis-b", "eu"))
    eventually(mesh.connected, "the mesh is up")

    # over-size asks: above the share (the initial third), within the limit
    for node in (a, eu):
        ask = {"key": "hard-single", "rule": "hard", "tokens": 60}
        single = node.client.post("/v1/rate", json=ask)
        assert single.status_code == 429, (node.name, single.text)
        item = {"key": "hard-batch", "rule": "hard", "tokens": 60}
        batch = {"requests": [item], "atomic": True}
        answer = node.client.post("/v1/rate/batch", json=batch)
        assert answer.status_code == 200, (node.name, answer.text)
        assert answer.json()["results"][0]["allowed"] is False, (node.name, answer.text)
        batch["requests"][0]["tokens"] = capacity + 1
        answer = node.client.post("/v1/rate/batch", json=batch)
        assert answer.status_code == 400, (node.name, answer.text)
        assert answer.json()["field"] == "requests[0].tokens", answer.text

    # all the demand in eu: asks for the whole limit (denied while the Redis region
    # holds anything, so eu's bucket stays full) move the rights there
    # (a live bucket first: a new key's first ask above its share was a 400 before)
    assert eu.client.get("/v1/rate", params={"h": "x"}).status_code in (200, 429)
    driver = Driver([eu], [1.0], load=0.5, tokens=capacity, query="h")
    driver.start()
    try:
        eventually(
            lambda: (
                (eu.state(HARD_KEY)["shares"] or {}).get(REDIS_REGION, {"rights": 1.0})["rights"]
                <= 0.05
            ),
            "rights flow to eu",
            60,
        )
    finally:
        driver.stop.set()
        driver.join(timeout=30)
    held = rights(eu, REDIS_REGION, HARD_KEY)

    store = redis_client.Redis.from_url(
        mesh.nodes["redis-a"].config["storage"]["redisUrl"], decode_responses=True
    )
    share_hash = f"bm:{REDIS_REGION}:sh:{{{HARD_KEY}}}"
    granted = by_redis = 0
    opened = time.monotonic()
    store.flushall()
    rounds = 0
    # hammer both Redis nodes (and eu) until the writer has written the share hash
    # again, and a while after
    while rounds < 150 or store.hget(share_hash, "c") is None:
        for node in (a, b, eu):
            code = node.client.get("/v1/rate", params={"h": "x"}).status_code
            assert code in (200, 429), code
            granted += code == 200
            by_redis += code == 200 and node is not eu
        rounds += 1
        assert time.monotonic() - opened < 60, "the share hash was never written again"
    span = time.monotonic() - opened
    # rights may still move in this phase (eu, asked too, may give some back): the
    # larger of the region's holdings before and after it bounds what it spent on
    # (eu's view counts eu's own gifts at once)
    held = max(held, rights(eu, REDIS_REGION, HARD_KEY))
    assert granted <= capacity + rate * span, (granted, span)
    # the Redis region within what it held (its share's capacity) and at most the whole
    # refill since: on main it spent half the limit, the 1/R split
    assert by_redis <= capacity * held + 1 + rate * span, (by_redis, held, span)
    # rewritten from the ledger: the region's rights, not the static half
    share = int(store.hget(share_hash, "c") or 0)
    assert share <= capacity * held + 1, (share, held)
    store.close()


def test_tokens_above_a_strict_keys_whole_limit_are_refused_naming_it_on_redis(
    redis_server: Any,
) -> None:
    """As on the embedded store: a Redis region's share (50 of 100) may grow to the
    whole limit, so an ask above the share is a denial and one above the limit a bad
    request naming the limit (it named the share)."""
    import asyncio

    from bucketmesh.core.limiter import InvalidTokens
    from bucketmesh.core.rules import Rule
    from bucketmesh.storage.redis_backend import RedisBackend

    rule = Rule.create("s-{{ .Request.Query.u }}", 100, 1.0, name="s", mode="strict")

    async def pulled() -> bool:
        return True

    async def run() -> None:
        backend = RedisBackend([rule], region="B", node="b1", url=redis_server.url, timeout_s=5)
        await backend._rejoin()
        backend.up = True
        backend.enable_shares(("A", "B"), "b1", lambda: False, pulled)
        try:
            denied = await backend.acquire("s-1", 60)
            assert not denied.allowed
            with pytest.raises(InvalidTokens, match="the capacity 100, got 101") as refused:
                await backend.acquire("s-1", 101)
            assert refused.value.capacity == 100
        finally:
            await backend.stop()

    asyncio.run(run())
