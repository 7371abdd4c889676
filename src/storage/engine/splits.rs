//! The node's split bookkeeping kept by the engine: bytes written per
//! shard since its last size check, the split point of a shard, and the
//! shards created by applied splits (for the node to start).

use super::*;

impl Engine {
    /// Records a shard created by an applied split (its state is durable
    /// in the same batch as the split) for the node to start.
    pub(crate) fn note_created(&self, shard: ShardId) {
        self.inner
            .created
            .lock()
            .expect("created poisoned")
            .push(shard);
        self.inner.created_signal.notify_one();
    }

    /// Counts user bytes applied to `shard`.
    pub(crate) fn note_written(&self, shard: ShardId, bytes: u64) {
        *self
            .inner
            .written
            .lock()
            .expect("written poisoned")
            .entry(shard)
            .or_default() += bytes;
    }

    /// User bytes applied to `shard` since the engine opened.
    pub fn written(&self, shard: ShardId) -> u64 {
        self.inner
            .written
            .lock()
            .expect("written poisoned")
            .get(&shard)
            .copied()
            .unwrap_or(0)
    }

    /// The range's exact size (data files and memtables both counted) and,
    /// when it is at least `max` bytes, the key at which half of it lies.
    /// Reads the whole range once.
    pub fn split_point(
        &self,
        range: &crate::KeyRange,
        max: u64,
    ) -> Result<(u64, Option<Vec<u8>>), StoreError> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(range_end(range));
        ro.fill_cache(false);
        let mut it = self.inner.db().raw_iterator_cf_opt(self.cf(Cf::Data), ro);
        it.seek(&range.start);
        let mut sizes: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut total = 0u64;
        let mut step = 0u64;
        while it.valid() {
            let (k, v) = (it.key().expect("valid"), it.value().expect("valid"));
            total += (k.len() + v.len()) as u64;
            // A sample every ~1/1024 of the limit keeps memory small.
            if total >= step {
                sizes.push((total, k.to_vec()));
                step = total + (max / 1024).max(1);
            }
            it.next();
        }
        it.status()
            .map_err(|e| StoreError::rocks("split scan", e))?;
        if total < max {
            return Ok((total, None));
        }
        let half = total / 2;
        let key = sizes
            .iter()
            .find(|(t, k)| *t >= half && k.as_slice() > range.start.as_slice())
            .map(|(_, k)| k.clone());
        Ok((total, key))
    }

    /// Shards created by splits since the last call.
    pub fn take_created(&self) -> Vec<ShardId> {
        std::mem::take(&mut *self.inner.created.lock().expect("created poisoned"))
    }

    /// Notified after [`Engine::note_created`].
    pub fn created_signal(&self) -> Arc<tokio::sync::Notify> {
        self.inner.created_signal.clone()
    }

    /// The merge freeze of a hosted replica, if it is frozen.
    pub fn merging(&self, shard: ShardId) -> Option<crate::command::MergeMarker> {
        self.inner
            .merging
            .read()
            .expect("merging poisoned")
            .get(&shard)
            .cloned()
    }

    /// Every hosted replica frozen for a merge.
    pub fn merging_all(&self) -> Vec<(ShardId, crate::command::MergeMarker)> {
        self.inner
            .merging
            .read()
            .expect("merging poisoned")
            .iter()
            .map(|(s, m)| (*s, m.clone()))
            .collect()
    }

    /// Publishes (or with `None` lifts) a replica's merge freeze, after it
    /// is written.
    pub(crate) fn publish_merging(
        &self,
        shard: ShardId,
        marker: Option<crate::command::MergeMarker>,
    ) {
        let mut m = self.inner.merging.write().expect("merging poisoned");
        match marker {
            Some(mk) => {
                m.insert(shard, mk);
            }
            None => {
                m.remove(&shard);
            }
        }
    }

    /// Records a replica whose range its left neighbour took (the merge is
    /// durable in the same batch) for the node to drop.
    pub(crate) fn note_retired(&self, shard: ShardId) {
        self.inner
            .retired
            .lock()
            .expect("retired poisoned")
            .push(shard);
        self.inner.created_signal.notify_one();
    }

    /// Retires (as `Engine::note_retired` does) every replica here frozen
    /// for a merge into `into` whose range `into` already took: its start
    /// inside `into`'s range, past its start, at a newer range version. The
    /// merge's commit was applied (from the log, or brought by a snapshot)
    /// but the frozen replica not dropped yet (a crash in between).
    /// Returns the shards retired.
    pub fn retire_merged_into(&self, into: &ShardDescriptor) -> Vec<ShardId> {
        let mut out = Vec::new();
        for (right, m) in self.merging_all() {
            let covered = self.descriptor(right).is_ok_and(|r| {
                into.range.contains(&r.range.start)
                    && r.range.start > into.range.start
                    && into.epoch.version > r.epoch.version
            });
            if m.into == into.id && covered {
                self.note_retired(right);
                out.push(right);
            }
        }
        out
    }

    /// Replicas retired by merges since the last call.
    pub fn take_retired(&self) -> Vec<ShardId> {
        std::mem::take(&mut *self.inner.retired.lock().expect("retired poisoned"))
    }
}
