"""Issue 12 case 1(a), end to end: a PATCH whose limits the state could not carry on the
wire (msgpack's int64) is a 400 naming the field, on a real ``bucketmesh serve``; the
limits it can carry are accepted and the bucket keeps answering and replicating."""

from __future__ import annotations

from conftest import ServerFactory, make_config

RULES = [
    {"name": "seed", "key": "s-{{ .Request.Header.X-S }}", "capacity": 5000, "refillRate": 50},
    {"name": "slow", "key": "w-{{ .Request.Header.X-W }}", "capacity": 10, "refillRate": 0.05},
]


def test_a_patch_the_wire_could_not_carry_is_a_400_naming_the_field(
    serve: ServerFactory,
) -> None:
    node = serve(make_config(RULES))
    with node.client() as client:
        # 2500 first, so that what refills (50/s) before the last read, however slow
        # the machine, cannot hide the spending: it takes 50 s to refill
        bulk = client.post("/v1/rate", json={"key": "hot", "rule": "seed", "tokens": 2500})
        assert bulk.status_code == 200, bulk.text
        for _ in range(20):
            granted = client.post("/v1/rate", json={"key": "hot", "rule": "seed"})
            assert granted.status_code == 200, granted.text
        # one token a ~31 years after spending 2520: the state would hold 2.5e21 ns
        refused = client.patch("/v1/buckets/hot", json={"refillRate": 1e-9})
        assert refused.status_code == 400, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["field"] == "refillRate"
        # capacity 10 → 1e9 at 0.05/s: a drained bucket would take 634 years to refill
        refused = client.patch("/v1/buckets/slow", json={"capacity": 10**9})
        assert refused.status_code == 400, refused.text
        assert refused.json()["field"] == "capacity"
        assert "50000000" in refused.json()["detail"]
        # what the state can carry is accepted, and the key keeps answering
        accepted = client.patch("/v1/buckets/hot", json={"refillRate": 1e-5})
        assert accepted.status_code == 200, accepted.text
        state = client.get("/v1/bucket/state", params={"key": "hot", "rule": "seed"})
        assert state.status_code == 200
        assert state.json()["tokens_remaining"] <= 5000 - 20
