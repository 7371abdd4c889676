//! The planner and its phases: one round is built by running them in order
//! on a working copy of the state (see [`plan`](super::plan)).

use super::leader_path::{leader_path, reachable, Edges, Reach};
use super::state::{distinct_replicas, is_live, leader_of, ClusterState, Nodes, ShardState};
use super::step::{apply_step_at, Step};
use super::PlannerConfig;
use crate::ids::{NodeId, ShardId};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

/// Whether some node in `counts` (eligible nodes) is more than one off the
/// mean of `total` over them; under-full nodes only count when nothing is
/// pending (pending items will land on eligible nodes anyway).
pub(super) fn out_of_balance(counts: &BTreeMap<NodeId, usize>, pending: usize) -> bool {
    let n = counts.len();
    if n == 0 {
        return false;
    }
    let total = counts.values().sum::<usize>() + pending;
    counts
        .values()
        .any(|&c| c * n > total + n || (pending == 0 && c * n + n < total))
}

/// How far above the mean a node's led load may be before leaderships are
/// transferred off it: 20%.
pub const LEADER_LOAD_TOLERANCE: f64 = 0.2;

/// Most leader transfers for load in one round.
pub const LEADER_LOAD_TRANSFERS_MAX: usize = 16;

/// The least load a transfer or move for load (or bytes) must shift, as a
/// share of the mean per node: 5%. Smaller shifts (swapping two shards of
/// about the same load) gain next to nothing, and measured loads are noisy:
/// without a floor, every round would swap leaders back and forth on noise.
pub const LOAD_SHIFT_MIN_SHARE: f64 = 0.05;

/// [`LOAD_SHIFT_MIN_SHARE`] of `mean`, at least 1.
pub(super) fn min_shift(mean: f64) -> u64 {
    ((mean * LOAD_SHIFT_MIN_SHARE).ceil() as u64).max(1)
}

/// Leader transfers: (shard, from, to).
type Transfers = Vec<(ShardId, NodeId, NodeId)>;

/// The eligible nodes whose led load is outside the tolerated band.
pub(super) struct Band {
    pub(super) hot: BTreeSet<NodeId>,
    pub(super) cold: BTreeSet<NodeId>,
}

/// The nodes whose value passes `test`.
pub(super) fn outside(led: &BTreeMap<NodeId, u64>, test: impl Fn(f64) -> bool) -> BTreeSet<NodeId> {
    led.iter()
        .filter(|(_, v)| test(**v as f64))
        .map(|(n, _)| *n)
        .collect()
}

pub(super) struct Planner<'a> {
    pub(super) nodes: Nodes,
    pub(super) cfg: &'a PlannerConfig,
    /// The input with this plan's steps applied so far; shards in id order.
    pub(super) work: ClusterState,
    /// Shards moved or split in this plan: no further step for them.
    pub(super) touched: BTreeSet<ShardId>,
    /// Shards whose leadership was transferred in this plan.
    pub(super) transferred: BTreeSet<ShardId>,
    pub(super) steps: Vec<Step>,
    pub(super) moves: usize,
}

