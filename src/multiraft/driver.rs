//! One node's Raft groups stepped together: every group with work is handled
//! in one [`Driver::round`], whose appends and hard states are one synced
//! RocksDB write and whose messages come out grouped by destination node.

use std::collections::{BTreeMap, HashMap, HashSet};

use raft::eraftpb::{Entry, Message, MessageType};
use raft::{RawNode, StateRole};
use rocksdb::WriteBatch;

use super::store::GroupStore;
use crate::storage::{Engine, StoreError};
use crate::ShardId;

/// How every group on a node runs. Ticks are the driver's clock: the caller
/// calls [`Driver::tick`] at a fixed interval.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Ticks without a leader before a follower campaigns (randomised
    /// between this and twice this).
    pub election_ticks: usize,
    /// Entries bytes per AppendEntries at most.
    pub max_message_bytes: u64,
    /// AppendEntries in flight per follower at most.
    pub max_inflight: usize,
    /// Log compaction: a leader proposes one when its group's log could
    /// drop at least this many entries (0: logs are never compacted).
    pub compact_every: u64,
    /// Log compaction keeps this many applied entries below the point
    /// every voter holds.
    pub compact_keep: u64,
    /// A member whose log lags the leader's by more than this many entries
    /// no longer holds compaction back (0: every member does, however far
    /// behind); it is seeded with a snapshot when it needs what was
    /// compacted.
    pub compact_lag_max: u64,
    /// Quiescence: a leader whose group stayed settled (everything it
    /// appended committed, applied and held by every voter; no proposal,
    /// read or transfer asked) for this many ticks stops ticking the group:
    /// no heartbeats. Its followers stop ticking once they heard nothing
    /// for half an election timeout (an awake leader's heartbeats come more
    /// often), so none of them campaigns. 0, or an election timeout under
    /// twice the heartbeat interval plus two ticks: groups never sleep.
    pub sleep_after_ticks: usize,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            heartbeat_ticks: 2,
            election_ticks: 10,
            max_message_bytes: 1 << 20,
            max_inflight: 256,
            compact_every: 10_000,
            compact_keep: 1000,
            compact_lag_max: 0,
            sleep_after_ticks: 0,
        }
    }
}

/// raft-rs's configuration of every group this driver runs: replica `id`
/// (the node's id), the driver's timings and limits, starting from
/// `applied`.
pub fn raft_config(id: u64, config: &DriverConfig, applied: u64) -> raft::Config {
    raft::Config {
        id,
        election_tick: config.election_ticks,
        heartbeat_tick: config.heartbeat_ticks,
        applied,
        max_size_per_msg: config.max_message_bytes,
        max_inflight_msgs: config.max_inflight,
        check_quorum: true,
        pre_vote: true,
        // Followers learn the commit from the next append or heartbeat.
        skip_bcast_commit: true,
        // Off: raft-rs 0.7's batch_append folds new entries into an empty
        // append still pending for the same follower without checking that
        // they follow its index (an append sent at index 197 carried
        // entries from 195 after the follower's progress moved back). The
        // follower then acknowledges `index + entries` it never wrote, and
        // its leader's next heartbeat commits past its log: raft-rs panics
        // there, and such an acknowledgement could count toward a quorum.
        // A round already sends each peer one frame for all its groups'
        // messages (test: `appends_name_entries_that_follow_their_index_
        // under_a_lossy_network`).
        batch_append: false,
        ..raft::Config::default()
    }
}

/// The context of a log compaction entry; its data is the index to
/// compact to (8 bytes, BE).
const COMPACT_CONTEXT: &[u8] = b"tessera/compact-log";

/// The index a log compaction entry compacts its group's log to (`None`:
/// `e` is not one). A state machine applies one as an empty entry.
pub fn compaction_point(e: &Entry) -> Option<u64> {
    if &e.context[..] != COMPACT_CONTEXT {
        return None;
    }
    let to: [u8; 8] = e.data[..].try_into().ok()?;
    Some(u64::from_be_bytes(to))
}

/// Whether a leader's group is settled: everything it appended is
/// committed, applied and held by every voter, and no read or leader
/// transfer is under way.
fn leader_settled(node: &RawNode<GroupStore>) -> bool {
    let r = &node.raft;
    let last = r.raft_log.last_index();
    r.lead_transferee.is_none()
        && r.raft_log.committed == last
        && r.raft_log.applied == last
        && r.pending_read_count() == 0
        && r.prs().iter().all(|(_, p)| p.matched == last)
}

/// Whether a follower's group is settled: it knows its leader and applied
/// everything in its log, which is committed.
fn follower_settled(node: &RawNode<GroupStore>) -> bool {
    let r = &node.raft;
    let last = r.raft_log.last_index();
    r.state == StateRole::Follower
        && r.leader_id != raft::INVALID_ID
        && r.raft_log.committed == last
        && r.raft_log.applied == last
}

/// Where a proposal went in its group's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proposed {
    /// Its index.
    pub index: u64,
    /// The term of the leader that appended it.
    pub term: u64,
}

impl Proposed {
    /// Where the entry `node` (a leader) just appended went: its last
    /// index, at its term.
    fn last_of(node: &RawNode<GroupStore>) -> Proposed {
        Proposed {
            index: node.raft.raft_log.last_index(),
            term: node.raft.term,
        }
    }
}

