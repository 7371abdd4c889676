#!/usr/bin/env bash
# Needs etcd (tools/setup.sh installs it) and two folders of release
# binaries (tessera, tessera-ctl), e.g. copies of target/release from two
# commits.
# Usage: tools/measure/side-by-side.sh BEFORE_DIR AFTER_DIR [tessera dev flags...]
# One run of every row of the write-path table: for 1, 64 and 256 clients,
# etcd (3 members, tools/etcd-cluster.sh; CPU from /proc/PID/stat of the
# members), then BEFORE and AFTER at 64 shards (tools/measure/write-cost.sh);
# then one shard at 64 clients and two more pairs at 64 shards, 64 clients,
# alternating. Each row prints write-cost.sh's summary line (writes/s, p50,
# cluster CPU µs per write, UDP datagrams per write) and bench's cost line
# (appends per sync). The machine should be otherwise quiet.
# BENCH_FLAGS='...' adds flags to every bench, etcd's and Tessera's alike
# (e.g. --connections 1: the clients share one connection set).
# WARMUP=SECONDS runs each target's bench that long, unmeasured, before
# the measured run (a target in steady state rather than fresh).
# SHORT=1 runs only etcd and AFTER at 64 shards, 64 and 256 clients.
# Example: tools/measure/side-by-side.sh /var/tmp/old /var/tmp/new --batch-data-shards
set -u
here=$(dirname "$0")
before=${1:?usage: side-by-side.sh BEFORE_DIR AFTER_DIR [dev flags...]}
after=${2:?usage: side-by-side.sh BEFORE_DIR AFTER_DIR [dev flags...]}
shift 2
flags=("$@")
D=${DURATION:-12}
run() { # label dir shards clients
  local out
  out=$(DURATION=$D BIN=$2 "$here/write-cost.sh" "$3" "$4" "${flags[@]}" 2>&1)
  echo "$1 $(echo "$out" | grep '^summary')"
  echo "$out" | grep '^cost' | sed "s/^/    $1 /"
}
etcd() { # clients
  local dir pids ep out t0 t1 n
  dir=$(mktemp -d /var/tmp/tessera-etcd.XXXX)
  ep=$(bash "$here/../etcd-cluster.sh" start "$dir" | tail -1)
  pids=$(pgrep -f "etcd --name m[123] " | tr '\n' ' ')
  cpu_all() { local t=0 p; for p in $pids; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
  if [ "${WARMUP:-0}" -gt 0 ]; then
    "$after/tessera-ctl" bench --workload write --clients "$1" --duration "$WARMUP" --target etcd \
      --endpoints "$ep" ${BENCH_FLAGS:-} > /dev/null 2>&1
  fi
  t0=$(cpu_all)
  out=$("$after/tessera-ctl" bench --workload write --clients "$1" --duration "$D" --target etcd --endpoints "$ep" ${BENCH_FLAGS:-} 2>&1)
  t1=$(cpu_all)
  n=$(echo "$out" | awk '/^p50 / {gsub(/\(/, "", $10); print $10; exit}')
  echo "etcd clients=$1 ops_s=$(echo "$out" | awk '/ ops\/s$/ && !/^at / {print $1; exit}')" \
    "p50='$(echo "$out" | awk '/^p50 / {print $2, $3; exit}')'" \
    "cpu_us_per_write=$(( (t1 - t0) * 1000000 / $(getconf CLK_TCK) / ${n:-1} ))"
  bash "$here/../etcd-cluster.sh" stop "$dir" > /dev/null 2>&1
  rm -rf "$dir"
}
if [ "${SHORT:-0}" = 1 ]; then
  for c in 64 256; do
    etcd "$c"
    run after "$after" 64 "$c"
  done
  exit 0
fi
for c in 1 64 256; do
  etcd "$c"
  run before "$before" 64 "$c"
  run after "$after" 64 "$c"
done
run before "$before" 1 64
run after "$after" 1 64
run after "$after" 64 64
run before "$before" 64 64
run before "$before" 64 64
run after "$after" 64 64
