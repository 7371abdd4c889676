//! Three shards in one database, interleaving appends, truncations, purges,
//! votes, applies and engine reopens at random, each checked against its own
//! model after every step: no shard ever sees another's entries, votes or data.

mod common;

use common::*;
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftStateMachine};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use tessera::command::{Command, Op};
use tessera::raft::{Entry, Vote};
use tessera::storage::{Engine, LogStore, StateMachine};
use tessera::{NodeId, ShardDescriptor};

#[derive(Default)]
struct Model {
    /// index -> (term, entry)
    log: BTreeMap<u64, Entry>,
    purged: Option<u64>,
    applied: u64,
    vote_term: u64,
    term: u64,
    data: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Model {
    fn last(&self) -> u64 {
        self.log
            .keys()
            .next_back()
            .copied()
            .or(self.purged)
            .unwrap_or(0)
    }
}

fn key(shard: &ShardDescriptor, r: u64) -> Vec<u8> {
    let mut k = shard.range.start.clone();
    k.extend_from_slice(format!("k{r:02}").as_bytes());
    k
}

async fn check(
    engine: &Engine,
    d: &ShardDescriptor,
    log: &mut LogStore,
    sm: &mut StateMachine,
    m: &Model,
) {
    let st = log.get_log_state().await.unwrap();
    assert_eq!(
        st.last_purged_log_id.map(|l| l.index),
        m.purged,
        "{}: purged",
        d.id
    );
    assert_eq!(
        st.last_log_id.map_or(0, |l| l.index),
        m.last(),
        "{}: last log index",
        d.id
    );
    let first = m.purged.map_or(0, |p| p + 1);
    let got = log.try_get_log_entries(0..u64::MAX).await.unwrap();
    let want: Vec<&Entry> = m.log.range(first..).map(|(_, e)| e).collect();
    assert_eq!(got.len(), want.len(), "{}: entry count", d.id);
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.log_id, w.log_id, "{}: entry id", d.id);
        assert_eq!(
            format!("{:?}", g.payload),
            format!("{:?}", w.payload),
            "{}: payload",
            d.id
        );
    }
    let vote = log.read_vote().await.unwrap();
    assert_eq!(
        vote.map_or(0, |v| v.leader_id.term),
        m.vote_term,
        "{}: vote",
        d.id
    );
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(
        applied.map_or(0, |l| l.index),
        m.applied,
        "{}: applied",
        d.id
    );
    let data: BTreeMap<_, _> = engine
        .scan(&d.range.start, &d.range.end, 10_000)
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(data, m.data, "{}: data", d.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shards_never_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = open_engine(dir.path());
    let shards: Vec<ShardDescriptor> = (1..=3)
        .map(|i| prefix_shard(i, format!("shard{i}/").as_bytes()))
        .collect();
    let mut stores = Vec::new();
    for d in &shards {
        stores.push(create_and_open(&engine, d).await);
    }
    let mut models: Vec<Model> = (0..3)
        .map(|_| Model {
            term: 1,
            ..Default::default()
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(0x7e55e7a);
    let mut unique = 0u64;
    for step in 0..600 {
        let s = rng.gen_range(0..3);
        let d = &shards[s];
        let m = &mut models[s];
        let (log, sm) = &mut stores[s];
        match rng.gen_range(0..100) {
            0..=39 => {
                let n = rng.gen_range(1..=4);
                let start = m.last() + 1;
                let entries: Vec<Entry> = (start..start + n)
                    .map(|i| {
                        unique += 1;
                        let ops = (0..rng.gen_range(1..=3))
                            .map(|_| {
                                let k = key(d, rng.gen_range(0..20));
                                if rng.gen_bool(0.2) {
                                    Op::Delete { key: k }
                                } else {
                                    Op::Put {
                                        key: k,
                                        value: format!("v{unique}").into_bytes(),
                                    }
                                }
                            })
                            .collect();
                        normal(m.term, i, Command::Write { ops })
                    })
                    .collect();
                append_durable(log, entries.clone()).await.unwrap();
                for e in entries {
                    m.log.insert(e.log_id.index, e);
                }
            }
            40..=49 => {
                // Raft only truncates what is not applied.
                let lo = m.applied.max(m.purged.unwrap_or(0)) + 1;
                if lo <= m.last() {
                    let at = rng.gen_range(lo..=m.last());
                    // Everything from `at` on goes: truncate after `at - 1`
                    // (present, or the purged boundary; only its index
                    // matters to the store).
                    let prev = m
                        .log
                        .get(&(at - 1))
                        .map(|e| e.log_id)
                        .or_else(|| (at > 1).then(|| log_id(m.term, at - 1)));
                    log.truncate_after(prev).await.unwrap();
                    m.log.split_off(&at);
                    m.term += 1; // a new leader rewrites the tail
                }
            }
            50..=59 => {
                let lo = m.purged.map_or(1, |p| p + 1);
                if lo <= m.applied {
                    let upto = rng.gen_range(lo..=m.applied);
                    let id = m.log[&upto].log_id;
                    log.purge(id).await.unwrap();
                    m.log = m.log.split_off(&(upto + 1));
                    m.purged = Some(upto);
                }
            }
            60..=69 => {
                m.vote_term += 1;
                log.save_vote(&Vote::new(m.vote_term, NodeId(1)))
                    .await
                    .unwrap();
            }
            70..=97 => {
                let last = m.last();
                if m.applied < last {
                    let upto = rng.gen_range(m.applied + 1..=last);
                    let entries: Vec<Entry> = m
                        .log
                        .range(m.applied + 1..=upto)
                        .map(|(_, e)| e.clone())
                        .collect();
                    for e in &entries {
                        if let openraft::EntryPayload::Normal(Command::Write { ops }) = &e.payload {
                            for op in ops {
                                match op {
                                    Op::Put { key, value } => {
                                        m.data.insert(key.clone(), value.clone());
                                    }
                                    Op::Delete { key } => {
                                        m.data.remove(key);
                                    }
                                    Op::Cas { .. } | Op::Swap { .. } => {
                                        unreachable!("no cas or swap generated")
                                    }
                                }
                            }
                        }
                    }
                    apply(sm, entries).await;
                    m.applied = upto;
                }
            }
            _ => {
                eprintln!("--- step {step}: reopen the engine");
                drop(stores);
                drop(engine);
                engine = open_engine(dir.path());
                stores = shards
                    .iter()
                    .map(|d| engine.open_shard(d.id).unwrap())
                    .collect();
            }
        }
        for (i, d) in shards.iter().enumerate() {
            let (log, sm) = &mut stores[i];
            check(&engine, d, log, sm, &models[i]).await;
        }
    }
    let stats = engine.stats();
    assert!(stats.append_requests > 0 && stats.syncs > 0);
}
