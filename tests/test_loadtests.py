"""The Locust scenarios (loadtests/run.py), short: each must end with Locust's own verdict
PASS, its HTML report and CSV statistics in the results folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ["steady", "exhaustion", "failover", "scale_up", "zookeeper_restart", "distributed"]


@pytest.mark.gevent_timeout(150)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_locust_scenario_passes(scenario: str, tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(ROOT / "loadtests" / "run.py"),
        scenario,
        "--results",
        str(tmp_path),
    ]
    finished = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=140, cwd=ROOT
    )
    print(finished.stdout[-4000:], finished.stderr[-4000:])
    folder = tmp_path / scenario
    verdict = json.loads((folder / "verdict.json").read_text())
    failed = [check for check in verdict["checks"] if not check["ok"]]
    assert finished.returncode == 0 and verdict["passed"], failed or finished.stdout[-2000:]
    assert (folder / "report.html").stat().st_size > 1000
    assert (folder / "stats_stats.csv").read_text().count("\n") >= 2
