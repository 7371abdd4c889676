//! openraft's `RaftStateMachine` for one shard: user data in the shared `data`
//! column family, the shard's applied state in `shard_meta`, snapshots as
//! files under `snapshots/<shard>/`.

use super::engine::{
    claim_of, decode, encode, range_end, sync_dir, user_range, Engine, ShardGuard,
};
use super::error::StoreError;
use super::keys::{self, MetaTag, StateTag};
use super::log_store::to_io;
use super::snapshot::{Pair, SnapshotData, SnapshotHeader, SnapshotReader, SnapshotWriter};
use super::writer::Cf;
use crate::command::{Command, CommandResponse, Op, OpResult};
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
struct SnapshotRecord {
    meta: SnapshotMeta,
    /// File name inside the shard's snapshot folder.
    file: String,
}

/// Marks an install in progress; cleared in the install's last batch. Found at
/// open, the install is redone from the (complete, synced) file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InstallMarker {
    meta: SnapshotMeta,
    file: String,
}

type Current = Arc<Mutex<Option<SnapshotRecord>>>;

/// A finished snapshot file and its metadata.
type BuiltSnapshot = (SnapshotMeta, PathBuf);

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
}

/// Entries applied in one `WriteBatch` at most (a long catch-up after a
/// restart is applied in bounded pieces).
const APPLY_CHUNK_MAX: usize = 1024;

