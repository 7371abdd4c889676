//! Replica digests at one log index (`verify`): computed off the apply
//! path from a RocksDB snapshot, kept a few per shard.

use super::*;

impl Engine {
    /// Starts the digest of `shard` at log index `index`: called by its
    /// state machine right after writing the batch that ends with the digest
    /// entry, it returns once a RocksDB snapshot of that state is taken and
    /// hashes `range` and the shard's sessions in the background.
    pub(crate) fn start_digest(&self, shard: ShardId, index: u64, range: KeyRange) {
        self.set_digest(shard, index, DigestStatus::Computing);
        let (taken_tx, taken_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let engine = self.clone();
        let spawned = std::thread::Builder::new()
            .name("tessera-digest".into())
            .spawn(move || {
                let db = engine.db().clone();
                let snap = db.snapshot();
                let _ = taken_tx.send(());
                let status = match engine.digest_of(&snap, shard, &range) {
                    Ok(d) => DigestStatus::Done(d),
                    Err(e) => DigestStatus::Failed(e.to_string()),
                };
                engine.set_digest(shard, index, status);
            });
        match spawned {
            // The thread signals right after taking the snapshot (or dies
            // trying, which closes the channel).
            Ok(_) => {
                let _ = taken_rx.recv();
            }
            Err(e) => self.set_digest(shard, index, DigestStatus::Failed(e.to_string())),
        }
    }

    pub(super) fn digest_of(
        &self,
        snap: &rocksdb::SnapshotWithThreadMode<'_, DB>,
        shard: ShardId,
        range: &KeyRange,
    ) -> Result<crate::digest::ShardDigest, StoreError> {
        let mut d = crate::digest::Digester::default();
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(range_end(range));
        ro.fill_cache(false);
        let mut it = snap.raw_iterator_cf_opt(self.cf(Cf::Data), ro);
        it.seek(&range.start);
        while it.valid() {
            d.pair(it.key().expect("valid"), it.value().expect("valid"));
            it.next();
        }
        it.status().map_err(|e| StoreError::rocks("digest", e))?;
        let meta = self.cf(Cf::ShardMeta);
        let mut it = crate::storage::state_machine::session_iter(
            |ro| snap.raw_iterator_cf_opt(meta, ro),
            shard,
        );
        while it.valid() {
            d.session(it.key().expect("valid"), it.value().expect("valid"));
            it.next();
        }
        it.status().map_err(|e| StoreError::rocks("digest", e))?;
        Ok(d.finish())
    }

    pub(super) fn set_digest(&self, shard: ShardId, index: u64, status: DigestStatus) {
        let mut all = self.inner.digests.lock().expect("digests poisoned");
        all.insert((shard, index), status);
        let mine: Vec<(ShardId, u64)> = all
            .range((shard, 0)..=(shard, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for k in &mine[..mine.len().saturating_sub(DIGESTS_PER_SHARD)] {
            all.remove(k);
        }
    }

    /// The digest of `shard` at log index `index`, given what the replica
    /// has `applied`.
    pub fn digest(&self, shard: ShardId, index: u64, applied: u64) -> DigestStatus {
        let all = self.inner.digests.lock().expect("digests poisoned");
        match all.get(&(shard, index)) {
            Some(s) => s.clone(),
            None if applied < index => DigestStatus::NotYet { applied },
            None => DigestStatus::Unknown,
        }
    }
}
