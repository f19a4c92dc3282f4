"""DynamoDB as durable storage for a node without a volume (storage/dynamodb.py).

Real ``bucketmesh serve`` processes against a DynamoDB-compatible server on loopback:
moto's ``ThreadedMotoServer`` (PyPI ``moto[server]``), an emulator, not AWS. A node
charged, killed with SIGKILL and restarted with an empty scratch directory restores
its state from the table and grants no token twice; two nodes with one identity
never overwrite each other's incarnation (the conditional write refuses the loser).
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from conftest import ServerFactory, eventually, free_port, make_config
from moto.server import ThreadedMotoServer

from bucketmesh.node.config import ConfigError, parse_config
from bucketmesh.storage.dynamodb import DynamoState, Fenced, create_table, parse_uri

CAPACITY = 10
RULES: list[dict[str, Any]] = [
    # one token per 1000 s: a test sees no refill
    {
        "name": "paid",
        "key": "paid-{{ .Request.Query.k }}",
        "capacity": CAPACITY,
        "refillRate": 0.001,
    }
]
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def table(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    name = f"bucketmesh-{uuid.uuid4().hex[:12]}"
    create_table(dynamodb(endpoint), name)
    return name


def dynamodb(endpoint: str) -> Any:
    return boto3.client(
        "dynamodb",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def uri(table: str, endpoint: str, directory: Path) -> str:
    return f"dynamodb://{table}?region=us-east-1&endpoint={endpoint}&interval=50&dir={directory}"


def node_config(table: str, endpoint: str, directory: Path) -> dict[str, Any]:
    return make_config(
        RULES,
        storage={
            "backend": "memory",
            "snapshot": uri(table, endpoint, directory),
            "snapshotInterval": 200,
        },
    )


def charge(client: httpx.Client, key: str) -> bool:
    response = client.post("/v1/rate", json={"key": f"paid-{key}", "rule": "paid"})
    assert response.status_code in (200, 429), response.text
    return response.status_code == 200


def metric(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"no {name} in /metrics"
    return float(match.group(1))


def owner(endpoint: str, table: str, identity: str) -> dict[str, Any]:
    item = dynamodb(endpoint).get_item(
        TableName=table,
        Key={"pk": {"S": identity}, "sk": {"S": "owner"}},
        ConsistentRead=True,
    )["Item"]
    return dict(item)


def test_a_node_without_a_volume_restores_from_dynamodb_after_kill_9(
    serve: ServerFactory, table: str, endpoint: str, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch-1"
    env = dict(CREDENTIALS)
    first = serve(node_config(table, endpoint, scratch), env=env, name="first")
    with first.client() as client:
        for _ in range(4):
            assert charge(client, "a")
        # a snapshot (every 200 ms) reaches the table, then more grants land in the log
        eventually(lambda: "snap" in owner(endpoint, table, "us-east-1/node-a"), "a snapshot")
        for _ in range(3):
            assert charge(client, "a")
        assert charge(client, "b")
        eventually(
            lambda: metric(client, "bucketmesh_dynamodb_unsaved_bytes") == 0,
            "every grant is in DynamoDB",
        )
    first_incarnation = int(owner(endpoint, table, "us-east-1/node-a")["inc"]["N"])
    first.kill()  # SIGKILL: no final snapshot, no final checkpoint
    shutil.rmtree(scratch)  # no volume: nothing of the first life is left on disk

    second = serve(node_config(table, endpoint, tmp_path / "scratch-2"), env=env, name="second")
    assert int(owner(endpoint, table, "us-east-1/node-a")["inc"]["N"]) > first_incarnation
    with second.client() as client:
        granted_a = sum(charge(client, "a") for _ in range(CAPACITY))
        granted_b = sum(charge(client, "b") for _ in range(CAPACITY))
    # 7 of a's and 1 of b's 10 tokens were spent before the kill: none is granted again
    assert (granted_a, granted_b) == (CAPACITY - 7, CAPACITY - 1)


def test_a_second_node_with_the_same_identity_fences_the_first(
    serve: ServerFactory, table: str, endpoint: str, tmp_path: Path
) -> None:
    env = dict(CREDENTIALS)
    first = serve(node_config(table, endpoint, tmp_path / "one"), env=env, name="one")
    with first.client() as client:
        assert charge(client, "x")
        eventually(lambda: metric(client, "bucketmesh_dynamodb_unsaved_bytes") == 0, "checkpointed")
    claimed = int(owner(endpoint, table, "us-east-1/node-a")["inc"]["N"])
    second = serve(node_config(table, endpoint, tmp_path / "two"), env=env, name="two")
    taken = int(owner(endpoint, table, "us-east-1/node-a")["inc"]["N"])
    assert taken > claimed
    with first.client() as client:
        # the first node's next conditional write is refused: it writes nothing more
        ready = eventually(
            lambda: (r := client.get("/readyz")).status_code == 503 and r, "the first is fenced"
        )
        assert "dynamodb" in ready.text and "took the DynamoDB table" in ready.text
        assert metric(client, "bucketmesh_dynamodb_fenced") == 1
        assert charge(client, "x")  # it still decides (its replica is its own) ...
    with second.client() as client:
        assert charge(client, "x")
        eventually(lambda: metric(client, "bucketmesh_dynamodb_unsaved_bytes") == 0, "checkpointed")
    # ... but the table is the second node's: its incarnation, never overwritten
    assert int(owner(endpoint, table, "us-east-1/node-a")["inc"]["N"]) == taken
    assert second.alive()


def test_two_nodes_starting_from_the_same_state_cannot_both_claim_it(
    table: str, endpoint: str, tmp_path: Path
) -> None:
    target = parse_uri(uri(table, endpoint, tmp_path / "a"))
    one = DynamoState(target, region="eu-west-1", node="node-b", client=dynamodb(endpoint))
    other_target = parse_uri(uri(table, endpoint, tmp_path / "b"))
    other = DynamoState(other_target, region="eu-west-1", node="node-b", client=dynamodb(endpoint))
    one.restore()
    other.restore()
    one.claim("eu-west-1/node-b/7")
    with pytest.raises(Fenced, match="conditional write was refused"):
        other.claim("eu-west-1/node-b/7")
    # a later start reads the newer item and claims above it
    again = DynamoState(target, region="eu-west-1", node="node-b", client=dynamodb(endpoint))
    again.restore()
    assert again.seen == 7
    again.claim("eu-west-1/node-b/8")


def test_a_missing_table_stops_the_node_with_its_name(
    serve: ServerFactory, endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    server = serve(
        node_config("no-such-table", endpoint, tmp_path / "s"),
        env=dict(CREDENTIALS),
        wait_ready=False,
    )
    assert server.wait() != 0
    assert "no-such-table" in server.stderr()
    assert "Traceback" not in server.stderr()


def test_no_region_anywhere_stops_the_node_with_a_hint_not_a_traceback(
    serve: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, botocore's NoRegionError escaped start-up as a traceback."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    config = make_config(RULES, storage={"snapshot": f"dynamodb://tbl?dir={tmp_path / 's'}"})
    keys = {k: v for k, v in CREDENTIALS.items() if k != "AWS_DEFAULT_REGION"}
    server = serve(config, env=keys, wait_ready=False)
    assert server.wait() != 0
    assert "give ?region= in the URI or set AWS_REGION" in server.stderr()
    assert "Traceback" not in server.stderr()


@pytest.mark.parametrize(
    ("snapshot", "problem"),
    [
        ("dynamodb://", "table name"),
        ("dynamodb://tbl?regoin=us-east-1", "unknown parameter 'regoin'"),
        ("dynamodb://tbl?interval=0", "interval must be"),
        ("dynamodb://tbl?endpoint=localhost:4566", "endpoint must be"),
        # these two were tracebacks from botocore at start-up (exit 1)
        ("dynamodb://tbl?region=us-east-1&endpoint=http://", "with a host"),
        ("dynamodb://tbl?region=not%20a%20region", "region must be an AWS region name"),
    ],
)
def test_a_bad_dynamodb_uri_is_a_config_error_naming_the_field(snapshot: str, problem: str) -> None:
    text = f"storage:\n  snapshot: {snapshot!r}\nbuckets: []\n"
    with pytest.raises(ConfigError) as error:
        parse_config(text, file="bucketmesh.yaml")
    assert "storage.snapshot" in str(error.value)
    assert problem in str(error.value)


def test_a_second_node_on_the_same_scratch_directory_wipes_nothing(
    serve: ServerFactory, table: str, endpoint: str, tmp_path: Path
) -> None:
    env = dict(CREDENTIALS)
    scratch = tmp_path / "shared"
    first = serve(node_config(table, endpoint, scratch), env=env, name="first")
    with first.client() as client:
        assert charge(client, "s")
    second = serve(node_config(table, endpoint, scratch), env=env, name="second", wait_ready=False)
    assert second.wait() != 0
    assert "in use by" in second.stderr()
    assert "Traceback" not in second.stderr()
    with first.client() as client:  # its files are intact: it goes on checkpointing
        assert charge(client, "s")
        eventually(lambda: metric(client, "bucketmesh_dynamodb_unsaved_bytes") == 0, "checkpointed")
        assert client.get("/readyz").status_code == 200
