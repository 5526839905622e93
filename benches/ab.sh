#!/usr/bin/env bash
# Interleaved A/B of two builds on the mesh path at one constant rate: for each build, a fresh
# mesh (echo upstream, control plane, provider and consumer sidecars, pinned to CPU 1 with one
# worker thread each, as run.sh pins them), an open-loop load from CPU 0, and `perf stat` on both
# sidecars for 15 s of the 25 s measured (CPU time, context switches, the syscalls of the request
# path), and both sidecars' RSS idle (ready, before the load) and loaded (at its end), in MiB,
# consumer first. Builds alternate, round by round, so drift in the machine hits both alike.
#
#   benches/ab.sh DIR_A DIR_B [RATE] [ROUNDS]
#
# DIR_A and DIR_B each hold capmesh-bench, capmesh-control-plane and capmesh-proxy (release
# builds; copy them out of target/release, or build an old commit in a worktree). RATE defaults
# to 1000 req/s, ROUNDS to 3. Prints one line per run and the medians; needs perf, curl, python3
# and a quiet machine. Uses ports 19001-19013, 19090, 19443-19444.
#
# AB_DEFAULTS=1 runs run.sh's `defaults` set-up instead: sidecars, echo and control plane
# unpinned, with their default worker threads (one per CPU); the generator stays on CPU 0.
set -euo pipefail

