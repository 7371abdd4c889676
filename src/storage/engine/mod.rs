//! The node-wide storage handle.

mod digests;
mod splits;

use super::config::StorageConfig;
use super::error::StoreError;
use super::keys::{self, MetaTag, StateTag, ALL_CFS};
use super::log_store::LogStore;
use super::state_machine::StateMachine;
use super::writer::{
    self, Cf, Counters, FailLatch, GroupLimits, InProgress, OnDurable, WriteInProgress, WriteOp,
    WriteRequest,
};
use super::StorageStats;
use crate::digest::DigestStatus;
use crate::raft::{Entry, LogId, Vote};
use crate::{KeyRange, NodeId, ShardDescriptor, ShardId};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType,
    IteratorMode, Options, DB,
};
use serde::de::DeserializeOwned;
use shard_router::ownership::{Claim, Ownership};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// The node-wide handle on the one RocksDB shared by every shard replica.
///
/// Cheap to clone. The database closes when the last clone (including every
/// store opened from it) is dropped.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// `Some` for the engine's whole life; taken in `drop` to close RocksDB
    /// before `closed` is signalled.
    db: Option<Arc<DB>>,
    config: StorageConfig,
    closed: tokio::sync::watch::Sender<bool>,
    tx: Option<mpsc::Sender<WriteRequest>>,
    writer: Option<std::thread::JoinHandle<()>>,
    counters: Arc<Counters>,
    latch: Arc<FailLatch>,
    /// Writes in progress on the node (see [`Engine::write_in_progress`]).
    in_progress: Arc<InProgress>,
    open_shards: Mutex<HashSet<ShardId>>,
    snapshot_dir: PathBuf,
    snapshot_seq: AtomicU64,
    /// User bytes applied per shard since the engine opened (a hint for
    /// split checks: data still in memtables is not in RocksDB's size
    /// estimates).
    written: Mutex<std::collections::HashMap<ShardId, u64>>,
    /// Shards created by a split applied here, not yet started by the node.
    created: Mutex<Vec<ShardId>>,
    created_signal: Arc<tokio::sync::Notify>,
    /// Which hosted replica owns which user keys (the node's one authority
    /// for every write of user data that is not a plain apply). Applies hold
    /// it shared while they write; installs and deletes hold it exclusively
    /// while they change claims and clear ranges.
    ownership: std::sync::RwLock<Ownership>,
    /// The node this engine belongs to, once told (children of a split are
    /// created only on their members).
    node_id: std::sync::OnceLock<NodeId>,
    /// Called with the shard after every non-empty log append (the node
    /// wakes a sleeping group whose log grows).
    append_hook: std::sync::OnceLock<AppendHook>,
    /// Tombstones held (a gauge for metrics).
    tombstones: AtomicU64,
    /// Each hosted shard's descriptor as last written: the request path
    /// checks epochs here, without a read. Writers publish after their batch
    /// is written; a miss reads under the write lock, so a value read before
    /// a publish can never overwrite it.
    descriptors: std::sync::RwLock<std::collections::HashMap<ShardId, ShardDescriptor>>,
    /// Hosted replicas frozen for a merge (the request path refuses them
    /// without a read); written after the freeze's batch.
    merging: std::sync::RwLock<std::collections::HashMap<ShardId, crate::command::MergeMarker>>,
    /// Replicas whose left neighbour took their range (a merge applied
    /// here), not yet dropped by the node.
    retired: Mutex<Vec<ShardId>>,
    /// Replica digests by (shard, log index), the last few of each shard.
    digests: Mutex<std::collections::BTreeMap<(ShardId, u64), DigestStatus>>,
}

/// Digests a node keeps per shard (older ones are answered `Unknown`).
const DIGESTS_PER_SHARD: usize = 4;

impl Inner {
    fn db(&self) -> &Arc<DB> {
        self.db.as_ref().expect("db open while the engine lives")
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer thread, which releases its DB handle.
        self.tx.take();
        if let Some(h) = self.writer.take() {
            // A durability callback may hold the last handle and run on the
            // writer thread itself: that thread then exits on its own once
            // the queue is closed, and must not wait for itself.
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
        // The writer thread has released its handle; this is the last one.
        // A clean close keeps what a crash would lose (the WAL's unsynced
        // tail: applies written since the last sync), sparing a replay; a
        // fail-stopped engine touches the disk no more.
        if let Some(db) = self.db.take() {
            if self.latch.check().is_ok() {
                if let Err(e) = db.flush_wal(true) {
                    tracing::warn!(error = %e, "could not sync the WAL at close");
                }
            }
            drop(db);
        }
        self.closed.send_replace(true);
    }
}

/// See [`Engine::set_append_hook`].
pub type AppendHook = Box<dyn Fn(ShardId) + Send + Sync>;

/// What one shard replica has on disk (for inspection and recovery checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardState {
    /// The shard's descriptor.
    pub descriptor: ShardDescriptor,
    /// The last saved vote.
    pub vote: Option<Vote>,
    /// The last log id present (or the last purged one when the log is empty).
    pub last_log_id: Option<LogId>,
    /// The last purged log id.
    pub last_purged: Option<LogId>,
    /// The last applied log id.
    pub applied: Option<LogId>,
}

