//! openraft's `RaftStateMachine` for one shard: user data in the shared `data`
//! column family, the shard's applied state in `shard_meta`, snapshots as
//! files under `snapshots/<shard>/`.

mod apply;
mod merge;
mod sessions;
mod snapshot;
mod split;

pub use apply::apply_together;
use sessions::load_sessions;
use sessions::read_sessions;
pub(crate) use sessions::session_iter;
pub use snapshot::{export_now, SnapshotBuilder};
use snapshot::{install_file, link_or_copy, new_snapshot_name, remove_snapshot_files_except};
use split::epoch_newer;

use super::engine::{
    claim_of, decode, encode, range_end, sync_dir, user_range, Engine, ShardGuard,
};
use super::error::StoreError;
use super::keys::{self, MetaTag, StateTag};
use super::log_store::to_io;
use super::snapshot::{Pair, SnapshotData, SnapshotHeader, SnapshotReader, SnapshotWriter};
use super::writer::Cf;
use crate::command::{Command, CommandResponse, MergeMarker, Op, OpResult};
use crate::meta;
use crate::raft::{
    Entry, EntryPayload, LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig, Vote,
};
use crate::session::{Changes, ClientId, Saved, Session, SessionTable, Verdict};
use crate::{Epoch, KeyRange, ShardDescriptor, ShardId};
use futures_util::StreamExt;
use openraft::storage::{ApplyResponder, EntryResponder, RaftStateMachine};
use openraft::RaftSnapshotBuilder;
use rocksdb::{WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// The shard's current snapshot, as recorded in `shard_meta`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct SnapshotRecord {
    meta: SnapshotMeta,
    /// File name inside the shard's snapshot folder.
    file: String,
}

/// Marks an install in progress; cleared in the install's last batch. Found at
/// open, the install is redone from the (complete, synced) file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct InstallMarker {
    meta: SnapshotMeta,
    file: String,
}

pub(super) type Current = Arc<Mutex<Option<SnapshotRecord>>>;

/// A finished snapshot file and its metadata.
pub(super) type BuiltSnapshot = (SnapshotMeta, PathBuf);

/// The state machine of one shard replica.
pub struct StateMachine {
    engine: Engine,
    shard: ShardId,
    _guard: Arc<ShardGuard>,
    applied: Option<LogId>,
    membership: StoredMembership,
    descriptor: ShardDescriptor,
    current: Current,
    /// Parts of this replica's range that newer replicas on this node own
    /// (it lags behind a split they come from), with the ownership
    /// generation they were computed at.
    shadows: (u64, Vec<KeyRange>),
    /// The shard's client sessions (exactly-once writes), as of `applied`.
    sessions: SessionTable,
    /// The shard's freeze for a merge into its left neighbour, if frozen.
    merging: Option<MergeMarker>,
    /// Set by an apply that changed `merging` (published after the batch).
    merge_changed: bool,
    /// Set by an apply whose batch must be synced (a merge freeze).
    sync_batch: bool,
    /// Whether the shard runs on the batch Raft system
    /// ([`crate::multiraft`]): a split then creates its child there (Raft
    /// state as [`crate::multiraft::GroupStore`] keeps it), and the child
    /// is handed to the batch loop ([`StateMachine::take_batch_created`])
    /// instead of the node's openraft start-up.
    on_batch: bool,
    /// Children created by splits applied here on the batch system, not
    /// yet taken by the loop.
    batch_created: Vec<ShardId>,
}

