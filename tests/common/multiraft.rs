//! An in-process cluster of `multiraft::Driver`s: each node has its own
//! RocksDB in a temporary folder, and messages go from one round's output to
//! the other nodes' `step` in memory. Used by `tests/multiraft_core.rs` and
//! `benches/multiraft.rs`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use raft::eraftpb::EntryType;
use tessera::multiraft::{compaction_point, Driver, DriverConfig, GroupStore, Round};
use tessera::storage::{Engine, StorageConfig};
use tessera::ShardId;

/// One node: its folder, engine, driver and what it applied.
pub struct Node {
    pub engine: Engine,
    pub driver: Driver,
    /// Per group, the (index, data) of every applied non-empty entry
    /// (log compactions are the driver's, not recorded).
    pub applied: BTreeMap<ShardId, Vec<(u64, Vec<u8>)>>,
}

/// Nodes 1..=n, each a voter of every group.
pub struct LocalCluster {
    _root: tempfile::TempDir,
    dirs: BTreeMap<u64, PathBuf>,
    pub nodes: BTreeMap<u64, Node>,
    pub groups: Vec<ShardId>,
    /// Nodes whose messages are dropped, both ways.
    pub isolated: BTreeSet<u64>,
    /// Nodes whose AppendEntries are dropped (their other messages go).
    pub appends_dropped: BTreeSet<u64>,
    /// Every confirmed read point each node's rounds returned:
    /// (group, context, index).
    pub reads: BTreeMap<u64, Vec<(ShardId, u64, u64)>>,
    config: DriverConfig,
}

fn open_node(
    dir: &std::path::Path,
    id: u64,
    groups: &[ShardId],
    config: &DriverConfig,
    applied: &BTreeMap<ShardId, u64>,
) -> Node {
    let engine = Engine::open(StorageConfig::new(dir)).expect("open engine");
    let mut driver = Driver::new(engine.clone(), id, config.clone());
    for g in groups {
        let at = applied.get(g).copied().unwrap_or(0);
        driver.open_group(*g, at).expect("open group");
    }
    Node {
        engine,
        driver,
        applied: BTreeMap::new(),
    }
}

impl LocalCluster {
    /// `nodes` nodes, `groups` groups (shard ids 1..=groups), all
    /// bootstrapped; logs are never compacted.
    pub fn new(nodes: u64, groups: u64) -> LocalCluster {
        Self::with_config(
            nodes,
            groups,
            DriverConfig {
                compact_every: 0,
                ..DriverConfig::default()
            },
        )
    }

    /// [`LocalCluster::new`] with every driver on `config`.
    pub fn with_config(nodes: u64, groups: u64, config: DriverConfig) -> LocalCluster {
        let root = tempfile::tempdir().expect("temp dir");
        let groups: Vec<ShardId> = (1..=groups).map(ShardId).collect();
        let voters: Vec<u64> = (1..=nodes).collect();
        let mut dirs = BTreeMap::new();
        let mut opened = BTreeMap::new();
        for id in 1..=nodes {
            let dir = root.path().join(format!("n{id}"));
            {
                let engine = Engine::open(StorageConfig::new(&dir)).expect("open engine");
                for g in &groups {
                    GroupStore::bootstrap(&engine, *g, &voters).expect("bootstrap group");
                }
            }
            opened.insert(id, open_node(&dir, id, &groups, &config, &BTreeMap::new()));
            dirs.insert(id, dir);
        }
        LocalCluster {
            _root: root,
            dirs,
            nodes: opened,
            groups,
            isolated: BTreeSet::new(),
            appends_dropped: BTreeSet::new(),
            reads: BTreeMap::new(),
            config,
        }
    }

    /// Node `id`'s folder.
    pub fn dir(&self, id: u64) -> &std::path::Path {
        &self.dirs[&id]
    }

    /// Stops node `id` (its driver and engine are dropped; its folder stays).
    pub fn stop(&mut self, id: u64) {
        let node = self.nodes.remove(&id).expect("node is running");
        drop(node);
    }

    /// Starts node `id` again from its folder; it applies from the start.
    pub fn restart(&mut self, id: u64) {
        self.restart_applied(id, &BTreeMap::new());
    }

