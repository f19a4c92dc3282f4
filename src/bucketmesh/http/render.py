"""A Decision as the API answers it: the JSON body (200, or 429 problem+json of type
quota-exceeded) and the IETF RateLimit headers. Shared by the Rating API routes and
the ASGI middleware, so both answer byte for byte alike."""

from __future__ import annotations

import math

import msgspec

from bucketmesh.core.bucket import Decision
from bucketmesh.http.errors import JSON, PROBLEM
from bucketmesh.http.server import Response

_POLICY_CACHE_MAX = 10_000


class DecisionRenderer:
    """Renders decisions for one region (its name is spliced into every body)."""

    def __init__(self, region: str) -> None:
        self.encoder = msgspec.json.Encoder()
        self.region_suffix = b',"region":' + msgspec.json.encode(region) + b"}"
        self.policies: dict[tuple[str, int, int], str] = {}
        self.heads: dict[tuple[str, int, int], bytes] = {}
        # the policy of the last answer and its encoded prefix (a one-entry cache)
        self.last_rule: str | None = None
        self.last_capacity = -1
        self.last_rate = -1.0
        self.last_prefix = b""

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

    def _policy(self, decision: Decision, rule: str) -> str:
        signature = (rule, decision.capacity, round(decision.refill_rate * 1000))
        policy = self.policies.get(signature)
        if policy is None:
            window = max(1, math.ceil(decision.capacity / decision.refill_rate))
            policy = f'"{rule}";q={decision.capacity};w={window}'
            if len(self.policies) < _POLICY_CACHE_MAX:
                self.policies[signature] = policy
        return policy

    def headers(self, decision: Decision) -> list[tuple[str, str]]:
        """draft-ietf-httpapi-ratelimit-headers: the policy (q quota, w window = time
        to refill from empty) and the current state (r remaining, t seconds to wait);
        with Retry-After on a denial."""
        rule = decision.rule or "bucket"
        policy = self._policy(decision, rule)
        remaining = decision.tokens_remaining if decision.tokens_remaining > 0 else 0
        wait = math.ceil(decision.retry_after)
        headers = [("RateLimit-Policy", policy), ("RateLimit", f'"{rule}";r={remaining};t={wait}')]
        if not decision.allowed:
            headers.append(("Retry-After", str(wait)))
        return headers

    def _head_prefix(self, decision: Decision, rule: str) -> bytes | None:
        """``RateLimit-Policy: <policy>\\r\\nRateLimit: "<rule>";r=``, encoded once per
        policy; None when the rule's name cannot go into a header as it is (the
        server then refuses the answer as it refuses any such header)."""
        signature = (rule, decision.capacity, round(decision.refill_rate * 1000))
        prefix = self.heads.get(signature)
        if prefix is None:
            text = f'RateLimit-Policy: {self._policy(decision, rule)}\r\nRateLimit: "{rule}";r='
            if text.count("\r") != 1 or text.count("\n") != 1 or not text.isascii():
                return None
            prefix = text.encode("ascii")
            if len(self.heads) < _POLICY_CACHE_MAX:
                self.heads[signature] = prefix
        return prefix

    def response(self, decision: Decision) -> Response:
        """The whole answer: 200 with the decision, or 429 problem+json; its header
        lines encoded here (``Response.head``), the constant part once per policy."""
        rule = decision.rule
        if (
            rule == self.last_rule
            and decision.capacity == self.last_capacity
            and decision.refill_rate == self.last_rate
        ):
            prefix: bytes | None = self.last_prefix  # the same policy as the last answer's
        else:
            prefix = self._head_prefix(decision, rule or "bucket")
            if prefix is not None:
                self.last_rule, self.last_prefix = rule, prefix
                self.last_capacity, self.last_rate = decision.capacity, decision.refill_rate
        if prefix is None:
            headers = self.headers(decision)
            if decision.allowed:
                return Response(200, self.allowed_body(decision), JSON, headers)
            return Response(429, self.denied_body(decision), PROBLEM, headers)
        remaining = decision.tokens_remaining
        if remaining < 0:
            remaining = 0
        wait = math.ceil(decision.retry_after)
        if decision.allowed:
            return Response(
                200,
                self.encoder.encode(decision)[:-1] + self.region_suffix,
                JSON,
                None,
                b"%s%d;t=%d\r\nContent-Type: application/json\r\n" % (prefix, remaining, wait),
            )
        return Response(
            429,
            self.denied_body(decision),
            PROBLEM,
            None,
            b"%s%d;t=%d\r\nRetry-After: %d\r\nContent-Type: application/problem+json\r\n"
            % (prefix, remaining, wait, wait),
        )
