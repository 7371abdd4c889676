//! Cluster administration on a node: forwarded proposals, splits, replica
//! moves, leader transfers, nodes joining, and the background tasks that
//! keep the meta shard's table current, start shards created by splits and
//! (when configured) rebalance the cluster.
//!
//! Every step is idempotent and re-checks the group's state first, so an
//! interrupted operation run again continues from where the cluster is.

mod balance;
mod joins;
mod leader;
mod merge;
mod moves;
mod routes;
mod split;

pub(crate) use balance::auto_rebalance;
pub(crate) use joins::announce;
pub(crate) use moves::reseed_lagging;
pub(crate) use routes::{report_routes, start_created};
pub(crate) use split::auto_split;

use super::quiesce::Wake;
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
        if let Some(b) = self.batch_for(shard).cloned() {
            return b.propose_led(shard, &cmd).await;
        }
        let raft = self
            .group(shard)
            .await
            .ok_or(Refusal::UnknownShard(shard))?;
        let (leads, hint) = leadership(&raft, self.me);
        if !leads {
            return Err(Refusal::NotLeader(hint));
        }
        self.quiesce.touch(shard, &raft, Wake::Admin);
        let _expedite = self.expedite();
        self.renew_lapsing_lease(&raft).await;
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
        let req_kind = if matches!(req, PeerRequest::CreateBatchReplica(_)) {
            ReqKind::Batch
        } else {
            ReqKind::Openraft
        };
        match req {
            PeerRequest::Propose(cmd) => match self.propose_local(shard, cmd).await {
                Ok(r) => PeerResponse::Proposed(r),
                Err(r) => refused(r),
            },
            PeerRequest::CreateReplica(d) | PeerRequest::CreateBatchReplica(d) => {
                let Some(node) = self.node() else {
                    return refused(Refusal::Failed("node stopping".into()));
                };
                if d.id != shard {
                    return refused(Refusal::Failed("descriptor names another shard".into()));
                }
                let created = if matches!(req_kind, ReqKind::Batch) {
                    node.create_batch_replica_local(&d).await
                } else {
                    node.create_replica_local(&d).await
                };
                match created {
                    Ok(()) => PeerResponse::Done,
                    Err(crate::node::NodeError::Store(
                        crate::storage::StoreError::Tombstoned { shard, conf_ver },
                    )) => refused(Refusal::Tombstoned { shard, conf_ver }),
                    Err(e) => refused(Refusal::Failed(e.to_string())),
                }
            }
            PeerRequest::DropReplica { after } => {
                let Some(node) = self.node() else {
                    return refused(Refusal::Failed("node stopping".into()));
                };
                if let Some(raft) = self.group(shard).await {
                    let m = raft.metrics().borrow_watched().membership_config.clone();
                    if m.membership().get_node(&self.me).is_some() && *m.log_id() > after {
                        return refused(Refusal::Failed(format!(
                            "{} is a member of {shard} in membership {:?}, newer than the request's {after:?}",
                            self.me,
                            m.log_id()
                        )));
                    }
                }
                if let Some(g) = self.batch_group(shard) {
                    // The same rule on the batch system: refused while this
                    // replica applied past the requester's configuration
                    // and its own (newer) one lists it.
                    let listed = self
                        .engine
                        .descriptor(shard)
                        .is_ok_and(|d| d.replicas.contains(&self.me));
                    let newer = after.is_none_or(|a| g.applied > a.index);
                    if listed && newer {
                        return refused(Refusal::Failed(format!(
                            "{} is a voter of {shard} as of its applied index {}, past the request's {after:?}",
                            self.me, g.applied
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
            PeerRequest::Hibernate { vote, last } => {
                let Some(raft) = self.group(shard).await else {
                    return refused(Refusal::UnknownShard(shard));
                };
                match self.quiesce.sleep_follower(shard, &raft, vote, last) {
                    Ok(()) => PeerResponse::Done,
                    Err(reason) => refused(Refusal::Failed(reason)),
                }
            }
            PeerRequest::MergeReady { into, at } => match self.merge_ready(shard, into, at) {
                Ok(()) => PeerResponse::Done,
                Err(why) => refused(Refusal::Failed(why)),
            },
            PeerRequest::Ping => PeerResponse::Pong {
                boot: self.quiesce.boot,
            },
            PeerRequest::Append(_)
            | PeerRequest::Vote(_)
            | PeerRequest::PreVote(_)
            | PeerRequest::TransferLeader(_) => {
                refused(Refusal::Failed("not an admin request".into()))
            }
        }
    }
}

/// Which system a replica-creating request is for.
enum ReqKind {
    Openraft,
    Batch,
}

pub(super) fn call_error(shard: ShardId, e: CallError) -> AdminError {
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

pub(super) fn refusal_error(shard: ShardId, r: Refusal) -> AdminError {
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

pub(super) fn raft_error(shard: ShardId, e: impl std::fmt::Display) -> AdminError {
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
        let mut hint = self.registry.view(shard).and_then(|v| v.leader);
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
    pub(crate) async fn led(
        &self,
        shard: ShardId,
    ) -> Result<Arc<crate::node::ShardRaft>, AdminError> {
        let raft = self
            .group(shard)
            .await
            .ok_or(AdminError::UnknownShard { shard })?;
        let (leads, hint) = leadership(&raft, self.id);
        if !leads {
            return Err(AdminError::NotLeader { shard, hint });
        }
        self.registry.quiesce.touch(shard, &raft, Wake::Admin);
        Ok(raft)
    }
}
