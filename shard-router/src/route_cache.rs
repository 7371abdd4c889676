//! The client's route cache: the descriptors it has learned, possibly stale,
//! possibly with gaps, never overlapping.
//!
//! Corrected from the server's typed answers: `EpochMismatch` brings current
//! descriptors ([`RouteCache::insert`]), `NotLeader` a leader hint
//! ([`RouteCache::set_leader`]), anything else drops the entry
//! ([`RouteCache::invalidate`]).

use crate::descriptor::ShardDescriptor;
use crate::ids::{NodeId, ShardId};
use std::collections::BTreeMap;
use std::ops::Bound;

/// Cached shard descriptors keyed by range start.
#[derive(Debug, Clone, Default)]
pub struct RouteCache {
    by_start: BTreeMap<Vec<u8>, ShardDescriptor>,
}

fn overlaps(a: &ShardDescriptor, b: &ShardDescriptor) -> bool {
    a.range.overlaps(&b.range)
}

impl RouteCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cached descriptors.
    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }

    /// The cached shard whose range holds `key`, if any.
    pub fn lookup(&self, key: &[u8]) -> Option<&ShardDescriptor> {
        self.by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .map(|(_, d)| d)
            .filter(|d| d.range.contains(key))
    }

    fn overlapping(&self, d: &ShardDescriptor) -> Vec<Vec<u8>> {
        let first = self
            .by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(d.range.start.as_slice())))
            .next_back()
            .map(|(k, _)| k.clone())
            .unwrap_or_default();
        self.by_start
            .range(first..)
            .take_while(|(s, _)| d.range.end.is_empty() || s.as_slice() < d.range.end.as_slice())
            .filter(|(_, c)| overlaps(c, d))
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Learns `d`. Entries it overlaps are dropped, unless one of them is
    /// newer (a higher range version, or the same shard at a higher epoch):
    /// then `d` is stale and ignored. Returns whether `d` was taken.
    pub fn insert(&mut self, d: ShardDescriptor) -> bool {
        let over = self.overlapping(&d);
        let stale = over.iter().any(|s| {
            let c = &self.by_start[s];
            c.epoch.version > d.epoch.version || (c.id == d.id && c.epoch > d.epoch)
        });
        if stale {
            return false;
        }
        for s in over {
            self.by_start.remove(&s);
        }
        self.by_start.insert(d.range.start.clone(), d);
        true
    }

    /// Records a leader hint for a cached shard.
    pub fn set_leader(&mut self, shard: ShardId, leader: Option<NodeId>) {
        if let Some(d) = self.by_start.values_mut().find(|d| d.id == shard) {
            d.leader_hint = leader;
        }
    }

    /// Cached descriptors in key order.
    pub fn iter(&self) -> impl Iterator<Item = &ShardDescriptor> {
        self.by_start.values()
    }

    /// Forgets a shard.
    pub fn invalidate(&mut self, shard: ShardId) {
        self.by_start.retain(|_, d| d.id != shard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptor::KeyRange;
    use crate::range_map::RangeMap;
    use proptest::prelude::*;

    #[test]
    fn stale_descriptors_never_replace_newer_ones() {
        let mut m = RangeMap::new([ShardDescriptor::new(
            ShardId(1),
            KeyRange::full(),
            vec![NodeId(1)],
        )])
        .unwrap();
        let old = m.lookup(b"x").clone();
        let mut c = RouteCache::new();
        assert!(c.insert(old.clone()));
        let (l, r) = m.split(ShardId(1), b"m", ShardId(2)).unwrap();
        assert!(c.insert(r.clone()));
        assert_eq!(c.lookup(b"x").unwrap().id, ShardId(2));
        assert!(c.lookup(b"a").is_none(), "the old parent range was dropped");
        assert!(!c.insert(old), "the pre-split parent is stale");
        assert!(c.insert(l));
        assert_eq!(c.lookup(b"a").unwrap().id, ShardId(1));
        c.set_leader(ShardId(2), Some(NodeId(3)));
        assert_eq!(c.lookup(b"z").unwrap().leader_hint, Some(NodeId(3)));
        c.invalidate(ShardId(2));
        assert!(c.lookup(b"z").is_none());
    }

    proptest! {
        /// Whatever stale views the cache hears, in whatever order, it never
        /// holds overlapping entries, never answers with a range that does
        /// not hold the key, and once it hears the current map it matches it.
        #[test]
        fn converges_to_the_authoritative_map(
            splits in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..3), 0..25),
            hear in proptest::collection::vec((any::<usize>(), any::<prop::sample::Index>()), 0..60),
            probes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..4), 1..30),
        ) {
            let mut m = RangeMap::new([ShardDescriptor::new(ShardId(1), KeyRange::full(), vec![])]).unwrap();
            let mut history: Vec<Vec<ShardDescriptor>> = vec![m.iter().cloned().collect()];
            let mut next = 2;
            for k in splits {
                let owner = m.lookup(&k).clone();
                if owner.range.start != k {
                    m.split(owner.id, &k, ShardId(next)).unwrap();
                    next += 1;
                    history.push(m.iter().cloned().collect());
                }
            }
            let mut c = RouteCache::new();
            for (version, pick) in hear {
                let view = &history[version % history.len()];
                c.insert(pick.get(view).clone());
                let all: Vec<_> = c.by_start.values().cloned().collect();
                for (i, a) in all.iter().enumerate() {
                    for b in &all[i + 1..] {
                        prop_assert!(!overlaps(a, b), "overlap {a:?} {b:?}");
                    }
                }
                for p in &probes {
                    if let Some(d) = c.lookup(p) {
                        prop_assert!(d.range.contains(p));
                    }
                }
            }
            for d in m.iter() {
                prop_assert!(c.insert(d.clone()), "a current descriptor is never stale");
            }
            for p in &probes {
                prop_assert_eq!(c.lookup(p).map(|d| d.id), Some(m.lookup(p).id));
            }
        }
    }
}
