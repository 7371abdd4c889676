//! Logical range snapshots: a 100,000-key shard round-trips into a fresh
//! database chunk by chunk, neighbours stay untouched, and damaged files are
//! refused with typed errors before anything is changed.

mod common;

use common::*;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use tessera::command::{Command, Op};
use tessera::storage::snapshot::{SnapshotData, SnapshotReader};
use tessera::storage::{Engine, StateMachine, StoreError};
use tessera::{KeyRange, NodeId, ShardDescriptor, ShardId};

const KEYS: u64 = 100_000;

fn shard_m() -> ShardDescriptor {
    ShardDescriptor::new(
        ShardId(10),
        KeyRange::new(b"m".to_vec(), b"n".to_vec()),
        vec![NodeId(1)],
    )
}

fn neighbours() -> [ShardDescriptor; 2] {
    [
        ShardDescriptor::new(
            ShardId(1),
            KeyRange::new(Vec::new(), b"m".to_vec()),
            vec![NodeId(1)],
        ),
        ShardDescriptor::new(
            ShardId(2),
            KeyRange::new(b"n".to_vec(), Vec::new()),
            vec![NodeId(1)],
        ),
    ]
}

/// Applies `puts` in batches of 1,000 as entries starting at `index`.
async fn load(
    sm: &mut StateMachine,
    index: &mut u64,
    puts: impl Iterator<Item = (Vec<u8>, Vec<u8>)>,
) {
    let puts: Vec<_> = puts.collect();
    for chunk in puts.chunks(1000) {
        let ops = chunk
            .iter()
            .map(|(k, v)| Op::Put {
                key: k.clone(),
                value: v.clone(),
            })
            .collect();
        *index += 1;
        apply(sm, vec![normal(1, *index, Command::Write { ops })]).await;
    }
}

async fn populated_neighbours(engine: &Engine, tag: &str) {
    for d in neighbours() {
        let (_log, mut sm) = create_and_open(engine, &d).await;
        let base = if d.range.start.is_empty() {
            b"a".to_vec()
        } else {
            b"z".to_vec()
        };
        let puts = (0..500u32).map(|i| {
            let mut k = base.clone();
            k.extend_from_slice(format!("{i:05}").as_bytes());
            (k, format!("{tag}-{i}").into_bytes())
        });
        let mut idx = 0;
        load(&mut sm, &mut idx, puts).await;
    }
}

