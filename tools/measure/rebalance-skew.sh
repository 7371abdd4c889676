#!/usr/bin/env bash
# Rebalancing under a skewed load, as a user would run it (issue 20):
#   3 nodes, 32 shards (`tessera dev`), hot shards split by load
#   ([split] load_ops_per_s), a write bench with 80% of the writes on 10% of
#   the key range, 2 nodes added and started, then `tessera-ctl rebalance`
#   while the bench runs.
# Prints the bench's per-interval throughput, p99 and errors (steady state
# before the rebalance, during it, after it), the rebalance summary, and
# per node: replicas, leaders and led load (reads + writes per second)
# against the mean.
#
# Usage: tools/measure/rebalance-skew.sh [BENCH_SECONDS] [CLIENTS]
# (release binaries in $CARGO_TARGET_DIR, default /var/tmp/tessera-target).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
secs="${1:-150}"
clients="${2:-16}"
source "$root/tools/rocksdb.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/tessera-target}"
cargo build --quiet --release --manifest-path "$root/Cargo.toml" --bin tessera --bin tessera-ctl
bin="$CARGO_TARGET_DIR/release"
dir="$(mktemp -d /tmp/tessera-rb.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
ctl() { "$bin/tessera-ctl" --cluster "$dir/cluster.toml" "$@"; }
ready() {
  for _ in $(seq 1 240); do
    grep -q "^ready" "$1" 2>/dev/null && return 0
    sleep 0.5
  done
  echo "not ready: $1" >&2
  tail -5 "$1" >&2
  return 1
}

# First start creates the folder; the second runs with hot-shard splits on.
"$bin/tessera" dev --data-dir "$dir" --shards 32 >"$dir/dev1.log" 2>&1 &
dev=$!
ready "$dir/dev1.log"
kill "$dev"
wait "$dev" || true
for f in "$dir"/node-*/node.toml; do
  if grep -q '^\[split\]' "$f"; then
    sed -i '/^\[split\]/a load_ops_per_s = 1500' "$f"
  else
    printf '\n[split]\nload_ops_per_s = 1500\ncheck_interval_ms = 2000\n' >>"$f"
  fi
done
"$bin/tessera" dev --data-dir "$dir" >"$dir/dev.log" 2>&1 &
pids+=($!)
ready "$dir/dev.log"
for n in 4 5; do
  "$bin/tessera" add-node --data-dir "$dir" >/dev/null
  "$bin/tessera" serve --config "$dir/node-$n/node.toml" >"$dir/node$n.log" 2>&1 &
  pids+=($!)
done
ctl status >/dev/null

echo "== bench: write, $clients clients, $secs s, --skew 80:10 (rebalance starts at 40 s)"
ctl bench --workload write --clients "$clients" --duration "$secs" --skew 80:10 \
  --report-every 5 >"$dir/bench.log" 2>&1 &
bench=$!
sleep 40
start=$(date +%s.%N)
ctl rebalance --max-concurrent-moves 2 >"$dir/rebalance.log" 2>&1 || true
end=$(date +%s.%N)
wait "$bench" || true
cat "$dir/bench.log"
echo "== rebalance (from 40 s, $(echo "$end - $start" | bc) s)"
tail -4 "$dir/rebalance.log"
echo "== per node after"
ctl status --json --all >"$dir/status.json"
python3 - "$dir/status.json" <<'EOF'
import json, sys
st = json.load(open(sys.argv[1]))
nodes = [n["id"] for n in st["nodes"] if n["up"]]
rows = {n: [0, 0, 0.0] for n in nodes}
for s in st["shards"]:
    for r in s["replicas"]:
        if r in rows:
            rows[r][0] += 1
    if s["leader"] in rows:
        rows[s["leader"]][1] += 1
        rows[s["leader"]][2] += s["reads_per_s"] + s["writes_per_s"]
mean = sum(r[2] for r in rows.values()) / max(1, len(rows))
for n, (reps, leaders, load) in sorted(rows.items()):
    dev = (load - mean) / mean * 100 if mean else 0
    print(f"n{n}: {reps} replicas, {leaders} leaders, led load {load:.0f}/s ({dev:+.0f}% of the mean)")
print(f"{len(st['shards'])} shards")
EOF
