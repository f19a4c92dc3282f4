"""The sync mesh: this node's side of replication, over HTTP to the other regions.

This is the asyncio half of docs/design.md section 9; ``protocol.py`` is the wire
protocol (envelopes, signatures, digests), ``outbox.py`` a peer's pure outbox,
``link.py`` the HTTP client, and the core merges. The mesh owns the
clock reads, the sockets and the tasks, and never sits on the hot path: a
decision only marks its key dirty, and everything below runs beside it on
the event loop.

Theory of operation
-------------------
Collecting
    Every ``interval`` the collector drains ``Limiter.collect_deltas()``. A
    grant that dirties a key after an interval whose collects queued nothing
    (``Limiter.on_dirty`` → ``dirtied``) wakes it at once instead — the
    *leading edge*: on a quiet node a grant reaches the peers after a turn of
    the loop and the network, not after up to an interval; the keys dirtied
    next wait for the collect one interval later, so two collects that queue
    deltas are never less than an interval apart, as before (a burst or a
    flood sends no more messages than the periodic collector did).
Outboxes
    The collector encodes each delta once and offers it to every peer's outbox: key →
    (encoded delta, collect time). A delta holds absolute values, so a newer
    delta of a key replaces the queued one and subsumes it. A sender task per
    peer sends the outbox in messages of at most ``max_message_bytes`` over one
    long-lived keep-alive connection and removes what the peer acknowledged
    (unless a newer delta of that key arrived meanwhile); what failed stays
    queued and goes again. With nothing to send it sends an empty batch every
    ``heartbeat`` so that liveness is known.
Bounded memory
    An outbox holding more than ``max_pending`` keys (a peer down for long)
    is dropped whole, and the peer is marked for a full-state transfer, which
    subsumes everything dropped: a dead peer costs at most ``max_pending``
    encoded deltas.
Bulk work
    A second connection per peer carries what is large or slow: full-state
    transfers (first contact with a replica id — so a new or restarted peer —
    and dropped backlogs) and the periodic digest exchange, which compares
    range hashes of settled buckets and swaps the full state of the ranges
    that differ in both directions.
Start-up
    Before it listens, a node pulls the full state of every reachable peer
    (``pull_at_start``), so a restarted node — a new incarnation, see
    ``serve.py`` — learns what its previous incarnation spent before it decides
    anything. A peer that refuses the connection (or whose host name does not
    exist: ``link.py``) is skipped at once; one that does not answer is waited
    for at most ``startup_pull``.
Liveness
    A peer is ``up`` after a successful exchange and ``down`` once sends have
    been failing for ``peer_timeout``; retries back off exponentially with
    jitter. With no peer up, the node is ``local_only``: it keeps deciding on
    its own view (docs/design.md section 3 bounds the cost) and catches up when a
    peer answers again.
Receiving
    ``/v1/sync/deltas``, ``/digest`` and ``/pull`` verify the envelope (401/403
    otherwise, counted by reason, nothing changed), merge, and answer with a
    signed reply bound to the request's nonce. Replication lag is measured
    as receive time minus the sender's collect time of the oldest delta in
    the batch (wall clocks: skew between regions shows in it).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from typing import Final, Protocol, TypeVar

import msgspec
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from bucketmesh.core.bucket import NS_PER_S, SHARED, Bucket, BucketConfig, BucketDelta
from bucketmesh.core.limiter import DeltaBatch
from bucketmesh.http import wire as api
from bucketmesh.http.auth import AdminAuth
from bucketmesh.http.errors import ApiError
from bucketmesh.http.router import Router
from bucketmesh.http.server import HttpServer, Request, Response
from bucketmesh.http.tls import TlsContexts
from bucketmesh.replication import protocol as sync
from bucketmesh.replication.faults import FaultEndpoint, SyncFaults
from bucketmesh.replication.keyindex import RangeIndex
from bucketmesh.replication.link import HttpLink, LinkError, within
from bucketmesh.replication.outbox import Outbox
from bucketmesh.telemetry.audit import AuditLog
from bucketmesh.telemetry.log import logger
from bucketmesh.telemetry.metrics import Histogram
from bucketmesh.telemetry.tasks import Supervisor, cancel_and_wait

log = logger("mesh")


class Replica(Protocol):
    """What the mesh replicates: the node's in-memory replica (its ``Limiter``, or on
    a Redis node the region mirror). Deltas out, merges in, keys for anti-entropy."""

    @property
    def replica_id(self) -> str: ...

    @property
    def buckets(self) -> Mapping[str, Bucket]: ...

    @property
    def key_configs(self) -> Mapping[str, BucketConfig]: ...

    @property
    def rule_configs(self) -> Mapping[str, BucketConfig]: ...

    def collect_deltas(self, limit: int | None = None) -> DeltaBatch: ...

    def full_state(self, keys: Iterable[str] | None = None) -> DeltaBatch: ...

    def merge(self, batch: DeltaBatch, *, now: int | None = None) -> int: ...


#: the region a tool's sync messages name (``bucketmesh reconcile``: ``@reconcile``);
#: no region's name starts with it
TOOL_REGION_PREFIX: Final = "@"

PULLED: Final = "pulled"
SILENT: Final = "silent"  # (DOWN, as a peer state, is the third outcome)


@dataclass
class PullOutcome:
    """What a start-up pull reached: regions pulled, down, and silent (see
    ``Mesh.pull_at_start``)."""

    pulled: list[str] = field(default_factory=list)
    down: list[str] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)


class UnencodableDeltas(Exception):
    """Deltas the wire format cannot carry were left out of a collect."""


UP: Final = "up"
DOWN: Final = "down"
CONNECTING: Final = "connecting"

LAG_BOUNDS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
REJECTION_REASONS: Final = (
    "malformed",
    "wrong_cluster",
    "unsigned",
    "bad_signature",
    "wrong_kind",
    "stale",
    "replay",
    "replay_cache_full",
)
_ENVELOPE_OVERHEAD: Final = 512  # bytes around the body: framing, nonces, MAC, ids
_FULL_CHUNK_KEYS: Final = 2000  # buckets read per step of a full-state transfer
_PULL_GROUP: Final = 32  # ranges per pull request
_PULL_RETRIES: Final = 5  # failed requests in a row before a start-up pull gives up
_DIGEST_GROUP: Final = 64  # ranges per digest request, at most
# ... and at most this many of this node's buckets in them (one range at least): the
# peer answers the full state of every range that differs in one reply, encoded and
# signed in one piece. 64 ranges of a million buckets are ~250,000: when all differ (a
# rule PATCH adopted on one side first, a long partition healed) that reply stopped
# the answering node for 0.5-0.6 s; ~20,000 take it ~30 ms.
_DIGEST_KEYS: Final = 20_000
# Anti-entropy reads every bucket: it yields to the event loop after this many
# buckets scanned (~0.5 µs each) or hashed (~4 µs each: encode + blake2b), so a
# million buckets cost decisions a few ms at a time, never a second at once.
_SCAN_SLICE: Final = 5000
# The encoded size of a new bucket's delta (one replica entry, a rule's config: ~300
# bytes with a 40-byte key), for ``Mesh.backlogged``'s count of keys per message.
_DELTA_BYTES_ESTIMATE: Final = 256
_HASH_SLICE: Final = 1000
# Deltas of a peer's state (a digest reply, a pull reply) merged between two yields to the
# event loop (~3 µs each): a reply of a quarter of a million buckets merged in one piece
# stopped its receiver's loop for 1.6-1.8 s (R6: the flooded node's own deltas then waited
# that long for their acks).
_MERGE_SLICE: Final = 1000


def _digest_groups(sizes: Sequence[int]) -> list[list[int]]:
    """Consecutive ranges, ``_DIGEST_GROUP`` at most a request, fewer when their
    buckets (``sizes[r]``, this node's) pass ``_DIGEST_KEYS``; every range once."""
    groups: list[list[int]] = []
    group: list[int] = []
    held = 0
    for r, size in enumerate(sizes):
        if group and (len(group) == _DIGEST_GROUP or held + size > _DIGEST_KEYS):
            groups.append(group)
            group, held = [], 0
        group.append(r)
        held += size
    if group:
        groups.append(group)
    return groups


# Dirty deltas encoded and queued between two yields of the collector (~3 µs each).
_COLLECT_SLICE: Final = 2000
# ``Mesh.backlogged``: rounds of a peer's connections queued, not in flight, beyond which
# the sender is far behind (decisions yield to it whatever the length of a turn)
_FAR_ROUNDS: Final = 4
# the level of ``backlogged()`` at which the server sheds every turn for the sender
FAR_BEHIND: Final = HttpServer.FAR_BEHIND


@dataclass(frozen=True)
class MeshSettings:
    """What the mesh needs from the config; times in seconds.

    ``peers`` maps region → base URL of every *other* region. ``secret`` None is
    insecure mode (``--insecure-sync``). ``max_message_bytes`` must not exceed
    the peers' request body limit (``limits.maxBodyBytes``, the same everywhere).
    """

    region: str
    cluster_id: str
    peers: Mapping[str, str]
    #: signs with the first, accepts any (rotation: docs/security.md)
    secret: str | Sequence[str] | None
    interval_s: float = 0.02
    peer_timeout_s: float = 1.0
    max_message_bytes: int = 65536
    max_pending: int = 100_000
    digest_interval_s: float = 2.0
    settle_s: float = 2.0
    window_s: float = 30.0
    backoff_initial_s: float = 0.05
    #: the longest wait between failed sends to a peer: a healed partition is noticed
    #: within it (R2: converged within 1 s of healing). Probing a down peer 4 times a
    #: second costs nothing; a black-holed send still waits its peer timeout first.
    backoff_max_s: float = 0.25
    #: the wait after a failed full transfer or digest round (a peer shedding or slow):
    #: they are large, and the delta senders already notice a healed link
    bulk_backoff_s: float = 1.0
    bulk_timeout_s: float = 10.0
    #: a node that starts without a snapshot and reaches no peer: ``refill`` (shared
    #: buckets it creates refill from zero at its start until a peer is pulled) or
    #: ``full`` (they start full: whatever its previous life spent may be granted again)
    unrecovered_start: str = "refill"
    #: how long such a node waits for a silent peer's answer at start (one that
    #: refuses the connection is not waited for)
    unrecovered_wait_s: float = 10.0
    #: delta messages in flight per peer, each on its own keep-alive connection: with
    #: one, a delta collected while a message is in flight waits for its ack, so the
    #: lag of a busy key is about RTT + one way; with p, about RTT/p + one way
    pipeline: int = 2
    #: delta messages in flight per peer while more deltas are queued for it, not in
    #: flight, than ``pipeline`` messages carry (a flood of new keys: each one a bucket
    #: to replicate, ~300 bytes of delta): the further connections send only then
    pipeline_burst: int = 8
    #: a sender behind (``pipeline_burst`` messages' worth queued, not in flight) whose
    #: oldest queued delta is older than this is far behind: decisions yield turns to
    #: it whatever their length (``Mesh.backlogged``, ``HttpServer.yield_to``)
    yield_lag_s: float = 0.25
    #: the client side of TLS to https:// peers (http/tls.py); None: system CAs
    tls: TlsContexts | None = None

    @property
    def heartbeat_s(self) -> float:
        return max(0.05, min(1.0, self.peer_timeout_s / 4))

    @property
    def startup_pull_s(self) -> float:
        return self.peer_timeout_s


# -- the client side of one connection ------------------------------------------


class Peer:
    """Another region as this node sees it: its outbox, connections, liveness, lag."""

    def __init__(self, region: str, url: str, settings: MeshSettings) -> None:
        self.region = region
        self.url = url
        self.links = [
            HttpLink(url, timeout_s=settings.peer_timeout_s, tls=settings.tls)
            for _ in range(max(1, settings.pipeline, settings.pipeline_burst))
        ]
        self.link = self.links[0]
        self.wakes = [asyncio.Event() for _ in self.links]
        self.bulk = HttpLink(
            url, timeout_s=max(settings.bulk_timeout_s, settings.peer_timeout_s), tls=settings.tls
        )
        self.box = Outbox()
        self.wake = asyncio.Event()
        self.bulk_wake = asyncio.Event()
        self.full_wanted = False
        self.state = CONNECTING
        self.remote_replica: str | None = None
        self.failing_since: float | None = None
        self.attempts = 0
        self.last_error = ""
        self.last_seen_ns: int | None = None
        self.lags_ms: deque[float] = deque(maxlen=1000)
        self.lag = Histogram(LAG_BOUNDS)
        self.sent = 0
        self.failures = 0
        self.full_transfers = 0
        self.repaired_ranges = 0
        self.digests_deferred = 0  # digest requests from it answered "later" (behind)

    # the outbox, as the mesh and its metrics read it
    @property
    def outbox(self) -> dict[str, tuple[bytes, int]]:
        return self.box.queued

    @property
    def rules(self) -> dict[str, BucketConfig]:
        return self.box.rules

    @property
    def backlogs_dropped(self) -> int:
        return self.box.backlogs_dropped

    @property
    def oversized(self) -> int:
        return self.box.oversized

    def _wake_senders(self) -> None:
        self.wake.set()
        for wake in self.wakes:
            wake.set()

    def offer(
        self,
        encoded: Sequence[tuple[str, bytes]],
        rules: Mapping[str, BucketConfig],
        collected_ns: int,
        max_pending: int,
    ) -> bool:
        """``Outbox.offer``, waking the senders; an overflow wants a full transfer."""
        kept = self.box.offer(encoded, rules, collected_ns, max_pending)
        self._wake_senders()
        if not kept:
            self.want_full()
        return kept

    def take(self, budget: int) -> tuple[list[str], list[bytes], int | None]:
        return self.box.take(budget)

    def takeable(self) -> bool:
        return self.box.takeable()

    def unsent(self, keys: Sequence[str], chunks: Sequence[bytes]) -> None:
        self.box.unsent(keys, chunks)
        self._wake_senders()

    def acknowledge(
        self, keys: Sequence[str], chunks: Sequence[bytes], rules: Mapping[str, BucketConfig]
    ) -> None:
        self.box.acknowledge(keys, chunks, rules)

    def want_full(self) -> None:
        self.full_wanted = True
        self.bulk_wake.set()

    def lag_p99_ms(self) -> float | None:
        if not self.lags_ms:
            return None
        ordered = sorted(self.lags_ms)
        return round(ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)], 1)


