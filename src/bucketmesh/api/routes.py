"""The Rating API (docs/api.md): from an HTTP request to a decision, and the
operator endpoints.

``RatingApp`` registers its routes on a ``Router`` and answers them from a
``Decider`` (core/decisions.py) — the in-memory limiter or the Redis backend,
answering now or later; it knows neither. It resolves the bucket key (body
``key``, else the first rule whose template the request satisfies), asks the
decider, awaits the store's commit barrier before a grant's answer leaves, and
answers per docs/api.md: the decision JSON, 429 problem+json with
``Retry-After``, the IETF ``RateLimit-Policy`` / ``RateLimit`` headers, and
problem+json naming the field for anything malformed. It never raises for bad
input and never answers 5xx for it.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from bucketmesh.core.bucket import NS_PER_S, Bucket, BucketConfig, Decision
from bucketmesh.core.decisions import BUCKET_CAP_PROBLEM, Ask, Decider
from bucketmesh.core.limiter import (
    BucketCapReached,
    DecisionColumns,
    InvalidTokens,
    KeyTooLong,
    LimiterError,
    NoRuleError,
    RuleMismatch,
    batch_asks,
    tally,
)
from bucketmesh.core.limits import LimitError, check_limits
from bucketmesh.core.rules import KeyTemplate, Shadows, first_match, key_of_rule, own_key
from bucketmesh.http import wire
from bucketmesh.http.auth import AdminAuth
from bucketmesh.http.errors import JSON, ApiError, bad_request, body_error, require_json
from bucketmesh.http.idempotency import (
    CacheKey,
    IdempotencyCache,
    SharedIdempotency,
    idempotency_key,
    replayed,
)
from bucketmesh.http.render import DecisionRenderer
from bucketmesh.http.router import Answer, Router
from bucketmesh.http.server import Request, Response, problem
from bucketmesh.telemetry.audit import caller_of, new_request_id, token_identity
from bucketmesh.telemetry.metrics import NodeMetrics
from bucketmesh.telemetry.outcomes import SHADOW_HEADER, SHADOW_VALUE, Outcomes

if TYPE_CHECKING:
    from bucketmesh.api.forward import Forwarder

MAX_BATCH = 1000
#: (key, rule) pairs remembered per rule by ``RatingApp._owned_key`` before a clear
MAX_OWNED_KEYS = 100_000
#: How long a retry waits for another node of the region to answer the first copy.
IDEMPOTENCY_WAIT_S = 10.0
_SHADOW_FIELD = b',"shadow":"' + SHADOW_VALUE.encode() + b'"'
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
#: How a 400 for a request no rule matches says to answer such requests anyway.
CATCH_ALL_HINT = (
    'to answer requests without it, add a catch-all rule last, e.g. key: "ip-{{ '
    '.Request.ClientIP }}" (one bucket per client) or key: "anonymous" (one shared bucket)'
)


class ShadowPatch(wire.PatchRequest, forbid_unknown_fields=True, omit_defaults=True):
    """``PATCH /v1/buckets/{key}`` with ``shadow``: true makes the rule's (or the key's)
    refusals advisory on this node, false makes them refusals again."""

    shadow: bool | None = None


class SyncView(Protocol):
    """What the status endpoint knows about replication (the mesh, when there is one)."""

    def status(self) -> wire.SyncStatus: ...


class NoSync:
    """A node without a sync mesh."""

    def status(self) -> wire.SyncStatus:
        return wire.SyncStatus(enabled=False, local_only=False, peers={})


def not_durable() -> Response:
    """A grant whose store could not make it durable: the tokens stay spent (erring
    toward safety), the client is told to retry."""
    return problem(
        503,
        None,
        "the decision could not be made durable (write-ahead log error); retry",
        headers=[("Retry-After", "1")],
    )


def limiter_error(error: LimiterError, field: str | None = None) -> ApiError:
    """The API's answer to what a decider raised; ``field`` overrides the field."""
    if isinstance(error, InvalidTokens):
        return bad_request(str(error), field or "tokens")
    if isinstance(error, (NoRuleError, KeyTooLong)):
        return bad_request(str(error), field or "key")
    if isinstance(error, RuleMismatch):
        return bad_request(str(error), field or "rule")
    assert isinstance(error, BucketCapReached), error
    return ApiError(
        503,
        f"{error}; new keys are refused until idle buckets expire",
        field=field or "key",
        type_=BUCKET_CAP_PROBLEM,
        headers=[("Retry-After", "1")],
        reason="bucket_cap",
    )


_Future = asyncio.Future


def _resolve(answer: asyncio.Future[Response], done: asyncio.Future[Response]) -> None:
    """Resolve ``answer`` as ``done`` ended (unless ``answer`` was cancelled meanwhile)."""
    if answer.done():
        return
    if done.cancelled():
        answer.cancel()
    elif (error := done.exception()) is not None:
        answer.set_exception(error)
    else:
        answer.set_result(done.result())


