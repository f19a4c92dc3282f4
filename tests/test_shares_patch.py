"""The answer to a lowering PATCH of a strict key (issue 18): 200 when the new limit is
in force at once (the PATCHing region's rights above its floor cover the excess: it
burns it), 202 Accepted with the pending change (the limit that bounds meanwhile,
which regions have cut, which have not, and a ``Location`` to watch it) when they
do not. Before this change both answered 200, and the first assertion on the status
of the uncovered lowering failed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import Mesh, ServerFactory, eventually

REGIONS = ["us-east-1", "eu-central-1", "ap-southeast-2"]
CAPACITY, RATE = 40, 40.0
RULE: dict[str, Any] = {
    "name": "quota",
    "key": "quota-{{ .Request.Query.t }}",
    "capacity": CAPACITY,
    "refillRate": RATE,
    "ttl": 3600,
    "mode": "strict",
}
TOKEN = "pending-patch-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_an_uncovered_lowering_answers_202_until_every_region_has_cut(
    serve: ServerFactory, tmp_path: Path
) -> None:
    # snapshots: a node started without one waits for silent peers at its start
    overrides = {r: {"storage": {"snapshot": str(tmp_path / f"{r}.snap")}} for r in REGIONS}
    mesh = Mesh(
        serve, REGIONS, buckets=[RULE], proxied=True, admin_token=TOKEN, overrides=overrides
    ).start()
    origin, other1, other2 = mesh[0], mesh[1], mesh[2]
    eventually(mesh.connected, "the mesh is up")
    # the origin holds its third (a node started without a snapshot would spend only
    # its floor until it had pulled every other region, docs/sync.md "Restarts", and
    # could cover nothing before)
    eventually(
        lambda: origin.state("quota-probe")["shares"][origin.region]["rights"] > 0.3,
        "the origin has pulled every region",
    )

    # a small lowering: a third of the limit (the idle split) covers 40 -> 35
    small = origin.client.patch(
        "/v1/buckets/quota-small", json={"capacity": 35, "refillRate": 35.0}, headers=AUTH
    )
    assert small.status_code == 200, small.text
    assert "pending" not in small.json()
    assert small.headers.get("location") is None

    # a deep one while cut off: a third of 40 cannot cover the 30 the others may
    # still spend on the old limit, so the new limit is pending until every region
    # runs on it, and the origin spends nothing meanwhile
    assert len(mesh.cut(origin.name)) == 4
    eventually(lambda: origin.status()["sync"]["local_only"] is True, "the cut is seen")
    deep = origin.client.patch(
        "/v1/buckets/quota-deep", json={"capacity": 10, "refillRate": 10.0}, headers=AUTH
    )
    assert deep.status_code == 202, deep.text
    body = deep.json()
    assert body["key"] == "quota-deep" and body["applies_to"] == "key"
    assert (body["capacity"], body["refill_rate"]) == (10, 10.0)
    pending = body["pending"]
    assert pending["bound"] == {"capacity": CAPACITY, "refill_rate": RATE}
    assert pending["cut"] == [origin.region]
    assert sorted(pending["waiting"]) == sorted([other1.region, other2.region])
    assert pending["state"] == "/v1/bucket/state?key=quota-deep"
    assert deep.headers["location"] == pending["state"]
    codes = [origin.client.get("/v1/rate", params={"t": "deep"}).status_code for _ in range(20)]
    assert codes == [429] * 20, codes
    # the others still serve on the old limit's shares
    assert other1.client.get("/v1/rate", params={"t": "deep"}).status_code == 200

    # healed: every region cuts, and the state (the Location) says so
    mesh.heal()
    location = deep.headers["location"]

    def cut_everywhere() -> bool:
        shares = origin.client.get(location).json()["shares"]
        return all(e["limit"] == {"capacity": 10, "refill_rate": 10.0} for e in shares.values())

    eventually(cut_everywhere, "every region runs on the new limit", 90)
    # in force now: the origin spends its share of the new limit again, and a
    # further PATCH of the key in force at once answers 200
    eventually(
        lambda: origin.client.get("/v1/rate", params={"t": "deep"}).status_code == 200,
        "the origin serves again",
    )
    again = origin.client.patch("/v1/buckets/quota-deep", json={"ttl": 1800}, headers=AUTH)
    assert again.status_code == 200, again.text
    assert "pending" not in again.json()
