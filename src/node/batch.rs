//! Data shards on the batch system ([`crate::multiraft`]): one Raft loop
//! thread per node steps every such shard's group together (one synced
//! RocksDB write per round for all of them, one frame per peer), applies to
//! the same [`crate::storage::StateMachine`] as openraft's groups, and
//! serves the same client requests.
//!
//! Which system a shard runs on is decided once, when it is created, and
//! recorded with it: a shard with batch-system Raft state
//! ([`GroupStore::exists`]) runs here, any other on openraft. A node opens
//! both kinds it finds, whatever its configuration says;
//! `raft.batch_data_shards` only chooses what a bootstrap creates.
//!
//! Splits work (the child's group starts on every replica as it applies
//! the split: [`crate::multiraft::GroupStore::stage_split_child`]), and
//! merges (the right shard's group is closed in the loop before its
//! replica is dropped: [`BatchShards::close`]), and replica moves (the
//! target seeded with a snapshot: [`BatchShards::install_seed`]).
//! Leader transfers work, and
//! idle groups sleep (quiescence, as `raft.quiesce_after_ms` says). Logs are compacted up to what every
//! voter holds (no snapshots yet: while a voter is down, its groups' logs
//! grow until it returns).

use super::*;
use crate::api::ApiError;
use crate::command::{Command, CommandResponse};
use crate::multiraft::quic::{FrameCounters, FrameInbound, QuicOutbound};
use crate::multiraft::{
    encode_command, Driver, DriverConfig, DriverError, DriverStats, GroupStore, GroupView,
    LoopConfig, LoopView, Mailbox, NodeLoop, RequestError, ShardApplier,
};

/// How long a request waits for the loop's answer (a proposal's commit and
/// apply, a read point's confirmation) before it is answered unavailable.
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);

/// How long one frame may take to reach a peer.
const FRAME_DEADLINE: Duration = Duration::from_secs(5);

/// How long a leader transfer may take before it is reported as failed.
const TRANSFER_WAIT: Duration = Duration::from_secs(10);

/// How long a split waits for its new shard's group to open and elect.
const SPLIT_CHILD_WAIT: Duration = Duration::from_secs(10);

/// How often a split's new shard is campaigned for while it has no leader.
const CAMPAIGN_AGAIN: Duration = Duration::from_millis(300);

/// Shards created at once by a bootstrap (their descriptors share the
/// group commit's syncs).
const CREATES_IN_FLIGHT: usize = 64;

/// A node's batch-system shards: the loop, its mailbox and what it
/// publishes.
pub(crate) struct BatchShards {
    mailbox: Mailbox<CommandResponse>,
    view: Arc<LoopView>,
    inbound: FrameInbound,
    counters: Arc<FrameCounters>,
    running: std::sync::Mutex<Option<NodeLoop<CommandResponse>>>,
    /// Seeds installed here (move targets and lagging replicas).
    seeds_installed: std::sync::atomic::AtomicU64,
}

/// The loop's timings from the node's Raft timings: a tick of half the
/// heartbeat interval, heartbeats every two ticks, elections after
/// `election_timeout_ms_min` (raft-rs randomises up to twice that). Logs
/// are compacted as openraft's are purged: once `snapshot_logs_since_last`
/// entries can go, keeping `snapshot_logs_to_keep`. With quiescence on
/// (`quiesce_after_ms`), a group whose leader was settled that long stops
/// ticking on every replica; the node's liveness pings (`quiesce::run`)
/// wake the groups of a leader that went away.
fn timings(t: &RaftTimings) -> (Duration, DriverConfig) {
    let tick_ms = (t.heartbeat_interval_ms / 2).max(5);
    let config = DriverConfig {
        heartbeat_ticks: 2,
        election_ticks: (t.election_timeout_ms_min / tick_ms).max(4) as usize,
        compact_every: t.snapshot_logs_since_last,
        compact_keep: t.snapshot_logs_to_keep,
        // A voter further behind than two compactions' worth is seeded
        // with a snapshot rather than hold every log of its groups back.
        compact_lag_max: t.snapshot_logs_since_last.saturating_mul(2),
        sleep_after_ticks: t.quiesce_after_ms.div_ceil(tick_ms) as usize,
        ..DriverConfig::default()
    };
    (Duration::from_millis(tick_ms), config)
}

