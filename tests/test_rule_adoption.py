"""A rule change over many live buckets on a real ``bucketmesh serve``: adopted in
slices between turns of the loop (``Limiter.adopt_pending``, node/serve.py's adoption
loop), not in one stop of the node; every bucket ends on the new limits, keeping its
level. Below ``ADOPTION_SLICE`` live buckets the change is adopted at once (the other
PATCH tests); the simulator holds deferred adoption to every invariant
(tests/test_simulation.py, ``late_adoptions``)."""

from __future__ import annotations

from typing import Any

import httpx
from conftest import ServerFactory, eventually, make_config
from prometheus_client.parser import text_string_to_metric_families

from bucketmesh.node.serve import ADOPTION_SLICE

KEYS = ADOPTION_SLICE + 2_000


def metric(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return family.samples[0].value
    raise AssertionError(f"no {name} on /metrics")


def pending(client: httpx.Client) -> float:
    return metric(client, "bucketmesh_rule_adoption_pending")


def test_a_patch_over_more_buckets_than_a_slice_reaches_every_one(
    serve: ServerFactory,
) -> None:
    node = serve()
    keys = [f"slow-u{n}" for n in range(KEYS)]
    with node.client(timeout=30.0) as client:
        for start in range(0, KEYS, 100):
            items = [{"key": key} for key in keys[start : start + 100]]
            answer = client.post("/v1/rate/batch", json={"requests": items})
            assert answer.status_code == 200 and answer.json()["allowed"] == len(items)
        assert pending(client) == 0
        slices = metric(client, "bucketmesh_rule_adoption_slices")
        patched = client.patch("/v1/buckets/slow", json={"capacity": 9})
        assert patched.status_code == 200, patched.text
        # the node keeps deciding while the change is adopted
        assert client.post("/v1/rate", json={"key": "slow-other"}).status_code == 200

        def adopted() -> None:
            assert pending(client) == 0
            for key in (keys[0], keys[KEYS // 2], keys[-1]):
                state = client.get("/v1/bucket/state", params={"key": key}).json()
                # the level is kept (4 of 5 left), the capacity is the new one
                assert (state["capacity"], state["tokens_remaining"]) == (9, 4), state

        eventually(adopted, "every bucket on the new limits")
        # in slices: 22,000 keys (and the few others) at 20,000 a slice
        assert metric(client, "bucketmesh_rule_adoption_slices") - slices >= 2


def test_a_rule_patch_on_a_redis_node_adopts_its_mirror_in_slices(
    serve: ServerFactory, redis_server: Any
) -> None:
    """A Redis node's mirror holds every key it granted: a rule change over more of them
    than a slice is adopted by the same loop, not in one stop of the node; the node
    keeps deciding meanwhile, and every mirrored bucket ends on the new limits."""
    buckets = [
        {"name": "flood", "key": "f-{{ .Request.Query.u }}", "capacity": 5, "refillRate": 0.01}
    ]
    config = make_config(
        buckets, storage={"backend": "redis", "redisUrl": redis_server.url, "redisTimeoutMs": 3000}
    )
    node = serve(config)
    keys = [f"f-{n}" for n in range(KEYS)]
    with node.client(timeout=30.0) as client:
        for start in range(0, KEYS, 100):
            items = [{"key": key, "rule": "flood"} for key in keys[start : start + 100]]
            answer = client.post("/v1/rate/batch", json={"requests": items})
            assert answer.status_code == 200 and answer.json()["allowed"] == len(items)

        def mirrored() -> None:
            assert client.get("/v1/status").json()["buckets"] >= KEYS

        eventually(mirrored, "the granted keys read back into the mirror")
        assert pending(client) == 0
        slices = metric(client, "bucketmesh_rule_adoption_slices")
        patched = client.patch("/v1/buckets/flood", json={"capacity": 9})
        assert patched.status_code == 200, patched.text
        assert client.post("/v1/rate?u=other").status_code == 200

        def adopted() -> None:
            assert pending(client) == 0
            for key in (keys[0], keys[KEYS // 2], keys[-1]):
                state = client.get(f"/v1/buckets/{key}").json()
                assert state["capacity"] == 9, state

        eventually(adopted, "every mirrored bucket on the new limits")
        assert metric(client, "bucketmesh_rule_adoption_slices") - slices >= 2
        # decided in Redis on the new limits, the level kept (4 of 5 left: 4 of 9)
        granted = [client.post(f"/v1/rate?u={KEYS - 1}").status_code for _ in range(5)]
        assert granted == [200] * 4 + [429]
