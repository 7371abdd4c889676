//! The node-level batch system's core (`tessera::multiraft`): what one
//! committed write costs in CPU when many groups' rounds are done as one,
//! against one group carrying the same writes.
//!
//! Three nodes in one process, each with its own RocksDB (every round's
//! append synced), messages handed over in memory: no network, no client, no
//! apply into RocksDB. Each iteration proposes 64 writes at their leaders and
//! runs rounds until every node is idle again (leaders have applied them):
//! - `cpu_per_64_writes/64_groups`: one write in each of 64 groups;
//! - `cpu_per_64_writes/1_group`: 64 writes in one group.
//!
//! The measured time is the **process's CPU time** (user and system, every
//! thread, RocksDB's included; `getrusage`), not wall time: divide by 64 for
//! CPU per write. The ratio of the two says whether stepping 64 groups
//! together costs what batching inside one group costs.
//!
//! `closed_loop/64x64/{wall,cpu}`: the node loops (`NodeLoop`: a thread per
//! node, mailboxes, a 100 ms tick) under 64 concurrent writers over 64 groups,
//! each writer one proposal in flight, acknowledged once applied on its leader;
//! an iteration is 64 writes. `wall` is elapsed time (throughput: writes/s),
//! `cpu` the process's CPU time for the same work.
//!
//! `quic/64x64/{wall,cpu}`: the same over real QUIC transports (loopback,
//! mutual TLS). After it the bench prints, for the whole run of that case,
//! UDP datagrams sent per write (`/proc/net/snmp`, the machine's: keep it
//! otherwise quiet), Raft messages per frame, and CPU µs per write.
//!
//! `quic_apply/64x64/{wall,cpu}`: the same with every entry applied to the
//! product's state machine (`ShardApplier`: a put of a 100-byte value to one
//! of about 10,000 keys, as `tessera-ctl bench --workload write` sends), so
//! only the client's request and response are missing against a real node.
//!
//! `apply_round/64_groups/{plain,session}`: one node's apply of a round of
//! 64 committed puts, one per group, as one RocksDB write: plain writes,
//! and exactly-once session writes (which also rewrite a session row).
//! CPU time per round (divide by 64 for one write).
//!
//! `idle_cpu/{1000,10000}`: CPU the whole cluster (over QUIC) spends per
//! 100 ms of wall time with that many idle groups, every one led (100 ms
//! ticks, heartbeats every 2 ticks): 100 ms is one core busy. Datagrams per
//! second are printed after each case.
//!
//! Run: `cargo bench --bench multiraft`.

// The node binary's allocator, so the figures are the node's.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[path = "../tests/common/multiraft.rs"]
mod harness;

use criterion::{criterion_group, criterion_main, Criterion};
use harness::apply::{key, shard_appliers, Starts};
use harness::loops::LoopCluster;
use harness::quic::QuicCluster;
use harness::LocalCluster;
use std::time::Duration;
use tessera::command::{Command, Op};
use tessera::multiraft::{encode_command, LoopConfig};
use tessera::ShardId;

fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    assert_eq!(rc, 0, "getrusage");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn run(c: &mut LocalCluster, targets: &[(ShardId, u64)], iters: u64) -> Duration {
    let start = cpu_time();
    for i in 0..iters {
        for (g, leader) in targets {
            c.nodes
                .get_mut(leader)
                .expect("running")
                .driver
                .propose(*g, format!("value-{i:0>92}").into_bytes())
                .expect("propose");
        }
        c.pump();
    }
    cpu_time() - start
}

fn bench(cr: &mut Criterion) {
    let mut group = cr.benchmark_group("cpu_per_64_writes");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));
    {
        let mut c = LocalCluster::new(3, 64);
        let leaders = c.elect_spread();
        let targets: Vec<(ShardId, u64)> = leaders.into_iter().collect();
        group.bench_function("64_groups", |b| b.iter_custom(|n| run(&mut c, &targets, n)));
    }
    {
        let mut c = LocalCluster::new(3, 1);
        let leader = c.elect_spread()[&ShardId(1)];
        let targets = vec![(ShardId(1), leader); 64];
        group.bench_function("1_group", |b| b.iter_custom(|n| run(&mut c, &targets, n)));
    }
    group.finish();
}

