#!/usr/bin/env bash
# Routing-latency bench (issue 9): direct, the capmesh mesh path, nginx and HAProxy doing the
# same two-hop mutual-TLS path, balancing over 2 and 10 providers, a provider killed mid-run
# and a load step, at 1,000 and 5,000 req/s and at saturation.
#
#   benches/run.sh            full run (~9 min): prints the tables and rewrites the routing
#                             section of benches/RESULTS.md (between its marker comments)
#   benches/run.sh --quick    every scenario briefly (< 1 min after the build); fails only when
#                             a scenario that must have zero failed calls had some. Never a
#                             speed threshold. Called from .ci/run.
#   --rounds N                interleaved rounds of the full run (default 3; medians)
#
# Pinning: the load generator runs on CPU 0 and everything else (echo upstream, control plane,
# sidecars, nginx, HAProxy) on CPU 1, one worker thread per proxy instance
# (TOKIO_WORKER_THREADS=1, nginx worker_processes 1, HAProxy nbthread 1). A second pass runs
# capmesh with its defaults (worker threads = CPUs, proxies not pinned).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
rounds=3
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --rounds) rounds="${2:?--rounds needs a number}"; shift ;;
    --rounds=*) rounds="${1#*=}" ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "benches/run.sh: unknown argument $1 (use --quick or --rounds N)" >&2; exit 2 ;;
  esac
  shift
done

echo "== tools"
need=()
for p in nginx haproxy; do
  command -v "$p" >/dev/null 2>&1 || [ -x "/usr/sbin/$p" ] || need+=("$p")
done
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # The packages start a system nginx/HAProxy on port 80; the bench starts its own.
    for s in nginx haproxy; do service "$s" stop >/dev/null 2>&1 || true; done
  else
    echo "benches/run.sh: missing ${need[*]}: run as root, or apt-get install -y ${need[*]}" >&2
    exit 1
  fi
fi

echo "== build (release)"
nice -n 10 cargo build --release -q -p capmesh-proxy -p capmesh-control-plane -p capmesh-bench
bin=target/release/capmesh-bench
out=target/bench-routing
mkdir -p "$out"

cpus=$(nproc)
if [ "$cpus" -ge 2 ]; then
  gen=0
  sut=1
else
  echo "only one CPU: the generator and the proxies share it (figures are not comparable)" >&2
  gen=0
  sut=0
fi

if [ "$quick" = 1 ]; then
  echo "== quick: every scenario once, short"
  start=$(date +%s)
  status=0
  TOKIO_WORKER_THREADS=1 taskset -c "$sut" "$bin" suite --setup compare --quick \
    --gen-cpus "$gen" --out "$out/quick.jsonl" || status=$?
  "$bin" report "$out/quick.jsonl"
  echo "quick bench took $(( $(date +%s) - start )) s"
  exit "$status"
fi

echo "== comparison: $rounds interleaved rounds, pinned, one worker per proxy"
status=0
perf=()
if command -v perf >/dev/null 2>&1; then
  rm -f "$out"/*.perf.data "$out"/*.perf.txt
  perf=(--perf-dir "$out")
fi
TOKIO_WORKER_THREADS=1 taskset -c "$sut" "$bin" suite --setup compare --rounds "$rounds" \
  --gen-cpus "$gen" --out "$out/compare.jsonl" "${perf[@]}" || status=$?
echo "== capmesh with its defaults ($(( (rounds + 1) / 2 )) rounds)"
"$bin" suite --setup defaults --rounds "$(( (rounds + 1) / 2 ))" --gen-cpus "$gen" \
  --out "$out/defaults.jsonl" || status=$?
# Flat CPU profiles of the two capmesh sidecars (round 1), for the budgets a run misses.
for f in "$out"/*.perf.data; do
  [ -e "$f" ] || continue
  {
    echo "# self time (top 40)"
    perf report -i "$f" --stdio --no-children -g none --sort dso,symbol 2>/dev/null \
      | grep -v '^#' | grep -v '^$' | sed 's/[[:space:]]*$//' | head -40
    echo "# time including callees, capmesh and allocator frames (top 40)"
    perf report -i "$f" --stdio --children -g none --sort symbol 2>/dev/null \
      | grep -E 'capmesh_|malloc|free|clone|drop_in_place' | sed 's/[[:space:]]*$//' | head -40
  } > "${f%.data}.txt" || true
  echo "profile: ${f%.data}.txt"
done

"$bin" report "$out/compare.jsonl" "$out/defaults.jsonl" > "$out/section.md"
cat "$out/section.md"

# Rewrite only the routing section of RESULTS.md, between its markers.
results=benches/RESULTS.md
begin='<!-- routing-bench:begin (written by benches/run.sh; edits here are lost) -->'
end='<!-- routing-bench:end -->'
if ! grep -qF "$begin" "$results"; then
  printf '\n%s\n%s\n' "$begin" "$end" >> "$results"
fi
{
  echo "Command: \`benches/run.sh --rounds $rounds\`; $(date -u '+%Y-%m-%d %H:%M UTC'); $(uname -srm); $(nproc) CPUs; $(free -g | awk '/^Mem:/ {print $2}') GiB memory; release build."
  echo
  cat "$out/section.md"
} > "$out/section-dated.md"
awk -v b="$begin" -v e="$end" -v f="$out/section-dated.md" '
  $0 == b { print; while ((getline line < f) > 0) print line; skip = 1; next }
  $0 == e { skip = 0 }
  !skip { print }
' "$results" > "$out/RESULTS.md.new"
mv "$out/RESULTS.md.new" "$results"
echo "== wrote the routing section of $results (raw points: $out/*.jsonl)"
exit "$status"
