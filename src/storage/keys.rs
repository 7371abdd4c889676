//! Storage key layout: which column family holds what, under which key.
//!
//! | CF | key | value |
//! |---|---|---|
//! | `raft_log` | shard ‖ index (both BE u64) | postcard entry |
//! | `raft_state` | shard ‖ tag | vote, committed, last purged log id (a batch-system group: hard state, configuration, compaction point) |
//! | `shard_meta` | shard ‖ tag | applied, membership, descriptor, snapshot, install marker |
//! | `data` | the user key | the user value |
//!
//! Big-endian prefixes make one shard's records one contiguous key range, so
//! every per-shard scan and deletion is a range operation.

use crate::ShardId;

/// Column family for Raft log entries.
pub const CF_RAFT_LOG: &str = "raft_log";
/// Column family for votes, committed and purged log ids.
pub const CF_RAFT_STATE: &str = "raft_state";
/// Column family for each shard's state-machine metadata.
pub const CF_SHARD_META: &str = "shard_meta";
/// Column family for user data, in global key order, shared by all shards.
pub const CF_DATA: &str = "data";
/// Every column family Tessera uses (RocksDB's `default` is left empty).
pub const ALL_CFS: [&str; 4] = [CF_RAFT_LOG, CF_RAFT_STATE, CF_SHARD_META, CF_DATA];

/// Tags under `raft_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StateTag {
    /// The last saved vote.
    Vote = 1,
    /// The last saved committed log id.
    Committed = 2,
    /// The last purged log id.
    Purged = 3,
    /// A raft-rs group's hard state (`crate::multiraft`).
    RaftHard = 4,
    /// A raft-rs group's configuration (`crate::multiraft`).
    RaftConf = 5,
    /// A raft-rs group's compaction point (`crate::multiraft`): the index
    /// and term of the last entry its log dropped (BE u64 each).
    RaftTrunc = 6,
}

/// Tags under `shard_meta`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MetaTag {
    /// The shard descriptor (range, epoch). Its presence means "this node hosts the shard".
    Descriptor = 1,
    /// The last applied log id.
    Applied = 2,
    /// The last applied membership.
    Membership = 3,
    /// The current snapshot's metadata and file name.
    Snapshot = 4,
    /// A snapshot install in progress (file name and metadata), cleared when done.
    Installing = 5,
    /// A removed replica's tombstone: the configuration version it was
    /// removed at. Only a newer configuration may create the replica again.
    Tombstone = 6,
    /// Prefix of the shard's client sessions: `shard ‖ 7 ‖ client id` (BE
    /// u128), one row per session (see [`crate::session`]).
    Session = 7,
    /// A freeze for a merge into the left neighbour
    /// ([`crate::command::MergeMarker`]), cleared when the merge is
    /// cancelled; the replica is retired when its left neighbour takes the
    /// range.
    Merge = 8,
}

/// `shard ‖ index`, the key of one log entry.
pub fn log_key(shard: ShardId, index: u64) -> [u8; 16] {
    assert!(shard <= ShardId::MAX, "shard id {shard} is reserved");
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&shard.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Decodes the index from a log key of `shard`.
///
/// # Panics
/// If the key is not a 16-byte log key of that shard: the caller bounded its
/// iterator to the shard's prefix, so anything else is a broken invariant.
pub fn log_key_index(shard: ShardId, key: &[u8]) -> u64 {
    assert_eq!(key.len(), 16, "log key of wrong length");
    assert_eq!(&key[..8], &shard.to_be_bytes(), "log key of another shard");
    u64::from_be_bytes(key[8..].try_into().expect("8 bytes"))
}

/// The exclusive upper bound of every key of `shard` in a shard-prefixed CF.
pub fn shard_prefix_end(shard: ShardId) -> [u8; 8] {
    assert!(shard <= ShardId::MAX, "shard id {shard} is reserved");
    (shard.0 + 1).to_be_bytes()
}

/// `shard ‖ tag`, the key of one `raft_state` record.
pub fn state_key(shard: ShardId, tag: StateTag) -> [u8; 9] {
    tagged(shard, tag as u8)
}

/// `shard ‖ tag`, the key of one `shard_meta` record.
pub fn meta_key(shard: ShardId, tag: MetaTag) -> [u8; 9] {
    tagged(shard, tag as u8)
}

/// `shard ‖ 7 ‖ client`, the key of one client session of `shard`.
pub fn session_key(shard: ShardId, client: u128) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[..9].copy_from_slice(&meta_key(shard, MetaTag::Session));
    k[9..].copy_from_slice(&client.to_be_bytes());
    k
}

/// `[start, end)` of every session row of `shard`.
pub fn session_bounds(shard: ShardId) -> ([u8; 9], [u8; 9]) {
    (
        meta_key(shard, MetaTag::Session),
        tagged(shard, MetaTag::Session as u8 + 1),
    )
}

/// The client id of a session key of `shard` (`None` for any other key).
pub fn session_client(shard: ShardId, key: &[u8]) -> Option<u128> {
    if key.len() != 25 || key[..9] != meta_key(shard, MetaTag::Session) {
        return None;
    }
    Some(u128::from_be_bytes(key[9..].try_into().ok()?))
}

/// Decodes `shard ‖ tag` keys.
pub fn split_tagged(key: &[u8]) -> Option<(ShardId, u8)> {
    if key.len() != 9 {
        return None;
    }
    let id = u64::from_be_bytes(key[..8].try_into().ok()?);
    Some((ShardId(id), key[8]))
}

fn tagged(shard: ShardId, tag: u8) -> [u8; 9] {
    assert!(shard <= ShardId::MAX, "shard id {shard} is reserved");
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&shard.to_be_bytes());
    k[8] = tag;
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn log_keys_sort_by_shard_then_index(a in 0u64..1000, b in 0u64..1000, i in any::<u64>(), j in any::<u64>()) {
            let ka = log_key(ShardId(a), i);
            let kb = log_key(ShardId(b), j);
            prop_assert_eq!(ka.cmp(&kb), (a, i).cmp(&(b, j)));
            prop_assert_eq!(log_key_index(ShardId(a), &ka), i);
            prop_assert!(ka.as_slice() < shard_prefix_end(ShardId(a)).as_slice());
        }

        #[test]
        fn tagged_keys_round_trip(s in 0u64..u64::MAX, t in any::<u8>()) {
            let k = tagged(ShardId(s), t);
            prop_assert_eq!(split_tagged(&k), Some((ShardId(s), t)));
        }

        #[test]
        fn session_keys_stay_inside_their_shard(s in 0u64..u64::MAX, c in any::<u128>()) {
            let shard = ShardId(s);
            let k = session_key(shard, c);
            let (from, to) = session_bounds(shard);
            prop_assert!(from.as_slice() <= k.as_slice() && k.as_slice() < to.as_slice());
            prop_assert!(k.as_slice() < shard_prefix_end(shard).as_slice());
            prop_assert_eq!(session_client(shard, &k), Some(c));
            prop_assert_eq!(split_tagged(&k), None);
        }
    }

    #[test]
    #[should_panic(expected = "reserved")]
    fn max_shard_id_is_reserved() {
        log_key(ShardId(u64::MAX), 0);
    }
}
