//! Histories recorded against a real cluster under faults, checked for
//! linearizability per key, and proof that the checker can fail: a
//! deliberately broken build (reads served by any replica from its local
//! state) is caught.
// The fault layer's switches exist only with the `failpoints` feature
// (on in the test command).
#![cfg(feature = "failpoints")]

mod common;

#[path = "common/linearizability.rs"]
mod lin;

use common::cluster::{init_tracing, whole_range_shard, TestCluster, Timings};
use lin::{check, Kind, Op, Recorder};
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera::client::ClientOptions;
use tessera::{Client, NodeId};

const WAIT: Duration = Duration::from_secs(60);

fn client(c: &TestCluster, deadline: Duration) -> Client {
    client_with(c, deadline, true)
}

fn client_with(c: &TestCluster, deadline: Duration, exactly_once: bool) -> Client {
    let issued = c.ca.issue_admin("lin").unwrap();
    let nodes: Vec<(NodeId, std::net::SocketAddr)> = c.config_addrs().into_iter().collect();
    let opts = ClientOptions {
        deadline,
        attempt_timeout: Duration::from_secs(1),
        exactly_once,
        ..Default::default()
    };
    Client::from_identity(&c.ca.identity(&issued), nodes, opts).unwrap()
}

/// A client whose cache still names the old leader reads after that leader
/// was cut off and a newer write was acknowledged by the majority.
async fn read_behind_a_partition(unsafe_reads: bool) -> (Vec<Vec<u8>>, usize) {
    let c = TestCluster::start(&[1, 2, 3], &[], None, Timings::fast()).await;
    let d = whole_range_shard(&[1, 2, 3]);
    c.create_shards(std::slice::from_ref(&d)).await;
    let old = c.wait_leader(d.id, WAIT).await.unwrap();
    c.faults.set_unsafe_local_reads(unsafe_reads);
    let rec = Recorder::default();
    let stale = client(&c, Duration::from_secs(3));
    let fresh = client(&c, Duration::from_secs(30));
    let mut at_old = d.clone();
    at_old.leader_hint = Some(old);
    stale.learn_route(at_old.clone());
    assert!(rec.put(&stale, b"a", b"v1".to_vec()).await);

    tracing::info!(%old, "phase: cut the leader off; the majority moves on");
    c.faults.isolate(old, &[NodeId(1), NodeId(2), NodeId(3)]);
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|n| *n != old.0).collect();
    let new = c.wait_leader_among(d.id, &others, WAIT).await.unwrap();
    let mut at_new = d.clone();
    at_new.leader_hint = Some(new);
    fresh.learn_route(at_new);
    assert!(rec.put(&fresh, b"a", b"v2".to_vec()).await);

    tracing::info!("phase: the stale client reads through the old leader");
    stale.learn_route(at_old);
    let _ = rec.get(&stale, b"a").await;
    c.faults.heal();
    let last = rec.get(&fresh, b"a").await;
    assert_eq!(last, Some(Some(b"v2".to_vec())));
    let ops = rec.ops().len();
    drop((stale, fresh));
    c.shutdown().await;
    (check(&rec.ops()), ops)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_a_build_that_reads_without_read_index() {
    init_tracing();
    let (bad, ops) = read_behind_a_partition(true).await;
    assert_eq!(ops, 4, "the stale read was served");
    assert_eq!(bad, vec![b"a".to_vec()], "the stale read went unnoticed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_build_serves_no_stale_read_behind_a_partition() {
    init_tracing();
    let (bad, _) = read_behind_a_partition(false).await;
    assert!(bad.is_empty(), "not linearizable: {bad:?}");
}

/// 4 clients doing random put/get/delete/cas on 8 keys until `run` passes,
/// recording a history. A CAS expects what its client last saw of the key
/// (or absent), so both outcomes happen.
fn start_workload(
    c: &TestCluster,
    run: Duration,
) -> (
    Arc<Recorder>,
    Vec<Vec<u8>>,
    Vec<tokio::task::JoinHandle<Client>>,
) {
    start_workload_with(c, run, true, Duration::ZERO, false)
}

/// The workload: 4 clients, each pausing up to `pause_max` (random)
/// between operations; `shared`: the 4 are tasks of one `Client` (their
/// requests to one node then share its multiplexed stream).
fn start_workload_with(
    c: &TestCluster,
    run: Duration,
    exactly_once: bool,
    pause_max: Duration,
    shared: bool,
) -> (
    Arc<Recorder>,
    Vec<Vec<u8>>,
    Vec<tokio::task::JoinHandle<Client>>,
) {
    let rec = Arc::new(Recorder::default());
    // 8 keys, at most 4 × 90 operations: well under the checker's 128 per key.
    let keys: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i * 30, b'k', i]).collect();
    let stop_at = Instant::now() + run;
    let mut clients = Vec::new();
    let one = shared.then(|| client_with(c, Duration::from_secs(3), exactly_once));
    for w in 0..4u32 {
        let (rec, keys) = (rec.clone(), keys.clone());
        let cl = one
            .clone()
            .unwrap_or_else(|| client_with(c, Duration::from_secs(3), exactly_once));
        clients.push(tokio::spawn(async move {
            let mut seen: std::collections::HashMap<Vec<u8>, Option<Vec<u8>>> =
                std::collections::HashMap::new();
            let mut n = 0u32;
            while Instant::now() < stop_at && n < 90 {
                n += 1;
                let k = keys[rand::thread_rng().gen_range(0..keys.len())].clone();
                let unique = format!("w{w}-{n}").into_bytes();
                rec.random_op(&cl, &k, unique, &mut seen).await;
                if !pause_max.is_zero() {
                    let pause = rand::thread_rng().gen_range(Duration::ZERO..pause_max);
                    tokio::time::sleep(pause).await;
                }
            }
            cl
        }));
    }
    (rec, keys, clients)
}

