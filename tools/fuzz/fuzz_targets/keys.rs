//! The storage key codec (`tessera::storage::keys`).
//!
//! Asserts, for arbitrary shard ids (below the reserved `u64::MAX`),
//! indexes, tags and raw keys:
//! - `log_key` decodes back with `log_key_index`, sorts by (shard, index),
//!   lies inside `[shard ‖ 0…, shard_prefix_end)`, and is never mistaken for
//!   a tagged key;
//! - `split_tagged` never panics on raw bytes, accepts exactly the 9-byte
//!   keys, and what it accepts re-encodes to the same bytes with
//!   `meta_key`/`state_key` (the codec is canonical);
//! - a raw 16-byte key with a shard's prefix decodes with `log_key_index`
//!   and re-encodes to itself;
//! - tagged keys sort by (shard, tag) and stay inside their shard's prefix.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tessera::storage::keys::{
    log_key, log_key_index, meta_key, shard_prefix_end, split_tagged, state_key, MetaTag,
    StateTag,
};
use tessera::ShardId;

tessera_fuzz::limit_alloc!();

const META_TAGS: [MetaTag; 5] = [
    MetaTag::Descriptor,
    MetaTag::Applied,
    MetaTag::Membership,
    MetaTag::Snapshot,
    MetaTag::Installing,
];
const STATE_TAGS: [StateTag; 3] = [StateTag::Vote, StateTag::Committed, StateTag::Purged];

#[derive(Arbitrary, Debug)]
struct Input {
    a: u64,
    b: u64,
    i: u64,
    j: u64,
    tag_a: u8,
    tag_b: u8,
    raw: Vec<u8>,
}

fn clamp(s: u64) -> ShardId {
    ShardId(s.min(ShardId::MAX.0))
}

fn meta_tag(t: u8) -> MetaTag {
    META_TAGS[t as usize % META_TAGS.len()]
}

fuzz_target!(|inp: Input| {
    let (a, b) = (clamp(inp.a), clamp(inp.b));

    // Log keys.
    let ka = log_key(a, inp.i);
    let kb = log_key(b, inp.j);
    assert_eq!(log_key_index(a, &ka), inp.i);
    assert_eq!(log_key_index(b, &kb), inp.j);
    assert_eq!(ka.cmp(&kb), (a.0, inp.i).cmp(&(b.0, inp.j)));
    assert!(ka.as_slice() >= a.0.to_be_bytes().as_slice());
    assert!(ka.as_slice() < shard_prefix_end(a).as_slice());
    assert_eq!(split_tagged(&ka), None);

    // Tagged keys.
    let (ta, tb) = (meta_tag(inp.tag_a), meta_tag(inp.tag_b));
    let ma = meta_key(a, ta);
    let mb = meta_key(b, tb);
    assert_eq!(split_tagged(&ma), Some((a, ta as u8)));
    assert_eq!(ma.cmp(&mb), (a.0, ta as u8).cmp(&(b.0, tb as u8)));
    assert!(ma.as_slice() >= a.0.to_be_bytes().as_slice());
    assert!(ma.as_slice() < shard_prefix_end(a).as_slice());
    let sa = state_key(a, STATE_TAGS[inp.tag_a as usize % STATE_TAGS.len()]);
    assert_eq!(split_tagged(&sa).map(|(s, _)| s), Some(a));

    // Raw bytes.
    let raw = inp.raw.as_slice();
    match split_tagged(raw) {
        Some((s, t)) => {
            assert_eq!(raw.len(), 9);
            assert_eq!(&raw[..8], &s.0.to_be_bytes());
            assert_eq!(raw[8], t);
            if s <= ShardId::MAX {
                if let Some(tag) = META_TAGS.iter().find(|m| **m as u8 == t) {
                    assert_eq!(meta_key(s, *tag).as_slice(), raw);
                }
                if let Some(tag) = STATE_TAGS.iter().find(|m| **m as u8 == t) {
                    assert_eq!(state_key(s, *tag).as_slice(), raw);
                }
            }
        }
        None => assert_ne!(raw.len(), 9),
    }
    if raw.len() == 16 {
        let shard = ShardId(u64::from_be_bytes(raw[..8].try_into().unwrap()));
        if shard <= ShardId::MAX {
            let index = log_key_index(shard, raw);
            assert_eq!(log_key(shard, index).as_slice(), raw);
        }
    }
});
