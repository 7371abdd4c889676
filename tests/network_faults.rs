//! Faults as a real network and real processes make them (issue 17; the
//! RELIABILITY scenarios on a network): five `tessera serve` processes, each
//! in its own network namespace on one bridge (`common/netns.rs`), 8 clients
//! in the test's namespace recording put, get, delete and CAS. A nemesis
//! goes through every kind of fault, each for a bounded time, in a shuffled
//! order:
//!
//! - partitions: two halves; one way (a node's packets to its peers lost,
//!   theirs to it delivered); a minority cut from a leader; a bridge node
//!   between two sides; a node cut from everyone, clients included;
//! - packet loss, duplication, delay with reordering (every host's packets);
//! - SIGKILL and restart; a restart on a slow disk and on a failing disk
//!   (failpoints on the group commit's sync: the failing one fail-stops the
//!   node's storage, which is then killed and restarted clean);
//!
//! while splits, replica moves and leader transfers run during the faults
//! (the data shards on the batch system, the default;
//! `TESSERA_OPENRAFT_DATA_SHARDS=1` runs them on openraft).
//!
//! After the faults are healed: service is back (a write acknowledged), the
//! history is linearizable with every acknowledged write visible, and every
//! replica of every shard holds the same data (`verify`).
//!
//! The suite runs one round of every fault (about a minute);
//! `TESSERA_SOAK_SECS=600` runs rounds for that long (`tools/soak.sh`).

#[allow(dead_code)]
#[path = "common/linearizability.rs"]
mod lin;
#[allow(dead_code)]
#[path = "common/netns.rs"]
mod netns;
#[allow(dead_code)]
#[path = "common/procs.rs"]
mod procs;
#[allow(dead_code)]
#[path = "common/wait.rs"]
mod wait;

use lin::{check, Kind, Op, Recorder};
use netns::{Fault, Lab, CLIENTS};
use procs::{admin_client, write_cluster, Proc};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessera::{Client, NodeId};

const NODES: usize = 5;
const PORT: u16 = 7000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Nemesis {
    PartitionHalves,
    PartitionOneWay,
    MinorityFromLeader,
    BridgeNode,
    IsolatedFromAll,
    Loss,
    Duplicate,
    DelayReorder,
    Kill9,
    SlowDisk,
    FailingDisk,
}

