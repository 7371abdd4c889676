//! A node's batch-system thread: one loop that takes what arrived (proposals,
//! peers' frames), ticks on time, runs one [`Driver::round`] for every group
//! with work, applies the round's committed entries together, acknowledges
//! the proposals they settle, and sends one frame per peer.
//!
//! Everything is bounded: the mailbox (a full one refuses a proposal with a
//! typed error and drops a peer's frame, which Raft resends), the inputs
//! taken per round, and so the size of a round.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use raft::eraftpb::Entry;
use tokio::sync::oneshot;

use super::driver::{Driver, DriverError, DriverStats, Envelope, GroupView, Proposed};
use crate::storage::StoreError;
use crate::ShardId;

/// Where a round's messages go: one frame per destination node.
pub trait Outbound: Send + 'static {
    /// Sends every message this round has for node `to`, as one frame.
    fn send(&mut self, to: u64, frame: Vec<Envelope>);
}

/// What applies committed entries: once per round, every group's together.
pub trait Applier: Send + 'static {
    /// What applying one entry answers its proposer.
    type Response: Send + 'static;

    /// Applies `committed` (per group, in log order) and returns one
    /// response per entry, in the same shape. An error stops the loop:
    /// nothing more is acknowledged.
    ///
    /// # Errors
    /// The storage's.
    fn apply(
        &mut self,
        committed: &[(ShardId, Vec<Entry>)],
    ) -> Result<Vec<Vec<Self::Response>>, StoreError>;

    /// The groups that entries applied since the last call created here
    /// (a split's child), each with the index its state machine starts
    /// from: the loop opens their groups right after the apply. None by
    /// default.
    ///
    /// # Errors
    /// The storage's, opening a created group's state machine.
    fn take_created(&mut self) -> Result<Vec<(ShardId, u64)>, StoreError> {
        Ok(Vec::new())
    }

    /// Lets go of `shard` (its group was closed): whatever the applier
    /// holds of it is dropped. Nothing by default.
    fn remove(&mut self, _shard: ShardId) {}

    /// Opens `shard` (its records are written) and returns the index its
    /// state machine applied. Refused by default.
    ///
    /// # Errors
    /// The storage's.
    fn open(&mut self, shard: ShardId) -> Result<u64, StoreError> {
        Err(StoreError::UnknownShard { shard })
    }
}

impl<A: Applier + ?Sized> Applier for Box<A> {
    type Response = A::Response;

    fn apply(
        &mut self,
        committed: &[(ShardId, Vec<Entry>)],
    ) -> Result<Vec<Vec<Self::Response>>, StoreError> {
        (**self).apply(committed)
    }

    fn take_created(&mut self) -> Result<Vec<(ShardId, u64)>, StoreError> {
        (**self).take_created()
    }

    fn remove(&mut self, shard: ShardId) {
        (**self).remove(shard);
    }

    fn open(&mut self, shard: ShardId) -> Result<u64, StoreError> {
        (**self).open(shard)
    }
}

/// How the loop runs.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// The Raft clock: one [`Driver::tick`] per interval.
    pub tick: Duration,
    /// Inputs (proposals and frames) queued at most; beyond it a proposal is
    /// refused and a frame dropped.
    pub mailbox: usize,
    /// Inputs taken into one round at most.
    pub inputs_per_round: usize,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            tick: Duration::from_millis(100),
            mailbox: 16_384,
            inputs_per_round: 4096,
        }
    }
}

/// Why a proposal was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The driver refused it (not the leader, unknown group, ...).
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// A new leader's entry took its place in the log: it was not applied.
    #[error("{shard}: the proposal at index {index} was replaced by a new leader's entry")]
    Replaced {
        /// The group.
        shard: ShardId,
        /// Where it had been appended.
        index: u64,
    },
    /// The group cannot serve now (its storage failed, say).
    #[error("{shard} cannot serve now: {reason}")]
    Unavailable {
        /// The group.
        shard: ShardId,
        /// Why.
        reason: String,
    },
    /// The node's mailbox is full: try again later.
    #[error("the node is busy (its mailbox of {capacity} is full)")]
    Busy {
        /// The mailbox's capacity.
        capacity: usize,
    },
    /// The replica stopped leading with the proposal appended but not yet
    /// committed: it may still commit under the new leader, or not.
    #[error("{shard}: leadership changed with the proposal at index {index} pending; its outcome is unknown")]
    Unknown {
        /// The group.
        shard: ShardId,
        /// Where it had been appended.
        index: u64,
    },
    /// The loop has stopped (shut down, or its storage failed).
    #[error("the node's Raft loop has stopped")]
    Stopped,
}

