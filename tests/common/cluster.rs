//! An in-process cluster of real nodes over real QUIC on 127.0.0.1, with the
//! transport's fault layer (blocked links, message loss), kill and restart
//! from the data folder, and typed, bounded waits that fail with a message.

use super::wait::{self, WaitError};
use openraft::async_runtime::watch::WatchReceiver as _;
use openraft::ServerState;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera::command::{Command, CommandResponse};
use tessera::net::{Faults, PeerAddr, TransportConfig};
use tessera::node::{Bootstrap, Node, NodeConfig, RaftTimings};
use tessera::storage::StorageConfig;
use tessera::tls::issue::{write_pem, ClusterCa};
use tessera::tls::{TlsFiles, TlsIdentity};
use tessera::{NodeId, ShardDescriptor, ShardId};

/// Longest one replica's creation may take in [`TestCluster::create_shards`]
/// (it writes the group's first records and starts its Raft instance).
pub const CREATE_SHARD_DEADLINE: Duration = Duration::from_secs(30);

/// Raft and transport timings of a test cluster.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    pub linger_ms: u64,
    pub snapshot_logs_since_last: u64,
    pub snapshot_logs_to_keep: u64,
    pub client_connections_max: usize,
    pub split: tessera::node::SplitConfig,
    pub replica_gc: tessera::node::ReplicaGcConfig,
    /// `[rebalance]` (automatic rebalancing; off unless a test turns it on).
    pub rebalance: tessera::node::RebalanceConfig,
    /// `raft.quiesce_after_ms` (0: quiescence off).
    pub quiesce_after_ms: u64,
    /// `raft.dormant_after_ms` (with quiescence on: 0 keeps every
    /// sleeping replica's openraft instance).
    pub dormant_after_ms: u64,
    /// `raft.batch_data_shards`: the bootstrap's data shards run on the
    /// batch system.
    pub batch_data_shards: bool,
}

impl Timings {
    /// Quick elections for functional tests.
    pub fn fast() -> Self {
        Timings {
            heartbeat_ms: 100,
            election_min_ms: 600,
            election_max_ms: 1200,
            linger_ms: 20,
            snapshot_logs_since_last: 10_000,
            snapshot_logs_to_keep: 1000,
            client_connections_max: 4096,
            split: tessera::node::SplitConfig::default(),
            replica_gc: tessera::node::ReplicaGcConfig::default(),
            rebalance: tessera::node::RebalanceConfig::default(),
            quiesce_after_ms: 0,
            dormant_after_ms: 30_000,
            batch_data_shards: false,
        }
    }

    /// Hundreds of active groups on two cores (debug build).
    pub fn many_active_groups() -> Self {
        Timings {
            heartbeat_ms: 300,
            election_min_ms: 1500,
            election_max_ms: 3000,
            linger_ms: 60,
            ..Self::fast()
        }
    }

    /// Many idle groups on two cores: slower heartbeats. openraft 0.10
    /// ticks every group 13/64 of a heartbeat interval (0.9: every 1½),
    /// so 3,000 idle groups at a 500 ms heartbeat would tick 15,000 times a
    /// second; at 1,500 ms they tick about as often as 0.9's did at 500.
    pub fn many_groups() -> Self {
        Timings {
            heartbeat_ms: 1500,
            election_min_ms: 7500,
            election_max_ms: 15000,
            linger_ms: 120,
            snapshot_logs_since_last: 10_000,
            snapshot_logs_to_keep: 1000,
            ..Self::fast()
        }
    }
}

/// One shard over the whole key space on `replicas`, initialised by the first.
pub fn whole_range_shard(replicas: &[u64]) -> ShardDescriptor {
    let replicas: Vec<NodeId> = replicas.iter().map(|&n| NodeId(n)).collect();
    let mut d = ShardDescriptor::new(ShardId(1), tessera::KeyRange::full(), replicas.clone());
    d.leader_hint = Some(replicas[0]);
    d
}

