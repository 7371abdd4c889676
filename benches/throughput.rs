//! Client throughput through `tessera::Client` on an in-process 3-node
//! cluster over loopback QUIC with mutual TLS, every write durable (group
//! commit, fsync before the acknowledgement), every read linearizable.
//!
//! - `put/{shards}x{clients}` and `get/{shards}x{clients}` for 1, 16 and 64
//!   shards × 1, 16 and 64 concurrent clients (each one request at a time).
//!   Criterion's throughput is operations per second.
//! - `split/under_load`: one split (the command until both halves serve,
//!   i.e. the new shard has a leader) while 16 clients write.
//! - `snapshot_stream/8MiB`: a replica move of a shard holding 8 MiB, the
//!   snapshot streamed over QUIC; throughput is MB/s of shard data.
//!
//! Run: `cargo bench --bench throughput` (set `TESSERA_BENCH_QUICK=1` for
//! the 1/64-shard, 1/64-client corners only).

#[allow(dead_code)]
#[path = "../tests/common/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "../tests/common/wait.rs"]
mod wait;

use cluster::{TestCluster, Timings};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera::client::ClientOptions;
use tessera::meta;
use tessera::{Client, NodeId, ShardId};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn cluster(ids: &[u64], members: &[u64], shards: u64) -> TestCluster {
    let c = TestCluster::start(
        ids,
        &[],
        Some((shards, members.to_vec())),
        Timings::many_active_groups(),
    )
    .await;
    for s in 1..=shards {
        c.wait_leader(ShardId(s), Duration::from_secs(120))
            .await
            .expect("leader");
    }
    c.wait_leader(meta::META_SHARD, Duration::from_secs(60))
        .await
        .expect("meta leader");
    c
}

fn client(c: &TestCluster) -> Client {
    let issued = c.ca.issue_admin("bench").unwrap();
    Client::from_identity(
        &c.ca.identity(&issued),
        c.config_addrs(),
        ClientOptions::default(),
    )
    .unwrap()
}

/// Key `i` of 10,000, spread over the key space by its first byte.
fn key(i: u64) -> Vec<u8> {
    let mut k = vec![(i.wrapping_mul(2_654_435_761) >> 8) as u8];
    k.extend_from_slice(format!("bench/{i:08}").as_bytes());
    k
}

/// Runs `total` operations spread over `clients` tasks; returns the time.
async fn run_ops(cl: &Client, clients: u64, total: u64, write: bool) -> Duration {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (cl, next) = (cl.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return;
                    }
                    let k = key(i % 10_000);
                    if write {
                        cl.put(&k, &[7u8; 100]).await.expect("put");
                    } else {
                        cl.get(&k).await.expect("get");
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

fn client_throughput(c: &mut Criterion) {
    let quick = std::env::var_os("TESSERA_BENCH_QUICK").is_some();
    let shard_counts: &[u64] = if quick { &[1, 64] } else { &[1, 16, 64] };
    let client_counts: &[u64] = if quick { &[1, 64] } else { &[1, 16, 64] };
    let rt = rt();
    let _runtime = rt.enter();
    for &shards in shard_counts {
        let cl_ = rt.block_on(cluster(&[1, 2, 3], &[1, 2, 3], shards));
        let cl = client(&cl_);
        // Every key exists before the reads.
        rt.block_on(run_ops(&cl, 64, 10_000, true));
        for (name, write) in [("put", true), ("get", false)] {
            let mut g = c.benchmark_group(name);
            g.sample_size(10)
                .measurement_time(Duration::from_secs(5))
                .warm_up_time(Duration::from_secs(1));
            for &clients in client_counts {
                g.throughput(Throughput::Elements(1));
                g.bench_with_input(
                    BenchmarkId::from_parameter(format!("{shards}x{clients}")),
                    &clients,
                    |b, &clients| {
                        b.iter_custom(|iters| rt.block_on(run_ops(&cl, clients, iters, write)));
                    },
                );
            }
            g.finish();
        }
        drop(cl);
        rt.block_on(cl_.shutdown());
    }
}

fn admin(c: &mut Criterion) {
    let rt = rt();
    let _runtime = rt.enter();
    // Splits under a write load.
    let tc = rt.block_on(cluster(&[1, 2, 3], &[1, 2, 3], 1));
    let cl = client(&tc);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..16u64)
        .map(|w| {
            let (cl, stop) = (cl.clone(), stop.clone());
            rt.spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let _ = cl.put(&key(i % 10_000), b"split-load").await;
                    i += 16;
                }
            })
        })
        .collect();
    let next_split = AtomicU64::new(1);
    let mut g = c.benchmark_group("split");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .warm_up_time(Duration::from_secs(1));
    g.bench_function("under_load", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Fresh split keys, each strictly inside some shard.
                let n = next_split.fetch_add(1, Ordering::Relaxed);
                let k = format!("{:016x}", n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).into_bytes();
                let t = Instant::now();
                rt.block_on(cl.split(&k)).expect("split");
                total += t.elapsed();
            }
            total
        });
    });
    g.finish();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = rt.block_on(w);
    }
    drop(cl);
    rt.block_on(tc.shutdown());

    // Snapshot streaming: move an 8 MiB shard back and forth between nodes
    // 3 and 4 (a new replica catches up by a snapshot: the log is short).
    let t = Timings {
        snapshot_logs_since_last: 20,
        snapshot_logs_to_keep: 0,
        ..Timings::many_active_groups()
    };
    let tc = rt.block_on(async {
        let c = TestCluster::start(&[1, 2, 3, 4], &[], Some((1, vec![1, 2, 3])), t).await;
        c.wait_leader(ShardId(1), Duration::from_secs(60))
            .await
            .unwrap();
        c.wait_leader(meta::META_SHARD, Duration::from_secs(60))
            .await
            .unwrap();
        c
    });
    let cl = client(&tc);
    const BYTES: u64 = 8 << 20;
    rt.block_on(async {
        for i in 0..(BYTES / (64 << 10)) {
            cl.put(format!("snap/{i:06}").as_bytes(), &vec![1u8; 64 << 10])
                .await
                .unwrap();
        }
    });
    let mut g = c.benchmark_group("snapshot_stream");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .warm_up_time(Duration::from_secs(1))
        .throughput(Throughput::Bytes(BYTES));
    let mut on = (NodeId(3), NodeId(4));
    g.bench_function("8MiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                rt.block_on(cl.move_replica(ShardId(1), on.0, on.1))
                    .expect("move");
                total += t.elapsed();
                on = (on.1, on.0);
            }
            total
        });
    });
    g.finish();
    drop(cl);
    rt.block_on(tc.shutdown());
}

criterion_group!(benches, client_throughput, admin);
criterion_main!(benches);
