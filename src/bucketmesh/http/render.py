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
            if len(self.policies) < _POLICY_CACHE_MAX:
                self.policies[signature] = policy
        remaining = decision.tokens_remaining if decision.tokens_remaining > 0 else 0
        wait = math.ceil(decision.retry_after)
        headers = [("RateLimit-Policy", policy), ("RateLimit", f'"{rule}";r={remaining};t={wait}')]
        if not decision.allowed:
            headers.append(("Retry-After", str(wait)))
        return headers

    def response(self, decision: Decision) -> Response:
        """The whole answer: 200 with the decision, or 429 problem+json."""
        headers = self.headers(decision)
        if decision.allowed:
            return Response(200, self.allowed_body(decision), JSON, headers)
        return Response(429, self.denied_body(decision), PROBLEM, headers)