type Reply = oneshot::Sender<Result<u64, RequestError>>;

/// A proposal's answer: its index and what applying it answered.
pub type Proposal<R> = Result<(u64, R), RequestError>;

type ProposalReply<R> = oneshot::Sender<Proposal<R>>;

enum Input<R> {
    Propose {
        shard: ShardId,
        data: Vec<u8>,
        reply: ProposalReply<R>,
    },
    Read {
        shard: ShardId,
        reply: Reply,
    },
    Transfer {
        shard: ShardId,
        to: u64,
        reply: oneshot::Sender<Result<(), RequestError>>,
    },
    Campaign(ShardId),
    WakeLedBy(u64),
    Frame(Vec<Envelope>),
    Close {
        shard: ShardId,
        reply: oneshot::Sender<bool>,
    },
    ConfChange {
        shard: ShardId,
        cc: raft::eraftpb::ConfChange,
        reply: ProposalReply<R>,
    },
    Open {
        shard: ShardId,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Membership {
        shard: ShardId,
        reply: oneshot::Sender<Option<super::driver::GroupMembership>>,
    },
    Seeded {
        shard: ShardId,
        peer: u64,
        index: u64,
    },
}

/// A handle to send to a running loop; cheap to clone.
pub struct Mailbox<R> {
    tx: SyncSender<Input<R>>,
    capacity: usize,
}

impl<R> Clone for Mailbox<R> {
    fn clone(&self) -> Self {
        Mailbox {
            tx: self.tx.clone(),
            capacity: self.capacity,
        }
    }
}

impl<R> Mailbox<R> {
    /// Proposes `data` to `shard`; the receiver gets the entry's index once
    /// it is committed and applied here, or why not.
    ///
    /// # Errors
    /// [`RequestError::Busy`] when the mailbox is full,
    /// [`RequestError::Stopped`] when the loop is gone.
    pub fn propose(
        &self,
        shard: ShardId,
        data: Vec<u8>,
    ) -> Result<oneshot::Receiver<Proposal<R>>, RequestError> {
        self.ask(|reply| Input::Propose { shard, data, reply })
    }

    /// Asks for a linearizable read point of `shard`: the receiver gets an
    /// index once this replica's quorum confirmed it leads and it applied
    /// everything up to that index, so what the caller then reads from the
    /// state machine includes every write acknowledged before this call.
    ///
    /// # Errors
    /// [`RequestError::Busy`] when the mailbox is full,
    /// [`RequestError::Stopped`] when the loop is gone.
    pub fn read_index(
        &self,
        shard: ShardId,
    ) -> Result<oneshot::Receiver<Result<u64, RequestError>>, RequestError> {
        self.ask(|reply| Input::Read { shard, reply })
    }

    /// Starts handing leadership of `shard` (led here) to voter `to`; the
    /// receiver says whether the transfer started ([`Driver::transfer_leader`]).
    /// Watch [`LoopView`] for the outcome.
    ///
    /// # Errors
    /// As [`Mailbox::propose`].
    pub fn transfer_leader(
        &self,
        shard: ShardId,
        to: u64,
    ) -> Result<oneshot::Receiver<Result<(), RequestError>>, RequestError> {
        self.ask(|reply| Input::Transfer { shard, to, reply })
    }

    /// Starts an election for `shard` here (with pre-vote: peers that
    /// hear from a live leader refuse it, so it cannot depose one).
    ///
    /// # Errors
    /// As [`Mailbox::propose`].
    pub fn campaign(&self, shard: ShardId) -> Result<(), RequestError> {
        self.send(Input::Campaign(shard))
    }

