//! `tessera`: the node binary.
//!
//! - `tessera dev`: a local run on a default data folder. Until the QUIC
//!   transport lands it runs one node hosting every shard as a single-replica
//!   Raft group on the durable RocksDB store, proves a write and a
//!   linearizable read per shard, prints `ready`, and runs until Ctrl-C.
//! - `tessera torture-store` (hidden): the child process of the storage
//!   crash tests; appends, votes, applies and purges through the stores and
//!   reports each durable step on stdout until it is killed.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use openraft::BasicNode;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tessera::command::{Command, CommandResponse};
use tessera::raft::{NoNetwork, TypeConfig};
use tessera::storage::{Engine, StorageConfig};
use tessera::{KeyRange, NodeId, ShardDescriptor, ShardId};

mod torture;

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Tessera: a multi-raft sharded key-value store"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a local development node on a data folder (created on first start,
    /// resumed afterwards): every shard is a Raft group on durable storage.
    Dev {
        /// Data folder.
        #[arg(long, default_value = "./tessera-data")]
        data_dir: PathBuf,
        /// Shards to create on first start, splitting the key space evenly by
        /// first byte (ignored when the folder already holds shards).
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=256))]
        shards: u64,
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
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().context("start tokio runtime")?;
    match cli.cmd {
        Cmd::Dev { data_dir, shards } => rt.block_on(dev(data_dir, shards)),
        Cmd::TortureStore { data_dir, shards } => rt.block_on(torture::run(data_dir, shards)),
    }
}

/// `n` descriptors covering the key space, split evenly by first byte.
fn initial_shards(n: u64, replicas: Vec<NodeId>) -> Vec<ShardDescriptor> {
    (0..n)
        .map(|i| {
            let bound = |j: u64| -> Vec<u8> {
                if j == 0 || j == n {
                    Vec::new()
                } else {
                    vec![(j * 256 / n) as u8]
                }
            };
            ShardDescriptor::new(
                ShardId(i + 1),
                KeyRange::new(bound(i), bound(i + 1)),
                replicas.clone(),
            )
        })
        .collect()
}

async fn dev(data_dir: PathBuf, shards: u64) -> Result<()> {
    let node = NodeId(1);
    let engine = Engine::open(StorageConfig::new(&data_dir))
        .with_context(|| format!("open data folder {}", data_dir.display()))?;
    let mut descs = engine.shards()?;
    if descs.is_empty() {
        for d in initial_shards(shards, vec![node]) {
            engine.create_shard(&d).await?;
        }
        descs = engine.shards()?;
    }
    let config = Arc::new(
        openraft::Config {
            heartbeat_interval: 250,
            election_timeout_min: 750,
            election_timeout_max: 1500,
            ..Default::default()
        }
        .validate()?,
    );
    let mut groups = Vec::new();
    for d in &descs {
        let (log, sm) = engine.open_shard(d.id)?;
        let raft = openraft::Raft::<TypeConfig>::new(node, config.clone(), NoNetwork, log, sm)
            .await
            .with_context(|| format!("start raft group of {}", d.id))?;
        if !raft.is_initialized().await? {
            let members = BTreeMap::from([(node, BasicNode::new("local"))]);
            raft.initialize(members).await?;
        }
        groups.push((d.clone(), raft));
    }
    let mut boot = 0u64;
    for (d, raft) in &groups {
        raft.wait(Some(Duration::from_secs(10)))
            .current_leader(node, "single-replica group elects itself")
            .await
            .with_context(|| format!("{} elects a leader", d.id))?;
        // A per-shard boot counter: a linearizable read, then a replicated write.
        let mut key = d.range.start.clone();
        key.extend_from_slice(b"\0tessera-dev-boot");
        raft.ensure_linearizable().await?;
        let n = match engine.get(&key)? {
            Some(v) => u64::from_be_bytes(v.as_slice().try_into().context("boot counter")?),
            None => 0,
        };
        let resp = raft
            .client_write(Command::put(key, (n + 1).to_be_bytes().to_vec()))
            .await?;
        if !matches!(resp.data, CommandResponse::Write(_)) {
            bail!(
                "boot counter write on {} was refused: {:?}",
                d.id,
                resp.data
            );
        }
        boot = boot.max(n + 1);
    }
    let stats = engine.stats();
    println!(
        "ready: {} shards led by {node}, boot #{boot}, data in {} ({} appends in {} syncs)",
        groups.len(),
        data_dir.display(),
        stats.append_requests,
        stats.syncs
    );
    wait_for_shutdown_signal().await;
    tracing::info!("shutting down");
    for (_, raft) in groups {
        raft.shutdown().await.ok();
    }
    engine.close(Duration::from_secs(10)).await?;
    Ok(())
}

async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_shards_cover_the_key_space_in_order() {
        for n in [1u64, 3, 16, 256] {
            let s = initial_shards(n, vec![NodeId(1)]);
            assert_eq!(s.len() as u64, n);
            assert!(s[0].range.start.is_empty());
            assert!(s.last().unwrap().range.end.is_empty());
            for w in s.windows(2) {
                assert_eq!(w[0].range.end, w[1].range.start);
            }
        }
    }
}
