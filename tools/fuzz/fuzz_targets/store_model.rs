//! Model-based test of the storage engine (`tessera::storage`): an
//! `arbitrary`-derived sequence of operations on one shard replica, driven
//! through the store API the way openraft drives it (log append, apply,
//! snapshot build and install, purge, vote) with engine close and reopen in
//! between, checked against a `BTreeMap` model.
//!
//! After every operation: the data column family equals the model (nothing
//! outside the shard's range is ever written), the state machine's applied id,
//! the log state (last and purged ids), the log's entries and the vote equal
//! the model's; every apply returns exactly the `CommandResponse` the model
//! computes (previous values, CAS outcomes, `KeyNotInRange` writing nothing);
//! reads and bounded scans return the model's pairs; a built snapshot file
//! holds exactly the model's pairs in bounded chunks, and installing it
//! brings the model back to that point. After every reopen: the shard's
//! on-disk state and current snapshot are what the model says, and the
//! entries appended but not yet applied are replayed in order.
//!
//! Fast iterations: one engine per process, in one folder (under /dev/shm
//! when present, where syncs are cheap); every run gets a fresh shard whose
//! keys (range and outside it) carry the run's own 8-byte prefix, so runs
//! never see each other's data; the folder is emptied and the engine opened
//! anew every 256 runs. At most 48 operations and 4 reopens per run.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftStateMachine};
use openraft::RaftSnapshotBuilder;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tessera::command::{Command, CommandResponse, Op, OpResult};
use tessera::raft::{log_id, Entry, EntryPayload, LogId, SnapshotMeta, Vote};
use tessera::storage::snapshot::SnapshotReader;
use tessera::storage::{Engine, LogStore, StateMachine, StorageConfig};
use tessera::{KeyRange, NodeId, ShardDescriptor, ShardId};

tessera_fuzz::limit_alloc!();

const NODE: NodeId = NodeId(1);
/// Runs between two fresh folders.
const RUNS_PER_FOLDER: u64 = 256;

/// The current run's shard (its id is also its keys' prefix).
static SHARD_ID: AtomicU64 = AtomicU64::new(1);

fn shard() -> ShardId {
    ShardId(SHARD_ID.load(Ordering::Relaxed))
}

/// The current run's key prefix.
fn prefixed(rest: &[u8]) -> Vec<u8> {
    let mut k = shard().0.to_be_bytes().to_vec();
    k.extend_from_slice(rest);
    k
}
const ACTIONS_MAX: usize = 48;
const OPS_MAX: usize = 8;
const REOPENS_MAX: usize = 4;
const CHUNK_BYTES: usize = 4096;

fn descriptor() -> ShardDescriptor {
    ShardDescriptor::new(shard(), KeyRange::new(prefixed(b"k"), prefixed(b"l")), vec![NODE])
}

/// A key: mostly inside the shard's range (so most writes take effect),
/// sometimes its inclusive start, below it or at/above its exclusive end.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct KeySel(u8);

fn key(k: KeySel) -> Vec<u8> {
    let b = k.0;
    match b & 0x0f {
        0..=11 => prefixed(&[b'k', b >> 5]),
        12 | 13 => prefixed(b"k"),
        14 => prefixed(&[b'j', b >> 6]),
        _ => prefixed(&[b'l', b >> 6]),
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Val {
    len: u8,
    fill: u8,
}

/// Mostly tiny values; some of 1.5–3 KB so snapshots span several chunks.
fn val(v: Val) -> Vec<u8> {
    let n = if v.len >= 250 {
        1500 + (v.len - 250) as usize * 300
    } else {
        (v.len % 5) as usize
    };
    vec![v.fill; n]
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// The model's current value (the CAS usually succeeds).
    Current,
    Absent,
    Value(Val),
}

#[derive(Debug, Clone, Copy)]
enum FOp {
    Put(KeySel, Val),
    Delete(KeySel),
    Cas(KeySel, Expect, Option<Val>),
}

#[derive(Debug)]
enum Action {
    /// Append one entry (one or more operations) and apply it, with any
    /// pending ones before it.
    Write(FOp, Vec<FOp>),
    /// Append one entry, durably, without applying it.
    AppendOnly(FOp, Vec<FOp>),
    ApplyPending,
    Get(KeySel),
    Scan(KeySel, Option<KeySel>, u8),
    BuildSnapshot,
    /// Install the current snapshot, then drop the log after it and purge
    /// up to it (what openraft does after an install).
    InstallSnapshot,
    Purge(u8),
    SaveVote,
    Reopen,
}

// One byte per variant (derived enums take four), so short inputs hold long
// sequences of operations.
impl<'a> Arbitrary<'a> for Expect {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u8::arbitrary(u)? % 3 {
            0 => Expect::Current,
            1 => Expect::Absent,
            _ => Expect::Value(u.arbitrary()?),
        })
    }
}

