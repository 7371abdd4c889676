//! Plan steps: what a plan is made of, whether a step is valid on a state,
//! and how it changes the state.

use super::state::{distinct_replicas, is_live, leader_of, ClusterState, Nodes};
use crate::ids::{NodeId, ShardId};
use serde::{Deserialize, Serialize};
use std::fmt;

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// Move the replica of `shard` on `from` to `to` (add learner on `to`,
    /// promote, remove `from`).
    MoveReplica {
        /// The shard.
        shard: ShardId,
        /// The node losing the replica.
        from: NodeId,
        /// The node gaining it (eligible, not already a replica).
        to: NodeId,
        /// The shard's size when planned: what the move copies.
        bytes: u64,
    },
    /// Hand leadership of `shard` from `from` to `to` (a replica).
    TransferLeader {
        /// The shard.
        shard: ShardId,
        /// The current leader.
        from: NodeId,
        /// The new leader.
        to: NodeId,
    },
    /// Split `shard` (at a key the executor chooses) because it is too large.
    Split {
        /// The shard.
        shard: ShardId,
        /// Its size when planned.
        bytes: u64,
    },
}

impl Step {
    /// The shard the step acts on.
    pub fn shard(&self) -> ShardId {
        match *self {
            Step::MoveReplica { shard, .. }
            | Step::TransferLeader { shard, .. }
            | Step::Split { shard, .. } => shard,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::MoveReplica {
                shard,
                from,
                to,
                bytes,
            } => write!(f, "move {shard} {from} -> {to} ({bytes} bytes)"),
            Step::TransferLeader { shard, from, to } => {
                write!(f, "transfer leader {shard} {from} -> {to}")
            }
            Step::Split { shard, bytes } => write!(f, "split {shard} ({bytes} bytes)"),
        }
    }
}

/// One round of steps, in execution order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Plan {
    /// The steps, in order: a transfer that a move depends on comes before it.
    pub steps: Vec<Step>,
}

impl Plan {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Number of [`Step::MoveReplica`].
    pub fn moves(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::MoveReplica { .. }))
            .count()
    }

    /// Number of [`Step::TransferLeader`].
    pub fn transfers(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::TransferLeader { .. }))
            .count()
    }

    /// Number of [`Step::Split`].
    pub fn splits(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Split { .. }))
            .count()
    }

    /// Total bytes the moves copy.
    pub fn bytes_to_move(&self) -> u64 {
        self.steps
            .iter()
            .map(|s| match s {
                Step::MoveReplica { bytes, .. } => *bytes,
                _ => 0,
            })
            .sum()
    }
}

/// Why a step cannot be applied to a state (see [`check_step`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepError {
    /// No shard has this id.
    UnknownShard {
        /// The shard.
        shard: ShardId,
    },
    /// The node does not hold a replica of the shard.
    NotAReplica {
        /// The shard.
        shard: ShardId,
        /// The node.
        node: NodeId,
    },
    /// The move's target already holds a replica of the shard.
    AlreadyAReplica {
        /// The shard.
        shard: ShardId,
        /// The node.
        node: NodeId,
    },
    /// The target is down, draining or unknown.
    TargetNotEligible {
        /// The node.
        node: NodeId,
    },
    /// The transfer's `from` is not the shard's leader.
    NotLeader {
        /// The shard.
        shard: ShardId,
        /// The node.
        node: NodeId,
    },
    /// The move's source is the leader of a multi-replica shard: transfer
    /// leadership first.
    SourceIsLeader {
        /// The shard.
        shard: ShardId,
        /// The node.
        node: NodeId,
    },
    /// The shard is not live: no up majority, or its leader is on a down node.
    NoQuorum {
        /// The shard.
        shard: ShardId,
    },
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepError::UnknownShard { shard } => write!(f, "unknown shard {shard}"),
            StepError::NotAReplica { shard, node } => {
                write!(f, "{node} holds no replica of {shard}")
            }
            StepError::AlreadyAReplica { shard, node } => {
                write!(f, "{node} already holds a replica of {shard}")
            }
            StepError::TargetNotEligible { node } => {
                write!(f, "{node} is down, draining or unknown")
            }
            StepError::NotLeader { shard, node } => write!(f, "{node} does not lead {shard}"),
            StepError::SourceIsLeader { shard, node } => {
                write!(
                    f,
                    "{node} leads {shard}: transfer leadership before moving it"
                )
            }
            StepError::NoQuorum { shard } => write!(f, "{shard} has no up majority"),
        }
    }
}

