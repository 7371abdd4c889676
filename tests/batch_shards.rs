//! Data shards on the batch system (`raft.batch_data_shards`), end to end:
//! a cluster bootstrapped with them serves the client library's reads,
//! writes and scans over QUIC, survives a leader's loss and a full
//! restart without losing an acknowledged write, keeps its replicas
//! identical (digests), lists them in status, moves leadership where
//! asked, compacts their logs, splits them (also with a replica down that
//! applies the split when it returns), merges them, and moves their
//! replicas (away and back, and the leader's own).

mod common;

use common::cluster::{init_tracing, TestCluster, Timings};
use common::spread_key as key;
use std::collections::BTreeMap;
use std::time::Duration;
use tessera::api::ApiError;
use tessera::client::ClientError;
use tessera::rebalance;
use tessera::shard_router::planner::PlannerConfig;
use tessera::{NodeId, ShardId};

const WAIT: Duration = Duration::from_secs(60);

fn batch_timings() -> Timings {
    Timings {
        batch_data_shards: true,
        ..Timings::fast()
    }
}

async fn ready(shards: u64) -> TestCluster {
    ready_with(shards, batch_timings()).await
}

/// Nodes 1–3 with `shards` batch-system data shards on all three, every one
/// led, under `timings`.
async fn ready_with(shards: u64, timings: Timings) -> TestCluster {
    let c = TestCluster::start(&[1, 2, 3], &[], Some((shards, vec![1, 2, 3])), timings).await;
    wait_all_leaders(&c, shards).await;
    c
}

async fn wait_all_leaders(c: &TestCluster, shards: u64) {
    for s in 1..=shards {
        c.wait_batch_leader(ShardId(s), WAIT).await.unwrap();
    }
}

