"""Nodes writing the audit trail themselves (issue 16 item 3), on real ``serve``
processes: every decision of the Rating API (single, GET, batch) with its ids and
caller; every PATCH and fault injection with who did it and old → new; retries
carrying the same Idempotency-Key charged once, so ``bucketmesh audit duplicates``
finds nothing in the node's own trail and exactly the duplicates planted in it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerFactory, free_port, make_config

from bucketmesh.node.config import ConfigError, parse_config
from bucketmesh.telemetry.audit import AuditLog

TOKEN = "audit-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def audit_config(path: Path, **audit: Any) -> dict[str, Any]:
    return make_config(audit={"enabled": True, "path": str(path), **audit})


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def duplicates(*files: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bucketmesh",
            "audit",
            "duplicates",
            "--format",
            "json",
            *map(str, files),
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def metric(server: Any, name: str) -> float:
    for line in httpx.get(f"{server.base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_retried_requests_are_charged_once_and_planted_duplicates_are_found(
    serve: ServerFactory, tmp_path: Path
) -> None:
    trail = tmp_path / "audit.jsonl"
    server = serve(audit_config(trail), admin_token=TOKEN)
    with server.client() as client:
        # five requests, each sent four times with its Idempotency-Key: charged once
        for n in range(5):
            for _ in range(4):
                answer = client.post(
                    "/v1/rate",
                    json={"tokens": 2},
                    headers={"X-API-Key": "tenant-a", "Idempotency-Key": f"k-{n}"},
                )
                assert answer.status_code == 200
        # a batch retried: each item charged once
        for _ in range(3):
            batch = client.post(
                "/v1/rate/batch",
                json={"requests": [{"key": f"b-{i}", "rule": "tiny"} for i in range(3)]},
                headers={"Idempotency-Key": "batch-1"},
            )
            assert batch.status_code == 200 and batch.json()["allowed"] == 3
        traced = client.get("/v1/rate", params={"user": "zed"}, headers={"X-Request-Id": "req-7"})
        assert traced.headers["X-Request-Id"] == "req-7"
        untraced = client.get("/v1/rate", params={"user": "zed"})
        generated = untraced.headers["X-Request-Id"]
        assert len(generated) == 32
        assert client.get("/v1/rate", params={"user": "zed"}).status_code == 429
        patched = client.patch("/v1/buckets/tiny", json={"capacity": 7}, headers=AUTH)
        assert patched.status_code == 200
    assert server.stop() == 0  # the trail is flushed before the node exits
    written = events(trail)
    consumed = [e for e in written if e["event"] == "consume"]
    charged = [
        e for e in consumed if e["idempotency_key"] and e["idempotency_key"].startswith("k-")
    ]
    assert sorted(e["idempotency_key"] for e in charged) == [f"k-{n}" for n in range(5)]
    first = charged[0]
    assert first["tokens"] == 2 and first["allowed"] is True
    assert first["region"] == "us-east-1" and first["replica"].startswith("us-east-1/node-a/")
    assert first["rule"] == "agent-api-key" and first["key"] == "agent-api-key-tenant-a"
    assert first["caller"] == "api-key:" + hashlib.sha256(b"tenant-a").hexdigest()[:12]
    assert first["time"].endswith("Z") and len(first["request_id"]) == 32
    items = sorted(e["idempotency_key"] for e in consumed if e.get("item") is not None)
    assert items == ["batch-1#0", "batch-1#1", "batch-1#2"]
    by_id = {e["request_id"]: e for e in consumed}
    assert by_id["req-7"]["allowed"] is True and by_id[generated]["allowed"] is True
    denied = [e for e in consumed if e["allowed"] is False]
    assert len(denied) == 1 and denied[0]["key"] == "tiny-zed"
    (patch,) = [e for e in written if e["event"] == "patch"]
    assert patch["who"] == "token:" + hashlib.sha256(TOKEN.encode()).hexdigest()[:12]
    assert patch["old"]["capacity"] == 2 and patch["new"]["capacity"] == 7
    assert patch["key"] == "tiny" and patch["applies_to"] == "rule"
    assert TOKEN not in trail.read_text()  # who did it, never the secret

    clean = duplicates(trail)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert json.loads(clean.stdout)["duplicated_requests"] == 0

    # plant two duplicate charges: a retry of k-3 charged again, and req-7 charged again
    planted = tmp_path / "planted.jsonl"
    again = dict(next(e for e in charged if e["idempotency_key"] == "k-3"), time="later")
    twice = dict(by_id["req-7"], time="later")
    planted.write_text(json.dumps(again) + "\n" + json.dumps(twice) + "\n")
    found = duplicates(trail, planted)
    assert found.returncode == 1, found.stderr
    report = json.loads(found.stdout)
    assert {(d["by"], d["value"]) for d in report["duplicates"]} == {
        ("idempotency_key", "k-3"),
        ("request_id", "req-7"),
    }
    assert report["extra_tokens"] == 3  # 2 of k-3, 1 of req-7


def test_sampled_trail_with_hashed_keys_and_counts(serve: ServerFactory, tmp_path: Path) -> None:
    trail = tmp_path / "sampled.jsonl"
    server = serve(audit_config(trail, sample=0.5, hashKeys=True))
    ids = [f"sampled-{n}" for n in range(40)]
    with server.client() as client:
        for request_id in ids:
            answer = client.post(
                "/v1/rate", headers={"X-API-Key": "secret-value", "X-Request-Id": request_id}
            )
            assert answer.status_code == 200
    kept = [i for i in ids if AuditLog(None, sample=0.5).keeps(i)]
    assert 0 < len(kept) < 40
    assert metric(server, "bucketmesh_audit_sampled_out_events_total") == 40 - len(kept)
    assert server.stop() == 0
    written = events(trail)
    assert sorted(e["request_id"] for e in written) == sorted(kept)
    assert all(e["key"].startswith("sha256:") for e in written)
    assert "secret-value" not in trail.read_text()


def test_fault_injection_is_recorded_with_who_did_it(serve: ServerFactory, tmp_path: Path) -> None:
    trail = tmp_path / "faults.jsonl"
    config = audit_config(trail)
    config["sync"] = {
        "enabled": True,
        "syncClusterId": "audit",
        "peers": ["us-east-1", "eu-west-1"],
        "peerUrls": {"eu-west-1": f"http://127.0.0.1:{free_port()}"},
        "secret": "audit-sync-secret",
    }
    server = serve(config, admin_token=TOKEN)
    with server.client() as client:
        injected = client.post(
            "/v1/admin/faults", json={"peers": ["eu-west-1"], "seconds": 60}, headers=AUTH
        )
        assert injected.status_code == 200
        assert client.delete("/v1/admin/faults", headers=AUTH).status_code == 200
    assert server.stop() == 0
    fault, heal = (e for e in events(trail) if e["event"] != "consume")
    who = "token:" + hashlib.sha256(TOKEN.encode()).hexdigest()[:12]
    assert fault["event"] == "fault" and fault["who"] == who
    assert fault["old"] == [] and fault["new"][0]["peer"] == "eu-west-1"
    assert heal["event"] == "fault-heal" and heal["who"] == who
    assert heal["old"][0]["peer"] == "eu-west-1" and heal["new"] == []


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("audit:\n  enabled: true\n  sample: 2\n", "audit.sample"),
        ("audit:\n  enabled: true\n  path: /no/such/dir/audit.jsonl\n", "audit.path"),
        ("audit:\n  enabled: true\n  buffer: 0\n", "audit.buffer"),
        ("audit:\n  enable: true\n", "audit.enable"),
        ("nearLimit: 1.5\n", "nearLimit"),
    ],
)
def test_bad_audit_and_near_limit_settings_name_file_and_field(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(textwrap.dedent(text), file="bucketmesh.yaml", environ={})
    assert raised.value.file == "bucketmesh.yaml"
    assert raised.value.field == field, str(raised.value)
    assert str(raised.value).startswith(f"bucketmesh.yaml: {field}")


def test_a_bad_shadow_value_names_the_rule_and_field() -> None:
    text = 'buckets:\n  - key: "k-{{ .Request.ClientIP }}"\n    rate: 5/s\n    shadow: maybe\n'
    with pytest.raises(ConfigError) as raised:
        parse_config(text, file="bucketmesh.yaml", environ={})
    assert raised.value.field == "shadow" and raised.value.rule == 1, str(raised.value)
