#!/usr/bin/env bash
# The whole test gate: setup, format check, clippy (warnings are errors), and
# every test of the workspace, failpoint tests included.
#
# Builds go to $CARGO_TARGET_DIR (default: /var/tmp/tessera-target, outside
# the clone, so repeated runs reuse the RocksDB build; a cold run also works).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
# RocksDB's C++ once per machine, linked by every profile below.
source tools/rocksdb.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/tessera-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --features tessera/failpoints -- -D warnings
echo "== cargo test"
log="$(mktemp)"
set +e
# Tests of one binary run in parallel (cargo's default, one per core).
# Pre-vote keeps two cluster tests sharing 2 cores from starting election
# storms; the network-namespace lab is one per machine, and its tests take
# turns with it (tests/common/netns.rs).
cargo test --workspace --no-fail-fast --features tessera/failpoints 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary, the
# last of which is often a doc-test binary with nothing in it).
awk '/^test result:/ {p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}' "$log"
rm -f "$log"
exit "$status"