    /// Wakes the groups sleeping here under `leader`'s leadership (the
    /// node found that node down or restarted: their election timers must
    /// run). See [`Driver::wake_led_by`].
    ///
    /// # Errors
    /// As [`Mailbox::propose`].
    pub fn wake_led_by(&self, leader: u64) -> Result<(), RequestError> {
        self.send(Input::WakeLedBy(leader))
    }

    /// Closes `shard`'s group and hands its state machine back to the
    /// applier to drop ([`Applier::remove`]): its waiting proposals and
    /// reads are answered [`RequestError::Stopped`]. The receiver says
    /// whether the group was open; once it answers, nothing of the group
    /// runs, so its records can be deleted.
    ///
    /// # Errors
    /// As [`Mailbox::propose`].
    pub fn close(&self, shard: ShardId) -> Result<oneshot::Receiver<bool>, RequestError> {
        self.ask(|reply| Input::Close { shard, reply })
    }

    /// Proposes a change of `shard`'s configuration
    /// ([`Driver::propose_conf_change`]); answered as a proposal is, once
    /// applied here.
    ///
    /// # Errors
    /// As [`Mailbox::propose`].
    pub fn propose_conf_change(
        &self,
        shard: ShardId,
        cc: raft::eraftpb::ConfChange,
    ) -> Result<oneshot::Receiver<Proposal<R>>, RequestError> {
        self.ask(|reply| Input::ConfChange { shard, cc, reply })
    }

    /// Opens `shard`'s group (its records are written here: a replica
    /// seeded for a move): the applier opens its state machine
    /// ([`Applier::open`]) and the driver its group. The receiver says
    /// whether it opened (already open counts).
    ///
    /// # Errors
    /// As [`Mailbox::propose`].
    pub fn open(
        &self,
        shard: ShardId,
    ) -> Result<oneshot::Receiver<Result<(), String>>, RequestError> {
        self.ask(|reply| Input::Open { shard, reply })
    }

    /// Member `peer` of `shard` was seeded with a snapshot at `index`
    /// ([`Driver::seeded`]).
    ///
    /// # Errors
    /// As [`Mailbox::propose`].
    pub fn seeded(&self, shard: ShardId, peer: u64, index: u64) -> Result<(), RequestError> {
        self.send(Input::Seeded { shard, peer, index })
    }

    /// `shard`'s configuration here and, on its leader, its members'
    /// progress ([`Driver::membership`]).
    ///
    /// # Errors
    /// As [`Mailbox::propose`].
    pub fn membership(
        &self,
        shard: ShardId,
    ) -> Result<oneshot::Receiver<Option<super::driver::GroupMembership>>, RequestError> {
        self.ask(|reply| Input::Membership { shard, reply })
    }

    /// Sends the input `make` builds around a reply channel; returns
    /// where the answer arrives.
    fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Input<R>,
    ) -> Result<oneshot::Receiver<T>, RequestError> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply))?;
        Ok(rx)
    }

    fn send(&self, input: Input<R>) -> Result<(), RequestError> {
        self.tx.try_send(input).map_err(|e| match e {
            TrySendError::Full(_) => RequestError::Busy {
                capacity: self.capacity,
            },
            TrySendError::Disconnected(_) => RequestError::Stopped,
        })
    }

    /// Hands a peer's frame to the loop; returns false when it was dropped
    /// (mailbox full, or the loop is gone): Raft resends what matters.
    pub fn deliver(&self, frame: Vec<Envelope>) -> bool {
        self.tx.try_send(Input::Frame(frame)).is_ok()
    }
}

/// What a loop publishes after each round, for readers on other threads
/// (the request path's leadership check, status, metrics): each group's
/// leader, term and applied index, and the driver's counters.
#[derive(Debug, Default)]
pub struct LoopView {
    groups: dashmap::DashMap<ShardId, GroupView>,
    stats: std::sync::Mutex<DriverStats>,
    snapshot_requests: super::store::SnapshotRequests,
}

