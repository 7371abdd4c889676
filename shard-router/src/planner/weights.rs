//! Phase 8: replicas balanced by load, then by bytes, once a round has
//! nothing else to do and replica counts are balanced.
//!
//! A node's *weight* is the sum over the replicas it holds of the shard's
//! [`ShardState::load`] (every replica applies every write), or, once loads
//! are balanced or absent, of [`ShardState::bytes`]. While some eligible
//! node weighs more than [`REPLICA_WEIGHT_TOLERANCE`] above the mean (or
//! below it), the planner moves a replica off it (or onto it) from a
//! heavier node to a lighter node that does not hold the shard, paired with a move of a lighter shard back when the move alone
//! would unbalance replica counts. Each move strictly lowers the sum of
//! squared weight deviations (weights held fixed), keeps replica and leader
//! counts as they are (a replica that is its shard's leader is never
//! moved), and counts against [`PlannerConfig::max_concurrent_moves`].
//!
//! [`PlannerConfig::max_concurrent_moves`]: super::PlannerConfig

use super::phases::{outside, Band, Planner};
use super::state::{distinct_replicas, leader_of, ShardState};
use super::step::Step;
use crate::ids::{NodeId, ShardId};
use std::cmp::Reverse;
use std::collections::BTreeMap;

/// How far above (or below) the mean a node's replica weight may be before
/// replicas are moved off (or onto) it: 20%.
pub const REPLICA_WEIGHT_TOLERANCE: f64 = 0.2;

/// One or two moves: (shard, from, to).
type Moves = Vec<(ShardId, NodeId, NodeId)>;

