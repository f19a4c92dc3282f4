"""Envoy's rate limit service (gRPC ``envoy.service.ratelimit.v3.RateLimitService``).

Owns the mapping from an Envoy ``RateLimitRequest`` onto the decision seam
(``core/decisions.py``: the in-memory limiter or the Redis backend) and the
gRPC server (HTTP/2 on ``h2``, below) that answers it on its own port
(``envoyListen``), on the node's event loop but apart from the HTTP server's hot
path. Decisions go through the
same store as the Rating API's, so they replicate like any other, are counted in
``bucketmesh_decisions_total`` like any other, and wait for the store's commit
barrier (the write-ahead log) before the answer leaves.

Mapping (README section "Envoy"): a descriptor with entries ``(k1, v1), (k2, v2)``
in domain ``d`` is the bucket key ``d:k1=v1,k2=v2``, with ``%``, ``,`` and ``=``
percent-escaped in each entry's key and value (``%`` and ``:`` in the domain), so
one entry can never spell two (``(user, "bob,plan=gold")`` is
``d:user=bob%2Cplan%3Dgold``); its limits come from the rule named ``d.k1.k2``
(the descriptor's keys), else from the rule named ``d``. When a rule's key
template could have produced that text, the key belongs to that rule: any other
rule uses it with ``%@<rule name>`` appended (``core.rules.own_key``), so a client
of the HTTP door cannot reach a descriptor's bucket, nor the other way round.
A descriptor no rule names is answered OK with no limit and charges nothing
(as Envoy's reference service does for descriptors without a configured
limit). Each limited descriptor is charged ``hits_addend`` (0 means 1); the
overall code is OVER_LIMIT if any descriptor is denied. Descriptors are
charged independently, as in the reference service: one denied descriptor
does not refund the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import ssl
import types
from collections.abc import Coroutine, Generator, Mapping, Sequence
from typing import Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import msgspec
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError

from bucketmesh.core.bucket import Decision
from bucketmesh.core.decisions import Decider
from bucketmesh.core.limiter import BucketCapReached, InvalidTokens, KeyTooLong, check_key
from bucketmesh.core.rules import Rule, descriptor_key, descriptor_rule_names, own_key
from bucketmesh.http.tls import TlsContexts
from bucketmesh.integrations.proto import rls_pb2
from bucketmesh.telemetry.log import logger
from bucketmesh.telemetry.metrics import NodeMetrics
from bucketmesh.telemetry.outcomes import Outcomes

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
_Limit = rls_pb2.RateLimitResponse.RateLimit
# Envoy's units, largest first: a limit is reported in the smallest unit in
# which the refill rate is a whole number of tokens (else rounded, in days).
_UNITS = ((_Limit.SECOND, 1), (_Limit.MINUTE, 60), (_Limit.HOUR, 3600), (_Limit.DAY, 86400))
# Envoy sends short requests; anything larger is not a rate-limit request.
MAX_MESSAGE_BYTES = 64 * 1024
MAX_DESCRIPTORS = 64


class BadRequest(ValueError):
    """A request Envoy would never send; answered INVALID_ARGUMENT naming the field."""


def _current_limit(decision: Decision) -> Any:
    rate = decision.refill_rate
    unit, per_unit = _Limit.DAY, rate * 86400
    for candidate, seconds in _UNITS:
        if rate * seconds >= 1 and math.isclose(
            rate * seconds, round(rate * seconds), rel_tol=1e-9
        ):
            unit, per_unit = candidate, rate * seconds
            break
    return _Limit(name=decision.rule, requests_per_unit=round(per_unit), unit=unit)


#: What h2 raises when an answer goes to a stream the client reset: a stream it still
#: knows as closed, or one it already forgot (a reset read with the request's end, then
#: answered: h2 takes the answer for a new stream). Other protocol errors are bugs.
_GONE: Final = (
    h2.exceptions.NoSuchStreamError,
    h2.exceptions.StreamIDTooLowError,
    h2.exceptions.TooManyStreamsError,
)

#: ``limit_remaining`` is a uint32 in the proto; a bucket may hold more (capacity up
#: to 2^53 - 1): it reads as the most the field holds
_MAX_REMAINING: Final = 2**32 - 1


def _remaining(decision: Decision) -> int:
    return min(max(0, decision.tokens_remaining), _MAX_REMAINING)


def _status(decision: Decision) -> Any:
    # Until reset: when denied, how long until the request could pass; when
    # allowed, how long until the bucket is full again.
    wait = decision.retry_after if not decision.allowed else decision.reset_after
    whole = math.floor(wait)
    return rls_pb2.RateLimitResponse.DescriptorStatus(
        code=OK if decision.allowed else OVER_LIMIT,
        current_limit=_current_limit(decision),
        limit_remaining=_remaining(decision),
        duration_until_reset=Duration(seconds=whole, nanos=round((wait - whole) * 1e9) % 10**9),
    )


def parse(
    request: Any, rules: Sequence[Rule], rules_by_name: Mapping[str, Rule]
) -> list[tuple[str, str | None]]:
    """Each descriptor's bucket key and the rule that limits it (None: unlimited).

    Raises BadRequest for an empty domain, no descriptors, an empty entry list or a
    limited descriptor whose bucket key is too long to replicate (before any is charged).
    """
    domain: str = request.domain
    if not domain:
        raise BadRequest("domain must not be empty")
    if not request.descriptors:
        raise BadRequest("descriptors must not be empty")
    if len(request.descriptors) > MAX_DESCRIPTORS:
        raise BadRequest(f"descriptors: at most {MAX_DESCRIPTORS}")
    parsed: list[tuple[str, str | None]] = []
    for index, descriptor in enumerate(request.descriptors):
        entries = [(e.key, e.value) for e in descriptor.entries]
        if not entries:
            raise BadRequest(f"descriptors[{index}].entries must not be empty")
        if any(not k for k, _ in entries):
            raise BadRequest(f"descriptors[{index}].entries: a key must not be empty")
        names = descriptor_rule_names(domain, [k for k, _ in entries])
        rule = next((n for n in names if n in rules_by_name), None)
        key = descriptor_key(domain, entries)
        if rule is not None:
            key = own_key(rules, key, rule)
            try:
                check_key(key)
            except KeyTooLong as error:
                raise BadRequest(f"descriptors[{index}]: {error}") from None
        parsed.append((key, rule))
    return parsed


async def _settled(answer: Any) -> Any:
    """A decider's answer, now or later."""
    return await answer if hasattr(answer, "__await__") else answer


