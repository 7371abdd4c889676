//! Storage benchmarks: durable appends/s for 1, 16 and 256 shards appending
//! concurrently (100-byte entries), with group commit and with a sync per
//! append, beside the disk's raw sync rate measured the same way.
//!
//! Run: `cargo bench --bench storage`. Writes per sync are printed after
//! each case (`appends/syncs`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::io::Write;
use std::time::{Duration, Instant};
use tessera::command::Command;
use tessera::raft::{log_id, Entry, EntryPayload};
use tessera::storage::{CommitMode, Engine, LogStore, StorageConfig};
use tessera::{KeyRange, NodeId, ShardDescriptor, ShardId};

fn entry(index: u64) -> Entry {
    Entry {
        log_id: log_id(1, NodeId(1), index),
        // A put of a 16-byte key and a 60-byte value: about 100 bytes encoded.
        payload: EntryPayload::Normal(Command::put(format!("k{index:015}"), vec![b'v'; 60])),
    }
}

async fn append_durable(log: &LogStore, index: u64) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    log.append_entries(vec![entry(index)], move |r| {
        let _ = tx.send(r);
    })
    .await
    .expect("append");
    rx.await.expect("callback").expect("durable");
}

fn appends(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("append_durable");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(6))
        .warm_up_time(Duration::from_secs(1));
    for (mode, name) in [
        (CommitMode::GroupCommit, "group_commit"),
        (CommitMode::SyncPerWrite, "sync_per_append"),
    ] {
        for shards in [1u64, 16, 256] {
            let dir = tempfile::tempdir_in(".").unwrap();
            let cfg = StorageConfig {
                commit_mode: mode,
                ..StorageConfig::new(dir.path())
            };
            let engine = Engine::open(cfg).unwrap();
            let logs: Vec<LogStore> = rt.block_on(async {
                let mut v = Vec::new();
                for s in 1..=shards {
                    let d = ShardDescriptor::new(
                        ShardId(s),
                        KeyRange::new(vec![s as u8], vec![]),
                        vec![NodeId(1)],
                    );
                    engine.create_shard(&d).await.unwrap();
                    v.push(engine.open_shard(ShardId(s)).unwrap().0);
                }
                v
            });
            let mut next = 1u64;
            let before = engine.stats();
            g.throughput(Throughput::Elements(shards));
            g.bench_with_input(BenchmarkId::new(name, shards), &shards, |b, _| {
                b.iter_custom(|iters| {
                    let start_index = next;
                    next += iters;
                    let start = Instant::now();
                    rt.block_on(async {
                        let tasks: Vec<_> = logs
                            .iter()
                            .cloned()
                            .map(|log| {
                                tokio::spawn(async move {
                                    for i in start_index..start_index + iters {
                                        append_durable(&log, i).await;
                                    }
                                })
                            })
                            .collect();
                        for t in tasks {
                            t.await.unwrap();
                        }
                    });
                    start.elapsed()
                })
            });
            let st = engine.stats();
            let (a, s) = (
                st.append_requests - before.append_requests,
                st.syncs - before.syncs,
            );
            eprintln!(
                "{name}/{shards}: {a} appends in {s} syncs = {:.1} appends/sync",
                a as f64 / s.max(1) as f64
            );
        }
    }
    g.finish();
}

/// The disk's raw rate: write ~100 bytes, fdatasync, repeat.
fn raw_sync(c: &mut Criterion) {
    let mut g = c.benchmark_group("disk");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(6))
        .warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(1));
    let dir = tempfile::tempdir_in(".").unwrap();
    let mut f = std::fs::File::create(dir.path().join("sync-probe")).unwrap();
    let buf = [b'x'; 100];
    g.bench_function("write_100b_fdatasync", |b| {
        b.iter(|| {
            f.write_all(&buf).unwrap();
            f.sync_data().unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, raw_sync, appends);
criterion_main!(benches);