/// A fresh file name for a snapshot of the state at `applied`: unique on this
/// node (sequence and clock), and sortable by what it covers.
fn new_snapshot_name(engine: &Engine, applied: Option<LogId>, kind: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{}-{nanos}{kind}.snap",
        applied.map_or(0, |l| l.index),
        engine.next_snapshot_seq()
    )
}

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
        Ok(StateMachine {
            sessions,
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
        })
    }

    /// Refreshes [`StateMachine::shadows`] when ownership changed.
    fn refresh_shadows(&mut self, own: &shard_router::Ownership) {
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
    fn shadowed(&self, key: &[u8]) -> bool {
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

    fn read_current(
        &self,
        key: &[u8],
        overlay: &HashMap<Vec<u8>, Option<Vec<u8>>>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        match overlay.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.engine.get(key),
        }
    }

    fn apply_command(
        &mut self,
        cmd: Command,
        at: LogId,
        batch: &mut WriteBatch,
        overlay: &mut HashMap<Vec<u8>, Option<Vec<u8>>>,
        created: &mut Vec<ShardId>,
    ) -> Result<CommandResponse, StoreError> {
        match cmd {
            Command::Split {
                key,
                child,
                version,
            } => self.apply_split(key, child, version, at, batch, created),
            Command::AllocShardId => {
                let counter = meta::next_id_key();
                let next = match self.read_current(&counter, overlay)? {
                    Some(b) => decode::<u64>(&b, || "shard id counter".into())?,
                    None => {
                        // The counter is written with the bootstrap routes;
                        // before that, any guess could collide with a
                        // bootstrap shard not recorded yet.
                        return Ok(CommandResponse::NotReady(
                            "the meta shard has not recorded the bootstrap shards yet".into(),
                        ));
                    }
                };
                let id = ShardId(next.max(1));
                if id > ShardId::MAX {
                    return Err(StoreError::Failed {
                        cause: "shard ids exhausted".into(),
                    });
                }
                let v = encode(&(id.0 + 1));
                batch.put_cf(self.engine.cf(Cf::Data), &counter, &v);
                overlay.insert(counter, Some(v));
                Ok(CommandResponse::Allocated(id))
            }
            Command::RecordRoutes { descriptors } => {
                for d in descriptors {
                    let key = meta::route_key(d.id);
                    let newer = match self.read_current(&key, overlay)? {
                        None => true,
                        Some(b) => match postcard::from_bytes::<ShardDescriptor>(&b) {
                            Ok(c) => epoch_newer(d.epoch, c.epoch),
                            Err(_) => true,
                        },
                    };
                    if newer && self.descriptor.range.contains(&key) {
                        let v = encode(&d);
                        batch.put_cf(self.engine.cf(Cf::Data), &key, &v);
                        overlay.insert(key, Some(v));
                    }
                }
                Ok(CommandResponse::Recorded)
            }
            Command::Noop | Command::Digest => Ok(CommandResponse::Empty),
            Command::Write { ops } => self.apply_ops(ops, batch, overlay),
            Command::SessionWrite { stamp, at_ms, ops } => {
                let (resp, results) = match self.sessions.verdict(&stamp) {
                    Verdict::Apply => {
                        let resp = self.apply_ops(ops, batch, overlay)?;
                        let CommandResponse::Write(results) = &resp else {
                            // Nothing applied (a key outside the range):
                            // nothing to remember, the retry goes elsewhere.
                            return Ok(resp);
                        };
                        let results = Some(results.clone());
                        (resp, results)
                    }
                    Verdict::Duplicate(Saved::Results(r)) => (CommandResponse::Write(r), None),
                    Verdict::Duplicate(Saved::Omitted) => (CommandResponse::AppliedEarlier, None),
                    Verdict::Stale => (CommandResponse::Abandoned, None),
                };
                let changes = self.sessions.record(&stamp, at_ms, results.as_deref());
                self.persist_sessions(changes, batch);
                Ok(resp)
            }
        }
    }

    /// Writes what a session table change touched into `batch`.
    fn persist_sessions(&self, changes: Changes, batch: &mut WriteBatch) {
        let cf = self.engine.cf(Cf::ShardMeta);
        for c in changes.removed {
            batch.delete_cf(cf, keys::session_key(self.shard, c));
        }
        for c in changes.written {
            if let Some(s) = self.sessions.get(c) {
                batch.put_cf(cf, keys::session_key(self.shard, c), encode(s));
            }
        }
    }

    /// Applies a batch of operations (all keys checked against the range
    /// first: one outside it writes nothing).
    fn apply_ops(
        &mut self,
        ops: Vec<Op>,
        batch: &mut WriteBatch,
        overlay: &mut HashMap<Vec<u8>, Option<Vec<u8>>>,
    ) -> Result<CommandResponse, StoreError> {
        if let Some(op) = ops
            .iter()
            .find(|op| !self.descriptor.range.contains(op.key()))
        {
            return Ok(CommandResponse::KeyNotInRange {
                key: op.key().to_vec(),
            });
        }
        let data = self.engine.cf(Cf::Data);
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            // A plain put needs no read: nothing is answered from
            // the old value.
            let current = match &op {
                Op::Put { .. } => None,
                _ => self.read_current(op.key(), overlay)?,
            };
            let (key, new) = match op {
                Op::Put { key, value } => {
                    results.push(OpResult::Put { prev: None });
                    (key, Some(value))
                }
                Op::Swap { key, value } => {
                    results.push(OpResult::Put { prev: current });
                    (key, Some(value))
                }
                Op::Delete { key } => {
                    results.push(OpResult::Delete { prev: current });
                    (key, None)
                }
                Op::Cas { key, expected, new } => {
                    let succeeded = current == expected;
                    results.push(OpResult::Cas { succeeded, current });
                    if !succeeded {
                        continue;
                    }
                    (key, new)
                }
            };
            if self.shadowed(&key) {
                continue;
            }
            match &new {
                Some(v) => batch.put_cf(data, &key, v),
                None => batch.delete_cf(data, &key),
            }
            overlay.insert(key, new);
        }
        Ok(CommandResponse::Write(results))
    }
}

/// An iterator over every session row of `shard` in `shard_meta`, made
/// by the caller from the DB or from a RocksDB snapshot of it.
pub(crate) fn session_iter<'a>(
    make: impl FnOnce(rocksdb::ReadOptions) -> rocksdb::DBRawIteratorWithThreadMode<'a, rocksdb::DB>,
    shard: ShardId,
) -> rocksdb::DBRawIteratorWithThreadMode<'a, rocksdb::DB> {
    let (from, to) = keys::session_bounds(shard);
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_iterate_upper_bound(to.to_vec());
    let mut it = make(ro);
    it.seek(from);
    it
}