class RatingApp:
    """Maps HTTP requests onto a ``Decider``; one instance per node."""

    limiter_error = staticmethod(limiter_error)  # for api/hot.py (which routes.py imports)

    def __init__(
        self,
        decider: Decider,
        *,
        region: str,
        node: str,
        cluster_id: str = "",
        default_state_key: str | None = None,
        admin_token: str | None = None,
        metrics: NodeMetrics | None = None,
        router: Router | None = None,
        sync: SyncView | None = None,
        version: str = "0",
        ready: Callable[[], dict[str, str]] | None = None,
        tasks: Callable[[], dict[str, wire.TaskStatus]] | None = None,
        idempotency: IdempotencyCache | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        outcomes: Outcomes | None = None,
    ) -> None:
        self.decider = decider
        self.region = region
        self.node = node
        self.cluster_id = cluster_id
        # what GET /v1/bucket/state without ?key= reads (config defaultStateKey)
        self.default_state_key = KeyTemplate(default_state_key) if default_state_key else None
        # an unnamed rule by the name its template shows, where making that ASCII changed
        # it: "agent\u2011api\u2011key" for agent-api-key of "agent\u2011api\u2011key-{{…}}"
        names = decider.rules_by_name
        #: rule -> key -> its bucket key under that rule (``_owned_key``)
        self._owned: dict[str, dict[str, str]] = {}
        self.rule_aliases = {
            rule.template.shown_name: rule.name
            for rule in decider.rules
            if rule.name == rule.template.default_name
            and rule.template.shown_name not in (rule.name, "")
            and rule.template.shown_name not in names
        }
        self.admin = AdminAuth(admin_token)
        self.router = router or Router(metrics)
        self.metrics = self.router.metrics
        # near-limit counts, shadow mode and the audit trail (telemetry/outcomes.py)
        if outcomes is None:
            outcomes = Outcomes(shadows=Shadows(decider.rules))
        if outcomes.metrics is None:
            outcomes.metrics = self.metrics
        outcomes.region = outcomes.region or region
        outcomes.replica = outcomes.replica or decider.replica_id
        self.outcomes = outcomes
        if outcomes.shadows.source is None:  # the marks live in the replicated configs
            outcomes.shadows.source = decider.shadowed
        self.shadows = outcomes.shadows
        self.near_limit = outcomes.near_limit
        self.audit = outcomes.audit
        self.sync: SyncView = sync or NoSync()
        self.version = version
        self.ready_checks = ready
        self.tasks = tasks
        self.monotonic = monotonic
        self.started = monotonic()
        self.idempotency = idempotency if idempotency is not None else IdempotencyCache()
        # affinity.forward: keys another node of the region owns go to it (api/forward.py)
        self.forwarder: Forwarder | None = None
        self.scope_headers = sorted(
            {name for rule in decider.rules for name in rule.template.header_names}
        )
        self.renderer = DecisionRenderer(region)
        self.rate_decoder = msgspec.json.Decoder(wire.RateRequest)
        # the last body decoded on the fast path and what it decoded to
        self._last_body = b"{}"
        self._last_rate = wire.RateRequest()
        self.batch_decoder = msgspec.json.Decoder(wire.BatchRequest)
        self.patch_decoder = msgspec.json.Decoder(ShadowPatch)
        self.encoder = msgspec.json.Encoder()
        self.openapi = msgspec.json.encode(wire.openapi_document(version))
        add = self.router.add_route
        rate_post = self.rate_post  # one object: RateHot answers only while it serves the route
        add("POST", "/v1/rate", "rate", rate_post)
        add("POST", "/rate", "rate", rate_post)
        add("GET", "/v1/rate", "rate", self.rate_get)
        add("GET", "/rate", "rate", self.rate_get)
        add("POST", "/v1/rate/batch", "batch", self.rate_batch)
        add("GET", "/v1/bucket/state", "state", self.bucket_state)
        add("GET", "/bucket/state", "state", self.bucket_state)
        add("GET", "/v1/status", "status", self.status)
        add("GET", "/status", "status", self.status)
        add("GET", "/healthz", "healthz", self.healthz)
        add("GET", "/readyz", "readyz", self.readyz)
        add("GET", "/metrics", "metrics", self.metrics_text)
        add("GET", "/openapi.json", "openapi", self.openapi_json)
        self.router.add_prefix_route("GET", "/v1/buckets/", "buckets", self.bucket_get)
        self.router.add_prefix_route("PATCH", "/v1/buckets/", "buckets", self.bucket_patch)
        self.router.add_prefix_route("PATCH", "/buckets/", "buckets", self.bucket_patch)
        # what the HTTP server calls instead of the router: POST /v1/rate's simple case in
        # one (compiled) call, the rest through the router (api/hot.py)
        from bucketmesh.api.hot import RateHot

        self.router.hot = RateHot(self, rate_post).answer
        self.metrics.gauge(
            "bucketmesh_idempotency_cache_entries",
            "Decisions kept for Idempotency-Key replays",
            lambda: len(self.idempotency),
        )

    def add_route(
        self, method: str, path: str, route: str, handler: Callable[[Request], Answer]
    ) -> None:
        """Serve another endpoint beside the Rating API's (see ``Router.add_route``)."""
        self.router.add_route(method, path, route, handler)

    def __call__(self, request: Request) -> Answer:
        return self.router(request)

    # -- answers that wait: the store's decision, then its commit barrier -------

    def _answer(
        self,
        pending: Any,
        render: Callable[[Any], Response],
        cache_key: CacheKey | None,
    ) -> Answer:
        """The response to ``pending`` (a value or an awaitable of one) rendered by
        ``render``, once the store's commit barrier lets it leave; cached for an
        Idempotency-Key retry. The hot path (a value, no barrier) allocates nothing."""
        if not hasattr(pending, "__await__"):  # answered now: the hot path
            response = render(pending)
            barrier = self.decider.commit()
            if cache_key is not None:
                now = self.monotonic()
                self.idempotency.put(cache_key, replayed(response), now)
                if barrier is None:
                    self.idempotency.persist(cache_key, now)
            if barrier is None:
                return response
            return self._after_barrier(barrier, response, cache_key)
        if pending.__class__ is _Future:
            # a decider's bare future (the Redis backend's): chained by a done callback
            # that renders and resolves the answer's future (``_rendered``), no task and
            # no coroutine; any other awaitable is awaited by ``_later``. Both answer
            # alike (tests/test_later_answers.py).
            answer: asyncio.Future[Response] = pending.get_loop().create_future()
            pending.add_done_callback(functools.partial(self._rendered, answer, render, cache_key))
            return answer
        return self._later(pending, render, cache_key)

    def _rendered(
        self,
        answer: asyncio.Future[Response],
        render: Callable[[Any], Response],
        cache_key: CacheKey | None,
        pending: asyncio.Future[Any],
    ) -> None:
        """``pending`` is done: resolve ``answer`` as ``_later`` would return or raise."""
        if answer.done():  # cancelled: the connection was lost
            return
        if pending.cancelled():
            answer.cancel()
            return
        error = pending.exception()
        if error is not None:
            if isinstance(error, LimiterError):
                answer.set_exception(limiter_error(error))
            elif isinstance(error, asyncio.CancelledError):
                answer.cancel()  # as a coroutine awaiting it would end
            else:
                answer.set_exception(error)
            return
        try:
            value = pending.result()
            if cache_key is None:  # _answer inlined: render, then the commit barrier
                rendered = render(value)
                barrier = self.decider.commit()
                response: Answer = (
                    rendered if barrier is None else self._after_barrier(barrier, rendered, None)
                )
            else:
                response = self._answer(value, render, cache_key)
        except Exception as exc:
            answer.set_exception(exc)
            return
        if isinstance(response, Response):
            answer.set_result(response)
        else:  # a commit barrier to wait for
            asyncio.ensure_future(response).add_done_callback(functools.partial(_resolve, answer))

    async def _later(
        self, pending: Awaitable[Any], render: Callable[[Any], Response], cache_key: CacheKey | None
    ) -> Response:
        try:
            value = await pending
        except LimiterError as error:
            raise limiter_error(error) from None
        answer = self._answer(value, render, cache_key)
        return await answer if isinstance(answer, Awaitable) else answer

    async def _after_barrier(
        self, barrier: Awaitable[bool], response: Response, cache_key: CacheKey | None
    ) -> Response:
        if await barrier:
            if cache_key is not None:  # the grant is durable: so is its answer
                self.idempotency.persist(cache_key, self.monotonic())
            return response
        if cache_key is not None:
            self.idempotency.forget(cache_key)  # a retry is decided again: at worst under-admits
        return not_durable()

    def _replay(self, cache_key: CacheKey | None) -> Answer | None:
        """The cached answer of an Idempotency-Key retry (after the barrier: the first
        answer may belong to a group whose fsync is still in flight)."""
        if cache_key is None:
            return None
        replay = self.idempotency.get(cache_key, self.monotonic())
        if replay is None:
            return None
        barrier = self.decider.commit()
        if barrier is None:
            return replay
        return self._after_barrier(barrier, replay, cache_key)

    async def _idempotent(self, cache_key: CacheKey, decide: Callable[[], Answer]) -> Response:
        """Decide a request carrying Idempotency-Key once, however many copies of it
        arrive on this node at once or on the region's other nodes (see
        ``http/idempotency.py``): the others get the first one's answer."""
        cache = self.idempotency
        while True:
            replay = self._replay(cache_key)
            if replay is not None:
                return await replay if isinstance(replay, Awaitable) else replay
            inflight = cache.inflight.get(cache_key)
            if inflight is None:
                break
            await asyncio.shield(inflight)  # the first copy's decision, then its answer
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        cache.inflight[cache_key] = done
        claimed = False
        try:
            if cache.shared is not None:
                found = await self._claim(cache.shared, cache_key)
                if isinstance(found, Response):
                    cache.put(cache_key, found, self.monotonic())
                    return found
                claimed = found
            answer = decide()
            response = await answer if isinstance(answer, Awaitable) else answer
            if claimed and cache.shared is not None:
                kept = cache.get(cache_key, self.monotonic())
                claimed = False
                if kept is not None:
                    await cache.shared.record(cache_key, kept)
                else:  # not kept (not durable): a retry is decided again
                    await cache.shared.release(cache_key)
            return response
        finally:
            if claimed and cache.shared is not None:
                await cache.shared.release(cache_key)
            cache.inflight.pop(cache_key, None)
            done.set_result(None)

    async def _claim(self, shared: SharedIdempotency, cache_key: CacheKey) -> Response | bool:
        """Claim the request region-wide, or the first answer; while another node is
        still deciding it, wait (at most ``IDEMPOTENCY_WAIT_S``, then 409)."""
        deadline = self.monotonic() + IDEMPOTENCY_WAIT_S
        pause = 0.005
        while True:
            found = await shared.claim(cache_key)
            if found is None:  # the store cannot say: decide as this node alone would
                return False
            if found is not False:
                return found
            if self.monotonic() >= deadline:
                raise ApiError(
                    409,
                    "a request with this Idempotency-Key is still being decided on another "
                    "node of the region; retry later",
                    field="Idempotency-Key",
                    headers=[("Retry-After", "1")],
                    reason="idempotency_in_progress",
                )
            await asyncio.sleep(pause)
            pause = min(0.2, pause * 2)

    # -- decisions ---------------------------------------------------------------

    def rate_post(self, request: Request) -> Answer:
        """``POST /v1/rate``. The simple case — no audit trail, no forwarding, no
        Idempotency-Key, a decider answering now, a grant (or a refusal, rendered
        by the reference path) — is decided here in one function; whatever needs
        more is handed to ``rate_post_full`` before anything is spent, or, once
        decided, to the same helpers the full path uses (the commit barrier, an
        answer to wait for). Both answer byte for byte alike and count alike
        (tests/test_rate_fast_path.py)."""
        headers = request.headers
        if self.audit is not None or self.forwarder is not None or "idempotency-key" in headers:
            return self.rate_post_full(request)
        body = request.body
        rate: wire.RateRequest | None = None
        if body == self._last_body:  # a client's one body (wrk's): decoded once
            rate = self._last_rate
        elif not body.strip():
            return self.rate_post_full(request)
        content_type = headers.get("content-type")
        if content_type is not None and content_type != JSON:
            require_json(request)
        if rate is None:
            try:
                rate = self.rate_decoder.decode(body)
            except (msgspec.ValidationError, msgspec.DecodeError) as error:
                raise body_error(error, body) from None
            self._last_body, self._last_rate = body, rate
        tokens = rate.tokens
        if tokens < 0:
            return self.rate_post_full(request)
        key = rate.key
        if rate.rule is not None:  # the rule named renders or owns the key
            return self.rate_post_full(request)
        if key is None:
            rules = self.decider.rules  # first_match inlined for the first rule
            key = (
                rules[0].template.render(headers, request.query, request.client_ip)
                if rules
                else None
            )
            if key is not None:
                rule = rules[0].name
            else:
                key, rule = self._render_key(request)
        else:
            rule = None
        try:
            decision = self.decider.acquire(key, tokens, rule=rule)
        except LimiterError as error:
            raise limiter_error(
                error, "rule" if rule and isinstance(error, NoRuleError) else None
            ) from None
        if decision.__class__ is not Decision:  # an answer to wait for (Redis)
            return self._answer(decision, self._decision_response, None)
        if decision.allowed:
            rule = decision.rule
            metrics = self.metrics
            decisions = metrics.decisions
            label = (rule, "allowed")
            decisions[label] = decisions.get(label, 0) + 1
            if decision.tokens_remaining < decision.capacity * self.near_limit:
                metrics.count_near_limit(rule)
            response = self.renderer.granted(decision)
        else:
            response = self._decision_response(decision)
        barrier = self.decider.commit()
        if barrier is None:
            return response
        return self._after_barrier(barrier, response, None)

    def rate_post_full(self, request: Request) -> Answer:
        """``POST /v1/rate`` through every step: Idempotency-Key, forwarding, the audit
        trail (the reference ``rate_post`` must answer alike)."""
        cache_key = idempotency_key(request, self.scope_headers)
        if self.forwarder is not None:  # a forwarded request: the forwarding node's key
            cache_key = self.forwarder.received_key(request, cache_key)
        if cache_key is not None and self.idempotency.shared is not None:
            return self._idempotent(cache_key, lambda: self._rate_post(request, cache_key))
        return self._rate_post(request, cache_key)

    def _rate_post(self, request: Request, cache_key: CacheKey | None) -> Answer:
        replay = self._replay(cache_key)
        if replay is not None:
            return replay
        body = request.body
        if body.strip():
            require_json(request)
            try:
                rate = self.rate_decoder.decode(body)
            except (msgspec.ValidationError, msgspec.DecodeError) as error:
                raise body_error(error, body) from None
        else:
            rate = wire.RateRequest()
        return self._decide(request, rate.key, rate.rule, rate.tokens, cache_key)

    def rate_get(self, request: Request) -> Answer:
        query = request.query
        raw_tokens = query.get("tokens")
        tokens = 1
        if raw_tokens is not None:
            # ASCII digits only: int() would also take "٣" (Arabic-Indic three) or "1_0"
            if not _INTEGER.fullmatch(raw_tokens):
                raise bad_request(f"tokens must be an integer, got {raw_tokens!r}", "tokens")
            tokens = int(raw_tokens)
        key = query.get("key") or None
        return self._decide(request, key, query.get("rule") or None, tokens, None)

    def _decide(
        self,
        request: Request,
        key: str | None,
        rule: str | None,
        tokens: int,
        cache_key: CacheKey | None,
        forward: bool = True,
    ) -> Answer:
        if tokens < 0:
            raise bad_request(f"tokens must be >= 0, got {tokens}", "tokens")
        if key is None:
            key, rule = self._render_key(request, rule)
        elif rule is not None:
            key = self._key_of_rule(key, rule, "rule")
        if forward and self.forwarder is not None:  # to the key's owner, if another node
            owners_answer = self.forwarder.forward(request, key, rule, tokens, cache_key)
            if owners_answer is not None:
                return owners_answer
        try:
            decision = self.decider.acquire(key, tokens, rule=rule)
        except LimiterError as error:
            raise limiter_error(
                error, "rule" if rule and isinstance(error, NoRuleError) else None
            ) from None
        if self.audit is not None:
            render = functools.partial(self._audited_response, request, tokens)
            return self._answer(decision, render, cache_key)
        return self._answer(decision, self._decision_response, cache_key)

    def decide_here(
        self, request: Request, key: str, rule: str | None, tokens: int, cache_key: CacheKey | None
    ) -> Answer:
        """Decide on this node, not forwarding (api/forward.py's fallback)."""
        return self._decide(request, key, rule, tokens, cache_key, forward=False)

    def _decision_response(self, decision: Decision) -> Response:
        rule = decision.rule
        self.metrics.count_decision(rule, decision.allowed)
        if decision.allowed:
            if decision.tokens_remaining < decision.capacity * self.near_limit:
                self.metrics.count_near_limit(rule)
            return self.renderer.granted(decision)  # response(decision), from its templates
        if self.shadows and self.shadows.covers(rule, decision.key):
            self.metrics.count_shadow_refused(rule)
            return self._shadow_response(decision)
        return self.renderer.response(decision)

    def _shadow_response(self, decision: Decision) -> Response:
        """A refusal made advisory: 200 with the decision (``allowed`` true, the bucket
        as it is), its RateLimit headers and ``Bucketmesh-Shadow: would-refuse``."""
        renderer = self.renderer
        headers = renderer.headers(decision)
        del headers[2:]  # no Retry-After: the request goes through
        headers.append((SHADOW_HEADER, SHADOW_VALUE))
        let_through = msgspec.structs.replace(decision, allowed=True)
        body = renderer.allowed_body(let_through)[:-1] + _SHADOW_FIELD + b"}"
        return Response(200, body, JSON, headers)

    def _audited_response(self, request: Request, tokens: int, decision: Decision) -> Response:
        """The answer with the audit trail on: the decision recorded with the request's
        ids and caller (the writer thread does the rest), then answered as usual."""
        headers = request.headers
        request_id = headers.get("x-request-id")
        outcomes = self.outcomes
        if not outcomes.kept(request_id):  # sampled out: nothing more to do than usual
            if self.audit is not None:
                self.audit.sampled_out += 1
            return self._decision_response(decision)
        request_id = request_id or new_request_id()
        shadowed = outcomes.observe(
            decision,
            tokens,
            request_id=request_id,
            idempotency_key=headers.get("idempotency-key"),
            caller=caller_of(headers),
            sampled=True,
        )
        response = self._shadow_response(decision) if shadowed else self.renderer.response(decision)
        response.headers = [*(response.headers or ()), ("X-Request-Id", request_id)]
        return response

    def _key_of_rule(self, key: str, rule: str, field: str) -> str:
        """The bucket key of a key given with a rule named (``key_of_rule``: its own
        bucket when another rule owns that text); 400 naming ``field`` for no rule."""
        if rule not in self.decider.rules_by_name:
            raise bad_request(f"unknown rule {rule!r}", field)
        return self._owned_key(key, rule)

    def _owned_key(self, key: str, rule: str) -> str:
        """``key_of_rule`` of a known ``rule``, remembered per rule (the rules' templates
        are fixed for the process: the answer never changes)."""
        known = self._owned.get(rule)
        if known is None:
            known = self._owned[rule] = {}
        found = known.get(key)
        if found is None:
            decider = self.decider
            found = key_of_rule(decider.rules, decider.rules_by_name, key, rule)
            if len(known) >= MAX_OWNED_KEYS:
                known.clear()
            known[key] = found
        return found

    def _keys_stay(self, items: Sequence[wire.RateRequest]) -> bool:
        """Whether every item's key is its bucket key (``_owned_key``): the columns path
        decides the keys as given."""
        owned = self._owned
        for item in items:
            rule = item.rule
            key = item.key
            if rule is not None and key is not None:
                known = owned.get(rule)
                found = known.get(key) if known is not None else None
                if found is None:
                    if rule not in self.decider.rules_by_name:
                        return False  # refused by the general path, naming the item
                    found = self._owned_key(key, rule)
                if found != key:
                    return False
        return True

    def _render_key(self, request: Request, rule: str | None = None) -> tuple[str, str]:
        """The key of a request that gives none: rendered by the rule ``rule`` names,
        else by the first rule whose template the request satisfies."""
        rules = self.decider.rules
        headers, query, client_ip = request.headers, request.query, request.client_ip
        if rule is not None:
            named = self.decider.rules_by_name.get(rule)
            if named is None:
                raise bad_request(f"unknown rule {rule!r}", "rule")
            rendered = named.template.render(headers, query, client_ip)
            if rendered is None:
                missing = named.template.missing(headers, query, client_ip)
                raise bad_request(
                    f'rule {rule!r} needs {missing.detail}, and no "key" was given',
                    missing.field or "key",
                )
            return own_key(rules, rendered, rule), rule
        found = first_match(rules, headers, query, client_ip)
        if found is not None:
            return found
        if not rules:
            raise bad_request('no bucket rules are configured; give "key" and "rule"', "key")
        first = rules[0]
        missing = first.template.missing(headers, query, client_ip)
        raise bad_request(
            f"no rule matches this request: {missing.detail} (rule {first.name!r} needs it), "
            f'and no "key" was given; {CATCH_ALL_HINT}',
            missing.field or "key",
        )

    def rate_batch(self, request: Request) -> Answer:
        cache_key = idempotency_key(request, self.scope_headers)
        if cache_key is not None and self.idempotency.shared is not None:
            return self._idempotent(cache_key, lambda: self._rate_batch(request, cache_key))
        return self._rate_batch(request, cache_key)

    def _rate_batch(self, request: Request, cache_key: CacheKey | None) -> Answer:
        replay = self._replay(cache_key)
        if replay is not None:
            return replay
        require_json(request)
        if not request.body.strip():
            raise bad_request('a JSON body {"requests": [...]} is required', "requests")
        try:
            batch = self.batch_decoder.decode(request.body)
        except (msgspec.ValidationError, msgspec.DecodeError) as error:
            raise body_error(error, request.body) from None
        items = batch.requests
        if not items:
            raise bad_request("at least 1 request per batch, got none", "requests")
        if len(items) > MAX_BATCH:
            raise bad_request(
                f"at most {MAX_BATCH} requests per batch, got {len(items)}", "requests"
            )
        if not batch.atomic and self.audit is None and self._keys_stay(items):
            # the common case (every item names a live bucket): decided by the core as
            # columns and rendered from them, with no Ask nor Decision per item
            columns = self.decider.acquire_columns(items)
            if columns is not None:
                return self._answer(columns, self._columns_response, cache_key)
        rules_by_name = self.decider.rules_by_name
        # the common case in one call into the (compiled) core; else item by item
        asks = batch_asks(items, rules_by_name)
        if asks is None:
            asks = []
            append = asks.append
            make = tuple.__new__  # Ask(...) runs a Python-level __new__
            for index, item in enumerate(items):
                key, tokens, rule = item.key, item.tokens, item.rule
                if key is None or tokens < 0 or (rule is not None and rule not in rules_by_name):
                    key, rule = self._batch_item(request, index, item)
                append(make(Ask, (key, tokens, rule)))
        # a key given with a rule named that another rule owns: the named rule's own
        # bucket (key_of_rule), as for one request
        for index, ask in enumerate(asks):
            if ask[2] is not None:
                mapped = self._owned_key(ask[0], ask[2])
                if mapped != ask[0]:
                    asks[index] = tuple.__new__(Ask, (mapped, ask[1], ask[2]))
        # The decider checks every item before charging any: a bad item fails the
        # whole batch with nothing spent, atomic or not.
        try:
            decisions = self.decider.acquire_many(asks, atomic=batch.atomic)
        except LimiterError as error:
            raise self._batch_error(error) from None
        render: Callable[[list[Decision]], Response] = self._batch_response
        if self.audit is not None:
            render = functools.partial(self._audited_batch, request, asks)
        if isinstance(decisions, Awaitable):
            return self._answer(self._batch_later(decisions), render, cache_key)
        return self._answer(decisions, render, cache_key)

    def _audited_batch(
        self, request: Request, asks: list[Ask], decisions: list[Decision]
    ) -> Response:
        """A batch's answer with the audit trail on: one event per item, its ids those of
        the request with ``#<index>`` appended (a retry charged again shows as a
        duplicate of that item, never the items of one batch as duplicates)."""
        headers = request.headers
        request_id = headers.get("x-request-id")
        if not self.outcomes.kept(request_id):
            if self.audit is not None:
                self.audit.sampled_out += len(decisions)
            return self._batch_response(decisions)
        request_id = request_id or new_request_id()
        key = headers.get("idempotency-key")
        caller = caller_of(headers)
        if self.audit is not None:
            write = self.outcomes.write
            shadows = self.shadows
            for index, (ask, decision) in enumerate(zip(asks, decisions, strict=False)):
                shadowed = (
                    not decision.allowed
                    and bool(shadows)
                    and shadows.covers(decision.rule, decision.key)
                )
                write(
                    decision,
                    ask[1],
                    f"{request_id}#{index}",
                    None if key is None else f"{key}#{index}",
                    caller,
                    shadowed,
                    sampled=True,
                    item=index,
                )
        response = self._batch_response(decisions)
        response.headers = [*(response.headers or ()), ("X-Request-Id", request_id)]
        return response

    def _batch_item(
        self, request: Request, index: int, item: wire.RateRequest
    ) -> tuple[str, str | None]:
        """An item without a key (rendered from the request), or a bad one (raises)."""
        if item.tokens < 0:
            raise bad_request(
                f"tokens must be >= 0, got {item.tokens}", f"requests[{index}].tokens"
            )
        if item.rule is not None and item.rule not in self.decider.rules_by_name:
            raise bad_request(f"unknown rule {item.rule!r}", f"requests[{index}].rule")
        if item.key is None:
            try:
                return self._render_key(request, item.rule)
            except ApiError as error:
                error.field = f"requests[{index}].key"
                raise
        return item.key, item.rule

    @staticmethod
    def _batch_error(error: LimiterError) -> ApiError:
        if error.index is None:
            return limiter_error(error)
        part = {InvalidTokens: "tokens", RuleMismatch: "rule"}.get(type(error), "key")
        return limiter_error(error, f"requests[{error.index}].{part}")

    async def _batch_later(self, pending: Awaitable[list[Decision]]) -> list[Decision]:
        try:
            return await pending
        except LimiterError as error:
            raise self._batch_error(error) from None

    def _batch_response(self, decisions: list[Decision]) -> Response:
        # Each result is a wire.DecisionBody: the Decision's JSON with the region
        # spliced in (as a single decision's body is). The whole list is encoded at
        # once and the region spliced in after every object: each one ends with its
        # last field, the rule (a string), so '"},{"allowed":' occurs only between
        # two objects (inside a string a quote is escaped).
        if not decisions:
            return Response(200, b'{"results":[],"allowed":0,"denied":0}', JSON)
        suffix = self.renderer.region_suffix
        encode = self.encoder.encode
        listed = encode(decisions)
        boundary = b'"},{"allowed":'
        if listed.count(boundary) == len(decisions) - 1 and listed.endswith(b'"}]'):
            results = listed[1:-2].replace(boundary, b'"' + suffix + b',{"allowed":') + suffix
        else:  # not the Decision layout assumed above: one object at a time
            results = b",".join([encode(decision)[:-1] + suffix for decision in decisions])
        # one pass in the (compiled) core: allowed, near the limit, the one rule (if so)
        allowed = self._count_batch(tally(decisions, self.near_limit), decisions)
        if allowed < len(decisions) and self.shadows:
            shadowed = self._shadowed_batch(decisions, allowed)
            if shadowed is not None:
                return shadowed
        body = b'{"results":[%s],"allowed":%d,"denied":%d}' % (
            results,
            allowed,
            len(decisions) - allowed,
        )
        return Response(200, body, JSON)

    def _count_batch(
        self,
        counts: tuple[int, int, str | None],
        decisions: list[Decision] | DecisionColumns,
    ) -> int:
        """Count a batch's decisions in the metrics from its ``tally`` (allowed, near
        the limit, the one rule or None); the number allowed."""
        allowed, near, rule = counts
        total = len(decisions)
        count = self.metrics.count_decision
        share = self.near_limit
        if rule is not None:  # one rule throughout (as usual)
            if allowed:
                count(rule, True, allowed)
                if share and near:
                    self.metrics.count_near_limit(rule, near)
            if allowed < total:
                count(rule, False, total - allowed)
            return allowed
        if isinstance(decisions, DecisionColumns):
            decisions = decisions.decisions()
        for decision in decisions:
            count(decision.rule, decision.allowed)
            if decision.allowed and decision.tokens_remaining < decision.capacity * share:
                self.metrics.count_near_limit(decision.rule)
        return allowed

    def _columns_response(self, columns: DecisionColumns) -> Response:
        """``_batch_response`` of the decisions ``columns`` holds, byte for byte, built
        from the columns: each field that differs between rows is encoded as one list
        and split (numbers and booleans hold no comma; a list of strings none of which
        holds a quote splits at '","', every quote in it delimiting a string); a field
        equal in every row goes into the constant text between them. One join makes
        the body."""
        total = len(columns)
        if not total:
            return Response(200, b'{"results":[],"allowed":0,"denied":0}', JSON)
        allowed = self._count_batch(columns.tally(self.near_limit), columns)
        if allowed < total and self.shadows:
            shadowed = self._shadowed_batch(columns.decisions(), allowed)
            if shadowed is not None:
                return shadowed
        encode = self.encoder.encode
        fields: tuple[tuple[bytes, list[Any], bool], ...] = (
            (b',{"allowed":', columns.allowed, False),
            (b',"key":', columns.keys, True),
            (b',"tokens_remaining":', columns.remaining, False),
            (b',"capacity":', columns.capacity, False),
            (b',"refill_rate":', columns.refill_rate, False),
            (b',"retry_after":', columns.retry_after, False),
            (b',"reset_after":', columns.reset_after, False),
            (b',"mode":', columns.mode, True),
            (b',"rule":', columns.rule, True),
        )
        row: list[bytes | None] = []  # one result: constant text, None where a column goes
        cells: list[list[bytes]] = []
        text = b""
        for name, column, quoted in fields:
            first = column[0]
            # (no float column holds -0.0, equal to 0.0 but encoded apart)
            if first == column[-1] and column.count(first) == total:
                text += name + encode(first)
                continue
            listed = encode(column)
            if quoted:
                row += [text + name + b'"', None]
                if b'\\"' in listed:  # a quote inside a string: split string by string
                    cells.append([encode(value)[1:-1] for value in column])
                else:  # every quote delimits a string
                    cells.append(listed[2:-2].split(b'","'))
                text = b'"'
            else:
                row += [text + name, None]
                cells.append(listed[1:-1].split(b","))
                text = b""
        row.append(text + self.renderer.region_suffix)
        width = len(row)
        parts = row * total
        for index, cell in enumerate(cells):
            parts[2 * index + 1 :: width] = cell
        first_text = parts[0]
        assert first_text is not None
        parts[0] = b'{"results":[' + first_text[1:]  # no comma before the first result
        parts.append(b'],"allowed":%d,"denied":%d}' % (allowed, total - allowed))
        return Response(200, b"".join(parts), JSON)  # type: ignore[arg-type]

    def _shadowed_batch(self, decisions: list[Decision], allowed: int) -> Response | None:
        """A batch some of whose refusals a shadow rule or key makes advisory: those
        items answered as grants with ``"shadow":"would-refuse"``, counted, and
        ``shadow_refused`` beside ``allowed`` / ``denied``; None when there are none."""
        shadows = self.shadows
        marks = [not d.allowed and shadows.covers(d.rule, d.key) for d in decisions]
        refused = sum(marks)
        if not refused:
            return None
        encode = self.encoder.encode
        suffix = self.renderer.region_suffix
        shadow_field = _SHADOW_FIELD
        parts = []
        for decision, mark in zip(decisions, marks, strict=True):
            if mark:
                self.metrics.count_shadow_refused(decision.rule)
                let_through = msgspec.structs.replace(decision, allowed=True)
                parts.append(encode(let_through)[:-1] + shadow_field + suffix)
            else:
                parts.append(encode(decision)[:-1] + suffix)
        body = b'{"results":[%s],"allowed":%d,"denied":%d,"shadow_refused":%d}' % (
            b",".join(parts),
            allowed + refused,
            len(decisions) - allowed - refused,
            refused,
        )
        return Response(200, body, JSON, [(SHADOW_HEADER, SHADOW_VALUE)])

    # -- inspection ------------------------------------------------------------

    def _bucket_answer(self, key: str, rule: str | None = None) -> Answer:
        try:
            found = self.decider.inspect(key, rule=rule)
        except NoRuleError as error:
            # ``?rule=`` naming no rule is that parameter's fault; else no rule fits the key
            unknown = rule is not None and rule not in self.decider.rules_by_name
            raise ApiError(404, str(error), field="rule" if unknown else "key") from None
        return self._answer(
            found,
            lambda bucket: self._config_json(self._state_of(key, bucket), bucket.config),
            None,
        )

    def _state_of(self, key: str, bucket: Bucket) -> wire.BucketStateBody:
        decider = self.decider
        now = decider.clock()
        cfg = bucket.config
        live = decider.holds(key)
        used = bucket.used(decider.replica_id) if live else {}
        return wire.BucketStateBody(
            key=key,
            rule=bucket.rule,
            tokens_remaining=bucket.level(now),
            capacity=cfg.capacity,
            refill_rate=cfg.refill_rate,
            ttl=cfg.ttl_ns / NS_PER_S,
            mode=cfg.mode,
            config_version=wire.version_text(cfg.version),
            reset_after=bucket.reset_after_ns(now) / NS_PER_S,
            epoch=bucket.epoch,
            replicas={rid: wire.ReplicaEntry(n) for rid, n in sorted(used.items())},
            live=live,
            shares=self._shares_of(key, cfg.mode),
        )

    def _shares_of(self, key: str, mode: str) -> dict[str, wire.ShareEntry] | None:
        """Each region's rights and demand of a strict key (core/shares.py), when the
        node's limiter moves strict shares (the embedded store with a mesh)."""
        if mode != "strict":
            return None
        view = getattr(getattr(self.decider, "limiter", self.decider), "share_view", None)
        found = view(key) if callable(view) else None
        if not found:
            return None
        return {
            region: wire.ShareEntry(
                e["rights"],
                e["demand"],
                e["reported"],
                None if e.get("limit") is None else wire.ShareLimit(**e["limit"]),
            )
            for region, e in found.items()
        }

    def bucket_state(self, request: Request) -> Answer:
        key = request.query.get("key") or self._default_state_key(request)
        rule = request.query.get("rule") or None
        decider = self.decider
        if rule is not None and rule in decider.rules_by_name:
            # the bucket POST /v1/rate decides for this key and rule (key_of_rule)
            key = self._owned_key(key, rule)
        return self._bucket_answer(key, rule)

    def _default_state_key(self, request: Request) -> str:
        """The key a bare GET /v1/bucket/state reads: defaultStateKey rendered from it."""
        template = self.default_state_key
        if template is None:
            raise bad_request(
                "query parameter key is required; to let a request without it read one "
                "bucket, set defaultStateKey in the config (or BUCKETMESH_DEFAULT_STATE_KEY)",
                "key",
            )
        headers, query, client_ip = request.headers, request.query, request.client_ip
        key = template.render(headers, query, client_ip)
        if key is None:
            missing = template.missing(headers, query, client_ip)
            raise bad_request(
                f"query parameter key is required: {missing.detail}, which the config's "
                f"defaultStateKey {template.text!r} needs",
                missing.field or "key",
            )
        return key

    def _rule_named(self, name: str) -> str | None:
        """The rule ``name`` is, by its name or by the name its template shows."""
        if name in self.decider.rules_by_name:
            return name
        return self.rule_aliases.get(name)

    def bucket_get(self, request: Request, key: str) -> Answer:
        name = self._rule_named(key)
        if name is not None:
            config = self.decider.rule_config(name)
            return self._config_json(self._config_body(key, name, config, "rule"), config)
        return self._bucket_answer(key)

    def _config_body(
        self, key: str, rule: str, cfg: BucketConfig, applies_to: Any
    ) -> wire.BucketConfigBody:
        return wire.BucketConfigBody(
            key=key,
            rule=rule,
            capacity=cfg.capacity,
            refill_rate=cfg.refill_rate,
            ttl=cfg.ttl_ns / NS_PER_S,
            mode=cfg.mode,
            version=wire.version_text(cfg.version),
            applies_to=applies_to,
        )

    def bucket_patch(self, request: Request, key: str) -> Answer:
        self.admin.require(request)
        require_json(request)
        if not request.body.strip():
            raise bad_request("a JSON body with capacity, refillRate, ttl or mode is required")
        try:
            patch = self.patch_decoder.decode(request.body)
        except (msgspec.ValidationError, msgspec.DecodeError) as error:
            raise body_error(error, request.body) from None
        if patch.refillRate is not None and patch.refill_rate is not None:
            raise bad_request("give refillRate or refill_rate, not both", "refillRate")
        rate = patch.refillRate if patch.refillRate is not None else patch.refill_rate
        limits = (patch.capacity, rate, patch.ttl, patch.mode)
        if all(value is None for value in limits) and patch.shadow is None:
            raise bad_request("nothing to change: give capacity, refillRate, ttl, mode or shadow")
        try:
            check_limits(capacity=patch.capacity, refill_rate=rate, ttl=patch.ttl, mode=patch.mode)
        except LimitError as error:
            raise bad_request(str(error), error.field) from None
        if self.audit is not None:
            return self._patch_audited(request, key, patch, rate)
        return self._patch(key, patch, rate)

    def _patch(self, key: str, patch: ShadowPatch, rate: float | None) -> Answer:
        rule_name = self._rule_named(key)
        target = key if rule_name is None else rule_name
        changed: Any
        try:
            # the shadow mark is a config field like the limits: versioned, replicated
            changed = self.decider.configure(
                target,
                capacity=patch.capacity,
                refill_rate=rate,
                ttl=patch.ttl,
                mode=patch.mode,
                shadow=patch.shadow,
            )
        except (LimiterError, ValueError) as error:
            raise self._patch_error(key, error) from None
        if isinstance(changed, Awaitable):
            changed = self._patch_later(key, changed)

        def body(config: BucketConfig) -> Response:
            rule = rule_name if rule_name is not None else self.decider.rule_of(key)
            applies_to = "key" if rule_name is None else "rule"
            response = self._config_json(self._config_body(key, rule, config, applies_to), config)
            pending = None if rule_name is not None else self._pending_lowering(key)
            return response if pending is None else self._pending_answer(key, response, pending)

        return self._answer(changed, body, None)

    def _pending_lowering(self, key: str) -> dict[str, Any] | None:
        """A strict lowering of ``key`` its origin (this node's region) cannot cover:
        the new limit is pending until every region has cut (core/limiter.py)."""
        find = getattr(getattr(self.decider, "limiter", self.decider), "pending_lowering", None)
        found = find(key) if callable(find) else None
        return found if isinstance(found, dict) else None

    def _pending_answer(self, key: str, response: Response, pending: dict[str, Any]) -> Response:
        """202 Accepted: the config body with ``pending`` (the limit that bounds until
        every region has cut, which regions have, which have not, and where to watch
        it), and a ``Location`` of the key's state (docs/api.md, PATCH)."""
        state = "/v1/bucket/state?key=" + urllib.parse.quote(key, safe="")
        extra = self.encoder.encode({**pending, "state": state})
        response.status = 202
        response.body = response.body[:-1] + b',"pending":' + extra + b"}"
        response.headers = [*(response.headers or []), ("Location", state)]
        return response

    async def _key_config(self, key: str) -> BucketConfig:
        found = self.decider.inspect(key)
        bucket: Bucket = await found if isinstance(found, Awaitable) else found
        return bucket.config

    def _config_json(
        self, body: wire.BucketConfigBody | wire.BucketStateBody, config: BucketConfig
    ) -> Response:
        """The config (or state) body, with ``"shadow":true`` when the config is shadow."""
        response = self._json(body)
        if config.shadow:
            response.body = response.body[:-1] + b',"shadow":true}'
        return response

    async def _settings_of(self, key: str) -> dict[str, Any] | None:
        """What a PATCH of ``key`` (a rule or a key) changes, as the audit trail writes
        it; None when it is neither."""
        rule_name = self._rule_named(key)
        try:
            if rule_name is not None:
                config = self.decider.rule_config(rule_name)
            else:
                config = await self._key_config(key)
        except LimiterError:
            return None
        return config.view()

    async def _patch_audited(
        self, request: Request, key: str, patch: ShadowPatch, rate: float | None
    ) -> Response:
        """A PATCH recorded in the audit trail (always, whatever the sampling): who
        (the admin token's identity), the rule or key, old → new."""
        old = await self._settings_of(key)
        answer = self._patch(key, patch, rate)
        response = await answer if isinstance(answer, Awaitable) else answer
        if self.audit is not None and response.status in (200, 202):
            authorization = request.headers.get("authorization", "")
            token = authorization[7:].strip() if authorization[:7].lower() == "bearer " else None
            self.audit.change(
                "patch",
                who=token_identity(token),
                old=old,
                new=await self._settings_of(key),
                key=key,
                applies_to="key" if self._rule_named(key) is None else "rule",
                region=self.region,
                node=self.node,
                request_id=request.headers.get("x-request-id"),
            )
        return response

    async def _patch_later(self, key: str, pending: Awaitable[BucketConfig]) -> BucketConfig:
        try:
            return await pending
        except (LimiterError, ValueError) as error:
            raise self._patch_error(key, error) from None

    def _patch_error(self, key: str, error: LimiterError | ValueError) -> ApiError:
        if isinstance(error, NoRuleError):
            names = [*self.decider.rules_by_name, *self.rule_aliases]
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean the rule {close[0]!r}?)" if close else ""
            rules = ", ".join(self.decider.rules_by_name) or "none"
            return ApiError(
                404,
                f"{key!r} is neither a rule nor a key of one: {error}{hint}; rules: {rules}",
                field="key",
            )
        if isinstance(error, LimiterError):  # the cap, a key too long to replicate, ...
            return limiter_error(error)
        return bad_request(str(error), getattr(error, "field", None) or "body")

    # -- node ------------------------------------------------------------------

    def status(self, request: Request) -> Answer:
        key = request.query.get("key")
        decider = self.decider

        def body(bucket: Bucket | None) -> Response:
            return self._json(
                wire.StatusBody(
                    region=self.region,
                    node=self.node,
                    replica_id=decider.replica_id,
                    cluster_id=self.cluster_id,
                    sync=self.sync.status(),
                    buckets=decider.live_buckets(),
                    version=self.version,
                    uptime_s=round(self.monotonic() - self.started, 3),
                    bucket=self._state_of(key, bucket) if key and bucket is not None else None,
                    tasks=self.tasks() if self.tasks is not None else {},
                )
            )

        if not key:
            return body(None)
        try:
            found = decider.inspect(key)
        except NoRuleError as error:
            raise ApiError(404, str(error), field="key") from None
        return self._answer(found, body, None)

    def healthz(self, request: Request) -> Response:
        return self._json(wire.Health("ok"))

    def readyz(self, request: Request) -> Response:
        checks = self.ready_checks() if self.ready_checks else {"config": "ok"}
        # "ok; warning: ..." is ready, with something the operator should know
        ok = all(v.split(";", 1)[0] == "ok" for v in checks.values())
        return Response(
            200 if ok else 503,
            self.encoder.encode(wire.Health("ready" if ok else "not ready", checks)),
            JSON,
        )

    def metrics_text(self, request: Request) -> Response:
        return Response(200, self.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8")

    def openapi_json(self, request: Request) -> Response:
        return Response(200, self.openapi, JSON)

    def _json(self, value: object) -> Response:
        return Response(200, self.encoder.encode(value), JSON)


__all__ = ["NoSync", "RatingApp", "SyncView", "limiter_error", "not_durable"]
