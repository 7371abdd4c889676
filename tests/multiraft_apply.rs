//! The batch system applying to the product's state machine
//! (`multiraft::ShardApplier`): a proposal's answer is what the state
//! machine answered, the data lands in the shared data column family, and a
//! restarted node resumes from its applied position instead of applying
//! anything twice.

#[path = "common/multiraft.rs"]
mod harness;

use harness::apply::{key, shard_appliers, Starts};
use harness::loops::LoopCluster;
use std::collections::BTreeMap;
use std::time::Duration;
use tessera::command::{Command, CommandResponse, Op, OpResult};
use tessera::multiraft::{encode_command, LoopConfig};
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
