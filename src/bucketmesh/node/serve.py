"""The ``bucketmesh serve`` process: one node of one region.

Owns everything with a side effect around the pure core: the event loop
(uvloop), the HTTP server, the replica's identity and its snapshot file, the
background sweeps, the sync mesh (``replication/mesh.py``) and the signals. Start-up
order: restore the snapshot (under a new incarnation, see below), pull the
full state of every reachable peer region, start listening, start the mesh,
then serve until SIGTERM, SIGINT or SIGHUP (or until the supervisor's lifeline,
see :meth:`Node.run`, closes); shutdown stops accepting, lets in-flight
requests finish, sends what the mesh still has queued, and writes a final
snapshot.

SIGHUP is a graceful stop, not a reload. The rules loaded from a file carry
clock 0 and the stamp of this node's first load of their limits
(docs/design.md, "Config changes"): a restart with an edited file stamps it
anew, so it wins over the old file in every region and moves the restored
buckets to it. A restart is the explicit way to apply a file (and takes a new
incarnation, which the design reasons about); runtime changes go through
``PATCH /v1/buckets/{key}``, which replicates. Stopping gracefully is also
what a hang-up means when the terminal that started the node goes away:
nothing granted is lost, a final snapshot is written.

With a snapshot file, the node also keeps a write-ahead log of its own grants
(``storage/wal.py``; ``durability: relaxed`` survives kill -9, ``strict`` power loss):
start-up replays it over the snapshot, and every snapshot rotates it. A
snapshot is encoded in slices of ``SNAPSHOT_SLICE`` buckets with the event
loop running between them, so a million buckets neither stall decisions for
seconds nor need their whole encoding in memory at once. Such a snapshot is
"fuzzy" (buckets are captured at slightly different instants), which is sound
because the log segment started before the first slice holds every grant the
slices may have missed, and replay is a max-merge.

Replica identity is ``region/node/incarnation``. Every start takes a new
incarnation (one above the snapshot's, or the start time in ms when there is
no snapshot), so a restarted node can never reuse a ``used`` counter that its
previous life advanced past what the snapshot recorded: the old incarnation's
entries stay in the state as a peer's would, and nothing spent is granted
again (docs/design.md, replicas and restarts). Pulling the peers' state before listening is the
other half: what the previous incarnation spent and sent before a crash is
known again before the new one decides anything.

What those two steps loaded lives as long as the node, so a ``serve`` process then
moves it out of the garbage collector's generations (``gc.freeze``, in
:meth:`Node.run`; an embedded member leaves its host application's heap alone): a
full collection no longer walks a million restored buckets (0.4–0.6 s each at
1,000,000, docs/operations.md). Buckets made later (new keys, peers' deltas) are kept
out of the collector by the compiled core itself (core/heap.py); a ``serve`` process
measures the collector's pauses and paces its full collections (node/gcpacing.py).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from bucketmesh.api.routes import RatingApp, SyncView
from bucketmesh.core.decisions import Decider
from bucketmesh.core.limiter import Limiter
from bucketmesh.core.rules import Shadows
from bucketmesh.core.shares import SCALE
from bucketmesh.http import wire
from bucketmesh.http.idempotency import IdempotencyCache, IdempotencyLog
from bucketmesh.http.router import Router
from bucketmesh.http.server import HttpServer, Request, reserved_only
from bucketmesh.http.tls import sync_guard
from bucketmesh.node.gcpacing import GcPacer
from bucketmesh.node.reload import CHECK_EVERY_S, SecretFiles
from bucketmesh.node.settings import NodeSettings
from bucketmesh.replication.discovery import Discovery
from bucketmesh.replication.mesh import UP, Mesh, Replica
from bucketmesh.storage.memory import MemoryStore, UnreadableState
from bucketmesh.telemetry.audit import AuditLog, token_identity
from bucketmesh.telemetry.log import configure as configure_logging
from bucketmesh.telemetry.log import logger
from bucketmesh.telemetry.metrics import NodeMetrics
from bucketmesh.telemetry.outcomes import Outcomes
from bucketmesh.telemetry.tasks import Supervisor, cancel_and_wait

if TYPE_CHECKING:
    from bucketmesh.integrations.envoy import EnvoyServer
    from bucketmesh.storage.dynamodb import DynamoState
    from bucketmesh.storage.redis_backend import RedisBackend

SWEEP_INTERVAL_S = 0.25
REBALANCE_INTERVAL_S = 0.25  # strict shares' rebalancer (core/shares.py, docs/sync.md)
SWEEP_BUDGET = 20_000
#: A rule change over more live buckets than this moves them this many at a time, a
#: slice per turn of the loop (``Limiter.adopt_pending``): ~12 ms each, well under
#: ``limits.shedLag``, where a million at once stopped the node for 0.6 s.
ADOPTION_SLICE = 20_000
_NEVER_SHED_S = 10.0**9  # the reserved listener's shed_lag

log = logger("node")

#: The signals that stop a node gracefully, and what the log says about each.
STOP_SIGNALS: dict[signal.Signals, str] = {
    signal.SIGTERM: "SIGTERM: stopping gracefully",
    signal.SIGINT: "SIGINT: stopping gracefully",
    signal.SIGHUP: (
        "SIGHUP: stopping gracefully (a hang-up does not reload the configuration: "
        "restart the node to apply an edited file, PATCH /v1/buckets to change limits "
        "at runtime)"
    ),
}


class StartError(Exception):
    """The node cannot start (its state files cannot be opened, its port cannot be
    bound): the message says why, for the operator; not a bug."""


class Node:
    """A running node: a store behind the decision seam, the Rating API (and the
    Envoy service) in front of it, the sync mesh beside it, and background work."""

    def __init__(self, settings: NodeSettings, *, sync: SyncView | None = None) -> None:
        self.settings = settings
        self.backend: RedisBackend | None = None
        self.memory: MemoryStore | None = None
        # storage.snapshot: dynamodb://...: the state files mirrored in DynamoDB
        self.dynamo: DynamoState | None = None
        self.adoption_wake = asyncio.Event()  # rule changes queued (_adoption_loop)
        self.adoption_slices = 0
        #: the limiters whose rule changes ``_adoption_loop`` adopts in slices: the
        #: memory store's, or a Redis node's mirror and its ``local`` policy's buckets
        self.adopting: list[Limiter] = []
        self.metrics = NodeMetrics()
        self.share_pull_wanted = False  # a blind node's strict rights wait for a pull
        # Every background task runs under it: none can die silently (telemetry/tasks.py).
        self.supervisor = Supervisor(log)
        self.metrics.labelled.append(self.supervisor.metric_families)
        decider: Decider
        replica: Replica
        if settings.storage == "redis":
            from bucketmesh.storage.redis_backend import RedisBackend

            # The region's state lives in Redis; the mesh replicates this node's mirror.
            self.backend = RedisBackend(
                settings.rules,
                region=settings.region,
                node=settings.node,
                url=settings.redis_url,
                timeout_s=settings.redis_timeout_s,
                connections=settings.redis_connections,
                calls_in_flight=settings.redis_calls_in_flight,
                max_buckets=settings.max_buckets,
                regions=settings.regions,
                sync_interval_s=settings.sync.interval_s if settings.sync is not None else None,
            )
            self.backend.install(self.metrics)
            self._defer_rule_adoption(self.backend.mirror.limiter, self.backend.local)
            decider = self.backend
            replica = self.backend.mirror
        else:
            snapshot = self._restore_from_dynamodb(settings)
            try:
                self.memory = MemoryStore.open(
                    settings.rules,
                    region=settings.region,
                    node=settings.node,
                    snapshot=snapshot,
                    durability=settings.durability,
                    max_buckets=settings.max_buckets,
                    regions=settings.regions,
                )
            except UnreadableState as error:
                raise StartError(str(error)) from None
            except OSError as error:
                raise StartError(f"{settings.snapshot}: {error.strerror or error}") from None
            self._claim_in_dynamodb()
            self.memory.install(self.metrics)
            self._install_share_metrics(self.memory.limiter)
            self._defer_rule_adoption(self.memory.limiter)
            decider = self.memory
            replica = self.memory.replica()  # restores what the mesh reads first
        self.decider = decider
        # Idempotency-Key answers: in Redis for every node of the region, or beside the
        # snapshot so that a retry after a crash is not charged again (http/idempotency.py).
        if self.backend is not None:
            idempotency = IdempotencyCache(shared=self.backend.idempotency)
        elif self.memory is not None and self.memory.snapshot is not None:
            path = self.memory.snapshot.path
            idempotency = IdempotencyCache(
                log=IdempotencyLog(path.with_name(path.name + ".idempotency"))
            )
            idempotency.restore(time.monotonic())
        else:
            idempotency = IdempotencyCache()
        self.mesh = Mesh(replica, settings.sync) if settings.sync is not None else None
        if self.mesh is not None:
            # a grant on a quiet node is collected at once, not at the next interval
            self.limiter.on_dirty = self.mesh.dirtied
        self.discovery: Discovery | None = None
        if self.mesh is not None and settings.discovery is not None:
            # this region's other nodes from a headless Service's DNS (docs/scale.md)
            self.discovery = Discovery(
                self.mesh,
                settings.discovery,
                region=settings.region,
                node=settings.node,
                static=tuple(settings.static_peers),
            )
            self.discovery.install(self.metrics)
        if self.mesh is None and self.memory is not None:
            self.memory.limiter.keep_tombstones = False  # nothing will ever merge into it
        self.router = Router(self.metrics)
        self.audit = self._audit_log(settings)
        self.outcomes = Outcomes(
            self.metrics,
            shadows=Shadows(settings.rules, decider.shadowed),
            near_limit=settings.near_limit,
            audit=self.audit,
            region=settings.region,
            replica=decider.replica_id,
        )
        self.app = RatingApp(
            decider,
            region=settings.region,
            node=settings.node,
            cluster_id=settings.cluster_id,
            default_state_key=settings.default_state_key,
            admin_token=settings.admin_token,
            router=self.router,
            sync=sync if sync is not None else self.mesh,
            version=settings.version,
            ready=self.readiness,
            tasks=self.task_status,
            idempotency=idempotency,
            outcomes=self.outcomes,
        )
        if self.mesh is not None:
            self.mesh.install(self.router, self.app.admin)
            if self.audit is not None:
                self.mesh.faults.on_change = self._audit_fault
                self.mesh.audit = self.audit  # reconcile repairs (Mesh._record_repair)
        if settings.forward and self.mesh is not None:
            from bucketmesh.api.forward import Forwarder

            # affinity.forward: keys another node of the region owns go to it
            self.app.forwarder = Forwarder(
                self.app,
                self.mesh,
                region=settings.region,
                node=settings.node,
                timeout_s=settings.forward_timeout_s,
            )
            self.app.forwarder.install()
        self.secret_files = self._secret_files(settings)
        tls = settings.tls
        if tls is not None:
            self.router.metrics.labelled.append(tls.metric_families)
            if tls.files.client_auth != "none":
                regions = [settings.region, *(settings.sync.peers if settings.sync else ())]
                self.router.guard("sync", sync_guard(tls, regions))
        self.server = HttpServer(
            self.router,
            settings.limits,
            on_error=self._log_error,
            tls=tls if tls is not None and tls.files.serves else None,
        )
        self.admin_server = self._admin_server(settings)
        if self.mesh is not None:
            # a flooded node's sender, behind, gets the loop: decisions yield (R6)
            self.server.yield_to = self.mesh.backlogged
        for cause in self.server.shed:
            self.metrics.counter(
                f"bucketmesh_http_shed_{cause}_requests",
                f"Requests answered 503 + Retry-After by overload shedding ({cause})",
                functools.partial(self.server.shed.__getitem__, cause),
            )
        self.metrics.counter(
            "bucketmesh_http_shed_unparsed_requests",
            "Of the requests shed for loop lag, those answered 503 unparsed (the fast path)",
            lambda: self.server.shed_unparsed,
        )
        self.metrics.gauge(
            "bucketmesh_http_loop_lag_seconds",
            "Worst lateness of the event loop's 10 ms lag timer in the last whole second "
            "(shedding starts beyond limits.shedLag)",
            lambda: self.server.loop_lag,
        )
        self.envoy: EnvoyServer | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.stopping = asyncio.Event()
        self.started_ns = time.time_ns()  # this life began no later than this
        #: Why the node stops (a STOP_SIGNALS text, or the lifeline's), once it does.
        self.stop_reason: str | None = None
        self.serving = False

    def _check_strict_limits(self, settings: NodeSettings) -> None:
        """A StartError naming every strict limit recovered here (restored from the
        snapshot or the store, or pulled from a peer at start-up: set by a PATCH while
        the mesh had fewer regions) that cannot give each region one token: served,
        every request under it would be refused. Before the node listens."""
        short = self.limiter.strict_below_regions()
        if not short:
            return
        if settings.storage == "redis":
            where = "the region's Redis or a peer"
        elif settings.snapshot:
            where = f"{settings.snapshot} or a peer"
        else:
            where = "a peer's state at start-up"
        listed = _listed(short)
        raise StartError(
            f"strict limits recovered from {where} are below one token for each of the "
            f"{settings.regions} regions of sync.peers: {listed}; each region's share would "
            "hold 0 tokens and refuse every request. Raise their capacity to at least "
            f"{settings.regions} (PATCH /v1/buckets/<name> on a node of the current mesh) "
            "or make them shared before adding a region"
        )

    def _restore_from_dynamodb(self, settings: NodeSettings) -> str | None:
        """The snapshot path the store opens: the table's copy of the state files in a
        scratch directory when ``storage.snapshot`` is a dynamodb:// URI
        (storage/dynamodb.py; blocking, before the node serves anything)."""
        from bucketmesh.storage import dynamodb

        if not dynamodb.is_uri(settings.snapshot):
            return settings.snapshot
        assert settings.snapshot is not None
        try:
            self.dynamo = dynamodb.DynamoState.open(
                settings.snapshot, region=settings.region, node=settings.node
            )
            return str(self.dynamo.restore())
        except (dynamodb.DynamoError, OSError) as error:
            raise StartError(str(error)) from None

    def _claim_in_dynamodb(self) -> None:
        if self.dynamo is None or self.memory is None:
            return
        from bucketmesh.storage.dynamodb import DynamoError

        try:
            self.dynamo.claim(self.memory.limiter.replica_id)
        except DynamoError as error:
            self.memory.close()
            raise StartError(str(error)) from None
        self.dynamo.install(self.metrics)

    def _audit_log(self, settings: NodeSettings) -> AuditLog | None:
        """The audit trail (config ``audit:``), its counts exported; None when off."""
        if settings.audit_path is None:
            return None
        audit = AuditLog(
            settings.audit_path,
            buffer=settings.audit_buffer,
            max_bytes=settings.audit_max_bytes,
            backups=settings.audit_backups,
            sample=settings.audit_sample,
            hash_keys=settings.audit_hash_keys,
        )
        for name, doc, read in (
            ("written", "Audit events written", lambda: audit.written),
            ("dropped", "Audit events dropped: the buffer was full", lambda: audit.dropped),
            ("sampled_out", "Decisions the audit sampling left out", lambda: audit.sampled_out),
            (
                "write_errors",
                "Audit writes that failed (a lost batch)",
                lambda: audit.write_errors,
            ),
        ):
            self.metrics.counter(f"bucketmesh_audit_{name}_events", doc, read)
        return audit

    def _audit_fault(self, action: str, request: Request, old: object, new: object) -> None:
        """A fault injected or healed (``/v1/admin/faults``), recorded with who did it."""
        if self.audit is None:
            return
        authorization = request.headers.get("authorization", "")
        token = authorization[7:].strip() if authorization[:7].lower() == "bearer " else None
        self.audit.change(
            action,
            who=token_identity(token),
            old=old,
            new=new,
            region=self.settings.region,
            node=self.settings.node,
            request_id=request.headers.get("x-request-id"),
        )

    def _secret_files(self, settings: NodeSettings) -> SecretFiles:
        """Rotation: admin tokens and sync secrets, and the files read again on change."""
        files = SecretFiles()
        if settings.admin_tokens:
            self.app.admin.set_tokens(settings.admin_tokens)
        if settings.admin_token_file is not None:
            files.add("admin.tokenFile", settings.admin_token_file, self.app.admin.set_tokens)
        if self.mesh is not None and settings.sync_secret_file is not None:
            files.add("sync.secretFile", settings.sync_secret_file, self.mesh.auth.set_secrets)
        if files.watched:
            self.router.metrics.labelled.append(files.metric_families)
        return files

    @property
    def limiter(self) -> Limiter:
        """The in-memory replica the mesh reads and merges (the Redis mirror's limiter
        on a Redis node)."""
        if self.memory is not None:
            return self.memory.limiter
        assert self.backend is not None
        return self.backend.mirror.limiter

    def readiness(self) -> dict[str, str]:
        store = "ok"
        if self.backend is not None:
            store = self.backend.readiness()
        elif self.memory is not None and self.memory.wal is not None:
            store = self.memory.wal.readiness()
        config = "ok"
        short = self.limiter.strict_below_regions()
        if short:
            # arrived at runtime from a region of a smaller mesh (the start-up check
            # stops a node that holds one): every request under it is refused
            listed = _listed(short)
            config = (
                f"ok; warning: strict limits below one token for each of the "
                f"{self.settings.regions} regions, every request under them refused: {listed}"
            )
        return {
            "config": config,
            "store": store,
            "listener": "ok" if self.serving else "not listening",
            "tasks": self.supervisor.readiness(),
        }

    def task_status(self) -> dict[str, wire.TaskStatus]:
        """Every background task's state, for /v1/status."""
        supervisor = self.supervisor
        return {
            name: wire.TaskStatus(supervisor.state_of(name), state.failures, state.last_error)
            for name, state in sorted(supervisor.tasks.items())
        }

    def _admin_server(self, settings: NodeSettings) -> HttpServer | None:
        """The reserved listener (``adminListen``): the same routes, the reserved ones
        only (sync, admin, status, metrics, probes, PATCH), on a socket and connection
        cap of its own, so a flood of decisions on the main listener neither fills its
        accept queue nor takes its connections, and it is never shed."""
        if settings.admin_listen is None:
            return None
        tls = settings.tls
        return HttpServer(
            reserved_only(self.router),
            # never shed: what it serves is the traffic the main listener keeps a share for
            msgspec.structs.replace(settings.limits, shed_lag=_NEVER_SHED_S),
            on_error=self._log_error,
            tls=tls if tls is not None and tls.files.serves else None,
        )

    @staticmethod
    async def _listen(server: HttpServer, host: str, port: int, what: str = "") -> None:
        """Start ``server`` on host:port; a refusal is a StartError naming the address
        (and ``what``, the config key of a second listener)."""
        try:
            await server.start(host, port)
        except OSError as error:
            shown = f"[{host}]" if ":" in host else host
            named = f" ({what})" if what else ""
            raise StartError(
                f"cannot listen on {shown}:{port}{named}: {error.strerror or error}"
            ) from None

    @staticmethod
    def _log_error(error: BaseException) -> None:
        log.error("internal error: %r", error)

    async def start(self) -> None:
        if self.audit is not None:
            self.audit.start()
        if self.backend is not None:
            await self.backend.start(self.supervisor)
        if self.discovery is not None:
            await self.discovery.step()  # the region's nodes, before the start-up pull
        await self._recover_state()
        self._check_strict_limits(self.settings)
        await self._listen(self.server, self.settings.host, self.settings.port)
        if self.settings.admin_listen is not None:
            assert self.admin_server is not None
            await self._listen(self.admin_server, *self.settings.admin_listen, "adminListen")
        if self.settings.envoy_listen is not None:
            try:
                await self._start_envoy(*self.settings.envoy_listen)
            except OSError as error:
                # the Envoy server's own message names the address and envoyListen
                raise StartError(str(error)) from None
        self.serving = True
        supervisor = self.supervisor
        if self.mesh is not None:
            self.mesh.start(supervisor)
        if self.discovery is not None:
            discovery = self.discovery
            self.tasks.append(
                supervisor.every("sync-discovery", discovery.settings.interval_s, discovery.step)
            )
        self.tasks.append(supervisor.every("sweep", SWEEP_INTERVAL_S, self._sweep))
        if self.adopting:
            self.tasks.append(supervisor.run("rule-adoption", self._adoption_loop))
        if self.memory is not None and self.memory.restoring is not None:
            # the snapshot's partitions no request has asked for yet (storage/memory.py)
            self.tasks.append(supervisor.run("restore", self.memory.finish_restore))
        if self.memory is not None and self.memory.limiter.share_region is not None:
            self.tasks.append(
                supervisor.every("rebalance", REBALANCE_INTERVAL_S, self._rebalance_step)
            )
            if self.share_pull_wanted:
                self.tasks.append(supervisor.every("share-pull", 2.0, self._share_pull_step))
        if self.backend is not None and self.backend.shares is not None:
            self.tasks.append(
                supervisor.every("rebalance", REBALANCE_INTERVAL_S, self.backend.shares.step)
            )
        if self.secret_files.watched:
            self.tasks.append(
                supervisor.every("secret-files", CHECK_EVERY_S, self.secret_files.check)
            )
        if self.memory is not None and self.memory.snapshot is not None:
            # A failed snapshot (a full disk) is retried; the log keeps every grant meanwhile.
            interval = self.settings.snapshot_interval_s
            self.tasks.append(supervisor.every("snapshot", interval, self._snapshot_step))
        if self.dynamo is not None:
            # off every request's path: the table gets the log's new bytes and new snapshots
            self.tasks.append(
                supervisor.every("dynamodb", self.dynamo.interval_s, self.dynamo.checkpoint)
            )

    def _defer_rule_adoption(self, *limiters: Limiter) -> None:
        """Rule changes (a PATCH here, one merged from a peer, one another node of a
        Redis region put into Redis) over many buckets are adopted in slices by
        ``_adoption_loop`` instead of in one stop of the loop."""
        for limiter in limiters:
            limiter.defer_adoption_above = ADOPTION_SLICE
            limiter.on_adoption = self.adoption_wake.set
        self.adopting = list(limiters)
        self.metrics.gauge(
            "bucketmesh_rule_adoption_pending",
            "Keys still to visit for rule changes being adopted in slices (live buckets "
            "not yet on their rule's newest limits are among them)",
            lambda: sum(limiter.adoption_pending() for limiter in self.adopting),
        )
        self.metrics.counter(
            "bucketmesh_rule_adoption_slices",
            "Slices of rule changes adopted between turns of the event loop",
            lambda: self.adoption_slices,
        )

    async def _adoption_loop(self) -> None:
        """Moves the buckets of changed rules onto their new limits, ``ADOPTION_SLICE``
        keys per turn of the loop, whenever a limiter queued some."""
        wake = self.adoption_wake
        if any(limiter.adoption_pending() for limiter in self.adopting):
            wake.set()  # restarted by the supervisor with work queued
        while True:
            await wake.wait()
            wake.clear()
            for limiter in self.adopting:
                while limiter.adoption_pending():
                    limiter.adopt_pending(ADOPTION_SLICE)
                    self.adoption_slices += 1
                    await asyncio.sleep(0)

    async def _share_pull_step(self) -> None:
        """A blind node (no snapshot) that could not pull every region at start-up pulls
        again until it has: then it spends its strict rights again (core/shares.py)."""
        limiter = self.memory.limiter if self.memory is not None else None
        if limiter is None or self.mesh is None or not limiter.share_blind:
            return
        outcome = await self.mesh.pull_at_start(1.0)
        if set(outcome.pulled) >= set(self.mesh.peers):
            limiter.shares_pulled()

    async def _pull_peers(self) -> bool:
        """Pull every peer region's state now (a Redis region's strict-shares writer after
        Redis lost its data: storage/redis_backend.py); True when every one answered."""
        if self.mesh is None:
            return False
        outcome = await self.mesh.pull_at_start(1.0)
        return set(outcome.pulled) >= set(self.mesh.peers)

    def _peers_up(self) -> bool:
        """Every peer region is up: rights may move (never during a partition)."""
        mesh = self.mesh
        return mesh is not None and all(p.state == UP for p in mesh.peers.values())

    def _rebalance_step(self) -> None:
        """One round of strict mode's rebalancer; rights move only while every peer is
        up (during a partition every side keeps what it holds)."""
        assert self.memory is not None
        mesh = self.mesh
        limiter = self.memory.limiter
        connected = mesh is not None and all(p.state == UP for p in mesh.peers.values())
        gifts = limiter.rebalance(
            limiter.clock(), period_s=REBALANCE_INTERVAL_S, connected=connected
        )
        wal = self.memory.wal
        if gifts and wal is not None:
            # written ahead of the collector's send: a restart from the snapshot and
            # the log never spends rights it gave away
            wal.write_pending()

    def _install_share_metrics(self, limiter: Limiter) -> None:
        """Strict shares on /metrics: transfers, tokens handed over, rights held."""
        metrics = self.metrics
        metrics.counter(
            "bucketmesh_strict_share_transfers",
            "Gifts of strict rights this node made to other regions",
            lambda: limiter.share_gifts,
        )
        metrics.counter(
            "bucketmesh_strict_share_parts_given",
            "Strict rights given away, in parts of a limit (1.0 = one whole limit)",
            lambda: limiter.share_given_parts / SCALE,
        )
        metrics.counter(
            "bucketmesh_strict_share_tokens_given",
            "Tokens handed over with strict rights",
            lambda: limiter.share_given_tokens,
        )
        metrics.counter(
            "bucketmesh_strict_share_tokens_received",
            "Tokens handed over by other regions and credited here",
            lambda: limiter.share_received_tokens,
        )
        metrics.gauge(
            "bucketmesh_strict_share_utilisation",
            "Rights this region holds over the strict keys it has ledgers for, as a part of "
            "their global limits (mean over keys, 0..1)",
            lambda: limiter.share_utilisation(),
        )

    async def _recover_state(self) -> None:
        """Pull the peers' state; on a node that restored nothing (no snapshot), decide
        how its shared buckets start (docs/storage.md, "Starting without a snapshot")."""
        limiter = self.memory.limiter if self.memory is not None else None
        if limiter is not None and self.settings.snapshot is None:
            # Nothing says what a previous life of this node spent: every bucket counts
            # as empty at this start until a full bucket has refilled (strict and local
            # ones always; shared ones until the start-up pull reaches a peer; without a
            # mesh, memory only is a choice). docs/storage.md, "Starting without a snapshot".
            limiter.begin_recovery(self.started_ns, shared=self.mesh is not None)
        sync = self.settings.sync
        if limiter is not None and self.mesh is not None and sync is not None:
            # strict buckets spend the rights their slot holds (after begin_recovery: a
            # start without a snapshot is blind, core/shares.py); Redis keeps 1/regions
            limiter.enable_shares(self.settings.region, (self.settings.region, *sync.peers))
        if self.backend is not None and self.mesh is not None and sync is not None:
            # a Redis region in strict mode's rights ledger: its nodes share the
            # region's rights in Redis, and the one holding the lease rebalances
            self.backend.enable_shares(
                (self.settings.region, *sync.peers),
                self.backend.local.replica_id,
                self._peers_up,
                self._pull_peers,
            )
            self._install_share_metrics(self.backend.mirror.limiter)
        if self.mesh is None:
            return
        wait = None
        if limiter is not None and limiter.unknown_since is not None:
            # nothing restored: a silent peer is worth waiting for (a partition, or a peer
            # slow to answer), one that refuses is not (docs/sync.md, start-up)
            wait = max(self.mesh.settings.startup_pull_s, self.mesh.settings.unrecovered_wait_s)
            log.warning(
                "sync is enabled without storage.snapshot: what this node spent before a "
                "restart is known only to the peers it reached; strict and local buckets "
                "start empty and refill, and so do shared ones if no peer can be pulled"
            )
        outcome = await self.mesh.pull_at_start(wait)
        if limiter is not None and limiter.share_blind:
            if set(outcome.pulled) >= set(self.mesh.peers):
                limiter.shares_pulled()
            else:
                # strict rights stay at the floor until every region is pulled
                self.share_pull_wanted = True
        if limiter is None or limiter.gates is None:
            return
        if outcome.pulled or not outcome.silent or self.settings.sync is None:
            # a peer's state is merged, or every peer is down (nobody else holds what
            # this node's previous life sent: docs/sync.md)
            limiter.end_shared_recovery()
            return
        if self.settings.sync.unrecovered_start == "full":
            log.warning(
                "no peer answered the start-up pull (%s silent): serving full buckets "
                "(sync.unrecoveredStart: full)",
                ", ".join(outcome.silent),
            )
            limiter.end_shared_recovery()
            return
        # What its previous life spent behind the same silence is known to nobody, and a
        # peer pulled later knows only what it acknowledged: the gate stays until a full
        # bucket has refilled since this start.
        log.warning(
            "no peer answered the start-up pull (%s silent): for up to %.0f s, shared "
            "buckets this node creates refill from zero at its start "
            "(sync.unrecoveredStart: refill)",
            ", ".join(outcome.silent),
            (limiter.recovery_until - limiter.clock()) / 1e9,
        )

    async def _start_envoy(self, host: str, port: int) -> None:
        # imported here: h2 and protobuf are only loaded by nodes that serve Envoy
        from bucketmesh.integrations.envoy import EnvoyServer, RateLimitServicer

        self.envoy = EnvoyServer(
            RateLimitServicer(self.decider, self.metrics, outcomes=self.outcomes),
            host,
            port,
            tls=self.settings.tls,
        )
        await self.envoy.start()

    def _sweep(self) -> None:
        if self.backend is not None:
            self.backend.sweep(SWEEP_BUDGET)
        if self.memory is None:
            return
        limiter = self.memory.limiter
        limiter.expire_step(budget=SWEEP_BUDGET)
        if self.mesh is None:
            # No mesh drains the dirty set: left alone it would grow to one
            # entry per live bucket (about 36 bytes each at a million).
            limiter.dirty.clear()
            limiter.dirty_rules.clear()

    async def _snapshot_step(self) -> None:
        await self.save_snapshot()
        # the Idempotency-Key answers' file keeps only those still live
        self.app.idempotency.compact(self.app.monotonic())

    async def save_snapshot(self) -> None:
        if self.memory is not None:
            await self.memory.save_snapshot()

    async def stop(self, grace: float = 10.0) -> None:
        await cancel_and_wait(self.tasks)
        if self.envoy is not None:
            await self.envoy.stop(grace)
        await self.server.shutdown(grace)
        if self.admin_server is not None:
            await self.admin_server.shutdown(grace)
        self.serving = False
        if self.app.forwarder is not None:
            await self.app.forwarder.close()
        if self.mesh is not None:
            await self.mesh.stop()
        if self.backend is not None:
            await self.backend.stop()
        if self.memory is not None:
            try:
                await self.memory.save_snapshot()
            except OSError as error:
                # Nothing granted is lost: the write-ahead log still holds what the
                # last snapshot does not, and the next start replays it.
                log.error("final snapshot failed: %s; the write-ahead log keeps every grant", error)
            if self.dynamo is not None:
                try:
                    await self.dynamo.checkpoint()
                except Exception as error:  # logged: the table keeps its last checkpoint
                    log.error("final DynamoDB checkpoint failed: %s", error)
            self.memory.close()
        if self.audit is not None:
            self.audit.close()  # what is buffered is written before the node is gone

    def request_stop(self, reason: str) -> None:
        """Stop gracefully (once): what SIGTERM, SIGINT, SIGHUP and the lifeline do."""
        if self.stop_reason is None:
            self.stop_reason = reason
            log.info("%s", reason)
        self.stopping.set()

    def _watch_lifeline(self, fd: int) -> None:
        """Stop once ``fd`` (the read end of a pipe whose write end only the supervisor
        holds) reaches end of file: the supervisor is gone, however it died."""
        loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)

        def readable() -> None:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # anything written is ignored; only the end matters
                loop.remove_reader(fd)
                self.request_stop(
                    "the supervising process is gone (its lifeline closed): stopping gracefully"
                )

        loop.add_reader(fd, readable)

    async def run(
        self, on_ready: Callable[[Node], None] | None = None, *, lifeline: int | None = None
    ) -> None:
        """Serve until SIGTERM, SIGINT or SIGHUP, or until ``lifeline`` (an inherited
        pipe's read end) reaches end of file; then stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig, reason in STOP_SIGNALS.items():
            loop.add_signal_handler(sig, self.request_stop, reason)
        if lifeline is not None:
            self._watch_lifeline(lifeline)
        await self.start()
        # The bulk load is long-lived: full collections skip it (module doc). Here, not
        # in start(): an embedded member (embed.py) runs in an application's heap.
        gc.freeze()
        # the collector is the whole process's: only a serve process measures and paces it
        pacer = GcPacer()
        pacer.install()
        self.metrics.labelled.append(pacer.metrics)
        try:
            if on_ready is not None:
                on_ready(self)
            await self.stopping.wait()
            await self.stop()
        finally:
            pacer.remove()


def _listed(short: list[tuple[str, int]]) -> str:
    """Strict limits below one token per region, as the start-up error and readiness
    name them."""
    return ", ".join(f"{name!r} (capacity {capacity})" for name, capacity in short)


def run_node(
    settings: NodeSettings,
    on_ready: Callable[[Node], None] | None = None,
    *,
    lifeline: int | None = None,
) -> None:
    """Run a node until SIGTERM, SIGINT or SIGHUP (or the end of ``lifeline``), on
    uvloop when available. Raises StartError when it cannot start."""
    configure_logging()

    async def main() -> None:
        await Node(settings).run(on_ready, lifeline=lifeline)

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        asyncio.run(main())
    else:
        uvloop.run(main())


__all__ = ["STOP_SIGNALS", "Node", "NodeSettings", "StartError", "run_node"]
