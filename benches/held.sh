# Sourced by the scripts that measure one path held by `capmesh-bench hold` (split.sh,
# percall.sh, providers.sh): a work directory, the processes started (`pids`, stopped by `stop` and on exit),
# the echo upstream on 127.0.0.1:19090 pinned to CPU 1, and a line naming the machine.
#
#   held_setup BIN [NOTE]   BIN is the capmesh-bench to run; NOTE ends the machine line
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
