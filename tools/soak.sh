#!/usr/bin/env bash
# A soak: tests/network_faults.rs for as long as asked. Five real `tessera
# serve` processes, each in its own network namespace; 8 clients recording
# put, get, delete and CAS; a nemesis making every kind of fault in turn
# (partitions of five shapes, packet loss, duplication, delay with
# reordering, SIGKILL, slow and failing disks, and pairs of a network and a
# process fault) while splits, replica moves and leader transfers run. Then
# its report: operations, faults by kind, admin commands, client errors by
# kind, the linearizability checker's verdict and `verify` over every shard.
# Exits non-zero on any failure. Needs root (network namespaces).
#
#   bash tools/soak.sh 600      # ten minutes
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:?usage: tools/soak.sh SECONDS}"
bash tools/setup.sh
source tools/rocksdb.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/tessera-target}"
start=$(date +%s)
set +e
log="${SOAK_LOG:-/tmp/tessera-soak.log}"
# Every node's log (info level), to read a failure against the timeline.
nodelogs="${TESSERA_NODE_LOG_DIR:-/tmp/tessera-soak-nodes}"
rm -rf "$nodelogs" && mkdir -p "$nodelogs"
echo "soak: full output in $log, node logs in $nodelogs"
TESSERA_NODE_LOG_DIR="$nodelogs" TESSERA_SOAK_SECS="$secs" RUST_BACKTRACE=0 cargo test -p tessera --features failpoints \
  --test network_faults -- --nocapture --test-threads=1 five_nodes 2>&1 | tee "$log" |
  grep -E '^(network faults|faults|admin|client errors|checker|verify):|test five_nodes|^test result|panicked|not linearizable|differ|^history of|^  |^final read|is in Some|^timeline zero'
status=${PIPESTATUS[0]}
set -e
echo "soak: ${secs} s asked, $(( $(date +%s) - start )) s in all, exit ${status}"
exit "$status"
