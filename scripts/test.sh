#!/usr/bin/env bash
# Runs the whole test suite: unit, sans-I/O, datapath, controller, and (as
# root) the end-to-end tests in network namespaces. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