_T = TypeVar("_T", bound=msgspec.Struct)


# -- the mesh -------------------------------------------------------------------


class Mesh:
    """Replication for one node: senders and bulk work per peer, and the receiving side."""

    enabled = True

    def __init__(
        self,
        limiter: Replica,
        settings: MeshSettings,
        *,
        clock: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.limiter = limiter
        self.settings = settings
        self.clock = clock
        self.monotonic = monotonic
        self.rng = rng or random.Random()
        self.log = log or _log
        window_ns = int(settings.window_s * NS_PER_S)
        self.auth = sync.SyncAuth(settings.cluster_id, settings.secret, window_ns=window_ns)
        self.replay = sync.ReplayGuard(window_ns)
        self.peers = {
            region: Peer(region, url, settings)
            for region, url in settings.peers.items()
            if region != settings.region
        }
        self.rejected: dict[str, int] = dict.fromkeys(REJECTION_REASONS, 0)
        # Partitions rehearsed on a real deployment: POST /v1/admin/faults (faults.py).
        self.faults = SyncFaults(self.peers, monotonic=monotonic)
        self.merged = 0
        #: the audit trail: a repair pushed by a tool (``bucketmesh reconcile --repair``,
        #: a sender of region ``@...``) is recorded there, key by key, old -> new
        self.audit: AuditLog | None = None
        # replica ids are region/node/incarnation: the prefixes this mesh accepts
        self._regions = tuple(f"{region}/" for region in {*settings.peers, settings.region})
        self.foreign_entries = 0
        self._warned_foreign = False
        self.received = 0
        self.unencodable = 0
        self.tasks: list[asyncio.Task[None]] = []
        # the tasks of each peer added at runtime (add_peer), for remove_peer
        self._peer_tasks: dict[str, list[asyncio.Task[None]]] = {}
        self.supervisor: Supervisor | None = None
        self.running = False
        # the collector (``_collect_loop``): its wake-up for the leading edge, set while
        # it waits; the monotonic start of the last collect that queued deltas; how
        # many collects queued deltas, and how many of those the leading edge started
        self._collect_wake: asyncio.Event | None = None
        self._queued_at = -math.inf
        self.collects = 0
        self.leading_collects = 0
        self._index: RangeIndex | None = None  # the pull path's keys by range
        self._reply_from = 0  # the range a capped digest answer starts from (rotating)

    @property
    def replica_id(self) -> str:
        return self.limiter.replica_id

    @property
    def local_only(self) -> bool:
        return not any(peer.state == UP for peer in self.peers.values())

    def backlogged(self) -> int:
        """Whether a peer that is up has more deltas queued, and not in flight, than one
        round of all its connections carries (``pipeline_burst`` messages): the sender
        is behind.

        The HTTP server asks this (``HttpServer.yield_to``) when a turn of the event
        loop ran long: a node flooded with decisions sheds the next turn whole while
        its sender is behind, so that every message of the sender, which waits a turn
        for its ack, gets short turns until the backlog is gone. Decisions then yield
        to replication: the node admits about what it can replicate, and the lag stays
        bounded (R6; before, the flooded node's own deltas lagged 2-3 s behind). A
        peer that is not up does not count: a node cut off decides on its own.

        Returns 0 (not behind), 1 (behind), or ``FAR_BEHIND`` (2) when, behind, the
        oldest delta queued for the peer was collected more than ``yield_lag`` ago (or
        the backlog not in flight is more than ``_FAR_ROUNDS`` rounds): the server then
        sheds turns for the sender whatever their length, since a node whose turns stay
        short still admitted more new keys than it replicated (R6 at 1x: 42,000 new
        keys/s admitted, ~30,000 deltas/s sent, the backlog at its 100,000-key cap
        within seconds, the lag p99 2.6-3.7 s)."""
        level = 0
        far_ns = self.settings.yield_lag_s * NS_PER_S
        now = self.clock()
        for peer in self.peers.values():
            if peer.state != UP:
                continue
            unsent, round_ = self._unsent(peer), len(peer.links) * self._keys_per_message
            if unsent <= round_:
                continue
            oldest = peer.box.oldest()
            if unsent > _FAR_ROUNDS * round_ or (oldest is not None and now - oldest > far_ns):
                return FAR_BEHIND
            level = 1
        return level

    def _behind(self, peer: Peer) -> bool:
        """Whether more deltas are queued for ``peer``, not in flight, than ``pipeline``
        messages carry (a flood of new keys): our full state then differs from what the
        peer holds by what is still queued, and comparing or swapping range states is
        work the deltas do anyway (``_bulk_loop``, ``receive_digest``)."""
        return self._unsent(peer) > self.settings.pipeline * self._keys_per_message

    @property
    def _keys_per_message(self) -> int:
        return max(1, self.settings.max_message_bytes // _DELTA_BYTES_ESTIMATE)

    @staticmethod
    def _unsent(peer: Peer) -> int:
        """About how many deltas are queued for ``peer`` and not in flight."""
        return len(peer.box.queued) - len(peer.box.inflight)

    # -- wiring ----------------------------------------------------------------

    def install(self, router: Router, admin: AdminAuth) -> None:
        """Serve the sync (and fault) endpoints on ``router`` and export the mesh's
        metrics."""
        router.add_route("POST", sync.PATHS[sync.DELTAS], "sync", self.receive_deltas)
        router.add_route("POST", sync.PATHS[sync.DIGEST], "sync", self.receive_digest)
        router.add_route("POST", sync.PATHS[sync.PULL], "sync", self.receive_pull)
        router.metrics.gauge(
            "bucketmesh_sync_local_only",
            "1 while no peer region is reachable and this node decides on its own",
            lambda: float(self.local_only),
        )
        router.metrics.labelled.append(self._metric_families)
        FaultEndpoint(router, admin, self.faults, self.settings.region).install()

    def status(self) -> api.SyncStatus:
        return api.SyncStatus(
            enabled=True,
            local_only=self.local_only,
            peers={
                region: api.PeerStatus(
                    state=peer.state,
                    lag_ms_p99=peer.lag_p99_ms(),
                    last_seen=_iso(peer.last_seen_ns),
                )
                for region, peer in self.peers.items()
            },
        )

    def start(self, supervisor: Supervisor | None = None) -> None:
        """Start the collector and every peer's senders and bulk loop under
        ``supervisor`` (the node's: a task that fails is logged, counted, shown in
        /readyz and /v1/status, and restarted; never silently gone)."""
        self.running = True
        tasks = supervisor or Supervisor(log)
        self.supervisor = tasks  # peers added later (add_peer) run under it too
        self.tasks.append(tasks.run("sync-collect", partial(self._collect_loop, tasks)))
        for region, peer in self.peers.items():
            self.tasks.append(tasks.run(f"sync-send:{region}", partial(self._send_loop, peer)))
            for index in range(1, len(peer.links)):
                self.tasks.append(
                    tasks.run(
                        f"sync-send:{region}:{index}", partial(self._pipeline_loop, peer, index)
                    )
                )
            self.tasks.append(tasks.run(f"sync-bulk:{region}", partial(self._bulk_loop, peer)))

    # -- peers found at runtime (replication/discovery.py) ------------------------

    def add_peer(self, region: str, url: str) -> None:
        """Sync with ``region`` at ``url`` from now on (a slot found by discovery): its
        senders and bulk loop start under the supervisor if the mesh runs, else at
        ``start``. Its first contact gets this node's full state (``_reached``)."""
        if region == self.settings.region or region in self.peers:
            return
        peer = Peer(region, url, self.settings)
        self.peers[region] = peer
        self._regions = tuple({*self._regions, f"{region}/"})
        supervisor = self.supervisor
        if not self.running or supervisor is None:
            return
        started = [supervisor.run(f"sync-send:{region}", partial(self._send_loop, peer))]
        for index in range(1, len(peer.links)):
            started.append(
                supervisor.run(
                    f"sync-send:{region}:{index}", partial(self._pipeline_loop, peer, index)
                )
            )
        started.append(supervisor.run(f"sync-bulk:{region}", partial(self._bulk_loop, peer)))
        self.tasks.extend(started)
        self._peer_tasks[region] = started

    async def remove_peer(self, region: str) -> None:
        """Stop syncing with ``region`` (a slot discovery no longer finds): its tasks
        end, its connections close, its outbox is dropped (the state stays: entries of
        its replicas are still merged and relayed, and a peer added again gets a full
        transfer)."""
        peer = self.peers.pop(region, None)
        if peer is None:
            return
        started = self._peer_tasks.pop(region, [])
        await cancel_and_wait(started)
        for task in started:
            if task in self.tasks:
                self.tasks.remove(task)
        supervisor = self.supervisor
        if supervisor is not None:
            for name in [n for n in supervisor.tasks if n.split(":")[1:2] == [region]]:
                supervisor.forget(name)
        for link in peer.links:
            link.close()
        peer.bulk.close()

    async def stop(self, flush_s: float = 1.0) -> None:
        """Send what is still queued to the peers that are up (for at most ``flush_s``),
        then stop every task and close every connection."""
        # The loops also check ``running``: asyncio.wait_for may swallow a cancellation
        # that races with the completion of what it waits for (Python < 3.12).
        self.running = False
        for failure in await cancel_and_wait(self.tasks):
            self.log(f"sync: a mesh task had failed: {failure!r}")
        self.tasks.clear()
        self.collect()
        flushes = [self._flush(peer, flush_s) for peer in self.peers.values() if peer.state == UP]
        if flushes:
            await asyncio.gather(*flushes, return_exceptions=True)
        for peer in self.peers.values():
            for link in peer.links:
                link.close()
            peer.bulk.close()

    async def _flush(self, peer: Peer, timeout_s: float) -> None:
        deadline = self.monotonic() + timeout_s
        while (peer.outbox or peer.rules) and self.monotonic() < deadline:
            remaining = max(0.01, deadline - self.monotonic())
            await self._push_outbox(peer, timeout_s=remaining)

    # -- sending -----------------------------------------------------------------

    def dirtied(self) -> None:
        """A grant put the first key into the limiter's empty dirty set
        (``Limiter.on_dirty``, set by the node): the leading edge. When no collect
        queued deltas for an interval (a quiet node), wake the collector now (it
        collects on the next turn of the loop); otherwise the key waits for the next
        periodic collect, which a collect of the last interval scheduled. So a flood,
        whose every interval queues deltas, never takes this path, and collects that
        queue deltas stay at least an interval apart. Called on the decision path: a
        clock read and a comparison, at most once between two collects."""
        wake = self._collect_wake
        if wake is not None and self.monotonic() - self._queued_at >= self.settings.interval_s:
            wake.set()

    async def _collect_loop(self, tasks: Supervisor) -> None:
        """The collector: ``collect_sliced`` an interval after the last collect, or at
        once when ``dirtied`` wakes it. A collect that fails (``UnencodableDeltas``) is
        counted and shown by ``tasks`` and the next one waits a backoff, as a step of
        ``Supervisor.every`` would."""
        interval = self.settings.interval_s
        wake = self._collect_wake = asyncio.Event()
        delay = interval
        try:
            while self.running:
                # (set only by ``dirtied`` while this waits: a collect in slices queued
                # deltas, so a wake-up during it is one the interval's rule refuses)
                wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await within(wake.wait(), delay)
                leading = wake.is_set()
                try:
                    queued = await self.collect_sliced()
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # counted, shown, retried (tasks.every's way)
                    tasks.failed("sync-collect", error)
                    delay = max(interval, tasks.backoff(tasks.tasks["sync-collect"]))
                    continue
                tasks.succeeded("sync-collect")
                delay = interval
                if queued and leading:
                    self.leading_collects += 1
        finally:
            self._collect_wake = None

    def _collected(self, batch: DeltaBatch) -> bool:
        """Whether ``batch`` (a collect's) holds anything to queue; counts it and
        remembers when, for the leading edge's interval (``dirtied``)."""
        if not batch.deltas and not batch.rules:
            return False
        self._queued_at = self.monotonic()
        self.collects += 1
        return True

    def collect(self) -> int:
        """Move the limiter's dirty deltas into every peer's outbox; returns how many.

        A delta that cannot be encoded does not hold up the others: they are queued,
        then ``UnencodableDeltas`` names the keys left out (the supervisor logs and
        counts it, and /readyz shows it)."""
        batch = self.limiter.collect_deltas()
        if not self._collected(batch):
            return 0
        refused: list[tuple[str, Exception]] = []
        count = self._queue(batch.deltas, batch.rules, self.clock(), refused)
        self._refused(refused)
        return count

    async def collect_sliced(self) -> int:
        """``collect``, ``_COLLECT_SLICE`` deltas at a time with the event loop let through
        between slices (the collector task's step): a dirty set of hundreds of thousands
        of keys (a PATCH of a rule every bucket of a flood belongs to) is neither built
        (``collect_deltas(limit)``: ~1.5-3.5 s for a million) nor encoded in one turn.
        Deltas hold absolute values, so collecting in slices queues the same; a key
        changed again after its slice goes with a later slice or collect. It takes at
        most the slices the buckets held when it began: a flood dirtying keys as fast as
        they are taken leaves the rest to the next collect. Cancelled between slices
        (the node stops), it collects and queues the rest at once: nothing dirty is
        left behind by it."""
        limiter = self.limiter
        slices = len(limiter.buckets) // _COLLECT_SLICE + 1
        batch = limiter.collect_deltas(_COLLECT_SLICE)
        if not self._collected(batch):
            return 0
        now = self.clock()
        refused: list[tuple[str, Exception]] = []
        count = 0
        finished = False
        try:
            while True:
                count += self._queue(batch.deltas, batch.rules, now, refused)
                slices -= 1
                if len(batch.deltas) < _COLLECT_SLICE or slices <= 0:
                    break
                await asyncio.sleep(0)
                batch = limiter.collect_deltas(_COLLECT_SLICE)
            finished = True
        finally:
            if not finished:
                rest = limiter.collect_deltas()
                count += self._queue(rest.deltas, rest.rules, now, refused)
        self._refused(refused)
        return count

    def _queue(
        self,
        deltas: Sequence[BucketDelta],
        rules: Mapping[str, BucketConfig],
        now: int,
        refused: list[tuple[str, Exception]],
    ) -> int:
        """Encode ``deltas`` once and offer them (and ``rules``) to every peer's outbox;
        those that cannot be encoded go to ``refused``."""
        encoded = []
        for delta in deltas:
            try:
                encoded.append((delta.key, sync.encode_delta(delta)))
            except (msgspec.EncodeError, OverflowError, ValueError) as error:
                refused.append((delta.key, error))
        self.unencodable += len(deltas) - len(encoded)
        for peer in self.peers.values():
            if not peer.offer(encoded, rules, now, self.settings.max_pending):
                self.log(
                    f"sync: backlog for {peer.region} exceeded {self.settings.max_pending} "
                    "buckets; dropped it, a full-state transfer follows when it is back"
                )
        return len(encoded)

    @staticmethod
    def _refused(refused: list[tuple[str, Exception]]) -> None:
        if refused:
            key, reason = refused[0]
            raise UnencodableDeltas(
                f"{len(refused)} delta(s) could not be encoded and were not replicated "
                f"(first: key {key[:80]!r}: {reason!r})"
            )

    def _budget(self, rules: Mapping[str, BucketConfig]) -> int:
        overhead = _ENVELOPE_OVERHEAD + len(self.settings.cluster_id) + len(self.replica_id) * 2
        rules_size = len(sync.encode_push(0, False, "", [], dict(rules))) if rules else 0
        return max(1024, self.settings.max_message_bytes - overhead - rules_size)

    async def _push_outbox(
        self,
        peer: Peer,
        timeout_s: float | None = None,
        link: HttpLink | None = None,
        require_deltas: bool = False,
    ) -> bool | None:
        """One message from the outbox (or a heartbeat when it is empty); None when
        ``require_deltas`` and nothing is left to send that is not in flight."""
        rules = {} if require_deltas else dict(peer.rules)
        keys, chunks, origin = peer.take(self._budget(rules))
        if require_deltas and not keys:
            return None
        body = sync.encode_push(
            self.clock() if origin is None else origin, False, self.replica_id, chunks, rules
        )
        started = self.monotonic()
        try:
            ack = await self._request(
                peer, link or peer.link, sync.DELTAS, body, sync.Ack, timeout_s
            )
            if ack.replica_id == self.replica_id:
                raise LinkError(f"{peer.url} is this very node; check sync.peerUrls")
        except LinkError as error:
            peer.unsent(keys, chunks)
            self._failed(peer, error, started)
            return False
        peer.acknowledge(keys, chunks, rules)
        peer.sent += 1
        self._reached(peer, ack.replica_id)
        return True

    async def _send_loop(self, peer: Peer) -> None:
        heartbeat = self.settings.heartbeat_s
        last_sent = -math.inf
        while self.running:
            # (everything queued may be in flight on the pipeline's other connections)
            if not peer.rules and (not peer.outbox or not peer.takeable()):
                wait = heartbeat - (self.monotonic() - last_sent)
                if wait > 0:
                    peer.wake.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await within(peer.wake.wait(), wait)  # no task: no extra turns
                    continue
            if await self._push_outbox(peer):
                last_sent = self.monotonic()
            else:
                await asyncio.sleep(self._backoff(peer))

    async def _pipeline_loop(self, peer: Peer, index: int) -> None:
        """A further sender on its own connection: only deltas not in flight yet, only
        while the peer is up (the first sender alone probes a failing peer); one beyond
        ``pipeline`` only while more is queued than ``pipeline`` messages carry."""
        link, wake = peer.links[index], peer.wakes[index]
        burst = index >= max(1, self.settings.pipeline)
        while self.running:
            if (
                peer.state != UP
                or (burst and self._unsent(peer) <= self.settings.pipeline * self._keys_per_message)
                or not peer.takeable()  # (scans the queue: last)
            ):
                wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await within(wake.wait(), self.settings.heartbeat_s)
                continue
            if await self._push_outbox(peer, link=link, require_deltas=True) is False:
                await asyncio.sleep(self._backoff(peer))

    def _backoff(self, peer: Peer) -> float:
        s = self.settings
        ceiling = min(s.backoff_max_s, s.backoff_initial_s * 2 ** min(peer.attempts - 1, 30))
        return self.rng.uniform(ceiling / 2, ceiling)

    def _reached(self, peer: Peer, replica_id: str) -> None:
        if peer.state != UP:
            self.log(f"sync: peer {peer.region} is up ({peer.url}, replica {replica_id})")
            peer.state = UP
        peer.failing_since = None
        peer.attempts = 0
        if replica_id != peer.remote_replica:
            # First contact with this replica id: a new peer, or a restarted one that
            # knows nothing of what it missed. Give it everything.
            peer.remote_replica = replica_id
            peer.want_full()

    def _failed(self, peer: Peer, error: LinkError, started: float) -> None:
        peer.failures += 1
        peer.attempts += 1
        peer.last_error = str(error)
        if peer.failing_since is None:
            peer.failing_since = started
        if peer.state != DOWN and (
            self.monotonic() - peer.failing_since >= self.settings.peer_timeout_s
        ):
            peer.state = DOWN
            self.log(f"sync: peer {peer.region} is down ({peer.url}): {error}")

    async def _request(
        self,
        peer: Peer,
        link: HttpLink,
        kind: str,
        body: bytes,
        reply_type: type[_T],
        timeout_s: float | None = None,
    ) -> _T:
        """Seal, post, and open the reply; any failure is a ``LinkError``."""
        if self.faults.blocks(peer.region, "outbound"):
            raise LinkError(f"{kind} to {peer.region} dropped by an injected fault")
        nonce = os.urandom(sync.NONCE_BYTES)
        message = self.auth.seal(
            kind,
            body,
            sender=self.replica_id,
            region=self.settings.region,
            now_ns=self.clock(),
            nonce=nonce,
        )
        status, data = await link.post(sync.PATHS[kind], message, timeout_s)
        if status != 200:
            detail = data[:300].decode("utf-8", "replace")
            raise LinkError(f"{kind} answered HTTP {status}: {detail}", status=status)
        try:
            env = self.auth.open(
                data, kinds=(sync.REPLY_KIND[kind],), now_ns=self.clock(), reply_to=nonce
            )
            payload = sync.decode_body(env)
        except sync.Rejected as rejected:
            raise LinkError(f"{kind}: unacceptable reply ({rejected.reason}: {rejected})") from None
        if not isinstance(payload, reply_type):
            raise LinkError(f"{kind}: unexpected reply {type(payload).__name__}")
        peer.last_seen_ns = self.clock()
        return payload

    # -- bulk: full state and digests ------------------------------------------

    async def _bulk_loop(self, peer: Peer) -> None:
        interval = self.settings.digest_interval_s
        next_digest = self.monotonic() + self.rng.uniform(0.5, 1.0) * interval
        while self.running:
            if peer.state != UP:
                await asyncio.sleep(self.settings.heartbeat_s)
                continue
            try:
                if peer.full_wanted:
                    await self._transfer_full(peer)
                    continue
                if self.monotonic() >= next_digest:
                    # (armed first: a round that fails, e.g. refused by a peer that is
                    # behind on its deltas to us, waits a whole interval as well)
                    next_digest = self.monotonic() + self._digest_interval()
                    # Not while the sender is behind (a flood of new keys): the ranges
                    # differ by what is still queued, and the round would swap their full
                    # state both ways (a merge and an encode of up to every bucket) for
                    # what the deltas carry anyway.
                    if not self._behind(peer):
                        await self._digest_round(peer)
            except LinkError as error:
                peer.last_error = str(error)
                await asyncio.sleep(self.rng.uniform(0.5, 1.0) * self.settings.bulk_backoff_s)
                continue
            peer.bulk_wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    peer.bulk_wake.wait(), max(0.0, next_digest - self.monotonic())
                )

    def _digest_interval(self) -> float:
        # Hashing costs about a microsecond or two per bucket: stretch the interval
        # with the bucket count so that digests stay a small share of one core.
        floor = self.settings.digest_interval_s
        return self.rng.uniform(0.8, 1.2) * max(floor, len(self.limiter.buckets) * 50e-6)

    async def _transfer_full(self, peer: Peer) -> None:
        """Send every shared bucket with every entry known here, in chunks.

        The outbox is dropped first: the full state read afterwards subsumes it.
        A failure leaves ``full_wanted`` set, so the transfer starts over later.
        """
        peer.full_wanted = False
        peer.box.clear()
        peer.full_transfers += 1
        keys = self._with_key_configs(await self._live_keys())
        try:
            await self._push_state_of(peer, keys, full_transfer=True)
        except LinkError:
            peer.full_wanted = True
            raise

    async def _push_state_of(
        self, peer: Peer, keys: Sequence[str], *, full_transfer: bool = False
    ) -> None:
        """The full state of ``keys`` to ``peer``, read ``_FULL_CHUNK_KEYS`` buckets at a
        time (each chunk is read, encoded and sent before the next is read, with the event
        loop let through between them); at least one message, so that rule configs
        travel. A full transfer stops early when another one was asked for meanwhile."""
        if not keys:
            await self._push_state(peer, self.limiter.full_state([]))
        for start in range(0, len(keys), _FULL_CHUNK_KEYS):
            if full_transfer and peer.full_wanted:
                return
            await self._push_state(
                peer, self.limiter.full_state(keys[start : start + _FULL_CHUNK_KEYS])
            )
            await asyncio.sleep(0)

    async def _push_state(self, peer: Peer, batch: DeltaBatch) -> None:
        """Full-state deltas to ``peer`` over the bulk connection, split to fit messages
        (always at least one message, so rule configs travel even without buckets)."""
        rules = batch.rules
        budget = self._budget(rules)
        chunk: list[bytes] = []
        size = 0
        for delta in batch.deltas:
            data = sync.encode_delta(delta)
            if len(data) > budget:
                peer.box.oversized += 1
                continue
            if chunk and size + len(data) > budget:
                await self._send_state(peer, chunk, rules)
                chunk, size = [], 0
            chunk.append(data)
            size += len(data)
        await self._send_state(peer, chunk, rules)

    async def _send_state(
        self, peer: Peer, chunk: list[bytes], rules: dict[str, BucketConfig]
    ) -> None:
        body = sync.encode_push(self.clock(), True, self.replica_id, chunk, rules)
        await self._request(peer, peer.bulk, sync.DELTAS, body, sync.Ack)

    async def _live_keys(self, ranges: Collection[int] | None = None) -> list[str]:
        """Shared buckets not yet expired (in ``ranges``, if given): what state transfers
        carry. An expired bucket is as good as gone, and resending one that a peer
        already dropped would only resurrect it there. Scanned in slices; with ``ranges``
        only those ranges' keys are read, from the range index (``keyindex.py``)."""
        now = self.clock()
        range_of = sync.range_of
        buckets = self.limiter.buckets
        if ranges is not None:
            keys = await self._range_index().live(ranges)
            ranges = None  # every key read is in them
        else:
            keys = list(buckets)
        live: list[str] = []
        for start in range(0, len(keys), _SCAN_SLICE):
            for key in keys[start : start + _SCAN_SLICE]:
                bucket = buckets.get(key)
                if (
                    bucket is not None
                    and bucket.config.mode == SHARED
                    and not bucket.expired(now)
                    and (ranges is None or range_of(key) in ranges)
                ):
                    live.append(key)
            if len(keys) > _SCAN_SLICE:
                await asyncio.sleep(0)
        return live

    async def _keys_by_range(self) -> list[list[str]]:
        ranges: list[list[str]] = [[] for _ in range(sync.RANGES)]
        range_of = sync.range_of
        for key in await self._live_keys():
            ranges[range_of(key)].append(key)
        return ranges

    async def _digest_of(
        self, keys: Sequence[str], ranges: Sequence[int], now_ns: int, settle_ns: int
    ) -> list[int]:
        """``sync.digest`` of these buckets' full state, hashed in slices (range hashes
        are XORs, so slices combine)."""
        hashes = [0] * len(ranges)
        for start in range(0, len(keys), _HASH_SLICE):
            states = self.limiter.full_state(keys[start : start + _HASH_SLICE]).deltas
            part = sync.digest(states, ranges, now_ns, settle_ns)
            hashes = [a ^ b for a, b in zip(hashes, part, strict=True)]
            if len(keys) > _HASH_SLICE:
                await asyncio.sleep(0)
        return hashes

    async def _digest_round(self, peer: Peer) -> None:
        """Compare range hashes with ``peer``; swap full state of the ranges that differ."""
        settle_ns = int(self.settings.settle_s * NS_PER_S)
        by_range = await self._keys_by_range()
        for group in _digest_groups([len(keys) for keys in by_range]):
            keys = [key for r in group for key in by_range[r]]
            at = self.clock()
            hashes = await self._digest_of(keys, group, at, settle_ns)
            request = sync.DigestRequest(settle_ns, group, hashes, at)
            reply = await self._request(
                peer, peer.bulk, sync.DIGEST, sync.encode(request), sync.DigestReply
            )
            if reply.differing:
                await self._merge_sliced(reply.state)
                peer.repaired_ranges += len(reply.differing)
                mine = [key for r in reply.differing if 0 <= r < sync.RANGES for key in by_range[r]]
                await self._push_state_of(peer, mine)
            await asyncio.sleep(0)

    # -- start-up ------------------------------------------------------------------

    async def pull_at_start(self, wait_s: float | None = None) -> PullOutcome:
        """Merge the full state of every reachable peer before this node decides anything.

        ``startup_pull`` bounds only the wait for a peer's *first* answer (a peer that
        is down must not hold the start up); a peer that answers is pulled to the end,
        however large its state, each request with the bulk timeout: a node that
        stopped half-way would serve keys it has not recovered and grant again what
        its previous life spent. Says which peers were pulled, which were down (refused
        the connection, closed it, answered an error) and which stayed silent (no
        answer in time: alive, maybe, behind a partition). ``wait_s`` (default
        ``startup_pull``) is how long a silent peer is waited for."""
        deadline = self.monotonic() + (self.settings.startup_pull_s if wait_s is None else wait_s)
        results = await asyncio.gather(
            *(self._pull_from(peer, deadline) for peer in self.peers.values()),
            return_exceptions=True,
        )
        outcome = PullOutcome()
        for region, result in zip(self.peers, results, strict=True):
            if isinstance(result, BaseException):
                log.error("sync: start-up pull from %s failed", region, exc_info=result)
                outcome.down.append(region)
            else:
                getattr(outcome, result).append(region)
        if self.peers:
            self.log(
                f"sync: start-up state pulled from {', '.join(outcome.pulled) or 'no peer'}"
                f" ({len(self.limiter.buckets)} buckets)"
            )
        return outcome

    async def _pull_from(self, peer: Peer, deadline: float) -> str:
        groups = [
            list(range(start, min(sync.RANGES, start + _PULL_GROUP)))
            for start in range(0, sync.RANGES, _PULL_GROUP)
        ]
        answered = False
        failures = 0
        silent = True
        for group in groups:
            while True:
                if answered:  # reached: each request gets the bulk timeout
                    remaining = self.settings.bulk_timeout_s
                else:
                    remaining = deadline - self.monotonic()
                    if remaining <= 0:
                        return SILENT if silent else DOWN
                body = sync.encode(sync.PullRequest(group))
                try:
                    reply = await self._request(
                        peer, peer.bulk, sync.PULL, body, sync.PullReply, timeout_s=remaining
                    )
                except LinkError as error:
                    peer.last_error = str(error)
                    failures += 1
                    silent = silent and error.timed_out  # only ever timeouts: a black hole
                    gave_up = answered and failures > _PULL_RETRIES
                    if error.refused or error.status is not None or gave_up:
                        if answered:
                            self.log(
                                f"sync: start-up pull from {peer.region} broke off after "
                                f"{failures} failures ({error}); the digest exchange repairs "
                                "the rest"
                            )
                        return DOWN
                    await asyncio.sleep(min(self.settings.backoff_initial_s, remaining))
                    continue
                answered = True
                failures = 0
                await self._merge_sliced(reply.state)
                break
        return PULLED

    # -- receiving -----------------------------------------------------------------

    def _open(self, request: Request, kind: str) -> tuple[sync.Envelope, msgspec.Struct]:
        try:
            env = self.auth.open(
                request.body, kinds=(kind,), now_ns=self.clock(), replay=self.replay
            )
            payload = sync.decode_body(env)
        except sync.Rejected as rejected:
            self.rejected[rejected.reason] = self.rejected.get(rejected.reason, 0) + 1
            headers = (
                [("WWW-Authenticate", 'HMAC realm="bucketmesh-sync"')]
                if rejected.status == 401
                else None
            )
            raise ApiError(
                rejected.status,
                rejected.detail,
                field="body",
                headers=headers,
                reason="sync_" + rejected.reason,
            ) from None
        if self.faults.blocks(env.region, "inbound"):
            raise ApiError(
                503,
                f"sync from {env.region} is dropped by an injected fault (/v1/admin/faults)",
                reason="sync_fault_injected",
            )
        # a newer incarnation of a peer node freezes its older ones' strict gifts here
        # (core/shares.py): before a pull is answered, so the puller sees them all
        observe = getattr(self.limiter, "observe_replica", None)
        if observe is not None and getattr(self.limiter, "share_region", None) is not None:
            observe(env.sender)
        tls = self.settings.tls
        if (
            tls is not None
            and tls.files.pin_regions
            and env.region not in (request.peer_names or ())
        ):
            # tls.pinRegions: a region's certificate speaks for that region only
            tls.count_refusal("server", "wrong_region")
            raise ApiError(
                403,
                f"the client certificate does not name region {env.region!r}, which this "
                "message comes from (tls.pinRegions)",
                reason="sync_wrong_region",
            )
        self.received += 1
        peer = self.peers.get(env.region)
        if peer is not None:
            peer.last_seen_ns = self.clock()
        return env, payload

    def _reply(self, request: sync.Envelope, kind: str, payload: msgspec.Struct) -> Response:
        body = self.auth.seal(
            kind,
            sync.encode(payload),
            sender=self.replica_id,
            region=self.settings.region,
            now_ns=self.clock(),
            nonce=os.urandom(sync.NONCE_BYTES),
            reply_to=request.nonce,
        )
        return Response(200, body, sync.CONTENT_TYPE)

    def _merge(self, batch: DeltaBatch) -> int:
        """Join what a peer sent, less any replica entry of a region that is neither a
        configured peer nor this node's: an authenticated peer may speak for its own
        region and relay the others', never invent one (those entries are counted)."""
        regions = self._regions
        for delta in batch.deltas:
            used = delta.used
            if not all(rid.startswith(regions) for rid in used):
                kept = {rid: n for rid, n in used.items() if rid.startswith(regions)}
                self.foreign_entries += len(used) - len(kept)
                if not self._warned_foreign:
                    self._warned_foreign = True
                    stranger = next(rid for rid in used if not rid.startswith(regions))
                    self.log(f"refused replica entries of regions not in sync.peers ({stranger})")
                delta.used = kept
        changed = self.limiter.merge(batch, now=self.clock())
        self.merged += changed
        return changed

    async def _merge_sliced(self, batch: DeltaBatch) -> int:
        """``_merge`` of a large batch (a peer's state of some ranges), ``_MERGE_SLICE``
        deltas at a time with the event loop let through between slices; the rule configs
        with the first. A merge is a join per key, so merging a batch in parts, with
        anything else merged or decided between them, ends where merging it whole does."""
        deltas = batch.deltas
        if len(deltas) <= _MERGE_SLICE:
            return self._merge(batch)
        changed = 0
        for start in range(0, len(deltas), _MERGE_SLICE):
            part = deltas[start : start + _MERGE_SLICE]
            changed += self._merge(DeltaBatch(batch.origin, part, batch.rules if not start else {}))
            await asyncio.sleep(0)
        return changed

    def receive_deltas(self, request: Request) -> Response:
        env, payload = self._open(request, sync.DELTAS)
        assert isinstance(payload, sync.DeltaPush)
        batch = payload.batch
        repair = (
            self.audit is not None
            and env.region.startswith(TOOL_REGION_PREFIX)
            and bool(batch.deltas or batch.rules)
        )
        before = self._repair_view(batch) if repair else None
        changed = self._merge(batch)
        if before is not None:
            self._record_repair(env, batch, before)
        # An overtaken batch (every delta already delivered by a newer one, e.g. held
        # up by a retransmission) changed nothing: its age is no lag (docs/sync.md).
        if payload.batch.deltas and not payload.full and changed:
            peer = self.peers.get(env.region)
            if peer is not None:
                lag_s = max(0.0, (self.clock() - payload.origin_ns) / NS_PER_S)
                peer.lag.observe(lag_s)
                peer.lags_ms.append(lag_s * 1000)
        return self._reply(env, sync.ACK, sync.Ack(self.replica_id, changed))

    def _repair_view(self, batch: DeltaBatch) -> dict[str, object]:
        """What a repair may change, as the audit trail writes it: each key's level and
        replica entries (None: no bucket here), each rule's limits and shadow mark."""
        now = self.clock()
        buckets = self.limiter.buckets
        rid = self.limiter.replica_id
        view: dict[str, object] = {}
        for delta in batch.deltas:
            bucket = buckets.get(delta.key)
            view["key:" + delta.key] = (
                None
                if bucket is None
                else {
                    "tokens_remaining": bucket.level(now),
                    "entries": {r: n for r, n in sorted(bucket.used(rid).items()) if n},
                }
            )
        configs = self.limiter.rule_configs
        for name in batch.rules:
            config = configs.get(name)
            view["rule:" + name] = None if config is None else config.view()
        return view

    def _record_repair(
        self, env: sync.Envelope, batch: DeltaBatch, before: dict[str, object]
    ) -> None:
        """One ``repair`` event per key (or rule) the tool's push changed here, with who
        sent it (the authenticated sender, and which sync secret signed it)."""
        audit = self.audit
        if audit is None:
            return
        after = self._repair_view(batch)
        who = f"sync:{env.sender}"
        signer = self.auth.signer(env)
        rules = {delta.key: delta.rule for delta in batch.deltas}
        for name, old in before.items():
            new = after.get(name)
            if new == old:
                continue
            kind, _, target = name.partition(":")
            fields: dict[str, object] = {"key": target} if kind == "key" else {"rule": target}
            if kind == "key" and rules.get(target):
                fields["rule"] = rules[target]
            audit.change(
                "repair",
                who=who,
                old=old,
                new=new,
                signed_by=signer,
                region=self.settings.region,
                replica=self.limiter.replica_id,
                **fields,
            )

    def _ranges(self, ranges: Sequence[int]) -> list[int]:
        bad = [r for r in ranges if not 0 <= r < sync.RANGES]
        if bad:
            raise ApiError(
                400,
                f"ranges are 0..{sync.RANGES - 1}, got {bad[:5]}",
                field="ranges",
                reason="sync_malformed",
            )
        return list(ranges)

    def _range_index(self) -> RangeIndex:
        index = self._index
        if index is None or index.buckets is not self.limiter.buckets:
            index = self._index = RangeIndex(self.limiter.buckets)
        return index

    async def _state_of_ranges(self, ranges: Sequence[int]) -> DeltaBatch:
        """The full state of ``ranges``, built ``_HASH_SLICE`` buckets at a time with the
        event loop let through between slices: a page of 20,000 buckets is ~130 ms of
        work, which must not stop decisions in one piece."""
        chosen = set(ranges)
        keys = self._with_key_configs(await self._live_keys(chosen), chosen)
        if len(keys) <= _HASH_SLICE:
            return self.limiter.full_state(keys)
        deltas: list[BucketDelta] = []
        batch = DeltaBatch(self.replica_id, deltas)
        for start in range(0, len(keys), _HASH_SLICE):
            batch = self.limiter.full_state(keys[start : start + _HASH_SLICE])
            deltas.extend(batch.deltas)
            await asyncio.sleep(0)
        return DeltaBatch(batch.origin, deltas, batch.rules)

    def _with_key_configs(
        self, keys: list[str], ranges: Collection[int] | None = None
    ) -> list[str]:
        """``keys`` and the keys (in ``ranges``) with a per-key config of a strict or
        local key: their configs travel alone in state transfers and pulls, so that a
        region restarted without a snapshot gets them back (the digest leaves them out)."""
        configs: Collection[str] = self.limiter.key_configs.keys()
        ledgers = getattr(self.limiter, "ledgers", None)  # strict keys' rights (shares.py)
        if ledgers:
            configs = configs | ledgers.keys()
        if not configs:
            return keys
        present = set(keys)
        range_of = sync.range_of
        extra = [
            key
            for key in configs
            if key not in present and (ranges is None or range_of(key) in ranges)
        ]
        return keys + extra if extra else keys

    async def receive_digest(self, request: Request) -> Response:
        env, payload = self._open(request, sync.DIGEST)
        assert isinstance(payload, sync.DigestRequest)
        peer = self.peers.get(env.region)
        if peer is not None and peer.state == UP and self._behind(peer):
            # Our state of its ranges differs from the asker's by the deltas still queued
            # for it (a flood of new keys here): the reply would carry the full state of
            # nearly every range (tens of MB, encoded and merged for nothing the deltas do
            # not deliver anyway). Later, once the sender has caught up.
            peer.digests_deferred += 1
            raise ApiError(
                503,
                "this node is behind on its deltas to your region; compare digests later",
                headers=[("Retry-After", str(max(1, math.ceil(self.settings.digest_interval_s))))],
                reason="sync_behind",
            )
        ranges = self._ranges(payload.ranges)
        now = self.clock()
        # hashed at the asker's instant: which buckets count as settled is then the same
        # on both sides (an older asker sends 0; one beyond the window: our own now)
        at = payload.at_ns
        if not at or abs(at - now) > self.settings.window_s * NS_PER_S:
            at = now
        keys = await self._live_keys(set(ranges))
        mine = await self._digest_of(keys, ranges, at, payload.settle_ns)
        try:
            differ = sync.differing(ranges, mine, payload.hashes)
        except sync.Rejected as rejected:
            raise ApiError(400, rejected.detail, field="hashes", reason="sync_malformed") from None
        differ = self._within_one_reply(differ)
        state = await self._state_of_ranges(differ) if differ else DeltaBatch(self.replica_id, [])
        return self._reply(env, sync.DIGEST_REPLY, sync.DigestReply(self.replica_id, differ, state))

    def _within_one_reply(self, differ: list[int]) -> list[int]:
        """The first of the differing ranges whose buckets here stay within
        ``_DIGEST_KEYS`` (one range at least): the reply carries their state, encoded
        and signed in one piece. The asker merges them and sends its own state of the
        same ranges; the others still differ at its next digest round. An asker groups
        ranges by its own buckets (``_digest_groups``), so this bites only when this
        node holds far more of them than the asker does."""
        ranges = self._range_index().ranges
        # from where the last capped answer stopped, so that ranges that keep differing
        # (a peer at its bucket cap) cannot hold the later ones off for good
        start = self._reply_from
        order = sorted(differ, key=lambda r: (r - start) % sync.RANGES)
        chosen: list[int] = []
        held = 0
        for r in order:
            size = len(ranges[r])  # (dead, strict and local keys too: an upper bound)
            if chosen and held + size > _DIGEST_KEYS:
                self._reply_from = r
                break
            chosen.append(r)
            held += size
        return sorted(chosen)

    async def receive_pull(self, request: Request) -> Response:
        env, payload = self._open(request, sync.PULL)
        assert isinstance(payload, sync.PullRequest)
        # a Redis region puts the incarnation it froze (in _open) into Redis before it
        # answers: every writer of the region freezes it too (storage/redis_backend.py)
        frozen = getattr(self.limiter, "share_freeze", None)
        if frozen is not None and not await frozen():
            raise ApiError(
                503,
                "the region's store did not take the incarnation this pull comes from",
                reason="sync_freeze_unavailable",
            )
        state = await self._state_of_ranges(self._ranges(payload.ranges))
        return self._reply(env, sync.STATE, sync.PullReply(self.replica_id, state))

    # -- metrics -------------------------------------------------------------------

    def _metric_families(self) -> Iterator[Metric]:
        for gauge, name, doc, read in _PEER_METRICS:
            family: GaugeMetricFamily | CounterMetricFamily = (
                GaugeMetricFamily if gauge else CounterMetricFamily
            )(name, doc, labels=["peer"])
            for region, peer in sorted(self.peers.items()):
                family.add_metric([region], float(read(peer)))
            yield family
        lag = HistogramMetricFamily(
            "crdt_sync_duration_seconds",
            "Replication lag of received delta batches that changed a bucket: receive time "
            "minus the sender's collect time, by sending peer region",
            labels=["peer"],
        )
        for region, peer in sorted(self.peers.items()):
            lag.add_metric([region], peer.lag.buckets(), peer.lag.total)
        yield lag
        rejected = CounterMetricFamily(
            "bucketmesh_sync_rejected",
            "Sync messages refused (nothing merged), by reason",
            labels=["reason"],
        )
        for reason, n in sorted(self.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield CounterMetricFamily(
            "bucketmesh_sync_foreign_entries",
            "Replica entries refused from peers: their region is not in sync.peers",
            value=self.foreign_entries,
        )
        yield CounterMetricFamily(
            "bucketmesh_sync_unencodable_deltas",
            "Deltas left unreplicated because the wire format cannot encode them",
            value=self.unencodable,
        )
        yield CounterMetricFamily(
            "bucketmesh_sync_merged_buckets",
            "Buckets changed by merging peers' messages",
            value=self.merged,
        )
        yield CounterMetricFamily(
            "bucketmesh_sync_collects",
            "Collects of the dirty set that queued deltas for the peers",
            value=self.collects,
        )
        yield CounterMetricFamily(
            "bucketmesh_sync_leading_collects",
            "Collects that a grant after a quiet interval started at once (the leading "
            "edge), of bucketmesh_sync_collects_total",
            value=self.leading_collects,
        )


_PEER_METRICS: Final[tuple[tuple[bool, str, str, Callable[[Peer], float]], ...]] = (
    (
        True,
        "bucketmesh_sync_peer_up",
        "1 while sends to this peer region succeed",
        lambda p: p.state == UP,
    ),
    (
        True,
        "bucketmesh_sync_pending_deltas",
        "Bucket deltas queued for this peer region, not yet acknowledged",
        lambda p: len(p.outbox),
    ),
    (
        False,
        "bucketmesh_sync_messages_sent",
        "Delta messages (and heartbeats) this peer region acknowledged",
        lambda p: p.sent,
    ),
    (
        False,
        "bucketmesh_sync_send_failures",
        "Delta sends to this peer region that failed (timeout, refused, rejected)",
        lambda p: p.failures,
    ),
    (
        False,
        "bucketmesh_sync_full_transfers",
        "Full-state transfers started to this peer region",
        lambda p: p.full_transfers,
    ),
    (
        False,
        "bucketmesh_sync_backlogs_dropped",
        "Times this peer region's backlog overflowed and was replaced by a full transfer",
        lambda p: p.backlogs_dropped,
    ),
    (
        False,
        "bucketmesh_sync_oversized_deltas",
        "Deltas for this peer region dropped because one alone exceeds a message",
        lambda p: p.oversized,
    ),
    (
        False,
        "bucketmesh_sync_digests_deferred",
        "Digest requests from this peer region answered 503 (later) because this node was "
        "behind on its deltas to it",
        lambda p: p.digests_deferred,
    ),
    (
        False,
        "bucketmesh_sync_repaired_ranges",
        "Key ranges a digest exchange with this peer region found different and repaired",
        lambda p: p.repaired_ranges,
    ),
)


def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    moment = datetime.fromtimestamp(ns / NS_PER_S, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _log(message: str) -> None:
    log.warning("%s", message)
