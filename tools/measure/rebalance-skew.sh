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
# Environment: SHARDS (default 32), SKEW (OPS:RANGE, default 80:10; `none`
# for a uniform load), SPLIT_OPS (the nodes' [split] load_ops_per_s,
# default 300; 0: no load splits), MOVES (--max-concurrent-moves, default 2).
# Release binaries go to $CARGO_TARGET_DIR (default /var/tmp/tessera-target).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
secs="${1:-150}"
clients="${2:-16}"
source "$root/tools/rocksdb.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/tessera-target}"
cargo build --quiet --release --manifest-path "$root/Cargo.toml" -p tessera -p tessera-tools
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
shards="${SHARDS:-32}"
skew="${SKEW:-80:10}"
moves="${MOVES:-2}"
skew_args=()
[ "$skew" = none ] || skew_args=(--skew "$skew")
"$bin/tessera" dev --data-dir "$dir" --shards "$shards" >"$dir/dev1.log" 2>&1 &
dev=$!
ready "$dir/dev1.log"
kill "$dev"
wait "$dev" || true
for f in "$dir"/node-*/node.toml; do
  ops="${SPLIT_OPS:-300}"
  sed -i "/^\\[split\\]/,/^\\[/{s/^load_ops_per_s = .*/load_ops_per_s = $ops/;s/^check_interval_ms = .*/check_interval_ms = 2000/}" "$f"
  grep -q "^load_ops_per_s = ${SPLIT_OPS:-300}" "$f" || { echo "could not set [split] load_ops_per_s in $f" >&2; exit 1; }
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

echo "== $shards shards; bench: write, $clients clients, $secs s, skew $skew; rebalance (--max-concurrent-moves $moves) from 40 s"
ctl bench --workload write --clients "$clients" --duration "$secs" "${skew_args[@]}" \
  --report-every 5 >"$dir/bench.log" 2>&1 &
bench=$!
sleep 40
# Balancing keeps going (loads change as hot shards split) until the bench
# ends; the first pass is the 3 -> 5 rebalance.
ctl rebalance --max-concurrent-moves "$moves" --watch 10 >"$dir/rebalance.log" 2>&1 &
rb=$!
wait "$bench" || true
# The loads as the bench ends (they decay over about 10 s).
ctl status --json --all >"$dir/status.json"
# What the planner would still do with the loads as they were then.
ctl rebalance --dry-run >"$dir/dry-run.log" 2>&1 || true
# (A background job ignores SIGINT.)
kill -TERM "$rb" 2>/dev/null || true
wait "$rb" || true
cat "$dir/bench.log"
python3 - "$dir/bench.log" <<'EOF'
import re, sys
rows = [tuple(map(float, m.groups())) for m in
        re.finditer(r"at (\d+) s: .*? p99 ([\d.]+) ms, max [\d.]+ ms, (\d+) errors", open(sys.argv[1]).read())]
steady = sorted(p for t, p, e in rows if t <= 40)
during = [p for t, p, e in rows if 40 < t <= 70]
if steady and during:
    med = steady[len(steady) // 2]
    print(f"steady p99 (median of 5 s intervals up to 40 s) {med:.2f} ms; worst 5 s p99 in the 30 s after the rebalance started {max(during):.2f} ms ({max(during) / med:.1f}x)")
EOF
echo "== rebalance passes that did something"
grep -E "^balanced:|^stopped|^interrupted" "$dir/rebalance.log" | grep -v "^balanced: 0 moves, 0 leader" || true
echo "== per node as the bench ended"
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
# The meta shard's replicas and leadership count like any other's.
meta = st.get("meta") or {}
for r in meta.get("replicas", []):
    if r in rows:
        rows[r][0] += 1
if meta.get("leader") in rows:
    rows[meta["leader"]][1] += 1
mean = sum(r[2] for r in rows.values()) / max(1, len(rows))
mean_reps = sum(r[0] for r in rows.values()) / max(1, len(rows))
for n, (reps, leaders, load) in sorted(rows.items()):
    dev = (load - mean) / mean * 100 if mean else 0
    print(f"n{n}: {reps} replicas ({reps - mean_reps:+.1f} from the mean), {leaders} leaders, led load {load:.0f}/s ({dev:+.0f}% of the mean)")
print(f"{len(st['shards'])} shards and the meta shard")
EOF
echo "== the planner as the bench ended (rebalance --dry-run)"
tail -n 12 "$dir/dry-run.log"
