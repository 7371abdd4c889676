//! RELIABILITY scenario 2, short version: three real `tessera serve`
//! processes (four for the data shards on the batch system, whose run also
//! splits, merges and moves replicas while it kills), clients recording a history of put, get, delete and CAS
//! (four with a client each, four sharing one client, whose requests
//! share each node's multiplexed stream), a
//! random node SIGKILLed and restarted every 2 seconds. The history must be linearizable, every
//! acknowledged write visible at the end, and service back (a write
//! acknowledged) within 10 s of each restart.
//!
//! The run ends with `verify` (every shard's replicas hold the same data).
//!
//! The long version (60 s of kills) runs with
//! `TESSERA_KILL_LOOP_SECS=60 cargo test --test kill_loop -- --nocapture`;
//! `tools/soak.sh SECONDS` runs it for as long as asked.

#[allow(dead_code)]
#[path = "common/linearizability.rs"]
mod lin;

#[allow(dead_code)]
#[path = "common/procs.rs"]
mod procs;

use lin::{check, Kind, Op, Recorder};
use procs::{admin_client, loopback_nodes, start_on_loopback, write_cluster_with};
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera::{NodeId, ShardId};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loop_keeps_histories_linearizable_and_writes_durable() {
    kill_loop(false).await;
}

/// The same with the data shards on the batch system
/// (`raft.batch_data_shards`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loop_on_batch_shards_keeps_histories_linearizable_and_writes_durable() {
    kill_loop(true).await;
}

/// The two loops take turns (each runs three processes; together on two
/// cores they would measure the machine, not the recovery).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A change of the shards' layout the batch run makes while it kills.
#[derive(Debug, Clone, Copy)]
enum Reshape {
    /// Split the shard holding this key at it.
    Split(u8),
    /// Merge the shard starting at this key into its left neighbour (the
    /// client first moves the right shard's replicas onto the left's
    /// nodes when they differ).
    Merge(u8),
    /// Move the replica of the shard starting at this key that leads it
    /// to the one node holding none.
    MoveAway(u8),
    /// Move that replica back where it was.
    MoveBack,
}

/// The batch run's layout changes, in order, on 4 nodes (each initial
/// shard on 3 of them): a split inside each of the 4 initial shards; the
/// first split's child moves a replica away and back (the replica
/// lifecycle's data-loss scenario, now under SIGKILLs) and is merged
/// back; an initial shard merged into a neighbour on other nodes (a
/// replica move first), and one more split merged back.
const RESHAPES: [Reshape; 9] = [
    Reshape::Split(0x20),
    Reshape::MoveAway(0x20),
    Reshape::MoveBack,
    Reshape::Split(0x60),
    Reshape::Merge(0x20),
    Reshape::Split(0xa0),
    Reshape::Merge(0x40),
    Reshape::Split(0xe0),
    Reshape::Merge(0xa0),
];