impl LoopView {
    /// `shard`'s replica as of the last round (`None`: not open here).
    pub fn group(&self, shard: ShardId) -> Option<GroupView> {
        self.groups.get(&shard).map(|g| *g)
    }

    /// The groups open here, in id order.
    pub fn shards(&self) -> Vec<ShardId> {
        let mut ids: Vec<ShardId> = self.groups.iter().map(|e| *e.key()).collect();
        ids.sort();
        ids
    }

    /// The followers raft-rs asked a snapshot for since the last call
    /// (group, peer): they need entries their leader here compacted.
    pub fn take_snapshot_requests(&self) -> Vec<(ShardId, u64)> {
        let mut w = self
            .snapshot_requests
            .lock()
            .expect("snapshot requests poisoned");
        std::mem::take(&mut *w).into_iter().collect()
    }

    /// The driver's counters as of the last round.
    pub fn stats(&self) -> DriverStats {
        *self.stats.lock().expect("loop stats poisoned")
    }

    fn forget(&self, shard: ShardId) {
        self.groups.remove(&shard);
    }

    fn publish(&self, driver: &Driver, shard: ShardId) {
        if let Some(v) = driver.view(shard) {
            self.groups.insert(shard, v);
        }
    }
}

/// A running loop: its thread and its mailbox.
pub struct NodeLoop<R> {
    mailbox: Mailbox<R>,
    view: Arc<LoopView>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<DriverStats, DriverError>>>,
}

struct Pending<R> {
    at: Proposed,
    reply: ProposalReply<R>,
}

struct State<O, A: Applier> {
    driver: Driver,
    outbound: O,
    applier: A,
    pending: HashMap<ShardId, VecDeque<Pending<A::Response>>>,
    reads: Reads,
    view: Arc<LoopView>,
    /// The counters last published to `view`.
    published: DriverStats,
}

/// Reads in their three stages: asked this pass (one read index per group
/// per round serves them all), waiting for the quorum's confirmation, and
/// confirmed but waiting for the apply to reach their index.
#[derive(Default)]
struct Reads {
    asked: HashMap<ShardId, Vec<Reply>>,
    confirming: HashMap<u64, (ShardId, Vec<Reply>)>,
    applying: HashMap<ShardId, Vec<(u64, Vec<Reply>)>>,
    next_ctx: u64,
}

impl Reads {
    /// Issues one read index per group asked this pass. A new leader that
    /// has not committed in its term yet keeps its reads for a later pass
    /// (its first entry commits within a round trip, or it stops leading
    /// and they fail below).
    fn issue(&mut self, driver: &mut Driver) {
        let asked = std::mem::take(&mut self.asked);
        for (shard, replies) in asked {
            if driver.is_leader(shard) && !driver.can_read(shard) {
                self.asked.insert(shard, replies);
                continue;
            }
            self.next_ctx += 1;
            match driver.read_index(shard, self.next_ctx) {
                Ok(()) => {
                    self.confirming.insert(self.next_ctx, (shard, replies));
                }
                Err(e) => {
                    // One error per waiting read (`DriverError` is not
                    // `Clone`: raft-rs's error inside it is not).
                    let answer = || match &e {
                        DriverError::NotLeader { shard, leader } => {
                            RequestError::Driver(DriverError::NotLeader {
                                shard: *shard,
                                leader: *leader,
                            })
                        }
                        DriverError::UnknownGroup { shard } => {
                            RequestError::Driver(DriverError::UnknownGroup { shard: *shard })
                        }
                        other => RequestError::Unavailable {
                            shard,
                            reason: other.to_string(),
                        },
                    };
                    for r in replies {
                        let _ = r.send(Err(answer()));
                    }
                }
            }
        }
    }

