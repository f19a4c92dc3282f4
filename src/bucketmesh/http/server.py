"""The HTTP/1.1 server of the Rating API's hot path: bytes in, handler calls, bytes out.

It owns the wire and nothing else: one ``asyncio.Protocol`` per connection,
driven by httptools (llhttp), turns bytes into :class:`Request` objects, calls
one handler, and writes :class:`Response` objects back strictly in request
order. Routing, JSON bodies and rate-limit decisions belong to the handler.

Theory of operation
-------------------
Ordering
    A synchronous handler's response is encoded at once into the connection's
    output list, and the whole list goes out in one ``transport.write`` at the
    end of ``data_received``: one write per batch of pipelined requests and no
    task per request. A handler that returns an awaitable gets a task (a bare
    future, such as a Redis decision's, is awaited as it is: no task) and a
    slot at the tail of the ``pending`` queue; while that queue is not empty,
    later responses (even synchronous ones) wait in it as ready slots, and the
    queue is written out from the front as its head slots complete.

Hot path (docs/targets.md P2)
    The usual request (one per read, keep-alive HTTP/1.1, a plain target, a
    handler answering at once with ``Response.head``: header lines it encoded
    itself) goes through straight-line code: header names lower-cased once
    (``_NAMES``), a header value decoded once per connection while the client repeats
    it (``_values``; so is a repeated Content-Length's integer), a header line equal to
    the one at its place in the last head taken without either lookup (``_lines``), the
    head limits kept as what is left of them, the target's path
    from ``_PATHS``, the handler called by ``on_message_complete`` itself
    (``_dispatch`` inlined, for a keep-alive HTTP/1.1 request that is not HEAD,
    with nothing pending, not shed: ``_plain``; a ``Router``'s ``hot`` entry, when set,
    is the handler: api/hot.py), its answer assembled and appended
    by ``_deliver``'s encoded-lines branch and written at the end of
    ``data_received``, the idle deadline moved without re-arming the timer.
    Everything else takes the general code below (``_dispatch``, then
    ``_deliver``); both answer byte for byte alike (tests/test_http_dispatch_paths.py).
    ``make install`` compiles this module with Cython (docs/build.md): ``server.pxd``
    makes ``_Connection`` an extension type with typed fields (hence no base class
    here) and types a few locals, such as the module dicts read per request through
    a local; this source stays the reference (tests/test_http_compiled.py).

Backpressure
    A connection is *blocked* while the transport's write buffer is above its
    high-water mark (``pause_writing``) or ``max_pipelined`` responses are
    pending. A blocked connection stops reading (``pause_reading``); requests
    already parsed from the chunk at hand are kept, unhandled, in a ``deferred``
    queue and handled once it unblocks, so a client that does not read its
    responses holds at most one read chunk of requests, not their answers.
    Large output is flushed mid-chunk so that ``pause_writing`` can fire.

Deadlines
    One timer per connection, checked lazily: the deadline is recomputed from
    the state after every read and every written response (idle:
    ``keepalive_timeout`` from now; receiving a head: ``header_timeout`` from its
    first byte; receiving a body: ``body_timeout`` from the end of the head;
    write buffer full: ``body_timeout`` from the pause), and the timer is
    re-armed only when it fires early or the deadline moves earlier. A
    connection with pending handler work has no deadline: that time is ours.

Closing
    A connection closes after the response to a request that asked for it
    (``Connection: close``, HTTP/1.0 without keep-alive), after an error
    response (400, 408, 413, 431), or on shutdown. It then half-closes
    (``write_eof``) and reads and discards input until the client closes or
    ``_LINGER_SECONDS`` pass, so that a client still sending is not answered
    with a TCP reset that would destroy the response before it is read. A
    shutdown does not linger: it closes lingering connections at once, so a
    client that keeps its end open cannot hold a stop up (``run --single``
    took 1.6 s to exit on Ctrl-C after a ``Connection: close`` answer).

Text
    The request target and header values are decoded as UTF-8, percent-escapes
    too, so a key typed in a header and the same key in ``?key=`` are one
    string; bytes that are not UTF-8 get a 400 naming the header or parameter.

TLS
    With a ``TlsContexts`` (``http/tls.py``), the listener speaks TLS; a handshake
    may take ``header_timeout``. Renewed certificate files apply from the next
    handshake on, and refused handshakes are counted by reason: both happen inside
    the context ``TlsContexts.listener_context`` gives. The verified client
    certificate's names reach the handler as ``Request.peer_names``.

Shedding (docs/targets.md R6)
    Overload is answered early and cheaply, ``503`` problem+json with
    ``Retry-After: 1`` and no handler call, in two cases. The event loop lags: a
    timer due every ``_LAG_TICK_S`` marks when the loop last turned, and a read
    handled while that timer is overdue by more than ``shed_lag`` is shed (this
    turn has run too long; what is read now waited behind it), and so is every read
    of a turn that follows one that ran past twice ``shed_lag`` (a stall, or a node
    short of CPU: what the sockets hold waited through it). Each turn thus
    serves for about ``shed_lag`` and sheds the rest, and the node keeps reading
    its sockets at several times its capacity, so what it serves waits about one
    turn, not a queue in the socket buffers. Or ``max_in_flight`` handler answers
    (a Redis decision, a durable grant) are already awaited. Or reserved work on
    the same loop is behind (``yield_to``: the node's sync sender holds more deltas
    for a peer than one round of its connections carries) and the last turn ran
    past half ``shed_lag``: the turn is shed whole (counted as ``yield``), so the
    sender, each of whose messages waits a turn for its ack, gets short turns, and
    the node admits about what it can replicate.
    Reserved traffic is never shed: the sync endpoints, the admin and fault
    endpoints, ``PATCH`` and the probes and metrics (``_RESERVED``), so a
    flooded node still replicates, reports and can be reconfigured.

Fast shed path
    Parsing alone costs a good share of a decision, so a shed read is not parsed
    when it need not be: at a message boundary with nothing pending, the complete
    ``GET``/``POST`` HTTP/1.1 requests at its start (``_SHED_RUN``, one regex match
    for a run of bodiless ones; one by one with a ``Content-Length`` body) get the
    pre-encoded 503 (``_shed_answer``, re-stamped with the Date every second),
    counted in ``shed_unparsed``. The first request it does not follow (a reserved
    path, another method, HTTP/1.0, ``Transfer-Encoding``, ``Connection``,
    ``Expect``, ``Upgrade``, an incomplete one) and all after it go to the parser,
    which sheds or serves them as usual: both paths answer byte for byte alike
    (tests/test_http11.py checks it on generated input), except that a request the
    parser would refuse for its target's percent-escapes (not UTF-8) or for more
    than ``max_headers`` header lines gets the 503 instead of the 400 or 431.

Connection cap
    Beyond ``max_connections`` open connections, a new connection is
    accepted, answered at once with ``503`` problem+json and ``Retry-After: 1``
    without reading its request, half-closed and dropped after at most
    ``_LINGER_SECONDS``. Refusing visibly beats leaving clients in the listen
    backlog until they time out. Refused connections are not counted in
    ``open_connections``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import re
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from types import FunctionType as _FunctionType
from typing import TYPE_CHECKING, Final, TypeAlias, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import httptools
import msgspec

if TYPE_CHECKING:
    from bucketmesh.http.tls import TlsContexts

__all__ = [
    "Handler",
    "HttpServer",
    "Later",
    "NotText",
    "Request",
    "Response",
    "ServerLimits",
    "decode_header",
    "decode_query",
    "is_reserved",
    "problem",
    "reserved_only",
]

_log = logging.getLogger(__name__)

_LINGER_SECONDS: Final = 2.0
_LAG_TICK_S: Final = 0.01
# Paths never shed (a prefix each); PATCH is never shed either.
_RESERVED: Final = ("/v1/sync/", "/v1/admin/", "/healthz", "/readyz", "/metrics", "/v1/status")
# The same, as the request line holds them (method, one space, target).
_RESERVED_TARGETS: Final = tuple(prefix.encode() for prefix in _RESERVED)
# The requests the fast shed path answers 503 unparsed: GET or POST, a target that is not
# reserved, HTTP/1.1 (PATCH is reserved, HEAD has no body, the other methods are rare) ...
_SHED_LINE: Final = rb"(?:GET|POST) (?!%s)[!-~]+ HTTP/1\.1\r\n" % b"|".join(
    re.escape(target) for target in _RESERVED_TARGETS
)
# a header line as llhttp takes it: a token, a colon, a value of visible ASCII, blanks
_SHED_FIELD: Final = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+:[\t -~]*\r\n"
# ... a run of them in one match: complete, bodiless, without a header that frames a body
# or changes the answer (those go one by one, _SHED_HEAD, or to the parser)
_SHED_RUN: Final = re.compile(
    rb"(?:%s(?:(?!(?i:content-length|transfer-encoding|connection|expect|upgrade):)%s)*\r\n)+"
    % (_SHED_LINE, _SHED_FIELD)
)
# one such head, whatever its headers (a Content-Length body is framed one by one)
_SHED_HEAD: Final = re.compile(rb"%s(?:%s)*\r\n" % (_SHED_LINE, _SHED_FIELD))
_NON_ASCII: Final = re.compile(rb"[\x80-\xff]")
_FLUSH_AT: Final = 65536  # bytes of encoded output that trigger a write mid-chunk
_BACKLOG: Final = 2048
# Headers that frame the message: the server writes them itself and drops the handler's.
_FRAMING_HEADERS: Final = frozenset(
    {"content-length", "transfer-encoding", "connection", "date", "server"}
)
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_METHODS: Final = {
    m.encode(): m
    for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")
}
_STATUS_LINES: Final = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus if s.value >= 200
}
# the status lines of answers that carry a body (not 204, 304)
_BODY_STATUS_LINES: Final = {s: line for s, line in _STATUS_LINES.items() if s not in (204, 304)}
_content_type_lines: dict[str, bytes] = {}
# Header names as sent -> lower-cased text, for the names clients send (bounded).
_NAMES: dict[bytes, str] = {}
_NAMES_MAX: Final = 512
# Header values a connection remembers, raw and decoded (``_Connection._values``).
_VALUES_MAX: Final = 32
# Request targets without a query, percent-escape or fragment -> their path (bounded).
_PATHS: dict[bytes, str] = {}
_PATHS_MAX: Final = 512
_NOT_PLAIN: Final = re.compile(rb"[?%#]")
_json_encode = msgspec.json.Encoder().encode
_Future = asyncio.Future
_monotonic = time.monotonic  # read per read (_shedding_now): one global, not two lookups


class Request(msgspec.Struct, eq=False):
    """One parsed request, as the handler sees it (a Struct: built in C, once per
    request; compared and hashed by identity, as a plain object is)."""

    method: str
    #: Percent-decoded path without the query string.
    path: str
    #: Percent-decoded query parameters; the last of repeated names wins.
    query: dict[str, str]
    #: Lower-cased names; repeated headers joined with ", ".
    headers: dict[str, str]
    body: bytes
    #: The TCP peer; no X-Forwarded-For processing here.
    client_ip: str
    http_version: str
    #: The names (subject CN, DNS and URI SANs) of the client certificate the
    #: listener verified; None without TLS or without a client certificate.
    peer_names: frozenset[str] | None = None


class Response:
    """What a handler answers. ``headers`` are written as given, except the framing
    headers (Content-Length, Transfer-Encoding, Connection, Date, Server) which the
    server writes itself; a handler's ``Connection: close`` closes the connection, and
    a ``Content-Type`` among ``headers`` is written instead of ``content_type``.

    ``head``, instead of ``headers``: the header lines already encoded
    (``Name: value\\r\\n`` each, Content-Type included when there is a body, no
    framing header, no CR or LF inside a value), written as they are: a hot path
    (``http/render.py``) encodes its constant parts once. ``headers`` still reads
    them as pairs (parsed on first read, which drops ``head``: the pairs, changed
    or not, are then what the server writes)."""

    __slots__ = ("_headers", "body", "content_type", "head", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: list[tuple[str, str]] | None = None,
        head: bytes | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self._headers = headers
        self.head = head

    @property
    def headers(self) -> list[tuple[str, str]] | None:
        if self._headers is None and self.head is not None:
            pairs = []
            for line in self.head.decode("latin-1").split("\r\n")[:-1]:
                name, _, value = line.partition(": ")
                if name.lower() != "content-type":  # that is content_type
                    pairs.append((name, value))
            self._headers = pairs
            self.head = None  # from now on the pairs are the answer's headers: a caller may add one
        return self._headers

    @headers.setter
    def headers(self, headers: list[tuple[str, str]] | None) -> None:
        self._headers = headers
        self.head = None


Handler: TypeAlias = Callable[[Request], Response | Awaitable[Response]]


class ServerLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Resource limits of one server; sizes in bytes, times in seconds."""

    max_body_bytes: int = 65536
    max_header_bytes: int = 16384  # request target plus all header lines
    max_headers: int = 100
    header_timeout: float = 10.0  # to receive a complete request head (slowloris)
    body_timeout: float = 30.0  # to receive a body; also to drain a full write buffer
    keepalive_timeout: float = 5.0  # an idle connection is closed after this
    max_connections: int = 10000  # beyond: answered 503 + Retry-After and closed
    max_pipelined: int = 64  # pending responses per connection before reading stops
    max_in_flight: int = 4096  # awaited handler answers, all connections; beyond: 503
    shed_lag: float = 0.1  # event loop lag beyond which requests are shed (503)

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"ServerLimits.{name} must be positive, got {value!r}")


