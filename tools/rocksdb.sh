#!/usr/bin/env bash
# Sourced by tools/test.sh and tools/run-dev.sh: RocksDB's C++ is compiled at
# most once per machine, into a cache outside the clone, and every cargo
# profile (check, clippy, test, release, bench) links that one archive
# through librocksdb-sys's own switches (ROCKSDB_LIB_DIR, ROCKSDB_STATIC).
#
# The cache is keyed by the librocksdb-sys version pinned in Cargo.lock and
# the compression features Tessera uses (lz4), so a version bump builds a new
# archive by itself; a missing or half-written one is rebuilt. Set
# TESSERA_ROCKSDB_CACHE to move the cache, or ROCKSDB_COMPILE=1 to let cargo
# compile RocksDB per profile as it would by default.
#
# Meant to be sourced (it exports two variables); it changes no shell
# options of the caller, and returns non-zero when the build fails.
_tessera_rocksdb() {
  local root version features key cache lib
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [ "${ROCKSDB_COMPILE:-}" = "1" ]; then
    return 0
  fi
  version="$(awk '/^name = "librocksdb-sys"$/ {getline; gsub(/"/, "", $3); print $3; exit}' "$root/Cargo.lock")"
  [ -n "$version" ] || { echo "rocksdb: librocksdb-sys not found in Cargo.lock" >&2; return 1; }
  features="lz4"
  key="librocksdb-sys-${version}-${features}"
  cache="${TESSERA_ROCKSDB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera/rocksdb}/$key"
  lib="$cache/librocksdb.a"
  if [ ! -f "$cache/complete" ] || [ ! -f "$lib" ]; then
    echo "rocksdb: building RocksDB $version ($features) once for this machine into $cache" >&2
    local work start
    start=$(date +%s)
    work="$(mktemp -d)" || return 1
    mkdir -p "$work/src" && : >"$work/src/lib.rs" || return 1
    cat >"$work/Cargo.toml" <<TOML
[package]
name = "tessera-rocksdb-build"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
librocksdb-sys = { version = "=$version", default-features = false, features = ["$features", "bindgen-runtime"] }

# Optimised, symbols but no DWARF: every test binary links this archive,
# and debug info would make each link process over a gigabyte.
[profile.release]
opt-level = 2
debug = 0

[workspace]
TOML
    (cd "$work" && env -u ROCKSDB_LIB_DIR -u ROCKSDB_STATIC \
      CARGO_TARGET_DIR="$work/target" cargo build --release --quiet) || {
      echo "rocksdb: the build failed; its folder is kept at $work" >&2
      return 1
    }
    local built
    built="$(ls "$work"/target/release/build/librocksdb-sys-*/out/librocksdb.a 2>/dev/null | head -n1)"
    [ -n "$built" ] || { echo "rocksdb: no librocksdb.a in $work" >&2; return 1; }
    mkdir -p "$cache" && rm -f "$cache/complete" &&
      cp "$built" "$cache/librocksdb.a.tmp" &&
      mv "$cache/librocksdb.a.tmp" "$lib" || return 1
    printf 'librocksdb-sys %s, features %s, built %s in %ss\n' \
      "$version" "$features" "$(date -u +%FT%TZ)" "$(( $(date +%s) - start ))" >"$cache/complete"
    rm -rf "$work"
    echo "rocksdb: cached ($(cat "$cache/complete"))" >&2
  fi
  export ROCKSDB_LIB_DIR="$cache"
  export ROCKSDB_STATIC=1
}
_tessera_rocksdb || { echo "rocksdb: no cached RocksDB; see the messages above" >&2; return 1 2>/dev/null || exit 1; }
