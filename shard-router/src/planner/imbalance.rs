//! How far the cluster is from the planner's goal: per-node counts and their
//! spread, and the shards off the intended replication (both for the operator).

use super::state::{distinct_replicas, leader_of, ClusterState, Nodes};
use super::PlannerConfig;
use crate::ids::{NodeId, ShardId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
