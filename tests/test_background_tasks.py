"""No background task of a node dies silently (issue 12, case 1): against a real
``bucketmesh serve`` whose snapshot lives on a real tmpfs that the test fills, a
failing snapshot task is logged, counted, shown in /readyz and /v1/status, retried,
and recovers once the disk has room; a PATCH never hangs meanwhile, and SIGTERM still
exits 0 with a final snapshot."""

from __future__ import annotations

import re
import signal
from typing import Any

import httpx
from conftest import ServerFactory, eventually, make_config

RULES = [{"name": "r", "key": "r-{{ .Request.Header.X-U }}", "capacity": 100, "refillRate": 0.001}]


def _metric(client: httpx.Client, name: str, labels: str) -> float:
    text = client.get("/metrics").text
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_failing_snapshot_task_is_shown_counted_retried_and_recovers(
    serve: ServerFactory, small_disk: Any
) -> None:
    snapshot = small_disk.path / "state.snap"
    config = make_config(RULES, storage={"snapshot": str(snapshot), "snapshotInterval": 50})
    node = serve(config, admin_token="t0ken")
    with node.client() as client:
        for _ in range(7):
            assert client.post("/v1/rate", json={"key": "k", "rule": "r"}).status_code == 200
        eventually(lambda: client.get("/readyz").status_code == 200, "ready before the fault")

        small_disk.fill()

        def snapshot_failing() -> dict[str, Any]:
            ready = client.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert "snapshot" in ready.json()["checks"]["tasks"], ready.text
            task = client.get("/v1/status").json()["tasks"]["snapshot"]
            assert task["state"] == "failing" and task["failures"] >= 1, task
            assert "No space left" in task["last_error"], task
            return dict(task)

        eventually(snapshot_failing, "the snapshot task reports its failure")
        assert _metric(client, "bucketmesh_background_task_failures_total", 'task="snapshot"') >= 1
        # a PATCH is answered (made durable, or refused as not durable), never left hanging
        patched = client.patch(
            "/v1/buckets/k", json={"capacity": 50}, headers={"Authorization": "Bearer t0ken"}
        )
        assert patched.status_code in (200, 503), patched.text

        small_disk.free()

        def recovered() -> None:
            ready = client.get("/readyz")
            assert ready.status_code == 200, ready.text
            tasks = client.get("/v1/status").json()["tasks"]
            assert tasks["snapshot"]["state"] == "ok", tasks
            assert tasks["sweep"]["state"] == "ok", tasks

        eventually(recovered, "the snapshot task recovers once the disk has room")
        assert "background task snapshot failed" in node.stderr()
        assert "background task snapshot recovered" in node.stderr()
        assert client.post("/v1/rate", json={"key": "k", "rule": "r"}).status_code == 200

    assert node.stop(signal.SIGTERM) == 0
    assert "final snapshot failed" not in node.stderr()
    again = serve(config, admin_token="t0ken")
    with again.client() as client:
        state = client.get("/v1/bucket/state", params={"key": "k", "rule": "r"}).json()
        assert sum(e["used"] for e in state["replicas"].values()) == 8, state
    assert again.stop(signal.SIGTERM) == 0  # before the disk is unmounted
