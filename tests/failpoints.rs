//! Failpoints in the storage write path (build with `--features failpoints`):
//! a failed write or sync fail-stops the engine, no callback reports success
//! after it, and what was acknowledged before survives a reopen; an
//! interrupted snapshot install is redone when the shard is opened again.
//! Also the client's fallback when a node does not serve multiplexed
//! streams.
#![cfg(feature = "failpoints")]

mod common;

use common::*;
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};
use tessera::command::{Command, Op};
use tessera::raft::Vote;
use tessera::storage::StoreError;
use tessera::{KeyRange, NodeId, ShardDescriptor, ShardId};

fn put(i: u64) -> Command {
    Command::put(format!("fp/{i:04}"), format!("v{i}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sync_fail_stops_and_keeps_what_was_acknowledged() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let engine = open_engine(dir.path());
    let (mut log, mut sm) = create_and_open(&engine, &prefix_shard(1, b"fp/")).await;
    let acked: Vec<_> = (1..=10).map(|i| normal(1, i, put(i))).collect();
    append_durable(&log, acked.clone())
        .await
        .expect("healthy append");
    apply(&mut sm, acked).await;

    eprintln!("--- the next sync fails");
    fail::cfg("log_writer::sync", "return").unwrap();
    let r = append_durable(&log, vec![normal(1, 11, put(11))]).await;
    assert!(
        matches!(r, Err(StoreError::Failed { .. })),
        "callback must report the failure: {r:?}"
    );
    assert!(matches!(
        engine.check_healthy(),
        Err(StoreError::Failed { .. })
    ));
    fail::remove("log_writer::sync");

    eprintln!("--- latched: nothing more is acknowledged, even with the disk back");
    assert!(
        log.save_vote(&Vote::new(2, NodeId(1))).await.is_err(),
        "vote after fail-stop"
    );
    let r = append_durable(&log, vec![normal(1, 12, put(12))]).await;
    assert!(
        matches!(r, Err(StoreError::Failed { .. })),
        "append after fail-stop: {r:?}"
    );
    assert!(
        sm.apply_entries(vec![normal(1, 11, put(11))])
            .await
            .is_err(),
        "apply after fail-stop"
    );

    eprintln!("--- reopen: the acknowledged prefix is intact");
    drop((log, sm));
    drop(engine);
    let engine = open_engine(dir.path());
    engine.check_healthy().unwrap();
    let (mut log, mut sm) = engine.open_shard(ShardId(1)).unwrap();
    let got = log.try_get_log_entries(1..=10).await.unwrap();
    assert_eq!(got.len(), 10);
    assert_eq!(
        sm.applied_state().await.unwrap().0.map(|l| l.index),
        Some(10)
    );
    assert_eq!(engine.get(b"fp/0010").unwrap(), Some(b"v10".to_vec()));
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_write_fails_the_append_itself() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let engine = open_engine(dir.path());
    let (log, _sm) = create_and_open(&engine, &prefix_shard(1, b"fp/")).await;
    fail::cfg("log_writer::write", "return").unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let r = log
        .append_entries(vec![normal(1, 1, put(1))], move |r| {
            let _ = tx.send(r);
        })
        .await;
    assert!(matches!(r, Err(StoreError::Failed { .. })), "{r:?}");
    assert!(
        rx.await.unwrap().is_err(),
        "callback reports the failure too"
    );
    fail::remove("log_writer::write");
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_install_is_redone_at_open() {
    let scenario = fail::FailScenario::setup();
    let range = KeyRange::new(b"m".to_vec(), b"n".to_vec());
    let d = ShardDescriptor::new(ShardId(5), range.clone(), vec![NodeId(1)]);
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let src = open_engine(src_dir.path());
    let (_l, mut sm) = create_and_open(&src, &d).await;
    for b in 0..20u64 {
        let ops = (0..500)
            .map(|i| Op::Put {
                key: format!("m{b:03}{i:04}").into_bytes(),
                value: vec![1; 300],
            })
            .collect();
        apply(&mut sm, vec![normal(1, b + 1, Command::Write { ops })]).await;
    }
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let want = src.scan(&range.start, &range.end, usize::MAX).unwrap();

    let dst = open_engine(dst_dir.path());
    let (dl, mut dsm) = create_and_open(&dst, &d).await;
    // The first chunk lands, the second fails: a half-installed range.
    fail::cfg("snapshot::install_chunk", "1*off->return").unwrap();
    assert!(dsm
        .install_snapshot(&snap.meta, snap.snapshot.clone())
        .await
        .is_err());
    fail::remove("snapshot::install_chunk");
    let partial = dst.scan(&range.start, &range.end, usize::MAX).unwrap();
    assert!(
        !partial.is_empty() && partial.len() < want.len(),
        "the failure left a partial range"
    );

    drop((dl, dsm));
    drop(dst);
    let dst = open_engine(dst_dir.path());
    let (_dl, mut dsm) = dst.open_shard(ShardId(5)).unwrap();
    assert_eq!(dsm.applied_state().await.unwrap().0, snap.meta.last_log_id);
    assert!(
        dst.scan(&range.start, &range.end, usize::MAX).unwrap() == want,
        "install redone whole"
    );
    scenario.teardown();
}

#[path = "common/multiraft.rs"]
mod harness;

/// RELIABILITY scenario 6 on the batch system: a failed sync of a round's
/// log write fail-stops that node's loop. The proposal it carried is not
/// acknowledged, nothing more is, the other nodes go on, and what was
/// acknowledged before is all there when the node comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_round_sync_fail_stops_the_batch_loop_and_keeps_what_was_acknowledged() {
    use harness::loops::LoopCluster;
    use std::time::Duration;
    use tessera::multiraft::{DriverError, LoopConfig, RequestError};

    let scenario = fail::FailScenario::setup();
    let deadline = Duration::from_secs(20);
    let mut c = LoopCluster::start(
        3,
        1,
        LoopConfig {
            tick: Duration::from_millis(10),
            ..LoopConfig::default()
        },
    );
    let g = ShardId(1);
    let mut acked = Vec::new();
    for i in 0..10 {
        let w = format!("acked-{i}").into_bytes();
        c.propose(g, &w, deadline).await.expect("healthy write");
        acked.push(w);
    }
    let leader = *c
        .loops
        .iter()
        .find(|(_, l)| l.view().group(g).is_some_and(|v| v.leading))
        .expect("a leader")
        .0;

    eprintln!("--- n{leader}'s next synced round write fails");
    fail::cfg("multiraft::round_sync", &format!("return({leader})")).unwrap();
    let mailbox = c.loops[&leader].mailbox();
    let answer = match mailbox.propose(g, b"lost".to_vec()) {
        Ok(rx) => rx.await.unwrap_or(Err(RequestError::Stopped)),
        Err(e) => Err(e),
    };
    assert!(
        answer.is_err(),
        "a proposal whose sync failed was acknowledged: {answer:?}"
    );
    match mailbox.propose(g, b"later".to_vec()) {
        Err(RequestError::Stopped) => {}
        Ok(rx) => {
            let r = rx.await;
            assert!(
                !matches!(r, Ok(Ok(_))),
                "a fail-stopped loop acknowledged a write: {r:?}"
            );
        }
        Err(e) => panic!("unexpected refusal: {e}"),
    }
    match c.halt(leader) {
        Err(DriverError::Store(StoreError::Failed { cause })) => {
            assert!(cause.contains("injected"), "{cause}");
        }
        other => panic!("the loop did not fail-stop: {other:?}"),
    }
    fail::remove("multiraft::round_sync");

    // The others elect and go on; the failed node comes back with every
    // acknowledged write and catches up.
    c.propose(g, b"after", deadline)
        .await
        .expect("a write without the failed node");
    c.restart(leader);
    c.wait_applied(g, b"after", deadline).await;
    let applied: Vec<Vec<u8>> = c.applied[&leader].lock().unwrap()[&g].clone();
    let kept: Vec<&Vec<u8>> = applied
        .iter()
        .filter(|w| w.starts_with(b"acked-"))
        .collect();
    assert_eq!(
        kept,
        acked.iter().collect::<Vec<_>>(),
        "n{leader} holds every acknowledged write, once, in order"
    );
    scenario.teardown();
}

/// A node without multiplexed streams (as one built before them: the
/// `node::mux_unknown` failpoint makes every node answer the stream's
/// opening with `Invalid`, as a node that cannot decode the request does).
/// A client shared by many tasks falls back to a stream per request: every
/// write is acknowledged and read back, and no request is multiplexed.
/// Once the node serves them (here: restarted without the failpoint), the
/// client's new connection to it asks again and multiplexes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_client_falls_back_to_a_stream_per_request_on_a_node_without_multiplexing() {
    use common::cluster::{init_tracing, TestCluster, Timings};
    use std::time::Duration;
    use tessera::Client;

    init_tracing();
    let scenario = fail::FailScenario::setup();
    fail::cfg("node::mux_unknown", "return").unwrap();
    let mut c =
        TestCluster::start(&[1, 2, 3], &[], Some((4, vec![1, 2, 3])), Timings::fast()).await;
    c.wait_leaders(Duration::from_secs(30)).await.unwrap();
    let issued = c.ca.issue_client("fallback").unwrap();
    let client = |c: &TestCluster| {
        let nodes = c.up().map(|n| (n.id(), n.addr())).collect();
        Client::from_identity(&c.ca.identity(&issued), nodes, Default::default()).unwrap()
    };
    let cl = client(&c);
    // 32 tasks sharing `cl`, 10 puts each, each read back at once; returns
    // the acknowledged writes.
    let run = |cl: Client, phase: u32| async move {
        let mut tasks = Vec::new();
        for w in 0..32u32 {
            let cl = cl.clone();
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..10u32 {
                    let k = common::spread_key(phase * 100_000 + w * 1000 + i);
                    let v = format!("p{phase}-w{w}-{i}").into_bytes();
                    cl.put(&k, &v).await.expect("put acknowledged");
                    let got = cl.get(&k).await.expect("get answered");
                    assert_eq!(got.as_ref(), Some(&v), "task {w} got another's answer");
                    acked.push((k, v));
                }
                acked
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("task"));
        }
        all
    };
    let mut acked = run(cl.clone(), 0).await;
    // Routes and leaders are learned; now the fallback itself must cost no
    // retries (a refused opening is not a failed request). An election
    // could cost each task one redirect, no more.
    let retries = cl.retries();
    acked.extend(run(cl.clone(), 2).await);
    let retried = cl.retries() - retries;
    assert!(retried < 32, "{retried} retries while falling back");
    let served = |c: &TestCluster| -> u64 { c.up().map(|n| n.metrics().client_mux_requests).sum() };
    assert_eq!(cl.multiplexed(), 0, "a request went multiplexed");
    assert_eq!(served(&c), 0, "a node served a multiplexed request");

    eprintln!("--- the nodes serve multiplexed streams again (each restarted)");
    fail::remove("node::mux_unknown");
    for id in 1..=3 {
        c.kill(id).await;
        c.restart(id).await;
    }
    c.wait_leaders(Duration::from_secs(30)).await.unwrap();
    acked.extend(run(cl.clone(), 1).await);
    assert!(
        cl.multiplexed() > 0,
        "no request multiplexed on the new connections"
    );
    assert!(served(&c) > 0, "no node served a multiplexed request");
    let reader = client(&c);
    assert_eq!(acked.len(), 3 * 32 * 10);
    for (k, v) in &acked {
        assert_eq!(reader.get(k).await.unwrap().as_ref(), Some(v), "lost {k:?}");
    }
    drop((cl, reader));
    c.shutdown().await;
    scenario.teardown();
}