fn dump(engine: &Engine, r: &KeyRange) -> Vec<(Vec<u8>, Vec<u8>)> {
    engine.scan(&r.start, &r.end, usize::MAX).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_keys_round_trip_into_a_fresh_db() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (open_engine(dir_a.path()), open_engine(dir_b.path()));

    eprintln!("--- source: shard [m, n) with {KEYS} keys between two neighbours");
    populated_neighbours(&a, "a").await;
    let (_log_a, mut sm_a) = create_and_open(&a, &shard_m()).await;
    let mut idx = 0;
    apply(&mut sm_a, vec![membership(1, 1, &[1, 2, 3])]).await;
    idx += 1;
    let puts = (0..KEYS).map(|i| {
        (
            format!("m{i:08}").into_bytes(),
            format!("value-{i:08}-{}", "x".repeat(80)).into_bytes(),
        )
    });
    load(&mut sm_a, &mut idx, puts).await;
    let snap = sm_a
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(idx));

    eprintln!("--- the file is chunked: no chunk holds the shard");
    let mut r = SnapshotReader::open(snap.snapshot.path()).unwrap();
    let (mut chunks, mut pairs) = (0, 0);
    while let Some(c) = r.next_chunk().unwrap() {
        chunks += 1;
        pairs += c.len() as u64;
    }
    assert_eq!(pairs, KEYS);
    assert!(chunks >= 8, "{chunks} chunks for ~11 MB at 1 MiB each");

    eprintln!("--- target: a fresh db whose shard holds stale keys, with other neighbours");
    populated_neighbours(&b, "b").await;
    let neighbours_b: Vec<_> = neighbours().iter().map(|d| dump(&b, &d.range)).collect();
    let (_log_b, mut sm_b) = create_and_open(&b, &shard_m()).await;
    let mut idx_b = 0;
    load(
        &mut sm_b,
        &mut idx_b,
        (0..50u32).map(|i| (format!("mstale{i}").into_bytes(), b"old".to_vec())),
    )
    .await;
    sm_b.install_snapshot(&snap.meta, snap.snapshot.clone())
        .await
        .unwrap();

    eprintln!("--- data equal, neighbours untouched, state from the snapshot");
    let want = dump(&a, &shard_m().range);
    assert_eq!(want.len() as u64, KEYS);
    assert!(
        dump(&b, &shard_m().range) == want,
        "installed range differs from the source"
    );
    for (d, before) in neighbours().iter().zip(&neighbours_b) {
        assert!(&dump(&b, &d.range) == before, "neighbour {} changed", d.id);
    }
    let (applied, mem) = sm_b.applied_state().await.unwrap();
    assert_eq!(applied, snap.meta.last_log_id);
    assert_eq!(mem, snap.meta.last_membership);
    eprintln!("--- installing the same snapshot again keeps a readable current file");
    sm_b.install_snapshot(&snap.meta, snap.snapshot.clone())
        .await
        .unwrap();
    let mut again = SnapshotReader::open(
        sm_b.get_current_snapshot()
            .await
            .unwrap()
            .unwrap()
            .snapshot
            .path(),
    )
    .unwrap();
    let mut n = 0u64;
    while let Some(c) = again.next_chunk().unwrap() {
        n += c.len() as u64;
    }
    assert_eq!(n, KEYS);
    let cur = sm_b
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("installed snapshot is current");
    assert_eq!(cur.meta, snap.meta);

    eprintln!("--- survives a reopen");
    drop((sm_b, _log_b));
    drop(b);
    let b = open_engine(dir_b.path());
    let (_log, mut sm) = b.open_shard(ShardId(10)).unwrap();
    assert_eq!(sm.applied_state().await.unwrap().0, snap.meta.last_log_id);
    assert_eq!(
        sm.get_current_snapshot().await.unwrap().unwrap().meta,
        snap.meta
    );
    assert!(dump(&b, &shard_m().range) == want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_snapshot_files_are_refused_before_anything_changes() {
    let dir = tempfile::tempdir().unwrap();
    let e = open_engine(dir.path());
    let (_l, mut src) = create_and_open(&e, &shard_m()).await;
    let mut idx = 0;
    load(
        &mut src,
        &mut idx,
        (0..3000u32).map(|i| (format!("m{i:05}").into_bytes(), vec![b'v'; 500])),
    )
    .await;
    let snap = src
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let bytes = std::fs::read(snap.snapshot.path()).unwrap();

    let target_desc = ShardDescriptor::new(
        ShardId(11),
        KeyRange::new(b"m".to_vec(), b"n".to_vec()),
        vec![NodeId(1)],
    );
    // A second db, so the target's range is its own.
    let dir2 = tempfile::tempdir().unwrap();
    let e2 = open_engine(dir2.path());
    let (_l2, mut dst) = create_and_open(&e2, &target_desc).await;
    let mut idx2 = 0;
    load(
        &mut dst,
        &mut idx2,
        (0..10u32).map(|i| (format!("mkeep{i}").into_bytes(), b"keep".to_vec())),
    )
    .await;
    let before = dump(&e2, &target_desc.range);

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", bytes[..bytes.len() - 10].to_vec()),
        ("flipped byte", {
            let mut b = bytes.clone();
            let mid = b.len() / 2;
            b[mid] ^= 0xff;
            b
        }),
        ("bad magic", {
            let mut b = bytes.clone();
            b[0] = b'X';
            b
        }),
        ("huge frame length", {
            let mut b = bytes[..8].to_vec();
            b.extend_from_slice(&u32::MAX.to_be_bytes());
            b.extend_from_slice(&[0; 4]);
            b
        }),
        ("garbage", vec![0xAB; 4096]),
    ];
    for (name, content) in cases {
        let path = dir2
            .path()
            .join(format!("bad-{}.snap", name.replace(' ', "-")));
        std::fs::write(&path, &content).unwrap();
        let err = dst
            .install_snapshot(&snap.meta, SnapshotData::from_file(&path))
            .await
            .expect_err(name);
        assert!(err.to_string().contains("corrupt"), "{name}: {err}");
        let direct = (|| -> Result<(), StoreError> {
            let mut r = SnapshotReader::open(&path)?;
            while r.next_chunk()?.is_some() {}
            Ok(())
        })();
        assert!(
            matches!(direct, Err(StoreError::Corrupt { .. })),
            "{name}: {direct:?}"
        );
        assert!(
            dump(&e2, &target_desc.range) == before,
            "{name}: data changed"
        );
    }
}
