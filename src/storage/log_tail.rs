//! The newest entries of one shard's Raft log, kept in memory.
//!
//! Replication and apply read the entries a leader has just appended; with
//! this tail they get them without a RocksDB lookup and decode. The tail is
//! always a contiguous suffix of the log as stored: appends extend it,
//! truncations and purges cut it, and it sheds its oldest entries past its
//! bounds (those are in RocksDB, which appends reach before they return).
//! Pure data structure: no I/O, no locks.

use std::collections::VecDeque;

/// Bounds of one shard's tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailLimits {
    /// Entries kept at most.
    pub entries: usize,
    /// Encoded bytes kept at most (at least one entry is kept).
    pub bytes: usize,
}

impl Default for TailLimits {
    fn default() -> Self {
        TailLimits {
            entries: 4096,
            bytes: 8 << 20,
        }
    }
}

/// A contiguous run of log entries `[first, first + len)`.
#[derive(Debug, Clone)]
pub struct LogTail<T> {
    first: u64,
    items: VecDeque<(usize, T)>,
    bytes: usize,
    limits: TailLimits,
}

impl<T: Clone> LogTail<T> {
    /// An empty tail.
    pub fn new(limits: TailLimits) -> Self {
        LogTail {
            first: 0,
            items: VecDeque::new(),
            bytes: 0,
            limits,
        }
    }

    /// The first index held, when any.
    pub fn first(&self) -> Option<u64> {
        (!self.items.is_empty()).then_some(self.first)
    }

    /// The last index held, when any.
    pub fn last(&self) -> Option<u64> {
        (!self.items.is_empty()).then(|| self.first + self.items.len() as u64 - 1)
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Records entries appended to the log at `start, start + 1, ...`, each
    /// with its encoded size. Anything held at or after `start` is replaced
    /// (the log was rewritten there); a gap after what is held starts the
    /// tail afresh.
    pub fn append(&mut self, start: u64, entries: impl IntoIterator<Item = (usize, T)>) {
        match self.last() {
            Some(last) if start <= last && start >= self.first => {
                self.truncate_from(start);
            }
            Some(last) if start == last + 1 => {}
            _ => self.clear(),
        }
        if self.items.is_empty() {
            self.first = start;
        }
        for (size, e) in entries {
            self.bytes += size;
            self.items.push_back((size, e));
        }
        while self.items.len() > 1
            && (self.items.len() > self.limits.entries || self.bytes > self.limits.bytes)
        {
            self.pop_front();
        }
    }

    /// The log lost every entry from `index` on.
    pub fn truncate_from(&mut self, index: u64) {
        if index <= self.first {
            self.clear();
            return;
        }
        let keep = (index - self.first) as usize;
        while self.items.len() > keep {
            let (size, _) = self.items.pop_back().expect("len checked");
            self.bytes -= size;
        }
    }

    /// The log lost every entry up to `index`, inclusive.
    pub fn purge_to(&mut self, index: u64) {
        while self.first().is_some_and(|f| f <= index) {
            self.pop_front();
        }
    }

    /// Copies of the held entries in `[start, end)`, stopping after
    /// `max_entries` or once `max_bytes` is reached (at least one entry).
    /// `None` when `start` is below what is held (the caller reads that part
    /// from storage); empty when the tail holds nothing at `start`.
    pub fn read(
        &self,
        start: u64,
        end: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Option<Vec<T>> {
        let first = self.first()?;
        if start < first {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let from = (start - first) as usize;
        let to = end.saturating_sub(first).min(self.items.len() as u64) as usize;
        for (size, e) in self.items.range(from.min(to)..to) {
            if !out.is_empty() && (out.len() >= max_entries || bytes >= max_bytes) {
                break;
            }
            bytes += size;
            out.push(e.clone());
        }
        Some(out)
    }

    fn pop_front(&mut self) {
        if let Some((size, _)) = self.items.pop_front() {
            self.bytes -= size;
            self.first += 1;
        }
    }

    fn clear(&mut self) {
        self.items.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Step {
        Append { len: u8, size: u16 },
        Truncate { back: u8 },
        Purge { ahead: u8 },
        Read { at: u8, len: u8, max: u8 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (1u8..20, 1u16..3000).prop_map(|(len, size)| Step::Append { len, size }),
            1 => (0u8..30).prop_map(|back| Step::Truncate { back }),
            1 => (0u8..30).prop_map(|ahead| Step::Purge { ahead }),
            3 => (0u8..60, 0u8..40, 1u8..50).prop_map(|(at, len, max)| Step::Read { at, len, max }),
        ]
    }

    proptest! {
        /// Against a model log (index -> (term, value)): the tail is always
        /// a contiguous suffix of the log within its bounds, and every read
        /// it answers equals the log's entries.
        #[test]
        fn the_tail_is_a_bounded_suffix_of_the_log(steps in proptest::collection::vec(step(), 1..120)) {
            let limits = TailLimits { entries: 25, bytes: 20_000 };
            let mut tail: LogTail<(u64, u64)> = LogTail::new(limits);
            let mut log: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
            let mut purged = 0u64;
            let mut term = 1u64;
            for s in steps {
                let last = log.keys().next_back().copied().unwrap_or(purged);
                match s {
                    Step::Append { len, size } => {
                        let start = last + 1;
                        let batch: Vec<(usize, (u64, u64))> = (0..len as u64)
                            .map(|i| (size as usize, (term, start + i)))
                            .collect();
                        for (_, e) in &batch {
                            log.insert(e.1, *e);
                        }
                        tail.append(start, batch);
                    }
                    Step::Truncate { back } => {
                        let from = last.saturating_sub(back as u64).max(purged + 1);
                        log.retain(|&i, _| i < from);
                        tail.truncate_from(from);
                        term += 1;
                    }
                    Step::Purge { ahead } => {
                        let upto = (purged + ahead as u64).min(last);
                        log.retain(|&i, _| i > upto);
                        purged = purged.max(upto);
                        tail.purge_to(upto);
                    }
                    Step::Read { at, len, max } => {
                        let start = purged + 1 + at as u64;
                        let end = start + len as u64;
                        if let Some(got) = tail.read(start, end, max as usize, usize::MAX) {
                            let want: Vec<(u64, u64)> = log
                                .range(start..end)
                                .map(|(_, e)| *e)
                                .take(max as usize)
                                .collect();
                            prop_assert_eq!(got, want);
                        } else {
                            prop_assert!(tail.first().is_none_or(|f| start < f));
                        }
                    }
                }
                if let (Some(f), Some(l)) = (tail.first(), tail.last()) {
                    prop_assert_eq!(Some(&l), log.keys().next_back(), "the tail ends where the log does");
                    prop_assert!(f > purged, "nothing purged is held");
                    for i in f..=l {
                        prop_assert!(log.contains_key(&i), "contiguous and present");
                    }
                    prop_assert!(tail.len() <= limits.entries);
                    prop_assert!(tail.len() == 1 || tail.bytes <= limits.bytes);
                }
            }
        }
    }

    #[test]
    fn reads_stop_at_the_byte_budget_but_return_one_entry() {
        let mut t = LogTail::new(TailLimits::default());
        t.append(5, [(100, 'a'), (100, 'b'), (100, 'c')]);
        assert_eq!(t.read(5, 8, 10, 150), Some(vec!['a', 'b']));
        assert_eq!(t.read(5, 8, 10, 1), Some(vec!['a']));
        assert_eq!(t.read(4, 8, 10, 1000), None);
        assert_eq!(t.read(8, 9, 10, 1000), Some(vec![]));
    }
}
