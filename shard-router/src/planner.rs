//! The rebalance planner: turns a snapshot of the cluster into an ordered list
//! of steps (one *round*); the caller executes them and plans again.
//!
//! Pure and deterministic: the same state (in any input order) gives the same
//! plan. Nodes and shards are handled in id order and every choice breaks ties
//! by id.
//!
//! # Goal
//!
//! Over the *eligible* nodes (`up && !draining`), even out the replica count,
//! then the leader count, per node. A node with count `c` is balanced when
//! `|c - mean| <= 1` (the mean may be fractional). Bytes are secondary: among
//! equally good moves the planner copies the smaller (then colder) shard and
//! fills the node holding fewer bytes; it never moves replicas for bytes alone.
//!
//! # Node states
//!
//! - **Draining** nodes shed every replica (moved to an eligible node that does
//!   not hold the shard) and every leadership (transferred to an eligible replica).
//! - **Down** nodes are never targets of a move or a transfer. Their replicas
//!   stay where they are: the planner cannot tell a restart from a loss, and
//!   replacing a replica is an operator decision. The operator makes it by
//!   marking the node draining: replicas on a node that is down *and* draining
//!   are moved like any other draining replica (the move is driven by the
//!   shard's leader and never needs the source; the source's local data is
//!   left for the node to discard if it ever comes back).
//! - A node named in a descriptor but missing from [`ClusterState::nodes`] is
//!   treated as down and not draining. If a node id is listed twice, it counts
//!   as up only if every entry says up, and as draining if any entry does.
//!
//! # Safety rules
//!
//! - A move is add-learner → catch-up → promote → remove, so it never lowers a
//!   shard's voter count. A shard is only moved (or split, or has its
//!   leadership transferred) when it is *live*: a strict majority of its
//!   replicas are on up nodes and its recorded leader, if any, is one of its
//!   replicas on an up node (a leader recorded on a down node is stale; the
//!   planner waits for fresh state).
//! - At most one move per shard per plan, never to a node that already holds
//!   the shard, and at most [`PlannerConfig::max_concurrent_moves`] moves per plan.
//! - At most one leader transfer per shard per plan (transfers are not
//!   counted against the move limit), and none for a shard moved in the plan
//!   except the one emitted just before its move.
//! - A move whose source is the shard's leader is preceded by a
//!   [`Step::TransferLeader`] to another eligible replica, or the planner
//!   picks another source. The only exception is a single-replica shard, which
//!   has nobody to hand leadership to: its move hands leadership to the new
//!   replica once promoted (the executor's move procedure does that).
//!
//! # Order of a plan
//!
//! 1. [`Step::Split`] for every live shard over [`PlannerConfig::split_bytes`]
//!    (and at least 2 bytes). A shard split in this round is not moved or
//!    transferred in the same round.
//! 2. Leadership off draining nodes.
//! 3. Replicas off draining nodes, smaller shards first, each to the eligible
//!    node with the fewest replicas (then fewest bytes, then lowest id).
//! 4. Replica-count balancing: while some eligible node is off the mean by more
//!    than one, move the smallest movable shard from the fullest node to the
//!    emptiest node that can take it (every such move strictly narrows the spread).
//! 5. Leader-count balancing with transfers only: while some eligible node is
//!    off the mean by more than one, follow a chain of transfers from a node
//!    with many leaders to one with at least two fewer (a chain, because a
//!    leader can only go to a node holding a replica of its shard).
//! 6. When no chain exists (the replica layout itself is in the way), and
//!    nothing is left to drain: move a replica of a shard led by (or
//!    reachable from) an overloaded node onto the underloaded node, keeping
//!    replica counts balanced, if need be by pairing it with a move of a shard
//!    the underloaded node does not lead back off it. The next round then
//!    transfers. A shard without a known leader is never given one.
//!
//! Every non-empty round makes progress on, in this order: replicas left to
//! drain, replica-count spread, leaders left to drain, leader-count spread
//! (a round of step 6 moves is followed by a round of transfers that uses
//! them), so repeated plan-and-execute reaches an empty plan.
//!
//! While draining replicas (or leaders) are still pending, the mean counts them
//! as already landed on the eligible nodes, and only overfull nodes trigger
//! balancing (the drain fills the emptier ones).
//!
//! `cfg.replication` is the intended voter count. The planner never changes a
//! shard's voter count (a move is one-for-one); [`misreplicated`] lists the
//! shards whose count differs, for the operator.
//!
//! [`ShardState::load`] only breaks ties (colder shards move first).

use crate::descriptor::ShardDescriptor;
use crate::ids::{NodeId, ShardId};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

