//! One group's Raft log and hard state over the node's shared RocksDB, as
//! raft-rs's [`Storage`].
//!
//! Records (all keyed by shard id first, so a group's records are one range):
//! - `raft_log`: `shard ‖ index` → the protobuf `Entry`;
//! - `raft_state`: `shard ‖ RaftHard` → the protobuf `HardState` (written
//!   when its term or vote changes: the commit alone is not), and
//!   `shard ‖ RaftConf` → the protobuf `ConfState`, and `shard ‖ RaftTrunc`
//!   → the compaction point: index and term of the last entry dropped from
//!   the log (absent until the first compaction, [`GroupStore::compact`]).
//!
//! Writes never go to RocksDB from here directly: [`GroupStore::stage`] puts a
//! ready's entries and hard state into the caller's `WriteBatch`, which the
//! driver writes once, synced, for every group of a round. Staged entries
//! are readable at once (raft-rs asks for them only after the driver hands the
//! ready back), from a bounded in-memory tail that also spares replication
//! and apply the RocksDB reads of recent entries.

use std::collections::VecDeque;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use rocksdb::WriteBatch;

use crate::storage::keys::{self, StateTag};
use crate::storage::{Engine, StoreError};
use crate::ShardId;

/// Entries kept in memory per group (the newest ones).
pub const TAIL_ENTRIES: usize = 1024;

/// A group's log and hard state: raft-rs reads it through [`Storage`].
pub struct GroupStore {
    engine: Engine,
    shard: ShardId,
    hard: HardState,
    conf: ConfState,
    /// The last index in the log (0: empty); at least `trunc.0`.
    last: u64,
    /// The compaction point: (index, term) of the last entry dropped from
    /// the log, (0, 0) before any. The log holds `trunc.0 + 1..=last`.
    trunc: (u64, u64),
    /// The newest entries, contiguous and ending at `last`.
    tail: VecDeque<Entry>,
    /// Where raft-rs's requests for a snapshot go (a follower needs
    /// entries this log compacted): the node seeds that follower.
    wanted: Option<SnapshotRequests>,
}

/// Followers that raft-rs asked a snapshot for, per group: (group, peer).
pub type SnapshotRequests =
    std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<(ShardId, u64)>>>;

