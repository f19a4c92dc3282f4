"""MurmurHash3 key affinity (``core/affinity.py``) and the client routing by it.

The ring is pure, so most checks are direct: the same key has the same owner in
every process (a fresh interpreter with another hash seed) and in every region
(the same node names, listed in any order); adding a node moves about 1/N of the
keys, all of them to the new node. The client's ``nodes=`` is checked against real
``bucketmesh serve`` nodes: each key is spent only on its owner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from typing import Any

import httpx
import pytest
from conftest import SEED_RULE, Server, ServerFactory, make_config

from bucketmesh.client import AsyncClient, Client, RetryPolicy
from bucketmesh.core.affinity import DEFAULT_POINTS, Ring, key_hash

NODES = ["node-a", "node-b", "node-c"]
KEYS = [f"user-{i}" for i in range(10_000)]
FAST = RetryPolicy(total_timeout=20.0, backoff_base=0.01, backoff_cap=0.05)


def test_key_hash_is_murmurhash3_x64_128_seed_0() -> None:
    # pinned: a change of hash (or of its seed, or of the encoding) would move every
    # key of every deployed ring at once
    assert key_hash("hello") == 14688674573012802306
    assert key_hash("user-42") == 5562752747223120546
    assert key_hash("ключ") == key_hash("ключ")  # UTF-8, not the str's identity


def test_the_same_key_has_the_same_owner_in_every_region() -> None:
    us_east = Ring(NODES)
    eu_west = Ring(reversed(NODES))  # another region lists its nodes in another order
    assert [us_east.owner(k) for k in KEYS] == [eu_west.owner(k) for k in KEYS]


def test_the_same_key_has_the_same_owner_in_every_process() -> None:
    script = (
        "import json, sys\n"
        "from bucketmesh.core.affinity import Ring\n"
        f"ring = Ring({NODES!r})\n"
        f"print(json.dumps([ring.owner(f'user-{{i}}') for i in range({len(KEYS)})]))\n"
    )
    here = Ring(NODES)
    for seed in ("1", "2"):  # Python's own hash() would differ between these
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, check=True, text=True
        ).stdout
        assert json.loads(out) == [here.owner(k) for k in KEYS]


def test_keys_are_spread_evenly() -> None:
    shares = Counter(Ring(NODES).owner(k) for k in KEYS)
    assert set(shares) == set(NODES)
    for node, count in shares.items():
        assert abs(count / len(KEYS) - 1 / 3) < 0.08, (node, shares)


@pytest.mark.parametrize("before", [1, 2, 3, 5])
def test_adding_a_node_moves_about_one_nth_of_the_keys_all_to_it(before: int) -> None:
    names = [f"node-{i}" for i in range(before)]
    old, new = Ring(names), Ring([*names, "node-new"])
    moved = [k for k in KEYS if old.owner(k) != new.owner(k)]
    assert all(new.owner(k) == "node-new" for k in moved)  # nothing else is reshuffled
    share = len(moved) / len(KEYS)
    expected = 1 / (before + 1)
    assert abs(share - expected) < 0.35 * expected, (share, expected)


def test_removing_a_node_moves_only_its_keys() -> None:
    old, new = Ring(NODES), Ring(["node-a", "node-c"])
    for key in KEYS:
        if old.owner(key) != "node-b":
            assert new.owner(key) == old.owner(key)


def test_a_ring_of_one_owns_everything_and_bad_rings_are_refused() -> None:
    assert {Ring(["solo"]).owner(k) for k in KEYS[:100]} == {"solo"}
    assert Ring(NODES).points == DEFAULT_POINTS
    with pytest.raises(ValueError, match="at least one node"):
        Ring([])
    with pytest.raises(ValueError, match="listed twice"):
        Ring(["a", "a"])
    with pytest.raises(ValueError, match="non-empty"):
        Ring(["a", ""])
    with pytest.raises(ValueError, match="points"):
        Ring(["a"], points=0)


# -- the client routes by the ring ----------------------------------------------------------

BUCKETS: list[dict[str, Any]] = [
    SEED_RULE,
    {"name": "per-user", "key": "user-{{ .Request.Query.user }}", "capacity": 100, "refillRate": 1},
]


@pytest.fixture(scope="module")
def region(serve_module: ServerFactory) -> dict[str, Server]:
    """Three nodes of one region (named alike in every region), each deciding alone
    (no sync), so a key's tokens are spent only where the client sent it."""
    return {
        name: serve_module(make_config(BUCKETS), node=name, name=f"affinity-{name}")
        for name in NODES
    }