/// Reads the rows of a [`session_iter`].
fn read_sessions(
    mut it: rocksdb::DBRawIteratorWithThreadMode<'_, rocksdb::DB>,
    shard: ShardId,
) -> Result<Vec<(ClientId, Session)>, StoreError> {
    let mut rows = Vec::new();
    while it.valid() {
        let (k, v) = (it.key().expect("valid"), it.value().expect("valid"));
        let client = keys::session_client(shard, k).ok_or_else(|| {
            StoreError::corrupt(format!("sessions of {shard}"), "bad session key")
        })?;
        rows.push((client, decode(v, || format!("session of {shard}"))?));
        it.next();
    }
    it.status()
        .map_err(|e| StoreError::rocks("read sessions", e))?;
    Ok(rows)
}

/// The shard's session table as stored.
fn load_sessions(engine: &Engine, shard: ShardId) -> Result<SessionTable, StoreError> {
    let cf = engine.cf(Cf::ShardMeta);
    let it = session_iter(|ro| engine.db().raw_iterator_cf_opt(cf, ro), shard);
    Ok(SessionTable::from_rows(read_sessions(it, shard)?))
}

/// Whether epoch `a` supersedes `b` (both parts only grow).
fn epoch_newer(a: Epoch, b: Epoch) -> bool {
    a.covers(&b) && a != b
}

impl StateMachine {
    /// Applies a split at log id `at`: the parent shrinks in memory and in
    /// the batch; the child's whole starting state (descriptor, applied =
    /// `at`, membership, vote, purged = `at`) goes into the same batch, so a
    /// crash leaves both or neither. A replica that already holds the child
    /// (it was brought in by its own leader's snapshot) keeps it.
    fn apply_split(
        &mut self,
        key: Vec<u8>,
        child: ShardId,
        version: u64,
        at: LogId,
        batch: &mut WriteBatch,
        created: &mut Vec<ShardId>,
    ) -> Result<CommandResponse, StoreError> {
        let current = self.descriptor.clone();
        let refuse = |reason: String| {
            Ok(CommandResponse::SplitRefused {
                reason,
                current: current.clone(),
            })
        };
        if self.shard == meta::META_SHARD {
            return refuse("the meta shard is not split".into());
        }
        if current.epoch.version != version {
            return refuse(format!(
                "range version is {}, the split was planned at {version}",
                current.epoch.version
            ));
        }
        if key <= current.range.start || !current.range.contains(&key) {
            return refuse(format!(
                "split key {} is not strictly inside {}",
                shard_router::descriptor::escape(&key),
                current.range
            ));
        }
        if child == self.shard || child > ShardId::MAX || child == meta::META_SHARD {
            return refuse(format!("bad child id {child}"));
        }
        if self.membership.membership().get_joint_config().len() > 1 {
            // The child would inherit a joint configuration nobody finishes.
            return refuse("a membership change is in progress; split again after it".into());
        }
        let epoch = Epoch {
            version: current.epoch.version + 1,
            conf_ver: current.epoch.conf_ver,
        };
        let mut left = current.clone();
        left.range = KeyRange::new(current.range.start.clone(), key.clone());
        left.epoch = epoch;
        let right = ShardDescriptor {
            id: child,
            range: KeyRange::new(key, current.range.end.clone()),
            epoch,
            replicas: current.replicas.clone(),
            leader_hint: current.leader_hint,
        };
        let meta_cf = self.engine.cf(Cf::ShardMeta);
        batch.put_cf(
            meta_cf,
            keys::meta_key(self.shard, MetaTag::Descriptor),
            encode(&left),
        );
        let exists = self
            .engine
            .read_meta::<ShardDescriptor>(child, MetaTag::Descriptor)?
            .is_some();
        let member = self
            .engine
            .node_id()
            .is_none_or(|me| self.membership.membership().get_node(&me).is_some());
        let tombstone = self.engine.tombstone(child)?;
        if exists {
            tracing::info!(parent = %self.shard, %child, "split: child already hosted here, kept");
        } else if !member || tombstone.is_some() {
            // This replica replays a split of a configuration this node is
            // not part of (it was seeded from an old snapshot), or the child
            // was removed from here since: the child's own group decides.
            tracing::info!(parent = %self.shard, %child, member, ?tombstone, "split: child not created here");
        } else {
            let state_cf = self.engine.cf(Cf::RaftState);
            batch.put_cf(
                meta_cf,
                keys::meta_key(child, MetaTag::Descriptor),
                encode(&right),
            );
            batch.put_cf(
                meta_cf,
                keys::meta_key(child, MetaTag::Applied),
                encode(&at),
            );
            batch.put_cf(
                meta_cf,
                keys::meta_key(child, MetaTag::Membership),
                encode(&self.membership),
            );
            // The child's log starts after `at`: everything up to it is the
            // (shared) data. A vote at the split's term keeps its terms
            // growing from there.
            let vote = Vote::new(at.leader_id.term, at.leader_id.node_id);
            batch.put_cf(
                state_cf,
                keys::state_key(child, StateTag::Vote),
                encode(&vote),
            );
            batch.put_cf(
                state_cf,
                keys::state_key(child, StateTag::Purged),
                encode(&at),
            );
            batch.put_cf(
                state_cf,
                keys::state_key(child, StateTag::Committed),
                encode(&Some(at)),
            );
            // The child inherits the sessions: a write applied here before
            // the split and retried against the child is answered, not
            // applied again.
            for (c, sess) in self.sessions.rows() {
                batch.put_cf(meta_cf, keys::session_key(child, c), encode(&sess));
            }
            created.push(child);
        }
        tracing::info!(parent = %self.shard, %child, left = %left.range, right = %right.range, at = %at, "split applied");
        self.descriptor = left.clone();
        Ok(CommandResponse::Split { left, right })
    }
}

