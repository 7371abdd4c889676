//! Replica digests: what `tessera-ctl verify` compares.
//!
//! A digest is taken at a point of a shard's log, not of the clock: the
//! leader proposes [`crate::command::Command::Digest`], and every replica,
//! when it applies that entry, takes a RocksDB snapshot of its state right
//! after it and hashes the shard's key range and client sessions in the
//! background. Replicas that agree hold the same state at the same index;
//! one that differs shows as a different digest.
//!
//! Pure: the hash ([`Digester`]) and the answers ([`DigestStatus`]), shared
//! by nodes and clients.

use serde::{Deserialize, Serialize};

/// What one replica's state hashed to at one log index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardDigest {
    /// Key/value pairs in the shard's range.
    pub pairs: u64,
    /// Key and value bytes in the shard's range.
    pub bytes: u64,
    /// Client session rows.
    pub sessions: u64,
    /// 64-bit FNV-1a over every pair and session row, length-prefixed, in
    /// key order.
    pub hash: u64,
}

/// A replica's answer about the digest at one index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DigestStatus {
    /// The replica has not applied that index yet.
    NotYet {
        /// What it has applied.
        applied: u64,
    },
    /// Applied; the hash is being computed.
    Computing,
    /// The digest.
    Done(ShardDigest),
    /// Computing it failed (a storage error).
    Failed(String),
    /// The replica applied past that index without a digest there (no such
    /// digest entry, or its result was dropped: a replica keeps its last few).
    Unknown,
}

/// Streams pairs and session rows into a [`ShardDigest`].
#[derive(Debug, Clone)]
pub struct Digester {
    d: ShardDigest,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

impl Default for Digester {
    fn default() -> Self {
        Digester {
            d: ShardDigest {
                pairs: 0,
                bytes: 0,
                sessions: 0,
                hash: FNV_OFFSET,
            },
        }
    }
}

impl Digester {
    fn feed(&mut self, bytes: &[u8]) {
        for b in (bytes.len() as u64)
            .to_be_bytes()
            .iter()
            .chain(bytes.iter())
        {
            self.d.hash ^= u64::from(*b);
            self.d.hash = self.d.hash.wrapping_mul(FNV_PRIME);
        }
    }

    /// Adds one user pair (in key order).
    pub fn pair(&mut self, key: &[u8], value: &[u8]) {
        self.d.pairs += 1;
        self.d.bytes += (key.len() + value.len()) as u64;
        self.feed(key);
        self.feed(value);
    }

    /// Adds one client session row (after the pairs, in client order).
    pub fn session(&mut self, key: &[u8], value: &[u8]) {
        self.d.sessions += 1;
        self.feed(key);
        self.feed(value);
    }

    /// The digest of everything added.
    pub fn finish(self) -> ShardDigest {
        self.d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(pairs: &[(&[u8], &[u8])]) -> ShardDigest {
        let mut d = Digester::default();
        for (k, v) in pairs {
            d.pair(k, v);
        }
        d.finish()
    }

    #[test]
    fn equal_states_agree_and_any_difference_shows() {
        let a = digest(&[(b"k1", b"v1"), (b"k2", b"v2")]);
        assert_eq!(a, digest(&[(b"k1", b"v1"), (b"k2", b"v2")]));
        assert_ne!(a.hash, digest(&[(b"k1", b"v1"), (b"k2", b"v3")]).hash);
        assert_ne!(a.hash, digest(&[(b"k1", b"v1")]).hash);
        // Lengths are hashed: moving a byte from key to value shows.
        assert_ne!(a.hash, digest(&[(b"k1v", b"1"), (b"k2", b"v2")]).hash);
        assert_eq!((a.pairs, a.bytes), (2, 8));
    }
}

/// Every replica's digest of one shard at one log index
/// (`Client::verify_shard`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardVerification {
    /// The shard.
    pub shard: crate::ShardId,
    /// The digest entry's log index.
    pub index: u64,
    /// Each replica (the shard's voters) and its digest, or why it has none.
    pub replicas: Vec<(crate::NodeId, Result<ShardDigest, String>)>,
}

impl ShardVerification {
    /// Whether every replica answered and all digests are equal.
    pub fn agrees(&self) -> bool {
        let mut digests = self.replicas.iter().map(|(_, d)| d.as_ref().ok());
        match digests.next() {
            Some(Some(first)) => digests.all(|d| d == Some(first)),
            _ => false,
        }
    }
}