    /// Starts node `id` again from its folder, its state machine having
    /// applied each group up to `applied` (0 for a group not named); what it
    /// applies from there on is recorded.
    pub fn restart_applied(&mut self, id: u64, applied: &BTreeMap<ShardId, u64>) {
        assert!(!self.nodes.contains_key(&id), "node {id} is running");
        let node = open_node(&self.dirs[&id], id, &self.groups, &self.config, applied);
        self.nodes.insert(id, node);
    }

    /// Hands `round`'s messages from node `from` to their destinations
    /// (dropping what isolation drops); returns how many were delivered.
    pub fn deliver(&mut self, from: u64, round: Round) -> usize {
        let mut sent = 0;
        for (to, envs) in round.messages {
            if self.isolated.contains(&from) || self.isolated.contains(&to) {
                continue;
            }
            let Some(node) = self.nodes.get_mut(&to) else {
                continue;
            };
            for env in envs {
                if self.appends_dropped.contains(&from)
                    && env.msg.get_msg_type() == raft::eraftpb::MessageType::MsgAppend
                {
                    continue;
                }
                sent += 1;
                node.driver.step(env).expect("step");
            }
        }
        sent
    }

    fn apply(node: &mut Node, round: &Round) {
        for (shard, entries) in &round.committed {
            let log = node.applied.entry(*shard).or_default();
            for e in entries {
                assert_eq!(
                    e.get_entry_type(),
                    EntryType::EntryNormal,
                    "no conf changes yet"
                );
                if !e.data.is_empty() && compaction_point(e).is_none() {
                    log.push((e.index, e.data.to_vec()));
                }
            }
            let last = entries.last().expect("non-empty").index;
            node.driver.applied(*shard, last).expect("applied");
        }
    }

    /// Runs rounds on every node and delivers their messages until no node
    /// has anything left to do. Returns the rounds that did something.
    pub fn pump(&mut self) -> usize {
        let mut busy_rounds = 0;
        for pass in 0.. {
            assert!(pass < 10_000, "the cluster did not settle in 10,000 passes");
            let mut quiet = true;
            let ids: Vec<u64> = self.nodes.keys().copied().collect();
            for id in ids {
                let node = self.nodes.get_mut(&id).expect("running");
                let round = node.driver.round().expect("round");
                Self::apply(node, &round);
                self.reads.entry(id).or_default().extend(&round.reads);
                if !round.is_idle() {
                    quiet = false;
                    busy_rounds += 1;
                }
                if self.deliver(id, round) > 0 {
                    quiet = false;
                }
            }
            if quiet {
                break;
            }
        }
        busy_rounds
    }

    /// One tick on every running node, then [`LocalCluster::pump`].
    pub fn tick(&mut self) {
        for node in self.nodes.values_mut() {
            node.driver.tick();
        }
        self.pump();
    }

    /// The leader of `shard` that every running, connected node agrees on.
    pub fn agreed_leader(&self, shard: ShardId) -> Option<u64> {
        let mut seen = None;
        for (id, node) in &self.nodes {
            if self.isolated.contains(id) {
                continue;
            }
            let l = node.driver.leader(shard)?;
            if seen.is_some_and(|s| s != l) {
                return None;
            }
            seen = Some(l);
        }
        let l = seen?;
        self.nodes
            .get(&l)
            .is_some_and(|n| n.driver.is_leader(shard))
            .then_some(l)
    }

    /// Ticks until every group has a leader the running nodes agree on;
    /// panics with `what` after `max_ticks`.
    pub fn wait_leaders(&mut self, max_ticks: usize, what: &str) -> BTreeMap<ShardId, u64> {
        for _ in 0..max_ticks {
            let leaders: BTreeMap<ShardId, u64> = self
                .groups
                .iter()
                .filter_map(|g| self.agreed_leader(*g).map(|l| (*g, l)))
                .collect();
            if leaders.len() == self.groups.len() {
                return leaders;
            }
            self.tick();
        }
        panic!("{what}: not every group had an agreed leader after {max_ticks} ticks");
    }