/// Runs `per_writer` writes on each writer (one per group) and returns the
/// wall time and the CPU time they took.
fn closed_loop(
    rt: &tokio::runtime::Runtime,
    c: &std::sync::Arc<LoopCluster>,
    groups: u64,
    per_writer: u64,
) -> (Duration, Duration) {
    let cpu = cpu_time();
    let wall = std::time::Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for g in 1..=groups {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..per_writer {
                    let data = format!("value-{i:0>92}").into_bytes();
                    c.propose(ShardId(g), &data, Duration::from_secs(30))
                        .await
                        .expect("write acknowledged");
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer");
        }
    });
    (wall.elapsed(), cpu_time() - cpu)
}

fn bench_loops(cr: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let c = std::sync::Arc::new(LoopCluster::start(3, 64, LoopConfig::default()));
    // Leaders, and each writer's leader hint.
    closed_loop(&rt, &c, 64, 1);
    let mut group = cr.benchmark_group("closed_loop/64x64");
    group.sample_size(10);
    group.throughput(criterion::Throughput::Elements(64));
    group.bench_function("wall", |b| b.iter_custom(|n| closed_loop(&rt, &c, 64, n).0));
    group.bench_function("cpu", |b| b.iter_custom(|n| closed_loop(&rt, &c, 64, n).1));
    group.finish();
}

fn udp_out() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").expect("read /proc/net/snmp");
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (head, vals) = (
        udp.next().expect("Udp header"),
        udp.next().expect("Udp values"),
    );
    let i = head
        .split_whitespace()
        .position(|h| h == "OutDatagrams")
        .expect("OutDatagrams");
    vals.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// Writes per case: 64 writers, one per group, each one in flight.