impl<'a> Arbitrary<'a> for FOp {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u8::arbitrary(u)? % 3 {
            0 => FOp::Put(u.arbitrary()?, u.arbitrary()?),
            1 => FOp::Delete(u.arbitrary()?),
            _ => FOp::Cas(u.arbitrary()?, u.arbitrary()?, u.arbitrary()?),
        })
    }
}

impl<'a> Arbitrary<'a> for Action {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u8::arbitrary(u)? % 10 {
            0 => Action::Write(u.arbitrary()?, u.arbitrary()?),
            1 => Action::AppendOnly(u.arbitrary()?, u.arbitrary()?),
            2 => Action::ApplyPending,
            3 => Action::Get(u.arbitrary()?),
            4 => Action::Scan(u.arbitrary()?, u.arbitrary()?, u.arbitrary()?),
            5 => Action::BuildSnapshot,
            6 => Action::InstallSnapshot,
            7 => Action::Purge(u.arbitrary()?),
            8 => Action::SaveVote,
            _ => Action::Reopen,
        })
    }
}

#[derive(Default)]
struct Model {
    data: BTreeMap<Vec<u8>, Vec<u8>>,
    applied: Option<LogId>,
    last: Option<LogId>,
    purged: Option<LogId>,
    term: u64,
    vote: Option<Vote>,
    pending: Vec<Entry>,
    snap: Option<(SnapshotMeta, BTreeMap<Vec<u8>, Vec<u8>>)>,
}

impl Model {
    fn apply(&mut self, cmd: &Command) -> CommandResponse {
        let range = descriptor().range;
        let Command::Write { ops } = cmd else {
            unreachable!("the model drives writes only");
        };
        if let Some(op) = ops.iter().find(|op| !range.contains(op.key())) {
            return CommandResponse::KeyNotInRange {
                key: op.key().to_vec(),
            };
        }
        let mut results = Vec::new();
        for op in ops {
            let cur = self.data.get(op.key()).cloned();
            match op {
                Op::Put { key, value } => {
                    // A plain put does not read the value it replaces.
                    results.push(OpResult::Put { prev: None });
                    self.data.insert(key.clone(), value.clone());
                }
                Op::Swap { key, value } => {
                    results.push(OpResult::Put { prev: cur });
                    self.data.insert(key.clone(), value.clone());
                }
                Op::Delete { key } => {
                    results.push(OpResult::Delete { prev: cur });
                    self.data.remove(key);
                }
                Op::Cas { key, expected, new } => {
                    let succeeded = &cur == expected;
                    results.push(OpResult::Cas {
                        succeeded,
                        current: cur,
                    });
                    if succeeded {
                        match new {
                            Some(v) => self.data.insert(key.clone(), v.clone()),
                            None => self.data.remove(key),
                        };
                    }
                }
            }
        }
        CommandResponse::Write(results)
    }

