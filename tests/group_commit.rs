//! Group commit: many shards appending at once share syncs, and no flush
//! callback fires before a sync that happened after its append was submitted.

mod common;

use common::*;
use openraft::storage::RaftLogReader;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tessera::command::Command;
use tessera::storage::{CommitMode, Engine, StorageConfig};
use tokio::sync::oneshot;

const SHARDS: u64 = 64;
const ROUNDS: u64 = 40;

async fn run(engine: Engine) -> (u64, u64) {
    let violations = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for s in 1..=SHARDS {
        let (log, _sm) =
            create_and_open(&engine, &prefix_shard(s, format!("gc{s:03}/").as_bytes())).await;
        let (engine, violations) = (engine.clone(), violations.clone());
        tasks.push(tokio::spawn(async move {
            for i in 1..=ROUNDS {
                let entry = normal(1, i, Command::put(format!("gc{s:03}/{i}"), vec![7u8; 100]));
                let syncs_before = engine.stats().syncs;
                let (tx, rx) = oneshot::channel();
                let e2 = engine.clone();
                let v2 = violations.clone();
                log.append_entries(vec![entry], move |r| {
                    // The sync that covers this append completes after it was
                    // submitted, and before this callback runs.
                    if r.is_ok() && e2.stats().syncs <= syncs_before {
                        v2.fetch_add(1, Ordering::SeqCst);
                    }
                    let _ = tx.send(r);
                })
                .await
                .expect("append");
                rx.await.expect("callback").expect("durable");
            }
            let mut reader = log.clone();
            let got = reader.try_get_log_entries(1..=ROUNDS).await.unwrap();
            assert_eq!(
                got.len() as u64,
                ROUNDS,
                "every flushed entry of shard {s} is readable"
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        violations.load(Ordering::SeqCst),
        0,
        "a flush callback fired before its sync"
    );
    let st = engine.stats();
    assert_eq!(st.append_requests, SHARDS * ROUNDS);
    assert_eq!(st.entries_appended, SHARDS * ROUNDS);
    (st.append_requests, st.syncs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_shards_share_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let (appends, syncs) = run(open_engine(dir.path())).await;
    eprintln!("group commit: {appends} appends in {syncs} syncs");
    assert!(
        syncs < appends,
        "group commit must sync less than once per append ({syncs} syncs, {appends} appends)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_per_write_mode_syncs_every_append() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StorageConfig {
        commit_mode: CommitMode::SyncPerWrite,
        ..StorageConfig::new(dir.path())
    };
    let (appends, syncs) = run(Engine::open(cfg).unwrap()).await;
    // Creating each shard is one more durable write.
    assert_eq!(
        syncs,
        appends + SHARDS,
        "the baseline syncs once per durable request"
    );
}

/// Writes in progress that never turn into appends (a client write parked
/// elsewhere, say) make the log writer linger, but only up to its cap: every
/// append still becomes durable, and the flush contract holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linger_under_phantom_demand_still_flushes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StorageConfig {
        group_commit_linger_us: 20_000,
        ..StorageConfig::new(dir.path())
    };
    let engine = Engine::open(cfg).unwrap();
    // Far more writes "in progress" than any group holds, for the whole run.
    let phantom: Vec<_> = (1000..2000)
        .map(|s| engine.write_in_progress(tessera::ShardId(s)))
        .collect();
    let (appends, syncs) = run(engine.clone()).await;
    drop(phantom);
    assert!(
        syncs < appends,
        "lingering groups share syncs ({syncs} syncs, {appends} appends)"
    );
}
