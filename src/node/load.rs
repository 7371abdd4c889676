//! Per-shard load: reads, writes and written bytes per second, decayed
//! exponentially, counted where client requests are served (the leader).
//!
//! [`DecayedRate`] and [`load_split_key`] are pure (time and samples are
//! arguments), so their behaviour is tested apart from clocks;
//! [`LoadTracker`] holds one set of rates (and, with load splits on, recent
//! request keys) per shard.

use crate::command::LoadReport;
use crate::{KeyRange, ShardId};
use dashmap::DashMap;
use std::collections::VecDeque;
use std::time::Instant;

/// Recent request keys kept per shard (the first key of each request),
/// from which a hot shard's split key is chosen.
pub const KEY_SAMPLES: usize = 64;

/// Fewest samples a load split decides on.
pub const KEY_SAMPLES_MIN: usize = 16;

/// Where to split a hot shard so each half takes about half of its recent
/// requests: the median of the sampled request keys, moved up to the next
/// larger sampled key when it is the range's start (the left half must not
/// be empty). `None` when there are too few samples, or when no sampled key
/// lies strictly inside the range above its start (one hot key: no split
/// divides it).
pub fn load_split_key(samples: &[Vec<u8>], range: &KeyRange) -> Option<Vec<u8>> {
    if samples.len() < KEY_SAMPLES_MIN {
        return None;
    }
    let mut inside: Vec<&Vec<u8>> = samples.iter().filter(|k| range.contains(k)).collect();
    inside.sort();
    // The smallest sample at or above the median that lies above the
    // range's start (samples at the start count on the left).
    let key = inside
        .get(inside.len() / 2..)?
        .iter()
        .find(|k| k.as_slice() > range.start.as_slice())?;
    // Splitting below every sample would leave the whole load on the right.
    (inside.first()? < key).then(|| (*key).clone())
}

/// How fast old events fade: a rate reflects about the last this many
/// seconds (the time constant of the exponential decay).
pub const LOAD_DECAY_SECS: f64 = 10.0;

/// An event rate (events per second) that decays exponentially: each event
/// adds `1/τ`, and the sum fades by `e^(-Δt/τ)`. Under a steady rate `r`
/// it converges to `r`; after the events stop it falls toward 0.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DecayedRate {
    value: f64,
    /// Seconds (on the caller's clock) at which `value` was last brought
    /// up to date.
    at: f64,
}

impl DecayedRate {
    /// Counts `n` events at `now` (seconds; a `now` before the last update
    /// counts at the last update).
    pub fn add(&mut self, n: f64, now: f64, tau: f64) {
        self.value = self.rate(now, tau) + n / tau;
        self.at = self.at.max(now);
    }

    /// The rate at `now`, in events per second.
    pub fn rate(&self, now: f64, tau: f64) -> f64 {
        let dt = (now - self.at).max(0.0);
        self.value * (-dt / tau).exp()
    }
}

/// One shard's rates.
#[derive(Debug, Clone, Default, PartialEq)]
struct ShardLoad {
    reads: DecayedRate,
    writes: DecayedRate,
    write_bytes: DecayedRate,
    /// The first key of the latest requests, oldest first.
    keys: VecDeque<Vec<u8>>,
}

impl ShardLoad {
    fn sample(&mut self, key: &[u8]) {
        if self.keys.len() == KEY_SAMPLES {
            self.keys.pop_front();
        }
        self.keys.push_back(key.to_vec());
    }
}

/// Whether `now` differs enough from `last` (what the meta shard holds)
/// to report again: some rate or the size moved by more than 20% of the
/// larger value and by more than a floor (5 operations/s, 4 KiB/s, 1 MiB),
/// so noise in slow or small shards does not reach the meta shard's log.
pub fn load_changed(last: &LoadReport, now: &LoadReport) -> bool {
    let moved = |a: u64, b: u64, floor: u64| {
        let d = a.abs_diff(b);
        d > floor && d * 5 > a.max(b)
    };
    moved(last.reads_per_s, now.reads_per_s, 5)
        || moved(last.writes_per_s, now.writes_per_s, 5)
        || moved(last.write_bytes_per_s, now.write_bytes_per_s, 4096)
        || moved(last.size_bytes, now.size_bytes, 1 << 20)
}

/// A shard's load as reported.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadRates {
    /// Keys read per second (a scan counts the pairs it returned, at least 1).
    pub reads_per_s: f64,
    /// Write operations per second.
    pub writes_per_s: f64,
    /// Key and value bytes written per second.
    pub write_bytes_per_s: f64,
}

/// The node's per-shard load.
#[derive(Debug)]
pub struct LoadTracker {
    epoch: Instant,
    shards: DashMap<ShardId, ShardLoad>,
    /// Whether request keys are kept (only load splits use them).
    sample_keys: bool,
}