/// One node as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeState {
    /// The node.
    pub id: NodeId,
    /// Whether the node is reachable now.
    pub up: bool,
    /// Whether the operator asked for the node to be emptied.
    pub draining: bool,
}

impl NodeState {
    /// An up, non-draining node.
    pub fn new(id: NodeId) -> Self {
        NodeState {
            id,
            up: true,
            draining: false,
        }
    }

    /// Whether the node may receive replicas and leaders (`up && !draining`).
    pub fn is_eligible(&self) -> bool {
        self.up && !self.draining
    }
}

/// One shard as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShardState {
    /// The shard's descriptor; `replicas` are its voters.
    pub descriptor: ShardDescriptor,
    /// The current leader, if known. The planner uses this field, not
    /// `descriptor.leader_hint`.
    pub leader: Option<NodeId>,
    /// The shard's size; what a move copies.
    pub bytes: u64,
    /// Recent operations; may be 0. Only breaks ties.
    pub load: u64,
}

impl ShardState {
    /// The shard's id.
    pub fn id(&self) -> ShardId {
        self.descriptor.id
    }

    /// The shard's voters.
    pub fn replicas(&self) -> &[NodeId] {
        &self.descriptor.replicas
    }
}

/// A snapshot of the cluster: the planner's whole input.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClusterState {
    /// The nodes, in any order.
    pub nodes: Vec<NodeState>,
    /// The shards, in any order.
    pub shards: Vec<ShardState>,
}

impl ClusterState {
    /// The node with this id, if listed.
    pub fn node(&self, id: NodeId) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The shard with this id, if present.
    pub fn shard(&self, id: ShardId) -> Option<&ShardState> {
        self.shards.iter().find(|s| s.id() == id)
    }

    /// Checks the structural invariants: node and shard ids unique, a shard's
    /// replicas distinct, its leader (if any) one of its replicas.
    ///
    /// # Errors
    /// The first violation found, in id order.
    pub fn check(&self) -> Result<(), StateError> {
        let mut nodes = BTreeSet::new();
        let mut sorted: Vec<&NodeState> = self.nodes.iter().collect();
        sorted.sort_by_key(|n| n.id);
        for n in sorted {
            if !nodes.insert(n.id) {
                return Err(StateError::DuplicateNode { node: n.id });
            }
        }
        let mut shards: Vec<&ShardState> = self.shards.iter().collect();
        shards.sort_by_key(|s| s.id());
        let mut ids = BTreeSet::new();
        for s in shards {
            if !ids.insert(s.id()) {
                return Err(StateError::DuplicateShard { shard: s.id() });
            }
            let mut reps = BTreeSet::new();
            let mut sorted = s.replicas().to_vec();
            sorted.sort();
            for r in sorted {
                if !reps.insert(r) {
                    return Err(StateError::DuplicateReplica {
                        shard: s.id(),
                        node: r,
                    });
                }
            }
            if let Some(l) = s.leader {
                if !reps.contains(&l) {
                    return Err(StateError::LeaderNotReplica {
                        shard: s.id(),
                        leader: l,
                    });
                }
            }
        }
        Ok(())
    }
}

/// A broken structural invariant of a [`ClusterState`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateError {
    /// A node id is listed twice.
    DuplicateNode {
        /// The node.
        node: NodeId,
    },
    /// A shard id is listed twice.
    DuplicateShard {
        /// The shard.
        shard: ShardId,
    },
    /// A shard names the same replica twice.
    DuplicateReplica {
        /// The shard.
        shard: ShardId,
        /// The repeated node.
        node: NodeId,
    },
    /// A shard's leader is not one of its replicas.
    LeaderNotReplica {
        /// The shard.
        shard: ShardId,
        /// The leader.
        leader: NodeId,
    },
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::DuplicateNode { node } => write!(f, "node {node} listed twice"),
            StateError::DuplicateShard { shard } => write!(f, "shard {shard} listed twice"),
            StateError::DuplicateReplica { shard, node } => {
                write!(f, "shard {shard} names replica {node} twice")
            }
            StateError::LeaderNotReplica { shard, leader } => {
                write!(f, "shard {shard} leader {leader} is not a replica")
            }
        }
    }
}

impl std::error::Error for StateError {}

/// Planner knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannerConfig {
    /// At most this many [`Step::MoveReplica`] per plan.
    pub max_concurrent_moves: usize,
    /// Split shards larger than this many bytes; `None`: never split.
    pub split_bytes: Option<u64>,
    /// The intended voter count per shard (see [`misreplicated`]).
    pub replication: usize,
}

