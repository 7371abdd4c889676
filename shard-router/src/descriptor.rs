//! Shard descriptors: which key range a shard owns, at which epoch.

use crate::ids::{NodeId, ShardId};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A half-open key range `[start, end)`. An empty `end` means "to the end of the
/// key space"; an empty `start` is the beginning of the key space.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct KeyRange {
    /// Inclusive lower bound.
    pub start: Vec<u8>,
    /// Exclusive upper bound; empty means unbounded.
    pub end: Vec<u8>,
}

impl KeyRange {
    /// The whole key space.
    pub fn full() -> Self {
        KeyRange::default()
    }

    /// A range `[start, end)`; an empty `end` is unbounded.
    ///
    /// # Panics
    /// If `end` is non-empty and not greater than `start`: an empty or inverted
    /// range is a caller bug, never a valid shard.
    pub fn new(start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Self {
        let r = KeyRange {
            start: start.into(),
            end: end.into(),
        };
        assert!(
            r.end.is_empty() || r.start < r.end,
            "key range must be non-empty: {r}"
        );
        r
    }

    /// Whether `key` lies inside the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && (self.end.is_empty() || key < self.end.as_slice())
    }

    /// Whether the end is unbounded.
    pub fn is_unbounded(&self) -> bool {
        self.end.is_empty()
    }

    /// Whether some key lies in both ranges.
    pub fn overlaps(&self, other: &KeyRange) -> bool {
        let self_before_other_ends = other.end.is_empty() || self.start < other.end;
        let other_before_self_ends = self.end.is_empty() || other.start < self.end;
        self_before_other_ends && other_before_self_ends
    }
}

impl fmt::Display for KeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, ", escape(&self.start))?;
        if self.end.is_empty() {
            write!(f, "+inf)")
        } else {
            write!(f, "{})", escape(&self.end))
        }
    }
}

/// Printable form of a key: ASCII graphic bytes as-is, others as `\xNN`.
pub fn escape(key: &[u8]) -> String {
    let mut s = String::with_capacity(key.len());
    for &b in key {
        if b.is_ascii_graphic() && b != b'\\' {
            s.push(b as char);
        } else {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

/// A shard's version pair. `version` grows on split (the range changed),
/// `conf_ver` on membership change (the replicas changed). Both only grow.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Epoch {
    /// Bumped when the shard's range changes (split, merge).
    pub version: u64,
    /// Bumped when the shard's replica set changes.
    pub conf_ver: u64,
}

impl Epoch {
    /// Whether this epoch knows every split and membership change `other`
    /// knows (both parts at least as large). Unlike the derived order, a
    /// newer `version` does not excuse an older `conf_ver`.
    pub fn covers(&self, other: &Epoch) -> bool {
        self.version >= other.version && self.conf_ver >= other.conf_ver
    }
}

/// Everything the cluster knows about one shard.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShardDescriptor {
    /// The shard's id.
    pub id: ShardId,
    /// The key range it owns.
    pub range: KeyRange,
    /// Its epoch.
    pub epoch: Epoch,
    /// The nodes holding a replica (voters and learners).
    pub replicas: Vec<NodeId>,
    /// The last known leader, if any.
    pub leader_hint: Option<NodeId>,
}

impl ShardDescriptor {
    /// A fresh descriptor at epoch `{1, 1}`.
    pub fn new(id: ShardId, range: KeyRange, replicas: Vec<NodeId>) -> Self {
        ShardDescriptor {
            id,
            range,
            epoch: Epoch {
                version: 1,
                conf_ver: 1,
            },
            replicas,
            leader_hint: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_respects_half_open_bounds() {
        let r = KeyRange::new(b"b".to_vec(), b"d".to_vec());
        assert!(!r.contains(b"a"));
        assert!(r.contains(b"b"));
        assert!(r.contains(b"c\xff"));
        assert!(!r.contains(b"d"));
        let full = KeyRange::full();
        assert!(full.contains(b""));
        assert!(full.contains(b"\xff\xff"));
    }

    #[test]
    fn overlaps_is_a_shared_key() {
        let r = |a: &[u8], b: &[u8]| KeyRange::new(a.to_vec(), b.to_vec());
        // Adjacent half-open ranges share no key.
        assert!(!r(b"a", b"c").overlaps(&r(b"c", b"e")));
        assert!(!r(b"c", b"e").overlaps(&r(b"a", b"c")));
        assert!(r(b"a", b"d").overlaps(&r(b"c", b"e")));
        assert!(r(b"a", b"").overlaps(&r(b"x", b"y")));
        assert!(r(b"b", b"c").overlaps(&KeyRange::full()));
        assert!(!r(b"", b"b").overlaps(&r(b"b", b"")));
        // Brute force over short keys: overlap is a key in both.
        let keys: Vec<Vec<u8>> = (0u8..6).map(|i| vec![b'a' + i]).collect();
        let mut bounds: Vec<Vec<u8>> = keys.clone();
        bounds.push(Vec::new());
        for s1 in &keys {
            for e1 in &bounds {
                if !e1.is_empty() && e1 <= s1 {
                    continue;
                }
                for s2 in &keys {
                    for e2 in &bounds {
                        if !e2.is_empty() && e2 <= s2 {
                            continue;
                        }
                        let (a, b) = (r(s1, e1), r(s2, e2));
                        let shared = keys
                            .iter()
                            .chain(std::iter::once(&vec![b'z']))
                            .any(|k| a.contains(k) && b.contains(k));
                        assert_eq!(a.overlaps(&b), shared, "{a} {b}");
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "non-empty")]
    fn inverted_range_is_a_bug() {
        KeyRange::new(b"d".to_vec(), b"b".to_vec());
    }

    #[test]
    fn escape_is_readable() {
        assert_eq!(escape(b"ab\x00"), "ab\\x00");
        assert_eq!(
            KeyRange::new(b"a".to_vec(), Vec::new()).to_string(),
            "[a, +inf)"
        );
    }
}
