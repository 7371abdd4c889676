//! Replica moves, leader transfers and nodes joining and draining, on a
//! live cluster with clients writing throughout (RELIABILITY scenario 5).
#![cfg(feature = "failpoints")]

mod common;

use common::cluster::{init_tracing, TestCluster, Timings};
use common::load::{wait_ops, Load};
use openraft::async_runtime::watch::WatchReceiver as _;
use std::collections::BTreeMap;
use std::time::Duration;
use tessera::meta;
use tessera::{NodeId, ShardDescriptor, ShardId};

const WAIT: Duration = Duration::from_secs(60);

/// A hash of `range`'s data on `node`, with the shard's applied index.
fn range_hash(c: &TestCluster, node: u64, d: &ShardDescriptor) -> (u64, u64) {
    use std::hash::{Hash, Hasher};
    let n = c.node(node);
    let end = if d.range.end.is_empty() {
        meta::system_prefix()
    } else {
        d.range.end.clone()
    };
    let pairs = n.engine().scan(&d.range.start, &end, usize::MAX).unwrap();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    pairs.hash(&mut h);
    let applied = n
        .raft(d.id)
        .and_then(|r| r.metrics().borrow_watched().last_applied)
        .map_or(0, |l| l.index);
    (h.finish(), applied)
}

/// Waits until every replica of `d` applied the same last index, then
/// checks the range's data hashes are equal on all of them.
async fn assert_identical_replicas(c: &TestCluster, d: &ShardDescriptor) {
    let on: Vec<u64> = d.replicas.iter().map(|n| n.0).collect();
    c.wait_caught_up(d.id, &on, WAIT).await.unwrap();
    let hashes: Vec<(u64, u64)> = on.iter().map(|&n| range_hash(c, n, d)).collect();
    assert!(
        hashes.windows(2).all(|w| w == [w[0], w[0]]),
        "{}: replicas differ (hash, applied): {hashes:?}",
        d.id
    );
}

