//! Cluster administration on a node: forwarded proposals, splits, replica
//! moves, leader transfers, nodes joining, and the background tasks that
//! keep the meta shard's table current and start shards created by splits.
//!
//! Every step is idempotent and re-checks the group's state first, so an
//! interrupted operation run again continues from where the cluster is.

use super::{leadership, Node, Registry};
use crate::command::{Command, CommandResponse};
use crate::meta;
use crate::net::PeerAddr;
use crate::raft::rpc::{self, CallError, PeerRequest, PeerResponse, Refusal, SnapshotHead};
use crate::raft::TypeConfig;
use crate::{NodeId, ShardDescriptor, ShardId};
use openraft::async_runtime::watch::WatchReceiver as _;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Why an administrative operation did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// The shard has no replica on this node.
    #[error("{shard} is not hosted by this node")]
    UnknownShard {
        /// The shard.
        shard: ShardId,
    },
    /// This node does not lead the shard; ask `hint`.
    #[error("{shard}: not the leader (hint {hint:?})")]
    NotLeader {
        /// The shard.
        shard: ShardId,
        /// The leader this node knows of.
        hint: Option<NodeId>,
    },
    /// The request cannot be carried out as asked (nothing changed).
    #[error("refused: {0}")]
    Refused(String),
    /// The cluster could not complete it in time; run it again.
    #[error("{shard} unavailable: {reason}")]
    Unavailable {
        /// The shard.
        shard: ShardId,
        /// What failed last.
        reason: String,
    },
}

/// How long a forwarded proposal may take, all retries included.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

impl Registry {
    /// The node this registry belongs to, while it runs.
    pub(crate) fn node(&self) -> Option<Arc<Node>> {
        self.node.get().and_then(Weak::upgrade)
    }

    /// Proposes `cmd` to this node's replica of `shard`, which must lead.
    pub(crate) async fn propose_local(
        &self,
        shard: ShardId,
        cmd: Command,
    ) -> Result<CommandResponse, Refusal> {
        let raft = self.get(shard).ok_or(Refusal::UnknownShard(shard))?;
        let (leads, hint) = leadership(&raft, self.me);
        if !leads {
            return Err(Refusal::NotLeader(hint));
        }
        let _expedite = self.expedite();
        match raft.client_write(cmd).await {
            Ok(r) => Ok(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(Refusal::NotLeader(f.leader_id))
            }
            Err(e) => Err(Refusal::Failed(e.to_string())),
        }
    }

    /// Serves the administrative peer requests.
    pub(crate) async fn handle_admin(&self, shard: ShardId, req: PeerRequest) -> PeerResponse {
        let refused = |r: Refusal| PeerResponse::Refused(r);
        match req {
            PeerRequest::Propose(cmd) => match self.propose_local(shard, cmd).await {
                Ok(r) => PeerResponse::Proposed(r),
                Err(r) => refused(r),
            },
            PeerRequest::CreateReplica(d) => {
                let Some(node) = self.node() else {
                    return refused(Refusal::Failed("node stopping".into()));
                };
                if d.id != shard {
                    return refused(Refusal::Failed("descriptor names another shard".into()));
                }
                match node.create_replica_local(&d).await {
                    Ok(()) => PeerResponse::Done,
                    Err(super::NodeError::Store(crate::storage::StoreError::Tombstoned {
                        shard,
                        conf_ver,
                    })) => refused(Refusal::Tombstoned { shard, conf_ver }),
                    Err(e) => refused(Refusal::Failed(e.to_string())),
                }
            }
            PeerRequest::DropReplica { after } => {
                let Some(node) = self.node() else {
                    return refused(Refusal::Failed("node stopping".into()));
                };
                if let Some(raft) = self.get(shard) {
                    let m = raft.metrics().borrow_watched().membership_config.clone();
                    if m.membership().get_node(&self.me).is_some() && *m.log_id() > after {
                        return refused(Refusal::Failed(format!(
                            "{} is a member of {shard} in membership {:?}, newer than the request's {after:?}",
                            self.me,
                            m.log_id()
                        )));
                    }
                }
                match node.drop_replica_local(shard).await {
                    Ok(()) => PeerResponse::Done,
                    Err(e) => refused(Refusal::Failed(e.to_string())),
                }
            }
            PeerRequest::AddPeer { id, addr } => {
                let Some(node) = self.node() else {
                    return refused(Refusal::Failed("node stopping".into()));
                };
                node.learn_peer(PeerAddr { id, addr });
                PeerResponse::Done
            }
            PeerRequest::Append(_)
            | PeerRequest::Vote(_)
            | PeerRequest::PreVote(_)
            | PeerRequest::TransferLeader(_) => {
                refused(Refusal::Failed("not an admin request".into()))
            }
        }
    }
}

