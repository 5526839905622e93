#!/usr/bin/env bash
# Where each sidecar's time and allocations go, per call: the mesh path with one provider (or
# the floor path: capmesh's HTTP and TLS crates without capmesh, benches/src/floor.rs), alone
# in front of the echo upstream (started by `capmesh-bench hold`), pinned as run.sh pins it
# (everything on CPU 1 with one worker, the generator on CPU 0), at RATE req/s for 30 s.
# During it:
# - `perf record -F 1999 -a -C 1` for 10 s: each instance's µs of CPU per call in the kernel
#   and in user space, user space by the crate that leads each symbol's name;
# - a uprobe on glibc's `malloc` for 5 s: allocations per call in each instance.
#
#   benches/percall.sh [RATE] [PATH] [DIR]
#       RATE defaults to 5000; PATH is capmesh (the default) or floor; DIR holds the release
#       builds (capmesh-bench, capmesh-control-plane, capmesh-proxy) to measure instead of
#       building the working tree's
#
# Needs perf (with uprobes), taskset, python3 and a quiet machine. Uses port 19090 for the echo
# upstream.
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-5000}
path=${2:-capmesh}
dir=${3:-}
case $path in capmesh|floor) ;; *) echo "benches/percall.sh: PATH is capmesh or floor" >&2; exit 2 ;; esac
. benches/held.sh
held_binaries benches/percall.sh "$dir" perf taskset python3
libc=$(ldd "$dir/capmesh-proxy" | awk '/libc\.so/{print $3}')
probe=probe_libc:malloc
perf probe -l 2>/dev/null | grep -q "$probe" || perf probe -q -x "$libc" malloc
bin=$dir/capmesh-bench
held_setup "$bin" ", binaries from $dir"
taskset -c 1 "$bin" hold --path "$path" --upstream 19090 >"$work/held" 2>"$work/hold.log" &
pids+=($!)
for _ in $(seq 600); do [ -s "$work/held" ] && break; sleep 0.1; done
[ -s "$work/held" ] || { echo "benches/percall.sh: the mesh did not start:" >&2; cat "$work/hold.log" >&2; exit 1; }
# The entry instance (the consumer's sidecar, or the floor's front) and the one behind it (the
# provider's sidecar, or the floor's back): `hold` lists the control plane first for capmesh.
read -r entry consumer provider < <(python3 -c '
import json, sys
held = json.load(open(sys.argv[1]))
entry = held["entry_pids"][0]
print(held["entry"], entry, [p for p in held["pids"] if p != entry][-1])' "$work/held")
taskset -c 0 "$bin" load --url "$entry" --rate "$rate" --warmup 5 --duration 30 >"$work/load.json" 2>"$work/load.log" &
load=$!
sleep 8
# The instances' CPU time (utime + stime, in clock ticks) around the profile, to check that
# perf saw it.
ticks() { awk '{print $14 + $15}' "/proc/$consumer/stat" "/proc/$provider/stat" | paste -sd' '; }
before=$(ticks)
perf record -q -F 1999 -a -C 1 -o "$work/perf.data" -- sleep 10 2>/dev/null
after=$(ticks)
perf stat -x, -e "$probe" -p "$consumer" -o "$work/consumer.allocs" -- sleep 5 &
counting=$!
perf stat -x, -e "$probe" -p "$provider" -o "$work/provider.allocs" -- sleep 5
wait $counting $load
perf report -i "$work/perf.data" --no-children --sort pid,dso,sym --stdio -n 2>/dev/null >"$work/syms"
python3 - "$rate" "$work" "$consumer" "$provider" "$path" "$before" "$after" "$(getconf CLK_TCK)" <<'PY'
import collections, json, re, sys
rate, work = float(sys.argv[1]), sys.argv[2]
cpu_s = [(int(a) - int(b)) / int(sys.argv[8]) for b, a in zip(sys.argv[6].split(), sys.argv[7].split())]
names = ("consumer", "provider") if sys.argv[5] == "capmesh" else ("front", "back")
who = {sys.argv[3]: names[0], sys.argv[4]: names[1]}
calls = rate * 10
per_call = lambda samples: samples * (1e6 / 1999) / calls
groups = {name: collections.Counter() for name in who.values()}
line_re = re.compile(r"\s+[\d.]+%\s+(\d+)\s+(\d+):\S+\s+(\S+)\s+\[.\]\s+(.*)")
for line in open(f"{work}/syms", errors="replace"):
    m = line_re.match(line)
    if not m or m.group(2) not in who:
        continue
    samples, dso, sym = int(m.group(1)), m.group(3), m.group(4)
    if dso == "[kernel.kallsyms]":
        group = "kernel"
    elif dso.startswith("libc"):
        group = "glibc malloc/free" if re.search(r"malloc|free|_int_|consolidate|unlink_chunk|memalign", sym) else "glibc other"
    elif dso in ("capmesh-proxy", "capmesh-bench"):
        crate = re.match(r"<?(?:&(?:mut )?)?([A-Za-z_][A-Za-z0-9_]*)::", sym)
        group = crate.group(1) if crate else "other"
    else:
        group = dso
    groups[who[m.group(2)]][group] += samples
allocs = {}
for name, file in zip(names, ("consumer", "provider")):
    for line in open(f"{work}/{file}.allocs"):
        parts = line.strip().split(",")
        if len(parts) > 2 and parts[0].isdigit():
            allocs[name] = int(parts[0]) / (rate * 5)
report = json.loads(open(f"{work}/load.json").read().strip().splitlines()[-1])
print(f"{rate:.0f} req/s  p50 {report['latency']['p50_us']} µs  p99 {report['latency']['p99_us']} µs  errors {report['errors']}")
for (name, counter), seconds in zip(groups.items(), cpu_s):
    sampled = sum(counter.values()) / 1999
    if seconds > 0 and sampled < 0.8 * seconds:
        print(f"warning: perf sampled {sampled:.2f} s of the {name}'s {seconds:.2f} s of CPU; "
              "its figures below are too low: run again")
    user = sum(v for k, v in counter.items() if k != "kernel")
    print(f"{name}: kernel {per_call(counter['kernel']):.1f} µs, user space {per_call(user):.1f} µs, "
          f"allocations {allocs.get(name, float('nan')):.1f} per call")
    for group, samples in counter.most_common():
        if group != "kernel" and per_call(samples) >= 0.2:
            print(f"  {group:24} {per_call(samples):5.2f} µs")
PY
