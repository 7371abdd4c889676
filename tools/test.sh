#!/usr/bin/env bash
# The whole test gate: setup, format check, clippy (warnings are errors), and
# every test of the workspace, failpoint tests included.
#
# Builds go to $CARGO_TARGET_DIR (default: /var/tmp/tessera-target, outside
# the clone, so repeated runs reuse the RocksDB build; a cold run also works).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/tessera-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --features tessera/failpoints -- -D warnings
echo "== cargo test"
cargo test --workspace --features tessera/failpoints
