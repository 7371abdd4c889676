//! Real `tessera serve` processes for the fault tests: certificates and one
//! config per node, and processes started (on loopback or inside a network
//! namespace), SIGKILLed and restarted.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tessera::client::ClientOptions;
use tessera::net::PeerAddr;
use tessera::node::{Bootstrap, NodeConfig, RaftTimings};
use tessera::tls::issue::{write_pem, ClusterCa};
use tessera::tls::TlsFiles;
use tessera::{Client, NodeId};

/// One `tessera serve` process.
pub struct Proc {
    pub id: NodeId,
    config: PathBuf,
    /// The network namespace it runs in (`ip netns exec`), if any.
    netns: Option<String>,
    child: Option<Child>,
}

impl Proc {
    pub fn new(id: NodeId, config: PathBuf, netns: Option<String>) -> Proc {
        Proc {
            id,
            config,
            netns,
            child: None,
        }
    }

    /// Starts `tessera serve` (with `FAILPOINTS` set to `failpoints`, if
    /// any) and waits, bounded, for its `serving` line.
    pub fn start(&mut self, failpoints: Option<&str>) {
        let bin = env!("CARGO_BIN_EXE_tessera");
        let mut cmd = match &self.netns {
            // `ip netns exec` execs the program: the child is tessera itself.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.as_str(), bin]);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(["serve", "--config"])
            .arg(&self.config)
            .env_remove("FAILPOINTS")
            .stdout(Stdio::piped());
        // `TESSERA_NODE_LOG_DIR`: each node's log appended to `<dir>/n<id>.log`
        // (at `TESSERA_NODE_RUST_LOG`, default `info`), for reading a failed
        // soak against its timeline. Otherwise errors only, discarded.
        match std::env::var_os("TESSERA_NODE_LOG_DIR") {
            Some(dir) => {
                let path = Path::new(&dir).join(format!("n{}.log", self.id.0));
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .unwrap_or_else(|e| panic!("node log {}: {e}", path.display()));
                let level =
                    std::env::var("TESSERA_NODE_RUST_LOG").unwrap_or_else(|_| "info".into());
                cmd.env("RUST_LOG", level).stderr(file);
            }
            None => {
                cmd.env("RUST_LOG", "error").stderr(Stdio::null());
            }
        }
        if let Some(f) = failpoints {
            cmd.env("FAILPOINTS", f);
        }
        let mut child = cmd.spawn().expect("spawn tessera serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!(
                    "{}: tessera serve printed no `serving` line within 30 s",
                    self.id
                )
            });
        assert!(line.starts_with("serving"), "{line}");
        self.child = Some(child);
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// One process per node on loopback, from the configs `write_cluster`
/// wrote, each started (waiting for its `serving` line).
pub fn start_on_loopback(nodes: &[(NodeId, SocketAddr)], configs: Vec<PathBuf>) -> Vec<Proc> {
    let mut procs: Vec<Proc> = nodes
        .iter()
        .zip(configs)
        .map(|((id, _), config)| Proc::new(*id, config, None))
        .collect();
    for p in &mut procs {
        p.start(None);
    }
    procs
}

/// Free loopback addresses for `n` nodes (ids 1..=n).
pub fn loopback_nodes(n: u64) -> Vec<(NodeId, SocketAddr)> {
    tessera::net::ports::free_loopback_addrs(n as usize)
        .expect("free loopback ports")
        .into_iter()
        .enumerate()
        .map(|(i, a)| (NodeId(i as u64 + 1), a))
        .collect()
}

/// Certificates and one config per node under `dir`: fast Raft timings, the
/// cluster bootstrapped with `shards` shards over every node (3 replicas
/// each). Returns the CA and each node's config path.
pub fn write_cluster(
    dir: &Path,
    name: &str,
    nodes: &[(NodeId, SocketAddr)],
    shards: u64,
) -> (ClusterCa, Vec<PathBuf>) {
    write_cluster_with(dir, name, nodes, shards, |_| {})
}

/// [`write_cluster`] with each node's config changed by `edit` before it
/// is written.
pub fn write_cluster_with(
    dir: &Path,
    name: &str,
    nodes: &[(NodeId, SocketAddr)],
    shards: u64,
    edit: impl Fn(&mut NodeConfig),
) -> (ClusterCa, Vec<PathBuf>) {
    let ca = ClusterCa::generate(name).unwrap();
    write_pem(&dir.join("ca.pem"), &ca.cert_pem(), false).unwrap();
    let ids: Vec<NodeId> = nodes.iter().map(|(id, _)| *id).collect();
    let mut configs = Vec::new();
    for (id, addr) in nodes {
        let issued = ca.issue_node(*id).unwrap();
        write_pem(&dir.join(format!("n{}.pem", id.0)), &issued.cert_pem, false).unwrap();
        write_pem(
            &dir.join(format!("n{}-key.pem", id.0)),
            &issued.key_pem,
            true,
        )
        .unwrap();
        let mut cfg = NodeConfig {
            node_id: *id,
            listen_addr: *addr,
            data_dir: PathBuf::from(format!("n{}", id.0)),
            metrics_addr: None,
            tls: TlsFiles {
                ca_cert: "ca.pem".into(),
                cert: format!("n{}.pem", id.0).into(),
                key: format!("n{}-key.pem", id.0).into(),
            },
            peers: nodes
                .iter()
                .filter(|(p, _)| p != id)
                .map(|(p, a)| PeerAddr { id: *p, addr: *a })
                .collect(),
            raft: RaftTimings {
                heartbeat_interval_ms: 100,
                election_timeout_ms_min: 600,
                election_timeout_ms_max: 1200,
                // `TESSERA_QUIESCE_AFTER_MS`: the soak with quiescence on.
                quiesce_after_ms: std::env::var("TESSERA_QUIESCE_AFTER_MS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                // `TESSERA_DORMANT_AFTER_MS`: how soon sleeping replicas
                // drop their instance in that soak (default: the node's).
                dormant_after_ms: std::env::var("TESSERA_DORMANT_AFTER_MS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(RaftTimings::default().dormant_after_ms),
                batch_data_shards: batch_data_shards(),
                ..Default::default()
            },
            transport: tessera::net::TransportConfig {
                heartbeat_linger_ms: 20,
                ..Default::default()
            },
            storage: Default::default(),
            bootstrap: Some(Bootstrap {
                shards,
                members: ids.clone(),
            }),
            split: Default::default(),
            replica_gc: Default::default(),
            rebalance: Default::default(),
            api: Default::default(),
        };
        edit(&mut cfg);
        let path = dir.join(format!("n{}.toml", id.0));
        std::fs::write(&path, cfg.to_toml()).unwrap();
        configs.push(path);
    }
    (ca, configs)
}

/// Whether the process tests' data shards run on the batch system (the
/// default): `TESSERA_OPENRAFT_DATA_SHARDS=1` puts them on openraft (the
/// network soak on it).
pub fn batch_data_shards() -> bool {
    std::env::var("TESSERA_OPENRAFT_DATA_SHARDS").map_or(true, |v| v != "1")
}

/// A client with an admin certificate (data and admin commands).
pub fn admin_client(
    ca: &ClusterCa,
    nodes: &[(NodeId, SocketAddr)],
    deadline: Duration,
    attempt_timeout: Duration,
) -> Client {
    let issued = ca.issue_admin("fault-tests").unwrap();
    Client::from_identity(
        &ca.identity(&issued),
        nodes.to_vec(),
        ClientOptions {
            deadline,
            attempt_timeout,
            ..Default::default()
        },
    )
    .unwrap()
}
