"""The sync protocol spoken as a client: what ``bucketmesh reconcile`` says to a region.

A holder of the mesh's secret may speak ``/v1/sync/*`` like any region does
(docs/sync.md): the envelopes are sealed and opened with ``protocol.SyncAuth``,
sent over one keep-alive ``HttpLink`` per region. The tool names itself
``@reconcile`` (a name no region can have: regions are letters, digits, ``.``,
``_`` and ``-``), so a partition injected between regions (``/v1/admin/faults``
names regions) never drops its traffic, and its replica id owns no entry in any
bucket. Three requests are used:

- ``hello``: an empty ``deltas`` message (a heartbeat): merges nothing, and the
  ack names the replica that answered, proving the cluster id and the secret.
- ``pull``: the full state of some key ranges (the endpoint a restarted node
  uses at start-up).
- ``push``: full-state deltas and rule configs, merged by the region like any
  peer's full-state transfer.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from typing import Final, TypeVar

import msgspec

from bucketmesh.core.bucket import BucketConfig, BucketDelta
from bucketmesh.core.limiter import DeltaBatch
from bucketmesh.replication import protocol as sync
from bucketmesh.replication.link import HttpLink, LinkError

TOOL_REGION: Final = "@reconcile"
#: Envelope framing, nonces, MAC and ids around a push's body (the mesh's own margin).
ENVELOPE_OVERHEAD: Final = 512

_T = TypeVar("_T", bound=msgspec.Struct)


def tool_replica_id() -> str:
    """This run's sender id: ``@reconcile/<host>/<pid>``."""
    return f"{TOOL_REGION}/{socket.gethostname()[:63]}/{os.getpid()}"


class RegionError(Exception):
    """A region that did not give an authentic answer. ``kind`` says why, for the report
    and the exit status: ``unreachable``, ``wrong_cluster``, ``unauthorized`` (a secret
    that does not verify), ``refused`` (another HTTP error) or ``bad_reply``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class RegionClient:
    """One region's sync endpoints, through one keep-alive connection."""

    def __init__(
        self, region: str, url: str, auth: sync.SyncAuth, sender: str, timeout_s: float
    ) -> None:
        self.region = region
        self.url = url
        self.auth = auth
        self.sender = sender
        self.link = HttpLink(url, timeout_s=timeout_s)
        self.replica_id: str | None = None
        self.requests = 0
        self.bytes_received = 0

    async def _request(self, kind: str, body: bytes, reply_type: type[_T]) -> _T:
        nonce = os.urandom(sync.NONCE_BYTES)
        message = self.auth.seal(
            kind,
            body,
            sender=self.sender,
            region=TOOL_REGION,
            now_ns=time.time_ns(),
            nonce=nonce,
        )
        try:
            status, data = await self.link.post(sync.PATHS[kind], message)
        except LinkError as error:
            raise RegionError("unreachable", f"{self.url}: {error}") from None
        self.requests += 1
        self.bytes_received += len(data)
        if status != 200:
            detail = data[:300].decode("utf-8", "replace")
            problem = {403: "wrong_cluster", 401: "unauthorized"}.get(status, "refused")
            raise RegionError(problem, f"{self.url}: {kind} answered HTTP {status}: {detail}")
        try:
            env = self.auth.open(
                data, kinds=(sync.REPLY_KIND[kind],), now_ns=time.time_ns(), reply_to=nonce
            )
            payload = sync.decode_body(env)
        except sync.Rejected as rejected:
            raise RegionError(
                "bad_reply",
                f"{self.url}: {kind}: unacceptable reply ({rejected.reason}: {rejected})",
            ) from None
        if not isinstance(payload, reply_type):
            raise RegionError("bad_reply", f"{self.url}: unexpected {type(payload).__name__}")
        return payload

    async def hello(self) -> str:
        """An empty message; the replica id that answered."""
        body = sync.encode(sync.DeltaPush(time.time_ns(), False, DeltaBatch(self.sender, [], {})))
        ack = await self._request(sync.DELTAS, body, sync.Ack)
        self.replica_id = ack.replica_id
        return ack.replica_id

    async def pull(self, ranges: Sequence[int]) -> DeltaBatch:
        """The full state of the live shared buckets of ``ranges`` (and the rule configs)."""
        reply = await self._request(
            sync.PULL, sync.encode(sync.PullRequest(list(ranges))), sync.PullReply
        )
        return reply.state

    async def push(
        self, deltas: Sequence[BucketDelta], rules: dict[str, BucketConfig], max_message: int
    ) -> int:
        """Full-state deltas (and ``rules``) in messages of at most ``max_message`` bytes
        (the region's body limit); returns how many buckets they changed there."""
        rules_size = len(sync.encode_push(0, True, "", [], rules)) if rules else 0
        budget = max(
            1024,
            max_message - ENVELOPE_OVERHEAD - len(self.auth.cluster_id) - 2 * len(self.sender),
        )
        budget -= rules_size
        changed = 0
        chunk: list[bytes] = []
        size = 0
        first = True

        async def send() -> None:
            nonlocal changed, first
            body = sync.encode_push(
                time.time_ns(), True, self.sender, chunk, rules if first else {}
            )
            ack = await self._request(sync.DELTAS, body, sync.Ack)
            changed += ack.changed
            first = False

        for delta in deltas:
            data = sync.encode_delta(delta)
            if chunk and size + len(data) > budget:
                await send()
                chunk, size = [], 0
            chunk.append(data)
            size += len(data)
        if chunk or (first and rules):
            await send()
        return changed

    def close(self) -> None:
        self.link.close()
