#!/usr/bin/env bash
# Creates (or refreshes) the Python virtual environment used by capmesh's end-to-end tests:
# the real `mcp` SDK from PyPI, pinned in requirements.txt next to this script.
#
#   tests/python/setup-venv.sh [VENV_DIR]     (default: <repo>/target/py-venv)
#
# Idempotent: a stamp file in the venv holds the sha256 of requirements.txt (and the
# interpreter version); when it matches, the script exits at once without touching anything.
# Needs only python3 (with the venv module) and access to PyPI.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-$repo/target/py-venv}"
req="$here/requirements.txt"
stamp="$venv/.capmesh-requirements.sha256"
python="${PYTHON:-python3}"

if ! command -v "$python" >/dev/null 2>&1; then
    echo "setup-venv: $python not found; install Python >= 3.10 (e.g. apt-get install -y python3 python3-venv)" >&2
    exit 1
fi

hash_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        "$python" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
    fi
}

want="$(hash_of "$req") $("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ -f "$stamp" ] && [ -x "$venv/bin/python" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

make_venv() {
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
}

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "setup-venv: creating $venv" >&2
    if ! make_venv; then
        echo "setup-venv: '$python -m venv' failed; the venv module (ensurepip) is missing." >&2
        echo "setup-venv: fix with: apt-get install -y python3-venv" >&2
        if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
            echo "setup-venv: running as root, trying apt-get install -y python3-venv" >&2
            (apt-get install -y python3-venv || { apt-get update && apt-get install -y python3-venv; }) >&2
            make_venv
        else
            exit 1
        fi
    fi
fi

echo "setup-venv: installing $(grep -m1 '^mcp' "$req") and its pinned dependencies into $venv" >&2
"$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q -r "$req" >&2
"$venv/bin/python" -c 'import mcp, mcp.server, uvicorn' >&2
printf '%s\n' "$want" >"$stamp"
echo "setup-venv: ready ($venv)" >&2