fn raft_err(e: StoreError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

fn decode<M: protobuf::Message>(what: &str, bytes: &[u8]) -> Result<M, StoreError> {
    M::parse_from_bytes(bytes).map_err(|e| StoreError::corrupt(what.to_string(), e))
}

fn decode_trunc(shard: ShardId, b: &[u8]) -> Result<(u64, u64), StoreError> {
    let b: [u8; 16] = b.try_into().map_err(|_| {
        StoreError::corrupt(
            format!("compaction point of {shard}"),
            format!("{} bytes where 16 were expected", b.len()),
        )
    })?;
    let half = |r: &[u8]| u64::from_be_bytes(r.try_into().expect("8 bytes"));
    Ok((half(&b[..8]), half(&b[8..])))
}

/// A compaction point as stored: index and term, big-endian.
fn encode_trunc(index: u64, term: u64) -> [u8; 16] {
    let mut point = [0u8; 16];
    point[..8].copy_from_slice(&index.to_be_bytes());
    point[8..].copy_from_slice(&term.to_be_bytes());
    point
}

fn encode<M: protobuf::Message>(m: &M) -> Vec<u8> {
    m.write_to_bytes().expect("protobuf encoding into memory")
}

impl GroupStore {
    /// Creates a new group's records with `voters`, synced. Refuses a shard
    /// that already has Raft state here.
    ///
    /// # Errors
    /// [`StoreError::ShardExists`] when the group already has state here,
    /// or the RocksDB error.
    pub fn bootstrap(engine: &Engine, shard: ShardId, voters: &[u64]) -> Result<(), StoreError> {
        Self::bootstrap_many(engine, &[shard], voters)
    }

    /// [`GroupStore::bootstrap`] for many groups with one synced write (a
    /// node starting thousands of groups pays one sync, not thousands).
    /// Nothing is written when any of them already has state here.
    ///
    /// # Errors
    /// As [`GroupStore::bootstrap`].
    pub fn bootstrap_many(
        engine: &Engine,
        shards: &[ShardId],
        voters: &[u64],
    ) -> Result<(), StoreError> {
        let cf = engine.cf(crate::storage::Cf::RaftState);
        let mut conf = ConfState::default();
        conf.set_voters(voters.to_vec());
        let (conf, hard) = (encode(&conf), encode(&HardState::default()));
        let mut b = WriteBatch::default();
        for &shard in shards {
            if Self::exists(engine, shard)? {
                return Err(StoreError::ShardExists { shard });
            }
            b.put_cf(cf, keys::state_key(shard, StateTag::RaftConf), &conf);
            b.put_cf(cf, keys::state_key(shard, StateTag::RaftHard), &hard);
        }
        engine.write_synced(b, "bootstrap groups")
    }

    /// Stages into `batch` the Raft state of `child`, created by a split
    /// its parent applied at log position (`at_index`, `at_term`): voters
    /// `voters`, and a log that starts right after the split, as if every
    /// entry up to it had been compacted (the entries are the parent's: the
    /// child's state machine starts as applied at `at_index`). Every replica
    /// of the parent stages the same state when it applies the split, so
    /// the child's first leader finds its followers' logs matching at the
    /// split without a snapshot. The hard state's term is the split's (the
    /// child's terms grow from there), with no vote and the split
    /// committed.
    ///
    /// The caller writes `batch` with the split's apply (one write: a crash
    /// keeps both or neither, and a replayed split stages the state again).
    pub fn stage_split_child(
        engine: &Engine,
        child: ShardId,
        voters: &[u64],
        at_index: u64,
        at_term: u64,
        batch: &mut WriteBatch,
    ) {
        let cf = engine.cf(crate::storage::Cf::RaftState);
        let mut conf = ConfState::default();
        conf.set_voters(voters.to_vec());
        let hard = HardState {
            term: at_term,
            commit: at_index,
            ..HardState::default()
        };
        batch.put_cf(
            cf,
            keys::state_key(child, StateTag::RaftConf),
            encode(&conf),
        );
        batch.put_cf(
            cf,
            keys::state_key(child, StateTag::RaftHard),
            encode(&hard),
        );
        batch.put_cf(
            cf,
            keys::state_key(child, StateTag::RaftTrunc),
            encode_trunc(at_index, at_term),
        );
    }

    /// Whether `shard` has batch-system Raft state here (it was bootstrapped
    /// with [`GroupStore::bootstrap`]; a shard without it runs on openraft).
    ///
    /// # Errors
    /// The RocksDB error.
    pub fn exists(engine: &Engine, shard: ShardId) -> Result<bool, StoreError> {
        let cf = engine.cf(crate::storage::Cf::RaftState);
        Ok(engine
            .db()
            .get_pinned_cf(cf, keys::state_key(shard, StateTag::RaftConf))
            .map_err(|e| StoreError::rocks("read conf state", e))?
            .is_some())
    }

    /// The last log index of `shard` written to RocksDB here (0: none);
    /// entries staged for a round that has not written yet are not counted.
    ///
    /// # Errors
    /// The RocksDB error.
    pub fn last_written(engine: &Engine, shard: ShardId) -> Result<u64, StoreError> {
        Ok(engine.last_log_index(shard)?.unwrap_or(0))
    }

    /// The first log index of `shard` written to RocksDB here (`None`:
    /// none), what compaction left.
    ///
    /// # Errors
    /// The RocksDB error.
    pub fn first_written(engine: &Engine, shard: ShardId) -> Result<Option<u64>, StoreError> {
        engine.first_log_index(shard)
    }

    /// Opens a group from what is stored.
    ///
    /// # Errors
    /// [`StoreError::UnknownShard`] when the group was never bootstrapped
    /// here, [`StoreError::Corrupt`] for a record that does not decode.
    pub fn open(engine: &Engine, shard: ShardId) -> Result<GroupStore, StoreError> {
        let db = engine.db();
        let cf = engine.cf(crate::storage::Cf::RaftState);
        let read = |tag| {
            db.get_cf(cf, keys::state_key(shard, tag))
                .map_err(|e| StoreError::rocks("read raft state", e))
        };
        let Some(conf) = read(StateTag::RaftConf)? else {
            return Err(StoreError::UnknownShard { shard });
        };
        let conf: ConfState = decode(&format!("conf state of {shard}"), &conf)?;
        let hard: HardState = match read(StateTag::RaftHard)? {
            Some(b) => decode(&format!("hard state of {shard}"), &b)?,
            None => HardState::default(),
        };
        let trunc = match read(StateTag::RaftTrunc)? {
            Some(b) => decode_trunc(shard, &b)?,
            None => (0, 0),
        };
        // Every entry may have been compacted away: the log then ends at
        // the compaction point.
        let last = Self::last_written(engine, shard)?.max(trunc.0);
        Ok(GroupStore {
            engine: engine.clone(),
            shard,
            hard,
            conf,
            last,
            trunc,
            tail: VecDeque::new(),
            wanted: None,
        })
    }

    /// The first index in the log (1 until the first compaction).
    pub fn first(&self) -> u64 {
        self.trunc.0 + 1
    }

    /// Drops the entries up to `to` (at most the last index) from the log:
    /// their deletion and the new compaction point go into `batch`, and
    /// they stop being readable here at once. Returns how many entries it
    /// dropped: none when `to` is not past the current compaction point.
    ///
    /// The caller's contract: every entry up to `to` is applied by the
    /// state machine **in a write that precedes `batch`** in the node's
    /// RocksDB (which recovers a prefix of its writes), so no crash can
    /// keep the compaction and lose an apply the log no longer holds; and
    /// every voter holds the entries up to `to` (no snapshot can replace
    /// them for a lagging follower).
    ///
    /// # Errors
    /// The RocksDB error reading the term of entry `to`.
    ///
    /// # Panics
    /// When `to` is past the last index.
    pub fn compact(&mut self, to: u64, batch: &mut WriteBatch) -> Result<u64, StoreError> {
        assert!(
            to <= self.last,
            "{}: compaction to {to} past the last index {}",
            self.shard,
            self.last
        );
        if to <= self.trunc.0 {
            return Ok(0);
        }
        let term = self.term_of(to)?;
        let dropped = to - self.trunc.0;
        batch.delete_range_cf(
            self.engine.cf(crate::storage::Cf::RaftLog),
            keys::log_key(self.shard, self.trunc.0 + 1),
            keys::log_key(self.shard, to + 1),
        );
        batch.put_cf(
            self.engine.cf(crate::storage::Cf::RaftState),
            keys::state_key(self.shard, StateTag::RaftTrunc),
            encode_trunc(to, term),
        );
        self.trunc = (to, term);
        while self.tail.front().is_some_and(|e| e.index <= to) {
            self.tail.pop_front();
        }
        Ok(dropped)
    }

    /// The term of entry `idx`, in the log (past the compaction point, at
    /// most the last index): from the memory tail, else from RocksDB.
    #[inline]
    fn term_of(&self, idx: u64) -> Result<u64, StoreError> {
        if idx >= self.tail_start() {
            return Ok(self.tail[(idx - self.tail_start()) as usize].term);
        }
        Ok(self.read_entries(idx, idx + 1)?[0].term)
    }

    /// Where this group's snapshot requests go ([`Storage::snapshot`]).
    pub fn report_snapshot_requests(&mut self, to: SnapshotRequests) {
        self.wanted = Some(to);
    }

    /// The group's configuration as last applied here.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf
    }

    /// Takes a configuration raft-rs applied (it is persisted by the
    /// apply of its entry: [`GroupStore::stage_conf`]).
    pub fn set_conf(&mut self, conf: ConfState) {
        self.conf = conf;
    }

    /// Stages `shard`'s configuration (voters and learners) into `batch`:
    /// written with the apply of the entry that changed it, so a reopened
    /// group starts from the configuration of what its state machine
    /// applied.
    pub fn stage_conf(
        engine: &Engine,
        shard: ShardId,
        voters: &[u64],
        learners: &[u64],
        batch: &mut WriteBatch,
    ) {
        let mut conf = ConfState::default();
        conf.set_voters(voters.to_vec());
        conf.set_learners(learners.to_vec());
        batch.put_cf(
            engine.cf(crate::storage::Cf::RaftState),
            keys::state_key(shard, StateTag::RaftConf),
            encode(&conf),
        );
    }

    /// Stages into `batch` the Raft state of a replica seeded with a
    /// snapshot of the group's state machine at (`at_index`, `at_term`)
    /// (a replica move's target): the log emptied and starting right after
    /// the snapshot, the hard state at its term with it committed, and the
    /// configuration `voters` (the target is not a member yet: the change
    /// that adds it comes after the snapshot in the log). Written with the
    /// install's last write, so the two agree after any crash. A term or
    /// vote the replica already holds is never lowered or forgotten (a
    /// replica seeded again keeps the later of the two).
    ///
    /// # Errors
    /// The RocksDB error reading the replica's hard state.
    pub fn stage_seed(
        engine: &Engine,
        shard: ShardId,
        voters: &[u64],
        at_index: u64,
        at_term: u64,
        batch: &mut WriteBatch,
    ) -> Result<(), StoreError> {
        let cf = engine.cf(crate::storage::Cf::RaftState);
        let held: HardState = match engine
            .db()
            .get_cf(cf, keys::state_key(shard, StateTag::RaftHard))
            .map_err(|e| StoreError::rocks("read hard state", e))?
        {
            Some(b) => decode(&format!("hard state of {shard}"), &b)?,
            None => HardState::default(),
        };
        batch.delete_range_cf(
            engine.cf(crate::storage::Cf::RaftLog),
            shard.to_be_bytes(),
            keys::shard_prefix_end(shard),
        );
        Self::stage_split_child(engine, shard, voters, at_index, at_term, batch);
        if held.term >= at_term {
            let hard = HardState {
                term: held.term,
                vote: held.vote,
                commit: at_index,
                ..HardState::default()
            };
            batch.put_cf(
                cf,
                keys::state_key(shard, StateTag::RaftHard),
                encode(&hard),
            );
        }
        Ok(())
    }

    /// The last index in the log (0 when empty).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Whether node `id` is a voter of the group's stored configuration.
    pub fn is_voter(&self, id: u64) -> bool {
        self.conf.voters.contains(&id)
    }

    /// The hard state as of the last staged ready (what is stored, except
    /// that the stored commit may be older: [`GroupStore::stage`]).
    pub fn hard_state(&self) -> &HardState {
        &self.hard
    }

    /// Raises the hard state's commit to `applied` when the state machine
    /// is ahead of it (in memory: raft-rs starts from it; nothing is
    /// written). Everything applied was committed, so this only
    /// restores what this replica knew; raft-rs refuses to start with an
    /// applied index past the commit.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when `applied` is past the stored log (the
    /// state machine holds entries the log never had) or behind its
    /// compaction point (it lost entries the log no longer has).
    pub fn commit_at_least(&mut self, applied: u64) -> Result<(), StoreError> {
        if applied < self.trunc.0 {
            // The compaction is written only after the applies it covers
            // (`GroupStore::compact`): a state machine behind it lost them.
            return Err(StoreError::corrupt(
                format!("log of {}", self.shard),
                format!(
                    "the state machine applied {applied}, behind the log's compaction point {}: \
                     the entries in between are gone",
                    self.trunc.0
                ),
            ));
        }
        if applied <= self.hard.commit {
            return Ok(());
        }
        if applied > self.last {
            return Err(StoreError::corrupt(
                format!("log of {}", self.shard),
                format!(
                    "the state machine applied {applied}, past the last entry {}",
                    self.last
                ),
            ));
        }
        self.hard.commit = applied;
        Ok(())
    }

    /// Puts `entries` (replacing any stored suffix from their first index)
    /// and `hard` (when its term or vote changed: a commit is not written
    /// on its own) into `batch`, and makes them readable here at once. The
    /// caller writes `batch` synced before it reports the ready persisted.
    pub fn stage(&mut self, entries: &[Entry], hard: Option<&HardState>, batch: &mut WriteBatch) {
        let log = self.engine.cf(crate::storage::Cf::RaftLog);
        if let Some(first) = entries.first() {
            let from = first.index;
            assert!(
                from > self.trunc.0 && from <= self.last + 1,
                "{}: entries from {from} leave a gap after {} or replace compacted ones (to {})",
                self.shard,
                self.last,
                self.trunc.0
            );
            if from <= self.last {
                // A new leader's entries replace the conflicting suffix.
                batch.delete_range_cf(
                    log,
                    keys::log_key(self.shard, from),
                    keys::log_key(self.shard, self.last + 1),
                );
                let keep = self.tail.iter().take_while(|e| e.index < from).count();
                self.tail.truncate(keep);
            }
            if self.tail.back().is_some_and(|e| e.index + 1 != from) {
                self.tail.clear();
            }
            for e in entries {
                batch.put_cf(log, keys::log_key(self.shard, e.index), encode(e));
                self.tail.push_back(e.clone());
            }
            // Older entries leave the tail, never this ready's own: they are
            // not in RocksDB until the caller writes the batch.
            while self.tail.len() > TAIL_ENTRIES
                && self.tail.front().is_some_and(|e| e.index < from)
            {
                self.tail.pop_front();
            }
            self.last = entries.last().map_or(self.last, |e| e.index);
        }
        if let Some(h) = hard {
            // Term and vote must be durable; the commit need not be (Raft
            // keeps it in volatile state: a restarted replica learns it
            // again from its leader, and starts at least from what its state
            // machine applied, `commit_at_least`). A change of the commit
            // alone, the common one, is not written: about one hard state
            // write per group per round saved.
            if h.term != self.hard.term || h.vote != self.hard.vote {
                batch.put_cf(
                    self.engine.cf(crate::storage::Cf::RaftState),
                    keys::state_key(self.shard, StateTag::RaftHard),
                    encode(h),
                );
            }
            self.hard = h.clone();
        }
    }

    fn tail_start(&self) -> u64 {
        self.tail.front().map_or(self.last + 1, |e| e.index)
    }

    fn read_entries(&self, low: u64, high: u64) -> Result<Vec<Entry>, StoreError> {
        let log = self.engine.cf(crate::storage::Cf::RaftLog);
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(keys::log_key(self.shard, high).to_vec());
        let mut it = self.engine.db().raw_iterator_cf_opt(log, ro);
        it.seek(keys::log_key(self.shard, low));
        let mut out = Vec::with_capacity((high - low) as usize);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let index = keys::log_key_index(self.shard, k);
            if index != low + out.len() as u64 {
                return Err(StoreError::corrupt(
                    format!("log of {}", self.shard),
                    format!(
                        "entry {index} where {} was expected",
                        low + out.len() as u64
                    ),
                ));
            }
            out.push(decode(&format!("entry {index} of {}", self.shard), v)?);
            it.next();
        }
        it.status()
            .map_err(|e| StoreError::rocks("read entries", e))?;
        if out.len() as u64 != high - low {
            return Err(StoreError::corrupt(
                format!("log of {}", self.shard),
                format!("entries {low}..{high} incomplete: {} found", out.len()),
            ));
        }
        Ok(out)
    }
}

impl Storage for GroupStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard.clone(), self.conf.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.trunc.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut out = if low >= self.tail_start() {
            let skip = (low - self.tail_start()) as usize;
            self.tail
                .iter()
                .skip(skip)
                .take((high - low) as usize)
                .cloned()
                .collect()
        } else {
            self.read_entries(low, high).map_err(raft_err)?
        };
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        // The hot case first (raft-rs asks for recent terms with every
        // message): an entry in the log, most often in the memory tail.
        if idx > self.trunc.0 && idx <= self.last {
            return self.term_of(idx).map_err(raft_err);
        }
        if idx == self.trunc.0 {
            // The compaction point (0 before any: term 0).
            return Ok(self.trunc.1);
        }
        if idx < self.trunc.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        // Past the last index.
        Err(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last)
    }

    fn snapshot(&self, _request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // A follower needs entries this log compacted (it was down while
        // the others went on). No raft-rs snapshot: the request is
        // reported, and the node seeds the follower out of band with a
        // snapshot of the state machine, as a move seeds its target; its
        // log then starts after the seed and catches up from here.
        if let Some(w) = &self.wanted {
            w.lock()
                .expect("snapshot requests poisoned")
                .insert((self.shard, to));
        }
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}
