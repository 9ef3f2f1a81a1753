#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the benchmarks; results and the report go to
# docs/benchmarks/ (README.md, results.json, PNG plots). --quick for a short smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/benchmark.py "$@"
