//! Errors of the storage layer.

use crate::ShardId;
use std::path::PathBuf;

/// What can go wrong in the storage layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// RocksDB reported an error.
    #[error("rocksdb {op}: {message}")]
    Rocks {
        /// The operation that failed.
        op: &'static str,
        /// RocksDB's message.
        message: String,
    },
    /// A file operation failed.
    #[error("{op} {}: {message}", path.display())]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        message: String,
    },
    /// A stored record could not be decoded, or failed its checksum.
    #[error("corrupt {what}: {detail}")]
    Corrupt {
        /// Which record.
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// An earlier write or sync failed; the engine is fail-stopped and
    /// acknowledges nothing more. Restart the node to recover from the log.
    #[error("storage fail-stopped after: {cause}")]
    Failed {
        /// The first failure.
        cause: String,
    },
    /// The shard is not hosted by this node.
    #[error("shard {shard} is not hosted here")]
    UnknownShard {
        /// The shard.
        shard: ShardId,
    },
    /// The shard already exists on this node.
    #[error("shard {shard} already exists here")]
    ShardExists {
        /// The shard.
        shard: ShardId,
    },
    /// The shard's stores are already open (one Raft group per shard replica).
    #[error("shard {shard} is already open")]
    ShardOpen {
        /// The shard.
        shard: ShardId,
    },
    /// The replica was removed from this node at configuration version
    /// `conf_ver`; only a newer configuration may create it again.
    #[error("shard {shard} was removed here at conf_ver {conf_ver}")]
    Tombstoned {
        /// The shard.
        shard: ShardId,
        /// The configuration version of the removal.
        conf_ver: u64,
    },
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
}

impl StoreError {
    pub(crate) fn rocks(op: &'static str, e: rocksdb::Error) -> Self {
        StoreError::Rocks {
            op,
            message: e.into_string(),
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, e: std::io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.into(),
            message: e.to_string(),
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>, detail: impl ToString) -> Self {
        StoreError::Corrupt {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}
