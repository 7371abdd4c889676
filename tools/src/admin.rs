//! Admin commands of `tessera-ctl`: split, move-replica, transfer-leader,
//! drain, verify, load-reports.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use tessera::shard_router::descriptor::escape;
use tessera::{Client, NodeId, ShardDescriptor, ShardId};

/// Parses `4` or `n4`.
pub fn parse_node(s: &str) -> Result<NodeId, String> {
    s.strip_prefix('n')
        .unwrap_or(s)
        .parse()
        .map(NodeId)
        .map_err(|_| format!("not a node id: {s:?} (expected e.g. 4 or n4)"))
}

/// Parses `7` or `s7`.
pub fn parse_shard(s: &str) -> Result<ShardId, String> {
    s.strip_prefix('s')
        .unwrap_or(s)
        .parse()
        .map(ShardId)
        .map_err(|_| format!("not a shard id: {s:?} (expected e.g. 7 or s7)"))
}

fn describe(d: &ShardDescriptor) -> String {
    let replicas: Vec<String> = d.replicas.iter().map(|n| n.to_string()).collect();
    format!(
        "{} {} v{}/c{} replicas {}",
        d.id,
        d.range,
        d.epoch.version,
        d.epoch.conf_ver,
        replicas.join(",")
    )
}

pub async fn split(client: &Client, key: &str) -> Result<()> {
    let (left, right) = client
        .split(key.as_bytes())
        .await
        .with_context(|| format!("split at {}", escape(key.as_bytes())))?;
    println!("split at {}", escape(key.as_bytes()));
    println!("  left:  {}", describe(&left));
    println!("  right: {}", describe(&right));
    Ok(())
}

pub async fn merge(client: &Client, key: &str) -> Result<()> {
    let started = std::time::Instant::now();
    let d = client
        .merge(key.as_bytes())
        .await
        .with_context(|| format!("merge at {}", escape(key.as_bytes())))?;
    println!(
        "merged at {} in {:.1} s: {}",
        escape(key.as_bytes()),
        started.elapsed().as_secs_f64(),
        describe(&d)
    );
    Ok(())
}

pub async fn move_replica(client: &Client, shard: ShardId, from: NodeId, to: NodeId) -> Result<()> {
    let started = std::time::Instant::now();
    let d = client
        .move_replica(shard, from, to)
        .await
        .with_context(|| format!("move {shard} from {from} to {to}"))?;
    println!(
        "moved {shard} from {from} to {to} in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        describe(&d)
    );
    Ok(())
}

pub async fn transfer_leader(client: &Client, shard: ShardId, to: NodeId) -> Result<()> {
    client
        .transfer_leader(shard, to)
        .await
        .with_context(|| format!("transfer leadership of {shard} to {to}"))?;
    println!("{to} leads {shard}");
    Ok(())
}

/// Moves every replica off `node`, one shard at a time, each to the
/// eligible node (up, not `node`, not already holding the shard) with the
/// fewest replicas.
pub async fn drain(client: &Client, node: NodeId) -> Result<()> {
    let nodes = client
        .refresh_nodes()
        .await
        .map_err(|e| anyhow::anyhow!("no node answered: {e}"))?;
    if !nodes.iter().any(|(id, _)| *id == node) {
        bail!("{node} is not a node of this cluster");
    }
    let mut moved = 0usize;
    loop {
        // Replica counts per live node, from the nodes themselves.
        let mut count: BTreeMap<NodeId, usize> = BTreeMap::new();
        let mut on_node: Vec<ShardDescriptor> = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for (id, _) in &nodes {
            let Ok(st) = client.node_status(*id).await else {
                continue;
            };
            count.insert(*id, st.shards.len());
            if *id == node {
                for s in st.shards {
                    if seen.insert(s.descriptor.id) {
                        on_node.push(s.descriptor);
                    }
                }
            }
        }
        let Some(d) = on_node.first() else {
            println!("drained {node}: {moved} replicas moved; it holds none and can be stopped");
            return Ok(());
        };
        let to = count
            .iter()
            .filter(|(id, _)| **id != node && !d.replicas.contains(id))
            .min_by_key(|(id, c)| (**c, **id))
            .map(|(id, _)| *id)
            .with_context(|| format!("no node can take {}'s replica", d.id))?;
        move_replica(client, d.id, node, to).await?;
        moved += 1;
    }
}

