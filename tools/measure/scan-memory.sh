#!/usr/bin/env bash
# Needs release builds of tessera and tessera-ctl: cargo build --release --workspace --bins
# 200+ MiB of 1 MiB values in a fresh dev cluster, then tessera-ctl scan of
# all of it: max RSS of tessera-ctl, RSS of the dev process (3 nodes) before
# and at its peak during the scan.
set -u
T="${CARGO_TARGET_DIR:-/var/tmp/tessera-target}/release"
D=/tmp/scan-meas; rm -rf $D; mkdir -p $D; cd $D
$T/tessera dev --data-dir $D/data --shards 16 > $D/dev.out 2> $D/dev.err &
DEV=$!
for i in $(seq 1 120); do grep -q ready $D/dev.out && break; sleep 1; done
cat $D/dev.out
C="--cluster $D/data/cluster.toml"
# 240 distinct keys, 1 MiB values: at least 240 MiB live once every key is written.
$T/tessera-ctl $C bench --workload write --keys 240 --value-size 1048576 --clients 8 --duration 15 2>&1 | tail -4
rss() { awk '/VmRSS/ {print $2}' /proc/$DEV/status; }
echo "dev RSS before scan: $(rss) KiB"
peak=0
( while kill -0 $DEV 2>/dev/null; do r=$(rss); [ "$r" -gt "$peak" ] && peak=$r && echo $peak > $D/peak; sleep 0.2; done ) &
SAMPLER=$!
/usr/bin/time -v $T/tessera-ctl $C scan --limit 1000000 > $D/scan.out 2> $D/time.err
echo "scan exit $?; pairs: $(wc -l < $D/scan.out); bytes printed: $(wc -c < $D/scan.out)"
grep -E "Maximum resident|Elapsed" $D/time.err
kill $SAMPLER 2>/dev/null
echo "dev RSS peak during scan: $(cat $D/peak) KiB; after: $(rss) KiB"
$T/tessera-ctl $C status | tail -3
kill -TERM $DEV; wait $DEV
