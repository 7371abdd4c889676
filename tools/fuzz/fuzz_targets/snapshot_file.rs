//! Snapshot files (`tessera::storage::snapshot::SnapshotReader`): fuzz bytes
//! written to a file (one per process, rewritten every run) and read back
//! chunk by chunk.
//!
//! The first input byte picks how the rest becomes a file:
//! - 0: the bytes as they are;
//! - 1: `MAGIC` then the bytes;
//! - 2: `MAGIC`, a valid header frame, then the rest cut into frames with
//!   correct lengths and checksums (so the fuzzer reaches chunk and footer
//!   decoding and the totals check past the CRC);
//! - 3: like 2, but the header frame's payload also comes from the input.
//!
//! Asserts: opening and reading never panic, never allocate over one frame
//! (16 MiB, the documented bound), and fail only with `StoreError::Corrupt`;
//! the read ends (no endless chunk stream); after the footer the reader keeps
//! answering `None`; a file that reads whole round-trips: writing its header
//! and chunks with `SnapshotWriter` gives a file that reads back equal, and
//! writing that one again gives identical bytes (the encoding is canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera::raft::{log_id, SnapshotMeta, StoredMembership};
use std::path::PathBuf;
use std::sync::OnceLock;
use tessera::storage::snapshot::{Frame, Pair, SnapshotHeader, SnapshotReader, SnapshotWriter, MAGIC};
use tessera::storage::StoreError;
use tessera::{KeyRange, NodeId, ShardDescriptor, ShardId};

tessera_fuzz::limit_alloc!();

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("tessera-fuzz-snapshot-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        extern "C" fn cleanup() {
            if let Some(d) = DIR.get() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        extern "C" {
            fn atexit(cb: extern "C" fn()) -> i32;
        }
        unsafe { atexit(cleanup) };
        d
    })
}

fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
    out.extend_from_slice(payload);
}

fn header() -> SnapshotHeader {
    SnapshotHeader {
        descriptor: ShardDescriptor::new(
            ShardId(7),
            KeyRange::new(b"a".to_vec(), b"z".to_vec()),
            vec![NodeId(1)],
        ),
        meta: SnapshotMeta {
            last_log_id: Some(log_id(3, NodeId(1), 42)),
            last_membership: StoredMembership::default(),
        },
    }
}

/// Cuts `rest` into frames: u16 BE length, then that many bytes (or fewer at the end).
fn frames(out: &mut Vec<u8>, mut rest: &[u8]) {
    while rest.len() >= 2 {
        let n = (u16::from_be_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        frame(out, &rest[2..2 + n]);
        rest = &rest[2 + n..];
    }
    out.extend_from_slice(rest);
}

fn build_file(data: &[u8]) -> Option<Vec<u8>> {
    let (&mode, rest) = data.split_first()?;
    let mut out = Vec::with_capacity(data.len() + 64);
    match mode % 4 {
        0 => out.extend_from_slice(rest),
        1 => {
            out.extend_from_slice(&MAGIC);
            out.extend_from_slice(rest);
        }
        2 => {
            out.extend_from_slice(&MAGIC);
            let h = postcard::to_stdvec(&Frame::Header(Box::new(header()))).unwrap();
            frame(&mut out, &h);
            frames(&mut out, rest);
        }
        _ => {
            out.extend_from_slice(&MAGIC);
            frames(&mut out, rest);
        }
    }
    Some(out)
}

/// Reads a whole file: its header and chunks, or the first error.
fn read_all(path: &PathBuf) -> Result<(SnapshotHeader, Vec<Vec<Pair>>), StoreError> {
    let mut r = SnapshotReader::open(path)?;
    let len = std::fs::metadata(path).unwrap().len();
    let mut chunks = Vec::new();
    while let Some(c) = r.next_chunk()? {
        chunks.push(c);
        // Every frame takes at least its 8-byte head.
        assert!(chunks.len() as u64 * 8 <= len, "more chunks than the file holds");
    }
    assert!(r.next_chunk().unwrap().is_none(), "a finished reader stays finished");
    assert!(r.next_chunk().unwrap().is_none(), "a finished reader stays finished");
    Ok((r.header().clone(), chunks))
}

fn write_all(name: &str, header: &SnapshotHeader, chunks: &[Vec<Pair>]) -> PathBuf {
    let d = dir();
    let mut w = SnapshotWriter::create(d.join(format!("{name}.tmp")), header).unwrap();
    for c in chunks {
        w.write_chunk(c.clone()).unwrap();
    }
    w.finish(d.join(name)).unwrap().path().to_path_buf()
}

fuzz_target!(|data: &[u8]| {
    let Some(bytes) = build_file(data) else {
        return;
    };
    let path = dir().join("input.snap");
    std::fs::write(&path, &bytes).unwrap();
    match read_all(&path) {
        Ok((header, chunks)) => {
            let p1 = write_all("again.snap", &header, &chunks);
            let (h1, c1) = read_all(&p1).expect("a written snapshot reads back");
            assert_eq!(h1, header);
            assert_eq!(c1, chunks);
            let p2 = write_all("twice.snap", &h1, &c1);
            assert_eq!(
                std::fs::read(&p1).unwrap(),
                std::fs::read(&p2).unwrap(),
                "re-writing a snapshot is not canonical"
            );
        }
        Err(StoreError::Corrupt { .. }) => {}
        Err(e) => panic!("a damaged snapshot file must read as corrupt, got {e}"),
    }
});
