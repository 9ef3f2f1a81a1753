"""Packaging: the wheel built from a clean checkout carries the one version string."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import geventpool

REPO = Path(__file__).resolve().parent.parent


def test_the_version_has_one_home() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert "version=" not in (REPO / "setup.py").read_text()


@pytest.mark.gevent_timeout(180)
def test_a_wheel_of_a_clean_checkout_has_the_version_geventpool_reports(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for name in filter(None, tracked):
        source = REPO / name
        if source.is_file():
            target = checkout / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    dist = str(tmp_path / "dist")
    build = ["pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist]
    subprocess.run(
        [sys.executable, "-m", *build, str(checkout)],
        check=True,
        capture_output=True,
        timeout=170,
    )
    [wheel] = (tmp_path / "dist").glob("geventpool-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    assert metadata["Version"] == geventpool.__version__
    assert metadata["License-Expression"] == "MIT"
    assert "geventpool/testing/echo.thrift" in names and "geventpool/py.typed" in names
    assert "geventpool/wire/codecs.py" in names and not any(n.startswith("tests/") for n in names)