impl Planner<'_> {
    pub(super) fn push(&mut self, step: Step) {
        let at = self.index(step.shard());
        apply_step_at(&mut self.work, at, &step);
        self.steps.push(step);
    }

    /// Index of a shard in `work.shards` (kept sorted by id).
    fn index(&self, id: ShardId) -> Option<usize> {
        self.work.shards.binary_search_by_key(&id, |s| s.id()).ok()
    }

    pub(super) fn shard(&self, id: ShardId) -> &ShardState {
        &self.work.shards[self.index(id).expect("planned shard exists")]
    }

    /// Live and not yet moved or split in this plan.
    pub(super) fn available(&self, s: &ShardState) -> bool {
        !self.touched.contains(&s.id()) && is_live(&self.nodes, s)
    }

    pub(super) fn replica_counts(&self) -> BTreeMap<NodeId, usize> {
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

    pub(super) fn splits(&mut self) {
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

    pub(super) fn drain_leaders(&mut self) {
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
    pub(super) fn pending_drain_replicas(&self) -> usize {
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

    pub(super) fn drain_replicas(&mut self) {
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

    pub(super) fn balance_replicas(&mut self) {
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

    pub(super) fn balance_leaders(&mut self) {
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

    /// Leader load: once the round has nothing else to do (nothing to
    /// split or drain, replica and leader counts balanced), transfer
    /// leaderships from nodes that lead more load to replicas on nodes that
    /// lead less, until every eligible node's led load is within
    /// [`LEADER_LOAD_TOLERANCE`] of the mean (above *and* below: a node
    /// leading too little is as much out of balance as one leading too
    /// much) or no transfer helps. Every transfer either leaves a node over
    /// the band or lands on a node under it. A
    /// transfer of load `x` from a node leading `a` to one leading `b` is
    /// taken only when `0 < x < a - b` (so it strictly lowers the sum of
    /// squared deviations from the mean: with fixed loads, rounds cannot
    /// cycle) and leader counts stay balanced; the largest such decrease
    /// goes first, at most [`LEADER_LOAD_TRANSFERS_MAX`] per round.
    pub(super) fn balance_leader_load(&mut self) {
        if !self.steps.is_empty() {
            return;
        }
        let mut lc = self.leader_counts();
        if out_of_balance(&lc, 0) {
            return;
        }
        let mut led: BTreeMap<NodeId, u64> = self.nodes.eligible.iter().map(|n| (*n, 0)).collect();
        for s in &self.work.shards {
            if let Some(v) = leader_of(s).and_then(|l| led.get_mut(&l)) {
                *v = v.saturating_add(s.load);
            }
        }
        let total: u64 = led.values().sum();
        if total == 0 || led.len() < 2 {
            return;
        }
        let mean = total as f64 / led.len() as f64;
        let (high, low) = (
            mean * (1.0 + LEADER_LOAD_TOLERANCE),
            mean * (1.0 - LEADER_LOAD_TOLERANCE),
        );
        let mut done = 0;
        while done < LEADER_LOAD_TRANSFERS_MAX {
            let band = Band {
                hot: outside(&led, |v| v > high),
                cold: outside(&led, |v| v < low),
            };
            if band.hot.is_empty() && band.cold.is_empty() {
                break;
            }
            let Some(best) = self.best_load_transfer(&band, &led, &lc, min_shift(mean)) else {
                break;
            };
            for (shard, from, to) in best {
                let x = self.shard(shard).load;
                *led.get_mut(&from).expect("eligible") -= x;
                *led.get_mut(&to).expect("eligible") += x;
                *lc.get_mut(&from).expect("eligible") -= 1;
                *lc.get_mut(&to).expect("eligible") += 1;
                self.push(Step::TransferLeader { shard, from, to });
                self.transferred.insert(shard);
                done += 1;
            }
        }
    }

    /// The transfer off a node over the band, or onto a node under it, that
    /// lowers the led-load spread most while leader counts stay balanced:
    /// one shard's leadership to another replica's node, or, when that
    /// alone would unbalance the counts, together with the coldest shard
    /// led there that has a replica on the first node, the other way. Ties:
    /// lowest shard ids.
    fn best_load_transfer(
        &self,
        band: &Band,
        led: &BTreeMap<NodeId, u64>,
        lc: &BTreeMap<NodeId, usize>,
        min_d: u64,
    ) -> Option<Transfers> {
        let movable = |s: &ShardState| self.available(s) && !self.transferred.contains(&s.id());
        // Whether one transfer alone keeps leader counts balanced (a swap
        // leaves them as they are, and they are balanced here).
        let alone_keeps_counts = |from: NodeId, to: NodeId| {
            let mut after = lc.clone();
            *after.get_mut(&from).expect("eligible") -= 1;
            *after.get_mut(&to).expect("eligible") += 1;
            !out_of_balance(&after, 0)
        };
        // (decrease, then the lowest shard ids first) and the transfers.
        type Ranked = (u128, Reverse<(ShardId, ShardId)>, Transfers);
        let mut best: Option<Ranked> = None;
        for s in &self.work.shards {
            if s.load == 0 || !movable(s) {
                continue;
            }
            let Some(from) = leader_of(s).filter(|l| self.nodes.eligible(*l)) else {
                continue;
            };
            for to in distinct_replicas(s) {
                if to == from || !self.nodes.eligible(to) {
                    continue;
                }
                if !band.hot.contains(&from) && !band.cold.contains(&to) {
                    continue;
                }
                let (a, b) = (led[&from], led[&to]);
                if a <= b {
                    continue;
                }
                let back = if alone_keeps_counts(from, to) {
                    None
                } else {
                    // The coldest shard led by `to` that can come back.
                    let coldest = self
                        .work
                        .shards
                        .iter()
                        .filter(|t| {
                            t.id() != s.id()
                                && t.load < s.load
                                && movable(t)
                                && leader_of(t) == Some(to)
                                && distinct_replicas(t).contains(&from)
                        })
                        .min_by_key(|t| (t.load, t.id()));
                    let Some(t) = coldest else { continue };
                    Some((t.id(), t.load))
                };
                let d = s.load - back.map_or(0, |(_, y)| y);
                if d < min_d || d >= a - b {
                    continue;
                }
                let gain = u128::from(d) * u128::from(a - b - d);
                let key = Reverse((s.id(), back.map_or(ShardId(0), |(t, _)| t)));
                if best.as_ref().is_none_or(|(g, k, _)| (gain, key) > (*g, *k)) {
                    let mut steps = vec![(s.id(), from, to)];
                    if let Some((t, _)) = back {
                        steps.push((t, to, from));
                    }
                    best = Some((gain, key, steps));
                }
            }
        }
        best.map(|(_, _, steps)| steps)
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
    pub(super) fn enable_leader_transfers(&mut self) {
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
