#!/usr/bin/env bash
# The run command (README): installs what is missing, builds every demo model that is not
# built yet (a line per model; minutes on the very first start, kept in var/models), then runs
# the whole service on this machine: a private redis-server when REDIS_URL is unset, one
# supervised worker (restarted if it dies), and the API on port 8000. Building before the
# worker starts means no first request waits for a model build; the worker then warms what
# the registry marks warm before /readyz turns 200.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
if [ -z "${BACKTRACE_REGISTRY:-}" ]; then
    python -m service build-demo --out "${BACKTRACE_DATA_DIR:-var/models}"
fi
exec python -m service serve --all-in-one "$@"
