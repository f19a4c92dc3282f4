"""Inputs the fuzz targets (tests/fuzz/) found, kept as regression tests.

fuzz_sync.py, the first finding: a delta whose bucket config has a zero emission
interval (``interval_ns`` 0) decoded and merged, and the merge divided by it
(``ZeroDivisionError`` in ``Bucket.reconfigure``); on a node, a 500 for the peer's
message and a bucket no request could use afterwards. A config no rule could have
(capacity, interval, ttl or mode out of range) is now refused as ``malformed``.
"""

from __future__ import annotations

import os
import time

import pytest
from conftest import Mesh, ServerFactory

from bucketmesh.core.bucket import NS_PER_S, BucketConfig, BucketDelta
from bucketmesh.core.limiter import DeltaBatch, Limiter
from bucketmesh.core.rules import Rule
from bucketmesh.replication import protocol as sync

RULE = {
    "name": "global",
    "key": "agent-{{ .Request.Header.X-API-Key }}",
    "capacity": 5,
    "refillRate": 1,
}
NOW = 1_000_000 * NS_PER_S
BAD_CONFIGS = {
    "zero interval": BucketConfig(5, 0, 3600 * NS_PER_S, "shared", (9, "rule:global:x")),
    "negative interval": BucketConfig(5, -1, 3600 * NS_PER_S, "shared", (9, "rule:global:x")),
    "zero capacity": BucketConfig(0, NS_PER_S, 3600 * NS_PER_S, "shared", (9, "rule:global:x")),
    "zero ttl": BucketConfig(5, NS_PER_S, 0, "shared", (9, "rule:global:x")),
    "unknown mode": BucketConfig(5, NS_PER_S, 3600 * NS_PER_S, "both", (9, "rule:global:x")),
    "unrefillable": BucketConfig(
        10**10, 10**9 * NS_PER_S, NS_PER_S, "shared", (9, "rule:global:x")
    ),
}


def _push(config: BucketConfig, key: str, now: int, *, as_rule: bool = False) -> bytes:
    delta = BucketDelta(key, 0, config, config.version, now - NS_PER_S, {"r2/n/1": 1}, "global")
    batch = DeltaBatch("r2/n/1", [] if as_rule else [delta], {"global": config} if as_rule else {})
    return sync.encode(sync.DeltaPush(now, False, batch))


@pytest.mark.parametrize("as_rule", [False, True], ids=["delta", "rule"])
@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_a_config_no_rule_could_have_is_malformed_and_never_merged(
    name: str, as_rule: bool
) -> None:
    auth = sync.SyncAuth("c", "s")
    message = auth.seal(
        sync.DELTAS, _push(BAD_CONFIGS[name], "agent-x", NOW, as_rule=as_rule),
        sender="r2/n/1", region="r2", now_ns=NOW, nonce=bytes(16),
    )  # fmt: skip
    env = auth.open(message, kinds=[sync.DELTAS], now_ns=NOW)
    with pytest.raises(sync.Rejected) as refused:
        sync.decode_body(env)
    assert (refused.value.reason, refused.value.status) == ("malformed", 400)
    assert "config" in refused.value.detail


def test_the_zero_interval_batch_merged_unchecked_poisons_the_bucket() -> None:
    """Why the check is needed: merged without it, the batch leaves a bucket every
    request divides by zero on (on a node, a 500 for every request on that key)."""
    rules = [Rule.create(str(RULE["key"]), 5, 1.0, name="global")]
    limiter = Limiter(rules, replica_id="r1/n/1", clock=lambda: NOW)
    decoder = sync.DECODERS[sync.DELTAS]
    payload = decoder.decode(_push(BAD_CONFIGS["zero interval"], "agent-x", NOW))
    assert limiter.merge(payload.batch, now=NOW) == 1
    with pytest.raises(ZeroDivisionError):
        limiter.acquire("agent-x", 1, now=NOW)


def test_a_live_node_answers_400_to_a_zero_interval_delta_and_keeps_serving(
    serve: ServerFactory,
) -> None:
    mesh = Mesh(serve, ["r1", "r2"], buckets=[RULE]).start()
    node = mesh[0]
    client = node.client
    assert client.get("/v1/rate", headers={"X-API-Key": "x"}).status_code == 200
    now = time.time_ns()
    message = sync.SyncAuth(mesh.cluster_id, mesh.secret).seal(
        sync.DELTAS, _push(BAD_CONFIGS["zero interval"], "agent-x", now),
        sender="r2/n/1", region="r2", now_ns=now, nonce=os.urandom(16),
    )  # fmt: skip
    answer = client.post(
        "/v1/sync/deltas", content=message, headers={"Content-Type": sync.CONTENT_TYPE}
    )
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    for _ in range(3):  # before the fix: the push was merged (200), then 500s here
        assert client.get("/v1/rate", headers={"X-API-Key": "x"}).status_code in (200, 429)
