//! The client protocol: one request and one response per QUIC stream, on
//! connections with the client ALPN ([`crate::tls::CLIENT_ALPN`]).
//!
//! ```text
//! stream = frame(Request) → frame(Response)      (crate::wire frames)
//! ```
//!
//! Every data request names the shard and the epoch the client believes in;
//! the serving replica checks both, the keys against the shard's range and
//! the limits, and that it leads the shard. Stale routes are answered with a
//! typed [`ApiError`] carrying what the client needs to correct itself.

pub mod call;
pub mod mux;

use crate::command::{Op, OpResult};
use crate::limits::LimitError;
use crate::session::SessionStamp;
use crate::{Epoch, NodeId, ShardDescriptor, ShardId};
use serde::{Deserialize, Serialize};

/// Most pairs one scan request returns (the client pages past it; a page
/// is also bounded in bytes by the node's `api.response_bytes_max`).
pub const SCAN_LIMIT_MAX: u32 = 10_000;

/// A client request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Linearizable reads of keys of one shard.
    Get {
        /// The shard the client believes owns the keys.
        shard: ShardId,
        /// The shard's epoch as the client knows it.
        epoch: Epoch,
        /// The keys (1..=1024).
        keys: Vec<Vec<u8>>,
    },
    /// Operations applied atomically, in order, on one shard.
    Write {
        /// The shard.
        shard: ShardId,
        /// Its epoch as the client knows it.
        epoch: Epoch,
        /// The operations (1..=1024, at most 4 MiB).
        ops: Vec<Op>,
        /// The client session's stamp, the same on every attempt of this
        /// write: applied at most once, a retry answered with the first
        /// results ([`crate::session`]). `None`: at least once.
        session: Option<SessionStamp>,
    },
    /// A linearizable scan of `[start, end)` within one shard.
    Scan {
        /// The shard.
        shard: ShardId,
        /// Its epoch as the client knows it.
        epoch: Epoch,
        /// First key (inclusive).
        start: Vec<u8>,
        /// End (exclusive); empty: the end of the shard.
        end: Vec<u8>,
        /// Most pairs to return (at most [`SCAN_LIMIT_MAX`]).
        limit: u32,
    },
    /// The descriptors of every shard the node hosts, with leaders as it
    /// knows them.
    Routes,
    /// The node's view of itself: shards, leaders, sizes.
    NodeStatus,
    /// Admin: split `shard` at `key` (sent to its leader; `epoch` as for
    /// data requests). Answered [`Response::Split`].
    Split {
        /// The shard.
        shard: ShardId,
        /// The epoch the client believes in.
        epoch: Epoch,
        /// The first key of the new right half.
        key: Vec<u8>,
    },
    /// Admin: move `shard`'s replica from node `from` to node `to` (sent to
    /// its leader). Answered [`Response::Descriptor`]; a `NotLeader` answer
    /// naming another node means "leadership moved there, ask it".
    MoveReplica {
        /// The shard.
        shard: ShardId,
        /// The node giving up its replica.
        from: NodeId,
        /// The node receiving one.
        to: NodeId,
    },
    /// Admin: merge shard `right` into its left neighbour `left` (sent to
    /// `left`'s leader; both must have their replicas on the same nodes).
    /// Answered [`Response::Descriptor`] with the grown left shard.
    Merge {
        /// The shard taking the range.
        left: ShardId,
        /// The shard merged away.
        right: ShardId,
    },
    /// Admin: make `to` the leader of `shard` (sent to its leader).
    /// Answered [`Response::Done`].
    TransferLeader {
        /// The shard.
        shard: ShardId,
        /// The voter to lead.
        to: NodeId,
    },
    /// A node announces itself (sent with that node's own certificate):
    /// every node learns its address. Answered [`Response::Peers`].
    Join {
        /// The joining node.
        node: NodeId,
        /// Its QUIC address.
        addr: std::net::SocketAddr,
    },
    /// Every node the answering node knows, itself included. Answered
    /// [`Response::Peers`].
    Peers,
    /// The shards' load as their leaders last reported it to the meta
    /// shard, read from the answering node's replica of it (refused with
    /// [`ApiError::UnknownShard`] for the meta shard by a node without
    /// one). Answered [`Response::LoadReports`].
    LoadReports,
    /// Admin, to `shard`'s leader: commit a digest entry; every replica
    /// hashes its state as of it ([`crate::digest`]). Answered
    /// [`Response::DigestAt`] with the entry's log index.
    MarkDigest {
        /// The shard.
        shard: ShardId,
        /// Its epoch as the client knows it.
        epoch: Epoch,
    },
    /// This node's digest of its replica of `shard` at log `index`.
    /// Answered [`Response::Digest`].
    Digest {
        /// The shard.
        shard: ShardId,
        /// The digest entry's log index.
        index: u64,
    },
    /// Opens a multiplexed stream: the stream this comes on carries many
    /// `(id, Request)` frames from here on, answered `(id, Response)` in
    /// any order ([`mux`]). Answered [`Response::Done`] first.
    Mux,
}

