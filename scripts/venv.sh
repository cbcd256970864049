#!/usr/bin/env bash
# Makes .venv, the virtual environment the README's commands install into.
#
# Debian 12 and Ubuntu 24.04 mark their Python "externally managed": pip refuses
# to install into it (error: externally-managed-environment), but not into a
# virtual environment. There `python3 -m venv` needs the python3.X-venv package,
# which this installs from apt when it is missing (with sudo unless root), as
# install-redis-server.sh does for redis-server. PYTHON picks another interpreter
# (default: python3); an existing .venv with a working pip is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
python=${PYTHON:-python3}

if "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
        && "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    exit 0
fi
if ! command -v "$python" >/dev/null 2>&1; then
    echo "venv: $python is not on PATH: install Python 3.11 or newer (Debian/Ubuntu: apt-get install python3)" >&2
    exit 1
fi
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "venv: async-component needs Python 3.11 or newer; $python is $version (set PYTHON to another one)" >&2
    exit 1
fi

if ! "$python" -m venv --clear "$venv" >/dev/null 2>&1; then
    # Debian and Ubuntu ship ensurepip, which venv needs, in a package of its own.
    if ! command -v apt-get >/dev/null 2>&1; then
        "$python" -m venv --clear "$venv"  # says why it failed
        exit 1
    fi
    echo "venv: installing python$version-venv (python3 -m venv needs it on Debian and Ubuntu)"
    "$BASH" scripts/apt-install.sh "python$version-venv"
    "$python" -m venv --clear "$venv"
fi
echo "venv: made $venv with $("$venv/bin/python" -V) (activate it with: . $venv/bin/activate)"
