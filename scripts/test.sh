#!/usr/bin/env bash
# The test command (README): installs what is missing, then runs ruff and the whole suite.
# Tests that need Redis start their own private redis-server; GPU tests skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
ruff check .
exec python -m pytest -q -p no:cacheprovider "$@"
