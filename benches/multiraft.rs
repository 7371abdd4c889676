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
//! Run: `cargo bench --bench multiraft`.

#[path = "../tests/common/multiraft.rs"]
mod harness;

use criterion::{criterion_group, criterion_main, Criterion};
use harness::LocalCluster;
use std::time::Duration;
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

criterion_group!(benches, bench);
criterion_main!(benches);