/// One shard as a node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardStatus {
    /// The descriptor (range, epoch, replicas, leader hint).
    pub descriptor: ShardDescriptor,
    /// The leader this replica knows of.
    pub leader: Option<NodeId>,
    /// Approximate bytes of the shard's data on this node (on disk,
    /// compressed, plus what is still in memtables).
    pub size_bytes: u64,
    /// The last applied log index.
    pub applied_index: u64,
    /// The replica's current Raft term.
    pub term: u64,
    /// Keys read per second through this replica (decayed over about 10 s;
    /// requests are served by leaders, so followers read about 0).
    pub reads_per_s: f64,
    /// Write operations per second through this replica (decayed likewise).
    pub writes_per_s: f64,
    /// Key and value bytes written per second through this replica.
    pub write_bytes_per_s: f64,
    /// Whether the replica runs on the node's batch system
    /// (`raft.batch_data_shards`) rather than on openraft.
    pub batch: bool,
    /// The first index in the replica's log: the entries before it were
    /// purged (openraft, after a snapshot) or compacted (batch system).
    /// `None` when the log is not open (a dormant replica).
    pub log_first_index: Option<u64>,
}

/// A node's answer to [`Request::NodeStatus`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node.
    pub node: NodeId,
    /// Every hosted shard.
    pub shards: Vec<ShardStatus>,
}

/// A server's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Values of a [`Request::Get`], in request order: the first keys'
    /// (at least one), as many as fit the node's response bound; the client
    /// asks again for the rest.
    Values(Vec<Option<Vec<u8>>>),
    /// Results of a [`Request::Write`], one per operation.
    Written(Vec<OpResult>),
    /// Pairs of a [`Request::Scan`], in key order; `more` when the limit or
    /// the node's response bound cut the shard's range short (the next
    /// page starts right after the last key).
    Pairs {
        /// The pairs.
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
        /// Whether pairs remain in the requested range.
        more: bool,
    },
    /// Answer to [`Request::Routes`].
    Routes(Vec<ShardDescriptor>),
    /// Answer to [`Request::NodeStatus`].
    NodeStatus(NodeStatus),
    /// A split happened: the two halves.
    Split {
        /// The shrunk parent.
        left: ShardDescriptor,
        /// The new shard.
        right: ShardDescriptor,
    },
    /// The shard's descriptor after an admin step.
    Descriptor(ShardDescriptor),
    /// Done.
    Done,
    /// Nodes and their addresses.
    Peers(Vec<(NodeId, std::net::SocketAddr)>),
    /// Answer to [`Request::LoadReports`], in shard id order.
    LoadReports(Vec<crate::command::LoadReport>),
    /// The log index of a committed digest entry.
    DigestAt {
        /// The entry's index.
        index: u64,
    },
    /// A replica's digest (or why there is none yet).
    Digest(crate::digest::DigestStatus),
    /// The request was refused.
    Error(ApiError),
}