impl StateMachine {
    /// Applies committed `entries` in order, in batches, and returns what
    /// each produced (what openraft's `apply` does, without responders: for
    /// tools and tests that drive a state machine directly).
    pub async fn apply_entries(
        &mut self,
        entries: Vec<Entry>,
    ) -> Result<Vec<CommandResponse>, io::Error> {
        let mut out = Vec::with_capacity(entries.len());
        let mut it = entries.into_iter().peekable();
        while it.peek().is_some() {
            let mut chunk: Vec<Entry> = it.by_ref().take(APPLY_CHUNK_MAX).collect();
            while !chunk.is_empty() {
                out.extend(self.apply_chunk(&mut chunk)?);
            }
        }
        Ok(out)
    }

    /// Applies `chunk` (drained) in one unsynced batch and answers its
    /// responders.
    fn apply_answered(
        &mut self,
        chunk: &mut Vec<Entry>,
        responders: &mut Vec<Option<ApplyResponder<TypeConfig>>>,
    ) -> Result<(), io::Error> {
        while !chunk.is_empty() {
            let responses = self.apply_chunk(chunk)?;
            let n = responses.len();
            for (resp, responder) in responses.into_iter().zip(responders.drain(..n)) {
                if let Some(r) = responder {
                    r.send(resp);
                }
            }
        }
        Ok(())
    }

    /// Applies the first entries of `chunk` (removed from it) in one
    /// unsynced batch: the data, the applied log id, membership and
    /// descriptor changes together. A digest entry ends the batch: the
    /// state right after it is what the digest hashes.
    fn apply_chunk(&mut self, chunk: &mut Vec<Entry>) -> Result<Vec<CommandResponse>, io::Error> {
        let cut = chunk
            .iter()
            .position(|e| matches!(e.payload, EntryPayload::Normal(Command::Digest)))
            .map_or(chunk.len(), |i| i + 1);
        let rest = chunk.split_off(cut);
        let digest_at = match chunk.last() {
            Some(e) if matches!(e.payload, EntryPayload::Normal(Command::Digest)) => {
                Some(e.log_id.index)
            }
            _ => None,
        };
        let responses = self.apply_batch(chunk)?;
        *chunk = rest;
        if let Some(index) = digest_at {
            self.engine
                .start_digest(self.shard, index, user_range(&self.descriptor.range));
        }
        Ok(responses)
    }

