//! Newtype identifiers: no bare `u64` crosses an API.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Identifies one shard (one key range, one Raft group) cluster-wide.
///
/// `u64::MAX` is reserved: storage keys use `id + 1` as the exclusive end of a
/// shard's key prefix.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct ShardId(pub u64);

impl ShardId {
    /// The largest usable shard id.
    pub const MAX: ShardId = ShardId(u64::MAX - 1);

    /// The big-endian bytes used as a storage key prefix (sorts like the id).
    pub fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// Identifies one node (one process, one RocksDB) cluster-wide.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

impl From<u64> for NodeId {
    fn from(v: u64) -> Self {
        NodeId(v)
    }
}

impl From<u64> for ShardId {
    fn from(v: u64) -> Self {
        ShardId(v)
    }
}
