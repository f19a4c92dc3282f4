"""The articles' snippets and the README's examples, run as printed (issue 13).

Two articles about the "OpenClaw Rating API" specified this project; their
snippets are what users copy, so each one runs here as printed — with a
loopback URL for its example host and a shortened duration — against real
``bucketmesh serve`` processes: the verification script (a bare
``GET /v1/bucket/state``), the traffic generator (a bare ``curl "$ENDPOINT"``
loop), the ``sync:`` snippet with its secret from the environment, the
ConfigMap manifest, the curl calls whose strings hold U+2011 (non-breaking
hyphen), and ``PATCH /buckets/agent‑api‑key``. A snippet that cannot work with
a given configuration must fail with a message naming the fix; those cases are
here too.

The README's examples run as written as well: the in-process example is
extracted from README.md and executed, its curl examples are run against a
node serving the shipped example configuration, and ``run --single`` prints
as many commands as the README says, each of which works.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import Server, ServerFactory, eventually, free_port

from bucketmesh.core.rules import hashed_value

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXAMPLES = ROOT / "src" / "bucketmesh" / "examples"
CURL = shutil.which("curl")

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(CURL is None, reason="the articles' snippets need curl"),  # never here
]

H = "\u2011"  # NON-BREAKING HYPHEN, as the articles print "agent‑api‑key"

# -- the articles' snippets, as printed (their host is example.com: a loopback URL here) --

#: The verification script: reads the bucket with no key and prints tokens_remaining.
VERIFY_SCRIPT = """\
import requests

resp = requests.get("http://localhost:8080/v1/bucket/state")
print(resp.json()["tokens_remaining"])
"""

#: The traffic generator: bare GETs for DURATION seconds (60 in the article).
TRAFFIC_SCRIPT = """\
#!/usr/bin/env bash
ENDPOINT="http://localhost:8080/v1/rate"
DURATION=60
end=$((SECONDS + DURATION))
while [ $SECONDS -lt $end ]; do
  curl -s "$ENDPOINT" > /dev/null
done
"""

#: The sync: snippet alone (no secret, no peerUrls), this node's region among the peers.
SYNC_SNIPPET = """\
region: us-east-1
listen: 0.0.0.0:8080
sync:
  enabled: true
  syncClusterId: "global-rate-limit-cluster"
  peers:
    - "us-east-1"
    - "us-west-2"
    - "eu-central-1"
"""

#: The ConfigMap manifest (openclaw-config.yaml) with the article's buckets.yaml.
CONFIG_MAP = f"""\
apiVersion: v1
kind: ConfigMap
metadata:
  name: openclaw-config
data:
  buckets.yaml: |
    buckets:
      - key: "agent{H}api{H}key-{{{{ .Request.Header.X-API-Key }}}}"
        capacity: 5000
        refillRate: 50
        ttl: 3600
