#!/usr/bin/env bash
# Where the entry instance's CPU goes, per call: kernel against user space, for capmesh's
# consumer sidecar, the floor path's front instance (capmesh's HTTP and TLS crates without
# capmesh: benches/src/floor.rs), nginx's front instance and HAProxy's, each path alone in
# front of the echo upstream, pinned as run.sh pins (everything on CPU 1 with one worker, the
# generator on CPU 0). For each path and rate: an open-loop load of 40 s, `perf record -F 999`
# of the entry instance for 10 s of it (samples split by DSO: the kernel against the rest),
# then `perf stat` for 15 s (syscalls and context switches per call).
#
#   benches/split.sh [RATE...]          rates default to 1000 5000; `saturation` runs 64
#                                       closed-loop workers instead of a rate
#
# Needs perf, nginx, haproxy, taskset, python3 and a quiet machine; builds the release binaries
# first. Prints one line per path and rate. Uses port 19090 for the echo upstream.
set -euo pipefail
cd "$(dirname "$0")/.."
rates=("$@")
[ ${#rates[@]} -gt 0 ] || rates=(1000 5000)
for tool in perf nginx haproxy taskset python3; do
  command -v $tool >/dev/null || { echo "benches/split.sh: needs $tool" >&2; exit 2; }
done
echo "== build (release)"
cargo build --release -q -p capmesh-proxy -p capmesh-control-plane -p capmesh-bench
bin=$PWD/target/release/capmesh-bench
. benches/held.sh
held_setup "$bin"
for rate in "${rates[@]}"; do
  for path in capmesh floor nginx haproxy; do
    taskset -c 1 "$bin" hold --path $path --upstream 19090 >"$work/held" 2>"$work/hold.log" &
    pids=($!)
    for _ in $(seq 600); do [ -s "$work/held" ] && break; sleep 0.1; done
    [ -s "$work/held" ] || { echo "benches/split.sh: $path did not start:" >&2; cat "$work/hold.log" >&2; exit 1; }
    entry=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["entry"])' "$work/held")
    entry_pids=$(python3 -c 'import json,sys; print(",".join(map(str, json.load(open(sys.argv[1]))["entry_pids"])))' "$work/held")
    if [ "$rate" = saturation ]; then pace=(--closed 64); else pace=(--rate "$rate"); fi
    taskset -c 0 "$bin" load --url "$entry" "${pace[@]}" --warmup 5 --duration 40 >"$work/load.json" 2>"$work/load.log" &
    load=$!
    sleep 8
    perf record -q -F 999 -o "$work/perf.data" -p "$entry_pids" -- sleep 10 2>/dev/null
    perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$entry_pids" -- sleep 15 2>"$work/stat"
    wait $load
    perf report -i "$work/perf.data" --no-children --sort dso --stdio -n -g none 2>/dev/null >"$work/dso"
    python3 - "$path" "$rate" "$work" <<'PY'
import json, re, sys
path, work = sys.argv[1], sys.argv[3]
report = json.loads(open(f"{work}/load.json").read().strip().splitlines()[-1])
# At saturation (64 closed-loop workers) the rate is what the path achieved.
rate = report["achieved_rps"] if sys.argv[2] == "saturation" else float(sys.argv[2])
kernel = user = 0
for line in open(f"{work}/dso"):
    m = re.match(r"\s+[\d.]+%\s+(\d+)\s+(\S+)", line)
    if m:
        if m.group(2) == "[kernel.kallsyms]":
            kernel += int(m.group(1))
        else:
            user += int(m.group(1))
stat = {}
for line in open(f"{work}/stat"):
    parts = line.strip().split(",")
    if len(parts) > 2 and parts[0].replace(".", "").isdigit():
        stat[parts[2]] = float(parts[0])
us = lambda samples: samples * (1e6 / 999) / (rate * 10)
calls = rate * 15
print(f"{path:8} {rate:6.0f} req/s  kernel {us(kernel):5.1f} µs  user {us(user):5.1f} µs  total {us(kernel + user):5.1f} µs per call  "
      f"syscalls {stat.get('raw_syscalls:sys_enter', 0) / calls:.2f}  switches {stat.get('context-switches', 0) / calls:.2f} per call  "
      f"p50 {report['latency']['p50_us']} µs  p99 {report['latency']['p99_us']} µs  errors {report['errors']}")
PY
    stop
  done
done