/// A Raft message for one group.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The group.
    pub shard: ShardId,
    /// raft-rs's message (its `to` and `from` are node ids).
    pub msg: Message,
}

/// Why the driver refused something.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The group is not open on this node.
    #[error("group {shard} is not open on this node")]
    UnknownGroup {
        /// The group.
        shard: ShardId,
    },
    /// A proposal went to a replica that does not lead its group.
    #[error("group {shard} is not led here (leader: {leader:?})")]
    NotLeader {
        /// The group.
        shard: ShardId,
        /// The leader this replica knows of.
        leader: Option<u64>,
    },
    /// The replica leads but has not committed an entry of its term yet:
    /// it cannot confirm a read point until it has.
    #[error("group {shard} has a new leader here that has not committed in its term yet")]
    NotReady {
        /// The group.
        shard: ShardId,
    },
    /// A peer's message this replica does not take.
    #[error("group {shard}: message refused: {reason}")]
    Refused {
        /// The group.
        shard: ShardId,
        /// Why.
        reason: String,
    },
    /// raft-rs refused the call.
    #[error("group {shard}: {source}")]
    Raft {
        /// The group.
        shard: ShardId,
        /// raft-rs's error.
        source: raft::Error,
    },
    /// The storage failed (and fail-stopped).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one round produced.
#[derive(Debug, Default)]
pub struct Round {
    /// Messages to send, one batch per destination node.
    pub messages: BTreeMap<u64, Vec<Envelope>>,
    /// Committed entries to apply, per group, in log order.
    pub committed: Vec<(ShardId, Vec<Entry>)>,
    /// Groups whose ready this round handled.
    pub readies: usize,
    /// Log entries this round appended, over all groups.
    pub entries: usize,
    /// Whether this round wrote (and synced) anything.
    pub synced: bool,
    /// Confirmed read indexes: (group, the request's context, the index a
    /// read must see applied), from [`Driver::read_index`] calls.
    pub reads: Vec<(ShardId, u64, u64)>,
    /// Groups whose role or known leader changed here.
    pub roles: Vec<ShardId>,
    /// Groups whose log this round compacted.
    pub compacted: Vec<ShardId>,
}

impl Round {
    /// Adds `msgs` of `shard` to their destinations' batches.
    fn route(&mut self, shard: ShardId, msgs: Vec<Message>) {
        for msg in msgs {
            self.messages
                .entry(msg.to)
                .or_default()
                .push(Envelope { shard, msg });
        }
    }

    /// Whether the round did nothing at all.
    pub fn is_idle(&self) -> bool {
        self.readies == 0
    }
}

/// A round's log write ([`Driver::begin_round`]): every group's new entries
/// and hard states (those whose term or vote changed) as one RocksDB write,
/// synced when any group needs it. It is `Send`: it may be written on
/// another thread.
pub struct LogWrite {
    engine: Engine,
    batch: WriteBatch,
    sync: bool,
}

impl LogWrite {
    /// Writes it (nothing when it is empty).
    ///
    /// # Errors
    /// The storage's (the engine fail-stops: nothing is acknowledged after
    /// it).
    pub fn write(self) -> Result<Written, StoreError> {
        if self.batch.is_empty() {
            return Ok(Written { synced: false });
        }
        if self.sync {
            if let Some(e) = self.injected_failure() {
                return Err(e);
            }
            self.engine.write_synced(self.batch, "raft round")?;
        } else {
            self.engine.write_unsynced(self.batch, "raft round")?;
        }
        Ok(Written { synced: self.sync })
    }

    /// The failpoint `multiraft::round_sync` (tests, `failpoints` feature):
    /// the synced write fails as a failed sync would, fail-stopping the
    /// engine. Its argument, when given, names the node whose writes fail
    /// (`return(2)`: node 2's only); without one every node's do.
    #[allow(unreachable_code, clippy::needless_return)]
    fn injected_failure(&self) -> Option<StoreError> {
        fail::fail_point!("multiraft::round_sync", |target: Option<String>| {
            let me = self.engine.node_id().map(|n| n.0.to_string());
            match target {
                Some(t) if Some(&t) != me.as_ref() => None,
                _ => Some(
                    self.engine
                        .latch()
                        .trip("raft round: injected sync failure".into()),
                ),
            }
        });
        None
    }
}

/// Proof that a [`LogWrite`] was written, for [`Driver::finish_round`].
#[derive(Debug)]
pub struct Written {
    synced: bool,
}

/// One replica as the node sees it from outside the loop.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GroupView {
    /// The leader this replica knows of.
    pub leader: Option<u64>,
    /// Whether this replica leads.
    pub leading: bool,
    /// Its current term.
    pub term: u64,
    /// The index its state machine applied.
    pub applied: u64,
    /// The first index in its log (1 until the log is compacted).
    pub log_first: u64,
    /// The last index in its log.
    pub log_last: u64,
}

