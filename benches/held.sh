# Sourced by the scripts that measure one path held by `capmesh-bench hold` (split.sh,
# percall.sh, providers.sh, instructions.sh): a work directory, the processes started (`pids`,
# stopped by `stop` and on exit), the echo upstream on 127.0.0.1:19090 pinned to CPU 1, and a
# line naming the machine.
#
#   held_binaries SCRIPT DIR TOOL...   checks that each TOOL is installed and that DIR holds
#                                      the release binaries (built from the working tree when
#                                      DIR is empty); sets `dir`
#   held_setup BIN [NOTE]              BIN is the capmesh-bench to run; NOTE ends the machine line
work=$(mktemp -d)
pids=()
echo_pid=
stop() {
  [ ${#pids[@]} -eq 0 ] && return
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  pids=()
}
trap 'stop; [ -z "$echo_pid" ] || kill "$echo_pid" 2>/dev/null; rm -rf "$work"' EXIT
held_setup() {
  echo "== $(nproc) CPUs, $(free -g | awk '/Mem:/{print $2}') GiB, load average $(cut -d' ' -f1-3 /proc/loadavg), main at $(git rev-parse --short HEAD)${2:-}"
  export RUST_LOG=warn TOKIO_WORKER_THREADS=1
  taskset -c 1 "$1" echo --listen 127.0.0.1:19090 >"$work/echo.log" 2>&1 &
  echo_pid=$!
}
held_binaries() {
  local script=$1 tool b
  dir=$2
  shift 2
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "$script: needs $tool" >&2; exit 2; }
  done
  if [ -z "$dir" ]; then
    echo "== build (release)"
    cargo build --release -q -p capmesh-proxy -p capmesh-control-plane -p capmesh-bench
    dir=$PWD/target/release
  fi
  for b in capmesh-bench capmesh-control-plane capmesh-proxy; do
    [ -x "$dir/$b" ] || { echo "$script: $dir/$b is missing" >&2; exit 2; }
  done
}
