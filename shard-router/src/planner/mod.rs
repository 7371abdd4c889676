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
//! `|c - mean| <= 1` (the mean may be fractional). Load and bytes come after:
//! among equally good moves the planner copies the smaller (then colder)
//! shard and fills the node holding fewer bytes; once counts are balanced
//! and a round has nothing else to do, leaderships (step 7) and then
//! replicas (step 8) are moved to even out load, then bytes, within ±20%.
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
//! 7. Leader load, once a round has nothing else to do: transfer
//!    leaderships from nodes leading more [`ShardState::load`] to replicas on
//!    nodes leading less, keeping leader counts balanced, until every node's
//!    led load is within [`LEADER_LOAD_TOLERANCE`] of the mean (a node
//!    leading too little counts as much as one leading too much) or no transfer
//!    strictly lowers the sum of squared deviations (at most
//!    [`LEADER_LOAD_TRANSFERS_MAX`] per round). A transfer (or swap) must
//!    shift at least [`LOAD_SHIFT_MIN_SHARE`] of the mean, so noise in the
//!    measured loads does not swap leaders back and forth (the same floor
//!    holds for step 8).
//!
//! 8. Replica load, then bytes, once a round has nothing else to do and
//!    replica counts are balanced: move replicas (never a shard's leader)
//!    from nodes whose replicas' summed [`ShardState::load`] is more than
//!    [`REPLICA_WEIGHT_TOLERANCE`] above the mean to lighter nodes (or from
//!    heavier nodes to one that far below it), paired
//!    with a lighter shard moved back when counts need it; each move
//!    strictly lowers the sum of squared deviations. With loads balanced
//!    (or all 0), the same for [`ShardState::bytes`].
//!
//! Every non-empty round makes progress on, in this order: replicas left to
//! drain, replica-count spread, leaders left to drain, leader-count spread
//! (a round of step 6 moves is followed by a round of transfers that uses
//! them), the sum of squared led-load deviations, then of replica-load and
//! of replica-byte deviations (loads and sizes held fixed; steps 7 and 8
//! leave each other's sums alone: transfers move no replica, and step 8
//! moves no leader), so repeated plan-and-execute reaches an empty plan.
//!
//! While draining replicas (or leaders) are still pending, the mean counts them
//! as already landed on the eligible nodes, and only overfull nodes trigger
//! balancing (the drain fills the emptier ones).
//!
//! `cfg.replication` is the intended voter count. The planner never changes a
//! shard's voter count (a move is one-for-one); [`misreplicated`] lists the
//! shards whose count differs, for the operator.
//!
//! Besides steps 7 and 8, [`ShardState::load`] only breaks ties (colder
//! shards move first).

mod imbalance;
mod leader_path;
mod phases;
mod state;
mod step;
mod weights;

pub use imbalance::{imbalance, misreplicated, Imbalance, NodeLoad};
pub use phases::{LEADER_LOAD_TOLERANCE, LEADER_LOAD_TRANSFERS_MAX, LOAD_SHIFT_MIN_SHARE};
pub use state::{ClusterState, NodeState, ShardState, StateError};
pub use step::{apply_step, check_step, Plan, Step, StepError};
pub use weights::REPLICA_WEIGHT_TOLERANCE;

use phases::Planner;
use serde::{Deserialize, Serialize};
use state::Nodes;
use std::collections::BTreeSet;

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
    p.balance_leader_load();
    p.balance_replica_weights();
    Plan { steps: p.steps }
}
