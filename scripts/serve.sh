#!/usr/bin/env bash
# The run command (README): installs what is missing, builds the demo models on first start,
# then runs the whole service on this machine: a private redis-server when REDIS_URL is
# unset, one worker, and the API on port 8000.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
exec python -m service serve --all-in-one "$@"
