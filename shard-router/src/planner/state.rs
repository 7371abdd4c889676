//! The cluster state model: the planner's input, its structural check, and
//! how the planner reads it (merged node flags, leaders, liveness).

use crate::descriptor::ShardDescriptor;
use crate::ids::{NodeId, ShardId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
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

/// Node flags, merged and indexed by id.
pub(super) struct Nodes {
    pub(super) map: BTreeMap<NodeId, NodeState>,
    /// Eligible nodes in id order.
    pub(super) eligible: Vec<NodeId>,
}

impl Nodes {
    pub(super) fn new(nodes: &[NodeState]) -> Self {
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

    pub(super) fn draining(&self, n: NodeId) -> bool {
        self.map.get(&n).is_some_and(|s| s.draining)
    }

    pub(super) fn eligible(&self, n: NodeId) -> bool {
        self.map.get(&n).is_some_and(|s| s.is_eligible())
    }
}

/// The leader, if it is one of the replicas.
pub(super) fn leader_of(s: &ShardState) -> Option<NodeId> {
    s.leader.filter(|l| s.descriptor.replicas.contains(l))
}

/// The replicas, sorted and deduplicated.
pub(super) fn distinct_replicas(s: &ShardState) -> Vec<NodeId> {
    let mut v = s.descriptor.replicas.clone();
    v.sort();
    v.dedup();
    v
}

/// A strict majority of replicas up, and the leader (if known) up.
pub(super) fn is_live(nodes: &Nodes, s: &ShardState) -> bool {
    let reps = distinct_replicas(s);
    let up = reps.iter().filter(|n| nodes.up(**n)).count();
    up * 2 > reps.len() && leader_of(s).is_none_or(|l| nodes.up(l))
}
