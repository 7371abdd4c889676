//! The node-wide log writer: group commit for every shard's Raft log.
//!
//! Every log-store mutation (appends, truncations, purges, votes, committed
//! ids) from every shard goes through one bounded queue to one thread. The
//! thread takes what is queued (up to the group limits), writes it as one
//! RocksDB `WriteBatch`, tells each submitter its write is readable, then —
//! if any request in the group needs durability — syncs the WAL once and only
//! then fires the durability callbacks. While it syncs, the next group
//! gathers. Requests from one shard keep their order because each shard waits
//! for "written" before submitting its next request.
//!
//! Any failed write or sync fail-stops the writer: the failing group and every
//! later request get [`StoreError::Failed`]; no callback ever reports success
//! after that.

use super::config::CommitMode;
use super::error::StoreError;
use crate::ShardId;
use rocksdb::{WriteBatch, WriteOptions, DB};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Column families a write can touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cf {
    RaftLog,
    RaftState,
    ShardMeta,
    Data,
}

impl Cf {
    pub(crate) fn name(self) -> &'static str {
        use super::keys::*;
        match self {
            Cf::RaftLog => CF_RAFT_LOG,
            Cf::RaftState => CF_RAFT_STATE,
            Cf::ShardMeta => CF_SHARD_META,
            Cf::Data => CF_DATA,
        }
    }
}

/// One mutation inside a request.
#[derive(Debug)]
pub(crate) enum WriteOp {
    Put {
        cf: Cf,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        cf: Cf,
        key: Vec<u8>,
    },
    DeleteRange {
        cf: Cf,
        from: Vec<u8>,
        to: Vec<u8>,
    },
}

impl WriteOp {
    fn bytes(&self) -> usize {
        match self {
            WriteOp::Put { key, value, .. } => key.len() + value.len(),
            WriteOp::Delete { key, .. } => key.len(),
            WriteOp::DeleteRange { from, to, .. } => from.len() + to.len(),
        }
    }
}

/// Runs once the request is durable (or with the error that stopped the engine).
pub(crate) type OnDurable = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// One submission: mutations applied atomically, in order with every earlier
/// submission.
pub(crate) struct WriteRequest {
    pub ops: Vec<WriteOp>,
    /// `Some(n)` for an append of `n` log entries (for the counters).
    pub append_entries: Option<u64>,
    /// Told once the mutations are readable.
    pub written: oneshot::Sender<Result<(), StoreError>>,
    /// Called once the mutations are durable; `None`: durability not needed
    /// by itself (the next sync covers it, WAL order keeps it consistent).
    pub on_durable: Option<OnDurable>,
}

/// Counters of the log writer, read with [`super::Engine::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageStats {
    /// Append requests (one per `append` call).
    pub append_requests: u64,
    /// Log entries appended.
    pub entries_appended: u64,
    /// Write groups written (one `WriteBatch` each).
    pub write_groups: u64,
    /// WAL syncs.
    pub syncs: u64,
    /// Key and value bytes written by the writer.
    pub bytes_written: u64,
    /// Requests written (appends, votes, truncations, purges...).
    pub requests_written: u64,
    /// Normal (client) log entries applied by the state machines.
    pub commands_applied: u64,
    /// The state machines' writes (one `WriteBatch` each; the batch
    /// system's shards share one per round).
    pub apply_writes: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    append_requests: AtomicU64,
    entries_appended: AtomicU64,
    write_groups: AtomicU64,
    syncs: AtomicU64,
    bytes_written: AtomicU64,
    requests_written: AtomicU64,
    pub(crate) commands_applied: AtomicU64,
    pub(crate) apply_writes: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> StorageStats {
        StorageStats {
            append_requests: self.append_requests.load(Ordering::Acquire),
            entries_appended: self.entries_appended.load(Ordering::Acquire),
            write_groups: self.write_groups.load(Ordering::Acquire),
            syncs: self.syncs.load(Ordering::Acquire),
            bytes_written: self.bytes_written.load(Ordering::Acquire),
            requests_written: self.requests_written.load(Ordering::Acquire),
            commands_applied: self.commands_applied.load(Ordering::Acquire),
            apply_writes: self.apply_writes.load(Ordering::Acquire),
        }
    }
}

