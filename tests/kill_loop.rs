//! RELIABILITY scenario 2, short version: three real `tessera serve`
//! processes, clients recording a history of put, get, delete and CAS, a
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

use lin::{check, Kind, Op, Recorder};
use rand::Rng;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera::client::ClientOptions;
use tessera::net::PeerAddr;
use tessera::node::{Bootstrap, NodeConfig, RaftTimings};
use tessera::tls::issue::{write_pem, ClusterCa};
use tessera::tls::TlsFiles;
use tessera::{Client, NodeId};

struct Proc {
    config: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Starts `tessera serve` and waits (bounded) for its `serving` line.
    fn start(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tessera serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("tessera serve printed no `serving` line within 30 s");
        assert!(line.starts_with("serving"), "{line}");
        self.child = Some(child);
    }

    fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.sigkill();
    }
}

fn pick_addr() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Certificates and one config per node under `dir`.
fn write_cluster(dir: &Path) -> (ClusterCa, Vec<(NodeId, SocketAddr)>, Vec<PathBuf>) {
    let ca = ClusterCa::generate("kill-loop").unwrap();
    write_pem(&dir.join("ca.pem"), &ca.cert_pem(), false).unwrap();
    let ids: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let addrs: BTreeMap<NodeId, SocketAddr> = ids.iter().map(|i| (*i, pick_addr())).collect();
    let mut configs = Vec::new();
    for id in &ids {
        let issued = ca.issue_node(*id).unwrap();
        write_pem(&dir.join(format!("n{}.pem", id.0)), &issued.cert_pem, false).unwrap();
        write_pem(
            &dir.join(format!("n{}-key.pem", id.0)),
            &issued.key_pem,
            true,
        )
        .unwrap();
        let cfg = NodeConfig {
            node_id: *id,
            listen_addr: addrs[id],
            data_dir: PathBuf::from(format!("n{}", id.0)),
            metrics_addr: None,
            tls: TlsFiles {
                ca_cert: "ca.pem".into(),
                cert: format!("n{}.pem", id.0).into(),
                key: format!("n{}-key.pem", id.0).into(),
            },
            peers: ids
                .iter()
                .filter(|p| *p != id)
                .map(|p| PeerAddr {
                    id: *p,
                    addr: addrs[p],
                })
                .collect(),
            raft: RaftTimings {
                heartbeat_interval_ms: 100,
                election_timeout_ms_min: 600,
                election_timeout_ms_max: 1200,
                ..Default::default()
            },
            transport: tessera::net::TransportConfig {
                heartbeat_linger_ms: 20,
                ..Default::default()
            },
            storage: Default::default(),
            bootstrap: Some(Bootstrap {
                shards: 4,
                members: ids.clone(),
            }),
            split: Default::default(),
            replica_gc: Default::default(),
            api: Default::default(),
        };
        let path = dir.join(format!("n{}.toml", id.0));
        std::fs::write(&path, cfg.to_toml()).unwrap();
        configs.push(path);
    }
    (ca, addrs.into_iter().collect(), configs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loop_keeps_histories_linearizable_and_writes_durable() {
    let secs: u64 = std::env::var("TESSERA_KILL_LOOP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().unwrap();
    let (ca, nodes, configs) = write_cluster(dir.path());
    let mut procs: Vec<Proc> = configs
        .into_iter()
        .map(|config| Proc {
            config,
            child: None,
        })
        .collect();
    for p in &mut procs {
        p.start();
    }
    // An admin certificate: the run ends with a verify.
    let issued = ca.issue_admin("kill-loop").unwrap();
    let mk = |deadline: Duration| {
        Client::from_identity(
            &ca.identity(&issued),
            nodes.clone(),
            ClientOptions {
                deadline,
                attempt_timeout: Duration::from_secs(1),
                ..Default::default()
            },
        )
        .unwrap()
    };
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
    let per_client = 6 * secs as u32;
    let mut workers = Vec::new();
    for w in 0..8u32 {
        let (rec, keys, cl) = (rec.clone(), keys.clone(), mk(Duration::from_secs(3)));
        workers.push(tokio::spawn(async move {
            let mut seen = std::collections::HashMap::new();
            let mut n = 0u32;
            while Instant::now() < stop_at && n < per_client {
                n += 1;
                let k = keys[rand::thread_rng().gen_range(0..keys.len())].clone();
                let v = format!("w{w}-{n}").into_bytes();
                rec.random_op(&cl, &k, v, &mut seen).await;
            }
        }));
    }
    let probe = mk(Duration::from_secs(10));
    let mut kills = 0;
    while Instant::now() < stop_at {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let victim = rand::thread_rng().gen_range(0..procs.len());
        procs[victim].sigkill();
        procs[victim].start();
        kills += 1;
        // Service resumes: a write is acknowledged within 10 s.
        probe
            .put(format!("probe-{kills}").as_bytes(), b"up")
            .await
            .unwrap_or_else(|e| {
                panic!("no write acknowledged within 10 s of restart {kills}: {e}")
            });
    }
    for w in workers {
        w.await.unwrap();
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
    let ops = rec.ops();
    let acked = ops
        .iter()
        .filter(|o| o.ret.is_some() && !matches!(o.kind, Kind::Get(_)))
        .count();
    let failed = ops.iter().filter(|o| o.ret.is_none()).count();
    println!(
        "kill loop: {secs} s, {kills} SIGKILLs, {} operations ({acked} acknowledged writes, {failed} failed or timed out: indeterminate)",
        ops.len()
    );
    assert!(
        kills >= 3 && acked > 20,
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
    // Every replica of every shard holds the same state after the kills.
    let mut shards = 0;
    for d in reader.routes().await.expect("routes") {
        let v = reader.verify_shard(d.id).await.expect("verify");
        assert!(v.agrees(), "replicas differ after the kills: {v:?}");
        shards += 1;
    }
    println!("verify: every replica of {shards} shards agrees");
    drop((probe, reader));
}
