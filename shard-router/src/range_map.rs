//! The range map: which shard owns which key, for the whole key space.
//!
//! Invariants, checked on every change: the ranges cover the whole key space
//! with no gap and no overlap, and a shard's epoch never goes back.

use crate::descriptor::{KeyRange, ShardDescriptor};
use crate::ids::{NodeId, ShardId};
use std::collections::BTreeMap;
use std::ops::Bound;

/// A change the range map refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeMapError {
    /// The descriptors leave a gap or overlap at `at`.
    NotContiguous {
        /// Where the coverage breaks.
        at: Vec<u8>,
    },
    /// No shard has this id.
    UnknownShard {
        /// The id.
        shard: ShardId,
    },
    /// The id is already used by another shard.
    DuplicateShard {
        /// The id.
        shard: ShardId,
    },
    /// The split key is not strictly inside the shard's range.
    SplitKeyOutsideRange {
        /// The shard.
        shard: ShardId,
        /// The key.
        key: Vec<u8>,
    },
    /// An update would move a shard's epoch backwards.
    StaleEpoch {
        /// The shard.
        shard: ShardId,
    },
}

/// Maps every key to exactly one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeMap {
    /// Keyed by range start.
    by_start: BTreeMap<Vec<u8>, ShardDescriptor>,
}

impl RangeMap {
    /// A map from descriptors that together cover the key space exactly.
    ///
    /// # Errors
    /// [`RangeMapError::NotContiguous`] on a gap or overlap,
    /// [`RangeMapError::DuplicateShard`] on a repeated id.
    pub fn new(
        descriptors: impl IntoIterator<Item = ShardDescriptor>,
    ) -> Result<Self, RangeMapError> {
        let mut by_start = BTreeMap::new();
        for d in descriptors {
            let start = d.range.start.clone();
            if by_start.insert(start.clone(), d).is_some() {
                return Err(RangeMapError::NotContiguous { at: start });
            }
        }
        let map = RangeMap { by_start };
        map.check()?;
        Ok(map)
    }

    /// Checks coverage and id uniqueness.
    pub fn check(&self) -> Result<(), RangeMapError> {
        let mut expected_start: Vec<u8> = Vec::new();
        let mut ids = std::collections::HashSet::new();
        let mut last_unbounded = false;
        for (start, d) in &self.by_start {
            if *start != expected_start || last_unbounded {
                return Err(RangeMapError::NotContiguous { at: start.clone() });
            }
            if !ids.insert(d.id) {
                return Err(RangeMapError::DuplicateShard { shard: d.id });
            }
            expected_start = d.range.end.clone();
            last_unbounded = d.range.is_unbounded();
        }
        if !last_unbounded {
            return Err(RangeMapError::NotContiguous { at: expected_start });
        }
        Ok(())
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    /// Never true: a valid map covers the key space with at least one shard.
    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }

    /// The shard owning `key`.
    pub fn lookup(&self, key: &[u8]) -> &ShardDescriptor {
        self.by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .map(|(_, d)| d)
            .expect("the map covers the whole key space")
    }

