#!/usr/bin/env bash
# The main job: a local Tessera on ./tessera-data, relative to the folder you
# run it from (see README). Extra arguments go to `tessera dev`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/tools/setup.sh"
source "$root/tools/rocksdb.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/tessera-target}"
exec cargo run --quiet --release --manifest-path "$root/Cargo.toml" --bin tessera -- dev "$@"
