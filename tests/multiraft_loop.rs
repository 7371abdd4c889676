//! The batch system's node loop (`tessera::multiraft::NodeLoop`): real
//! threads, bounded mailboxes, a clock, and three nodes wired in memory.
//! Proposals are acknowledged only once applied, and none acknowledged is
//! lost when a node stops and comes back.

#[path = "common/multiraft.rs"]
mod harness;

use harness::loops::LoopCluster;
use std::time::Duration;
use tessera::multiraft::LoopConfig;
use tessera::ShardId;

fn fast() -> LoopConfig {
    LoopConfig {
        tick: Duration::from_millis(10),
        ..LoopConfig::default()
    }
}

const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_proposals_over_many_groups_are_acknowledged_and_applied_in_one_order() {
    let c = LoopCluster::start(3, 16, fast());
    let mut tasks = Vec::new();
    let c = std::sync::Arc::new(c);
    for g in 1..=16u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..8 {
                let data = format!("g{g}-{i}").into_bytes();
                c.propose(ShardId(g), &data, DEADLINE)
                    .await
                    .unwrap_or_else(|e| panic!("g{g} write {i}: {e}"));
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer task");
    }
    for g in 1..=16u64 {
        c.wait_applied(ShardId(g), format!("g{g}-7").as_bytes(), DEADLINE)
            .await;
        let want: Vec<Vec<u8>> = (0..8).map(|i| format!("g{g}-{i}").into_bytes()).collect();
        for (id, a) in &c.applied {
            assert_eq!(
                a.lock().unwrap()[&ShardId(g)],
                want,
                "node {id} applied group {g}'s writes once each, in order"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_loses_nothing_acknowledged_and_catches_up_after_restart() {
    let mut c = LoopCluster::start(3, 4, fast());
    for g in 1..=4u64 {
        c.propose(ShardId(g), b"one", DEADLINE)
            .await
            .expect("first write");
    }
    // Node 1 stops; the other two keep taking writes (new leaders where
    // node 1 led).
    c.stop(1);
    for g in 1..=4u64 {
        c.propose(ShardId(g), b"two", DEADLINE)
            .await
            .expect("write while node 1 is down");
    }
    // A read point at whichever node leads now covers both writes, also
    // where the leader changed.
    for g in 1..=4u64 {
        let (node, _) = c
            .read_index(ShardId(g), DEADLINE)
            .await
            .expect("read point");
        let applied = c.applied[&node].lock().unwrap()[&ShardId(g)].clone();
        assert_eq!(
            applied,
            vec![b"one".to_vec(), b"two".to_vec()],
            "node {node}, group {g}"
        );
    }
    c.restart(1);
    for g in 1..=4u64 {
        c.propose(ShardId(g), b"three", DEADLINE)
            .await
            .expect("write after the restart");
        c.wait_applied(ShardId(g), b"three", DEADLINE).await;
        for (id, a) in &c.applied {
            assert_eq!(
                a.lock().unwrap()[&ShardId(g)],
                vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()],
                "node {id}, group {g}: every acknowledged write, once, in order"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_to_a_missing_group_gets_a_typed_error() {
    let c = LoopCluster::start(3, 1, fast());
    c.propose(ShardId(1), b"ok", DEADLINE)
        .await
        .expect("a write");
    let err = c
        .propose(ShardId(7), b"nope", DEADLINE)
        .await
        .expect_err("group 7 does not exist");
    assert!(err.contains("group s7 is not open"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_point_after_an_acknowledged_write_includes_it() {
    let c = LoopCluster::start(3, 4, fast());
    for round in 0..5 {
        for g in 1..=4u64 {
            let data = format!("g{g}-{round}").into_bytes();
            let index = c.propose(ShardId(g), &data, DEADLINE).await.expect("write");
            let (node, read_at) = c
                .read_index(ShardId(g), DEADLINE)
                .await
                .expect("read point");
            assert!(
                read_at >= index,
                "the read point {read_at} covers the write at {index}"
            );
            let applied = c.applied[&node].lock().unwrap()[&ShardId(g)].clone();
            assert!(
                applied.contains(&data),
                "node {node} answered a read point before applying the acknowledged write"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_refuses_a_read_point_with_the_leader() {
    let c = LoopCluster::start(3, 1, fast());
    c.propose(ShardId(1), b"w", DEADLINE).await.expect("write");
    let (leader, _) = c
        .read_index(ShardId(1), DEADLINE)
        .await
        .expect("read point");
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let err = c.loops[&follower]
        .mailbox()
        .read_index(ShardId(1))
        .expect("queued")
        .await
        .expect("answered")
        .expect_err("a follower refuses");
    assert!(
        matches!(
            err,
            tessera::multiraft::RequestError::Driver(tessera::multiraft::DriverError::NotLeader {
                leader: Some(l),
                ..
            }) if l == leader
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_point_asked_before_any_write_is_answered() {
    // A new leader takes a read index only after it committed an entry of
    // its own term; a read asked before that waits for it instead of being
    // dropped unanswered.
    let c = LoopCluster::start(3, 16, fast());
    for g in 1..=16u64 {
        let (node, index) = c
            .read_index(ShardId(g), DEADLINE)
            .await
            .unwrap_or_else(|e| panic!("group {g}: {e}"));
        assert!(
            index >= 1,
            "group {g}: read point {index} on node {node} covers the leader's first entry"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_loses_its_quorum_answers_pending_proposals_as_unknown() {
    let mut c = LoopCluster::start(3, 1, fast());
    c.propose(ShardId(1), b"first", DEADLINE)
        .await
        .expect("a write");
    let (leader, _) = c
        .read_index(ShardId(1), DEADLINE)
        .await
        .expect("read point");
    for id in 1..=3 {
        if id != leader {
            c.stop(id);
        }
    }
    // Nothing can commit now. The leader steps down after an election
    // timeout without its quorum (check-quorum) and answers at once.
    let rx = c.loops[&leader]
        .mailbox()
        .propose(ShardId(1), b"second".to_vec())
        .expect("queued");
    let answer = tokio::time::timeout(DEADLINE, rx)
        .await
        .expect("answered before the deadline")
        .expect("reply sent");
    assert!(
        matches!(
            answer,
            Err(tessera::multiraft::RequestError::Unknown { shard, .. }) if shard == ShardId(1)
        ),
        "{answer:?}"
    );
}
