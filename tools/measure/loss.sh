#!/usr/bin/env bash
# Needs root, nftables and release builds of tessera and tessera-ctl.
# Usage: tools/measure/loss.sh LOSS_PER_MILLE
# Head-of-line blocking under packet loss: `write-cost.sh 64 64
# --batch-data-shards` in a fresh network namespace whose loopback drops
# LOSS_PER_MILLE of every 1,000 UDP packets it sends (nftables `numgen
# random`: client requests, answers and Raft frames alike), alternately
# with the clients sharing one connection set (`--connections 1`: their
# requests share each node's multiplexed stream, where one lost packet
# holds up every request behind it) and with a connection per client
# (`--connections 64`: a request per stream, one in flight per
# connection), two runs each. BIN=DIR as in write-cost.sh.
set -u
ns=tessera-loss
ip netns del $ns 2>/dev/null
ip netns add $ns
ip netns exec $ns ip link set lo up
if [ "$1" -gt 0 ]; then
ip netns exec $ns nft -f - <<NFT
table inet hol {
  chain out { type filter hook output priority 0; meta l4proto udp numgen random mod 1000 < $1 drop; }
}
NFT
fi
cd "$(dirname "$0")/../.."
for flags in "--connections 1" "--connections 64" "--connections 1" "--connections 64"; do
  echo "== loss=$1/1000 $flags"
  BENCH_FLAGS="$flags" BIN="${BIN:-}" ip netns exec $ns bash tools/measure/write-cost.sh 64 64 --batch-data-shards 2>&1 | grep -E "^p50|summary"
done
ip netns del $ns