fn descriptor(c: &TestCluster, node: u64, shard: ShardId) -> ShardDescriptor {
    c.node(node).engine().descriptor(shard).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_survives_the_target_dying_mid_snapshot() {
    init_tracing();
    let scenario = fail::FailScenario::setup();
    // Node 4 runs but holds nothing; shard 1 covers the key space on 1-3.
    // A short log (snapshot every 50 entries, none kept): the learner can
    // only catch up by a snapshot.
    let t = Timings {
        snapshot_logs_since_last: 50,
        snapshot_logs_to_keep: 0,
        ..Timings::fast()
    };
    let mut c = TestCluster::start(&[1, 2, 3, 4], &[], Some((1, vec![1, 2, 3])), t).await;
    let shard = ShardId(1);
    c.wait_leader(shard, WAIT).await.unwrap();
    c.wait_leader(meta::META_SHARD, WAIT).await.unwrap();
    let cl = c.client();
    // ~4 MiB of data: the snapshot is several 1 MiB chunks.
    let big = vec![b'z'; 16 * 1024];
    let mut seed = BTreeMap::new();
    for i in 0..256u64 {
        let k = format!("seed/{i:04}").into_bytes();
        cl.put(&k, &big).await.unwrap();
        seed.insert(k, big.clone());
    }
    let leader = c.wait_leader(shard, WAIT).await.unwrap();
    // Move a follower's replica (the leader's move hands leadership over
    // first, covered by the join test).
    let from = [1u64, 2, 3]
        .into_iter()
        .find(|n| NodeId(*n) != leader)
        .unwrap();
    let load = Load::start(&cl, 4, 64);
    wait_ops(&load, 50, WAIT).await;
    // Each received chunk waits 300 ms, so the transfer takes long enough
    // to kill the target inside it.
    fail::cfg("snapshot::receive_chunk", "return(300)").unwrap();
    let mover = {
        let admin = c.client();
        tokio::spawn(async move { admin.move_replica(shard, NodeId(from), NodeId(4)).await })
    };
    let snap_dir = c
        .config(4)
        .data_dir
        .join("db")
        .parent()
        .unwrap()
        .to_path_buf();
    c.wait_until("the target receives a snapshot", WAIT, |_| {
        walk_has_receiving(&snap_dir)
    })
    .await
    .unwrap();
    tracing::info!(
        finished = mover.is_finished(),
        "phase: target receiving a snapshot, killed"
    );
    c.kill(4).await;
    fail::cfg("snapshot::receive_chunk", "off").unwrap();
    c.restart(4).await;
    let moved = mover
        .await
        .unwrap()
        .expect("the move completes after the target restarts");
    let mut replicas = moved.replicas.clone();
    replicas.sort();
    let mut want: Vec<NodeId> = [1u64, 2, 3, 4]
        .into_iter()
        .filter(|n| *n != from)
        .map(NodeId)
        .collect();
    want.sort();
    assert_eq!(replicas, want, "the target replaced the source");
    assert!(
        moved.epoch.conf_ver > 1,
        "conf_ver grows: {:?}",
        moved.epoch
    );
    let r = load.finish().await;
    r.assert_no_errors();
    // The source dropped its replica and its data.
    c.wait_until("the source drops its replica", WAIT, |c| {
        c.node(from).raft(shard).is_none()
    })
    .await
    .unwrap();
    let left = c
        .node(from)
        .engine()
        .scan(b"", &meta::system_prefix(), 10)
        .unwrap();
    assert!(
        left.is_empty(),
        "source still holds data: {} pairs",
        left.len()
    );
    let leader = c.wait_leader(shard, WAIT).await.unwrap();
    let d = descriptor(&c, leader.0, shard);
    assert_identical_replicas(&c, &d).await;
    for (k, v) in seed.iter().chain(r.acked.iter()) {
        assert_eq!(
            cl.get(k).await.unwrap().as_ref(),
            Some(v),
            "acknowledged {k:?}"
        );
    }
    drop(scenario);
    c.shutdown().await;
}

fn walk_has_receiving(dir: &std::path::Path) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            walk_has_receiving(&p)
        } else {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("receiving-"))
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_to_five_nodes_join_move_and_drain() {
    init_tracing();
    let mut c =
        TestCluster::start(&[1, 2, 3], &[], Some((6, vec![1, 2, 3])), Timings::fast()).await;
    for s in 1..=6 {
        c.wait_leader(ShardId(s), WAIT).await.unwrap();
    }
    c.wait_leader(meta::META_SHARD, WAIT).await.unwrap();
    let cl = c.client();
    let load = Load::start(&cl, 4, 64);
    wait_ops(&load, 100, WAIT).await;
    // Two nodes join: they know only the first three, which learn them.
    c.add_node(4).await;
    c.add_node(5).await;
    c.wait_until("every node knows every other", WAIT, |c| {
        c.up().all(|n| n.transport().peer_ids().len() == 4)
    })
    .await
    .unwrap();
    tracing::info!("phase: nodes joined");
    let admin = c.client();
    let nodes = admin.refresh_nodes().await.unwrap();
    assert_eq!(nodes.len(), 5, "the client learns the new nodes: {nodes:?}");
    // Leader transfer, then replicas onto the new nodes (some from leaders).
    let s1 = ShardId(1);
    let l1 = c.wait_leader(s1, WAIT).await.unwrap();
    let other = descriptor(&c, l1.0, s1)
        .replicas
        .into_iter()
        .find(|n| *n != l1)
        .unwrap();
    admin.transfer_leader(s1, other).await.unwrap();
    assert_eq!(c.wait_leader(s1, WAIT).await.unwrap(), other);
    for (s, to) in [(1u64, 4u64), (2, 5), (3, 4), (4, 5)] {
        let shard = ShardId(s);
        let leader = c.wait_leader(shard, WAIT).await.unwrap();
        // Alternate: move the leader's own replica, then a follower's.
        let d = descriptor(&c, leader.0, shard);
        let from = if s % 2 == 1 {
            leader
        } else {
            *d.replicas.iter().find(|n| **n != leader).unwrap()
        };
        tracing::info!(%shard, %from, to, "phase: move");
        let moved = admin.move_replica(shard, from, NodeId(to)).await.unwrap();
        assert!(moved.replicas.contains(&NodeId(to)) && !moved.replicas.contains(&from));
        wait_ops(&load, 20, WAIT).await;
    }
    tracing::info!("phase: drain n3");
    // Drain node 3: every replica it holds moves to the emptiest node.
    let mut rounds = 0;
    while let Some(shard) = c.node(3).shard_ids().first().copied() {
        rounds += 1;
        assert!(rounds < 20, "drain does not converge");
        let d = descriptor(&c, 3, shard);
        let to = [1u64, 2, 4, 5]
            .into_iter()
            .filter(|n| !d.replicas.contains(&NodeId(*n)))
            .min_by_key(|n| c.node(*n).shard_ids().len())
            .unwrap();
        admin
            .move_replica(shard, NodeId(3), NodeId(to))
            .await
            .unwrap();
    }
    // The meta shard may have a replica on 3 as well.
    if c.node(3).raft(meta::META_SHARD).is_some() {
        let d = descriptor(&c, 3, meta::META_SHARD);
        let to = [4u64, 5, 1, 2]
            .into_iter()
            .find(|n| !d.replicas.contains(&NodeId(*n)))
            .unwrap();
        admin
            .move_replica(meta::META_SHARD, NodeId(3), NodeId(to))
            .await
            .unwrap();
    }
    c.wait_until("node 3 holds nothing", WAIT, |c| {
        c.node(3).shard_ids().is_empty() && c.node(3).raft(meta::META_SHARD).is_none()
    })
    .await
    .unwrap();
    c.kill(3).await;
    wait_ops(&load, 100, WAIT).await;
    let r = load.finish().await;
    r.assert_no_errors();
    r.assert_acknowledged_readable(&cl).await;
    // Every shard still has 3 replicas, none on node 3, and identical data.
    for s in 1..=6 {
        let shard = ShardId(s);
        let leader = c.wait_leader(shard, WAIT).await.unwrap();
        let d = descriptor(&c, leader.0, shard);
        assert_eq!(d.replicas.len(), 3, "{shard}: {:?}", d.replicas);
        assert!(!d.replicas.contains(&NodeId(3)));
        assert_identical_replicas(&c, &d).await;
    }
    c.shutdown().await;
}

