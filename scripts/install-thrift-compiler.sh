#!/usr/bin/env bash
# Make Apache Thrift's compiler (`thrift`) available: the interop tests generate Apache Thrift's
# Python code for the echo service with it. Uses Debian's `thrift-compiler`, installed here when
# it is missing and we are root.
set -euo pipefail
if command -v thrift >/dev/null; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "thrift-compiler: not installed; as root run: apt-get install -y thrift-compiler" >&2
  exit 1
fi
echo "thrift-compiler: installing Debian's package"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -qq --no-install-recommends thrift-compiler >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends thrift-compiler >/dev/null
fi
command -v thrift >/dev/null
