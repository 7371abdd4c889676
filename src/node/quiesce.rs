//! Quiescence: idle groups cost nothing.
//!
//! A group whose leader has appended nothing for `raft.quiesce_after_ms`,
//! with every follower holding and having applied the leader's whole log,
//! hibernates: the leader asks each follower to sleep
//! ([`PeerRequest::Hibernate`]), and once all have, it sleeps too. A
//! sleeping replica's openraft ticker is parked (`runtime_config().tick`):
//! no heartbeats, no election timer, no wake-ups.
//!
//! - **Wake on demand.** A client request or admin command at the leader, a
//!   snapshot, or a Raft message that is more than the sleeping leader's
//!   own idle heartbeat (entries, a new commit index, another vote, a vote
//!   request) wakes the replica that receives it. A woken leader's next
//!   append wakes its followers.
//! - **Liveness per node pair.** Each node pings every peer once per
//!   heartbeat interval over the shared connection; that one exchange
//!   stands in for the heartbeats of every sleeping group between them.
//!   When a peer stays silent for an election timeout, the groups it led
//!   here wake and elect: the surviving voter with the lowest id campaigns
//!   at once, the others wake when it asks for their votes (or, failing
//!   that, after the longest election timeout). Groups led elsewhere stay
//!   asleep. A peer that comes back (or restarted: its boot id changed)
//!   wakes the groups this node leads with it, so it hears their leader.
//!
//! The decisions are pure functions ([`may_hibernate`], [`benign`]); the
//! task in [`run`] gathers metrics and sends the messages.

use super::*;
use crate::raft::LogId;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// How many wake causes there are.
pub(crate) const KINDS: usize = 9;

/// Why a sleeping replica woke (the metric's `cause` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// A client read or write reached the sleeping leader.
    Client = 0,
    /// An admin command (split, move, transfer, proposal) reached it.
    Admin,
    /// A Raft message other than the sleeping leader's idle heartbeat, or a
    /// snapshot.
    Raft,
    /// The leader's node stopped answering pings.
    PeerDown,
    /// A peer came back or restarted: the groups led here with it wake.
    PeerUp,
    /// The replica's log grew by a path that did not wake it first.
    Append,
    /// A follower declined to sleep.
    Declined,
    /// The replica initialises its new group (it campaigns at once).
    Created,
    /// A dormant leader was rebuilt: openraft's restored leader probes its
    /// followers with entries and without the commit index, which wakes
    /// them, so the leader wakes too (followers awake under a silent
    /// leader would elect).
    Revived,
}

impl Wake {
    /// Every cause, in label order.
    pub(crate) const ALL: [Wake; KINDS] = [
        Wake::Client,
        Wake::Admin,
        Wake::Raft,
        Wake::PeerDown,
        Wake::PeerUp,
        Wake::Append,
        Wake::Declined,
        Wake::Created,
        Wake::Revived,
    ];

    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Wake::Client => "client",
            Wake::Admin => "admin",
            Wake::Raft => "raft",
            Wake::PeerDown => "peer_down",
            Wake::PeerUp => "peer_up",
            Wake::Append => "append",
            Wake::Declined => "declined",
            Wake::Created => "created",
            Wake::Revived => "revived",
        }
    }
}

/// What a sleeping replica went to sleep under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sleep {
    /// The leader's vote (it names the leader: this node, for a sleeping
    /// leader).
    pub vote: Vote,
    /// The last log id, committed and applied everywhere.
    pub last: Option<LogId>,
    /// The group's voters (what a dormant replica's wake-up paths need of
    /// its membership).
    pub voters: Vec<NodeId>,
    /// When it fell asleep.
    pub since: Instant,
}

impl Sleep {
    /// The group's leader.
    pub fn leader(&self) -> NodeId {
        self.vote.leader_id.node_id
    }
}

