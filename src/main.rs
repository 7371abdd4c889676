//! `tessera`: the node binary.
//!
//! - `tessera serve --config node.toml`: one node (see `NodeConfig`).
//! - `tessera dev`: a local cluster of N nodes (default 3) on 127.0.0.1 over
//!   QUIC with mutual TLS, in one process, on a data folder (created with
//!   certificates, node configs and `cluster.toml` on first start, resumed
//!   afterwards); proves a replicated write and a linearizable read per
//!   shard, prints `ready`, runs until Ctrl-C/SIGTERM.
//! - `tessera torture-store` (hidden): the child process of the storage
//!   crash tests.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use openraft::async_runtime::watch::WatchReceiver as _;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera::cluster_file::{ClusterFile, ClusterNode};
use tessera::command::{Command, CommandResponse};
use tessera::net::{Faults, PeerAddr};
use tessera::node::{Bootstrap, Node, NodeConfig};
use tessera::tls::issue::{write_pem, ClusterCa};
use tessera::tls::{TlsFiles, TlsIdentity};
use tessera::{NodeId, ShardId};

mod torture;

/// jemalloc for the node binary (feature `jemalloc`, on by default).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (its `malloc_conf`, read before `main`): a background
/// thread returns freed pages to the system a second after they are freed
/// (default: ten seconds, and only when the arena is busy). Without it the
/// instances dropped by dormant replicas stay resident: 10,000 idle shards
/// measured 54 KiB per replica with jemalloc's defaults, 46–52 with the
/// thread, 41–42 with the thread and the one-second decay.
#[cfg(feature = "jemalloc")]
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &u8 = &b"background_thread:true,dirty_decay_ms:1000\0"[0];

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Tessera: a multi-raft sharded key-value store",
    long_about = "Tessera: a multi-raft sharded key-value store.\n\n\
        `tessera dev` runs a local 3-node cluster for development; \
        `tessera serve --config node.toml` runs one node of a real cluster."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node from a TOML config file (node id, listen address, data
    /// folder, peers, certificates, Raft timings).
    Serve {
        /// The node's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a local development cluster: N nodes on 127.0.0.1 over QUIC with
    /// mutual TLS, every shard replicated on 3 of them. The first start
    /// creates the folder (certificates, node configs, cluster.toml for
    /// clients); later starts resume it with all data.
    Dev {
        /// Data folder.
        #[arg(long, default_value = "./tessera-data")]
        data_dir: PathBuf,
        /// Nodes to run (first start only; later starts use the folder's).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
        nodes: u64,
        /// Shards to create on first start, splitting the key space evenly
        /// (by first byte up to 256 shards, by the first two beyond).
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=10000))]
        shards: u64,
        /// Quiescence: idle shards stop ticking after this many ms without
        /// writes (overrides `raft.quiesce_after_ms` of every node's config,
        /// default 10000; 0 turns it off; at least the election timeout).
        #[arg(long)]
        quiesce_after_ms: Option<u64>,
        /// With quiescence on: a replica asleep this many ms drops its Raft
        /// instance until something needs it (overrides
        /// `raft.dormant_after_ms`, default 30000; 0 keeps every instance).
        #[arg(long)]
        dormant_after_ms: Option<u64>,
        /// Longest the log writer holds a sync back to gather more appends
        /// while many more shards are writing than it holds, in µs
        /// (overrides `storage.group_commit_linger_us`, default 1500; 0
        /// syncs at once).
        #[arg(long)]
        group_commit_linger_us: Option<u64>,
        /// An AppendEntries that only advances the commit waits this long
        /// for the group's next entries to carry it, in ms (overrides
        /// `raft.commit_linger_ms`, default 50; 0 sends it at once).
        #[arg(long)]
        commit_linger_ms: Option<u64>,
        /// Run the data shards on openraft (one set of tasks per shard)
        /// instead of the default batch system (one Raft loop per node
        /// steps every shard together: one synced write per round for all
        /// of them, one frame per peer). First start only: a folder keeps
        /// the system its shards were created on (sets
        /// `raft.batch_data_shards = false`).
        #[arg(long, conflicts_with = "batch_data_shards")]
        openraft_data_shards: bool,
        /// Run the data shards on the batch system: the default since
        /// 2026-12-08, kept for scripts.
        #[arg(long, hide = true)]
        batch_data_shards: bool,
    },
    /// Prepare a new node for a `tessera dev` folder: a certificate from the
    /// folder's CA, `DIR/node-N/node.toml` pointing at the existing nodes
    /// (it joins them when started), and an entry in `DIR/cluster.toml`.
    /// Start it with `tessera serve --config DIR/node-N/node.toml`; give it
    /// replicas with `tessera-ctl move-replica` or `tessera-ctl rebalance`.
    AddNode {
        /// The dev cluster's folder.
        #[arg(long, default_value = "./tessera-data")]
        data_dir: PathBuf,
    },
    /// List the shard replicas in a stopped node's data folder with their
    /// Raft state (RocksDB allows one process per folder).
    Inspect {
        /// The node's data folder (`DIR/node-N/data` for `tessera dev`).
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Crash-test child: drive the stores until killed (used by tests).
    #[command(hide = true)]
    TortureStore {
        /// Data folder.
        #[arg(long)]
        data_dir: PathBuf,
        /// Shards to drive.
        #[arg(long, default_value_t = 8)]
        shards: u64,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=error,quinn=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().context("start tokio runtime")?;
    match cli.cmd {
        Cmd::Serve { config } => rt.block_on(serve(config)),
        Cmd::Dev {
            data_dir,
            nodes,
            shards,
            quiesce_after_ms,
            dormant_after_ms,
            group_commit_linger_us,
            commit_linger_ms,
            openraft_data_shards,
            batch_data_shards: _,
        } => rt.block_on(dev(
            data_dir,
            nodes,
            shards,
            DevOverrides {
                quiesce_after_ms,
                dormant_after_ms,
                group_commit_linger_us,
                commit_linger_ms,
                openraft_data_shards,
            },
        )),
        Cmd::Inspect { data_dir } => inspect(data_dir),
        Cmd::AddNode { data_dir } => add_node(&data_dir),
        Cmd::TortureStore { data_dir, shards } => rt.block_on(torture::run(data_dir, shards)),
    }
}

async fn serve(config: PathBuf) -> Result<()> {
    // Failpoints from the environment (`FAILPOINTS`; active only in builds
    // with the `failpoints` feature): the fault tests give a restarted node
    // a slow or failing disk this way.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cfg = NodeConfig::load(&config)?;
    let identity = TlsIdentity::load(&cfg.tls)?;
    let node = Node::start(cfg, &identity, Arc::new(Faults::none())).await?;
    println!(
        "serving {} on {} ({} shards){}",
        node.id(),
        node.addr(),
        node.shard_ids().len(),
        node.metrics_addr()
            .map(|a| format!(", metrics on http://{a}/metrics"))
            .unwrap_or_default()
    );
    wait_for_shutdown_signal().await;
    tracing::info!("shutting down");
    node.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}

/// First start of `tessera dev`: certificates, one config per node, and the
/// cluster file, all under `dir`.
fn create_dev_cluster(dir: &Path, nodes: u64, shards: u64) -> Result<()> {
    let certs = dir.join("certs");
    let ca = ClusterCa::generate("dev")?;
    write_pem(&certs.join("ca.pem"), &ca.cert_pem(), false)?;
    write_pem(&certs.join("ca-key.pem"), &ca.key_pem(), true)?;
    // A plain client certificate (data only) for applications, and the
    // admin certificate the cluster file names (data and admin commands).
    let client = ca.issue_client("dev")?;
    write_pem(&certs.join("client.pem"), &client.cert_pem, false)?;
    write_pem(&certs.join("client-key.pem"), &client.key_pem, true)?;
    let admin = ca.issue_admin("dev")?;
    write_pem(&certs.join("admin.pem"), &admin.cert_pem, false)?;
    write_pem(&certs.join("admin-key.pem"), &admin.key_pem, true)?;
    let ids: Vec<NodeId> = (1..=nodes).map(NodeId).collect();
    // Ports below the ephemeral range: no client socket can take one while
    // a node is down (tessera::net::ports).
    let free = tessera::net::ports::free_loopback_addrs(2 * ids.len())?;
    let addrs: Vec<_> = free.chunks(2).map(|p| (p[0], p[1])).collect();
    for (i, id) in ids.iter().enumerate() {
        let peers = ids
            .iter()
            .enumerate()
            .filter(|(_, p)| *p != id)
            .map(|(j, p)| PeerAddr {
                id: *p,
                addr: addrs[j].0,
            })
            .collect();
        let bootstrap = Some(Bootstrap {
            shards,
            members: ids.clone(),
        });
        write_dev_node(dir, &ca, *id, addrs[i], peers, bootstrap)?;
    }
    let cluster = ClusterFile {
        ca_cert: PathBuf::from("certs/ca.pem"),
        client_cert: PathBuf::from("certs/admin.pem"),
        client_key: PathBuf::from("certs/admin-key.pem"),
        nodes: ids
            .iter()
            .enumerate()
            .map(|(i, id)| ClusterNode {
                id: *id,
                addr: addrs[i].0,
                metrics_addr: Some(addrs[i].1),
            })
            .collect(),
    };
    // Written last: its presence means the folder is complete.
    let tmp = dir.join("cluster.toml.tmp");
    cluster.save(&tmp)?;
    std::fs::rename(&tmp, dir.join("cluster.toml"))?;
    Ok(())
}

/// Writes node `id`'s certificate and key under `dir/certs` and its
/// `dir/node-N/node.toml` (paths relative to it); returns the config's path.
fn write_dev_node(
    dir: &Path,
    ca: &ClusterCa,
    id: NodeId,
    (addr, metrics): (std::net::SocketAddr, std::net::SocketAddr),
    peers: Vec<PeerAddr>,
    bootstrap: Option<Bootstrap>,
) -> Result<PathBuf> {
    let certs = dir.join("certs");
    let issued = ca.issue_node(id)?;
    write_pem(
        &certs.join(format!("node-{}.pem", id.0)),
        &issued.cert_pem,
        false,
    )?;
    write_pem(
        &certs.join(format!("node-{}-key.pem", id.0)),
        &issued.key_pem,
        true,
    )?;
    let node_dir = dir.join(format!("node-{}", id.0));
    std::fs::create_dir_all(&node_dir)?;
    let cfg = NodeConfig {
        node_id: id,
        listen_addr: addr,
        data_dir: PathBuf::from("data"),
        metrics_addr: Some(metrics),
        tls: TlsFiles {
            ca_cert: PathBuf::from("../certs/ca.pem"),
            cert: PathBuf::from(format!("../certs/node-{}.pem", id.0)),
            key: PathBuf::from(format!("../certs/node-{}-key.pem", id.0)),
        },
        peers,
        raft: Default::default(),
        transport: Default::default(),
        storage: Default::default(),
        bootstrap,
        split: Default::default(),
        replica_gc: Default::default(),
        rebalance: Default::default(),
        api: Default::default(),
    };
    let config = node_dir.join("node.toml");
    std::fs::write(&config, cfg.to_toml())?;
    Ok(config)
}

fn add_node(dir: &Path) -> Result<()> {
    let cluster_path = dir.join("cluster.toml");
    // Edited as written: resolved paths saved back would be resolved again
    // on the next load (`dir/dir/certs/...` for a relative `dir`).
    let mut cluster = ClusterFile::load_as_written(&cluster_path)
        .with_context(|| format!("{} is not a dev cluster folder", dir.display()))?;
    let certs = dir.join("certs");
    let key = std::fs::read_to_string(certs.join("ca-key.pem"))
        .with_context(|| format!("read {}", certs.join("ca-key.pem").display()))?;
    let ca = ClusterCa::from_key_pem("dev", &key)?;
    let id = NodeId(cluster.nodes.iter().map(|n| n.id.0).max().unwrap_or(0) + 1);
    let free = tessera::net::ports::free_loopback_addrs(2)?;
    let (addr, metrics) = (free[0], free[1]);
    let peers = cluster
        .nodes
        .iter()
        .map(|n| PeerAddr {
            id: n.id,
            addr: n.addr,
        })
        .collect();
    let config = write_dev_node(dir, &ca, id, (addr, metrics), peers, None)?;
    cluster.nodes.push(ClusterNode {
        id,
        addr,
        metrics_addr: Some(metrics),
    });
    let tmp = dir.join("cluster.toml.tmp");
    cluster.save(&tmp)?;
    std::fs::rename(&tmp, &cluster_path)?;
    println!(
        "{id}: start it with `tessera serve --config {}`",
        config.display()
    );
    Ok(())
}

/// Settings `tessera dev` overrides in every node's config.
struct DevOverrides {
    quiesce_after_ms: Option<u64>,
    dormant_after_ms: Option<u64>,
    group_commit_linger_us: Option<u64>,
    commit_linger_ms: Option<u64>,
    openraft_data_shards: bool,
}

async fn dev(data_dir: PathBuf, nodes: u64, shards: u64, over: DevOverrides) -> Result<()> {
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("create data folder {}", data_dir.display()))?;
    let cluster_path = data_dir.join("cluster.toml");
    if !cluster_path.exists() {
        if data_dir.join("db").exists() {
            bail!(
                "{} holds a single-node data folder of an older `tessera dev`; use another --data-dir",
                data_dir.display()
            );
        }
        create_dev_cluster(&data_dir, nodes, shards)?;
        tracing::info!(nodes, shards, dir = %data_dir.display(), "created a new dev cluster");
    }
    let cluster = ClusterFile::load(&cluster_path)?;
    // All nodes start at once, as separate machines would: each connects
    // to its peers while it creates its shards, so no group elects against
    // peers that have not started yet.
    let mut starting = tokio::task::JoinSet::new();
    for n in &cluster.nodes {
        let path = data_dir.join(format!("node-{}", n.id.0)).join("node.toml");
        let mut cfg = NodeConfig::load(&path)?;
        if let Some(q) = over.quiesce_after_ms {
            cfg.raft.quiesce_after_ms = q;
        }
        if let Some(d) = over.dormant_after_ms {
            cfg.raft.dormant_after_ms = d;
        }
        if let Some(l) = over.group_commit_linger_us {
            cfg.storage.group_commit_linger_us = l;
        }
        if let Some(l) = over.commit_linger_ms {
            cfg.raft.commit_linger_ms = l;
        }
        if over.openraft_data_shards {
            cfg.raft.batch_data_shards = false;
        }
        cfg.validate()?;
        let identity = TlsIdentity::load(&cfg.tls)?;
        let id = n.id;
        starting.spawn(async move {
            let node = Node::start(cfg, &identity, Arc::new(Faults::none()))
                .await
                .with_context(|| format!("start {id}"))?;
            anyhow::Ok((id, node))
        });
    }
    let mut running: BTreeMap<NodeId, Arc<Node>> = BTreeMap::new();
    while let Some(started) = starting.join_next().await {
        let (id, node) = started.context("node start task")??;
        running.insert(id, node);
    }
    let mut shard_ids: Vec<ShardId> = running.values().flat_map(|n| n.shard_ids()).collect();
    shard_ids.sort();
    shard_ids.dedup();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut leaders: BTreeMap<NodeId, usize> = BTreeMap::new();
    // Every shard proves a linearizable read and a replicated write (a
    // no-op: nothing lands in the user's key space), many shards at once.
    let nodes = Arc::new(running.clone());
    let mut checks = tokio::task::JoinSet::new();
    for shard in shard_ids.iter().copied() {
        // A group asleep on its leader (quiescence) has proved both: its
        // leader's first entry reached every follower and committed, and
        // every follower answered the leader's hibernation request under
        // its vote. Waking it (and rebuilding a dormant one) proves nothing
        // more, and at 10,000 shards costs seconds.
        if let Some(n) = running
            .values()
            .find(|n| n.sleeping_leader(shard) == Some(n.id()))
        {
            *leaders.entry(n.id()).or_default() += 1;
            continue;
        }
        if checks.len() >= DEV_CHECKS_IN_FLIGHT {
            count_check(&mut checks, &mut leaders).await?;
        }
        let nodes = nodes.clone();
        if running.values().any(|n| n.is_batch_shard(shard)) {
            checks.spawn(async move { on_batch_leader(&nodes, shard, deadline).await });
            continue;
        }
        checks.spawn(async move {
            on_leader(&nodes, shard, deadline, |_, raft| async move {
                raft.ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
                    .await?;
                let resp = raft.client_write(Command::Noop).await?;
                if !matches!(resp.data, CommandResponse::Empty) {
                    bail!("the no-op was answered {:?}", resp.data);
                }
                Ok(())
            })
            .await
        });
    }
    while !checks.is_empty() {
        count_check(&mut checks, &mut leaders).await?;
    }
    // Shutdown below wants the only handles to the nodes.
    drop(nodes);
    // The boot counter lives in the meta shard (the authoritative route
    // table), outside the user's key space.
    let (_, boot) = on_leader(
        &running,
        tessera::meta::META_SHARD,
        deadline,
        |node, raft| async move {
            let key = tessera::meta::dev_boot_key();
            raft.ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
                .await?;
            let n = match node.engine().get(&key)? {
                Some(v) => u64::from_be_bytes(v.as_slice().try_into().context("boot counter")?),
                None => 0,
            };
            let resp = raft
                .client_write(Command::put(key, (n + 1).to_be_bytes().to_vec()))
                .await?;
            if !matches!(resp.data, CommandResponse::Write(_)) {
                bail!("the boot counter write was answered {:?}", resp.data);
            }
            Ok(n + 1)
        },
    )
    .await?;
    let spread: Vec<String> = leaders.iter().map(|(n, c)| format!("{n}: {c}")).collect();
    println!(
        "ready: {} shards on {} nodes over QUIC (leaders {}), boot #{boot}, cluster file {}",
        shard_ids.len(),
        running.len(),
        spread.join(", "),
        cluster_path.display()
    );
    wait_for_shutdown_signal().await;
    tracing::info!("shutting down");
    for (_, node) in running {
        node.shutdown(Duration::from_secs(10)).await?;
    }
    Ok(())
}

