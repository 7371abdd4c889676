//! Logical range snapshots: a shard's descriptor, Raft metadata and the
//! key/value pairs of its range, as a file of bounded, checksummed frames.
//!
//! ```text
//! magic "TSNAP\0\0\x01"
//! frame*  = len: u32 BE | crc32(payload): u32 BE | payload (postcard `Frame`)
//! frames  = Header, Sessions*, Chunk*, Footer
//! ```
//!
//! `Sessions` frames carry the shard's client sessions (exactly-once
//! writes, [`crate::session`]); files written before sessions existed have
//! none and install an empty table.
//!
//! A snapshot is produced from a RocksDB snapshot one chunk at a time and
//! installed one chunk at a time: no shard is ever held whole in memory. A
//! reader checks every frame's length against [`FRAME_BYTES_MAX`] before
//! allocating, its checksum before decoding, and the footer's totals before
//! declaring the file complete.

use super::engine::{encode, sync_dir};
use super::error::StoreError;
use crate::limits::FRAME_BYTES_MAX;
use crate::raft::SnapshotMeta;
use crate::session::{ClientId, Session, SESSIONS_MAX};
use crate::ShardDescriptor;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// First bytes of every snapshot file (format version 1).
pub const MAGIC: [u8; 8] = *b"TSNAP\0\0\x01";

/// One key/value pair.
pub type Pair = (Vec<u8>, Vec<u8>);

/// What a snapshot is of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// The shard (range and epoch) the data belongs to.
    pub descriptor: ShardDescriptor,
    /// openraft's metadata: last included log id and membership.
    pub meta: SnapshotMeta,
}

/// One frame of a snapshot file.
#[derive(Debug, Serialize, Deserialize)]
pub enum Frame {
    /// Always first.
    Header(Box<SnapshotHeader>),
    /// Pairs in key order, at most the configured chunk size.
    Chunk(Vec<Pair>),
    /// Always last: totals that prove the file complete.
    Footer {
        /// Pairs in all chunks.
        pairs: u64,
        /// Key and value bytes in all chunks.
        data_bytes: u64,
    },
    /// Client sessions, in client order (after the header, before the
    /// chunks; appended as a new variant so older files still read).
    Sessions(Vec<(ClientId, Session)>),
    /// The shard's merge freeze, when it is frozen (after the header,
    /// before the chunks; a new variant, so older files still read).
    Merge(crate::command::MergeMarker),
}

pub use crate::raft::SnapshotData;

/// Writes a snapshot file: header first, chunks, then [`Self::finish`].
pub struct SnapshotWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    pairs: u64,
    data_bytes: u64,
}

impl SnapshotWriter {
    /// Creates `tmp` and writes the magic and header.
    pub fn create(tmp: impl Into<PathBuf>, header: &SnapshotHeader) -> Result<Self, StoreError> {
        let tmp = tmp.into();
        let f = File::create(&tmp).map_err(|e| StoreError::io("create snapshot", &tmp, e))?;
        let mut w = SnapshotWriter {
            out: BufWriter::with_capacity(1 << 20, f),
            tmp,
            pairs: 0,
            data_bytes: 0,
        };
        w.write_bytes(&MAGIC)?;
        w.write_frame(&Frame::Header(Box::new(header.clone())))?;
        Ok(w)
    }

    /// Appends one chunk of pairs (in key order, after every earlier chunk).
    pub fn write_chunk(&mut self, pairs: Vec<Pair>) -> Result<(), StoreError> {
        self.pairs += pairs.len() as u64;
        self.data_bytes += pairs
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum::<u64>();
        self.write_frame(&Frame::Chunk(pairs))
    }

    /// Writes the shard's client sessions in frames of about `frame_bytes`
    /// (before any chunk).
    pub fn write_sessions(
        &mut self,
        rows: Vec<(ClientId, Session)>,
        frame_bytes: usize,
    ) -> Result<(), StoreError> {
        let mut frame = Vec::new();
        let mut bytes = 0usize;
        for (c, s) in rows {
            bytes += encode(&s).len() + 16;
            frame.push((c, s));
            if bytes >= frame_bytes {
                self.write_frame(&Frame::Sessions(std::mem::take(&mut frame)))?;
                bytes = 0;
            }
        }
        if !frame.is_empty() {
            self.write_frame(&Frame::Sessions(frame))?;
        }
        Ok(())
    }

    /// Writes the shard's merge freeze (before any chunk).
    pub fn write_merge(&mut self, marker: crate::command::MergeMarker) -> Result<(), StoreError> {
        self.write_frame(&Frame::Merge(marker))
    }

    /// Writes the footer, syncs the file, renames it to `path` and syncs the
    /// folder: once this returns, the snapshot survives a crash.
    pub fn finish(mut self, path: impl Into<PathBuf>) -> Result<SnapshotData, StoreError> {
        let path = path.into();
        let footer = Frame::Footer {
            pairs: self.pairs,
            data_bytes: self.data_bytes,
        };
        self.write_frame(&footer)?;
        let tmp = self.tmp.clone();
        let f = self
            .out
            .into_inner()
            .map_err(|e| StoreError::io("flush snapshot", &tmp, e.into_error()))?;
        f.sync_all()
            .map_err(|e| StoreError::io("sync snapshot", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| StoreError::io("rename snapshot", &tmp, e))?;
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        Ok(SnapshotData::from_file(path))
    }

    fn write_frame(&mut self, frame: &Frame) -> Result<(), StoreError> {
        let payload = encode(frame);
        assert!(
            payload.len() <= FRAME_BYTES_MAX,
            "snapshot frame of {} bytes: chunks are bounded by config",
            payload.len()
        );
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&(payload.len() as u32).to_be_bytes());
        head[4..].copy_from_slice(&crc32fast::hash(&payload).to_be_bytes());
        self.write_bytes(&head)?;
        self.write_bytes(&payload)
    }

