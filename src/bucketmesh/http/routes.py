"""The Rating API: from an HTTP request to a decision, and the operator endpoints.

``RatingApp`` is the handler ``http11.HttpServer`` calls for every request. It
resolves the bucket key (body ``key``, else the first rule whose template the
request satisfies), asks the ``Limiter``, and answers per API.md: the decision
JSON, 429 problem+json with ``Retry-After``, the IETF ``RateLimit-Policy`` /
``RateLimit`` headers, and problem+json naming the field for anything
malformed. It never raises for bad input and never answers 5xx for it.

Process concerns (sockets, signals, snapshots, the sync loop) live in
``serve.py``; this module only maps requests to responses.
"""

from __future__ import annotations

import hmac
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import msgspec

from bucketmesh.http import wire as api
from bucketmesh.core.bucket import NS_PER_S, Bucket, BucketConfig, Decision
from bucketmesh.http.server import Request, Response, problem
from bucketmesh.core.limiter import BucketCapReached, InvalidTokens, Limiter, NoRuleError
from bucketmesh.telemetry.metrics import NodeMetrics
from bucketmesh.core.rules import first_match

# What a route handler answers: a Response at once, or an awaitable of one (a handler
# that must wait for I/O, such as a Redis-backed decision or a sync digest).
Answer: TypeAlias = Response | Awaitable[Response]

JSON = "application/json"
PROBLEM = "application/problem+json"
MAX_BATCH = 1000
IDEMPOTENCY_TTL_S = 600.0
IDEMPOTENCY_MAX = 100_000
_MISSING = re.compile(r"(?:header|query parameter) (\S+) is (?:missing|empty)")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")
MAX_IDEMPOTENCY_KEY = 256


class ApiError(Exception):
    """A request the API refuses, carried to one place that renders problem+json."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        field: str | None = None,
        type_: str = "about:blank",
        headers: list[tuple[str, str]] | None = None,
        reason: str = "invalid",
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.field = field
        self.type_ = type_
        self.headers = headers
        self.reason = reason

    def response(self) -> Response:
        return problem(
            self.status,
            self.title,
            self.detail,
            type_=self.type_,
            field=self.field,
            headers=self.headers,
        )


def replayed(response: Response) -> Response:
    """The copy of a first decision that an Idempotency-Key retry gets back."""
    headers = [*(response.headers or ()), ("Idempotent-Replayed", "true")]
    return Response(response.status, response.body, response.content_type, headers)


def bad_request(detail: str, field: str | None = None) -> ApiError:
    return ApiError(400, "Bad Request", detail, field=field)


class SyncView:
    """What the status endpoint knows about replication; the sync mesh replaces it."""

    enabled = False

    def status(self) -> api.SyncStatus:
        return api.SyncStatus(enabled=False, local_only=False, peers={})


class IdempotencyCache:
    """First decisions by Idempotency-Key: bounded in size, each kept for a while."""

    def __init__(self, ttl_s: float = IDEMPOTENCY_TTL_S, max_entries: int = IDEMPOTENCY_MAX):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple[str, str], tuple[float, Response]] = OrderedDict()

    def get(self, key: tuple[str, str], now: float) -> Response | None:
        found = self.entries.get(key)
        if found is None:
            return None
        if found[0] < now:
            del self.entries[key]
            return None
        return found[1]

    def put(self, key: tuple[str, str], response: Response, now: float) -> None:
        entries = self.entries
        entries[key] = (now + self.ttl_s, response)
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        # expire from the old end while it is stale, so idle memory drains
        while entries:
            oldest = next(iter(entries.values()))
            if oldest[0] >= now:
                break
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()


class DecisionRenderer:
    """A Decision as the API answers it: the JSON body (200, or 429 problem+json) and
    the IETF RateLimit headers. Shared by the server and the ASGI middleware."""

    def __init__(self, region: str) -> None:
        self.encoder = msgspec.json.Encoder()
        self.region_suffix = b',"region":' + msgspec.json.encode(region) + b"}"
        self.policies: dict[tuple[str, int, int], str] = {}

    def allowed_body(self, decision: Decision) -> bytes:
        return self.encoder.encode(decision)[:-1] + self.region_suffix

    def denied_body(self, decision: Decision) -> bytes:
        """The 429 problem+json of type quota-exceeded, with the decision's fields."""
        detail = (
            f"bucket {decision.key!r} holds {max(decision.tokens_remaining, 0)} tokens; "
            f"retry after {decision.retry_after:.3f}s"
        )
        head = (
            b'{"type":"quota-exceeded","title":"Too Many Requests","status":429,"detail":'
            + self.encoder.encode(detail)
            + b","
        )
        return head + self.encoder.encode(decision)[1:-1] + self.region_suffix

    def headers(self, decision: Decision) -> list[tuple[str, str]]:
        """draft-ietf-httpapi-ratelimit-headers: the policy (q quota, w window = time
        to refill from empty) and the current state (r remaining, t seconds to wait);
        with Retry-After on a denial."""
        rule = decision.rule or "bucket"
        signature = (rule, decision.capacity, round(decision.refill_rate * 1000))
        policy = self.policies.get(signature)
        if policy is None:
            window = max(1, math.ceil(decision.capacity / decision.refill_rate))
            policy = f'"{rule}";q={decision.capacity};w={window}'
            if len(self.policies) < 10_000:
                self.policies[signature] = policy
        remaining = decision.tokens_remaining if decision.tokens_remaining > 0 else 0
        wait = math.ceil(decision.retry_after)
        headers = [("RateLimit-Policy", policy), ("RateLimit", f'"{rule}";r={remaining};t={wait}')]
        if not decision.allowed:
            headers.append(("Retry-After", str(wait)))
        return headers