fn quic_case<R: Send + 'static>(
    cr: &mut Criterion,
    name: &str,
    rt: &tokio::runtime::Runtime,
    c: std::sync::Arc<QuicCluster<R>>,
    data: fn(u64, u64) -> Vec<u8>,
) {
    let run = |per_writer: u64| -> (Duration, Duration) {
        let cpu = cpu_time();
        let wall = std::time::Instant::now();
        rt.block_on(async {
            let tasks: Vec<_> = (1..=64u64)
                .map(|g| {
                    let c = c.clone();
                    tokio::spawn(async move {
                        for i in 0..per_writer {
                            c.router
                                .propose(&c.loops, ShardId(g), &data(g, i), Duration::from_secs(30))
                                .await
                                .expect("write acknowledged");
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("writer");
            }
        });
        (wall.elapsed(), cpu_time() - cpu)
    };
    run(1);
    let frames = |c: &QuicCluster<R>| -> (u64, u64) {
        c.frames.values().fold((0, 0), |(f, m), x| {
            (
                f + x.frames.load(std::sync::atomic::Ordering::Relaxed),
                m + x.messages.load(std::sync::atomic::Ordering::Relaxed),
            )
        })
    };
    let mut group = cr.benchmark_group(name);
    group.sample_size(10);
    group.throughput(criterion::Throughput::Elements(64));
    let (udp0, (f0, m0), cpu0) = (udp_out(), frames(&c), cpu_time());
    let writes = std::cell::Cell::new(0u64);
    group.bench_function("wall", |b| {
        b.iter_custom(|n| {
            writes.set(writes.get() + 64 * n);
            run(n).0
        })
    });
    group.bench_function("cpu", |b| {
        b.iter_custom(|n| {
            writes.set(writes.get() + 64 * n);
            run(n).1
        })
    });
    group.finish();
    let (udp1, (f1, m1), cpu1) = (udp_out(), frames(&c), cpu_time());
    let w = writes.get().max(1) as f64;
    eprintln!(
        "{name} over {} writes: {:.2} UDP datagrams per write, {:.1} Raft messages per frame, {:.0} µs CPU per write (criterion's analysis included)",
        writes.get(),
        (udp1 - udp0) as f64 / w,
        (m1 - m0) as f64 / (f1 - f0).max(1) as f64,
        (cpu1 - cpu0).as_secs_f64() * 1e6 / w
    );
}

fn rt2() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn bench_quic(cr: &mut Criterion) {
    let rt = rt2();
    let c = std::sync::Arc::new(rt.block_on(QuicCluster::start(3, 64, LoopConfig::default())));
    quic_case(cr, "quic/64x64", &rt, c, |_, i| {
        format!("value-{i:0>92}").into_bytes()
    });
}

/// A put of a 100-byte value to one of ~10,000 keys (about 156 per group),
/// as `tessera-ctl bench --workload write` sends.
fn put(g: u64, i: u64) -> Vec<u8> {
    let n = (i * 7919 + g * 104_729) % 156;
    encode_command(&Command::Write {
        ops: vec![Op::Put {
            key: key(g, &format!("key-{n:05}")),
            value: vec![b'v'; 100],
        }],
    })
}

fn bench_quic_apply(cr: &mut Criterion) {
    let rt = rt2();
    let make = shard_appliers(64, Starts::default());
    let c = std::sync::Arc::new(rt.block_on(QuicCluster::start_with(
        3,
        64,
        LoopConfig::default(),
        make,
    )));
    quic_case(cr, "quic_apply/64x64", &rt, c, put);
}

/// One node's apply of one round of committed writes, one to each of 64
/// groups (`ShardApplier`, one RocksDB write for the round): `plain` puts,
/// and `session` the same puts as exactly-once session writes (64
/// clients), which also rewrite the client's session row.
fn bench_apply(cr: &mut Criterion) {
    use tessera::multiraft::{Applier, ShardApplier};
    use tessera::session::SessionStamp;
    use tessera::storage::{Engine, StorageConfig};
    let mut group = cr.benchmark_group("apply_round/64_groups");
    group.measurement_time(Duration::from_secs(10));
    for session in [false, true] {
        let dir = tempfile::tempdir().expect("temp dir");
        let engine = Engine::open(StorageConfig::new(dir.path())).expect("open engine");
        let rt = rt2();
        let mut applier = ShardApplier::default();
        for g in 1..=64 {
            rt.block_on(engine.create_shard(&harness::apply::descriptor(g)))
                .expect("create shard");
            let (_log, machine) = engine.open_shard(ShardId(g)).expect("open shard");
            applier.add(ShardId(g), machine);
        }
        let mut index = 0u64;
        let mut seq = [0u64; 64];
        let name = if session { "session" } else { "plain" };
        group.bench_function(name, |b| {
            b.iter_custom(|n| {
                let start = cpu_time();
                for _ in 0..n {
                    index += 1;
                    let round: Vec<_> = (1..=64u64)
                        .map(|g| {
                            let n = (index * 7919 + g * 104_729) % 156;
                            let ops = vec![Op::Put {
                                key: key(g, &format!("key-{n:05}")),
                                value: vec![b'v'; 100],
                            }];
                            let client = ((index + g) % 64) as usize;
                            let cmd = if session {
                                seq[client] += 1;
                                Command::SessionWrite {
                                    stamp: SessionStamp {
                                        client: client as u128 + 1,
                                        seq: seq[client],
                                        acked: seq[client],
                                    },
                                    at_ms: index,
                                    ops,
                                }
                            } else {
                                Command::Write { ops }
                            };
                            let e = raft::eraftpb::Entry {
                                term: 1,
                                index,
                                data: encode_command(&cmd).into(),
                                ..Default::default()
                            };
                            (ShardId(g), vec![e])
                        })
                        .collect();
                    applier.apply(&round).expect("apply");
                }
                cpu_time() - start
            })
        });
        drop(applier);
        drop(engine);
    }
    group.finish();
}

/// CPU the whole 3-node cluster spends per 100 ms of wall time while its
/// groups are idle (every group led, nothing written).
fn bench_idle(cr: &mut Criterion) {
    let rt = rt2();
    let mut group = cr.benchmark_group("idle_cpu");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .warm_up_time(Duration::from_secs(2));
    for groups in [1_000u64, 10_000] {
        let c =
            std::sync::Arc::new(rt.block_on(QuicCluster::start(3, groups, LoopConfig::default())));
        // Every group has a leader: a read point answers only from one.
        rt.block_on(async {
            let tasks: Vec<_> = (1..=groups)
                .map(|g| {
                    let c = c.clone();
                    tokio::spawn(async move {
                        c.router
                            .read_index(&c.loops, ShardId(g), Duration::from_secs(120))
                            .await
                            .expect("a leader within 120 s");
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("read point");
            }
        });
        let (udp0, wall0) = (udp_out(), std::time::Instant::now());
        group.bench_function(criterion::BenchmarkId::from_parameter(groups), |b| {
            b.iter_custom(|n| {
                let mut cpu = Duration::ZERO;
                for _ in 0..n {
                    let c0 = cpu_time();
                    std::thread::sleep(Duration::from_millis(100));
                    cpu += cpu_time() - c0;
                }
                cpu
            })
        });
        let secs = wall0.elapsed().as_secs_f64();
        eprintln!(
            "idle_cpu/{groups}: {:.0} UDP datagrams per second (whole cluster)",
            (udp_out() - udp0) as f64 / secs
        );
        drop(c);
    }
    group.finish();
}

criterion_group!(
    benches,
    bench,
    bench_loops,
    bench_quic,
    bench_quic_apply,
    bench_apply,
    bench_idle
);
criterion_main!(benches);
