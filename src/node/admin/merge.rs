//! Merges: the leader of a left shard takes in its right neighbour, whose
//! replicas sit on the same nodes. Three replicated steps:
//! 1. the right shard freezes (a synced entry: its data is final);
//! 2. every replica of it reports the freeze applied;
//! 3. the left shard commits the merge: each of its replicas takes the
//!    range (the data is already in the node's shared key space) and
//!    retires its replica of the right shard.
//!
//! A merge that cannot finish is cancelled in the left shard's log first
//! (its range version grows, so the commit can never apply), and only then
//! is the freeze lifted; a freeze left behind by a coordinator that died is
//! lifted the same way by the right shard's leader.

use super::*;
use crate::command::wall_clock_ms;

/// How long the freeze may take to reach every replica.
const FREEZE_WAIT: Duration = Duration::from_secs(10);
/// A freeze older than this with no coordinator finishing it is lifted.
pub(crate) const FREEZE_ABANDONED: Duration = Duration::from_secs(90);

impl Registry {
    /// Whether this node's replica of `shard` applied its freeze for a
    /// merge into `into` at index `at`.
    pub(crate) fn merge_ready(&self, shard: ShardId, into: ShardId, at: u64) -> Result<(), String> {
        let applied = self
            .view(shard)
            .ok_or_else(|| format!("{shard} is not hosted here"))?
            .applied;
        // Published after the freeze's (synced) batch; the applied index
        // after that.
        match self.engine.merging(shard) {
            Some(m) if m.into == into && m.at == at => {}
            other => return Err(format!("{shard} is not frozen at {at} (freeze {other:?})")),
        }
        if applied < at {
            return Err(format!("{shard} applied {applied}, the freeze is at {at}"));
        }
        Ok(())
    }
}

