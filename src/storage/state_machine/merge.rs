//! Merges applied at one log index: the right shard freezes (its data is
//! final), then the left shard takes its range, sessions and data in place
//! (the data already sits in the shared `data` column family on every
//! replica), and the right replica is retired.

use super::*;
use crate::command::MergeMarker;
use crate::NodeId;

impl StateMachine {
    /// A new range version, written in `batch`: steps planned against the
    /// old one (which they carry) are refused from now on.
    fn raise_range_version(&mut self, batch: &mut WriteBatch) {
        self.descriptor.epoch.version += 1;
        batch.put_cf(
            self.engine.cf(Cf::ShardMeta),
            keys::meta_key(self.shard, MetaTag::Descriptor),
            encode(&self.descriptor),
        );
    }

    /// Step 1, on the right shard: freeze it (see
    /// [`Command::PrepareMerge`]). Sets `sync` so the batch is synced.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn apply_prepare_merge(
        &mut self,
        into: ShardId,
        version: u64,
        conf_ver: u64,
        mut voters: Vec<NodeId>,
        at_ms: u64,
        at: LogId,
        batch: &mut WriteBatch,
    ) -> Result<CommandResponse, StoreError> {
        let refuse = |reason: String| Ok(CommandResponse::MergeRefused { reason });
        if let Some(m) = &self.merging {
            if m.into == into {
                return Ok(CommandResponse::MergePrepared {
                    at: m.at,
                    descriptor: self.descriptor.clone(),
                });
            }
            return refuse(format!(
                "{} is frozen for a merge into {}",
                self.shard, m.into
            ));
        }
        if self.shard == meta::META_SHARD || into == meta::META_SHARD {
            return refuse("the meta shard is not merged".into());
        }
        let e = self.descriptor.epoch;
        if e.version != version || e.conf_ver != conf_ver {
            return refuse(format!(
                "{} is at epoch {e:?}, the merge was planned at version {version}, configuration {conf_ver}",
                self.shard
            ));
        }
        voters.sort();
        match self.voters() {
            Err(why) => return refuse(format!("{}: {why}", self.shard)),
            Ok(v) if v != voters => {
                return refuse(format!(
                    "{} has voters {v:?}, its left neighbour {voters:?}",
                    self.shard
                ))
            }
            Ok(_) => {}
        }
        let marker = MergeMarker {
            into,
            at: at.index,
            at_ms,
        };
        batch.put_cf(
            self.engine.cf(Cf::ShardMeta),
            keys::meta_key(self.shard, MetaTag::Merge),
            encode(&marker),
        );
        tracing::info!(shard = %self.shard, %into, at = %at, "frozen for a merge");
        self.merging = Some(marker);
        self.merge_changed = true;
        // Synced: a replica that says it applied the freeze holds the
        // shard's final data durably (the merge relies on it).
        self.sync_batch = true;
        Ok(CommandResponse::MergePrepared {
            at: at.index,
            descriptor: self.descriptor.clone(),
        })
    }

    /// On the right shard: lifts a freeze for `into`.
    pub(super) fn apply_abort_merge(
        &mut self,
        into: ShardId,
        batch: &mut WriteBatch,
    ) -> CommandResponse {
        match &self.merging {
            Some(m) if m.into == into => {
                batch.delete_cf(
                    self.engine.cf(Cf::ShardMeta),
                    keys::meta_key(self.shard, MetaTag::Merge),
                );
                // A stale retry of the freeze, or a commit into this shard
                // planned before its own freeze, is refused from now on.
                self.raise_range_version(batch);
                tracing::info!(shard = %self.shard, %into, "merge freeze lifted");
                self.merging = None;
                self.merge_changed = true;
                CommandResponse::MergeCancelled
            }
            Some(m) => CommandResponse::MergeRefused {
                reason: format!("{} is frozen for a merge into {}", self.shard, m.into),
            },
            None => CommandResponse::MergeCancelled,
        }
    }

    /// On the left shard: makes every merge planned so far impossible,
    /// unless the one of the shard at `right_start` happened.
    pub(super) fn apply_cancel_merge(
        &mut self,
        right_start: &[u8],
        batch: &mut WriteBatch,
    ) -> CommandResponse {
        let d = &self.descriptor;
        if right_start > d.range.start.as_slice() && d.range.contains(right_start) {
            return CommandResponse::Merged { left: d.clone() };
        }
        if self.merging.is_some() {
            // Frozen itself: no commit applies while it is, and lifting its
            // freeze raises its range version (see `apply_abort_merge`).
            // Its own epoch must not move: its own merge checks it.
            return CommandResponse::MergeCancelled;
        }
        // A commit planned at an older range version is refused whenever
        // it arrives.
        self.raise_range_version(batch);
        tracing::info!(shard = %self.shard, version = self.descriptor.epoch.version, "merges planned earlier cancelled");
        CommandResponse::MergeCancelled
    }

    /// Step 2, on the left shard: takes the frozen right shard's range and
    /// sessions; its local replica is retired after the batch.
    pub(super) fn apply_commit_merge(
        &mut self,
        right: ShardDescriptor,
        frozen_at: u64,
        version: u64,
        at: LogId,
        batch: &mut WriteBatch,
        retired: &mut Vec<ShardId>,
    ) -> Result<CommandResponse, StoreError> {
        let refuse = |reason: String| Ok(CommandResponse::MergeRefused { reason });
        let left = self.descriptor.clone();
        if self.shard == meta::META_SHARD || right.id == meta::META_SHARD {
            return refuse("the meta shard is not merged".into());
        }
        if right.id == self.shard {
            return refuse("a shard is not merged into itself".into());
        }
        if left.epoch.version != version {
            return refuse(format!(
                "{} is at range version {}, the merge was planned at {version}",
                self.shard, left.epoch.version
            ));
        }
        if left.range.end.is_empty() || left.range.end != right.range.start {
            return refuse(format!(
                "{} ({}) and {} ({}) are not adjacent",
                self.shard, left.range, right.id, right.range
            ));
        }
        let mut theirs = right.replicas.clone();
        theirs.sort();
        match self.voters() {
            Err(why) => return refuse(format!("{}: {why}", self.shard)),
            Ok(v) if v != theirs => {
                return refuse(format!(
                    "{} has voters {v:?}, {} has {theirs:?}",
                    self.shard, right.id
                ))
            }
            Ok(_) => {}
        }
        // Everything above is the same on every replica. What follows is
        // this replica's own: it must hold the right shard's final data.
        // The merge is committed only after every voter reported the
        // freeze applied (durably), so this fails only for a replica that
        // replays the log without having been a voter then: it would
        // serve a range without its data, and must stop instead.
        let marker = self
            .engine
            .read_meta::<MergeMarker>(right.id, MetaTag::Merge)?;
        let applied = self
            .engine
            .read_meta::<LogId>(right.id, MetaTag::Applied)?
            .map_or(0, |l| l.index);
        let local = self
            .engine
            .read_meta::<ShardDescriptor>(right.id, MetaTag::Descriptor)?;
        let ready = marker
            .as_ref()
            .is_some_and(|m| m.into == self.shard && m.at == frozen_at)
            && applied >= frozen_at
            && local
                .as_ref()
                .is_some_and(|l| l.range == right.range && l.epoch == right.epoch);
        if !ready {
            return Err(StoreError::Failed {
                cause: format!(
                    "merge of {} into {} at {at}: this node's replica of {} is not frozen at {frozen_at} (freeze {marker:?}, applied {applied}, descriptor {:?}); this replica lacks the merged range's data and needs to be dropped and re-added from a snapshot",
                    right.id,
                    self.shard,
                    right.id,
                    local.map(|l| (l.range, l.epoch))
                ),
            });
        }
        let mut merged = left.clone();
        merged.range = KeyRange::new(left.range.start.clone(), right.range.end.clone());
        merged.epoch = Epoch {
            version: left.epoch.version.max(right.epoch.version) + 1,
            conf_ver: left.epoch.conf_ver,
        };
        let meta_cf = self.engine.cf(Cf::ShardMeta);
        batch.put_cf(
            meta_cf,
            keys::meta_key(self.shard, MetaTag::Descriptor),
            encode(&merged),
        );
        // The right shard's sessions: a write applied there and retried
        // here is answered, not applied again.
        let rows = {
            let it = session_iter(
                |ro| self.engine.db().raw_iterator_cf_opt(meta_cf, ro),
                right.id,
            );
            sessions::read_sessions(it, right.id)?
        };
        let changes = self.sessions.absorb(rows);
        self.persist_sessions(changes, batch);
        tracing::info!(left = %self.shard, right = %right.id, range = %merged.range, at = %at, "merge applied");
        self.descriptor = merged.clone();
        retired.push(right.id);
        Ok(CommandResponse::Merged { left: merged })
    }
}
