"""A peer URL whose host name does not exist (the name service answers "no such name") is
a peer that is down, as one that refuses the connection is: the start-up pull does not wait
for it (docs/sync.md, "Starting without state"). Before, the node retried it until the
silent-peer wait ran out (``max(peerTimeout, 10 s)``) and then counted it down anyway;
``bucketmesh-<region>``, the default peer URL, does not resolve outside a cluster."""

from __future__ import annotations

import httpx
from conftest import SEED_RULE, ServerFactory, make_config

#: A reserved top-level domain (RFC 2606): never resolves.
UNKNOWN_PEER = "http://bucketmesh-eu-west-1.invalid:8080"


def test_a_peer_whose_name_does_not_resolve_is_down_not_waited_for(serve: ServerFactory) -> None:
    config = make_config(
        [SEED_RULE],
        region="us-east-1",
        sync={
            "enabled": True,
            "peers": ["us-east-1", "eu-west-1"],
            "peerUrls": {"eu-west-1": UNKNOWN_PEER},
            # a silent peer would hold the start up for ten minutes: far beyond the
            # fixture's readiness guard, so only a peer counted down lets it start
            "peerTimeout": 600_000,
        },
    )
    server = serve(config, env={"BUCKETMESH_SYNC_SECRET": "peer-names-secret"})
    # down, not silent: nothing to recover from anyone, so shared buckets start full
    reply = httpx.get(server.url("/v1/rate"), headers={"X-API-Key": "dns"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["tokens_remaining"] == SEED_RULE["capacity"] - 1
