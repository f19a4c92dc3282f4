"""In-process members of the mesh: a Python process that decides on its own replica of
every bucket, in microseconds, and shares those buckets with the regional nodes,
the other regions and its sibling worker processes — without Redis.

A member is a whole bucketmesh node (``node/serve.py``: the in-memory store, the
sync mesh with its HMAC-signed deltas, digests and start-up pull, the HTTP
endpoints) run on the application's own event loop, with the application deciding
through its store directly instead of over HTTP. It joins the mesh as a replica of
its own: a **slot** of the mesh's config, a peer region named ``<region>.<name>``
(``us-east-1.w0``) with its URL in ``sync.peerUrls``. The regional nodes list the
slots among their peers like any region; a member loads the same config file,
claims the first slot whose address it can listen on (so N worker processes take
N slots, each exactly one), and replicates with every other replica, nodes and
siblings alike. Every start is a new incarnation (``region/node/incarnation``), as
a restarted node is; ``stop()`` flushes the member's last deltas to its peers
before it returns.

Over-admission is the mesh's (docs/design.md section 3, README "The model"): a
slot is a replica like a region, so with ``R`` regions and ``W`` member slots the
bound while connected is ``(R + W − 1) × (capacity + refillRate × d)`` for a sync
delay ``d``; ``strict`` rules split the capacity over ``R + W`` replicas, and
``local`` rules give each slot a bucket of its own. Use ``shared`` rules (the
default) to share limits across workers.

::

    member = Member("bucketmesh.yaml")         # the nodes' config, slots included
    app = member.asgi(my_asgi_app)             # RateLimitMiddleware on the member, and
                                               # the member started / stopped by lifespan
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import msgspec

from bucketmesh.core.decisions import Decider
from bucketmesh.integrations.asgi import RateLimitMiddleware
from bucketmesh.node.assemble import load, node_settings
from bucketmesh.node.config import Config, ConfigError
from bucketmesh.node.serve import Node, StartError
from bucketmesh.telemetry.log import logger

log = logger("embed")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class NoFreeSlot(RuntimeError):
    """Every slot of the config is taken (or cannot be listened on) by another process."""


def slots_of(config: Config) -> list[str]:
    """The member slots of a config: peers named ``<region>.<name>`` that have a URL."""
    prefix = config.region + "."
    return [
        peer
        for peer in config.sync.peers
        if peer.startswith(prefix) and config.sync.url_for(peer) is not None
    ]


def _listen_of(path: str, slot: str, url: str) -> str:
    split = urlsplit(url)
    try:
        port = split.port
    except ValueError:
        port = None
    if split.scheme != "http" or not split.hostname or port is None:
        raise ConfigError(
            path,
            f"sync.peerUrls.{slot}",
            f"a member slot's URL must be http://host:port, got {url!r}",
        )
    host = split.hostname
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Member:
    """One process's replica in the mesh (see the module's docstring).

    ``config`` is the path of the nodes' config file (``BUCKETMESH_*`` variables
    apply, as for ``bucketmesh serve``: the sync secret usually comes from
    ``BUCKETMESH_SYNC_SECRET``). ``slots`` are the slot names to claim from, in
    order (default: every ``<region>.<name>`` peer). ``node`` names this process's
    replica within its slot (default ``embedded-<pid>``).
    """

    def __init__(
        self,
        config: str,
        *,
        slots: Sequence[str] | None = None,
        node: str | None = None,
    ) -> None:
        self.config = load(config, {})
        if not self.config.sync.enabled:
            raise ConfigError(config, "sync.enabled", "must be true for an embedded member")
        found = slots_of(self.config)
        self.slots = list(slots) if slots is not None else found
        unknown = [slot for slot in self.slots if slot not in found]
        if unknown:
            raise ConfigError(
                config,
                "sync.peers",
                f"slot {unknown[0]!r} is not a peer named {self.config.region}.<name> "
                "with a URL in sync.peerUrls",
            )
        if not self.slots:
            raise ConfigError(
                config,
                "sync.peers",
                f"no member slots: list peers named {self.config.region}.<name>, "
                "each with a URL in sync.peerUrls",
            )
        self.path = config
        self.node_name = node or f"embedded-{os.getpid()}"
        self.node: Node | None = None
        self.slot: str | None = None

    def _config_for(self, slot: str) -> Config:
        url = self.config.sync.url_for(slot)
        assert url is not None
        storage = msgspec.structs.replace(self.config.storage, backend="memory", snapshot=None)
        return msgspec.structs.replace(
            self.config,
            region=slot,
            node=self.node_name,
            listen=_listen_of(self.path, slot, url),
            storage=storage,
            envoy_listen=None,
            admin_listen=None,
        )

    async def start(self) -> None:
        """Claim a slot, pull the mesh's state, listen on the slot's address, and
        start replicating. Raises ``NoFreeSlot`` when every slot is taken."""
        if self.node is not None:
            return
        refused: list[str] = []
        for slot in self.slots:
            node = Node(node_settings(self._config_for(slot)))
            try:
                await node.start()
            except StartError as error:
                refused.append(f"{slot}: {error}")
                await node.stop(grace=0)
                continue
            self.node, self.slot = node, slot
            log.info("embedded member %s joined the mesh as slot %s", node.limiter.replica_id, slot)
            return
        raise NoFreeSlot("no free member slot: " + "; ".join(refused))

    async def stop(self) -> None:
        """Stop deciding, flush this replica's last deltas to its peers, and close."""
        node, self.node = self.node, None
        if node is not None:
            await node.stop()

    @property
    def decider(self) -> Decider:
        """What decides in this process (for ``RateLimitMiddleware`` or direct use)."""
        if self.node is None:
            raise RuntimeError("the member is not started (await member.start())")
        return self.node.decider

    @property
    def replica_id(self) -> str:
        return self.node.limiter.replica_id if self.node is not None else ""

    def asgi(self, app: ASGIApp, **middleware: Any) -> ASGIApp:
        """``app`` behind ``RateLimitMiddleware`` deciding on this member, with the
        member started at lifespan startup, before the app's own startup, and stopped
        (flushed) at shutdown, after the app's own shutdown: the lifespan messages go on
        to ``app`` (an app that does not speak the lifespan protocol is left out of it).
        ``middleware`` are ``RateLimitMiddleware``'s keyword arguments; a bad one fails
        the startup with its message and leaves the member stopped."""
        member = self
        middleware.setdefault("region", self.config.region)  # the region, not the slot
        limited: list[ASGIApp] = []

        async def start() -> str | None:
            """Start the member and the middleware; why not, or None."""
            try:
                await member.start()
            except (NoFreeSlot, ConfigError) as error:
                return str(error)
            try:
                limited.append(RateLimitMiddleware(app, member.decider, **middleware))
            except (TypeError, ValueError) as error:
                await member.stop()
                return f"RateLimitMiddleware: {error}"
            return None

        async def lifespan(scope: Scope, receive: Receive, send: Send) -> None:
            startup = await receive()
            failed = await start()
            if failed is not None:
                await send({"type": "lifespan.startup.failed", "message": failed})
                return
            app_lifespan = _AppLifespan(app, scope)
            answer = await app_lifespan.ask(startup)
            if answer is not None and answer["type"] == "lifespan.startup.failed":
                await member.stop()
                await send(answer)
                return
            await send({"type": "lifespan.startup.complete"})
            shutdown = await receive()
            answer = await app_lifespan.ask(shutdown)
            await member.stop()
            if answer is not None and answer["type"] == "lifespan.shutdown.failed":
                await send(answer)
            else:
                await send({"type": "lifespan.shutdown.complete"})

        async def serve(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "lifespan":
                await lifespan(scope, receive, send)
            elif limited:
                await limited[0](scope, receive, send)
            else:  # served without lifespan: the member cannot have started
                raise RuntimeError(
                    "an embedded member needs the ASGI lifespan (uvicorn --lifespan on)"
                )

        return serve


class _AppLifespan:
    """The wrapped app's own lifespan, run as a task and fed one message at a time.
    An app that raises on a lifespan scope, or returns, before answering does not speak
    the protocol (as ASGI servers treat it): it is left out, its answers taken as given."""

    def __init__(self, app: ASGIApp, scope: Scope) -> None:
        self.inbox: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.app = app
        self.scope = scope

    async def ask(self, message: MutableMapping[str, Any]) -> MutableMapping[str, Any] | None:
        """Give ``message`` to the app; its answer, or None once it is out of it."""
        if self.task is None:
            self.task = asyncio.ensure_future(self._run())
        elif self.task.done():
            return None
        await self.inbox.put(message)
        answer = asyncio.ensure_future(self.outbox.get())
        await asyncio.wait({answer, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if answer.done():
            return answer.result()
        answer.cancel()
        return None

    async def _run(self) -> None:
        async def receive() -> MutableMapping[str, Any]:
            return await self.inbox.get()

        async def send(message: MutableMapping[str, Any]) -> None:
            await self.outbox.put(message)

        with contextlib.suppress(Exception):  # an app without lifespan support
            await self.app(dict(self.scope), receive, send)


__all__ = ["Member", "NoFreeSlot", "slots_of"]