async fn check_model(cl: &tessera::Client, model: &BTreeMap<Vec<u8>, Vec<u8>>) {
    let all = cl.scan(b"", b"", usize::MAX).await.unwrap();
    let expected: Vec<(Vec<u8>, Vec<u8>)> =
        model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    assert_eq!(all, expected, "a scan over every shard matches the model");
    for (k, v) in model.iter().step_by(13) {
        assert_eq!(cl.get(k).await.unwrap().as_ref(), Some(v));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_shards_serve_clients_and_lose_no_acknowledged_write() {
    init_tracing();
    let mut c = ready(8).await;
    let n1 = c.node(1).clone();
    for s in 1..=8 {
        assert!(
            n1.is_batch_shard(ShardId(s)),
            "s{s} runs on the batch system"
        );
    }
    assert!(
        !n1.is_batch_shard(tessera::meta::META_SHARD),
        "the meta shard stays on openraft"
    );
    drop(n1);
    let cl = c.client();
    let mut model = BTreeMap::new();
    for i in 0..240u32 {
        let (k, v) = (key(i), format!("v{i}").into_bytes());
        cl.put(&k, &v).await.unwrap();
        model.insert(k, v);
    }
    for i in (0..240u32).step_by(9) {
        assert!(cl.delete(&key(i)).await.unwrap());
        model.remove(&key(i));
    }
    // A swap answers the value it replaced.
    let old = cl.swap(&key(1), b"swapped").await.unwrap();
    assert_eq!(old, Some(b"v1".to_vec()));
    model.insert(key(1), b"swapped".to_vec());
    check_model(&cl, &model).await;

    // The leader of s1 goes away: the others elect, and writes go on.
    let leader = c.wait_batch_leader(ShardId(1), WAIT).await.unwrap();
    c.kill(leader.0).await;
    for i in 240..320u32 {
        let (k, v) = (key(i), format!("v{i}").into_bytes());
        cl.put(&k, &v).await.unwrap();
        model.insert(k, v);
    }
    check_model(&cl, &model).await;
    c.restart(leader.0).await;
    wait_all_leaders(&c, 8).await;

    // Every replica holds the same state (the restarted one caught up).
    for s in 1..=8 {
        let v = cl.verify_shard(ShardId(s)).await.unwrap();
        assert_eq!(v.replicas.len(), 3, "{v:?}");
        assert!(v.agrees(), "replicas of s{s} differ: {v:?}");
    }

    // A full restart keeps every acknowledged write.
    drop(cl);
    for i in 1..=3 {
        c.kill(i).await;
    }
    for i in 1..=3 {
        c.restart(i).await;
    }
    wait_all_leaders(&c, 8).await;
    let cl = c.client();
    check_model(&cl, &model).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_batch_shards_with_their_leaders() {
    init_tracing();
    let c = ready(4).await;
    let cl = c.client();
    cl.put(b"\x10k", b"v").await.unwrap();
    // Every node reports its replicas, with the leader the group knows (a
    // follower learns it from the leader's first message).
    for i in 1..=3u64 {
        let what = format!("n{i} lists its 4 data shards, each with a leader");
        let st = common::wait::until(&what, WAIT, || async {
            let st = cl.node_status(NodeId(i)).await.map_err(|e| e.to_string())?;
            let data: Vec<_> = st
                .shards
                .iter()
                .filter(|s| s.descriptor.id != tessera::meta::META_SHARD)
                .map(|s| (s.descriptor.id, s.leader, s.batch))
                .collect();
            if data.len() == 4 && data.iter().all(|(_, leader, _)| leader.is_some()) {
                Ok(st)
            } else {
                Err(format!("(shard, leader, batch): {data:?}"))
            }
        })
        .await
        .unwrap();
        let data: Vec<_> = st
            .shards
            .iter()
            .filter(|s| s.descriptor.id != tessera::meta::META_SHARD)
            .collect();
        assert!(
            data.iter().all(|s| s.batch),
            "n{i}: every data shard on the batch system"
        );
        assert!(
            st.shards
                .iter()
                .all(|s| s.descriptor.id != tessera::meta::META_SHARD || !s.batch),
            "the meta shard runs on openraft: {st:?}"
        );
    }
    // The routes are the bootstrap's, the data is there.
    let routes = cl.routes().await.unwrap();
    assert_eq!(
        routes
            .iter()
            .filter(|d| d.id != tessera::meta::META_SHARD)
            .count(),
        4
    );
    assert_eq!(cl.get(b"\x10k").await.unwrap(), Some(b"v".to_vec()));
    c.shutdown().await;
}

/// Waits until every running node hosts `shard` on the batch system.
async fn wait_hosted_on_batch(c: &TestCluster, ids: &[u64], shard: ShardId) {
    let what = format!("every node of {ids:?} hosts {shard} on the batch system");
    common::wait::until(&what, WAIT, || async {
        let missing: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|i| !c.node(*i).is_batch_shard(shard))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("not yet on {missing:?}"))
        }
    })
    .await
    .unwrap();
}