fn call_error(shard: ShardId, e: CallError) -> AdminError {
    match e {
        CallError::Refused {
            refusal: Refusal::NotLeader(hint),
            ..
        } => AdminError::NotLeader { shard, hint },
        CallError::Refused {
            refusal: Refusal::UnknownShard(_),
            ..
        } => AdminError::UnknownShard { shard },
        other => AdminError::Unavailable {
            shard,
            reason: other.to_string(),
        },
    }
}

fn refusal_error(shard: ShardId, r: Refusal) -> AdminError {
    match r {
        Refusal::NotLeader(hint) => AdminError::NotLeader { shard, hint },
        Refusal::UnknownShard(_) => AdminError::UnknownShard { shard },
        Refusal::Failed(reason) => AdminError::Unavailable { shard, reason },
        // Leadership moved while a seed snapshot was on its way: try again.
        r @ Refusal::NotTheSender { .. } => AdminError::Unavailable {
            shard,
            reason: r.to_string(),
        },
        r @ (Refusal::StaleSnapshot { .. } | Refusal::Tombstoned { .. }) => {
            AdminError::Refused(r.to_string())
        }
    }
}

fn raft_error(shard: ShardId, e: impl std::fmt::Display) -> AdminError {
    AdminError::Unavailable {
        shard,
        reason: e.to_string(),
    }
}

