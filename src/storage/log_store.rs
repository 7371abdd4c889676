//! openraft's `RaftLogStorage` for one shard, on the node-wide engine.

use super::engine::{decode, encode, Engine, ShardGuard};
use super::error::StoreError;
use super::keys::{self, StateTag};
use super::log_tail::{LogTail, TailLimits};
use super::writer::{Cf, OnDurable, WriteOp};
use crate::raft::{Entry, LogId, TypeConfig, Vote};
use crate::ShardId;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Entries returned by one bounded read (`limited_get_log_entries`).
const READ_ENTRIES_MAX: usize = 4096;
/// Bytes returned by one bounded read (at least one entry is always returned).
const READ_BYTES_MAX: usize = 8 << 20;
/// How often one shard's committed log id is written (see `save_committed`).
const COMMITTED_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether `save_committed` writes now: its first call on this store, then
/// at most once per [`COMMITTED_SAVE_INTERVAL`].
fn committed_save_due(last: Option<std::time::Instant>, now: std::time::Instant) -> bool {
    last.is_none_or(|l| now.saturating_duration_since(l) >= COMMITTED_SAVE_INTERVAL)
}

/// The Raft log (and vote) of one shard replica. Cloning gives a log reader
/// that shares the in-memory tail and vote.
#[derive(Clone)]
pub struct LogStore {
    engine: Engine,
    shard: ShardId,
    /// The newest entries, as stored (replication and apply read them from
    /// here). Only this store writes the shard's log (the guard), so the
    /// tail cannot go stale behind its back.
    tail: Arc<Mutex<LogTail<Entry>>>,
    /// The vote as last saved or read (`None`: not read yet).
    vote: Arc<Mutex<Option<Option<Vote>>>>,
    /// When `save_committed` last wrote (`None`: not yet).
    committed_saved_at: Arc<Mutex<Option<std::time::Instant>>>,
    _guard: Arc<ShardGuard>,
}

