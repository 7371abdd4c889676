//! Replica lifecycle (RELIABILITY scenario 11): a split followed by moving a
//! replica away and back, snapshots older than a split, and removed
//! replicas. Every key stays owned by exactly one live replica per node and
//! every replica of a shard holds the same data.

mod common;

use common::cluster::{init_tracing, TestCluster, Timings};
use openraft::async_runtime::watch::WatchReceiver as _;
use std::collections::BTreeMap;
use std::time::Duration;
use tessera::meta;
use tessera::{Client, NodeId, ShardDescriptor, ShardId};

const WAIT: Duration = Duration::from_secs(60);

/// The pairs of `model` inside `d`'s range, in key order.
fn model_in(d: &ShardDescriptor, model: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<(Vec<u8>, Vec<u8>)> {
    model
        .iter()
        .filter(|(k, _)| d.range.contains(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Every key/value `node` holds locally in `d`'s range (no Raft barrier).
fn local_pairs(c: &TestCluster, node: u64, d: &ShardDescriptor) -> Vec<(Vec<u8>, Vec<u8>)> {
    let end = if d.range.end.is_empty() {
        meta::system_prefix()
    } else {
        d.range.end.clone()
    };
    c.node(node)
        .engine()
        .scan(&d.range.start, &end, usize::MAX)
        .unwrap()
}

/// Makes each replica of `shard` the leader in turn and checks, through
/// the client, that a scan of the shard's range equals `want`.
async fn check_every_replica_serves(
    c: &TestCluster,
    cl: &Client,
    d: &ShardDescriptor,
    want: &BTreeMap<Vec<u8>, Vec<u8>>,
) {
    let want = model_in(d, want);
    for r in &d.replicas {
        tracing::info!(shard = %d.id, leader = %r, "phase: make this replica the leader and scan");
        cl.transfer_leader(d.id, *r).await.unwrap();
        let got = cl
            .scan(&d.range.start, &d.range.end, 100_000)
            .await
            .unwrap();
        assert_eq!(
            got, want,
            "{} led by {r}: scan differs from the model",
            d.id
        );
        // The leader's local copy is what it served.
        assert_eq!(
            local_pairs(c, r.0, d),
            want,
            "{} on {r}: local data differs",
            d.id
        );
    }
}

/// Waits until every replica of `d` applied its leader's last index, then
/// checks each one's local copy of the range equals `want`.
async fn check_every_replica_holds(
    c: &TestCluster,
    d: &ShardDescriptor,
    want: &BTreeMap<Vec<u8>, Vec<u8>>,
) {
    let want = model_in(d, want);
    let on: Vec<u64> = d.replicas.iter().map(|n| n.0).collect();
    c.wait_caught_up(d.id, &on, WAIT).await.unwrap();
    for n in on {
        assert_eq!(
            local_pairs(c, n, d),
            want,
            "{} on n{n}: local data differs",
            d.id
        );
    }
}

/// The reproduction: a shard with a snapshot from before a split,
/// then the parent's replica moved from n3 to n4 and back. The child's data
/// on n3 must survive the parent's stale snapshot being installed there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_then_move_away_and_back_keeps_the_childs_data() {
    init_tracing();
    let t = Timings {
        snapshot_logs_since_last: 40,
        snapshot_logs_to_keep: 10,
        ..Timings::fast()
    };
    let c = TestCluster::start(&[1, 2, 3, 4], &[], Some((1, vec![1, 2, 3])), t).await;
    c.wait_leader(ShardId(1), WAIT).await.unwrap();
    c.wait_leader(meta::META_SHARD, WAIT).await.unwrap();
    let cl = c.client();
    let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();

    tracing::info!("phase: writes before the split, enough for a snapshot");
    cl.put(b"k150", b"before").await.unwrap();
    model.insert(b"k150".to_vec(), b"before".to_vec());
    for i in 0..60u32 {
        let k = format!("a{i:03}").into_bytes();
        let v = format!("v{i}").into_bytes();
        cl.put(&k, &v).await.unwrap();
        model.insert(k, v);
    }
    c.wait_until("shard 1 has a snapshot on its leader", WAIT, |c| {
        c.up().any(|n| {
            n.raft(ShardId(1))
                .is_some_and(|r| r.metrics().borrow_watched().snapshot.is_some())
        })
    })
    .await
    .unwrap();

    tracing::info!("phase: split at k100");
    let (parent, child) = cl.split(b"k100").await.unwrap();
    assert_eq!(parent.id, ShardId(1));
    cl.put(b"k150", b"after").await.unwrap();
    cl.put(b"k160", b"new").await.unwrap();
    model.insert(b"k150".to_vec(), b"after".to_vec());
    model.insert(b"k160".to_vec(), b"new".to_vec());

    tracing::info!("phase: move the parent's replica n3 -> n4 -> n3");
    cl.move_replica(parent.id, NodeId(3), NodeId(4))
        .await
        .unwrap();
    cl.move_replica(parent.id, NodeId(4), NodeId(3))
        .await
        .unwrap();

    tracing::info!("phase: the child's data on every replica");
    assert_eq!(
        cl.get(b"k150").await.unwrap().as_deref(),
        Some(&b"after"[..])
    );
    assert_eq!(cl.get(b"k160").await.unwrap().as_deref(), Some(&b"new"[..]));
    let child = c.node(1).engine().descriptor(child.id).unwrap();
    check_every_replica_serves(&c, &cl, &child, &model).await;
    let parent = c.node(1).engine().descriptor(parent.id).unwrap();
    check_every_replica_serves(&c, &cl, &parent, &model).await;
    assert!(
        !c.node(4).shard_ids().contains(&parent.id) && !c.node(4).shard_ids().contains(&child.id),
        "n4 keeps no replica after the move back: {:?}",
        c.node(4).shard_ids()
    );
    assert!(
        local_pairs(
            &c,
            4,
            &tessera::ShardDescriptor::new(ShardId(99), tessera::KeyRange::full(), vec![])
        )
        .is_empty(),
        "n4 keeps no user data"
    );
    c.shutdown().await;
}

/// Timings for the repair and GC tests: a short log (a replica that was
/// down catches up by snapshot) and a quick replica GC.
fn gc_timings() -> Timings {
    Timings {
        snapshot_logs_since_last: 20,
        snapshot_logs_to_keep: 0,
        replica_gc: tessera::node::ReplicaGcConfig {
            interval_ms: 300,
            grace_ms: 1500,
        },
        ..Timings::fast()
    }
}

/// A replica down during a split comes back behind the parent's compacted
/// log: it installs a snapshot taken after the split and never applies the
/// split itself. Replica repair must still give it the child, and the
/// child's data must be the same on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_a_split_gets_the_child() {
    init_tracing();
    let mut c = TestCluster::start(&[1, 2, 3], &[], Some((1, vec![1, 2, 3])), gc_timings()).await;
    c.wait_leader(ShardId(1), WAIT).await.unwrap();
    c.wait_leader(meta::META_SHARD, WAIT).await.unwrap();
    let cl = c.client();
    let mut model = BTreeMap::new();
    for i in 0..10u32 {
        let (k, v) = (format!("m{i:03}").into_bytes(), b"old".to_vec());
        cl.put(&k, &v).await.unwrap();
        model.insert(k, v);
    }

    tracing::info!("phase: n3 down; split at m005; writes to both halves");
    c.kill(3).await;
    let (parent, child) = cl.split(b"m005").await.unwrap();
    // openraft purges in batches of 256 entries: enough writes for one.
    for i in 0..320u32 {
        let (k, v) = (
            format!("a{i:03}").into_bytes(),
            format!("p{i}").into_bytes(),
        );
        cl.put(&k, &v).await.unwrap();
        model.insert(k, v);
    }
    for i in 5..10u32 {
        let (k, v) = (format!("m{i:03}").into_bytes(), b"new".to_vec());
        cl.put(&k, &v).await.unwrap();
        model.insert(k, v);
    }
    let leader = c.wait_leader(parent.id, WAIT).await.unwrap();
    // The snapshot and the purge after it run in the background: wait for
    // them (on a loaded machine they lag the last write).
    let purged = |c: &TestCluster, shard: ShardId| {
        c.node(leader.0)
            .raft(shard)
            .and_then(|r| r.metrics().borrow_watched().purged)
            .map_or(0, |l| l.index)
    };
    c.wait_until("the parent's log is compacted past the split", WAIT, |c| {
        purged(c, parent.id) > purged(c, child.id)
    })
    .await
    .unwrap();

    tracing::info!("phase: n3 back; it must host the child with the same data");
    c.restart(3).await;
    c.wait_until("n3 hosts the child", WAIT, |c| {
        c.node(3).shard_ids().contains(&child.id)
    })
    .await
    .unwrap();
    let child = c.node(1).engine().descriptor(child.id).unwrap();
    assert!(child.replicas.contains(&NodeId(3)));
    check_every_replica_serves(&c, &cl, &child, &model).await;
    let parent = c.node(1).engine().descriptor(parent.id).unwrap();
    check_every_replica_holds(&c, &parent, &model).await;
    assert!(
        c.node(3).metrics().replicas_repaired >= 1,
        "the repair is counted"
    );
    c.shutdown().await;
}

/// A replica removed while its node was down comes back with its old
/// configuration: it must not disturb the shard's leader, and replica GC
/// destroys it and leaves a tombstone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_removed_while_down_is_destroyed_and_never_disturbs_the_leader() {
    init_tracing();
    let mut c =
        TestCluster::start(&[1, 2, 3, 4], &[], Some((1, vec![1, 2, 3])), gc_timings()).await;
    c.wait_leader(ShardId(1), WAIT).await.unwrap();
    c.wait_leader(meta::META_SHARD, WAIT).await.unwrap();
    let cl = c.client();
    for i in 0..10u32 {
        cl.put(format!("k{i}").as_bytes(), b"v").await.unwrap();
    }

    tracing::info!("phase: n3 down; its replica moves to n4");
    c.kill(3).await;
    let d = cl
        .move_replica(ShardId(1), NodeId(3), NodeId(4))
        .await
        .unwrap();
    assert!(!d.replicas.contains(&NodeId(3)));
    let leader = c.wait_leader(ShardId(1), WAIT).await.unwrap();
    let term = |c: &TestCluster| {
        c.node(leader.0)
            .raft(ShardId(1))
            .map(|r| r.metrics().borrow_watched().current_term)
    };
    let term_before = term(&c);
    // The meta shard records the move (the route reporter, within seconds).
    c.wait_until("the meta shard records the move", WAIT, |c| {
        c.node(1).meta_routes().is_some_and(|r| {
            r.iter()
                .any(|m| m.id == ShardId(1) && !m.replicas.contains(&NodeId(3)))
        })
    })
    .await
    .unwrap();

    tracing::info!("phase: n3 back with its stale replica");
    c.restart(3).await;
    c.wait_until(
        "n3's removed replica is destroyed by replica GC",
        WAIT,
        |c| c.node(3).metrics().replicas_destroyed >= 1,
    )
    .await
    .unwrap();
    assert!(!c.node(3).shard_ids().contains(&ShardId(1)));
    assert!(c
        .node(3)
        .engine()
        .shards()
        .unwrap()
        .iter()
        .all(|d| d.id != ShardId(1)));
    let m = c.node(3).metrics();
    assert!(m.tombstones >= 1, "tombstone left: {m:?}");
    assert!(
        c.node(3).engine().tombstone(ShardId(1)).unwrap().is_some(),
        "tombstone stored"
    );
    assert_eq!(
        c.wait_leader(ShardId(1), WAIT).await.unwrap(),
        leader,
        "the leader kept its place"
    );
    assert_eq!(
        term(&c),
        term_before,
        "no election was forced by the removed replica"
    );
    // Nothing of the shard's data is left on n3, and writes still work.
    let full = tessera::ShardDescriptor::new(ShardId(99), tessera::KeyRange::full(), vec![]);
    assert!(
        local_pairs(&c, 3, &full).is_empty(),
        "n3 keeps no user data"
    );
    cl.put(b"k-after", b"v").await.unwrap();
    c.shutdown().await;
}

/// A snapshot taken before a split, sent to a replica that applied the
/// split, is refused with a typed error and changes nothing there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_older_than_the_replica_is_refused() {
    use tessera::raft::rpc::{self, CallError, Refusal, SnapshotHead};
    use tessera::raft::SnapshotData;
    init_tracing();
    let t = Timings {
        snapshot_logs_since_last: 20,
        ..Timings::fast()
    };
    let c = TestCluster::start(&[1, 2, 3], &[], Some((1, vec![1, 2, 3])), t).await;
    c.wait_leader(ShardId(1), WAIT).await.unwrap();
    c.wait_leader(meta::META_SHARD, WAIT).await.unwrap();
    let cl = c.client();
    let mut model = BTreeMap::new();
    for i in 0..30u32 {
        let (k, v) = (
            format!("k{i:03}").into_bytes(),
            format!("v{i}").into_bytes(),
        );
        cl.put(&k, &v).await.unwrap();
        model.insert(k, v);
    }
    let leader = c.wait_leader(ShardId(1), WAIT).await.unwrap();
    let raft = c.node(leader.0).raft(ShardId(1)).unwrap();
    let snap = raft
        .get_snapshot()
        .await
        .unwrap()
        .expect("a snapshot after 30 writes");
    // Keep a copy: the shard replaces its snapshot files later.
    let old = c.dir.path().join("pre-split.snap");
    std::fs::copy(snap.snapshot.path(), &old).unwrap();

    tracing::info!("phase: split, then send the pre-split snapshot to a follower");
    let (parent, child) = cl.split(b"k015").await.unwrap();
    let follower = [1u64, 2, 3].into_iter().find(|n| *n != leader.0).unwrap();
    c.wait_until("the follower applied the split", WAIT, |c| {
        c.node(follower)
            .engine()
            .descriptor(parent.id)
            .is_ok_and(|d| d.epoch == parent.epoch)
    })
    .await
    .unwrap();
    let vote = raft.metrics().borrow_watched().vote;
    let head = SnapshotHead {
        vote,
        meta: snap.meta.clone(),
    };
    let sent = rpc::send_snapshot(
        c.node(leader.0).transport(),
        NodeId(follower),
        ShardId(1),
        &head,
        &SnapshotData::from_file(&old),
        WAIT,
    )
    .await;
    match sent {
        Err(CallError::Refused {
            refusal:
                Refusal::StaleSnapshot {
                    shard,
                    snapshot,
                    local,
                },
            ..
        }) => {
            assert_eq!(shard, ShardId(1));
            assert!(
                snapshot.version < local.version,
                "{snapshot:?} vs {local:?}"
            );
        }
        other => panic!("a stale snapshot must be refused as such, got {other:?}"),
    }
    tracing::info!("phase: the follower's data is untouched");
    let parent = c.node(1).engine().descriptor(parent.id).unwrap();
    let child = c.node(1).engine().descriptor(child.id).unwrap();
    check_every_replica_holds(&c, &parent, &model).await;
    check_every_replica_holds(&c, &child, &model).await;
    c.shutdown().await;
}