async def decide(
    decider: Decider,
    request: Any,
    metrics: NodeMetrics | None = None,
    outcomes: Outcomes | None = None,
) -> Any:
    """The RateLimitResponse for ``request``: each limited descriptor charged on its
    own, as Envoy's reference service does. Raises BadRequest (see ``parse``).
    ``outcomes`` (instead of ``metrics``) also counts near_limit, writes the audit
    trail and answers a shadow rule's refusal OK (Envoy ratelimit's shadow_mode)."""
    hits = request.hits_addend or 1
    statuses = []
    overall = OK
    for key, rule in parse(request, decider.rules, decider.rules_by_name):
        if rule is None:
            statuses.append(rls_pb2.RateLimitResponse.DescriptorStatus(code=OK))
            continue
        try:
            decision: Decision = await _settled(decider.acquire(key, hits, rule=rule))
        except InvalidTokens:
            # more hits than the bucket can ever hold: never allowed
            peek: Decision = await _settled(decider.acquire(key, 0, rule=rule))
            decision = msgspec.structs.replace(peek, allowed=False, retry_after=math.inf)
        if outcomes is not None:
            if outcomes.observe(decision, hits):  # shadow: counted, answered OK
                decision = msgspec.structs.replace(decision, allowed=True)
        elif metrics is not None:
            metrics.count_decision(decision.rule, decision.allowed)
        if not decision.allowed:
            overall = OVER_LIMIT
        status = _status(decision) if math.isfinite(decision.retry_after) else None
        if status is None:
            status = rls_pb2.RateLimitResponse.DescriptorStatus(
                code=OK if decision.allowed else OVER_LIMIT,  # OK: shadow
                current_limit=_current_limit(decision),
                limit_remaining=_remaining(decision),
            )
        statuses.append(status)
    return rls_pb2.RateLimitResponse(overall_code=overall, statuses=statuses)


