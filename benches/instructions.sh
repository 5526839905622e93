#!/usr/bin/env bash
# Instructions per call in the entry instance of a path held by `capmesh-bench hold`: the
# consumer's sidecar on the mesh path, or the floor path's front (benches/src/floor.rs), run
# under valgrind's callgrind, which counts the instructions the process executes. Unlike CPU
# time on a shared VM, the count hardly moves between runs, so two builds can be compared by a
# few percent.
#
#   benches/instructions.sh [PATH] [DIR]
#       PATH is capmesh (the default) or floor; DIR holds the release builds (capmesh-bench,
#       capmesh-control-plane, capmesh-proxy) to measure instead of building the working tree's
#
# The entry instance starts with counting off; counting is on only while the generator sends
# 600 calls (100 req/s for 6 s, one second of it warm-up), after 150 calls to warm the
# connections. Prints instructions per call, by crate (from each function's source file) and the
# top functions, and keeps callgrind's file for `callgrind_annotate` (its path is printed).
# The instance runs about fifty times slower under callgrind: the latencies are not quoted.
# Needs valgrind, python3 and curl. Uses port 19090 for the echo upstream.
#
# INSTRUCTIONS_SIDECAR=provider counts the provider's sidecar (agent echo) on the mesh path
# instead of the consumer's.
#
# INSTRUCTIONS_CACHE=1 also simulates the first-level caches (callgrind --cache-sim=yes, the
# machine's sizes) and prints the misses per call: how much code and data a call touches, which
# the instruction count alone does not show (benches/RESULTS.md, "Futures without the request").
set -euo pipefail
cd "$(dirname "$0")/.."
path=${1:-capmesh}
dir=${2:-}
case $path in capmesh|floor) ;; *) echo "benches/instructions.sh: PATH is capmesh or floor" >&2; exit 2 ;; esac
. benches/held.sh
held_binaries benches/instructions.sh "$dir" valgrind callgrind_control callgrind_annotate python3 curl
held_setup "$dir/capmesh-bench" ", binaries from $dir, $path path"
out=$work/callgrind.out
vg=(valgrind --tool=callgrind --instr-atstart=no "--callgrind-out-file=$out")
if [ -n "${INSTRUCTIONS_CACHE:-}" ]; then vg+=(--cache-sim=yes); fi
case ${INSTRUCTIONS_SIDECAR:-consumer} in
  consumer) agent=bench-client ;;
  provider) agent=echo ;;
  *) echo "benches/instructions.sh: INSTRUCTIONS_SIDECAR is consumer or provider" >&2; exit 2 ;;
esac
if [ "$path" = capmesh ]; then
  # `hold` starts the sidecars from its own directory: a copy of the binaries where
  # capmesh-proxy runs the measured sidecar (the one for agent $agent) under callgrind. A
  # sidecar cannot be restarted in place, since its bootstrap token is single-use.
  bin=$work/bin
  mkdir -p "$bin"
  cp "$dir/capmesh-bench" "$dir/capmesh-control-plane" "$bin/"
  cp "$dir/capmesh-proxy" "$bin/capmesh-proxy.real"
  cat >"$bin/capmesh-proxy" <<EOF
#!/usr/bin/env bash
prev=
for a in "\$@"; do
  [ "\$prev" = --agent-name ] && [ "\$a" = $agent ] && exec ${vg[*]} "$bin/capmesh-proxy.real" "\$@" 2>>"$work/valgrind.log"
  prev=\$a
done
exec "$bin/capmesh-proxy.real" "\$@"
EOF
  chmod +x "$bin/capmesh-proxy"
else
  bin=$dir
fi
taskset -c 1 "$bin/capmesh-bench" hold --path "$path" --upstream 19090 >"$work/held" 2>"$work/hold.log" &
pids+=($!)
for _ in $(seq 1200); do [ -s "$work/held" ] && break; sleep 0.1; done
[ -s "$work/held" ] || { echo "benches/instructions.sh: the path did not start:" >&2; cat "$work/hold.log" >&2; exit 1; }
read -r entry front < <(python3 -c '
import json, sys
held = json.load(open(sys.argv[1]))
print(held["entry"], held["entry_pids"][0])' "$work/held")
if [ "$path" = floor ]; then
  # The floor's front takes only its ports and the certificates: start it again, on the same
  # port, under callgrind.
  mapfile -t args < <(tr '\0' '\n' <"/proc/$front/cmdline" | tail -n +2)
  port=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.urlparse(sys.argv[1]).port)' "$entry")
  for i in "${!args[@]}"; do [ "${args[$i]}" = --listen ] && args[i+1]=127.0.0.1:$port; done
  kill -TERM "$front"
  # Gone, or a zombie that `hold` has not reaped.
  while kill -0 "$front" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$front/stat" 2>/dev/null)" != Z ]; do
    sleep 0.1
  done
  taskset -c 1 "${vg[@]}" "$dir/capmesh-bench" "${args[@]}" >/dev/null 2>>"$work/valgrind.log" &
  pids+=($!)