/// Releases a shard's "open" mark when its last store is dropped.
pub(crate) struct ShardGuard {
    engine: Engine,
    shard: ShardId,
}

impl Drop for ShardGuard {
    fn drop(&mut self) {
        self.engine
            .inner
            .open_shards
            .lock()
            .expect("open shards poisoned")
            .remove(&self.shard);
    }
}

type CChar = std::ffi::c_char;

/// A column family's options before the table and compression settings.
///
/// The shard-prefixed column families take RocksDB's memtable insert hint
/// (`memtable_insert_with_hint_prefix_extractor`): each memtable remembers
/// where it last inserted a key of each prefix and starts the next insert
/// of that prefix there instead of at the top of the skip list. A shard's
/// log entries arrive in index order, and its applied index, committed id
/// and session rows are rewritten over and over (each a new version next
/// to the last), so those inserts land beside the previous one of their
/// prefix. Without the hint each is a full skip-list search, measured as
/// the largest single symbol of the write path
/// (`InlineSkipList::FindSpliceForLevel`). The prefix is the shard id for
/// the log, `shard ‖ tag` for the state and meta records. User data keys
/// (`data`) have no such prefix: their inserts are random.
fn cf_base_options(name: &str) -> Result<Options, StoreError> {
    let prefix = match name {
        keys::CF_RAFT_LOG => 8,
        keys::CF_RAFT_STATE | keys::CF_SHARD_META => 9,
        _ => return Ok(Options::default()),
    };
    Options::default()
        .get_options_from_string(format!(
            "memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.{prefix}"
        ))
        .map_err(|e| StoreError::rocks("column family options", e))
}

impl Engine {
    /// Opens (creating if needed) the node's database under
    /// `config.data_dir/db` and starts the log writer.
    ///
    /// # Errors
    /// An invalid config, or RocksDB failing to open.
    pub fn open(config: StorageConfig) -> Result<Engine, StoreError> {
        config.validate()?;
        let db_dir = config.data_dir.join("db");
        let snapshot_dir = config.data_dir.join("snapshots");
        for d in [&db_dir, &snapshot_dir] {
            std::fs::create_dir_all(d).map_err(|e| StoreError::io("create folder", d, e))?;
        }
        let cache = Cache::new_lru_cache(config.block_cache_bytes);
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(4);
        db_opts.set_bytes_per_sync(1 << 20);
        // Small, rarely written CFs (raft_state) would otherwise pin old WAL files.
        db_opts.set_max_total_wal_size(256 << 20);
        // WAL bytes stay in this process until the group commit's sync
        // (or a synced write) flushes them: a process crash then loses what
        // a power cut would, so the crash tests see what a power cut does
        // (a build without the sync fails them), and nothing acknowledged
        // may rely on bytes that were never synced.
        db_opts.set_manual_wal_flush(true);
        let mut cfs = Vec::with_capacity(ALL_CFS.len());
        for name in ALL_CFS {
            let mut o = cf_base_options(name)?;
            let mut t = BlockBasedOptions::default();
            t.set_block_cache(&cache);
            if name == keys::CF_DATA {
                t.set_bloom_filter(10.0, false);
            }
            o.set_block_based_table_factory(&t);
            o.set_compression_type(DBCompressionType::Lz4);
            match name {
                keys::CF_DATA => o.set_write_buffer_size(config.data_memtable_bytes),
                keys::CF_SHARD_META => o.set_write_buffer_size(config.meta_memtable_bytes),
                _ => {}
            }
            cfs.push(ColumnFamilyDescriptor::new(name, o));
        }
        let db = DB::open_cf_descriptors(&db_opts, &db_dir, cfs)
            .map_err(|e| StoreError::rocks("open", e))?;
        let db = Arc::new(db);
        let (ownership, tombstones) = load_ownership(&db)?;
        let counters = Arc::new(Counters::default());
        let latch = Arc::new(FailLatch::default());
        let (tx, rx) = mpsc::channel(config.write_queue_max);
        let limits = GroupLimits {
            requests_max: config.write_group_requests_max,
            bytes_max: config.write_group_bytes_max,
            mode: config.commit_mode,
            linger: std::time::Duration::from_micros(config.group_commit_linger_us),
        };
        let in_progress = Arc::new(InProgress::default());
        let writer = {
            let (db, counters, latch) = (db.clone(), counters.clone(), latch.clone());
            let in_progress = in_progress.clone();
            std::thread::Builder::new()
                .name("tessera-log-writer".into())
                .spawn(move || writer::run(db, rx, limits, counters, latch, in_progress))
                .map_err(|e| StoreError::io("spawn log writer", &db_dir, e))?
        };
        tracing::info!(dir = %config.data_dir.display(), "storage engine open");
        Ok(Engine {
            inner: Arc::new(Inner {
                db: Some(db),
                config,
                closed: tokio::sync::watch::channel(false).0,
                tx: Some(tx),
                writer: Some(writer),
                counters,
                latch,
                in_progress,
                open_shards: Mutex::new(HashSet::new()),
                snapshot_dir,
                snapshot_seq: AtomicU64::new(0),
                created: Mutex::new(Vec::new()),
                written: Mutex::new(std::collections::HashMap::new()),
                created_signal: Arc::new(tokio::sync::Notify::new()),
                ownership: std::sync::RwLock::new(ownership),
                node_id: std::sync::OnceLock::new(),
                append_hook: std::sync::OnceLock::new(),
                tombstones: AtomicU64::new(tombstones),
                descriptors: Default::default(),
                digests: Default::default(),
                merging: Default::default(),
                retired: Default::default(),
            }),
        })
    }

