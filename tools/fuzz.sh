#!/usr/bin/env bash
# Runs every cargo-fuzz target in tools/fuzz for SECONDS_PER_TARGET seconds
# (default 30); exits non-zero if any target finds a crash (panic, failed
# assertion, allocation over the frame limit, timeout, out of memory).
#
#   tools/fuzz.sh [SECONDS_PER_TARGET]
#
# Environment:
#   FUZZ_TARGET_DIR  cargo target dir (default /var/tmp/fuzz-target; kept out of
#                    the clone, the first build compiles RocksDB's C++)
#   FUZZ_TARGETS     space-separated subset of targets (default: all)
#   ROCKSDB_LIB_DIR + ROCKSDB_STATIC=1  link a prebuilt librocksdb.a instead
#                    of compiling it (librocksdb-sys's own switches)
#
# Crashing inputs land in tools/fuzz/artifacts/<target>/, the corpus in
# tools/fuzz/corpus/<target>/ (both git-ignored); reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -s none -a --target-dir "$FUZZ_TARGET_DIR" <target> <file>
set -uo pipefail

secs="${1:-30}"
case "$secs" in
    '' | *[!0-9]*) echo "usage: $0 [SECONDS_PER_TARGET]" >&2; exit 2 ;;
esac
here="$(cd "$(dirname "$0")" && pwd)"
fuzz_dir="$here/fuzz"
target_dir="${FUZZ_TARGET_DIR:-/var/tmp/fuzz-target}"
logs="$target_dir/fuzz-logs"
# cargo-fuzz passes nightly-only flags (-Z, sanitizer coverage); the stable
# toolchain accepts them with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    nice -n 19 cargo install cargo-fuzz --locked || exit 2
fi

cd "$fuzz_dir" || exit 2
# No sanitizer: the targets are safe Rust over an uninstrumented RocksDB; the
# global allocator of each target enforces the allocation limit instead.
# Debug assertions (and overflow checks) on.
flags=(-s none -a --target-dir "$target_dir")
echo "== building fuzz targets (target dir $target_dir)"
nice -n 19 cargo fuzz build "${flags[@]}" || exit 2

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
mkdir -p "$logs"
failed=()
for t in $targets; do
    echo "== $t: ${secs}s"
    mkdir -p "corpus/$t" "artifacts/$t"
    # New inputs go to corpus/ (git-ignored); seeds/ (committed) only seeds.
    dirs=("corpus/$t")
    [ -d "seeds/$t" ] && dirs+=("seeds/$t")
    nice -n 19 cargo fuzz run "${flags[@]}" "$t" "${dirs[@]}" -- \
        -max_total_time="$secs" -timeout=60 -rss_limit_mb=4096 \
        -print_final_stats=1 >"$logs/$t.log" 2>&1
    rc=$?
    # libFuzzer's last coverage line and its final stats.
    grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE)' "$logs/$t.log" | tail -n 1
    grep -E '^(Done [0-9]+ runs|stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb))' "$logs/$t.log"
    if [ "$rc" -ne 0 ]; then
        echo "!! $t failed (exit $rc); log: $logs/$t.log"
        grep -E 'panicked at|==tessera-fuzz==|ERROR: libFuzzer|SUMMARY|Test unit written' "$logs/$t.log" | head -n 10
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "== FAILED: ${failed[*]}"
    exit 1
fi
echo "== all targets ran ${secs}s without a crash"
