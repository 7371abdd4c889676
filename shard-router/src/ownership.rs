//! Range ownership on one node: which hosted replica may write which keys.
//!
//! Every replica a node hosts shares one key space (the node's `data`
//! column family). Normally the replicas' ranges are disjoint, but a replica
//! that lags behind a split (or installs a snapshot taken before one) still
//! claims its old, wider range while the split's child already holds part
//! of it. The rule: where claims overlap, the claim with the higher range
//! version (the newer split generation) owns the keys; a replica that has no
//! state yet (created empty, waiting for its first snapshot) owns nothing.
//!
//! Pure data: the storage engine keeps one [`Ownership`] per node and asks
//! it before any write or delete of user keys that is not a plain apply.

use crate::{KeyRange, ShardId};
use std::collections::BTreeMap;

/// What one hosted replica claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The replica's range, as its own descriptor says.
    pub range: KeyRange,
    /// Its range version (grows with every split of its lineage).
    pub version: u64,
    /// Whether it holds state (applied something or installed a snapshot);
    /// an empty replica owns nothing.
    pub initialized: bool,
}

/// Every replica's claim on one node.
#[derive(Debug, Clone, Default)]
pub struct Ownership {
    claims: BTreeMap<ShardId, Claim>,
    /// Grows with every change, so callers can cache what they derived.
    generation: u64,
}

/// The end bound of a range: `None` is the end of the key space.
fn end_of(r: &KeyRange) -> Option<&[u8]> {
    (!r.end.is_empty()).then_some(r.end.as_slice())
}

/// `a` ∩ `b`, when not empty.
pub fn intersect(a: &KeyRange, b: &KeyRange) -> Option<KeyRange> {
    let start = a.start.as_slice().max(b.start.as_slice());
    let end = match (end_of(a), end_of(b)) {
        (None, None) => None,
        (Some(x), None) | (None, Some(x)) => Some(x),
        (Some(x), Some(y)) => Some(x.min(y)),
    };
    match end {
        Some(e) if e <= start => None,
        e => Some(KeyRange::new(
            start.to_vec(),
            e.unwrap_or_default().to_vec(),
        )),
    }
}

/// `a` minus `b`: zero, one or two ranges, in key order.
pub fn subtract(a: &KeyRange, b: &KeyRange) -> Vec<KeyRange> {
    let Some(i) = intersect(a, b) else {
        return vec![a.clone()];
    };
    let mut out = Vec::new();
    if a.start < i.start {
        out.push(KeyRange::new(a.start.clone(), i.start.clone()));
    }
    if let Some(ie) = end_of(&i) {
        if end_of(a).is_none_or(|ae| ie < ae) {
            out.push(KeyRange::new(ie.to_vec(), a.end.clone()));
        }
    }
    out
}

impl Ownership {
    /// Records (or replaces) `shard`'s claim.
    pub fn set(&mut self, shard: ShardId, claim: Claim) {
        if self.claims.get(&shard) != Some(&claim) {
            self.claims.insert(shard, claim);
            self.generation += 1;
        }
    }

    /// Forgets `shard`'s claim (the replica is gone).
    pub fn remove(&mut self, shard: ShardId) -> Option<Claim> {
        self.generation += 1;
        self.claims.remove(&shard)
    }

    /// A number that changes whenever any claim does.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// `shard`'s claim.
    pub fn get(&self, shard: ShardId) -> Option<&Claim> {
        self.claims.get(&shard)
    }

    /// Every claim, in shard id order.
    pub fn iter(&self) -> impl Iterator<Item = (ShardId, &Claim)> {
        self.claims.iter().map(|(s, c)| (*s, c))
    }

    /// The parts of `range` that `shard`, at range version `version`, may
    /// write or delete: `range` minus every other initialized claim of the
    /// same or a newer version. In key order, disjoint.
    pub fn writable(&self, shard: ShardId, range: &KeyRange, version: u64) -> Vec<KeyRange> {
        let mut pieces = vec![range.clone()];
        for (other, c) in &self.claims {
            if *other == shard || !c.initialized || c.version < version {
                continue;
            }
            pieces = pieces.iter().flat_map(|p| subtract(p, &c.range)).collect();
            if pieces.is_empty() {
                break;
            }
        }
        pieces
    }

    /// The parts of `range` that newer claims of other replicas own: a
    /// replica at `version` replaying old writes must leave these keys
    /// alone.
    pub fn shadows(&self, shard: ShardId, range: &KeyRange, version: u64) -> Vec<KeyRange> {
        self.claims
            .iter()
            .filter(|(other, c)| **other != shard && c.initialized && c.version > version)
            .filter_map(|(_, c)| intersect(range, &c.range))
            .collect()
    }