/// The meta shard moves like any other (its replicas and leadership): the
/// cluster keeps allocating ids and recording routes through it, and the
/// node it left no longer holds a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_meta_shard_moves_like_any_other() {
    init_tracing();
    let mut c =
        TestCluster::start(&[1, 2, 3], &[], Some((2, vec![1, 2, 3])), Timings::fast()).await;
    for s in 1..=2 {
        c.wait_leader(ShardId(s), WAIT).await.unwrap();
    }
    c.add_node(4).await;
    let admin = c.client();
    admin.refresh_nodes().await.unwrap();
    // Its leader's own replica goes (leadership moves with it).
    let leader = c.wait_leader(meta::META_SHARD, WAIT).await.unwrap();
    let d = admin
        .move_replica(meta::META_SHARD, leader, NodeId(4))
        .await
        .unwrap();
    assert!(d.replicas.contains(&NodeId(4)) && !d.replicas.contains(&leader));
    c.wait_until("the meta shard left its old node", WAIT, |c| {
        c.node(leader.0).raft(meta::META_SHARD).is_none() && c.node(4).meta_routes().is_some()
    })
    .await
    .unwrap();
    // Node status reports it where it is, so the planner sees it.
    let st = admin.node_status(NodeId(4)).await.unwrap();
    assert!(st
        .shards
        .iter()
        .any(|s| s.descriptor.id == meta::META_SHARD));
    // Splits still get ids and their routes are recorded.
    let (l, r) = admin.split(b"k").await.unwrap();
    c.wait_until("the split is recorded in the moved meta shard", WAIT, |c| {
        c.node(4).meta_routes().is_some_and(|t| {
            [&l, &r]
                .iter()
                .all(|d| t.iter().any(|x| x.id == d.id && x.range == d.range))
        })
    })
    .await
    .unwrap();
    let cl = c.client();
    cl.put(b"k/after", b"1").await.unwrap();
    assert_eq!(
        cl.get(b"k/after").await.unwrap().as_deref(),
        Some(&b"1"[..])
    );
    c.shutdown().await;
}

/// Two moves of one shard onto the same node at once (two admins, or an
/// automatic rebalance pass overlapping a manual one): the shard must not
/// lose a replica. One move happens; the other finds its target already a
/// voter and, since removing its source would leave the shard with fewer
/// voters than it had, is refused with a reason. The shard keeps 3 voters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_moves_of_one_shard_keep_its_replica_count() {
    init_tracing();
    let mut c =
        TestCluster::start(&[1, 2, 3], &[], Some((1, vec![1, 2, 3])), Timings::fast()).await;
    let shard = ShardId(1);
    let leader = c.wait_leader(shard, WAIT).await.unwrap();
    c.add_node(4).await;
    let admin = c.client();
    admin.refresh_nodes().await.unwrap();
    // Two followers, each moved to n4 at the same time.
    let sources: Vec<NodeId> = [1u64, 2, 3]
        .into_iter()
        .map(NodeId)
        .filter(|n| *n != leader)
        .collect();
    let moves: Vec<_> = sources
        .iter()
        .map(|from| {
            let (admin, from) = (admin.clone(), *from);
            tokio::spawn(async move { admin.move_replica(shard, from, NodeId(4)).await })
        })
        .collect();
    let mut done = 0;
    for m in moves {
        match m.await.unwrap() {
            Ok(_) => done += 1,
            Err(e) => tracing::info!(error = %e, "the other move was refused"),
        }
    }
    assert!(done >= 1, "one of the moves happened");
    let voters = c
        .wait_until("the shard's membership settles", WAIT, |c| {
            c.node(leader.0).raft(shard).is_some_and(|r| {
                r.metrics()
                    .borrow_watched()
                    .membership_config
                    .membership()
                    .get_joint_config()
                    .len()
                    == 1
            })
        })
        .await
        .map(|_| {
            c.node(leader.0)
                .raft(shard)
                .unwrap()
                .metrics()
                .borrow_watched()
                .membership_config
                .membership()
                .voter_ids()
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert_eq!(voters.len(), 3, "still 3 voters: {voters:?}");
    assert!(voters.contains(&NodeId(4)), "{voters:?}");
    let cl = c.client();
    cl.put(b"after", b"1").await.unwrap();
    c.shutdown().await;
}