/// One nemesis round: a random node isolated for 1.5 s, then healed, then
/// a random node killed and restarted. Returns the faults injected (2).
async fn isolate_then_restart(c: &mut TestCluster) -> u32 {
    isolate_then_restart_and(c, |_, _| {}).await
}

/// [`isolate_then_restart`], showing `before_kill` the cluster and the
/// node about to be killed.
async fn isolate_then_restart_and(
    c: &mut TestCluster,
    before_kill: impl FnOnce(&TestCluster, u64),
) -> u32 {
    let victim = rand::thread_rng().gen_range(1..=3u64);
    c.faults
        .isolate(NodeId(victim), &[NodeId(1), NodeId(2), NodeId(3)]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.faults.heal();
    let victim = rand::thread_rng().gen_range(1..=3u64);
    before_kill(c, victim);
    c.kill(victim).await;
    c.restart(victim).await;
    2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_under_partitions_and_restarts_stay_linearizable() {
    init_tracing();
    let mut c =
        TestCluster::start(&[1, 2, 3], &[], Some((4, vec![1, 2, 3])), Timings::fast()).await;
    c.wait_leaders(WAIT).await.unwrap();
    let stop_at = Instant::now() + Duration::from_secs(8);
    let (rec, keys, clients) = start_workload(&c, Duration::from_secs(8));
    tracing::info!("phase: nemesis — isolate a node, heal, kill and restart another");
    let mut faults = 0u32;
    while Instant::now() < stop_at {
        faults += isolate_then_restart(&mut c).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    finish_and_check(&c, &rec, &keys, clients, faults).await;
    c.shutdown().await;
}

/// The same nemesis with the 4 workers sharing one `Client`: their
/// requests to a node travel together on its multiplexed stream, which
/// partitions and restarts cut; still linearizable, and requests were
/// served multiplexed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_client_under_partitions_and_restarts_stays_linearizable() {
    init_tracing();
    let mut c =
        TestCluster::start(&[1, 2, 3], &[], Some((4, vec![1, 2, 3])), Timings::fast()).await;
    c.wait_leaders(WAIT).await.unwrap();
    let stop_at = Instant::now() + Duration::from_secs(8);
    let (rec, keys, clients) =
        start_workload_with(&c, Duration::from_secs(8), true, Duration::ZERO, true);
    // Multiplexed requests served, counted across restarts (a restarted
    // node's counters start again).
    let served = |c: &TestCluster, id: u64| c.node(id).metrics().client_mux_requests;
    let mut retired = 0u64;
    let mut faults = 0u32;
    while Instant::now() < stop_at {
        faults += isolate_then_restart_and(&mut c, |c, victim| retired += served(c, victim)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let total = retired + (1..=3).map(|id| served(&c, id)).sum::<u64>();
    assert!(total > 0, "no request was served on a multiplexed stream");
    finish_and_check(&c, &rec, &keys, clients, faults).await;
    c.shutdown().await;
}

/// RELIABILITY scenario 1 with quiescence on: clients pause long enough
/// between operations for their groups to fall asleep, so reads and
/// writes keep landing on sleeping leaders and followers while nodes are
/// isolated, killed and restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hibernating_groups_stay_linearizable_under_partitions_and_restarts() {
    init_tracing();
    // Sleeping replicas also turn dormant (their openraft instance
    // dropped, rebuilt by whatever needs them) after 300 ms asleep.
    let timings = Timings {
        quiesce_after_ms: 600,
        dormant_after_ms: 300,
        ..Timings::fast()
    };
    let mut c = TestCluster::start(&[1, 2, 3], &[], Some((4, vec![1, 2, 3])), timings).await;
    c.wait_leaders(WAIT).await.unwrap();
    let run = Duration::from_secs(14);
    let stop_at = Instant::now() + run;
    let (rec, keys, clients) =
        start_workload_with(&c, run, true, Duration::from_millis(2500), false);
    let mut faults = 0u32;
    while Instant::now() < stop_at {
        // Quiet first, so that groups sleep before the next fault.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        faults += isolate_then_restart(&mut c).await;
    }
    // Hibernation happened and sleeping replicas were woken, or the test
    // proved nothing about them.
    let (mut slept, mut woken, mut revived) = (0u64, 0u64, 0u64);
    for n in c.up() {
        let m = n.metrics();
        slept += m.hibernations;
        woken += m.wakes.iter().map(|(_, w)| *w).sum::<u64>();
        revived += m.revivals;
    }
    println!(
        "hibernations {slept}, wake-ups {woken}, dormant replicas rebuilt {revived} (nodes up at the end)"
    );
    assert!(
        slept > 0 && woken > 0 && revived > 0,
        "no group slept, woke and was rebuilt: {slept} / {woken} / {revived}"
    );
    finish_and_check(&c, &rec, &keys, clients, faults).await;
    c.shutdown().await;
}

/// Joins the clients, reads every key once more, and checks the history.
async fn finish_and_check(
    c: &TestCluster,
    rec: &Recorder,
    keys: &[Vec<u8>],
    clients: Vec<tokio::task::JoinHandle<Client>>,
    faults: u32,
) {
    let bad = finish_and_judge(c, rec, keys, clients, faults).await;
    assert!(bad.is_empty(), "not linearizable on keys {bad:?}");
}

/// Joins the clients, reads every key once more, and returns the keys
/// whose history is not linearizable (printing their histories).
async fn finish_and_judge(
    c: &TestCluster,
    rec: &Recorder,
    keys: &[Vec<u8>],
    clients: Vec<tokio::task::JoinHandle<Client>>,
    faults: u32,
) -> Vec<Vec<u8>> {
    let mut done = Vec::new();
    for t in clients {
        done.push(t.await.unwrap());
    }
    tracing::info!("phase: final reads of every key");
    let reader = client(c, Duration::from_secs(30));
    for k in keys {
        if rec.get(&reader, k).await.is_none() {
            panic!("final read of {k:?} failed: {:?}", reader.get(k).await);
        }
    }
    // After the faults every replica of every shard holds the same state
    // (what `tessera-ctl verify` checks).
    tracing::info!("phase: verify every shard's replicas");
    for d in reader.routes().await.expect("routes") {
        let v = reader.verify_shard(d.id).await.expect("verify");
        assert!(v.agrees(), "replicas differ after the faults: {v:?}");
    }
    let ops = rec.ops();
    let acked = ops.iter().filter(|o| o.ret.is_some()).count();
    println!(
        "history: {} operations ({acked} determinate), {faults} faults",
        ops.len()
    );
    assert!(acked > 20, "too little got through: {acked}");
    let bad = check(&ops);
    lin::report(&ops, &bad, &[]);
    drop((done, reader));
    bad
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_loss_and_flapping_links_stay_linearizable() {
    init_tracing();
    let c = TestCluster::start(&[1, 2, 3], &[], Some((4, vec![1, 2, 3])), Timings::fast()).await;
    c.wait_leaders(WAIT).await.unwrap();
    let stop_at = Instant::now() + Duration::from_secs(8);
    let (rec, keys, clients) = start_workload(&c, Duration::from_secs(8));
    tracing::info!("phase: nemesis — one-way loss from a node, then a flapping link");
    let mut faults = 0u32;
    let all = [NodeId(1), NodeId(2), NodeId(3)];
    while Instant::now() < stop_at {
        // A node that hears everyone but whose messages are lost.
        let victim = NodeId(rand::thread_rng().gen_range(1..=3u64));
        for o in all.iter().filter(|o| **o != victim) {
            c.faults.block(victim, *o);
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
        c.faults.heal();
        faults += 1;
        // A link going up and down every 150 ms.
        let (a, b) = (all[rand::thread_rng().gen_range(0..3)], victim);
        for _ in 0..8 {
            if a != b {
                c.faults.partition(a, b);
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
            c.faults.heal();
            tokio::time::sleep(Duration::from_millis(150)).await;
            faults += 1;
        }
    }
    finish_and_check(&c, &rec, &keys, clients, faults).await;
    c.shutdown().await;
}

/// RELIABILITY scenarios 4 and 5 under the history checker: splits and a
/// replica move back and forth while a node is restarted and another is
/// isolated; admin steps that fail under the faults are retried once the
/// fault is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splits_and_moves_during_faults_stay_linearizable() {
    init_tracing();
    let mut c = TestCluster::start(
        &[1, 2, 3, 4],
        &[],
        Some((2, vec![1, 2, 3])),
        Timings::fast(),
    )
    .await;
    c.wait_leaders(WAIT).await.unwrap();
    c.wait_leader(tessera::meta::META_SHARD, WAIT)
        .await
        .unwrap();
    let (rec, keys, clients) = start_workload(&c, Duration::from_secs(10));
    let admin = client(&c, Duration::from_secs(60));
    let mut faults = 0u32;
    // Split between the workload's keys (first bytes 0, 30, ..., 210).
    for (i, at) in [45u8, 105, 165, 15].into_iter().enumerate() {
        tracing::info!(at, "phase: split");
        admin.split(&[at]).await.expect("split");
        match i {
            0 => {
                c.kill(3).await;
                c.restart(3).await;
                faults += 1;
            }
            1 => {
                c.faults
                    .isolate(NodeId(2), &[NodeId(1), NodeId(3), NodeId(4)]);
                tokio::time::sleep(Duration::from_millis(1500)).await;
                c.faults.heal();
                faults += 1;
            }
            _ => {}
        }
    }
    tracing::info!("phase: move a replica to n4 and back");
    let shard = admin.routes().await.unwrap()[0].id;
    let d = admin
        .move_replica(shard, NodeId(3), NodeId(4))
        .await
        .expect("move to n4");
    assert!(d.replicas.contains(&NodeId(4)));
    c.kill(1).await;
    c.restart(1).await;
    faults += 1;
    let d = admin
        .move_replica(shard, NodeId(4), NodeId(3))
        .await
        .expect("move back to n3");
    assert!(!d.replicas.contains(&NodeId(4)));
    finish_and_check(&c, &rec, &keys, clients, faults).await;
    c.shutdown().await;
}

/// RELIABILITY scenario 9: the replies of writes that took effect are lost
/// on their way back (a failpoint in the client: it sees a transport error
/// and retries the same write) while 4 clients run put/get/delete/CAS and
/// two shards split. Returns the keys that are not linearizable and the
/// history.
#[cfg(feature = "failpoints")]
async fn with_lost_replies(exactly_once: bool) -> (Vec<Vec<u8>>, Vec<Op>) {
    let c = TestCluster::start(&[1, 2, 3], &[], Some((4, vec![1, 2, 3])), Timings::fast()).await;
    c.wait_leaders(WAIT).await.unwrap();
    c.wait_leader(tessera::meta::META_SHARD, WAIT)
        .await
        .unwrap();
    let scenario = fail::FailScenario::setup();
    fail::cfg("client::lose_write_reply", "30%return").unwrap();
    tracing::info!(exactly_once, "phase: writes whose replies are lost, splits");
    let (rec, keys, clients) = start_workload_with(
        &c,
        Duration::from_secs(8),
        exactly_once,
        Duration::ZERO,
        false,
    );
    let admin = client(&c, Duration::from_secs(60));
    // Between the workload's keys (first bytes 0, 30, ..., 210): sessions
    // move to the children.
    for at in [45u8, 165] {
        tokio::time::sleep(Duration::from_secs(2)).await;
        admin.split(&[at]).await.expect("split");
    }
    // Final reads are not writes: the failpoint leaves them alone.
    let bad = finish_and_judge(&c, &rec, &keys, clients, 2).await;
    fail::remove("client::lose_write_reply");
    scenario.teardown();
    c.shutdown().await;
    (bad, rec.ops())
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replies_of_committed_writes_apply_exactly_once() {
    init_tracing();
    let (bad, ops) = with_lost_replies(true).await;
    let cas = |ok: bool| {
        ops.iter()
            .filter(|o| matches!(&o.kind, Kind::Cas { outcome: Some((s, _)), .. } if *s == ok))
            .count()
    };
    let deletes = ops
        .iter()
        .filter(|o| matches!(o.kind, Kind::Delete { existed: Some(_) }))
        .count();
    println!(
        "CAS succeeded {}, failed {}, deletes answered {deletes}",
        cas(true),
        cas(false)
    );
    assert!(
        cas(true) > 0 && cas(false) > 0 && deletes > 0,
        "the workload must exercise CAS with both outcomes and deletes"
    );
    assert!(bad.is_empty(), "not linearizable on keys {bad:?}");
}

/// The mutation check: the same faults against clients with exactly-once
/// off (a retry may apply a write again) must be caught by the checker.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_retried_writes_applied_twice() {
    init_tracing();
    let (bad, _) = with_lost_replies(false).await;
    assert!(
        !bad.is_empty(),
        "writes retried after lost replies were applied twice, unnoticed"
    );
}