/// Every replica of `shard` holds the same data (digests at one index).
async fn assert_replicas_agree(cl: &tessera::Client, shard: ShardId) {
    let v = cl.verify_shard(shard).await.unwrap();
    assert_eq!(v.replicas.len(), 3, "{v:?}");
    assert!(v.agrees(), "replicas of {shard} differ: {v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_shards_split_on_every_replica_and_lose_nothing() {
    init_tracing();
    let mut c = ready(2).await;
    let cl = c.client();
    let mut model = BTreeMap::new();
    write_range(&cl, &mut model, 0..200).await;
    // Split s1 through the client: both halves keep running on the batch
    // system, on every replica, and the new one elects.
    let (left, right) = cl.split(b"\x10m").await.unwrap();
    assert_eq!(left.id, ShardId(1));
    assert_ne!(right.id, ShardId(1));
    assert_eq!(right.range.start, b"\x10m".to_vec());
    assert_eq!(left.range.end, right.range.start);
    assert_eq!(left.epoch, right.epoch, "both halves at the split's epoch");
    wait_hosted_on_batch(&c, &[1, 2, 3], right.id).await;
    c.wait_batch_leader(right.id, WAIT).await.unwrap();
    let routes = cl.routes().await.unwrap();
    assert!(
        routes
            .iter()
            .any(|d| d.id == right.id && d.range == right.range),
        "the meta shard routes the new shard: {routes:?}"
    );
    // Reads see every write made before the split; writes go on to both
    // halves (keys on either side of the split key).
    check_model(&cl, &model).await;
    write_range(&cl, &mut model, 200..300).await;
    for k in [b"\x10a".to_vec(), b"\x10m".to_vec(), b"\x10z".to_vec()] {
        cl.put(&k, b"edge").await.unwrap();
        model.insert(k, b"edge".to_vec());
    }
    check_model(&cl, &model).await;
    for s in [left.id, right.id] {
        assert_replicas_agree(&cl, s).await;
    }

    // A replica down during a split applies it when it returns: its copy
    // of the new shard starts then and catches up from the leader's log.
    let lead2 = c.wait_batch_leader(ShardId(2), WAIT).await.unwrap();
    let down = (1..=3u64).find(|i| *i != lead2.0).unwrap();
    c.kill(down).await;
    let s2 = cl
        .routes()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.id == ShardId(2))
        .unwrap();
    let mid = {
        let mut k = s2.range.start.clone();
        k.push(0x80);
        k
    };
    let (_, right2) = cl.split(&mid).await.unwrap();
    let up: Vec<u64> = (1..=3u64).filter(|i| *i != down).collect();
    wait_hosted_on_batch(&c, &up, right2.id).await;
    write_range(&cl, &mut model, 300..400).await;
    check_model(&cl, &model).await;
    c.restart(down).await;
    wait_hosted_on_batch(&c, &[1, 2, 3], right2.id).await;
    for s in [ShardId(2), right2.id] {
        assert_replicas_agree(&cl, s).await;
    }

    // A full restart opens all four shards on the batch system again,
    // with every acknowledged write.
    drop(cl);
    for i in 1..=3 {
        c.kill(i).await;
    }
    for i in 1..=3 {
        c.restart(i).await;
    }
    for s in [ShardId(1), ShardId(2), right.id, right2.id] {
        wait_hosted_on_batch(&c, &[1, 2, 3], s).await;
        c.wait_batch_leader(s, WAIT).await.unwrap();
    }
    let cl = c.client();
    check_model(&cl, &model).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_shards_merge_back_and_the_right_replicas_are_dropped() {
    init_tracing();
    let mut c = ready(2).await;
    let cl = c.client();
    let mut model = BTreeMap::new();
    write_range(&cl, &mut model, 0..150).await;
    let (_, right) = cl.split(b"\x10m").await.unwrap();
    wait_hosted_on_batch(&c, &[1, 2, 3], right.id).await;
    c.wait_batch_leader(right.id, WAIT).await.unwrap();
    write_range(&cl, &mut model, 150..200).await;
    // Merged back: s1 takes the whole range again, the data unchanged.
    let merged = cl.merge(b"\x10m").await.unwrap();
    assert_eq!(merged.id, ShardId(1));
    assert_eq!(merged.range.end, right.range.end, "it took the whole range");
    assert!(merged.epoch.version > right.epoch.version);
    // Every node drops its replica of the right shard: its group closed,
    // its records gone.
    for i in 1..=3 {
        wait_dropped(&c, i, right.id).await;
    }
    let routes = cl.routes().await.unwrap();
    assert!(
        routes.iter().all(|d| d.id != right.id),
        "the meta shard no longer routes {}: {routes:?}",
        right.id
    );
    check_model(&cl, &model).await;
    write_range(&cl, &mut model, 200..260).await;
    check_model(&cl, &model).await;
    assert_replicas_agree(&cl, ShardId(1)).await;
    // Restarts keep the merged range and every write.
    drop(cl);
    for i in 1..=3 {
        c.kill(i).await;
    }
    for i in 1..=3 {
        c.restart(i).await;
    }
    wait_all_leaders(&c, 2).await;
    let cl = c.client();
    check_model(&cl, &model).await;
    for i in 1..=3u64 {
        assert!(
            !c.node(i).shard_ids().contains(&right.id),
            "n{i} hosts the merged-away shard again"
        );
    }
    c.shutdown().await;
}

/// Waits until node `id` hosts no replica of `shard`.
async fn wait_dropped(c: &TestCluster, id: u64, shard: ShardId) {
    let what = format!("n{id} drops its replica of {shard}");
    common::wait::until(&what, WAIT, || async {
        if c.node(id).shard_ids().contains(&shard) {
            Err("still hosted".to_string())
        } else {
            Ok(())
        }
    })
    .await
    .unwrap();
}

async fn write_range(
    cl: &tessera::Client,
    model: &mut BTreeMap<Vec<u8>, Vec<u8>>,
    r: std::ops::Range<u32>,
) {
    for i in r {
        let (k, v) = (key(i), format!("v{i}").into_bytes());
        cl.put(&k, &v).await.unwrap();
        model.insert(k, v);
    }
}

/// The replica-lifecycle scenario on the batch system: a shard splits,
/// then a replica of the new shard moves to a node that ran no batch
/// shard (seeded with a snapshot, added as a learner, promoted, the
/// source removed and dropped) and back again; then the leader's own
/// replica moves (leadership goes first). Nothing acknowledged is lost,
/// and the replicas agree after each step and after a full restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_replicas_move_away_and_back_and_nothing_is_lost() {
    init_tracing();
    let mut c = TestCluster::start(
        &[1, 2, 3, 4],
        &[],
        Some((2, vec![1, 2, 3])),
        batch_timings(),
    )
    .await;
    wait_all_leaders(&c, 2).await;
    assert!(!c.node(4).is_batch_shard(ShardId(1)), "n4 starts empty");
    let cl = c.client();
    let mut model = BTreeMap::new();
    write_range(&cl, &mut model, 0..150).await;
    let (_, right) = cl.split(b"\x10m").await.unwrap();
    wait_hosted_on_batch(&c, &[1, 2, 3], right.id).await;
    write_range(&cl, &mut model, 150..200).await;

    // Away: a follower's replica of the new shard to n4.
    let leader = c.wait_batch_leader(right.id, WAIT).await.unwrap();
    let from = (1..=3u64).find(|i| *i != leader.0).unwrap();
    let d = cl
        .move_replica(right.id, NodeId(from), NodeId(4))
        .await
        .unwrap();
    let mut replicas = d.replicas.clone();
    replicas.sort();
    let mut expected: Vec<NodeId> = [1, 2, 3, 4]
        .into_iter()
        .filter(|i| *i != from)
        .map(NodeId)
        .collect();
    expected.sort();
    assert_eq!(replicas, expected, "{d:?}");
    wait_hosted_on_batch(&c, &[4], right.id).await;
    wait_dropped(&c, from, right.id).await;
    write_range(&cl, &mut model, 200..260).await;
    check_model(&cl, &model).await;
    assert_replicas_agree(&cl, right.id).await;

    // Back: n4's replica to where it came from.
    let d = cl
        .move_replica(right.id, NodeId(4), NodeId(from))
        .await
        .unwrap();
    assert!(
        d.replicas.contains(&NodeId(from)) && !d.replicas.contains(&NodeId(4)),
        "{d:?}"
    );
    wait_hosted_on_batch(&c, &[from], right.id).await;
    wait_dropped(&c, 4, right.id).await;
    write_range(&cl, &mut model, 260..320).await;
    check_model(&cl, &model).await;
    assert_replicas_agree(&cl, right.id).await;

    // The leader's own replica of s2: leadership moves to the target,
    // where the client runs the move again.
    let leader = c.wait_batch_leader(ShardId(2), WAIT).await.unwrap();
    let d = cl
        .move_replica(ShardId(2), leader, NodeId(4))
        .await
        .unwrap();
    assert!(
        d.replicas.contains(&NodeId(4)) && !d.replicas.contains(&leader),
        "{d:?}"
    );
    wait_dropped(&c, leader.0, ShardId(2)).await;
    write_range(&cl, &mut model, 320..380).await;
    check_model(&cl, &model).await;
    assert_replicas_agree(&cl, ShardId(2)).await;

    // A full restart keeps every replica where it moved, on the batch
    // system, with every acknowledged write.
    drop(cl);
    for i in 1..=4 {
        c.kill(i).await;
    }
    for i in 1..=4 {
        c.restart(i).await;
    }
    for s in [ShardId(1), ShardId(2), right.id] {
        c.wait_batch_leader(s, WAIT).await.unwrap();
    }
    let cl = c.client();
    check_model(&cl, &model).await;
    for s in [ShardId(1), ShardId(2), right.id] {
        assert_replicas_agree(&cl, s).await;
    }
    assert!(c.node(4).is_batch_shard(ShardId(2)));
    assert!(!c.node(leader.0).shard_ids().contains(&ShardId(2)));
    c.shutdown().await;
}