def problem(
    status: int,
    title: str | None,
    detail: str,
    *,
    type_: str = "about:blank",
    field: str | None = None,
    extra: dict[str, object] | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> Response:
    """An RFC 9457 ``application/problem+json`` response; ``title`` defaults to the
    status's reason phrase."""
    document: dict[str, object] = {
        "type": type_,
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if field is not None:
        document["field"] = field
    if extra:
        document.update(extra)
    return Response(status, _json_encode(document), "application/problem+json", headers)


def is_reserved(request: Request) -> bool:
    """Whether ``request`` is reserved traffic, never shed: a ``PATCH``, or a path under
    one of ``_RESERVED`` (sync, admin and fault endpoints, probes, metrics, status)."""
    return request.method == "PATCH" or request.path.startswith(_RESERVED)


def reserved_only(handler: Handler) -> Handler:
    """``handler`` for the reserved listener (``adminListen``): it answers the reserved
    requests only, and any other with 404 problem+json, so a flood of decisions cannot
    move to the listener whose share is kept for sync and admin."""

    def answer(request: Request) -> Response | Awaitable[Response]:
        if is_reserved(request):
            return handler(request)
        return problem(
            404,
            None,
            "this listener (adminListen) serves only the sync, admin, status, metrics and "
            "probe endpoints and PATCH; send rate-limit decisions to the main listener",
        )

    return answer


def _overloaded() -> Response:
    return problem(
        503,
        None,
        "the server is overloaded; retry shortly",
        headers=[("Retry-After", "1")],
    )


_SHED: Final = _overloaded()  # the server only reads it


def _internal_error() -> Response:
    return problem(500, None, "the request handler failed; this is a bug")


def _content_type_line(content_type: str) -> bytes:
    line = _content_type_lines.get(content_type)
    if line is None:
        if "\r" in content_type or "\n" in content_type:
            raise ValueError("CR or LF in Content-Type")
        line = f"Content-Type: {content_type}\r\n".encode("latin-1")
        if len(_content_type_lines) < 64:
            _content_type_lines[content_type] = line
    return line


def _encode_response(
    response: Response, date_server: bytes, keep_alive: bool, head: bool, http10: bool
) -> tuple[bytes, bool]:
    """The response's bytes, and whether the connection must close after it.

    Raises (TypeError, ValueError, ...) for a response no client should see: a bad
    status, a body that is not bytes, CR or LF smuggled into a header.
    """
    body = response.body
    if body.__class__ is not bytes:
        body = bytes(body)
    status = response.status
    status_line = _STATUS_LINES.get(status) or _status_line(status)
    head_lines = response.head
    if (
        head_lines is not None
        and keep_alive
        and not http10
        and not head
        and status != 204
        and status != 304
    ):
        # the hot path: header lines encoded by the handler, a keep-alive HTTP/1.1 answer
        return b"%s%s%sContent-Length: %d\r\n\r\n%s" % (
            status_line,
            date_server,
            head_lines,
            len(body),
            body,
        ), False
    extra = b""
    content_type = b""
    if response.headers:
        extra, has_content_type, asks_close = _encode_headers(response.headers)
        keep_alive = keep_alive and not asks_close
        if not has_content_type and body:
            content_type = _content_type_line(response.content_type)
    elif body:
        content_type = _content_type_line(response.content_type)
    if status == 204 or status == 304:
        body = content_type = b""
        length = b""
    else:
        length = b"Content-Length: %d\r\n" % len(body)
    if not keep_alive:
        connection = b"Connection: close\r\n"
    elif http10:
        connection = b"Connection: keep-alive\r\n"
    else:
        connection = b""
    if head:
        body = b""
    return b"%s%s%s%s%s%s\r\n%s" % (
        status_line,
        date_server,
        extra,
        content_type,
        length,
        connection,
        body,
    ), not keep_alive


def _encode_headers(headers: list[tuple[str, str]]) -> tuple[bytes, bool, bool]:
    """A handler's header lines, whether they set Content-Type, whether they ask to close."""
    lines = []
    has_content_type = asks_close = False
    for name, value in headers:
        lowered = name.lower()
        if lowered in _FRAMING_HEADERS:
            asks_close = asks_close or (lowered == "connection" and "close" in value.lower())
            continue
        has_content_type = has_content_type or lowered == "content-type"
        lines.append(f"{name}: {value}\r\n")
    block = "".join(lines)
    if block.count("\n") != len(lines) or block.count("\r") != len(lines):
        raise ValueError("CR or LF in a response header")
    return block.encode("latin-1"), has_content_type, asks_close


def _status_line(status: int) -> bytes:
    if not 200 <= status <= 599:
        raise ValueError(f"invalid response status {status!r}")
    return b"HTTP/1.1 %d \r\n" % status


class NotText(ValueError):
    """Bytes of the request that are not UTF-8: ``field`` names where they are (a
    header or a query parameter), ``detail`` says it for a 400."""

    def __init__(self, field: str | None, detail: str) -> None:
        super().__init__(detail)
        self.field = field
        self.detail = detail


_NotText = NotText


def _split_target(url: bytes) -> tuple[str, dict[str, str]]:
    """Path and query of a request target, decoded as UTF-8 like header values: raw
    bytes and percent-escapes alike. Raises _NotText for bytes that are not UTF-8,
    ValueError for an unparsable target."""
    try:
        target = url.decode("utf-8")
    except UnicodeDecodeError:
        raise _NotText(None, "the request target is not UTF-8 text") from None
    if target[:1] != "/" or "#" in target:
        if target == "*":
            return "*", {}
        parts = urlsplit(target)  # absolute-form (as sent to proxies), or a fragment
        path, query = parts.path or "/", parts.query
    else:
        path, _, query = target.partition("?")
    if "%" in path:
        path = unquote(path, errors="surrogateescape")
        if not path.isascii() and not _is_text(path):
            raise _NotText(None, "the request path has percent-escapes that are not UTF-8")
    if not query:
        return path, {}
    pairs = parse_qsl(query, keep_blank_values=True, errors="surrogateescape")
    for name, value in pairs:
        if not (name.isascii() or _is_text(name)):
            raise _NotText(None, "a query parameter name has percent-escapes that are not UTF-8")
        if not (value.isascii() or _is_text(value)):
            raise _NotText(name, f"query parameter {name} has percent-escapes that are not UTF-8")
    return path, dict(pairs)


def decode_query(raw: bytes) -> dict[str, str]:
    """The parameters of a raw query string, decoded as this server decodes a request
    target's (UTF-8, raw bytes and percent-escapes alike; the last of repeated names
    wins), for other front ends (the ASGI middleware). Raises ``NotText`` naming the
    parameter whose bytes are not UTF-8."""
    if not raw:
        return {}
    try:
        return _split_target(b"/?" + raw.replace(b"#", b"%23"))[1]
    except _NotText as error:
        if error.field is None:
            raise NotText(None, "the query string is not UTF-8 text") from None
        raise


def decode_header(name: bytes, value: bytes) -> tuple[str, str]:
    """A header's lower-cased name and its value decoded as this server decodes them
    (UTF-8, trailing blanks dropped). Raises ``NotText`` naming the header."""
    try:
        text = value.decode("utf-8").rstrip(" \t")
    except UnicodeDecodeError:
        raise _not_text_header(name) from None
    return name.decode("latin-1").lower(), text


def _not_text_header(name: bytes) -> NotText:
    shown = name.decode("latin-1")
    return NotText(shown, f"header {shown} is not UTF-8 text; send its value encoded as UTF-8")


def _is_text(decoded: str) -> bool:
    """Whether ``decoded`` (from ``surrogateescape``) held only UTF-8: no lone surrogates."""
    try:
        decoded.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Stop(Exception):
    """Raised from a parser callback to stop parsing the rest of the input."""


_Deferred: TypeAlias = tuple[Request | Response | bytes, bool]


class _Slot:
    """A place in a connection's response order: a response or interim bytes once ready."""

    __slots__ = ("head", "http10", "keep_alive", "ready", "task")

    def __init__(
        self,
        ready: Response | bytes | None,
        keep_alive: bool,
        head: bool,
        http10: bool,
    ) -> None:
        self.ready = ready
        self.keep_alive = keep_alive
        self.head = head
        self.http10 = http10
        self.task: asyncio.Future[Response] | Later | None = None


class Later:
    """An answer a handler gives later without a future (``api/hot.py``'s later grant).

    A handler returns a fresh ``Later``; the server gives it the request's place in the
    connection's answer order, and ``resolve(response)`` writes the answer as
    ``_on_response_done`` writes a future's result (in order behind the answers before
    it, through the encoded-head fast path when it can), at once: without a future, a
    done callback or a loop turn. ``follow(future)`` hands the answer to an awaitable
    after all (the reference path, for what the handler's own path does not cover),
    answered as any awaitable a handler returns. ``cancelled`` turns true when the
    connection stops waiting for it (lost, or closing after an earlier answer's
    ``Connection: close``): where a future's answer is cancelled; a later ``resolve``
    or ``follow`` is then dropped (a followed future is cancelled), as a cancelled
    future's result is. Each is answered once: a second ``resolve`` or ``follow`` is
    dropped too."""

    __slots__ = ("_connection", "_ready", "_slot", "cancelled")

    def __init__(self) -> None:
        self._connection: _Connection | None = None
        self._slot: _Slot | None = None
        # resolved or followed before the server took it (a Response or an awaitable)
        self._ready: object = None
        self.cancelled = False

    def resolve(self, response: Response) -> None:
        """The answer is ``response``: written now, or in its turn behind those before it."""
        connection = self._connection
        if connection is None:  # not taken yet (or answered, or cancelled)
            if self._slot is None and not self.cancelled and self._ready is None:
                self._ready = response
            return
        self._connection = None
        connection._on_later(self._slot, response)  # type: ignore[arg-type]  # set with it

    def follow(self, answer: Awaitable[Response]) -> None:
        """The answer is what ``answer`` (a future, a task, a coroutine) gives."""
        connection = self._connection
        if connection is None:
            if self._slot is None and not self.cancelled and self._ready is None:
                self._ready = answer
            elif isinstance(answer, _Future):
                answer.cancel()  # as the connection would have cancelled it
            elif inspect.iscoroutine(answer):
                answer.close()
            return
        self._connection = None
        slot = self._slot
        task = answer if isinstance(answer, _Future) else asyncio.ensure_future(answer)
        slot.task = task  # type: ignore[union-attr]  # set with _connection
        task.add_done_callback(
            functools.partial(connection._on_response_done, slot)  # type: ignore[arg-type]
        )

    def cancel(self) -> bool:
        """The connection no longer waits for the answer (``Future.cancel`` for a slot)."""
        connection = self._connection
        if connection is None:
            return False
        self._connection = None
        self.cancelled = True
        slot = self._slot
        slot.task = None  # type: ignore[union-attr]  # set with _connection
        connection._server._in_flight -= 1
        return True


class _Connection:
    """One client connection: parser callbacks, response order, deadlines, closing.

    An ``asyncio.Protocol`` by its methods (the event loop needs no more; the class
    has no base so that the Cython build, ``server.pxd``, can make it an extension
    type whose attributes are C fields: docs/build.md)."""

    __slots__ = (
        "_at",
        "_body",
        "_body_started",
        "_client_ip",
        "_closing",
        "_deadline",
        "_deferred",
        "_failed",
        "_fields_left",
        "_handler",
        "_head_done",
        "_head_raw",
        "_head_room",
        "_head_started",
        "_headers",
        "_http_version",
        "_in_message",
        "_in_target",
        "_keep_alive",
        "_keepalive",
        "_length",
        "_length_text",
        "_limits",
        "_lines",
        "_linger_until",
        "_lingering",
        "_loop",
        "_lost",
        "_max_fields",
        "_max_head",
        "_max_pipelined",
        "_method",
        "_method_raw",
        "_now",
        "_out",
        "_out_size",
        "_parser",
        "_paused_at",
        "_peer_eof",
        "_peer_names",
        "_pending",
        "_plain",
        "_reading_paused",
        "_server",
        "_shedding",
        "_timer",
        "_timer_at",
        "_transport",
        "_url",
        "_values",
        "_write_paused",
    )

    def __init__(self, server: HttpServer, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop
        self._limits = server._limits
        self._max_pipelined = server._limits.max_pipelined
        self._max_head = server._limits.max_header_bytes
        self._max_fields = server._limits.max_headers
        self._keepalive = server._limits.keepalive_timeout
        handler = server._handler
        hot = getattr(handler, "hot", None)
        call = getattr(type(handler), "__call__", None)  # noqa: B004 (the method itself)
        if hot is not None:
            # a Router's hot entry (api/hot.py): the router's own answers, its hottest route
            # in one call
            handler = hot
        elif call.__class__ is _FunctionType:
            # an object whose class defines __call__ in Python (the Router): its bound
            # method, called without the type's call slot (a lookup and an argument tuple)
            handler = call.__get__(handler)
        self._handler = handler
        self._transport: asyncio.Transport  # set by connection_made
        self._parser = httptools.HttpRequestParser(self)
        self._client_ip = ""
        self._peer_names: frozenset[str] | None = None
        self._now = 0.0
        self._out: list[bytes] = []
        self._out_size = 0
        self._pending: deque[_Slot] = deque()
        self._deferred: deque[_Deferred] = deque()
        # the message being received
        self._in_message = False
        self._in_target = False  # a request line with raw non-ASCII bytes goes on
        self._head_done = False
        self._head_raw = 0
        self._head_room = 0  # bytes of head left within max_header_bytes
        self._fields_left = 0  # header lines left within max_headers
        self._head_started = 0.0
        self._body_started = 0.0
        self._url = b""
        self._headers: dict[str, str] = {}
        # header key -> (the raw value last received under it, its text): a client's
        # headers repeat from request to request on a connection, decoded once
        self._values: dict[str, tuple[bytes, str]] = {}
        # the last head's header lines in order, (raw name, key, raw value, text) each, and
        # the place of the next line in the head at hand: compared before any lookup
        self._lines: list[tuple[bytes, str, bytes, str]] = []
        self._at = 0
        # the last Content-Length value and its int (within max_body_bytes)
        self._length_text = ""
        self._length = 0
        self._body: bytes | bytearray = b""
        self._method = "GET"
        self._method_raw = b""  # the bytes the parser gave for _method (the last request's)
        self._http_version = "1.1"
        self._keep_alive = True
        self._plain = True  # not HEAD, HTTP/1.1: answered by on_message_complete's hot path
        # the connection
        self._closing = False  # no more requests are read; close once answered
        self._failed = False
        self._lingering = False
        self._linger_until = 0.0
        self._lost = False
        self._peer_eof = False
        self._write_paused = False
        self._reading_paused = False
        self._paused_at = 0.0
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._shedding = False  # the chunk at hand arrived while the node sheds

    # --- transport callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._client_ip = str(peer[0])
        tls = self._server._tls
        if tls is not None:
            names = tls.peer_names(transport.get_extra_info("peercert"))
            self._peer_names = names or None
        self._server._connections.add(self)
        if self._server._shutting_down:
            self._lost = True  # accepted as the listener closed: nothing to answer
            self._transport.close()
            return
        self._refresh_deadline(self._loop.time())

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for slot in self._pending:
            if slot.task is not None:
                slot.task.cancel()
        self._pending.clear()
        self._deferred.clear()
        self._server._forget(self)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # lingering, or answering what was already read: input is discarded
        self._now = now = self._loop.time()
        server = self._server
        self._shedding = shedding = server._shedding_now()
        if (
            shedding
            and not (self._in_message or self._pending or self._deferred or self._write_paused)
            and server._fast_shed
        ):
            data = self._shed_fast(data)
        if not data.isascii() and (self._in_target or not self._in_message):
            data = self._escaped_target(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as error:
            self._parser_stopped(error, data)
        if self._in_message and not self._head_done and not self._closing:
            # A head that never ends must not grow in httptools' buffers: count the
            # chunks it spans (not the one it began in, which may hold other requests).
            if self._head_raw < 0:
                self._head_raw = 0
            else:
                self._head_raw += len(data)
                if self._head_raw > self._limits.max_header_bytes:
                    self._fail(self._head_too_large())
        out = self._out
        if out:  # _write_out, inlined: one write per read
            written = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self._out_size = 0
            if not self._lost and not self._transport.is_closing():
                self._transport.write(written)
        if self._closing:
            self._flush()
        if self._in_message or self._pending or self._closing or self._reading_paused:
            self._refresh_deadline(now)
        else:  # idle again, the usual case: _refresh_deadline's first branch, inlined
            deadline = self._deadline = now + self._keepalive
            if self._timer is None or deadline < self._timer_at:
                self._refresh_deadline(now)

    def _shed_fast(self, data: bytes) -> bytes:
        """Answer the complete decision requests at the start of ``data`` with the
        pre-encoded 503, without the parser, a Request or the handler; return the rest
        for the parser (from the first request it must see: a reserved path, a method
        or header the fast path does not follow, an incomplete request).

        Called only at a message boundary with nothing pending, so the answers keep
        the request order. Framing follows Content-Length as llhttp does; a request
        with anything else that frames or changes its answer (Transfer-Encoding,
        Connection, Expect, Upgrade, HTTP/1.0, a head or body beyond the limits) is
        left to the parser, which answers it as usual (shed or not)."""
        limits = self._limits
        max_head = limits.max_header_bytes
        max_body = limits.max_body_bytes
        size = len(data)
        start = 0
        count = 0
        while start < size:
            run = _SHED_RUN.match(data, start)
            if run is not None:  # the usual case: many requests in one C call
                end = run.end()
                count += data.count(b"\r\n\r\n", start, end)  # one per request
                start = end
                if start == size:
                    break
            # one request the run did not take: one with a body, or one for the parser
            head = _SHED_HEAD.match(data, start)
            if head is None:
                break
            end = head.end()
            if end - start > max_head:
                break
            lowered = data[start:end].lower()
            if (
                b"\ntransfer-encoding:" in lowered
                or b"\nconnection:" in lowered
                or b"\nexpect:" in lowered
                or b"\nupgrade:" in lowered
            ):
                break
            at = lowered.find(b"\ncontent-length:") + 16
            if at < 16 or lowered.find(b"\ncontent-length:", at) >= 0:
                break  # none (a head too long for the run, say), or repeated: the parser's
            value = lowered[at : lowered.find(b"\r", at)].strip()
            if not value.isdigit() or len(value) > 9:
                break
            length = int(value)
            after = end + length
            if length > max_body or after > size:
                break
            count += 1
            start = after
        if count:
            server = self._server
            server.shed[server._shed_cause] += count
            server.shed_unparsed += count
            answer = server._shed_answer * count
            self._out.append(answer)
            self._out_size += len(answer)
        return data[start:] if start else data

    def _escaped_target(self, data: bytes) -> bytes:
        """``data`` with the raw non-ASCII bytes of the request line it begins with
        percent-escaped. curl sends a typed ``?key=my‑agent`` (U+2011) as raw UTF-8,
        which llhttp refuses in a URL; escaped, it reads as the same key a header
        gives. Only a request line at the start of a read is seen here: one pipelined
        behind another request in the same read still gets llhttp's 400."""
        end = data.find(b"\n")
        self._in_target = end < 0  # the line goes on in the next read
        line, rest = (data, b"") if end < 0 else (data[:end], data[end:])
        return _NON_ASCII.sub(lambda byte: b"%%%02X" % byte.group()[0], line) + rest

    def eof_received(self) -> bool:
        self._peer_eof = True
        if self._lingering or self._lost:
            return False
        self._in_message = False
        self._closing = True
        # keep the write side open to answer requests already read
        return bool(self._pending or self._deferred)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._paused_at = self._loop.time()
        self._update_reading()
        self._refresh_deadline(self._paused_at)

    def resume_writing(self) -> None:
        self._write_paused = False
        self._run_deferred()
        self._flush()
        self._update_reading()
        self._refresh_deadline(self._loop.time())

    # --- parser callbacks ----------------------------------------------------

    def _parser_stopped(
        self, error: httptools.HttpParserError | httptools.HttpParserUpgrade, data: bytes
    ) -> None:
        while isinstance(error, httptools.HttpParserUpgrade):
            # Upgrades are ignored (RFC 9110 §7.8): the request was answered as a plain
            # one, and the bytes after its head are parsed as the next request.
            self._parser = httptools.HttpRequestParser(self)
            data = data[error.args[0] :]
            if not data or self._closing:
                return
            try:
                self._parser.feed_data(data)
                return
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as again:
                error = again
        if isinstance(error, httptools.HttpParserCallbackError):
            cause = error.__context__
            if cause is not None and not isinstance(cause, Exception):
                raise cause  # KeyboardInterrupt, SystemExit: not ours to swallow
            if not isinstance(cause, _Stop):
                self._server._report(cause if cause is not None else error)
                self._fail(_internal_error())
        else:
            self._fail(problem(400, None, f"malformed HTTP request: {error}"))

    def on_message_begin(self) -> None:
        if self._server._shutting_down:
            self._closing = True
            raise _Stop
        self._in_message = True
        self._head_done = False
        self._head_raw = -1  # the head began in the chunk at hand
        self._head_room = self._max_head
        self._fields_left = self._max_fields
        self._at = 0
        self._head_started = self._now
        self._url = b""
        self._headers = {}
        self._body = b""

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_room -= len(url)
        if self._head_room < 0:
            self._fail(self._head_too_large())
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        # the hot path: decode_header inlined, header names lower-cased once (_NAMES), the
        # limits as what is left of them (max_header_bytes counts name, value and 4 each)
        room = self._head_room = self._head_room - len(name) - len(value) - 4
        left = self._fields_left = self._fields_left - 1
        if room < 0 or left < 0:
            self._fail(self._head_too_large())
            raise _Stop
        # the header line the client sent at this place in its last head, the same again
        # (a client's heads repeat): its name and value as they were decoded then
        at = self._at
        self._at = at + 1
        lines = self._lines
        line = lines[at] if at < len(lines) else None
        if line is not None and line[0] == name and line[2] == value:
            key = line[1]
            text = line[3]
        else:
            names = _NAMES  # a local: typed dict in the compiled build (server.pxd)
            lowered = names.get(name)
            if lowered is None:
                lowered = name.decode("latin-1").lower()
                if len(names) < _NAMES_MAX:
                    names[name] = lowered
            key = lowered
            values = self._values
            known = values.get(key)
            if known is not None and known[0] == value:
                text = known[1]  # the value this connection sent last time under this name
            else:
                try:
                    # UTF-8, as the request target is: one spelling of a key on every path
                    text = value.decode().rstrip(" \t")
                except UnicodeDecodeError:
                    error = _not_text_header(name)
                    self._fail(problem(400, None, error.detail, field=error.field))
                    raise _Stop from None
                if known is not None or len(values) < _VALUES_MAX:
                    values[key] = (value, text)
            if line is not None:
                lines[at] = (name, key, value, text)
            elif at == len(lines) and at < _VALUES_MAX:
                lines.append((name, key, value, text))
        headers = self._headers
        if key in headers:
            headers[key] = f"{headers[key]}, {text}"
        else:
            headers[key] = text

    def on_headers_complete(self) -> None:
        self._head_done = True
        self._body_started = self._now
        parser = self._parser
        headers = self._headers
        method = parser.get_method()
        if method != self._method_raw:  # else the last request's method again: its str
            methods = _METHODS
            self._method = methods.get(method) or method.decode("latin-1")
            self._method_raw = method
        keep_alive = self._keep_alive = parser.should_keep_alive()
        if keep_alive and "connection" not in headers:
            self._http_version = "1.1"  # implied, and get_http_version() is slow
            self._plain = method != b"HEAD"
        else:
            self._plain = False
            self._http_version = parser.get_http_version()
            if self._http_version != "1.1" and self._http_version != "1.0":
                detail = f"HTTP/{self._http_version} is not supported; use HTTP/1.1"
                self._fail(problem(400, None, detail))  # the API answers no 5xx
                raise _Stop
        if method == b"CONNECT":
            self._fail(problem(400, None, "CONNECT is not supported"))
            raise _Stop
        declared = headers.get("content-length")
        if declared is not None:
            if declared == self._length_text:
                length = self._length  # the same as the last request's (checked then)
            else:
                try:
                    length = int(declared)
                except ValueError:
                    self._fail(problem(400, None, "malformed Content-Length"))
                    raise _Stop from None
                if length > self._limits.max_body_bytes:
                    self._fail(self._body_too_large())
                    raise _Stop
                self._length_text = declared
                self._length = length
        else:
            length = 0
        if "expect" in headers:
            self._expect(headers, length)

    def _expect(self, headers: dict[str, str], length: int) -> None:
        if (
            self._http_version == "1.1"
            and headers["expect"].lower() == "100-continue"
            and (length > 0 or "transfer-encoding" in headers)
        ):
            self._answer_ready(_CONTINUE, True)

    def on_body(self, body: bytes) -> None:
        received = self._body
        if len(received) + len(body) > self._limits.max_body_bytes:
            self._fail(self._body_too_large())
            raise _Stop
        if not received:
            self._body = body
        elif received.__class__ is bytes:
            self._body = bytearray(received) + body
        else:
            received += body

    def on_message_complete(self) -> None:
        self._in_message = False
        body = self._body
        if body.__class__ is not bytes:
            body = bytes(body)
        url = self._url
        paths = _PATHS
        path = paths.get(url)
        if path is not None:
            query: dict[str, str] = {}
        else:
            path, query = self._target(url)
        request = Request(
            self._method,
            path,
            query,
            self._headers,
            body,
            self._client_ip,
            self._http_version,
            self._peer_names,
        )
        server = self._server
        if (
            self._plain
            and not (
                self._pending
                or self._deferred
                or self._write_paused
                or self._closing
                or self._shedding
                or server._shutting_down
            )
            and server._in_flight < server._max_in_flight
        ):
            # the hot path, _dispatch inlined: a keep-alive HTTP/1.1 request (not HEAD)
            # with nothing before it, answered at once (_deliver's encoded header lines)
            try:
                result: object = self._handler(request)
            except Exception as exc:
                server._report(exc)
                result = _internal_error()
            self._deliver(result, True, False, False)
            if self._closing:
                raise _Stop
            return
        keep_alive = self._keep_alive and not server._shutting_down
        if not keep_alive:
            self._closing = True
        if not (self._pending or self._deferred or self._write_paused):
            self._dispatch(request, keep_alive)
        elif self._deferred or self._write_paused or len(self._pending) >= self._max_pipelined:
            self._deferred.append((request, keep_alive))
            self._update_reading()
        else:
            self._dispatch(request, keep_alive)
        if self._closing:
            raise _Stop

    def _target(self, url: bytes) -> tuple[str, dict[str, str]]:
        """``_split_target``, a 400 for a target it refuses; a plain path is kept in _PATHS."""
        try:
            path, query = _split_target(url)
        except _NotText as error:
            self._fail(problem(400, None, error.detail, field=error.field))
            raise _Stop from None
        except ValueError:
            self._fail(problem(400, None, "malformed request target"))
            raise _Stop from None
        plain = url[:1] == b"/" and url.isascii() and not _NOT_PLAIN.search(url)
        if plain and len(_PATHS) < _PATHS_MAX:
            _PATHS[url] = path
        return path, query

    # --- responses, in order -------------------------------------------------

    def _dispatch(self, request: Request, keep_alive: bool) -> None:
        head = request.method == "HEAD"
        http10 = request.http_version == "1.0"
        server = self._server
        if (self._shedding or server._in_flight >= server._max_in_flight) and server._sheds(
            request
        ):
            result: object = _SHED
        else:
            try:
                result = self._handler(request)
            except Exception as exc:
                server._report(exc)
                result = _internal_error()
        self._deliver(result, keep_alive, head, http10)

    def _deliver(self, result: object, keep_alive: bool, head: bool, http10: bool) -> None:
        """Write (or queue behind the pending ones) a handler's answer to a request."""
        if not isinstance(result, Response):
            if result.__class__ is Later:
                self._await_later(result, keep_alive, head, http10)
                return
            if result.__class__ is _Future or inspect.isawaitable(result):
                self._await_response(result, keep_alive, head, http10)
                return
            self._server._report(TypeError(f"handler returned {type(result).__name__}"))
            result = _internal_error()
        if self._pending:
            self._pending.append(_Slot(result, keep_alive, head, http10))
            return
        response = result  # typed Response in the compiled build: its fields read directly
        if keep_alive and not (self._closing or head or http10):
            # _write_response inlined for encoded header lines on a keep-alive HTTP/1.1
            # connection
            data = self._encoded(response)
            if data is not None:
                self._out.append(data)
                self._out_size += len(data)
                if self._out_size >= _FLUSH_AT:
                    self._write_out()
                return
        self._write_response(response, keep_alive, head, http10)

    def _encoded(self, response: Response) -> bytes | None:
        """A response with encoded header lines (``Response.head``) and a body its status
        allows, as the bytes a keep-alive HTTP/1.1 connection writes (what
        ``_encode_response`` gives, joined: a bytes ``%`` parses its format); None for
        any other (``_write_response`` encodes it)."""
        lines = response.head
        if lines is None:
            return None
        status_lines = _BODY_STATUS_LINES  # (a typed dict when compiled: PyDict_GetItem)
        status_line = status_lines.get(response.status)
        body = response.body
        if status_line is None or body.__class__ is not bytes:
            return None
        return b"".join(
            (
                status_line,
                self._server._date_server,
                lines,
                b"Content-Length: ",
                f"{len(body)}".encode(),  # a C integer's digits when compiled
                b"\r\n\r\n",
                body,
            )
        )

    def _await_response(
        self, result: Awaitable[Response], keep_alive: bool, head: bool, http10: bool
    ) -> None:
        slot = _Slot(None, keep_alive, head, http10)
        if isinstance(result, _Future):
            task = result  # a bare future (a store's later decision) or a task: no new task
        else:
            task = asyncio.ensure_future(result, loop=self._loop)
        self._server._in_flight += 1
        slot.task = task
        pending = self._pending
        pending.append(slot)
        task.add_done_callback(functools.partial(self._on_response_done, slot))
        if len(pending) >= self._max_pipelined:
            self._update_reading()

    def _await_later(self, later: Later, keep_alive: bool, head: bool, http10: bool) -> None:
        """A ``Later``: its place in the answer order, as ``_await_response`` gives a
        future's (and counted in flight alike), answered by its ``resolve``."""
        if later._slot is not None or later.cancelled:  # a handler's bug
            self._server._report(RuntimeError("a Later was returned twice"))
            self._deliver(_internal_error(), keep_alive, head, http10)
            return
        ready = later._ready
        if ready is not None:  # answered before it got here: as given, once
            later._ready = None
            later.cancelled = True
            self._deliver(ready, keep_alive, head, http10)
            return
        slot = _Slot(None, keep_alive, head, http10)
        self._server._in_flight += 1
        slot.task = later
        later._slot = slot
        later._connection = self
        pending = self._pending
        pending.append(slot)
        if len(pending) >= self._max_pipelined:
            self._update_reading()

    def _on_response_done(self, slot: _Slot, task: asyncio.Future[Response]) -> None:
        slot.task = None
        server = self._server
        server._in_flight -= 1
        if self._lost:
            return
        ready: object
        if task.cancelled():
            ready = _internal_error()
        elif (exc := task.exception()) is not None:
            server._report(exc)
            ready = _internal_error()
        else:
            ready = task.result()
            if not isinstance(ready, Response):
                server._report(TypeError(f"handler returned {type(ready).__name__}"))
                ready = _internal_error()
        self._answered(slot, ready)

    def _on_later(self, slot: _Slot, ready: object) -> None:
        """A ``Later``'s ``resolve``: ``_on_response_done`` for an answer at hand."""
        slot.task = None
        server = self._server
        server._in_flight -= 1
        if self._lost:
            return
        if not isinstance(ready, Response):
            server._report(TypeError(f"handler returned {type(ready).__name__}"))
            ready = _internal_error()
        self._answered(slot, ready)

    def _answered(self, slot: _Slot, ready: Response) -> None:
        """``slot``'s answer is ``ready``: written now if it is first in line (and the
        ready ones behind it), else when those before it are."""
        pending = self._pending
        if not pending or pending[0] is not slot:
            slot.ready = ready  # written when the slots before it are (_drain)
            return
        response: Response = ready
        data = None
        if (
            len(pending) == 1
            and slot.keep_alive
            and not (slot.head or slot.http10 or self._closing or self._deferred or self._out)
        ):
            data = self._encoded(response)
        if data is not None:
            # the usual answer (one awaited, nothing behind it, encoded header lines on a
            # keep-alive HTTP/1.1 connection): _drain and _write_response inlined as in
            # _deliver, and written
            pending.clear()
            transport = self._transport
            if not transport.is_closing():
                transport.write(data)
            if self._reading_paused:
                self._update_reading()
            now = self._loop.time()
            if self._in_message or self._reading_paused:
                self._refresh_deadline(now)
            else:  # idle again: _refresh_deadline's first branch, inlined
                deadline = self._deadline = now + self._keepalive
                if self._timer is None or deadline < self._timer_at:
                    self._refresh_deadline(now)
            return
        slot.ready = response
        self._drain()

    def _answer_ready(self, answer: Response | bytes, keep_alive: bool) -> None:
        """Queue a response (or interim bytes) that needs no handler, behind all others."""
        if self._deferred:
            self._deferred.append((answer, keep_alive))
        else:
            self._answer_after_pending(answer, keep_alive)

    def _answer_after_pending(self, answer: Response | bytes, keep_alive: bool) -> None:
        if self._pending:
            self._pending.append(_Slot(answer, keep_alive, False, False))
        elif isinstance(answer, Response):
            self._write_response(answer, keep_alive, False, False)
        else:
            self._out.append(answer)

    def _drain(self) -> None:
        """Write the ready slots at the front of the queue, then what was deferred."""
        pending = self._pending
        while pending and pending[0].ready is not None:
            slot = pending.popleft()
            ready = slot.ready
            if isinstance(ready, Response):
                self._write_response(ready, slot.keep_alive, slot.head, slot.http10)
            elif ready is not None:
                self._out.append(ready)
        self._run_deferred()
        self._flush()
        self._update_reading()
        self._refresh_deadline(self._loop.time())

    def _run_deferred(self) -> None:
        deferred = self._deferred
        limit = self._limits.max_pipelined
        while deferred and not self._write_paused and len(self._pending) < limit:
            item, keep_alive = deferred.popleft()
            if isinstance(item, Request):
                self._dispatch(item, keep_alive)
            else:
                self._answer_after_pending(item, keep_alive)

    def _write_response(
        self, response: Response, keep_alive: bool, head: bool, http10: bool
    ) -> None:
        if self._closing and not self._pending and not self._deferred:
            keep_alive = False  # the last answer before closing says so
        try:
            data, close = _encode_response(
                response, self._server._date_server, keep_alive, head, http10
            )
        except Exception as exc:  # a malformed Response must not break the connection
            self._server._report(exc)
            data, close = _encode_response(
                _internal_error(), self._server._date_server, keep_alive, False, http10
            )
        self._out.append(data)
        self._out_size += len(data)
        if close:
            self._closing = True
            if self._pending or self._deferred:
                # The handler asked to close: requests read after this one go unanswered.
                for slot in self._pending:
                    if slot.task is not None:
                        slot.task.cancel()
                self._pending.clear()
                self._deferred.clear()
        if self._out_size >= _FLUSH_AT:
            self._write_out()

    def _fail(self, response: Response) -> None:
        """Answer an unreadable request after those before it, then close."""
        if self._failed:
            return
        self._failed = True
        self._closing = True
        self._in_message = False
        self._answer_ready(response, False)

    def _head_too_large(self) -> Response:
        limits = self._limits
        return problem(
            431,
            None,
            f"the request head exceeds {limits.max_header_bytes} bytes "
            f"or {limits.max_headers} header fields",
        )

    def _body_too_large(self) -> Response:
        return problem(
            413,
            "Content Too Large",
            f"the request body exceeds {self._limits.max_body_bytes} bytes",
        )

    # --- writing and closing -------------------------------------------------

    def _write_out(self) -> None:
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self._out_size = 0
            if not self._lost and not self._transport.is_closing():
                self._transport.write(data)

    def _flush(self) -> None:
        self._write_out()
        if self._closing and not self._pending and not self._deferred and not self._lingering:
            self._begin_close()

    def _begin_close(self) -> None:
        transport = self._transport
        if self._lost or transport.is_closing():
            return
        if self._peer_eof or not transport.can_write_eof() or self._server._shutting_down:
            transport.close()  # shutting down: a stop does not wait for lingering clients
            return
        transport.write_eof()
        self._lingering = True
        now = self._loop.time()
        self._linger_until = now + _LINGER_SECONDS
        if self._reading_paused:  # read, to see the client's EOF
            self._reading_paused = False
            transport.resume_reading()
        self._refresh_deadline(now)

    def _update_reading(self) -> None:
        blocked = (
            self._write_paused
            or bool(self._deferred)
            or len(self._pending) >= self._limits.max_pipelined
        )
        if (
            blocked == self._reading_paused
            or self._lost
            or self._lingering
            or self._transport.is_closing()
        ):
            return
        self._reading_paused = blocked
        if blocked:
            self._transport.pause_reading()
        else:
            self._transport.resume_reading()
            # the client was not slow while we were not reading
            self._head_started = self._body_started = self._loop.time()

    def begin_shutdown(self) -> None:
        """Answer what was read (the last answer with ``Connection: close``), then close."""
        if self._lingering:
            # Its answer is written and half-closed; lingering only keeps reading
            # what the client still sends. Waiting for that would hold the stop
            # up for _LINGER_SECONDS whenever a client keeps its end open.
            self._transport.close()
            return
        if self._lost or self._closing or self._in_message:
            return  # a message being received is answered with Connection: close
        self._closing = True
        if not self._pending and not self._deferred:
            self._transport.close()  # idle

    def abort(self) -> None:
        if not self._lost:
            self._transport.abort()

    # --- deadlines -----------------------------------------------------------

    def _refresh_deadline(self, now: float) -> None:
        limits = self._limits
        if not (self._in_message or self._pending or self._closing or self._reading_paused):
            deadline = now + limits.keepalive_timeout  # idle
        elif self._lingering:
            deadline = self._linger_until
        elif self._write_paused:
            deadline = self._paused_at + limits.body_timeout
        elif self._reading_paused or self._closing or not self._in_message:
            deadline = 0.0  # handlers are at work: that time is ours, not the client's
        elif self._head_done:
            deadline = self._body_started + limits.body_timeout
        else:
            deadline = self._head_started + limits.header_timeout
        self._deadline = deadline
        if deadline and not self._lost and (self._timer is None or deadline < self._timer_at):
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if self._lost or not deadline:
            return
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline
            return
        if self._lingering:
            self._transport.close()
        elif self._write_paused:
            self._transport.abort()  # the client stopped reading
        elif self._in_message:
            what = "body" if self._head_done else "request head"
            self._fail(problem(408, None, f"the {what} was not received in time"))
            self._flush()
        else:
            self._transport.close()  # idle keep-alive


class _Refused(asyncio.Protocol):
    """A connection beyond ``max_connections``: answered 503 without reading, then closed."""

    __slots__ = ("_server", "_timer", "_transport")

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport  # set by connection_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._server._refused.add(self)
        overloaded = problem(
            503,
            None,
            "the server has too many open connections; retry shortly",
            headers=[("Retry-After", "1")],
        )
        data, _ = _encode_response(overloaded, self._server._date_server, False, False, False)
        self._transport.write(data)
        if self._transport.can_write_eof():
            self._transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(_LINGER_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # discarded: the request is refused unread

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._server._forget(self)

    def abort(self) -> None:
        self._transport.abort()


class HttpServer:
    """Serves one handler over HTTP/1.1 on one event loop (uvloop recommended)."""

    #: ``yield_to()`` at this level or above: the reserved work is far behind, and
    #: turns are shed for it whatever the last one's length (``_tick_lag``), unless
    #: ``shed_lag`` is beyond ``SHEDDING_OFF_S`` (shedding off)
    FAR_BEHIND = 2
    SHEDDING_OFF_S = 10.0

    def __init__(
        self,
        handler: Handler,
        limits: ServerLimits | None = None,
        *,
        on_error: Callable[[BaseException], None] | None = None,
        server_header: str = "bucketmesh",
        tls: TlsContexts | None = None,
    ) -> None:
        if tls is not None and not tls.files.serves:
            raise ValueError("a TLS listener needs a certificate (tls.certFile)")
        if "\r" in server_header or "\n" in server_header:
            raise ValueError("CR or LF in server_header")
        self._handler = handler
        self._limits = limits if limits is not None else ServerLimits()
        self._on_error = on_error
        self._server_header = server_header.encode("latin-1")
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._refused: set[_Refused] = set()
        self._tls = tls
        self._max_in_flight = self._limits.max_in_flight
        self._shed_lag = self._limits.shed_lag  # read per read by _shedding_now
        self._in_flight = 0  # awaited handler answers, all connections
        self._lag_timer: asyncio.TimerHandle | None = None
        self._lag_due = 0.0
        self._fast_shed = True  # answer shed requests without the parser (tests compare both)
        self._shed_answer = b""  # the 503 of the fast shed path, encoded (with the Date)
        #: requests answered 503 by shedding, by cause: loop lag, max_in_flight, or a turn
        #: shed whole so that reserved work that is behind (``yield_to``) gets the loop
        self.shed = {"lag": 0, "in_flight": 0, "yield": 0}
        #: whether reserved work the node does on this loop is behind (the sync sender:
        #: more deltas queued for a peer than its pipeline carries in one round); while
        #: it is and the last turn of the loop ran past half ``shed_lag``, the turn is
        #: shed whole, so that work gets the loop's next turns (``_tick_lag``); at
        #: ``FAR_BEHIND`` (or more) whatever the last turn's length
        self.yield_to: Callable[[], int] | None = None
        self._shed_cause = "lag"  # what the shed reads of this turn are counted as
        self._busy = False  # the last turn ran past half shed_lag (and yield_to is set)
        #: of the requests shed for lag, those answered by the fast path, unparsed
        self.shed_unparsed = 0
        #: the worst lateness of the lag timer in the last whole second (seconds)
        self.loop_lag = 0.0
        self._lag_worst = 0.0  # in the second under way
        # the last turn of the loop ran past twice shed_lag: this one is shed whole
        self._stale_turn = False
        self._shutting_down = False
        self._all_closed: asyncio.Event | None = None
        self._date_timer: asyncio.TimerHandle | None = None
        self._date_server = b""
        self._stamp_date()

    async def start(
        self,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        sock: socket.socket | None = None,
    ) -> None:
        """Listen on ``host:port`` (port 0: any free port), or on an already bound ``sock``."""
        if self._server is not None:
            raise RuntimeError("HttpServer already started")
        loop = asyncio.get_running_loop()

        def make_protocol() -> asyncio.Protocol:
            if len(self._connections) >= self._limits.max_connections:
                return _Refused(self)
            return cast(asyncio.Protocol, _Connection(self, loop))

        context = self._tls.listener_context() if self._tls is not None else None
        handshake_timeout = self._limits.header_timeout if context is not None else None
        if sock is not None:
            self._server = await loop.create_server(
                make_protocol,
                sock=sock,
                backlog=_BACKLOG,
                ssl=context,
                ssl_handshake_timeout=handshake_timeout,
            )
        else:
            self._server = await loop.create_server(
                make_protocol,
                host,
                port,
                reuse_port=reuse_port or None,
                backlog=_BACKLOG,
                ssl=context,
                ssl_handshake_timeout=handshake_timeout,
            )
        self._tick_date()
        self._lag_due = loop.time() + _LAG_TICK_S
        self._lag_timer = loop.call_at(self._lag_due, self._tick_lag)

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("HttpServer is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def shutdown(self, grace: float = 10.0) -> None:
        """Stop accepting; answer requests already read (the last one on each connection
        with ``Connection: close``); close idle connections; abort what remains after
        ``grace`` seconds. On return no connection is left open."""
        if self._server is None:
            return
        self._shutting_down = True
        self._server.close()
        for connection in list(self._connections):
            connection.begin_shutdown()
        for refused in list(self._refused):
            refused.abort()
        if self._connections or self._refused:
            if self._all_closed is None:
                self._all_closed = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_closed.wait(), grace)
            except asyncio.TimeoutError:
                for connection in list(self._connections):
                    connection.abort()
                for refused in list(self._refused):
                    refused.abort()
                await self._all_closed.wait()  # abort() reports connection_lost next iteration
        await self._server.wait_closed()
        if self._date_timer is not None:
            self._date_timer.cancel()
            self._date_timer = None
        if self._lag_timer is not None:
            self._lag_timer.cancel()
            self._lag_timer = None

    def _forget(self, connection: _Connection | _Refused) -> None:
        if isinstance(connection, _Connection):
            self._connections.discard(connection)
        else:
            self._refused.discard(connection)
        self._check_all_closed()

    def _check_all_closed(self) -> None:
        if self._all_closed is not None and not self._connections and not self._refused:
            self._all_closed.set()

    def _report(self, exc: BaseException) -> None:
        if self._on_error is not None:
            try:
                self._on_error(exc)
                return
            except Exception:
                _log.exception("on_error callback failed")
        _log.error("request handler failed", exc_info=exc)

    def _tick_lag(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        late = now - self._lag_due
        if late > self._lag_worst:
            self._lag_worst = late
        # The timer fires at the start of a turn, so ``late`` is about how long the last
        # turn ran: what the sockets hold now has waited that long. Past twice shed_lag
        # (one serving share and the shedding of the rest take less), serving it would
        # answer requests that already waited beyond the bound: shed this turn whole.
        # Reserved work on this loop that is behind (the sync sender of a flooded node:
        # each of its messages waits a turn for its ack, and turns of a flooded loop last
        # tens of milliseconds) gets the next turns: a turn shed whole is short. Asked
        # again at each read of a busy loop (_shedding_now), since several turns may
        # serve before the next tick.
        # Far behind (``yield_to()`` at ``FAR_BEHIND``: the sync sender's oldest queued
        # delta waits past its bound) every turn is shed for it, whatever its length: a
        # flooded node whose turns stay short of half shed_lag, or alternate long and
        # short, still admits more new keys than it replicates, and its lag grew to
        # seconds (R6, 1x). Not with shedding off (a shed_lag of hours).
        shed_lag = self._limits.shed_lag
        stale = late > 2 * shed_lag
        behind = self.yield_to() if self.yield_to is not None and not stale else 0
        far = behind >= self.FAR_BEHIND and shed_lag <= self.SHEDDING_OFF_S
        self._busy = busy = not stale and self.yield_to is not None and (late > shed_lag / 2 or far)
        yielding = busy and bool(behind)
        self._stale_turn = stale or yielding
        self._shed_cause = "yield" if yielding else "lag"
        # on until shutdown() cancels it: a stale due time would read as lag
        self._lag_due = now + _LAG_TICK_S
        self._lag_timer = loop.call_at(self._lag_due, self._tick_lag)

    def _shedding_now(self) -> bool:
        """Whether a read handled now is shed: the lag timer is overdue by more than
        ``shed_lag``, so this turn of the event loop has run that long (or the loop
        has not turned for that long) and what is read now would wait behind it; or
        the last turn ran past twice ``shed_lag``, so what is read now waited through it;
        or the loop is busy and reserved work on it is behind (``yield_to``)."""
        if self._stale_turn:
            return True
        if _monotonic() - self._lag_due > self._shed_lag:
            self._shed_cause = "lag"
            return True
        if self._busy and self.yield_to is not None and self.yield_to():
            self._shed_cause = "yield"
            return True
        return False

    def _sheds(self, request: Request) -> bool:
        """Whether to answer ``request`` 503 now (called only while its chunk is shed or
        ``max_in_flight`` answers are awaited): yes unless it is reserved."""
        if request.method == "PATCH" or request.path.startswith(_RESERVED):
            return False
        if self._in_flight >= self._max_in_flight:
            self.shed["in_flight"] += 1
            return True
        self.shed[self._shed_cause] += 1  # the chunk it came in was shed
        return True

    def _stamp_date(self) -> None:
        now = time.time()
        self._date_server = b"Date: %s\r\nServer: %s\r\n" % (
            formatdate(now, usegmt=True).encode("ascii"),
            self._server_header,
        )
        self._shed_answer = _encode_response(_overloaded(), self._date_server, True, False, False)[
            0
        ]

    def _tick_date(self) -> None:
        self._stamp_date()
        self.loop_lag = self._lag_worst
        self._lag_worst = 0.0
        if not self._shutting_down:
            # wake just after the next whole second
            delay = 1.0005 - time.time() % 1.0
            self._date_timer = asyncio.get_running_loop().call_later(delay, self._tick_date)
