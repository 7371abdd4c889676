//! A split applied at one log index: the parent shrinks, the child's whole
//! starting state is written in the same batch.

use super::*;

/// Whether epoch `a` supersedes `b` (both parts only grow).
pub(super) fn epoch_newer(a: Epoch, b: Epoch) -> bool {
    a.covers(&b) && a != b
}

impl StateMachine {
    /// Applies a split at log id `at`: the parent shrinks in memory and in
    /// the batch; the child's whole starting state (descriptor, applied =
    /// `at`, membership, and its Raft state: openraft's vote and purged =
    /// `at`, or on the batch system the group's voters and a log starting
    /// after `at`) goes into the same batch, so a crash leaves both or
    /// neither. A replica that already holds the child
    /// (it was brought in by its own leader's snapshot) keeps it.
    pub(super) fn apply_split(
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
        // The batch system keeps its voters in its own Raft state, as the
        // descriptor names them (its groups change no membership yet).
        let member = self.engine.node_id().is_none_or(|me| {
            if self.on_batch {
                current.replicas.contains(&me)
            } else {
                self.membership.membership().get_node(&me).is_some()
            }
        });
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
            if self.on_batch {
                let voters: Vec<u64> = current.replicas.iter().map(|n| n.0).collect();
                crate::multiraft::GroupStore::stage_split_child(
                    &self.engine,
                    child,
                    &voters,
                    at.index,
                    at.leader_id.term,
                    batch,
                );
            } else {
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
            }
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
