"""Writes the sync seed corpus (tests/fuzz/corpus/sync) from real messages.

Each seed is in the fuzz_sync.py input format: a mode byte (0: a whole envelope for
an insecure node; 1: a kind byte and a payload, sealed by the target), then bytes.

    .venv/bin/python tests/fuzz/make_sync_corpus.py
"""

from __future__ import annotations

from pathlib import Path

from bucketmesh.core.limiter import DeltaBatch, Limiter
from bucketmesh.core.rules import Rule
from bucketmesh.replication import protocol as sync

NOW_NS = 1_000_000_000_000  # fuzz_sync.NOW_NS
KINDS = (sync.DELTAS, sync.DIGEST, sync.PULL, sync.ACK, sync.DIGEST_REPLY, sync.STATE)
OUT = Path(__file__).parent / "corpus" / "sync"


def main() -> None:
    rules = [
        Rule.create("k-{{ .Request.Header.X-Key }}", 5, 1.0),
        Rule.create("s-{{ .Request.Header.X-Key }}", 3, 1.0, mode="strict"),
    ]
    limiter = Limiter(rules, replica_id="r2/n/1", clock=lambda: NOW_NS)
    for key in ("k-a", "k-b", "k-c"):
        limiter.acquire(key, 2)
    limiter.acquire("s-a", 1)
    state = limiter.full_state()
    deltas = limiter.collect_deltas()
    payloads = {
        sync.DELTAS: sync.DeltaPush(NOW_NS, False, deltas),
        sync.DIGEST: sync.DigestRequest(0, [1, 2, 255], [0, 7, 2**63]),
        sync.PULL: sync.PullRequest([0, 1, 255]),
        sync.ACK: sync.Ack("r2/n/1", 3),
        sync.DIGEST_REPLY: sync.DigestReply("r2/n/1", [1], state),
        sync.STATE: sync.PullReply("r2/n/1", state),
    }
    insecure = sync.SyncAuth("fuzz", None)
    OUT.mkdir(parents=True, exist_ok=True)
    for kind, payload in payloads.items():
        body = sync.encode(payload)
        envelope = insecure.seal(
            kind, body, sender="r2/n/1", region="r2", now_ns=NOW_NS, nonce=bytes(16)
        )
        (OUT / f"envelope-{kind}").write_bytes(b"\x00" + envelope)
        (OUT / f"sealed-{kind}").write_bytes(b"\x01" + bytes([KINDS.index(kind)]) + body)
    full = sync.DeltaPush(NOW_NS, True, state)
    (OUT / "sealed-full").write_bytes(b"\x01\x00" + sync.encode(full))
    (OUT / "sealed-empty").write_bytes(
        b"\x01\x00" + sync.encode(sync.DeltaPush(0, False, DeltaBatch("x", [])))
    )


if __name__ == "__main__":
    main()