    /// Campaigns each group on node `group % nodes + 1` (leaders spread
    /// evenly), then waits for the leaders.
    pub fn elect_spread(&mut self) -> BTreeMap<ShardId, u64> {
        let n = self.nodes.len() as u64;
        for g in self.groups.clone() {
            let id = g.0 % n + 1;
            self.nodes
                .get_mut(&id)
                .expect("running")
                .driver
                .campaign(g)
                .expect("campaign");
        }
        self.pump();
        self.wait_leaders(200, "spread election")
    }

    /// Proposes `data` to `shard` at node `id` (which must lead it).
    pub fn propose_at(&mut self, id: u64, shard: ShardId, data: &[u8]) {
        self.nodes
            .get_mut(&id)
            .expect("running")
            .driver
            .propose(shard, data.to_vec())
            .unwrap_or_else(|e| panic!("propose to {shard} at node {id}: {e}"));
    }

    /// Ticks until every running, connected node applied `data` in `shard`;
    /// panics with `what` after `max_ticks`.
    pub fn wait_applied(&mut self, shard: ShardId, data: &[u8], max_ticks: usize, what: &str) {
        for _ in 0..max_ticks {
            let done = self
                .nodes
                .iter()
                .filter(|(id, _)| !self.isolated.contains(id))
                .all(|(_, n)| {
                    n.applied
                        .get(&shard)
                        .is_some_and(|l| l.iter().any(|(_, d)| d == data))
                });
            if done {
                return;
            }
            self.tick();
        }
        panic!("{what}: {data:?} not applied in {shard} on every node after {max_ticks} ticks");
    }
}

