//! Client sessions: exactly-once writes under retries (Raft dissertation
//! §6.3).
//!
//! A [`Client`](crate::Client) picks a random 128-bit id and numbers its
//! writes `1, 2, 3, ...`; every attempt of one write carries the same
//! [`SessionStamp`], along with `acked`: every write numbered below it is
//! finished on the client's side (answered, failed or abandoned), so it will
//! never be sent again.
//!
//! Each shard's state machine keeps a [`SessionTable`]: per client, the
//! results of the writes it applied at or above `acked`. A stamp the table
//! has seen is answered from it instead of being applied again; a stamp
//! below `acked` was given up by its client and is not applied. The table
//! is part of the replicated state: written in the same batch as the data,
//! carried by snapshots, copied to a split's child.
//!
//! Everything here is pure and deterministic: time is log time (the
//! leader's clock stamped into each write, never decreasing), so every
//! replica expires and evicts the same sessions at the same log index.
//!
//! Bounds: [`SESSIONS_MAX`] clients per shard (the least recently active
//! is evicted first), [`SESSION_WINDOW`] writes in flight per client,
//! [`SAVED_BYTES_MAX`] of saved results per client and
//! [`TABLE_SAVED_BYTES_MAX`] per shard (results beyond them are
//! remembered as applied, without their values), and a session expires
//! [`SESSION_TTL_MS`] of log time after its last write. A client retries
//! for at most its deadline, which must stay well under the TTL.

use crate::command::OpResult;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Most sessions one shard keeps.
pub const SESSIONS_MAX: usize = 4096;
/// Most writes of one client between its `acked` and its newest sequence
/// (the client waits before it goes further).
pub const SESSION_WINDOW: u64 = 4096;
/// Most bytes of saved results per client.
pub const SAVED_BYTES_MAX: usize = 64 * 1024;
/// Most bytes of saved results per shard, all clients together (beyond it
/// writes are remembered as applied, without their results).
pub const TABLE_SAVED_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Log time after its last write at which a session is forgotten (10 min).
pub const SESSION_TTL_MS: u64 = 10 * 60 * 1000;

/// A client's id: random, chosen when the client is created.
pub type ClientId = u128;

/// What a client attaches to every attempt of one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SessionStamp {
    /// The client.
    pub client: ClientId,
    /// This write's number (from 1, unique per client).
    pub seq: u64,
    /// Every write numbered below this is finished on the client's side.
    pub acked: u64,
}

impl SessionStamp {
    /// Whether the stamp is well-formed: `0 < seq`, `acked <= seq`, and
    /// `seq` within [`SESSION_WINDOW`] of `acked`.
    pub fn is_valid(&self) -> bool {
        self.seq > 0 && self.acked <= self.seq && self.seq - self.acked < SESSION_WINDOW
    }
}

/// What a session remembers of one applied write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Saved {
    /// The results, as first answered.
    Results(Vec<OpResult>),
    /// Applied, but the results were too large to keep.
    Omitted,
}

impl Saved {
    fn bytes(&self) -> usize {
        match self {
            Saved::Results(rs) => rs.iter().map(result_bytes).sum(),
            Saved::Omitted => 0,
        }
    }
}

fn result_bytes(r: &OpResult) -> usize {
    let v = match r {
        OpResult::Put { prev } | OpResult::Delete { prev } => prev.as_ref(),
        OpResult::Cas { current, .. } => current.as_ref(),
    };
    8 + v.map_or(0, Vec::len)
}

/// One client's session on one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Log time of its last write.
    pub last_ms: u64,
    /// The highest `acked` it sent.
    pub acked: u64,
    /// Applied writes at or above `acked`, by sequence.
    pub saved: BTreeMap<u64, Saved>,
}

impl Session {
    fn saved_bytes(&self) -> usize {
        self.saved.values().map(Saved::bytes).sum()
    }
}

/// What to do with a stamped write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not seen before: apply it, then [`SessionTable::record`].
    Apply,
    /// Applied before: answer this, apply nothing.
    Duplicate(Saved),
    /// Below what its client acknowledged (the client gave it up) or
    /// malformed: apply nothing.
    Stale,
}

/// The rows a table change touched, for the caller to persist.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Sessions written (created or updated).
    pub written: Vec<ClientId>,
    /// Sessions removed (expired or evicted).
    pub removed: Vec<ClientId>,
    /// Of `removed`, how many were evicted for room (not expired).
    pub evicted: u64,
}

/// Every session of one shard, and the shard's log time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionTable {
    sessions: HashMap<ClientId, Session>,
    /// `(last_ms, client)`: who is least recently active.
    by_age: BTreeSet<(u64, ClientId)>,
    clock_ms: u64,
    /// Saved result bytes of every session together.
    saved_bytes: usize,
}

