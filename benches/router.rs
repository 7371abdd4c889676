//! Range-map lookups/s with 1,000, 100,000 and 1,000,000 ranges.
//!
//! Run: `cargo bench --bench router`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shard_router::{KeyRange, NodeId, RangeMap, ShardDescriptor, ShardId};
use std::hint::black_box;

fn map_of(n: u64) -> RangeMap {
    // Split points k(1) < k(2) < ... as 8-byte big-endian numbers spread evenly.
    let step = u64::MAX / n;
    let bound = |i: u64| -> Vec<u8> {
        if i == 0 || i == n {
            Vec::new()
        } else {
            (i * step).to_be_bytes().to_vec()
        }
    };
    RangeMap::new((0..n).map(|i| {
        ShardDescriptor::new(
            ShardId(i + 1),
            KeyRange::new(bound(i), bound(i + 1)),
            vec![NodeId(1)],
        )
    }))
    .expect("contiguous")
}

fn lookups(c: &mut Criterion) {
    let mut g = c.benchmark_group("range_map_lookup");
    for n in [1_000u64, 100_000, 1_000_000] {
        let map = map_of(n);
        // A fixed pseudo-random probe sequence (xorshift), 1,024 keys per iteration.
        let mut x = 0x9e3779b97f4a7c15u64;
        let probes: Vec<[u8; 8]> = (0..1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_be_bytes()
            })
            .collect();
        g.throughput(Throughput::Elements(probes.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                for p in &probes {
                    black_box(map.lookup(black_box(p)));
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