/// The fail-stop latch shared by the writer and every store.
#[derive(Default)]
pub(crate) struct FailLatch {
    cause: Mutex<Option<String>>,
}

impl FailLatch {
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        match &*self.cause.lock().expect("fail latch poisoned") {
            Some(cause) => Err(StoreError::Failed {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Latches the first cause; returns the error to hand out.
    pub(crate) fn trip(&self, cause: String) -> StoreError {
        let mut g = self.cause.lock().expect("fail latch poisoned");
        let cause = g.get_or_insert(cause).clone();
        tracing::error!(%cause, "storage fail-stopped");
        StoreError::Failed { cause }
    }
}

pub(crate) struct GroupLimits {
    pub requests_max: usize,
    pub bytes_max: usize,
    pub mode: CommitMode,
    /// Longest a sync is held back for more appends (zero: never).
    pub linger: Duration,
}

/// One wait of a lingering group: short enough that a lull ends the linger
/// soon after it starts.
pub(crate) const LINGER_SLICE: Duration = Duration::from_micros(500);

/// Shards with writes in progress on the node that may still bring log
/// appends (client writes this node leads, replicated appends it received).
/// One shard's writes share its next append, so the log writer looks at
/// how many distinct shards are busy, not how many writes.
#[derive(Debug, Default)]
pub(crate) struct InProgress {
    per_shard: Mutex<HashMap<ShardId, u32>>,
    shards: AtomicUsize,
}

impl InProgress {
    pub(crate) fn start(self: &Arc<Self>, shard: ShardId) -> WriteInProgress {
        let mut m = self.per_shard.lock().expect("in-progress map poisoned");
        let n = m.entry(shard).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.shards.fetch_add(1, Ordering::AcqRel);
        }
        WriteInProgress {
            of: self.clone(),
            shard,
        }
    }

    pub(crate) fn shards(&self) -> usize {
        self.shards.load(Ordering::Acquire)
    }
}

/// Counts one write of a shard as in progress until dropped (see
/// [`super::Engine::write_in_progress`]).
#[derive(Debug)]
pub struct WriteInProgress {
    of: Arc<InProgress>,
    shard: ShardId,
}

impl Drop for WriteInProgress {
    fn drop(&mut self) {
        let mut m = self.of.per_shard.lock().expect("in-progress map poisoned");
        if let Some(n) = m.get_mut(&self.shard) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.shard);
                self.of.shards.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// Busy shards beyond those in the group that make a sync worth holding
/// back: with fewer, the wait adds latency that fewer syncs do not repay
/// (measured: 8 writing clients over 64 shards lost a third of their
/// throughput to a linger that 64 clients gain from).
pub(crate) const LINGER_OTHER_SHARDS_MIN: usize = 8;

/// What a group looks like when the writer decides whether to wait one more
/// slice before its write and sync.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LingerState {
    /// The group needs a sync (waiting only ever helps syncs).
    pub needs_sync: bool,
    /// Append requests in the group (one shard each: a shard submits its
    /// next request only once its last one is written).
    pub appends: usize,
    /// Shards with writes in progress on the node.
    pub busy_shards: usize,
    /// Time already spent waiting for this group.
    pub waited: Duration,
    /// The last slice brought at least one request (true before the first).
    pub last_slice_brought: bool,
    /// The group reached its request or byte limit.
    pub full: bool,
}

/// Whether to wait one more [`LINGER_SLICE`] before writing and syncing: only
/// for a group that needs a sync, is not full, while at least
/// [`LINGER_OTHER_SHARDS_MIN`] busy shards are not in it (their appends are
/// coming), until it has waited its cap or a slice brought nothing (a lull
/// means nothing more is coming soon).
pub(crate) fn linger_more(s: LingerState, cap: Duration) -> bool {
    s.needs_sync
        && !s.full
        && s.busy_shards >= s.appends + LINGER_OTHER_SHARDS_MIN
        && s.last_slice_brought
        && s.waited + LINGER_SLICE <= cap
}

/// Body of the writer thread; returns when every sender is gone.
pub(crate) fn run(
    db: Arc<DB>,
    mut rx: mpsc::Receiver<WriteRequest>,
    limits: GroupLimits,
    counters: Arc<Counters>,
    latch: Arc<FailLatch>,
    in_progress: Arc<InProgress>,
) {
    let mut no_sync = WriteOptions::default();
    no_sync.set_sync(false);
    let mut group: Vec<WriteRequest> = Vec::with_capacity(limits.requests_max.min(1024));
    while let Some(first) = rx.blocking_recv() {
        let mut bytes: usize = first.ops.iter().map(WriteOp::bytes).sum();
        group.push(first);
        if limits.mode == CommitMode::GroupCommit {
            gather(&mut rx, &mut group, &mut bytes, &limits);
            let mut waited = Duration::ZERO;
            let mut brought = true;
            while linger_more(
                LingerState {
                    needs_sync: group.iter().any(|r| r.on_durable.is_some()),
                    appends: group.iter().filter(|r| r.append_entries.is_some()).count(),
                    busy_shards: in_progress.shards(),
                    waited,
                    last_slice_brought: brought,
                    full: group.len() >= limits.requests_max || bytes >= limits.bytes_max,
                },
                limits.linger,
            ) {
                std::thread::sleep(LINGER_SLICE);
                waited += LINGER_SLICE;
                brought = gather(&mut rx, &mut group, &mut bytes, &limits) > 0;
            }
        }
        write_group(&db, &no_sync, &mut group, bytes, &counters, &latch);
        group.clear();
    }
}

/// Adds what is queued to `group`, up to the group limits; returns how many
/// requests it took.
fn gather(
    rx: &mut mpsc::Receiver<WriteRequest>,
    group: &mut Vec<WriteRequest>,
    bytes: &mut usize,
    limits: &GroupLimits,
) -> usize {
    let before = group.len();
    while group.len() < limits.requests_max && *bytes < limits.bytes_max {
        match rx.try_recv() {
            Ok(req) => {
                *bytes += req.ops.iter().map(WriteOp::bytes).sum::<usize>();
                group.push(req);
            }
            Err(_) => break,
        }
    }
    group.len() - before
}

#[allow(clippy::redundant_closure_call)] // the closures hold failpoints (empty without the feature)
fn write_group(
    db: &DB,
    no_sync: &WriteOptions,
    group: &mut Vec<WriteRequest>,
    bytes: usize,
    counters: &Counters,
    latch: &FailLatch,
) {
    if let Err(e) = latch.check() {
        return fail_all(group, e);
    }
    let mut batch = WriteBatch::default();
    let mut appends = 0u64;
    let mut entries = 0u64;
    for req in group.iter_mut() {
        if let Some(n) = req.append_entries {
            appends += 1;
            entries += n;
        }
        for op in req.ops.drain(..) {
            match op {
                WriteOp::Put { cf, key, value } => batch.put_cf(&handle(db, cf), key, value),
                WriteOp::Delete { cf, key } => batch.delete_cf(&handle(db, cf), key),
                WriteOp::DeleteRange { cf, from, to } => {
                    batch.delete_range_cf(&handle(db, cf), from, to)
                }
            }
        }
    }
    let written = (|| -> Result<(), String> {
        fail::fail_point!(
            "log_writer::write",
            |_| Err("injected write failure".into())
        );
        db.write_opt(batch, no_sync).map_err(|e| e.into_string())
    })();
    if let Err(cause) = written {
        let e = latch.trip(format!("log write: {cause}"));
        return fail_all(group, e);
    }
    counters.write_groups.fetch_add(1, Ordering::AcqRel);
    counters
        .requests_written
        .fetch_add(group.len() as u64, Ordering::AcqRel);
    counters
        .append_requests
        .fetch_add(appends, Ordering::AcqRel);
    counters
        .entries_appended
        .fetch_add(entries, Ordering::AcqRel);
    counters
        .bytes_written
        .fetch_add(bytes as u64, Ordering::AcqRel);
    let mut durable = Vec::new();
    for req in group.drain(..) {
        // A submitter that gave up waiting is no reason to stop.
        let _ = req.written.send(Ok(()));
        if let Some(cb) = req.on_durable {
            durable.push(cb);
        }
    }
    if durable.is_empty() {
        return;
    }
    let synced = (|| -> Result<(), String> {
        fail::fail_point!("log_writer::sync", |_| Err("injected sync failure".into()));
        // The mutation check of the crash test: a build that reports
        // durability without syncing must be caught by it.
        fail::fail_point!("log_writer::skip_sync", |_| Ok(()));
        db.flush_wal(true).map_err(|e| e.into_string())
    })();
    match synced {
        Ok(()) => {
            counters.syncs.fetch_add(1, Ordering::AcqRel);
            for cb in durable {
                cb(Ok(()));
            }
        }
        Err(cause) => {
            let e = latch.trip(format!("log sync: {cause}"));
            for cb in durable {
                cb(Err(e.clone()));
            }
        }
    }
}

fn fail_all(group: &mut Vec<WriteRequest>, e: StoreError) {
    for req in group.drain(..) {
        let _ = req.written.send(Err(e.clone()));
        if let Some(cb) = req.on_durable {
            cb(Err(e.clone()));
        }
    }
}

fn handle(db: &DB, cf: Cf) -> &rocksdb::ColumnFamily {
    db.cf_handle(cf.name())
        .expect("column family created at open")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn state() -> impl Strategy<Value = LingerState> {
        (
            any::<bool>(),
            0usize..64,
            0usize..64,
            0u64..20,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(needs_sync, appends, busy_shards, slices, last_slice_brought, full)| {
                    LingerState {
                        needs_sync,
                        appends,
                        busy_shards,
                        waited: LINGER_SLICE * slices as u32,
                        last_slice_brought,
                        full,
                    }
                },
            )
    }

    proptest! {
        /// A linger never passes its cap, never holds a group that needs no
        /// sync or is full, never waits for appends no one is writing, and
        /// ends at the first empty slice.
        #[test]
        fn linger_is_bounded_and_only_under_demand(s in state(), cap_slices in 0u32..16) {
            let cap = LINGER_SLICE * cap_slices;
            if linger_more(s, cap) {
                prop_assert!(s.waited + LINGER_SLICE <= cap);
                prop_assert!(s.needs_sync && !s.full && s.last_slice_brought);
                prop_assert!(s.busy_shards >= s.appends + LINGER_OTHER_SHARDS_MIN);
            }
        }

        /// Under demand, a group that needs a sync waits while its cap
        /// allows.
        #[test]
        fn lingers_while_more_writes_are_coming(appends in 0usize..32, more in 0usize..32, slices in 0u32..8) {
            let s = LingerState {
                needs_sync: true,
                appends,
                busy_shards: appends + LINGER_OTHER_SHARDS_MIN + more,
                waited: LINGER_SLICE * slices,
                last_slice_brought: true,
                full: false,
            };
            prop_assert!(linger_more(s, LINGER_SLICE * (slices + 1)));
            prop_assert!(!linger_more(s, Duration::ZERO));
        }
    }

    /// A few busy shards (a lone writer, one shard under any load) are never
    /// held back.
    #[test]
    fn few_busy_shards_never_wait() {
        let s = LingerState {
            needs_sync: true,
            appends: 1,
            busy_shards: LINGER_OTHER_SHARDS_MIN,
            waited: Duration::ZERO,
            last_slice_brought: true,
            full: false,
        };
        assert!(!linger_more(s, Duration::from_millis(100)));
    }
}