impl SessionTable {
    /// A table from stored rows. Its log time is the newest session's
    /// (every write leaves its own session at the table's clock, so no
    /// clock needs storing apart).
    pub fn from_rows(rows: impl IntoIterator<Item = (ClientId, Session)>) -> Self {
        let mut t = SessionTable::default();
        for (c, s) in rows {
            t.clock_ms = t.clock_ms.max(s.last_ms);
            t.saved_bytes += s.saved_bytes();
            t.by_age.insert((s.last_ms, c));
            t.sessions.insert(c, s);
        }
        t
    }

    fn remove(&mut self, client: ClientId) -> Option<Session> {
        let s = self.sessions.remove(&client)?;
        self.by_age.remove(&(s.last_ms, client));
        self.saved_bytes -= s.saved_bytes();
        Some(s)
    }

    /// The log time: the highest stamp applied so far.
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    /// How many sessions the table holds.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// One client's session.
    pub fn get(&self, client: ClientId) -> Option<&Session> {
        self.sessions.get(&client)
    }

    /// Every session, in client order (for snapshots and splits).
    pub fn rows(&self) -> Vec<(ClientId, Session)> {
        let mut v: Vec<_> = self.sessions.iter().map(|(c, s)| (*c, s.clone())).collect();
        v.sort_by_key(|(c, _)| *c);
        v
    }

    /// What to do with a write stamped `stamp`.
    pub fn verdict(&self, stamp: &SessionStamp) -> Verdict {
        if !stamp.is_valid() {
            return Verdict::Stale;
        }
        match self.sessions.get(&stamp.client) {
            None => Verdict::Apply,
            Some(s) => match s.saved.get(&stamp.seq) {
                Some(saved) => Verdict::Duplicate(saved.clone()),
                None if stamp.seq < s.acked => Verdict::Stale,
                None => Verdict::Apply,
            },
        }
    }

    /// Advances log time to `at_ms` (never backwards) and forgets sessions
    /// idle for longer than [`SESSION_TTL_MS`]. Returns the removed ids.
    fn advance(&mut self, at_ms: u64) -> Vec<ClientId> {
        self.clock_ms = self.clock_ms.max(at_ms);
        let horizon = self.clock_ms.saturating_sub(SESSION_TTL_MS);
        let mut removed = Vec::new();
        while let Some(&(last, c)) = self.by_age.first() {
            if last >= horizon {
                break;
            }
            self.remove(c);
            removed.push(c);
        }
        removed
    }

    /// Notes a write stamped `stamp`, applied (with `Some(results)`) or
    /// refused as stale (`None`), at log time `at_ms`; prunes what the
    /// client acknowledged and keeps the table within its bounds.
    pub fn record(
        &mut self,
        stamp: &SessionStamp,
        at_ms: u64,
        results: Option<&[OpResult]>,
    ) -> Changes {
        let mut changes = Changes {
            removed: self.advance(at_ms),
            ..Default::default()
        };
        let now = self.clock_ms;
        let client = stamp.client;
        let mut s = match self.remove(client) {
            Some(s) => s,
            None => Session {
                last_ms: now,
                acked: 0,
                saved: BTreeMap::new(),
            },
        };
        s.last_ms = now;
        if stamp.is_valid() && stamp.acked > s.acked {
            s.acked = stamp.acked;
            s.saved = s.saved.split_off(&stamp.acked);
        }
        if let Some(results) = results {
            let saved = Saved::Results(results.to_vec());
            let (mine, ours) = (s.saved_bytes(), self.saved_bytes);
            let fits = mine + saved.bytes() <= SAVED_BYTES_MAX
                && ours + mine + saved.bytes() <= TABLE_SAVED_BYTES_MAX;
            s.saved
                .insert(stamp.seq, if fits { saved } else { Saved::Omitted });
            // A client that overruns its window loses its oldest answers
            // (remembered as applied), never the table's bounds.
            while s.saved.len() as u64 > SESSION_WINDOW {
                s.saved.pop_first();
            }
        }
        // Room for this session: the least recently active go first.
        while self.sessions.len() >= SESSIONS_MAX {
            let Some(&(_, old)) = self.by_age.first() else {
                break;
            };
            self.remove(old);
            changes.removed.push(old);
            changes.evicted += 1;
        }
        self.saved_bytes += s.saved_bytes();
        self.by_age.insert((s.last_ms, client));
        self.sessions.insert(client, s);
        changes.removed.retain(|c| *c != client);
        changes.written.push(client);
        changes
    }
}

