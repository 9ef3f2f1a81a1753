#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the demo on a ZooKeeper it starts itself.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