/// `tessera-ctl verify`: every replica's digest of each shard (or of
/// `only`) at one log index; true when every shard's replicas agree.
pub async fn verify(client: &Client, only: Option<ShardId>, json: bool) -> Result<bool> {
    let mut ids: Vec<ShardId> = match only {
        Some(s) => vec![s],
        None => client
            .routes()
            .await
            .context("read the shards")?
            .iter()
            .map(|d| d.id)
            .collect(),
    };
    ids.sort();
    ids.dedup();
    let mut all_agree = true;
    let mut rows = Vec::new();
    for id in ids {
        let v = client
            .verify_shard(id)
            .await
            .with_context(|| format!("verify {id}"))?;
        let agrees = v.agrees();
        all_agree &= agrees;
        if json {
            let replicas: Vec<serde_json::Value> = v
                .replicas
                .iter()
                .map(|(n, d)| match d {
                    Ok(d) => serde_json::json!({
                        "node": n.0, "pairs": d.pairs, "bytes": d.bytes,
                        "sessions": d.sessions, "hash": format!("{:016x}", d.hash),
                    }),
                    Err(e) => serde_json::json!({ "node": n.0, "error": e }),
                })
                .collect();
            rows.push(serde_json::json!({
                "shard": id.0, "index": v.index, "agree": agrees, "replicas": replicas,
            }));
            continue;
        }
        let first = v.replicas.iter().find_map(|(_, d)| d.as_ref().ok());
        match (agrees, first) {
            (true, Some(d)) => println!(
                "{id} at index {}: {} replicas agree ({} pairs, {} bytes, {} sessions, hash {:016x})",
                v.index,
                v.replicas.len(),
                d.pairs,
                d.bytes,
                d.sessions,
                d.hash
            ),
            _ => {
                println!("{id} at index {}: REPLICAS DIFFER", v.index);
                for (n, d) in &v.replicas {
                    match d {
                        Ok(d) => println!(
                            "  {n}: {} pairs, {} bytes, {} sessions, hash {:016x}",
                            d.pairs, d.bytes, d.sessions, d.hash
                        ),
                        Err(e) => println!("  {n}: {e}"),
                    }
                }
            }
        }
    }
    if json {
        let out = serde_json::json!({ "agree": all_agree, "shards": rows });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if all_agree {
        println!("verify: every replica of every shard agrees");
    } else {
        println!("verify: replicas differ (see above)");
    }
    Ok(all_agree)
}

/// `load-reports`: the shards' load as their leaders last reported it to
/// the meta shard, one line per shard (or a JSON array).
pub async fn load_reports(client: &Client, json: bool) -> Result<()> {
    let reports = client
        .load_reports()
        .await
        .context("read the meta shard's load reports")?;
    let now = tessera::command::wall_clock_ms();
    let age_s = |at_ms: u64| now.saturating_sub(at_ms) as f64 / 1000.0;
    if json {
        let rows: Vec<serde_json::Value> = reports
            .iter()
            .map(|r| {
                serde_json::json!({
                    "shard": r.shard.0,
                    "node": r.node.0,
                    "at_ms": r.at_ms,
                    "age_s": age_s(r.at_ms),
                    "reads_per_s": r.reads_per_s,
                    "writes_per_s": r.writes_per_s,
                    "write_bytes_per_s": r.write_bytes_per_s,
                    "size_bytes": r.size_bytes,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<8} {:<6} {:>9} {:>9} {:>9} {:>12} {:>12}",
        "shard", "by", "age s", "reads/s", "writes/s", "write B/s", "size B"
    );
    for r in &reports {
        println!(
            "{:<8} {:<6} {:>9.1} {:>9} {:>9} {:>12} {:>12}",
            r.shard.to_string(),
            r.node.to_string(),
            age_s(r.at_ms),
            r.reads_per_s,
            r.writes_per_s,
            r.write_bytes_per_s,
            r.size_bytes
        );
    }
    println!("{} shards reported", reports.len());
    Ok(())
}
