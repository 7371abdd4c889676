//! The batch system applying to the product's state machine
//! (`multiraft::ShardApplier`): a proposal's answer is what the state
//! machine answered, the data lands in the shared data column family, and a
//! restarted node resumes from its applied position instead of applying
//! anything twice, and one round's client writes to many groups take one
//! state machine write.

#[path = "common/multiraft.rs"]
mod harness;

use harness::apply::{descriptor, key, shard_appliers, Starts};
use harness::loops::LoopCluster;
use raft::eraftpb::Entry;
use std::collections::BTreeMap;
use std::time::Duration;
use tessera::command::{Command, CommandResponse, Op, OpResult};
use tessera::digest::{DigestStatus, ShardDigest};
use tessera::multiraft::{encode_command, Applier, LoopConfig, ShardApplier};
use tessera::storage::{Engine, StorageConfig};
use tessera::ShardId;

const GROUPS: u64 = 4;
const DEADLINE: Duration = Duration::from_secs(20);

fn fast() -> LoopConfig {
    LoopConfig {
        tick: Duration::from_millis(10),
        ..LoopConfig::default()
    }
}

async fn write(c: &LoopCluster<CommandResponse>, g: u64, op: Op) -> CommandResponse {
    let data = encode_command(&Command::Write { ops: vec![op] });
    c.router
        .propose(&c.loops, ShardId(g), &data, DEADLINE)
        .await
        .unwrap_or_else(|e| panic!("write to {g}: {e}"))
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_come_from_the_state_machine_and_data_lands_in_rocksdb() {
    let c = LoopCluster::start_with(3, GROUPS, fast(), shard_appliers(GROUPS, Starts::default()));
    for g in 1..=GROUPS {
        let put = Op::Put {
            key: key(g, "k"),
            value: b"one".to_vec(),
        };
        assert_eq!(
            write(&c, g, put).await,
            CommandResponse::Write(vec![OpResult::Put { prev: None }])
        );
        let swap = Op::Swap {
            key: key(g, "k"),
            value: b"two".to_vec(),
        };
        assert_eq!(
            write(&c, g, swap).await,
            CommandResponse::Write(vec![OpResult::Put {
                prev: Some(b"one".to_vec())
            }]),
            "a swap answers the value it replaced"
        );
        let outside = Op::Put {
            key: key(g + 1, "k"),
            value: b"x".to_vec(),
        };
        assert_eq!(
            write(&c, g, outside).await,
            CommandResponse::KeyNotInRange {
                key: key(g + 1, "k")
            },
            "the shard's range is checked at apply"
        );
    }
    for g in 1..=GROUPS {
        let (node, _) = c
            .read_index(ShardId(g), DEADLINE)
            .await
            .expect("read point");
        let value = c.engines[&node].get(&key(g, "k")).expect("get");
        assert_eq!(value, Some(b"two".to_vec()), "{g} on node {node}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_resumes_from_its_applied_position() {
    let starts = Starts::default();
    let mut c = LoopCluster::start_with(3, GROUPS, fast(), shard_appliers(GROUPS, starts.clone()));
    let mut put_at = BTreeMap::new();
    for g in 1..=GROUPS {
        let put = Op::Put {
            key: key(g, "n"),
            value: b"1".to_vec(),
        };
        let data = encode_command(&Command::Write { ops: vec![put] });
        let (index, _) = c
            .router
            .propose(&c.loops, ShardId(g), &data, DEADLINE)
            .await
            .expect("put");
        put_at.insert(g, index);
    }
    // Every node applied the puts (a read point at each group's leader, and
    // the followers catch up with the next heartbeats).
    for g in 1..=GROUPS {
        c.read_index(ShardId(g), DEADLINE)
            .await
            .expect("read point");
    }
    // Node 2 has applied each put before it stops.
    for g in 1..=GROUPS {
        let until = tokio::time::Instant::now() + DEADLINE;
        while c.engines[&2].get(&key(g, "n")).expect("get").is_none() {
            assert!(
                tokio::time::Instant::now() < until,
                "node 2 never applied group {g}'s put"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    c.stop(2);
    c.restart(2);
    for g in 1..=GROUPS {
        let from = starts.lock().unwrap()[&(2, g)];
        assert!(
            from >= put_at[&g],
            "group {g} restarted applying from {from}, before its put at {}",
            put_at[&g]
        );
    }
    // The restarted node's state machines say where they stopped, and its
    // groups start there: a compare-and-swap from "1" to "2" succeeds once,
    // and no replay of the old put can undo it on node 2.
    for g in 1..=GROUPS {
        let cas = Op::Cas {
            key: key(g, "n"),
            expected: Some(b"1".to_vec()),
            new: Some(b"2".to_vec()),
        };
        assert_eq!(
            write(&c, g, cas).await,
            CommandResponse::Write(vec![OpResult::Cas {
                succeeded: true,
                current: Some(b"1".to_vec())
            }])
        );
    }
    for g in 1..=GROUPS {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let v = c.engines[&2].get(&key(g, "n")).expect("get");
            if v.as_deref() == Some(&b"2"[..]) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "node 2 did not apply the swap of group {g} within {DEADLINE:?} (has {v:?})"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn entry(index: u64, cmd: Option<Command>) -> Entry {
    Entry {
        term: 1,
        index,
        data: cmd.map(|c| encode_command(&c).into()).unwrap_or_default(),
        ..Default::default()
    }
}

fn put(g: u64, name: &str, value: &[u8]) -> Option<Command> {
    Some(Command::Write {
        ops: vec![Op::Put {
            key: key(g, name),
            value: value.to_vec(),
        }],
    })
}

/// Waits (bounded) until `engine` finished `shard`'s digest at `index`.
fn wait_digest(engine: &Engine, shard: ShardId, index: u64) -> ShardDigest {
    let until = std::time::Instant::now() + DEADLINE;
    loop {
        match engine.digest(shard, index, index) {
            DigestStatus::Done(d) => return d,
            DigestStatus::Computing => {}
            other => panic!("digest of {shard} at {index}: {other:?}"),
        }
        assert!(
            std::time::Instant::now() < until,
            "the digest of {shard} at {index} was not done within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rounds_writes_to_many_groups_take_one_state_machine_write() {
    let dir = tempfile::tempdir().expect("temp dir");
    let open = || Engine::open(StorageConfig::new(dir.path())).expect("open engine");
    let engine = open();
    let mut applier = ShardApplier::default();
    for g in 1..=GROUPS {
        engine.create_shard(&descriptor(g)).await.expect("create");
        let (_log, machine) = engine.open_shard(ShardId(g)).expect("open shard");
        assert_eq!(
            applier.add(ShardId(g), machine),
            0,
            "a new shard applied nothing"
        );
    }
    // Groups out of id order: the answers come back in the round's order.
    let order = [4u64, 2, 1, 3];
    let round: Vec<(ShardId, Vec<Entry>)> = order
        .iter()
        .map(|&g| {
            let swap = Command::Write {
                ops: vec![Op::Swap {
                    key: key(g, "a"),
                    value: vec![g as u8],
                }],
            };
            let entries = vec![
                entry(1, None),
                entry(2, put(g, "a", b"1")),
                entry(3, Some(swap)),
            ];
            (ShardId(g), entries)
        })
        .collect();
    let before = engine.stats().apply_writes;
    let answers = applier.apply(&round).expect("apply");
    assert_eq!(
        engine.stats().apply_writes - before,
        1,
        "one round's writes to {GROUPS} groups are one state machine write"
    );
    assert_eq!(answers.len(), order.len());
    for (g, answer) in order.iter().zip(&answers) {
        assert_eq!(
            answer,
            &vec![
                CommandResponse::Empty,
                CommandResponse::Write(vec![OpResult::Put { prev: None }]),
                CommandResponse::Write(vec![OpResult::Put {
                    prev: Some(b"1".to_vec())
                }]),
            ],
            "group {g}'s answers, in its log order"
        );
        assert_eq!(
            engine.get(&key(*g, "a")).expect("get"),
            Some(vec![*g as u8])
        );
    }
    // Reopened, each shard resumes after what it applied: nothing is
    // applied twice.
    drop(applier);
    drop(engine);
    let engine = open();
    applier = ShardApplier::default();
    for g in 1..=GROUPS {
        let (_log, machine) = engine.open_shard(ShardId(g)).expect("open shard");
        assert_eq!(applier.add(ShardId(g), machine), 3, "group {g}");
    }
    // A digest is applied by its group alone, after the writes before it
    // and before the ones after it: it hashes the state right after it.
    let round = vec![
        (
            ShardId(1),
            vec![
                entry(4, put(1, "b", b"2")),
                entry(5, Some(Command::Digest)),
                entry(6, put(1, "c", b"3")),
            ],
        ),
        (ShardId(2), vec![entry(4, put(2, "b", b"2"))]),
    ];
    let before = engine.stats().apply_writes;
    let answers = applier.apply(&round).expect("apply");
    assert_eq!(
        engine.stats().apply_writes - before,
        3,
        "the two groups' writes share one write; the digest and what follows it take their own"
    );
    let wrote = CommandResponse::Write(vec![OpResult::Put { prev: None }]);
    assert_eq!(
        answers,
        vec![
            vec![wrote.clone(), CommandResponse::Empty, wrote.clone()],
            vec![wrote],
        ]
    );
    assert_eq!(
        wait_digest(&engine, ShardId(1), 5).pairs,
        2,
        "the digest at 5 holds a and b, not c written at 6"
    );
    assert_eq!(engine.get(&key(1, "c")).expect("get"), Some(b"3".to_vec()));
}
