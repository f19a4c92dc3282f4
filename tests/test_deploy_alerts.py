"""The Prometheus alerts (deploy/prometheus/alerts.yaml): checked and unit-tested by
promtool, and every series they read is one a real node exports.

promtool comes from Debian's ``prometheus`` package (``make test`` installs it with
scripts/ensure-debian-packages.sh). The series check scrapes /metrics of real
nodes: two regions in a mesh, one on memory with a snapshot (the write-ahead log's
counters), one on a real Redis (the store's), after each decided a request.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import yaml
from conftest import ServerFactory, eventually, free_port, make_config

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yaml"
#: Series that are not a node's: Prometheus' own.
PROMETHEUS_SERIES = {"up"}
#: Series another change adds to the node (issue: background tasks count their
#: failures). Allowed to be missing from the scrape until it lands.
PENDING_SERIES = {"bucketmesh_background_task_failures_total"}
#: The alerts the issue asks for, by what they watch.
REQUIRED_ALERTS = {
    "BucketmeshSyncLagHigh",  # sync lag above 200 ms
    "BucketmeshDepletionSpike",  # a spike in a rule's denied share
    "BucketmeshPeerDown",  # a replica unhealthy: peer down
    "BucketmeshLocalOnly",  # ... and local-only mode
    "BucketmeshNodeDown",
    "BucketmeshNodeUnready",
    "BucketmeshBackgroundTaskFailing",
}
#: PromQL words that are not series names.
PROMQL_WORDS = {
    "by",
    "without",
    "and",
    "or",
    "unless",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    assert found, "promtool is missing: make test installs it (Debian package prometheus)"
    return subprocess.run(
        [found, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def series_of(expression: str) -> set[str]:
    """The series names an expression reads (functions, keywords, label names,
    durations and strings left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expression)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)  # label lists
    names = set()
    for found in re.finditer(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = found.group(0)
        rest = text[found.end() :].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_promtool_checks_the_rules() -> None:
    done = promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout, done.stdout


def test_promtool_unit_tests_pass() -> None:
    done = promtool("test", "rules", str(ALERT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    # the unit tests pin behaviour: with the lag threshold at 2 s, they fail
    text = ALERTS.read_text()
    assert ") > 0.2\n" in text
    (tmp_path / "alerts.yaml").write_text(text.replace(") > 0.2\n", ") > 2\n"))
    shutil.copy(ALERT_TESTS, tmp_path / "alerts.test.yaml")
    done = promtool("test", "rules", str(tmp_path / "alerts.test.yaml"))
    assert done.returncode != 0
    assert "BucketmeshSyncLagHigh" in done.stdout + done.stderr


def test_the_issue_s_alerts_are_all_there_each_with_a_severity_and_a_summary() -> None:
    alerts = {rule["alert"]: rule for rule in rules() if "alert" in rule}
    assert set(alerts) >= REQUIRED_ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert {"summary", "description"} <= set(rule["annotations"]), name
    assert "> 0.2" in alerts["BucketmeshSyncLagHigh"]["expr"]  # 200 ms, in seconds


def test_series_of_reads_names_not_functions_or_labels() -> None:
    expression = (
        'histogram_quantile(0.99, sum by (region, le) (rate(x_bucket{le="1"}[5m]))) > 0.2'
        " and on (region) y:z == 0 or up{job=~'a'}"
    )
    assert series_of(expression) == {"x_bucket", "y:z", "up"}


def test_every_series_the_alerts_read_is_exported_by_a_real_node(
    serve: ServerFactory, redis_server: Any, tmp_path: Path
) -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    read = set().union(*(series_of(rule["expr"]) for rule in rules())) - recorded
    ports = {"us-east-1": free_port(), "us-west-2": free_port()}
    nodes = []
    for region, storage in (
        ("us-east-1", {"backend": "memory", "snapshot": str(tmp_path / "east.snap")}),
        ("us-west-2", {"backend": "redis", "redisUrl": redis_server.url}),
    ):
        (peer,) = set(ports) - {region}
        config = make_config(
            region=region,
            sync={
                "enabled": True,
                "syncClusterId": "alerts",
                "peers": list(ports),
                "peerUrls": {peer: f"http://127.0.0.1:{ports[peer]}"},
                "secret": "alerts-test-secret",
            },
            storage=storage,
        )
        nodes.append(serve(config, port=ports[region], name=region))

    def exported() -> set[str]:
        names: set[str] = set()
        for node in nodes:
            httpx.get(node.url("/v1/rate"), headers={"X-API-Key": "alerts"}, timeout=10.0)
            text = httpx.get(node.url("/metrics"), timeout=10.0).text
            names |= {line.split("{")[0].split(" ")[0] for line in text.splitlines()}
            names -= {"#", ""}
        # every family appears once the peers have exchanged a delta batch
        assert "crdt_sync_duration_seconds_bucket" in names, sorted(names)
        return names

    names = eventually(exported, "the peers exchanged deltas")
    missing = read - names - PROMETHEUS_SERIES - PENDING_SERIES
    assert not missing, f"alerts.yaml reads series no node exports: {sorted(missing)}"
