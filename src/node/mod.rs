//! A Tessera node: one storage engine, one transport, and a registry of the
//! Raft groups of every shard replica it hosts.
//!
//! [`Node::start`] opens the data folder, binds the QUIC endpoint, resumes
//! every hosted shard, creates the bootstrap shards on a fresh folder, and
//! serves metrics. [`Node::shutdown`] stops the groups, closes connections
//! and closes RocksDB.

mod admin;
mod batch;
mod config;

pub(crate) mod load;
mod peers_file;
mod quiesce;
mod registry;
mod replica_gc;
mod serve_client;

pub use admin::AdminError;
pub use config::{
    ApiConfig, Bootstrap, ConfigError, NodeConfig, RaftTimings, RebalanceConfig, ReplicaGcConfig,
    SplitConfig,
};
pub use registry::Registry;
use registry::{NodeInbound, Slot};

use crate::meta;
use crate::metrics::{MetricsSnapshot, NetMetrics};
use crate::net::{
    Answer, ClientConn, Expedite, Expediter, Faults, Inbound, PeerAddr, Transport, TransportError,
    Wiring,
};
use crate::raft::network::NetworkFactory;
use crate::raft::rpc::{self, PeerRequest, PeerResponse, Refusal, SnapshotHead, SnapshotReply};
use crate::raft::{SnapshotData, SnapshotMeta, Vote};
use crate::storage::{Engine, StoreError};
use crate::tls::{TlsError, TlsIdentity};
use crate::{KeyRange, NodeId, ShardDescriptor, ShardId};
use dashmap::DashMap;
use openraft::async_runtime::watch::WatchReceiver as _;
use openraft::{BasicNode, ServerState};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Most shards a cluster is bootstrapped with.
pub const INITIAL_SHARDS_MAX: u64 = 10_000;

/// One shard replica's Raft group.
pub type ShardRaft = openraft::Raft<crate::raft::TypeConfig, crate::storage::StateMachine>;

/// What can stop a node from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The transport could not start.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A Raft group failed to start or initialise.
    #[error("raft group of {shard}: {reason}")]
    Raft {
        /// The shard.
        shard: ShardId,
        /// openraft's message.
        reason: String,
    },
    /// The metrics endpoint could not be bound.
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Whether `me` leads `raft`'s group right now, and the leader the group
/// knows of (read under the metrics borrow, nothing cloned).
pub(crate) fn leadership(raft: &ShardRaft, me: NodeId) -> (bool, Option<NodeId>) {
    let m = raft.metrics();
    let m = m.borrow_watched();
    (
        m.state == ServerState::Leader && m.current_leader == Some(me),
        m.current_leader,
    )
}

/// Whether a quorum acknowledged this leader less than `within` ago (the
/// acknowledgement's own clock: openraft's, not the wall clock).
fn acked_within(m: &openraft::RaftMetrics<crate::raft::TypeConfig>, within: Duration) -> bool {
    m.last_quorum_acked
        .as_ref()
        .is_some_and(|acked| openraft::Instant::elapsed(&**acked) < within)
}

/// Voters each shard is meant to have (fewer when the cluster has fewer
/// nodes).
pub(crate) const REPLICAS_PER_SHARD: usize = 3;

/// `n` descriptors covering the key space, split evenly by first byte (by
/// the first two bytes beyond 256 shards); each shard on up to 3 of
/// `members` (round robin), its first replica the one that initialises the
/// group (so leadership starts spread out).
pub fn initial_shards(n: u64, members: &[NodeId]) -> Vec<ShardDescriptor> {
    assert!(
        (1..=INITIAL_SHARDS_MAX).contains(&n),
        "1..={INITIAL_SHARDS_MAX} initial shards"
    );
    assert!(!members.is_empty(), "at least one member");
    let per_shard = members.len().min(REPLICAS_PER_SHARD);
    (0..n)
        .map(|i| {
            let bound = |j: u64| -> Vec<u8> {
                if j == 0 || j == n {
                    Vec::new()
                } else if n <= 256 {
                    vec![(j * 256 / n) as u8]
                } else {
                    ((j * 65536 / n) as u16).to_be_bytes().to_vec()
                }
            };
            let replicas: Vec<NodeId> = (0..per_shard)
                .map(|k| members[(i as usize + k) % members.len()])
                .collect();
            let mut d = ShardDescriptor::new(
                ShardId(i + 1),
                KeyRange::new(bound(i), bound(i + 1)),
                replicas.clone(),
            );
            d.leader_hint = Some(replicas[0]);
            d
        })
        .collect()
}

