"""Injected sync faults: ``/v1/admin/faults``, partitions rehearsed without iptables.

An operator (or ``bucketmesh xr``) tells a node to drop its sync traffic to
and from named peer regions for N seconds. The node then behaves as if the
network between them were cut: its requests to those peers fail (so they go
``down`` after ``peerTimeout`` and, with none left, the node is
``local_only``), and their requests to it are refused with 503 before
anything is merged. The fault expires by itself: every check compares the
deadline with the monotonic clock, so there is no timer to lose and a node
heals even if the operator's tool died mid-scenario. Decisions are never
affected — only sync.

Endpoints (admin token required; with no ``admin.token`` configured the
endpoints refuse everything, since fault injection on an unauthenticated node
would let anyone partition it):

- ``POST /v1/admin/faults`` ``{"peers": ["eu-central-1"], "seconds": 30,
  "direction": "both"}`` → the active faults.
- ``GET /v1/admin/faults`` → the active faults.
- ``DELETE /v1/admin/faults`` → heal now.

Metrics: ``bucketmesh_sync_fault_active{peer}`` (1 while a fault drops that
peer's traffic) and ``bucketmesh_sync_fault_dropped_total{peer,direction}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from typing import Any, Literal

import msgspec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from bucketmesh.http.auth import AdminAuth
from bucketmesh.http.errors import JSON, bad_request, body_error, require_json
from bucketmesh.http.router import Router
from bucketmesh.http.server import Request, Response
from bucketmesh.http.wire import ActiveFault, FaultList, FaultRequest
from bucketmesh.http.wire import FaultDirection as Direction

PATH = "/v1/admin/faults"
MAX_FAULT_S = 24 * 3600.0


class SyncFaults:
    """Which peers' sync traffic this node drops, and until when (monotonic seconds)."""

    def __init__(
        self, peers: Collection[str], *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.peers = sorted(peers)
        self.monotonic = monotonic
        self.until: dict[tuple[str, str], float] = {}
        self.dropped: dict[tuple[str, str], int] = {}
        #: told of every change by the endpoint: (action, request, old, new) (the audit trail)
        self.on_change: Callable[[str, Request, Any, Any], None] | None = None

    def drop(self, peers: Collection[str], seconds: float, direction: Direction) -> None:
        until = self.monotonic() + seconds
        directions = ("outbound", "inbound") if direction == "both" else (direction,)
        for peer in peers:
            for way in directions:
                self.until[(peer, way)] = until

    def heal(self) -> None:
        self.until.clear()

    def _active(self, peer: str, way: str) -> bool:
        until = self.until.get((peer, way))
        if until is None:
            return False
        if until <= self.monotonic():
            del self.until[(peer, way)]
            return False
        return True

    def blocks(self, peer: str, way: Literal["outbound", "inbound"]) -> bool:
        """Whether sync traffic with ``peer`` that way is dropped now (and count it)."""
        if not self.until or not self._active(peer, way):
            return False
        self.dropped[(peer, way)] = self.dropped.get((peer, way), 0) + 1
        return True

    def active(self) -> list[ActiveFault]:
        now = self.monotonic()
        found: dict[str, tuple[set[str], float]] = {}
        for (peer, way), until in list(self.until.items()):
            if until <= now:
                del self.until[(peer, way)]
                continue
            ways, remaining = found.get(peer, (set(), 0.0))
            found[peer] = (ways | {way}, max(remaining, until - now))
        return [
            ActiveFault(
                peer,
                "both" if len(ways) == 2 else next(iter(ways)),  # type: ignore[arg-type]
                round(remaining, 3),
            )
            for peer, (ways, remaining) in sorted(found.items())
        ]

    def metric_families(self) -> Iterator[Metric]:
        active = {fault.peer for fault in self.active()}
        gauge = GaugeMetricFamily(
            "bucketmesh_sync_fault_active",
            "1 while an injected fault (/v1/admin/faults) drops sync traffic with the peer",
            labels=["peer"],
        )
        for peer in self.peers:
            gauge.add_metric([peer], float(peer in active))
        yield gauge
        dropped = CounterMetricFamily(
            "bucketmesh_sync_fault_dropped",
            "Sync requests dropped by an injected fault, by peer and direction",
            labels=["peer", "direction"],
        )
        for (peer, way), n in sorted(self.dropped.items()):
            dropped.add_metric([peer, way], n)
        yield dropped


class FaultEndpoint:
    """The ``/v1/admin/faults`` handlers of one node."""

    def __init__(self, router: Router, admin: AdminAuth, faults: SyncFaults, region: str) -> None:
        self.router = router
        self.admin = admin
        self.faults = faults
        self.region = region
        self.decoder = msgspec.json.Decoder(FaultRequest)

    def install(self) -> None:
        self.router.add_route("POST", PATH, "admin_faults", self.post)
        self.router.add_route("GET", PATH, "admin_faults", self.get)
        self.router.add_route("DELETE", PATH, "admin_faults", self.delete)
        self.router.metrics.labelled.append(self.faults.metric_families)

    def _authorize(self, request: Request) -> None:
        self.admin.require(request, always="fault injection")

    def _list(self) -> Response:
        body = FaultList(self.region, self.faults.active())
        return Response(200, msgspec.json.encode(body), JSON)

    def post(self, request: Request) -> Response:
        self._authorize(request)
        require_json(request)
        try:
            fault = self.decoder.decode(request.body)
        except (msgspec.ValidationError, msgspec.DecodeError) as error:
            raise body_error(error, request.body) from None
        if not fault.peers:
            raise bad_request("name at least one peer region", "peers")
        for i, peer in enumerate(fault.peers):
            if peer not in self.faults.peers:
                known = ", ".join(self.faults.peers) or "none"
                raise bad_request(
                    f"{peer!r} is not a peer region of this node ({known})", f"peers[{i}]"
                )
        if not 0 < fault.seconds <= MAX_FAULT_S:
            raise bad_request(f"seconds must be > 0 and <= {MAX_FAULT_S:g}", "seconds")
        old = self.faults.active()
        self.faults.drop(fault.peers, fault.seconds, fault.direction)
        self._changed("fault", request, old)
        return self._list()

    def _changed(self, action: str, request: Request, old: list[ActiveFault]) -> None:
        if self.faults.on_change is not None:
            new = self.faults.active()
            self.faults.on_change(
                action, request, msgspec.to_builtins(old), msgspec.to_builtins(new)
            )

    def get(self, request: Request) -> Response:
        self._authorize(request)
        return self._list()

    def delete(self, request: Request) -> Response:
        self._authorize(request)
        old = self.faults.active()
        self.faults.heal()
        self._changed("fault-heal", request, old)
        return self._list()
