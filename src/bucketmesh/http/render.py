"""A Decision as the API answers it: the JSON body (200, or 429 problem+json of type
quota-exceeded) and the IETF RateLimit headers. Shared by the Rating API routes and
the ASGI middleware, so both answer byte for byte alike.

``response`` is the reference: the body is msgspec's encoding of the Decision.
``granted`` answers a grant the same bytes from a template made once per policy
(rule, capacity, refill rate, mode): only the key, the level and the two times are
formatted per answer (tests/test_rate_fast_path.py holds the two alike)."""

from __future__ import annotations

import math

import msgspec

from bucketmesh.core.bucket import Decision
from bucketmesh.http.errors import JSON, PROBLEM
from bucketmesh.http.server import Response

_POLICY_CACHE_MAX = 10_000
_UNKNOWN = (b"", b"")  # a policy not seen yet (None: seen, no template)


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
        # (rule, capacity, refill rate, mode) -> a grant's head and body templates
        self.grants: dict[tuple[str, int, float, str], tuple[bytes, bytes] | None] = {}
        # the last grant's policy, its templates, and the last grant's key encoded
        self.grant_policy: tuple[str, int, float, str] = ("", -1, -1.0, "")
        self.grant_head = self.grant_body = b""
        self.grant_key = ""
        self.grant_key_json = b'""'

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

    def _grant_template(self, decision: Decision) -> tuple[bytes, bytes] | None:
        """A grant's head and body for ``decision``'s policy as ``%``-templates (head:
        the level and the wait; body: the key, the level and the two times, each as
        msgspec encodes it), made the last policy's; None when the rule's name
        cannot go into a header as it is."""
        rule = decision.rule
        signature = (rule, decision.capacity, decision.refill_rate, decision.mode)
        template = self.grants.get(signature, _UNKNOWN)
        if template is _UNKNOWN:
            template = None
            prefix = self._head_prefix(decision, rule or "bucket")
            if prefix is not None:
                encode = self.encoder.encode
                fixed = (
                    encode(decision.mode) + b',"rule":' + encode(rule) + self.region_suffix
                ).replace(b"%", b"%%")
                template = (
                    prefix.replace(b"%", b"%%") + b"%d;t=%d\r\nContent-Type: application/json\r\n",
                    b'{"allowed":true,"key":%s,"tokens_remaining":%d,"capacity":'
                    + encode(decision.capacity)
                    + b',"refill_rate":'
                    + encode(decision.refill_rate)
                    + b',"retry_after":%s,"reset_after":%s,"mode":'
                    + fixed,
                )
            if len(self.grants) < _POLICY_CACHE_MAX:
                self.grants[signature] = template
        if template is not None:
            self.grant_policy = signature
            self.grant_head, self.grant_body = template
        return template

    def granted(self, decision: Decision) -> Response:
        """``response(decision)`` for a grant (``decision.allowed``), byte for byte,
        from its policy's templates (the last policy's at hand)."""
        rule, capacity, rate, mode = self.grant_policy
        if (
            decision.rule != rule
            or decision.capacity != capacity
            or decision.refill_rate != rate
            or decision.mode != mode
        ) and self._grant_template(decision) is None:
            return self.response(decision)
        key = decision.key
        if key != self.grant_key:  # the same client's key again: encoded once
            self.grant_key, self.grant_key_json = key, self.encoder.encode(key)
        remaining = decision.tokens_remaining
        retry_after = decision.retry_after
        encode = self.encoder.encode
        return Response(
            200,
            self.grant_body
            % (self.grant_key_json, remaining, encode(retry_after), encode(decision.reset_after)),
            JSON,
            None,
            self.grant_head % (remaining if remaining > 0 else 0, math.ceil(retry_after)),
        )

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
