#!/usr/bin/env bash
# Soak (issue 16): 30 minutes at 1,000 req/s through the mesh path while the two providers take
# turns restarting (SIGTERM, then a new sidecar) every 5 minutes. Passes with 0 failed calls and
# the consumer sidecar's RSS growing less than 5 % after the first minute; prints one JSON line
# with every figure (for benches/RESULTS.md).
#
#   benches/soak.sh                 the full run (30 min)
#   benches/soak.sh --minutes 2 --restart-every 0.5    a short one
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== build (release)"
nice -n 10 cargo build --release -q -p capmesh-proxy -p capmesh-control-plane -p capmesh-bench
echo "== soak: $(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2}') GiB, load average $(cut -d' ' -f1-3 /proc/loadavg)"
exec target/release/capmesh-bench soak "$@"