    /// Tells the engine which node it belongs to (once; later calls with
    /// another id are ignored).
    pub fn set_node_id(&self, id: NodeId) {
        let _ = self.inner.node_id.set(id);
    }

    /// Sets what is called with the shard after every non-empty log
    /// append (once; later calls are ignored). It must be cheap and must
    /// not block.
    pub fn set_append_hook(&self, hook: AppendHook) {
        let _ = self.inner.append_hook.set(hook);
    }

    /// Runs the append hook for `shard`, if one is set.
    pub(crate) fn appended(&self, shard: ShardId) {
        if let Some(h) = self.inner.append_hook.get() {
            h(shard);
        }
    }

    /// The node this engine belongs to, when told.
    pub fn node_id(&self) -> Option<NodeId> {
        self.inner.node_id.get().copied()
    }

    /// The node's range ownership (who owns which keys), for reading.
    pub(crate) fn ownership(&self) -> std::sync::RwLockReadGuard<'_, Ownership> {
        self.inner.ownership.read().expect("ownership poisoned")
    }

    /// The node's range ownership, for changing claims.
    pub(crate) fn ownership_mut(&self) -> std::sync::RwLockWriteGuard<'_, Ownership> {
        self.inner.ownership.write().expect("ownership poisoned")
    }

    /// The replica hosted here that owns `key` (see
    /// [`shard_router::ownership`]): at most one, by construction.
    pub fn owner_of(&self, key: &[u8]) -> Option<ShardId> {
        self.ownership().owner(key)
    }

    /// Whether this node's bytes for `range` are `shard`'s own (at range
    /// version `version`): no other replica here claims part of it at the
    /// same or a newer version. Where one does, `shard`'s applies skip those
    /// keys (they are the other replica's), so a read of them through
    /// `shard` would answer another replica's state.
    pub fn owns_range(&self, shard: ShardId, range: &KeyRange, version: u64) -> bool {
        let pieces = self
            .ownership()
            .writable(shard, &user_range(range), version);
        pieces.len() == 1 && pieces[0] == user_range(range)
    }

    /// How many tombstones of removed replicas this node holds.
    pub fn tombstone_count(&self) -> u64 {
        self.inner.tombstones.load(Ordering::Relaxed)
    }

    /// The configuration version a removed replica's tombstone records.
    pub fn tombstone(&self, shard: ShardId) -> Result<Option<u64>, StoreError> {
        self.read_meta(shard, MetaTag::Tombstone)
    }

    /// Drops this handle and waits until every other one (stores, log
    /// readers, snapshot tasks still finishing after a Raft shutdown) is gone
    /// and RocksDB is closed, so the folder can be opened again.
    ///
    /// # Errors
    /// [`StoreError::Failed`] naming the timeout when handles are still held
    /// after `timeout`.
    pub async fn close(self, timeout: std::time::Duration) -> Result<(), StoreError> {
        let mut closed = self.inner.closed.subscribe();
        drop(self);
        let done = tokio::time::timeout(timeout, closed.wait_for(|c| *c)).await;
        match done {
            Ok(_) => Ok(()),
            Err(_) => Err(StoreError::Failed {
                cause: format!("engine still in use {timeout:?} after close"),
            }),
        }
    }

    /// The configuration the engine was opened with.
    pub fn config(&self) -> &StorageConfig {
        &self.inner.config
    }

    /// Counts a write of `shard` that may still bring log appends (a client
    /// write this node leads, a replicated append it received) until the
    /// guard drops. While many more shards are busy than a write group
    /// holds, the log writer may hold the group's sync back a little for the
    /// appends still coming (`group_commit_linger_us`).
    pub fn write_in_progress(&self, shard: ShardId) -> WriteInProgress {
        self.inner.in_progress.start(shard)
    }

    /// Shards with writes in progress on this node (see
    /// [`Engine::write_in_progress`]).
    pub fn busy_shards(&self) -> usize {
        self.inner.in_progress.shards()
    }

    /// The log writer's counters.
    pub fn stats(&self) -> StorageStats {
        self.inner.counters.snapshot()
    }

    /// `Ok` while the engine accepts writes; [`StoreError::Failed`] once a
    /// write or sync failed.
    pub fn check_healthy(&self) -> Result<(), StoreError> {
        self.inner.latch.check()
    }

    /// Every shard replica hosted here, in shard id order.
    pub fn shards(&self) -> Result<Vec<ShardDescriptor>, StoreError> {
        let cf = self.cf(Cf::ShardMeta);
        let mut out = Vec::new();
        for item in self.inner.db().iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| StoreError::rocks("scan shard_meta", e))?;
            if let Some((shard, tag)) = keys::split_tagged(&k) {
                if tag == MetaTag::Descriptor as u8 {
                    let d: ShardDescriptor = decode(&v, || format!("descriptor of {shard}"))?;
                    out.push(d);
                }
            }
        }
        Ok(out)
    }

    /// Registers a new, empty shard replica (durably) so that it can be opened.
    ///
    /// # Errors
    /// [`StoreError::ShardExists`] when the id is taken here.
    pub async fn create_shard(&self, descriptor: &ShardDescriptor) -> Result<(), StoreError> {
        let id = descriptor.id;
        assert!(id <= ShardId::MAX, "shard id {id} is reserved");
        if self
            .read_meta::<ShardDescriptor>(id, MetaTag::Descriptor)?
            .is_some()
        {
            return Err(StoreError::ShardExists { shard: id });
        }
        let tombstone = self.tombstone(id)?;
        if let Some(conf_ver) = tombstone {
            if descriptor.epoch.conf_ver < conf_ver {
                return Err(StoreError::Tombstoned {
                    shard: id,
                    conf_ver,
                });
            }
        }
        let (tx, rx) = oneshot::channel();
        let on_durable: OnDurable = Box::new(move |r| {
            let _ = tx.send(r);
        });
        let ops = vec![
            WriteOp::Put {
                cf: Cf::ShardMeta,
                key: keys::meta_key(id, MetaTag::Descriptor).to_vec(),
                value: encode(descriptor),
            },
            WriteOp::Delete {
                cf: Cf::ShardMeta,
                key: keys::meta_key(id, MetaTag::Tombstone).to_vec(),
            },
        ];
        // An empty replica owns nothing until it applies or installs.
        self.ownership_mut().set(id, claim_of(descriptor, false));
        self.submit(ops, None, Some(on_durable)).await?;
        rx.await.map_err(|_| self.writer_gone())??;
        self.publish_descriptor(descriptor);
        if tombstone.is_some() {
            self.inner.tombstones.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Opens the Raft log store and state machine of a hosted shard, resuming
    /// an interrupted snapshot install first.
    ///
    /// # Errors
    /// [`StoreError::UnknownShard`] when the shard is not hosted here,
    /// [`StoreError::ShardOpen`] when its stores are already open.
    pub fn open_shard(&self, shard: ShardId) -> Result<(LogStore, StateMachine), StoreError> {
        {
            let mut open = self.inner.open_shards.lock().expect("open shards poisoned");
            if !open.insert(shard) {
                return Err(StoreError::ShardOpen { shard });
            }
        }
        let guard = Arc::new(ShardGuard {
            engine: self.clone(),
            shard,
        });
        let sm = StateMachine::open(self.clone(), shard, guard.clone())?;
        let log = LogStore::new(self.clone(), shard, guard);
        Ok((log, sm))
    }

    /// Deletes a replica that is not open: its log, Raft state, metadata and
    /// snapshots, and the part of its range of user data that no other live
    /// replica here owns, in one synced write after everything the log
    /// writer queued before. A tombstone records the configuration version it
    /// was removed at (see [`Engine::create_shard`]).
    ///
    /// # Errors
    /// [`StoreError::ShardOpen`] while its stores are open,
    /// [`StoreError::UnknownShard`] when it is not hosted.
    pub async fn delete_shard(&self, shard: ShardId) -> Result<(), StoreError> {
        if self
            .inner
            .open_shards
            .lock()
            .expect("open shards poisoned")
            .contains(&shard)
        {
            return Err(StoreError::ShardOpen { shard });
        }
        let d = self.descriptor(shard)?;
        // A barrier: whatever the shard's stores queued is written first.
        let (tx, rx) = oneshot::channel();
        let on_durable: OnDurable = Box::new(move |r| {
            let _ = tx.send(r);
        });
        self.submit(Vec::new(), None, Some(on_durable)).await?;
        rx.await.map_err(|_| self.writer_gone())??;
        let engine = self.clone();
        tokio::task::spawn_blocking(move || engine.delete_replica_now(shard, &d))
            .await
            .map_err(|e| StoreError::Failed {
                cause: format!("delete task: {e}"),
            })??;
        let dir = self.shard_snapshot_dir(shard);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(%shard, error = %e, "could not remove the snapshot folder");
            }
        }
        Ok(())
    }

    /// The synced write of [`Engine::delete_shard`], under the ownership
    /// lock so no other replica's claim changes in between.
    fn delete_replica_now(&self, shard: ShardId, d: &ShardDescriptor) -> Result<(), StoreError> {
        self.latch().check()?;
        let mut own = self.ownership_mut();
        let version = own.get(shard).map_or(d.epoch.version, |c| c.version);
        let initialized = own.get(shard).is_some_and(|c| c.initialized);
        let pieces = if initialized {
            own.writable(shard, &user_range(&d.range), version)
        } else {
            Vec::new()
        };
        let (from, to) = (shard.to_be_bytes(), keys::shard_prefix_end(shard));
        let mut b = rocksdb::WriteBatch::default();
        for cf in [Cf::RaftLog, Cf::RaftState, Cf::ShardMeta] {
            b.delete_range_cf(self.cf(cf), from, to);
        }
        for p in &pieces {
            b.delete_range_cf(self.cf(Cf::Data), &p.start, &range_end(p));
        }
        // The configuration version of the removal: the replica's own when
        // it applied its removal (its descriptor no longer lists this node);
        // otherwise the removal came after it, and bumped the version past
        // every configuration that listed this node as a voter. A table
        // still naming it below that is older than the removal.
        let listed = self.node_id().is_some_and(|me| d.replicas.contains(&me));
        let tombstone = d.epoch.conf_ver + u64::from(listed);
        b.put_cf(
            self.cf(Cf::ShardMeta),
            keys::meta_key(shard, MetaTag::Tombstone),
            encode(&tombstone),
        );
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db()
            .write_opt(b, &wo)
            .map_err(|e| StoreError::rocks("delete replica", e))?;
        self.unpublish_descriptor(shard);
        self.publish_merging(shard, None);
        own.remove(shard);
        self.inner.tombstones.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%shard, range = %d.range, cleared = pieces.len(), tombstone, "replica deleted, tombstone left");
        Ok(())
    }

    /// A hosted shard's descriptor (from memory; read once after open).
    ///
    /// # Errors
    /// [`StoreError::UnknownShard`] when the shard is not hosted here.
    pub fn descriptor(&self, shard: ShardId) -> Result<ShardDescriptor, StoreError> {
        if let Some(d) = self
            .inner
            .descriptors
            .read()
            .expect("descriptors poisoned")
            .get(&shard)
        {
            return Ok(d.clone());
        }
        let mut cache = self
            .inner
            .descriptors
            .write()
            .expect("descriptors poisoned");
        if let Some(d) = cache.get(&shard) {
            return Ok(d.clone());
        }
        let d = self
            .read_meta::<ShardDescriptor>(shard, MetaTag::Descriptor)?
            .ok_or(StoreError::UnknownShard { shard })?;
        cache.insert(shard, d.clone());
        Ok(d)
    }

    /// Publishes a descriptor just written to `shard_meta` (call after the
    /// write, never before).
    pub(crate) fn publish_descriptor(&self, d: &ShardDescriptor) {
        self.inner
            .descriptors
            .write()
            .expect("descriptors poisoned")
            .insert(d.id, d.clone());
    }

    /// Forgets a deleted shard's descriptor (after the delete is written).
    fn unpublish_descriptor(&self, shard: ShardId) {
        self.inner
            .descriptors
            .write()
            .expect("descriptors poisoned")
            .remove(&shard);
    }

    /// What a shard replica has on disk.
    pub fn shard_state(&self, shard: ShardId) -> Result<ShardState, StoreError> {
        let descriptor = self
            .read_meta::<ShardDescriptor>(shard, MetaTag::Descriptor)?
            .ok_or(StoreError::UnknownShard { shard })?;
        let last_purged: Option<LogId> = self.read_state(shard, StateTag::Purged)?;
        let last_log_id = self
            .last_log_entry(shard)?
            .map(|e| e.log_id)
            .or(last_purged);
        Ok(ShardState {
            descriptor,
            vote: self.read_state(shard, StateTag::Vote)?,
            last_log_id,
            last_purged,
            applied: self.read_meta(shard, MetaTag::Applied)?,
        })
    }

    /// Reads one user key from this node's data (no Raft read barrier: callers
    /// that need linearizability go through the shard's Raft group first).
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner
            .db()
            .get_cf(self.cf(Cf::Data), key)
            .map_err(|e| StoreError::rocks("get", e))
    }

    /// Up to `limit` user key/value pairs in `[start, end)` (empty `end`: no
    /// bound), in key order, from this node's data.
    pub fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<super::snapshot::Pair>, StoreError> {
        Ok(self.scan_page(start, end, limit, usize::MAX)?.0)
    }

    /// One page of [`Engine::scan`]: up to `limit` pairs whose key and
    /// value bytes add up to at most `bytes_max` (at least one pair when
    /// any is there), and whether pairs remain in `[start, end)`.
    pub fn scan_page(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        bytes_max: usize,
    ) -> Result<(Vec<super::snapshot::Pair>, bool), StoreError> {
        let mut ro = rocksdb::ReadOptions::default();
        if !end.is_empty() {
            ro.set_iterate_upper_bound(end.to_vec());
        }
        let mut it = self.inner.db().raw_iterator_cf_opt(self.cf(Cf::Data), ro);
        it.seek(start);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while it.valid() {
            let (k, v) = (it.key().expect("valid"), it.value().expect("valid"));
            bytes = bytes.saturating_add(k.len() + v.len());
            if out.len() == limit || (bytes > bytes_max && !out.is_empty()) {
                return Ok((out, true));
            }
            out.push((k.to_vec(), v.to_vec()));
            it.next();
        }
        it.status().map_err(|e| StoreError::rocks("scan", e))?;
        Ok((out, false))
    }

    /// The values of `keys`, in order, all read from one RocksDB snapshot;
    /// stops before the value that would take the total past `bytes_max`
    /// (at least one value), so the answer may cover only a prefix of
    /// `keys`.
    pub fn get_many(
        &self,
        keys: &[Vec<u8>],
        bytes_max: usize,
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let snap = self.inner.db().snapshot();
        let mut out = Vec::with_capacity(keys.len());
        let mut bytes = 0usize;
        for k in keys {
            let v = snap
                .get_cf(self.cf(Cf::Data), k)
                .map_err(|e| StoreError::rocks("get", e))?;
            bytes = bytes.saturating_add(k.len() + v.as_ref().map_or(0, Vec::len));
            if bytes > bytes_max && !out.is_empty() {
                break;
            }
            out.push(v);
        }
        Ok(out)
    }

    /// Approximate bytes of user data in `range`: on disk (compressed) plus
    /// what is still in memtables (without them, data not yet flushed
    /// counted as nothing, and a freshly written shard read 0).
    pub fn approximate_size(&self, range: &crate::KeyRange) -> u64 {
        use rocksdb::{AsColumnFamilyRef, AsRawPtr};
        let end = range_end(range);
        let (start_ptr, start_len) = (range.start.as_ptr().cast::<CChar>(), range.start.len());
        let (end_ptr, end_len) = (end.as_ptr().cast::<CChar>(), end.len());
        let mut size = 0u64;
        let mut err: *mut CChar = std::ptr::null_mut();
        let flags = (librocksdb_sys::rocksdb_size_approximation_flags_include_memtable
            | librocksdb_sys::rocksdb_size_approximation_flags_include_files)
            as u8;
        // SAFETY: the database and column family handles live as long as
        // `self` (the engine owns the DB, and handles are never dropped
        // while it is open); the key pointers and lengths describe two live
        // slices for the duration of the call; one range, one output slot.
        unsafe {
            librocksdb_sys::rocksdb_approximate_sizes_cf_with_flags(
                self.inner.db().as_raw_ptr(),
                self.cf(Cf::Data).inner(),
                1,
                &start_ptr,
                &start_len,
                &end_ptr,
                &end_len,
                flags,
                &mut size,
                &mut err,
            );
            if !err.is_null() {
                librocksdb_sys::rocksdb_free(err.cast());
                return 0;
            }
        }
        size
    }

    // ---- crate-internal plumbing ----

    pub(crate) fn db(&self) -> &Arc<DB> {
        self.inner.db()
    }

    pub(crate) fn cf(&self, cf: Cf) -> &ColumnFamily {
        self.inner
            .db()
            .cf_handle(cf.name())
            .expect("column family created at open")
    }

    pub(crate) fn count_apply_write(&self) {
        self.inner
            .counters
            .apply_writes
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_applied(&self, n: u64) {
        self.inner
            .counters
            .commands_applied
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Writes `batch` synced, outside the log writer's groups; any failure
    /// fail-stops the engine (nothing is acknowledged after it).
    ///
    /// # Errors
    /// [`StoreError::Failed`] when the engine has fail-stopped, now or before.
    pub(crate) fn write_synced(
        &self,
        batch: rocksdb::WriteBatch,
        op: &'static str,
    ) -> Result<(), StoreError> {
        self.latch().check()?;
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db()
            .write_opt(batch, &wo)
            .map_err(|e| self.latch().trip(format!("{op}: {e}")))
    }

    /// Writes `batch` without a sync (what it holds is recovered otherwise,
    /// or is a lower bound); a failure fail-stops the engine.
    ///
    /// # Errors
    /// [`StoreError::Failed`] when the engine has fail-stopped, now or before.
    pub(crate) fn write_unsynced(
        &self,
        batch: rocksdb::WriteBatch,
        op: &'static str,
    ) -> Result<(), StoreError> {
        self.latch().check()?;
        self.db()
            .write(batch)
            .map_err(|e| self.latch().trip(format!("{op}: {e}")))
    }

    pub(crate) fn latch(&self) -> &FailLatch {
        &self.inner.latch
    }

    /// The folder holding one shard's snapshot files.
    pub(crate) fn shard_snapshot_dir(&self, shard: ShardId) -> PathBuf {
        self.inner.snapshot_dir.join(shard.0.to_string())
    }

    pub(crate) fn next_snapshot_seq(&self) -> u64 {
        self.inner.snapshot_seq.fetch_add(1, Ordering::AcqRel)
    }

    fn writer_gone(&self) -> StoreError {
        match self.inner.latch.check() {
            Err(e) => e,
            Ok(()) => StoreError::Failed {
                cause: "log writer stopped".into(),
            },
        }
    }

    /// Queues `ops` on the log writer and waits until they are readable.
    pub(crate) async fn submit(
        &self,
        ops: Vec<WriteOp>,
        append_entries: Option<u64>,
        on_durable: Option<OnDurable>,
    ) -> Result<(), StoreError> {
        self.inner.latch.check()?;
        let (written, written_rx) = oneshot::channel();
        let req = WriteRequest {
            ops,
            append_entries,
            written,
            on_durable,
        };
        let tx = self
            .inner
            .tx
            .as_ref()
            .expect("writer queue open while engine lives");
        if let Err(mpsc::error::SendError(req)) = tx.send(req).await {
            let e = self.writer_gone();
            if let Some(cb) = req.on_durable {
                cb(Err(e.clone()));
            }
            return Err(e);
        }
        written_rx.await.map_err(|_| self.writer_gone())?
    }

    pub(crate) fn read_state<T: DeserializeOwned>(
        &self,
        shard: ShardId,
        tag: StateTag,
    ) -> Result<Option<T>, StoreError> {
        self.read_decoded(Cf::RaftState, &keys::state_key(shard, tag), || {
            format!("{tag:?} of {shard}")
        })
    }

    pub(crate) fn read_meta<T: DeserializeOwned>(
        &self,
        shard: ShardId,
        tag: MetaTag,
    ) -> Result<Option<T>, StoreError> {
        self.read_decoded(Cf::ShardMeta, &keys::meta_key(shard, tag), || {
            format!("{tag:?} of {shard}")
        })
    }

    fn read_decoded<T: DeserializeOwned>(
        &self,
        cf: Cf,
        key: &[u8],
        what: impl FnOnce() -> String,
    ) -> Result<Option<T>, StoreError> {
        match self.inner.db().get_pinned_cf(self.cf(cf), key) {
            Ok(Some(v)) => decode(&v, what).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(StoreError::rocks("get", e)),
        }
    }

    /// Tests only (builds with the `failpoints` feature): writes a user
    /// pair on this node alone, behind Raft's back, as a diverged replica
    /// would hold it.
    #[cfg(feature = "failpoints")]
    #[doc(hidden)]
    pub fn write_behind_raft(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.inner
            .db()
            .put_cf(self.cf(Cf::Data), key, value)
            .map_err(|e| StoreError::rocks("write behind raft", e))
    }

    /// The last log entry of `shard`, if its log is not empty.
    pub(crate) fn last_log_entry(&self, shard: ShardId) -> Result<Option<Entry>, StoreError> {
        self.last_log_record(shard, |_, v| {
            decode(v, || format!("last log entry of {shard}"))
        })?
        .transpose()
    }

    /// The index of `shard`'s last log record, whatever its encoding (the
    /// raft-rs groups of `crate::multiraft` store theirs as protobuf).
    pub(crate) fn last_log_index(&self, shard: ShardId) -> Result<Option<u64>, StoreError> {
        self.last_log_record(shard, |k, _| keys::log_key_index(shard, k))
    }

    /// The index of `shard`'s first log record (what purging or compaction
    /// left), whatever its encoding.
    pub(crate) fn first_log_index(&self, shard: ShardId) -> Result<Option<u64>, StoreError> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(keys::log_key(shard, u64::MAX).to_vec());
        let mut it = self
            .inner
            .db()
            .raw_iterator_cf_opt(self.cf(Cf::RaftLog), ro);
        it.seek(keys::log_key(shard, 0));
        if !it.valid() {
            it.status()
                .map_err(|e| StoreError::rocks("seek first log", e))?;
            return Ok(None);
        }
        Ok(Some(keys::log_key_index(
            shard,
            it.key().expect("valid iterator has a key"),
        )))
    }

    /// `read` of the key and value of `shard`'s last log record, if any.
    fn last_log_record<T>(
        &self,
        shard: ShardId,
        read: impl FnOnce(&[u8], &[u8]) -> T,
    ) -> Result<Option<T>, StoreError> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_lower_bound(keys::log_key(shard, 0).to_vec());
        let mut it = self
            .inner
            .db()
            .raw_iterator_cf_opt(self.cf(Cf::RaftLog), ro);
        it.seek_for_prev(keys::log_key(shard, u64::MAX));
        if !it.valid() {
            it.status()
                .map_err(|e| StoreError::rocks("seek last log", e))?;
            return Ok(None);
        }
        let (k, v) = (it.key(), it.value());
        Ok(Some(read(
            k.expect("valid iterator has a key"),
            v.expect("valid iterator has a value"),
        )))
    }
}

