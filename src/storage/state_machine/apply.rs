//! Applying committed entries: commands to user data and session rows,
//! in bounded batches, one unsynced write per batch.

use super::*;

impl StateMachine {
    pub(super) fn apply_command(
        &mut self,
        cmd: Command,
        at: LogId,
        batch: &mut WriteBatch,
        overlay: &mut HashMap<Vec<u8>, Option<Vec<u8>>>,
        created: &mut Vec<ShardId>,
        retired: &mut Vec<ShardId>,
    ) -> Result<CommandResponse, StoreError> {
        if let Some(m) = &self.merging {
            // Frozen: the data is final until the left neighbour takes it.
            if let Command::Write { .. }
            | Command::SessionWrite { .. }
            | Command::Split { .. }
            | Command::CommitMerge { .. } = cmd
            {
                return Ok(CommandResponse::Frozen { into: m.into });
            }
        }
        match cmd {
            Command::PrepareMerge {
                into,
                version,
                conf_ver,
                voters,
                at_ms,
            } => self.apply_prepare_merge(into, version, conf_ver, voters, at_ms, at, batch),
            Command::CommitMerge {
                right,
                frozen_at,
                version,
            } => self.apply_commit_merge(right, frozen_at, version, at, batch, retired),
            Command::CancelMerge { right_start } => {
                Ok(self.apply_cancel_merge(&right_start, batch))
            }
            Command::AbortMerge { into } => Ok(self.apply_abort_merge(into, batch)),
            Command::RetireRoute { shard } => {
                if self.shard != meta::META_SHARD {
                    return Ok(CommandResponse::MergeRefused {
                        reason: "routes are retired in the meta shard".into(),
                    });
                }
                let data = self.engine.cf(Cf::Data);
                let (key, mark) = (meta::route_key(shard), meta::retired_key(shard));
                batch.delete_cf(data, &key);
                overlay.insert(key, None);
                let load = meta::load_key(shard);
                batch.delete_cf(data, &load);
                overlay.insert(load, None);
                batch.put_cf(data, &mark, []);
                overlay.insert(mark, Some(Vec::new()));
                Ok(CommandResponse::Recorded)
            }
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
                    if self
                        .read_current(&meta::retired_key(d.id), overlay)?
                        .is_some()
                    {
                        // Merged away: a late report must not bring it back.
                        continue;
                    }
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
            Command::RecordLoad { reports } => {
                self.apply_record_load(reports, batch, overlay)?;
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

    /// Applies a batch of operations (all keys checked against the range
    /// first: one outside it writes nothing).
    pub(super) fn apply_ops(
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

    /// [`Command::RecordLoad`]: keeps each report, except one for a shard
    /// without a route record (merged away, or never recorded) or one
    /// older than the report already kept.
    fn apply_record_load(
        &mut self,
        reports: Vec<crate::command::LoadReport>,
        batch: &mut WriteBatch,
        overlay: &mut HashMap<Vec<u8>, Option<Vec<u8>>>,
    ) -> Result<(), StoreError> {
        for r in reports {
            let key = meta::load_key(r.shard);
            if !self.descriptor.range.contains(&key) {
                continue;
            }
            let routed = r.shard == meta::META_SHARD
                || self
                    .read_current(&meta::route_key(r.shard), overlay)?
                    .is_some();
            let newer = match self.read_current(&key, overlay)? {
                None => true,
                Some(b) => postcard::from_bytes::<crate::command::LoadReport>(&b)
                    .map_or(true, |kept| r.at_ms >= kept.at_ms),
            };
            if routed && newer {
                let v = encode(&r);
                batch.put_cf(self.engine.cf(Cf::Data), &key, &v);
                overlay.insert(key, Some(v));
            }
        }
        Ok(())
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
        self.apply_entries_now(entries)
    }

    /// [`StateMachine::apply_entries`] without the future: for a Raft that
    /// is not openraft (`crate::multiraft`), whose loop is a plain thread.
    ///
    /// # Errors
    /// The storage's (the engine fail-stops).
    pub fn apply_entries_now(
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
    pub(super) fn apply_answered(
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
    pub(super) fn apply_chunk(
        &mut self,
        chunk: &mut Vec<Entry>,
    ) -> Result<Vec<CommandResponse>, io::Error> {
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
    pub(super) fn apply_batch(
        &mut self,
        chunk: &mut Vec<Entry>,
    ) -> Result<Vec<CommandResponse>, io::Error> {
        let engine = self.engine.clone();
        let mut answered = apply_staged(&engine, &mut [(self, chunk)])?;
        Ok(answered.pop().unwrap_or_default())
    }

    /// Stages `chunk` (drained) into `batch`: the data, session rows, the
    /// applied log id, membership and descriptor changes. Nothing is
    /// visible until the batch is written and [`StateMachine::published`]
    /// and [`StateMachine::settle`] ran; `own` stays held until the batch
    /// is written and published ([`apply_staged`]).
    fn stage(
        &mut self,
        chunk: &mut Vec<Entry>,
        batch: &mut WriteBatch,
        own: &shard_router::Ownership,
    ) -> Result<Option<Staged>, io::Error> {
        let werr = to_io;
        self.refresh_shadows(own);
        let mut overlay = HashMap::new();
        let mut staged = Staged {
            responses: Vec::with_capacity(chunk.len()),
            last: None,
            // Applies change a descriptor only through its epoch (a split
            // bumps the version, a change of voters the configuration
            // version).
            epoch_before: self.descriptor.epoch,
            commands: 0,
            written: 0,
            created: Vec::new(),
            retired: Vec::new(),
            sync: false,
        };
        let mut membership_changed = false;
        let mut descriptor_changed = false;
        for entry in chunk.drain(..) {
            staged.last = Some(entry.log_id);
            let resp = match entry.payload {
                EntryPayload::Blank => CommandResponse::Empty,
                EntryPayload::Normal(cmd) => {
                    staged.commands += 1;
                    if let Command::Write { ops } | Command::SessionWrite { ops, .. } = &cmd {
                        staged.written += ops.iter().map(|o| o.payload_bytes() as u64).sum::<u64>();
                    }
                    let before = self.descriptor.epoch;
                    let r = self
                        .apply_command(
                            cmd,
                            entry.log_id,
                            batch,
                            &mut overlay,
                            &mut staged.created,
                            &mut staged.retired,
                        )
                        .map_err(werr)?;
                    if self.descriptor.epoch != before {
                        self.shadows.0 = u64::MAX;
                        self.refresh_shadows(own);
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
            staged.responses.push(resp);
        }
        let Some(last) = staged.last else {
            return Ok(None);
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
            if self.on_batch {
                // The batch system's group opens with the configuration
                // of what its state machine applied.
                let m = self.membership.membership();
                let voters: Vec<u64> = m.voter_ids().map(|n| n.0).collect();
                let learners: Vec<u64> = m.learner_ids().map(|n| n.0).collect();
                crate::multiraft::GroupStore::stage_conf(
                    &self.engine,
                    self.shard,
                    &voters,
                    &learners,
                    batch,
                );
            }
        }
        if descriptor_changed {
            batch.put_cf(
                meta,
                keys::meta_key(self.shard, MetaTag::Descriptor),
                encode(&self.descriptor),
            );
        }
        // A merge freeze is synced: see `Command::PrepareMerge`.
        staged.sync = std::mem::take(&mut self.sync_batch);
        Ok(Some(staged))
    }

    /// After `staged`'s batch is written: publishes a changed descriptor
    /// and merge freeze, and returns this replica's ownership claim when
    /// it (or a split child's) must change, which [`StateMachine::claim`]
    /// sets once `own` is released.
    fn published(
        &mut self,
        staged: &Staged,
        own: &shard_router::Ownership,
    ) -> Option<shard_router::Claim> {
        if self.descriptor.epoch != staged.epoch_before {
            self.engine.publish_descriptor(&self.descriptor);
        }
        if std::mem::take(&mut self.merge_changed) {
            self.engine
                .publish_merging(self.shard, self.merging.clone());
        }
        let claim = claim_of(&self.descriptor, true);
        (own.get(self.shard) != Some(&claim) || !staged.created.is_empty()).then_some(claim)
    }

    /// Sets this replica's ownership claim and its split children's.
    fn claim(&self, claim: shard_router::Claim, created: &[ShardId]) {
        let mut own = self.engine.ownership_mut();
        own.set(self.shard, claim);
        for child in created {
            if let Ok(d) = self.engine.descriptor(*child) {
                own.set(*child, claim_of(&d, true));
            }
        }
    }

    /// After `staged`'s batch is written and published: the applied
    /// position in memory, counters and notes; returns the responses.
    fn settle(&mut self, staged: Staged) -> Vec<CommandResponse> {
        self.applied = staged.last;
        self.engine.count_applied(staged.commands);
        if staged.written > 0 {
            self.engine.note_written(self.shard, staged.written);
        }
        if self.on_batch {
            self.batch_created.extend(staged.created);
        } else {
            for child in staged.created {
                self.engine.note_created(child);
            }
        }
        for right in staged.retired {
            self.engine.note_retired(right);
        }
        staged.responses
    }

    /// Whether `entry` can share one write with other shards' entries
    /// ([`apply_together`]): a blank, a client write or a no-op. Anything
    /// else (splits, merges, membership, meta records, digests) is applied
    /// by its shard alone, as [`StateMachine::apply_entries_now`] does.
    fn shares_a_write(entry: &Entry) -> bool {
        match &entry.payload {
            EntryPayload::Blank => true,
            EntryPayload::Normal(cmd) => matches!(
                cmd,
                Command::Write { .. } | Command::SessionWrite { .. } | Command::Noop
            ),
            EntryPayload::Membership(_) => false,
        }
    }
}

/// What one shard's staged entries need once their batch is written.
struct Staged {
    responses: Vec<CommandResponse>,
    last: Option<LogId>,
    epoch_before: Epoch,
    commands: u64,
    written: u64,
    created: Vec<ShardId>,
    retired: Vec<ShardId>,
    sync: bool,
}

/// Writes an apply's batch. Not synced by itself (unless `sync`): the
/// entries are durable in the log, and the WAL keeps this write ordered
/// after them; a crash replays from the log.
fn write_applied(engine: &Engine, batch: WriteBatch, sync: bool) -> Result<(), io::Error> {
    let mut wo = WriteOptions::default();
    wo.set_sync(sync);
    engine
        .db()
        .write_opt(batch, &wo)
        .map_err(|e| to_io(StoreError::rocks("apply", e)))?;
    engine.count_apply_write();
    Ok(())
}

/// Applies each part's chunk (drained) with one write for all of them:
/// stages every chunk into one batch under one ownership read guard (an
/// install or delete of another replica cannot change who owns what in
/// between), writes it once, publishes each part, releases the guard, then
/// sets changed ownership claims and settles each part. Returns each
/// part's responses, in `parts`' order.
fn apply_staged(
    engine: &Engine,
    parts: &mut [(&mut StateMachine, &mut Vec<Entry>)],
) -> Result<Vec<Vec<CommandResponse>>, io::Error> {
    // Fail-stop: after a failed log sync nothing more is acknowledged.
    engine.latch().check().map_err(to_io)?;
    let own = engine.ownership();
    let mut batch = WriteBatch::default();
    let mut staged = Vec::with_capacity(parts.len());
    for (machine, chunk) in parts.iter_mut() {
        staged.push(machine.stage(chunk, &mut batch, &own)?);
    }
    if staged.iter().any(Option::is_some) {
        write_applied(engine, batch, staged.iter().flatten().any(|s| s.sync))?;
    }
    let claims: Vec<_> = parts
        .iter_mut()
        .zip(&staged)
        .map(|((machine, _), s)| s.as_ref().and_then(|s| machine.published(s, &own)))
        .collect();
    drop(own);
    let mut out = Vec::with_capacity(parts.len());
    for (((machine, _), s), claim) in parts.iter_mut().zip(staged).zip(claims) {
        let Some(s) = s else {
            out.push(Vec::new());
            continue;
        };
        if let Some(claim) = claim {
            machine.claim(claim, &s.created);
        }
        out.push(machine.settle(s));
    }
    Ok(out)
}

/// Applies several shards' committed entries (each shard's in log order,
/// each shard at most once in `parts`) with one unsynced write for all of
/// them where it can: each shard's leading run of blanks, client writes
/// and no-ops (at most [`APPLY_CHUNK_MAX`] entries) is applied together
/// ([`apply_staged`]); whatever follows a shard's run (a split, a merge
/// step, a digest, ...) is then applied by that shard alone, as before.
/// Returns each part's responses, in `parts`' order. Shards hosted on one
/// node own disjoint keys, so one shard's staged writes cannot change what
/// another's apply reads.
///
/// # Errors
/// The storage's (the engine fail-stops).
pub fn apply_together(
    mut parts: Vec<(&mut StateMachine, Vec<Entry>)>,
) -> Result<Vec<Vec<CommandResponse>>, io::Error> {
    let Some(engine) = parts.first().map(|(m, _)| m.engine.clone()) else {
        return Ok(Vec::new());
    };
    let tails: Vec<Vec<Entry>> = parts
        .iter_mut()
        .map(|(_, entries)| {
            let run = entries
                .iter()
                .take(APPLY_CHUNK_MAX)
                .take_while(|e| StateMachine::shares_a_write(e))
                .count();
            entries.split_off(run)
        })
        .collect();
    let mut runs: Vec<(&mut StateMachine, &mut Vec<Entry>)> =
        parts.iter_mut().map(|(m, e)| (&mut **m, e)).collect();
    let mut out = apply_staged(&engine, &mut runs)?;
    drop(runs);
    for (((machine, _), tail), responses) in parts.into_iter().zip(tails).zip(&mut out) {
        if !tail.is_empty() {
            responses.extend(machine.apply_entries_now(tail)?);
        }
    }
    Ok(out)
}
