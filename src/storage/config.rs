//! Storage configuration, validated once at open.

use crate::limits::FRAME_BYTES_MAX;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// How the log writer turns appends into syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CommitMode {
    /// Gather every queued request (all shards) into one write and one sync.
    #[default]
    GroupCommit,
    /// One write and one sync per request: the baseline group commit is
    /// measured against. Correct, but slow.
    SyncPerWrite,
}

/// Upper bound of [`StorageConfig::group_commit_linger_us`]: 100 ms.
pub const GROUP_COMMIT_LINGER_US_MAX: u64 = 100_000;

/// Storage settings for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Folder holding the RocksDB database (`db/`) and snapshot files
    /// (`snapshots/`). Created if missing. Default: `./tessera-data`.
    pub data_dir: PathBuf,
    /// Requests the log writer queue holds before appenders wait.
    /// Default: 4096. Minimum: 1.
    pub write_queue_max: usize,
    /// Requests gathered into one write and one sync.
    /// Default: 1024. Minimum: 1.
    pub write_group_requests_max: usize,
    /// Bytes gathered into one write and one sync (a single larger request
    /// still goes alone). Default: 16 MiB. Minimum: 4 KiB.
    pub write_group_bytes_max: usize,
    /// Group commit or a sync per request. Default: `group-commit`.
    pub commit_mode: CommitMode,
    /// Longest the log writer holds a sync back to gather more appends, in
    /// microseconds. It waits only while at least 8 more shards have writes
    /// in progress on the node (client writes led here, replicated appends
    /// received) than the group holds, in 500 µs slices, and stops at the
    /// first slice that brings nothing. Under load across many shards this
    /// trades a little latency for several times fewer syncs; a few busy
    /// shards never wait. 0 turns it off.
    /// Default: 1500. Maximum: 100000.
    pub group_commit_linger_us: u64,
    /// Key/value bytes per snapshot chunk (one frame in a snapshot file, one
    /// write batch at install). Default: 1 MiB. Minimum: 4 KiB. Maximum: 8 MiB.
    pub snapshot_chunk_bytes_max: usize,
    /// RocksDB block cache shared by all column families. Default: 256 MiB.
    pub block_cache_bytes: usize,
    /// Memtable size of the user data column family (RocksDB's
    /// `write_buffer_size`). Every applied write inserts into a skip list
    /// of this size, and a smaller one is cheaper to search: the apply of
    /// a round of 64 session writes measured 498 µs of CPU at RocksDB's
    /// 64 MiB, 311 µs at 16 MiB with `meta_memtable_bytes` at 2 MiB
    /// (`cargo bench --bench multiraft -- apply_round`, flushes and
    /// compactions included). Larger trades insert CPU for fewer flushes.
    /// Default: 16 MiB. Minimum: 1 MiB. Maximum: 1 GiB.
    pub data_memtable_bytes: usize,
    /// Memtable size of `shard_meta` (applied positions, descriptors,
    /// client session rows: small records rewritten on every apply, so
    /// little survives a flush). Default: 2 MiB. Minimum: 256 KiB.
    /// Maximum: 256 MiB.
    pub meta_memtable_bytes: usize,
}

/// Bounds of [`StorageConfig::data_memtable_bytes`].
pub const DATA_MEMTABLE_BYTES: std::ops::RangeInclusive<usize> = (1 << 20)..=(1 << 30);
/// Bounds of [`StorageConfig::meta_memtable_bytes`].
pub const META_MEMTABLE_BYTES: std::ops::RangeInclusive<usize> = (256 << 10)..=(256 << 20);

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("./tessera-data"),
            write_queue_max: 4096,
            write_group_requests_max: 1024,
            write_group_bytes_max: 16 << 20,
            commit_mode: CommitMode::GroupCommit,
            group_commit_linger_us: 1500,
            snapshot_chunk_bytes_max: 1 << 20,
            block_cache_bytes: 256 << 20,
            data_memtable_bytes: 16 << 20,
            meta_memtable_bytes: 2 << 20,
        }
    }
}

/// A configuration field outside its allowed values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid storage config `{field}`: {reason}")]
pub struct ConfigError {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl StorageConfig {
    /// Defaults with the given data folder.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        StorageConfig {
            data_dir: data_dir.into(),
            ..Default::default()
        }
    }

    /// Checks every field once; errors name the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn min(field: &'static str, v: usize, m: usize) -> Result<(), ConfigError> {
            if v < m {
                return Err(ConfigError {
                    field,
                    reason: format!("{v} is below the minimum {m}"),
                });
            }
            Ok(())
        }
        fn max(field: &'static str, v: u64, m: u64) -> Result<(), ConfigError> {
            if v > m {
                return Err(ConfigError {
                    field,
                    reason: format!("{v} exceeds the maximum {m}"),
                });
            }
            Ok(())
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError {
                field: "data_dir",
                reason: "must not be empty".into(),
            });
        }
        min("write_queue_max", self.write_queue_max, 1)?;
        min("write_group_requests_max", self.write_group_requests_max, 1)?;
        min("write_group_bytes_max", self.write_group_bytes_max, 4096)?;
        min(
            "snapshot_chunk_bytes_max",
            self.snapshot_chunk_bytes_max,
            4096,
        )?;
        max(
            "group_commit_linger_us",
            self.group_commit_linger_us,
            GROUP_COMMIT_LINGER_US_MAX,
        )?;
        max(
            "snapshot_chunk_bytes_max",
            self.snapshot_chunk_bytes_max as u64,
            (FRAME_BYTES_MAX / 2) as u64,
        )?;
        for (field, v, range) in [
            (
                "data_memtable_bytes",
                self.data_memtable_bytes,
                DATA_MEMTABLE_BYTES,
            ),
            (
                "meta_memtable_bytes",
                self.meta_memtable_bytes,
                META_MEMTABLE_BYTES,
            ),
        ] {
            min(field, v, *range.start())?;
            max(field, v as u64, *range.end() as u64)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_errors_name_the_field() {
        StorageConfig::default().validate().unwrap();
        let bad = StorageConfig {
            write_group_requests_max: 0,
            ..Default::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().field,
            "write_group_requests_max"
        );
        let bad = StorageConfig {
            snapshot_chunk_bytes_max: 64 << 20,
            ..Default::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().field,
            "snapshot_chunk_bytes_max"
        );
        let bad = StorageConfig {
            group_commit_linger_us: GROUP_COMMIT_LINGER_US_MAX + 1,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "group_commit_linger_us");
        for (data, meta, field) in [
            (512 << 10, 2 << 20, "data_memtable_bytes"),
            (2 << 30, 2 << 20, "data_memtable_bytes"),
            (16 << 20, 1024, "meta_memtable_bytes"),
            (16 << 20, 1 << 30, "meta_memtable_bytes"),
        ] {
            let bad = StorageConfig {
                data_memtable_bytes: data,
                meta_memtable_bytes: meta,
                ..Default::default()
            };
            assert_eq!(bad.validate().unwrap_err().field, field);
        }
    }
}
