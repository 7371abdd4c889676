//! openraft's storage conformance suite against Tessera's RocksDB stores, run
//! for fresh shards while busy neighbour shards live in the same database.

mod common;

use common::*;
use openraft::storage::{RaftLogReader, RaftLogStorage};
use openraft::testing::log::{StoreBuilder, Suite};
use std::sync::atomic::{AtomicU64, Ordering};
use tessera::command::Command;
use tessera::raft::{TypeConfig, Vote};
use tessera::storage::{Engine, LogStore, StateMachine};
use tessera::{NodeId, ShardId};

struct SharedDbBuilder {
    engine: Engine,
    next_id: AtomicU64,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, ()> for SharedDbBuilder {
    async fn build(
        &self,
    ) -> Result<((), LogStore, StateMachine), openraft::StorageError<TypeConfig>> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let d = prefix_shard(id, format!("suite-{id:06}/").as_bytes());
        let (log, sm) = create_and_open(&self.engine, &d).await;
        Ok(((), log, sm))
    }
}

const NEIGHBOURS: [u64; 3] = [1, 2, 3];

fn neighbour_prefix(id: u64) -> Vec<u8> {
    format!("neighbour-{id}/").into_bytes()
}

#[test]
fn openraft_suite_passes_beside_other_shards() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_engine(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();

    tracing_phase("populate neighbour shards");
    let before = rt.block_on(async {
        let mut out = Vec::new();
        for id in NEIGHBOURS {
            let (mut log, mut sm) =
                create_and_open(&engine, &prefix_shard(id, &neighbour_prefix(id))).await;
            log.save_vote(&Vote::new(7, NodeId(1))).await.unwrap();
            let mut entries = vec![membership(1, 1, &[1])];
            for i in 2..=30 {
                let mut key = neighbour_prefix(id);
                key.extend_from_slice(format!("{i:04}").as_bytes());
                entries.push(normal(1, i, Command::put(key, format!("v{i}"))));
            }
            append_durable(&log, entries.clone()).await.unwrap();
            apply(&mut sm, entries).await;
            out.push(engine.shard_state(ShardId(id)).unwrap());
        }
        out
    });

    tracing_phase("run the suite on fresh shards in the same db");
    rt.block_on(Suite::test_all(SharedDbBuilder {
        engine: engine.clone(),
        next_id: AtomicU64::new(100),
    }))
    .expect("openraft storage suite");

    tracing_phase("neighbours are untouched");
    rt.block_on(async {
        for (id, st) in NEIGHBOURS.into_iter().zip(before) {
            assert_eq!(
                engine.shard_state(ShardId(id)).unwrap(),
                st,
                "state of neighbour {id}"
            );
            let p = neighbour_prefix(id);
            let mut end = p.clone();
            *end.last_mut().unwrap() += 1;
            let data = engine.scan(&p, &end, 1000).unwrap();
            assert_eq!(data.len(), 29, "data of neighbour {id}");
            let (mut log, _sm) = engine.open_shard(ShardId(id)).unwrap();
            let entries = log.try_get_log_entries(0..100).await.unwrap();
            assert_eq!(entries.len(), 30, "log of neighbour {id}");
        }
    });
}

fn tracing_phase(name: &str) {
    eprintln!("--- {name}");
}
