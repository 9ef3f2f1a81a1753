#!/usr/bin/env bash
# Make a ZooKeeper server available to the tests and the demo.
# Uses $ZOOKEEPER_HOME or $GEVENTPOOL_ZOOKEEPER_CLASSPATH when set; otherwise Debian's
# `zookeeper` package, installed here when it is missing and we are root.
set -euo pipefail
if [[ -n "${GEVENTPOOL_ZOOKEEPER_CLASSPATH:-}" || -n "${ZOOKEEPER_HOME:-}" ]]; then
  echo "zookeeper: using ${ZOOKEEPER_HOME:-$GEVENTPOOL_ZOOKEEPER_CLASSPATH}"
  exit 0
fi
if [[ -f /usr/share/java/zookeeper.jar && -f /usr/share/java/slf4j-simple.jar ]]; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "zookeeper: not installed; as root run: apt-get install -y zookeeper libslf4j-java" >&2
  echo "           or set ZOOKEEPER_HOME to an unpacked ZooKeeper release" >&2
  exit 1
fi
echo "zookeeper: installing Debian's package"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends zookeeper libslf4j-java default-jre-headless >/dev/null
test -f /usr/share/java/zookeeper.jar
