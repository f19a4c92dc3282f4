"""``bucketmesh metrics export``: real nodes' Prometheus families written as CSV, one
file per family, every row naming its node's region (xr's scraper, reused)."""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from conftest import ServerFactory, eventually, free_port, make_config


def export(*args: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")}
    return subprocess.run(
        [sys.executable, "-m", "bucketmesh", "metrics", "export", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def test_two_nodes_once_then_over_a_duration(serve: ServerFactory, tmp_path: Path) -> None:
    east = serve(make_config(region="us-east-1"))
    west = serve(make_config(region="us-west-2"))
    with east.client() as client:
        assert client.post("/v1/rate", headers={"X-API-Key": "export"}).status_code == 200
    out = tmp_path / "once"
    done = export(
        "--url",
        f"us-east-1={east.base_url}",
        "--url",
        f"us-west-2={west.base_url}",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    files = {p.name for p in out.glob("*.csv")}
    assert "process_cpu_seconds.csv" in files, files
    assert any(name.startswith("bucketmesh_") for name in files), files
    cpu = rows(out / "process_cpu_seconds.csv")
    assert {row["region"] for row in cpu} == {"us-east-1", "us-west-2"}
    assert list(cpu[0]) == ["t_s", "region", "sample", "value"]
    assert all(float(row["value"]) > 0 for row in cpu)

    series = tmp_path / "series"
    done = export(
        "--url",
        f"us-east-1={east.base_url},us-west-2={west.base_url}",
        "--out",
        str(series),
        "--interval",
        "0.2",
        "--duration",
        "0.5",
    )
    assert done.returncode == 0, done.stderr
    times = {row["t_s"] for row in rows(series / "process_cpu_seconds.csv")}
    assert len(times) >= 2, times  # the first scrape and the one at the end, at least


def test_a_node_that_does_not_answer_is_named_and_no_answer_at_all_fails(
    serve: ServerFactory, tmp_path: Path
) -> None:
    east = serve(make_config(region="us-east-1"))
    closed = f"http://127.0.0.1:{free_port()}"
    done = export(
        "--url",
        f"us-east-1={east.base_url}",
        "--url",
        f"gone={closed}",
        "--out",
        str(tmp_path / "a"),
    )
    assert done.returncode == 0, done.stderr
    assert "gone did not answer" in done.stderr
    done = export("--url", f"gone={closed}", "--out", str(tmp_path / "b"))
    assert done.returncode == 1 and "no node answered" in done.stderr
    assert not (tmp_path / "b").exists()


def scrapes_served(base_url: str) -> float:
    """How many /metrics answers the node has given (this read not yet counted)."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    found = re.findall(
        r'^bucketmesh_http_responses_total\{route="metrics",status="200"\} (\S+)$', text, re.M
    )
    return float(found[0]) if found else 0.0


def test_ctrl_c_during_a_series_writes_what_was_scraped(
    serve: ServerFactory, tmp_path: Path
) -> None:
    """Before: a KeyboardInterrupt traceback, exit 130, and nothing written."""
    node = serve(make_config(region="us-east-1"))
    out = tmp_path / "series"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")}
    command = [sys.executable, "-m", "bucketmesh", "metrics", "export", "--out", str(out)]
    run = subprocess.Popen(
        [
            *command,
            "--url",
            f"us-east-1={node.base_url}",
            "--interval",
            "0.1",
            "--duration",
            "3600",
        ],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        before = scrapes_served(node.base_url)
        ours = [1]  # our own reads of /metrics so far, which the counter includes

        def scraped_twice() -> None:
            served = scrapes_served(node.base_url)
            scraped = served - before - ours[0]
            ours[0] += 1
            assert run.poll() is None, "the export ended on its own"
            assert scraped >= 2, f"{scraped} scrape(s) so far"

        eventually(scraped_twice, "the exporter scraped twice")
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, err
    assert "Traceback" not in err
    times = {row["t_s"] for row in rows(out / "process_cpu_seconds.csv")}
    assert len(times) >= 2, times


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert export("--out", str(tmp_path)).returncode == 2  # --url (or --prometheus) is required
    bad = export("--url", "nourl", "--out", str(tmp_path))
    assert bad.returncode == 2 and "--url" in bad.stderr
    negative = export("--url", "a=http://127.0.0.1:1", "--out", str(tmp_path), "--duration", "-1")
    assert negative.returncode == 2 and "--duration" in negative.stderr
    a_file = tmp_path / "file"
    a_file.write_text("")
    not_dir = export("--url", "a=http://127.0.0.1:1", "--out", str(a_file))
    assert not_dir.returncode == 2 and "not a directory" in not_dir.stderr
    twice = export(
        "--url", "a=http://127.0.0.1:1", "--url", "a=http://127.0.0.1:2", "--out", str(tmp_path)
    )
    assert twice.returncode == 2 and "region 'a' is given twice" in twice.stderr


PROMETHEUS = shutil.which("prometheus")


def test_a_time_range_from_a_real_prometheus(serve: ServerFactory, tmp_path: Path) -> None:
    """--prometheus reads the past from a Prometheus server that scraped two nodes:
    every bucketmesh family, one CSV each, at every step of the range, in the shape
    the interval mode writes (t_s from --start, region from the instance)."""
    assert PROMETHEUS is not None, "prometheus is missing: make test installs it (Debian package)"
    east = serve(make_config(region="us-east-1"))
    west = serve(make_config(region="us-west-2"))
    with east.client() as client:
        for _ in range(3):
            assert client.post("/v1/rate", headers={"X-API-Key": "range"}).status_code == 200
    port = free_port()
    targets = [server.base_url.removeprefix("http://") for server in (east, west)]
    scrape = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "bucketmesh", "static_configs": [{"targets": targets}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(scrape))
    log = (tmp_path / "prometheus.log").open("w")
    prometheus = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    started = time.time()
    try:

        def scraped_enough() -> bool:
            # both nodes scraped four times since east's decisions: east's samples then
            # span about 3 s, so a 1 s range over them holds at least two steps (two
            # samples 1 s apart may fall between the same two steps)
            answer = httpx.get(
                f"{url}/api/v1/query",
                params={
                    "query": "count_over_time(bucketmesh_decisions_total"
                    f'{{rule="agent-api-key",result="allowed",instance="{targets[0]}"}}[1m])'
                    f' or count_over_time(process_cpu_seconds_total{{instance="{targets[1]}"}}[1m])'
                },
            )
            assert answer.status_code == 200, answer.text
            result = answer.json()["data"]["result"]
            return len(result) == 2 and all(float(series["value"][1]) >= 4 for series in result)

        eventually(scraped_enough, "Prometheus has scraped both nodes four times")
        out = tmp_path / "range"
        done = export(
            "--prometheus",
            url,
            "--start",
            str(int(started) - 5),
            "--end",
            "now",
            "--step",
            "1s",
            "--match",
            '{job="bucketmesh"}',
            "--out",
            str(out),
        )
        assert done.returncode == 0, done.stderr
        files = {p.name for p in out.glob("*.csv")}
        assert "bucketmesh_decisions.csv" in files, files
        assert "bucketmesh_http_request_duration_seconds.csv" in files, files
        decisions = rows(out / "bucketmesh_decisions.csv")
        assert list(decisions[0])[:3] == ["t_s", "region", "sample"]
        assert {"instance", "job", "rule", "result"} <= set(decisions[0])
        east_allowed = [
            row
            for row in decisions
            if row["region"] == targets[0]
            and row["rule"] == "agent-api-key"
            and row["result"] == "allowed"
        ]
        assert len({row["t_s"] for row in east_allowed}) >= 2  # a series over time
        assert {float(row["value"]) for row in east_allowed} == {3.0}
        assert {row["sample"] for row in east_allowed} == {"bucketmesh_decisions_total"}
        assert {row["region"] for row in rows(out / "process_cpu_seconds.csv")} == set(targets)

        # a range before anything was scraped holds nothing: exit 1, nothing written
        empty = export(
            "--prometheus", url, "--start", "1000", "--end", "1100", "--out", str(tmp_path / "e")
        )
        assert empty.returncode == 1 and "no bucketmesh series" in empty.stderr
        # a selector Prometheus cannot parse: its own words, exit 2
        bad = export(
            "--prometheus", url, "--start=-1m", "--match", "{job=", "--out", str(tmp_path / "b")
        )
        assert bad.returncode == 2 and "Prometheus refused the query" in bad.stderr
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        log.close()


def test_range_usage_errors_exit_2(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    url = f"http://127.0.0.1:{free_port()}"
    no_start = export("--prometheus", url, "--out", out)
    assert no_start.returncode == 2 and "--start" in no_start.stderr
    both = export("--prometheus", url, "--url", f"a={url}", "--start=-1h", "--out", out)
    assert both.returncode == 2 and "not both" in both.stderr
    bad_time = export("--prometheus", url, "--start", "yesterday", "--out", out)
    assert bad_time.returncode == 2 and "--start must be" in bad_time.stderr
    backwards = export("--prometheus", url, "--start=-1m", "--end=-2h", "--out", out)
    assert backwards.returncode == 2 and "before --start" in backwards.stderr
    bad_step = export("--prometheus", url, "--start=-1m", "--step", "0", "--out", out)
    assert bad_step.returncode == 2 and "--step" in bad_step.stderr
    stray = export("--url", f"a={url}", "--start=-1h", "--out", out)
    assert stray.returncode == 2 and "go with --prometheus" in stray.stderr
    # nobody listens there: Prometheus did not answer (1), not a usage error
    gone = export("--prometheus", url, "--start=-1m", "--out", out)
    assert gone.returncode == 1 and url in gone.stderr
