"""A region's nodes found in the DNS of a Kubernetes headless Service (``sync.discovery``).

Each node of a region on the embedded store is a slot of the mesh, ``<region>.<node>``
(docs/scale.md). With a StatefulSet behind a headless Service, Kubernetes' DNS
publishes one SRV record per pod for each named port of the Service:

    _http._tcp.bucketmesh-headless.ns.svc.cluster.local
        SRV 0 33 8080 bucketmesh-1.bucketmesh-headless.ns.svc.cluster.local.

and an A record for each target, the pod's current address. ``Discovery.step``
resolves them and makes the mesh's peers follow: a target's first label is the pod
(``bucketmesh-1``), hence the slot ``<region>.bucketmesh-1`` where ``<region>`` is
this node's slot without its own node name; the URL is ``<scheme>://<address>:<port>``.

- a slot found for the first time becomes a peer (``Mesh.add_peer``): its senders
  start and its first contact gets this node's full state;
- a slot whose address or port changed (a rescheduled pod) is replaced by one at
  the new URL (no restart of anything);
- a slot no longer published (scaled down) stops being a peer (``Mesh.remove_peer``);
- peers listed in ``sync.peers`` (other regions, or a static list of this region's
  slots) are never touched, and this node's own slot is skipped.

A DNS failure (timeout, SERVFAIL, no server) changes nothing: the peers found last
time stay, the failure is logged (once per streak) and counted
(``bucketmesh_discovery_failures_total``), and the node keeps deciding. An answer that
the name does not exist or has no records is an answer: no other node is published.

The resolver is the system's (``/etc/resolv.conf``: the cluster's DNS in a pod) unless
``resolver`` names a server (``host:port``; the tests run one on loopback).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from bucketmesh.replication.mesh import Mesh
from bucketmesh.telemetry.log import logger
from bucketmesh.telemetry.metrics import NodeMetrics

log = logger("discovery")

#: How long one resolution may take, at most (each query, all tries included).
RESOLVE_TIMEOUT_S: Final = 2.0


@dataclass(frozen=True)
class DiscoverySettings:
    """``sync.discovery`` of the config (node/config.py, ``DiscoveryConfig``)."""

    dns: str
    port_name: str = "http"
    interval_s: float = 5.0
    #: ``(host, port)`` of the DNS server to ask; None: the system's resolver
    resolver: tuple[str, int] | None = None
    scheme: str = "http"

    @property
    def srv_name(self) -> str:
        return f"_{self.port_name}._tcp.{self.dns.rstrip('.')}."


class Discovery:
    """Keeps the mesh's peers of this region equal to what the DNS publishes."""

    def __init__(
        self,
        mesh: Mesh,
        settings: DiscoverySettings,
        *,
        region: str,
        node: str,
        static: tuple[str, ...] = (),
        log: logging.Logger = log,
    ) -> None:
        if not region.endswith("." + node):
            raise ValueError(f"region {region!r} is not a slot <region>.{node}")
        self.mesh = mesh
        self.settings = settings
        self.slot = region
        self.prefix = region[: -len(node) - 1]
        self.static = frozenset(static)
        self.log = log
        resolver = dns.asyncresolver.Resolver(configure=settings.resolver is None)
        if settings.resolver is not None:
            resolver.nameservers = [settings.resolver[0]]
            resolver.port = settings.resolver[1]
        resolver.lifetime = RESOLVE_TIMEOUT_S
        resolver.timeout = RESOLVE_TIMEOUT_S / 2
        self.resolver = resolver
        #: slot → URL of every peer this discovery added
        self.found: dict[str, str] = {}
        self.resolutions = 0
        self.failures = 0
        self.streak = 0
        self.last_error: str | None = None

    def install(self, metrics: NodeMetrics) -> None:
        metrics.counter(
            "bucketmesh_discovery_resolutions",
            "DNS resolutions of sync.discovery that were answered",
            lambda: self.resolutions,
        )
        metrics.counter(
            "bucketmesh_discovery_failures",
            "DNS resolutions of sync.discovery that failed (the peers found before stay)",
            lambda: self.failures,
        )
        metrics.gauge(
            "bucketmesh_discovery_peers",
            "Peers of this region found in the DNS (sync.discovery)",
            lambda: float(len(self.found)),
        )

    async def resolve(self) -> dict[str, str]:
        """Slot → URL of every node the DNS publishes (this one excluded). Raises
        ``dns.exception.DNSException`` when the DNS does not answer."""
        try:
            answer = await self.resolver.resolve(
                self.settings.srv_name, dns.rdatatype.SRV, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return {}
        rrset = answer.rrset
        if rrset is None:
            return {}
        # addresses the server gave along (Kubernetes does), else asked for
        addresses: dict[dns.name.Name, str] = {}
        for extra in answer.response.additional:
            if extra.rdtype == dns.rdatatype.A and len(extra):
                addresses[extra.name] = next(iter(extra)).address
        found: dict[str, str] = {}
        for record in sorted(rrset, key=lambda r: (r.target.to_text(), r.port)):
            target = record.target
            pod = target.labels[0].decode("ascii", "replace") if target.labels else ""
            if not pod:
                continue
            slot = f"{self.prefix}.{pod}"
            if slot == self.slot or slot in self.static:
                continue
            address = addresses.get(target)
            if address is None:
                address = await self._address(target)
                if address is None:
                    continue  # published without an address yet: next time
            host = f"[{address}]" if ":" in address else address
            found[slot] = f"{self.settings.scheme}://{host}:{record.port}"
        return found

    async def _address(self, target: dns.name.Name) -> str | None:
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                answer = await self.resolver.resolve(target, rdtype, raise_on_no_answer=False)
            except dns.resolver.NXDOMAIN:
                return None
            if answer.rrset is not None and len(answer.rrset):
                return str(next(iter(answer.rrset)).address)
        return None

    async def step(self) -> None:
        """Resolve once and make the mesh's discovered peers what the DNS says."""
        try:
            found = await self.resolve()
        except dns.exception.DNSException as error:
            self.failures += 1
            self.streak += 1
            self.last_error = f"{type(error).__name__}: {error}"
            if self.streak == 1:
                self.log.warning(
                    "sync.discovery: resolving %s failed (%s); keeping the %d peer(s) found before",
                    self.settings.srv_name,
                    self.last_error,
                    len(self.found),
                )
            return
        if self.streak:
            self.log.info("sync.discovery: %s resolves again", self.settings.srv_name)
        self.streak = 0
        self.resolutions += 1
        await self.apply(found)

    async def apply(self, found: Mapping[str, str]) -> None:
        for slot, url in list(self.found.items()):
            if found.get(slot) != url:
                await self.mesh.remove_peer(slot)
                del self.found[slot]
                if slot in found:
                    self.log.info("sync.discovery: %s moved from %s", slot, url)
                else:
                    self.log.info("sync.discovery: %s is gone (%s)", slot, url)
        for slot, url in sorted(found.items()):
            if slot in self.found or slot in self.mesh.peers:
                continue
            self.mesh.add_peer(slot, url)
            self.found[slot] = url
            self.log.info("sync.discovery: found %s at %s", slot, url)


__all__ = ["RESOLVE_TIMEOUT_S", "Discovery", "DiscoverySettings"]
