"""The README's guarantees at the edges of the Rating API (issue 12's findings), each
against a real ``bucketmesh serve``: batches are validated whole before anything is
charged, every key that can be decided can be replicated, and numbers are ASCII."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import ServerFactory, make_config

from bucketmesh.core.limits import MAX_KEY_BYTES

RULES = [
    {"name": "a", "key": "a-{{ .Request.Header.X-A }}", "capacity": 10, "refillRate": 0.001},
    {"name": "b", "key": "b-{{ .Request.Header.X-B }}", "capacity": 10, "refillRate": 0.001},
]


def remaining(client: Any, key: str, rule: str = "a") -> int:
    state = client.get("/v1/bucket/state", params={"key": key, "rule": rule}).json()
    return int(state["tokens_remaining"])


@pytest.mark.parametrize("atomic", [True, False])
def test_a_batch_with_a_new_key_at_the_bucket_cap_charges_nothing(
    serve: ServerFactory, atomic: bool
) -> None:
    node = serve(make_config(RULES, limits={"maxBuckets": 2}))
    with node.client() as client:
        for key in ("k0", "k1"):
            assert client.post("/v1/rate", json={"key": key, "rule": "a"}).status_code == 200
        batch = {
            "atomic": atomic,
            "requests": [
                {"key": "k0", "rule": "a", "tokens": 3},
                {"key": "k1", "rule": "a", "tokens": 3},
                {"key": "k2", "rule": "a", "tokens": 1},  # new, and the cap is full
            ],
        }
        refused = client.post("/v1/rate/batch", json=batch)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["detail"]
        # nothing of the batch was charged
        assert remaining(client, "k0") == 9 and remaining(client, "k1") == 9


def test_a_batch_naming_one_new_key_under_two_rules_is_refused_before_any_charge(
    serve: ServerFactory,
) -> None:
    node = serve(make_config(RULES))
    with node.client() as client:
        batch = {
            "requests": [
                {"key": "shared-key", "rule": "a", "tokens": 2},
                {"key": "shared-key", "rule": "b", "tokens": 2},
            ]
        }
        refused = client.post("/v1/rate/batch", json=batch)
        assert refused.status_code == 400, refused.text
        assert refused.json()["field"] == "requests[1].rule"
        state = client.get("/v1/bucket/state", params={"key": "shared-key", "rule": "a"}).json()
        assert state["live"] is False and state["tokens_remaining"] == 10


def test_a_key_too_long_to_replicate_is_refused_at_the_door(serve: ServerFactory) -> None:
    node = serve(make_config(RULES))
    with node.client() as client:
        fits = "k" * (MAX_KEY_BYTES - 2)  # "a-" + it is exactly the limit
        assert client.post("/v1/rate", headers={"X-A": fits}).status_code == 200
        for too_long in ("k" * (MAX_KEY_BYTES - 1), "é" * MAX_KEY_BYTES):
            refused = client.post("/v1/rate", json={"key": "a-" + too_long, "rule": "a"})
            assert refused.status_code == 400, refused.text
            assert refused.json()["field"] == "key"
            assert str(MAX_KEY_BYTES) in refused.json()["detail"]
        batch = {"requests": [{"key": "a-x", "rule": "a"}, {"key": "a-" + "k" * MAX_KEY_BYTES}]}
        refused = client.post("/v1/rate/batch", json=batch)
        assert refused.status_code == 400 and refused.json()["field"] == "requests[1].key"
        assert remaining(client, "a-x") == 10  # nothing of that batch was charged
        assert client.get("/v1/status").json()["buckets"] == 1


@pytest.mark.parametrize("tokens", ["٣", "1_0", "³", "１", " 3", "3 ", "0x3", "3.0"])
def test_tokens_in_a_query_are_ascii_digits(serve: ServerFactory, tokens: str) -> None:
    node = serve(make_config(RULES))
    with node.client() as client:
        refused = client.get("/v1/rate", params={"key": "a-q", "rule": "a", "tokens": tokens})
        assert refused.status_code == 400, (tokens, refused.text)
        assert refused.json()["field"] == "tokens"
        assert remaining(client, "a-q") == 10
        assert (
            client.get("/v1/rate", params={"key": "a-q", "rule": "a", "tokens": "3"}).json()[
                "tokens_remaining"
            ]
            == 7
        )


def test_the_unversioned_aliases_answer_like_their_v1_paths_and_are_documented(
    serve: ServerFactory,
) -> None:
    """Issue 13, part of case 6 (and the path case 1's prose names): GET /rate was 405
    while GET /v1/rate worked; /bucket/state was 404; /openapi.json lacked the aliases."""
    node = serve(make_config(RULES))
    with node.client() as client:
        assert client.get("/rate", headers={"X-A": "alias"}).json()["tokens_remaining"] == 9
        assert client.get("/v1/rate", headers={"X-A": "alias"}).json()["tokens_remaining"] == 8
        state = client.get("/bucket/state", params={"key": "a-alias"})
        assert state.status_code == 200 and state.json()["tokens_remaining"] == 8
        assert client.get("/bucket/state").json()["field"] == "key"
        paths = client.get("/openapi.json").json()["paths"]
        assert {"get", "post"} <= set(paths["/rate"])
        assert "get" in paths["/bucket/state"] and "patch" in paths["/buckets/{key}"]


def test_a_patch_of_a_key_too_long_to_replicate_is_a_400_not_a_500(serve: ServerFactory) -> None:
    """A per-key PATCH creates the bucket; a key over the limit must be refused like a
    decision for it is (the limiter's refusal escaped the PATCH handler as a 500)."""
    node = serve(make_config(RULES))
    with node.client() as client:
        refused = client.patch("/v1/buckets/a-" + "k" * MAX_KEY_BYTES, json={"capacity": 5})
        assert refused.status_code == 400, refused.text
        assert refused.json()["field"] == "key"
        assert client.get("/v1/status").json()["buckets"] == 0
