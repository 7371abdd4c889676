//! Snapshots: building one (a RocksDB snapshot exported to a file),
//! installing one (trimmed to what this replica owns), and their files.

use super::*;

/// A fresh file name for a snapshot of the state at `applied`: unique on this
/// node (sequence and clock), and sortable by what it covers.
pub(super) fn new_snapshot_name(engine: &Engine, applied: Option<LogId>, kind: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{}-{nanos}{kind}.snap",
        applied.map_or(0, |l| l.index),
        engine.next_snapshot_seq()
    )
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
    pub(super) fn start(engine: Engine, shard: ShardId, current: Current) -> Self {
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

/// A snapshot of `shard`'s state machine as it is now (a RocksDB snapshot
/// exported to a file in its snapshot folder), outside any Raft library:
/// the batch system's seed for a replica move. Blocking.
///
/// # Errors
/// The storage's; [`StoreError::UnknownShard`] when it is not hosted.
pub fn export_now(engine: &Engine, shard: ShardId) -> Result<(SnapshotMeta, PathBuf), StoreError> {
    let db = engine.db().clone();
    let snap = db.snapshot();
    export(engine, &snap, shard)
}

/// Writes the shard's range, as seen by `snap`, into a new snapshot file.
pub(super) fn export(
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
    if let Some(b) = read(MetaTag::Merge)? {
        w.write_merge(decode(&b, || format!("merge freeze of {shard}"))?)?;
    }
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
pub(super) fn install_file(
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
    let merge = r.merge().cloned();
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
    // The snapshot's merge freeze (or its absence) replaces the replica's.
    match &merge {
        Some(m) => b.put_cf(meta_cf, keys::meta_key(shard, MetaTag::Merge), encode(m)),
        None => b.delete_cf(meta_cf, keys::meta_key(shard, MetaTag::Merge)),
    }
    b.delete_cf(meta_cf, keys::meta_key(shard, MetaTag::Installing));
    // A replica on the batch Raft system (a move's target, seeded with
    // this snapshot) gets its group's state in the same write: a log that
    // starts after the snapshot, and the configuration it names.
    if crate::multiraft::GroupStore::exists(engine, shard)? {
        if let Some(at) = &meta.last_log_id {
            let voters: Vec<u64> = descriptor.replicas.iter().map(|n| n.0).collect();
            crate::multiraft::GroupStore::stage_seed(
                engine,
                shard,
                &voters,
                at.index,
                at.leader_id.term,
                &mut b,
            )?;
        }
    }
    db.write_opt(b, &synced).map_err(rocks("install: finish"))?;
    engine.publish_descriptor(&descriptor);
    engine.publish_merging(shard, merge);
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
pub(super) fn link_or_copy(from: &Path, to: &Path) -> Result<(), StoreError> {
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
pub(super) fn remove_snapshot_files_except(dir: &Path, keep: Option<&str>) {
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
