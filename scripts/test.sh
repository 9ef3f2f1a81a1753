#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the checks: ruff, mypy, and the whole pytest suite
# against real ZooKeeper servers and real server processes the suite starts itself.
# Extra arguments go to pytest, e.g. scripts/test.sh -k membership
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check .
echo "== ruff format"; .venv/bin/ruff format --check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; exec .venv/bin/python -m pytest "$@"