impl BatchShards {
    /// Creates the records of the shards in `descs` that are not complete
    /// here yet: their Raft state first (one synced write per voter set),
    /// then the shard itself (descriptor and state machine). Safe to run
    /// again after a crash halfway: a shard with Raft state but no
    /// descriptor is not hosted, and gets its descriptor on the next run.
    pub(super) async fn create(
        engine: &Engine,
        descs: &[ShardDescriptor],
    ) -> Result<(), NodeError> {
        let mut by_voters: BTreeMap<Vec<u64>, Vec<ShardId>> = BTreeMap::new();
        for d in descs {
            if !GroupStore::exists(engine, d.id)? {
                let voters = d.replicas.iter().map(|n| n.0).collect();
                by_voters.entry(voters).or_default().push(d.id);
            }
        }
        for (voters, shards) in by_voters {
            GroupStore::bootstrap_many(engine, &shards, &voters)?;
        }
        for chunk in descs.chunks(CREATES_IN_FLIGHT) {
            let created =
                futures_util::future::join_all(chunk.iter().map(|d| engine.create_shard(d))).await;
            for r in created {
                match r {
                    Ok(()) | Err(StoreError::ShardExists { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Opens `shards` (each with batch-system state and a descriptor here)
    /// and starts the loop.
    pub(super) fn start(
        engine: &Engine,
        me: NodeId,
        shards: &[ShardId],
        transport: Transport,
        t: &RaftTimings,
    ) -> Result<BatchShards, NodeError> {
        let (tick, config) = timings(t);
        let mut driver = Driver::new(engine.clone(), me.0, config);
        let mut applier = ShardApplier::new(engine.clone());
        let raft_error = |shard: ShardId, e: DriverError| NodeError::Raft {
            shard,
            reason: e.to_string(),
        };
        for &shard in shards {
            let (_log, machine) = engine.open_shard(shard)?;
            let applied = applier.add(shard, machine);
            driver
                .open_group(shard, applied)
                .map_err(|e| raft_error(shard, e))?;
        }
        let outbound =
            QuicOutbound::new(transport, tokio::runtime::Handle::current(), FRAME_DEADLINE);
        let counters = outbound.counters();
        let running = NodeLoop::start(
            driver,
            outbound,
            applier,
            LoopConfig {
                tick,
                ..LoopConfig::default()
            },
        )
        .map_err(|e| NodeError::Raft {
            shard: crate::multiraft::quic::FRAME_SHARD,
            reason: format!("the raft loop thread: {e}"),
        })?;
        let inbound = FrameInbound::default();
        inbound.attach(running.mailbox());
        tracing::info!(node = %me, shards = shards.len(), "batch-system shards started");
        Ok(BatchShards {
            mailbox: running.mailbox(),
            view: running.view(),
            inbound,
            counters,
            running: std::sync::Mutex::new(Some(running)),
            seeds_installed: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Spreads leadership as the descriptors' leader hints say (the
    /// bootstrap hands them out round robin): once the peers' links are up,
    /// this node campaigns for each shard of `hinted` that has no leader
    /// yet, again every `every` while one still has none, for `rounds`
    /// rounds. Best effort: a shard that elected someone else keeps that
    /// leader (pre-vote cannot depose a live one), and the election timers
    /// elect a leader anyway.
    pub(super) async fn campaign_hinted(
        self: Arc<Self>,
        transport: Transport,
        hinted: Vec<ShardId>,
        every: Duration,
        rounds: usize,
    ) {
        let _ = transport.wait_connected(Duration::from_secs(30)).await;
        for _ in 0..rounds {
            let leaderless: Vec<ShardId> = hinted
                .iter()
                .copied()
                .filter(|s| self.group(*s).is_some_and(|g| g.leader.is_none()))
                .collect();
            if leaderless.is_empty() {
                return;
            }
            for s in leaderless {
                if self.mailbox.campaign(s).is_err() {
                    return;
                }
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Wakes the groups sleeping here under `leader` (found down or
    /// restarted by the liveness pings); best effort: a full mailbox drops
    /// it, and the next ping round asks again only on a change, so the
    /// election timers of a follower that missed it start with its next
    /// message.
    pub(super) fn wake_led_by(&self, leader: NodeId) {
        if let Err(e) = self.mailbox.wake_led_by(leader.0) {
            tracing::warn!(%leader, error = %e, "batch groups not woken");
        }
    }

    /// Whether `shard` runs here on the batch system.
    pub(super) fn hosts(&self, shard: ShardId) -> bool {
        self.view.group(shard).is_some()
    }

    /// `shard`'s replica as of the loop's last round.
    pub(super) fn group(&self, shard: ShardId) -> Option<GroupView> {
        self.view.group(shard)
    }

    /// The shards open here, in id order.
    pub(super) fn shards(&self) -> Vec<ShardId> {
        self.view.shards()
    }

    /// `shard`'s replica here, which must lead (for an admin step).
    ///
    /// # Errors
    /// [`AdminError::UnknownShard`] when it is not here,
    /// [`AdminError::NotLeader`] with the leader it knows otherwise.
    pub(super) fn leading(&self, shard: ShardId) -> Result<GroupView, AdminError> {
        let g = self
            .group(shard)
            .ok_or(AdminError::UnknownShard { shard })?;
        if !g.leading {
            return Err(AdminError::NotLeader {
                shard,
                hint: g.leader.map(NodeId),
            });
        }
        Ok(g)
    }

    /// The shards this node leads, in id order.
    pub(super) fn led(&self) -> Vec<ShardId> {
        self.view
            .shards()
            .into_iter()
            .filter(|s| self.group(*s).is_some_and(|g| g.leading))
            .collect()
    }

    /// Waits for the group of `child`, created here by a split this node's
    /// replica of the parent applied, to open, then campaigns for it here
    /// until it has a leader (its first leader is the parent's, as with
    /// openraft's splits). Errors when the group did not open in
    /// [`SPLIT_CHILD_WAIT`]; a child still without a leader then is left
    /// to its election timers.
    pub(super) async fn elect_split_child(&self, child: ShardId) -> Result<(), AdminError> {
        let deadline = tokio::time::Instant::now() + SPLIT_CHILD_WAIT;
        let mut campaigned: Option<tokio::time::Instant> = None;
        loop {
            let now = tokio::time::Instant::now();
            match self.group(child) {
                Some(g) if g.leader.is_some() => return Ok(()),
                Some(_) if campaigned.is_none_or(|at| now - at >= CAMPAIGN_AGAIN) => {
                    if let Err(e) = self.mailbox.campaign(child) {
                        tracing::debug!(shard = %child, error = %e, "campaign not asked");
                    }
                    campaigned = Some(now);
                }
                Some(_) | None => {}
            }
            if now >= deadline {
                return match self.group(child) {
                    None => Err(AdminError::Unavailable {
                        shard: child,
                        reason: "the new shard's group did not start".into(),
                    }),
                    Some(_) => {
                        tracing::warn!(shard = %child, "split: the new shard has no leader yet; its election timers go on");
                        Ok(())
                    }
                };
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Tells the loop that member `peer` of `shard` (led here) was seeded
    /// at `index`: its leader replicates to it from there.
    pub(super) fn seeded(&self, shard: ShardId, peer: NodeId, index: u64) {
        if let Err(e) = self.mailbox.seeded(shard, peer.0, index) {
            tracing::warn!(%shard, %peer, error = %e, "seed not reported to the loop");
        }
    }

    /// Seeds installed here since the node started.
    pub(super) fn seeds_installed(&self) -> u64 {
        self.seeds_installed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The driver's counters (rounds, syncs, appends) and the frames sent.
    pub(super) fn stats(&self) -> (DriverStats, &FrameCounters) {
        (self.view.stats(), &self.counters)
    }

    /// Where peers' frames arrive.
    pub(super) fn inbound(&self) -> &FrameInbound {
        &self.inbound
    }

    /// Proposes `cmd` to `shard`; answers what applying it answered, once
    /// it is committed and applied here.
    pub(super) async fn propose(
        &self,
        shard: ShardId,
        cmd: &Command,
    ) -> Result<(u64, CommandResponse), ApiError> {
        let rx = self
            .mailbox
            .propose(shard, encode_command(cmd))
            .map_err(|e| api_error(shard, e))?;
        answer(shard, rx).await
    }

    /// [`BatchShards::propose`] on a replica that must lead `shard` (an
    /// admin proposal forwarded here), refused as a peer request is.
    pub(super) async fn propose_led(
        &self,
        shard: ShardId,
        cmd: &Command,
    ) -> Result<CommandResponse, crate::raft::rpc::Refusal> {
        use crate::raft::rpc::Refusal;
        let g = self.group(shard).ok_or(Refusal::UnknownShard(shard))?;
        if !g.leading {
            return Err(Refusal::NotLeader(g.leader.map(NodeId)));
        }
        match self.propose(shard, cmd).await {
            Ok((_, r)) => Ok(r),
            Err(ApiError::NotLeader { leader_hint, .. }) => Err(Refusal::NotLeader(leader_hint)),
            Err(ApiError::UnknownShard { .. }) => Err(Refusal::UnknownShard(shard)),
            Err(e) => Err(Refusal::Failed(e.to_string())),
        }
    }

    /// Closes `shard`'s group here (its replica is being dropped): once
    /// this returns, nothing of it runs in the loop and its state machine
    /// is closed. Whether it was open.
    pub(super) async fn close(&self, shard: ShardId) -> Result<bool, NodeError> {
        let failed = |reason: String| NodeError::Raft { shard, reason };
        let rx = self
            .mailbox
            .close(shard)
            .map_err(|e| failed(e.to_string()))?;
        loop_answer(rx).await.map_err(failed)
    }

    /// Seeds this node's replica of `shard` (a move's target) with a
    /// snapshot of the group's state machine: the group is closed, the
    /// snapshot installed (the group's Raft state, a log starting after
    /// it, goes in the install's last write), and the group opened again.
    pub(super) async fn install_seed(
        &self,
        engine: &Engine,
        shard: ShardId,
        meta: crate::raft::SnapshotMeta,
        data: crate::raft::SnapshotData,
    ) -> Result<(), crate::raft::rpc::Refusal> {
        use crate::raft::rpc::Refusal;
        use openraft::storage::RaftStateMachine as _;
        let failed = |e: String| Refusal::Failed(format!("seeding {shard}: {e}"));
        // Never backwards: a replica whose log reaches the snapshot's
        // position keeps its state and its log (a seed empties the log,
        // and entries past the seed it may have acknowledged must stay).
        let at = meta.last_log_id.map_or(0, |l| l.index);
        if let Some(g) = self.group(shard) {
            if g.applied >= at || g.log_last >= at {
                tracing::info!(%shard, applied = g.applied, log_last = g.log_last, seed = at, "seed not needed: the replica's log reaches it");
                return Ok(());
            }
        }
        // Opening the state machine below clears its snapshot folder of
        // every file but its current snapshot's: the received file waits
        // outside it.
        let received = data.path().to_path_buf();
        let held = engine
            .shard_snapshot_dir(shard)
            .with_file_name(format!("seed-{shard}-{}.snap", std::process::id()));
        std::fs::rename(&received, &held)
            .map_err(|e| failed(format!("{}: {e}", held.display())))?;
        let data = crate::raft::SnapshotData::from_file(held.clone());
        self.close(shard).await.map_err(|e| failed(e.to_string()))?;
        let installed = async {
            // The loop lets go of the state machine as it closes the group.
            let started = tokio::time::Instant::now();
            let (_log, mut machine) = loop {
                match engine.open_shard(shard) {
                    Ok(stores) => break stores,
                    Err(StoreError::ShardOpen { .. })
                        if started.elapsed() < Duration::from_secs(10) =>
                    {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => return Err(failed(e.to_string())),
                }
            };
            machine
                .install_snapshot(&meta, data)
                .await
                .map_err(|e| failed(e.to_string()))
        }
        .await;
        if let Err(e) = std::fs::remove_file(&held) {
            tracing::warn!(%shard, file = %held.display(), error = %e, "seed file not removed");
        }
        // Opened again whatever happened: a failed install leaves the
        // replica as it was (the install resumes at its next open).
        let opened = self.open(shard).await;
        installed?;
        opened.map_err(|e| failed(e.to_string()))?;
        self.seeds_installed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(%shard, at = ?meta.last_log_id, "replica seeded");
        Ok(())
    }

    /// The followers that need a snapshot of a group this node leads, as
    /// raft-rs asked since the last call (group, peer).
    pub(super) fn take_snapshot_requests(&self) -> Vec<(ShardId, NodeId)> {
        self.view
            .take_snapshot_requests()
            .into_iter()
            .filter(|(s, _)| self.group(*s).is_some_and(|g| g.leading))
            .map(|(s, p)| (s, NodeId(p)))
            .collect()
    }

    /// Opens `shard`'s group in the loop (its records are written here).
    pub(super) async fn open(&self, shard: ShardId) -> Result<(), NodeError> {
        let failed = |reason: String| NodeError::Raft { shard, reason };
        let rx = self
            .mailbox
            .open(shard)
            .map_err(|e| failed(e.to_string()))?;
        loop_answer(rx).await.and_then(|r| r).map_err(failed)
    }

    /// `shard`'s configuration here and, on its leader, how far each
    /// member's log matches.
    pub(super) async fn membership(
        &self,
        shard: ShardId,
    ) -> Result<crate::multiraft::GroupMembership, AdminError> {
        let unavailable = |reason: String| AdminError::Unavailable { shard, reason };
        let rx = self
            .mailbox
            .membership(shard)
            .map_err(|e| unavailable(e.to_string()))?;
        loop_answer(rx)
            .await
            .map_err(unavailable)?
            .ok_or(AdminError::UnknownShard { shard })
    }

    /// Proposes one configuration change of `shard` (led here) and waits
    /// until it is applied here.
    pub(super) async fn change_conf(
        &self,
        shard: ShardId,
        kind: raft::eraftpb::ConfChangeType,
        node: NodeId,
    ) -> Result<(), AdminError> {
        let cc = raft::eraftpb::ConfChange {
            change_type: kind,
            node_id: node.0,
            ..Default::default()
        };
        let rx =
            self.mailbox
                .propose_conf_change(shard, cc)
                .map_err(|e| AdminError::Unavailable {
                    shard,
                    reason: e.to_string(),
                })?;
        answer(shard, rx)
            .await
            .map(|_| ())
            .map_err(|e| admin_error(shard, e))
    }

    /// A linearizable read point of `shard`: once this returns, this
    /// node's state machine holds every write acknowledged before the call.
    pub(super) async fn read_barrier(&self, shard: ShardId) -> Result<u64, ApiError> {
        let rx = self
            .mailbox
            .read_index(shard)
            .map_err(|e| api_error(shard, e))?;
        answer(shard, rx).await
    }

    /// Hands leadership of `shard` (led by `me`) to voter `to` and waits
    /// until another node leads: done when it is `to`.
    pub(super) async fn transfer_leader(
        &self,
        me: NodeId,
        shard: ShardId,
        to: NodeId,
    ) -> Result<(), AdminError> {
        self.leading(shard)?;
        if to == me {
            return Ok(());
        }
        let unavailable = |reason: String| AdminError::Unavailable { shard, reason };
        let rx = self
            .mailbox
            .transfer_leader(shard, to.0)
            .map_err(|e| unavailable(e.to_string()))?;
        match tokio::time::timeout(ANSWER_DEADLINE, rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(RequestError::Driver(DriverError::Refused { reason, .. })))) => {
                return Err(AdminError::Refused(format!("{reason} of {shard}")));
            }
            Ok(Ok(Err(RequestError::Driver(DriverError::NotLeader { leader, .. })))) => {
                return Err(AdminError::NotLeader {
                    shard,
                    hint: leader.map(NodeId),
                });
            }
            Ok(Ok(Err(e))) => return Err(unavailable(e.to_string())),
            Ok(Err(_)) | Err(_) => return Err(unavailable("the raft loop did not answer".into())),
        }
        // The outcome, as the loop publishes it after its rounds.
        let deadline = tokio::time::Instant::now() + TRANSFER_WAIT;
        loop {
            let g = self
                .group(shard)
                .ok_or(AdminError::UnknownShard { shard })?;
            match g.leader {
                Some(l) if !g.leading && l == to.0 => return Ok(()),
                Some(l) if !g.leading => {
                    return Err(unavailable(format!(
                        "n{l} won the election instead of {to}"
                    )))
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(unavailable(format!(
                    "leadership did not move to {to} within {TRANSFER_WAIT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the loop (waiting requests are answered unavailable).
    pub(super) fn stop(&self) {
        let running = self.running.lock().expect("batch loop poisoned").take();
        if let Some(l) = running {
            if let Err(e) = l.stop() {
                tracing::error!(error = %e, "the raft loop had stopped on an error");
            }
        }
    }
}

/// Waits for the loop's answer to an admin step under
/// [`ANSWER_DEADLINE`]; why there is none otherwise.
async fn loop_answer<T>(rx: tokio::sync::oneshot::Receiver<T>) -> Result<T, String> {
    match tokio::time::timeout(ANSWER_DEADLINE, rx).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(_)) => Err("the raft loop stopped".into()),
        Err(_) => Err(format!(
            "the raft loop did not answer within {ANSWER_DEADLINE:?}"
        )),
    }
}

/// An admin step's refusal from the request path's: `NotLeader` keeps its
/// hint, anything else is `Unavailable`.
pub(super) fn admin_error(shard: ShardId, e: ApiError) -> AdminError {
    match e {
        ApiError::NotLeader { leader_hint, .. } => AdminError::NotLeader {
            shard,
            hint: leader_hint,
        },
        other => AdminError::Unavailable {
            shard,
            reason: other.to_string(),
        },
    }
}

/// Waits for the loop's answer under [`ANSWER_DEADLINE`].
async fn answer<T>(
    shard: ShardId,
    rx: tokio::sync::oneshot::Receiver<Result<T, RequestError>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(ANSWER_DEADLINE, rx).await {
        Ok(Ok(r)) => r.map_err(|e| api_error(shard, e)),
        Ok(Err(_)) => Err(api_error(shard, RequestError::Stopped)),
        Err(_) => Err(ApiError::Unavailable {
            shard,
            reason: format!("no answer from the raft loop within {ANSWER_DEADLINE:?}"),
        }),
    }
}

/// What a refusal tells the client. A write whose outcome is unknown (its
/// leader stepped down with it pending) is `Unavailable` like any other
/// retryable failure: the client retries it under its session stamp, which
/// applies it at most once.
fn api_error(shard: ShardId, e: RequestError) -> ApiError {
    match e {
        RequestError::Driver(DriverError::NotLeader { leader, .. }) => ApiError::NotLeader {
            shard,
            leader_hint: leader.map(NodeId),
        },
        RequestError::Driver(DriverError::UnknownGroup { .. }) => ApiError::UnknownShard { shard },
        other => ApiError::Unavailable {
            shard,
            reason: other.to_string(),
        },
    }
}
