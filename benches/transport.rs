//! Transport benchmarks on real nodes over loopback QUIC with mutual TLS.
//!
//! - `peer_rpc/{1,100,10000}`: Raft requests per second from one node to
//!   another (each of S shards keeps one request in flight; the receiver
//!   answers each with a typed refusal, so this is the transport's cost
//!   alone). Messages per frame are printed after each case.
//! - `idle_cpu/{1000,10000}`: CPU time the whole 3-node in-process cluster
//!   spends per 100 ms of wall time while hosting S idle shards (3 replicas
//!   each, leaders spread over the nodes, 500 ms heartbeats). 100 ms means
//!   one core busy; divide by 3 for one node.
//! - `idle_cpu_quiescent/{1000,10000}`: the same with the product's default
//!   timings (300 ms heartbeats) and quiescence on (`quiesce_after_ms`
//!   3000), measured once every replica sleeps.
//!
//! Run: `cargo bench --bench transport`.

#[allow(dead_code)]
#[path = "../tests/common/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "../tests/common/wait.rs"]
mod wait;

use cluster::{TestCluster, Timings};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::{Duration, Instant};
use tessera::raft::rpc::{self, CallError, PeerRequest};
use tessera::raft::Vote;
use tessera::{NodeId, ShardId};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn peer_rpc(c: &mut Criterion) {
    let rt = rt();
    let cluster = rt.block_on(TestCluster::start(&[1, 2], &[], None, Timings::fast()));
    rt.block_on(async {
        assert!(
            cluster
                .node(1)
                .transport()
                .wait_connected(Duration::from_secs(10))
                .await
        );
    });
    let mut g = c.benchmark_group("peer_rpc");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(2));
    for shards in [1u64, 100, 10_000] {
        g.throughput(Throughput::Elements(shards));
        let before = (cluster.node(1).metrics(), cluster.node(2).metrics());
        g.bench_with_input(BenchmarkId::from_parameter(shards), &shards, |b, _| {
            b.iter_custom(|iters| {
                let t = cluster.node(1).transport().clone();
                let start = Instant::now();
                rt.block_on(async {
                    let tasks: Vec<_> = (0..shards)
                        .map(|s| {
                            let t = t.clone();
                            tokio::spawn(async move {
                                for _ in 0..iters {
                                    let req = PeerRequest::Vote(openraft::raft::VoteRequest::new(
                                        Vote::new(1, NodeId(1)),
                                        None,
                                    ));
                                    let r = rpc::call(
                                        &t,
                                        NodeId(2),
                                        ShardId(1_000_000 + s),
                                        &req,
                                        Duration::from_secs(30),
                                    )
                                    .await;
                                    assert!(matches!(r, Err(CallError::Refused { .. })), "{r:?}");
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
        let after = (cluster.node(1).metrics(), cluster.node(2).metrics());
        let (m1, f1) = (
            after.0.messages_sent - before.0.messages_sent,
            after.0.frames_sent - before.0.frames_sent,
        );
        let (m2, f2) = (
            after.1.messages_sent - before.1.messages_sent,
            after.1.frames_sent - before.1.frames_sent,
        );
        eprintln!(
            "peer_rpc/{shards}: requests {m1} in {f1} frames ({:.1}/frame), replies {m2} in {f2} frames ({:.1}/frame)",
            m1 as f64 / f1.max(1) as f64,
            m2 as f64 / f2.max(1) as f64
        );
    }
    g.finish();
    rt.block_on(cluster.shutdown());
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which is parenthesised and may hold spaces).
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

fn idle_cpu(c: &mut Criterion) {
    idle_cpu_group(c, "idle_cpu", Timings::many_groups());
}

fn idle_cpu_quiescent(c: &mut Criterion) {
    let timings = Timings {
        heartbeat_ms: 300,
        election_min_ms: 1500,
        election_max_ms: 3000,
        linger_ms: 60,
        quiesce_after_ms: 3000,
        ..Timings::many_groups()
    };
    idle_cpu_group(c, "idle_cpu_quiescent", timings);
}

/// A 3-node cluster with `shards` idle shards, every one led (and, with
/// quiescence on, every replica asleep).
async fn idle_cluster(shards: u64, timings: Timings) -> TestCluster {
    let c = TestCluster::start(&[1, 2, 3], &[], None, timings).await;
    let descs = cluster::spread_shards(shards, &[1, 2, 3], |i| i % 3 + 1);
    c.create_shards(&descs).await;
    c.wait_until("every shard led", Duration::from_secs(600), |c| {
        c.up().map(|n| n.metrics().shards_led).sum::<u64>() >= shards
    })
    .await
    .unwrap();
    if timings.quiesce_after_ms > 0 {
        // Every replica (3 per shard) asleep.
        c.wait_until("every replica asleep", Duration::from_secs(600), |c| {
            c.up().map(|n| n.metrics().groups_quiescent).sum::<u64>() >= 3 * shards
        })
        .await
        .unwrap();
    }
    c
}

fn idle_cpu_group(c: &mut Criterion, name: &str, timings: Timings) {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .warm_up_time(Duration::from_secs(2));
    for shards in [1000u64, 10_000] {
        // Built on the first call, so a filtered-out case starts nothing.
        let mut running: Option<(tokio::runtime::Runtime, TestCluster, Instant, (u64, u64))> = None;
        g.bench_with_input(BenchmarkId::from_parameter(shards), &shards, |b, _| {
            if running.is_none() {
                let rt = rt();
                let c = rt.block_on(idle_cluster(shards, timings));
                let m = c.node(1).metrics();
                running = Some((rt, c, Instant::now(), (m.messages_sent, m.frames_sent)));
            }
            b.iter_custom(|iters| {
                let cpu0 = cpu_time();
                std::thread::sleep(Duration::from_millis(100) * iters as u32);
                cpu_time() - cpu0
            })
        });
        if let Some((rt, cluster, wall, (msgs, frames))) = running {
            let m = cluster.node(1).metrics();
            let secs = wall.elapsed().as_secs_f64();
            eprintln!(
                "{name}/{shards}: n1 sent {:.0} messages/s in {:.1} frames/s",
                (m.messages_sent - msgs) as f64 / secs,
                (m.frames_sent - frames) as f64 / secs
            );
            rt.block_on(cluster.shutdown());
        }
    }
    g.finish();
}

criterion_group!(benches, peer_rpc, idle_cpu, idle_cpu_quiescent);
criterion_main!(benches);