"""

#: The curl calls, with the article's U+2011 strings.
CURL_CALLS = f"""\
curl -s -X POST http://localhost:8080/v1/rate -H "X-API-Key: my{H}agent" -H "Content-Type: application/json" -d '{{"tokens":1}}'
curl -s "http://localhost:8080/v1/bucket/state?key=agent{H}api{H}key-my{H}agent"
curl -s -X PATCH http://localhost:8080/buckets/agent{H}api{H}key -H "Content-Type: application/json" -d '{{"capacity":10000,"refillRate":100}}'
"""  # noqa: E501 - printed as one line each


def at(server: Server, snippet: str) -> str:
    """``snippet`` with the article's host replaced by ``server``'s loopback address."""
    return snippet.replace("localhost:8080", f"127.0.0.1:{server.port}")


def bash(script: str, *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def python(script: str, *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def example_config(**changes: Any) -> str:
    """The shipped example configuration, with top-level settings replaced."""
    document = yaml.safe_load((EXAMPLES / "bucketmesh.yaml").read_text())
    document.update(changes)
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def metric(server: Server, name: str, **labels: str) -> float:
    """The value of the sample of ``name`` with exactly ``labels`` (0 when absent)."""
    text = httpx.get(server.url("/metrics")).text
    for match in re.finditer(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", text, re.M):
        if dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) == labels:
            return float(match.group(2))
    return 0.0


# -- the verification script and the traffic generator -------------------------------


def test_traffic_generator_then_verification_script_against_the_shipped_example(
    serve: ServerFactory,
) -> None:
    server = serve(raw_config=example_config())
    traffic = at(server, TRAFFIC_SCRIPT).replace("DURATION=60", "DURATION=2")
    done = bash(traffic)
    assert done.returncode == 0, done.stderr
    # every bare GET was decided by the catch-all rule, none was a 400
    assert metric(server, "bucketmesh_decisions_total", rule="per-ip", result="allowed") > 0
    assert metric(server, "bucketmesh_http_responses_total", route="rate", status="400") == 0
    # the verification script reads the bucket the generator spent (defaultStateKey)
    verified = python(at(server, VERIFY_SCRIPT))
    assert verified.returncode == 0, verified.stderr
    remaining = float(verified.stdout)
    state = httpx.get(server.url("/v1/bucket/state"), params={"key": "ip-127.0.0.1"}).json()
    assert remaining <= state["tokens_remaining"] < state["capacity"]


def test_verification_script_without_a_default_state_key_names_the_setting(
    serve: ServerFactory,
) -> None:
    server = serve()  # no defaultStateKey
    answer = httpx.get(server.url("/v1/bucket/state"))
    assert answer.status_code == 400
    assert answer.json()["field"] == "key"
    assert "defaultStateKey" in answer.json()["detail"]
    assert "BUCKETMESH_DEFAULT_STATE_KEY" in answer.json()["detail"]
    # the alias the article's prose names answers the same
    assert httpx.get(server.url("/bucket/state")).json() == answer.json()
    # and the script fails on that answer, not on a connection or a 404
    done = python(at(server, VERIFY_SCRIPT))
    assert done.returncode != 0
    assert "KeyError: 'tokens_remaining'" in done.stderr


def test_default_state_key_that_needs_a_header_names_it(serve: ServerFactory) -> None:
    # the example rule's own template: the state read is the bucket the request spent
    template = "agent-api-key-{{ .Request.Header.X-API-Key | sha256 }}"
    config = example_config(defaultStateKey=template)
    server = serve(raw_config=config)
    with server.client() as client:
        client.post("/v1/rate", headers={"X-API-Key": "k1"}, json={"tokens": 7})
        read = client.get("/bucket/state", headers={"X-API-Key": "k1"}).json()
        spent = sum(entry["used"] for entry in read["replicas"].values())
        assert (read["key"], spent) == ("agent-api-key-" + hashed_value("k1"), 7)
        missing = client.get("/v1/bucket/state")
    assert missing.status_code == 400
    assert missing.json()["field"] == "X-API-Key"
    assert "defaultStateKey" in missing.json()["detail"]


def test_a_bare_get_with_only_the_articles_rules_says_how_to_add_a_catch_all(
    serve: ServerFactory,
) -> None:
    (serve.directory / "openclaw-config.yaml").write_text(CONFIG_MAP)
    server = serve(raw_config="region: us-east-1\nbuckets: openclaw-config.yaml\n")
    answer = httpx.get(server.url("/v1/rate"))
    assert answer.status_code == 400
    problem = answer.json()
    assert problem["field"] == "X-API-Key"
    assert "header X-API-Key is missing" in problem["detail"]
    assert "add a catch-all rule last" in problem["detail"]
    assert 'key: "ip-{{ .Request.ClientIP }}"' in problem["detail"]


# -- the sync: snippet ------------------------------------------------------------------


def test_sync_snippet_takes_its_secret_from_the_environment(serve: ServerFactory) -> None:
    server = serve(raw_config=SYNC_SNIPPET, env={"BUCKETMESH_SYNC_SECRET": "s3cret"})
    status = httpx.get(server.url("/v1/status")).json()
    assert status["cluster_id"] == "global-rate-limit-cluster"
    assert status["sync"]["enabled"] is True
    assert set(status["sync"]["peers"]) == {"us-west-2", "eu-central-1"}


def test_sync_snippet_without_a_secret_names_where_to_put_it(serve: ServerFactory) -> None:
    server = serve(raw_config=SYNC_SNIPPET, wait_ready=False)
    assert server.wait() == 2
    error = server.stderr()
    assert "sync.secret is required when sync.enabled is true" in error
    for fix in ("BUCKETMESH_SYNC_SECRET", "sync.secretFile", "BUCKETMESH_SYNC_SECRET_FILE"):
        assert fix in error


def test_sync_snippet_takes_its_secret_from_a_mounted_file(
    serve: ServerFactory, tmp_path: Path
) -> None:
    secret = tmp_path / "mounted" / "sync-secret"
    secret.parent.mkdir()
    secret.write_text("s3cret\n")
    server = serve(raw_config=SYNC_SNIPPET, env={"BUCKETMESH_SYNC_SECRET_FILE": str(secret)})
    assert httpx.get(server.url("/v1/status")).json()["sync"]["enabled"] is True


def test_two_nodes_from_the_sync_snippet_share_a_bucket(serve: ServerFactory) -> None:
    # Each node: the snippet as printed plus its region; the secret and the peer URLs
    # come from the environment, as a Kubernetes operator keeps them.
    ports = {"us-east-1": free_port(), "us-west-2": free_port(), "eu-central-1": free_port()}
    urls = ",".join(f"{region}=http://127.0.0.1:{port}" for region, port in ports.items())
    env = {"BUCKETMESH_SYNC_SECRET": "s3cret", "BUCKETMESH_SYNC_PEER_URLS": urls}
    rules = 'buckets:\n  - key: "agent-api-key-{{ .Request.Header.X-API-Key }}"\n'
    rules += "    capacity: 5000\n    refillRate: 50\n"
    east = serve(raw_config=SYNC_SNIPPET + rules, env=env, port=ports["us-east-1"])
    west_config = SYNC_SNIPPET.replace("region: us-east-1", "region: us-west-2") + rules
    west = serve(raw_config=west_config, env=env, port=ports["us-west-2"], name="west")
    spent = httpx.post(east.url("/v1/rate"), headers={"X-API-Key": "shared"}, json={"tokens": 9})
    assert spent.json()["tokens_remaining"] == 4991

    def west_sees_it() -> bool:
        state = httpx.get(west.url("/v1/bucket/state"), params={"key": "agent-api-key-shared"})
        spent = {
            rid.split("/")[0]: entry["used"] for rid, entry in state.json()["replicas"].items()
        }
        return spent == {"us-east-1": 9}

    eventually(west_sees_it, "us-west-2 sees what us-east-1 spent")


# -- the ConfigMap, U+2011 and PATCH /buckets/agent‑api‑key -----------------------------


@pytest.fixture
def openclaw(serve: ServerFactory) -> Server:
    """A node whose rules are the article's ConfigMap manifest, as printed."""
    (serve.directory / "openclaw-config.yaml").write_text(CONFIG_MAP)
    return serve(raw_config="region: us-east-1\nbuckets: openclaw-config.yaml\n")