impl Default for PlannerConfig {
    /// 4 moves per round, no splitting, 3 replicas.
    fn default() -> Self {
        PlannerConfig {
            max_concurrent_moves: 4,
            split_bytes: None,
            replication: 3,
        }
    }
}

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
/// older plan may have gone stale). Every step of [`plan`]`(state)` passes when
/// checked against `state` with the earlier steps of the plan applied.
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
fn apply_step_at(state: &mut ClusterState, at: Option<usize>, step: &Step) {
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

/// The shards whose distinct replica count differs from `cfg.replication`, in
/// id order. The planner never fixes these (moves are one-for-one); they are
/// reported for the operator.
pub fn misreplicated(state: &ClusterState, cfg: &PlannerConfig) -> Vec<ShardId> {
    let mut v: Vec<ShardId> = state
        .shards
        .iter()
        .filter(|s| distinct_replicas(s).len() != cfg.replication)
        .map(|s| s.id())
        .collect();
    v.sort();
    v
}

/// One node's share of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// The node.
    pub id: NodeId,
    /// Whether it is up.
    pub up: bool,
    /// Whether it is draining.
    pub draining: bool,
    /// Replicas it holds.
    pub replicas: usize,
    /// Shards it leads.
    pub leaders: usize,
    /// Sum of the bytes of the shards it holds.
    pub bytes: u64,
}

impl NodeLoad {
    /// Whether the node counts for balance (`up && !draining`).
    pub fn is_eligible(&self) -> bool {
        self.up && !self.draining
    }
}

/// How uneven the cluster is. Means and deviations are over the eligible
/// nodes only (0 when there are none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Imbalance {
    /// Every listed node, in id order.
    pub nodes: Vec<NodeLoad>,
    /// Number of eligible nodes.
    pub eligible: usize,
    /// Mean replicas per eligible node.
    pub mean_replicas: f64,
    /// Mean leaders per eligible node.
    pub mean_leaders: f64,
    /// Mean bytes per eligible node.
    pub mean_bytes: f64,
    /// Largest `|replicas - mean_replicas|` over eligible nodes.
    pub max_replica_deviation: f64,
    /// Largest `|leaders - mean_leaders|` over eligible nodes.
    pub max_leader_deviation: f64,
    /// Largest `|bytes - mean_bytes|` over eligible nodes.
    pub max_bytes_deviation: f64,
}

impl Imbalance {
    /// Every eligible node within one of the mean replica count (exact
    /// integer arithmetic, no float rounding).
    pub fn replicas_balanced(&self) -> bool {
        self.within_one(|n| n.replicas)
    }

    /// Every eligible node within one of the mean leader count.
    pub fn leaders_balanced(&self) -> bool {
        self.within_one(|n| n.leaders)
    }

    /// No draining node holds a replica or a leadership.
    pub fn drained(&self) -> bool {
        self.nodes
            .iter()
            .filter(|n| n.draining)
            .all(|n| n.replicas == 0 && n.leaders == 0)
    }

    /// Replicas and leaders balanced, and draining nodes empty.
    pub fn is_balanced(&self) -> bool {
        self.replicas_balanced() && self.leaders_balanced() && self.drained()
    }

    fn within_one(&self, count: impl Fn(&NodeLoad) -> usize) -> bool {
        let eligible: Vec<usize> = self
            .nodes
            .iter()
            .filter(|n| n.is_eligible())
            .map(count)
            .collect();
        let n = eligible.len() as u128;
        let total: u128 = eligible.iter().map(|&c| c as u128).sum();
        eligible
            .iter()
            .all(|&c| (c as u128 * n).abs_diff(total) <= n)
    }
}

/// Per-node replica, leader and byte counts, and their spread.
pub fn imbalance(state: &ClusterState) -> Imbalance {
    let info = Nodes::new(&state.nodes);
    let mut loads: BTreeMap<NodeId, NodeLoad> = info
        .map
        .values()
        .map(|n| {
            (
                n.id,
                NodeLoad {
                    id: n.id,
                    up: n.up,
                    draining: n.draining,
                    replicas: 0,
                    leaders: 0,
                    bytes: 0,
                },
            )
        })
        .collect();
    for s in &state.shards {
        for r in distinct_replicas(s) {
            if let Some(l) = loads.get_mut(&r) {
                l.replicas += 1;
                l.bytes = l.bytes.saturating_add(s.bytes);
            }
        }
        if let Some(l) = leader_of(s).and_then(|l| loads.get_mut(&l)) {
            l.leaders += 1;
        }
    }
    let nodes: Vec<NodeLoad> = loads.into_values().collect();
    let eligible: Vec<&NodeLoad> = nodes.iter().filter(|n| n.is_eligible()).collect();
    let (mean_replicas, max_replica_deviation) = spread(eligible.iter().map(|n| n.replicas as f64));
    let (mean_leaders, max_leader_deviation) = spread(eligible.iter().map(|n| n.leaders as f64));
    let (mean_bytes, max_bytes_deviation) = spread(eligible.iter().map(|n| n.bytes as f64));
    Imbalance {
        eligible: eligible.len(),
        nodes,
        mean_replicas,
        mean_leaders,
        mean_bytes,
        max_replica_deviation,
        max_leader_deviation,
        max_bytes_deviation,
    }
}