fn inspect(data_dir: PathBuf) -> Result<()> {
    use tessera::storage::{Engine, StorageConfig};
    if !data_dir.join("db").exists() {
        bail!(
            "{} holds no Tessera data (no db/ folder)",
            data_dir.display()
        );
    }
    let engine = Engine::open(StorageConfig::new(&data_dir))
        .with_context(|| format!("open {} (is a node running on it?)", data_dir.display()))?;
    println!(
        "{:<8} {:<28} {:<8} {:<10} {:<10} {:<10} {:<10}",
        "shard", "range", "epoch", "vote", "last_log", "purged", "applied"
    );
    let fmt = |l: Option<tessera::raft::LogId>| l.map_or("-".to_string(), |l| l.index.to_string());
    for d in engine.shards()? {
        if tessera::multiraft::GroupStore::exists(&engine, d.id)? {
            // A batch-system shard: raft-rs's hard state and log.
            let g = tessera::multiraft::GroupStore::open(&engine, d.id)?;
            let (_, machine) = engine.open_shard(d.id)?;
            println!(
                "{:<8} {:<28} {:<8} {:<10} {:<10} {:<10} {:<10}",
                d.id.to_string(),
                d.range.to_string(),
                format!("{}/{}", d.epoch.version, d.epoch.conf_ver),
                format!("t{} batch", g.hard_state().term),
                g.last(),
                // The compaction point: the last entry the log dropped.
                match g.first() - 1 {
                    0 => "-".to_string(),
                    p => p.to_string(),
                },
                fmt(machine.applied()),
            );
            continue;
        }
        let st = engine.shard_state(d.id)?;
        println!(
            "{:<8} {:<28} {:<8} {:<10} {:<10} {:<10} {:<10}",
            d.id.to_string(),
            d.range.to_string(),
            format!("{}/{}", d.epoch.version, d.epoch.conf_ver),
            st.vote
                .map_or("-".to_string(), |v| format!("t{}", v.leader_id.term)),
            fmt(st.last_log_id),
            fmt(st.last_purged),
            fmt(st.applied),
        );
    }
    Ok(())
}

