//! Client sessions in `shard_meta`: written with the apply batch, read
//! at open and by the digest.

use super::*;

impl StateMachine {
    /// Writes what a session table change touched into `batch`.
    pub(super) fn persist_sessions(&self, changes: Changes, batch: &mut WriteBatch) {
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
pub(super) fn read_sessions(
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
pub(super) fn load_sessions(engine: &Engine, shard: ShardId) -> Result<SessionTable, StoreError> {
    let cf = engine.cf(Cf::ShardMeta);
    let it = session_iter(|ro| engine.db().raw_iterator_cf_opt(cf, ro), shard);
    Ok(SessionTable::from_rows(read_sessions(it, shard)?))
}