impl Node {
    /// Merges `right` into `left` (led here): both on the same voters, no
    /// learners, adjacent. Returns the left shard with the whole range.
    ///
    /// # Errors
    /// [`AdminError::Refused`] when the shards are not adjacent, not on the
    /// same voters, the meta shard, or either is frozen, splitting or
    /// changing membership (nothing changed);
    /// [`AdminError::NotLeader`]; [`AdminError::Unavailable`] when a step
    /// timed out (the merge was cancelled, or completes on its own).
    pub async fn merge_shards(
        &self,
        left: ShardId,
        right: ShardId,
    ) -> Result<ShardDescriptor, AdminError> {
        if left == meta::META_SHARD || right == meta::META_SHARD {
            return Err(AdminError::Refused("the meta shard is not merged".into()));
        }
        // On the batch Raft system the loop leads and proposes; on
        // openraft the group's instance.
        let batch = self.registry.batch_for(left).cloned();
        let raft = match &batch {
            Some(b) => {
                b.leading(left)?;
                None
            }
            None => Some(self.led(left).await?),
        };
        let l = self
            .engine
            .descriptor(left)
            .map_err(|_| AdminError::UnknownShard { shard: left })?;
        if let Some(m) = self.engine.merging(left) {
            return Err(AdminError::Refused(format!(
                "{left} is itself being merged into {}",
                m.into
            )));
        }
        let r = self.engine.descriptor(right).map_err(|_| {
            AdminError::Refused(format!(
                "{right} has no replica on {} (a replica of {left}): its replicas must first be moved onto {left}'s",
                self.id
            ))
        })?;
        if l.range.end.is_empty() || l.range.end != r.range.start {
            return Err(AdminError::Refused(format!(
                "{left} ({}) and {right} ({}) are not adjacent",
                l.range, r.range
            )));
        }
        if batch.is_some() != self.is_batch_shard(right) {
            return Err(AdminError::Refused(format!(
                "{left} and {right} run on different Raft systems (status --json names each one's)"
            )));
        }
        let voters = match &raft {
            Some(raft) => {
                let m = raft.metrics().borrow_watched().membership_config.clone();
                crate::raft::settled_voters(m.membership())
                    .map_err(|why| AdminError::Refused(format!("{left}: {why}; merge after it")))?
            }
            // On the batch system: the group's applied configuration, with
            // no learner (a move under way) and the descriptor's voters.
            None => {
                let b = batch.as_ref().expect("a batch shard has its system");
                let m = b.membership(left).await?;
                if !m.learners.is_empty() {
                    return Err(AdminError::Refused(format!(
                        "{left} has learners {:?} (a replica move under way); merge after it",
                        m.learners
                    )));
                }
                let mut v: Vec<NodeId> = m.voters.into_iter().map(NodeId).collect();
                v.sort();
                let mut listed = l.replicas.clone();
                listed.sort();
                if v != listed {
                    return Err(AdminError::Refused(format!(
                        "{left} is changing membership (voters {v:?}, descriptor {listed:?}); merge after it"
                    )));
                }
                v
            }
        };
        let mut theirs = r.replicas.clone();
        theirs.sort();
        if theirs != voters {
            return Err(AdminError::Refused(format!(
                "{left} is on {voters:?} and {right} on {theirs:?}: move {right}'s replicas onto {left}'s first"
            )));
        }
        // 1. Freeze the right shard.
        let prepare = Command::PrepareMerge {
            into: left,
            version: r.epoch.version,
            conf_ver: r.epoch.conf_ver,
            voters: voters.clone(),
            at_ms: wall_clock_ms(),
        };
        let (frozen_at, frozen) = match self.propose(right, prepare, PROPOSE_TIMEOUT).await? {
            CommandResponse::MergePrepared { at, descriptor } => (at, descriptor),
            CommandResponse::MergeRefused { reason } => return Err(AdminError::Refused(reason)),
            CommandResponse::Frozen { into } => {
                return Err(AdminError::Refused(format!(
                    "{right} is frozen for a merge into {into}"
                )))
            }
            other => {
                return Err(AdminError::Unavailable {
                    shard: right,
                    reason: format!("the freeze answered {other:?}"),
                })
            }
        };
        tracing::info!(%left, %right, frozen_at, "merge: right shard frozen");
        // 2. Every replica holds the final data.
        if let Err(e) = self.wait_frozen(&frozen, left, frozen_at).await {
            self.abandon_merge(left, &frozen).await;
            return Err(e);
        }
        // 3. The left shard takes the range.
        let commit = Command::CommitMerge {
            right: frozen.clone(),
            frozen_at,
            version: l.epoch.version,
        };
        let committed = match (&raft, &batch) {
            (Some(raft), _) => {
                let _expedite = self.registry.expedite();
                self.registry.renew_lapsing_lease(raft).await;
                raft.client_write(commit)
                    .await
                    .map(|r| r.data)
                    .map_err(|e| raft_error(left, e))
            }
            (None, Some(b)) => b.propose(left, &commit).await.map(|(_, r)| r).map_err(|e| {
                AdminError::Unavailable {
                    shard: left,
                    reason: e.to_string(),
                }
            }),
            (None, None) => unreachable!("a shard runs on one of the two systems"),
        };
        let outcome = match committed {
            Ok(r) => r,
            Err(e) => {
                // Unknown whether it committed: settle it in the log.
                tracing::warn!(%left, %right, error = %e, "merge: commit outcome unknown");
                return match self.abandon_merge(left, &frozen).await {
                    Some(merged) => {
                        self.record_merge(&merged).await;
                        Ok(merged)
                    }
                    None => Err(e),
                };
            }
        };
        match outcome {
            CommandResponse::Merged { left: merged } => {
                self.record_merge(&merged).await;
                tracing::info!(%left, %right, range = %merged.range, "merge done");
                Ok(merged)
            }
            CommandResponse::MergeRefused { reason } => {
                // Refused in the log: it never applies. Lift the freeze.
                self.lift_freeze(left, right).await;
                Err(AdminError::Refused(reason))
            }
            CommandResponse::Frozen { into } => {
                self.lift_freeze(left, right).await;
                Err(AdminError::Refused(format!(
                    "{left} was frozen for a merge into {into} meanwhile"
                )))
            }
            other => {
                self.abandon_merge(left, &frozen).await;
                Err(AdminError::Unavailable {
                    shard: left,
                    reason: format!("the merge answered {other:?}"),
                })
            }
        }
    }

