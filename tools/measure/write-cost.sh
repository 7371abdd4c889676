#!/usr/bin/env bash
# Needs release builds of tessera and tessera-ctl:
#   cargo build --release --bins --workspace
# Usage: tools/measure/write-cost.sh SHARDS CLIENTS [tessera dev flags...]
# A fresh `tessera dev --shards SHARDS` (3 nodes in one process), then
# `tessera-ctl bench --workload write --clients CLIENTS --duration DURATION`
# (default 12 s) against it. Prints bench's throughput, latency and cost
# lines (appends per sync, Raft messages per frame, cluster CPU per write),
# then one summary line: writes/s, p50, cluster CPU µs per write from
# /proc/PID/stat, UDP datagrams sent per write from /proc/net/snmp (the
# machine's counter: keep the machine otherwise quiet), and the load
# generator's own CPU µs per write (its user + system time, whole run). BIN=DIR takes the
# binaries from DIR instead of the release target folder, to compare builds
# side by side (copy each build's binaries to its own folder).
# BENCH_FLAGS='...' adds flags to the bench command (e.g. --connections 4).
# WARMUP=SECONDS first runs the same bench that long, unmeasured, so the
# measured run sees a node in steady state (memtables full and flushing,
# WAL files rotating) rather than a fresh one.
# CSW=1 (needs `perf`) also counts the nodes' context switches per write.
# UDP_SPLIT=1 (needs `perf` and the syscall tracepoints) also counts the
# sendmsg calls of the nodes and of the load generator apart, per write:
# the machine-wide datagram count includes the clients' own requests,
# responses and QUIC acknowledgements (one sendmsg is one datagram unless
# quinn batches several with GSO).
set -u
source "$(dirname "$0")/dev-common.sh"
shards=${1:?usage: write-cost.sh SHARDS CLIENTS [dev flags...]}
clients=${2:?usage: write-cost.sh SHARDS CLIENTS [dev flags...]}
shift 2
B="${BIN:-${CARGO_TARGET_DIR:-/var/tmp/tessera-target}/release}"
D=${DURATION:-12}
start_dev write "$B" "$shards" "$@"
hz=$(getconf CLK_TCK)
split=${UDP_SPLIT:-0}
trace=()
if [ "${CSW:-0}" = 1 ]; then
  perf stat -x, -e context-switches -p "$pid" -o "$dir/csw.stat" 2>/dev/null &
  csw_perf=$!
fi
if [ "$split" = 1 ]; then
  ev=syscalls:sys_enter_sendmsg,syscalls:sys_enter_sendmmsg
  perf stat -x, -e "$ev" -p "$pid" -o "$dir/node.stat" 2>/dev/null &
  nodes_perf=$!
  trace=(perf stat -x, -e "$ev" -o "$dir/bench.stat" --)
fi
if [ "${WARMUP:-0}" -gt 0 ]; then
  "$B/tessera-ctl" --cluster "$dir/data/cluster.toml" bench --workload write \
    --clients "$clients" --duration "$WARMUP" ${BENCH_FLAGS:-} > "$dir/warmup.txt" 2>&1
fi
u0=$(udp); t0=$(cpu $pid)
TIMEFORMAT='%3U %3S'
out=$( { time "${trace[@]}" "$B/tessera-ctl" --cluster "$dir/data/cluster.toml" bench --workload write \
  --clients "$clients" --duration "$D" ${BENCH_FLAGS:-} 2>&1; } 2>"$dir/ctl.time")
u1=$(udp); t1=$(cpu $pid)
if [ "$split" = 1 ]; then
  kill -INT "$nodes_perf"; wait "$nodes_perf" 2>/dev/null
fi
if [ "${CSW:-0}" = 1 ]; then
  kill -INT "$csw_perf"; wait "$csw_perf" 2>/dev/null
fi
echo "$out" | grep -v '^at '
ops=$(echo "$out" | awk '/ ops\/s$/ && !/^at / {print $1; exit}')
writes=$(echo "$out" | awk '/^p50 / {gsub(/\(/, "", $10); print $10; exit}')
p50=$(echo "$out" | awk '/^p50 / {print $2, $3; exit}')
if [ "${writes:-0}" -gt 0 ]; then
  echo "summary: shards=$shards clients=$clients flags='$*' ops_s=$ops p50='$p50'" \
    "cpu_us_per_write=$(( (t1 - t0) * 1000000 / hz / writes ))" \
    "udp_per_write=$(echo "scale=2; ($u1 - $u0) / $writes" | bc)" \
    "loadgen_cpu_us_per_write=$(awk -v w="$writes" '{printf "%d", ($1 + $2) * 1000000 / w}' "$dir/ctl.time")"
  if [ "${CSW:-0}" = 1 ]; then
    ev() { awk -F, -v e="$1" '$3 == e {print $1 + 0; exit}' "$dir/csw.stat"; }
    echo "context switches per write (nodes): $(echo "scale=2; $(ev context-switches) / $writes" | bc)"
  fi
  if [ "$split" = 1 ]; then
    calls() { awk -F, '/syscalls:sys_enter_sendm/ {n += $1} END {print n + 0}' "$1"; }
    echo "udp split: sendmsg per write: nodes $(echo "scale=2; $(calls "$dir/node.stat") / $writes" | bc)," \
      "load generator $(echo "scale=2; $(calls "$dir/bench.stat") / $writes" | bc)"
  fi
else
  echo "summary: no writes"; echo "$out" | tail -5
fi
stop_dev $pid
remove_dev $pid "$dir"
