#!/usr/bin/env bash
# A soak: the kill loop of tests/kill_loop.rs (three real `tessera serve`
# processes, 8 clients recording a history, a random node SIGKILLed and
# restarted every 2 s) for as long as asked, then its report: operations,
# SIGKILLs, failed (indeterminate) operations, the linearizability checker's
# verdict and `verify` over every shard. Exits non-zero on any failure.
#
#   bash tools/soak.sh 600      # ten minutes
#
# The nemesis is SIGKILL only: partitions, netem and disk faults between
# real processes need network namespaces (not built yet).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:?usage: tools/soak.sh SECONDS}"
bash tools/setup.sh
source tools/rocksdb.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/tessera-target}"
start=$(date +%s)
set +e
TESSERA_KILL_LOOP_SECS="$secs" cargo test -p tessera --features failpoints \
  --test kill_loop -- --nocapture --test-threads=1 2>&1 |
  grep -E '^(kill loop|checker|verify):|^test |test result|panicked|not linearizable|differ'
status=${PIPESTATUS[0]}
set -e
echo "soak: ${secs} s of faults, $(( $(date +%s) - start )) s in all, exit ${status}"
exit "$status"