/// Bootstrap shards created at once on a fresh node.
const BOOTSTRAP_CREATES_IN_FLIGHT: usize = 64;

/// Waits for one of the bootstrap's shard creations.
async fn join_create(
    set: &mut tokio::task::JoinSet<Result<(), NodeError>>,
) -> Result<(), NodeError> {
    match set.join_next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Nothing aborts these tasks while they are joined here; a
            // creation that never ran must not count as done.
            Err(e) => unreachable!("a bootstrap shard creation was cancelled: {e}"),
        },
        None => Ok(()),
    }
}

/// Writes the bootstrap descriptors into the meta shard once it has a
/// leader (retried until it succeeds or the node stops), then marks it done
/// with a synced marker. Idempotent: descriptors are recorded only where
/// none is newer, and the shard-id counter only when it is absent, so a
/// crash before the marker and a second run never hand out used ids again.
async fn record_initial_routes(
    node: std::sync::Weak<Node>,
    descs: Vec<ShardDescriptor>,
    marker: PathBuf,
) {
    use crate::command::{Command, Op};
    // The next shard id to hand out (splits), above every bootstrap shard.
    let next = descs.iter().map(|d| d.id.0).max().unwrap_or(0) + 1;
    let commands = [
        Command::RecordRoutes {
            descriptors: descs.clone(),
        },
        Command::Write {
            ops: vec![Op::Cas {
                key: meta::next_id_key(),
                expected: None,
                new: Some(postcard::to_stdvec(&next).expect("u64 encodes")),
            }],
        },
    ];
    let mut done = 0;
    while done < commands.len() {
        let Some(n) = node.upgrade() else { return };
        // Through the meta shard's leader wherever it is: this node need not
        // lead it (after a restart it never leads before an election).
        if n.propose(
            meta::META_SHARD,
            commands[done].clone(),
            Duration::from_secs(5),
        )
        .await
        .is_ok()
        {
            done += 1;
            continue;
        }
        drop(n);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let written = std::fs::write(&marker, b"initial routes recorded\n")
        .and_then(|_| std::fs::File::open(&marker)?.sync_all())
        .and_then(|_| match marker.parent() {
            Some(dir) => std::fs::File::open(dir)?.sync_all(),
            None => Ok(()),
        });
    if let Err(e) = written {
        tracing::warn!(error = %e, "could not mark the routes recorded (recording again is harmless)");
    }
    tracing::info!(
        shards = descs.len(),
        "initial routes recorded in the meta shard"
    );
}

/// A running node.
pub struct Node {
    id: NodeId,
    config: NodeConfig,
    engine: Engine,
    registry: Arc<Registry>,
    transport: Transport,
    net_metrics: Arc<NetMetrics>,
    raft_config: Arc<openraft::Config>,
    /// `raft_config` with leader restore on, for rebuilding a dormant
    /// replica (see [`Node::revive`]).
    revive_config: Arc<openraft::Config>,
    metrics_addr: std::sync::OnceLock<SocketAddr>,
    metrics_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Held while a group is started or dropped (one at a time per node).
    lifecycle: tokio::sync::Mutex<()>,
    /// One replica move per shard at a time on this node (two admins, or
    /// an automatic pass and a manual one, may ask for moves of the same
    /// shard at once; interleaved, each would remove a voter).
    move_locks: DashMap<ShardId, Arc<tokio::sync::Mutex<()>>>,
    /// Background tasks (route reporter, split starter), ended at shutdown.
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Replica GC and repair counters.
    gc_counters: replica_gc::GcCounters,
    /// Wakes replica GC and repair early (a snapshot showed a missed split).
    gc_wake: Arc<tokio::sync::Notify>,
    /// Replicas replica GC found removed (they stop campaigning): kept
    /// here too, so that a dormant one is rebuilt not campaigning.
    no_campaign: dashmap::DashSet<ShardId>,
}

impl Node {
    /// Starts a node: storage, transport, every hosted group, bootstrap
    /// shards on a fresh folder, metrics.
    ///
    /// # Errors
    /// [`NodeError`] naming what failed.
    pub async fn start(
        config: NodeConfig,
        identity: &TlsIdentity,
        faults: Arc<Faults>,
    ) -> Result<Arc<Node>, NodeError> {
        config.validate()?;
        let id = config.node_id;
        let raft_config = Arc::new(config.openraft_config().validate().map_err(|e| {
            NodeError::Config(ConfigError::Invalid {
                field: "raft".into(),
                reason: e.to_string(),
            })
        })?);
        let engine = Engine::open(config.storage_config())?;
        engine.set_node_id(id);
        // Peers learned at run time (joined nodes) join the configured ones.
        let mut config = config;
        for p in peers_file::load(&config.data_dir).map_err(|e| {
            NodeError::Config(ConfigError::Invalid {
                field: "peers.toml".into(),
                reason: e.to_string(),
            })
        })? {
            if p.id != id && !config.peers.iter().any(|c| c.id == p.id) {
                config.peers.push(p);
            }
        }
        let registry = Arc::new(Registry::new(
            id,
            engine.clone(),
            faults.clone(),
            config.api.response_bytes_max,
            config.raft.quiesce_after_ms > 0,
            config.split.load_ops_per_s > 0,
        ));
        let net_metrics = Arc::new(NetMetrics::default());
        let (clients, client_conns) = tokio::sync::mpsc::channel(64);
        let transport = Transport::start(
            id,
            config.listen_addr,
            &config.peers,
            identity,
            config.transport.clone(),
            Wiring {
                inbound: Arc::new(NodeInbound(registry.clone())),
                expediter: registry.expediter.clone(),
                clients,
                metrics: net_metrics.clone(),
                faults,
            },
        )?;
        let client_task = tokio::spawn(
            registry
                .clone()
                .serve_clients(client_conns, net_metrics.clone()),
        );
        let node = Node {
            id,
            config,
            engine,
            registry,
            transport,
            net_metrics,
            revive_config: Arc::new(openraft::Config {
                enable_leader_restore: Some(true),
                ..(*raft_config).clone()
            }),
            raft_config,
            metrics_addr: std::sync::OnceLock::new(),
            metrics_task: std::sync::Mutex::new(None),
            lifecycle: tokio::sync::Mutex::new(()),
            move_locks: DashMap::new(),
            tasks: std::sync::Mutex::new(vec![client_task]),
            gc_counters: Default::default(),
            gc_wake: Arc::new(tokio::sync::Notify::new()),
            no_campaign: dashmap::DashSet::new(),
        };
        // A fresh node bootstrapping its data shards on the batch system
        // creates them before it opens what it hosts (the rest of the
        // bootstrap, below, needs the groups running).
        let marker = node.config.data_dir.join("bootstrapped");
        let batch_boot: Vec<ShardDescriptor> = match &node.config.bootstrap {
            Some(b) if node.config.raft.batch_data_shards && !marker.exists() => {
                initial_shards(b.shards, &b.members)
                    .into_iter()
                    .filter(|d| d.replicas.contains(&id))
                    .collect()
            }
            _ => Vec::new(),
        };
        batch::BatchShards::create(&node.engine, &batch_boot).await?;
        let hosted = node.engine.shards()?;
        let mut on_batch = Vec::new();
        for d in &hosted {
            if d.id != meta::META_SHARD && crate::multiraft::GroupStore::exists(&node.engine, d.id)?
            {
                on_batch.push(d.id);
                continue;
            }
            // One replica that cannot open (a corrupt snapshot file, say)
            // must not keep every other shard of the node down.
            if let Err(e) = node.start_group(d.id).await {
                tracing::error!(node = %id, shard = %d.id, error = %e, "replica not started");
            }
        }
        if !on_batch.is_empty() {
            let b = Arc::new(batch::BatchShards::start(
                &node.engine,
                id,
                &on_batch,
                node.transport.clone(),
                &node.config.raft,
            )?);
            let _ = node.registry.batch.set(b.clone());
            let hinted: Vec<ShardId> = on_batch
                .iter()
                .copied()
                .filter(|s| {
                    node.engine
                        .descriptor(*s)
                        .is_ok_and(|d| d.leader_hint == Some(id))
                })
                .collect();
            let every = Duration::from_millis(node.config.raft.heartbeat_interval_ms);
            let task = tokio::spawn(b.campaign_hinted(node.transport.clone(), hinted, every, 20));
            node.tasks.lock().expect("tasks poisoned").push(task);
        }
        // A merge applied here whose frozen right replica was not dropped
        // yet (a crash in between): dropped now, as the apply would have.
        // Only the frozen replicas' left neighbours are looked at.
        let into: std::collections::BTreeSet<ShardId> = node
            .engine
            .merging_all()
            .into_iter()
            .map(|(_, m)| m.into)
            .collect();
        for d in hosted.iter().filter(|d| into.contains(&d.id)) {
            for right in node.engine.retire_merged_into(d) {
                tracing::info!(node = %id, shard = %d.id, %right, "a merged-away replica left behind: retiring it");
            }
        }
        tracing::info!(node = %id, shards = hosted.len(), addr = %node.transport.local_addr(), "node started");
        let node = Arc::new(node);
        let _ = node.registry.node.set(Arc::downgrade(&node));
        // Only with quiescence on: otherwise nothing sleeps, and every log
        // append would pay for the hook for nothing.
        if node.config.raft.quiesce_after_ms > 0 {
            let registry = Arc::downgrade(&node.registry);
            node.engine.set_append_hook(Box::new(move |shard| {
                if let Some(r) = registry.upgrade() {
                    r.quiesce.on_append(shard, || r.live(shard));
                }
            }));
        }
        {
            let mut tasks = node.tasks.lock().expect("tasks poisoned");
            tasks.push(tokio::spawn(admin::start_created(
                Arc::downgrade(&node),
                node.engine.created_signal(),
            )));
            tasks.push(tokio::spawn(admin::report_routes(Arc::downgrade(&node))));
            tasks.push(tokio::spawn(admin::auto_split(Arc::downgrade(&node))));
            tasks.push(tokio::spawn(admin::reseed_lagging(Arc::downgrade(&node))));
            if node.config.rebalance.auto {
                tasks.push(tokio::spawn(admin::auto_rebalance(
                    Arc::downgrade(&node),
                    identity.clone(),
                )));
            }
            tasks.push(tokio::spawn(quiesce::run(Arc::downgrade(&node))));
            tasks.push(tokio::spawn(replica_gc::run(
                Arc::downgrade(&node),
                identity.clone(),
                node.gc_wake.clone(),
            )));
            if !node.config.peers.is_empty() {
                tasks.push(tokio::spawn(admin::announce(
                    Arc::downgrade(&node),
                    identity.clone(),
                )));
            }
        }
        // Bootstrap until it has completed once (a crash halfway through
        // resumes it: creating and initialising are both idempotent).
        if let Some(b) = node.config.bootstrap.clone() {
            if !marker.exists() {
                let meta = meta::meta_descriptor(&b.members);
                if meta.replicas.contains(&id) {
                    node.create_shard(&meta).await?;
                }
                // Bounded concurrency: the creations' synced writes share
                // the group commit instead of one sync each (10,000 shards
                // took a sync apiece, one after the other).
                let mut creating = tokio::task::JoinSet::new();
                for d in initial_shards(b.shards, &b.members) {
                    // Batch-system shards were created above.
                    if !d.replicas.contains(&id) || node.config.raft.batch_data_shards {
                        continue;
                    }
                    if creating.len() >= BOOTSTRAP_CREATES_IN_FLIGHT {
                        join_create(&mut creating).await?;
                    }
                    let n = node.clone();
                    creating.spawn(async move { n.create_shard(&d).await });
                }
                while !creating.is_empty() {
                    join_create(&mut creating).await?;
                }
                std::fs::write(&marker, b"bootstrap complete\n")
                    .and_then(|_| std::fs::File::open(&node.config.data_dir)?.sync_all())
                    .map_err(|e| StoreError::io("write bootstrap marker", &marker, e))?;
            }
        }
        if let Some(b) = node.config.bootstrap.clone() {
            let recorded = node.config.data_dir.join("routes-recorded");
            let meta = meta::meta_descriptor(&b.members);
            if meta.leader_hint == Some(id) && !recorded.exists() {
                tokio::spawn(record_initial_routes(
                    Arc::downgrade(&node),
                    initial_shards(b.shards, &b.members),
                    recorded,
                ));
            }
        }
        if let Some(addr) = node.config.metrics_addr {
            let weak = Arc::downgrade(&node);
            let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
                weak.upgrade()
                    .map(|n| n.metrics().to_prometheus(n.id))
                    .unwrap_or_default()
            });
            let (local, task) = crate::metrics::serve_http(addr, render)
                .await
                .map_err(|source| NodeError::Metrics { addr, source })?;
            let _ = node.metrics_addr.set(local);
            *node.metrics_task.lock().expect("metrics task poisoned") = Some(task);
        }
        Ok(node)
    }

    async fn start_group(&self, shard: ShardId) -> Result<Arc<ShardRaft>, NodeError> {
        let lifecycle = self.lifecycle.lock().await;
        if self.registry.hosts(shard) {
            drop(lifecycle);
            return self.registry.group(shard).await.ok_or(NodeError::Raft {
                shard,
                reason: "the replica was dropped while it started".into(),
            });
        }
        let raft = Arc::new(self.build_group(shard, self.raft_config.clone()).await?);
        // With quiescence on, a replica without a membership yet (created
        // for the bootstrap, or as a move's target) starts asleep: it can
        // neither campaign nor vote usefully until its group reaches it,
        // and the message that does wakes it. Asleep before it is
        // registered, so no message can slip in between.
        if self.registry.quiesce.enabled() && !raft.is_initialized().await.unwrap_or(true) {
            self.registry.quiesce.sleep_uninitialized(shard, &raft);
        }
        self.registry.groups.insert(shard, Slot::Live(raft.clone()));
        Ok(raft)
    }

    /// Opens `shard`'s stores and starts an openraft instance on them.
    async fn build_group(
        &self,
        shard: ShardId,
        config: Arc<openraft::Config>,
    ) -> Result<ShardRaft, NodeError> {
        // A dormant replica's old instance may still be closing its stores.
        let started = std::time::Instant::now();
        let (log, sm) = loop {
            match self.engine.open_shard(shard) {
                Ok(stores) => break stores,
                Err(StoreError::ShardOpen { .. })
                    if started.elapsed() < Duration::from_secs(10) =>
                {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let net = NetworkFactory::new(
            self.transport.clone(),
            shard,
            self.config.transport.frame_bytes_max / 2,
            Duration::from_millis(
                (self.config.raft.commit_linger_ms).min(self.config.raft.heartbeat_interval_ms / 2),
            ),
            {
                // Busy: more than one shard writing on this node (the write
                // whose commit it is counts until it is answered).
                let engine = self.engine.clone();
                Arc::new(move || engine.busy_shards() >= 2)
            },
        );
        ShardRaft::new(self.id, config, net, log, sm)
            .await
            .map_err(|e| NodeError::Raft {
                shard,
                reason: e.to_string(),
            })
    }

    /// Drops the openraft instances of the replicas in `shards` that still
    /// sleep and that nothing holds (dormant: their state is in storage).
    fn make_dormant(&self, shards: Vec<ShardId>) {
        let mut dropped = Vec::new();
        for shard in shards {
            let Some(mut slot) = self.registry.groups.get_mut(&shard) else {
                continue;
            };
            let Slot::Live(raft) = &*slot else { continue };
            // Held by a request or a task in flight: it may wake the group.
            // Whatever takes it from now on finds the slot dormant.
            if Arc::strong_count(raft) != 1 || !self.registry.quiesce.is_asleep(shard) {
                continue;
            }
            if let Slot::Live(raft) = std::mem::replace(&mut *slot, Slot::Dormant(Arc::default())) {
                dropped.push(raft);
            }
        }
        if dropped.is_empty() {
            return;
        }
        let n = dropped.len() as u64;
        self.registry
            .quiesce
            .dormancies
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(node = %self.id, replicas = n, "sleeping replicas made dormant");
        tokio::spawn(async move {
            for raft in dropped {
                let _ = raft.shutdown().await;
            }
        });
    }

    /// Rebuilds a dormant replica's openraft instance from storage (once:
    /// whoever comes at the same time waits for it and gets the same one).
    /// A replica that slept as leader comes back as leader of the same
    /// term (openraft's leader restore): its log, commit index and applied
    /// state are exactly what they were when it fell asleep in this
    /// process, so nothing is stale (restore stays off at start-up, where
    /// unsynced applies may be lost), and it wakes (its first replication
    /// wakes its followers). A follower comes back asleep; what needs it
    /// awake wakes it as it would any sleeping replica.
    pub(crate) async fn revive(&self, shard: ShardId) -> Option<Arc<ShardRaft>> {
        let lock = match self.registry.groups.get(&shard).as_deref()? {
            Slot::Live(r) => return Some(r.clone()),
            Slot::Dormant(l) => l.clone(),
        };
        let _reviving = lock.lock().await;
        let same = match self.registry.groups.get(&shard).as_deref()? {
            Slot::Live(r) => return Some(r.clone()),
            Slot::Dormant(l) => Arc::ptr_eq(l, &lock),
        };
        if !same {
            // Revived and made dormant again meanwhile (no map guard is
            // held across this wait).
            return Box::pin(self.revive(shard)).await;
        }
        let sleep = self.registry.quiesce.asleep(shard);
        let leader = sleep.as_ref().is_some_and(|s| s.leader() == self.id);
        let config = if leader {
            self.revive_config.clone()
        } else {
            self.raft_config.clone()
        };
        let raft = match self.build_group(shard, config).await {
            Ok(r) => Arc::new(r),
            Err(e) => {
                tracing::warn!(node = %self.id, %shard, error = %e, "dormant replica not rebuilt");
                return None;
            }
        };
        if self.no_campaign.contains(&shard) {
            raft.runtime_config().elect(false);
        }
        // Back asleep, as it was; a leader wakes at once (see Wake::Revived).
        if sleep.is_some() && !leader {
            raft.runtime_config().tick(false);
        }
        let installed = match self.registry.groups.get_mut(&shard).as_deref_mut() {
            Some(slot @ Slot::Dormant(_)) => {
                *slot = Slot::Live(raft.clone());
                true
            }
            _ => false,
        };
        if !installed {
            // Dropped meanwhile (a move took the replica away).
            let _ = raft.shutdown().await;
            return None;
        }
        if leader {
            self.registry
                .quiesce
                .touch(shard, &raft, quiesce::Wake::Revived);
            // openraft starts the rebuilt instance as a learner and restores
            // its leadership a moment later; a request it took before that
            // would be refused (`NotLeader` without a hint) and the client
            // would back off. Bounded: on a timeout the request is refused
            // as before.
            let within = Duration::from_millis(raft.config().election_timeout_min);
            let _ = raft
                .wait(Some(within))
                .state(ServerState::Leader, "the revived leader leads")
                .await;
        }
        self.registry
            .quiesce
            .revivals
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(node = %self.id, %shard, "dormant replica rebuilt");
        Some(raft)
    }

    /// Creates a replica of `descriptor` here and starts its group; the
    /// replica named by the leader hint (else the first) initialises the
    /// group's membership. Safe to call again for an existing shard.
    ///
    /// # Errors
    /// [`NodeError`] when storage or Raft fails.
    pub async fn create_shard(&self, descriptor: &ShardDescriptor) -> Result<(), NodeError> {
        match self.engine.create_shard(descriptor).await {
            Ok(()) | Err(StoreError::ShardExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let raft = match self.registry.group(descriptor.id).await {
            Some(r) => r,
            None => self.start_group(descriptor.id).await?,
        };
        let initializer = descriptor
            .leader_hint
            .or_else(|| descriptor.replicas.first().copied());
        let rerr = |e: &dyn std::fmt::Display| NodeError::Raft {
            shard: descriptor.id,
            reason: e.to_string(),
        };
        if initializer == Some(self.id) && !raft.is_initialized().await.map_err(|e| rerr(&e))? {
            // The initialiser campaigns and, as leader, heartbeats: awake.
            self.registry
                .quiesce
                .touch(descriptor.id, &raft, quiesce::Wake::Created);
            let members: BTreeMap<NodeId, BasicNode> = descriptor
                .replicas
                .iter()
                .map(|n| (*n, BasicNode::new(self.addr_of(*n))))
                .collect();
            raft.initialize(members).await.map_err(|e| rerr(&e))?;
            // openraft 0.10 waits an election timeout after initialising;
            // the initialiser campaigns at once instead (the other members'
            // replicas may not exist yet: an election they miss is retried
            // at the next timeout).
            raft.trigger().elect(false).await.map_err(|e| rerr(&e))?;
        }
        Ok(())
    }

    /// A client of the cluster holding this node's own certificate (for
    /// the node's background tasks: replica GC reads routes, automatic
    /// rebalancing makes admin requests), over every node known now;
    /// `None` (logged) when the identity does not make a client.
    pub(crate) fn own_client(&self, identity: &TlsIdentity) -> Option<crate::Client> {
        let nodes = self
            .transport
            .peers()
            .iter()
            .map(|p| (p.id, p.addr))
            .chain(std::iter::once((self.id, self.addr())))
            .collect();
        crate::Client::from_identity(identity, nodes, Default::default())
            .map_err(|e| tracing::warn!(error = %e, "no client with this node's certificate"))
            .ok()
    }

    fn addr_of(&self, node: NodeId) -> String {
        if node == self.id {
            return self.transport.local_addr().to_string();
        }
        self.transport
            .peers()
            .into_iter()
            .find(|p| p.id == node)
            .map(|p| p.addr.to_string())
            .unwrap_or_default()
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The QUIC address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.transport.local_addr()
    }

    /// The metrics endpoint's address, when serving.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr.get().copied()
    }

    /// The node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The storage engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The transport.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Adds a peer (or updates its address).
    pub fn add_peer(&self, p: PeerAddr) {
        self.transport.add_peer(p);
    }

    /// The running Raft group of a hosted shard (`None` when it is not
    /// hosted, or dormant: see [`Node::group`]).
    pub fn raft(&self, shard: ShardId) -> Option<Arc<ShardRaft>> {
        self.registry.live(shard)
    }

    /// The Raft group of a hosted shard, rebuilt first if it is dormant.
    pub async fn group(&self, shard: ShardId) -> Option<Arc<ShardRaft>> {
        self.registry.group(shard).await
    }

    /// The leader this node's replica of `shard` sleeps under (`None`:
    /// awake, or quiescence off).
    pub fn sleeping_leader(&self, shard: ShardId) -> Option<NodeId> {
        self.registry
            .quiesce
            .sleeping_under(shard)
            .filter(|l| l.0 != 0)
    }

    /// The term of this node's replica of `shard` (a dormant one's: the
    /// term it fell asleep in).
    pub fn replica_term(&self, shard: ShardId) -> Option<u64> {
        self.registry.view(shard).map(|v| v.term)
    }

    /// Whether this node's replica of `shard` is dormant (asleep, its
    /// openraft instance dropped until something needs it).
    pub fn is_dormant(&self, shard: ShardId) -> bool {
        matches!(
            self.registry.groups.get(&shard).as_deref(),
            Some(Slot::Dormant(_))
        )
    }

    /// Hosted data shards in id order (the meta shard, if hosted, is
    /// [`meta::META_SHARD`]).
    pub fn shard_ids(&self) -> Vec<ShardId> {
        self.registry.data_shard_ids()
    }

    /// Whether `shard` runs here on the batch system
    /// ([`crate::multiraft`]) rather than on openraft.
    pub fn is_batch_shard(&self, shard: ShardId) -> bool {
        self.registry.batch_for(shard).is_some()
    }

    /// The leader this node's replica of batch-system shard `shard` knows
    /// of (`None`: not hosted here on the batch system, or no leader known).
    pub fn batch_leader(&self, shard: ShardId) -> Option<NodeId> {
        self.registry.batch_group(shard)?.leader.map(NodeId)
    }

    /// Proves batch-system shard `shard` serves from this node: a
    /// linearizable read point, then a replicated no-op write.
    ///
    /// # Errors
    /// The refusal (not the leader, no quorum, not hosted here).
    pub async fn probe_batch_shard(&self, shard: ShardId) -> Result<(), crate::api::ApiError> {
        let b = self
            .registry
            .batch_for(shard)
            .ok_or(crate::api::ApiError::UnknownShard { shard })?;
        b.read_barrier(shard).await?;
        match b.propose(shard, &crate::command::Command::Noop).await? {
            (_, crate::command::CommandResponse::Empty) => Ok(()),
            (_, other) => Err(crate::api::ApiError::Internal(format!(
                "a no-op was answered {other:?}"
            ))),
        }
    }

    /// The route table in this node's replica of the meta shard (`None`
    /// when it hosts none).
    pub fn meta_routes(&self) -> Option<Vec<ShardDescriptor>> {
        self.registry.meta_routes()
    }

    /// Whether this node's replica of `shard` is asleep (quiescent: no
    /// ticks, heartbeats or election timer until something wakes it).
    pub fn is_quiescent(&self, shard: ShardId) -> bool {
        self.registry.quiesce.is_asleep(shard)
    }

    /// A shard hosted here on the batch system whose range overlaps
    /// `range`, if any.
    pub(crate) fn batch_shard_overlapping(&self, range: &KeyRange) -> Option<ShardId> {
        let b = self.registry.batch.get()?;
        b.shards().into_iter().find(|s| {
            self.engine
                .descriptor(*s)
                .is_ok_and(|d| d.range.overlaps(range))
        })
    }

    /// Data shards this node leads right now, on either Raft system.
    pub fn shards_led(&self) -> Vec<ShardId> {
        let mut led: Vec<ShardId> = self
            .registry
            .groups
            .iter()
            .filter(|e| *e.key() != meta::META_SHARD)
            .filter(|e| self.registry.leads(*e.key(), e.value()))
            .map(|e| *e.key())
            .collect();
        if let Some(b) = self.registry.batch.get() {
            led.extend(b.led());
        }
        led.sort();
        led
    }

    /// Every metric of the node, now.
    pub fn metrics(&self) -> MetricsSnapshot {
        let mut s = MetricsSnapshot::default();
        self.net_metrics.fill(&mut s);
        let st = self.engine.stats();
        s.syncs = st.syncs;
        s.log_appends = st.append_requests;
        s.log_entries = st.entries_appended;
        s.commands_applied = st.commands_applied;
        s.apply_writes = st.apply_writes;
        s.shards_hosted = self.registry.data_shard_ids().len() as u64;
        s.meta_leader = self.registry.leads_hosted(meta::META_SHARD) as u64;
        s.shards_led = self.shards_led().len() as u64;
        if let Some(b) = self.registry.batch.get() {
            // One synced write per round for all the loop's groups: its
            // syncs and appends add to the group commit's.
            let (d, frames) = b.stats();
            s.syncs += d.syncs;
            s.log_appends += d.appends;
            s.log_entries += d.entries;
            s.shards_led += b
                .shards()
                .iter()
                .filter(|&&id| b.group(id).is_some_and(|g| g.leading))
                .count() as u64;
            s.batch_frames = frames.frames.load(std::sync::atomic::Ordering::Relaxed);
            s.batch_messages = frames.messages.load(std::sync::atomic::Ordering::Relaxed);
            s.batch_log_compactions = d.compactions;
            s.batch_groups_asleep = d.sleeps.saturating_sub(d.wakes);
            s.batch_group_wakes = d.wakes;
            s.batch_log_entries = b
                .shards()
                .iter()
                .filter_map(|&id| b.group(id))
                .map(|g| (g.log_last + 1).saturating_sub(g.log_first))
                .sum();
            s.batch_seeds_installed = b.seeds_installed();
        }
        s.replicas_destroyed = self
            .gc_counters
            .destroyed
            .load(std::sync::atomic::Ordering::Relaxed);
        s.replicas_repaired = self
            .gc_counters
            .repaired
            .load(std::sync::atomic::Ordering::Relaxed);
        s.repairs_deferred = self
            .gc_counters
            .deferred
            .load(std::sync::atomic::Ordering::Relaxed);
        s.tombstones = self.engine.tombstone_count();
        let q = self.registry.quiesce.stats();
        s.groups_quiescent = q.asleep;
        s.hibernations = q.hibernations;
        s.groups_dormant = self
            .registry
            .groups
            .iter()
            .filter(|e| matches!(e.value(), Slot::Dormant(_)))
            .count() as u64;
        s.dormancies = q.dormancies;
        s.revivals = q.revivals;
        s.elections = q.elections;
        s.wakes = quiesce::Wake::ALL
            .iter()
            .map(|w| w.label())
            .zip(q.wakes)
            .collect();
        s
    }

    /// Stops every group, closes every connection and closes the database.
    ///
    /// # Errors
    /// [`NodeError::Store`] when the database is still held after the wait.
    pub async fn shutdown(self: Arc<Self>, timeout: Duration) -> Result<(), NodeError> {
        for t in self.tasks.lock().expect("tasks poisoned").drain(..) {
            t.abort();
        }
        self.transport.shutdown();
        if let Some(b) = self.registry.batch.get().cloned() {
            // Joins the loop's thread (it finishes its round's write).
            let _ = tokio::task::spawn_blocking(move || b.stop()).await;
        }
        if let Some(t) = self
            .metrics_task
            .lock()
            .expect("metrics task poisoned")
            .take()
        {
            t.abort();
        }
        let groups: Vec<Arc<ShardRaft>> = self
            .registry
            .groups
            .iter()
            .filter_map(|e| match e.value() {
                Slot::Live(r) => Some(r.clone()),
                Slot::Dormant(_) => None,
            })
            .collect();
        self.registry.groups.clear();
        for g in groups {
            let _ = g.shutdown().await;
        }
        let _ = tokio::time::timeout(timeout, self.transport.wait_closed()).await;
        let engine = self.engine.clone();
        drop(self);
        engine.close(timeout).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_shards_cover_the_key_space_and_spread_replicas() {
        let m: Vec<NodeId> = (1..=4).map(NodeId).collect();
        for n in [1u64, 3, 16, 256, 257, 1000, INITIAL_SHARDS_MAX] {
            let s = initial_shards(n, &m);
            assert_eq!(s.len() as u64, n);
            assert!(s[0].range.start.is_empty());
            assert!(s.last().unwrap().range.end.is_empty());
            for w in s.windows(2) {
                assert_eq!(w[0].range.end, w[1].range.start);
            }
            for d in &s {
                assert_eq!(d.replicas.len(), 3);
                assert_eq!(d.leader_hint, Some(d.replicas[0]));
            }
        }
        let one = initial_shards(4, &[NodeId(1)]);
        assert!(one.iter().all(|d| d.replicas == vec![NodeId(1)]));
    }
}
