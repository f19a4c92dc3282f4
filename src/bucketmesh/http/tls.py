"""TLS for a node: the listener's and the sync client's ``SSLContext`` built from
certificate files, rebuilt when those files change, and a count of every refused
handshake.

One certificate and key serve both ways: the listener presents them to its clients,
and the sync client presents them to the peers it connects to (so the certificate
needs both the ``serverAuth`` and the ``clientAuth`` extended key usage, as a
certificate without any EKU has). ``caFile`` is the CA peers are verified against,
in both directions; without it the client trusts the system's CAs and the listener
asks for no client certificate.

Client certificates (``clientAuth``): ``none`` asks for none; ``sync`` asks every
client for one but lets an API client without one in, while the sync endpoints
refuse a request without a certificate the CA signed (``sync_guard``); ``all``
refuses the handshake of any client without one. A certificate a client does
present is always verified: a wrong CA or an expired certificate fails the
handshake in every mode. ``pinRegions`` makes the sync endpoints also require that
the certificate names a region of the mesh (its subject CN or a DNS name of its
subjectAltName equals the region's name).

Reloading: the files are looked at (``stat``) at most once per ``check_every_s``
when a context is asked for, that is on a new connection; a changed file (mtime,
size or inode) rebuilds both contexts, so a renewed certificate is served from
the next handshake on without a restart. The listener keeps the context it was
started with (``listener_context``); its ``sni_callback``, which OpenSSL calls
for every ClientHello (with or without a server name), moves the connection to
the newest server context.

Keep-alive: the sync client keeps a connection to a peer open, so a certificate
replaced on either side would only be seen by new connections; it therefore
replaces a TLS connection once it is ``max_connection_age_s`` old (before the
next message, never under one).

Counting: the listener's handshakes run in ``SSLObject``s of a class whose
``do_handshake`` counts a failure by reason before it propagates; that is the one
place where both asyncio's and uvloop's TLS layers let a refusal be seen (they
drop the error silently otherwise). A rebuild that fails (a key that does
not match its certificate, a file half written) keeps the previous contexts, logs
why and is counted; it is tried again once the files change again.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Final, Literal

from prometheus_client.core import CounterMetricFamily, Metric

from bucketmesh.http.errors import ApiError
from bucketmesh.http.server import Request

__all__ = ["CLIENT_AUTH_MODES", "ClientAuth", "TlsContexts", "TlsError", "TlsFiles", "sync_guard"]

_log = logging.getLogger(__name__)

ClientAuth = Literal["none", "sync", "all"]
CLIENT_AUTH_MODES: Final[tuple[str, ...]] = ("none", "sync", "all")

# OpenSSL X509_V_ERR_* codes (x509_vfy.h) a verification failure is counted under
_VERIFY_REASONS: Final = {
    2: "unknown_ca",  # unable to get issuer certificate
    9: "not_yet_valid",
    10: "expired",
    18: "unknown_ca",  # self-signed certificate
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
    62: "wrong_host",  # hostname mismatch
    64: "wrong_host",  # IP address mismatch
}
# OpenSSL reason codes of alerts and handshake errors, as ssl.SSLError.reason spells them
_ERROR_REASONS: Final = (
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "no_client_cert"),
    ("CERTIFICATE_REQUIRED", "no_client_cert"),
    ("UNKNOWN_CA", "unknown_ca"),
    ("CERTIFICATE_EXPIRED", "expired"),
    ("BAD_CERTIFICATE", "bad_certificate"),
    ("WRONG_VERSION_NUMBER", "not_tls"),
    ("HTTP_REQUEST", "not_tls"),
)


class TlsError(Exception):
    """Certificate files that cannot be loaded: ``field`` names the config field
    (``tls.certFile``, ``tls.keyFile``, ``tls.caFile``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class TlsFiles:
    """The ``tls`` section: file paths and the client certificate policy."""

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    client_auth: ClientAuth = "none"
    pin_regions: bool = False
    #: the sync client replaces a TLS connection this old before its next message, so
    #: that renewed (or expired) certificates, its own and the peer's, take effect
    max_connection_age_s: float = 30.0

    @property
    def serves(self) -> bool:
        """Whether the listener speaks TLS (a certificate is configured)."""
        return self.cert_file is not None


def refusal_reason(error: BaseException) -> str:
    """The bounded label a failed handshake (or TLS read) is counted under."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(int(error.verify_code or 0), "unverified")
    if isinstance(error, ssl.SSLError):
        reason = (error.reason or "").upper()
        for marker, label in _ERROR_REASONS:
            if marker in reason:
                return label
        return "handshake"
    if isinstance(error, TimeoutError):
        return "timeout"
    return "handshake"


def _fingerprint(paths: Collection[str]) -> tuple[tuple[int, int, int], ...]:
    stamps = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append((-1, -1, -1))
        else:
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(stamps)


class TlsContexts:
    """The current server and client contexts of one node, rebuilt when their files
    change, and the handshakes refused (``refused[(side, reason)]``)."""

    def __init__(
        self,
        files: TlsFiles,
        *,
        check_every_s: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.files = files
        self.check_every_s = check_every_s
        self.monotonic = monotonic
        self.refused: dict[tuple[str, str], int] = {}
        self.reloads = 0
        self.reload_failures = 0
        self._paths = tuple(p for p in (files.cert_file, files.key_file, files.ca_file) if p)
        self._stamp = _fingerprint(self._paths)
        self._checked_at = monotonic()
        self._listener: ssl.SSLContext | None = None
        self._server, self._client = self._build()  # TlsError at start-up: the node stops

    # -- contexts -------------------------------------------------------------------

    def listener_context(self) -> ssl.SSLContext:
        """The context a TLS listener is created with: handshakes move to the newest
        server context, and refused ones are counted."""
        if self._listener is None:
            context = self.server_context()
            contexts = self

            class CountingSSLObject(ssl.SSLObject):
                def do_handshake(self) -> None:
                    try:
                        super().do_handshake()
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        raise
                    except ssl.SSLError as error:
                        contexts.count_error("server", error)
                        raise

            context.sslobject_class = CountingSSLObject
            self._listener = context
        return self._listener

    def _choose(self, tls: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        current = self.server_context()
        if tls.context is not current:
            tls.context = current

    def server_context(self) -> ssl.SSLContext:
        """The listener's context for a new connection (rebuilt if the files changed)."""
        self._maybe_reload()
        if self._server is None:
            raise RuntimeError("no tls.certFile: the listener does not serve TLS")
        return self._server

    def client_context(self) -> ssl.SSLContext:
        """The sync client's context for a new connection to an ``https://`` peer."""
        self._maybe_reload()
        return self._client

    def _build(self) -> tuple[ssl.SSLContext | None, ssl.SSLContext]:
        files = self.files
        server: ssl.SSLContext | None = None
        if files.cert_file is not None:
            server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            server.minimum_version = ssl.TLSVersion.TLSv1_2
            self._load_chain(server)
            if files.ca_file is not None:
                self._load_ca(server)
            server.verify_mode = {
                "none": ssl.CERT_NONE,
                "sync": ssl.CERT_OPTIONAL,
                "all": ssl.CERT_REQUIRED,
            }[files.client_auth]
            server.sni_callback = self._choose
        if files.ca_file is not None:
            # verifies hostnames and certificates, trusting the mesh CA only
            client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self._load_ca(client)
        else:
            client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        client.minimum_version = ssl.TLSVersion.TLSv1_2
        if files.cert_file is not None:
            self._load_chain(client)  # presented to peers that ask (mTLS)
        return server, client

    def _load_chain(self, context: ssl.SSLContext) -> None:
        cert, key = self.files.cert_file, self.files.key_file
        assert cert is not None
        try:
            context.load_cert_chain(cert, key)
        except FileNotFoundError as error:
            field = "tls.keyFile" if key is not None and error.filename == key else "tls.certFile"
            raise TlsError(field, f"cannot read {error.filename or cert!r}") from None
        except (ssl.SSLError, OSError) as error:
            field = "tls.keyFile" if key is not None else "tls.certFile"
            raise TlsError(
                field,
                f"cannot load the certificate {cert!r} with its key"
                f"{f' {key!r}' if key else ''}: {getattr(error, 'reason', None) or error}",
            ) from None

    def _load_ca(self, context: ssl.SSLContext) -> None:
        ca = self.files.ca_file
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as error:
            raise TlsError(
                "tls.caFile",
                f"cannot load CA certificates from {ca!r}: "
                f"{getattr(error, 'reason', None) or getattr(error, 'strerror', None) or error}",
            ) from None

    def _maybe_reload(self) -> None:
        now = self.monotonic()
        if now - self._checked_at < self.check_every_s:
            return
        self._checked_at = now
        stamp = _fingerprint(self._paths)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._server, self._client = self._build()
        except TlsError as error:
            self.reload_failures += 1
            _log.error("TLS files changed but cannot be loaded (keeping the previous): %s", error)
            return
        self.reloads += 1
        _log.info("TLS certificate files reloaded: %s", ", ".join(self._paths))

    # -- refusals ---------------------------------------------------------------------

    def count_refusal(self, side: str, reason: str) -> None:
        label = (side, reason)
        self.refused[label] = self.refused.get(label, 0) + 1

    def count_error(self, side: str, error: BaseException) -> str:
        """Count a failed handshake (or a TLS alert read) on ``side``; its reason."""
        reason = refusal_reason(error)
        self.count_refusal(side, reason)
        return reason

    @staticmethod
    def peer_names(peercert: object) -> frozenset[str]:
        """The names a verified peer certificate gives: subject CN, DNS and URI SANs."""
        return peer_names(peercert)

    def metric_families(self) -> Iterator[Metric]:
        refused = CounterMetricFamily(
            "bucketmesh_tls_refused",
            "TLS connections or sync requests refused, by side (server: this node's "
            "listener; client: its sync client) and reason (unknown_ca, expired, "
            "no_client_cert, wrong_region, wrong_host, ...)",
            labels=["side", "reason"],
        )
        for (side, reason), n in sorted(self.refused.items()):
            refused.add_metric([side, reason], n)
        yield refused
        yield CounterMetricFamily(
            "bucketmesh_tls_reloads",
            "Certificate files reloaded after they changed",
            value=self.reloads,
        )
        yield CounterMetricFamily(
            "bucketmesh_tls_reload_failures",
            "Changed certificate files that could not be loaded (the previous stay in use)",
            value=self.reload_failures,
        )


def peer_names(peercert: object) -> frozenset[str]:
    """The names a verified peer certificate gives: subject CN and DNS / URI SANs."""
    if not isinstance(peercert, dict):
        return frozenset()
    names: set[str] = set()
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.add(str(value))
    for kind, value in peercert.get("subjectAltName", ()):
        if kind in ("DNS", "URI"):
            names.add(str(value))
    return frozenset(names)


def sync_guard(tls: TlsContexts, regions: Collection[str]) -> Callable[[Request], None]:
    """The check the sync endpoints run first: a client certificate the CA signed
    (and, with ``pinRegions``, naming a region of ``regions``); 403 otherwise."""
    pinned = frozenset(regions) if tls.files.pin_regions else None

    def guard(request: Request) -> None:
        names = request.peer_names
        if names is None:
            tls.count_refusal("server", "no_client_cert")
            raise ApiError(
                403,
                "the sync endpoints need a client certificate signed by the mesh CA "
                "(tls.clientAuth is on)",
                reason="no_client_cert",
            )
        if pinned is not None and not names & pinned:
            tls.count_refusal("server", "wrong_region")
            raise ApiError(
                403,
                "the client certificate names no region of this mesh "
                f"(tls.pinRegions: its CN or a DNS name must be one of {sorted(pinned)})",
                reason="wrong_region",
            )

    return guard
