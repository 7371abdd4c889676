#!/usr/bin/env bash
# Needs a release build of tessera: cargo build --release --bin tessera
# Usage: tools/measure/idle.sh SHARDS [tessera dev flags...]
# (e.g. --batch-data-shards; BIN=DIR takes the binary from DIR)
# A fresh `tessera dev --shards SHARDS` (3 nodes in one process) with
# quiescence on (QUIESCE ms, default 3000; 0 turns it off; DORMANT ms:
# --dormant-after-ms, default the node default): seconds from
# launch to `ready`, then after SETTLE s (default 30) over WINDOW s (default
# 30): whole-process CPU (% of one core, /proc/PID/stat), UDP datagrams sent
# per second by the machine (/proc/net/snmp; all 6 directed node pairs), RSS
# and RSS per replica (3 per shard), and how long SIGTERM takes to stop it.
set -u
source "$(dirname "$0")/dev-common.sh"
shards=${1:?usage: idle.sh SHARDS [dev flags...]}
shift
T="${BIN:-${CARGO_TARGET_DIR:-/var/tmp/tessera-target}/release}"
dir=$(mktemp -d /var/tmp/tessera-idle.XXXX)
start=$(date +%s.%N)
$T/tessera dev --data-dir "$dir" --shards "$shards" --quiesce-after-ms "${QUIESCE:-3000}" ${DORMANT:+--dormant-after-ms "$DORMANT"} "$@" > "$dir/log" 2>&1 &
pid=$!
wait_ready $pid "$dir"
ready=$(date +%s.%N)
sleep "${SETTLE:-30}"
W=${WINDOW:-30}
u0=$(udp); t0=$(cpu $pid)
sleep "$W"
u1=$(udp); t1=$(cpu $pid)
rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
echo "shards=$shards ready_s=$(echo "$ready - $start" | bc | cut -c1-5)" \
  "cpu_pct_of_core=$(echo "scale=1; ($t1 - $t0) / $W" | bc)" \
  "udp_out_per_s=$(( (u1 - u0) / W ))" \
  "rss_mib=$((rss / 1024)) per_replica_kib=$((rss / (shards * 3)))"
t=$(date +%s.%N)
stop_dev $pid
echo "stopped_after_sigterm_s=$(echo "$(date +%s.%N) - $t" | bc | cut -c1-4)"
remove_dev $pid "$dir"