    /// Takes a round's confirmations, and answers the confirmed reads whose
    /// index the replica has applied (the round's applies are reported to
    /// `driver` before this).
    fn after_round(&mut self, driver: &Driver, round: &super::driver::Round) {
        for (shard, ctx, index) in &round.reads {
            if let Some((s, replies)) = self.confirming.remove(ctx) {
                debug_assert_eq!(s, *shard);
                self.applying
                    .entry(*shard)
                    .or_default()
                    .push((*index, replies));
            }
        }
        for (shard, waiting) in &mut self.applying {
            let applied = driver.applied_index(*shard).unwrap_or(0);
            waiting.retain_mut(|(index, replies)| {
                if *index > applied {
                    return true;
                }
                for r in replies.drain(..) {
                    let _ = r.send(Ok(*index));
                }
                false
            });
        }
        self.applying.retain(|_, w| !w.is_empty());
    }

    /// `shard`'s replica stopped leading: it cannot confirm what it asked
    /// for, so those reads fail (nothing happened; the client retries at the
    /// leader). Confirmed ones stay valid and wait for the apply.
    fn deposed(&mut self, shard: ShardId, leader: Option<u64>) {
        let lost: Vec<u64> = self
            .confirming
            .iter()
            .filter(|(_, (s, _))| *s == shard)
            .map(|(c, _)| *c)
            .collect();
        for ctx in lost {
            let (_, replies) = self.confirming.remove(&ctx).expect("listed");
            for r in replies {
                let _ = r.send(Err(RequestError::Driver(DriverError::NotLeader {
                    shard,
                    leader,
                })));
            }
        }
    }

    /// `shard`'s group was closed: its reads, at any stage, fail.
    fn closed(&mut self, shard: ShardId) {
        let mut failed = self.asked.remove(&shard).unwrap_or_default();
        let ctxs: Vec<u64> = self
            .confirming
            .iter()
            .filter(|(_, (s, _))| *s == shard)
            .map(|(c, _)| *c)
            .collect();
        for ctx in ctxs {
            failed.extend(self.confirming.remove(&ctx).expect("listed").1);
        }
        for (_, replies) in self.applying.remove(&shard).unwrap_or_default() {
            failed.extend(replies);
        }
        for r in failed {
            let _ = r.send(Err(RequestError::Stopped));
        }
    }

    fn fail_all(&mut self) {
        let confirming = self.confirming.drain().map(|(_, (_, r))| r);
        let applying = self
            .applying
            .drain()
            .flat_map(|(_, w)| w.into_iter().map(|(_, r)| r));
        let asked = self.asked.drain().map(|(_, r)| r);
        for r in confirming.chain(applying).chain(asked).flatten() {
            let _ = r.send(Err(RequestError::Stopped));
        }
    }
}

