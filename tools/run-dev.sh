#!/usr/bin/env bash
# The main job: a local Tessera on ./tessera-data (see README). Extra
# arguments go to `tessera dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/tessera-target}"
exec cargo run --release --bin tessera -- dev "$@"
