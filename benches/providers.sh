#!/usr/bin/env bash
# One core shared by many provider sidecars: the mesh path with N providers, everything pinned
# to CPU 1 as run.sh pins it (one worker per sidecar; the generator on CPU 0), at RATE req/s
# for 25 s. Over 15 s of it, reads every pinned process's CPU time (`/proc/<pid>/stat`) and its
# time waiting in the run queue (`/proc/<pid>/schedstat`), and prints: how busy the processes
# kept CPU 1, the run-queue wait per call summed over them, and the latency.
#
#   benches/providers.sh N RATE [N RATE]...     e.g. benches/providers.sh 1 5000 10 5000 10 4150
#
# Needs taskset, python3 and a quiet machine; builds the release binaries first. Uses port
# 19090 for the echo upstream.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] && [ $(($# % 2)) -eq 0 ] || { sed -n '2,10p' "$0"; exit 2; }
echo "== build (release)"
cargo build --release -q -p capmesh-proxy -p capmesh-control-plane -p capmesh-bench
bin=$PWD/target/release/capmesh-bench
. benches/held.sh
held_setup "$bin"
while [ $# -ge 2 ]; do
  n=$1 rate=$2
  shift 2
  : >"$work/held"
  taskset -c 1 "$bin" hold --path capmesh --providers "$n" --upstream 19090 >"$work/held" 2>"$work/hold.log" &
  pids=($!)
  for _ in $(seq 1200); do [ -s "$work/held" ] && break; sleep 0.1; done
  [ -s "$work/held" ] || { echo "benches/providers.sh: the mesh did not start:" >&2; cat "$work/hold.log" >&2; exit 1; }
  entry=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["entry"])' "$work/held")
  procs="$echo_pid $(python3 -c 'import json,sys; print(" ".join(map(str, json.load(open(sys.argv[1]))["pids"])))' "$work/held")"
  taskset -c 0 "$bin" load --url "$entry" --rate "$rate" --warmup 5 --duration 25 >"$work/load.json" 2>"$work/load.log" &
  load=$!
  sleep 8
  snap() { for p in $procs; do echo "$(cut -d' ' -f14,15 "/proc/$p/stat") $(cut -d' ' -f2 "/proc/$p/schedstat")"; done; }
  snap >"$work/before"
  sleep 15
  snap >"$work/after"
  wait $load
  python3 - "$n" "$rate" "$work" "$(getconf CLK_TCK)" <<'PY'
import json, sys
n, rate, work, tck = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
before = [list(map(int, l.split())) for l in open(f"{work}/before")]
after = [list(map(int, l.split())) for l in open(f"{work}/after")]
cpu_s = sum((a[0] + a[1] - b[0] - b[1]) / tck for a, b in zip(after, before))
wait_s = sum((a[2] - b[2]) / 1e9 for a, b in zip(after, before))
report = json.loads(open(f"{work}/load.json").read().strip().splitlines()[-1])
print(f"{n:3} providers {rate:6.0f} req/s  CPU 1 busy {100 * cpu_s / 15:5.1f} %  run-queue wait {wait_s * 1e6 / (rate * 15):6.1f} µs per call  "
      f"p50 {report['latency']['p50_us']} µs  p99 {report['latency']['p99_us']} µs  errors {report['errors']}")
PY
  stop
done
