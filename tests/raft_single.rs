//! Real openraft groups on the RocksDB stores: several single-replica shards
//! commit writes, build snapshots and purge their logs, then restart from
//! disk with every acknowledged write intact.

mod common;

use common::*;
use openraft::async_runtime::watch::WatchReceiver as _;
use openraft::{BasicNode, Config, SnapshotPolicy};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tessera::command::{Command, CommandResponse, Op, OpResult};
use tessera::node::ShardRaft as Raft;
use tessera::raft::NoNetwork;
use tessera::storage::Engine;
use tessera::{NodeId, ShardId};

const SHARDS: u64 = 4;
const WRITES: u64 = 120;

fn config() -> Arc<Config> {
    Arc::new(
        Config {
            heartbeat_interval: 100,
            election_timeout_min: 300,
            election_timeout_max: 600,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(25),
            max_in_snapshot_log_to_keep: 5,
            purge_batch_size: 1,
            ..Default::default()
        }
        .validate()
        .unwrap(),
    )
}

async fn start(engine: &Engine, shard: u64) -> Raft {
    let (log, sm) = engine.open_shard(ShardId(shard)).unwrap();
    let raft = Raft::new(NodeId(1), config(), NoNetwork, log, sm)
        .await
        .unwrap();
    if !raft.is_initialized().await.unwrap() {
        raft.initialize(BTreeMap::from([(NodeId(1), BasicNode::new("local"))]))
            .await
            .unwrap();
    }
    raft.wait(Some(Duration::from_secs(10)))
        .current_leader(NodeId(1), "wait_leader: single replica elects itself")
        .await
        .unwrap();
    raft
}

fn key(shard: u64, i: u64) -> Vec<u8> {
    format!("r{shard}/{i:05}").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_commit_snapshot_purge_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_engine(dir.path());
    let mut groups = Vec::new();
    for s in 1..=SHARDS {
        engine
            .create_shard(&prefix_shard(s, format!("r{s}/").as_bytes()))
            .await
            .unwrap();
        groups.push(start(&engine, s).await);
    }

    eprintln!("--- writes, overwrites and compare-and-swap through raft");
    for (s, raft) in (1..=SHARDS).zip(&groups) {
        for i in 0..WRITES {
            // Swaps answer the value they replaced; plain puts do not read it.
            let (op, prev) = if i % 2 == 0 {
                let op = Op::Swap {
                    key: key(s, i % 40),
                    value: format!("v{i}").into_bytes(),
                };
                (op, (i >= 40).then(|| format!("v{}", i - 40).into_bytes()))
            } else {
                (
                    Op::Put {
                        key: key(s, i % 40),
                        value: format!("v{i}").into_bytes(),
                    },
                    None,
                )
            };
            let r = raft
                .client_write(Command::Write { ops: vec![op] })
                .await
                .unwrap();
            assert_eq!(r.data, CommandResponse::Write(vec![OpResult::Put { prev }]));
        }
        let cas = |expected: &str, new: &str| Command::Write {
            ops: vec![Op::Cas {
                key: key(s, 0),
                expected: Some(expected.into()),
                new: Some(new.into()),
            }],
        };
        let ok = raft.client_write(cas("v80", "swapped")).await.unwrap();
        assert_eq!(
            ok.data,
            CommandResponse::Write(vec![OpResult::Cas {
                succeeded: true,
                current: Some(b"v80".to_vec())
            }])
        );
        let no = raft.client_write(cas("v80", "again")).await.unwrap();
        assert_eq!(
            no.data,
            CommandResponse::Write(vec![OpResult::Cas {
                succeeded: false,
                current: Some(b"swapped".to_vec())
            }])
        );
        let outside = raft
            .client_write(Command::put("elsewhere", "x"))
            .await
            .unwrap();
        assert_eq!(
            outside.data,
            CommandResponse::KeyNotInRange {
                key: b"elsewhere".to_vec()
            }
        );
    }

    eprintln!("--- wait_snapshot: every group snapshots and purges");
    for raft in &groups {
        raft.wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.purged.is_some_and(|p| p.index >= 50),
                "wait_purged: log purged behind a snapshot",
            )
            .await
            .unwrap();
    }
    let applied: Vec<_> = groups
        .iter()
        .map(|r| r.metrics().borrow_watched().last_applied)
        .collect();

    eprintln!("--- restart everything from disk");
    for raft in groups.drain(..) {
        raft.shutdown().await.unwrap();
    }
    engine
        .close(Duration::from_secs(10))
        .await
        .expect("wait_closed: every store released");
    let engine = open_engine(dir.path());
    for s in 1..=SHARDS {
        groups.push(start(&engine, s).await);
    }
    for ((s, raft), before) in (1..=SHARDS).zip(&groups).zip(applied) {
        raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex)
            .await
            .unwrap();
        let now = raft.metrics().borrow_watched().last_applied;
        assert!(
            now >= before,
            "shard {s}: applied went back from {before:?} to {now:?}"
        );
        assert_eq!(engine.get(&key(s, 0)).unwrap(), Some(b"swapped".to_vec()));
        for i in 1..40 {
            assert_eq!(
                engine.get(&key(s, i)).unwrap(),
                Some(format!("v{}", 80 + i).into_bytes()),
                "shard {s} key {i}"
            );
        }
        let r = raft.client_write(Command::delete(key(s, 1))).await.unwrap();
        assert_eq!(
            r.data,
            CommandResponse::Write(vec![OpResult::Delete {
                prev: Some(b"v81".to_vec())
            }])
        );
        assert_eq!(engine.get(&key(s, 1)).unwrap(), None);
    }
    for raft in groups {
        raft.shutdown().await.unwrap();
    }
}