fi
for _ in $(seq 600); do
  vgpid=$(pgrep -f -- "--callgrind-out-file=$out" | head -1 || true)
  [ -n "$vgpid" ] && curl -s -o /dev/null -m 5 "$entry" && break
  sleep 0.2
done
[ -n "${vgpid:-}" ] || { echo "benches/instructions.sh: the entry instance did not start under callgrind" >&2; cat "$work/valgrind.log" >&2; exit 1; }
taskset -c 0 "$dir/capmesh-bench" load --url "$entry" --rate 50 --warmup 1 --duration 2 >"$work/warm.json" 2>&1
callgrind_control -i on "$vgpid" >/dev/null 2>&1
taskset -c 0 "$dir/capmesh-bench" load --url "$entry" --rate 100 --warmup 1 --duration 5 >"$work/load.json" 2>"$work/load.log"
callgrind_control -i off "$vgpid" >/dev/null 2>&1
callgrind_control -d "$vgpid" >/dev/null 2>&1
for _ in $(seq 100); do compgen -G "$out.*" >/dev/null && break; sleep 0.1; done
suffix=
if [ "$agent" = echo ]; then suffix=-provider; fi
keep=target/instructions-$path$suffix.callgrind
mkdir -p target
cp "$(compgen -G "$out.*" | tail -1)" "$keep"
python3 - "$keep" "$work/load.json" <<'PY'
import collections, json, re, subprocess, sys
report = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
calls = report["sent"] * 6 / 5  # the measured 5 s and the 1 s of warm-up before them
if report["errors"]:
    print(f"warning: {report['errors']} of {report['sent']} calls failed")
def annotate(*args):
    return subprocess.run(["callgrind_annotate", *args, sys.argv[1]],
                          capture_output=True, text=True, check=True).stdout
text = annotate("--inclusive=no", "--threshold=100", "--show=Ir")
crates, funcs = collections.Counter(), collections.Counter()
total = 0
for line in text.splitlines():
    m = re.match(r"\s*([\d,]+)\s+\([\s\d.]+%\)\s+(\S+?):(.*)$", line)
    if not m:
        continue
    ir, source, func = int(m.group(1).replace(",", "")), m.group(2), m.group(3)
    if "PROGRAM TOTALS" in line:
        continue
    total += ir
    crate = re.search(r"registry/src/[^/]+/([A-Za-z0-9_\-]+?)-\d+\.\d+", source)
    if crate:
        group = crate.group(1)
    elif "/rustc/" in source:
        group = "std (inlined)"
    elif source.startswith("./"):
        group = "glibc malloc/free" if "malloc" in source else "glibc other"
    elif re.search(r"(^|/)(proxy|benches|api|certs|client|memory)/src/", source):
        group = "capmesh"
    else:
        group = "other"
    crates[group] += ir
    funcs[re.sub(r"\s*\[[^\]]*\]$", "", func)] += ir
print(f"{calls:.0f} calls: {total / calls:,.0f} instructions per call")
recorded = next((l.split(":", 1)[1].split() for l in text.splitlines()
                 if l.startswith("Events recorded:")), [])
if "I1mr" in recorded:  # INSTRUCTIONS_CACHE=1: read the cache events' totals too
    head = annotate("--inclusive=no", "--threshold=100", "--auto=no").splitlines()
    events = next((l.split(":", 1)[1].split() for l in head if l.startswith("Events shown:")), [])
    totals = next((l for l in head if "PROGRAM TOTALS" in l), "")
    counts = [int(n.replace(",", "")) for n in re.findall(r"([\d,]+)\s+\(", totals)]
else:
    events, counts = [], []
if "I1mr" in events and len(counts) == len(events):
    per = dict(zip(events, (c / calls for c in counts)))
    print(f"  first-level cache misses per call: instructions {per['I1mr']:,.0f}, "
          f"data read {per['D1mr']:,.0f}, data write {per['D1mw']:,.0f}")
for group, ir in crates.most_common():
    if ir / calls >= 500:
        print(f"  {group:24} {ir / calls:8,.0f}")
print("top functions (self):")
for func, ir in funcs.most_common(15):
    print(f"  {ir / calls:8,.0f}  {func[:110]}")
PY
echo "callgrind's file: $keep (callgrind_annotate --inclusive=yes $keep)"
