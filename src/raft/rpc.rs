//! The Raft layer's messages between nodes and the calls that carry them.
//!
//! The transport ([`crate::net`]) moves opaque bodies per shard; this module
//! gives them their meaning: [`PeerRequest`] and [`PeerResponse`] (postcard),
//! a snapshot stream's head ([`SnapshotHead`]) and its [`SnapshotReply`].
//! [`call`] and [`send_snapshot`] encode, send and decode, and turn a
//! receiver's [`Refusal`] into a [`CallError`].

use crate::command::{Command, CommandResponse};
use crate::net::coalesce::Urgency;
use crate::net::{SendError, Transport};
use crate::raft::{SnapshotData, SnapshotMeta, TypeConfig, Vote};
use crate::{NodeId, ShardDescriptor, ShardId};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use openraft::raft::{TransferLeaderRequest, TransferLeaderResponse};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A Raft request for one shard's group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerRequest {
    /// AppendEntries (a heartbeat when it carries no entries).
    Append(AppendEntriesRequest<TypeConfig>),
    /// RequestVote.
    Vote(VoteRequest<TypeConfig>),
    /// A pre-vote: would the receiver vote for this candidate (no state
    /// changes on either side)?
    PreVote(VoteRequest<TypeConfig>),
    /// The leader hands leadership to a node (openraft's leader transfer).
    TransferLeader(TransferLeaderRequest<TypeConfig>),
    /// Propose a command to the receiving node's replica of the shard, which
    /// must lead it (forwarded proposals: meta-shard updates, admin steps).
    Propose(Command),
    /// Create an empty replica of the shard here (a move's target, before it
    /// is added as a learner); a no-op when it exists.
    CreateReplica(ShardDescriptor),
    /// The receiving replica was removed from its group: stop it and delete
    /// its log, state and data. `after` is the requester's committed
    /// membership, which no longer lists the receiver; refused while the
    /// receiver knows a newer membership that does.
    DropReplica {
        /// The log id of the requester's membership.
        after: Option<crate::raft::LogId>,
    },
    /// Learn of a node (a node joined the cluster).
    AddPeer {
        /// The node.
        id: NodeId,
        /// Its QUIC address.
        addr: std::net::SocketAddr,
    },
    /// The group's leader asks this follower to sleep (quiescence): its
    /// log ends at `last`, committed and applied, under `vote`.
    Hibernate {
        /// The leader's vote.
        vote: Vote,
        /// The last log id.
        last: Option<crate::raft::LogId>,
    },
    /// A liveness ping between two nodes, standing in for the heartbeats
    /// of every sleeping group between them.
    Ping,
    /// A merge's coordinator asks: has the receiver's replica of the shard
    /// applied its freeze for a merge into `into` at index `at`? Answered
    /// `Done`, or refused with what is missing.
    MergeReady {
        /// The left shard of the merge.
        into: ShardId,
        /// The freeze's log index.
        at: u64,
    },
    /// Create an empty replica of the shard here on the batch Raft system
    /// (a move's target, before it is seeded and added as a learner); a
    /// no-op when it exists. Added last: older nodes answer that they
    /// cannot decode it.
    CreateBatchReplica(ShardDescriptor),
}

impl PeerRequest {
    /// How soon it must leave: heartbeats (AppendEntries without entries)
    /// may wait for company, everything else goes at once.
    pub fn urgency(&self) -> Urgency {
        match self {
            PeerRequest::Append(a) if a.entries.is_empty() => Urgency::Lazy,
            _ => Urgency::Urgent,
        }
    }
}

/// Why a peer did not answer a request with a Raft response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The shard has no replica on the receiving node (not created yet, or
    /// moved away).
    #[error("shard {0} is not hosted by the receiving node")]
    UnknownShard(ShardId),
    /// The receiving group failed (shut down, fatal storage error).
    #[error("receiving group failed: {0}")]
    Failed(String),
    /// A proposal reached a replica that does not lead.
    #[error("not the leader (hint: {0:?})")]
    NotLeader(Option<NodeId>),
    /// A snapshot older than the receiving replica's own descriptor (taken
    /// before a split or membership change the replica already knows).
    #[error("stale snapshot of {shard}: epoch {snapshot:?} is older than the replica's {local:?}")]
    StaleSnapshot {
        /// The shard.
        shard: ShardId,
        /// The snapshot's epoch.
        snapshot: crate::Epoch,
        /// The receiving replica's epoch.
        local: crate::Epoch,
    },
    /// A vote, append or snapshot speaking for node `claimed` arrived over
    /// the connection of node `sender` (each node's certificate names it):
    /// nothing was handed to the group.
    #[error("{shard}: a message speaking for {claimed} came from {sender}")]
    NotTheSender {
        /// The shard.
        shard: ShardId,
        /// The node the message's vote names.
        claimed: NodeId,
        /// The node whose connection carried it.
        sender: NodeId,
    },
    /// The replica was removed from the receiving node at a newer
    /// configuration than the request's.
    #[error("{shard} was removed from the receiving node at conf_ver {conf_ver}")]
    Tombstoned {
        /// The shard.
        shard: ShardId,
        /// The configuration version of the removal.
        conf_ver: u64,
    },
}