# -- the gRPC server ---------------------------------------------------------------
#
# A unary gRPC service on HTTP/2 (gRPC over HTTP/2: PROTOCOL-HTTP2.md of grpc/grpc),
# on the sans-I/O ``h2`` state machine, which does the framing, HPACK and both
# directions of flow control; this module does gRPC's part: the request's
# ``:method``/``content-type``/``:path``, the length-prefixed message, the deadline
# (``grpc-timeout``), the answer (headers, one message, trailers with
# ``grpc-status``) and errors as status trailers. grpc.aio's server cost about
# twice this one's CPU per call behind a real Envoy, grpclib's about 1.7 times
# (BENCHMARKS.md, "P8 gRPC servers compared").

SERVICE_PATH = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
_PATH = SERVICE_PATH.encode()


class Status:
    """gRPC status codes (the subset this service answers)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


class CallError(Exception):
    """A call answered with a gRPC status other than OK."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class RateLimitServicer:
    """Answers ShouldRateLimit from the decision seam, once the store's commit barrier
    says the grants are durable (else UNAVAILABLE: the tokens stay spent)."""

    def __init__(
        self,
        decider: Decider,
        metrics: NodeMetrics | None = None,
        *,
        outcomes: Outcomes | None = None,
    ) -> None:
        self.decider = decider
        self.metrics = metrics
        self.outcomes = outcomes

    async def call(self, payload: bytes) -> bytes:
        """One call: the request message's bytes in, the response's out (CallError)."""
        try:
            request = rls_pb2.RateLimitRequest.FromString(payload)
        except DecodeError as error:
            raise CallError(Status.INTERNAL, f"cannot parse the request: {error}") from None
        try:
            response = await decide(self.decider, request, self.metrics, self.outcomes)
        except BadRequest as error:
            raise CallError(Status.INVALID_ARGUMENT, str(error)) from None
        except BucketCapReached as error:
            # Envoy's failure_mode_deny decides what an unavailable service means
            raise CallError(Status.RESOURCE_EXHAUSTED, str(error)) from None
        barrier = self.decider.commit()
        if barrier is not None and not await barrier:
            # the tokens stay spent in memory (erring toward safety); Envoy is told no
            raise CallError(Status.UNAVAILABLE, "the decision could not be made durable; retry")
        data: bytes = response.SerializeToString()
        return data


_log = logger("envoy")

_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"))
_OK_TRAILERS = ((b"grpc-status", b"0"),)
# percent-encoding of grpc-message: printable ASCII but '%' passes as is
_MESSAGE_SAFE = frozenset(range(0x20, 0x7F)) - {0x25}


def parse_timeout(value: bytes) -> float | None:
    """Seconds from a ``grpc-timeout`` value (1 to 8 digits and a unit), else None."""
    digits, unit = value[:-1], value[-1:]
    if not 1 <= len(digits) <= 8 or not digits.isdigit() or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]


def encode_message(message: str) -> bytes:
    """``grpc-message``'s percent-encoding of UTF-8 text."""
    return b"".join(bytes((b,)) if b in _MESSAGE_SAFE else b"%%%02X" % b for b in message.encode())


@types.coroutine
def _resume(coro: Coroutine[Any, Any, bytes], pending: Any) -> Generator[Any, Any, bytes]:
    """Go on driving a coroutine that already ran until it first waited (``pending``
    is what it yielded), inside a task: what ``await`` would have done from the start."""
    while True:
        try:
            sent = yield pending
        except BaseException as error:  # the task was cancelled: into the coroutine
            try:
                pending = coro.throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
        else:
            try:
                pending = coro.send(sent)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]


