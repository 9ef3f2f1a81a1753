#!/usr/bin/env bash
# Set up everything geventpool needs on a fresh Debian machine with Python 3.11:
# ZooKeeper (scripts/install-zookeeper.sh), Apache Thrift's compiler for the interop tests
# (scripts/install-thrift-compiler.sh) and a virtualenv in .venv with the package
# installed in editable mode with its test and load-test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-zookeeper.sh
bash scripts/install-thrift-compiler.sh
# Debian's chromium: the status page's headless browser test (tests/test_status_page.py).
if [[ ! -x /usr/bin/chromium ]]; then
  if [[ $(id -u) -eq 0 ]]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
  else
    echo "chromium: not installed; as root run: apt-get install -y chromium" >&2
  fi
fi
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