impl LogStore {
    pub(crate) fn new(engine: Engine, shard: ShardId, guard: Arc<ShardGuard>) -> Self {
        LogStore {
            engine,
            shard,
            tail: Arc::new(Mutex::new(LogTail::new(TailLimits::default()))),
            vote: Arc::new(Mutex::new(None)),
            committed_saved_at: Arc::new(Mutex::new(None)),
            _guard: guard,
        }
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, LogTail<Entry>> {
        self.tail.lock().expect("log tail poisoned")
    }

    /// The shard this log belongs to.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// Appends `entries`: readable when this returns, durable when `on_durable`
    /// is called with `Ok` (after the sync that covers them). With an error,
    /// `on_durable` gets it too and nothing of this call is acknowledged.
    ///
    /// This is what `RaftLogStorage::append` does with openraft's callback.
    pub async fn append_entries<F>(
        &self,
        entries: Vec<Entry>,
        on_durable: F,
    ) -> Result<(), StoreError>
    where
        F: FnOnce(Result<(), StoreError>) + Send + 'static,
    {
        let n = entries.len() as u64;
        let Some(start) = entries.first().map(|e| e.log_id.index) else {
            let cb: OnDurable = Box::new(on_durable);
            return self.engine.submit(Vec::new(), Some(0), Some(cb)).await;
        };
        let mut sizes = Vec::with_capacity(entries.len());
        let ops = entries
            .iter()
            .map(|e| {
                let value = encode(e);
                sizes.push(value.len());
                WriteOp::Put {
                    cf: Cf::RaftLog,
                    key: keys::log_key(self.shard, e.log_id.index).to_vec(),
                    value,
                }
            })
            .collect();
        let cb: OnDurable = Box::new(on_durable);
        let written = self.engine.submit(ops, Some(n), Some(cb)).await;
        match &written {
            Ok(()) => {
                self.tail().append(start, sizes.into_iter().zip(entries));
                self.engine.appended(self.shard);
            }
            // Whatever happened to the write, the tail must not claim it.
            Err(_) => self.tail().truncate_from(start),
        }
        written
    }

    /// Entries `[start, end)`: from the in-memory tail where it holds them,
    /// from RocksDB below it.
    fn read_range(&self, start: u64, end: u64, bounded: bool) -> Result<Vec<Entry>, StoreError> {
        if start >= end {
            return Ok(Vec::new());
        }
        let (max_entries, max_bytes) = if bounded {
            (READ_ENTRIES_MAX, READ_BYTES_MAX)
        } else {
            (usize::MAX, usize::MAX)
        };
        let tail_first = {
            let tail = self.tail();
            if let Some(hit) = tail.read(start, end, max_entries, max_bytes) {
                return Ok(hit);
            }
            tail.first()
        };
        // Below the tail: RocksDB up to where the tail starts, then the tail
        // (read again: it may have shed entries meanwhile, which are then in
        // RocksDB and read from there next time).
        let db_end = tail_first.map_or(end, |f| f.min(end));
        let (mut out, bytes, cut) = self.read_db(start, db_end, bounded)?;
        if !cut && db_end < end {
            // What is left of the bounds goes to the tail's part.
            let left = (max_entries - out.len(), max_bytes.saturating_sub(bytes));
            if let Some(more) = self.tail().read(db_end, end, left.0, left.1) {
                out.extend(more);
            }
        }
        Ok(out)
    }

    /// Entries `[start, end)` from RocksDB, their encoded bytes, and whether
    /// the read stopped at its bounds before `end`.
    fn read_db(
        &self,
        start: u64,
        end: u64,
        bounded: bool,
    ) -> Result<(Vec<Entry>, usize, bool), StoreError> {
        let mut out = Vec::new();
        if start >= end {
            return Ok((out, 0, false));
        }
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(keys::log_key(self.shard, end).to_vec());
        let mut it = self
            .engine
            .db()
            .raw_iterator_cf_opt(self.engine.cf(Cf::RaftLog), ro);
        it.seek(keys::log_key(self.shard, start));
        let (mut bytes, mut cut) = (0usize, false);
        while it.valid() {
            let (k, v) = (it.key().expect("valid"), it.value().expect("valid"));
            let index = keys::log_key_index(self.shard, k);
            let entry: Entry = decode(v, || format!("log entry {index} of {}", self.shard))?;
            assert_eq!(
                entry.log_id.index, index,
                "log entry stored under another index"
            );
            bytes += v.len();
            out.push(entry);
            if bounded && (out.len() >= READ_ENTRIES_MAX || bytes >= READ_BYTES_MAX) {
                cut = true;
                break;
            }
            it.next();
        }
        it.status().map_err(|e| StoreError::rocks("read log", e))?;
        Ok((out, bytes, cut))
    }

    async fn write(&self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        self.engine.submit(ops, None, None).await
    }
}

/// openraft's storage traits speak `io::Error`; the typed cause is kept
/// inside it.
pub(crate) fn to_io(e: StoreError) -> io::Error {
    io::Error::other(e)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        self.read_range(start, end, false).map_err(to_io)
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, io::Error> {
        self.read_range(start, end, true).map_err(to_io)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        // Held across the read: a save in flight sets the cache last, so a
        // value read here before it cannot overwrite it.
        let mut cached = self.vote.lock().expect("vote poisoned");
        if let Some(v) = *cached {
            return Ok(v);
        }
        let v: Option<Vote> = self
            .engine
            .read_state(self.shard, StateTag::Vote)
            .map_err(to_io)?;
        *cached = Some(v);
        Ok(v)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogId> = self
            .engine
            .read_state(self.shard, StateTag::Purged)
            .map_err(to_io)?;
        let last = self.engine.last_log_entry(self.shard).map_err(to_io)?;
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.map(|e| e.log_id).or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let verr = to_io;
        let (tx, rx) = oneshot::channel();
        let cb: OnDurable = Box::new(move |r| {
            let _ = tx.send(r);
        });
        let op = WriteOp::Put {
            cf: Cf::RaftState,
            key: keys::state_key(self.shard, StateTag::Vote).to_vec(),
            value: encode(vote),
        };
        // Unknown until the save is durable (or failed).
        *self.vote.lock().expect("vote poisoned") = None;
        self.engine
            .submit(vec![op], None, Some(cb))
            .await
            .map_err(verr)?;
        rx.await
            .map_err(|_| {
                verr(StoreError::Failed {
                    cause: "log writer stopped".into(),
                })
            })?
            .map_err(verr)?;
        *self.vote.lock().expect("vote poisoned") = Some(Some(*vote));
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Written at most once a second per shard: a saved committed id is
        // only a lower bound that lets a restart re-apply entries at once
        // (openraft starts from the greater of it and the state machine's
        // applied id, and re-applies the rest when it learns the cluster's
        // commit). The state machine writes its applied id with the data
        // right after this call anyway, so a write per commit (one per
        // shard per Raft round, on every node: a whole RocksDB write each)
        // bought almost nothing. Reads never see a state older than one
        // they saw before a restart: every read is linearizable (the read
        // index waits for the apply).
        {
            let mut at = self
                .committed_saved_at
                .lock()
                .expect("committed save time poisoned");
            let now = std::time::Instant::now();
            if !committed_save_due(*at, now) {
                return Ok(());
            }
            *at = Some(now);
        }
        // Written at once, not through the log writer's queue: openraft
        // awaits this in its core loop, and behind a group that is syncing
        // it held up the group's next append (a follower learns a commit
        // with the next entries). Unsynced, like the queue's own write of
        // it: every entry up to `committed` was written before (openraft
        // commits only appended entries, and `append` returns once they
        // are written), so the WAL holds them ahead of this and a crash
        // cannot keep this without them.
        self.engine.latch().check().map_err(to_io)?;
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(false);
        self.engine
            .db()
            .put_cf_opt(
                self.engine.cf(Cf::RaftState),
                keys::state_key(self.shard, StateTag::Committed),
                encode(&committed),
                &wo,
            )
            .map_err(|e| to_io(StoreError::rocks("save committed", e)))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        let c: Option<Option<LogId>> = self
            .engine
            .read_state(self.shard, StateTag::Committed)
            .map_err(to_io)?;
        Ok(c.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        self.append_entries(entries, move |r| callback.io_completed(r.map_err(to_io)))
            .await
            .map_err(to_io)
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> Result<(), io::Error> {
        tracing::debug!(shard = %self.shard, ?last, "truncate log after");
        let from = last.map_or(0, |l| l.index + 1);
        self.tail().truncate_from(from);
        let op = WriteOp::DeleteRange {
            cf: Cf::RaftLog,
            from: keys::log_key(self.shard, from).to_vec(),
            to: keys::shard_prefix_end(self.shard).to_vec(),
        };
        self.write(vec![op]).await.map_err(to_io)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        tracing::debug!(shard = %self.shard, %log_id, "purge log");
        self.tail().purge_to(log_id.index);
        // One batch: the purged marker and the deletion land together, so the
        // log never has a hole below a present entry.
        let ops = vec![
            WriteOp::Put {
                cf: Cf::RaftState,
                key: keys::state_key(self.shard, StateTag::Purged).to_vec(),
                value: encode(&log_id),
            },
            WriteOp::DeleteRange {
                cf: Cf::RaftLog,
                from: keys::log_key(self.shard, 0).to_vec(),
                to: keys::log_key(self.shard, log_id.index + 1).to_vec(),
            },
        ];
        self.write(ops).await.map_err(to_io)
    }
}

#[cfg(test)]
mod tests {
    use super::{committed_save_due, COMMITTED_SAVE_INTERVAL};
    use std::time::{Duration, Instant};

    #[test]
    fn the_first_committed_id_is_saved_then_at_most_once_an_interval() {
        let t0 = Instant::now();
        assert!(committed_save_due(None, t0), "the first save writes");
        assert!(!committed_save_due(Some(t0), t0));
        assert!(!committed_save_due(
            Some(t0),
            t0 + COMMITTED_SAVE_INTERVAL - Duration::from_millis(1)
        ));
        assert!(committed_save_due(Some(t0), t0 + COMMITTED_SAVE_INTERVAL));
        // A clock that seems to go back never saves early.
        assert!(!committed_save_due(Some(t0 + Duration::from_secs(5)), t0));
    }
}