fn spread(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let n = values.clone().count();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = values.clone().sum::<f64>() / n as f64;
    let dev = values.map(|v| (v - mean).abs()).fold(0.0, f64::max);
    (mean, dev)
}

/// Plans one round of rebalancing. See the [module docs](self) for the rules.
pub fn plan(state: &ClusterState, cfg: &PlannerConfig) -> Plan {
    let mut work = state.clone();
    work.nodes.sort_by_key(|n| n.id);
    // Stable sort: the (invalid) case of repeated shard ids stays deterministic
    // for a given input order.
    work.shards.sort_by_key(|s| s.id());
    let mut p = Planner {
        nodes: Nodes::new(&state.nodes),
        cfg,
        work,
        touched: BTreeSet::new(),
        transferred: BTreeSet::new(),
        steps: Vec::new(),
        moves: 0,
    };
    p.splits();
    p.drain_leaders();
    p.drain_replicas();
    p.balance_replicas();
    p.balance_leaders();
    p.enable_leader_transfers();
    Plan { steps: p.steps }
}

/// Node flags, merged and indexed by id.
struct Nodes {
    map: BTreeMap<NodeId, NodeState>,
    /// Eligible nodes in id order.
    eligible: Vec<NodeId>,
}

impl Nodes {
    fn new(nodes: &[NodeState]) -> Self {
        let mut map: BTreeMap<NodeId, NodeState> = BTreeMap::new();
        for n in nodes {
            map.entry(n.id)
                .and_modify(|m| {
                    m.up &= n.up;
                    m.draining |= n.draining;
                })
                .or_insert(*n);
        }
        let eligible = map
            .values()
            .filter(|n| n.is_eligible())
            .map(|n| n.id)
            .collect();
        Nodes { map, eligible }
    }

    fn up(&self, n: NodeId) -> bool {
        self.map.get(&n).is_some_and(|s| s.up)
    }

    fn draining(&self, n: NodeId) -> bool {
        self.map.get(&n).is_some_and(|s| s.draining)
    }

    fn eligible(&self, n: NodeId) -> bool {
        self.map.get(&n).is_some_and(|s| s.is_eligible())
    }
}

/// The leader, if it is one of the replicas.
fn leader_of(s: &ShardState) -> Option<NodeId> {
    s.leader.filter(|l| s.descriptor.replicas.contains(l))
}

/// The replicas, sorted and deduplicated.
fn distinct_replicas(s: &ShardState) -> Vec<NodeId> {
    let mut v = s.descriptor.replicas.clone();
    v.sort();
    v.dedup();
    v
}

/// A strict majority of replicas up, and the leader (if known) up.
fn is_live(nodes: &Nodes, s: &ShardState) -> bool {
    let reps = distinct_replicas(s);
    let up = reps.iter().filter(|n| nodes.up(**n)).count();
    up * 2 > reps.len() && leader_of(s).is_none_or(|l| nodes.up(l))
}

/// Whether some node in `counts` (eligible nodes) is more than one off the
/// mean of `total` over them; under-full nodes only count when nothing is
/// pending (pending items will land on eligible nodes anyway).
fn out_of_balance(counts: &BTreeMap<NodeId, usize>, pending: usize) -> bool {
    let n = counts.len();
    if n == 0 {
        return false;
    }
    let total = counts.values().sum::<usize>() + pending;
    counts
        .values()
        .any(|&c| c * n > total + n || (pending == 0 && c * n + n < total))
}

struct Planner<'a> {
    nodes: Nodes,
    cfg: &'a PlannerConfig,
    /// The input with this plan's steps applied so far; shards in id order.
    work: ClusterState,
    /// Shards moved or split in this plan: no further step for them.
    touched: BTreeSet<ShardId>,
    /// Shards whose leadership was transferred in this plan.
    transferred: BTreeSet<ShardId>,
    steps: Vec<Step>,
    moves: usize,
}