/// A voter down while its group writes on does not hold the log back:
/// past `compact_lag_max` entries (twice the compaction interval) the
/// leader compacts without it, and when it returns raft-rs finds it
/// needs what was compacted; the leader seeds it with a snapshot and its
/// log catches up from there. Nothing is lost, the replicas agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_behind_the_compacted_log_is_seeded_when_it_returns() {
    init_tracing();
    let timings = Timings {
        snapshot_logs_since_last: 20,
        snapshot_logs_to_keep: 5,
        ..batch_timings()
    };
    let mut c = ready_with(1, timings).await;
    let s = ShardId(1);
    let leader = c.wait_batch_leader(s, WAIT).await.unwrap();
    let down = (1..=3u64).find(|i| *i != leader.0).unwrap();
    let cl = c.client();
    let mut model = BTreeMap::new();
    write_range(&cl, &mut model, 0..10).await;
    c.kill(down).await;
    write_range(&cl, &mut model, 10..210).await;
    // The leader's log no longer holds what the down voter lacks.
    let status = cl.node_status(leader).await.unwrap();
    let first = status
        .shards
        .iter()
        .find(|r| r.descriptor.id == s)
        .and_then(|r| r.log_first_index)
        .unwrap();
    assert!(first > 100, "the leader kept its log from {first}");
    c.restart(down).await;
    let what = format!("n{down} is seeded with a snapshot");
    common::wait::until(&what, WAIT, || async {
        let seeds = c.node(down).metrics().batch_seeds_installed;
        if seeds > 0 {
            Ok(())
        } else {
            Err(format!("{seeds} seeds"))
        }
    })
    .await
    .unwrap();
    write_range(&cl, &mut model, 210..230).await;
    check_model(&cl, &model).await;
    assert_replicas_agree(&cl, s).await;
    c.shutdown().await;
}

