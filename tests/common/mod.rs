//! Helpers shared by the storage tests.
#![allow(dead_code)]

pub mod cluster;
pub mod load;
pub mod routes;
pub mod wait;

use openraft::storage::RaftLogStorage;
use std::collections::BTreeSet;
use tessera::command::{Command, CommandResponse};
use tessera::raft::{Entry, EntryPayload, LogId, Membership};
use tessera::storage::{Engine, LogStore, StateMachine, StorageConfig, StoreError};
use tessera::{KeyRange, NodeId, ShardDescriptor, ShardId};
use tokio::sync::oneshot;

/// Key number `i`, spread over the key space by its first byte (so keys
/// land in every shard of an evenly split cluster).
pub fn spread_key(i: u32) -> Vec<u8> {
    let mut k = vec![(i.wrapping_mul(37) % 256) as u8];
    k.extend_from_slice(format!("key-{i:05}").as_bytes());
    k
}

pub fn log_id(term: u64, index: u64) -> LogId {
    tessera::raft::log_id(term, NodeId(1), index)
}

pub fn blank(term: u64, index: u64) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Blank,
    }
}

pub fn normal(term: u64, index: u64, cmd: Command) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(cmd),
    }
}

pub fn membership(term: u64, index: u64, voters: &[u64]) -> Entry {
    let set: BTreeSet<NodeId> = voters.iter().map(|&v| NodeId(v)).collect();
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Membership(Membership::new_with_defaults(vec![set], [])),
    }
}

/// A shard owning every key that starts with `prefix`.
pub fn prefix_shard(id: u64, prefix: &[u8]) -> ShardDescriptor {
    let mut end = prefix.to_vec();
    *end.last_mut().expect("non-empty prefix") += 1;
    ShardDescriptor::new(
        ShardId(id),
        KeyRange::new(prefix.to_vec(), end),
        vec![NodeId(1)],
    )
}

pub fn open_engine(dir: &std::path::Path) -> Engine {
    Engine::open(StorageConfig::new(dir)).expect("open engine")
}

pub async fn create_and_open(engine: &Engine, d: &ShardDescriptor) -> (LogStore, StateMachine) {
    engine.create_shard(d).await.expect("create shard");
    engine.open_shard(d.id).expect("open shard")
}

/// Appends and waits for the flush callback.
pub async fn append_durable(log: &LogStore, entries: Vec<Entry>) -> Result<(), StoreError> {
    let (tx, rx) = oneshot::channel();
    log.append_entries(entries, move |r| {
        let _ = tx.send(r);
    })
    .await?;
    rx.await.expect("flush callback is always called")
}

pub async fn apply(sm: &mut StateMachine, entries: Vec<Entry>) -> Vec<CommandResponse> {
    sm.apply_entries(entries).await.expect("apply")
}

pub async fn last_index(log: &mut LogStore) -> Option<u64> {
    log.get_log_state()
        .await
        .expect("log state")
        .last_log_id
        .map(|l| l.index)
}