/// A group's configuration as one replica knows it, with its leader's
/// view of the members' logs ([`Driver::membership`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupMembership {
    /// The voters.
    pub voters: Vec<u64>,
    /// The learners (members that receive the log and do not vote).
    pub learners: Vec<u64>,
    /// This replica's commit index.
    pub commit: u64,
    /// On the leader: each member's matched index (empty elsewhere).
    pub matched: BTreeMap<u64, u64>,
}

/// Counters over the driver's life.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DriverStats {
    /// Rounds that handled at least one ready.
    pub rounds: u64,
    /// Synced writes (one per round with anything to persist).
    pub syncs: u64,
    /// Group appends (a ready with entries), over all syncs.
    pub appends: u64,
    /// Log entries appended.
    pub entries: u64,
    /// Log compactions written (a group's log dropping its applied head).
    pub compactions: u64,
    /// Log entries those compactions dropped.
    pub compacted: u64,
    /// Times a replica stopped ticking its group (quiescence).
    pub sleeps: u64,
    /// Times a sleeping replica woke (sleeps − wakes: replicas asleep now).
    pub wakes: u64,
}

/// One node's replicas of many groups.
pub struct Driver {
    id: u64,
    engine: Engine,
    config: DriverConfig,
    groups: HashMap<ShardId, RawNode<GroupStore>>,
    /// Groups that may have a ready (stepped, proposed to, ticked with an
    /// effect, or persisted since their last ready).
    touched: HashSet<ShardId>,
    logger: slog::Logger,
    stats: DriverStats,
    /// The groups of a round begun and not finished yet: (group, ready
    /// number, the messages that wait for the round's write).
    unfinished: Vec<(ShardId, u64, Vec<Message>)>,
    /// Committed compactions not written yet: group → (the index to compact
    /// to, the compaction entry's own index, which the state machine must
    /// have applied first).
    compactions: HashMap<ShardId, (u64, u64)>,
    /// Compactions this node proposed as leader and has not seen applied:
    /// group → where the entry went (one at a time per group).
    compacting: HashMap<ShardId, Proposed>,
    /// Quiescence state of each open group.
    quiet: HashMap<ShardId, Quiet>,
    /// The open groups that do not sleep (the ones a tick visits).
    awake: HashSet<ShardId>,
    /// Ticks of silence after which a settled follower sleeps (0: groups
    /// never sleep).
    follower_sleep_ticks: usize,
    /// Followers raft-rs asked a snapshot for ([`Driver::snapshot_requests`]).
    snapshot_requests: super::store::SnapshotRequests,
}

/// A group's quiescence state on this replica (whether it sleeps is
/// whether it is missing from [`Driver`]'s `awake` set).
#[derive(Debug, Default, Clone, Copy)]
struct Quiet {
    /// Consecutive ticks it was settled and left alone.
    idle: usize,
    /// A proposal, read, transfer or election was asked since the last tick.
    asked: bool,
    /// A proposal or transfer reached the group here since the driver
    /// started. A leader of a group nobody used sleeps as soon as it
    /// is settled (10,000 new groups ticking for `sleep_after_ticks` each
    /// is what a large cluster's start would cost).
    used: bool,
    /// A peer's message arrived since the last tick.
    heard: bool,
    /// A leader the node found gone ([`Driver::wake_led_by`]): the replica
    /// does not sleep again under it, so its election timer runs until a
    /// new leader is elected (or the same one is heard from again in a new
    /// term).
    suspect: Option<u64>,
}