/// A replica down while its shard splits comes back behind the parent's
/// compacted log: the parent's leader seeds it with a snapshot taken
/// after the split, so it never applies the split and has no child.
/// Replica repair creates the child on the batch system (another replica
/// tells which system the shard runs on: an openraft replica would never
/// hear from the group) and the child's leader seeds it. Nothing is lost,
/// every replica of both shards agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_replica_that_missed_a_split_gets_the_child_on_the_batch_system() {
    init_tracing();
    let timings = Timings {
        snapshot_logs_since_last: 20,
        snapshot_logs_to_keep: 5,
        replica_gc: tessera::node::ReplicaGcConfig {
            interval_ms: 300,
            grace_ms: 1500,
        },
        ..batch_timings()
    };
    let mut c = ready_with(1, timings).await;
    let leader = c.wait_batch_leader(ShardId(1), WAIT).await.unwrap();
    let down = (1..=3u64).find(|i| *i != leader.0).unwrap();
    let cl = c.client();
    let mut model = BTreeMap::new();
    write_range(&cl, &mut model, 0..10).await;
    c.kill(down).await;
    let (parent, child) = cl.split(b"\x80").await.unwrap();
    let first = |status: &tessera::api::NodeStatus, shard: ShardId| {
        status
            .shards
            .iter()
            .find(|r| r.descriptor.id == shard)
            .and_then(|r| r.log_first_index)
            .unwrap()
    };
    // The child's log starts right after the split.
    let status = cl.node_status(leader).await.unwrap();
    let after_split = first(&status, child.id);
    write_range(&cl, &mut model, 10..250).await;
    // The parent's log no longer holds the split.
    let leader = c.wait_batch_leader(parent.id, WAIT).await.unwrap();
    let status = cl.node_status(leader).await.unwrap();
    assert!(
        first(&status, parent.id) > after_split,
        "the parent kept its log from {} (the split is at {})",
        first(&status, parent.id),
        after_split - 1
    );
    c.restart(down).await;
    wait_hosted_on_batch(&c, &[down], child.id).await;
    let what = format!("n{down}'s replica of {} applies", child.id);
    common::wait::until(&what, WAIT, || async {
        let st = cl
            .node_status(NodeId(down))
            .await
            .map_err(|e| e.to_string())?;
        let applied = st
            .shards
            .iter()
            .find(|r| r.descriptor.id == child.id)
            .map_or(0, |r| r.applied_index);
        if applied > after_split {
            Ok(())
        } else {
            Err(format!("applied {applied}"))
        }
    })
    .await
    .unwrap();
    assert!(
        c.node(down).metrics().replicas_repaired >= 1,
        "the repair is counted"
    );
    write_range(&cl, &mut model, 250..270).await;
    check_model(&cl, &model).await;
    assert_replicas_agree(&cl, parent.id).await;
    assert_replicas_agree(&cl, child.id).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_of_a_batch_shard_moves_where_asked() {
    init_tracing();
    let c = ready(2).await;
    let cl = c.client();
    cl.put(b"\x10k", b"v1").await.unwrap();
    let before = c.wait_batch_leader(ShardId(1), WAIT).await.unwrap();
    let to = NodeId(before.0 % 3 + 1);
    cl.transfer_leader(ShardId(1), to).await.unwrap();
    assert_eq!(c.wait_batch_leader(ShardId(1), WAIT).await.unwrap(), to);
    // The new leader serves what the old one acknowledged, and writes.
    assert_eq!(cl.get(b"\x10k").await.unwrap(), Some(b"v1".to_vec()));
    cl.put(b"\x10k", b"v2").await.unwrap();
    assert_eq!(cl.get(b"\x10k").await.unwrap(), Some(b"v2".to_vec()));
    // A node that holds no replica cannot be handed the shard.
    match cl.transfer_leader(ShardId(1), NodeId(9)).await {
        Err(ClientError::Refused(ApiError::Invalid(reason))) => {
            assert!(reason.contains("not a voter"), "{reason}");
        }
        other => panic!("transfer to a non-member: {other:?}"),
    }
    assert_eq!(c.wait_batch_leader(ShardId(1), WAIT).await.unwrap(), to);
    c.shutdown().await;
}