impl Planner<'_> {
    fn push(&mut self, step: Step) {
        let at = self.index(step.shard());
        apply_step_at(&mut self.work, at, &step);
        self.steps.push(step);
    }

    /// Index of a shard in `work.shards` (kept sorted by id).
    fn index(&self, id: ShardId) -> Option<usize> {
        self.work.shards.binary_search_by_key(&id, |s| s.id()).ok()
    }

    fn shard(&self, id: ShardId) -> &ShardState {
        &self.work.shards[self.index(id).expect("planned shard exists")]
    }

    /// Live and not yet moved or split in this plan.
    fn available(&self, s: &ShardState) -> bool {
        !self.touched.contains(&s.id()) && is_live(&self.nodes, s)
    }

    fn replica_counts(&self) -> BTreeMap<NodeId, usize> {
        let mut c: BTreeMap<NodeId, usize> = self.nodes.eligible.iter().map(|n| (*n, 0)).collect();
        for s in &self.work.shards {
            for r in distinct_replicas(s) {
                if let Some(v) = c.get_mut(&r) {
                    *v += 1;
                }
            }
        }
        c
    }

    fn leader_counts(&self) -> BTreeMap<NodeId, usize> {
        let mut c: BTreeMap<NodeId, usize> = self.nodes.eligible.iter().map(|n| (*n, 0)).collect();
        for s in &self.work.shards {
            if let Some(v) = leader_of(s).and_then(|l| c.get_mut(&l)) {
                *v += 1;
            }
        }
        c
    }

    fn node_bytes(&self) -> BTreeMap<NodeId, u64> {
        let mut c: BTreeMap<NodeId, u64> = self.nodes.eligible.iter().map(|n| (*n, 0)).collect();
        for s in &self.work.shards {
            for r in distinct_replicas(s) {
                if let Some(v) = c.get_mut(&r) {
                    *v = v.saturating_add(s.bytes);
                }
            }
        }
        c
    }

    /// The eligible replica (other than `from`) with the fewest leaders.
    fn transfer_target(
        &self,
        s: &ShardState,
        from: NodeId,
        lc: &BTreeMap<NodeId, usize>,
    ) -> Option<NodeId> {
        distinct_replicas(s)
            .into_iter()
            .filter(|n| *n != from && self.nodes.eligible(*n))
            .min_by_key(|n| (lc[n], *n))
    }

    /// The eligible non-replica with the fewest replicas, then bytes, then id.
    fn move_target(
        &self,
        s: &ShardState,
        rc: &BTreeMap<NodeId, usize>,
        nb: &BTreeMap<NodeId, u64>,
    ) -> Option<NodeId> {
        self.nodes
            .eligible
            .iter()
            .filter(|n| !s.replicas().contains(n))
            .min_by_key(|n| (rc[*n], nb[*n], **n))
            .copied()
    }

    /// Whether the replica on `from` may be moved in this plan, as far as
    /// leadership goes.
    fn source_ok(&self, s: &ShardState, from: NodeId) -> bool {
        leader_of(s) != Some(from)
            || distinct_replicas(s).len() == 1
            || (!self.transferred.contains(&s.id())
                && s.replicas()
                    .iter()
                    .any(|n| *n != from && self.nodes.eligible(*n)))
    }

    /// Emits the move, preceded by a leader transfer when `from` leads.
    fn do_move(&mut self, shard: ShardId, from: NodeId, to: NodeId) {
        let s = self.shard(shard).clone();
        if leader_of(&s) == Some(from) && distinct_replicas(&s).len() > 1 {
            let t = self
                .transfer_target(&s, from, &self.leader_counts())
                .expect("source_ok checked a transfer target");
            self.push(Step::TransferLeader { shard, from, to: t });
            self.transferred.insert(shard);
        }
        self.push(Step::MoveReplica {
            shard,
            from,
            to,
            bytes: s.bytes,
        });
        self.touched.insert(shard);
        self.moves += 1;
    }

    fn splits(&mut self) {
        let Some(max) = self.cfg.split_bytes else {
            return;
        };
        let big: Vec<(ShardId, u64)> = self
            .work
            .shards
            .iter()
            .filter(|s| s.bytes > max && s.bytes >= 2 && is_live(&self.nodes, s))
            .map(|s| (s.id(), s.bytes))
            .collect();
        for (shard, bytes) in big {
            let before = self.work.shards.len();
            self.push(Step::Split { shard, bytes });
            self.touched.insert(shard);
            if self.work.shards.len() > before {
                // The simulated child is appended with the largest id, so the
                // shards stay sorted.
                let child = self.work.shards[before].id();
                self.touched.insert(child);
            }
        }
    }

    fn drain_leaders(&mut self) {
        let ids: Vec<ShardId> = self.work.shards.iter().map(|s| s.id()).collect();
        let mut lc = self.leader_counts();
        for id in ids {
            let s = self.shard(id);
            if !self.available(s) || self.transferred.contains(&id) {
                continue;
            }
            let Some(l) = leader_of(s) else { continue };
            if !self.nodes.draining(l) {
                continue;
            }
            if let Some(to) = self.transfer_target(s, l, &lc) {
                *lc.get_mut(&to).expect("eligible") += 1;
                self.push(Step::TransferLeader {
                    shard: id,
                    from: l,
                    to,
                });
                self.transferred.insert(id);
            }
        }
    }

    /// Draining replicas of live shards that some eligible node could take.
    fn pending_drain_replicas(&self) -> usize {
        let mut pending = 0;
        for s in &self.work.shards {
            if !is_live(&self.nodes, s)
                || !self
                    .nodes
                    .eligible
                    .iter()
                    .any(|n| !s.replicas().contains(n))
            {
                continue;
            }
            pending += distinct_replicas(s)
                .into_iter()
                .filter(|r| self.nodes.draining(*r))
                .count();
        }
        pending
    }

    fn drain_replicas(&mut self) {
        while self.moves < self.cfg.max_concurrent_moves {
            let rc = self.replica_counts();
            let nb = self.node_bytes();
            type Key = (u64, u64, ShardId, bool, NodeId);
            let mut best: Option<(Key, NodeId)> = None;
            for s in &self.work.shards {
                if !self.available(s) {
                    continue;
                }
                let Some(to) = self.move_target(s, &rc, &nb) else {
                    continue;
                };
                for from in distinct_replicas(s) {
                    if !self.nodes.draining(from) || !self.source_ok(s, from) {
                        continue;
                    }
                    let key = (s.bytes, s.load, s.id(), leader_of(s) == Some(from), from);
                    if best.as_ref().is_none_or(|(b, _)| key < *b) {
                        best = Some((key, to));
                    }
                }
            }
            let Some(((_, _, shard, _, from), to)) = best else {
                break;
            };
            self.do_move(shard, from, to);
        }
    }

    /// The best shard to move from `src` to `dst`: smallest, then coldest,
    /// then not led by `src`, then lowest id.
    fn shard_between(&self, src: NodeId, dst: NodeId) -> Option<ShardId> {
        self.work
            .shards
            .iter()
            .filter(|s| {
                s.replicas().contains(&src)
                    && !s.replicas().contains(&dst)
                    && self.available(s)
                    && self.source_ok(s, src)
            })
            .min_by_key(|s| (s.bytes, s.load, leader_of(s) == Some(src), s.id()))
            .map(|s| s.id())
    }

    fn balance_replicas(&mut self) {
        while self.moves < self.cfg.max_concurrent_moves {
            let rc = self.replica_counts();
            if !out_of_balance(&rc, self.pending_drain_replicas()) {
                break;
            }
            let nb = self.node_bytes();
            let mut srcs = self.nodes.eligible.clone();
            srcs.sort_by_key(|n| (Reverse(rc[n]), Reverse(nb[n]), *n));
            let mut dsts = self.nodes.eligible.clone();
            dsts.sort_by_key(|n| (rc[n], nb[n], *n));
            let mut chosen = None;
            'pairs: for src in &srcs {
                for dst in &dsts {
                    if rc[src] < rc[dst] + 2 {
                        break;
                    }
                    if let Some(shard) = self.shard_between(*src, *dst) {
                        chosen = Some((shard, *src, *dst));
                        break 'pairs;
                    }
                }
            }
            let Some((shard, src, dst)) = chosen else {
                break;
            };
            self.do_move(shard, src, dst);
        }
    }

    /// Leaders on draining nodes of live shards (they will land on eligible
    /// nodes once a move gives them an eligible replica).
    fn pending_drain_leaders(&self) -> usize {
        self.work
            .shards
            .iter()
            .filter(|s| {
                is_live(&self.nodes, s) && leader_of(s).is_some_and(|l| self.nodes.draining(l))
            })
            .count()
    }

    /// Transfer edges: leader -> another eligible replica, for every shard
    /// that may still get a transfer in this plan.
    fn transfer_edges(&self) -> Edges {
        let mut edges = Edges::new();
        for s in &self.work.shards {
            if !self.available(s) || self.transferred.contains(&s.id()) {
                continue;
            }
            let Some(l) = leader_of(s).filter(|l| self.nodes.eligible(*l)) else {
                continue;
            };
            for w in distinct_replicas(s) {
                if w != l && self.nodes.eligible(w) {
                    edges.entry(l).or_default().push((s.id(), w));
                }
            }
        }
        edges
    }

    fn balance_leaders(&mut self) {
        let mut lc = self.leader_counts();
        let pending = self.pending_drain_leaders();
        let mut edges = self.transfer_edges();
        while out_of_balance(&lc, pending) {
            let mut order = self.nodes.eligible.clone();
            order.sort_by_key(|n| (Reverse(lc[n]), *n));
            let Some(path) = order.iter().find_map(|u| leader_path(*u, &lc, &edges)) else {
                break;
            };
            let used: BTreeSet<ShardId> = path.iter().map(|(s, ..)| *s).collect();
            for out in edges.values_mut() {
                out.retain(|(s, _)| !used.contains(s));
            }
            for (shard, from, to) in path {
                *lc.get_mut(&from).expect("eligible") -= 1;
                *lc.get_mut(&to).expect("eligible") += 1;
                self.push(Step::TransferLeader { shard, from, to });
                self.transferred.insert(shard);
            }
        }
    }

    /// When transfers alone cannot even out leaders (no chain of transfers
    /// leads from an overloaded node to an underloaded one), move a replica of
    /// a shard led by a node that the overloaded node can reach onto the
    /// underloaded node, so that the next round can transfer (a single-replica
    /// shard takes its leadership along at once). Replica counts must stay
    /// balanced: when the move alone would break them, it is paired with a
    /// compensating move of a shard the underloaded node does not lead, off
    /// that node. Only once nothing is left to drain and replica counts are
    /// balanced.
    fn enable_leader_transfers(&mut self) {
        if self.pending_drain_replicas() > 0 || self.pending_drain_leaders() > 0 {
            return;
        }
        let n = self.nodes.eligible.len();
        // Leaders that this plan's moves let the next round shift, by node.
        let mut credit: BTreeMap<NodeId, isize> = BTreeMap::new();
        while self.moves < self.cfg.max_concurrent_moves {
            let rc = self.replica_counts();
            if out_of_balance(&rc, 0) {
                break;
            }
            let total: usize = rc.values().sum();
            let fits = |c: usize| (c * n).abs_diff(total) <= n;
            let lc: BTreeMap<NodeId, usize> = self
                .leader_counts()
                .into_iter()
                .map(|(k, c)| {
                    let d = credit.get(&k).copied().unwrap_or(0);
                    (k, c.saturating_add_signed(d))
                })
                .collect();
            if !out_of_balance(&lc, 0) {
                break;
            }
            let edges = self.transfer_edges();
            let mut us = self.nodes.eligible.clone();
            us.sort_by_key(|x| (Reverse(lc[x]), *x));
            let mut vs = self.nodes.eligible.clone();
            vs.sort_by_key(|x| (lc[x], *x));
            let budget = self.cfg.max_concurrent_moves - self.moves;
            let mut chosen = None;
            'pairs: for u in &us {
                let reach = reachable(*u, &edges);
                for v in &vs {
                    if lc[v] + 2 > lc[u] {
                        break;
                    }
                    if reach.contains_key(v) {
                        continue;
                    }
                    let cands = self.leader_enabling_moves(*u, *v, &reach, &rc);
                    if let Some(&(_, shard, x, single)) = cands
                        .iter()
                        .find(|(_, _, x, _)| fits(rc[x] - 1) && fits(rc[v] + 1))
                    {
                        chosen = Some((shard, x, *u, *v, single, None));
                        break 'pairs;
                    }
                    if budget < 2 {
                        continue;
                    }
                    // The compensation depends on the source only (and on
                    // not being the moved shard): the best two per source.
                    let mut comps: BTreeMap<NodeId, Vec<(ShardId, NodeId)>> = BTreeMap::new();
                    for &(_, shard, x, single) in &cands {
                        let best = comps
                            .entry(x)
                            .or_insert_with(|| self.compensations(x, *v, &rc, &fits));
                        if let Some(&comp) = best.iter().find(|(t, _)| *t != shard) {
                            chosen = Some((shard, x, *u, *v, single, Some(comp)));
                            break 'pairs;
                        }
                    }
                }
            }
            let Some((shard, x, u, v, single, comp)) = chosen else {
                break;
            };
            self.do_move(shard, x, v);
            if let Some((t, y)) = comp {
                self.do_move(t, v, y);
            }
            if !single {
                *credit.entry(u).or_default() -= 1;
                *credit.entry(v).or_default() += 1;
            }
        }
    }

    /// Moves `(key, shard, from)` onto `v` of shards led by a node in `reach`
    /// (for a single-replica shard: led by `u` itself), best first: smallest,
    /// coldest, from the fullest node, lowest ids. The source is never the
    /// leader of a multi-replica shard. The bool says single-replica.
    fn leader_enabling_moves(
        &self,
        u: NodeId,
        v: NodeId,
        reach: &Reach,
        rc: &BTreeMap<NodeId, usize>,
    ) -> Vec<EnablingMove> {
        let mut cands = Vec::new();
        for s in &self.work.shards {
            if !self.available(s) || self.transferred.contains(&s.id()) || s.replicas().contains(&v)
            {
                continue;
            }
            let Some(w) = leader_of(s).filter(|w| reach.contains_key(w)) else {
                continue;
            };
            let single = distinct_replicas(s).len() == 1;
            if single && w != u {
                continue;
            }
            for x in distinct_replicas(s) {
                if self.nodes.eligible(x) && (x != w || single) {
                    cands.push((
                        (s.bytes, s.load, Reverse(rc[&x]), s.id(), x),
                        s.id(),
                        x,
                        single,
                    ));
                }
            }
        }
        cands.sort();
        cands
    }

    /// Up to two moves `(shard, to)` of different shards off `v`, best first,
    /// that keep replica counts balanced after a shard moved from `x` to `v`:
    /// of a shard `v` holds but does not lead, preferably back to `x`;
    /// smallest, coldest, lowest ids first.
    fn compensations(
        &self,
        x: NodeId,
        v: NodeId,
        rc: &BTreeMap<NodeId, usize>,
        fits: &impl Fn(usize) -> bool,
    ) -> Vec<(ShardId, NodeId)> {
        type Key = (u64, u64, bool, ShardId, NodeId);
        // Best target per shard, then the two best shards.
        let mut per_shard: Vec<Key> = Vec::new();
        for t in &self.work.shards {
            if !self.available(t) || !t.replicas().contains(&v) || leader_of(t) == Some(v) {
                continue;
            }
            let best = self
                .nodes
                .eligible
                .iter()
                .filter(|&&y| {
                    y != v
                        && !t.replicas().contains(&y)
                        && (y == x || (fits(rc[&x] - 1) && fits(rc[&y] + 1)))
                })
                .map(|&y| (t.bytes, t.load, y != x, t.id(), y))
                .min();
            per_shard.extend(best);
        }
        per_shard.sort();
        per_shard
            .into_iter()
            .take(2)
            .map(|(_, _, _, t, y)| (t, y))
            .collect()
    }
}

