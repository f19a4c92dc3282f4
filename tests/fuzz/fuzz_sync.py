"""Fuzz target: the sync message decoder (replication/protocol.py) and the merge.

Input bytes go through what a node does with a sync POST body: ``SyncAuth.open``
(decode, cluster, signature, kind, freshness, replay), ``decode_body`` and, for a
batch, ``Limiter.merge``. Invariant: ``open`` and ``decode_body`` raise only
``Rejected`` (the documented refusals, docs/sync.md); a decoded batch merges
without an exception.

The first byte picks the mode: even, the rest is a whole envelope opened by an
insecure-mode node (no MAC, so mutations reach the payload decoders); odd, the
rest is a payload that is sealed (correctly signed) as the kind the second byte
picks and opened by a node with a secret, the path a peer holding the secret takes.

    .venv/bin/python tests/fuzz/fuzz_sync.py [libFuzzer flags] [corpus dirs]
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from bucketmesh.core.limiter import DeltaBatch, Limiter
    from bucketmesh.core.rules import Rule
    from bucketmesh.replication import protocol as sync

NOW_NS = 1_000_000_000_000
KINDS = (sync.DELTAS, sync.DIGEST, sync.PULL, sync.ACK, sync.DIGEST_REPLY, sync.STATE)
NONCE = bytes(range(16))
_insecure = sync.SyncAuth("fuzz", None)
_signed = sync.SyncAuth("fuzz", ["new-secret", "old-secret"])
_peer = sync.SyncAuth("fuzz", "old-secret")  # signs with a secret still accepted
_rules = [Rule.create("k-{{ .Request.Header.X-Key }}", 5, 1.0)]


def check(data: bytes) -> None:
    """One input; raises AssertionError (or the unexpected exception) on a finding."""
    if not data:
        return
    mode, rest = data[0], data[1:]
    if mode % 2 == 0:
        auth, message = _insecure, rest
    else:
        kind = KINDS[rest[0] % len(KINDS)] if rest else sync.DELTAS
        message = _peer.seal(
            kind, rest[1:], sender="r2/n/1", region="r2", now_ns=NOW_NS, nonce=NONCE
        )
        auth = _signed
    try:
        env = auth.open(message, kinds=KINDS, now_ns=NOW_NS, replay=sync.ReplayGuard())
        payload = sync.decode_body(env)
    except sync.Rejected as rejected:
        assert 400 <= rejected.status < 600, rejected.status
        assert rejected.reason and rejected.detail
        return
    batch: DeltaBatch | None = None
    if isinstance(payload, sync.DeltaPush):
        batch = payload.batch
    elif isinstance(payload, (sync.DigestReply, sync.PullReply)):
        batch = payload.state
    if batch is not None:
        limiter = Limiter(_rules, replica_id="r1/n/1", clock=lambda: NOW_NS)
        limiter.merge(batch, now=NOW_NS)
        limiter.merge(batch, now=NOW_NS)  # idempotent: merging twice is harmless
        limiter.expire(NOW_NS + 10**12)


def main(argv: list[str]) -> None:
    atheris.Setup(argv, lambda data: check(bytes(data)))
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