impl Node {
    /// Proposes `cmd` to `shard`'s leader wherever it is, following leader
    /// hints and trying every known node, until `timeout`.
    ///
    /// # Errors
    /// [`AdminError::Unavailable`] when no leader took it in time.
    pub async fn propose(
        &self,
        shard: ShardId,
        cmd: Command,
        timeout: Duration,
    ) -> Result<CommandResponse, AdminError> {
        let deadline = Instant::now() + timeout;
        let mut hint = self
            .raft(shard)
            .and_then(|r| r.metrics().borrow_watched().current_leader);
        let mut others: Vec<NodeId> = std::iter::once(self.id)
            .chain(self.transport.peer_ids())
            .collect();
        others.sort();
        let mut turn = 0usize;
        let mut backoff = Duration::from_millis(20);
        let mut last;
        loop {
            let target = hint.take().unwrap_or_else(|| {
                turn += 1;
                others[turn % others.len()]
            });
            let left = deadline.saturating_duration_since(Instant::now());
            let result = if target == self.id {
                self.registry
                    .propose_local(shard, cmd.clone())
                    .await
                    .map_err(|r| refusal_error(shard, r))
            } else {
                match rpc::call(
                    &self.transport,
                    target,
                    shard,
                    &PeerRequest::Propose(cmd.clone()),
                    left.min(Duration::from_secs(5)),
                )
                .await
                {
                    Ok(PeerResponse::Proposed(r)) => Ok(r),
                    Ok(other) => Err(AdminError::Unavailable {
                        shard,
                        reason: format!("unexpected answer {other:?}"),
                    }),
                    Err(e) => Err(call_error(shard, e)),
                }
            };
            match result {
                Ok(r) => return Ok(r),
                Err(AdminError::NotLeader { hint: h, .. }) => {
                    hint = h.filter(|h| *h != target);
                    last = format!("{target} does not lead {shard}");
                }
                Err(e) => last = e.to_string(),
            }
            if Instant::now() + backoff >= deadline {
                return Err(AdminError::Unavailable {
                    shard,
                    reason: format!("no leader took the proposal in {timeout:?}: {last}"),
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// This replica's group, which must lead the shard.
    fn led(&self, shard: ShardId) -> Result<super::ShardRaft, AdminError> {
        let raft = self.raft(shard).ok_or(AdminError::UnknownShard { shard })?;
        let (leads, hint) = leadership(&raft, self.id);
        if !leads {
            return Err(AdminError::NotLeader { shard, hint });
        }
        Ok(raft)
    }

    /// Splits `shard` (led here) at `key`: a fresh id from the meta shard,
    /// the split command through the shard's log, both descriptors recorded
    /// in the meta shard, and the new shard campaigning here. Returns the
    /// two halves once the new one has a leader.
    ///
    /// # Errors
    /// [`AdminError::Refused`] for a key not strictly inside the range (or
    /// the meta shard); [`AdminError::NotLeader`] when this node does not
    /// lead; [`AdminError::Unavailable`] when a step timed out.
    pub async fn split_shard(
        &self,
        shard: ShardId,
        key: Vec<u8>,
    ) -> Result<(ShardDescriptor, ShardDescriptor), AdminError> {
        if shard == meta::META_SHARD {
            return Err(AdminError::Refused("the meta shard is not split".into()));
        }
        let raft = self.led(shard)?;
        let joint = raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .get_joint_config()
            .len()
            > 1;
        if joint {
            // The child would inherit the joint configuration (the state
            // machine refuses such a split too).
            return Err(AdminError::Unavailable {
                shard,
                reason: "a membership change is in progress; split again after it".into(),
            });
        }
        let d = self
            .engine
            .descriptor(shard)
            .map_err(|_| AdminError::UnknownShard { shard })?;
        if key <= d.range.start || !d.range.contains(&key) {
            return Err(AdminError::Refused(format!(
                "split key {} is not strictly inside {shard}'s range {}",
                shard_router::descriptor::escape(&key),
                d.range
            )));
        }
        let child = match self
            .propose(meta::META_SHARD, Command::AllocShardId, PROPOSE_TIMEOUT)
            .await?
        {
            CommandResponse::Allocated(id) => id,
            other => {
                return Err(AdminError::Unavailable {
                    shard,
                    reason: format!("id allocation answered {other:?}"),
                })
            }
        };
        let cmd = Command::Split {
            key,
            child,
            version: d.epoch.version,
        };
        let _expedite = self.registry.expedite();
        let resp = match raft.client_write(cmd).await {
            Ok(r) => r.data,
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                return Err(AdminError::NotLeader {
                    shard,
                    hint: f.leader_id,
                })
            }
            Err(e) => return Err(raft_error(shard, e)),
        };
        let (left, mut right) = match resp {
            CommandResponse::Split { left, right } => (left, right),
            CommandResponse::SplitRefused { reason, .. } => {
                return Err(AdminError::Refused(reason))
            }
            other => {
                return Err(AdminError::Unavailable {
                    shard,
                    reason: format!("split answered {other:?}"),
                })
            }
        };
        right.leader_hint = Some(self.id);
        // The new group starts from the split's log id on every replica;
        // campaigning here makes its first leader this node.
        let started = Instant::now();
        let child_raft = loop {
            if let Some(r) = self.raft(child) {
                break r;
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(AdminError::Unavailable {
                    shard: child,
                    reason: "the new shard's group did not start".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let _ = child_raft.trigger().elect(false).await;
        let _ = child_raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.current_leader.is_some(),
                "split: the new shard elects",
            )
            .await;
        if let Err(e) = self
            .propose(
                meta::META_SHARD,
                Command::RecordRoutes {
                    descriptors: vec![left.clone(), right.clone()],
                },
                PROPOSE_TIMEOUT,
            )
            .await
        {
            // The route reporter records them later; clients are corrected
            // by the shards themselves meanwhile.
            tracing::warn!(%shard, %child, error = %e, "split: routes not recorded yet");
        }
        tracing::info!(%shard, %child, left = %left.range, right = %right.range, "split done");
        Ok((left, right))
    }

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
        let raft = self.led(shard)?;
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
        let mut dropped = false;
        for _ in 0..5 {
            match self.ask_drop(&raft, shard, from).await {
                Ok(PeerResponse::Done)
                | Err(CallError::Refused {
                    refusal: Refusal::UnknownShard(_),
                    ..
                }) => {
                    dropped = true;
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        if !dropped {
            tracing::warn!(%shard, node = %from, "move: the old replica could not be dropped now");
        }
        self.engine
            .descriptor(shard)
            .map_err(|_| AdminError::UnknownShard { shard })
    }

    /// Asks `node` to drop its replica of `shard`, which this leader's
    /// membership (committed, named in the request) no longer lists.
    async fn ask_drop(
        &self,
        raft: &super::ShardRaft,
        shard: ShardId,
        node: NodeId,
    ) -> Result<PeerResponse, CallError> {
        let after = *raft.metrics().borrow_watched().membership_config.log_id();
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
    async fn seed_replica(
        &self,
        raft: &super::ShardRaft,
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

    /// Hands leadership of `shard` (led here) to `to`, waiting until it
    /// leads (or another node does).
    ///
    /// openraft's leader transfer: the leader stops accepting writes, tells
    /// every member, and `to` campaigns once its log holds what the leader
    /// had flushed. Tried again a few times when another node wins.
    async fn hand_over(&self, shard: ShardId, to: NodeId) -> Result<(), AdminError> {
        let raft = self.led(shard)?;
        let mut last = String::new();
        for _ in 0..5 {
            if let Err(e) = raft.trigger().transfer_leader(to).await {
                return Err(raft_error(shard, e));
            }
            let moved = raft
                .wait(Some(Duration::from_secs(5)))
                .metrics(
                    |m| m.current_leader.is_some() && m.current_leader != Some(self.id),
                    "transfer: another node leads",
                )
                .await;
            match moved {
                Ok(m) if m.current_leader == Some(to) => return Ok(()),
                Ok(m) => last = format!("{:?} leads instead", m.current_leader),
                Err(e) => last = e.to_string(),
            }
            if !leadership(&raft, self.id).0 {
                // Another node won; the caller checks who.
                return Ok(());
            }
        }
        Err(AdminError::Unavailable {
            shard,
            reason: format!("leadership did not move to {to}: {last}"),
        })
    }

    /// Makes `to` the leader of `shard` (run on its leader).
    ///
    /// # Errors
    /// [`AdminError::Refused`] when `to` is not a voter of the shard.
    pub async fn transfer_leader(&self, shard: ShardId, to: NodeId) -> Result<(), AdminError> {
        let raft = self.led(shard)?;
        if to == self.id {
            return Ok(());
        }
        let voter = raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == to);
        if !voter {
            return Err(AdminError::Refused(format!(
                "{to} is not a voter of {shard}"
            )));
        }
        self.hand_over(shard, to).await?;
        let now = raft.metrics().borrow_watched().current_leader;
        if now == Some(to) {
            Ok(())
        } else {
            Err(AdminError::Unavailable {
                shard,
                reason: format!("{now:?} won the election instead of {to}"),
            })
        }
    }

    /// Creates an empty replica of `d` here (no-op when it exists) and
    /// starts its group uninitialised: its leader brings it up to date.
    pub(crate) async fn create_replica_local(
        &self,
        d: &ShardDescriptor,
    ) -> Result<(), super::NodeError> {
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
    pub(crate) async fn drop_replica_local(&self, shard: ShardId) -> Result<(), super::NodeError> {
        let _lifecycle = self.lifecycle.lock().await;
        if let Some((_, raft)) = self.registry.groups.remove(&shard) {
            let _ = raft.shutdown().await;
        }
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

    /// Learns a node's address (a node joined), persisting it so restarts
    /// keep it.
    pub fn learn_peer(&self, p: PeerAddr) {
        if p.id == self.id {
            return;
        }
        self.transport.add_peer(p);
        if let Err(e) = super::peers_file::save(&self.config.data_dir, &self.transport.peers()) {
            tracing::warn!(error = %e, "could not persist the peer list");
        }
    }

    /// Announces `p` to every peer and learns it here; returns every node
    /// known here (this one included).
    pub(crate) async fn admit(&self, p: PeerAddr) -> Vec<PeerAddr> {
        self.learn_peer(p.clone());
        for peer in self.transport.peer_ids() {
            if peer == p.id {
                continue;
            }
            let _ = rpc::call(
                &self.transport,
                peer,
                meta::META_SHARD,
                &PeerRequest::AddPeer {
                    id: p.id,
                    addr: p.addr,
                },
                Duration::from_secs(5),
            )
            .await;
        }
        let mut all = self.transport.peers();
        all.push(PeerAddr {
            id: self.id,
            addr: self.addr(),
        });
        all.sort_by_key(|p| p.id);
        all
    }
}

/// Starts the groups of shards created by splits applied on this node.
pub(crate) async fn start_created(node: Weak<Node>, signal: Arc<tokio::sync::Notify>) {
    loop {
        {
            let Some(n) = node.upgrade() else { return };
            for shard in n.engine.take_created() {
                if let Err(e) = n.start_group(shard).await {
                    tracing::error!(%shard, error = %e, "could not start a shard created by a split");
                }
            }
        }
        signal.notified().await;
    }
}

/// Keeps the meta shard's table current: every second, the descriptors of
/// the shards this node leads whose epoch it has not recorded yet.
pub(crate) async fn report_routes(node: Weak<Node>) {
    let mut recorded: HashMap<ShardId, crate::Epoch> = HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let Some(n) = node.upgrade() else { return };
        let mut pending = Vec::new();
        for shard in n.shards_led() {
            if let Ok(mut d) = n.engine.descriptor(shard) {
                if recorded.get(&shard) != Some(&d.epoch) {
                    d.leader_hint = Some(n.id);
                    pending.push(d);
                }
            }
        }
        for chunk in pending.chunks(256) {
            let cmd = Command::RecordRoutes {
                descriptors: chunk.to_vec(),
            };
            if n.propose(meta::META_SHARD, cmd, Duration::from_secs(5))
                .await
                .is_ok()
            {
                for d in chunk {
                    recorded.insert(d.id, d.epoch);
                }
            }
        }
    }
}

/// Announces this node to the cluster (a `Join` to the configured peers,
/// with this node's certificate, until one answers) and learns every node
/// the answer names. A node started with `tessera serve` pointing at an
/// existing cluster joins this way; for known nodes it is a no-op.
pub(crate) async fn announce(node: Weak<Node>, identity: crate::tls::TlsIdentity) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let (me, addr, peers) = {
            let Some(n) = node.upgrade() else { return };
            (n.id, n.addr(), n.transport.peers())
        };
        let nodes = peers.iter().map(|p| (p.id, p.addr)).collect();
        let client = crate::client::Client::from_identity(&identity, nodes, Default::default());
        if let Ok(client) = client {
            for p in &peers {
                let req = crate::api::Request::Join { node: me, addr };
                if let Ok(crate::api::Response::Peers(all)) = client.call_node(p.id, &req).await {
                    let Some(n) = node.upgrade() else { return };
                    for (id, addr) in all {
                        n.learn_peer(PeerAddr { id, addr });
                    }
                    tracing::info!(node = %me, via = %p.id, "announced to the cluster");
                    return;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Splits the shards this node leads once they outgrow
/// `split.max_bytes`, at their middle key, checking every
/// `split.check_interval_ms`.
pub(crate) async fn auto_split(node: Weak<Node>) {
    let (max, every) = {
        let Some(n) = node.upgrade() else { return };
        (
            n.config.split.max_bytes,
            Duration::from_millis(n.config.split.check_interval_ms),
        )
    };
    if max == 0 {
        return;
    }
    // Per shard: bytes applied when last measured, and the size then.
    let mut checked: HashMap<ShardId, (u64, u64)> = HashMap::new();
    loop {
        tokio::time::sleep(every).await;
        let Some(n) = node.upgrade() else { return };
        for shard in n.shards_led() {
            let Ok(d) = n.engine.descriptor(shard) else {
                continue;
            };
            // Cheap test first: the last measured size plus what was
            // applied since (or RocksDB's on-disk estimate) must reach the
            // limit before the range is scanned.
            let written = n.engine.written(shard);
            if let Some(&(at, measured)) = checked.get(&shard) {
                let fresh = written.saturating_sub(at);
                let estimate = n.engine.approximate_size(&d.range);
                if measured + fresh < max && estimate < max {
                    continue;
                }
            }
            let engine = n.engine.clone();
            let range = d.range.clone();
            let point = tokio::task::spawn_blocking(move || engine.split_point(&range, max)).await;
            let Ok(Ok((bytes, key))) = point else {
                continue;
            };
            checked.insert(shard, (written, bytes));
            let Some(key) = key else {
                continue;
            };
            tracing::info!(%shard, bytes, key = %shard_router::descriptor::escape(&key), "shard over the size limit: splitting");
            // The parent keeps about half.
            checked.insert(shard, (written, bytes / 2));
            match n.split_shard(shard, key).await {
                Ok((l, r)) => {
                    tracing::info!(left = %l.id, right = %r.id, "automatic split done");
                }
                Err(e) => tracing::warn!(%shard, error = %e, "automatic split failed"),
            }
        }
    }
}
