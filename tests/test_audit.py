"""The audit trail's writer (telemetry/audit.py) and ``bucketmesh audit duplicates``.

The writer is exercised on real files with its real thread; a full buffer is made
by recording before the writer starts, which is the state a stalled disk leaves it
in. The duplicates tool reads a trail the writer wrote, with retried requests
charged once and duplicates planted, and must find exactly the planted ones.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bucketmesh.telemetry.audit import AuditLog, key_hash


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def charge(log: AuditLog, key: str, tokens: int, **ids: str | None) -> None:
    log.consume(
        region="us-east-1",
        replica="us-east-1/node-a/1",
        rule="agent-api-key",
        key=key,
        tokens=tokens,
        allowed=True,
        caller="tenant-a",
        **ids,  # type: ignore[arg-type]
    )


def test_events_are_written_as_json_lines_by_the_writer_thread(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.start()
    charge(log, "agent-api-key-a", 3, idempotency_key="k-1", request_id="r-1")
    log.change("patch", who="token:ops", old={"capacity": 10}, new={"capacity": 20}, key="a")
    log.close()
    first, second = lines(path)
    assert first["event"] == "consume" and first["key"] == "agent-api-key-a"
    assert first["tokens"] == 3 and first["allowed"] is True
    assert first["idempotency_key"] == "k-1" and first["request_id"] == "r-1"
    assert first["caller"] == "tenant-a" and str(first["time"]).endswith("Z")
    assert second["event"] == "patch" and second["who"] == "token:ops"
    assert second["old"] == {"capacity": 10} and second["new"] == {"capacity": 20}
    assert log.written == 2 and log.dropped == 0


def test_keys_can_be_written_as_their_hash(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, hash_keys=True)
    charge(log, "agent-api-key-secret-value", 1)
    log.close()
    (event,) = lines(path)
    assert event["key"] == key_hash("agent-api-key-secret-value")
    assert "secret-value" not in path.read_text()


def test_a_full_buffer_drops_and_counts_and_never_blocks(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, buffer=3)  # the writer not running: nothing drains the buffer
    kept = [
        log.consume(region="r", replica="r/n/1", rule="x", key=f"k{i}", tokens=1, allowed=True)
        for i in range(5)
    ]
    assert kept == [True, True, True, False, False]
    assert log.dropped == 2 and log.pending == 3
    log.close()
    assert [e["key"] for e in lines(path)] == ["k0", "k1", "k2"]


def test_sampling_keeps_every_change(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, sample=0.0)
    charge(log, "k", 1, request_id="r-1")
    log.change("fault", who="token:ops", old=[], new=["us-west-2"])
    log.close()
    assert [e["event"] for e in lines(path)] == ["fault"]
    assert log.sampled_out == 1


def test_files_rotate_by_size_keeping_the_backups_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=1000, backups=2)
    log.start()
    for i in range(100):
        charge(log, f"key-{i}", 1, request_id=f"r-{i}")
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for name in names:
        assert (tmp_path / name).stat().st_size <= 1000
    newest = lines(path)
    assert newest[-1]["key"] == "key-99"


# -- bucketmesh audit duplicates -------------------------------------------------------------


def duplicates(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bucketmesh", "audit", "duplicates", *args],
        env={k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")},
        capture_output=True,
        text=True,
        timeout=60,
    )


def trail(path: Path, *, planted: bool) -> None:
    """Ten requests, each charged once; r-2 retried and refused (no charge); with
    ``planted``, r-5's Idempotency-Key charged twice more and r-7 (no key) twice."""
    log = AuditLog(path)
    log.start()
    for i in range(10):
        key = f"idem-{i}" if i != 7 else None
        charge(log, f"agent-api-key-{i}", 2, idempotency_key=key, request_id=f"r-{i}")
    log.consume(
        region="us-west-2",
        replica="us-west-2/node-a/1",
        rule="agent-api-key",
        key="agent-api-key-2",
        tokens=2,
        allowed=False,
        idempotency_key="idem-2",
        request_id="r-2",
    )
    if planted:
        for _ in range(2):
            charge(log, "agent-api-key-5", 2, idempotency_key="idem-5", request_id="r-5b")
        charge(log, "agent-api-key-7", 2, request_id="r-7")
    log.change("reconcile-repair", who="@reconcile/host/1", old=90, new=40, key="agent-api-key-1")
    log.close()


def test_a_trail_with_retries_charged_once_has_no_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail(path, planted=False)
    done = duplicates(str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "10 charges, 0 requests charged more than once" in done.stdout


def test_the_planted_duplicates_are_found_and_only_them(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail(path, planted=True)
    with path.open("a") as stream:
        stream.write("not json\n")
    compressed = tmp_path / "older.jsonl.gz"
    with gzip.open(compressed, "wt") as stream:
        stream.write(
            json.dumps({"event": "consume", "allowed": True, "tokens": 1, "request_id": "r-7"})
            + "\n"
        )
    done = duplicates(str(path), str(compressed), "--format", "json")
    assert done.returncode == 1, done.stdout + done.stderr
    found = json.loads(done.stdout)
    groups = {(d["by"], d["value"]): len(d["charges"]) for d in found["duplicates"]}
    assert groups == {("idempotency_key", "idem-5"): 3, ("request_id", "r-7"): 3}
    assert found["extra_tokens"] == 2 + 2 + 2 + 1
    assert found["malformed_lines"] == [f"{path}:16"]


def test_an_unreadable_file_exits_2(tmp_path: Path) -> None:
    done = duplicates(str(tmp_path / "missing.jsonl"))
    assert done.returncode == 2 and "missing.jsonl" in done.stderr
    # not gzip, or cut short: the file is named (it was not), no traceback
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(b"garbage that is not gzip\n")
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(b'{"event": "consume"}\n' * 100)[:40])
    for broken in (fake, cut):
        done = duplicates(str(broken))
        assert done.returncode == 2 and f"error: {broken}: " in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_a_line_that_is_not_utf8_is_a_malformed_line_not_a_fatal_error(
    tmp_path: Path,
) -> None:
    """docs: a bad line is never fatal; a byte that was not UTF-8 aborted the file."""
    path = tmp_path / "mixed.jsonl"
    good = json.dumps({"event": "consume", "allowed": True, "tokens": 1, "request_id": "a"})
    path.write_bytes(good.encode() + b'\n{"event":"consume","key":"caf\xe9"}\n' + good.encode())
    done = duplicates(str(path), "--format", "json")
    found = json.loads(done.stdout)
    assert found["malformed_lines"] == [f"{path}:2"]
    assert done.returncode == 1  # the two good lines are one request charged twice


def test_dash_writes_json_lines_to_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    log = AuditLog("-")
    log.start()
    charge(log, "agent-api-key-out", 1, request_id="r-out")
    log.change("patch", who="token:ops", old=None, new={"capacity": 3})
    log.close()
    out = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
    assert [e["event"] for e in out] == ["consume", "patch"]
    assert out[0]["request_id"] == "r-out" and out[0]["key"] == "agent-api-key-out"
