//! `tessera-ctl`: the admin and client command line for Tessera.
//!
//! Today it inspects a stopped node's data folder offline; cluster commands
//! (status, put/get/scan, split, move, rebalance, bench) arrive with the
//! client library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tessera::storage::{Engine, StorageConfig};

#[derive(Parser)]
#[command(
    name = "tessera-ctl",
    version,
    about = "Administer and query a Tessera cluster"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the shard replicas in a node's data folder, with their Raft state
    /// (the node must be stopped: RocksDB allows one process per folder).
    Inspect {
        /// The node's data folder.
        #[arg(long, default_value = "./tessera-data")]
        data_dir: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Inspect { data_dir } => inspect(data_dir),
    }
}

fn inspect(data_dir: PathBuf) -> Result<()> {
    if !data_dir.join("db").exists() {
        anyhow::bail!(
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