/// Why a server refused a request. Every variant but `Limit` and `Internal`
/// is a routing correction the client applies before retrying.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApiError {
    /// This replica does not lead the shard.
    #[error("{shard}: not the leader (leader hint: {leader_hint:?})")]
    NotLeader {
        /// The shard.
        shard: ShardId,
        /// The leader this replica knows of.
        leader_hint: Option<NodeId>,
    },
    /// The client's epoch is not the shard's.
    #[error("{shard}: epoch mismatch")]
    EpochMismatch {
        /// The shard.
        shard: ShardId,
        /// The current descriptors covering what the client asked for.
        current: Vec<ShardDescriptor>,
    },
    /// A key lies outside the shard's range.
    #[error("{shard}: key outside the shard's range")]
    KeyNotInRange {
        /// The shard.
        shard: ShardId,
        /// The first offending key.
        key: Vec<u8>,
    },
    /// The node hosts no replica of the shard.
    #[error("{shard} is not hosted by this node")]
    UnknownShard {
        /// The shard.
        shard: ShardId,
    },
    /// The request is over a limit; nothing was done.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// The shard cannot serve right now (no quorum, shutting down).
    #[error("{shard} unavailable: {reason}")]
    Unavailable {
        /// The shard.
        shard: ShardId,
        /// Why.
        reason: String,
    },
    /// A malformed request (the client's fault: retrying it cannot help).
    #[error("{0}")]
    Invalid(String),
    /// A retried session write that was applied before, but whose results
    /// were too large to keep: it took effect exactly once, nothing was
    /// applied now, and its results are unknown.
    #[error("{shard}: the write was applied earlier; its results were not kept")]
    AppliedEarlier {
        /// The shard.
        shard: ShardId,
    },
    /// An admin request (split, move, leader transfer) from a connection
    /// whose certificate is not an admin certificate; nothing was done.
    #[error("permission denied: {request} needs an admin certificate")]
    PermissionDenied {
        /// What was asked.
        request: String,
    },
    /// A session write that was not applied: its client had given it up
    /// (it acknowledged later writes), or its stamp is malformed.
    #[error("{shard}: session write refused: {reason}")]
    SessionRefused {
        /// The shard.
        shard: ShardId,
        /// Why.
        reason: String,
    },
    /// The server failed (a storage error, an answer too large to frame, a
    /// node stopping): not the request's fault. A write may or may not
    /// have taken effect.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Request {
    /// Whether only an admin certificate (or a cluster node's own) may ask
    /// this (splits, merges, replica moves, leader transfers, digests:
    /// they hash whole shards).
    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            Request::Split { .. }
                | Request::Merge { .. }
                | Request::MoveReplica { .. }
                | Request::TransferLeader { .. }
                | Request::MarkDigest { .. }
        )
    }

    /// The request's kind, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Get { .. } => "get",
            Request::Write { .. } => "write",
            Request::Scan { .. } => "scan",
            Request::Routes => "routes",
            Request::NodeStatus => "node status",
            Request::Split { .. } => "split",
            Request::Merge { .. } => "merge",
            Request::MoveReplica { .. } => "move-replica",
            Request::TransferLeader { .. } => "transfer-leader",
            Request::Join { .. } => "join",
            Request::Peers => "peers",
            Request::LoadReports => "load reports",
            Request::MarkDigest { .. } => "verify",
            Request::Digest { .. } => "digest",
            Request::Mux => "mux",
        }
    }

    /// Checks the request against the limits (done by the client before
    /// sending and again by the server before any work).
    ///
    /// # Errors
    /// The first [`LimitError`] found.
    pub fn validate(&self) -> Result<(), LimitError> {
        use crate::limits::{self, BATCH_OPS_MAX};
        match self {
            Request::Get { keys, .. } => {
                if keys.is_empty() || keys.len() > BATCH_OPS_MAX {
                    return Err(LimitError::BatchOps {
                        ops: keys.len(),
                        max: BATCH_OPS_MAX,
                    });
                }
                keys.iter().try_for_each(|k| limits::check_key(k))
            }
            Request::Write { ops, .. } => crate::command::validate_ops(ops),
            Request::Scan { start, end, .. } => {
                if start.len() > limits::KEY_BYTES_MAX {
                    limits::check_key(start)?;
                }
                if end.len() > limits::USER_KEYS_END_BYTES {
                    limits::check_key(end)?;
                }
                Ok(())
            }
            Request::Split { key, .. } => limits::check_key(key),
            Request::Routes
            | Request::NodeStatus
            | Request::Merge { .. }
            | Request::MoveReplica { .. }
            | Request::TransferLeader { .. }
            | Request::Join { .. }
            | Request::Peers
            | Request::LoadReports
            | Request::MarkDigest { .. }
            | Request::Digest { .. }
            | Request::Mux => Ok(()),
        }
    }
}
