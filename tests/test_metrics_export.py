"""``bucketmesh metrics export``: real nodes' Prometheus families written as CSV, one
file per family, every row naming its node's region (xr's scraper, reused)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from conftest import ServerFactory, free_port, make_config


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


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert export("--out", str(tmp_path)).returncode == 2  # --url is required
    bad = export("--url", "nourl", "--out", str(tmp_path))
    assert bad.returncode == 2 and "--url" in bad.stderr
    negative = export("--url", "a=http://127.0.0.1:1", "--out", str(tmp_path), "--duration", "-1")
    assert negative.returncode == 2 and "--duration" in negative.stderr
    a_file = tmp_path / "file"
    a_file.write_text("")
    not_dir = export("--url", "a=http://127.0.0.1:1", "--out", str(a_file))
    assert not_dir.returncode == 2 and "not a directory" in not_dir.stderr