def used(server: Server, key: str) -> int:
    response = httpx.get(server.base_url + "/v1/bucket/state", params={"key": key}, timeout=10)
    if response.status_code == 404:
        return 0
    assert response.status_code == 200, response.text
    return sum(entry["used"] for entry in response.json()["replicas"].values())


def spent_on(region: dict[str, Server], key: str) -> set[str]:
    return {name for name, server in region.items() if used(server, key)}


@pytest.fixture
def nodes(region: dict[str, Server]) -> dict[str, dict[str, str]]:
    return {"us-east-1": {name: server.base_url for name, server in region.items()}}


def test_client_sends_each_key_to_its_owner(
    region: dict[str, Server], nodes: dict[str, dict[str, str]]
) -> None:
    ring = Ring(NODES)
    keys = [f"user-sync-{i}" for i in range(30)]
    url = {"us-east-1": region["node-a"].base_url}
    with Client(url, nodes=nodes, retry=FAST) as client:
        for key in keys:
            for _ in range(2):
                assert client.rate(key, rule="per-user").allowed
    owners = {ring.owner(k) for k in keys}
    assert owners == set(NODES)  # the keys exercise every node
    for key in keys:
        assert spent_on(region, key) == {ring.owner(key)}, key


def test_without_nodes_every_key_goes_to_the_region_url(region: dict[str, Server]) -> None:
    keys = [f"user-plain-{i}" for i in range(10)]
    with Client(region["node-c"].base_url, retry=FAST) as client:
        for key in keys:
            assert client.rate(key, rule="per-user").allowed
    for key in keys:
        assert spent_on(region, key) == {"node-c"}


def test_async_client_routes_by_the_ring_too(
    region: dict[str, Server], nodes: dict[str, dict[str, str]]
) -> None:
    import asyncio

    ring = Ring(NODES)
    keys = [f"user-async-{i}" for i in range(20)]

    async def main() -> None:
        async with AsyncClient(
            {"us-east-1": region["node-b"].base_url}, nodes=nodes, retry=FAST
        ) as client:
            decisions = await asyncio.gather(*(client.rate(k, rule="per-user") for k in keys))
            assert all(d.allowed for d in decisions)

    asyncio.run(main())
    for key in keys:
        assert spent_on(region, key) == {ring.owner(key)}, key


def test_a_list_of_node_urls_names_the_nodes_by_position(region: dict[str, Server]) -> None:
    ring = Ring(["0", "1", "2"])
    urls = [region[name].base_url for name in NODES]
    keys = [f"user-list-{i}" for i in range(15)]
    with Client({"r": urls[0]}, nodes={"r": urls}, retry=FAST) as client:
        for key in keys:
            assert client.rate(key, rule="per-user").allowed
    for key in keys:
        assert spent_on(region, key) == {NODES[int(ring.owner(key))]}, key


def test_bad_nodes_are_refused_naming_the_region() -> None:
    with pytest.raises(ValueError, match=r"nodes\['eu-west-1'\]: not a region of url="):
        Client({"us-east-1": "http://127.0.0.1:1"}, nodes={"eu-west-1": ["http://127.0.0.1:2"]})
    with pytest.raises(ValueError, match=r"nodes\['us-east-1'\]\[1\]: expected http"):
        Client({"us-east-1": "http://127.0.0.1:1"}, nodes={"us-east-1": ["http://a:1", "ftp://b"]})
    with pytest.raises(ValueError, match="at least one node URL"):
        Client({"us-east-1": "http://127.0.0.1:1"}, nodes={"us-east-1": []})
    with pytest.raises(TypeError, match="list or mapping"):
        Client({"us-east-1": "http://127.0.0.1:1"}, nodes={"us-east-1": "http://a:1"})


def test_calls_without_one_key_still_go_to_the_region(
    region: dict[str, Server], nodes: dict[str, dict[str, str]]
) -> None:
    with Client({"us-east-1": region["node-a"].base_url}, nodes=nodes, retry=FAST) as client:
        result = client.batch([(f"user-batch-{i}", 1, "per-user") for i in range(5)])
        assert all(d.allowed for d in result.results)
    for i in range(5):  # a batch spans keys: decided where the region's URL points
        assert spent_on(region, f"user-batch-{i}") == {"node-a"}