class RatingApp:
    """Maps HTTP requests onto a ``Limiter``; one instance per node."""

    def __init__(
        self,
        limiter: Limiter,
        *,
        region: str,
        node: str,
        cluster_id: str = "",
        admin_token: str | None = None,
        metrics: NodeMetrics | None = None,
        sync: SyncView | None = None,
        version: str = "0",
        ready: Callable[[], dict[str, str]] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limiter = limiter
        self.region = region
        self.node = node
        self.cluster_id = cluster_id
        self.admin_token = admin_token or None
        self.metrics = metrics or NodeMetrics()
        self.sync = sync or SyncView()
        self.version = version
        self.ready_checks = ready
        self.monotonic = monotonic
        self.started = monotonic()
        self.idempotency = IdempotencyCache()
        self.scope_headers = sorted(
            {name for rule in limiter.rules for name in rule.template.header_names}
        )
        self.renderer = DecisionRenderer(region)
        self.region_suffix = self.renderer.region_suffix
        self.rate_decoder = msgspec.json.Decoder(api.RateRequest)
        self.batch_decoder = msgspec.json.Decoder(api.BatchRequest)
        self.patch_decoder = msgspec.json.Decoder(api.PatchRequest)
        self.encoder = msgspec.json.Encoder()
        self.openapi = msgspec.json.encode(api.openapi_document(version))
        self.routes: dict[tuple[str, str], tuple[str, Callable[[Request], Answer]]] = {
            ("POST", "/v1/rate"): ("rate", self.rate_post),
            ("POST", "/rate"): ("rate", self.rate_post),
            ("GET", "/v1/rate"): ("rate", self.rate_get),
            ("POST", "/v1/rate/batch"): ("batch", self.rate_batch),
            ("GET", "/v1/bucket/state"): ("state", self.bucket_state),
            ("GET", "/v1/status"): ("status", self.status),
            ("GET", "/status"): ("status", self.status),
            ("GET", "/healthz"): ("healthz", self.healthz),
            ("GET", "/readyz"): ("readyz", self.readyz),
            ("GET", "/metrics"): ("metrics", self.metrics_text),
            ("GET", "/openapi.json"): ("openapi", self.openapi_json),
        }
        self.prefix_routes: list[tuple[str, str, str, Callable[[Request, str], Answer]]] = [
            ("GET", "/v1/buckets/", "buckets", self.bucket_get),
            ("PATCH", "/v1/buckets/", "buckets", self.bucket_patch),
            ("PATCH", "/buckets/", "buckets", self.bucket_patch),
        ]
        self.metrics.gauge(
            "bucketmesh_live_buckets", "Buckets held in memory", lambda: len(limiter)
        )
        self.metrics.gauge(
            "bucketmesh_bucket_cap", "Configured cap on live buckets", lambda: limiter.max_buckets
        )
        self.metrics.gauge(
            "bucketmesh_idempotency_cache_entries",
            "Decisions kept for Idempotency-Key replays",
            lambda: len(self.idempotency),
        )
        self.metrics.counter(
            "bucketmesh_expired_buckets",
            "Idle buckets dropped after their ttl",
            lambda: limiter.expired_total,
        )
        self.metrics.counter(
            "bucketmesh_bucket_cap_rejections",
            "New keys refused because the live-bucket cap was reached",
            lambda: limiter.cap_rejections,
        )

    def add_route(
        self, method: str, path: str, route: str, handler: Callable[[Request], Answer]
    ) -> None:
        """Serve ``method path`` with ``handler`` (how the sync mesh adds /v1/sync/...).

        ``route`` is the bounded metrics label. A handler may raise ``ApiError``
        (at once, or from the awaitable it returns) and may be a coroutine function.
        """
        self.routes[(method, path)] = (route, handler)

    # -- dispatch ------------------------------------------------------------

    def __call__(self, request: Request) -> Answer:
        started = time.perf_counter()
        route, response = self.dispatch(request)
        if type(response) is not Response:
            return self._finish(route, response, started)  # type: ignore[arg-type]
        self.metrics.count_response(route, response.status, time.perf_counter() - started)
        return response

    async def _finish(self, route: str, pending: Awaitable[Response], started: float) -> Response:
        """Await an async handler's answer; its ApiError renders like a sync one's."""
        try:
            response = await pending
        except ApiError as error:
            self.metrics.count_rejection(error.reason)
            response = error.response()
        self.metrics.count_response(route, response.status, time.perf_counter() - started)
        return response

    def dispatch(self, request: Request) -> tuple[str, Answer]:
        method = "GET" if request.method == "HEAD" else request.method  # http11 drops the body
        path = request.path
        route = "other"
        try:
            found = self.routes.get((method, path))
            if found is not None:
                route = found[0]
                return route, found[1](request)
            for route_method, prefix, prefix_route, handler in self.prefix_routes:
                if route_method == method and path.startswith(prefix) and len(path) > len(prefix):
                    route = prefix_route
                    return route, handler(request, path[len(prefix) :])
            return route, self.not_found_or_method(request)
        except ApiError as error:
            self.metrics.count_rejection(error.reason)
            return route, error.response()

    def not_found_or_method(self, request: Request) -> Response:
        path = request.path
        allowed = sorted(m for (m, p) in self.routes if p == path)
        allowed += sorted(
            {m for m, prefix, _, _ in self.prefix_routes if path.startswith(prefix)}
            if any(
                len(path) > len(prefix) and path.startswith(prefix)
                for _, prefix, _, _ in self.prefix_routes
            )
            else set()
        )
        if allowed:
            return problem(
                405,
                "Method Not Allowed",
                f"{request.method} is not allowed on {path}; use {', '.join(allowed)}",
                headers=[("Allow", ", ".join(allowed))],
            )
        return problem(404, "Not Found", f"no endpoint at {path}")

    # -- decisions -----------------------------------------------------------

    def rate_post(self, request: Request) -> Answer:
        cache_key = self._idempotency_key(request)
        if cache_key is not None:
            replay = self.idempotency.get(cache_key, self.monotonic())
            if replay is not None:
                return replay
        body = request.body
        if body.strip():
            self._require_json(request)
            try:
                rate = self.rate_decoder.decode(body)
            except (msgspec.ValidationError, msgspec.DecodeError) as error:
                raise self._body_error(error, body) from None
        else:
            rate = api.RateRequest()
        response = self._decide(request, rate.key, rate.rule, rate.tokens)
        if cache_key is not None:
            if type(response) is not Response:
                return self._remember_later(cache_key, response)  # type: ignore[arg-type]
            self.idempotency.put(cache_key, replayed(response), self.monotonic())
        return response

    async def _remember_later(
        self, cache_key: tuple[str, str], pending: Awaitable[Response]
    ) -> Response:
        """An async decision (a store-backed node) is cached once it is known."""
        response = await pending
        self.idempotency.put(cache_key, replayed(response), self.monotonic())
        return response

    def rate_get(self, request: Request) -> Answer:
        query = request.query
        raw_tokens = query.get("tokens")
        tokens = 1
        if raw_tokens is not None:
            try:
                tokens = int(raw_tokens)
            except ValueError:
                raise bad_request(
                    f"tokens must be an integer, got {raw_tokens!r}", "tokens"
                ) from None
        return self._decide(request, query.get("key") or None, query.get("rule") or None, tokens)

    def _decide(self, request: Request, key: str | None, rule: str | None, tokens: int) -> Answer:
        if tokens < 0:
            raise bad_request(f"tokens must be >= 0, got {tokens}", "tokens")
        if key is None:
            key, rule = self._render_key(request)
        elif rule is not None and rule not in self.limiter.rules_by_name:
            raise bad_request(f"unknown rule {rule!r}", "rule")
        decision = self._acquire(key, rule, tokens)
        self.metrics.count_decision(decision.rule, decision.allowed)
        return self._decision_response(decision)

    def _acquire(self, key: str, rule: str | None, tokens: int) -> Decision:
        try:
            return self.limiter.acquire(key, tokens, rule=rule)
        except (InvalidTokens, NoRuleError, BucketCapReached) as error:
            raise self._acquire_error(error, rule) from None

    @staticmethod
    def _acquire_error(
        error: InvalidTokens | NoRuleError | BucketCapReached, rule: str | None
    ) -> ApiError:
        """The API's answer to what an acquire raised (shared with store-backed nodes)."""
        if isinstance(error, InvalidTokens):
            return bad_request(str(error), "tokens")
        if isinstance(error, NoRuleError):
            return bad_request(f"{error}", "rule" if rule else "key")
        return ApiError(
            503,
            "Service Unavailable",
            f"{error}; new keys are refused until idle buckets expire",
            headers=[("Retry-After", "1")],
            reason="bucket_cap",
        )

    def _render_key(self, request: Request) -> tuple[str, str]:
        rules = self.limiter.rules
        headers, query, client_ip = request.headers, request.query, request.client_ip
        found = first_match(rules, headers, query, client_ip)
        if found is not None:
            return found
        if not rules:
            raise bad_request('no bucket rules are configured; give "key" and "rule"', "key")
        first = rules[0]
        missing = first.template.missing(headers, query, client_ip)
        named = _MISSING.match(missing)
        field = named.group(1) if named else "key"
        raise bad_request(
            f"no rule matches this request: {missing} (rule {first.name!r} needs it), "
            'and no "key" was given',
            field,
        )

    def _decision_response(self, decision: Decision) -> Response:
        renderer = self.renderer
        headers = renderer.headers(decision)
        if decision.allowed:
            return Response(200, renderer.allowed_body(decision), JSON, headers)
        return Response(429, renderer.denied_body(decision), PROBLEM, headers)

    def rate_batch(self, request: Request) -> Answer:
        cache_key = self._idempotency_key(request)
        if cache_key is not None:
            replay = self.idempotency.get(cache_key, self.monotonic())
            if replay is not None:
                return replay
        self._require_json(request)
        if not request.body.strip():
            raise bad_request('a JSON body {"requests": [...]} is required', "requests")
        try:
            batch = self.batch_decoder.decode(request.body)
        except (msgspec.ValidationError, msgspec.DecodeError) as error:
            raise self._body_error(error, request.body) from None
        items = batch.requests
        if len(items) > MAX_BATCH:
            raise bad_request(
                f"at most {MAX_BATCH} requests per batch, got {len(items)}", "requests"
            )
        resolved: list[tuple[str, str | None, int]] = []
        rule: str | None
        for index, item in enumerate(items):
            if item.tokens < 0:
                raise bad_request(
                    f"tokens must be >= 0, got {item.tokens}", f"requests[{index}].tokens"
                )
            if item.key is None:
                try:
                    key, rule = self._render_key(request)
                except ApiError as error:
                    error.field = f"requests[{index}].key"
                    raise
            else:
                key, rule = item.key, item.rule
                if rule is not None and rule not in self.limiter.rules_by_name:
                    raise bad_request(f"unknown rule {rule!r}", f"requests[{index}].rule")
            # Validate every item before charging any: a bad item fails the whole
            # batch with nothing spent, atomic or not.
            try:
                capacity = self.limiter.inspect(key, rule=rule).config.capacity
            except NoRuleError as error:
                raise bad_request(str(error), f"requests[{index}].key") from None
            if item.tokens > capacity:
                raise bad_request(
                    f"tokens must be between 0 and the capacity {capacity}, got {item.tokens}",
                    f"requests[{index}].tokens",
                )
            resolved.append((key, rule, item.tokens))
        decisions = self._batch_decisions(resolved, batch.atomic)
        if not isinstance(decisions, list):
            return self._batch_later(decisions, cache_key)
        return self._batch_response(decisions, cache_key)

    def _batch_decisions(
        self, resolved: list[tuple[str, str | None, int]], atomic: bool
    ) -> list[Decision] | Awaitable[list[Decision]]:
        """The batch's decisions in order: at once here, awaitable on a store-backed node."""
        return self._batch_atomic(resolved) if atomic else [self._acquire(*r) for r in resolved]

    async def _batch_later(
        self, pending: Awaitable[list[Decision]], cache_key: tuple[str, str] | None
    ) -> Response:
        return self._batch_response(await pending, cache_key)

    def _batch_response(
        self, decisions: list[Decision], cache_key: tuple[str, str] | None
    ) -> Response:
        # Each result is an api.DecisionBody: the Decision's JSON with the region
        # spliced in (as rate_post does), which skips a struct copy per item.
        allowed = 0
        results = []
        encode = self.encoder.encode
        suffix = self.region_suffix
        for decision in decisions:
            allowed += decision.allowed
            self.metrics.count_decision(decision.rule, decision.allowed)
            results.append(encode(decision)[:-1] + suffix)
        body = b'{"results":[%s],"allowed":%d,"denied":%d}' % (
            b",".join(results),
            allowed,
            len(results) - allowed,
        )
        response = Response(200, body, JSON)
        if cache_key is not None:
            self.idempotency.put(cache_key, replayed(response), self.monotonic())
        return response

    def _batch_atomic(self, resolved: list[tuple[str, str | None, int]]) -> list[Decision]:
        """All or nothing: every key must hold the sum asked of it, or nothing is charged."""
        wanted: dict[str, tuple[str | None, int]] = {}
        for key, rule, tokens in resolved:
            previous = wanted.get(key)
            wanted[key] = (rule, tokens + (previous[1] if previous else 0))
        now = self.limiter.clock()
        short = {}
        for key, (rule, total) in wanted.items():
            bucket = self._inspect(key, rule)
            if total > bucket.config.capacity or bucket.level(now) < total:
                short[key] = bucket.retry_after_ns(min(total, bucket.config.capacity), now)
        if not short:
            return [self._acquire(key, rule, tokens) for key, rule, tokens in resolved]
        out = []
        for key, rule, _ in resolved:
            peek = self._acquire(key, rule, 0)
            wait = short.get(key, 0) / NS_PER_S
            out.append(msgspec.structs.replace(peek, allowed=False, retry_after=wait))
        return out

    def _inspect(self, key: str, rule: str | None) -> Bucket:
        try:
            return self.limiter.inspect(key, rule=rule)
        except NoRuleError as error:
            raise bad_request(str(error), "key") from None

    # -- inspection ------------------------------------------------------------

    def _bucket_body(self, key: str, rule: str | None = None) -> api.BucketStateBody:
        try:
            bucket = self.limiter.inspect(key, rule=rule)
        except NoRuleError as error:
            raise ApiError(404, "Not Found", str(error), field="key") from None
        return self._state_of(key, bucket)

    def _state_of(self, key: str, bucket: Bucket) -> api.BucketStateBody:
        now = self.limiter.clock()
        cfg = bucket.config
        used = bucket.used(self.limiter.replica_id) if key in self.limiter.buckets else {}
        return api.BucketStateBody(
            key=key,
            rule=bucket.rule,
            tokens_remaining=bucket.level(now),
            capacity=cfg.capacity,
            refill_rate=cfg.refill_rate,
            ttl=cfg.ttl_ns / NS_PER_S,
            mode=cfg.mode,
            config_version=api.version_text(cfg.version),
            reset_after=bucket.reset_after_ns(now) / NS_PER_S,
            epoch=bucket.epoch,
            replicas={rid: api.ReplicaEntry(n) for rid, n in sorted(used.items())},
            live=key in self.limiter.buckets,
        )

    def bucket_state(self, request: Request) -> Answer:
        key = request.query.get("key")
        if not key:
            raise bad_request("query parameter key is required", "key")
        rule = request.query.get("rule") or None
        return self._json(self._bucket_body(key, rule))

    def bucket_get(self, request: Request, key: str) -> Answer:
        rule = self.limiter.rules_by_name.get(key)
        if rule is not None:
            return self._json(
                self._config_body(key, rule.name, self.limiter.rule_configs[key], "rule")
            )
        return self._json(self._bucket_body(key))

    def _config_body(
        self, key: str, rule: str, cfg: BucketConfig, applies_to: Any
    ) -> api.BucketConfigBody:
        return api.BucketConfigBody(
            key=key,
            rule=rule,
            capacity=cfg.capacity,
            refill_rate=cfg.refill_rate,
            ttl=cfg.ttl_ns / NS_PER_S,
            mode=cfg.mode,
            version=api.version_text(cfg.version),
            applies_to=applies_to,
        )

    def bucket_patch(self, request: Request, key: str) -> Answer:
        self._require_admin(request)
        self._require_json(request)
        if not request.body.strip():
            raise bad_request("a JSON body with capacity, refillRate, ttl or mode is required")
        try:
            patch = self.patch_decoder.decode(request.body)
        except (msgspec.ValidationError, msgspec.DecodeError) as error:
            raise self._body_error(error, request.body) from None
        if patch.refillRate is not None and patch.refill_rate is not None:
            raise bad_request("give refillRate or refill_rate, not both", "refillRate")
        rate = patch.refillRate if patch.refillRate is not None else patch.refill_rate
        if patch.capacity is None and rate is None and patch.ttl is None and patch.mode is None:
            raise bad_request("nothing to change: give capacity, refillRate, ttl or mode")
        checks: tuple[tuple[str, float | None, Callable[[float], bool], str], ...] = (
            ("capacity", patch.capacity, lambda v: v >= 1 and v <= 10**15, "an integer >= 1"),
            ("refillRate", rate, lambda v: math.isfinite(v) and 1e-9 <= v <= 1e9, "in [1e-9, 1e9]"),
            (
                "ttl",
                patch.ttl,
                lambda v: math.isfinite(v) and 0.001 <= v <= 10**8,
                "in [0.001, 1e8]",
            ),
        )
        for name, value, valid, expectation in checks:
            if value is not None and not valid(value):
                raise bad_request(f"{name} must be {expectation}, got {value}", name)
        is_rule = key in self.limiter.rules_by_name
        try:
            config = self.limiter.configure(
                key, capacity=patch.capacity, refill_rate=rate, ttl=patch.ttl, mode=patch.mode
            )
        except NoRuleError as error:
            raise ApiError(
                404,
                "Not Found",
                f"{key!r} is neither a rule nor a key of one: {error}",
                field="key",
            ) from None
        except BucketCapReached as error:
            raise ApiError(
                503,
                "Service Unavailable",
                str(error),
                headers=[("Retry-After", "1")],
                reason="bucket_cap",
            ) from None
        except ValueError as error:
            # a limiter may name the field (the redis mirror's exactness check does)
            field = getattr(error, "field", None)
            if field is None:
                field = "mode" if "mode" in str(error) else "capacity"
            raise bad_request(str(error), field) from None
        rule = key if is_rule else self.limiter.buckets[key].rule
        return self._json(self._config_body(key, rule, config, "rule" if is_rule else "key"))

    # -- node ------------------------------------------------------------------

    def status(self, request: Request) -> Answer:
        key = request.query.get("key")
        body = api.StatusBody(
            region=self.region,
            node=self.node,
            replica_id=self.limiter.replica_id,
            cluster_id=self.cluster_id,
            sync=self.sync.status(),
            buckets=len(self.limiter),
            version=self.version,
            uptime_s=round(self.monotonic() - self.started, 3),
            bucket=self._bucket_body(key) if key else None,
        )
        return self._json(body)

    def healthz(self, request: Request) -> Response:
        return self._json(api.Health("ok"))

    def readyz(self, request: Request) -> Response:
        checks = self.ready_checks() if self.ready_checks else {"config": "ok"}
        ok = all(v == "ok" for v in checks.values())
        return Response(
            200 if ok else 503,
            self.encoder.encode(api.Health("ready" if ok else "not ready", checks)),
            JSON,
        )

    def metrics_text(self, request: Request) -> Response:
        return Response(200, self.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8")

    def openapi_json(self, request: Request) -> Response:
        return Response(200, self.openapi, JSON)

    # -- helpers -----------------------------------------------------------------

    def _json(self, value: object) -> Response:
        return Response(200, self.encoder.encode(value), JSON)

    def _idempotency_key(self, request: Request) -> tuple[str, str] | None:
        value = request.headers.get("idempotency-key")
        if value is None:
            return None
        if not value or len(value) > MAX_IDEMPOTENCY_KEY:
            raise bad_request(
                f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters", "Idempotency-Key"
            )
        # Scoped to the caller and the request: the same Idempotency-Key sent by
        # another client (another API key or address) or with another body is a
        # different request, never a replay of someone else's decision.
        headers = request.headers
        scope = "\x00".join(
            [request.client_ip, request.body.decode("latin-1"), repr(sorted(request.query.items()))]
            + [headers.get(name, "") for name in self.scope_headers]
        )
        return (request.path, value + "\x00" + scope)

    def _require_json(self, request: Request) -> None:
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";", 1)[0].strip().lower()
        if (
            media
            and media != "application/x-www-form-urlencoded"
            and not (media == "application/json" or media.endswith("+json"))
        ):
            raise ApiError(
                415,
                "Unsupported Media Type",
                f"the body must be JSON (Content-Type: application/json), got {media}",
                field="Content-Type",
            )

    def _body_error(
        self, error: msgspec.ValidationError | msgspec.DecodeError, body: bytes
    ) -> ApiError:
        if isinstance(error, msgspec.DecodeError) and not isinstance(
            error, msgspec.ValidationError
        ):
            if body.lstrip()[:1] not in (b"{", b"[", b'"') and not body.lstrip()[:1].isdigit():
                return ApiError(415, "Unsupported Media Type", "the body is not JSON", field="body")
            return bad_request(f"malformed JSON: {error}", "body")
        message = str(error)
        path = api.error_field(error)
        unknown = _UNKNOWN_FIELD.search(message)
        if unknown:
            path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        return bad_request(message, path or "body")

    def _require_admin(self, request: Request) -> None:
        token = self.admin_token
        if token is None:
            return
        supplied = request.headers.get("authorization", "")
        if not supplied.lower().startswith("bearer "):
            raise ApiError(
                401,
                "Unauthorized",
                "this endpoint needs Authorization: Bearer <admin token>",
                field="Authorization",
                headers=[("WWW-Authenticate", 'Bearer realm="bucketmesh"')],
                reason="unauthenticated",
            )
        if not hmac.compare_digest(supplied[7:].strip().encode(), token.encode()):
            raise ApiError(
                403,
                "Forbidden",
                "the admin token is wrong",
                field="Authorization",
                reason="forbidden",
            )
