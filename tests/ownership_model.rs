//! Range ownership on one node, model-based (RELIABILITY scenario 11): a
//! random walk of writes, splits, replicas moving out and back in (seeded
//! from fresh *and* stale snapshots, then catching up from their log),
//! restarts, all on one node's engine. A small cluster model keeps every
//! shard's log and its state after every index. After every step: each key
//! of a hosted shard's range is owned by exactly that replica, and its value
//! is the model's.

mod common;

use common::*;
use openraft::storage::RaftStateMachine;
use openraft::StoredMembership;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tessera::command::{Command, Op};
use tessera::raft::{Entry, SnapshotMeta};
use tessera::storage::snapshot::{SnapshotHeader, SnapshotWriter};
use tessera::storage::{Engine, LogStore, StateMachine};
use tessera::{KeyRange, NodeId, ShardDescriptor, ShardId};

type Data = BTreeMap<Vec<u8>, Vec<u8>>;

/// One shard of the modelled cluster: its log and its state after each
/// index (from the index it was created at).
struct ModelShard {
    entries: BTreeMap<u64, Entry>,
    states: BTreeMap<u64, (ShardDescriptor, Data)>,
}

impl ModelShard {
    fn latest(&self) -> (u64, &ShardDescriptor, &Data) {
        let (i, (d, data)) = self.states.iter().next_back().expect("a state");
        (*i, d, data)
    }
}

struct Cluster {
    shards: BTreeMap<ShardId, ModelShard>,
    next_id: u64,
    term_index: u64,
}

/// 40 keys `k00`..`k39`.
fn universe() -> Vec<Vec<u8>> {
    (0..40).map(|i| format!("k{i:02}").into_bytes()).collect()
}

impl Cluster {
    fn new() -> Self {
        let d = ShardDescriptor::new(ShardId(1), KeyRange::full(), vec![NodeId(1)]);
        let mut states = BTreeMap::new();
        states.insert(0, (d, Data::new()));
        let mut shards = BTreeMap::new();
        shards.insert(
            ShardId(1),
            ModelShard {
                entries: BTreeMap::new(),
                states,
            },
        );
        Cluster {
            shards,
            next_id: 2,
            term_index: 0,
        }
    }

    /// Appends `cmd` to `shard`'s log and advances the model; returns the
    /// entry.
    fn append(&mut self, shard: ShardId, cmd: Command) -> Entry {
        let s = self.shards.get_mut(&shard).expect("shard");
        let (last, d, data) = s.latest();
        let (index, mut d, mut data) = (last + 1, d.clone(), data.clone());
        let entry = normal(1, index, cmd.clone());
        let mut child = None;
        match cmd {
            Command::Write { ops } => {
                for op in ops {
                    if let Op::Put { key, value } = op {
                        assert!(d.range.contains(&key));
                        data.insert(key, value);
                    }
                }
            }
            Command::Split { key, child: c, .. } => {
                let right: Data = data.split_off(&key);
                let mut cd = d.clone();
                cd.id = c;
                cd.range = KeyRange::new(key.clone(), d.range.end.clone());
                cd.epoch.version += 1;
                d.range = KeyRange::new(d.range.start.clone(), key);
                d.epoch.version += 1;
                child = Some((cd, right));
            }
            _ => unreachable!("only writes and splits"),
        }
        s.entries.insert(index, entry.clone());
        s.states.insert(index, (d, data));
        if let Some((cd, right)) = child {
            let mut states = BTreeMap::new();
            states.insert(index, (cd.clone(), right));
            self.shards.insert(
                cd.id,
                ModelShard {
                    entries: BTreeMap::new(),
                    states,
                },
            );
        }
        self.term_index = self.term_index.max(index);
        entry
    }
}

/// The node: one engine and the replicas it hosts.
struct Local {
    dir: tempfile::TempDir,
    engine: Option<Engine>,
    open: BTreeMap<ShardId, (LogStore, StateMachine)>,
    snapshots: u64,
}