/// A replica's claim on the node's key space.
pub(crate) fn claim_of(d: &ShardDescriptor, initialized: bool) -> Claim {
    Claim {
        range: user_range(&d.range),
        version: d.epoch.version,
        initialized,
    }
}

/// `range` with an unbounded end cut at the end of the user key space: the
/// keys above it (the meta shard's records) belong to no data shard.
pub(crate) fn user_range(range: &KeyRange) -> KeyRange {
    KeyRange::new(range.start.clone(), range_end(range))
}

/// The exclusive end key of `range` in the data CF (an unbounded range ends
/// above every valid user key).
pub(crate) fn range_end(range: &KeyRange) -> Vec<u8> {
    if range.is_unbounded() {
        crate::limits::user_keys_end()
    } else {
        range.end.clone()
    }
}

/// Every hosted replica's claim, from `shard_meta`: a replica with an
/// applied log id (or an install in progress) holds state and owns its
/// range.
/// Also counts the tombstones.
fn load_ownership(db: &DB) -> Result<(Ownership, u64), StoreError> {
    let cf = db
        .cf_handle(keys::CF_SHARD_META)
        .expect("column family created at open");
    let mut own = Ownership::default();
    let mut descs: Vec<ShardDescriptor> = Vec::new();
    let mut stateful: HashSet<ShardId> = HashSet::new();
    let mut tombstones = 0u64;
    for item in db.iterator_cf(cf, IteratorMode::Start) {
        let (k, v) = item.map_err(|e| StoreError::rocks("scan shard_meta", e))?;
        if let Some((shard, tag)) = keys::split_tagged(&k) {
            if tag == MetaTag::Descriptor as u8 {
                descs.push(decode(&v, || format!("descriptor of {shard}"))?);
            } else if tag == MetaTag::Applied as u8 || tag == MetaTag::Installing as u8 {
                stateful.insert(shard);
            } else if tag == MetaTag::Tombstone as u8 {
                tombstones += 1;
            }
        }
    }
    for d in descs {
        own.set(d.id, claim_of(&d, stateful.contains(&d.id)));
    }
    Ok((own, tombstones))
}

/// Encodes a record; our own types always encode.
pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("postcard encodes every Tessera record")
}

/// Decodes a stored record, naming it in the error.
pub(crate) fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    what: impl FnOnce() -> String,
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::corrupt(what(), e))
}

/// `fsync` a folder so a rename or create inside it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::io("sync folder", dir, e))
}
