//! `peers.toml` in a node's data folder: the peers it learned at run time
//! (nodes that joined), merged with the configured ones at start.

use crate::net::PeerAddr;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `peers.toml` could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PeersFileError {
    /// Reading, writing or syncing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid peer list.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

const FILE: &str = "peers.toml";

#[derive(Debug, Default, Serialize, Deserialize)]
struct PeersFile {
    #[serde(default)]
    peers: Vec<PeerAddr>,
}

/// The learned peers (empty when none were saved).
///
/// # Errors
/// An unreadable or invalid file, with its path.
pub fn load(data_dir: &Path) -> Result<Vec<PeerAddr>, PeersFileError> {
    let path = data_dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str::<PeersFile>(&text)
            .map(|f| f.peers)
            .map_err(|e| PeersFileError::Invalid {
                path,
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(PeersFileError::Io { path, source }),
    }
}

/// Replaces the saved list with `current()`, one save at a time in this
/// process: two joins learned at once both wrote the same temporary file,
/// and the second rename failed (its file was already gone). The list is
/// read under the lock, so the last save is the newest list.
///
/// # Errors
/// The I/O error, with its path.
pub fn save_current(
    data_dir: &Path,
    current: impl FnOnce() -> Vec<PeerAddr>,
) -> Result<(), PeersFileError> {
    static SAVING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _saving = SAVING.lock().unwrap_or_else(|e| e.into_inner());
    save(data_dir, &current())
}

/// Replaces the saved list (written to a temporary file, synced, renamed).
///
/// # Errors
/// The I/O error, with its path.
fn save(data_dir: &Path, peers: &[PeerAddr]) -> Result<(), PeersFileError> {
    let path = data_dir.join(FILE);
    let tmp = data_dir.join(format!("{FILE}.tmp"));
    let text = toml::to_string(&PeersFile {
        peers: peers.to_vec(),
    })
    .map_err(|e| PeersFileError::Invalid {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(data_dir)?.sync_all()
    };
    write().map_err(|source| PeersFileError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeId;
    use std::sync::{Arc, Mutex};

    /// Joins learned at once (each thread adds a peer and saves the whole
    /// list) all succeed, and the file ends with every peer: before the
    /// saves were serialized, a rename could find its temporary file gone.
    #[test]
    fn concurrent_saves_all_succeed_and_keep_every_peer() {
        let dir = tempfile::tempdir().expect("temp dir");
        let known = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (1..=16u64)
            .map(|i| {
                let (dir, known) = (dir.path().to_path_buf(), known.clone());
                std::thread::spawn(move || {
                    known.lock().unwrap().push(PeerAddr {
                        id: NodeId(i),
                        addr: format!("127.0.0.1:{}", 5000 + i).parse().unwrap(),
                    });
                    save_current(&dir, || known.lock().unwrap().clone())
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread").expect("save");
        }
        let mut ids: Vec<u64> = load(dir.path())
            .expect("load")
            .iter()
            .map(|p| p.id.0)
            .collect();
        ids.sort();
        assert_eq!(ids, (1..=16).collect::<Vec<_>>());
    }
}