impl LoadTracker {
    /// A tracker that keeps recent request keys only when `sample_keys`
    /// (load splits are on): otherwise no request pays for a key copy.
    pub fn new(sample_keys: bool) -> Self {
        LoadTracker {
            epoch: Instant::now(),
            shards: DashMap::new(),
            sample_keys,
        }
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// Counts `keys` keys read from `shard`.
    pub fn record_reads(&self, shard: ShardId, keys: u64) {
        let now = self.now();
        let mut l = self.shards.entry(shard).or_default();
        l.reads.add(keys as f64, now, LOAD_DECAY_SECS);
    }

    /// Counts one write request of `ops` operations and `bytes` key and
    /// value bytes to `shard`.
    pub fn record_write(&self, shard: ShardId, ops: u64, bytes: u64) {
        let now = self.now();
        let mut l = self.shards.entry(shard).or_default();
        l.writes.add(ops as f64, now, LOAD_DECAY_SECS);
        l.write_bytes.add(bytes as f64, now, LOAD_DECAY_SECS);
    }

    /// Keeps `key`, the first key of a request to `shard`, among its
    /// recent request keys (when keys are sampled).
    pub fn sample(&self, shard: ShardId, key: &[u8]) {
        if self.sample_keys {
            self.shards.entry(shard).or_default().sample(key);
        }
    }

    /// `shard`'s recent request keys (first key of each request).
    pub fn samples(&self, shard: ShardId) -> Vec<Vec<u8>> {
        self.shards
            .get(&shard)
            .map(|l| l.keys.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// `shard`'s rates now (zero for a shard never served here).
    pub fn rates(&self, shard: ShardId) -> LoadRates {
        let now = self.now();
        self.shards
            .get(&shard)
            .map_or(LoadRates::default(), |l| LoadRates {
                reads_per_s: l.reads.rate(now, LOAD_DECAY_SECS),
                writes_per_s: l.writes.rate(now, LOAD_DECAY_SECS),
                write_bytes_per_s: l.write_bytes.rate(now, LOAD_DECAY_SECS),
            })
    }

    /// Forgets `shard` (its replica left this node, or it was split and
    /// its load must be measured afresh).
    pub fn forget(&self, shard: ShardId) {
        self.shards.remove(&shard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_is_reported_again_only_when_it_moved() {
        let r = |reads, writes, bytes, size| LoadReport {
            shard: ShardId(1),
            node: crate::NodeId(1),
            at_ms: 0,
            reads_per_s: reads,
            writes_per_s: writes,
            write_bytes_per_s: bytes,
            size_bytes: size,
        };
        let base = r(100, 200, 20_000, 10 << 20);
        assert!(!load_changed(&base, &base));
        // Within 20%: noise.
        assert!(!load_changed(&base, &r(110, 180, 22_000, 11 << 20)));
        // Each figure on its own.
        assert!(load_changed(&base, &r(130, 200, 20_000, 10 << 20)));
        assert!(load_changed(&base, &r(100, 150, 20_000, 10 << 20)));
        assert!(load_changed(&base, &r(100, 200, 30_000, 10 << 20)));
        assert!(load_changed(&base, &r(100, 200, 20_000, 14 << 20)));
        // A slow shard doubling from 2 to 4 ops/s is under the floor.
        assert!(!load_changed(&r(2, 2, 100, 0), &r(4, 4, 200, 1000)));
        // A shard going idle, or waking up, is reported.
        assert!(load_changed(&base, &r(0, 0, 0, 10 << 20)));
        assert!(load_changed(&r(0, 0, 0, 0), &r(0, 50, 5_000, 0)));
    }
    use proptest::prelude::*;

    const TAU: f64 = LOAD_DECAY_SECS;

    /// `r` events per second for `secs` seconds, in ticks of `step`.
    fn steady(r: f64, secs: f64, step: f64) -> (DecayedRate, f64) {
        let mut d = DecayedRate::default();
        let mut t = 0.0;
        while t < secs {
            t += step;
            d.add(r * step, t, TAU);
        }
        (d, t)
    }

    proptest! {
        /// A steady rate is reported as itself once several time
        /// constants have passed (within 2%, plus one tick's share).
        #[test]
        fn a_steady_rate_converges_to_itself(r in 0.1f64..100_000.0, step in 0.01f64..1.0) {
            let (d, t) = steady(r, 8.0 * TAU, step);
            let got = d.rate(t, TAU);
            // Read right after an add, a tick's events count in full:
            // up to `step / TAU` above the rate.
            let tolerance = (0.02 + step / TAU) * r + 1e-9;
            prop_assert!((got - r).abs() <= tolerance, "rate {r}/s reported as {got}");
        }

        /// After the events stop the rate only falls, never below 0, and
        /// is under 1% of its value five time constants later.
        #[test]
        fn a_silent_shard_cools_down(r in 0.1f64..100_000.0, gaps in prop::collection::vec(0.0f64..5.0, 1..20)) {
            let (d, mut t) = steady(r, 3.0 * TAU, 0.1);
            let mut last = d.rate(t, TAU);
            for g in gaps {
                t += g;
                let now = d.rate(t, TAU);
                prop_assert!(now >= 0.0 && now <= last, "{last} then {now}");
                last = now;
            }
            let start = d.rate(3.0 * TAU, TAU);
            prop_assert!(d.rate(t.max(3.0 * TAU) + 5.0 * TAU, TAU) < 0.01 * start);
        }

        /// More events never give a lower rate.
        #[test]
        fn more_events_never_read_lower(a in 0u32..1000, extra in 1u32..1000, at in 0.0f64..100.0) {
            let mut x = DecayedRate::default();
            let mut y = DecayedRate::default();
            x.add(a as f64, at, TAU);
            y.add((a + extra) as f64, at, TAU);
            prop_assert!(y.rate(at + 1.0, TAU) > x.rate(at + 1.0, TAU));
        }
    }

    #[test]
    fn an_update_from_an_earlier_clock_counts_at_the_last_update() {
        let mut d = DecayedRate::default();
        d.add(10.0, 5.0, TAU);
        d.add(10.0, 4.0, TAU);
        assert!((d.rate(5.0, TAU) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn the_tracker_reports_per_shard_and_forgets() {
        let t = LoadTracker::new(true);
        t.record_reads(ShardId(1), 5);
        t.sample(ShardId(1), b"a");
        t.record_write(ShardId(2), 3, 300);
        t.sample(ShardId(2), b"b");
        let one = t.rates(ShardId(1));
        let two = t.rates(ShardId(2));
        assert!(one.reads_per_s > 0.0 && one.writes_per_s == 0.0);
        assert!(two.writes_per_s > 0.0 && two.reads_per_s == 0.0);
        assert!((two.write_bytes_per_s / two.writes_per_s - 100.0).abs() < 1e-6);
        assert_eq!(t.samples(ShardId(1)), vec![b"a".to_vec()]);
        t.forget(ShardId(2));
        assert_eq!(t.rates(ShardId(2)), LoadRates::default());
        assert!(t.samples(ShardId(2)).is_empty());
        // Only the latest requests are kept.
        for i in 0..(KEY_SAMPLES as u32 + 10) {
            t.sample(ShardId(3), &i.to_be_bytes());
        }
        let s = t.samples(ShardId(3));
        assert_eq!(s.len(), KEY_SAMPLES);
        assert_eq!(s[0], 10u32.to_be_bytes().to_vec());
        // Without load splits no key is kept.
        let off = LoadTracker::new(false);
        off.record_write(ShardId(1), 1, 1);
        off.sample(ShardId(1), b"a");
        assert!(off.samples(ShardId(1)).is_empty());
    }

    fn range(start: &[u8], end: &[u8]) -> KeyRange {
        KeyRange::new(start.to_vec(), end.to_vec())
    }

    #[test]
    fn one_hot_key_or_too_few_samples_do_not_split() {
        let r = range(b"", b"");
        assert_eq!(load_split_key(&vec![b"k".to_vec(); 64], &r), None);
        let few: Vec<Vec<u8>> = (0..KEY_SAMPLES_MIN as u8 - 1).map(|i| vec![i]).collect();
        assert_eq!(load_split_key(&few, &r), None);
        // Every sample at the range's start: nothing strictly above it.
        assert_eq!(
            load_split_key(&vec![b"m".to_vec(); 20], &range(b"m", b"z")),
            None
        );
    }

    proptest! {
        /// The split key lies strictly inside the range (above its start),
        /// is one of the samples, and leaves sampled requests on both
        /// sides; with distinct samples, each side takes at least a third.
        #[test]
        fn the_load_split_key_divides_the_samples(
            keys in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..4), 0..80),
            start in prop::collection::vec(any::<u8>(), 0..2),
        ) {
            let r = range(&start, b"");
            if let Some(k) = load_split_key(&keys, &r) {
                prop_assert!(k.as_slice() > r.start.as_slice() && r.contains(&k));
                prop_assert!(keys.contains(&k));
                let inside: Vec<&Vec<u8>> = keys.iter().filter(|x| r.contains(x)).collect();
                let left = inside.iter().filter(|x| ***x < k).count();
                let right = inside.len() - left;
                prop_assert!(left > 0 && right > 0, "{left} / {right}");
                let mut distinct = inside.clone();
                distinct.sort();
                distinct.dedup();
                if distinct.len() == inside.len() {
                    prop_assert!(3 * left >= inside.len() && 3 * right >= inside.len(), "{left} / {right}");
                }
            }
        }
    }
}