const EVERY_FAULT: [Nemesis; 11] = [
    Nemesis::PartitionHalves,
    Nemesis::PartitionOneWay,
    Nemesis::MinorityFromLeader,
    Nemesis::BridgeNode,
    Nemesis::IsolatedFromAll,
    Nemesis::Loss,
    Nemesis::Duplicate,
    Nemesis::DelayReorder,
    Nemesis::Kill9,
    Nemesis::SlowDisk,
    Nemesis::FailingDisk,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Admin {
    Split,
    Move,
    TransferLeader,
}

/// Both directions between every host of `a` and every host of `b`.
fn cut(a: &[usize], b: &[usize]) -> Vec<(usize, usize)> {
    let mut pairs = Vec::new();
    for &x in a {
        for &y in b {
            pairs.push((x, y));
            pairs.push((y, x));
        }
    }
    pairs
}

/// The cluster under test.
struct Cluster {
    procs: Vec<Proc>,
}

impl Cluster {
    fn proc(&mut self, host: usize) -> &mut Proc {
        &mut self.procs[host - 1]
    }
}

/// The node most shards name as their leader (or a random one).
async fn some_leader(client: &Client) -> usize {
    let routes = tokio::time::timeout(Duration::from_secs(3), client.routes()).await;
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    if let Ok(Ok(routes)) = routes {
        for d in routes {
            if let Some(l) = d.leader_hint {
                *counts.entry(l.0).or_default() += 1;
            }
        }
    }
    match counts.into_iter().max_by_key(|(_, n)| *n) {
        Some((id, _)) => id as usize,
        None => rand::thread_rng().gen_range(1..=NODES),
    }
}

/// Puts one fault in force; returns what healing it needs beyond the
/// network's heal (the node to restart clean, if any) and what was done.
async fn inflict(
    kind: Nemesis,
    lab: &mut Lab,
    cluster: &mut Cluster,
    probe: &Client,
) -> (Option<usize>, String) {
    let mut nodes: Vec<usize> = (1..=NODES).collect();
    nodes.shuffle(&mut rand::thread_rng());
    let everyone: Vec<usize> = (0..=NODES).collect();
    let fault = match kind {
        Nemesis::PartitionHalves => Fault::Drop(cut(&nodes[..2], &nodes[2..])),
        Nemesis::PartitionOneWay => {
            Fault::Drop(nodes[1..].iter().map(|&y| (nodes[0], y)).collect())
        }
        Nemesis::MinorityFromLeader => {
            let leader = some_leader(probe).await;
            let others: Vec<usize> = nodes.iter().copied().filter(|&n| n != leader).collect();
            let size = rand::thread_rng().gen_range(1..=2);
            Fault::Drop(cut(&[leader], &others[..size]))
        }
        Nemesis::BridgeNode => Fault::Drop(cut(&nodes[1..3], &nodes[3..5])),
        Nemesis::IsolatedFromAll => {
            let x = nodes[0];
            let rest: Vec<usize> = everyone.into_iter().filter(|&h| h != x).collect();
            Fault::Drop(cut(&[x], &rest))
        }
        Nemesis::Loss => Fault::Loss(15),
        Nemesis::Duplicate => Fault::Duplicate(10),
        Nemesis::DelayReorder => Fault::Delay {
            ms: 30,
            jitter_ms: 40,
        },
        Nemesis::Kill9 | Nemesis::SlowDisk | Nemesis::FailingDisk => {
            let failpoints = match kind {
                Nemesis::SlowDisk => Some("log_writer::sync=sleep(40)"),
                Nemesis::FailingDisk => Some("log_writer::sync=20%return"),
                _ => None,
            };
            let p = cluster.proc(nodes[0]);
            p.sigkill();
            if failpoints.is_some() {
                p.start(failpoints);
            }
            return (
                Some(nodes[0]),
                format!("{kind:?} n{} {failpoints:?}", nodes[0]),
            );
        }
    };
    lab.apply(&fault);
    (None, format!("{kind:?} {fault:?}"))
}

/// One admin command against the cluster as it is now; what it did, or
/// why it failed.
async fn admin(kind: Admin, client: &Client) -> Result<String, String> {
    let mut rng = rand::rngs::StdRng::from_entropy();
    let routes = client.routes().await.map_err(|e| e.to_string())?;
    let d = routes.choose(&mut rng).cloned().ok_or("no routes")?;
    match kind {
        Admin::Split => {
            let key = [rng.gen::<u8>(), b'k', rng.gen::<u8>()];
            let what = format!("split at {key:?}");
            client
                .split(&key)
                .await
                .map_err(|e| format!("{what}: {e}"))?;
            Ok(what)
        }
        Admin::Move => {
            let from = *d.replicas.choose(&mut rng).ok_or("no replicas")?;
            let spare: Vec<NodeId> = (1..=NODES as u64)
                .map(NodeId)
                .filter(|n| !d.replicas.contains(n))
                .collect();
            let to = *spare.choose(&mut rng).ok_or("no spare node")?;
            let what = format!("move {} {:?} {from} -> {to}", d.id, d.range);
            client
                .move_replica(d.id, from, to)
                .await
                .map_err(|e| format!("{what}: {e}"))?;
            Ok(what)
        }
        Admin::TransferLeader => {
            let to = *d.replicas.choose(&mut rng).ok_or("no replicas")?;
            let what = format!("transfer {} {:?} to {to}", d.id, d.range);
            client
                .transfer_leader(d.id, to)
                .await
                .map_err(|e| format!("{what}: {e}"))?;
            Ok(what)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_in_namespaces_stay_linearizable_under_every_network_and_process_fault() {
    let soak_secs: Option<u64> = std::env::var("TESSERA_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok());
    // Made before the processes (so dropped after them).
    let mut lab = Lab::create(NODES);
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<(NodeId, SocketAddr)> = (1..=NODES)
        .map(|i| (NodeId(i as u64), lab.addr(i, PORT)))
        .collect();
    let (ca, configs) = write_cluster(dir.path(), "network-faults", &nodes, 8);
    let mut cluster = Cluster {
        procs: nodes
            .iter()
            .zip(configs)
            .enumerate()
            .map(|(i, ((id, _), config))| Proc::new(*id, config, Some(netns::netns(i + 1))))
            .collect(),
    };
    for p in &mut cluster.procs {
        p.start(None);
    }
    let mk = |deadline: Duration, attempt: Duration| admin_client(&ca, &nodes, deadline, attempt);
    mk(Duration::from_secs(60), Duration::from_secs(2))
        .put(b"warmup", b"1")
        .await
        .expect("service up before the faults (60 s)");

    let started = Instant::now();
    let run_for = Duration::from_secs(soak_secs.unwrap_or(0));
    // Keys: the n-th operation goes to one of 8 keys of group n / 300, so a
    // key sees about 40 operations (the checker takes at most 128 per key)
    // however fast the run goes.
    let key = |i: u64| -> Vec<u8> {
        let [hi, lo] = (i as u16).to_be_bytes();
        vec![lo.wrapping_mul(29), b'k', hi, lo]
    };
    let client_deadline = Duration::from_millis(
        std::env::var("TESSERA_SOAK_CLIENT_DEADLINE_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(12_000),
    );
    let issued = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let rec = Arc::new(Recorder::default());
    // The timeline's zero on the wall clock, to read node logs against it.
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    eprintln!(
        "timeline zero is unix {} ms",
        unix_ms - u128::from(rec.now() / 1_000_000)
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..8u32 {
        let (rec, issued, stop) = (rec.clone(), issued.clone(), stop.clone());
        // A deadline longer than a fault (at most 5 s) and the election
        // after it: few indeterminate operations, which keeps the checker's
        // search small. `TESSERA_SOAK_CLIENT_DEADLINE_MS` shortens it (more
        // operations given up mid-fault and left in flight).
        let cl = mk(client_deadline, Duration::from_secs(1));
        workers.push(tokio::spawn(async move {
            let mut seen = std::collections::HashMap::new();
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                n += 1;
                let op = issued.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                let k = key(op / 300 * 8 + rand::thread_rng().gen_range(0..8));
                let v = format!("w{w}-{n}").into_bytes();
                rec.random_op(&cl, &k, v, &mut seen).await;
            }
        }));
    }

    let probe = mk(Duration::from_secs(30), Duration::from_secs(2));
    let admin_client = Arc::new(mk(Duration::from_secs(20), Duration::from_secs(2)));
    let admin_log: Arc<Mutex<BTreeMap<(Admin, bool), u64>>> = Default::default();
    let mut admin_task: Option<tokio::task::JoinHandle<()>> = None;
    let mut faults: BTreeMap<Nemesis, u64> = BTreeMap::new();
    let mut rounds = 0;
    let mut combined = 0;
    let events: Arc<Mutex<Vec<(u64, String)>>> = Default::default();
    let note = {
        let (rec, events) = (rec.clone(), events.clone());
        move |what: String| events.lock().unwrap().push((rec.now(), what))
    };
    // Whole rounds of every fault, until the run's time is up.
    while rounds == 0 || started.elapsed() < run_for {
        rounds += 1;
        // Every fault alone, then three pairs of a network fault and a
        // process fault at once, in a shuffled order.
        let mut steps: Vec<Vec<Nemesis>> = EVERY_FAULT.iter().map(|k| vec![*k]).collect();
        for _ in 0..3 {
            let mut rng = rand::thread_rng();
            let (net, process) = EVERY_FAULT.split_at(8);
            steps.push(vec![
                *net.choose(&mut rng).unwrap(),
                *process.choose(&mut rng).unwrap(),
            ]);
        }
        steps.shuffle(&mut rand::thread_rng());
        for step in steps {
            let (hold, admin_kind) = {
                let mut rng = rand::thread_rng();
                let hold = match soak_secs {
                    Some(_) => rng.gen_range(2_000..5_000),
                    None => 2_500,
                };
                let admin_kind =
                    [Admin::Split, Admin::Move, Admin::TransferLeader][rng.gen_range(0..3)];
                (hold, admin_kind)
            };
            let mut restart = Vec::new();
            for &kind in &step {
                let (r, what) = inflict(kind, &mut lab, &mut cluster, &probe).await;
                note(what);
                restart.extend(r);
                *faults.entry(kind).or_default() += 1;
            }
            if step.len() > 1 {
                combined += 1;
            }
            // An admin command during the fault, one at a time.
            if admin_task.as_ref().is_none_or(|t| t.is_finished()) {
                let (c, log, note) = (admin_client.clone(), admin_log.clone(), note.clone());
                admin_task = Some(tokio::spawn(async move {
                    note(format!("admin {admin_kind:?} starts"));
                    let r = admin(admin_kind, &c).await;
                    note(format!("admin {admin_kind:?}: {r:?}"));
                    *log.lock()
                        .unwrap()
                        .entry((admin_kind, r.is_ok()))
                        .or_default() += 1;
                }));
            }
            tokio::time::sleep(Duration::from_millis(hold)).await;
            lab.heal();
            note("heal".into());
            for host in restart {
                let p = cluster.proc(host);
                p.sigkill();
                p.start(None);
                note(format!("n{host} restarted clean"));
            }
            // Service is back after every heal.
            probe
                .put(format!("probe-{rounds}").as_bytes(), b"up")
                .await
                .unwrap_or_else(|e| {
                    panic!("no write acknowledged within 30 s of healing {step:?}: {e}")
                });
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    for w in workers {
        w.await.unwrap();
    }
    if let Some(t) = admin_task {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();

    let reader = mk(Duration::from_secs(60), Duration::from_secs(2));
    let groups = issued.load(std::sync::atomic::Ordering::Acquire) / 300 + 1;
    assert!(
        groups * 8 <= u64::from(u16::MAX),
        "key space of the run exhausted"
    );
    let keys: Vec<Vec<u8>> = (0..groups * 8).map(key).collect();
    for k in &keys {
        let call = rec.now();
        let v = match reader.get(k).await {
            Ok(v) => v,
            Err(e) => {
                // Service did not come back for this key: say where it was.
                let routes = reader.routes().await;
                let mut status = Vec::new();
                for (id, _) in &nodes {
                    status.push((*id, reader.node_status(*id).await));
                }
                lin::report(&rec.ops(), std::slice::from_ref(k), &events.lock().unwrap());
                for (t, what) in events.lock().unwrap().iter() {
                    eprintln!("timeline {:.1} {what}", *t as f64 / 1e6);
                }
                panic!("final read of {k:?} failed: {e}\nroutes: {routes:?}\nnodes: {status:#?}");
            }
        };
        rec.push(Op {
            key: k.clone(),
            kind: Kind::Get(v),
            call,
            ret: Some(rec.now()),
        });
    }
    let ops = rec.ops();
    let acked = ops
        .iter()
        .filter(|o| o.ret.is_some() && !matches!(o.kind, Kind::Get(_)))
        .count();
    let failed = ops.iter().filter(|o| o.ret.is_none()).count();
    println!(
        "network faults: {} s, {NODES} nodes in namespaces, {rounds} rounds, {} operations ({acked} acknowledged writes, {failed} failed or timed out: indeterminate)",
        elapsed.as_secs(),
        ops.len()
    );
    println!("faults: {faults:?}, {combined} of them as pairs of a network and a process fault");
    println!("admin: (kind, succeeded): {:?}", admin_log.lock().unwrap());
    println!("client errors: {:?}", rec.errors());
    assert!(
        EVERY_FAULT.iter().all(|k| faults.contains_key(k)),
        "every kind of fault was made: {faults:?}"
    );
    assert!(acked > 50, "{acked} acknowledged writes");
    let bad = check(&ops);
    println!(
        "checker: {}",
        if bad.is_empty() {
            "linearizable; every acknowledged write is visible".to_string()
        } else {
            format!("NOT linearizable on keys {bad:?}")
        }
    );
    lin::report(&ops, &bad, &events.lock().unwrap());
    if !bad.is_empty() {
        for (t, what) in events.lock().unwrap().iter() {
            eprintln!("timeline {:.1} {what}", *t as f64 / 1e6);
        }
        // Where the keys live now (the shards, their replicas and epochs).
        if let Ok(routes) = reader.routes().await {
            for k in &bad {
                let d = routes.iter().find(|d| d.range.contains(k));
                eprintln!("{k:?} is in {d:?}");
            }
        }
    }
    assert!(bad.is_empty(), "not linearizable on keys {bad:?}");
    let shards = verify_all(&reader).await;
    println!("verify: every replica of {shards} shards agrees");
    // The data shards ran on the system asked for (a split's child and a
    // moved replica keep it).
    let batch = procs::batch_data_shards();
    for d in reader.routes().await.expect("routes") {
        for n in &d.replicas {
            let st = reader.node_status(*n).await.expect("node status");
            let s = st.shards.iter().find(|s| s.descriptor.id == d.id);
            assert!(
                s.is_some_and(|s| s.batch == batch),
                "{} on {n}: {s:?}",
                d.id
            );
        }
    }
    drop((probe, reader, admin_client));
}

/// `verify` over every shard: each must agree within 60 s (a replica that
/// was just restarted may still be catching up). Returns the shard count.
async fn verify_all(client: &Client) -> usize {
    let routes = client.routes().await.expect("routes");
    for d in &routes {
        let what = format!("every replica of {} agrees under verify", d.id);
        wait::until(&what, Duration::from_secs(60), || async {
            match client.verify_shard(d.id).await {
                Ok(v) if v.agrees() => Ok(()),
                Ok(v) => Err(format!("{v:?}")),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
        .unwrap_or_else(|e| panic!("replicas differ after the faults: {e}"));
    }
    routes.len()
}

/// What `n` datagrams sent 1 ms apart from host `from` to host `to` became:
/// (sequence number, one-way delay) of each one received, in arrival order.
fn datagrams(from: usize, to: usize, n: u32) -> Vec<(u32, Duration)> {
    let sent: Arc<Mutex<Vec<Instant>>> = Default::default();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = {
        let sent = sent.clone();
        netns::in_host(to, move || {
            let sock = std::net::UdpSocket::bind((netns::ip(to), 9100)).expect("bind");
            sock.set_read_timeout(Some(Duration::from_millis(800)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 16];
            while let Ok(len) = sock.recv(&mut buf) {
                let at = Instant::now();
                assert_eq!(len, 4);
                let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
                got.push((seq, at - sent.lock().unwrap()[seq as usize]));
            }
            got
        })
    };
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("receiver bound");
    netns::in_host(from, move || {
        let sock = std::net::UdpSocket::bind((netns::ip(from), 0)).expect("bind");
        for seq in 0..n {
            sent.lock().unwrap().push(Instant::now());
            sock.send_to(&seq.to_be_bytes(), (netns::ip(to), 9100))
                .expect("send");
            std::thread::sleep(Duration::from_millis(1));
        }
    })
    .join()
    .unwrap();
    receiver.join().unwrap()
}

/// The lab's faults act on real packets in the kernel: each one checked
/// with plain UDP between two namespaces (and the test's own).
#[test]
fn the_labs_faults_act_on_real_packets() {
    let mut lab = Lab::create(2);
    let n = 200;
    let plain = datagrams(2, 1, n);
    assert_eq!(plain.len(), n as usize, "no fault: every datagram arrives");

    lab.apply(&Fault::Drop(vec![(2, 1)]));
    assert!(datagrams(2, 1, n).is_empty(), "2 -> 1 dropped");
    assert_eq!(datagrams(1, 2, n).len(), n as usize, "1 -> 2 still flows");
    lab.heal();

    lab.apply(&Fault::Drop(vec![(CLIENTS, 1)]));
    assert!(datagrams(CLIENTS, 1, n).is_empty(), "clients -> 1 dropped");
    lab.heal();
    lab.apply(&Fault::Drop(vec![(1, CLIENTS)]));
    assert!(datagrams(1, CLIENTS, n).is_empty(), "1 -> clients dropped");
    lab.heal();

    lab.apply(&Fault::Loss(50));
    let lossy = datagrams(2, 1, n).len();
    assert!(lossy > 0 && lossy < n as usize, "50% loss: {lossy} of {n}");
    lab.heal();

    lab.apply(&Fault::Duplicate(50));
    let dup = datagrams(2, 1, n).len();
    assert!(dup > n as usize, "50% duplication: {dup} for {n}");
    lab.heal();

    lab.apply(&Fault::Delay {
        ms: 30,
        jitter_ms: 40,
    });
    let delayed = datagrams(2, 1, n);
    lab.heal();
    assert_eq!(delayed.len(), n as usize, "delay loses nothing");
    assert!(
        delayed.iter().all(|(_, d)| *d >= Duration::from_millis(30)),
        "every datagram held at least 30 ms"
    );
    assert!(
        delayed.windows(2).any(|w| w[1].0 < w[0].0),
        "a 40 ms jitter on datagrams 1 ms apart reorders them"
    );
    assert_eq!(datagrams(2, 1, n).len(), n as usize, "healed");
}