/// Entries applied in one `WriteBatch` at most (a long catch-up after a
/// restart is applied in bounded pieces).
pub(super) const APPLY_CHUNK_MAX: usize = 1024;
impl StateMachine {
    pub(crate) fn open(
        engine: Engine,
        shard: ShardId,
        guard: Arc<ShardGuard>,
    ) -> Result<Self, StoreError> {
        let dir = engine.shard_snapshot_dir(shard);
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::io("create folder", &dir, e))?;
        let current: Current = Arc::new(Mutex::new(engine.read_meta(shard, MetaTag::Snapshot)?));
        if let Some(m) = engine.read_meta::<InstallMarker>(shard, MetaTag::Installing)? {
            tracing::warn!(%shard, snapshot = %m.file, "resuming an interrupted snapshot install");
            install_file(&engine, shard, &dir.join(&m.file), &m.meta, &current)?;
        }
        let descriptor = engine
            .read_meta::<ShardDescriptor>(shard, MetaTag::Descriptor)?
            .ok_or(StoreError::UnknownShard { shard })?;
        let keep = current
            .lock()
            .expect("current snapshot poisoned")
            .as_ref()
            .map(|r| r.file.clone());
        remove_snapshot_files_except(&dir, keep.as_deref());
        let sessions = load_sessions(&engine, shard)?;
        let merging: Option<MergeMarker> = engine.read_meta(shard, MetaTag::Merge)?;
        engine.publish_merging(shard, merging.clone());
        Ok(StateMachine {
            sessions,
            merging,
            merge_changed: false,
            sync_batch: false,
            applied: engine.read_meta(shard, MetaTag::Applied)?,
            membership: engine
                .read_meta(shard, MetaTag::Membership)?
                .unwrap_or_default(),
            descriptor,
            engine,
            shard,
            _guard: guard,
            current,
            shadows: (u64::MAX, Vec::new()),
            on_batch: false,
            batch_created: Vec::new(),
        })
    }

    /// Marks the shard as running on the batch Raft system (see
    /// [`StateMachine::take_batch_created`]).
    pub fn run_on_batch(&mut self) {
        self.on_batch = true;
    }

    /// The shards created by splits this batch-system replica applied since
    /// the last call (their state is written: each can be opened with
    /// [`crate::storage::Engine::open_shard`] and its group started).
    pub fn take_batch_created(&mut self) -> Vec<ShardId> {
        std::mem::take(&mut self.batch_created)
    }

    /// The shard's voters, sorted, when no membership change is under way
    /// (why not, otherwise). The batch system changes no membership yet:
    /// its voters are the descriptor's replicas.
    pub(super) fn voters(&self) -> Result<Vec<crate::NodeId>, String> {
        if self.on_batch {
            let mut v = self.descriptor.replicas.clone();
            v.sort();
            return Ok(v);
        }
        crate::raft::settled_voters(self.membership.membership())
    }

    /// The engine this state machine writes to.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Refreshes [`StateMachine::shadows`] when ownership changed.
    pub(super) fn refresh_shadows(&mut self, own: &shard_router::Ownership) {
        if self.shadows.0 != own.generation() {
            self.shadows = (
                own.generation(),
                own.shadows(
                    self.shard,
                    &user_range(&self.descriptor.range),
                    self.descriptor.epoch.version,
                ),
            );
        }
    }

    /// Whether a newer replica on this node owns `key` (old writes replayed
    /// by this lagging replica must not touch it).
    pub(super) fn shadowed(&self, key: &[u8]) -> bool {
        self.shadows.1.iter().any(|r| r.contains(key))
    }

    /// The shard this state machine belongs to.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// The shard's descriptor as of the last applied entry.
    pub fn descriptor(&self) -> &ShardDescriptor {
        &self.descriptor
    }

    /// The last applied log id.
    pub fn applied(&self) -> Option<LogId> {
        self.applied
    }

    pub(super) fn read_current(
        &self,
        key: &[u8],
        overlay: &HashMap<Vec<u8>, Option<Vec<u8>>>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        match overlay.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.engine.get(key),
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: futures_util::Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>>
            + Unpin
            + Send,
    {
        // One batch per piece the stream has ready (bounded), answered right
        // after its write.
        let mut chunk: Vec<Entry> = Vec::new();
        let mut responders: Vec<Option<ApplyResponder<TypeConfig>>> = Vec::new();
        loop {
            let next = if chunk.is_empty() {
                entries.next().await
            } else {
                match futures_util::FutureExt::now_or_never(entries.next()) {
                    Some(n) => n,
                    None => {
                        self.apply_answered(&mut chunk, &mut responders)?;
                        continue;
                    }
                }
            };
            match next {
                Some(item) => {
                    let (entry, responder) = item?;
                    chunk.push(entry);
                    responders.push(responder);
                    if chunk.len() >= APPLY_CHUNK_MAX {
                        self.apply_answered(&mut chunk, &mut responders)?;
                    }
                }
                None => {
                    self.apply_answered(&mut chunk, &mut responders)?;
                    return Ok(());
                }
            }
        }
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder::start(self.engine.clone(), self.shard, self.current.clone())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let werr = to_io;
        let (engine, shard, current, meta2) = (
            self.engine.clone(),
            self.shard,
            self.current.clone(),
            meta.clone(),
        );
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let dir = engine.shard_snapshot_dir(shard);
            // The received file is linked in under a fresh name (never over
            // a file that may be the current snapshot).
            let target = dir.join(new_snapshot_name(&engine, meta2.last_log_id, "-i"));
            link_or_copy(snapshot.path(), &target)?;
            install_file(&engine, shard, &target, &meta2, &current)?;
            // A file received into this shard's folder is now linked as the
            // current snapshot under its own name.
            if snapshot.path().parent() == Some(dir.as_path()) {
                let _ = std::fs::remove_file(snapshot.path());
            }
            Ok(())
        })
        .await
        .map_err(|e| {
            werr(StoreError::Failed {
                cause: format!("install task: {e}"),
            })
        })?
        .map_err(werr)?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.sessions = load_sessions(&self.engine, self.shard).map_err(werr)?;
        self.merging = self
            .engine
            .read_meta(self.shard, MetaTag::Merge)
            .map_err(werr)?;
        self.descriptor = self
            .engine
            .read_meta(self.shard, MetaTag::Descriptor)
            .map_err(werr)?
            .ok_or(StoreError::UnknownShard { shard: self.shard })
            .map_err(werr)?;
        // A snapshot taken after a merge into this shard brings the merged
        // range: a replica here still frozen for that merge (this replica
        // never applied the commit from the log) is retired as the commit
        // would have.
        for right in self.engine.retire_merged_into(&self.descriptor) {
            tracing::info!(shard = %self.shard, %right, "snapshot holds a merged range: retiring its frozen replica");
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let cur = self
            .current
            .lock()
            .expect("current snapshot poisoned")
            .clone();
        let dir = self.engine.shard_snapshot_dir(self.shard);
        Ok(cur.map(|r| Snapshot {
            meta: r.meta,
            snapshot: SnapshotData::from_file(dir.join(r.file)),
        }))
    }
}
