#!/usr/bin/env bash
# Installs the npm MCP peers used by capmesh's end-to-end tests, at the exact versions locked in
# package.json / package-lock.json next to this script:
#   @modelcontextprotocol/server-everything  (v1 SDK server: sessions, resumable streams,
#                                             sampling/elicitation/progress tools)
#   @modelcontextprotocol/server + /node     (TypeScript SDK v2: the sessionless server, ts-server.mjs)
#   @modelcontextprotocol/conformance        (the protocol conformance suite; needs Node >= 22)
#   node                                     (Node 22 itself, from npm: CI has only Node 20)
#
#   tests/node/setup-node-peers.sh [DIR]     (default: <repo>/target/node-peers)
#
# The servers written here (*.mjs) are copied next to the node_modules they import.
#
# Idempotent: a stamp file holds the sha256 of package.json and package-lock.json; when it
# matches and Node 22 runs, the script exits at once. Needs only node + npm (any version >= 18)
# and access to the npm registry.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dir="${1:-$repo/target/node-peers}"
stamp="$dir/.capmesh-lock.sha256"

if ! command -v npm >/dev/null 2>&1; then
    echo "setup-node-peers: npm not found; install Node.js >= 18 with npm (e.g. apt-get install -y nodejs npm)" >&2
    exit 1
fi

hash_of() {
    cat "$here/package.json" "$here/package-lock.json" | sha256sum | cut -d' ' -f1
}

want="$(hash_of)"
node22="$dir/node_modules/node/bin/node"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$node22" ]; then
    cp "$here"/*.mjs "$dir/"
    exit 0
fi

echo "setup-node-peers: installing the locked npm peers into $dir" >&2
mkdir -p "$dir"
rm -f "$stamp"
cp "$here/package.json" "$here/package-lock.json" "$dir/"
# `npm ci` installs exactly the lock file; the `node` package's preinstall fetches the Node 22
# binary for this platform.
(cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) >&2

version="$("$node22" --version 2>/dev/null || true)"
case "$version" in
    v22.*) ;;
    *)
        echo "setup-node-peers: $node22 is not Node 22 (got '${version:-nothing}'); the 'node' package's install script did not run. Run 'cd $dir && npm rebuild node' or allow install scripts, then run this script again." >&2
        exit 1
        ;;
esac
for bin in conformance mcp-server-everything; do
    if [ ! -e "$dir/node_modules/.bin/$bin" ]; then
        echo "setup-node-peers: $dir/node_modules/.bin/$bin is missing after npm ci; delete $dir and run again" >&2
        exit 1
    fi
done
cp "$here"/*.mjs "$dir/"
printf '%s\n' "$want" >"$stamp"
echo "setup-node-peers: ready ($dir, node $version)" >&2