    /// The replica that owns `key` here: among the initialized claims that
    /// contain it, the newest (on a tie, the lowest id).
    pub fn owner(&self, key: &[u8]) -> Option<ShardId> {
        self.claims
            .iter()
            .filter(|(_, c)| c.initialized && c.range.contains(key))
            .max_by(|(a, x), (b, y)| x.version.cmp(&y.version).then(b.cmp(a)))
            .map(|(s, _)| *s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(a: &str, b: &str) -> KeyRange {
        KeyRange::new(a.as_bytes().to_vec(), b.as_bytes().to_vec())
    }

    fn claim(range: KeyRange, version: u64) -> Claim {
        Claim {
            range,
            version,
            initialized: true,
        }
    }

    #[test]
    fn a_stale_parent_yields_to_its_child() {
        let mut o = Ownership::default();
        // The parent still claims everything at version 1; its child took
        // [k, end) at version 2.
        o.set(ShardId(1), claim(KeyRange::full(), 1));
        o.set(ShardId(2), claim(r("k", ""), 2));
        assert_eq!(
            o.writable(ShardId(1), &KeyRange::full(), 1),
            vec![r("", "k")]
        );
        assert_eq!(o.writable(ShardId(2), &r("k", ""), 2), vec![r("k", "")]);
        assert_eq!(
            o.shadows(ShardId(1), &KeyRange::full(), 1),
            vec![r("k", "")]
        );
        assert!(o.shadows(ShardId(2), &r("k", ""), 2).is_empty());
        assert_eq!(o.owner(b"a"), Some(ShardId(1)));
        assert_eq!(o.owner(b"z"), Some(ShardId(2)));
    }

    #[test]
    fn an_empty_replica_owns_nothing() {
        let mut o = Ownership::default();
        o.set(
            ShardId(3),
            Claim {
                range: KeyRange::full(),
                version: 9,
                initialized: false,
            },
        );
        o.set(ShardId(1), claim(r("a", "m"), 1));
        assert_eq!(o.owner(b"b"), Some(ShardId(1)));
        assert_eq!(o.owner(b"x"), None);
        assert_eq!(o.writable(ShardId(1), &r("a", "m"), 1), vec![r("a", "m")]);
    }

    #[test]
    fn subtract_handles_unbounded_ends() {
        assert_eq!(
            subtract(&KeyRange::full(), &r("c", "f")),
            vec![r("", "c"), r("f", "")]
        );
        assert_eq!(
            subtract(&r("c", "f"), &KeyRange::full()),
            Vec::<KeyRange>::new()
        );
        assert_eq!(subtract(&r("c", ""), &r("a", "d")), vec![r("d", "")]);
        assert_eq!(subtract(&r("c", "f"), &r("f", "")), vec![r("c", "f")]);
        assert_eq!(intersect(&r("a", "c"), &r("c", "")), None);
    }

    fn arb_range() -> impl Strategy<Value = KeyRange> {
        (0u8..8, 0u8..9).prop_map(|(a, len)| {
            let start = if a == 0 { vec![] } else { vec![a * 10] };
            let end_b = a as u16 * 10 + len as u16 * 10;
            let end = if len == 0 || end_b >= 80 {
                vec![]
            } else {
                vec![end_b as u8]
            };
            KeyRange::new(start, end)
        })
    }

    proptest! {
        /// `writable` is exactly the keys of the range that no other
        /// initialized claim of the same or a newer version holds; `owner`
        /// agrees with it; pieces are disjoint and inside the range.
        #[test]
        fn writable_is_the_range_minus_newer_claims(
            claims in proptest::collection::vec((arb_range(), 0u64..4, any::<bool>()), 1..6),
            me in 0usize..6,
        ) {
            let mut o = Ownership::default();
            for (i, (range, version, init)) in claims.iter().enumerate() {
                o.set(ShardId(i as u64 + 1), Claim { range: range.clone(), version: *version, initialized: *init });
            }
            let me = me % claims.len();
            let shard = ShardId(me as u64 + 1);
            let (range, version, _) = &claims[me];
            let pieces = o.writable(shard, range, *version);
            for w in pieces.windows(2) {
                prop_assert!(end_of(&w[0]).is_some_and(|e| e <= w[1].start.as_slice()));
            }
            for k in 0u8..=90 {
                let key = [k];
                let in_piece = pieces.iter().filter(|p| p.contains(&key)).count();
                prop_assert!(in_piece <= 1);
                let blocked = claims.iter().enumerate().any(|(j, (r2, v2, i2))| {
                    j != me && *i2 && *v2 >= *version && r2.contains(&key)
                });
                prop_assert_eq!(in_piece == 1, range.contains(&key) && !blocked, "key {}", k);
                let shadowed = o.shadows(shard, range, *version).iter().any(|s| s.contains(&key));
                let newer = claims.iter().enumerate().any(|(j, (r2, v2, i2))| {
                    j != me && *i2 && *v2 > *version && r2.contains(&key)
                });
                prop_assert_eq!(shadowed, range.contains(&key) && newer);
            }
        }
    }
}
