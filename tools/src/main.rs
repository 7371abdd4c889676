//! `tessera-ctl`: the client and admin command line for Tessera.
//!
//! Built on the client side of the `tessera` crate alone (no RocksDB, no
//! openraft). Every command reads a cluster file (`--cluster`, default
//! `./tessera-data/cluster.toml`, which `tessera dev` writes).

mod admin;
mod rebalance;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use tessera::api::ShardStatus;
use tessera::cluster_file::ClusterFile;
use tessera::shard_router::descriptor::escape;
use tessera::{Client, NodeId, ShardId};

mod bench;

#[derive(Parser)]
#[command(
    name = "tessera-ctl",
    version,
    about = "Query and administer a Tessera cluster",
    long_about = "Query and administer a Tessera cluster.\n\n\
        Keys and values are taken as the bytes of the arguments. Errors go to \
        stderr with a non-zero exit status."
)]
struct Cli {
    /// The cluster file (node addresses, CA, client certificate and key).
    #[arg(long, global = true, default_value = "./tessera-data/cluster.toml")]
    cluster: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Set KEY to VALUE.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Print the value of KEY; a missing key prints `not found` on stderr
    /// and exits 1. Bytes that are not printable ASCII are printed as
    /// `\xNN` and a backslash as `\\` (`--raw`: the exact bytes).
    Get {
        /// The key.
        key: String,
        /// Print the value's exact bytes, unescaped.
        #[arg(long)]
        raw: bool,
    },
    /// Remove KEY.
    Delete {
        /// The key.
        key: String,
    },
    /// Print pairs in key order, one `key<TAB>value` line each, escaped as
    /// `get` does (`--raw`: the exact bytes).
    Scan {
        /// Print keys and values unescaped.
        #[arg(long)]
        raw: bool,
        /// First key (inclusive); default: the start of the key space.
        #[arg(long, default_value = "")]
        start: String,
        /// End key (exclusive); default: the end of the key space.
        #[arg(long, default_value = "")]
        end: String,
        /// Most pairs to print (read page by page, so any number is fine).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Run a load against the cluster (or, with `--target etcd`, an etcd
    /// cluster) and print throughput (`N ops/s`) and latency percentiles
    /// (p50, p99, p99.9).
    Bench(bench::BenchArgs),
    /// Show nodes (up/down) and shards (id, range, leader, replicas, epoch,
    /// approximate size, and `hosted_on`: the nodes that actually host a
    /// replica; it differs from `replicas` while a replica is missing or
    /// left over).
    Status {
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Split the shard owning KEY at KEY: it keeps the keys below KEY, a
    /// new shard (on the same replicas) takes KEY and above. No data is
    /// copied; clients keep working.
    Split {
        /// The first key of the new shard.
        key: String,
    },
    /// Move a shard's replica from one node to another: learner on the
    /// target, snapshot streamed, promoted, source removed and its data
    /// deleted. Safe to run again after an interruption.
    MoveReplica {
        /// The shard (e.g. 7 or s7).
        #[arg(long, value_parser = admin::parse_shard)]
        shard: ShardId,
        /// The node giving up its replica (e.g. 3 or n3).
        #[arg(long, value_parser = admin::parse_node)]
        from: NodeId,
        /// The node receiving it.
        #[arg(long, value_parser = admin::parse_node)]
        to: NodeId,
    },
    /// Make a voter of a shard its leader.
    TransferLeader {
        /// The shard (e.g. 7 or s7).
        #[arg(long, value_parser = admin::parse_shard)]
        shard: ShardId,
        /// The node to lead (e.g. 2 or n2).
        #[arg(long, value_parser = admin::parse_node)]
        to: NodeId,
    },
    /// Even out replicas and leaders over the nodes: print the plan (moves,
    /// leader transfers) and, unless --dry-run, carry it out round after
    /// round with progress bars. Ctrl-C stops after the steps in flight;
    /// running it again continues from the cluster's current state.
    Rebalance {
        /// Only print the plan.
        #[arg(long)]
        dry_run: bool,
        /// Replica moves at once.
        #[arg(long, default_value_t = 4)]
        max_concurrent_moves: usize,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Check that every replica of each shard holds the same data (admin):
    /// the leader commits a digest entry and every replica hashes its
    /// shard's keys, values and client sessions as of that entry. Prints one
    /// line per shard; exits 1 when any replica differs or cannot answer.
    /// Safe on a live cluster (the hashing reads RocksDB snapshots).
    Verify {
        /// Only this shard (e.g. 7 or s7).
        #[arg(long, value_parser = admin::parse_shard)]
        shard: Option<ShardId>,
        /// Print one JSON object instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Move every replica off NODE (to the nodes with the fewest replicas)
    /// so it can be stopped.
    Drain {
        /// The node (e.g. 3 or n3).
        #[arg(value_parser = admin::parse_node)]
        node: NodeId,
    },
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        // A closed pipe (`tessera-ctl scan | head`) is not an error.
        let broken_pipe = e
            .chain()
            .filter_map(|c| c.downcast_ref::<std::io::Error>())
            .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe);
        if broken_pipe {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

/// Bytes as printed: exact with `raw`, else terminal-safe (printable
/// ASCII as is, a backslash as `\\`, anything else as `\xNN`, so no control
/// byte reaches the terminal and a tab or newline never splits a line).
fn shown(bytes: &[u8], raw: bool) -> std::borrow::Cow<'_, [u8]> {
    if raw {
        return std::borrow::Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b' '..=b'~' => out.push(b),
            _ => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
        }
    }
    std::borrow::Cow::Owned(out)
}

async fn run(cli: Cli) -> Result<()> {
    // `bench` opens its own connections (and, against etcd, needs no
    // cluster file).
    if let Cmd::Bench(args) = cli.cmd {
        return bench::bench(&cli.cluster, args).await;
    }
    let client = Client::connect(&cli.cluster)
        .await
        .with_context(|| format!("open cluster file {}", cli.cluster.display()))?;
    match cli.cmd {
        Cmd::Put { key, value } => client.put(key.as_bytes(), value.as_bytes()).await?,
        Cmd::Get { key, raw } => match client.get(key.as_bytes()).await? {
            Some(v) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&shown(&v, raw))?;
                out.write_all(b"\n")?;
            }
            None => {
                eprintln!("not found");
                std::process::exit(1);
            }
        },
        Cmd::Delete { key } => {
            client.delete(key.as_bytes()).await?;
        }
        Cmd::Scan {
            start,
            end,
            limit,
            raw,
        } => {
            // Page by page: memory stays bounded by one node's answer,
            // whatever the range holds.
            let mut pages = client.scanner(start.as_bytes(), end.as_bytes())?;
            let mut left = limit;
            while left > 0 {
                let Some(page) = pages.next_page(left).await? else {
                    break;
                };
                left -= page.len().min(left);
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                for (k, v) in page {
                    out.write_all(&shown(&k, raw))?;
                    out.write_all(b"\t")?;
                    out.write_all(&shown(&v, raw))?;
                    out.write_all(b"\n")?;
                }
                out.flush()?;
            }
        }
        Cmd::Status { json } => status(&client, &cli.cluster, json).await?,
        Cmd::Split { key } => admin::split(&client, &key).await?,
        Cmd::MoveReplica { shard, from, to } => {
            admin::move_replica(&client, shard, from, to).await?
        }
        Cmd::TransferLeader { shard, to } => admin::transfer_leader(&client, shard, to).await?,
        Cmd::Drain { node } => admin::drain(&client, node).await?,
        Cmd::Verify { shard, json } => {
            if !admin::verify(&client, shard, json).await? {
                std::process::exit(1);
            }
        }
        Cmd::Rebalance {
            dry_run,
            max_concurrent_moves,
            json,
        } => rebalance::run(&client, dry_run, max_concurrent_moves, json).await?,
        Cmd::Bench(_) => unreachable!("bench runs before the connect above"),
    }
    Ok(())
}

struct ShardRow {
    status: ShardStatus,
    leader: Option<NodeId>,
    /// The nodes that actually host a replica (compare with `replicas`).
    hosted_on: Vec<NodeId>,
}

async fn status(client: &Client, cluster: &std::path::Path, json: bool) -> Result<()> {
    let file = ClusterFile::load(cluster)?;
    let mut nodes = Vec::new();
    let mut shards: BTreeMap<ShardId, ShardRow> = BTreeMap::new();
    // The cluster file's nodes, and any that joined since.
    let mut known: Vec<(NodeId, std::net::SocketAddr)> =
        file.nodes.iter().map(|n| (n.id, n.addr)).collect();
    if let Ok(all) = client.refresh_nodes().await {
        for (id, addr) in all {
            if !known.iter().any(|(k, _)| *k == id) {
                known.push((id, addr));
            }
        }
    }
    known.sort();
    for (id, addr) in known {
        let st = client.node_status(id).await;
        nodes.push((id, addr, st.is_ok()));
        let Ok(st) = st else { continue };
        for s in st.shards {
            let leads = s.leader == Some(id);
            let row = shards.entry(s.descriptor.id).or_insert_with(|| ShardRow {
                status: s.clone(),
                leader: None,
                hosted_on: Vec::new(),
            });
            row.hosted_on.push(id);
            // The newest descriptor wins; the leader is the replica that
            // says it leads.
            if s.descriptor.epoch > row.status.descriptor.epoch {
                row.status.descriptor = s.descriptor.clone();
            }
            row.status.size_bytes = row.status.size_bytes.max(s.size_bytes);
            if leads {
                row.leader = Some(id);
            }
        }
    }
    if nodes.iter().all(|(_, _, up)| !up) {
        bail!("no node of {} answered", cluster.display());
    }
    let mut out = std::io::stdout().lock();
    if json {
        let v = serde_json::json!({
            "nodes": nodes.iter().map(|(id, addr, up)| serde_json::json!({
                "id": id.0, "addr": addr.to_string(), "up": up,
            })).collect::<Vec<_>>(),
            "shards": shards.values().map(|r| {
                let d = &r.status.descriptor;
                serde_json::json!({
                    "id": d.id.0,
                    "start": escape(&d.range.start),
                    "end": escape(&d.range.end),
                    "leader": r.leader.map(|l| l.0),
                    "replicas": d.replicas.iter().map(|n| n.0).collect::<Vec<_>>(),
                    "hosted_on": r.hosted_on.iter().map(|n| n.0).collect::<Vec<_>>(),
                    "epoch": {"version": d.epoch.version, "conf_ver": d.epoch.conf_ver},
                    "size_bytes": r.status.size_bytes,
                })
            }).collect::<Vec<_>>(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    writeln!(out, "{:<6} {:<22} {:<5}", "node", "addr", "state")?;
    for (id, addr, up) in &nodes {
        writeln!(
            out,
            "{:<6} {:<22} {:<5}",
            id.to_string(),
            addr.to_string(),
            if *up { "up" } else { "down" }
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<7} {:<26} {:<7} {:<12} {:<7} {:>12}  hosted_on",
        "shard", "range", "leader", "replicas", "epoch", "size_bytes"
    )?;
    for r in shards.values() {
        let d = &r.status.descriptor;
        writeln!(
            out,
            "{:<7} {:<26} {:<7} {:<12} {:<7} {:>12}  {}",
            d.id.to_string(),
            d.range.to_string(),
            r.leader.map_or("-".to_string(), |l| l.to_string()),
            d.replicas
                .iter()
                .map(|n| n.0.to_string())
                .collect::<Vec<_>>()
                .join(","),
            format!("{}/{}", d.epoch.version, d.epoch.conf_ver),
            r.status.size_bytes,
            r.hosted_on
                .iter()
                .map(|n| n.0.to_string())
                .collect::<Vec<_>>()
                .join(",")
        )?;
    }
    Ok(())
}
