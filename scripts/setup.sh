#!/usr/bin/env bash
# Install what the service and the tests need, once: system tools, then a virtual environment
# in .venv with the project. Re-running is cheap: pip runs again only when pyproject.toml
# changed. Source it (". scripts/setup.sh") to get the environment activated.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# redis-server: the queue and trace store (started privately when REDIS_URL is unset);
# promtool (Debian's prometheus package): the deploy tests check Prometheus files with it;
# chromium (with its recommended fonts): the web page's end-to-end tests drive it
if ! command -v redis-server >/dev/null || ! command -v promtool >/dev/null \
    || ! command -v chromium >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server prometheus chromium \
        >/dev/null
fi

[ -x "$root/.venv/bin/python" ] || python3 -m venv "$root/.venv"
. "$root/.venv/bin/activate"
stamp="$root/.venv/.installed-$(sha1sum "$root/pyproject.toml" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    python -m pip install -q --upgrade pip
    # torch and torchvision pinned to the pair that lies on this machine's disk
    python -m pip install -q torch==2.14.1 torchvision==0.29.1
    python -m pip install -q -e "$root[engine,test]"
    touch "$stamp"
fi
