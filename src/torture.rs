//! The crash-test child: drives every store operation on a few shards and
//! prints one line per completed step, until it is killed.
//!
//! Lines (all numbers decimal):
//! - `V shard term` — `save_vote` returned: the vote is durable.
//! - `F shard index term` — the flush callback fired for entries up to `index`.
//! - `A shard index` — entries up to `index` were applied.
//! - `P shard index` — the log was purged up to `index` (written, not
//!   synced: durable once a later `V` or `F` line shows a sync).
//!
//! Entry `i` of shard `s` puts key `torture_key(s, i)` = `i` as decimal.

use anyhow::{Context, Result};
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftStateMachine};
use std::path::PathBuf;
use tessera::command::Command;
use tessera::raft::{log_id, Entry, EntryPayload, Vote};
use tessera::storage::{Engine, StorageConfig};
use tessera::{KeyRange, NodeId, ShardDescriptor, ShardId};
use tokio::sync::oneshot;

/// The key entry `index` of shard `shard` writes.
pub fn torture_key(shard: u64, index: u64) -> Vec<u8> {
    let mut k = vec![shard as u8];
    k.extend_from_slice(format!("{index:012}").as_bytes());
    k
}

pub async fn run(data_dir: PathBuf, shards: u64) -> Result<()> {
    // Failpoints from the environment (`FAILPOINTS`, builds with the
    // `failpoints` feature): the crash test's mutation check removes the
    // sync this way.
    let _failpoints = fail::FailScenario::setup();
    let engine = Engine::open(StorageConfig::new(&data_dir))?;
    let node = NodeId(1);
    let mut tasks = Vec::new();
    for s in 1..=shards {
        let id = ShardId(s);
        if engine.shard_state(id).is_err() {
            let range = KeyRange::new(vec![s as u8], vec![s as u8 + 1]);
            engine
                .create_shard(&ShardDescriptor::new(id, range, vec![node]))
                .await?;
        }
        let (log, sm) = engine.open_shard(id)?;
        tasks.push(tokio::spawn(drive(s, log, sm)));
    }
    for t in tasks {
        t.await.context("shard task")??;
    }
    Ok(())
}

async fn drive(
    s: u64,
    mut log: tessera::storage::LogStore,
    mut sm: tessera::storage::StateMachine,
) -> Result<()> {
    let node = NodeId(1);
    let state = log.get_log_state().await?;
    let mut vote = log.read_vote().await?.unwrap_or(Vote::new(1, node));
    let mut last = state.last_log_id.map_or(0, |l| l.index);
    let (applied, _) = sm.applied_state().await?;
    // Entries that survived the last crash but were not applied yet.
    let mut reader = log.get_log_reader().await;
    let pending = reader
        .try_get_log_entries(applied.map_or(1, |l| l.index + 1)..=last)
        .await?;
    sm.apply_entries(pending).await?;
    println!("A {s} {last}");
    for round in 0u64.. {
        if round % 10 == 0 {
            vote = Vote::new(vote.leader_id.term + 1, node);
            log.save_vote(&vote).await?;
            println!("V {s} {}", vote.leader_id.term);
        }
        let term = vote.leader_id.term;
        let n = 1 + round % 4;
        let entries: Vec<Entry> = (last + 1..=last + n)
            .map(|i| Entry {
                log_id: log_id(term, node, i),
                payload: EntryPayload::Normal(Command::put(
                    torture_key(s, i),
                    i.to_string().into_bytes(),
                )),
            })
            .collect();
        last += n;
        let (tx, rx) = oneshot::channel();
        let top = last;
        log.append_entries(entries.clone(), move |r| {
            if r.is_ok() {
                println!("F {s} {top} {term}");
            }
            let _ = tx.send(r);
        })
        .await?;
        rx.await.context("flush callback dropped")??;
        sm.apply_entries(entries).await?;
        println!("A {s} {last}");
        if round % 20 == 19 && last > 5 {
            let upto = last - 5;
            let at = reader.try_get_log_entries(upto..=upto).await?;
            let log_id = at.first().context("entry to purge up to")?.log_id;
            log.purge(log_id).await?;
            println!("P {s} {upto}");
        }
    }
    Ok(())
}
