//! A real multi-node cluster over QUIC: elections and commits on many
//! shards, restarts from disk, a partitioned leader, coalesced heartbeats.
// The fault layer's switches exist only with the `failpoints` feature
// (on in the test command).
#![cfg(feature = "failpoints")]

mod common;

use common::cluster::{init_tracing, spread_shards, whole_range_shard, TestCluster, Timings};
use openraft::async_runtime::watch::WatchReceiver as _;
use std::time::Duration;
use tessera::{NodeId, ShardDescriptor, ShardId};

const WAIT: Duration = Duration::from_secs(60);

/// The two tests with hundreds of openraft groups take turns: run side by
/// side on a slower 2-core machine of this kind they starved each other
/// past their waits (a CI run, 2026-12-07: the 256-shard test failed its
/// 60 s wait while the 1,000-shard one ran for over 7 minutes).
static MANY_GROUPS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn key_of(shard: ShardId, d: &ShardDescriptor, i: u64) -> Vec<u8> {
    // The range's start (a key of its own), or 0x00 for the first shard.
    let mut k = if d.range.start.is_empty() {
        vec![0]
    } else {
        d.range.start.clone()
    };
    k.extend_from_slice(format!("k-{}-{i}", shard.0).as_bytes());
    k
}

async fn descriptors(c: &TestCluster) -> Vec<ShardDescriptor> {
    let node = c.up().next().expect("a node");
    node.shard_ids()
        .into_iter()
        .map(|s| node.engine().shard_state(s).expect("state").descriptor)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_256_shards_elect_and_commit_on_every_replica() {
    let _turn = MANY_GROUPS.lock().await;
    init_tracing();
    let c = TestCluster::start(
        &[1, 2, 3],
        &[],
        Some((256, vec![1, 2, 3])),
        // 768 openraft groups in one process on two cores: at a 300 ms
        // heartbeat (`many_active_groups`) a debug build on a slower
        // machine of this kind missed its heartbeats' 300 ms deadlines
        // faster than it recovered (thousands of timeouts a minute, no
        // write acknowledged in four minutes; the same at 354b23a).
        Timings::many_groups(),
    )
    .await;
    let descs = descriptors(&c).await;
    assert_eq!(descs.len(), 256);
    tracing::info!("phase: every shard elects a leader");
    for d in &descs {
        c.wait_leader(d.id, WAIT).await.unwrap();
    }
    tracing::info!("phase: one write per shard, applied on all three replicas");
    let mut written = Vec::new();
    for d in &descs {
        let key = key_of(d.id, d, 0);
        let idx = c.put(d.id, &key, b"v0", WAIT).await.unwrap();
        written.push((d.id, key, idx));
    }
    for (shard, key, idx) in &written {
        c.wait_applied(*shard, *idx, &[1, 2, 3], WAIT)
            .await
            .unwrap();
        for n in [1, 2, 3] {
            assert_eq!(
                c.node(n).engine().get(key).unwrap().as_deref(),
                Some(&b"v0"[..]),
                "{shard} on n{n}"
            );
        }
    }
    let led: u64 = c.up().map(|n| n.metrics().shards_led).sum();
    assert!(led >= 256, "every shard has a leader ({led})");
    tracing::info!("phase: the same figures over HTTP in Prometheus text");
    let mut led_http = 0;
    for n in c.up() {
        let text = tessera::metrics::fetch(n.metrics_addr().expect("metrics served"))
            .await
            .unwrap();
        led_http += tessera::metrics::parse_metric(&text, "tessera_shards_led").unwrap();
        assert_eq!(
            tessera::metrics::parse_metric(&text, "tessera_shards_hosted"),
            Some(256)
        );
        assert!(
            tessera::metrics::parse_metric(&text, "tessera_raft_frames_sent_total").unwrap() > 0
        );
        assert!(
            tessera::metrics::parse_metric(&text, "tessera_commands_applied_total").unwrap() >= 256
        );
    }
    assert!(led_http >= 256, "{led_http}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_catches_up_and_a_full_restart_keeps_every_write() {
    init_tracing();
    let mut c =
        TestCluster::start(&[1, 2, 3], &[], Some((8, vec![1, 2, 3])), Timings::fast()).await;
    let descs = descriptors(&c).await;
    let mut acked = Vec::new();
    for d in &descs {
        let k = key_of(d.id, d, 0);
        let idx = c.put(d.id, &k, b"before", WAIT).await.unwrap();
        acked.push((d.id, k, b"before".to_vec(), idx));
    }
    tracing::info!("phase: n3 down, writes continue on the majority");
    c.kill(3).await;
    for d in &descs {
        for i in 1..=5u64 {
            let k = key_of(d.id, d, i);
            let v = format!("while-down-{i}").into_bytes();
            let idx = c.put(d.id, &k, &v, WAIT).await.unwrap();
            acked.push((d.id, k, v, idx));
        }
    }
    tracing::info!("phase: n3 restarts from its folder and catches up");
    c.restart(3).await;
    for (shard, key, value, idx) in &acked {
        c.wait_applied(*shard, *idx, &[3], WAIT).await.unwrap();
        assert_eq!(c.node(3).engine().get(key).unwrap().as_ref(), Some(value));
    }
    tracing::info!("phase: the whole cluster restarts from disk");
    for n in [1, 2, 3] {
        c.kill(n).await;
    }
    for n in [1, 2, 3] {
        c.restart(n).await;
    }
    for d in &descs {
        c.wait_linearizable(d.id, WAIT).await.unwrap();
    }
    for (shard, key, value, idx) in &acked {
        c.wait_applied(*shard, *idx, &[1, 2, 3], WAIT)
            .await
            .unwrap();
        for n in [1, 2, 3] {
            assert_eq!(
                c.node(n).engine().get(key).unwrap().as_ref(),
                Some(value),
                "{shard} key {key:?} on n{n} after full restart"
            );
        }
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_partitioned_into_the_minority_commits_nothing() {
    init_tracing();
    let c = TestCluster::start(&[1, 2, 3], &[], None, Timings::fast()).await;
    let d = whole_range_shard(&[1, 2, 3]);
    c.create_shards(std::slice::from_ref(&d)).await;
    let old = c.wait_leader(d.id, WAIT).await.unwrap();
    let idx = c.put(d.id, b"before", b"1", WAIT).await.unwrap();
    c.wait_applied(d.id, idx, &[1, 2, 3], WAIT).await.unwrap();
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|n| *n != old.0).collect();

    tracing::info!(%old, "phase: isolate the leader");
    c.faults.isolate(old, &[NodeId(1), NodeId(2), NodeId(3)]);
    let old_raft = c.node(old.0).raft(d.id).unwrap();
    let stale = tokio::time::timeout(
        Duration::from_secs(3),
        old_raft.client_write(tessera::command::Command::put(
            b"minority".to_vec(),
            b"x".to_vec(),
        )),
    )
    .await;
    assert!(
        !matches!(stale, Ok(Ok(_))),
        "a minority leader acknowledged a write: {stale:?}"
    );
    let new = c.wait_leader_among(d.id, &others, WAIT).await.unwrap();
    assert_ne!(new, old);
    let idx = c.put_via(new, d.id, b"after", b"2").await.unwrap();
    c.wait_applied(d.id, idx, &others, WAIT).await.unwrap();
    assert!(
        old_raft
            .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
            .await
            .is_err(),
        "the deposed leader must not serve a linearizable read"
    );

    tracing::info!("phase: heal; the old leader follows and drops its uncommitted entry");
    c.faults.heal();
    c.wait_applied(d.id, idx, &[old.0], WAIT).await.unwrap();
    for n in [1, 2, 3] {
        let e = c.node(n).engine();
        assert_eq!(e.get(b"after").unwrap().as_deref(), Some(&b"2"[..]), "n{n}");
        assert_eq!(
            e.get(b"minority").unwrap(),
            None,
            "n{n} holds a minority write"
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_of_1000_idle_shards_share_frames() {
    let _turn = MANY_GROUPS.lock().await;
    init_tracing();
    let c = TestCluster::start(&[1, 2, 3], &[], None, Timings::many_groups()).await;
    let descs = spread_shards(1000, &[1, 2, 3], |_| 1);
    c.create_shards(&descs).await;
    tracing::info!("phase: n1 leads all 1000 shards");
    c.wait_until("n1 leads 1000 shards", Duration::from_secs(120), |c| {
        c.node(1).metrics().shards_led == 1000
    })
    .await
    .unwrap();
    // Let every group finish its first replication round, then measure.
    c.wait_until(
        "followers know their leader",
        Duration::from_secs(60),
        |c| {
            descs.iter().all(|d| {
                [2u64, 3].iter().all(|n| {
                    c.node(*n).raft(d.id).is_some_and(|r| {
                        r.metrics().borrow_watched().current_leader == Some(NodeId(1))
                    })
                })
            })
        },
    )
    .await
    .unwrap();
    let before = c.node(1).metrics();
    let window = std::time::Instant::now();
    c.wait_until(
        "n1 sends 20,000 more messages",
        Duration::from_secs(120),
        |c| c.node(1).metrics().messages_sent >= before.messages_sent + 20_000,
    )
    .await
    .unwrap();
    let after = c.node(1).metrics();
    let msgs = after.messages_sent - before.messages_sent;
    let frames = after.frames_sent - before.frames_sent;
    let per_frame = msgs as f64 / frames.max(1) as f64;
    let secs = window.elapsed().as_secs_f64();
    println!(
        "idle 1000 shards: {msgs} messages in {frames} frames ({per_frame:.1} per frame, {:.1} frames/s to 2 peers)",
        frames as f64 / secs
    );
    assert!(per_frame >= 50.0, "{msgs} messages in {frames} frames");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_purged_log_catches_up_by_a_snapshot_over_quic() {
    init_tracing();
    let t = Timings {
        snapshot_logs_since_last: 50,
        snapshot_logs_to_keep: 0,
        ..Timings::fast()
    };
    let mut c = TestCluster::start(&[1, 2, 3], &[], None, t).await;
    let d = whole_range_shard(&[1, 2, 3]);
    c.create_shards(std::slice::from_ref(&d)).await;
    c.wait_leader(d.id, WAIT).await.unwrap();
    c.kill(3).await;
    tracing::info!("phase: 300 writes while n3 is down; the leaders snapshot and purge");
    let mut last = 0;
    for i in 0..300u64 {
        let v = vec![b'x'; 2000];
        last = c
            .put(d.id, format!("key-{i:04}").as_bytes(), &v, WAIT)
            .await
            .unwrap();
    }
    c.wait_until("the log was purged past n3's position", WAIT, |c| {
        c.up().all(|n| {
            n.raft(d.id).is_some_and(|r| {
                r.metrics()
                    .borrow_watched()
                    .purged
                    .is_some_and(|p| p.index > 100)
            })
        })
    })
    .await
    .unwrap();
    c.restart(3).await;
    c.wait_applied(d.id, last, &[3], WAIT).await.unwrap();
    assert!(
        c.node(3).metrics().snapshots_received >= 1,
        "n3 caught up without a snapshot"
    );
    for i in 0..300u64 {
        let k = format!("key-{i:04}");
        assert_eq!(
            c.node(3)
                .engine()
                .get(k.as_bytes())
                .unwrap()
                .map(|v| v.len()),
            Some(2000),
            "{k} on n3"
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_commit_through_random_message_loss() {
    init_tracing();
    let c = TestCluster::start(&[1, 2, 3], &[], Some((4, vec![1, 2, 3])), Timings::fast()).await;
    let descs = descriptors(&c).await;
    for d in &descs {
        c.wait_leader(d.id, WAIT).await.unwrap();
    }
    tracing::info!("phase: 20% of messages (requests and replies) dropped");
    c.faults.set_drop_fraction(0.2);
    let mut acked = Vec::new();
    for d in &descs {
        for i in 0..10u64 {
            let k = key_of(d.id, d, i);
            let idx = c.put(d.id, &k, b"lossy", WAIT).await.unwrap();
            acked.push((d.id, k, idx));
        }
    }
    c.faults.set_drop_fraction(0.0);
    for (shard, k, idx) in &acked {
        c.wait_applied(*shard, *idx, &[1, 2, 3], WAIT)
            .await
            .unwrap();
        for n in [1, 2, 3] {
            assert_eq!(
                c.node(n).engine().get(k).unwrap().as_deref(),
                Some(&b"lossy"[..])
            );
        }
    }
    c.shutdown().await;
}