    /// The shards that `[start, end)` (empty `end`: unbounded) touches, in key order.
    pub fn spanning<'a>(
        &'a self,
        start: &[u8],
        end: &'a [u8],
    ) -> impl Iterator<Item = &'a ShardDescriptor> + 'a {
        let first = self.lookup(start).range.start.clone();
        self.by_start
            .range(first..)
            .map(|(_, d)| d)
            .take_while(move |d| end.is_empty() || d.range.start.as_slice() < end)
    }

    /// Every shard, in key order.
    pub fn iter(&self) -> impl Iterator<Item = &ShardDescriptor> {
        self.by_start.values()
    }

    /// The shard with id `shard`.
    pub fn get(&self, shard: ShardId) -> Option<&ShardDescriptor> {
        self.by_start.values().find(|d| d.id == shard)
    }

    /// Splits `shard` at `key`: the shard keeps `[start, key)` with its
    /// version bumped, a new shard `child` gets `[key, end)` on the same
    /// replicas. Returns (parent, child).
    pub fn split(
        &mut self,
        shard: ShardId,
        key: &[u8],
        child: ShardId,
    ) -> Result<(ShardDescriptor, ShardDescriptor), RangeMapError> {
        if self.get(child).is_some() {
            return Err(RangeMapError::DuplicateShard { shard: child });
        }
        let parent = self
            .get(shard)
            .ok_or(RangeMapError::UnknownShard { shard })?
            .clone();
        if key <= parent.range.start.as_slice() || !parent.range.contains(key) {
            return Err(RangeMapError::SplitKeyOutsideRange {
                shard,
                key: key.to_vec(),
            });
        }
        let mut left = parent.clone();
        left.range = KeyRange::new(parent.range.start.clone(), key.to_vec());
        left.epoch.version += 1;
        let mut right = parent.clone();
        right.id = child;
        right.range = KeyRange::new(key.to_vec(), parent.range.end.clone());
        right.epoch.version += 1;
        self.by_start.insert(left.range.start.clone(), left.clone());
        self.by_start
            .insert(right.range.start.clone(), right.clone());
        debug_assert_eq!(self.check(), Ok(()));
        Ok((left, right))
    }

    /// Records a new replica set for `shard`, bumping `conf_ver`.
    pub fn change_replicas(
        &mut self,
        shard: ShardId,
        replicas: Vec<NodeId>,
    ) -> Result<ShardDescriptor, RangeMapError> {
        let d = self
            .by_start
            .values_mut()
            .find(|d| d.id == shard)
            .ok_or(RangeMapError::UnknownShard { shard })?;
        d.replicas = replicas;
        d.epoch.conf_ver += 1;
        Ok(d.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptor::Epoch;
    use proptest::prelude::*;

    fn full() -> RangeMap {
        RangeMap::new([ShardDescriptor::new(
            ShardId(1),
            KeyRange::full(),
            vec![NodeId(1)],
        )])
        .unwrap()
    }

    #[test]
    fn gaps_and_overlaps_are_refused() {
        let d = |id, s: &[u8], e: &[u8]| {
            ShardDescriptor::new(ShardId(id), KeyRange::new(s.to_vec(), e.to_vec()), vec![])
        };
        assert!(RangeMap::new([d(1, b"", b"m"), d(2, b"m", b"")]).is_ok());
        assert!(matches!(
            RangeMap::new([d(1, b"", b"m"), d(2, b"n", b"")]),
            Err(RangeMapError::NotContiguous { .. })
        ));
        assert!(matches!(
            RangeMap::new([d(1, b"", b"m")]),
            Err(RangeMapError::NotContiguous { .. })
        ));
        assert!(matches!(
            RangeMap::new([d(1, b"", b"n"), d(2, b"m", b"")]),
            Err(RangeMapError::NotContiguous { .. })
        ));
        assert!(matches!(
            RangeMap::new([d(1, b"", b"m"), d(1, b"m", b"")]),
            Err(RangeMapError::DuplicateShard { .. })
        ));
    }

    #[test]
    fn split_bumps_version_and_refuses_bad_keys() {
        let mut m = full();
        let (l, r) = m.split(ShardId(1), b"m", ShardId(2)).unwrap();
        assert_eq!((l.epoch.version, r.epoch.version), (2, 2));
        assert_eq!(m.lookup(b"a").id, ShardId(1));
        assert_eq!(m.lookup(b"m").id, ShardId(2));
        assert!(matches!(
            m.split(ShardId(1), b"m", ShardId(3)),
            Err(RangeMapError::SplitKeyOutsideRange { .. })
        ));
        assert!(matches!(
            m.split(ShardId(2), b"m", ShardId(3)),
            Err(RangeMapError::SplitKeyOutsideRange { .. })
        ));
        assert!(matches!(
            m.split(ShardId(2), b"x", ShardId(1)),
            Err(RangeMapError::DuplicateShard { .. })
        ));
        let d = m.change_replicas(ShardId(2), vec![NodeId(4)]).unwrap();
        assert_eq!(d.epoch.conf_ver, 2);
    }

    /// The naive model: sorted split points; shard i owns [p[i-1], p[i]).
    fn model_owner(points: &[(Vec<u8>, u64)], key: &[u8]) -> u64 {
        let mut owner = 1;
        for (p, id) in points {
            if key >= p.as_slice() {
                owner = *id;
            }
        }
        owner
    }

    proptest! {
        /// Splits and replica changes in any order: epochs never go back,
        /// the shard a step touches moves forward, the map stays exact.
        #[test]
        fn epochs_only_grow(steps in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 1..3), 1u64..4), 1..60)) {
            let mut m = full();
            let mut next = 2;
            for (split, key, node) in steps {
                let before: std::collections::HashMap<ShardId, Epoch> =
                    m.iter().map(|d| (d.id, d.epoch)).collect();
                let owner = m.lookup(&key).clone();
                let touched = if split {
                    if owner.range.start == key {
                        continue;
                    }
                    let (left, right) = m.split(owner.id, &key, ShardId(next)).unwrap();
                    next += 1;
                    prop_assert!(right.epoch > before[&owner.id]);
                    left.id
                } else {
                    m.change_replicas(owner.id, vec![NodeId(node)]).unwrap().id
                };
                prop_assert_eq!(m.check(), Ok(()));
                for d in m.iter() {
                    if let Some(old) = before.get(&d.id) {
                        prop_assert!(d.epoch >= *old, "{} went back", d.id);
                        if d.id == touched {
                            prop_assert!(d.epoch > *old, "{} did not move forward", d.id);
                        }
                    }
                }
            }
        }

        #[test]
        fn lookups_and_spans_match_a_naive_model(
            splits in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..4), 0..40),
            probes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..5), 1..40),
        ) {
            let mut m = full();
            let mut points: Vec<(Vec<u8>, u64)> = Vec::new();
            let mut next = 2;
            for k in splits {
                let owner = m.lookup(&k).clone();
                if owner.range.start == k {
                    continue;
                }
                m.split(owner.id, &k, ShardId(next)).unwrap();
                points.push((k, next));
                points.sort();
                next += 1;
            }
            prop_assert_eq!(m.check(), Ok(()));
            prop_assert_eq!(m.len(), points.len() + 1);
            for p in &probes {
                prop_assert_eq!(m.lookup(p).id.0, model_owner(&points, p));
                prop_assert!(m.lookup(p).range.contains(p));
            }
            // A span from a to b touches exactly the owners of keys in it.
            let (a, b) = (probes[0].clone(), probes[probes.len() - 1].clone());
            if a < b {
                let got: Vec<u64> = m.spanning(&a, &b).map(|d| d.id.0).collect();
                let mut want = vec![model_owner(&points, &a)];
                for (p, id) in &points {
                    if p.as_slice() > a.as_slice() && p.as_slice() < b.as_slice() {
                        want.push(*id);
                    }
                }
                prop_assert_eq!(got, want);
            }
        }
    }
}