    fn write_bytes(&mut self, b: &[u8]) -> Result<(), StoreError> {
        self.out
            .write_all(b)
            .map_err(|e| StoreError::io("write snapshot", &self.tmp, e))
    }
}

/// Reads a snapshot file chunk by chunk, validating as it goes.
pub struct SnapshotReader {
    input: BufReader<File>,
    path: PathBuf,
    header: SnapshotHeader,
    pairs: u64,
    data_bytes: u64,
    done: bool,
    sessions: Vec<(ClientId, Session)>,
    merge: Option<crate::command::MergeMarker>,
}

/// The header of the snapshot file at `path` (its range, epoch and
/// metadata), without reading the data.
///
/// # Errors
/// [`StoreError::Io`] or [`StoreError::Corrupt`] for an unreadable file.
pub fn read_header(path: impl Into<PathBuf>) -> Result<SnapshotHeader, StoreError> {
    Ok(SnapshotReader::open(path)?.header)
}

impl SnapshotReader {
    /// Opens `path` and reads its magic and header.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let path = path.into();
        let f = File::open(&path).map_err(|e| StoreError::io("open snapshot", &path, e))?;
        let mut input = BufReader::with_capacity(1 << 20, f);
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic).map_err(|e| {
            StoreError::corrupt(path.display().to_string(), format!("no magic: {e}"))
        })?;
        if magic != MAGIC {
            return Err(StoreError::corrupt(path.display().to_string(), "bad magic"));
        }
        let header = match read_frame(&mut input, &path)? {
            Some(Frame::Header(h)) => *h,
            _ => return Err(StoreError::corrupt(path.display().to_string(), "no header")),
        };
        Ok(SnapshotReader {
            input,
            path,
            header,
            pairs: 0,
            data_bytes: 0,
            done: false,
            sessions: Vec::new(),
            merge: None,
        })
    }

    /// The client sessions read so far (all of them once
    /// [`Self::next_chunk`] returned `None`), taken out of the reader.
    pub fn take_sessions(&mut self) -> Vec<(ClientId, Session)> {
        std::mem::take(&mut self.sessions)
    }

    /// The merge freeze, if the file has one (known once
    /// [`Self::next_chunk`] returned `None`).
    pub fn merge(&self) -> Option<&crate::command::MergeMarker> {
        self.merge.as_ref()
    }

    /// The header.
    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    /// The next chunk, or `None` after a footer whose totals match.
    ///
    /// # Errors
    /// A truncated, oversized, garbled or out-of-order frame, or totals that
    /// do not match the footer.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<Pair>>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let corrupt = |d: &str| StoreError::corrupt(self.path.display().to_string(), d);
        let mut frame = read_frame(&mut self.input, &self.path)?;
        loop {
            match frame {
                Some(Frame::Sessions(rows)) => {
                    if self.pairs > 0 || self.sessions.len() + rows.len() > SESSIONS_MAX {
                        return Err(corrupt("sessions after the data, or too many"));
                    }
                    self.sessions.extend(rows);
                }
                Some(Frame::Merge(m)) => {
                    if self.pairs > 0 || self.merge.is_some() {
                        return Err(corrupt("a merge freeze after the data, or two"));
                    }
                    self.merge = Some(m);
                }
                other => {
                    frame = other;
                    break;
                }
            }
            frame = read_frame(&mut self.input, &self.path)?;
        }
        match frame {
            Some(Frame::Chunk(pairs)) => {
                self.pairs += pairs.len() as u64;
                self.data_bytes += pairs
                    .iter()
                    .map(|(k, v)| (k.len() + v.len()) as u64)
                    .sum::<u64>();
                Ok(Some(pairs))
            }
            Some(Frame::Footer { pairs, data_bytes }) => {
                if pairs != self.pairs || data_bytes != self.data_bytes {
                    return Err(corrupt("footer totals do not match the chunks"));
                }
                let mut probe = [0u8; 1];
                if self
                    .input
                    .read(&mut probe)
                    .map_err(|e| StoreError::io("read snapshot", &self.path, e))?
                    != 0
                {
                    return Err(corrupt("bytes after the footer"));
                }
                self.done = true;
                Ok(None)
            }
            Some(Frame::Header(_)) => Err(corrupt("second header")),
            Some(Frame::Sessions(_) | Frame::Merge(_)) => unreachable!("read above"),
            None => Err(corrupt("truncated: no footer")),
        }
    }
}

/// Reads one frame; `None` at a clean end of file.
fn read_frame(input: &mut impl Read, path: &Path) -> Result<Option<Frame>, StoreError> {
    let corrupt = |d: String| StoreError::corrupt(path.display().to_string(), d);
    let mut head = [0u8; 8];
    let mut got = 0;
    while got < head.len() {
        match input.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(corrupt("truncated frame header".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StoreError::io("read snapshot", path, e)),
        }
    }
    let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_be_bytes(head[4..].try_into().expect("4 bytes"));
    crate::limits::check_frame_len(len, FRAME_BYTES_MAX).map_err(|e| corrupt(e.to_string()))?;
    let mut payload = vec![0u8; len];
    input
        .read_exact(&mut payload)
        .map_err(|e| corrupt(format!("truncated frame: {e}")))?;
    if crc32fast::hash(&payload) != crc {
        return Err(corrupt("frame checksum mismatch".into()));
    }
    postcard::from_bytes(&payload)
        .map(Some)
        .map_err(|e| corrupt(format!("undecodable frame: {e}")))
}