impl Local {
    fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("engine open")
    }

    fn hosted(&self) -> BTreeSet<ShardId> {
        self.engine()
            .shards()
            .unwrap()
            .into_iter()
            .map(|d| d.id)
            .collect()
    }

    /// Opens every hosted replica not open yet and applies its log up to
    /// the model's last index (children its splits create are opened and
    /// caught up too).
    async fn catch_up(&mut self, c: &Cluster) {
        loop {
            let mut progressed = false;
            for id in self.hosted() {
                if !self.open.contains_key(&id) {
                    let stores = self.engine().open_shard(id).unwrap();
                    self.open.insert(id, stores);
                }
                let (_, sm) = self.open.get_mut(&id).unwrap();
                let applied = sm.applied().map_or(0, |l| l.index);
                let todo: Vec<Entry> = c.shards[&id]
                    .entries
                    .range(applied + 1..)
                    .map(|(_, e)| e.clone())
                    .collect();
                if !todo.is_empty() {
                    sm.apply_entries(todo).await.unwrap();
                    progressed = true;
                }
            }
            self.engine().take_created();
            let all_open = self.hosted().iter().all(|id| self.open.contains_key(id));
            if !progressed && all_open {
                return;
            }
        }
    }

    async fn restart(&mut self) {
        self.open.clear();
        let engine = self.engine.take().unwrap();
        engine.close(Duration::from_secs(10)).await.unwrap();
        self.engine = Some(open_engine(self.dir.path()));
    }

    /// Creates `id` fresh here and installs the model's state of it at
    /// index `at` (possibly older than its latest: a stale seed).
    async fn move_in(&mut self, c: &Cluster, id: ShardId, at: u64) {
        let (_, latest, _) = c.shards[&id].latest();
        self.engine().create_shard(latest).await.unwrap();
        let (d, data) = &c.shards[&id].states[&at];
        self.snapshots += 1;
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(1, at)),
            last_membership: StoredMembership::default(),
        };
        let header = SnapshotHeader {
            descriptor: d.clone(),
            meta: meta.clone(),
        };
        let path = self
            .dir
            .path()
            .join(format!("seed-{}.snap", self.snapshots));
        let mut w = SnapshotWriter::create(path.with_extension("tmp"), &header).unwrap();
        let pairs: Vec<(Vec<u8>, Vec<u8>)> =
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if !pairs.is_empty() {
            w.write_chunk(pairs).unwrap();
        }
        let snap = w.finish(&path).unwrap();
        let (log, mut sm) = self.engine().open_shard(id).unwrap();
        sm.install_snapshot(&meta, snap).await.unwrap();
        self.open.insert(id, (log, sm));
        self.catch_up(c).await;
    }

    async fn move_out(&mut self, id: ShardId) {
        self.open.remove(&id);
        self.engine().delete_shard(id).await.unwrap();
    }

    /// Every key of every hosted shard's range is owned by that replica
    /// here and holds the model's value; keys of no hosted shard are owned
    /// by none.
    fn check(&self, c: &Cluster, step: usize, what: &str) {
        let e = self.engine();
        let hosted = self.hosted();
        for k in universe() {
            let mut owner = None;
            for id in &hosted {
                let (_, d, data) = c.shards[id].latest();
                assert_eq!(
                    e.descriptor(*id).unwrap().range,
                    d.range,
                    "step {step} ({what}): {id}'s range"
                );
                if d.range.contains(&k) {
                    assert!(owner.is_none(), "step {step}: two hosted ranges hold {k:?}");
                    owner = Some(*id);
                    assert_eq!(
                        e.get(&k).unwrap().as_ref(),
                        data.get(&k),
                        "step {step} ({what}): value of {} in {id}",
                        String::from_utf8_lossy(&k)
                    );
                }
            }
            assert_eq!(
                e.owner_of(&k),
                owner,
                "step {step} ({what}): owner of {}",
                String::from_utf8_lossy(&k)
            );
        }
    }
}

async fn walk(seed: u64, steps: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = Cluster::new();
    let dir = tempfile::tempdir().unwrap();
    let engine = open_engine(dir.path());
    let d1 = c.shards[&ShardId(1)].latest().1.clone();
    let (log, mut sm) = create_and_open(&engine, &d1).await;
    // A first entry gives the root shard state.
    let first = c.append(ShardId(1), Command::put(b"k00".to_vec(), b"init".to_vec()));
    sm.apply_entries(vec![first]).await.unwrap();
    let mut local = Local {
        dir,
        engine: Some(engine),
        open: BTreeMap::from([(ShardId(1), (log, sm))]),
        snapshots: 0,
    };
    let keys = universe();
    for step in 0..steps {
        let ids: Vec<ShardId> = c.shards.keys().copied().collect();
        let id = ids[rng.gen_range(0..ids.len())];
        let hosted = local.hosted();
        let what = match rng.gen_range(0..100) {
            0..=44 => {
                let (_, d, _) = c.shards[&id].latest();
                let mine: Vec<&Vec<u8>> = keys.iter().filter(|k| d.range.contains(k)).collect();
                if mine.is_empty() {
                    continue;
                }
                let k = mine[rng.gen_range(0..mine.len())].clone();
                let v = format!("s{step}").into_bytes();
                let e = c.append(id, Command::put(k, v));
                if let Some((_, sm)) = local.open.get_mut(&id) {
                    sm.apply_entries(vec![e]).await.unwrap();
                    local.catch_up(&c).await;
                }
                "write"
            }
            45..=59 => {
                let (_, d, _) = c.shards[&id].latest();
                let inside: Vec<&Vec<u8>> = keys
                    .iter()
                    .filter(|k| d.range.contains(k) && **k > d.range.start)
                    .collect();
                if inside.is_empty() {
                    continue;
                }
                let key = inside[rng.gen_range(0..inside.len())].clone();
                let child = ShardId(c.next_id);
                c.next_id += 1;
                let version = d.epoch.version;
                let e = c.append(
                    id,
                    Command::Split {
                        key,
                        child,
                        version,
                    },
                );
                if let Some((_, sm)) = local.open.get_mut(&id) {
                    sm.apply_entries(vec![e]).await.unwrap();
                    local.catch_up(&c).await;
                }
                "split"
            }
            60..=74 => {
                if !hosted.contains(&id) {
                    continue;
                }
                local.move_out(id).await;
                "move out"
            }
            75..=94 => {
                if hosted.contains(&id) {
                    continue;
                }
                // Any state from the shard's first to its latest: older
                // ones predate splits whose children may be hosted here.
                let states: Vec<u64> = c.shards[&id].states.keys().copied().collect();
                let at = states[rng.gen_range(0..states.len())];
                local.move_in(&c, id, at).await;
                if at == *states.last().unwrap() {
                    "move in (fresh seed)"
                } else {
                    "move in (stale seed)"
                }
            }
            _ => {
                local.restart().await;
                local.catch_up(&c).await;
                "restart"
            }
        };
        local.check(&c, step, what);
    }
    local.restart().await;
    local.catch_up(&c).await;
    local.check(&c, steps, "final restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_is_owned_by_exactly_one_live_replica() {
    for seed in 0..16 {
        walk(seed, 80).await;
    }
}