async fn kill_loop(batch: bool) {
    let _turn = TURN.lock().await;
    let secs: u64 = std::env::var("TESSERA_KILL_LOOP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().unwrap();
    // The batch run has a fourth node, so replicas have somewhere to move.
    let nodes = loopback_nodes(if batch { 4 } else { 3 });
    let (ca, configs) = write_cluster_with(dir.path(), "kill-loop", &nodes, 4, |c| {
        c.raft.batch_data_shards = batch;
        if batch {
            // Logs compacted every few dozen writes: compactions run
            // between the kills and restarts reopen from them.
            c.raft.snapshot_logs_since_last = 20;
            c.raft.snapshot_logs_to_keep = 5;
        }
    });
    let mut procs = start_on_loopback(&nodes, configs);
    // An admin certificate: the run ends with a verify.
    let mk = |deadline: Duration| admin_client(&ca, &nodes, deadline, Duration::from_secs(1));
    // Service is up before the faults start.
    mk(Duration::from_secs(60))
        .put(b"warmup", b"1")
        .await
        .unwrap();

    let rec = Arc::new(Recorder::default());
    // 8 keys per 10 s of run, so no key sees more than ~128 operations.
    // (Two index bytes: a long run needs more than 255 keys.)
    let nkeys = (8 * secs / 10).clamp(8, u64::from(u16::MAX)) as u16;
    let keys: Vec<Vec<u8>> = (0..nkeys)
        .map(|i| {
            let [hi, lo] = i.to_be_bytes();
            vec![lo.wrapping_mul(29), b'k', hi, lo]
        })
        .collect();
    let stop_at = Instant::now() + Duration::from_secs(secs);
    // Workers run until the kill loop is done (its length is at least
    // `secs` and at least MIN_KILLS kills, however slow the machine).
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let per_client = 6 * secs as u32;
    let mut workers = Vec::new();
    // Workers 0-3 have a client each (one request in flight: a stream per
    // request); workers 4-7 share one, so their requests to a node travel
    // together on its multiplexed stream, which the SIGKILLs cut.
    let shared = mk(Duration::from_secs(3));
    for w in 0..8u32 {
        let cl = if w < 4 {
            mk(Duration::from_secs(3))
        } else {
            shared.clone()
        };
        let (rec, keys) = (rec.clone(), keys.clone());
        let running = running.clone();
        workers.push(tokio::spawn(async move {
            let mut seen = std::collections::HashMap::new();
            let mut n = 0u32;
            while running.load(std::sync::atomic::Ordering::Relaxed) && n < per_client {
                n += 1;
                let k = keys[rand::thread_rng().gen_range(0..keys.len())].clone();
                let v = format!("w{w}-{n}").into_bytes();
                rec.random_op(&cl, &k, v, &mut seen).await;
            }
        }));
    }
    // On the batch system, shards also split and merge while nodes are
    // killed: a step every 1.5 s, each tried again after a failure (a kill
    // may cut it short, or a merge be cancelled because a replica was
    // down) until it is done, for at most 60 s.
    let reshaper = batch.then(|| {
        let cl = mk(Duration::from_secs(10));
        let all: Vec<NodeId> = nodes.iter().map(|(id, _)| *id).collect();
        tokio::spawn(async move {
            // The move away's (shard, from, to), for the move back.
            let mut moved: Option<(ShardId, NodeId, NodeId)> = None;
            for step in RESHAPES {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let until = Instant::now() + Duration::from_secs(60);
                // A move's shard and nodes, chosen once (its retries
                // finish the same move).
                let mut pair: Option<(ShardId, NodeId, NodeId)> = None;
                loop {
                    if pair.is_none() {
                        pair = match step {
                            Reshape::MoveAway(k) => cl
                                .routes()
                                .await
                                .unwrap_or_default()
                                .into_iter()
                                .find(|d| d.range.start == [k])
                                .map(|d| {
                                    let to = *all.iter().find(|n| !d.replicas.contains(n)).unwrap();
                                    let from = d.leader_hint.unwrap_or(d.replicas[0]);
                                    (d.id, from, to)
                                }),
                            Reshape::MoveBack => moved.map(|(s, from, to)| (s, to, from)),
                            _ => None,
                        };
                    }
                    let r = match step {
                        Reshape::Split(k) => cl
                            .split(&[k])
                            .await
                            .map(|(l, r)| format!("{} {} | {} {}", l.id, l.range, r.id, r.range))
                            .map_err(|e| e.to_string()),
                        Reshape::Merge(k) => cl
                            .merge(&[k])
                            .await
                            .map(|d| format!("{} {} on {:?}", d.id, d.range, d.replicas))
                            .map_err(|e| e.to_string()),
                        Reshape::MoveAway(_) | Reshape::MoveBack => match pair {
                            Some((shard, from, to)) => cl
                                .move_replica(shard, from, to)
                                .await
                                .map(|d| format!("{shard} {from} -> {to}: on {:?}", d.replicas))
                                .map_err(|e| e.to_string()),
                            None => Err("the shard to move is not listed yet".to_string()),
                        },
                    };
                    let e = match r {
                        Ok(shape) => {
                            println!("{step:?}: {shape}");
                            break;
                        }
                        Err(e) => e,
                    };
                    // Done by an earlier try whose answer was lost?
                    let routes = cl.routes().await.unwrap_or_default();
                    let starts = |k: u8| routes.iter().any(|d| d.range.start == [k]);
                    let done = match step {
                        Reshape::Split(k) => starts(k),
                        Reshape::Merge(k) => !starts(k),
                        Reshape::MoveAway(_) | Reshape::MoveBack => {
                            pair.is_some_and(|(shard, from, to)| {
                                routes.iter().any(|d| {
                                    d.id == shard
                                        && d.replicas.contains(&to)
                                        && !d.replicas.contains(&from)
                                })
                            })
                        }
                    };
                    if done {
                        println!("{step:?}: done by an earlier try ({e})");
                        break;
                    }
                    assert!(Instant::now() < until, "{step:?} not done within 60 s: {e}");
                    println!("{step:?} failed, trying again: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                if matches!(step, Reshape::MoveAway(_)) {
                    moved = pair;
                }
            }
        })
    });
    let probe = mk(Duration::from_secs(10));
    const MIN_KILLS: usize = 3;
    let mut kills = 0;
    // On the batch system the kills go on until the layout changes are
    // done, so every change runs under them.
    let reshaping = || reshaper.as_ref().is_some_and(|t| !t.is_finished());
    while kills < MIN_KILLS || Instant::now() < stop_at || reshaping() {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let victim = rand::thread_rng().gen_range(0..procs.len());
        procs[victim].sigkill();
        procs[victim].start(None);
        kills += 1;
        // Service resumes: a write is acknowledged within 10 s.
        probe
            .put(format!("probe-{kills}").as_bytes(), b"up")
            .await
            .unwrap_or_else(|e| {
                panic!("no write acknowledged within 10 s of restart {kills}: {e}")
            });
    }
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    if let Some(t) = reshaper {
        t.await.unwrap();
    }
    let reader = mk(Duration::from_secs(30));
    for k in &keys {
        let call = rec.now();
        let v = reader.get(k).await.expect("final read");
        rec.push(Op {
            key: k.clone(),
            kind: Kind::Get(v),
            call,
            ret: Some(rec.now()),
        });
    }
    // Counted on the client's side (the nodes' counters die with them).
    let multiplexed = shared.multiplexed();
    assert!(
        multiplexed > 0,
        "no request of the shared client took a multiplexed stream"
    );
    let ops = rec.ops();
    let acked = ops
        .iter()
        .filter(|o| o.ret.is_some() && !matches!(o.kind, Kind::Get(_)))
        .count();
    let failed = ops.iter().filter(|o| o.ret.is_none()).count();
    println!(
        "kill loop: {secs} s, {kills} SIGKILLs, {} operations ({acked} acknowledged writes, {failed} failed or timed out: indeterminate; {multiplexed} requests multiplexed)",
        ops.len()
    );
    assert!(
        kills >= MIN_KILLS && acked > 20,
        "{kills} kills, {acked} acknowledged writes"
    );
    let bad = check(&ops);
    println!(
        "checker: {}",
        if bad.is_empty() {
            "linearizable; every acknowledged write is visible".to_string()
        } else {
            format!("NOT linearizable on keys {bad:?}")
        }
    );
    assert!(bad.is_empty(), "not linearizable on keys {bad:?}");
    // The data shards ran on the system the configuration chose.
    for (id, _) in &nodes {
        let st = reader.node_status(*id).await.expect("node status");
        for s in &st.shards {
            let data = s.descriptor.id != tessera::meta::META_SHARD;
            assert_eq!(s.batch, batch && data, "{id}: {s:?}");
        }
        if batch {
            assert!(
                st.shards
                    .iter()
                    .any(|s| s.batch && s.log_first_index.is_some_and(|f| f > 1)),
                "{id}: no batch shard's log was compacted: {:?}",
                st.shards
            );
        }
    }
    // Every replica of every shard holds the same state after the kills.
    let mut shards = 0;
    for d in reader.routes().await.expect("routes") {
        let v = reader.verify_shard(d.id).await.expect("verify");
        assert!(v.agrees(), "replicas differ after the kills: {v:?}");
        shards += 1;
    }
    println!("verify: every replica of {shards} shards agrees");
    if batch {
        // The 4 initial data shards, split 4 times and merged 3 times (the
        // routes list data shards only): a shard starts at each split key
        // (and initial shard) not merged away, on 3 distinct nodes.
        let routes = reader.routes().await.expect("routes");
        let listed: Vec<String> = routes
            .iter()
            .map(|d| format!("{} {}", d.id, d.range))
            .collect();
        let mut starts: Vec<Vec<u8>> = vec![vec![], vec![0x40], vec![0x80], vec![0xc0]];
        for step in RESHAPES {
            match step {
                Reshape::Split(k) => starts.push(vec![k]),
                Reshape::Merge(k) => starts.retain(|s| *s != [k]),
                Reshape::MoveAway(_) | Reshape::MoveBack => {}
            }
        }
        starts.sort();
        let mut found: Vec<Vec<u8>> = routes.iter().map(|d| d.range.start.clone()).collect();
        found.sort();
        assert_eq!(found, starts, "{listed:?}");
        for d in &routes {
            let nodes: std::collections::BTreeSet<_> = d.replicas.iter().collect();
            assert_eq!(nodes.len(), 3, "{listed:?}");
        }
        assert_eq!(shards, starts.len());
    }
    drop((probe, reader, shared));
}