def test_curl_calls_with_non_breaking_hyphens_reach_one_bucket(openclaw: Server) -> None:
    post, state, patch = at(openclaw, CURL_CALLS).splitlines()
    decided = json.loads(bash(post).stdout)
    key = f"agent{H}api{H}key-my{H}agent"
    assert (decided["allowed"], decided["key"], decided["tokens_remaining"]) == (True, key, 4999)
    assert decided["rule"] == "agent-api-key"
    # the key typed in the URL is the key the header gave: the same bucket, not a new one
    read = json.loads(bash(state).stdout)
    spent = sum(entry["used"] for entry in read["replicas"].values())
    assert (read["key"], read["live"], spent) == (key, True, 1)  # (refill may have refilled it)
    # the rule by the name its template shows
    changed = json.loads(bash(patch).stdout)
    assert (changed["rule"], changed["capacity"], changed["applies_to"]) == (
        "agent-api-key",
        10000,
        "rule",
    )
    after = json.loads(bash(state).stdout)
    assert (after["capacity"], after["refill_rate"]) == (10000, 100.0)


def test_a_patch_of_no_rule_names_the_rule_that_exists(openclaw: Server) -> None:
    answer = httpx.patch(openclaw.url("/buckets/agent-api"), json={"capacity": 10})
    assert answer.status_code == 404
    assert "did you mean the rule" in answer.json()["detail"]
    assert "rules: agent-api-key" in answer.json()["detail"]


def test_only_a_name_made_ascii_is_an_alias(serve: ServerFactory) -> None:
    # per-ip is named by its author: "ip", its template's prefix, does not name it
    server = serve(raw_config=example_config())
    assert httpx.get(server.url("/v1/buckets/per-ip")).json()["applies_to"] == "rule"
    assert httpx.get(server.url("/v1/buckets/ip")).status_code == 404


def test_a_header_that_is_not_utf8_is_refused_naming_it(openclaw: Server) -> None:
    answer = httpx.post(
        openclaw.url("/v1/rate"), headers={"X-API-Key": b"my\xe9agent"}, json={"tokens": 1}
    )
    assert answer.status_code == 400
    assert answer.json()["field"] == "X-API-Key"
    assert "not UTF-8" in answer.json()["detail"]


# -- the README's examples ----------------------------------------------------------------


def readme_block(heading: str, language: str, index: int = 0) -> str:
    """The ``index``-th ``language`` code block under the README's ``heading``."""
    section = README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, re.S)
    return str(blocks[index])