/// `DropReplica` sent to a node that is still a member (in a membership
/// newer than the request's) is refused, and the replica stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_replica_is_refused_while_a_member() {
    use tessera::raft::rpc::{self, CallError, PeerRequest};
    init_tracing();
    let c = TestCluster::start(&[1, 2, 3], &[], Some((1, vec![1, 2, 3])), Timings::fast()).await;
    let leader = c.wait_leader(ShardId(1), WAIT).await.unwrap();
    let cl = c.client();
    cl.put(b"k", b"v").await.unwrap();
    let member = [1u64, 2, 3].into_iter().find(|n| *n != leader.0).unwrap();
    c.wait_caught_up(ShardId(1), &[member], WAIT).await.unwrap();
    let asked = rpc::call(
        c.node(leader.0).transport(),
        NodeId(member),
        ShardId(1),
        &PeerRequest::DropReplica { after: None },
        WAIT,
    )
    .await;
    assert!(
        matches!(asked, Err(CallError::Refused { .. })),
        "a member's replica must not be dropped: {asked:?}"
    );
    assert!(c.node(member).shard_ids().contains(&ShardId(1)));
    assert_eq!(
        c.node(member).engine().get(b"k").unwrap().as_deref(),
        Some(&b"v"[..])
    );
    c.shutdown().await;
}