    /// Applies `chunk` (drained) in one unsynced batch.
    fn apply_batch(&mut self, chunk: &mut Vec<Entry>) -> Result<Vec<CommandResponse>, io::Error> {
        let werr = to_io;
        // Fail-stop: after a failed log sync nothing more is acknowledged.
        self.engine.latch().check().map_err(werr)?;
        // Held (shared) until the batch is written: an install or delete of
        // another replica cannot change who owns what in between.
        let engine = self.engine.clone();
        let own = engine.ownership();
        self.refresh_shadows(&own);
        let mut batch = WriteBatch::default();
        let mut overlay = HashMap::new();
        let mut responses = Vec::new();
        let mut last = None;
        let mut membership_changed = false;
        let mut commands = 0u64;
        let mut created = Vec::new();
        let mut descriptor_changed = false;
        // Applies change a descriptor only through its epoch (a split bumps
        // the version, a change of voters the configuration version).
        let epoch_before = self.descriptor.epoch;
        let mut written = 0u64;
        for entry in chunk.drain(..) {
            last = Some(entry.log_id);
            let resp = match entry.payload {
                EntryPayload::Blank => CommandResponse::Empty,
                EntryPayload::Normal(cmd) => {
                    commands += 1;
                    if let Command::Write { ops } | Command::SessionWrite { ops, .. } = &cmd {
                        written += ops.iter().map(|o| o.payload_bytes() as u64).sum::<u64>();
                    }
                    let before = self.descriptor.epoch;
                    let r = self
                        .apply_command(cmd, entry.log_id, &mut batch, &mut overlay, &mut created)
                        .map_err(werr)?;
                    if self.descriptor.epoch != before {
                        self.shadows.0 = u64::MAX;
                        self.refresh_shadows(&own);
                    }
                    r
                }
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    membership_changed = true;
                    // The descriptor names the voters; a change of them is
                    // a new configuration version.
                    let voters: Vec<crate::NodeId> =
                        self.membership.membership().voter_ids().collect();
                    let mut before = self.descriptor.replicas.clone();
                    before.sort();
                    if before != voters {
                        self.descriptor.replicas = voters;
                        self.descriptor.epoch.conf_ver += 1;
                        descriptor_changed = true;
                    }
                    CommandResponse::Empty
                }
            };
            responses.push(resp);
        }
        let Some(last) = last else {
            return Ok(responses);
        };
        let meta = self.engine.cf(Cf::ShardMeta);
        batch.put_cf(
            meta,
            keys::meta_key(self.shard, MetaTag::Applied),
            encode(&last),
        );
        if membership_changed {
            batch.put_cf(
                meta,
                keys::meta_key(self.shard, MetaTag::Membership),
                encode(&self.membership),
            );
        }
        if descriptor_changed {
            batch.put_cf(
                meta,
                keys::meta_key(self.shard, MetaTag::Descriptor),
                encode(&self.descriptor),
            );
        }
        // Not synced by itself: the entries are durable in the log, and the WAL
        // keeps this write ordered after them; a crash replays from the log.
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        self.engine
            .db()
            .write_opt(batch, &wo)
            .map_err(|e| werr(StoreError::rocks("apply", e)))?;
        if self.descriptor.epoch != epoch_before {
            self.engine.publish_descriptor(&self.descriptor);
        }
        let claim = claim_of(&self.descriptor, true);
        let claims_changed = own.get(self.shard) != Some(&claim) || !created.is_empty();
        drop(own);
        if claims_changed {
            let mut own = engine.ownership_mut();
            own.set(self.shard, claim);
            for child in &created {
                if let Ok(d) = self.engine.descriptor(*child) {
                    own.set(*child, claim_of(&d, true));
                }
            }
        }
        self.applied = Some(last);
        self.engine.count_applied(commands);
        if written > 0 {
            self.engine.note_written(self.shard, written);
        }
        for child in created {
            self.engine.note_created(child);
        }
        Ok(responses)
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
        self.descriptor = self
            .engine
            .read_meta(self.shard, MetaTag::Descriptor)
            .map_err(werr)?
            .ok_or(StoreError::UnknownShard { shard: self.shard })
            .map_err(werr)?;
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

/// Builds a snapshot from a RocksDB snapshot taken when the builder was made.
pub struct SnapshotBuilder {
    engine: Engine,
    shard: ShardId,
    current: Current,
    pending: Result<oneshot::Receiver<Result<BuiltSnapshot, StoreError>>, StoreError>,
}

impl SnapshotBuilder {
    /// Starts the export thread and returns once it holds a RocksDB snapshot,
    /// so the snapshot reflects exactly the state applied so far.
    fn start(engine: Engine, shard: ShardId, current: Current) -> Self {
        let (taken_tx, taken_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let (done_tx, done_rx) = oneshot::channel();
        let e2 = engine.clone();
        let spawned = std::thread::Builder::new()
            .name("tessera-snapshot".into())
            .spawn(move || {
                let db = e2.db().clone();
                let snap = db.snapshot();
                let _ = taken_tx.send(());
                let _ = done_tx.send(export(&e2, &snap, shard));
            });
        let pending = match spawned {
            Ok(_) => {
                // The thread signals right after taking the snapshot (or dies
                // trying, which closes the channel).
                let _ = taken_rx.recv();
                Ok(done_rx)
            }
            Err(e) => Err(StoreError::io(
                "spawn snapshot thread",
                engine.shard_snapshot_dir(shard),
                e,
            )),
        };
        SnapshotBuilder {
            engine,
            shard,
            current,
            pending,
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let werr = to_io;
        let rx = std::mem::replace(
            &mut self.pending,
            Err(StoreError::Failed {
                cause: "snapshot builder reused".into(),
            }),
        )
        .map_err(werr)?;
        let (meta, path) = rx
            .await
            .map_err(|_| {
                werr(StoreError::Failed {
                    cause: "snapshot thread died".into(),
                })
            })?
            .map_err(werr)?;
        let dir = self.engine.shard_snapshot_dir(self.shard);
        let mut cur = self.current.lock().expect("current snapshot poisoned");
        let newer = cur
            .as_ref()
            .is_none_or(|c| meta.last_log_id >= c.meta.last_log_id);
        if !newer {
            // An install overtook this build: the installed snapshot is newer.
            let _ = std::fs::remove_file(&path);
            let c = cur.clone().expect("checked above");
            return Ok(Snapshot {
                meta: c.meta,
                snapshot: SnapshotData::from_file(dir.join(c.file)),
            });
        }
        let file = path
            .file_name()
            .expect("snapshot file has a name")
            .to_string_lossy()
            .into_owned();
        let rec = SnapshotRecord {
            meta: meta.clone(),
            file,
        };
        // Synced: the old file is removed right after, and a crash must not
        // leave the record naming it.
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.engine
            .db()
            .put_cf_opt(
                self.engine.cf(Cf::ShardMeta),
                keys::meta_key(self.shard, MetaTag::Snapshot),
                encode(&rec),
                &wo,
            )
            .map_err(|e| werr(StoreError::rocks("record snapshot", e)))?;
        if let Some(old) = cur.replace(rec) {
            if dir.join(&old.file) != path {
                let _ = std::fs::remove_file(dir.join(old.file));
            }
        }
        tracing::debug!(shard = %self.shard, snapshot = %path.display(), "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: SnapshotData::from_file(path),
        })
    }
}

/// Writes the shard's range, as seen by `snap`, into a new snapshot file.
fn export(
    engine: &Engine,
    snap: &rocksdb::SnapshotWithThreadMode<'_, rocksdb::DB>,
    shard: ShardId,
) -> Result<(SnapshotMeta, PathBuf), StoreError> {
    let meta_cf = engine.cf(Cf::ShardMeta);
    let read = |tag: MetaTag| -> Result<Option<Vec<u8>>, StoreError> {
        snap.get_cf(meta_cf, keys::meta_key(shard, tag))
            .map_err(|e| StoreError::rocks("read shard meta", e))
    };
    let descriptor: ShardDescriptor = match read(MetaTag::Descriptor)? {
        Some(b) => decode(&b, || format!("descriptor of {shard}"))?,
        None => return Err(StoreError::UnknownShard { shard }),
    };
    let applied: Option<LogId> = match read(MetaTag::Applied)? {
        Some(b) => Some(decode(&b, || format!("applied of {shard}"))?),
        None => None,
    };
    let membership: StoredMembership = match read(MetaTag::Membership)? {
        Some(b) => decode(&b, || format!("membership of {shard}"))?,
        None => StoredMembership::default(),
    };
    let meta = SnapshotMeta {
        last_log_id: applied,
        last_membership: membership,
    };
    let dir = engine.shard_snapshot_dir(shard);
    std::fs::create_dir_all(&dir).map_err(|e| StoreError::io("create folder", &dir, e))?;
    let name = new_snapshot_name(engine, applied, "");
    let header = SnapshotHeader {
        descriptor: descriptor.clone(),
        meta: meta.clone(),
    };
    let mut w = SnapshotWriter::create(dir.join(format!("{name}.tmp")), &header)?;
    let chunk_max = engine.config().snapshot_chunk_bytes_max;
    let sessions = session_iter(|ro| snap.raw_iterator_cf_opt(meta_cf, ro), shard);
    w.write_sessions(read_sessions(sessions, shard)?, chunk_max)?;
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_iterate_upper_bound(range_end(&descriptor.range));
    ro.fill_cache(false);
    let mut it = snap.raw_iterator_cf_opt(engine.cf(Cf::Data), ro);
    it.seek(&descriptor.range.start);
    let mut chunk: Vec<Pair> = Vec::new();
    let mut bytes = 0usize;
    while it.valid() {
        let (k, v) = (it.key().expect("valid"), it.value().expect("valid"));
        bytes += k.len() + v.len();
        chunk.push((k.to_vec(), v.to_vec()));
        if bytes >= chunk_max {
            w.write_chunk(std::mem::take(&mut chunk))?;
            bytes = 0;
        }
        it.next();
    }
    it.status()
        .map_err(|e| StoreError::rocks("scan for snapshot", e))?;
    if !chunk.is_empty() {
        w.write_chunk(chunk)?;
    }
    let data = w.finish(dir.join(&name))?;
    Ok((meta, data.path().to_path_buf()))
}

/// Replaces the shard's range with a snapshot file's contents.
///
/// Atomic from the state machine's point of view: the file is verified whole
/// first; then one synced batch records an install marker and clears the
/// range; chunks follow; one last synced batch records the descriptor,
/// applied id, membership and current snapshot and clears the marker. A crash
/// in between leaves the marker, and opening the shard redoes the install.
fn install_file(
    engine: &Engine,
    shard: ShardId,
    path: &Path,
    meta: &SnapshotMeta,
    current: &Current,
) -> Result<(), StoreError> {
    engine.latch().check()?;
    // Pass 1: the whole file is sound before anything is touched: frames,
    // checksums, totals, and every pair inside the snapshot's range.
    let mut r = SnapshotReader::open(path)?;
    let header = r.header().clone();
    while let Some(chunk) = r.next_chunk()? {
        if chunk
            .iter()
            .any(|(k, _)| !header.descriptor.range.contains(k))
        {
            return Err(StoreError::corrupt(
                path.display().to_string(),
                "pair outside the snapshot's range",
            ));
        }
    }
    let sessions = r.take_sessions();
    if header.meta.last_log_id != meta.last_log_id
        || header.meta.last_membership != meta.last_membership
    {
        return Err(StoreError::corrupt(
            path.display().to_string(),
            "snapshot file does not match the metadata it was installed with",
        ));
    }
    let mut descriptor = header.descriptor.clone();
    // A snapshot names the range and epoch; the replica keeps its own id.
    descriptor.id = shard;
    let file = path
        .file_name()
        .expect("snapshot file has a name")
        .to_string_lossy()
        .into_owned();
    let (db, data, meta_cf) = (engine.db(), engine.cf(Cf::Data), engine.cf(Cf::ShardMeta));
    let mut synced = WriteOptions::default();
    synced.set_sync(true);
    let mut unsynced = WriteOptions::default();
    unsynced.set_sync(false);
    let rocks = |op| move |e| StoreError::rocks(op, e);

    // Only keys no other live replica here owns (one newer than the
    // snapshot: a split's child hosted here) are cleared and written; from
    // the marker on, this replica owns its range (applies replayed by an
    // older overlapping replica leave it alone).
    let pieces = {
        let mut own = engine.ownership_mut();
        let pieces = own.writable(
            shard,
            &user_range(&descriptor.range),
            descriptor.epoch.version,
        );
        let mut b = WriteBatch::default();
        let marker = InstallMarker {
            meta: meta.clone(),
            file: file.clone(),
        };
        b.put_cf(
            meta_cf,
            keys::meta_key(shard, MetaTag::Installing),
            encode(&marker),
        );
        for p in &pieces {
            b.delete_range_cf(data, &p.start, &range_end(p));
        }
        db.write_opt(b, &synced)
            .map_err(rocks("install: clear range"))?;
        own.set(shard, claim_of(&descriptor, true));
        pieces
    };
    if pieces != [user_range(&descriptor.range)] {
        tracing::warn!(%shard, range = %descriptor.range, kept = ?pieces, "snapshot overlaps newer replicas here: installing only the keys this replica owns");
    }

    // Pass 2: the data, one bounded batch per chunk.
    let mut r = SnapshotReader::open(path)?;
    while let Some(chunk) = r.next_chunk()? {
        let mut b = WriteBatch::default();
        for (k, v) in chunk {
            if pieces.iter().any(|p| p.contains(&k)) {
                b.put_cf(data, k, v);
            }
        }
        fail::fail_point!("snapshot::install_chunk", |_| Err(StoreError::Failed {
            cause: "injected install failure".into()
        }));
        db.write_opt(b, &unsynced)
            .map_err(rocks("install: chunk"))?;
    }

    let mut cur = current.lock().expect("current snapshot poisoned");
    let rec = SnapshotRecord {
        meta: meta.clone(),
        file: file.clone(),
    };
    let mut b = WriteBatch::default();
    b.put_cf(
        meta_cf,
        keys::meta_key(shard, MetaTag::Descriptor),
        encode(&descriptor),
    );
    // Applied is stored as a plain log id; absent means nothing applied.
    match &meta.last_log_id {
        Some(id) => b.put_cf(meta_cf, keys::meta_key(shard, MetaTag::Applied), encode(id)),
        None => b.delete_cf(meta_cf, keys::meta_key(shard, MetaTag::Applied)),
    }
    b.put_cf(
        meta_cf,
        keys::meta_key(shard, MetaTag::Membership),
        encode(&meta.last_membership),
    );
    b.put_cf(
        meta_cf,
        keys::meta_key(shard, MetaTag::Snapshot),
        encode(&rec),
    );
    // The snapshot's sessions replace the replica's.
    let (from, to) = keys::session_bounds(shard);
    b.delete_range_cf(meta_cf, from, to);
    for (c, sess) in &sessions {
        b.put_cf(meta_cf, keys::session_key(shard, *c), encode(sess));
    }
    b.delete_cf(meta_cf, keys::meta_key(shard, MetaTag::Installing));
    db.write_opt(b, &synced).map_err(rocks("install: finish"))?;
    engine.publish_descriptor(&descriptor);
    // Only the snapshot this one replaces is removed here: a snapshot build
    // may be writing its own file in the same folder right now. Everything
    // else stale is swept when the shard is next opened.
    if let (Some(old), Some(dir)) = (cur.replace(rec), path.parent()) {
        if old.file != file {
            let _ = std::fs::remove_file(dir.join(old.file));
        }
    }
    drop(cur);
    tracing::info!(%shard, snapshot = %path.display(), range = %descriptor.range, "snapshot installed");
    Ok(())
}

/// Hard-links `from` to `to` (same file system), or copies and syncs it.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), StoreError> {
    let _ = std::fs::remove_file(to);
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).map_err(|e| StoreError::io("copy snapshot", from, e))?;
        std::fs::File::open(to)
            .and_then(|f| f.sync_all())
            .map_err(|e| StoreError::io("sync snapshot", to, e))?;
    }
    if let Some(dir) = to.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Best-effort removal of stale snapshot files (older snapshots, partial
/// writes); a file that cannot be removed only costs disk space.
fn remove_snapshot_files_except(dir: &Path, keep: Option<&str>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        if Some(name.to_string_lossy().as_ref()) != keep {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
