//! Replica lifecycle (RELIABILITY scenario 11): a split followed by moving a
//! replica away and back, snapshots older than a split, and removed
//! replicas. Every key stays owned by exactly one live replica per node and
//! every replica of a shard holds the same data.

mod common;

use common::cluster::{init_tracing, TestCluster, Timings};
use std::collections::BTreeMap;
use std::time::Duration;
use tessera::client::ClientOptions;
use tessera::node::meta;
use tessera::{Client, NodeId, ShardDescriptor, ShardId};

const WAIT: Duration = Duration::from_secs(60);

fn client(c: &TestCluster) -> Client {
    let issued = c.ca.issue_client("test").unwrap();
    let opts = ClientOptions {
        deadline: Duration::from_secs(60),
        ..ClientOptions::default()
    };
    Client::from_identity(&c.ca.identity(&issued), c.config_addrs(), opts).unwrap()
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
    let want: Vec<(Vec<u8>, Vec<u8>)> = want
        .iter()
        .filter(|(k, _)| d.range.contains(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for r in &d.replicas {
        tracing::info!(shard = %d.id, leader = %r, "phase: make this replica the leader and scan");
        cl.transfer_leader(d.id, *r).await.unwrap();
        let got = cl.scan(&d.range.start, &d.range.end, 100_000).await.unwrap();
        assert_eq!(got, want, "{} led by {r}: scan differs from the model", d.id);
        // The leader's local copy is what it served.
        assert_eq!(
            local_pairs(c, r.0, d),
            want,
            "{} on {r}: local data differs",
            d.id
        );
    }
}

/// The issue's reproduction: a shard with a snapshot from before a split,
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
    let cl = client(&c);
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
                .is_some_and(|r| r.metrics().borrow().snapshot.is_some())
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
    assert_eq!(cl.get(b"k150").await.unwrap().as_deref(), Some(&b"after"[..]));
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
        local_pairs(&c, 4, &tessera::ShardDescriptor::new(ShardId(99), tessera::KeyRange::full(), vec![]))
            .is_empty(),
        "n4 keeps no user data"
    );
    c.shutdown().await;
}