#[derive(Debug, Default)]
struct GroupState {
    /// Grows with every request that reaches the group here: a
    /// hibernation decided before a request arrived is abandoned.
    activity: u64,
    asleep: Option<Sleep>,
    /// A client or admin request reached the group here since this node
    /// started. A group nobody has used (just created, or every group of a
    /// node that restarted) sleeps as soon as it is settled, without
    /// waiting `quiesce_after_ms`: 10,000 new groups ticking for seconds
    /// each is what kept a large cluster from starting.
    served: bool,
}

/// A node's quiescence state: which replicas sleep, and counters.
#[derive(Debug)]
pub(crate) struct Quiescence {
    enabled: bool,
    groups: DashMap<ShardId, GroupState>,
    /// A random id of this run of the node (pings answer it, so peers tell
    /// a restart from a pause).
    pub(crate) boot: u64,
    hibernations: AtomicU64,
    wakes: [AtomicU64; KINDS],
    elections: AtomicU64,
    pub(super) dormancies: AtomicU64,
    pub(super) revivals: AtomicU64,
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuiesceStats {
    /// Replicas asleep right now.
    pub asleep: u64,
    /// Times a replica went to sleep.
    pub hibernations: u64,
    /// Wake-ups by cause, in [`Wake::ALL`] order.
    pub wakes: [u64; KINDS],
    /// Elections seen (a hosted group's term grew).
    pub elections: u64,
    /// Replicas whose openraft instance was dropped (dormant), in all.
    pub dormancies: u64,
    /// Dormant replicas rebuilt, in all.
    pub revivals: u64,
}

impl Quiescence {
    pub(crate) fn new(enabled: bool) -> Self {
        Quiescence {
            enabled,
            groups: DashMap::new(),
            boot: rand::random(),
            hibernations: AtomicU64::new(0),
            wakes: Default::default(),
            elections: AtomicU64::new(0),
            dormancies: AtomicU64::new(0),
            revivals: AtomicU64::new(0),
        }
    }

    /// Whether quiescence is on.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Puts a replica that has no membership yet to sleep: it ticks for
    /// nothing until its group's initialiser or leader reaches it, and
    /// that message wakes it (no leader's heartbeat matches the empty vote
    /// it sleeps under, so [`benign`] never holds). Not a hibernation.
    pub(crate) fn sleep_uninitialized(&self, shard: ShardId, raft: &ShardRaft) {
        if !self.enabled {
            return;
        }
        let mut g = self.groups.entry(shard).or_default();
        g.asleep = Some(Sleep {
            // Term 0: no leader's vote ever equals it.
            vote: Vote::new(0, NodeId(0)),
            last: None,
            voters: Vec::new(),
            since: Instant::now(),
        });
        raft.runtime_config().tick(false);
    }

    /// Something reached `shard` here: it counts as activity, and a
    /// sleeping replica wakes.
    pub(crate) fn touch(&self, shard: ShardId, raft: &ShardRaft, cause: Wake) {
        if !self.enabled {
            return;
        }
        let mut g = self.groups.entry(shard).or_default();
        g.activity = g.activity.wrapping_add(1);
        g.served |= matches!(cause, Wake::Client | Wake::Admin);
        if g.asleep.take().is_some() {
            raft.runtime_config().tick(true);
            self.wakes[cause as usize].fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%shard, cause = cause.label(), "group woke");
        }
    }

    /// A Raft request for `shard` arrived: it wakes a sleeping replica
    /// unless it is the sleeping leader's own idle heartbeat.
    pub(crate) fn on_raft_request(&self, shard: ShardId, raft: &ShardRaft, req: &PeerRequest) {
        if !self.enabled {
            return;
        }
        let quiet = self
            .groups
            .get(&shard)
            .is_none_or(|g| g.asleep.as_ref().is_none_or(|s| benign(s, req)));
        if !quiet {
            self.touch(shard, raft, Wake::Raft);
        }
    }

