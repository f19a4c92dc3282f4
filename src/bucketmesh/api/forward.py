"""Forwarding a key to the node of the region that owns it (``affinity.forward``).

In a region of several nodes on the embedded store (slots ``<region>.<node>``,
docs/scale.md) every node can decide every key; key affinity makes each key's
decisions land on one node per region, which keeps concurrent over-admission at one
region's. The SDK routes by the MurmurHash3 ring (core/affinity.py) itself; a
client that does not (curl, another language, a plain load balancer) reaches any
node. With ``affinity.forward: true`` that node sends a key some other node of its
region owns to the owner, and relays the owner's answer:

- the ring is over the node *names* of the region: this node's and those of every
  peer slot ``<region>.<name>`` the mesh knows (static or discovered, so it follows
  ``sync.discovery``); the owner's URL is its sync URL (the API's port);
- the forwarded request is the decision itself, ``POST /v1/rate {"key", "rule",
  "tokens"}`` (the key already rendered here, so the owner needs none of the
  original headers, query or client address), marked ``X-Bucketmesh-Forwarded:
  <this slot>``; a request carrying that header is always decided where it lands,
  so nothing is forwarded twice and no loop can form;
- **decided here instead** (and counted, ``bucketmesh_forward_fallbacks_total{reason}``)
  when the owner is down in the mesh, does not answer within ``forwardTimeout`` ms
  (default 200), answers 5xx, or cannot be reached. A timed-out request may have
  been decided by the owner too: that request alone is charged twice, at worst;
- **Idempotency-Key**: the forwarded request carries this node's cache key of the
  original request (path, key header, client address, query, the rule's headers,
  body: ``http/idempotency.py``) as its Idempotency-Key, and the owner uses it as
  its cache key, so copies of one request forwarded by different nodes of the region
  are decided once by the owner; the owner's answer is also kept here, so a retry
  to this node is answered from it even when the owner is gone;
- batches (``/v1/rate/batch``) are decided here: their keys span owners.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

import httpx
import msgspec
from prometheus_client.core import CounterMetricFamily, Metric

from bucketmesh.core.affinity import Ring
from bucketmesh.http.idempotency import CacheKey, replayed
from bucketmesh.http.server import Request, Response
from bucketmesh.replication.mesh import DOWN, Mesh
from bucketmesh.telemetry.log import logger

if TYPE_CHECKING:
    from bucketmesh.api.routes import RatingApp

log = logger("forward")

#: The header that marks a forwarded request (its value: the forwarding slot).
FORWARDED: Final = "x-bucketmesh-forwarded"
#: Why a request for another node's key was decided here.
FALLBACKS: Final = ("owner_down", "timeout", "unreachable", "owner_error")
#: The response headers of a decision relayed to the client.
_RELAYED: Final = ("retry-after", "content-type", "idempotent-replayed")
_RELAYED_PREFIXES: Final = ("x-ratelimit", "ratelimit", "x-bucketmesh")


class Forwarder:
    """Forwards each key this node does not own to its owner (see the module docstring)."""

    def __init__(
        self, app: RatingApp, mesh: Mesh, *, region: str, node: str, timeout_s: float
    ) -> None:
        self.app = app
        self.mesh = mesh
        self.slot = region
        self.node = node
        self.prefix = region[: -len(node) - 1] + "." if region.endswith("." + node) else None
        self.timeout_s = timeout_s
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )
        self._ring: Ring | None = None
        self._members: frozenset[str] = frozenset()
        self._urls: dict[str, str] = {}
        self.forwarded = 0
        self.received = 0
        self.fallbacks: dict[str, int] = dict.fromkeys(FALLBACKS, 0)
        self._encoder = msgspec.json.Encoder()

    def install(self) -> None:
        metrics = self.app.metrics
        metrics.counter(
            "bucketmesh_forwarded_requests",
            "Decisions of keys another node of the region owns, decided by that owner",
            lambda: self.forwarded,
        )
        metrics.counter(
            "bucketmesh_forward_received_requests",
            "Forwarded decisions this node made as the key's owner",
            lambda: self.received,
        )
        metrics.labelled.append(self._families)

    def _families(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "bucketmesh_forward_fallbacks",
            "Decisions of keys another node owns that were made here instead, by reason",
            labels=["reason"],
        )
        for reason, count in self.fallbacks.items():
            family.add_metric([reason], count)
        yield family

    async def close(self) -> None:
        await self.client.aclose()

    # -- the ring ----------------------------------------------------------------

    def ring(self) -> Ring | None:
        """The region's ring as the mesh knows it now (None: this node alone)."""
        prefix = self.prefix
        if prefix is None:
            return None
        urls = {
            slot[len(prefix) :]: peer.url
            for slot, peer in self.mesh.peers.items()
            if slot.startswith(prefix) and "." not in slot[len(prefix) :]
        }
        members = frozenset((*urls, self.node))
        if members != self._members:
            self._members = members
            self._ring = Ring(members) if len(members) > 1 else None
        self._urls = urls
        return self._ring

    def owner(self, key: str) -> str | None:
        """The node that owns ``key``, if another one than this; else None."""
        ring = self.ring()
        if ring is None:
            return None
        owner = ring.owner(key)
        return None if owner == self.node else owner

    # -- the hooks (api/routes.py) -------------------------------------------------

    def received_key(self, request: Request, cache_key: CacheKey | None) -> CacheKey | None:
        """A forwarded request's cache key is the one the forwarding node computed for
        the original request (its Idempotency-Key, in hex)."""
        if cache_key is None or FORWARDED not in request.headers:
            return cache_key
        value = request.headers.get("idempotency-key", "")
        try:
            carried = bytes.fromhex(value)
        except ValueError:
            return cache_key
        return carried if len(carried) == len(cache_key) else cache_key

    def forward(
        self,
        request: Request,
        key: str,
        rule: str | None,
        tokens: int,
        cache_key: CacheKey | None,
    ) -> asyncio.Future[Response] | None:
        """The owner's answer to come, or None to decide here (this node owns the key,
        or the request was forwarded to it)."""
        if FORWARDED in request.headers:
            self.received += 1
            return None
        owner = self.owner(key)
        if owner is None:
            return None
        peer = self.mesh.peers.get(self.prefix + owner if self.prefix else owner)
        if peer is None or peer.state == DOWN:
            self.fallbacks["owner_down"] += 1
            return None
        return asyncio.ensure_future(self._send(peer.url, request, key, rule, tokens, cache_key))

    async def _send(
        self,
        url: str,
        request: Request,
        key: str,
        rule: str | None,
        tokens: int,
        cache_key: CacheKey | None,
    ) -> Response:
        headers = {"content-type": "application/json", FORWARDED: self.slot}
        if cache_key is not None:
            headers["idempotency-key"] = cache_key.hex()
        body = self._encoder.encode({"key": key, "rule": rule, "tokens": tokens})
        started = time.monotonic()
        reason: str | None = None
        try:
            answer = await self.client.post(
                url.rstrip("/") + "/v1/rate", content=body, headers=headers
            )
        except httpx.TimeoutException:
            reason = "timeout"
        except httpx.HTTPError:
            reason = "unreachable"
        else:
            if answer.status_code < 500:
                self.forwarded += 1
                relayed = [
                    (name, value)
                    for name, value in answer.headers.items()
                    if name in _RELAYED or name.startswith(_RELAYED_PREFIXES)
                ]
                response = Response(
                    answer.status_code,
                    answer.content,
                    answer.headers.get("content-type", "application/json"),
                    relayed,
                )
                if cache_key is not None and answer.status_code in (200, 429):
                    # a retry to this node is answered from here, even with the owner gone
                    now = self.app.monotonic()
                    self.app.idempotency.put(cache_key, replayed(response), now)
                    self.app.idempotency.persist(cache_key, now)
                return response
            reason = "owner_error"
        self.fallbacks[reason] += 1
        log.debug(
            "forwarding %r to %s: %s after %.0f ms; deciding here",
            key,
            url,
            reason,
            (time.monotonic() - started) * 1000,
        )
        return await self._decide_here(request, key, rule, tokens, cache_key)

    async def _decide_here(
        self,
        request: Request,
        key: str,
        rule: str | None,
        tokens: int,
        cache_key: CacheKey | None,
    ) -> Response:
        answer = self.app.decide_here(request, key, rule, tokens, cache_key)
        if isinstance(answer, Response):
            return answer
        return await answer


__all__ = ["FALLBACKS", "FORWARDED", "Forwarder"]
