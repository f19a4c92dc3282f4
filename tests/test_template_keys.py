"""Bucket keys rendered from request text are injective, through a real ``bucketmesh serve``.

A client controls the header and query values a key template substitutes. These
tests send real HTTP requests (``POST /v1/rate`` without a ``key``: the first rule
whose template the request satisfies renders it) that try to make one rule's key
spell another rule's, or one value pair spell another: each must land in a bucket
of its own, under its own rule. docs/api.md "Bucket keys" is the contract.

Counts are exact: every rule refills one token per 1000 s, far longer than a test
runs; nothing waits for a duration.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import ServerFactory, make_config

SLOW = 0.001
RULES: list[dict[str, Any]] = [
    # the victim's rule: two values, 1000 tokens
    {
        "name": "pair",
        "key": "k-{{ .Request.Header.X-A }}-{{ .Request.Header.X-B }}",
        "capacity": 1000,
        "refillRate": SLOW,
    },
    # the attacker's: one value, 5 tokens; same literal text
    {"name": "single", "key": "k-{{ .Request.Header.X-A }}", "capacity": 5, "refillRate": SLOW},
    # literal prefixes that overlap: "user-" is a prefix of "user-admin-"
    {"name": "user", "key": "user-{{ .Request.Header.X-User }}", "capacity": 5, "refillRate": SLOW},
    {
        "name": "admin",
        "key": "user-admin-{{ .Request.Query.admin }}",
        "capacity": 1000,
        "refillRate": SLOW,
    },
]


@pytest.fixture(scope="module")
def server(serve_module: ServerFactory) -> Any:
    return serve_module(make_config(RULES))


def rate(server: Any, headers: dict[str, str], params: dict[str, str] | None = None) -> Any:
    with server.client() as client:
        return client.post("/v1/rate", headers=headers, params=params or {})


def test_a_shorter_rule_cannot_take_over_a_longer_rules_bucket(server: Any) -> None:
    # The attacker's single value spells what the victim's two values would render
    # unescaped ("k-bob-gold"); it reaches the 5-token rule and creates its bucket first.
    attacker = rate(server, {"X-A": "bob-gold"})
    assert attacker.status_code == 200, attacker.text
    assert attacker.json()["rule"] == "single"
    victim = [rate(server, {"X-A": "bob", "X-B": "gold"}) for _ in range(10)]
    assert [r.status_code for r in victim] == [200] * 10, victim[-1].text
    assert {r.json()["rule"] for r in victim} == {"pair"}
    assert [r.json()["tokens_remaining"] for r in victim] == list(range(999, 989, -1))
    assert victim[0].json()["key"] == "k-bob-gold"
    # the attacker's key names its rule: an earlier rule's template claims that text
    assert attacker.json()["key"] == "k-bob-gold%@single"
    with server.client() as client:
        state = client.get("/v1/bucket/state", params={"key": "k-bob-gold%@single"})
    assert state.status_code == 200, state.text
    assert (state.json()["rule"], state.json()["tokens_remaining"]) == ("single", 4)


def test_one_rule_never_renders_two_value_pairs_as_one_key(server: Any) -> None:
    first = rate(server, {"X-A": "carol-x", "X-B": "y"})
    second = rate(server, {"X-A": "carol", "X-B": "x-y"})
    assert (first.status_code, second.status_code) == (200, 200), (first.text, second.text)
    assert first.json()["key"] == "k-carol%2Dx-y"
    assert second.json()["key"] == "k-carol-x%2Dy"
    assert [r.json()["tokens_remaining"] for r in (first, second)] == [999, 999]


def test_overlapping_literal_prefixes_keep_their_buckets_apart(server: Any) -> None:
    # "user-" + "admin-dave" spells what "user-admin-" + "dave" renders
    attacker = [rate(server, {"X-User": "admin-dave"}) for _ in range(5)]
    assert [r.status_code for r in attacker] == [200] * 5
    assert rate(server, {"X-User": "admin-dave"}).status_code == 429
    victim = [rate(server, {}, {"admin": "dave"}) for _ in range(10)]
    assert [r.status_code for r in victim] == [200] * 10, victim[-1].text
    assert {r.json()["rule"] for r in victim} == {"admin"}
    assert victim[-1].json()["tokens_remaining"] == 990
    # the first rule keeps its keys as they read; the later one carries its name
    assert attacker[0].json()["key"] == "user-admin-dave"
    assert victim[0].json()["key"] == "user-admin-dave%@admin"


def test_a_plain_value_keeps_its_documented_key(server: Any) -> None:
    answer = rate(server, {"X-User": "erin"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["key"] == "user-erin"
    # and the API finds the same bucket by that key
    with server.client() as client:
        again = client.post("/v1/rate", json={"key": "user-erin"})
    assert again.json()["rule"] == "user"
    assert again.json()["tokens_remaining"] == 3
