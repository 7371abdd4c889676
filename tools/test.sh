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
# One test at a time inside each test binary: the cluster tests run hundreds
# to thousands of Raft groups each, and two of them sharing 2 cores starve
# each other's heartbeats into election storms.
cargo test --workspace --features tessera/failpoints -- --test-threads=1 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary, the
# last of which is often a doc-test binary with nothing in it).
awk '/^test result:/ {p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}' "$log"
rm -f "$log"
exit "$status"
