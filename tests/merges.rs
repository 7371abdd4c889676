//! Merges: a shard merged into its left neighbour on a live cluster loses
//! nothing, clients keep working, replicas are moved together first when
//! needed, a merge that cannot complete is cancelled cleanly, and a
//! replica that lacks the frozen shard's data refuses to apply the merge.

mod common;

use common::cluster::{init_tracing, TestCluster, Timings};
use common::load::{wait_ops, Load};
use common::routes::{check_ownership_and_data, hosted};
use common::{apply, create_and_open, membership, normal, open_engine, prefix_shard};
use std::time::Duration;
use tessera::client::ClientError;
use tessera::command::{Command, CommandResponse};
use tessera::{meta, KeyRange, NodeId, ShardId};

const WAIT: Duration = Duration::from_secs(60);

async fn ready(ids: &[u64], members: &[u64]) -> TestCluster {
    init_tracing();
    let c = TestCluster::start(ids, &[], Some((1, members.to_vec())), Timings::fast()).await;
    c.wait_leader(ShardId(1), WAIT).await.unwrap();
    c.wait_leader(meta::META_SHARD, WAIT).await.unwrap();
    c
}

/// Every pair of the key space, by one full scan.
async fn everything(cl: &tessera::Client) -> Vec<(Vec<u8>, Vec<u8>)> {
    cl.scan(b"", b"", 1_000_000).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merges_under_load_take_eight_shards_to_two_and_lose_nothing() {
    let mut c = ready(&[1, 2, 3, 4], &[1, 2, 3]).await;
    let admin = c.client();
    for key in ["b", "d", "f", "h", "m", "p", "t"] {
        admin.split(key.as_bytes()).await.unwrap();
    }
    assert_eq!(admin.routes().await.unwrap().len(), 8);
    // One shard on other nodes: its merge moves its replica back first.
    let at_m = admin
        .routes()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.range.start == b"m")
        .unwrap();
    admin
        .move_replica(at_m.id, NodeId(3), NodeId(4))
        .await
        .unwrap();

    let cl = c.client();
    let load = Load::start(&cl, 8, 64);
    wait_ops(&load, 200, WAIT).await;
    let mut gone = Vec::new();
    for key in ["b", "d", "m", "p", "t"] {
        let right = admin
            .routes()
            .await
            .unwrap()
            .into_iter()
            .find(|d| d.range.start == key.as_bytes())
            .unwrap();
        let merged = admin.merge(key.as_bytes()).await.unwrap();
        assert!(
            merged.range.start.as_slice() < key.as_bytes() && merged.range.contains(key.as_bytes()),
            "{} {} took {key}",
            merged.id,
            merged.range
        );
        assert_eq!(merged.range.end, right.range.end, "it took the whole range");
        assert!(merged.epoch.version > right.epoch.version);
        gone.push(right.id);
        tracing::info!(%key, merged = %merged.range, "merged");
        wait_ops(&load, 50, WAIT).await;
    }
    let r = load.finish().await;
    r.assert_no_errors();
    assert!(r.acked.len() > 300, "load made progress: {}", r.acked.len());
    let routes = check_ownership_and_data(&c, &cl, &r.acked).await;
    assert_eq!(routes.len(), 3, "8 shards, 5 merges");

    // The last merge with no load: the data is identical before and after,
    // and every replica of the merged shard holds the same state.
    let before = everything(&cl).await;
    gone.push(routes.iter().find(|d| d.range.start == b"f").unwrap().id);
    let last = admin.merge(b"f").await.unwrap();
    assert_eq!(last.range, KeyRange::new(Vec::new(), b"h".to_vec()));
    let after = everything(&cl).await;
    assert_eq!(before, after, "a merge changes no data");
    let v = admin.verify_shard(last.id).await.unwrap();
    assert!(v.agrees(), "replicas agree: {v:?}");
    assert_eq!(v.replicas.len(), 3);

    // Merged-away shards are gone from every node and from the meta table,
    // and no node hosts two replicas over one key.
    c.wait_until("merged shards retired everywhere", WAIT, |c| {
        c.up().all(|n| {
            n.shard_ids()
                .iter()
                .all(|s| !gone.contains(s) && n.engine().merging(*s).is_none())
        }) && c
            .node(1)
            .meta_routes()
            .is_some_and(|t| t.iter().all(|d| !gone.contains(&d.id)))
    })
    .await
    .unwrap();
    assert_eq!(hosted(&c).len(), 4, "every node checked");

    // Ranges and data persist across a restart of every node.
    for id in [1, 2, 3, 4] {
        c.kill(id).await;
    }
    for id in [1, 2, 3, 4] {
        c.restart(id).await;
    }
    let cl = c.client();
    for d in &cl.routes().await.unwrap() {
        c.wait_leader(d.id, WAIT).await.unwrap();
    }
    assert_eq!(everything(&cl).await, after, "data survives restarts");
    let routes = check_ownership_and_data(&c, &cl, &r.acked).await;
    assert_eq!(routes.len(), 2);
    // Both halves keep taking writes; a merged range splits again.
    cl.put(b"a/after", b"1").await.unwrap();
    cl.put(b"z/after", b"2").await.unwrap();
    let (l, rr) = admin.split(b"k").await.unwrap();
    assert_eq!(l.range.end, rr.range.start);
    assert_eq!(
        cl.get(b"z/after").await.unwrap().as_deref(),
        Some(&b"2"[..])
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_that_cannot_complete_is_cancelled_and_bad_merges_are_refused() {
    let mut c = ready(&[1, 2, 3], &[1, 2, 3]).await;
    let cl = c.client();
    cl.split(b"m").await.unwrap();
    for i in 0..50u8 {
        cl.put(&[b'a' + i % 26, i], &[i]).await.unwrap();
    }
    let before = everything(&cl).await;
    // Refused with a reason, nothing changed.
    assert!(matches!(cl.merge(b"").await, Err(ClientError::Limit(_))));
    match cl.merge(b"q").await {
        Err(ClientError::Refused(e)) => {
            assert!(e.to_string().contains("no shard starts at"), "{e}")
        }
        other => panic!("merge at q: {other:?}"),
    }
    // A replica down: the freeze cannot reach it, so the merge is
    // cancelled and the right shard serves again.
    c.kill(3).await;
    let err = cl.merge(b"m").await.unwrap_err();
    assert!(
        err.to_string().contains("freeze"),
        "the merge waited for the freeze: {err}"
    );
    cl.put(b"n/after-cancel", b"1").await.unwrap();
    assert_eq!(cl.routes().await.unwrap().len(), 2, "nothing merged");
    c.restart(3).await;
    let merged = cl.merge(b"m").await.unwrap();
    assert_eq!(merged.range, KeyRange::full());
    let mut want = before.clone();
    want.push((b"n/after-cancel".to_vec(), b"1".to_vec()));
    want.sort();
    assert_eq!(everything(&cl).await, want);
    c.shutdown().await;
}

/// The storage side, driven directly: a frozen shard applies no write; the
/// left shard takes its range and data; and a replica whose node does not
/// hold the frozen shard's final state stops rather than serve a range
/// without its data.
#[tokio::test]
async fn a_replica_without_the_frozen_data_refuses_the_merge() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_engine(dir.path());
    let left = prefix_shard(1, b"a");
    let mut right = prefix_shard(2, b"b");
    let (_ll, mut lsm) = create_and_open(&engine, &left).await;
    let (_rl, mut rsm) = create_and_open(&engine, &right).await;
    apply(&mut lsm, vec![membership(1, 1, &[1])]).await;
    apply(&mut rsm, vec![membership(1, 1, &[1])]).await;
    apply(&mut rsm, vec![normal(1, 2, Command::put("b1", "v"))]).await;
    right = rsm.descriptor().clone();
    let planned = lsm.descriptor().epoch.version;
    assert_eq!(lsm.descriptor().range.end, right.range.start, "adjacent");
    let prepare = |into: ShardId| Command::PrepareMerge {
        into,
        version: right.epoch.version,
        conf_ver: right.epoch.conf_ver,
        voters: vec![NodeId(1)],
        at_ms: 1,
    };
    let frozen_at = match &apply(&mut rsm, vec![normal(1, 3, prepare(ShardId(1)))]).await[0] {
        CommandResponse::MergePrepared { at, .. } => *at,
        other => panic!("freeze answered {other:?}"),
    };
    assert_eq!(engine.merging(ShardId(2)).map(|m| m.at), Some(frozen_at));
    assert!(matches!(
        apply(&mut rsm, vec![normal(1, 4, Command::put("b2", "v"))]).await[0],
        CommandResponse::Frozen { into: ShardId(1) }
    ));
    // A commit planned at another version of the left shard is refused.
    let commit = |version| Command::CommitMerge {
        right: right.clone(),
        frozen_at,
        version,
    };
    assert!(matches!(
        apply(&mut lsm, vec![normal(1, 2, commit(planned + 7))]).await[0],
        CommandResponse::MergeRefused { .. }
    ));
    match &apply(&mut lsm, vec![normal(1, 3, commit(planned))]).await[0] {
        CommandResponse::Merged { left } => {
            assert_eq!(left.range, KeyRange::new(b"a".to_vec(), b"c".to_vec()));
            assert!(left.epoch.version > right.epoch.version.max(planned));
        }
        other => panic!("commit answered {other:?}"),
    }
    assert_eq!(engine.take_retired(), vec![ShardId(2)]);
    assert_eq!(engine.owner_of(b"b1"), Some(ShardId(1)));
    assert_eq!(engine.get(b"b1").unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(
        engine.get(b"b2").unwrap(),
        None,
        "the frozen write never applied"
    );

    // Another node's replica of a left shard whose right neighbour was
    // never frozen there: applying the commit fails.
    let dir2 = tempfile::tempdir().unwrap();
    let other = open_engine(dir2.path());
    let (_ol, mut osm) = create_and_open(&other, &left).await;
    let (_orl, mut orsm) = create_and_open(&other, &prefix_shard(2, b"b")).await;
    apply(&mut osm, vec![membership(1, 1, &[1])]).await;
    apply(&mut orsm, vec![membership(1, 1, &[1])]).await;
    let r = osm.apply_entries(vec![normal(1, 2, commit(planned))]).await;
    assert!(
        r.is_err_and(|e| e.to_string().contains("not frozen")),
        "the commit must not apply without the frozen data"
    );
    assert_eq!(
        other.descriptor(ShardId(1)).unwrap().range,
        left.range,
        "the range did not grow"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_neighbours_merge_by_themselves_while_clients_write() {
    init_tracing();
    let t = Timings {
        split: tessera::node::SplitConfig {
            check_interval_ms: 200,
            merge_max_bytes: 1 << 20,
            // Everything counts as cold: the merges happen under the load.
            merge_max_ops_per_s: 1_000_000,
            ..Default::default()
        },
        ..Timings::fast()
    };
    let c = TestCluster::start(&[1, 2, 3], &[], Some((4, vec![1, 2, 3])), t).await;
    for s in 1..=4 {
        c.wait_leader(ShardId(s), WAIT).await.unwrap();
    }
    c.wait_leader(meta::META_SHARD, WAIT).await.unwrap();
    let cl = c.client();
    let load = Load::start(&cl, 4, 64);
    wait_ops(&load, 100, WAIT).await;
    // A node merges neighbours it leads both of: gather the leaders on n1
    // until one shard is left.
    let data_shards = |c: &TestCluster| -> Vec<ShardId> {
        c.node(1)
            .shard_ids()
            .into_iter()
            .filter(|s| *s != meta::META_SHARD)
            .collect()
    };
    common::wait::until("the four shards merge into one", WAIT, || async {
        let left = data_shards(&c);
        if left.len() == 1 {
            return Ok(());
        }
        for s in &left {
            // A shard merged away meanwhile is gone: the next round sees it.
            let _ = c
                .transfer_leader(*s, NodeId(1), Duration::from_secs(2))
                .await;
        }
        Err(format!("still {left:?}"))
    })
    .await
    .unwrap();
    wait_ops(&load, 100, WAIT).await;
    let r = load.finish().await;
    r.assert_no_errors();
    let routes = check_ownership_and_data(&c, &cl, &r.acked).await;
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].range, KeyRange::full());
    c.shutdown().await;
}

/// Both replicas of a left and a right shard on one node, a write in each,
/// the right one frozen for a merge into the left: the left replica, the
/// right's descriptor as frozen and the freeze's index (the log stores and
/// the right state machine are kept alive with them).
async fn frozen_neighbours(
    e: &tessera::storage::Engine,
) -> (
    tessera::storage::StateMachine,
    tessera::ShardDescriptor,
    u64,
    impl Sized,
) {
    let (ll, mut lsm) = create_and_open(e, &prefix_shard(1, b"a")).await;
    let (rl, mut rsm) = create_and_open(e, &prefix_shard(2, b"b")).await;
    apply(&mut lsm, vec![membership(1, 1, &[1])]).await;
    apply(&mut rsm, vec![membership(1, 1, &[1])]).await;
    apply(&mut lsm, vec![normal(1, 2, Command::put("a1", "l"))]).await;
    apply(&mut rsm, vec![normal(1, 2, Command::put("b1", "r"))]).await;
    let right = rsm.descriptor().clone();
    let prepare = Command::PrepareMerge {
        into: ShardId(1),
        version: right.epoch.version,
        conf_ver: right.epoch.conf_ver,
        voters: vec![NodeId(1)],
        at_ms: 1,
    };
    let at = match &apply(&mut rsm, vec![normal(1, 3, prepare)]).await[0] {
        CommandResponse::MergePrepared { at, .. } => *at,
        other => panic!("freeze answered {other:?}"),
    };
    (lsm, right, at, (ll, rl, rsm))
}

/// A replica that missed the merge's commit in its log (its node was down
/// then) and catches up from a snapshot taken after the merge gets the
/// merged range and data from the snapshot, and its node's replica still
/// frozen for that merge is retired, as applying the commit would have
/// done (nothing else would ever drop it).
#[tokio::test]
async fn a_snapshot_taken_after_a_merge_retires_the_frozen_replica() {
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (open_engine(dir_a.path()), open_engine(dir_b.path()));
    let (mut left_a, right, frozen_at, _keep_a) = frozen_neighbours(&a).await;
    let (mut left_b, _, _, _keep_b) = frozen_neighbours(&b).await;
    // Node A applies the commit and a write into the merged range after
    // it; node B is down meanwhile.
    let commit = Command::CommitMerge {
        right,
        frozen_at,
        version: left_a.descriptor().epoch.version,
    };
    assert!(matches!(
        apply(&mut left_a, vec![normal(1, 3, commit)]).await[0],
        CommandResponse::Merged { .. }
    ));
    apply(&mut left_a, vec![normal(1, 4, Command::put("b2", "after"))]).await;
    assert_eq!(a.take_retired(), vec![ShardId(2)]);
    assert!(b.take_retired().is_empty(), "B never saw the commit");
    // B's left replica catches up from A's snapshot.
    let snap = left_a
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    left_b
        .install_snapshot(&snap.meta, snap.snapshot.clone())
        .await
        .unwrap();
    assert_eq!(
        b.take_retired(),
        vec![ShardId(2)],
        "the install retires the frozen replica"
    );
    assert_eq!(
        b.descriptor(ShardId(1)).unwrap().range,
        KeyRange::new(b"a".to_vec(), b"c".to_vec())
    );
    for (k, v) in [("a1", "l"), ("b1", "r"), ("b2", "after")] {
        assert_eq!(b.owner_of(k.as_bytes()), Some(ShardId(1)), "{k}");
        assert_eq!(
            b.get(k.as_bytes()).unwrap().as_deref(),
            Some(v.as_bytes()),
            "{k}"
        );
    }
}
