//! Quiescence: idle groups hibernate on every replica and wake on demand;
//! node-pair pings stand in for the heartbeats of sleeping groups, so a
//! dead leader's sleeping groups elect and nothing else does.

mod common;

use common::cluster::{init_tracing, spread_shards, TestCluster, Timings};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tessera::api::{Request, Response};
use tessera::command::Op;
use tessera::{NodeId, ShardDescriptor, ShardId};

const WAIT: Duration = Duration::from_secs(60);

/// Sleeping replicas turn dormant (their openraft instance dropped) after
/// a second, so every test here also runs through rebuilding them.
fn timings() -> Timings {
    Timings {
        quiesce_after_ms: 1000,
        dormant_after_ms: 1000,
        ..Timings::fast()
    }
}

/// 6 shards on nodes 1–3, two led by each.
async fn cluster() -> (TestCluster, Vec<ShardDescriptor>) {
    let c = TestCluster::start(&[1, 2, 3], &[], None, timings()).await;
    let shards = spread_shards(6, &[1, 2, 3], |i| i % 3 + 1);
    c.create_shards(&shards).await;
    for d in &shards {
        c.wait_leader(d.id, WAIT).await.unwrap();
    }
    (c, shards)
}

/// Waits until every replica of `shards` on the running nodes is `what`
/// (`is` says whether a node's replica of a shard is).
async fn wait_all(
    c: &TestCluster,
    shards: &[ShardDescriptor],
    what: &str,
    is: fn(&tessera::node::Node, ShardId) -> bool,
) {
    c.wait_until(&format!("every replica of every shard {what}"), WAIT, |c| {
        c.up().all(|n| shards.iter().all(|d| is(n, d.id)))
    })
    .await
    .unwrap();
}

/// Waits until every replica of `shards` on the running nodes sleeps.
async fn wait_all_asleep(c: &TestCluster, shards: &[ShardDescriptor]) {
    wait_all(c, shards, "asleep", tessera::node::Node::is_quiescent).await;
}

/// Waits until every replica of `shards` on the running nodes is dormant.
async fn wait_all_dormant(c: &TestCluster, shards: &[ShardDescriptor]) {
    wait_all(c, shards, "dormant", tessera::node::Node::is_dormant).await;
}

/// The leader of each shard, from the nodes' own view (a dormant leader's:
/// the vote it sleeps under).
fn leaders(c: &TestCluster, shards: &[ShardDescriptor]) -> BTreeMap<ShardId, NodeId> {
    shards
        .iter()
        .map(|d| {
            let l = c
                .up()
                .find(|n| n.shards_led().contains(&d.id))
                .map(|n| n.id())
                .expect("a leader");
            (d.id, l)
        })
        .collect()
}

/// The term of `shard` on each running node.
fn terms(c: &TestCluster, shard: ShardId) -> BTreeMap<NodeId, u64> {
    c.up()
        .filter_map(|n| Some((n.id(), n.replica_term(shard)?)))
        .collect()
}

/// Leaders woken by a client request on the running nodes, in all. A
/// leader the request found dormant (asleep longer than
/// `dormant_after_ms`, which a slow machine reaches before the test's last
/// shard) is rebuilt, and that counts its wake-up as `revived`, not
/// `client`: nothing else revives a leader in the test that counts them.
fn client_wakes(c: &TestCluster) -> u64 {
    c.up()
        .map(|n| {
            n.metrics()
                .wakes
                .iter()
                .filter(|(cause, _)| *cause == "client" || *cause == "revived")
                .map(|(_, v)| *v)
                .sum::<u64>()
        })
        .sum()
}