impl Driver {
    /// A driver for node `id` (a raft-rs peer id: not zero) on `engine`.
    pub fn new(engine: Engine, id: u64, config: DriverConfig) -> Driver {
        assert_ne!(id, 0, "raft-rs reserves peer id 0");
        Driver {
            id,
            engine,
            groups: HashMap::new(),
            touched: HashSet::new(),
            logger: slog::Logger::root(super::TracingDrain, slog::o!()),
            stats: DriverStats::default(),
            unfinished: Vec::new(),
            compactions: HashMap::new(),
            compacting: HashMap::new(),
            snapshot_requests: Default::default(),
            quiet: HashMap::new(),
            awake: HashSet::new(),
            follower_sleep_ticks: {
                // Followers sleep after half an election timeout of silence:
                // longer than an awake leader's heartbeat interval (plus a
                // tick of jitter), shorter than any election timeout.
                let half = config.election_ticks / 2;
                if config.sleep_after_ticks > 0 && half > config.heartbeat_ticks + 1 {
                    half
                } else {
                    0
                }
            },
            config,
        }
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Opens a group bootstrapped here ([`GroupStore::bootstrap`]);
    /// `applied` is the last index its state machine applied, which may be
    /// past the stored commit ([`GroupStore::commit_at_least`]).
    ///
    /// # Errors
    /// The store's error, or raft-rs's for an invalid state.
    pub fn open_group(&mut self, shard: ShardId, applied: u64) -> Result<(), DriverError> {
        let mut store = GroupStore::open(&self.engine, shard)?;
        store.report_snapshot_requests(self.snapshot_requests.clone());
        // The stored commit may be behind what the state machine applied: a
        // commit that changes alone is not written, and the node loop applies
        // a round's committed entries before the round's log write (a crash
        // in between keeps the apply and loses the write).
        store.commit_at_least(applied)?;
        let cfg = raft_config(self.id, &self.config, applied);
        // The group's id in raft-rs's log lines and in its panics.
        let logger = self.logger.new(slog::o!("shard" => shard.0));
        let node = RawNode::new(&cfg, store, &logger)
            .map_err(|source| DriverError::Raft { shard, source })?;
        self.groups.insert(shard, node);
        self.quiet.insert(shard, Quiet::default());
        self.awake.insert(shard);
        self.touched.insert(shard);
        Ok(())
    }

    /// The followers raft-rs asked a snapshot for, per group, as they are
    /// asked (shared: whoever seeds them takes them out).
    pub fn snapshot_requests(&self) -> super::store::SnapshotRequests {
        self.snapshot_requests.clone()
    }

    /// Member `peer` of `shard` (led here) was seeded out of band with a
    /// snapshot of the state machine at `index` (its log now starts right
    /// after it): the leader probes it from there, as raft-rs does after a
    /// snapshot it sent itself. Without this the leader would keep asking
    /// for a snapshot: it sends nothing it could be told a better place
    /// to start from by.
    pub fn seeded(&mut self, shard: ShardId, peer: u64, index: u64) {
        let Some(node) = self.groups.get_mut(&shard) else {
            return;
        };
        if node.raft.state != StateRole::Leader {
            return;
        }
        let Some(pr) = node.raft.mut_prs().get_mut(peer) else {
            return;
        };
        if pr.matched >= index {
            return;
        }
        pr.become_probe();
        pr.next_idx = index + 1;
        node.raft.send_append(peer);
        self.touched.insert(shard);
    }

    /// Closes `shard`'s group here (its replica is being dropped: a merge
    /// retired it): nothing of it is stepped, ticked or written from now
    /// on, and messages for it are dropped as for any group not here.
    /// Whether it was open. Call between rounds.
    pub fn close_group(&mut self, shard: ShardId) -> bool {
        debug_assert!(
            self.unfinished.iter().all(|(s, _, _)| *s != shard),
            "closing {shard} inside a round"
        );
        self.touched.remove(&shard);
        self.compactions.remove(&shard);
        self.compacting.remove(&shard);
        self.quiet.remove(&shard);
        self.awake.remove(&shard);
        self.groups.remove(&shard).is_some()
    }

    fn group(&mut self, shard: ShardId) -> Result<&mut RawNode<GroupStore>, DriverError> {
        self.groups
            .get_mut(&shard)
            .ok_or(DriverError::UnknownGroup { shard })
    }

    /// `shard`'s group if this replica leads it.
    fn led(&mut self, shard: ShardId) -> Result<&mut RawNode<GroupStore>, DriverError> {
        let leader = self.leader(shard);
        let node = self.group(shard)?;
        if node.raft.state != StateRole::Leader {
            return Err(DriverError::NotLeader { shard, leader });
        }
        Ok(node)
    }

    /// Advances every group's clock by one tick; a leader whose log has
    /// grown enough proposes its compaction ([`Driver::propose_compaction`]).
    pub fn tick(&mut self) {
        let sleep = self.follower_sleep_ticks > 0;
        // Only awake groups are visited: 10,000 sleeping ones cost nothing
        // per tick.
        let mut fell_asleep = Vec::new();
        let mut led = Vec::new();
        for shard in &self.awake {
            let (Some(node), Some(q)) = (self.groups.get_mut(shard), self.quiet.get_mut(shard))
            else {
                continue;
            };
            if node.tick() || node.has_ready() {
                self.touched.insert(*shard);
            }
            if node.raft.state == StateRole::Leader {
                led.push(*shard);
            }
            if !sleep {
                continue;
            }
            if q.suspect.is_some_and(|l| l != node.raft.leader_id) {
                q.suspect = None;
            }
            let (settled, need) = if node.raft.state == StateRole::Leader {
                // Unused: once two heartbeats carried the settled commit.
                let need = if q.used {
                    self.config.sleep_after_ticks
                } else {
                    self.config
                        .sleep_after_ticks
                        .min(2 * self.config.heartbeat_ticks + 1)
                };
                (!q.asked && leader_settled(node), need)
            } else {
                (
                    !q.asked && !q.heard && q.suspect.is_none() && follower_settled(node),
                    self.follower_sleep_ticks,
                )
            };
            q.asked = false;
            q.heard = false;
            q.idle = if settled { q.idle + 1 } else { 0 };
            if q.idle >= need {
                fell_asleep.push(*shard);
                self.stats.sleeps += 1;
                tracing::debug!(%shard, leader = node.raft.state == StateRole::Leader, "group asleep");
            }
        }
        for shard in &fell_asleep {
            self.awake.remove(shard);
        }
        if self.config.compact_every > 0 {
            for shard in led {
                self.propose_compaction(shard);
            }
        }
    }

    /// Where `shard`'s log may be compacted to now, as its leader sees it:
    /// `compact_keep` below the lowest index every voter holds (raft-rs's
    /// matched index of each, this replica's own included) and below what
    /// this replica applied. No snapshot can stand in for compacted entries
    /// yet, so a voter that is down or behind holds every log back until
    /// it catches up (a new leader knows no follower's matched index before
    /// it hears from them: 0, no compaction). `None` unless the log can
    /// drop `compact_every` entries at least.
    fn compaction_target(&self, shard: ShardId) -> Option<u64> {
        let node = self.groups.get(&shard)?;
        if node.raft.state != StateRole::Leader {
            return None;
        }
        // A member lagging more than `compact_lag_max` entries (down, or
        // cut off) does not hold the log back: it is seeded with a
        // snapshot when it asks for what was compacted.
        let last = node.raft.raft_log.last_index();
        let lag_max = self.config.compact_lag_max;
        let held = node
            .raft
            .prs()
            .iter()
            .map(|(_, p)| p.matched)
            .filter(|m| lag_max == 0 || last.saturating_sub(*m) <= lag_max)
            .min()
            .unwrap_or(0);
        let to = held
            .min(node.raft.raft_log.applied)
            .saturating_sub(self.config.compact_keep);
        let first = node.store().first();
        (to + 1 >= first + self.config.compact_every).then_some(to)
    }

    /// Proposes a compaction of `shard`'s log when it leads the group, has
    /// none in flight and [`Driver::compaction_target`] allows one; returns
    /// where the entry went. Every replica drops its log up to the entry's
    /// index once its state machine applied the entry.
    pub fn propose_compaction(&mut self, shard: ShardId) -> Option<Proposed> {
        let applied = self.applied_index(shard)?;
        let term = self.groups.get(&shard)?.raft.term;
        if let Some(p) = self.compacting.get(&shard) {
            // One at a time: the last one is applied, replaced, or lost
            // with a leadership this replica no longer has.
            if applied < p.index && p.term == term {
                return None;
            }
            self.compacting.remove(&shard);
        }
        let to = self.compaction_target(shard)?;
        let node = self.groups.get_mut(&shard)?;
        node.propose(COMPACT_CONTEXT.to_vec(), to.to_be_bytes().to_vec())
            .ok()?;
        let at = Proposed::last_of(node);
        self.compacting.insert(shard, at);
        self.touched.insert(shard);
        tracing::debug!(%shard, to, at = at.index, "log compaction proposed");
        Some(at)
    }

    /// Something was asked of `shard` here (a proposal, read, transfer or
    /// election): it counts as activity, and a sleeping replica wakes; a
    /// proposal or transfer (`by_a_client`) marks the group used.
    fn asked(&mut self, shard: ShardId, by_a_client: bool) {
        if let Some(q) = self.quiet.get_mut(&shard) {
            q.asked = true;
            q.used |= by_a_client;
        }
        self.wake(shard);
    }

    /// `shard`'s group, once a request (`by_a_client`: see
    /// [`Driver::asked`]) found that this replica leads it; the request
    /// counts as activity and wakes it.
    fn led_for(
        &mut self,
        shard: ShardId,
        by_a_client: bool,
    ) -> Result<&mut RawNode<GroupStore>, DriverError> {
        self.led(shard)?;
        self.asked(shard, by_a_client);
        self.led(shard)
    }

    /// Wakes `shard`'s replica here if it sleeps: it ticks again. A leader
    /// starts a fresh election timeout with every follower counted as
    /// recently heard from (each held everything when it fell asleep), so
    /// check-quorum does not depose it before they answer.
    fn wake(&mut self, shard: ShardId) {
        let Some(q) = self.quiet.get_mut(&shard) else {
            return;
        };
        if !self.awake.insert(shard) {
            return;
        }
        q.idle = 0;
        self.stats.wakes += 1;
        if let Some(node) = self.groups.get_mut(&shard) {
            if node.raft.state == StateRole::Leader {
                node.raft.election_elapsed = 0;
                for (_, p) in node.raft.mut_prs().iter_mut() {
                    p.recent_active = true;
                }
            }
        }
        self.touched.insert(shard);
        tracing::debug!(%shard, "group woke");
    }

    /// Wakes every group sleeping here under `leader`: the node-level
    /// liveness check found that node down or restarted, so its groups need
    /// their election timers (a sleeping follower never campaigns), and
    /// they do not sleep again under it. Returns how many woke.
    pub fn wake_led_by(&mut self, leader: u64) -> usize {
        let asleep: Vec<ShardId> = self
            .groups
            .iter()
            .filter(|(s, n)| n.raft.leader_id == leader && !self.awake.contains(*s))
            .map(|(s, _)| *s)
            .collect();
        for s in &asleep {
            if let Some(q) = self.quiet.get_mut(s) {
                q.suspect = Some(leader);
            }
            self.wake(*s);
        }
        asleep.len()
    }

    /// Whether `shard`'s replica here sleeps (quiescence).
    pub fn is_asleep(&self, shard: ShardId) -> bool {
        self.groups.contains_key(&shard) && !self.awake.contains(&shard)
    }

    /// Starts an election for `shard` here now.
    ///
    /// # Errors
    /// [`DriverError::UnknownGroup`], or raft-rs's refusal.
    pub fn campaign(&mut self, shard: ShardId) -> Result<(), DriverError> {
        self.group(shard)?;
        self.asked(shard, false);
        self.group(shard)?
            .campaign()
            .map_err(|source| DriverError::Raft { shard, source })?;
        self.touched.insert(shard);
        Ok(())
    }

    /// The leader of `shard` this replica knows of.
    pub fn leader(&self, shard: ShardId) -> Option<u64> {
        let node = self.groups.get(&shard)?;
        let lead = node.raft.leader_id;
        (lead != raft::INVALID_ID).then_some(lead)
    }

    /// Whether this replica leads `shard`.
    pub fn is_leader(&self, shard: ShardId) -> bool {
        self.groups
            .get(&shard)
            .is_some_and(|n| n.raft.state == StateRole::Leader)
    }

    /// Appends `data` to `shard`'s log if this replica leads it, and returns
    /// where it went: the entry is committed when a later round returns an
    /// entry at that index **with that term** (another term there means a new
    /// leader replaced it, and it never will be).
    ///
    /// # Errors
    /// [`DriverError::NotLeader`] with the known leader otherwise.
    pub fn propose(&mut self, shard: ShardId, data: Vec<u8>) -> Result<Proposed, DriverError> {
        let node = self.led_for(shard, true)?;
        node.propose(Vec::new(), data)
            .map_err(|source| DriverError::Raft { shard, source })?;
        let at = Proposed::last_of(node);
        self.touched.insert(shard);
        Ok(at)
    }

    /// Proposes a change of `shard`'s configuration (one node added as a
    /// learner, promoted to voter, or removed: raft-rs's simple changes,
    /// one at a time). Returns where the entry went; once applied, the
    /// group's configuration is the new one on that replica
    /// ([`Driver::apply_conf_change`]). raft-rs turns a change proposed
    /// while another is pending into an empty entry: read the
    /// configuration back ([`Driver::membership`]) rather than trust the
    /// answer.
    ///
    /// # Errors
    /// [`DriverError::NotLeader`], or raft-rs's refusal.
    pub fn propose_conf_change(
        &mut self,
        shard: ShardId,
        cc: raft::eraftpb::ConfChange,
    ) -> Result<Proposed, DriverError> {
        let node = self.led_for(shard, true)?;
        node.propose_conf_change(Vec::new(), cc)
            .map_err(|source| DriverError::Raft { shard, source })?;
        let at = Proposed::last_of(node);
        self.touched.insert(shard);
        Ok(at)
    }

    /// Applies a committed configuration change of `shard` to its raft-rs
    /// instance (in log order, as its entry is applied) and returns the new
    /// configuration; the caller persists it with the entry's apply.
    ///
    /// # Errors
    /// [`DriverError::UnknownGroup`], or raft-rs's refusal.
    pub fn apply_conf_change(
        &mut self,
        shard: ShardId,
        cc: &raft::eraftpb::ConfChange,
    ) -> Result<raft::eraftpb::ConfState, DriverError> {
        let node = self.group(shard)?;
        let conf = node
            .apply_conf_change(cc)
            .map_err(|source| DriverError::Raft { shard, source })?;
        node.mut_store().set_conf(conf.clone());
        self.touched.insert(shard);
        Ok(conf)
    }

    /// `shard`'s configuration and, on its leader, how far each member's
    /// log matches the leader's.
    pub fn membership(&self, shard: ShardId) -> Option<GroupMembership> {
        let node = self.groups.get(&shard)?;
        let conf = node.store().conf_state();
        let leading = node.raft.state == StateRole::Leader;
        Some(GroupMembership {
            voters: conf.voters.clone(),
            learners: conf.learners.clone(),
            commit: node.raft.raft_log.committed,
            matched: if leading {
                node.raft
                    .prs()
                    .iter()
                    .map(|(id, p)| (*id, p.matched))
                    .collect()
            } else {
                BTreeMap::new()
            },
        })
    }

    /// Hands leadership of `shard` (led here) to voter `to`: raft-rs's
    /// leader transfer (the leader stops taking proposals, brings `to` up to
    /// date and tells it to campaign at once; it gives up after an election
    /// timeout). Whether and when `to` leads shows in later rounds' role
    /// changes.
    ///
    /// # Errors
    /// [`DriverError::NotLeader`]; [`DriverError::Refused`] when `to` is
    /// not a voter.
    pub fn transfer_leader(&mut self, shard: ShardId, to: u64) -> Result<(), DriverError> {
        let node = self.led_for(shard, true)?;
        if !node.store().is_voter(to) {
            return Err(DriverError::Refused {
                shard,
                reason: format!("n{to} is not a voter"),
            });
        }
        node.transfer_leader(to);
        self.touched.insert(shard);
        Ok(())
    }

    /// Whether this replica leads `shard` and has committed an entry of its
    /// own term: only then does raft-rs take a read index (before that it
    /// drops the request without an answer).
    pub fn can_read(&self, shard: ShardId) -> bool {
        self.groups
            .get(&shard)
            .is_some_and(|n| n.raft.state == StateRole::Leader && n.raft.commit_to_current_term())
    }

    /// Asks `shard`'s quorum to confirm this replica still leads; a later
    /// round returns `(shard, ctx, index)` in [`Round::reads`] once it did
    /// (raft-rs's ReadIndex, safe mode: a heartbeat round, after the
    /// leader's first commit in its term). A read that then waits until
    /// `index` is applied here is linearizable.
    ///
    /// # Errors
    /// [`DriverError::NotLeader`] when this replica does not lead `shard`,
    /// [`DriverError::NotReady`] when it leads but has not committed in its
    /// term yet ([`Driver::can_read`]).
    pub fn read_index(&mut self, shard: ShardId, ctx: u64) -> Result<(), DriverError> {
        // A read changes nothing: a group only read from still sleeps as
        // soon as it is settled (the start-up check reads every shard).
        let node = self.led_for(shard, false)?;
        if !node.raft.commit_to_current_term() {
            return Err(DriverError::NotReady { shard });
        }
        node.read_index(ctx.to_be_bytes().to_vec());
        self.touched.insert(shard);
        Ok(())
    }

    /// Hands a message from a peer to its group.
    ///
    /// Only messages between replicas are taken: one addressed to another
    /// node, or a proposal or read request (replicas here never forward
    /// those, so a peer sending one is not following the protocol), is
    /// refused.
    ///
    /// # Errors
    /// [`DriverError::Refused`] for the messages above,
    /// [`DriverError::UnknownGroup`], or raft-rs's refusal (a local message
    /// type).
    pub fn step(&mut self, env: Envelope) -> Result<(), DriverError> {
        let shard = env.shard;
        if env.msg.to != self.id {
            return Err(DriverError::Refused {
                shard,
                reason: format!("addressed to node {}", env.msg.to),
            });
        }
        if matches!(
            env.msg.get_msg_type(),
            MessageType::MsgPropose | MessageType::MsgReadIndex
        ) {
            return Err(DriverError::Refused {
                shard,
                reason: format!("{:?} from a peer", env.msg.get_msg_type()),
            });
        }
        self.group(shard)?;
        // A leader's heartbeat and its answer leave a sleeping replica
        // asleep (they are stepped all the same: a sleeping replica only
        // does not tick); anything else means the group is in use, or is
        // electing, and wakes it.
        let benign = matches!(
            env.msg.get_msg_type(),
            MessageType::MsgHeartbeat | MessageType::MsgHeartbeatResponse
        );
        if let Some(q) = self.quiet.get_mut(&shard) {
            q.heard = true;
        }
        if !benign {
            self.wake(shard);
        }
        self.group(shard)?
            .step(env.msg)
            .map_err(|source| DriverError::Raft { shard, source })?;
        self.touched.insert(shard);
        Ok(())
    }

    /// Records that `shard`'s state machine applied up to `index`.
    ///
    /// # Errors
    /// [`DriverError::UnknownGroup`].
    pub fn applied(&mut self, shard: ShardId, index: u64) -> Result<(), DriverError> {
        self.group(shard)?.advance_apply_to(index);
        self.touched.insert(shard);
        Ok(())
    }

    /// Handles every group with work: their appends and hard states go to
    /// RocksDB as one write, synced when any of them needs it; then their
    /// messages and committed entries come back grouped.
    ///
    /// # Errors
    /// The storage's (the engine fail-stops: nothing is acknowledged after
    /// it).
    pub fn round(&mut self) -> Result<Round, DriverError> {
        let (mut out, write) = self.begin_round();
        let written = write.write()?;
        self.finish_round(&mut out, written);
        Ok(out)
    }

    /// The first half of a round, for a caller that applies before the
    /// round's log write (the node loop does): takes every group's ready,
    /// stages their appends and hard states into the returned [`LogWrite`],
    /// and returns the round with its committed entries (already written
    /// here in an earlier round, so they may be applied at once, before or
    /// while the `LogWrite` is written) and the messages that may leave
    /// before the write: a leader's appends, sent then, reach its followers
    /// while it syncs its own copy, so the syncs overlap (Raft allows it:
    /// the leader counts itself towards the quorum only once its own write
    /// is done). Once the write is done, [`Driver::finish_round`]
    /// reports it and adds the messages that had to wait for it (a
    /// follower's acknowledgements, votes). Applying first is safe: what is
    /// applied was committed, and [`Driver::open_group`] takes a state
    /// machine ahead of the stored commit (a crash that kept the apply's
    /// write and lost this one).
    ///
    /// # Panics
    /// When a round begun before was not finished.
    pub fn begin_round(&mut self) -> (Round, LogWrite) {
        assert!(
            self.unfinished.is_empty(),
            "a round begins only after the previous one finished"
        );
        let mut out = Round::default();
        let mut write = LogWrite {
            engine: self.engine.clone(),
            batch: WriteBatch::default(),
            sync: false,
        };
        out.compacted = self.stage_compactions(&mut write.batch);
        let touched: Vec<ShardId> = self.touched.drain().collect();
        for shard in touched {
            let Some(node) = self.groups.get_mut(&shard) else {
                continue;
            };
            if !node.has_ready() {
                continue;
            }
            let mut rd = node.ready();
            out.readies += 1;
            if rd.ss().is_some() {
                out.roles.push(shard);
            }
            for rs in rd.take_read_states() {
                // Only this driver issues read contexts: 8 bytes each.
                if let Ok(ctx) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) {
                    out.reads.push((shard, u64::from_be_bytes(ctx), rs.index));
                }
            }
            let early = rd.take_messages();
            check_acks(shard, node, &early, "with the round's appends");
            out.route(shard, early);
            assert!(
                rd.snapshot().is_empty(),
                "{shard}: raft-rs asked to install a snapshot, and none is ever sent"
            );
            let entries = rd.take_entries();
            if !entries.is_empty() {
                out.entries += entries.len();
                self.stats.appends += 1;
            }
            node.mut_store().stage(&entries, rd.hs(), &mut write.batch);
            write.sync |= rd.must_sync();
            let committed = rd.take_committed_entries();
            if let Some((to, at)) = committed
                .iter()
                .rev()
                .find_map(|e| compaction_point(e).map(|to| (to, e.index)))
            {
                self.compactions.insert(shard, (to, at));
            }
            if !committed.is_empty() {
                out.committed.push((shard, committed));
            }
            let after = rd.take_persisted_messages();
            let number = rd.number();
            node.advance_append_async(rd);
            self.unfinished.push((shard, number, after));
        }
        if out.readies > 0 {
            self.stats.rounds += 1;
            self.stats.entries += out.entries as u64;
        }
        (out, write)
    }