    fn command(&self, first: FOp, more: &[FOp]) -> Command {
        let ops = std::iter::once(&first)
            .chain(more)
            .take(OPS_MAX)
            .map(|f| match *f {
                FOp::Put(k, v) => Op::Put {
                    key: key(k),
                    value: val(v),
                },
                FOp::Delete(k) => Op::Delete { key: key(k) },
                FOp::Cas(k, e, n) => {
                    let key = key(k);
                    let expected = match e {
                        Expect::Current => self.data.get(&key).cloned(),
                        Expect::Absent => None,
                        Expect::Value(v) => Some(val(v)),
                    };
                    Op::Cas {
                        key,
                        expected,
                        new: n.map(val),
                    }
                }
            })
            .collect();
        Command::Write { ops }
    }
}

struct Store {
    engine: Engine,
    log: LogStore,
    sm: StateMachine,
}

fn base_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        extern "C" fn cleanup() {
            if let Some(d) = DIR.get() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        extern "C" {
            fn atexit(cb: extern "C" fn()) -> i32;
        }
        unsafe { atexit(cleanup) };
        base.join(format!("tessera-fuzz-store-{}", std::process::id()))
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

fn config() -> StorageConfig {
    StorageConfig {
        write_queue_max: 64,
        snapshot_chunk_bytes_max: CHUNK_BYTES,
        block_cache_bytes: 1 << 20,
        ..StorageConfig::new(base_dir())
    }
}

/// The process's engine between runs.
static ENGINE: Mutex<Option<Engine>> = Mutex::new(None);

async fn close_engine(engine: Engine) {
    engine
        .close(Duration::from_secs(30))
        .await
        .expect("engine closes");
}

impl Store {
    /// The current run's shard on `engine` (created when new).
    async fn on(engine: Engine) -> Store {
        if engine.shard_state(shard()).is_err() {
            engine.create_shard(&descriptor()).await.unwrap();
        }
        let (log, sm) = engine.open_shard(shard()).unwrap();
        Store { engine, log, sm }
    }

    /// Closes the engine and opens it again.
    async fn reopen(self) -> Store {
        let Store { engine, log, sm } = self;
        drop(log);
        drop(sm);
        close_engine(engine).await;
        Store::on(Engine::open(config()).expect("engine reopens")).await
    }

    /// Closes the shard's stores, keeping the engine for the next run.
    fn release(self) -> Engine {
        self.engine
    }
}

fn pairs(m: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<(Vec<u8>, Vec<u8>)> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

async fn check(s: &mut Store, m: &Model) {
    assert_eq!(
        s.engine
            .scan(&prefixed(b""), &(shard().0 + 1).to_be_bytes(), usize::MAX)
            .unwrap(),
        pairs(&m.data),
        "data differs from the model"
    );
    assert_eq!(s.sm.applied(), m.applied, "applied id");
    assert_eq!(s.sm.applied_state().await.unwrap().0, m.applied);
    let st = s.log.get_log_state().await.unwrap();
    assert_eq!(st.last_log_id, m.last, "last log id");
    assert_eq!(st.last_purged_log_id, m.purged, "last purged log id");
    assert_eq!(s.log.read_vote().await.unwrap(), m.vote, "vote");
    // The log holds exactly (purged, last], in order.
    let mut reader = s.log.get_log_reader().await;
    let entries = reader.try_get_log_entries(..).await.unwrap();
    let lo = m.purged.map_or(1, |p| p.index + 1);
    let hi = m.last.map_or(0, |l| l.index);
    assert_eq!(
        entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
        (lo..=hi).collect::<Vec<_>>(),
        "log entries"
    );
    if let Some(l) = entries.last() {
        assert_eq!(Some(l.log_id), m.last);
    }
    // Pending entries are the log's tail, as appended.
    let tail = &entries[entries.len() - m.pending.len()..];
    for (a, b) in tail.iter().zip(&m.pending) {
        assert_eq!(a.log_id, b.log_id);
        assert_eq!(format!("{:?}", a.payload), format!("{:?}", b.payload));
    }
}

async fn append(s: &mut Store, m: &mut Model, cmd: Command) {
    if cmd.validate().is_err() {
        // The server never proposes an invalid command (here: empty).
        return;
    }
    let index = m.last.map_or(1, |l| l.index + 1);
    let entry = Entry {
        log_id: log_id(m.term, NODE, index),
        payload: EntryPayload::Normal(cmd),
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    s.log
        .append_entries(vec![entry.clone()], move |r| {
            let _ = tx.send(r);
        })
        .await
        .unwrap();
    rx.await.expect("flush callback").expect("append durable");
    m.last = Some(entry.log_id);
    m.pending.push(entry);
}

async fn apply_pending(s: &mut Store, m: &mut Model) {
    let entries = std::mem::take(&mut m.pending);
    if entries.is_empty() {
        return;
    }
    let got = s.sm.apply_entries(entries.clone()).await.unwrap();
    assert_eq!(got.len(), entries.len());
    for (e, r) in entries.iter().zip(got) {
        let EntryPayload::Normal(cmd) = &e.payload else {
            unreachable!()
        };
        assert_eq!(r, m.apply(cmd), "apply response of {}", e.log_id);
        m.applied = Some(e.log_id);
    }
}

async fn build_snapshot(s: &mut Store, m: &mut Model) {
    let mut b = s.sm.get_snapshot_builder().await;
    let snap = b.build_snapshot().await.unwrap();
    drop(b);
    assert_eq!(snap.meta.last_log_id, m.applied);
    let mut r = SnapshotReader::open(snap.snapshot.path()).unwrap();
    assert_eq!(r.header().descriptor, descriptor());
    assert_eq!(r.header().meta, snap.meta);
    let mut got = Vec::new();
    while let Some(chunk) = r.next_chunk().unwrap() {
        let bytes: usize = chunk.iter().map(|(k, v)| k.len() + v.len()).sum();
        let biggest = chunk.iter().map(|(k, v)| k.len() + v.len()).max().unwrap_or(0);
        assert!(!chunk.is_empty(), "empty chunk");
        assert!(bytes < CHUNK_BYTES + biggest, "chunk of {bytes} bytes");
        got.extend(chunk);
    }
    assert_eq!(got, pairs(&m.data), "snapshot contents");
    m.snap = Some((snap.meta, m.data.clone()));
}

async fn install_snapshot(s: &mut Store, m: &mut Model) {
    let Some((meta, data)) = m.snap.clone() else {
        return;
    };
    if meta.last_log_id < m.purged {
        // openraft never purges past its snapshot and then installs it.
        return;
    }
    let cur = s
        .sm
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("a current snapshot");
    assert_eq!(cur.meta, meta, "current snapshot");
    s.sm.install_snapshot(&cur.meta, cur.snapshot).await.unwrap();
    let next = meta.last_log_id.map_or(0, |l| l.index + 1);
    // Everything from `next` on goes (only the index matters to the store).
    s.log
        .truncate_after(next.checked_sub(1).map(|i| log_id(m.term, NODE, i)))
        .await
        .unwrap();
    if let Some(l) = meta.last_log_id {
        s.log.purge(l).await.unwrap();
        m.purged = Some(l);
    }
    m.data = data;
    m.applied = meta.last_log_id;
    m.last = meta.last_log_id;
    m.pending.clear();
    // A new leader's entries follow, above every earlier log id.
    m.term += 1;
}

async fn purge(s: &mut Store, m: &mut Model, f: u8) {
    let Some(applied) = m.applied else { return };
    let lo = m.purged.map_or(0, |p| p.index);
    if applied.index <= lo {
        return;
    }
    let idx = lo + 1 + u64::from(f) % (applied.index - lo);
    let mut reader = s.log.get_log_reader().await;
    let at = reader.try_get_log_entries(idx..=idx).await.unwrap();
    assert_eq!(at.len(), 1, "entry {idx} present");
    s.log.purge(at[0].log_id).await.unwrap();
    m.purged = Some(at[0].log_id);
}

async fn reopen(s: Store, m: &mut Model) -> Store {
    let mut s = s.reopen().await;
    let st = s.engine.shard_state(shard()).unwrap();
    assert_eq!(st.descriptor, descriptor());
    assert_eq!(st.vote, m.vote);
    assert_eq!(st.last_log_id, m.last);
    assert_eq!(st.last_purged, m.purged);
    assert_eq!(st.applied, m.applied);
    let cur = s.sm.get_current_snapshot().await.unwrap().map(|c| c.meta);
    assert_eq!(cur, m.snap.as_ref().map(|(meta, _)| meta.clone()));
    check(&mut s, m).await;
    // Like openraft after a restart: apply what was logged but not applied.
    let from = m.applied.map_or(1, |l| l.index + 1);
    let to = m.last.map_or(0, |l| l.index);
    let mut reader = s.log.get_log_reader().await;
    let replay = reader.try_get_log_entries(from..=to).await.unwrap();
    assert_eq!(replay.len(), m.pending.len(), "entries to replay");
    m.pending = replay;
    apply_pending(&mut s, m).await;
    s
}

async fn run(engine: Engine, actions: Vec<Action>) -> Engine {
    let mut m = Model {
        term: 1,
        ..Model::default()
    };
    let mut s = Store::on(engine).await;
    check(&mut s, &m).await;
    let mut reopens = 0;
    for a in actions.into_iter().take(ACTIONS_MAX) {
        match a {
            Action::Write(first, more) => {
                let cmd = m.command(first, &more);
                append(&mut s, &mut m, cmd).await;
                apply_pending(&mut s, &mut m).await;
            }
            Action::AppendOnly(first, more) => {
                let cmd = m.command(first, &more);
                append(&mut s, &mut m, cmd).await;
            }
            Action::ApplyPending => apply_pending(&mut s, &mut m).await,
            Action::Get(k) => {
                let k = key(k);
                assert_eq!(s.engine.get(&k).unwrap(), m.data.get(&k).cloned());
            }
            Action::Scan(start, end, limit) => {
                let (start, end) = (key(start), end.map(key).unwrap_or_default());
                let limit = usize::from(limit % 10);
                let want: Vec<_> = m
                    .data
                    .range(start.clone()..)
                    .take_while(|(k, _)| end.is_empty() || **k < end)
                    .take(limit)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                assert_eq!(s.engine.scan(&start, &end, limit).unwrap(), want);
            }
            Action::BuildSnapshot => build_snapshot(&mut s, &mut m).await,
            Action::InstallSnapshot => install_snapshot(&mut s, &mut m).await,
            Action::Purge(f) => purge(&mut s, &mut m, f).await,
            Action::SaveVote => {
                m.term += 1;
                let v = Vote::new(m.term, NODE);
                s.log.save_vote(&v).await.unwrap();
                m.vote = Some(v);
            }
            Action::Reopen => {
                if reopens == REOPENS_MAX {
                    continue;
                }
                reopens += 1;
                s = reopen(s, &mut m).await;
            }
        }
        check(&mut s, &m).await;
    }
    s.release()
}

static RUNS: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|actions: Vec<Action>| {
    let run_no = RUNS.fetch_add(1, Ordering::Relaxed);
    SHARD_ID.store(run_no + 1, Ordering::Relaxed);
    let mut slot = ENGINE.lock().unwrap();
    runtime().block_on(async {
        if run_no % RUNS_PER_FOLDER == 0 {
            if let Some(e) = slot.take() {
                close_engine(e).await;
            }
            let dir = base_dir();
            if dir.exists() {
                std::fs::remove_dir_all(dir).unwrap();
            }
        }
        let engine = match slot.take() {
            Some(e) => e,
            None => Engine::open(config()).expect("engine opens"),
        };
        *slot = Some(run(engine, actions).await);
    });
});
