#!/usr/bin/env bash
# Runs a demo mesh: a controller and three agents in network namespaces,
# workloads pinging and sending through it, `meshsec status` on each node.
# Everything it creates is removed when it ends (also on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "demo: run as root (it creates network namespaces)" >&2; exit 1; fi
bash scripts/setup.sh
exec .venv/bin/python -m e2e.demo "$@"