def test_readme_in_process_example_runs_as_written() -> None:
    done = python(readme_block("In-process use", "python"), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    first, peer = done.stdout.splitlines()
    assert first == "True 4999 0.0 0.02 5000 50.0"
    assert peer == "4999"


def test_readme_asgi_example_runs_as_written() -> None:
    example = readme_block("In-process use", "python", 1)

    async def app(scope: Any, receive: Any, send: Any) -> None:  # the user's application
        raise AssertionError("not called here")

    namespace: dict[str, Any] = {"app": app}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(example, namespace)
    finally:
        os.chdir(cwd)
    assert namespace["app"] is not app  # wrapped


def test_readme_rating_api_curl_examples_work(serve: ServerFactory) -> None:
    server = serve(raw_config=example_config())
    section = README.split("\n## The Rating API\n", 1)[1].split("\n## ", 1)[0]
    commands = [
        " ".join(line.strip().rstrip("\\") for line in block.strip().splitlines())
        for block in re.findall(r"```sh\n(.*?)```", section, re.S)
    ]
    commands += re.findall(r"`(curl -s '[^`]*)`", section)
    assert len(commands) == 4, commands
    for command in commands:
        done = bash(command.replace("localhost:8080", f"127.0.0.1:{server.port}"))
        assert done.returncode == 0, (command, done.stderr)
        answer = json.loads(done.stdout)
        assert "status" not in answer or answer["status"] < 400, (command, answer)


def test_status_cluster_id_defaults_to_bucketmesh_with_sync_off(serve: ServerFactory) -> None:
    rules = "buckets:\n  - key: 'ip-{{ .Request.ClientIP }}'\n    rate: 100/minute\n"
    server = serve(raw_config="region: us-east-1\n" + rules)
    assert "| `sync.syncClusterId` | `bucketmesh` |" in README
    assert httpx.get(server.url("/v1/status")).json()["cluster_id"] == "bucketmesh"


NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5}


def printed_commands(text: str) -> list[str]:
    """The commands ``run --single`` prints after "Try", one string each (a ``for``
    loop spans lines until ``done``)."""
    body = text.split("Try", 1)[1].split("\nAlso:", 1)[0].splitlines()[1:]
    commands: list[str] = []
    pending = ""
    for line in (line.strip() for line in body):
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}".strip() if pending else line
        if pending.startswith("for ") and "done" not in pending:
            continue
        commands.append(pending)
        pending = ""
    return commands


def test_run_single_prints_the_readmes_commands_keeps_state_in_its_directory_and_stops_on_ctrl_c(
    tmp_path: Path,
) -> None:
    said = re.search(r"it prints (\w+) commands", README)
    assert said is not None
    started_in = tmp_path / "anywhere"
    started_in.mkdir()
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")}
    env.update(BUCKETMESH_STATE_DIR=str(state), PYTHONUNBUFFERED="1")
    node = subprocess.Popen(
        [sys.executable, "-m", "bucketmesh", "run", "--single", "--listen", "127.0.0.1:0"],
        cwd=started_in,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert node.stdout is not None
        printed = ""
        for line in node.stdout:
            printed += line
            if line.startswith("Also:"):
                break
        commands = printed_commands(printed)
        assert len(commands) == NUMBERS[said.group(1)], printed
        assert f"State: {state / 'state.snap'}" in printed
        decision, loop, patch, read = (bash(command) for command in commands)
        assert json.loads(decision.stdout)["allowed"] is True
        assert loop.stdout.split() == ["200"] * 5 + ["429"]
        assert json.loads(patch.stdout)["capacity"] == 50
        assert (json.loads(read.stdout)["key"], json.loads(read.stdout)["capacity"]) == (
            "small-alice",
            50,
        )
        # a client that keeps its end of a closed connection open does not hold the stop up
        port = int(re.search(r"127\.0\.0\.1:(\d+)", printed).group(1))  # type: ignore[union-attr]
        with httpx.Client(headers={"Connection": "close"}) as client:
            assert client.get(f"http://127.0.0.1:{port}/v1/status").status_code == 200
            node.send_signal(signal.SIGINT)  # Ctrl-C
            assert node.wait(60) == 0
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
    assert "SIGINT: stopping gracefully" in node.stderr.read()  # type: ignore[union-attr]
    assert (state / "state.snap").is_file()
    assert list(started_in.iterdir()) == []  # nothing written where it was started


def test_the_shipped_config_map_example_is_the_articles_with_a_catch_all(
    serve: ServerFactory,
) -> None:
    shipped = yaml.safe_load((EXAMPLES / "openclaw-config.yaml").read_text())
    article = yaml.safe_load(CONFIG_MAP)
    rules = yaml.safe_load(shipped["data"]["buckets.yaml"])["buckets"]
    assert rules[0] == yaml.safe_load(article["data"]["buckets.yaml"])["buckets"][0]
    (serve.directory / "openclaw-config.yaml").write_text(
        (EXAMPLES / "openclaw-config.yaml").read_text()
    )
    server = serve(raw_config="buckets: openclaw-config.yaml\n")
    assert httpx.get(server.url("/v1/rate")).json()["rule"] == "per-ip"