    /// Puts the follower `shard` to sleep under its leader's `vote` at
    /// `last`, when its own state agrees (same leader and vote, the whole
    /// log held and applied, no membership change under way).
    pub(crate) fn sleep_follower(
        &self,
        shard: ShardId,
        raft: &ShardRaft,
        vote: Vote,
        last: Option<LogId>,
    ) -> Result<(), String> {
        let leader = vote.leader_id.node_id;
        if !self.enabled {
            return Err("quiescence is off here".into());
        }
        let voters = {
            let m = raft.metrics();
            let m = m.borrow_watched();
            let settled = m.state == ServerState::Follower
                && m.current_leader == Some(leader)
                && m.vote == vote
                && m.last_log_index == last.map(|l| l.index)
                && m.last_applied == last
                && m.membership_config.membership().get_joint_config().len() == 1;
            if !settled {
                return Err(format!(
                    "not settled: state {:?}, leader {:?}, last log {:?}, applied {:?}",
                    m.state, m.current_leader, m.last_log_index, m.last_applied
                ));
            }
            m.membership_config.membership().voter_ids().collect()
        };
        let mut g = self.groups.entry(shard).or_default();
        g.asleep = Some(Sleep {
            vote,
            last,
            voters,
            since: Instant::now(),
        });
        raft.runtime_config().tick(false);
        self.hibernations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Puts the leader of `shard` to sleep, unless anything reached it
    /// since `activity` was read.
    fn sleep_leader(&self, shard: ShardId, raft: &ShardRaft, activity: u64, sleep: Sleep) -> bool {
        let mut g = self.groups.entry(shard).or_default();
        if g.activity != activity || g.asleep.is_some() {
            return false;
        }
        g.asleep = Some(sleep);
        raft.runtime_config().tick(false);
        self.hibernations.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn activity(&self, shard: ShardId) -> u64 {
        self.groups.get(&shard).map_or(0, |g| g.activity)
    }

    fn served(&self, shard: ShardId) -> bool {
        self.groups.get(&shard).is_some_and(|g| g.served)
    }

    pub(super) fn asleep(&self, shard: ShardId) -> Option<Sleep> {
        self.groups.get(&shard).and_then(|g| g.asleep.clone())
    }

    /// `shard`'s log grew here: a sleeping replica wakes (a proposal that
    /// reached openraft without passing [`Quiescence::touch`]).
    pub(crate) fn on_append(&self, shard: ShardId, raft: impl FnOnce() -> Option<Arc<ShardRaft>>) {
        if !self.enabled || !self.is_asleep(shard) {
            return;
        }
        if let Some(raft) = raft() {
            self.touch(shard, &raft, Wake::Append);
        }
    }

    /// Forgets a replica that is gone.
    pub(crate) fn forget(&self, shard: ShardId) {
        self.groups.remove(&shard);
    }

    /// The leader a sleeping replica of `shard` sleeps under (`None`:
    /// awake, or quiescence off). A sleeping group's leadership cannot
    /// change until it wakes, so this stands in for its metrics.
    pub(crate) fn sleeping_under(&self, shard: ShardId) -> Option<NodeId> {
        if !self.enabled {
            return None;
        }
        let g = self.groups.get(&shard)?;
        g.asleep.as_ref().map(Sleep::leader)
    }

    /// Whether `shard`'s replica here sleeps.
    pub(crate) fn is_asleep(&self, shard: ShardId) -> bool {
        self.groups.get(&shard).is_some_and(|g| g.asleep.is_some())
    }

    /// Replicas asleep for at least `d`.
    fn asleep_for(&self, d: Duration) -> Vec<ShardId> {
        self.groups
            .iter()
            .filter(|g| g.asleep.as_ref().is_some_and(|s| s.since.elapsed() >= d))
            .map(|g| *g.key())
            .collect()
    }

    pub(crate) fn stats(&self) -> QuiesceStats {
        let mut wakes = [0; KINDS];
        for (w, c) in wakes.iter_mut().zip(&self.wakes) {
            *w = c.load(Ordering::Relaxed);
        }
        QuiesceStats {
            asleep: self.groups.iter().filter(|g| g.asleep.is_some()).count() as u64,
            hibernations: self.hibernations.load(Ordering::Relaxed),
            wakes,
            elections: self.elections.load(Ordering::Relaxed),
            dormancies: self.dormancies.load(Ordering::Relaxed),
            revivals: self.revivals.load(Ordering::Relaxed),
        }
    }
}

/// Whether `req` leaves a replica sleeping under `s` asleep: only the
/// sleeping leader's idle heartbeat does (no entries, same vote, the
/// commit index it fell asleep at).
pub(crate) fn benign(s: &Sleep, req: &PeerRequest) -> bool {
    match req {
        PeerRequest::Append(a) => {
            a.entries.is_empty() && a.vote == s.vote && a.leader_commit == s.last
        }
        _ => false,
    }
}

/// What the leader's metrics say, for [`may_hibernate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaderView {
    pub leads: bool,
    pub last_log_index: Option<u64>,
    pub committed: Option<LogId>,
    pub applied: Option<LogId>,
    /// Every follower's matched log id.
    pub matched: Vec<Option<LogId>>,
    pub voters: usize,
    pub learners: usize,
    pub joint: bool,
}

/// Whether a leader in state `v` may put its group to sleep: it leads,
/// everything appended is committed and applied, every follower holds it,
/// and no learner or joint configuration is in flight.
pub(crate) fn may_hibernate(v: &LeaderView) -> bool {
    v.leads
        && v.applied.is_some()
        && v.applied.map(|a| a.index) == v.last_log_index
        && v.committed == v.applied
        && v.learners == 0
        && !v.joint
        && v.matched.len() + 1 == v.voters
        && v.matched.iter().all(|m| *m == v.applied)
}

/// The leader's view of `raft`, its vote, its followers and its term.
fn leader_view(raft: &ShardRaft, me: NodeId) -> (LeaderView, Vote, Vec<NodeId>, u64) {
    let m = raft.metrics();
    let m = m.borrow_watched();
    let membership = m.membership_config.membership();
    let followers: Vec<NodeId> = membership.voter_ids().filter(|v| *v != me).collect();
    let matched = m
        .replication
        .as_ref()
        .map(|r| {
            followers
                .iter()
                .map(|f| r.get(f).copied().flatten())
                .collect()
        })
        .unwrap_or_default();
    let view = LeaderView {
        leads: m.state == ServerState::Leader && m.current_leader == Some(me),
        last_log_index: m.last_log_index,
        committed: m.cluster_committed,
        applied: m.last_applied,
        matched,
        voters: followers.len() + 1,
        learners: membership.learner_ids().count(),
        joint: membership.get_joint_config().len() > 1,
    };
    (view, m.vote, followers, m.current_term)
}

/// A peer as the liveness pings see it.
#[derive(Debug, Clone, Copy)]
struct PeerLife {
    last_ok: Option<Instant>,
    boot: Option<u64>,
    down: bool,
}

/// The longest pause between two scans for groups to put to sleep.
const SCAN_EVERY_MAX: Duration = Duration::from_secs(1);

/// Hibernation requests (one round trip to each follower) at once per node.
const HIBERNATIONS_IN_FLIGHT: usize = 256;

/// Runs quiescence for `node`: pings peers every heartbeat interval, and
/// every quarter of `quiesce_after_ms` (at most a second) puts idle groups it
/// leads to sleep.
pub(crate) async fn run(node: std::sync::Weak<Node>) {
    let (every, quiesce_after, down_after, wake_all_after, me, dormant_after) = {
        let Some(n) = node.upgrade() else { return };
        let r = &n.config.raft;
        if r.quiesce_after_ms == 0 {
            return;
        }
        (
            Duration::from_millis(r.heartbeat_interval_ms),
            Duration::from_millis(r.quiesce_after_ms),
            Duration::from_millis(r.election_timeout_ms_min),
            Duration::from_millis(r.election_timeout_ms_max),
            n.id,
            Duration::from_millis(r.dormant_after_ms),
        )
    };
    let mut peers: HashMap<NodeId, PeerLife> = HashMap::new();
    // Per led shard: (activity, last log index) when first seen idle.
    let mut idle: HashMap<ShardId, (u64, Option<u64>, Instant)> = HashMap::new();
    let mut terms: HashMap<ShardId, u64> = HashMap::new();
    let mut last_scan = Instant::now();
    let hibernating = Arc::new(tokio::sync::Semaphore::new(HIBERNATIONS_IN_FLIGHT));
    // Shards whose hibernation is asked or waiting for its turn.
    let asking: Arc<std::sync::Mutex<HashSet<ShardId>>> = Arc::default();
    loop {
        tokio::time::sleep(every).await;
        let Some(n) = node.upgrade() else { return };
        ping_peers(&n, &mut peers, down_after, wake_all_after).await;
        // Scans skip sleeping replicas, so they are cheap; at least once a
        // second, so that a group nobody used sleeps soon after it settles.
        if last_scan.elapsed() < (quiesce_after / 4).min(SCAN_EVERY_MAX) {
            continue;
        }
        last_scan = Instant::now();
        let q = &n.registry.quiesce;
        if !dormant_after.is_zero() {
            n.make_dormant(q.asleep_for(dormant_after));
        }
        let groups: Vec<(ShardId, Arc<ShardRaft>)> = n
            .registry
            .groups
            .iter()
            .filter_map(|e| match e.value() {
                Slot::Live(r) => Some((*e.key(), r.clone())),
                Slot::Dormant(_) => None,
            })
            .collect();
        idle.retain(|s, _| n.registry.groups.contains_key(s));
        terms.retain(|s, _| n.registry.groups.contains_key(s));
        for (shard, raft) in groups {
            // A sleeping replica's state cannot change until it wakes: its
            // metrics are not read (10,000 of them each pass cost more than
            // everything else an idle node does).
            if q.is_asleep(shard) {
                idle.remove(&shard);
                continue;
            }
            let (view, vote, followers, term) = leader_view(&raft, me);
            match terms.insert(shard, term) {
                Some(t) if t < term => {
                    q.elections.fetch_add(term - t, Ordering::Relaxed);
                }
                _ => {}
            }
            if !may_hibernate(&view) {
                idle.remove(&shard);
                continue;
            }
            let activity = q.activity(shard);
            let index = view.last_log_index;
            let waited = match idle.get(&shard) {
                Some(&(a, i, since)) if a == activity && i == index => {
                    since.elapsed() >= quiesce_after
                }
                _ => {
                    idle.insert(shard, (activity, index, Instant::now()));
                    !q.served(shard)
                }
            };
            if !waited {
                continue;
            }
            idle.remove(&shard);
            // Every settled group is asked in this pass; at most
            // HIBERNATIONS_IN_FLIGHT ask at once, the rest wait their turn
            // (a node that starts 10,000 groups settles them in one pass).
            if !asking.lock().expect("asking poisoned").insert(shard) {
                continue;
            }
            // A waiting ask holds no strong reference to the node (10,000
            // of them must not keep a node that shuts down alive).
            let (weak, permits, asking) = (node.clone(), hibernating.clone(), asking.clone());
            tokio::spawn(async move {
                if let Ok(_permit) = permits.acquire_owned().await {
                    if let Some(n) = weak.upgrade() {
                        hibernate(&n, shard, raft, vote, view.applied, followers, activity).await;
                    }
                }
                asking.lock().expect("asking poisoned").remove(&shard);
            });
        }
    }
}

/// Asks every follower of `shard` to sleep at `last`; when all have, the
/// leader sleeps too (unless a request reached it meanwhile).
async fn hibernate(
    n: &Node,
    shard: ShardId,
    raft: Arc<ShardRaft>,
    vote: Vote,
    last: Option<LogId>,
    followers: Vec<NodeId>,
    activity: u64,
) {
    let q = &n.registry.quiesce;
    let ask = PeerRequest::Hibernate { vote, last };
    let asks = followers
        .iter()
        .map(|f| rpc::call(&n.transport, *f, shard, &ask, Duration::from_secs(1)));
    let answers = futures_util::future::join_all(asks).await;
    let all = answers.iter().all(|a| matches!(a, Ok(PeerResponse::Done)));
    if !all {
        // Followers that slept are woken by the leader's next append;
        // meanwhile the awake leader keeps heartbeating.
        tracing::debug!(%shard, ?answers, "hibernation declined");
        return;
    }
    let sleep = Sleep {
        vote,
        last,
        voters: followers.iter().copied().chain([n.id]).collect(),
        since: Instant::now(),
    };
    if q.sleep_leader(shard, &raft, activity, sleep) {
        tracing::debug!(%shard, "group asleep");
    } else {
        // A request came in meanwhile: the leader stays awake and its
        // next append wakes the followers.
        q.touch(shard, &raft, Wake::Declined);
    }
}

/// One round of liveness pings; wakes groups on a peer's death or return.
async fn ping_peers(
    n: &Arc<Node>,
    peers: &mut HashMap<NodeId, PeerLife>,
    down_after: Duration,
    wake_all_after: Duration,
) {
    let ids = n.transport.peer_ids();
    let pings = ids.iter().map(|p| {
        rpc::call(
            &n.transport,
            *p,
            meta::META_SHARD,
            &PeerRequest::Ping,
            down_after / 2,
        )
    });
    let answers = futures_util::future::join_all(pings).await;
    let now = Instant::now();
    for (peer, answer) in ids.iter().zip(answers) {
        let life = peers.entry(*peer).or_insert(PeerLife {
            last_ok: None,
            boot: None,
            down: false,
        });
        match answer {
            Ok(PeerResponse::Pong { boot }) => {
                let restarted = life.boot.is_some_and(|b| b != boot);
                let back = life.down || life.last_ok.is_none() || restarted;
                if restarted {
                    // It lost every leadership it had.
                    wake_led_by(n, *peer, true);
                }
                life.last_ok = Some(now);
                life.boot = Some(boot);
                life.down = false;
                if back {
                    wake_leading_with(n, *peer);
                }
            }
            _ => {
                // A ping can queue behind a busy peer's traffic (10,000
                // groups starting): any frame it sent counts as a sign of life.
                let heard = n
                    .transport
                    .heard_from(*peer)
                    .is_some_and(|d| d < down_after);
                let silent = !heard && life.last_ok.is_none_or(|t| now - t >= down_after);
                if silent && !life.down && life.last_ok.is_some() {
                    life.down = true;
                    tracing::info!(node = %n.id, %peer, "peer silent: the groups it led here wake");
                    wake_led_by(n, *peer, false);
                }
            }
        }
    }
    // A sleeping follower whose leader's node is down and that no new
    // leader has reached wakes after the longest election timeout.
    if !peers.values().any(|l| l.down) {
        return;
    }
    let q = &n.registry.quiesce;
    for shard in n.registry.shard_ids_all() {
        if let Some(s) = q.asleep(shard) {
            let dead = peers.get(&s.leader()).is_some_and(|l| l.down);
            if dead && s.since.elapsed() >= wake_all_after && s.leader() != n.id {
                wake(n, shard, Wake::PeerDown, false);
            }
        }
    }
}

/// Wakes `shard`'s replica here (rebuilding it first when dormant), and
/// has it campaign when `elect`.
fn wake(n: &Arc<Node>, shard: ShardId, cause: Wake, elect: bool) {
    let q = &n.registry.quiesce;
    if let Some(raft) = n.registry.live(shard) {
        q.touch(shard, &raft, cause);
        if elect {
            tokio::spawn(async move {
                let _ = raft.trigger().elect(false).await;
            });
        }
        return;
    }
    let n = n.clone();
    tokio::spawn(async move {
        if let Some(raft) = n.registry.group(shard).await {
            n.registry.quiesce.touch(shard, &raft, cause);
            if elect {
                let _ = raft.trigger().elect(false).await;
            }
        }
    });
}

/// The groups sleeping here under `leader` wake. On a death (not a
/// restart), the surviving voter with the lowest id campaigns at once;
/// the others stay asleep until its vote request or append wakes them.
fn wake_led_by(n: &Arc<Node>, leader: NodeId, everyone: bool) {
    if leader == n.id {
        return;
    }
    if let Some(b) = n.registry.batch.get() {
        b.wake_led_by(leader);
    }
    let q = &n.registry.quiesce;
    for shard in n.registry.shard_ids_all() {
        let Some(s) = q.asleep(shard) else { continue };
        if s.leader() != leader {
            continue;
        }
        let voters: BTreeSet<NodeId> = s.voters.iter().copied().filter(|v| *v != leader).collect();
        let first = voters.first() == Some(&n.id);
        if everyone || first {
            wake(n, shard, Wake::PeerDown, first && !everyone);
        }
    }
}

/// The groups this node leads, sleeping, with `peer` as a voter wake, so
/// that `peer` (back, or restarted) hears their leader.
fn wake_leading_with(n: &Arc<Node>, peer: NodeId) {
    let q = &n.registry.quiesce;
    for shard in n.registry.shard_ids_all() {
        let Some(s) = q.asleep(shard) else { continue };
        if s.leader() == n.id && s.voters.contains(&peer) {
            wake(n, shard, Wake::PeerUp, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn log(index: u64) -> Option<LogId> {
        Some(crate::raft::log_id(2, NodeId(1), index))
    }

    fn settled() -> LeaderView {
        LeaderView {
            leads: true,
            last_log_index: Some(7),
            committed: log(7),
            applied: log(7),
            matched: vec![log(7), log(7)],
            voters: 3,
            learners: 0,
            joint: false,
        }
    }

    #[test]
    fn only_a_settled_group_hibernates() {
        assert!(may_hibernate(&settled()));
        let cases: Vec<fn(&mut LeaderView)> = vec![
            |v| v.leads = false,
            |v| v.committed = log(6),
            |v| v.applied = log(6),
            |v| v.matched[1] = log(6),
            |v| v.matched[0] = None,
            |v| v.matched.truncate(1),
            |v| v.learners = 1,
            |v| v.joint = true,
            |v| v.last_log_index = Some(8),
            |v| {
                v.last_log_index = None;
                v.applied = None;
                v.committed = None;
                v.matched = vec![None, None];
            },
        ];
        for (i, change) in cases.iter().enumerate() {
            let mut v = settled();
            change(&mut v);
            assert!(!may_hibernate(&v), "case {i}: {v:?}");
        }
    }

    #[test]
    fn only_the_sleeping_leaders_idle_heartbeat_keeps_a_replica_asleep() {
        let vote = Vote::new_committed(2, NodeId(1));
        let s = Sleep {
            vote,
            last: log(7),
            voters: vec![NodeId(1), NodeId(2), NodeId(3)],
            since: Instant::now(),
        };
        let heartbeat = |vote: Vote, commit: Option<LogId>, entries: usize| {
            PeerRequest::Append(openraft::raft::AppendEntriesRequest {
                vote,
                prev_log_id: log(7),
                leader_commit: commit,
                entries: (0..entries)
                    .map(|i| crate::raft::Entry {
                        log_id: log(8 + i as u64).unwrap(),
                        payload: openraft::EntryPayload::Blank,
                    })
                    .collect(),
            })
        };
        assert!(benign(&s, &heartbeat(vote, log(7), 0)));
        assert!(!benign(&s, &heartbeat(vote, log(7), 1)), "entries");
        assert!(!benign(&s, &heartbeat(vote, log(8), 0)), "a new commit");
        let other = Vote::new_committed(3, NodeId(2));
        assert!(!benign(&s, &heartbeat(other, log(7), 0)), "another leader");
        let ask = openraft::raft::VoteRequest::new(Vote::new(3, NodeId(2)), log(7));
        assert!(!benign(&s, &PeerRequest::Vote(ask.clone())));
        assert!(!benign(&s, &PeerRequest::PreVote(ask)));
    }
}