/// `n` shards splitting the key space evenly by their first two bytes, each
/// on `replicas`, initialised by `leader(i)`.
pub fn spread_shards(
    n: u64,
    replicas: &[u64],
    leader: impl Fn(u64) -> u64,
) -> Vec<ShardDescriptor> {
    let bound = |j: u64| -> Vec<u8> {
        if j == 0 || j == n {
            Vec::new()
        } else {
            ((j * 65536 / n) as u16).to_be_bytes().to_vec()
        }
    };
    (0..n)
        .map(|i| {
            let mut d = ShardDescriptor::new(
                ShardId(i + 1),
                tessera::KeyRange::new(bound(i), bound(i + 1)),
                replicas.iter().map(|&r| NodeId(r)).collect(),
            );
            d.leader_hint = Some(NodeId(leader(i)));
            d
        })
        .collect()
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub ca: ClusterCa,
    pub faults: Arc<Faults>,
    configs: BTreeMap<NodeId, NodeConfig>,
    identities: BTreeMap<NodeId, TlsIdentity>,
    nodes: BTreeMap<NodeId, Arc<Node>>,
}

fn pick_addr() -> std::net::SocketAddr {
    tessera::net::ports::free_loopback_addrs(1).expect("a free loopback port")[0]
}

impl TestCluster {
    /// Starts nodes `ids`; `absent` ids are listed as peers but never run
    /// (their certificates can be used by tests to impersonate).
    pub async fn start(
        ids: &[u64],
        absent: &[u64],
        bootstrap: Option<(u64, Vec<u64>)>,
        t: Timings,
    ) -> TestCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = ClusterCa::generate("test").expect("CA");
        let ca_path = dir.path().join("ca.pem");
        write_pem(&ca_path, &ca.cert_pem(), false).expect("write CA");
        let all: Vec<u64> = ids.iter().chain(absent).copied().collect();
        let addrs: BTreeMap<u64, std::net::SocketAddr> =
            all.iter().map(|&i| (i, pick_addr())).collect();
        let mut configs = BTreeMap::new();
        let mut identities = BTreeMap::new();
        for &i in ids {
            let id = NodeId(i);
            let issued = ca.issue_node(id).expect("node cert");
            let cert = dir.path().join(format!("n{i}.pem"));
            let key = dir.path().join(format!("n{i}-key.pem"));
            write_pem(&cert, &issued.cert_pem, false).expect("write cert");
            write_pem(&key, &issued.key_pem, true).expect("write key");
            identities.insert(id, ca.identity(&issued));
            let cfg = NodeConfig {
                node_id: id,
                listen_addr: addrs[&i],
                data_dir: dir.path().join(format!("n{i}")),
                metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
                tls: TlsFiles {
                    ca_cert: ca_path.clone(),
                    cert,
                    key,
                },
                peers: all
                    .iter()
                    .filter(|&&p| p != i)
                    .map(|&p| PeerAddr {
                        id: NodeId(p),
                        addr: addrs[&p],
                    })
                    .collect(),
                raft: RaftTimings {
                    heartbeat_interval_ms: t.heartbeat_ms,
                    election_timeout_ms_min: t.election_min_ms,
                    election_timeout_ms_max: t.election_max_ms,
                    snapshot_logs_since_last: t.snapshot_logs_since_last,
                    snapshot_logs_to_keep: t.snapshot_logs_to_keep,
                    quiesce_after_ms: t.quiesce_after_ms,
                    dormant_after_ms: t.dormant_after_ms,
                    batch_data_shards: t.batch_data_shards,
                    ..Default::default()
                },
                transport: TransportConfig {
                    heartbeat_linger_ms: t.linger_ms,
                    client_connections_max: t.client_connections_max,
                    ..Default::default()
                },
                storage: StorageConfig {
                    block_cache_bytes: 8 << 20,
                    ..Default::default()
                },
                bootstrap: bootstrap.as_ref().map(|(shards, members)| Bootstrap {
                    shards: *shards,
                    members: members.iter().map(|&m| NodeId(m)).collect(),
                }),
                split: t.split,
                replica_gc: t.replica_gc,
                rebalance: t.rebalance,
                api: Default::default(),
            };
            configs.insert(id, cfg);
        }
        let mut c = TestCluster {
            dir,
            ca,
            faults: Arc::new(Faults::none()),
            configs,
            identities,
            nodes: BTreeMap::new(),
        };
        for &i in ids {
            c.restart(i).await;
        }
        c
    }

    /// A client of the cluster (every configured node) with a 60 s deadline.
    #[allow(dead_code)]
    pub fn client(&self) -> tessera::Client {
        let issued = self.ca.issue_admin("test").expect("admin cert");
        let opts = tessera::client::ClientOptions {
            deadline: Duration::from_secs(60),
            ..Default::default()
        };
        tessera::Client::from_identity(&self.ca.identity(&issued), self.config_addrs(), opts)
            .expect("client")
    }

    pub fn node(&self, id: u64) -> &Arc<Node> {
        self.nodes
            .get(&NodeId(id))
            .unwrap_or_else(|| panic!("n{id} is not running"))
    }

    pub fn is_up(&self, id: u64) -> bool {
        self.nodes.contains_key(&NodeId(id))
    }

    pub fn up(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.nodes.values()
    }

    /// Every configured node's QUIC address, running or not.
    pub fn config_addrs(&self) -> Vec<(NodeId, std::net::SocketAddr)> {
        self.configs
            .values()
            .map(|c| (c.node_id, c.listen_addr))
            .collect()
    }

    pub fn config(&self, id: u64) -> &NodeConfig {
        &self.configs[&NodeId(id)]
    }

    /// Stops a node (groups, connections, database); its folder stays.
    pub async fn kill(&mut self, id: u64) {
        tracing::info!(node = id, "killing");
        let node = self
            .nodes
            .remove(&NodeId(id))
            .unwrap_or_else(|| panic!("n{id} is not running"));
        node.shutdown(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("n{id} shutdown: {e}"));
    }

    /// Starts (or restarts) a node from its data folder.
    pub async fn restart(&mut self, id: u64) {
        tracing::info!(node = id, "starting");
        let nid = NodeId(id);
        let node = Node::start(
            self.configs[&nid].clone(),
            &self.identities[&nid],
            self.faults.clone(),
        )
        .await
        .unwrap_or_else(|e| panic!("start n{id}: {e}"));
        self.nodes.insert(nid, node);
    }

    /// Configures and starts a new node `id` that knows only the nodes
    /// configured so far (it joins by announcing itself; nothing is
    /// bootstrapped on it).
    #[allow(dead_code)]
    pub async fn add_node(&mut self, id: u64) {
        let nid = NodeId(id);
        assert!(!self.configs.contains_key(&nid), "n{id} exists");
        let mut cfg = self.configs.values().next().expect("a node").clone();
        let issued = self.ca.issue_node(nid).expect("node cert");
        let cert = self.dir.path().join(format!("n{id}.pem"));
        let key = self.dir.path().join(format!("n{id}-key.pem"));
        write_pem(&cert, &issued.cert_pem, false).expect("write cert");
        write_pem(&key, &issued.key_pem, true).expect("write key");
        self.identities.insert(nid, self.ca.identity(&issued));
        cfg.peers = self
            .configs
            .values()
            .map(|c| PeerAddr {
                id: c.node_id,
                addr: c.listen_addr,
            })
            .collect();
        cfg.node_id = nid;
        cfg.listen_addr = pick_addr();
        cfg.data_dir = self.dir.path().join(format!("n{id}"));
        cfg.tls.cert = cert;
        cfg.tls.key = key;
        cfg.bootstrap = None;
        self.configs.insert(nid, cfg);
        self.restart(id).await;
    }

    /// Creates each of `descs` on its replicas (each node in order, nodes
    /// in parallel); a creation that takes over [`CREATE_SHARD_DEADLINE`]
    /// fails the test.
    pub async fn create_shards(&self, descs: &[ShardDescriptor]) {
        let mut set = tokio::task::JoinSet::new();
        for node in self.nodes.values() {
            let mine: Vec<ShardDescriptor> = descs
                .iter()
                .filter(|d| d.replicas.contains(&node.id()))
                .cloned()
                .collect();
            let node = node.clone();
            set.spawn(async move {
                let total = mine.len();
                for (done, d) in mine.into_iter().enumerate() {
                    tokio::time::timeout(CREATE_SHARD_DEADLINE, node.create_shard(&d))
                        .await
                        .unwrap_or_else(|_| {
                            panic!(
                                "create {} on {}: not done within {CREATE_SHARD_DEADLINE:?} \
                                 ({done} of {total} created before it)",
                                d.id,
                                node.id()
                            )
                        })
                        .unwrap_or_else(|e| panic!("create {} on {}: {e}", d.id, node.id()));
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.expect("create task");
        }
    }

    /// The leader of `shard` among `among` (running nodes), once exactly one
    /// of them leads it at the highest term they know.
    pub async fn wait_leader_among(
        &self,
        shard: ShardId,
        among: &[u64],
        timeout: Duration,
    ) -> Result<NodeId, WaitError> {
        let what = format!("wait_leader: a leader of {shard} among {among:?}");
        wait::until(&what, timeout, || async {
            let mut best: Option<(u64, NodeId)> = None;
            let mut max_term = 0;
            for &i in among {
                let Some(node) = self.nodes.get(&NodeId(i)) else {
                    continue;
                };
                let Some(raft) = node.group(shard).await else {
                    continue;
                };
                let m = raft.metrics().borrow_watched().clone();
                max_term = max_term.max(m.current_term);
                if m.state == ServerState::Leader {
                    best = Some((m.current_term, node.id()));
                }
            }
            match best {
                Some((term, leader)) if term == max_term => Ok(leader),
                other => Err(format!(
                    "leader at term: {other:?}, highest term {max_term}"
                )),
            }
        })
        .await
    }

    /// The leader of batch-system shard `shard` among the running nodes,
    /// once one of them leads it at the highest term they know.
    #[allow(dead_code)]
    pub async fn wait_batch_leader(
        &self,
        shard: ShardId,
        timeout: Duration,
    ) -> Result<NodeId, WaitError> {
        let what = format!("wait_batch_leader: a leader of {shard}");
        wait::until(&what, timeout, || async {
            let max_term = self
                .nodes
                .values()
                .filter_map(|n| n.replica_term(shard))
                .max();
            let leader = self.nodes.values().find(|n| {
                n.batch_leader(shard) == Some(n.id()) && n.replica_term(shard) == max_term
            });
            match leader {
                Some(n) => Ok(n.id()),
                None => Err(format!("no leader at the highest term {max_term:?}")),
            }
        })
        .await
    }

    /// The leader of `shard` among all running nodes.
    pub async fn wait_leader(
        &self,
        shard: ShardId,
        timeout: Duration,
    ) -> Result<NodeId, WaitError> {
        let among: Vec<u64> = self.nodes.keys().map(|n| n.0).collect();
        self.wait_leader_among(shard, &among, timeout).await
    }

    /// Waits for a leader of every shard a running node hosts.
    pub async fn wait_leaders(&self, timeout: Duration) -> Result<(), WaitError> {
        let node = self.up().next().expect("a running node").clone();
        for s in node.shard_ids() {
            self.wait_leader(s, timeout).await?;
        }
        Ok(())
    }

    /// Writes through the current leader (found again after each refusal)
    /// until acknowledged; returns the entry's log index.
    pub async fn put(
        &self,
        shard: ShardId,
        key: &[u8],
        value: &[u8],
        timeout: Duration,
    ) -> Result<u64, WaitError> {
        let deadline = Instant::now() + timeout;
        let what = format!("put to {shard} acknowledged");
        wait::until(&what, timeout, || async {
            let left = deadline.saturating_duration_since(Instant::now());
            let leader = self
                .wait_leader(shard, left)
                .await
                .map_err(|e| e.to_string())?;
            let raft = self.nodes[&leader]
                .group(shard)
                .await
                .expect("leader hosts shard");
            let attempt = tokio::time::timeout(
                left.min(Duration::from_secs(5)),
                raft.client_write(Command::put(key.to_vec(), value.to_vec())),
            )
            .await;
            match attempt {
                Ok(Ok(resp)) => match resp.data {
                    CommandResponse::Write(_) => Ok(resp.log_id.index),
                    other => panic!("put refused by the state machine: {other:?}"),
                },
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("attempt timed out".into()),
            }
        })
        .await
    }

    /// Writes through node `via` (which must lead `shard`), retrying until
    /// acknowledged or a minute passes; returns the entry's log index.
    pub async fn put_via(
        &self,
        via: NodeId,
        shard: ShardId,
        key: &[u8],
        value: &[u8],
    ) -> Result<u64, WaitError> {
        let timeout = Duration::from_secs(60);
        let what = format!("put via {via} to {shard} acknowledged");
        let raft = self.nodes[&via]
            .group(shard)
            .await
            .ok_or_else(|| WaitError::new(&what, timeout, Some("shard not hosted".into())))?;
        wait::until(&what, timeout, || async {
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                raft.client_write(Command::put(key.to_vec(), value.to_vec())),
            )
            .await;
            match r {
                Ok(Ok(resp)) => Ok(resp.log_id.index),
                other => Err(format!("{other:?}")),
            }
        })
        .await
    }

    /// A linearizable read barrier on `shard`'s current leader, retried
    /// (leaders change, peers reconnect) until it succeeds; returns the
    /// leader that confirmed it.
    pub async fn wait_linearizable(
        &self,
        shard: ShardId,
        timeout: Duration,
    ) -> Result<NodeId, WaitError> {
        let deadline = Instant::now() + timeout;
        let what = format!("wait_linearizable: a read barrier on {shard}");
        wait::until(&what, timeout, || async {
            let left = deadline.saturating_duration_since(Instant::now());
            let leader = self
                .wait_leader(shard, left)
                .await
                .map_err(|e| e.to_string())?;
            let raft = self.nodes[&leader]
                .group(shard)
                .await
                .expect("leader hosts shard");
            match tokio::time::timeout(
                Duration::from_secs(5),
                raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex),
            )
            .await
            {
                Ok(Ok(_)) => Ok(leader),
                other => Err(format!("{other:?}")),
            }
        })
        .await
    }

    /// Moves leadership of `shard` to `to` with openraft's leader transfer
    /// (asked of whoever leads; repeated until `to` leads or `timeout`
    /// passes).
    pub async fn transfer_leader(
        &self,
        shard: ShardId,
        to: NodeId,
        timeout: Duration,
    ) -> Result<(), WaitError> {
        let deadline = Instant::now() + timeout;
        let what = format!("transfer_leader: {to} leads {shard}");
        let target = self.nodes[&to]
            .group(shard)
            .await
            .ok_or_else(|| WaitError::new(&what, timeout, Some("target lacks the shard".into())))?;
        wait::until(&what, timeout, || async {
            if self.nodes[&to].shards_led().contains(&shard) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let leader = self
                .wait_leader(shard, left)
                .await
                .map_err(|e| e.to_string())?;
            if let Some(r) = self.nodes[&leader].group(shard).await {
                let _ = r.trigger().transfer_leader(to).await;
            }
            target
                .wait(Some(Duration::from_secs(5).min(left)))
                .metrics(
                    |m| m.state == openraft::ServerState::Leader,
                    "transfer_leader: target leads",
                )
                .await
                .map(|_| ())
                .map_err(|e| format!("{leader} still leads: {e}"))
        })
        .await
    }

    /// Waits until every node of `on` applied everything in the log of
    /// `shard`'s leader (as it is when the leader is found).
    #[allow(dead_code)]
    pub async fn wait_caught_up(
        &self,
        shard: ShardId,
        on: &[u64],
        timeout: Duration,
    ) -> Result<(), WaitError> {
        let leader = self.wait_leader(shard, timeout).await?;
        let last = match self.node(leader.0).group(shard).await {
            Some(r) => r.metrics().borrow_watched().last_log_index.unwrap_or(0),
            None => 0,
        };
        self.wait_applied(shard, last, on, timeout).await
    }

    /// Waits (openraft's `wait()`) until `shard` has applied `index` on
    /// every node of `on`.
    pub async fn wait_applied(
        &self,
        shard: ShardId,
        index: u64,
        on: &[u64],
        timeout: Duration,
    ) -> Result<(), WaitError> {
        for &i in on {
            let what = format!("wait_applied: {shard} on n{i} applies {index}");
            let node = self.nodes.get(&NodeId(i));
            let raft = match node {
                Some(n) => n.group(shard).await,
                None => None,
            }
            .ok_or_else(|| WaitError::new(&what, timeout, Some("not hosted".into())))?;
            raft.wait(Some(timeout))
                .applied_index_at_least(Some(index), "wait_applied")
                .await
                .map_err(|e| WaitError::new(&what, timeout, Some(e.to_string())))?;
        }
        Ok(())
    }

    /// Waits until `f` holds; fails naming `what` after `timeout`.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Self) -> bool,
    ) -> Result<(), WaitError> {
        wait::until(what, timeout, || {
            let ok = f(self);
            async move {
                if ok {
                    Ok(())
                } else {
                    Err("not yet".to_string())
                }
            }
        })
        .await
    }

    /// Stops every running node.
    pub async fn shutdown(mut self) {
        let ids: Vec<u64> = self.nodes.keys().map(|n| n.0).collect();
        for i in ids {
            self.kill(i).await;
        }
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,openraft=error,quinn=error".into()),
        )
        .with_test_writer()
        .try_init();
}