/// A key inside `d`'s range (its start, a zero byte, `suffix`).
fn key_of(d: &ShardDescriptor, suffix: &str) -> Vec<u8> {
    let mut k = d.range.start.clone();
    k.push(0);
    k.extend_from_slice(suffix.as_bytes());
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_sleep_and_a_client_wakes_them_without_an_election() {
    init_tracing();
    let (c, shards) = cluster().await;
    let client = c.client();
    wait_all_asleep(&c, &shards).await;
    let before: Vec<_> = shards.iter().map(|d| terms(&c, d.id)).collect();
    let woken_before = client_wakes(&c);
    // A write and a linearizable read to every sleeping shard, through the
    // client like any other.
    for d in &shards {
        let k = key_of(d, "woken");
        client
            .put(&k, b"1")
            .await
            .expect("write to a sleeping shard");
        assert_eq!(client.get(&k).await.unwrap().as_deref(), Some(&b"1"[..]));
    }
    let woken = client_wakes(&c) - woken_before;
    assert!(
        woken >= shards.len() as u64,
        "{woken} leaders woken by the client's requests, {} shards",
        shards.len()
    );
    // They fall asleep again, and no group held an election throughout.
    wait_all_asleep(&c, &shards).await;
    let after: Vec<_> = shards.iter().map(|d| terms(&c, d.id)).collect();
    assert_eq!(before, after, "terms changed: an election happened");
    for d in &shards {
        let k = key_of(d, "woken");
        assert_eq!(client.get(&k).await.unwrap().as_deref(), Some(&b"1"[..]));
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leaders_sleeping_groups_elect_and_the_others_stay_asleep() {
    init_tracing();
    let (mut c, shards) = cluster().await;
    let client = c.client();
    for d in &shards {
        client.put(&key_of(d, "a"), b"1").await.unwrap();
    }
    wait_all_asleep(&c, &shards).await;
    let leaders = leaders(&c, &shards);
    let before: BTreeMap<ShardId, BTreeMap<NodeId, u64>> =
        shards.iter().map(|d| (d.id, terms(&c, d.id))).collect();
    let dead = NodeId(1);
    assert!(leaders.values().any(|l| *l == dead), "n1 leads some shards");
    c.kill(1).await;
    let killed_at = Instant::now();
    // Its groups elect new leaders among the survivors.
    for (shard, leader) in &leaders {
        if *leader == dead {
            c.wait_leader_among(*shard, &[2, 3], WAIT).await.unwrap();
        }
    }
    println!(
        "new leaders of the dead leader's sleeping groups after {:?}",
        killed_at.elapsed()
    );
    // The others held no election: same leader, same term, still asleep.
    for (shard, leader) in &leaders {
        if *leader != dead {
            let mut t = before[shard].clone();
            t.remove(&dead);
            assert_eq!(
                terms(&c, *shard),
                t,
                "{shard} (led by {leader}) had an election"
            );
            assert!(c.node(leader.0).shards_led().contains(shard));
        }
    }
    // Writes to every shard; then the dead node comes back and its
    // replicas, which missed them, catch up.
    for d in &shards {
        client.put(&key_of(d, "b"), b"2").await.unwrap();
    }
    c.restart(1).await;
    for d in &shards {
        c.wait_caught_up(d.id, &[1, 2, 3], WAIT).await.unwrap();
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_follower_that_missed_entries_catches_up_when_woken() {
    init_tracing();
    let (mut c, shards) = cluster().await;
    let client = c.client();
    wait_all_asleep(&c, &shards).await;
    // n3 is away while every shard takes writes (n3 leads two of them:
    // they elect elsewhere first).
    c.kill(3).await;
    for d in &shards {
        for i in 0..20 {
            client
                .put(&key_of(d, &format!("m{i}")), b"x")
                .await
                .unwrap();
        }
    }
    c.restart(3).await;
    for d in &shards {
        c.wait_caught_up(d.id, &[1, 2, 3], WAIT).await.unwrap();
    }
    // Everyone falls asleep again, n3 included, and the data reads back.
    wait_all_asleep(&c, &shards).await;
    for d in &shards {
        for i in 0..20 {
            let k = key_of(d, &format!("m{i}"));
            assert_eq!(client.get(&k).await.unwrap().as_deref(), Some(&b"x"[..]));
        }
    }
    c.shutdown().await;
}

/// With quiescence on, a replica created before its group has a membership
/// (a bootstrap follower, a move's target) starts asleep: it has nothing
/// to tick for. The initialiser's vote request wakes it, it votes, follows
/// and catches up, and the group serves writes and later hibernates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_a_membership_starts_asleep_and_its_group_wakes_it() {
    init_tracing();
    let c = TestCluster::start(&[1, 2, 3], &[], None, timings()).await;
    let shards = spread_shards(1, &[1, 2, 3], |_| 1);
    let d = &shards[0];
    // n3 and n2 first: no membership, so they sleep.
    for n in [3u64, 2] {
        c.node(n).create_shard(d).await.unwrap();
        assert!(
            c.node(n).is_quiescent(d.id),
            "n{n}'s replica without a membership starts asleep"
        );
    }
    // n1 initialises and campaigns: its vote request wakes them.
    c.node(1).create_shard(d).await.unwrap();
    c.wait_leader(d.id, WAIT).await.unwrap();
    let client = c.client();
    client.put(&key_of(d, "born"), b"asleep").await.unwrap();
    c.wait_caught_up(d.id, &[1, 2, 3], WAIT).await.unwrap();
    wait_all_asleep(&c, &shards).await;
    assert_eq!(
        client.get(&key_of(d, "born")).await.unwrap().as_deref(),
        Some(&b"asleep"[..])
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_nobody_used_sleep_at_once_and_a_used_one_waits_its_idle_time() {
    init_tracing();
    // Ten minutes of idleness before a used group sleeps: every group that
    // sleeps within this test's waits did so because nobody had used it.
    let timings = Timings {
        quiesce_after_ms: 600_000,
        ..Timings::fast()
    };
    let c = TestCluster::start(&[1, 2, 3], &[], None, timings).await;
    let shards = spread_shards(6, &[1, 2, 3], |i| i % 3 + 1);
    c.create_shards(&shards).await;
    for d in &shards {
        c.wait_leader(d.id, WAIT).await.unwrap();
    }
    wait_all_asleep(&c, &shards).await;
    // A client uses one shard: its leader wakes and, used now, stays awake
    // (its idle time has not passed); the others sleep on.
    let used = &shards[0];
    let client = c.client();
    client.put(&key_of(used, "used"), b"1").await.unwrap();
    let leader = c.wait_leader(used.id, WAIT).await.unwrap();
    assert!(
        !c.node(leader.0).is_quiescent(used.id),
        "the used shard's leader sleeps right after serving a write"
    );
    for d in &shards[1..] {
        for n in c.up() {
            assert!(n.is_quiescent(d.id), "{} woke on {}", d.id, n.id());
        }
    }
    assert_eq!(
        client.get(&key_of(used, "used")).await.unwrap().as_deref(),
        Some(&b"1"[..])
    );
    c.shutdown().await;
}

/// A replica asleep for `dormant_after_ms` drops its openraft instance
/// (memory: 10,000 idle shards). Whatever needs it rebuilds it from
/// storage: a client write and read reach every dormant shard, its leader
/// comes back as the leader of the same term (no election), the data
/// written before is there, and the groups turn dormant again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dormant_replicas_drop_their_instance_and_come_back_as_they_were() {
    init_tracing();
    let (c, shards) = cluster().await;
    let client = c.client();
    for d in &shards {
        client.put(&key_of(d, "before"), b"0").await.unwrap();
    }
    wait_all_dormant(&c, &shards).await;
    for n in c.up() {
        for d in &shards {
            assert!(
                n.raft(d.id).is_none(),
                "{} keeps its instance on {}",
                d.id,
                n.id()
            );
            assert!(n.is_quiescent(d.id), "a dormant replica is asleep");
        }
    }
    let leaders_before = leaders(&c, &shards);
    let terms_before: Vec<_> = shards.iter().map(|d| terms(&c, d.id)).collect();
    assert!(
        terms_before.iter().all(|t| t.len() == 3),
        "{terms_before:?}"
    );
    for d in &shards {
        client
            .put(&key_of(d, "after"), b"1")
            .await
            .expect("write to a dormant shard");
        assert_eq!(
            client.get(&key_of(d, "before")).await.unwrap().as_deref(),
            Some(&b"0"[..])
        );
        assert_eq!(
            client.get(&key_of(d, "after")).await.unwrap().as_deref(),
            Some(&b"1"[..])
        );
    }
    let revived: u64 = c.up().map(|n| n.metrics().revivals).sum();
    assert!(
        revived >= shards.len() as u64,
        "{revived} dormant replicas rebuilt for {} shards written",
        shards.len()
    );
    assert_eq!(leaders(&c, &shards), leaders_before, "a leader changed");
    let terms_after: Vec<_> = shards.iter().map(|d| terms(&c, d.id)).collect();
    assert_eq!(
        terms_after, terms_before,
        "terms changed: an election happened"
    );
    wait_all_dormant(&c, &shards).await;
    // A leader rebuilt by something other than a request (here the test
    // asks for its group) wakes its group, which settles and sleeps again
    // under the same leader and term: no follower is left awake under a
    // silent leader to elect another.
    let (shard, leader) = leaders_before.iter().next().expect("a shard");
    let i = shards.iter().position(|d| d.id == *shard).expect("listed");
    c.node(leader.0).group(*shard).await.expect("rebuilt");
    wait_all_asleep(&c, &shards).await;
    assert_eq!(
        terms(&c, *shard),
        terms_before[i],
        "{shard} held an election"
    );
    assert!(c.node(leader.0).shards_led().contains(shard));
    for d in &shards {
        assert_eq!(
            client.get(&key_of(d, "after")).await.unwrap().as_deref(),
            Some(&b"1"[..])
        );
    }
    c.shutdown().await;
}

/// openraft 0.10 refuses writes from a leader whose lease lapsed (no
/// quorum acknowledged it for `election_timeout_max`), and every leader
/// that slept longer than that has a lapsed lease. The first write to a
/// woken group must still be taken by its leader, not bounced to the client
/// as `NotLeader` without a hint (the client then backed off and retried:
/// 50–320 ms for the first write to each idle shard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_woken_after_its_lease_lapsed_takes_the_first_write_itself() {
    init_tracing();
    let (c, shards) = cluster().await;
    let client = c.client();
    // Used once, so each group waits its idle time, then sleeps, then
    // (1 s asleep) turns dormant: its leader last heard a quorum over 2 s
    // ago, beyond the 1.2 s lease.
    for d in &shards {
        client.put(&key_of(d, "first"), b"1").await.unwrap();
    }
    wait_all_dormant(&c, &shards).await;
    let led = leaders(&c, &shards);
    for d in &shards {
        let req = Request::Write {
            shard: d.id,
            epoch: d.epoch,
            ops: vec![Op::Put {
                key: key_of(d, "after the lease"),
                value: b"2".to_vec(),
            }],
            session: None,
        };
        match client.call_node(led[&d.id], &req).await.unwrap() {
            Response::Written(r) => assert_eq!(r.len(), 1),
            other => panic!("{}: the woken leader answered {other:?}", d.id),
        }
    }
    for d in &shards {
        let k = key_of(d, "after the lease");
        assert_eq!(client.get(&k).await.unwrap().as_deref(), Some(&b"2"[..]));
    }
    c.shutdown().await;
}