/// The bootstrap's route recording runs again when its marker is lost (a
/// crash right after it committed): shard ids handed out since are never
/// handed out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_the_bootstrap_routes_again_never_reuses_shard_ids() {
    init_tracing();
    let mut c =
        TestCluster::start(&[1, 2, 3], &[], Some((2, vec![1, 2, 3])), Timings::fast()).await;
    for s in [ShardId(1), ShardId(2), meta::META_SHARD] {
        c.wait_leader(s, WAIT).await.unwrap();
    }
    let cl = c.client();
    let (_, first) = cl.split(b"\x20").await.unwrap();
    let initializer = meta::meta_descriptor(&[NodeId(1), NodeId(2), NodeId(3)])
        .leader_hint
        .unwrap();
    let marker = c.config(initializer.0).data_dir.join("routes-recorded");
    assert!(marker.exists(), "the bootstrap marked its routes recorded");

    tracing::info!("phase: lose the marker and restart the node that records the routes");
    std::fs::remove_file(&marker).unwrap();
    c.kill(initializer.0).await;
    c.restart(initializer.0).await;
    c.wait_until("the routes are recorded again", WAIT, |c| {
        c.config(initializer.0)
            .data_dir
            .join("routes-recorded")
            .exists()
    })
    .await
    .unwrap();
    c.wait_leader(meta::META_SHARD, WAIT).await.unwrap();
    let (_, second) = cl.split(b"\xa0").await.unwrap();
    assert_ne!(first.id, second.id, "a shard id was handed out twice");
    let routes = cl.routes().await.unwrap();
    let map = tessera::shard_router::RangeMap::new(routes.clone()).expect("routes tile");
    map.check().unwrap();
    assert_eq!(
        routes.len(),
        4,
        "2 bootstrap shards split twice: {routes:?}"
    );
    cl.put(b"\x21", b"a").await.unwrap();
    cl.put(b"\xa1", b"b").await.unwrap();
    assert_eq!(cl.get(b"\x21").await.unwrap().as_deref(), Some(&b"a"[..]));
    assert_eq!(cl.get(b"\xa1").await.unwrap().as_deref(), Some(&b"b"[..]));
    c.shutdown().await;
}
