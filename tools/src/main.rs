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
    /// approximate size with unflushed data, load: keys read, write
    /// operations and bytes written per second, decayed over about 10 s,
    /// and `hosted_on`: the nodes that actually host a replica; it differs
    /// from `replicas` while a replica is missing or left over).
    ///
    /// The table starts with a summary (shards, shards without a leader or
    /// with replicas missing or left over, size and load, per node replicas
    /// and leaders). Every shard is listed when there are at most 100 (or
    /// with `--all`); beyond that only the shards that need attention and
    /// the 10 busiest. `--json` is always complete.
    Status {
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
        /// Only this shard (e.g. 7 or s7).
        #[arg(long, value_parser = admin::parse_shard)]
        shard: Option<ShardId>,
        /// Only shards with a replica on this node (e.g. 2 or n2), listed
        /// or hosted.
        #[arg(long, value_parser = admin::parse_node)]
        node: Option<NodeId>,
        /// List every shard, however many.
        #[arg(long)]
        all: bool,
    },
    /// Print the shards' load as their leaders last reported it to the meta
    /// shard (every 5 s, when it moved by over 20%): reporting node, age,
    /// keys read, write operations and bytes written per second, size.
    /// `status` shows the nodes' live figures; these are what the cluster
    /// keeps, e.g. for a shard whose leader just restarted.
    LoadReports {
        /// Print a JSON array instead of a table.
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
    /// Merge the shard that starts at KEY into its left neighbour. The right
    /// shard's replicas are first moved onto the left shard's nodes if
    /// needed; then the left shard takes the range in one replicated step
    /// (no data is copied). Clients keep working.
    Merge {
        /// The first key of the shard to merge away.
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
        /// Keep balancing: plan and execute again every this many seconds
        /// (loads and sizes change) until Ctrl-C.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "30")]
        watch: Option<u64>,
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
        Cmd::Status {
            json,
            shard,
            node,
            all,
        } => {
            let filter = StatusFilter { shard, node, all };
            status(&client, &cli.cluster, json, filter).await?
        }
        Cmd::LoadReports { json } => admin::load_reports(&client, json).await?,
        Cmd::Split { key } => admin::split(&client, &key).await?,
        Cmd::Merge { key } => admin::merge(&client, &key).await?,
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
            watch,
        } => {
            let watch = watch.map(|s| std::time::Duration::from_secs(s.max(1)));
            rebalance::run(&client, dry_run, max_concurrent_moves, json, watch).await?
        }
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

/// Two decimals are plenty for a decayed rate (and keep the JSON short).
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Shards listed in full by `status` without `--all`.
const STATUS_LIST_ALL_MAX: usize = 100;
/// Busiest shards `status` lists beyond that.
const STATUS_BUSIEST: usize = 10;

/// Which shards `status` shows.
struct StatusFilter {
    shard: Option<ShardId>,
    node: Option<NodeId>,
    all: bool,
}

impl StatusFilter {
    fn keeps(&self, id: ShardId, r: &ShardRow) -> bool {
        self.shard.is_none_or(|s| s == id)
            && self.node.is_none_or(|n| {
                r.status.descriptor.replicas.contains(&n) || r.hosted_on.contains(&n)
            })
    }

    fn describe(&self) -> String {
        match (self.shard, self.node) {
            (Some(s), _) => format!(" ({s})"),
            (None, Some(n)) => format!(" with a replica on {n}"),
            (None, None) => String::new(),
        }
    }
}

impl ShardRow {
    /// The nodes hosting a replica are exactly its voters.
    fn hosting_matches(&self) -> bool {
        let mut hosted = self.hosted_on.clone();
        hosted.sort();
        let mut listed = self.status.descriptor.replicas.clone();
        listed.sort();
        hosted == listed
    }

    /// No leader, or replicas missing or left over.
    fn needs_attention(&self) -> bool {
        self.leader.is_none() || !self.hosting_matches()
    }

    fn busy(&self) -> f64 {
        self.status.reads_per_s + self.status.writes_per_s
    }
}

async fn status(
    client: &Client,
    cluster: &std::path::Path,
    json: bool,
    filter: StatusFilter,
) -> Result<()> {
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
            // Requests are served by the leader; a former leader's rates
            // still fade, so the sum follows a leadership change.
            if row.hosted_on.len() > 1 {
                row.status.reads_per_s += s.reads_per_s;
                row.status.writes_per_s += s.writes_per_s;
                row.status.write_bytes_per_s += s.write_bytes_per_s;
            }
            if leads {
                row.leader = Some(id);
            }
        }
    }
    if nodes.iter().all(|(_, _, up)| !up) {
        bail!("no node of {} answered", cluster.display());
    }
    // The meta shard is shown apart: the shard list is the user's key space.
    let meta_row = shards.remove(&tessera::meta::META_SHARD);
    shards.retain(|id, r| filter.keeps(*id, r));
    if let (Some(shard), true) = (filter.shard, shards.is_empty()) {
        bail!("no node reports {shard}");
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
                    "reads_per_s": round2(r.status.reads_per_s),
                    "writes_per_s": round2(r.status.writes_per_s),
                    "write_bytes_per_s": round2(r.status.write_bytes_per_s),
                    "raft": if r.status.batch { "batch" } else { "openraft" },
                })
            }).collect::<Vec<_>>(),
            "meta": meta_row.as_ref().map(|r| serde_json::json!({
                "id": r.status.descriptor.id.0,
                "leader": r.leader.map(|l| l.0),
                "replicas": r.status.descriptor.replicas.iter().map(|n| n.0).collect::<Vec<_>>(),
                "hosted_on": r.hosted_on.iter().map(|n| n.0).collect::<Vec<_>>(),
                "size_bytes": r.status.size_bytes,
            })),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    // Per node: replicas listed there, replicas hosted there, leaders.
    let mut per_node: BTreeMap<NodeId, (usize, usize, usize)> = BTreeMap::new();
    for r in shards.values().chain(meta_row.iter()) {
        for n in &r.status.descriptor.replicas {
            per_node.entry(*n).or_default().0 += 1;
        }
        for n in &r.hosted_on {
            per_node.entry(*n).or_default().1 += 1;
        }
        if let Some(l) = r.leader {
            per_node.entry(l).or_default().2 += 1;
        }
    }
    writeln!(
        out,
        "{:<6} {:<22} {:<5} {:>9} {:>7} {:>8}",
        "node", "addr", "state", "replicas", "hosted", "leaders"
    )?;
    for (id, addr, up) in &nodes {
        let (listed, hosted, leads) = per_node.get(id).copied().unwrap_or_default();
        writeln!(
            out,
            "{:<6} {:<22} {:<5} {:>9} {:>7} {:>8}",
            id.to_string(),
            addr.to_string(),
            if *up { "up" } else { "down" },
            listed,
            hosted,
            leads
        )?;
    }
    let attention: Vec<&ShardRow> = shards.values().filter(|r| r.needs_attention()).collect();
    let no_leader = shards.values().filter(|r| r.leader.is_none()).count();
    let size: u64 = shards.values().map(|r| r.status.size_bytes).sum();
    let (reads, writes, wbytes) = shards.values().fold((0.0, 0.0, 0.0), |a, r| {
        (
            a.0 + r.status.reads_per_s,
            a.1 + r.status.writes_per_s,
            a.2 + r.status.write_bytes_per_s,
        )
    });
    writeln!(out)?;
    writeln!(
        out,
        "{} shards{}: {} without a leader, {} with replicas missing or left over; {} bytes; {:.1} reads/s, {:.1} writes/s, {:.0} bytes written/s",
        shards.len(),
        filter.describe(),
        no_leader,
        shards.values().filter(|r| !r.hosting_matches()).count(),
        size,
        reads,
        writes,
        wbytes
    )?;
    if let Some(m) = &meta_row {
        let names = |v: &[NodeId]| {
            v.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            out,
            "meta shard: replicas {}, leader {}",
            names(&m.status.descriptor.replicas),
            m.leader
                .map_or_else(|| "none".to_string(), |l| l.to_string())
        )?;
    }
    let listed: Vec<&ShardRow> = if filter.all || shards.len() <= STATUS_LIST_ALL_MAX {
        shards.values().collect()
    } else {
        // The shards that need attention, then the busiest others.
        let mut busiest: Vec<&ShardRow> =
            shards.values().filter(|r| !r.needs_attention()).collect();
        busiest.sort_by(|a, b| b.busy().total_cmp(&a.busy()));
        busiest.truncate(STATUS_BUSIEST);
        writeln!(
            out,
            "listing {} that need attention and the {} busiest; --all lists every shard",
            attention.len(),
            busiest.len()
        )?;
        let mut rows = attention.clone();
        rows.extend(busiest);
        rows
    };
    writeln!(out)?;
    writeln!(
        out,
        "{:<7} {:<26} {:<7} {:<12} {:<7} {:>12} {:>9} {:>9} {:>11}  hosted_on",
        "shard",
        "range",
        "leader",
        "replicas",
        "epoch",
        "size_bytes",
        "reads/s",
        "writes/s",
        "w_bytes/s"
    )?;
    for r in listed {
        let d = &r.status.descriptor;
        writeln!(
            out,
            "{:<7} {:<26} {:<7} {:<12} {:<7} {:>12} {:>9.1} {:>9.1} {:>11.0}  {}",
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
            r.status.reads_per_s,
            r.status.writes_per_s,
            r.status.write_bytes_per_s,
            r.hosted_on
                .iter()
                .map(|n| n.0.to_string())
                .collect::<Vec<_>>()
                .join(",")
        )?;
    }
    Ok(())
}