/// Shards `tessera dev` checks at once before it reports ready.
const DEV_CHECKS_IN_FLIGHT: usize = 64;

/// Waits for one start-up check and counts its shard's leader.
async fn count_check(
    checks: &mut tokio::task::JoinSet<Result<(NodeId, ())>>,
    leaders: &mut BTreeMap<NodeId, usize>,
) -> Result<()> {
    if let Some(done) = checks.join_next().await {
        let (leader, ()) = done.context("start-up check task")??;
        *leaders.entry(leader).or_default() += 1;
    }
    Ok(())
}

/// Runs `attempt` on the node leading `shard` until it succeeds (5 s per
/// try), retrying until `deadline`; returns the leader and the result.
async fn on_leader<T, F, Fut>(
    running: &BTreeMap<NodeId, Arc<Node>>,
    shard: ShardId,
    deadline: Instant,
    attempt: F,
) -> Result<(NodeId, T)>
where
    F: Fn(Arc<Node>, Arc<tessera::node::ShardRaft>) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    loop {
        // (`shards_led` leaves the meta shard out: ask the groups.)
        // (`group` rebuilds a dormant replica: early shards of a large
        // cluster sleep, and turn dormant, before the last ones start.)
        let mut led = None;
        for node in running.values() {
            let Some(raft) = node.group(shard).await else {
                continue;
            };
            if raft.metrics().borrow_watched().current_leader == Some(node.id()) {
                led = Some((node.clone(), raft));
                break;
            }
        }
        if let Some((found, raft)) = led {
            match tokio::time::timeout(Duration::from_secs(5), attempt(found.clone(), raft)).await {
                Ok(Ok(v)) => return Ok((found.id(), v)),
                Ok(Err(e)) => tracing::debug!(%shard, error = %e, "start-up check retried"),
                Err(_) => tracing::debug!(%shard, "start-up check timed out; retrying"),
            }
        }
        if Instant::now() > deadline {
            bail!("{shard} has no working leader after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`on_leader`]'s check for a shard on the batch system: its leader
/// proves a linearizable read point and a replicated no-op write.
async fn on_batch_leader(
    running: &BTreeMap<NodeId, Arc<Node>>,
    shard: ShardId,
    deadline: Instant,
) -> Result<(NodeId, ())> {
    loop {
        for node in running.values() {
            if node.batch_leader(shard) != Some(node.id()) {
                continue;
            }
            match node.probe_batch_shard(shard).await {
                Ok(()) => return Ok((node.id(), ())),
                Err(e) => tracing::debug!(%shard, error = %e, "start-up check retried"),
            }
        }
        if Instant::now() > deadline {
            bail!("{shard} has no working leader after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