impl<O: Outbound, A: Applier> State<O, A> {
    fn take(&mut self, input: Input<A::Response>) {
        match input {
            Input::Propose { shard, data, reply } => match self.driver.propose(shard, data) {
                Ok(at) => self
                    .pending
                    .entry(shard)
                    .or_default()
                    .push_back(Pending { at, reply }),
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            },
            Input::Read { shard, reply } => {
                self.reads.asked.entry(shard).or_default().push(reply);
            }
            Input::Campaign(shard) => {
                if let Err(e) = self.driver.campaign(shard) {
                    tracing::debug!(error = %e, "campaign not started");
                }
            }
            Input::WakeLedBy(leader) => {
                let woke = self.driver.wake_led_by(leader);
                if woke > 0 {
                    tracing::info!(
                        leader,
                        groups = woke,
                        "groups led by a node that went away woke"
                    );
                }
            }
            Input::Transfer { shard, to, reply } => {
                let _ = reply.send(
                    self.driver
                        .transfer_leader(shard, to)
                        .map_err(RequestError::from),
                );
            }
            Input::ConfChange { shard, cc, reply } => {
                match self.driver.propose_conf_change(shard, cc) {
                    Ok(at) => self
                        .pending
                        .entry(shard)
                        .or_default()
                        .push_back(Pending { at, reply }),
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Input::Open { shard, reply } => {
                if self.driver.store(shard).is_some() {
                    let _ = reply.send(Ok(()));
                    return;
                }
                let opened = self
                    .applier
                    .open(shard)
                    .map_err(|e| e.to_string())
                    .and_then(|applied| {
                        self.driver
                            .open_group(shard, applied)
                            .map_err(|e| e.to_string())
                    });
                if opened.is_ok() {
                    self.view.publish(&self.driver, shard);
                    tracing::info!(%shard, "group opened");
                } else {
                    self.applier.remove(shard);
                }
                let _ = reply.send(opened);
            }
            Input::Membership { shard, reply } => {
                let _ = reply.send(self.driver.membership(shard));
            }
            Input::Seeded { shard, peer, index } => self.driver.seeded(shard, peer, index),
            Input::Close { shard, reply } => {
                let was_open = self.driver.close_group(shard);
                self.applier.remove(shard);
                self.view.forget(shard);
                self.reads.closed(shard);
                for p in self.pending.remove(&shard).into_iter().flatten() {
                    let _ = p.reply.send(Err(RequestError::Stopped));
                }
                if was_open {
                    tracing::info!(%shard, "group closed");
                }
                let _ = reply.send(was_open);
            }
            Input::Frame(frame) => {
                if self.cut_off() {
                    return;
                }
                for env in frame {
                    // A message for a group not here (removed, or not yet
                    // created) is dropped: its sender retries or gives up.
                    match self.driver.step(env) {
                        Ok(()) => {}
                        Err(e @ DriverError::Refused { .. }) => {
                            tracing::warn!(error = %e, "raft message from a peer refused");
                        }
                        Err(e) => tracing::debug!(error = %e, "raft message dropped"),
                    }
                }
            }
        }
    }

    /// The failpoint `multiraft::drop_frames_to` (tests, `failpoints`
    /// feature): peers' frames to this node are dropped, as a partition
    /// would. Its argument, when given, names the node cut off
    /// (`return(3)`: node 3's only); without one every node is.
    #[allow(unreachable_code, clippy::needless_return)]
    fn cut_off(&self) -> bool {
        fail::fail_point!("multiraft::drop_frames_to", |target: Option<String>| {
            target.is_none_or(|t| t == self.driver.id().to_string())
        });
        false
    }

    /// One round: the leader's appends leave; the round's committed entries
    /// are applied and their proposers answered before the round's log
    /// write (they were written here in earlier rounds and are committed,
    /// so neither waits for this round's sync); then the log write, synced;
    /// then the messages that waited for it (a follower's
    /// acknowledgements) leave.
    fn round(&mut self) -> Result<(), DriverError> {
        self.reads.issue(&mut self.driver);
        let (mut round, write) = self.driver.begin_round();
        // A leader's appends reach its followers while it writes its own
        // copy, so the syncs overlap.
        for (to, frame) in std::mem::take(&mut round.messages) {
            self.outbound.send(to, frame);
        }
        self.apply(&round)?;
        let written = write.write()?;
        self.driver.finish_round(&mut round, written);
        self.reads.after_round(&self.driver, &round);
        for shard in &round.roles {
            if self.driver.is_leader(*shard) {
                continue;
            }
            self.reads.deposed(*shard, self.driver.leader(*shard));
            // It cannot tell whether its pending proposals will commit (a new
            // leader may have them): they are answered now as of unknown
            // outcome rather than at the caller's deadline; a client retries
            // them with its session stamp.
            for p in self.pending.remove(shard).into_iter().flatten() {
                let _ = p.reply.send(Err(RequestError::Unknown {
                    shard: *shard,
                    index: p.at.index,
                }));
            }
        }
        for shard in round
            .roles
            .iter()
            .chain(&round.compacted)
            .chain(round.committed.iter().map(|(s, _)| s))
        {
            self.view.publish(&self.driver, *shard);
        }
        let stats = self.driver.stats();
        if stats != self.published {
            // Ticks change counters too (groups falling asleep).
            *self.view.stats.lock().expect("loop stats poisoned") = stats;
            self.published = stats;
        }
        for (to, frame) in round.messages {
            self.outbound.send(to, frame);
        }
        Ok(())
    }

    /// Applies `round`'s committed entries, answers the proposals they
    /// settle and reports the applied indexes to the driver.
    fn apply(&mut self, round: &super::driver::Round) -> Result<(), DriverError> {
        if round.committed.is_empty() {
            return Ok(());
        }
        // Configuration changes take effect in raft-rs as they are applied;
        // the applier gets each as the configuration it made (a
        // `ConfState`), which the state machine persists with the apply.
        let converted;
        let committed = if round.committed.iter().any(|(_, es)| {
            es.iter()
                .any(|e| e.get_entry_type() == raft::eraftpb::EntryType::EntryConfChange)
        }) {
            converted = self.conf_changes_applied(&round.committed)?;
            &converted
        } else {
            &round.committed
        };
        let responses = self.applier.apply(committed)?;
        assert_eq!(
            responses.len(),
            round.committed.len(),
            "one response list per group"
        );
        for ((shard, entries), responses) in round.committed.iter().zip(responses) {
            settle(self.pending.get_mut(shard), *shard, entries, responses);
            let last = entries.last().expect("committed lists are not empty");
            self.driver.applied(*shard, last.index)?;
        }
        // A split's child starts here once its parent applied the split
        // (its state went into that apply's write, which precedes this
        // round's synced log write: nothing it sends can outrun it).
        for (child, applied) in self.applier.take_created()? {
            match self.driver.open_group(child, applied) {
                Ok(()) => {
                    self.view.publish(&self.driver, child);
                    tracing::info!(shard = %child, applied, "group created by a split started");
                }
                // Not fatal to the others: the replica opens with the
                // node's next start, and the group's other replicas go on.
                Err(e) => {
                    tracing::error!(shard = %child, error = %e, "group created by a split not started");
                }
            }
        }
        Ok(())
    }

    /// `committed` with each configuration change applied to raft-rs and
    /// its entry's data replaced by the configuration it made.
    fn conf_changes_applied(
        &mut self,
        committed: &[(ShardId, Vec<Entry>)],
    ) -> Result<Vec<(ShardId, Vec<Entry>)>, DriverError> {
        use protobuf::Message as _;
        let mut out = Vec::with_capacity(committed.len());
        for (shard, entries) in committed {
            let mut es = entries.clone();
            for e in &mut es {
                if e.get_entry_type() != raft::eraftpb::EntryType::EntryConfChange {
                    continue;
                }
                let cc = raft::eraftpb::ConfChange::parse_from_bytes(&e.data).map_err(|err| {
                    DriverError::Store(StoreError::corrupt(
                        format!("entry {} of {shard}", e.index),
                        err,
                    ))
                })?;
                match self.driver.apply_conf_change(*shard, &cc) {
                    Ok(conf) => {
                        tracing::info!(%shard, index = e.index, voters = ?conf.voters, learners = ?conf.learners, "configuration changed");
                        e.data = conf
                            .write_to_bytes()
                            .expect("protobuf encoding into memory")
                            .into();
                    }
                    // raft-rs refuses the same change on every replica (its
                    // checks depend on the log alone): a no-op everywhere.
                    Err(DriverError::Raft { source, .. }) => {
                        tracing::warn!(%shard, index = e.index, error = %source, "configuration change refused; applied as empty");
                        e.set_entry_type(raft::eraftpb::EntryType::EntryNormal);
                        e.data = Vec::new().into();
                    }
                    Err(other) => return Err(other),
                }
            }
            out.push((*shard, es));
        }
        Ok(out)
    }

    fn fail_all(&mut self) {
        self.reads.fail_all();
        for (_, q) in self.pending.drain() {
            for p in q {
                let _ = p.reply.send(Err(RequestError::Stopped));
            }
        }
    }
}

/// Acknowledges the proposals `entries` settle: one applied at its index in
/// its own term succeeded (with its response); one whose index holds another
/// term was replaced.
fn settle<R>(
    pending: Option<&mut VecDeque<Pending<R>>>,
    shard: ShardId,
    entries: &[Entry],
    responses: Vec<R>,
) {
    let Some(q) = pending else {
        return;
    };
    assert_eq!(entries.len(), responses.len(), "one response per entry");
    for (e, resp) in entries.iter().zip(responses) {
        let mut resp = Some(resp);
        while q.front().is_some_and(|p| p.at.index <= e.index) {
            let p = q.pop_front().expect("checked");
            let r = if p.at.index == e.index && p.at.term == e.term {
                Ok((e.index, resp.take().expect("one proposal per index")))
            } else {
                Err(RequestError::Replaced {
                    shard,
                    index: p.at.index,
                })
            };
            let _ = p.reply.send(r);
        }
    }
}

impl<R: Send + 'static> NodeLoop<R> {
    /// Starts the loop on its own thread.
    ///
    /// # Errors
    /// The OS's, when the thread cannot be spawned.
    pub fn start<O: Outbound, A: Applier<Response = R>>(
        driver: Driver,
        outbound: O,
        applier: A,
        config: LoopConfig,
    ) -> std::io::Result<NodeLoop<R>> {
        let capacity = config.mailbox;
        let (tx, rx) = mpsc::sync_channel(capacity);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let name = format!("tessera-raft-{}", driver.id());
        let view = Arc::new(LoopView {
            snapshot_requests: driver.snapshot_requests(),
            ..LoopView::default()
        });
        for shard in driver.shards() {
            view.publish(&driver, shard);
        }
        let mut state = State {
            driver,
            outbound,
            applier,
            pending: HashMap::new(),
            reads: Reads::default(),
            view: view.clone(),
            published: DriverStats::default(),
        };
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let r = run(&mut state, &rx, &stop2, &config);
            state.fail_all();
            if let Err(e) = &r {
                tracing::error!(error = %e, "raft loop stopped");
            }
            r.map(|()| state.driver.stats())
        })?;
        Ok(NodeLoop {
            mailbox: Mailbox { tx, capacity },
            view,
            stop,
            thread: Some(thread),
        })
    }

    /// A handle to propose and deliver frames.
    pub fn mailbox(&self) -> Mailbox<R> {
        self.mailbox.clone()
    }

    /// What the loop publishes of its groups.
    pub fn view(&self) -> Arc<LoopView> {
        self.view.clone()
    }

    /// Stops the loop (pending proposals get [`RequestError::Stopped`]) and
    /// returns its driver's counters, or the error that stopped it before.
    ///
    /// # Errors
    /// The storage error that stopped the loop.
    pub fn stop(mut self) -> Result<DriverStats, DriverError> {
        self.halt()
            .expect("joined once")
            .expect("raft loop panicked")
    }
}

