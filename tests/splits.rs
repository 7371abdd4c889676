//! Splits and replica moves on a live cluster (RELIABILITY scenarios 4 and
//! 5): clients keep working and lose nothing, every key is owned by exactly
//! one shard, ranges and data persist across restarts, and a move whose
//! target dies mid-snapshot still ends with identical replicas.

mod common;

use common::cluster::{init_tracing, TestCluster, Timings};
use common::load::{wait_ops, Load};
use common::routes::{check_ownership_and_data, hosted};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tessera::meta;
use tessera::{Client, NodeId, ShardDescriptor, ShardId};

const WAIT: Duration = Duration::from_secs(60);

async fn ready(ids: &[u64], members: &[u64], shards: u64) -> TestCluster {
    let c = TestCluster::start(ids, &[], Some((shards, members.to_vec())), Timings::fast()).await;
    let node = c.node(members[0]).clone();
    for s in node.shard_ids() {
        c.wait_leader(s, WAIT).await.unwrap();
    }
    c.wait_leader(meta::META_SHARD, WAIT).await.unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splits_under_load_lose_nothing_and_serve_each_key_once() {
    init_tracing();
    let mut c = ready(&[1, 2, 3], &[1, 2, 3], 1).await;
    let cl = c.client();
    let load = Load::start(&cl, 8, 64);
    wait_ops(&load, 200, WAIT).await;
    let admin = c.client();
    for key in ["m", "f", "t", "c"] {
        // A node down during two of the splits: it applies them from the
        // log when it comes back (RELIABILITY scenario 4).
        match key {
            "f" => c.kill(3).await,
            "c" => c.restart(3).await,
            _ => {}
        }
        let (left, right) = admin.split(key.as_bytes()).await.unwrap();
        assert_eq!(left.range.end, key.as_bytes());
        assert_eq!(right.range.start, key.as_bytes());
        assert_eq!(left.epoch.version, right.epoch.version);
        assert_ne!(left.id, right.id);
        tracing::info!(%key, left = %left.range, right = %right.range, "split");
        wait_ops(&load, 100, WAIT).await;
    }
    let r = load.finish().await;
    r.assert_no_errors();
    assert!(r.acked.len() > 500, "load made progress: {}", r.acked.len());
    let routes = check_ownership_and_data(&c, &cl, &r.acked).await;
    assert_eq!(routes.len(), 5, "1 shard split 4 times");
    // Every shard serves: one of the load's keys per shard was read above.
    for d in &routes {
        assert!(
            r.acked.keys().any(|k| d.range.contains(k)),
            "{} got writes",
            d.id
        );
    }
    // A split at a key outside any shard interior is refused with a reason.
    let e = admin.split(b"").await.unwrap_err();
    assert!(e.to_string().contains("key"), "{e}");
    // Splitting again at a boundary is harmless.
    let (l, rr) = admin.split(b"m").await.unwrap();
    assert_eq!(
        (l.range.end.as_slice(), rr.range.start.as_slice()),
        (&b"m"[..], &b"m"[..])
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recursive_splits_persist_across_restarts() {
    init_tracing();
    let mut c = ready(&[1, 2, 3], &[1, 2, 3], 2).await;
    let cl = c.client();
    let mut acked = BTreeMap::new();
    for i in 0..260u64 {
        let k = common::load::load_key((i % 8) as usize, i);
        let v = format!("value-{i}").into_bytes();
        cl.put(&k, &v).await.unwrap();
        acked.insert(k, v);
    }
    // Recursive: split, then split each half again, and a half of a half.
    for key in ["d", "b", "h", "j", "u", "w", "x"] {
        cl.split(key.as_bytes()).await.unwrap();
    }
    let before = check_ownership_and_data(&c, &cl, &acked).await;
    assert_eq!(before.len(), 9);
    // The meta shard recorded every descriptor (the reporter catches up).
    c.wait_until("the meta shard records every split", WAIT, |c| {
        let Some(recorded) = c.node(1).meta_routes() else {
            return false;
        };
        before.iter().all(|d| {
            recorded
                .iter()
                .any(|r| r.id == d.id && r.range == d.range && r.epoch.version == d.epoch.version)
        })
    })
    .await
    .unwrap();
    for id in [1, 2, 3] {
        c.kill(id).await;
    }
    for id in [1, 2, 3] {
        c.restart(id).await;
    }
    for d in &before {
        c.wait_leader(d.id, WAIT).await.unwrap();
    }
    let cl = c.client();
    let after = check_ownership_and_data(&c, &cl, &acked).await;
    let ranges = |v: &[ShardDescriptor]| -> BTreeSet<(ShardId, Vec<u8>, Vec<u8>)> {
        v.iter()
            .map(|d| (d.id, d.range.start.clone(), d.range.end.clone()))
            .collect()
    };
    assert_eq!(ranges(&before), ranges(&after), "ranges persist");
    // And the shards keep taking writes after the restart.
    for d in &after {
        let mut k = d.range.start.clone();
        k.extend_from_slice(b"/after-restart");
        cl.put(&k, b"ok").await.unwrap();
    }
    c.shutdown().await;
}

/// Three nodes, one shard, automatic splits checked every 200 ms: by size
/// over `max_bytes`, by load at `load_ops_per_s` (0: off).
async fn one_shard_splitting(max_bytes: u64, load_ops_per_s: u64) -> (TestCluster, Client) {
    init_tracing();
    let t = Timings {
        split: tessera::node::SplitConfig {
            max_bytes,
            check_interval_ms: 200,
            load_ops_per_s,
            ..Default::default()
        },
        ..Timings::fast()
    };
    let c = TestCluster::start(&[1, 2, 3], &[], Some((1, vec![1, 2, 3])), t).await;
    c.wait_leader(ShardId(1), WAIT).await.unwrap();
    c.wait_leader(meta::META_SHARD, WAIT).await.unwrap();
    let cl = c.client();
    (c, cl)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_over_the_size_limit_splits_by_itself() {
    let (c, cl) = one_shard_splitting(64 << 10, 0).await;
    let mut acked = BTreeMap::new();
    // ~200 KiB over the key space: the one shard is 3x over the limit.
    for i in 0..200u64 {
        let k = common::load::load_key((i % 8) as usize, i);
        let v = vec![b'v'; 1024];
        cl.put(&k, &v).await.unwrap();
        acked.insert(k, v);
    }
    c.wait_until(
        "the shard splits itself until every half is under the limit",
        WAIT,
        |c| {
            let hosted = hosted(c);
            let shards = &hosted[&NodeId(1)];
            shards.len() >= 3
                && shards.iter().all(|d| {
                    let end = if d.range.end.is_empty() {
                        meta::system_prefix()
                    } else {
                        d.range.end.clone()
                    };
                    let bytes: usize = c
                        .node(1)
                        .engine()
                        .scan(&d.range.start, &end, usize::MAX)
                        .unwrap()
                        .iter()
                        .map(|(k, v)| k.len() + v.len())
                        .sum();
                    bytes < (64 << 10)
                })
        },
    )
    .await
    .unwrap();
    let routes = check_ownership_and_data(&c, &cl, &acked).await;
    assert!(routes.len() >= 3, "{} shards", routes.len());
    c.shutdown().await;
}

/// A shard that stays hot splits by itself, at a key taken from its recent
/// requests: with every write in a narrow hot range, the split falls inside
/// that range (a split by size would cut at the middle of the data), and
/// every acknowledged write is still read back from the right shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_stays_hot_splits_inside_its_hot_range() {
    let (c, cl) = one_shard_splitting(0, 30).await;
    // Cold data across the key space, written once.
    let mut acked = BTreeMap::new();
    for first in [b'a', b'z'] {
        let k = vec![first, b'/', b'c'];
        cl.put(&k, b"cold").await.unwrap();
        acked.insert(k, b"cold".to_vec());
    }
    let hot_key = |i: u64| format!("m/hot/{:03}", i % 100).into_bytes();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (cl, stop) = (cl.clone(), stop.clone());
        tokio::spawn(async move {
            let mut last = BTreeMap::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (k, v) = (hot_key(i), format!("v{i}").into_bytes());
                cl.put(&k, &v).await.expect("hot write");
                last.insert(k, v);
                i += 1;
            }
            last
        })
    };
    let (lo, hi) = (hot_key(0), hot_key(99));
    c.wait_until("a split point falls inside the hot range", WAIT, |c| {
        hosted(c)[&NodeId(1)]
            .iter()
            .any(|d| d.range.start > lo && d.range.start <= hi)
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    acked.extend(writer.await.unwrap());
    let routes = check_ownership_and_data(&c, &cl, &acked).await;
    assert!(routes.len() >= 2, "{} shards", routes.len());
    c.shutdown().await;
}