/// The rebalancer balances batch-system shards' leaders by transfers alone
/// (their replicas cannot move yet): with every leader on one node, a
/// rebalance spreads them and moves no replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_spreads_batch_shard_leaders_without_moving_replicas() {
    init_tracing();
    let shards = 6u64;
    let c = ready(shards).await;
    let cl = c.client();
    for s in 1..=shards {
        cl.transfer_leader(ShardId(s), NodeId(1)).await.unwrap();
        assert_eq!(
            c.wait_batch_leader(ShardId(s), WAIT).await.unwrap(),
            NodeId(1)
        );
    }
    let (_, batch) = rebalance::cluster_states(&cl).await.unwrap();
    assert_eq!(batch.shards.len(), shards as usize, "the batch shards");
    assert!(
        batch.shards.iter().all(|s| s.leader == Some(NodeId(1))),
        "node 1 leads them all: {:?}",
        batch.shards
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let summary = rebalance::rebalance(
        &cl,
        &PlannerConfig::default(),
        10,
        stop,
        std::sync::Arc::new(rebalance::Quiet),
    )
    .await
    .unwrap();
    assert!(summary.balanced, "{summary:?}");
    assert_eq!(summary.moves, 0, "{summary:?}");
    assert!(summary.transfers >= 2, "{summary:?}");
    let (_, after) = rebalance::cluster_states(&cl).await.unwrap();
    let mut led = BTreeMap::new();
    for s in &after.shards {
        *led.entry(s.leader.expect("every batch shard has a leader"))
            .or_insert(0) += 1;
    }
    for n in 1..=3 {
        let count = led.get(&NodeId(n)).copied().unwrap_or(0);
        assert!(
            (1..=3).contains(&count),
            "node {n} leads {count} of {shards} batch shards: {led:?}"
        );
    }
    for (a, b) in batch.shards.iter().zip(&after.shards) {
        assert_eq!(a.descriptor.id, b.descriptor.id);
        assert_eq!(
            a.descriptor.replicas, b.descriptor.replicas,
            "no replica moved"
        );
    }
    // The leaders it handed out serve.
    cl.put(&key(1), b"after").await.unwrap();
    assert_eq!(cl.get(&key(1)).await.unwrap(), Some(b"after".to_vec()));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_shard_logs_are_compacted_and_restarts_keep_every_write() {
    init_tracing();
    let shards = 2;
    let mut c = ready_with(
        shards,
        Timings {
            snapshot_logs_since_last: 40,
            snapshot_logs_to_keep: 10,
            ..batch_timings()
        },
    )
    .await;
    let cl = c.client();
    let mut model = BTreeMap::new();
    let writes = 400u32;
    for i in 0..writes {
        let (k, v) = (key(i), format!("v{i}").into_bytes());
        cl.put(&k, &v).await.unwrap();
        model.insert(k, v);
    }
    // Every replica's log, as node status shows it, starts past what it
    // dropped.
    common::wait::until(
        "every replica of every batch shard compacted its log",
        WAIT,
        || {
            let cl = &cl;
            async move {
                for i in 1..=3 {
                    let st = cl.node_status(NodeId(i)).await.map_err(|e| e.to_string())?;
                    for s in st.shards.iter().filter(|s| s.batch) {
                        if s.log_first_index.is_none_or(|f| f <= 1) {
                            return Err(format!("n{i}: {s:?}"));
                        }
                        assert!(
                            s.log_first_index <= Some(s.applied_index),
                            "n{i}: compacted past what it applied: {s:?}"
                        );
                    }
                }
                Ok(())
            }
        },
    )
    .await
    .unwrap();
    for n in c.up() {
        let m = n.metrics();
        assert!(m.batch_log_compactions > 0, "n{}: {m:?}", n.id().0);
        assert!(
            m.batch_log_entries < u64::from(writes),
            "n{}: {} log entries held after {writes} writes",
            n.id().0,
            m.batch_log_entries
        );
    }
    check_model(&cl, &model).await;
    // Every node restarts from its compacted logs; nothing is lost.
    drop(cl);
    for i in 1..=3 {
        c.kill(i).await;
        c.restart(i).await;
        wait_all_leaders(&c, shards).await;
    }
    let cl = c.client();
    check_model(&cl, &model).await;
    for s in 1..=shards {
        let v = cl.verify_shard(ShardId(s)).await.unwrap();
        assert!(v.agrees(), "replicas of s{s} differ: {v:?}");
    }
    c.shutdown().await;
}

/// Each running node's term of each of `shards` (from the nodes' own view).
fn batch_terms(c: &TestCluster, shards: u64) -> BTreeMap<(NodeId, u64), Option<u64>> {
    c.up()
        .flat_map(|n| (1..=shards).map(move |s| ((n.id(), s), n.replica_term(ShardId(s)))))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_batch_shards_sleep_wake_for_clients_and_elect_when_their_leader_dies() {
    init_tracing();
    let shards = 4;
    let mut c = ready_with(
        shards,
        Timings {
            quiesce_after_ms: 1000,
            ..batch_timings()
        },
    )
    .await;
    let cl = c.client();
    let all_asleep = |c: &TestCluster| c.up().all(|n| n.metrics().batch_groups_asleep == shards);
    for i in 0..40u32 {
        cl.put(&key(i), b"1").await.unwrap();
    }
    c.wait_until("every batch replica asleep", WAIT, all_asleep)
        .await
        .unwrap();
    let before = batch_terms(&c, shards);
    // Clients wake them: writes and reads are served as when awake.
    for i in 0..40u32 {
        cl.put(&key(i), b"2").await.unwrap();
        assert_eq!(cl.get(&key(i)).await.unwrap().as_deref(), Some(&b"2"[..]));
    }
    let woke: u64 = c.up().map(|n| n.metrics().batch_group_wakes).sum();
    assert!(woke >= shards, "{woke} wake-ups");
    c.wait_until("every batch replica asleep again", WAIT, all_asleep)
        .await
        .unwrap();
    assert_eq!(batch_terms(&c, shards), before, "an election happened");

    // The leader of s1 dies while its groups sleep: the survivors' liveness
    // pings wake them, and they elect.
    let dead = c.wait_batch_leader(ShardId(1), WAIT).await.unwrap();
    c.kill(dead.0).await;
    let now = c.wait_batch_leader(ShardId(1), WAIT).await.unwrap();
    assert_ne!(now, dead);
    for i in 0..40u32 {
        cl.put(&key(i), b"3").await.unwrap();
    }
    for i in 0..40u32 {
        assert_eq!(cl.get(&key(i)).await.unwrap().as_deref(), Some(&b"3"[..]));
    }
    c.shutdown().await;
}
