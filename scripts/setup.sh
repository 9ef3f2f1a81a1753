#!/usr/bin/env bash
# Set up everything geventpool needs on a fresh Debian machine with Python 3.11:
# ZooKeeper (scripts/install-zookeeper.sh), Apache Thrift's compiler for the interop tests
# (scripts/install-thrift-compiler.sh) and a virtualenv in .venv with the package
# installed in editable mode with its test and load-test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-zookeeper.sh
bash scripts/install-thrift-compiler.sh
PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$({ cat setup.py pyproject.toml; grep __version__ geventpool/__init__.py; } | sha1sum | cut -c1-12)
if [[ ! -f $stamp ]]; then
  if ! { .venv/bin/python -m pip install -q --upgrade pip &&
         .venv/bin/python -m pip install -q -e '.[test,load,bench]'; } >.venv/pip.log 2>&1; then
    cat .venv/pip.log >&2
    exit 1
  fi
  rm -f .venv/.installed-* && touch "$stamp"
fi
