"""Rotating the sync secret and the admin token without downtime (docs/security.md):
secret files hold one secret per line, the first signs and any verifies, and a
running node applies a changed file without a restart. The three-step rotation is
run on a live three-region mesh under load: no sync send fails, no message is
refused, no request fails, and the old secret is refused at the end."""

from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path

import httpx
from conftest import Mesh, MeshNode, ServerFactory, eventually, make_config

from bucketmesh.replication import protocol as sync

REGIONS = ["us-east-1", "eu-west-1", "ap-south-1"]
RULES = [
    {
        "name": "small",
        "key": "small-{{ .Request.Query.user }}",
        "capacity": 1_000_000,
        "refillRate": 1,
    }
]


def write_atomically(path: Path, lines: list[str]) -> None:
    """As a mounted Kubernetes Secret is updated: a new file renamed over the old."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(line + "\n" for line in lines))
    os.replace(temporary, path)


def reloads(node: MeshNode, field: str = "sync.secretFile") -> float:
    return node.metric("bucketmesh_secret_reloads_total", f'file="{field}"')


class Load:
    """Requests to every node from a thread until stopped; counts the failures."""

    def __init__(self, nodes: list[MeshNode]) -> None:
        self.nodes = nodes
        self.sent = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        clients = [httpx.Client(base_url=node.base_url, timeout=10) for node in self.nodes]
        n = 0
        while not self._stop.is_set():
            client = clients[n % len(clients)]
            response = client.post(f"/v1/rate?user=u{n % 50}", json={"tokens": 1})
            self.sent += 1
            if response.status_code != 200:
                self.failed.append(f"{response.status_code} {response.text}")
            n += 1
        for client in clients:
            client.close()


def test_three_step_sync_secret_rotation_under_load_fails_no_sync_round(
    serve: ServerFactory, tmp_path: Path
) -> None:
    old, new = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    files = {region: tmp_path / f"{region}.secret" for region in REGIONS}
    for path in files.values():
        write_atomically(path, [old])
    mesh = Mesh(
        serve,
        REGIONS,
        buckets=RULES,
        overrides={r: {"sync": {"secret": None, "secretFile": str(files[r])}} for r in REGIONS},
        # what is counted is a refused message; a send that takes over the default
        # 0.5 s on a loaded machine would count as a failed send too
        peer_timeout_ms=10_000,
    )
    del mesh.env["BUCKETMESH_SYNC_SECRET"]  # the files give it
    mesh.start()
    nodes = list(mesh.nodes.values())

    def failures() -> dict[tuple[str, str], float]:
        """Failed sends by (node, peer), and refused messages by (node, reason)."""
        counts = {}
        for node in nodes:
            for peer in set(REGIONS) - {node.region}:
                counts[node.name, peer] = node.metric(
                    "bucketmesh_sync_send_failures_total", f'peer="{peer}"'
                )
            for reason in ("bad_signature", "unsigned"):
                counts[node.name, reason] = node.metric(
                    "bucketmesh_sync_rejected_total", f'reason="{reason}"'
                )
        return counts

    # sends that failed while the nodes were starting (a peer not listening yet)
    before = failures()

    steps = [
        [old, new],  # 1: every region accepts the new secret (still signs with the old)
        [new, old],  # 2: every region signs with the new one (the old still verifies)
        [new],  # 3: the old one is gone
    ]
    with Load(nodes) as load:
        for step, lines in enumerate(steps, start=1):
            for node in nodes:  # one region at a time, as a rollout goes
                write_atomically(files[node.region], lines)
                eventually(
                    lambda node=node, step=step: reloads(node) == step,
                    f"{node.name} applied step {step}",
                )
                sent = load.sent
                eventually(lambda sent=sent: load.sent > sent + 20, "requests keep flowing")
    assert load.failed == [], load.failed[:5]
    assert load.sent > 100

    eventually(mesh.quiescent, "every delta acknowledged")
    # (waited for, not read once: the three states are read at three instants of a bucket
    # refilling 1 token/s, and a grant dirtied before the load stopped may still wait for
    # its collect; ``quiescent`` sees only what was queued)
    eventually(lambda: mesh.converged("small-u1"), "every region holds the same small-u1")
    assert failures() == before
    assert all(reloads(node) == 3 for node in nodes)

    # the old secret no longer opens a door; the new one does (its body is checked next)
    def sealed(secret: str) -> bytes:
        return sync.SyncAuth(mesh.cluster_id, secret).seal(
            sync.DELTAS,
            b"not a batch",
            sender="us-east-1/node-x/1",
            region="us-east-1",
            now_ns=time.time_ns(),
            nonce=os.urandom(sync.NONCE_BYTES),
        )

    target = nodes[1]
    headers = {"Content-Type": sync.CONTENT_TYPE}
    refused = target.client.post(sync.PATHS[sync.DELTAS], content=sealed(old), headers=headers)
    assert refused.status_code == 401, refused.text
    assert "signature" in refused.text
    accepted = target.client.post(sync.PATHS[sync.DELTAS], content=sealed(new), headers=headers)
    assert accepted.status_code != 401, accepted.text


def test_admin_token_file_rotates_without_restart(serve: ServerFactory, tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    write_atomically(token_file, ["old-token", "new-token"])
    server = serve(make_config(admin={"tokenFile": str(token_file)}))
    patch = {"capacity": 10}

    def patch_with(token: str) -> int:
        response = httpx.patch(
            server.url("/v1/buckets/tiny"),
            json=patch,
            headers={"Authorization": f"Bearer {token}"},
        )
        return response.status_code

    assert patch_with("old-token") == 200
    assert patch_with("new-token") == 200
    assert patch_with("other") == 403

    write_atomically(token_file, ["new-token"])

    def old_refused() -> bool:
        text = httpx.get(server.url("/metrics")).text
        return 'bucketmesh_secret_reloads_total{file="admin.tokenFile"} 1.0' in text

    eventually(old_refused, "the token file was applied")
    assert patch_with("old-token") == 403
    assert patch_with("new-token") == 200

    # an empty file keeps the tokens in use (and says so)
    write_atomically(token_file, [])
    eventually(
        lambda: (
            'bucketmesh_secret_reload_failures_total{file="admin.tokenFile"} 1.0'
            in httpx.get(server.url("/metrics")).text
        ),
        "the empty file was refused",
    )
    assert patch_with("new-token") == 200
    assert "cannot be used" in server.stderr()