impl SessionTable {
    /// Takes in the sessions of a shard merged into this one: per client,
    /// the later `acked` and `last_ms`, and every saved write of either at
    /// or above that `acked` (sequence numbers are unique per client, so
    /// the two never disagree on one). The table's bounds hold afterwards:
    /// results over a client's byte bound are kept as applied without
    /// their values, a window overrun drops the oldest, and sessions over
    /// [`SESSIONS_MAX`] are evicted least recently active first. Returns
    /// the rows to persist.
    pub fn absorb(&mut self, rows: impl IntoIterator<Item = (ClientId, Session)>) -> Changes {
        let mut changes = Changes::default();
        for (client, theirs) in rows {
            self.clock_ms = self.clock_ms.max(theirs.last_ms);
            let mut s = match self.remove(client) {
                None => theirs,
                Some(mut mine) => {
                    mine.last_ms = mine.last_ms.max(theirs.last_ms);
                    mine.acked = mine.acked.max(theirs.acked);
                    for (seq, saved) in theirs.saved {
                        mine.saved.entry(seq).or_insert(saved);
                    }
                    mine
                }
            };
            s.saved = s.saved.split_off(&s.acked);
            while s.saved.len() as u64 > SESSION_WINDOW {
                s.saved.pop_first();
            }
            // Over the byte bounds: results lose their values (they stay
            // known as applied), newest first, until both bounds hold.
            let mut over = s
                .saved_bytes()
                .saturating_sub(SAVED_BYTES_MAX)
                .max((self.saved_bytes + s.saved_bytes()).saturating_sub(TABLE_SAVED_BYTES_MAX));
            for saved in s.saved.values_mut().rev() {
                if over == 0 {
                    break;
                }
                over = over.saturating_sub(saved.bytes());
                *saved = Saved::Omitted;
            }
            self.saved_bytes += s.saved_bytes();
            self.by_age.insert((s.last_ms, client));
            self.sessions.insert(client, s);
            changes.removed.retain(|c| *c != client);
            changes.written.push(client);
        }
        while self.sessions.len() > SESSIONS_MAX {
            let Some(&(_, old)) = self.by_age.first() else {
                break;
            };
            self.remove(old);
            changes.written.retain(|c| *c != old);
            changes.removed.push(old);
            changes.evicted += 1;
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn put() -> Vec<OpResult> {
        vec![OpResult::Put { prev: None }]
    }

    fn stamp(client: ClientId, seq: u64, acked: u64) -> SessionStamp {
        SessionStamp { client, seq, acked }
    }

    #[test]
    fn a_merged_shards_sessions_answer_its_retries() {
        let mut left = SessionTable::default();
        let mut right = SessionTable::default();
        left.record(&stamp(1, 5, 5), 10, Some(&put()));
        right.record(&stamp(1, 6, 5), 20, Some(&put()));
        right.record(&stamp(2, 1, 1), 30, Some(&put()));
        let changes = left.absorb(right.rows());
        assert_eq!(changes.written.len(), 2);
        assert!(matches!(
            left.verdict(&stamp(1, 5, 5)),
            Verdict::Duplicate(_)
        ));
        assert!(matches!(
            left.verdict(&stamp(1, 6, 5)),
            Verdict::Duplicate(_)
        ));
        assert!(matches!(
            left.verdict(&stamp(2, 1, 1)),
            Verdict::Duplicate(_)
        ));
        assert_eq!(left.verdict(&stamp(1, 7, 6)), Verdict::Apply);
        assert_eq!(left.clock_ms(), 30);
        // A later ack on one side prunes the other's older answers.
        let mut a = SessionTable::default();
        a.record(&stamp(3, 1, 1), 1, Some(&put()));
        let mut b = SessionTable::default();
        b.record(&stamp(3, 4, 4), 2, Some(&put()));
        a.absorb(b.rows());
        assert_eq!(a.verdict(&stamp(3, 1, 1)), Verdict::Stale);
        assert!(matches!(a.verdict(&stamp(3, 4, 4)), Verdict::Duplicate(_)));
    }

    #[test]
    fn a_retry_is_answered_from_the_table() {
        let mut t = SessionTable::default();
        let s = stamp(7, 1, 1);
        assert_eq!(t.verdict(&s), Verdict::Apply);
        let cas = vec![OpResult::Cas {
            succeeded: true,
            current: None,
        }];
        t.record(&s, 10, Some(&cas));
        assert_eq!(t.verdict(&s), Verdict::Duplicate(Saved::Results(cas)));
        // Another client is independent.
        assert_eq!(t.verdict(&stamp(8, 1, 1)), Verdict::Apply);
    }

    #[test]
    fn acknowledged_writes_are_pruned_and_their_retries_refused() {
        let mut t = SessionTable::default();
        t.record(&stamp(1, 1, 1), 1, Some(&put()));
        t.record(&stamp(1, 2, 1), 2, Some(&put()));
        t.record(&stamp(1, 3, 3), 3, Some(&put()));
        let s = t.get(1).unwrap();
        assert_eq!(s.saved.keys().copied().collect::<Vec<_>>(), vec![3]);
        assert_eq!(t.verdict(&stamp(1, 1, 1)), Verdict::Stale);
        assert_eq!(t.verdict(&stamp(1, 2, 2)), Verdict::Stale);
        assert!(matches!(t.verdict(&stamp(1, 3, 3)), Verdict::Duplicate(_)));
        assert_eq!(t.verdict(&stamp(1, 4, 3)), Verdict::Apply);
    }

    #[test]
    fn malformed_stamps_are_never_applied() {
        let t = SessionTable::default();
        assert_eq!(t.verdict(&stamp(1, 0, 0)), Verdict::Stale);
        assert_eq!(t.verdict(&stamp(1, 3, 4)), Verdict::Stale);
        assert_eq!(t.verdict(&stamp(1, SESSION_WINDOW, 0)), Verdict::Stale);
    }

    #[test]
    fn sessions_expire_by_log_time() {
        let mut t = SessionTable::default();
        t.record(&stamp(1, 1, 1), 1_000, Some(&put()));
        t.record(&stamp(2, 1, 1), 2_000, Some(&put()));
        let c = t.record(&stamp(3, 1, 1), 1_500 + SESSION_TTL_MS, Some(&put()));
        assert_eq!(c.removed, vec![1]);
        assert_eq!(c.evicted, 0);
        assert!(t.get(1).is_none() && t.get(2).is_some());
        // Log time never goes back: an older stamp is recorded at the clock.
        t.record(&stamp(2, 2, 2), 5, Some(&put()));
        assert_eq!(t.get(2).unwrap().last_ms, 1_500 + SESSION_TTL_MS);
    }

    #[test]
    fn large_results_are_remembered_without_values() {
        let mut t = SessionTable::default();
        let big = vec![OpResult::Delete {
            prev: Some(vec![0; SAVED_BYTES_MAX]),
        }];
        t.record(&stamp(1, 1, 1), 1, Some(&big));
        assert_eq!(
            t.verdict(&stamp(1, 1, 1)),
            Verdict::Duplicate(Saved::Omitted)
        );
    }

    #[test]
    fn the_least_recently_active_session_makes_room() {
        let mut t = SessionTable::default();
        for c in 0..SESSIONS_MAX as u128 {
            t.record(&stamp(c, 1, 1), c as u64, Some(&put()));
        }
        let ch = t.record(&stamp(u128::MAX, 1, 1), 5_000, Some(&put()));
        assert_eq!(t.len(), SESSIONS_MAX);
        assert_eq!((ch.removed, ch.evicted), (vec![0], 1));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Write {
            client: u8,
            seq: u8,
            ack: u8,
            at: u16,
        },
        Reopen,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            8 => (0u8..4, 1u8..40, 0u8..40, 0u16..1000).prop_map(|(client, seq, ack, at)| {
                Step::Write { client, seq, ack: ack.min(seq), at }
            }),
            1 => Just(Step::Reopen),
        ]
    }

    proptest! {
        /// Against a model that remembers every applied write forever: a
        /// stamp is applied at most once, a duplicate gets the results of
        /// its first application, and a table rebuilt from its rows decides
        /// exactly as the original.
        #[test]
        fn each_write_applies_at_most_once(steps in proptest::collection::vec(step(), 1..200)) {
            let mut t = SessionTable::default();
            let mut applied: HashMap<(u128, u64), u64> = HashMap::new();
            let mut n = 0u64;
            for s in steps {
                match s {
                    Step::Write { client, seq, ack, at } => {
                        let st = stamp(client.into(), seq.into(), ack.into());
                        match t.verdict(&st) {
                            Verdict::Apply => {
                                prop_assert!(!applied.contains_key(&(st.client, st.seq)));
                                n += 1;
                                applied.insert((st.client, st.seq), n);
                                let r = vec![OpResult::Put { prev: Some(n.to_be_bytes().to_vec()) }];
                                t.record(&st, at.into(), Some(&r));
                            }
                            Verdict::Duplicate(Saved::Results(r)) => {
                                let first = applied[&(st.client, st.seq)];
                                prop_assert_eq!(r, vec![OpResult::Put { prev: Some(first.to_be_bytes().to_vec()) }]);
                                t.record(&st, at.into(), None);
                            }
                            Verdict::Duplicate(Saved::Omitted) => {
                                prop_assert!(applied.contains_key(&(st.client, st.seq)));
                            }
                            Verdict::Stale => {
                                t.record(&st, at.into(), None);
                            }
                        }
                    }
                    Step::Reopen => {
                        let rebuilt = SessionTable::from_rows(t.rows());
                        prop_assert_eq!(&rebuilt, &t);
                        t = rebuilt;
                    }
                }
            }
        }
    }
}
