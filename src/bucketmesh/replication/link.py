"""The sync mesh's HTTP client: one keep-alive connection to a peer, a POST at a time,
with httptools parsing the reply. Every failure is a ``LinkError``; what to do about
it (retry, back off, mark the peer down) is the mesh's business.

An ``https://`` peer is reached over TLS with the node's client context
(``http/tls.py``: the mesh CA, and the node's certificate for mTLS), taken afresh
for each new connection so that renewed files apply; a handshake the peer or this
side refuses is counted there (side ``client``). Without a ``TlsContexts`` an
``https://`` peer is verified against the system's CAs."""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from collections.abc import Coroutine
from typing import Final, TypeVar
from urllib.parse import urlsplit

import httptools

from bucketmesh.http.tls import TlsContexts
from bucketmesh.replication import protocol as sync

_MAX_REPLY_BYTES: Final = 256 * 1024 * 1024
_IDLE_REUSE_S: Final = 2.0  # reconnect rather than reuse a connection idle this long
_R = TypeVar("_R")


if sys.version_info >= (3, 11):

    async def within(exchange: Coroutine[object, object, _R], timeout_s: float) -> _R:
        """``exchange`` with a deadline, run in the caller's task: ``asyncio.wait_for``
        runs it in a task of its own, which costs the sender three more turns of the
        event loop per message (the task's first step, its done callback, the caller's
        wake-up), and a turn of a flooded node lasts tens of milliseconds (R6: the
        flooded node's own replication lagged seconds behind for it)."""
        async with asyncio.timeout(timeout_s):
            return await exchange

else:  # pragma: no cover - Python 3.10 has no asyncio.timeout

    async def within(exchange: Coroutine[object, object, _R], timeout_s: float) -> _R:
        return await asyncio.wait_for(exchange, timeout_s)


class LinkError(Exception):
    """A request to a peer that did not produce an authentic reply."""

    def __init__(
        self,
        message: str,
        *,
        refused: bool = False,
        status: int | None = None,
        timed_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.refused = refused
        self.status = status
        #: no answer in time: the peer may be alive behind a partition
        self.timed_out = timed_out


class _Reply:
    """httptools callbacks collecting one response, and whether its connection stays
    open: read when the head is complete, since llhttp resets that state (and
    ``should_keep_alive()`` answers False) once the message is complete."""

    __slots__ = ("body", "complete", "keep_alive", "parser", "size")

    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False
        self.keep_alive = False
        self.parser: httptools.HttpResponseParser | None = None

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.size += len(body)

    def on_message_complete(self) -> None:
        self.complete = True


class HttpLink:
    """One keep-alive HTTP/1.1 connection to a peer, one request at a time.

    Any failure closes the connection; the next request opens a new one. A
    connection idle for a while is replaced before use rather than risk the
    server's keep-alive timeout closing it under a request.
    """

    def __init__(self, url: str, *, timeout_s: float, tls: TlsContexts | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"a peer URL is http(s)://host[:port], got {url!r}")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.authority = parts.netloc.rsplit("@", 1)[-1]
        self.https = parts.scheme == "https"
        self.tls = tls
        self._default_ssl = ssl.create_default_context() if self.https and tls is None else None
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._last_used = 0.0
        self._connected_at = 0.0
        self._lock = asyncio.Lock()

    async def post(
        self, path: str, body: bytes, timeout_s: float | None = None
    ) -> tuple[int, bytes]:
        async with self._lock:
            try:
                return await within(
                    self._exchange(path, body), self.timeout_s if timeout_s is None else timeout_s
                )
            except asyncio.TimeoutError:
                self.close()
                raise LinkError("no answer within the peer timeout", timed_out=True) from None
            except ConnectionRefusedError as error:
                self.close()
                raise LinkError(f"connection refused ({error.strerror})", refused=True) from None
            except socket.gaierror as error:
                self.close()
                if error.errno == socket.EAI_AGAIN:  # the name service did not answer now
                    raise LinkError(f"{self.host}: {error.strerror}") from None
                # It answered: no such host. Nobody to wait for, as with a refused connection.
                raise LinkError(
                    f"the peer's host name {self.host} does not resolve ({error.strerror})",
                    refused=True,
                ) from None
            except ssl.SSLError as error:
                self.close()
                reason = self.tls.count_error("client", error) if self.tls else "handshake"
                raise LinkError(f"TLS with the peer failed ({reason}): {error}") from None
            except (OSError, httptools.HttpParserError, LinkError) as error:
                self.close()
                if isinstance(error, LinkError):
                    raise
                raise LinkError(f"{type(error).__name__}: {error}") from None
            except BaseException:
                self.close()
                raise

    async def _exchange(self, path: str, body: bytes) -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if (
            self._writer is None
            or now - self._last_used > _IDLE_REUSE_S
            or (
                self.tls is not None
                and self.https
                and now - self._connected_at > self.tls.files.max_connection_age_s
            )
        ):
            self.close()
            self._connected_at = now
            context = self._default_ssl
            if self.https and self.tls is not None:
                context = self.tls.client_context()
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, ssl=context
            )
        reader, writer = self._reader, self._writer
        assert reader is not None
        head = (
            f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self.authority}\r\n"
            f"Content-Type: {sync.CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n"
            "User-Agent: bucketmesh-sync\r\n\r\n"
        ).encode("latin-1")
        writer.write(head + body)  # one write: one TLS record, not two
        await writer.drain()
        reply = _Reply()
        parser = reply.parser = httptools.HttpResponseParser(reply)
        while not reply.complete:
            data = await reader.read(262144)
            if not data:
                raise LinkError("the peer closed the connection")
            parser.feed_data(data)
            if reply.size > _MAX_REPLY_BYTES:
                raise LinkError("reply too large")
        status = parser.get_status_code()
        if not reply.keep_alive:
            self.close()
        self._last_used = loop.time()
        return status, b"".join(reply.body)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


# -- one peer ------------------------------------------------------------------