    /// Stages into `batch` every committed compaction whose entry the
    /// group's state machine has applied ([`Driver::applied`] is told after
    /// the apply's write, so `batch`, written later, follows it: what
    /// [`GroupStore::compact`] asks of its caller).
    fn stage_compactions(&mut self, batch: &mut WriteBatch) -> Vec<ShardId> {
        let due: Vec<(ShardId, u64)> = self
            .compactions
            .iter()
            .filter(|(shard, (_, at))| self.applied_index(**shard).is_some_and(|a| a >= *at))
            .map(|(shard, (to, _))| (*shard, *to))
            .collect();
        let mut done = Vec::new();
        for (shard, to) in due {
            self.compactions.remove(&shard);
            let Some(node) = self.groups.get_mut(&shard) else {
                continue;
            };
            let store = node.mut_store();
            let to = to.min(store.last());
            match store.compact(to, batch) {
                Ok(0) => {}
                Ok(dropped) => {
                    self.stats.compactions += 1;
                    self.stats.compacted += dropped;
                    done.push(shard);
                    tracing::debug!(%shard, to, "log compacted");
                }
                // The log keeps its head: nothing is lost, the next
                // compaction tries again.
                Err(e) => tracing::warn!(%shard, to, error = %e, "log compaction skipped"),
            }
        }
        done
    }

