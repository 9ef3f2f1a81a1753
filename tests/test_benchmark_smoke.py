"""The benchmark command still runs end to end (a quick smoke run; it asserts the report's
shape, never a speed: speed is for the benchmark itself to report)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.gevent_timeout(240)
def test_the_benchmark_runs_and_writes_its_report(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick", "--out", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=230,
        cwd=ROOT,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    clients = {row["client"] for row in results["throughput"]}
    assert len(clients) == 9 and "geventpool, one instance" in clients
    assert "geventpool pipelined, 2 connections" in clients
    assert all(row["calls_per_second"] > 0 for row in results["throughput"])
    assert [p["callers"] for p in results["pool_cost"]["callers"]] == [10, 100, 1000, 10_000]
    sweep = results["pipelining"]["sweep"]
    assert {(r["callers"], r["connections"]) for r in sweep} == {
        (callers, connections) for callers in (10, 100, 1000) for connections in (1, 2, 10)
    }
    assert all(r["ratio_to_raw"] > 0 for r in sweep)
    assert len(results["pipelining"]["mixed"]) == 3
    assert all(r["fast_p99_ms"] > 0 for r in results["pipelining"]["mixed"])
    assert results["behaviour"]["many_instances"] == 1000
    for row in results["hostile"]["client"]:  # a typed error, but for the valid reply
        assert (row["error"] == "none") == ("valid" in row["case"]), row
    assert all(row["closed"] for row in results["hostile"]["server"])
    report = (tmp_path / "README.md").read_text()
    assert "## Targets" in report and "## Reading these figures" in report
    assert "## Hostile input" in report and "## Pipelining across callers" in report
    for plot in ("throughput.png", "latency.png", "pool_cost.png"):
        assert (tmp_path / plot).stat().st_size > 10_000


@pytest.mark.gevent_timeout(200)
def test_a_scrape_during_a_load_run_shows_every_metric_family(tmp_path: Path) -> None:
    """scripts/metrics_figures.py --quick: a ZooKeeper, two registered servers, a rejected
    child, a client under load; /metrics read over HTTP halfway (it exits 1 if a family of
    observe/prometheus.py's list is missing), and the cost table written."""
    script = str(ROOT / "scripts" / "metrics_figures.py")
    finished = subprocess.run(
        [sys.executable, script, "--quick", "--out", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=190,
        cwd=ROOT,
    )
    assert finished.returncode == 0, (finished.stdout + finished.stderr)[-3000:]
    report = (tmp_path / "metrics.md").read_text()
    assert "families missing from it: none" in report
    assert "| client | ClientMetrics |" in report and "| server | ServerMetrics |" in report
    scrape = (tmp_path / "metrics_scrape.txt").read_text()
    assert 'geventpool_client_rejected_children{service="echo"} 1.0' in scrape
