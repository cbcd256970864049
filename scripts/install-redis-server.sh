#!/usr/bin/env bash
# Installs redis-server from Debian/Ubuntu packages when it is not on PATH yet.
# The local stack and the tests start their own redis-server on a free port.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "redis-server is not on PATH and there is no apt-get here: install Redis with your package manager" >&2
    exit 1
fi
echo "installing redis-server"
"$BASH" "$(dirname "$0")/apt-install.sh" redis-server
