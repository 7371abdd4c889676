//! Replica moves (learner, promote, remove) and the replica lifecycle
//! steps they are made of: create an empty replica, seed it with a
//! snapshot, drop the source.

use super::*;

impl Node {
    /// Moves `shard`'s replica from `from` to `to` (run on its leader):
    /// an empty replica on `to`, added as a learner (it catches up by a
    /// snapshot streamed over QUIC), promoted, `from` removed and its data
    /// deleted. When `from` leads, leadership goes to `to` first and the
    /// answer is [`AdminError::NotLeader`] naming it: run it again there.
    ///
    /// # Errors
    /// [`AdminError`]; a learner that does not catch up within `timeout` is
    /// removed again (the move rolls back) and the error says so.
    pub async fn move_replica(
        &self,
        shard: ShardId,
        from: NodeId,
        to: NodeId,
        timeout: Duration,
    ) -> Result<ShardDescriptor, AdminError> {
        if let Some(b) = self.registry.batch_for(shard).cloned() {
            return self.move_batch_replica(&b, shard, from, to, timeout).await;
        }
        let raft = self.led(shard).await?;
        let lock = self.move_locks.entry(shard).or_default().clone();
        let _one_at_a_time = lock.lock().await;
        if let Some(m) = self.engine.merging(shard) {
            return Err(AdminError::Refused(format!(
                "{shard} is frozen for a merge into {}",
                m.into
            )));
        }
        if from == to {
            return Err(AdminError::Refused(
                "source and target are the same node".into(),
            ));
        }
        if to != self.id && !self.transport.peer_ids().contains(&to) {
            return Err(AdminError::Refused(format!("{to} is not a known node")));
        }
        let membership = || {
            let m = raft.metrics().borrow_watched().membership_config.clone();
            let voters: BTreeSet<NodeId> = m.membership().voter_ids().collect();
            let learners: BTreeSet<NodeId> = m.membership().learner_ids().collect();
            (voters, learners)
        };
        let (voters, _) = membership();
        let started_with = voters.len();
        if !voters.contains(&from) && !voters.contains(&to) {
            return Err(AdminError::Refused(format!(
                "{from} holds no replica of {shard}"
            )));
        }
        let werr = |e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => AdminError::NotLeader {
                shard,
                hint: f.leader_id,
            },
            other => raft_error(shard, other),
        };
        if !voters.contains(&to) {
            let d = self
                .engine
                .descriptor(shard)
                .map_err(|_| AdminError::UnknownShard { shard })?;
            match rpc::call(
                &self.transport,
                to,
                shard,
                &PeerRequest::CreateReplica(d),
                Duration::from_secs(10),
            )
            .await
            {
                Ok(PeerResponse::Done) => {}
                Ok(other) => {
                    return Err(AdminError::Unavailable {
                        shard,
                        reason: format!("{to} answered {other:?}"),
                    })
                }
                Err(e) => return Err(call_error(shard, e)),
            }
            // Always seeded: the replica may be new, or one just replaced
            // because it was left from an older configuration; a learner
            // already past the seed ignores it.
            self.seed_replica(&raft, shard, to, timeout).await?;
            let added = tokio::time::timeout(
                timeout,
                raft.add_learner(to, BasicNode::new(self.addr_of(to)), true),
            )
            .await;
            match added {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(werr(e)),
                Err(_) => {
                    // Roll back: the learner leaves the group; only then is
                    // its replica dropped (a node that is down keeps it until
                    // its replica GC finds it removed).
                    let removed = raft
                        .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([to])), false)
                        .await;
                    let reason = match removed {
                        Err(e) => format!(
                            "{to} did not catch up within {timeout:?}, and removing the learner failed ({e}): it is still a learner; run the move again or remove it"
                        ),
                        Ok(_) => {
                            match self.ask_drop(&raft, shard, to).await {
                                Ok(PeerResponse::Done) => format!(
                                    "{to} did not catch up within {timeout:?}; the move was rolled back"
                                ),
                                other => format!(
                                    "{to} did not catch up within {timeout:?}; the learner was removed but its replica was not dropped yet ({other:?})"
                                ),
                            }
                        }
                    };
                    return Err(AdminError::Unavailable { shard, reason });
                }
            }
            raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([to])), false)
                .await
                .map_err(werr)?;
        }
        let (voters, _) = membership();
        if voters.contains(&from) {
            // A move never lowers the voter count: when `to` was a voter
            // already at the start (a move resumed after its promotion, or
            // another move to the same node that got there first), `from`
            // goes only if the shard keeps as many voters as it had (at
            // most the 3 it is meant to have).
            let floor = started_with.min(crate::node::REPLICAS_PER_SHARD);
            if voters.len() - 1 < floor {
                return Err(AdminError::Refused(format!(
                    "removing {from} would leave {shard} with {} voters ({to} already holds a replica: another move got there first?)",
                    voters.len() - 1
                )));
            }
            raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([from])), false)
                .await
                .map_err(werr)?;
        }
        if from == self.id {
            // This leader removed itself: it steps down now that the new
            // configuration is committed; the target campaigns at once
            // rather than after an election timeout.
            let d = self
                .engine
                .descriptor(shard)
                .map_err(|_| AdminError::UnknownShard { shard })?;
            // Best effort: without it the target elects itself after an
            // election timeout.
            let _ = raft.trigger().transfer_leader(to).await;
            let _ = raft
                .wait(Some(Duration::from_secs(5)))
                .metrics(
                    |m| m.current_leader.is_some() && m.current_leader != Some(self.id),
                    "move: the target leads",
                )
                .await;
            drop(raft);
            self.drop_replica_local(shard)
                .await
                .map_err(|e| raft_error(shard, e))?;
            return Ok(d);
        }
        // The old replica no longer receives anything; delete it.
        drop_source(shard, from, || self.ask_drop(&raft, shard, from)).await;
        self.engine
            .descriptor(shard)
            .map_err(|_| AdminError::UnknownShard { shard })
    }

    /// [`Node::move_replica`] of a shard on the batch Raft system: the same
    /// steps through raft-rs's configuration changes (learner, promoted,
    /// source removed), the target seeded with a snapshot of this leader's
    /// state machine first (its log then starts after the snapshot and
    /// catches up from this leader's log).
    async fn move_batch_replica(
        &self,
        b: &Arc<crate::node::batch::BatchShards>,
        shard: ShardId,
        from: NodeId,
        to: NodeId,
        timeout: Duration,
    ) -> Result<ShardDescriptor, AdminError> {
        use raft::eraftpb::ConfChangeType;
        let lock = self.move_locks.entry(shard).or_default().clone();
        let _one_at_a_time = lock.lock().await;
        let g = b.leading(shard)?;
        if let Some(m) = self.engine.merging(shard) {
            return Err(AdminError::Refused(format!(
                "{shard} is frozen for a merge into {}",
                m.into
            )));
        }
        if from == to {
            return Err(AdminError::Refused(
                "source and target are the same node".into(),
            ));
        }
        if to != self.id && !self.transport.peer_ids().contains(&to) {
            return Err(AdminError::Refused(format!("{to} is not a known node")));
        }
        let members = |m: &crate::multiraft::GroupMembership| {
            let voters: BTreeSet<NodeId> = m.voters.iter().copied().map(NodeId).collect();
            let learners: BTreeSet<NodeId> = m.learners.iter().copied().map(NodeId).collect();
            (voters, learners)
        };
        let (voters, learners) = members(&b.membership(shard).await?);
        let started_with = voters.len();
        if !voters.contains(&from) && !voters.contains(&to) {
            return Err(AdminError::Refused(format!(
                "{from} holds no replica of {shard}"
            )));
        }
        if !voters.contains(&to) {
            if !learners.contains(&to) {
                let d = self
                    .engine
                    .descriptor(shard)
                    .map_err(|_| AdminError::UnknownShard { shard })?;
                match rpc::call(
                    &self.transport,
                    to,
                    shard,
                    &PeerRequest::CreateBatchReplica(d),
                    Duration::from_secs(10),
                )
                .await
                {
                    Ok(PeerResponse::Done) => {}
                    Ok(other) => {
                        return Err(AdminError::Unavailable {
                            shard,
                            reason: format!("{to} answered {other:?}"),
                        })
                    }
                    Err(e) => return Err(call_error(shard, e)),
                }
                self.seed_batch_replica(shard, to, g.term, timeout).await?;
                b.change_conf(shard, ConfChangeType::AddLearnerNode, to)
                    .await?;
            }
            // The learner catches up from this leader's log.
            let deadline = Instant::now() + timeout;
            let target = b.membership(shard).await?.commit;
            loop {
                let m = b.membership(shard).await?;
                let (_, learners) = members(&m);
                let matched = m.matched.get(&to.0).copied().unwrap_or(0);
                if learners.contains(&to) && matched >= target {
                    break;
                }
                if Instant::now() >= deadline {
                    // Roll back: the learner leaves, then its replica goes.
                    let removed = b.change_conf(shard, ConfChangeType::RemoveNode, to).await;
                    let dropped = self.ask_drop_batch(b, shard, to).await;
                    return Err(AdminError::Unavailable {
                        shard,
                        reason: format!(
                            "{to} did not catch up within {timeout:?} (matched {matched} of {target}); the learner was removed ({removed:?}) and its replica dropped ({dropped:?})"
                        ),
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            b.change_conf(shard, ConfChangeType::AddNode, to).await?;
        }
        let (voters, _) = members(&b.membership(shard).await?);
        if !voters.contains(&to) {
            return Err(AdminError::Unavailable {
                shard,
                reason: format!("{to} is not a voter after its promotion (a change was pending?): run the move again"),
            });
        }
        if voters.contains(&from) {
            let floor = started_with.min(crate::node::REPLICAS_PER_SHARD);
            if voters.len() - 1 < floor {
                return Err(AdminError::Refused(format!(
                    "removing {from} would leave {shard} with {} voters ({to} already holds a replica: another move got there first?)",
                    voters.len() - 1
                )));
            }
            if from == self.id {
                // A leader does not remove itself: leadership goes to the
                // target, where the move is run again.
                b.transfer_leader(self.id, shard, to).await?;
                return Err(AdminError::NotLeader {
                    shard,
                    hint: Some(to),
                });
            }
            b.change_conf(shard, ConfChangeType::RemoveNode, from)
                .await?;
        }
        drop_source(shard, from, || self.ask_drop_batch(b, shard, from)).await;
        self.engine
            .descriptor(shard)
            .map_err(|_| AdminError::UnknownShard { shard })
    }

    /// Asks `node` to drop its replica of batch-system `shard`, naming
    /// this leader's applied index (past the configuration that removed
    /// it).
    async fn ask_drop_batch(
        &self,
        b: &Arc<crate::node::batch::BatchShards>,
        shard: ShardId,
        node: NodeId,
    ) -> Result<PeerResponse, CallError> {
        let after = b
            .group(shard)
            .map(|g| crate::raft::log_id(g.term, NodeId(0), g.applied));
        self.ask_drop_after(shard, node, after).await
    }

    /// Streams a snapshot of this node's replica of batch-system `shard`,
    /// taken now, to the empty replica on `to`, which installs it.
    async fn seed_batch_replica(
        &self,
        shard: ShardId,
        to: NodeId,
        term: u64,
        timeout: Duration,
    ) -> Result<u64, AdminError> {
        let engine = self.engine.clone();
        let (meta, path) =
            tokio::task::spawn_blocking(move || crate::storage::export_now(&engine, shard))
                .await
                .map_err(|e| AdminError::Unavailable {
                    shard,
                    reason: format!("snapshot task: {e}"),
                })?
                .map_err(|e| AdminError::Unavailable {
                    shard,
                    reason: format!("snapshot: {e}"),
                })?;
        let index = meta.last_log_id.map_or(0, |l| l.index);
        let head = SnapshotHead {
            vote: crate::raft::Vote::new(term, self.id),
            meta,
        };
        let data = crate::raft::SnapshotData::from_file(path.clone());
        let sent = rpc::send_snapshot(&self.transport, to, shard, &head, &data, timeout).await;
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(%shard, file = %path.display(), error = %e, "move: seed file not removed");
        }
        sent.map_err(|e| call_error(shard, e))?;
        Ok(index)
    }

    /// Asks `node` to drop its replica of `shard`, which this leader's
    /// membership (committed, named in the request) no longer lists.
    pub(crate) async fn ask_drop(
        &self,
        raft: &crate::node::ShardRaft,
        shard: ShardId,
        node: NodeId,
    ) -> Result<PeerResponse, CallError> {
        let after = *raft.metrics().borrow_watched().membership_config.log_id();
        self.ask_drop_after(shard, node, after).await
    }

    /// [`PeerRequest::DropReplica`] to `node`, naming `after`.
    async fn ask_drop_after(
        &self,
        shard: ShardId,
        node: NodeId,
        after: Option<crate::raft::LogId>,
    ) -> Result<PeerResponse, CallError> {
        rpc::call(
            &self.transport,
            node,
            shard,
            &PeerRequest::DropReplica { after },
            Duration::from_secs(10),
        )
        .await
    }

    /// Streams this leader's current snapshot of `shard` (built first if
    /// there is none) to the empty replica on `to`, which installs it. A
    /// learner must start from a snapshot: replaying the log from its start
    /// would apply old commands against today's range and epoch.
    pub(crate) async fn seed_replica(
        &self,
        raft: &crate::node::ShardRaft,
        shard: ShardId,
        to: NodeId,
        timeout: Duration,
    ) -> Result<(), AdminError> {
        // The seed must know every split and membership change the shard
        // has made: an older snapshot would install a range and
        // configuration that no longer exist. Build a fresh one if needed.
        let current = self
            .engine
            .descriptor(shard)
            .map_err(|_| AdminError::UnknownShard { shard })?
            .epoch;
        let mut built = 0;
        let snapshot = loop {
            if let Some(s) = raft
                .get_snapshot()
                .await
                .map_err(|e| raft_error(shard, e))?
            {
                let epoch = crate::storage::snapshot::read_header(s.snapshot.path())
                    .map(|h| h.descriptor.epoch);
                match epoch {
                    Ok(e) if e.covers(&current) => {
                        break s;
                    }
                    Ok(e) => {
                        tracing::info!(%shard, snapshot = ?e, current = ?current, "move: the latest snapshot predates the current epoch, building one")
                    }
                    Err(e) => {
                        tracing::warn!(%shard, error = %e, "move: unreadable snapshot, building one")
                    }
                }
            }
            if built == 3 {
                return Err(AdminError::Unavailable {
                    shard,
                    reason: "no snapshot at the current epoch after building three".into(),
                });
            }
            built += 1;
            let applied = raft
                .metrics()
                .borrow_watched()
                .last_applied
                .map(|l| l.index);
            raft.trigger()
                .snapshot()
                .await
                .map_err(|e| raft_error(shard, e))?;
            raft.wait(Some(Duration::from_secs(60)))
                .metrics(
                    |m| m.snapshot.map(|l| l.index) >= applied && m.snapshot.is_some(),
                    "move: a snapshot at the current epoch",
                )
                .await
                .map_err(|e| raft_error(shard, e))?;
        };
        let vote = raft.metrics().borrow_watched().vote;
        let head = SnapshotHead {
            vote,
            meta: snapshot.meta.clone(),
        };
        rpc::send_snapshot(
            &self.transport,
            to,
            shard,
            &head,
            &snapshot.snapshot,
            timeout,
        )
        .await
        .map_err(|e| call_error(shard, e))?;
        Ok(())
    }
}

impl Node {
    /// The node's batch system, started (with no shards) if it was not
    /// running: a node that hosted no batch-system shard when it started
    /// is a move's target.
    async fn ensure_batch(
        &self,
    ) -> Result<Arc<crate::node::batch::BatchShards>, crate::node::NodeError> {
        if let Some(b) = self.registry.batch.get() {
            return Ok(b.clone());
        }
        let b = Arc::new(crate::node::batch::BatchShards::start(
            &self.engine,
            self.id,
            &[],
            self.transport.clone(),
            &self.config.raft,
        )?);
        if let Err(extra) = self.registry.batch.set(b.clone()) {
            // Started meanwhile by another caller: keep that one.
            extra.stop();
        }
        Ok(self.registry.batch.get().expect("set above").clone())
    }

    /// Creates an empty replica of `d` here on the batch Raft system (a
    /// move's target; a no-op when it exists): its Raft state first (the
    /// voters `d` names; this node is not one yet), then the shard, then
    /// its group opens in the loop, empty until the leader seeds it.
    pub(crate) async fn create_batch_replica_local(
        &self,
        d: &ShardDescriptor,
    ) -> Result<(), crate::node::NodeError> {
        let _lifecycle = self.lifecycle.lock().await;
        if let Ok(local) = self.engine.descriptor(d.id) {
            if !crate::multiraft::GroupStore::exists(&self.engine, d.id)? {
                return Err(crate::node::NodeError::Raft {
                    shard: d.id,
                    reason: "an openraft replica of it is hosted here".into(),
                });
            }
            if local.epoch.conf_ver >= d.epoch.conf_ver {
                return Ok(());
            }
            // Left from an older configuration: replaced by an empty one.
            tracing::info!(node = %self.id, shard = %d.id, local = ?local.epoch, wanted = ?d.epoch, "replacing a batch replica left from an older configuration");
            drop(_lifecycle);
            self.drop_replica_local(d.id).await?;
            return Box::pin(self.create_batch_replica_local(d)).await;
        }
        if let Some(conf_ver) = self.engine.tombstone(d.id)? {
            if d.epoch.conf_ver < conf_ver {
                return Err(crate::storage::StoreError::Tombstoned {
                    shard: d.id,
                    conf_ver,
                }
                .into());
            }
        }
        if !crate::multiraft::GroupStore::exists(&self.engine, d.id)? {
            let voters: Vec<u64> = d.replicas.iter().map(|n| n.0).collect();
            crate::multiraft::GroupStore::bootstrap(&self.engine, d.id, &voters)?;
        }
        match self.engine.create_shard(d).await {
            Ok(()) | Err(crate::storage::StoreError::ShardExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let b = self.ensure_batch().await?;
        b.open(d.id).await
    }

    /// Creates an empty replica of `d` here (no-op when it exists) and
    /// starts its group uninitialised: its leader brings it up to date.
    pub(crate) async fn create_replica_local(
        &self,
        d: &ShardDescriptor,
    ) -> Result<(), crate::node::NodeError> {
        match self.engine.create_shard(d).await {
            Ok(()) => {}
            Err(crate::storage::StoreError::ShardExists { .. }) => {
                let local = self.engine.descriptor(d.id)?;
                if local.epoch.conf_ver < d.epoch.conf_ver {
                    // Left from an older configuration (removed while this
                    // node was down, or never dropped): its log and state
                    // would mislead the group. Replace it with an empty one.
                    tracing::info!(node = %self.id, shard = %d.id, local = ?local.epoch, wanted = ?d.epoch, "replacing a replica left from an older configuration");
                    self.drop_replica_local(d.id).await?;
                    self.engine.create_shard(d).await?;
                }
            }
            Err(e) => return Err(e.into()),
        }
        self.start_group(d.id).await?;
        Ok(())
    }

    /// Stops this node's replica of `shard` and deletes its log, state,
    /// snapshots and data.
    pub(crate) async fn drop_replica_local(
        &self,
        shard: ShardId,
    ) -> Result<(), crate::node::NodeError> {
        let _lifecycle = self.lifecycle.lock().await;
        if let Some(b) = self.registry.batch.get() {
            b.close(shard).await?;
        }
        if let Some((_, crate::node::Slot::Live(raft))) = self.registry.groups.remove(&shard) {
            let _ = raft.shutdown().await;
        }
        self.registry.quiesce.forget(shard);
        self.registry.load.forget(shard);
        self.no_campaign.remove(&shard);
        // The group's stores close as its tasks end.
        let started = Instant::now();
        loop {
            match self.engine.delete_shard(shard).await {
                Ok(()) => break,
                Err(crate::storage::StoreError::ShardOpen { .. })
                    if started.elapsed() < Duration::from_secs(10) =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(crate::storage::StoreError::UnknownShard { .. }) => break,
                Err(e) => return Err(e.into()),
            }
        }
        tracing::info!(node = %self.id, %shard, "replica dropped");
        Ok(())
    }
}

/// Asks a move's source `from` to drop its replica of `shard` (`ask`: one
/// request, made again for each try), up to 5 times 200 ms apart; done
/// when it did or no longer hosts one. Otherwise replica GC drops it
/// later.
async fn drop_source<F, Fut>(shard: ShardId, from: NodeId, ask: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<PeerResponse, CallError>>,
{
    for _ in 0..5 {
        match ask().await {
            Ok(PeerResponse::Done)
            | Err(CallError::Refused {
                refusal: Refusal::UnknownShard(_),
                ..
            }) => return,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    tracing::warn!(%shard, node = %from, "move: the old replica could not be dropped now; replica GC drops it");
}

/// A lagging replica is seeded again at most this often per group.
const RESEED_AGAIN: Duration = Duration::from_secs(10);

/// Seeds the followers of batch-system groups led here that raft-rs found
/// needing entries the leader's log compacted (they were down, or cut
/// off, longer than `compact_lag_max` entries): a snapshot of the state
/// machine, as a move seeds its target, after which their log catches up
/// from the leader's. Checks every second.
pub(crate) async fn reseed_lagging(node: Weak<Node>) {
    let mut seeded: HashMap<(ShardId, NodeId), Instant> = HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(n) = node.upgrade() else { return };
        let Some(b) = n.registry.batch.get().cloned() else {
            continue;
        };
        seeded.retain(|_, at| at.elapsed() < RESEED_AGAIN);
        for (shard, peer) in b.take_snapshot_requests() {
            if seeded.contains_key(&(shard, peer)) {
                continue;
            }
            let Some(g) = b.group(shard).filter(|g| g.leading) else {
                continue;
            };
            seeded.insert((shard, peer), Instant::now());
            match n
                .seed_batch_replica(shard, peer, g.term, Duration::from_secs(60))
                .await
            {
                Ok(index) => {
                    b.seeded(shard, peer, index);
                    tracing::info!(%shard, %peer, index, "a replica behind the compacted log was seeded");
                }
                Err(e) => {
                    tracing::warn!(%shard, %peer, error = %e, "a replica behind the compacted log was not seeded")
                }
            }
        }
    }
}
