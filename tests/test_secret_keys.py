"""No secrets in bucket keys (docs/security.md): ``{{ … | sha256 }}`` puts a hash of
a header's value in the key, so an API key never reaches bucket state, snapshots,
the write-ahead log, sync messages or metrics; a rule that keys on the raw value
of a credential-like header is warned about at start-up."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import pytest
from conftest import Mesh, ServerFactory, eventually, make_config

from bucketmesh.core.rules import KeyTemplate, RuleError

HASHED_RULE = {
    "key": "agent-api-key-{{ .Request.Header.X-API-Key | sha256 }}",
    "capacity": 5000,
    "refillRate": 50,
}
API_KEY = "sk-live-7hb2Qd0-very-secret"
DIGEST = hashlib.sha256(API_KEY.encode()).hexdigest()[:32]


def test_the_sha256_filter_puts_a_hash_in_the_key_and_refuses_unknown_filters() -> None:
    template = KeyTemplate(HASHED_RULE["key"])  # type: ignore[arg-type]
    assert template.render({"x-api-key": API_KEY}, {}, "") == f"agent-api-key-{DIGEST}"
    assert template.render({}, {}, "") is None  # a missing header still matches nothing
    assert template.header_names == ("x-api-key",) and template.raw_header_names == ()
    assert template.default_name == "agent-api-key"
    with pytest.raises(RuleError, match="unknown filter 'md5'"):
        KeyTemplate("k-{{ .Request.Header.X-API-Key | md5 }}")


def test_a_hashed_api_key_is_nowhere_in_state_snapshot_or_metrics(
    serve: ServerFactory, tmp_path: Path
) -> None:
    snapshot = tmp_path / "state" / "node.snap"
    server = serve(make_config([HASHED_RULE]), snapshot=snapshot)
    with server.client() as http:
        granted = http.post("/v1/rate", headers={"X-API-Key": API_KEY}, json={"tokens": 3})
        assert granted.status_code == 200, granted.text
        assert granted.json()["key"] == f"agent-api-key-{DIGEST}"
        state = http.get("/v1/bucket/state", params={"key": f"agent-api-key-{DIGEST}"})
        assert state.status_code == 200 and state.json()["tokens_remaining"] == 4997
        seen = granted.text + state.text + http.get("/metrics").text
    assert server.stop(signal.SIGTERM) == 0
    files = [p for p in snapshot.parent.iterdir() if p.is_file()]
    assert files, "a snapshot was written"
    for blob in [seen.encode(), *(p.read_bytes() for p in files)]:
        assert API_KEY.encode() not in blob
    assert "credential" not in server.stderr()  # hashed: no warning


def test_sync_messages_carry_the_hash_only(serve: ServerFactory) -> None:
    mesh = Mesh(serve, ["us-east-1", "eu-west-1"], buckets=[HASHED_RULE]).start()
    us, eu = mesh[0], mesh[1]
    assert us.client.post("/v1/rate", headers={"X-API-Key": API_KEY}).status_code == 200

    def replicated() -> bool:
        state = eu.state(f"agent-api-key-{DIGEST}")
        return sum(entry["used"] for entry in state["replicas"].values()) == 1

    eventually(replicated, "the grant reached eu-west-1 under the hashed key")


def test_a_rule_keyed_on_a_raw_credential_header_is_warned_about(serve: ServerFactory) -> None:
    rules = [
        {"key": "agent-api-key-{{ .Request.Header.X-API-Key }}", "capacity": 5, "refillRate": 1},
        {
            "name": "auth",
            "key": "a-{{ .Request.Header.Authorization }}",
            "capacity": 5,
            "refillRate": 1,
        },
        {"name": "user", "key": "u-{{ .Request.Header.X-User }}", "capacity": 5, "refillRate": 1},
    ]
    server = serve(make_config(rules))
    warnings = [line for line in server.stderr().splitlines() if "looks like a credential" in line]
    assert len(warnings) == 2, server.stderr()
    assert "'agent-api-key'" in warnings[0] and "x-api-key | sha256" in warnings[0]
    assert "'auth'" in warnings[1]