class _Stream:
    __slots__ = ("body", "deadline", "outbox", "task", "timer")

    def __init__(self, deadline: float | None) -> None:
        self.body = bytearray()
        self.deadline = deadline
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        # what flow control holds back: data, then trailers (sent when the window opens)
        self.outbox: tuple[bytes, Sequence[tuple[bytes, bytes]]] | None = None


class GrpcConnection(asyncio.Protocol):
    """One HTTP/2 connection (Envoy keeps one per worker and multiplexes its calls)."""

    def __init__(self, server: EnvoyServer) -> None:
        self.server = server
        self.servicer = server.servicer
        self.loop = asyncio.get_running_loop()
        self.conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(
                client_side=False,
                header_encoding=None,
                # ours are constant and valid: checking them on every call is wasted
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_BYTES,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.streams: dict[int, _Stream] = {}
        self.transport: asyncio.Transport | None = None
        self.closing = False

    # -- the connection ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.server.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn.initiate_connection()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        for stream in self.streams.values():
            self._cancel(stream)
        self.streams.clear()
        self.server.drained()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def go_away(self) -> None:
        """No new calls (the server stops): GOAWAY, calls in flight still answered."""
        if not self.closing and self.transport is not None:
            self.closing = True
            self.conn.close_connection()
            self.flush()
            if not self.streams:
                self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            events: list[Any] = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as error:
            _log.debug("envoyListen: HTTP/2 protocol error, closing: %s", error)
            self.flush()  # h2 queued the GOAWAY
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                self._data(event)
            elif kind is h2.events.RequestReceived:
                self._request(event)
            elif kind is h2.events.StreamEnded:
                self._ended(event.stream_id)
            elif kind is h2.events.StreamReset:
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    self._cancel(stream)  # the client gave up (its deadline, or Envoy's)
            elif kind is h2.events.WindowUpdated:
                self._window_opened(event.stream_id)
            elif kind is h2.events.ConnectionTerminated:
                self.closing = True
                if self.transport is not None and not self.streams:
                    self.flush()
                    self.transport.close()
                    return
        self.flush()

    # -- calls ------------------------------------------------------------------

    def _request(self, event: Any) -> None:
        stream_id = event.stream_id
        headers = dict(event.headers)
        if headers.get(b":method") != b"POST":
            self._refuse_http(stream_id, b"405")
            return
        content_type = headers.get(b"content-type", b"")
        if not (
            content_type == b"application/grpc"
            or content_type.startswith(b"application/grpc+")
            or content_type.startswith(b"application/grpc;")
        ):
            self._refuse_http(stream_id, b"415")
            return
        if headers.get(b":path") != _PATH:
            self._answer_error(stream_id, Status.UNIMPLEMENTED, "unknown method")
            return
        encoding = headers.get(b"grpc-encoding", b"identity")
        if encoding != b"identity":
            self._answer_error(
                stream_id,
                Status.UNIMPLEMENTED,
                f"grpc-encoding {encoding.decode(errors='replace')} is not supported",
                ((b"grpc-accept-encoding", b"identity"),),
            )
            return
        deadline = None
        timeout = headers.get(b"grpc-timeout")
        if timeout is not None:
            seconds = parse_timeout(timeout)
            if seconds is None:
                self._answer_error(stream_id, Status.INTERNAL, "malformed grpc-timeout")
                return
            deadline = self.loop.time() + seconds
        self.streams[stream_id] = _Stream(deadline)

    def _data(self, event: Any) -> None:
        stream_id = event.stream_id
        # flow control: what we read frees the window whatever becomes of it
        self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
        stream = self.streams.get(stream_id)
        if stream is None or stream.task is not None:
            return
        stream.body += event.data
        if len(stream.body) > MAX_MESSAGE_BYTES + 5:
            del self.streams[stream_id]
            self._answer_error(
                stream_id,
                Status.RESOURCE_EXHAUSTED,
                f"request larger than {MAX_MESSAGE_BYTES} bytes",
            )
            self._reset(stream_id)

    def _ended(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.task is not None:
            return
        body = stream.body
        if len(body) < 5 or int.from_bytes(body[1:5], "big") != len(body) - 5:
            self.streams.pop(stream_id)
            self._answer_error(
                stream_id, Status.INTERNAL, "a unary call needs exactly one whole request message"
            )
            return
        if body[0] != 0:
            self.streams.pop(stream_id)
            self._answer_error(
                stream_id,
                Status.UNIMPLEMENTED,
                "compressed messages are not supported",
                ((b"grpc-accept-encoding", b"identity"),),
            )
            return
        if stream.deadline is not None and self.loop.time() >= stream.deadline:
            # nothing charged: the client has given up already
            self.streams.pop(stream_id)
            self._answer_error(stream_id, Status.DEADLINE_EXCEEDED, "deadline exceeded")
            return
        coro = self.servicer.call(bytes(body[5:]))
        try:
            pending = coro.send(None)
        except StopIteration as done:  # the memory store answers at once: no task
            self.streams.pop(stream_id)
            self._answer(stream_id, stream, done.value)
            return
        except CallError as error:
            self.streams.pop(stream_id)
            self._answer_error(stream_id, error.status, error.message)
            return
        except Exception as error:  # a bug: the caller is told, the node keeps serving
            self.streams.pop(stream_id)
            _log.exception("envoyListen: ShouldRateLimit failed")
            self._answer_error(stream_id, Status.UNKNOWN, f"{type(error).__name__}: {error}")
            return
        # it waits (the write-ahead log's barrier, a Redis call): finish in a task
        stream.task = self.loop.create_task(self._finish(stream_id, stream, coro, pending))
        if stream.deadline is not None:
            stream.timer = self.loop.call_at(stream.deadline, self._expired, stream_id)

    async def _finish(
        self, stream_id: int, stream: _Stream, coro: Coroutine[Any, Any, bytes], pending: Any
    ) -> None:
        try:
            answer = await _resume(coro, pending)
        except asyncio.CancelledError:
            return  # reset by the client, or past its deadline (answered there)
        except CallError as error:
            if self.streams.pop(stream_id, None) is not None:
                self._answer_error(stream_id, error.status, error.message)
        except Exception as error:
            _log.exception("envoyListen: ShouldRateLimit failed")
            if self.streams.pop(stream_id, None) is not None:
                self._answer_error(stream_id, Status.UNKNOWN, f"{type(error).__name__}: {error}")
        else:
            if self.streams.pop(stream_id, None) is not None:
                self._answer(stream_id, stream, answer)
        finally:
            if stream.timer is not None:
                stream.timer.cancel()
        self.flush()
        self._maybe_close()

    def _expired(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        stream.timer = None
        self._cancel(stream)  # what it charged stays charged (erring toward safety)
        self._answer_error(stream_id, Status.DEADLINE_EXCEEDED, "deadline exceeded")
        self.flush()
        self._maybe_close()

    def _cancel(self, stream: _Stream) -> None:
        if stream.task is not None:
            stream.task.cancel()
        if stream.timer is not None:
            stream.timer.cancel()

    def _maybe_close(self) -> None:
        if self.closing and not self.streams and self.transport is not None:
            self.transport.close()

    # -- answers ----------------------------------------------------------------

    def _answer(self, stream_id: int, stream: _Stream, message: bytes) -> None:
        data = b"\x00" + len(message).to_bytes(4, "big") + message
        conn = self.conn
        try:
            conn.send_headers(stream_id, _RESPONSE_HEADERS)
            if len(data) <= min(
                conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size
            ):
                conn.send_data(stream_id, data)
                conn.send_headers(stream_id, _OK_TRAILERS, end_stream=True)
            else:  # the client's window is shut: wait for its WINDOW_UPDATE
                stream.outbox = (data, _OK_TRAILERS)
                self.streams[stream_id] = stream
        except _GONE:
            pass  # the client reset it meanwhile (h2 may have forgotten it already)

    def _window_opened(self, stream_id: int) -> None:
        waiting = (
            list(self.streams.items())
            if stream_id == 0
            else [(stream_id, self.streams[stream_id])]
            if stream_id in self.streams
            else []
        )
        conn = self.conn
        for sid, stream in waiting:
            if stream.outbox is None:
                continue
            data, trailers = stream.outbox
            try:
                room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if room <= 0:
                    continue
                conn.send_data(sid, data[:room])
                data = data[room:]
                if data:
                    stream.outbox = (data, trailers)
                    continue
                conn.send_headers(sid, trailers, end_stream=True)
            except _GONE:
                pass  # reset by the client meanwhile
            self.streams.pop(sid, None)
        self._maybe_close()

    def _answer_error(
        self,
        stream_id: int,
        status: int,
        message: str,
        extra: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """A trailers-only answer: HTTP 200 with ``grpc-status`` and ``grpc-message``."""
        headers = [
            *_RESPONSE_HEADERS,
            (b"grpc-status", str(status).encode()),
            (b"grpc-message", encode_message(message)),
            *extra,
        ]
        with contextlib.suppress(*_GONE):  # reset meanwhile
            self.conn.send_headers(stream_id, headers, end_stream=True)

    def _refuse_http(self, stream_id: int, status: bytes) -> None:
        """Not a gRPC request: an HTTP status (as gRPC servers answer them)."""
        with contextlib.suppress(*_GONE):  # reset meanwhile
            self.conn.send_headers(stream_id, ((b":status", status),), end_stream=True)

    def _reset(self, stream_id: int) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)


MAX_STREAMS = 1000
MAX_HEADER_BYTES = 16 * 1024


class _GrpcTls(TlsContexts):
    """The node's certificates for the gRPC port: ALPN offers ``h2`` (gRPC clients and
    Envoy require it), also in the contexts rebuilt when the files change (checked
    at most once a second). With ``clientAuth: all`` a client certificate the CA
    signed is required (Envoy's own, in its cluster's ``transport_socket``); with
    ``sync`` none is asked for, there being no sync on this port."""

    def _build(self) -> tuple[ssl.SSLContext | None, ssl.SSLContext]:
        server, client = super()._build()
        if server is not None:
            server.set_alpn_protocols(["h2"])
            if self.files.client_auth != "all":
                server.verify_mode = ssl.CERT_NONE  # no sync on this port: ask for none
        return server, client


class EnvoyServer:
    """The gRPC server on ``host:port``; ``port`` is the bound port after start."""

    def __init__(
        self,
        servicer: RateLimitServicer,
        host: str,
        port: int,
        *,
        tls: TlsContexts | None = None,
    ) -> None:
        self.servicer = servicer
        self.host = host
        self.port = port
        # its own contexts (ALPN h2), re-read when the files change like the node's
        self.tls = _GrpcTls(tls.files) if tls is not None and tls.files.serves else None
        self.server: asyncio.base_events.Server | None = None
        self.connections: set[GrpcConnection] = set()
        self._drained: asyncio.Event | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        context = self.tls.listener_context() if self.tls is not None else None
        try:
            self.server = await loop.create_server(
                lambda: GrpcConnection(self),
                self.host or None,
                self.port,
                ssl=context,
                reuse_address=True,  # a busy port is an error, not a shared one (no SO_REUSEPORT)
                backlog=1024,
            )
        except OSError as error:
            host = f"[{self.host}]" if ":" in self.host else (self.host or "0.0.0.0")
            raise OSError(
                f"cannot listen on {host}:{self.port} (envoyListen): {error.strerror or error}"
            ) from None
        self.port = self.server.sockets[0].getsockname()[1]

    def drained(self) -> None:
        if self._drained is not None and not self.connections:
            self._drained.set()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let the calls in flight finish (up to ``grace`` s), close."""
        server, self.server = self.server, None
        if server is None:
            return
        server.close()
        self._drained = asyncio.Event()
        for connection in list(self.connections):
            connection.go_away()
        if self.connections:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drained.wait()), grace)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        await server.wait_closed()