[ $# -ge 2 ] || { sed -n '2,14p' "$0"; exit 2; }
A=$1 B=$2 RATE=${3:-1000} ROUNDS=${4:-3}
for d in "$A" "$B"; do
  for b in capmesh-bench capmesh-control-plane capmesh-proxy; do
    [ -x "$d/$b" ] || { echo "benches/ab.sh: $d/$b is missing (copy the release builds there)" >&2; exit 2; }
  done
done
command -v perf >/dev/null || { echo "benches/ab.sh: needs perf (apt-get install linux-perf)" >&2; exit 2; }

EVENTS=context-switches,cpu-clock,syscalls:sys_enter_writev,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex
work=$(mktemp -d)
pids=()
stop() {
  [ ${#pids[@]} -eq 0 ] && return
  kill "${pids[@]}" 2>/dev/null || true
  sleep 1
  kill -9 "${pids[@]}" 2>/dev/null || true
  pids=()
}
trap 'stop; rm -rf "$work"' EXIT

# One run of build $1; prints "label consumer-cpu-ms provider-cpu-ms p50 p99" and keeps the
# perf output in $work.
run() {
  local bin=$1 label=$2 d
  d=$(mktemp -d -p "$work")
  export RUST_LOG=warn
  local pin=(taskset -c 1)
  if [ "${AB_DEFAULTS:-0}" = 1 ]; then
    pin=()
    unset TOKIO_WORKER_THREADS
  else
    export TOKIO_WORKER_THREADS=1
  fi
  "${pin[@]}" "$bin/capmesh-bench" echo --listen 127.0.0.1:19090 >"$d/echo.log" 2>&1 &
  pids+=($!)
  "${pin[@]}" "$bin/capmesh-control-plane" --data-dir "$d/cp" --listen 127.0.0.1:19443 \
    --admin-listen 127.0.0.1:19444 --grace 2s >"$d/cp.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 150); do [ -s "$d/cp/admin-token" ] && break; sleep 0.2; done
  sleep 1
  local name base
  for name in echo bench-client; do
    local token
    token=$(curl -sf --cacert "$d/cp/ca.pem" https://localhost:19443/v1/tokens \
      -H "authorization: Bearer $(cat "$d/cp/admin-token")" -H 'content-type: application/json' \
      -d '{"namespace":"default","agent_pattern":"'$name'","ttl_secs":3600}' |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
    if [ $name = echo ]; then
      base=19001
      set -- --agent-url http://127.0.0.1:19090/mcp
    else
      base=19011
      set -- --agent-url none --dependency echo
    fi
    CAPMESH_BOOTSTRAP_TOKEN=$token "${pin[@]}" "$bin/capmesh-proxy" --agent-name $name "$@" \
      --control-plane https://127.0.0.1:19443 --control-plane-ca "$d/cp/ca.pem" \
      --outbound 127.0.0.1:$base --inbound 127.0.0.1:$((base + 1)) --admin 127.0.0.1:$((base + 2)) \
      >"$d/$name.log" 2>&1 &
    pids+=($!)
  done
  local prov=${pids[2]} cons=${pids[3]}
  for _ in $(seq 150); do
    curl -sf http://127.0.0.1:19013/ready >/dev/null && curl -sf http://127.0.0.1:19003/ready >/dev/null && break
    sleep 0.2
  done
  sleep 2
  rss() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
  local idle_c idle_p
  idle_c=$(rss "$cons")
  idle_p=$(rss "$prov")
  taskset -c 0 "$bin/capmesh-bench" load --url http://127.0.0.1:19011/mcp --rate "$RATE" \
    --warmup 5 --duration 25 >"$d/load.json" 2>"$d/load.log" &
  local load=$!
  sleep 8
  perf stat -x, -e "$EVENTS" -p "$cons" -- sleep 15 2>"$d/consumer.perf" &
  local pc=$!
  perf stat -x, -e "$EVENTS" -p "$prov" -- sleep 15 2>"$d/provider.perf" &
  local pp=$!
  wait $load $pc $pp
  echo "$idle_c $idle_p $(rss "$cons") $(rss "$prov")" >"$d/rss"
  stop
  python3 - "$d" "$label" <<'EOF'
import json, sys
d, label = sys.argv[1], sys.argv[2]
def perf(f):
    out = {}
    for line in open(f"{d}/{f}"):
        parts = line.strip().split(",")
        if len(parts) > 2 and parts[0].replace(".", "").isdigit():
            out[parts[2]] = float(parts[0])
    return out
c, p = perf("consumer.perf"), perf("provider.perf")
report = json.loads(open(f"{d}/load.json").read().strip().splitlines()[-1])
lat = report["latency"]
n = report["achieved_rps"] * 15
per = lambda m, k: m.get(k, 0) / n
rss = [int(x) / 1024 for x in open(f"{d}/rss").read().split()]
print(f"{label} idle_rss_mib={rss[0]:.1f},{rss[1]:.1f} loaded_rss_mib={rss[2]:.1f},{rss[3]:.1f} consumer_cpu_ms={c.get('cpu-clock', 0):.0f} provider_cpu_ms={p.get('cpu-clock', 0):.0f} "
      f"p50_us={lat['p50_us']} p99_us={lat['p99_us']} errors={report['errors']} "
      f"per_request(consumer): cs={per(c, 'context-switches'):.2f} writev={per(c, 'syscalls:sys_enter_writev'):.2f} "
      f"recvfrom={per(c, 'syscalls:sys_enter_recvfrom'):.2f} epoll_wait={per(c, 'syscalls:sys_enter_epoll_wait'):.2f} futex={per(c, 'syscalls:sys_enter_futex'):.2f}")
EOF
}

echo "== $RATE req/s, $ROUNDS rounds$([ "${AB_DEFAULTS:-0}" = 1 ] && echo ', defaults (unpinned, one worker per CPU)'); A=$A B=$B; $(nproc) CPUs, $(free -g | awk '/Mem:/{print $2}') GiB; loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
out=$work/lines
for r in $(seq "$ROUNDS"); do
  for side in A B; do
    if [ $side = A ]; then dir=$A; else dir=$B; fi
    run "$dir" "$side" | tee -a "$out"
  done
done
python3 - "$out" <<'EOF'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    side, *fields = line.split()
    for f in fields:
        k, _, v = f.partition("=")
        try:
            value = float(v)
        except ValueError:
            continue
        rows.setdefault(side, {}).setdefault(k, []).append(value)
for side, m in rows.items():
    print(f"median {side}: " + " ".join(f"{k}={statistics.median(v):g}" for k, v in m.items()))
EOF
