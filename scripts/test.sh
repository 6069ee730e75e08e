#!/usr/bin/env bash
# The test command (README): the whole suite. Tests that need Redis start their own private
# redis-server when none answers on REDIS_URL; GPU tests are skipped without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -q -p no:cacheprovider "$@"