/// A node cut off from a batch-system shard's group while the shard
/// splits: the meta table then lists the child on it, which it does not
/// host yet. Replica repair must leave the child to the split (an empty
/// openraft replica made by repair would take the child's place here for
/// good); once the node hears from the group again it applies the split
/// and runs the child on the batch system, with the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_leaves_a_batch_split_child_to_the_split() {
    use common::cluster::{init_tracing, TestCluster, Timings};
    use std::time::Duration;

    init_tracing();
    let scenario = fail::FailScenario::setup();
    let wait = Duration::from_secs(60);
    let timings = Timings {
        batch_data_shards: true,
        replica_gc: tessera::node::ReplicaGcConfig {
            interval_ms: 100,
            grace_ms: 30_000,
        },
        ..Timings::fast()
    };
    let c = TestCluster::start(&[1, 2, 3], &[], Some((1, vec![1, 2, 3])), timings).await;
    let leader = c.wait_batch_leader(ShardId(1), wait).await.unwrap();
    let cl = c.client();
    cl.put(b"\x10a", b"left").await.unwrap();
    cl.put(b"\x90z", b"right").await.unwrap();
    let cut = (1..=3u64).find(|i| *i != leader.0).unwrap();

    eprintln!("--- n{cut} hears nothing of the batch groups; s1 splits");
    fail::cfg("multiraft::drop_frames_to", &format!("return({cut})")).unwrap();
    let (_, right) = cl.split(b"\x80").await.unwrap();
    let what = format!(
        "n{cut}'s replica repair looks at {} and defers it",
        right.id
    );
    common::wait::until(&what, wait, || async {
        let deferred = c.node(cut).metrics().repairs_deferred;
        if deferred > 0 {
            Ok(())
        } else {
            Err(format!("deferred {deferred}"))
        }
    })
    .await
    .unwrap();
    assert!(
        !c.node(cut).shard_ids().contains(&right.id),
        "repair created a replica of the split's child on n{cut}"
    );
    assert_eq!(c.node(cut).metrics().replicas_repaired, 0);

    eprintln!("--- n{cut} hears from the group again");
    fail::remove("multiraft::drop_frames_to");
    let what = format!("n{cut} runs {} on the batch system", right.id);
    common::wait::until(&what, wait, || async {
        if c.node(cut).is_batch_shard(right.id) {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await
    .unwrap();
    assert_eq!(cl.get(b"\x90z").await.unwrap(), Some(b"right".to_vec()));
    cl.put(b"\x90y", b"after").await.unwrap();
    let v = cl.verify_shard(right.id).await.unwrap();
    assert_eq!(v.replicas.len(), 3, "{v:?}");
    assert!(v.agrees(), "replicas of {} differ: {v:?}", right.id);
    drop(cl);
    c.shutdown().await;
    scenario.teardown();
}

/// A batch-system replica move whose learner cannot catch up (cut off
/// from the group's frames) rolls back: the learner leaves the group, its
/// replica is dropped, the voters are as before; once the target hears
/// the group again, the same move completes, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_move_whose_learner_cannot_catch_up_rolls_back() {
    use common::cluster::{init_tracing, TestCluster, Timings};
    use std::time::Duration;

    init_tracing();
    let scenario = fail::FailScenario::setup();
    let wait = Duration::from_secs(60);
    let timings = Timings {
        batch_data_shards: true,
        ..Timings::fast()
    };
    let c = TestCluster::start(&[1, 2, 3, 4], &[], Some((1, vec![1, 2, 3])), timings).await;
    let s = ShardId(1);
    let leader = c.wait_batch_leader(s, wait).await.unwrap();
    let from = (1..=3u64).find(|i| *i != leader.0).unwrap();
    let cl = c.client();
    for i in 0..50u32 {
        cl.put(format!("k{i:03}").as_bytes(), b"before")
            .await
            .unwrap();
    }

    eprintln!("--- n4 hears nothing of the batch groups; n{from}'s replica moves to n4");
    fail::cfg("multiraft::drop_frames_to", "return(4)").unwrap();
    let r = c
        .node(leader.0)
        .move_replica(s, NodeId(from), NodeId(4), Duration::from_secs(3))
        .await;
    match r {
        Err(e) => assert!(e.to_string().contains("did not catch up"), "{e}"),
        Ok(d) => panic!("a move to a node cut off completed: {d:?}"),
    }
    let mut replicas = c.node(leader.0).engine().descriptor(s).unwrap().replicas;
    replicas.sort();
    assert_eq!(
        replicas,
        vec![NodeId(1), NodeId(2), NodeId(3)],
        "voters as before"
    );
    common::wait::until("n4 drops the rolled-back replica", wait, || async {
        if c.node(4).shard_ids().contains(&s) {
            Err("still hosted".to_string())
        } else {
            Ok(())
        }
    })
    .await
    .unwrap();
    for i in 50..80u32 {
        cl.put(format!("k{i:03}").as_bytes(), b"between")
            .await
            .unwrap();
    }

    eprintln!("--- n4 hears the group again: the same move completes");
    fail::remove("multiraft::drop_frames_to");
    let d = c
        .node(leader.0)
        .move_replica(s, NodeId(from), NodeId(4), Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        d.replicas.contains(&NodeId(4)) && !d.replicas.contains(&NodeId(from)),
        "{d:?}"
    );
    for i in 0..80u32 {
        let want: &[u8] = if i < 50 { b"before" } else { b"between" };
        assert_eq!(
            cl.get(format!("k{i:03}").as_bytes())
                .await
                .unwrap()
                .as_deref(),
            Some(want)
        );
    }
    let v = cl.verify_shard(s).await.unwrap();
    assert_eq!(v.replicas.len(), 3, "{v:?}");
    assert!(v.agrees(), "{v:?}");
    drop(cl);
    c.shutdown().await;
    scenario.teardown();
}