impl Planner<'_> {
    /// Phase 8 (see the module docs): by load, else by bytes.
    pub(super) fn balance_replica_weights(&mut self) {
        if !self.steps.is_empty() || self.pending_drain_replicas() > 0 {
            return;
        }
        if super::phases::out_of_balance(&self.replica_counts(), 0) {
            return;
        }
        if !self.balance_weight(|s| s.load, None) {
            // Bytes only where the load spread does not grow: the pair
            // (load spread, byte spread) only ever goes down, so rounds
            // cannot undo each other.
            self.balance_weight(|s| s.bytes, Some(|s| s.load));
        }
    }

    /// Each eligible node's summed `weight` over the replicas it holds.
    fn node_weights(&self, weight: fn(&ShardState) -> u64) -> BTreeMap<NodeId, u64> {
        let mut w: BTreeMap<NodeId, u64> = self.nodes.eligible.iter().map(|n| (*n, 0)).collect();
        for s in &self.work.shards {
            for r in distinct_replicas(s) {
                if let Some(v) = w.get_mut(&r) {
                    *v = v.saturating_add(weight(s));
                }
            }
        }
        w
    }

    /// Moves replicas while a node's `weight` is over the tolerance and a
    /// move lowers its spread without raising the spread of `guard`;
    /// whether any step was planned.
    fn balance_weight(
        &mut self,
        weight: fn(&ShardState) -> u64,
        guard: Option<fn(&ShardState) -> u64>,
    ) -> bool {
        let mut w = self.node_weights(weight);
        let total: u64 = w.values().fold(0, |a, b| a.saturating_add(*b));
        if total == 0 || w.len() < 2 {
            return false;
        }
        let mean = total as f64 / w.len() as f64;
        let (high, low) = (
            mean * (1.0 + REPLICA_WEIGHT_TOLERANCE),
            mean * (1.0 - REPLICA_WEIGHT_TOLERANCE),
        );
        let min_d = super::phases::min_shift(mean);
        let mut planned = false;
        while self.moves < self.cfg.max_concurrent_moves {
            let band = Band {
                hot: outside(&w, |v| v > high),
                cold: outside(&w, |v| v < low),
            };
            if band.hot.is_empty() && band.cold.is_empty() {
                break;
            }
            let room = self.cfg.max_concurrent_moves - self.moves;
            let Some(best) = self.best_weight_moves(&band, &w, weight, guard, room, min_d) else {
                break;
            };
            for (shard, from, to) in best {
                let x = weight(self.shard(shard));
                *w.get_mut(&from).expect("eligible") -= x;
                *w.get_mut(&to).expect("eligible") += x;
                let bytes = self.shard(shard).bytes;
                self.push(Step::MoveReplica {
                    shard,
                    from,
                    to,
                    bytes,
                });
                self.touched.insert(shard);
                self.moves += 1;
                planned = true;
            }
        }
        planned
    }

    /// The move (or pair of moves) off a node over the band, or onto one
    /// under it, that lowers the spread of `w` most while keeping replica
    /// counts balanced, within `room` moves. Ties: lowest shard ids.
    fn best_weight_moves(
        &self,
        band: &Band,
        w: &BTreeMap<NodeId, u64>,
        weight: fn(&ShardState) -> u64,
        guard: Option<fn(&ShardState) -> u64>,
        room: usize,
        min_d: u64,
    ) -> Option<Moves> {
        let rc = self.replica_counts();
        let gw = guard.map(|g| (g, self.node_weights(g)));
        // Whether moving net `d` of the guard weight from `from` to `to`
        // keeps its sum of squared deviations from growing.
        let guard_ok = |from: NodeId, to: NodeId, s: &ShardState, back: Option<ShardId>| {
            let Some((g, gw)) = &gw else { return true };
            let d = i128::from(g(s)) - back.map_or(0, |t| i128::from(g(self.shard(t))));
            2 * d * (i128::from(gw[&to]) - i128::from(gw[&from]) + d) <= 0
        };
        // A replica that may move: its shard live, untouched this round,
        // and not led from there.
        let movable =
            |s: &ShardState, from: NodeId| self.available(s) && leader_of(s) != Some(from);
        let alone_keeps_counts = |from: NodeId, to: NodeId| {
            let mut after = rc.clone();
            *after.get_mut(&from).expect("eligible") -= 1;
            *after.get_mut(&to).expect("eligible") += 1;
            !super::phases::out_of_balance(&after, 0)
        };
        type Ranked = (u128, Reverse<(ShardId, ShardId)>, Moves);
        let mut best: Option<Ranked> = None;
        for s in &self.work.shards {
            let x = weight(s);
            if x == 0 {
                continue;
            }
            let reps = distinct_replicas(s);
            for &from in reps.iter().filter(|n| self.nodes.eligible(**n)) {
                if !movable(s, from) {
                    continue;
                }
                for &to in &self.nodes.eligible {
                    if reps.contains(&to) || !band.hot.contains(&from) && !band.cold.contains(&to) {
                        continue;
                    }
                    let (a, b) = (w[&from], w[&to]);
                    if a <= b {
                        continue;
                    }
                    let back = if alone_keeps_counts(from, to) {
                        None
                    } else {
                        if room < 2 {
                            continue;
                        }
                        // The lightest shard on `to` that can come back.
                        let lightest = self
                            .work
                            .shards
                            .iter()
                            .filter(|t| {
                                t.id() != s.id()
                                    && weight(t) < x
                                    && movable(t, to)
                                    && distinct_replicas(t).contains(&to)
                                    && !distinct_replicas(t).contains(&from)
                            })
                            .min_by_key(|t| (weight(t), t.id()));
                        let Some(t) = lightest else { continue };
                        Some((t.id(), weight(t)))
                    };
                    let d = x - back.map_or(0, |(_, y)| y);
                    if d < min_d || d >= a - b || !guard_ok(from, to, s, back.map(|(t, _)| t)) {
                        continue;
                    }
                    let gain = u128::from(d) * u128::from(a - b - d);
                    let key = Reverse((s.id(), back.map_or(ShardId(0), |(t, _)| t)));
                    if best.as_ref().is_none_or(|(g, k, _)| (gain, key) > (*g, *k)) {
                        let mut moves = vec![(s.id(), from, to)];
                        if let Some((t, _)) = back {
                            moves.push((t, to, from));
                        }
                        best = Some((gain, key, moves));
                    }
                }
            }
        }
        best.map(|(_, _, moves)| moves)
    }
}
