//! Chains of leader transfers: which nodes a node's leaderships can reach,
//! and the chain to the emptiest one.

use crate::ids::{NodeId, ShardId};
use std::collections::{BTreeMap, VecDeque};

/// Nodes reachable by transfers: distance, and the `(shard, previous node)`
/// edge that reached them (`None` for the start).
pub(super) type Reach = BTreeMap<NodeId, (usize, Option<(ShardId, NodeId)>)>;

/// Transfer edges by source: `(shard, new leader)`.
pub(super) type Edges = BTreeMap<NodeId, Vec<(ShardId, NodeId)>>;

/// Distance from `u` (and the edge used to get there) of every node reachable
/// from `u` by transfers, breadth-first in id order.
pub(super) fn reachable(u: NodeId, edges: &Edges) -> Reach {
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
pub(super) fn leader_path(
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