    /// The second half of a round begun by [`Driver::begin_round`], once
    /// its [`LogWrite`] is written: tells every group its ready is
    /// persisted and adds the messages that waited for that to `round`.
    pub fn finish_round(&mut self, round: &mut Round, written: Written) {
        if written.synced {
            self.stats.syncs += 1;
            round.synced = true;
        }
        for (shard, number, after) in std::mem::take(&mut self.unfinished) {
            let node = self.groups.get_mut(&shard).expect("handled above");
            node.on_persist_ready(number);
            check_acks(shard, node, &after, "after the round's write");
            round.route(shard, after);
            // Persisting may have committed entries or freed messages.
            self.touched.insert(shard);
        }
    }

    /// Whether some group may have work (a ready) right now.
    pub fn has_work(&self) -> bool {
        !self.touched.is_empty()
    }

    /// Counters since the driver started.
    pub fn stats(&self) -> DriverStats {
        self.stats
    }

    /// The index up to which `shard`'s state machine applied, as last
    /// reported by [`Driver::applied`] (or given to [`Driver::open_group`]).
    pub fn applied_index(&self, shard: ShardId) -> Option<u64> {
        self.groups.get(&shard).map(|n| n.raft.raft_log.applied)
    }

    /// What the node's request path and status need of `shard`'s replica.
    pub fn view(&self, shard: ShardId) -> Option<GroupView> {
        let node = self.groups.get(&shard)?;
        Some(GroupView {
            leader: self.leader(shard),
            leading: node.raft.state == StateRole::Leader,
            term: node.raft.term,
            applied: node.raft.raft_log.applied,
            log_first: node.store().first(),
            log_last: node.store().last(),
        })
    }

    /// The open groups, in no order.
    pub fn shards(&self) -> impl Iterator<Item = ShardId> + '_ {
        self.groups.keys().copied()
    }

    /// `shard`'s store (its log and hard state).
    pub fn store(&self, shard: ShardId) -> Option<&GroupStore> {
        self.groups.get(&shard).map(RawNode::store)
    }
}

/// A replica acknowledges only entries its log holds: an append response
/// past its last index would let its leader count entries this replica
/// never wrote (and later send it a commit it cannot take). Logged as an
/// error with what the message and the log say, never sent silently.
fn check_acks(shard: ShardId, node: &RawNode<GroupStore>, msgs: &[Message], when: &str) {
    let last = node.raft.raft_log.last_index();
    for m in msgs {
        if m.get_msg_type() == MessageType::MsgAppendResponse && !m.reject && m.index > last {
            tracing::error!(
                %shard,
                to = m.to,
                index = m.index,
                term = m.term,
                last,
                store_last = node.store().last(),
                committed = node.raft.raft_log.committed,
                role = ?node.raft.state,
                when,
                "an append acknowledged past this replica's last index"
            );
        }
    }
}