/// The answer to one [`PeerRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    /// AppendEntries answered.
    Append(AppendEntriesResponse<TypeConfig>),
    /// RequestVote or a pre-vote answered.
    Vote(VoteResponse<TypeConfig>),
    /// A leader transfer acknowledged.
    TransferLeader(TransferLeaderResponse<TypeConfig>),
    /// A [`PeerRequest::Propose`] was committed and applied.
    Proposed(CommandResponse),
    /// An admin request was carried out.
    Done,
    /// A [`PeerRequest::Ping`] answered, with a random id of the
    /// responder's run (a new one tells a restart).
    Pong {
        /// The responder's boot id.
        boot: u64,
    },
    /// Not answered by Raft.
    Refused(Refusal),
}

/// The acceptor's answer to a snapshot stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SnapshotReply {
    /// Installed (or refused by Raft with a higher vote, which `vote` shows).
    Done {
        /// The receiver's vote after the install.
        vote: Vote,
    },
    /// Not installed.
    Refused(Refusal),
}

/// What a snapshot stream carries besides the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotHead {
    /// The sending leader's vote.
    pub vote: Vote,
    /// The snapshot's metadata.
    pub meta: SnapshotMeta,
}

/// Why a call to a peer got no Raft answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No connection to the peer (down, not yet connected, or lost while
    /// the call waited).
    #[error("{peer} is unreachable: {reason}")]
    Unreachable {
        /// The peer.
        peer: NodeId,
        /// Why.
        reason: String,
    },
    /// The deadline passed without an answer.
    #[error("no answer from {peer} within {after:?}")]
    Timeout {
        /// The peer.
        peer: NodeId,
        /// The deadline.
        after: Duration,
    },
    /// The peer answered, but not with a Raft response.
    #[error("{peer} refused: {refusal}")]
    Refused {
        /// The peer.
        peer: NodeId,
        /// Its reason.
        refusal: Refusal,
    },
    /// The stream broke mid-transfer, or the peer broke the protocol (an
    /// answer that does not decode).
    #[error("transfer to {peer} failed: {reason}")]
    Stream {
        /// The peer.
        peer: NodeId,
        /// Why.
        reason: String,
    },
}

impl From<SendError> for CallError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Unreachable { peer, reason } => CallError::Unreachable { peer, reason },
            SendError::Timeout { peer, after } => CallError::Timeout { peer, after },
            SendError::Stream { peer, reason } => CallError::Stream { peer, reason },
        }
    }
}

fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    postcard::to_stdvec(msg).expect("postcard encodes every Raft message")
}

fn decode<T: serde::de::DeserializeOwned>(peer: NodeId, b: &[u8]) -> Result<T, CallError> {
    postcard::from_bytes(b).map_err(|e| CallError::Stream {
        peer,
        reason: format!("undecodable answer: {e}"),
    })
}

/// Sends `req` to `to`'s replica of `shard` and waits (under `deadline`)
/// for its answer; a refusal is an error.
///
/// # Errors
/// [`CallError`].
pub async fn call(
    transport: &Transport,
    to: NodeId,
    shard: ShardId,
    req: &PeerRequest,
    deadline: Duration,
) -> Result<PeerResponse, CallError> {
    let body = transport
        .call(to, shard, encode(req), req.urgency(), deadline)
        .await?;
    match decode(to, &body)? {
        PeerResponse::Refused(refusal) => Err(CallError::Refused { peer: to, refusal }),
        resp => Ok(resp),
    }
}

/// Streams the snapshot file `data` of `shard` to `to` and waits for the
/// receiver to install it: the receiver's vote after the install.
///
/// # Errors
/// [`CallError`]; a broken stream leaves nothing installed on the peer.
pub async fn send_snapshot(
    transport: &Transport,
    to: NodeId,
    shard: ShardId,
    head: &SnapshotHead,
    data: &SnapshotData,
    deadline: Duration,
) -> Result<Vote, CallError> {
    let reply = transport
        .send_snapshot(to, shard, encode(head), data.path(), deadline)
        .await?;
    match decode(to, &reply)? {
        SnapshotReply::Done { vote } => Ok(vote),
        SnapshotReply::Refused(refusal) => Err(CallError::Refused { peer: to, refusal }),
    }
}

/// Encodes an answer for the transport (the receiving side).
pub fn encode_response(resp: &PeerResponse) -> Vec<u8> {
    encode(resp)
}

/// Encodes a snapshot reply for the transport (the receiving side).
pub fn encode_snapshot_reply(reply: &SnapshotReply) -> Vec<u8> {
    encode(reply)
}