/// Loops wired to each other's mailboxes in memory.
pub mod loops {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex, RwLock};
    use std::time::Duration;

    use raft::eraftpb::Entry;
    use tessera::multiraft::{
        Applier, Driver, DriverConfig, DriverError, DriverStats, Envelope, GroupStore, LoopConfig,
        Mailbox, NodeLoop, Outbound, RequestError,
    };
    use tessera::storage::{Engine, StorageConfig, StoreError};
    use tessera::ShardId;

    type Book<R> = Arc<RwLock<BTreeMap<u64, Mailbox<R>>>>;

    type Answer<T> = tokio::sync::oneshot::Receiver<Result<T, RequestError>>;

    /// Delivers each frame to the destination's mailbox, if it runs.
    pub struct LocalOut<R>(Book<R>);

    impl<R: Send + 'static> Outbound for LocalOut<R> {
        fn send(&mut self, to: u64, frame: Vec<Envelope>) {
            if let Some(m) = self.0.read().unwrap().get(&to) {
                m.deliver(frame);
            }
        }
    }

    /// Makes node `id`'s applier over its engine, and says the index each
    /// group's state machine applied already.
    pub type MakeApplier<R> = Arc<
        dyn Fn(u64, &Engine) -> (Box<dyn Applier<Response = R>>, BTreeMap<ShardId, u64>)
            + Send
            + Sync,
    >;

    /// What a node applied, per group, in order.
    pub type Applied = Arc<Mutex<BTreeMap<ShardId, Vec<Vec<u8>>>>>;

    /// Records every non-empty entry (log compactions aside).
    pub struct Recorder(pub Applied);

    impl Applier for Recorder {
        type Response = ();

        fn apply(
            &mut self,
            committed: &[(ShardId, Vec<Entry>)],
        ) -> Result<Vec<Vec<()>>, StoreError> {
            let mut a = self.0.lock().unwrap();
            for (shard, entries) in committed {
                let log = a.entry(*shard).or_default();
                log.extend(
                    entries
                        .iter()
                        .filter(|e| {
                            !e.data.is_empty() && tessera::multiraft::compaction_point(e).is_none()
                        })
                        .map(|e| e.data.to_vec()),
                );
            }
            Ok(committed.iter().map(|(_, e)| vec![(); e.len()]).collect())
        }
    }

    /// Sends requests to the node that last answered for a group, and
    /// follows `NotLeader` hints, as a client would.
    #[derive(Default)]
    pub struct Router(Mutex<BTreeMap<ShardId, u64>>);

    impl Router {
        /// The running node that last answered for `shard`, else the first.
        fn start_at<R>(&self, loops: &BTreeMap<u64, NodeLoop<R>>, shard: ShardId) -> u64 {
            let first = *loops.keys().next().expect("a node runs");
            let hint = self.0.lock().unwrap().get(&shard).copied();
            hint.filter(|h| loops.contains_key(h)).unwrap_or(first)
        }

        /// Sends with `send` to the hinted node, follows `NotLeader` hints
        /// and waits out elections (trying the next node when none is
        /// known) until a node answers, within `deadline`; returns the node
        /// and its answer.
        async fn ask<R, T>(
            &self,
            loops: &BTreeMap<u64, NodeLoop<R>>,
            shard: ShardId,
            deadline: Duration,
            send: impl Fn(&NodeLoop<R>) -> Result<Answer<T>, RequestError>,
        ) -> Result<(u64, T), String> {
            let until = tokio::time::Instant::now() + deadline;
            let mut at = self.start_at(loops, shard);
            let mut last = String::new();
            while tokio::time::Instant::now() < until {
                let reply = match send(&loops[&at]) {
                    Ok(rx) => tokio::time::timeout_at(until, rx).await,
                    Err(e) => Ok(Ok(Err(e))),
                };
                match reply {
                    Ok(Ok(Ok(done))) => {
                        self.0.lock().unwrap().insert(shard, at);
                        return Ok((at, done));
                    }
                    Ok(Ok(Err(RequestError::Driver(DriverError::NotLeader {
                        leader, ..
                    })))) => {
                        match leader.filter(|l| loops.contains_key(l)) {
                            Some(l) => at = l,
                            None => {
                                // No leader known here yet: try the next node.
                                let ids: Vec<u64> = loops.keys().copied().collect();
                                let i = ids.iter().position(|x| *x == at).unwrap_or(0);
                                at = ids[(i + 1) % ids.len()];
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                        last = "no leader".into();
                    }
                    Ok(Ok(Err(e))) => return Err(e.to_string()),
                    Ok(Err(_)) => return Err("reply dropped".into()),
                    Err(_) => last = "deadline".into(),
                }
            }
            Err(format!("no answer within {deadline:?}: {last}"))
        }

        /// Proposes `data` to `shard` until a leader acknowledges it applied.
        pub async fn propose<R: Send + 'static>(
            &self,
            loops: &BTreeMap<u64, NodeLoop<R>>,
            shard: ShardId,
            data: &[u8],
            deadline: Duration,
        ) -> Result<(u64, R), String> {
            let (_, done) = self
                .ask(loops, shard, deadline, |l| {
                    l.mailbox().propose(shard, data.to_vec())
                })
                .await?;
            Ok(done)
        }

        /// A linearizable read point of `shard`: the node that answered
        /// and the index it applied.
        pub async fn read_index<R: Send + 'static>(
            &self,
            loops: &BTreeMap<u64, NodeLoop<R>>,
            shard: ShardId,
            deadline: Duration,
        ) -> Result<(u64, u64), String> {
            self.ask(loops, shard, deadline, |l| l.mailbox().read_index(shard))
                .await
        }
    }

    /// Appliers that record what they apply, and where each node's record is.
    pub fn recorders() -> (Arc<Mutex<BTreeMap<u64, Applied>>>, MakeApplier<()>) {
        let records: Arc<Mutex<BTreeMap<u64, Applied>>> = Arc::default();
        let r2 = records.clone();
        let make: MakeApplier<()> = Arc::new(move |id, _engine| {
            let applied = Applied::default();
            r2.lock().unwrap().insert(id, applied.clone());
            (Box::new(Recorder(applied)), BTreeMap::new())
        });
        (records, make)
    }

    /// Nodes 1..=n, each a voter of groups 1..=groups, each with its loop.
    pub struct LoopCluster<R: Send + 'static = ()> {
        _root: tempfile::TempDir,
        dirs: BTreeMap<u64, PathBuf>,
        book: Book<R>,
        pub loops: BTreeMap<u64, NodeLoop<R>>,
        /// What each node's [`Recorder`] saw (with [`LoopCluster::start`]).
        pub applied: BTreeMap<u64, Applied>,
        pub groups: u64,
        config: LoopConfig,
        pub router: Router,
        make: MakeApplier<R>,
        records: Option<Arc<Mutex<BTreeMap<u64, Applied>>>>,
        /// Each running node's engine.
        pub engines: BTreeMap<u64, Engine>,
    }

    impl LoopCluster<()> {
        /// Nodes whose appliers record what they apply ([`Recorder`]).
        pub fn start(nodes: u64, groups: u64, config: LoopConfig) -> LoopCluster<()> {
            let (records, make) = recorders();
            let mut c = LoopCluster::start_with(nodes, groups, config, make);
            c.records = Some(records);
            c.sync_records();
            c
        }
    }

    impl<R: Send + 'static> LoopCluster<R> {
        /// Nodes whose appliers `make` builds.
        pub fn start_with(
            nodes: u64,
            groups: u64,
            config: LoopConfig,
            make: MakeApplier<R>,
        ) -> LoopCluster<R> {
            let root = tempfile::tempdir().expect("temp dir");
            let voters: Vec<u64> = (1..=nodes).collect();
            let mut dirs = BTreeMap::new();
            for id in 1..=nodes {
                let dir = root.path().join(format!("n{id}"));
                let engine = Engine::open(StorageConfig::new(&dir)).expect("open engine");
                let all: Vec<ShardId> = (1..=groups).map(ShardId).collect();
                GroupStore::bootstrap_many(&engine, &all, &voters).expect("bootstrap");
                dirs.insert(id, dir);
            }
            let mut c = LoopCluster {
                _root: root,
                dirs,
                book: Arc::default(),
                loops: BTreeMap::new(),
                applied: BTreeMap::new(),
                groups,
                config,
                router: Router::default(),
                make,
                records: None,
                engines: BTreeMap::new(),
            };
            for id in 1..=nodes {
                c.restart(id);
            }
            c
        }

        fn sync_records(&mut self) {
            if let Some(r) = &self.records {
                self.applied = r.lock().unwrap().clone();
            }
        }

        /// Stops node `id`'s loop (its folder stays).
        pub fn stop(&mut self, id: u64) {
            self.halt(id).expect("loop ran without a storage error");
        }

        /// Stops node `id`'s loop, whatever stopped it before: its counters,
        /// or the storage error that stopped it.
        pub fn halt(&mut self, id: u64) -> Result<DriverStats, DriverError> {
            self.book.write().unwrap().remove(&id);
            self.engines.remove(&id);
            let l = self.loops.remove(&id).expect("running");
            l.stop()
        }

        /// Starts node `id`'s loop from its folder; each group applies from
        /// where its state machine says it stopped (a [`Recorder`]: from the
        /// start).
        pub fn restart(&mut self, id: u64) {
            let engine = Engine::open(StorageConfig::new(&self.dirs[&id])).expect("open engine");
            engine.set_node_id(tessera::NodeId(id));
            let (applier, applied) = (self.make)(id, &engine);
            self.engines.insert(id, engine.clone());
            let mut driver = Driver::new(engine, id, DriverConfig::default());
            for g in 1..=self.groups {
                let from = applied.get(&ShardId(g)).copied().unwrap_or(0);
                driver.open_group(ShardId(g), from).expect("open group");
            }
            let l = NodeLoop::start(
                driver,
                LocalOut(self.book.clone()),
                applier,
                self.config.clone(),
            )
            .expect("start loop");
            self.book.write().unwrap().insert(id, l.mailbox());
            self.loops.insert(id, l);
            self.sync_records();
        }

        /// See [`Router::propose`].
        pub async fn propose(
            &self,
            shard: ShardId,
            data: &[u8],
            deadline: Duration,
        ) -> Result<u64, String> {
            let (index, _) = self
                .router
                .propose(&self.loops, shard, data, deadline)
                .await?;
            Ok(index)
        }

        /// See [`Router::read_index`].
        pub async fn read_index(
            &self,
            shard: ShardId,
            deadline: Duration,
        ) -> Result<(u64, u64), String> {
            self.router.read_index(&self.loops, shard, deadline).await
        }

        /// Waits until every running node applied `data` in `shard`.
        pub async fn wait_applied(&self, shard: ShardId, data: &[u8], deadline: Duration) {
            let until = tokio::time::Instant::now() + deadline;
            loop {
                let done = self
                    .applied
                    .iter()
                    .filter(|(id, _)| self.loops.contains_key(id))
                    .all(|(_, a)| {
                        a.lock()
                            .unwrap()
                            .get(&shard)
                            .is_some_and(|l| l.iter().any(|d| d == data))
                    });
                if done {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < until,
                    "{data:?} not applied in {shard} on every running node within {deadline:?}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// Loops talking over real QUIC transports (loopback, mutual TLS against a
/// test CA), one per node, as nodes would.
pub mod quic {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use super::loops::{recorders, Applied, MakeApplier, Router};
    use tessera::metrics::NetMetrics;
    use tessera::multiraft::quic::{FrameCounters, FrameInbound, QuicOutbound};
    use tessera::multiraft::{Driver, DriverConfig, GroupStore, LoopConfig, NodeLoop};
    use tessera::net::{Expediter, Faults, PeerAddr, Transport, TransportConfig, Wiring};
    use tessera::storage::{Engine, StorageConfig};
    use tessera::tls::issue::ClusterCa;
    use tessera::{NodeId, ShardId};

    /// Nodes 1..=n over QUIC, each a voter of groups 1..=groups.
    pub struct QuicCluster<R: Send + 'static = ()> {
        _root: tempfile::TempDir,
        pub loops: BTreeMap<u64, NodeLoop<R>>,
        pub transports: BTreeMap<u64, Transport>,
        /// What each node's [`Recorder`] saw (with [`QuicCluster::start`]).
        pub applied: BTreeMap<u64, Applied>,
        pub metrics: BTreeMap<u64, Arc<NetMetrics>>,
        pub frames: BTreeMap<u64, Arc<FrameCounters>>,
        pub engines: BTreeMap<u64, Engine>,
        pub router: Router,
    }

    /// One node's transport, as [`start_transports`] started it.
    pub struct Started {
        pub transport: Transport,
        pub metrics: Arc<NetMetrics>,
        /// Where the transport delivers Raft frames; attach a loop's mailbox.
        pub inbound: Arc<FrameInbound>,
    }

    /// Transports for nodes 1..=n on loopback ports, certificates from one
    /// test CA, each a peer of every other, connected (bounded wait).
    pub async fn start_transports(nodes: u64, config: TransportConfig) -> BTreeMap<u64, Started> {
        let ca = ClusterCa::generate("multiraft-test").expect("CA");
        let mut started = BTreeMap::new();
        for id in 1..=nodes {
            let identity = ca.identity(&ca.issue_node(NodeId(id)).expect("node cert"));
            let inbound = Arc::new(FrameInbound::default());
            let (clients, clients_rx) = tokio::sync::mpsc::channel(1);
            std::mem::forget(clients_rx);
            let metrics = Arc::new(NetMetrics::default());
            let transport = Transport::start(
                NodeId(id),
                SocketAddr::from(([127, 0, 0, 1], 0)),
                &[],
                &identity,
                config.clone(),
                Wiring {
                    inbound: inbound.clone(),
                    expediter: Arc::new(Expediter::default()),
                    clients,
                    metrics: metrics.clone(),
                    faults: Arc::new(Faults::none()),
                },
            )
            .expect("start transport");
            started.insert(
                id,
                Started {
                    transport,
                    metrics,
                    inbound,
                },
            );
        }
        let addrs: Vec<PeerAddr> = started
            .values()
            .map(|s| PeerAddr {
                id: s.transport.node_id(),
                addr: s.transport.local_addr(),
            })
            .collect();
        for s in started.values() {
            for p in &addrs {
                if p.id != s.transport.node_id() {
                    s.transport.add_peer(p.clone());
                }
            }
        }
        for s in started.values() {
            assert!(
                s.transport.wait_connected(Duration::from_secs(20)).await,
                "transports connect within 20 s"
            );
        }
        started
    }

    impl QuicCluster<()> {
        /// Nodes whose appliers record what they apply; call from inside a
        /// Tokio runtime.
        pub async fn start(nodes: u64, groups: u64, config: LoopConfig) -> QuicCluster<()> {
            let (records, make) = recorders();
            let mut c = QuicCluster::start_with(nodes, groups, config, make).await;
            c.applied = records.lock().unwrap().clone();
            c
        }
    }

    impl<R: Send + 'static> QuicCluster<R> {
        /// Nodes whose appliers `make` builds; call from inside a Tokio
        /// runtime (a multi-threaded one when `make` blocks on it).
        pub async fn start_with(
            nodes: u64,
            groups: u64,
            config: LoopConfig,
            make: MakeApplier<R>,
        ) -> QuicCluster<R> {
            let root = tempfile::tempdir().expect("temp dir");
            let voters: Vec<u64> = (1..=nodes).collect();
            let mut c = QuicCluster {
                _root: root,
                loops: BTreeMap::new(),
                transports: BTreeMap::new(),
                applied: BTreeMap::new(),
                metrics: BTreeMap::new(),
                frames: BTreeMap::new(),
                engines: BTreeMap::new(),
                router: Router::default(),
            };
            let mut inbounds = BTreeMap::new();
            for (id, t) in start_transports(nodes, TransportConfig::default()).await {
                c.metrics.insert(id, t.metrics);
                inbounds.insert(id, t.inbound);
                c.transports.insert(id, t.transport);
            }
            for id in 1..=nodes {
                let dir = c._root.path().join(format!("n{id}"));
                let engine = Engine::open(StorageConfig::new(&dir)).expect("open engine");
                let all: Vec<ShardId> = (1..=groups).map(ShardId).collect();
                GroupStore::bootstrap_many(&engine, &all, &voters).expect("bootstrap");
                let (applier, applied) = make(id, &engine);
                let mut driver = Driver::new(engine.clone(), id, DriverConfig::default());
                for g in 1..=groups {
                    let from = applied.get(&ShardId(g)).copied().unwrap_or(0);
                    driver.open_group(ShardId(g), from).expect("open group");
                }
                let out = QuicOutbound::new(
                    c.transports[&id].clone(),
                    tokio::runtime::Handle::current(),
                    Duration::from_secs(5),
                );
                c.frames.insert(id, out.counters());
                let l = NodeLoop::start(driver, out, applier, config.clone()).expect("start loop");
                inbounds[&id].attach(l.mailbox());
                c.loops.insert(id, l);
                c.engines.insert(id, engine);
            }
            c
        }
    }
}

/// Appliers over the product's state machine (`multiraft::ShardApplier`).
pub mod apply {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::loops::MakeApplier;
    use tessera::command::CommandResponse;
    use tessera::multiraft::{Applier, ShardApplier};
    use tessera::storage::{Engine, StoreError};
    use tessera::{KeyRange, NodeId, ShardDescriptor, ShardId};

    /// Group g owns the keys that start with byte g.
    pub fn descriptor(g: u64) -> ShardDescriptor {
        ShardDescriptor::new(
            ShardId(g),
            KeyRange::new(vec![g as u8], vec![g as u8 + 1]),
            (1..=3).map(NodeId).collect(),
        )
    }

    pub fn key(g: u64, name: &str) -> Vec<u8> {
        let mut k = vec![g as u8];
        k.extend_from_slice(name.as_bytes());
        k
    }

    /// Where each node's groups started applying, at its last start.
    pub type Starts = Arc<std::sync::Mutex<BTreeMap<(u64, u64), u64>>>;

    pub fn shard_appliers(groups: u64, starts: Starts) -> MakeApplier<CommandResponse> {
        Arc::new(move |id, engine: &Engine| {
            let mut applier = ShardApplier::default();
            let mut applied = BTreeMap::new();
            for g in 1..=groups {
                let d = descriptor(g);
                let created = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(engine.create_shard(&d))
                });
                match created {
                    Ok(()) | Err(StoreError::ShardExists { .. }) => {}
                    Err(e) => panic!("create {g}: {e}"),
                }
                let (_log, machine) = engine.open_shard(ShardId(g)).expect("open shard");
                let from = applier.add(ShardId(g), machine);
                starts.lock().unwrap().insert((id, g), from);
                applied.insert(ShardId(g), from);
            }
            let applier: Box<dyn Applier<Response = CommandResponse>> = Box::new(applier);
            (applier, applied)
        })
    }
}