impl<R> NodeLoop<R> {
    /// Tells the thread to stop, wakes it if it waits for input (a full
    /// mailbox wakes it anyway), and joins it; `None` once joined.
    fn halt(&mut self) -> Option<std::thread::Result<Result<DriverStats, DriverError>>> {
        let t = self.thread.take()?;
        self.stop.store(true, Ordering::Release);
        let _ = self.mailbox.tx.try_send(Input::Frame(Vec::new()));
        Some(t.join())
    }
}

impl<R> Drop for NodeLoop<R> {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

fn run<O: Outbound, A: Applier>(
    state: &mut State<O, A>,
    rx: &mpsc::Receiver<Input<A::Response>>,
    stop: &AtomicBool,
    config: &LoopConfig,
) -> Result<(), DriverError> {
    let mut next_tick = Instant::now() + config.tick;
    while !stop.load(Ordering::Acquire) {
        // Wait for input only when no group has work left over.
        let wait = if state.driver.has_work() {
            Duration::ZERO
        } else {
            next_tick.saturating_duration_since(Instant::now())
        };
        match rx.recv_timeout(wait) {
            Ok(input) => state.take(input),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
        for _ in 1..config.inputs_per_round {
            match rx.try_recv() {
                Ok(input) => state.take(input),
                Err(_) => break,
            }
        }
        let now = Instant::now();
        if now >= next_tick {
            state.driver.tick();
            next_tick = now + config.tick;
        }
        state.round()?;
    }
    Ok(())
}
