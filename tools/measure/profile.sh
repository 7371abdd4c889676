#!/usr/bin/env bash
# Needs `perf` and release builds of tessera and tessera-ctl:
#   cargo build --release --bins --workspace
# Usage: tools/measure/profile.sh SHARDS CLIENTS OUT [tessera dev flags...]
# A fresh `tessera dev --shards SHARDS` under `tessera-ctl bench --workload
# write --clients CLIENTS` (16 s); after 4 s, `perf record --call-graph
# dwarf` samples the dev process for 5 s. Writes to OUT:
#   perf.data      the samples (open with `perf report -i OUT/perf.data`)
#   bench.txt      the bench's output (throughput and cost lines)
#   threads.txt    share of samples per thread (Raft loops, Tokio workers)
#   self.txt       self time per symbol
#   children.txt   inclusive time per symbol
#   per-write.txt  inclusive CPU µs per acknowledged write of the main
#                  stages (samples' event count over the bench's writes in
#                  the sampled 5 s, estimated from its throughput)
# BIN=DIR takes the binaries from DIR instead of the release target folder.
# BENCH_FLAGS='...' adds flags to the bench (e.g. --connections 1).
# Example: tools/measure/profile.sh 64 64 /var/tmp/prof --batch-data-shards
set -u
source "$(dirname "$0")/dev-common.sh"
shards=${1:?usage: profile.sh SHARDS CLIENTS OUT [dev flags...]}
clients=${2:?usage: profile.sh SHARDS CLIENTS OUT [dev flags...]}
out=${3:?usage: profile.sh SHARDS CLIENTS OUT [dev flags...]}
shift 3
B="${BIN:-${CARGO_TARGET_DIR:-/var/tmp/tessera-target}/release}"
mkdir -p "$out"
start_dev profile "$B" "$shards" "$@"
"$B/tessera-ctl" --cluster "$dir/data/cluster.toml" bench --workload write \
  --clients "$clients" --duration 16 ${BENCH_FLAGS:-} > "$out/bench.txt" 2>&1 &
bench=$!
sleep 4
perf record -F 499 --call-graph dwarf,16384 -p "$pid" -o "$out/perf.data" -- sleep 5 > /dev/null 2>&1
wait $bench
stop_dev $pid
remove_dev $pid "$dir"
grep -v '^at ' "$out/bench.txt"
report() { perf report -i "$out/perf.data" --stdio -g none "$@" 2>/dev/null | grep -E '^ +[0-9]' | cut -c1-200; }
report --no-children --sort comm > "$out/threads.txt"
report --no-children --sort dso,symbol > "$out/self.txt"
report --children --sort symbol > "$out/children.txt"
events=$(perf report -i "$out/perf.data" --stdio -g none 2>/dev/null | awk '/Event count/ {print $NF; exit}')
ops=$(awk '/ ops\/s$/ && !/^at / {print $1; exit}' "$out/bench.txt")
{
  echo "CPU µs per write (inclusive; $ops writes/s over the 5 s sampled)"
  for sym in 'tessera::multiraft::runtime::run' \
    'ShardApplier as tessera::multiraft::runtime::Applier>::apply' \
    'rocksdb::MemTable::Add' 'Engine::write_synced' '__x64_sys_fdatasync' \
    'Driver::step' 'ConnectionDriver as core::future::future::Future>::poll' \
    '__libc_sendmsg' 'finish_task_switch' 'SessionTable::record' 'SessionTable::verdict'; do
    pct=$(grep -F "$sym" "$out/children.txt" | head -1 | awk '{print $1}' | tr -d %)
    awk -v p="${pct:-0}" -v e="$events" -v o="${ops:-0}" -v s="$sym" \
      'BEGIN { if (o > 0) printf "%8.1f  %s\n", p * e / 100 / (o * 5) / 1000, s }'
  done
} > "$out/per-write.txt"
echo "== threads"; head -6 "$out/threads.txt"
echo "== top self symbols"; head -10 "$out/self.txt"
cat "$out/per-write.txt"
