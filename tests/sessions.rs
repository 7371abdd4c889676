//! Client sessions in the state machine (exactly-once writes, RELIABILITY
//! scenario 9, storage side): a retried session write is answered with its
//! first results and applies nothing, and the table that decides this is
//! replicated state: it survives a restart, travels in snapshots and is
//! inherited by a split's child.

mod common;

use common::*;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use std::time::Duration;
use tessera::command::{Command, CommandResponse, Op, OpResult};
use tessera::session::SessionStamp;
use tessera::storage::StateMachine;
use tessera::{KeyRange, NodeId, ShardDescriptor, ShardId};

const CLIENT: u128 = 0xC0FFEE;
const OTHER: u128 = 0xBEEF;

fn shard() -> ShardDescriptor {
    ShardDescriptor::new(ShardId(1), KeyRange::full(), vec![NodeId(1)])
}

fn stamp(client: u128, seq: u64, acked: u64) -> SessionStamp {
    SessionStamp { client, seq, acked }
}

/// A session CAS from absent to `new` on `key`, at log time `at_ms`.
fn create(key: &[u8], new: &[u8], st: SessionStamp, at_ms: u64) -> Command {
    Command::SessionWrite {
        stamp: st,
        at_ms,
        ops: vec![Op::Cas {
            key: key.to_vec(),
            expected: None,
            new: Some(new.to_vec()),
        }],
    }
}

/// A session put.
fn put(key: &[u8], v: &[u8], st: SessionStamp, at_ms: u64) -> Command {
    Command::SessionWrite {
        stamp: st,
        at_ms,
        ops: vec![Op::Put {
            key: key.to_vec(),
            value: v.to_vec(),
        }],
    }
}

/// What the first application of [`create`] answers.
fn created() -> CommandResponse {
    CommandResponse::Write(vec![OpResult::Cas {
        succeeded: true,
        current: None,
    }])
}

/// Applies `cmd` as the next entry.
async fn next(sm: &mut StateMachine, index: &mut u64, cmd: Command) -> CommandResponse {
    *index += 1;
    apply(sm, vec![normal(1, *index, cmd)]).await.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_answered_from_the_session_and_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_engine(dir.path());
    let (_log, mut sm) = create_and_open(&engine, &shard()).await;
    let mut i = 0;

    eprintln!("--- a CAS creates k; another client overwrites it; the CAS is retried");
    let first = create(b"k", b"a", stamp(CLIENT, 1, 1), 1_000);
    assert_eq!(next(&mut sm, &mut i, first.clone()).await, created());
    assert_eq!(
        next(&mut sm, &mut i, put(b"k", b"b", stamp(OTHER, 1, 1), 1_001)).await,
        CommandResponse::Write(vec![OpResult::Put { prev: None }])
    );
    // The retry reports the first outcome (succeeded from absent), not
    // "failed, current = b", and does not write `a` over `b`.
    assert_eq!(next(&mut sm, &mut i, first.clone()).await, created());
    assert_eq!(engine.get(b"k").unwrap(), Some(b"b".to_vec()));

    eprintln!("--- a restart keeps the sessions");
    drop((_log, sm));
    engine.close(Duration::from_secs(10)).await.unwrap();
    let engine = open_engine(dir.path());
    let (_log, mut sm) = engine.open_shard(shard().id).unwrap();
    assert_eq!(next(&mut sm, &mut i, first).await, created());
    assert_eq!(engine.get(b"k").unwrap(), Some(b"b".to_vec()));

    eprintln!("--- once the client acknowledged seq 1, a late copy of it is refused");
    let second = put(b"j", b"x", stamp(CLIENT, 2, 2), 1_002);
    assert_eq!(
        next(&mut sm, &mut i, second).await,
        CommandResponse::Write(vec![OpResult::Put { prev: None }])
    );
    let late = create(b"k", b"a", stamp(CLIENT, 1, 1), 1_003);
    assert_eq!(
        next(&mut sm, &mut i, late).await,
        CommandResponse::Abandoned
    );
    assert_eq!(engine.get(b"k").unwrap(), Some(b"b".to_vec()));

    eprintln!("--- plain writes (no session) are applied every time");
    assert_eq!(
        next(&mut sm, &mut i, Command::delete(b"k".to_vec())).await,
        CommandResponse::Write(vec![OpResult::Delete {
            prev: Some(b"b".to_vec())
        }])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_travel_in_snapshots_and_to_split_children() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (open_engine(dir_a.path()), open_engine(dir_b.path()));
    let (_log_a, mut sm_a) = create_and_open(&a, &shard()).await;
    let mut i = 0;
    apply(&mut sm_a, vec![membership(1, 1, &[1])]).await;
    i += 1;
    let on_left = create(b"a1", b"v", stamp(CLIENT, 1, 1), 1_000);
    let on_right = create(b"z1", b"w", stamp(CLIENT, 2, 1), 1_001);
    assert_eq!(next(&mut sm_a, &mut i, on_left.clone()).await, created());
    assert_eq!(next(&mut sm_a, &mut i, on_right.clone()).await, created());

    eprintln!("--- a snapshot installed on a fresh replica carries the sessions");
    let snap = sm_a
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let (_log_b, mut sm_b) = create_and_open(&b, &shard()).await;
    sm_b.install_snapshot(&snap.meta, snap.snapshot.clone())
        .await
        .unwrap();
    let mut j = i;
    // Someone else changes z1; the retry must not be applied over it.
    next(
        &mut sm_b,
        &mut j,
        put(b"z1", b"other", stamp(OTHER, 1, 1), 1_002),
    )
    .await;
    assert_eq!(next(&mut sm_b, &mut j, on_right.clone()).await, created());
    assert_eq!(b.get(b"z1").unwrap(), Some(b"other".to_vec()));

    eprintln!("--- a split: the child inherits the parent's sessions");
    let child = ShardId(2);
    let r = next(
        &mut sm_a,
        &mut i,
        Command::Split {
            key: b"m".to_vec(),
            child,
            version: 1,
        },
    )
    .await;
    assert!(matches!(r, CommandResponse::Split { .. }), "{r:?}");
    let (_log_c, mut sm_c) = a.open_shard(child).unwrap();
    let mut k = i;
    next(
        &mut sm_c,
        &mut k,
        put(b"z1", b"newer", stamp(OTHER, 2, 2), 1_003),
    )
    .await;
    // Retried against the shard that owns z1 now: answered, not applied.
    assert_eq!(next(&mut sm_c, &mut k, on_right).await, created());
    assert_eq!(a.get(b"z1").unwrap(), Some(b"newer".to_vec()));
    // The parent still answers the write it applied on its side.
    assert_eq!(next(&mut sm_a, &mut i, on_left).await, created());
    assert_eq!(a.get(b"a1").unwrap(), Some(b"v".to_vec()));
}