impl std::error::Error for StepError {}

/// Whether `step` is valid on `state` under the planner's rules (a step from an
/// older plan may have gone stale). Every step of [`plan`](super::plan)`(state)`
/// passes when checked against `state` with the earlier steps of the plan
/// applied.
///
/// # Errors
/// Which rule the step breaks.
pub fn check_step(state: &ClusterState, step: &Step) -> Result<(), StepError> {
    let nodes = Nodes::new(&state.nodes);
    let shard = step.shard();
    let s = state
        .shard(shard)
        .ok_or(StepError::UnknownShard { shard })?;
    if !is_live(&nodes, s) {
        return Err(StepError::NoQuorum { shard });
    }
    match *step {
        Step::MoveReplica { from, to, .. } => {
            if !s.replicas().contains(&from) {
                return Err(StepError::NotAReplica { shard, node: from });
            }
            if s.replicas().contains(&to) {
                return Err(StepError::AlreadyAReplica { shard, node: to });
            }
            if !nodes.eligible(to) {
                return Err(StepError::TargetNotEligible { node: to });
            }
            if leader_of(s) == Some(from) && distinct_replicas(s).len() > 1 {
                return Err(StepError::SourceIsLeader { shard, node: from });
            }
        }
        Step::TransferLeader { from, to, .. } => {
            if leader_of(s) != Some(from) {
                return Err(StepError::NotLeader { shard, node: from });
            }
            if !s.replicas().contains(&to) {
                return Err(StepError::NotAReplica { shard, node: to });
            }
            if !nodes.eligible(to) {
                return Err(StepError::TargetNotEligible { node: to });
            }
        }
        Step::Split { .. } => {}
    }
    Ok(())
}

/// Simulates `step` on `state` (for tests, dry runs and progress display).
///
/// - `MoveReplica`: `from` is replaced by `to` in place, `conf_ver` bumps, and
///   if `from` led the shard, `to` now does.
/// - `TransferLeader`: `to` leads (also recorded as the descriptor's hint).
/// - `Split`: the shard keeps the larger half of its bytes and load, its
///   `version` bumps, and a child with id `max id + 1`, the same replicas,
///   leader, range (the split key is the executor's choice) and epoch holds the
///   other half.
///
/// A step that no longer fits the state (unknown shard, `from` not a replica,
/// `to` already one, no free shard id) changes nothing.
pub fn apply_step(state: &mut ClusterState, step: &Step) {
    let at = state.shards.iter().position(|s| s.id() == step.shard());
    apply_step_at(state, at, step);
}

/// [`apply_step`] on the shard at index `at` (the step's shard; `None`: absent).
pub(super) fn apply_step_at(state: &mut ClusterState, at: Option<usize>, step: &Step) {
    let Some(at) = at else {
        return;
    };
    match *step {
        Step::MoveReplica { from, to, .. } => {
            let s = &mut state.shards[at];
            if s.descriptor.replicas.contains(&to) {
                return;
            }
            let Some(pos) = s.descriptor.replicas.iter().position(|r| *r == from) else {
                return;
            };
            s.descriptor.replicas[pos] = to;
            s.descriptor.epoch.conf_ver += 1;
            if s.leader == Some(from) {
                s.leader = Some(to);
            }
            if s.descriptor.leader_hint == Some(from) {
                s.descriptor.leader_hint = Some(to);
            }
        }
        Step::TransferLeader { to, .. } => {
            let s = &mut state.shards[at];
            if s.descriptor.replicas.contains(&to) {
                s.leader = Some(to);
                s.descriptor.leader_hint = Some(to);
            }
        }
        Step::Split { .. } => {
            let max = state
                .shards
                .iter()
                .map(|s| s.id())
                .max()
                .expect("the split shard exists");
            if max >= ShardId::MAX {
                return;
            }
            let s = &mut state.shards[at];
            let (bytes, load) = (s.bytes / 2, s.load / 2);
            s.bytes -= bytes;
            s.load -= load;
            s.descriptor.epoch.version += 1;
            let mut child = s.clone();
            child.descriptor.id = ShardId(max.0 + 1);
            child.bytes = bytes;
            child.load = load;
            state.shards.push(child);
        }
    }
}
