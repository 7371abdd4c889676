#!/usr/bin/env bash
# Needs release builds of tessera and tessera-ctl: cargo build --release --workspace --bins
# Writes with and without client sessions, side by side, 64 shards.
set -u
T="${CARGO_TARGET_DIR:-/var/tmp/tessera-target}/release"
D=/tmp/bench-meas; rm -rf $D; mkdir -p $D; cd $D
$T/tessera dev --data-dir $D/data --shards 64 > $D/dev.out 2> $D/dev.err &
DEV=$!
for i in $(seq 1 120); do grep -q ready $D/dev.out && break; sleep 1; done
cat $D/dev.out
C="--cluster $D/data/cluster.toml"
# Each order once: whichever runs first on a fresh cluster is slowest.
for order in "exactly-once at-least-once" "at-least-once exactly-once"; do
  for mode in $order; do
    flag=""
    [ "$mode" = at-least-once ] && flag="--at-least-once"
    echo "== $mode"
    $T/tessera-ctl $C bench --workload write --clients 64 --duration 10 $flag 2>&1 | tail -5
  done
done
kill -TERM $DEV; wait $DEV
