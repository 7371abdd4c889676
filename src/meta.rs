//! The meta shard: a Raft group like the others whose data is the
//! authoritative table of shard descriptors.
//!
//! Its records live in the shared `data` column family above every valid
//! user key: user keys are at most 8 KiB, so any key that starts with
//! 8,193 bytes of `0xff` sorts after all of them and no client request can
//! name it (the edge refuses keys over 8 KiB). Record keys are
//! `SYSTEM_PREFIX ‖ "route/" ‖ shard id (u64 BE)`, values the postcard
//! descriptor. Being an ordinary shard, it is replicated, snapshotted and
//! restarted like every other.

use crate::{KeyRange, NodeId, ShardDescriptor, ShardId};

/// The meta shard's id.
pub const META_SHARD: ShardId = ShardId(0);

/// The first key above every valid user key.
pub fn system_prefix() -> Vec<u8> {
    crate::limits::user_keys_end()
}

/// The meta shard's key range: the route records.
pub fn meta_range() -> KeyRange {
    let mut start = system_prefix();
    start.extend_from_slice(b"route/");
    let mut end = system_prefix();
    end.extend_from_slice(b"route0");
    KeyRange::new(start, end)
}

/// The record key of `shard`'s descriptor.
pub fn route_key(shard: ShardId) -> Vec<u8> {
    let mut k = meta_range().start;
    k.extend_from_slice(&shard.to_be_bytes());
    k
}

/// The shard a route record's key names (`None` for other meta keys).
pub fn route_key_shard(key: &[u8]) -> Option<ShardId> {
    let start = meta_range().start;
    let rest = key.strip_prefix(start.as_slice())?;
    let id: [u8; 8] = rest.try_into().ok()?;
    Some(ShardId(u64::from_be_bytes(id)))
}

/// The meta key marking `shard` merged away for good (inside the meta
/// range, never a route record: longer than one).
pub fn retired_key(shard: ShardId) -> Vec<u8> {
    let mut k = route_key(shard);
    k.extend_from_slice(b"/retired");
    k
}

/// The meta key of `shard`'s last load report (inside the meta range,
/// never a route record: longer than one).
pub fn load_key(shard: ShardId) -> Vec<u8> {
    let mut k = load_prefix();
    k.extend_from_slice(&shard.to_be_bytes());
    k
}

/// The prefix of every [`load_key`].
pub fn load_prefix() -> Vec<u8> {
    let mut k = meta_range().start;
    k.extend_from_slice(&[0xff; 8]);
    k.extend_from_slice(b"load/");
    k
}

/// The meta key holding the next shard id to hand out (inside the meta
/// range, never a route record: longer than one).
pub fn next_id_key() -> Vec<u8> {
    let mut k = meta_range().start;
    k.extend_from_slice(&[0xff; 8]);
    k.extend_from_slice(b"next-shard-id");
    k
}

/// The meta key holding `tessera dev`'s boot counter (inside the meta
/// range, never a route record, outside the user's key space).
pub fn dev_boot_key() -> Vec<u8> {
    let mut k = meta_range().start;
    k.extend_from_slice(&[0xff; 8]);
    k.extend_from_slice(b"dev-boot");
    k
}

/// The meta shard's descriptor for a cluster of `members` (3 replicas at
/// most, the first member initialises it).
pub fn meta_descriptor(members: &[NodeId]) -> ShardDescriptor {
    let replicas: Vec<NodeId> = members.iter().take(3).copied().collect();
    let mut d = ShardDescriptor::new(META_SHARD, meta_range(), replicas.clone());
    d.leader_hint = replicas.first().copied();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_records_sort_above_every_user_key_and_inside_the_meta_range() {
        let biggest_user_key = vec![0xffu8; crate::limits::KEY_BYTES_MAX];
        let r = meta_range();
        for id in [0u64, 1, 77, u64::MAX - 1] {
            let k = route_key(ShardId(id));
            assert!(k > biggest_user_key);
            assert!(r.contains(&k));
            assert!(
                crate::limits::check_key(&k).is_err(),
                "no client can name it"
            );
        }
        assert!(route_key(ShardId(1)) < route_key(ShardId(2)));
    }
}
