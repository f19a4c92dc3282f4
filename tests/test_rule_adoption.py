"""A rule change over many live buckets on a real ``bucketmesh serve``: adopted in
slices between turns of the loop (``Limiter.adopt_pending``, node/serve.py's adoption
loop), not in one stop of the node; every bucket ends on the new limits, keeping its
level. Below ``ADOPTION_SLICE`` live buckets the change is adopted at once (the other
PATCH tests); the simulator holds deferred adoption to every invariant
(tests/test_simulation.py, ``late_adoptions``)."""

from __future__ import annotations

import httpx
from conftest import ServerFactory, eventually
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