/// A candidate leader-enabling move: sort key (bytes, load, fullest source,
/// shard, source), shard, source, single-replica.
type EnablingMove = (
    (u64, u64, Reverse<usize>, ShardId, NodeId),
    ShardId,
    NodeId,
    bool,
);

/// Nodes reachable by transfers: distance, and the `(shard, previous node)`
/// edge that reached them (`None` for the start).
type Reach = BTreeMap<NodeId, (usize, Option<(ShardId, NodeId)>)>;

/// Transfer edges by source: `(shard, new leader)`.
type Edges = BTreeMap<NodeId, Vec<(ShardId, NodeId)>>;

/// Distance from `u` (and the edge used to get there) of every node reachable
/// from `u` by transfers, breadth-first in id order.
fn reachable(u: NodeId, edges: &Edges) -> Reach {
    let mut seen: Reach = BTreeMap::from([(u, (0, None))]);
    let mut queue = VecDeque::from([u]);
    while let Some(x) = queue.pop_front() {
        let d = seen[&x].0;
        for &(shard, w) in edges.get(&x).map(Vec::as_slice).unwrap_or(&[]) {
            if let std::collections::btree_map::Entry::Vacant(e) = seen.entry(w) {
                e.insert((d + 1, Some((shard, x))));
                queue.push_back(w);
            }
        }
    }
    seen
}

/// A chain of transfers from `u` to the reachable node with the fewest leaders,
/// provided it has at least two fewer than `u` (so the chain narrows the
/// spread). Breadth-first, so among equally empty nodes the shortest chain
/// (then the lowest id) wins.
fn leader_path(
    u: NodeId,
    lc: &BTreeMap<NodeId, usize>,
    edges: &Edges,
) -> Option<Vec<(ShardId, NodeId, NodeId)>> {
    let seen = reachable(u, edges);
    let v = seen
        .iter()
        .filter(|(v, _)| lc[*v] + 2 <= lc[&u])
        .min_by_key(|(v, (d, _))| (lc[*v], *d, **v))
        .map(|(v, _)| *v)?;
    let mut path = Vec::new();
    let mut at = v;
    while let Some((shard, prev)) = seen[&at].1 {
        path.push((shard, prev, at));
        at = prev;
    }
    path.reverse();
    Some(path)
}