    /// Waits until every replica of the frozen shard applied the freeze.
    async fn wait_frozen(
        &self,
        frozen: &ShardDescriptor,
        into: ShardId,
        at: u64,
    ) -> Result<(), AdminError> {
        let deadline = Instant::now() + FREEZE_WAIT;
        let shard = frozen.id;
        let mut waiting: Vec<NodeId> = frozen.replicas.clone();
        let mut backoff = Duration::from_millis(5);
        let mut last = String::new();
        while !waiting.is_empty() {
            let mut still = Vec::new();
            for node in waiting {
                let r = if node == self.id {
                    self.registry.merge_ready(shard, into, at)
                } else {
                    match rpc::call(
                        &self.transport,
                        node,
                        shard,
                        &PeerRequest::MergeReady { into, at },
                        Duration::from_secs(5),
                    )
                    .await
                    {
                        Ok(PeerResponse::Done) => Ok(()),
                        Ok(other) => Err(format!("{node} answered {other:?}")),
                        Err(e) => Err(format!("{node}: {e}")),
                    }
                };
                if let Err(e) = r {
                    last = e;
                    still.push(node);
                }
            }
            waiting = still;
            if waiting.is_empty() {
                break;
            }
            if Instant::now() + backoff > deadline {
                // Not retried by the client: each attempt would freeze the
                // shard again for as long.
                return Err(AdminError::Refused(format!(
                    "not every replica of {shard} applied the merge freeze within {FREEZE_WAIT:?} ({last}); the merge was cancelled: run it again once every replica is up"
                )));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Settles a merge that will not be committed from here: cancelled in
    /// the left shard's log, then the freeze lifted. Returns the merged
    /// left shard when the commit had happened after all.
    pub(crate) async fn abandon_merge(
        &self,
        left: ShardId,
        frozen: &ShardDescriptor,
    ) -> Option<ShardDescriptor> {
        let cancel = Command::CancelMerge {
            right_start: frozen.range.start.clone(),
        };
        match self.propose(left, cancel, PROPOSE_TIMEOUT).await {
            Ok(CommandResponse::Merged { left: merged }) => Some(merged),
            Ok(CommandResponse::MergeCancelled) => {
                self.lift_freeze(left, frozen.id).await;
                None
            }
            other => {
                // The freeze stays; its leader lifts it once abandoned.
                tracing::warn!(%left, right = %frozen.id, answer = ?other, "merge: could not cancel; the freeze is lifted later");
                None
            }
        }
    }

    /// Lifts `right`'s freeze for `left` (the commit can no longer apply).
    async fn lift_freeze(&self, left: ShardId, right: ShardId) {
        match self
            .propose(right, Command::AbortMerge { into: left }, PROPOSE_TIMEOUT)
            .await
        {
            Ok(CommandResponse::MergeCancelled) => {
                tracing::info!(%left, %right, "merge abandoned, freeze lifted");
            }
            other => {
                tracing::warn!(%left, %right, answer = ?other, "merge: could not lift the freeze; its leader retries once abandoned");
            }
        }
    }

    /// Records the merged shard in the meta shard (the route reporter
    /// would, later); the right shard's record is retired by the nodes as
    /// they drop its replicas.
    async fn record_merge(&self, merged: &ShardDescriptor) {
        let mut d = merged.clone();
        d.leader_hint = Some(self.id);
        let cmd = Command::RecordRoutes {
            descriptors: vec![d],
        };
        if let Err(e) = self.propose(meta::META_SHARD, cmd, PROPOSE_TIMEOUT).await {
            tracing::warn!(shard = %merged.id, error = %e, "merge: route not recorded yet");
        }
    }

    /// Drops this node's replicas of shards merged into their left
    /// neighbour here, and retires their route records.
    pub(crate) async fn drop_retired(&self) {
        for right in self.engine.take_retired() {
            if let Err(e) = self.drop_replica_local(right).await {
                tracing::error!(shard = %right, error = %e, "could not drop a replica retired by a merge");
                continue;
            }
            tracing::info!(shard = %right, "replica retired by a merge");
            let cmd = Command::RetireRoute { shard: right };
            if let Err(e) = self.propose(meta::META_SHARD, cmd, PROPOSE_TIMEOUT).await {
                tracing::warn!(shard = %right, error = %e, "merge: route record not retired yet");
            }
        }
    }

    /// Lifts the freezes of shards led here whose merge was abandoned (its
    /// coordinator died): cancelled in the left shard's log first.
    pub(crate) async fn lift_abandoned_freezes(&self) {
        let now = wall_clock_ms();
        for (shard, m) in self.engine.merging_all() {
            if now.saturating_sub(m.at_ms) < FREEZE_ABANDONED.as_millis() as u64 {
                continue;
            }
            let leads = match self.registry.batch_group(shard) {
                Some(g) => g.leading,
                None => match self.group(shard).await {
                    Some(raft) => leadership(&raft, self.id).0,
                    None => false,
                },
            };
            if !leads {
                continue;
            }
            let Ok(d) = self.engine.descriptor(shard) else {
                continue;
            };
            tracing::warn!(%shard, into = %m.into, "merge freeze abandoned: cancelling");
            if let Some(merged) = self.abandon_merge(m.into, &d).await {
                tracing::info!(%shard, into = %merged.id, "the abandoned merge had committed");
            }
        }
    }
}
