#!/usr/bin/env bash
# Runs every fuzz target (each file in src/bin/) for SECONDS (default 60), starting from its
# seeds and replaying its kept regression inputs first. Exits non-zero on the first crash; the
# crashing input is in fuzz/artifacts/<target>/ and the log in fuzz/artifacts/<target>.log.
#   bash fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for f in src/bin/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi
cargo +nightly fuzz build -s none
mkdir -p artifacts
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "seeds/$t" "regressions/$t"
  echo "-- $t: ${seconds}s"
  rc=0
  cargo +nightly fuzz run -s none "$t" "corpus/$t" "seeds/$t" "regressions/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 \
    >"artifacts/$t.log" 2>&1 || rc=$?
  grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb)|panicked|Test unit written' \
    "artifacts/$t.log" || true
  if [ "$rc" -ne 0 ]; then
    echo "fuzz target $t failed (exit $rc): see fuzz/artifacts/$t.log" >&2
    tail -40 "artifacts/$t.log" >&2
    exit "$rc"
  fi
done
