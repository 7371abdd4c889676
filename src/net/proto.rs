//! The node-to-node protocol on one QUIC connection.
//!
//! ```text
//! stream  = frame(Hello) frame*            every stream opens with a Hello
//! Raft stream (one per direction):
//!   opener → acceptor: batch frames of RequestEnvelope
//!   acceptor → opener: batch frames of ResponseEnvelope
//! Snapshot stream (one per transfer):
//!   opener → acceptor: SnapshotFrame::Head, Chunk*, End
//!   acceptor → opener: one SnapshotReply
//! batch   = tag 0xB1 | count: u32 BE | (len: u32 BE | postcard message)*
//! ```
//!
//! Frames are [`crate::wire`] frames (length checked before allocation).
//! Decoding a batch checks every length against what is left and the count
//! against a maximum: a garbage or truncated batch is a [`ProtoError`].

use super::coalesce::Urgency;
use crate::command::{Command, CommandResponse};
use crate::raft::{SnapshotMeta, TypeConfig, Vote};
use crate::{NodeId, ShardDescriptor, ShardId};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use openraft::raft::{TransferLeaderRequest, TransferLeaderResponse};
use serde::{Deserialize, Serialize};

/// Connection close codes (application error codes of QUIC `CONNECTION_CLOSE`).
pub mod close {
    /// The node is shutting down.
    pub const SHUTDOWN: u32 = 1;
    /// The peer's Hello or certificate was refused.
    pub const REFUSED: u32 = 2;
    /// The peer broke the protocol (garbage, oversized or truncated frames).
    pub const PROTOCOL: u32 = 3;
    /// A newer connection from the same peer replaced this one.
    pub const REPLACED: u32 = 4;
}

/// What a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamKind {
    /// Raft requests one way, their responses the other.
    Raft,
    /// One snapshot transfer.
    Snapshot,
}

/// The first frame of every stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The node that opened the stream (checked against its certificate).
    pub from: NodeId,
    /// The node it means to reach.
    pub to: NodeId,
    /// What the stream carries.
    pub kind: StreamKind,
}

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
    /// Not answered by Raft.
    Refused(Refusal),
}

/// A request on the Raft stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestEnvelope {
    /// Matches the response to the request (unique per stream).
    pub id: u64,
    /// The shard whose group the request is for.
    pub shard: ShardId,
    /// The request.
    pub req: PeerRequest,
}

/// A response on the Raft stream.
#[derive(Debug, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    /// The request's id.
    pub id: u64,
    /// The answer.
    pub resp: PeerResponse,
}

/// Frames of a snapshot stream, opener to acceptor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SnapshotFrame {
    /// What follows.
    Head {
        /// The shard.
        shard: ShardId,
        /// The sending leader's vote.
        vote: Vote,
        /// The snapshot's metadata.
        meta: SnapshotMeta,
    },
    /// Bytes of the snapshot file, in order.
    Chunk(Vec<u8>),
    /// The file is complete: its length, to check nothing was lost.
    End {
        /// Total bytes sent in chunks.
        bytes: u64,
    },
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

/// A malformed batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The frame is not a batch.
    #[error("not a batch frame (tag {0:#x})")]
    NotABatch(u8),
    /// The batch announces more messages than allowed.
    #[error("batch of {count} messages exceeds {max}")]
    TooMany {
        /// Announced count.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A length runs past the end of the frame, or bytes are left over.
    #[error("batch truncated or padded")]
    Malformed,
    /// A message is not valid postcard.
    #[error("undecodable message: {0}")]
    Decode(String),
}

const BATCH_TAG: u8 = 0xB1;

/// Encodes a batch frame (length prefix included) from encoded messages.
pub fn encode_batch(parts: &[Vec<u8>]) -> Vec<u8> {
    let body: usize = parts.iter().map(|p| 4 + p.len()).sum();
    let payload_len = 1 + 4 + body;
    let mut out = Vec::with_capacity(4 + payload_len);
    out.extend_from_slice(&(payload_len as u32).to_be_bytes());
    out.push(BATCH_TAG);
    out.extend_from_slice(&(parts.len() as u32).to_be_bytes());
    for p in parts {
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// Splits a batch frame's payload into its messages, checking every bound.
///
/// # Errors
/// [`ProtoError`] for anything but a well-formed batch of at most `max_msgs`.
pub fn decode_batch(payload: &[u8], max_msgs: usize) -> Result<Vec<&[u8]>, ProtoError> {
    let (&tag, rest) = payload.split_first().ok_or(ProtoError::Malformed)?;
    if tag != BATCH_TAG {
        return Err(ProtoError::NotABatch(tag));
    }
    let (count, mut rest) = take_u32(rest)?;
    if count > max_msgs {
        return Err(ProtoError::TooMany {
            count,
            max: max_msgs,
        });
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let (len, r) = take_u32(rest)?;
        if len > r.len() {
            return Err(ProtoError::Malformed);
        }
        out.push(&r[..len]);
        rest = &r[len..];
    }
    if !rest.is_empty() {
        return Err(ProtoError::Malformed);
    }
    Ok(out)
}

fn take_u32(b: &[u8]) -> Result<(usize, &[u8]), ProtoError> {
    if b.len() < 4 {
        return Err(ProtoError::Malformed);
    }
    let (n, rest) = b.split_at(4);
    Ok((
        u32::from_be_bytes(n.try_into().expect("4 bytes")) as usize,
        rest,
    ))
}

/// Encodes one message of a batch.
pub fn encode_msg<T: Serialize>(msg: &T) -> Vec<u8> {
    postcard::to_stdvec(msg).expect("postcard encodes every protocol message")
}

/// Decodes one message of a batch.
///
/// # Errors
/// [`ProtoError::Decode`].
pub fn decode_msg<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, ProtoError> {
    let (v, rest) = postcard::take_from_bytes(b).map_err(|e| ProtoError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtoError::Decode(format!(
            "{} bytes left over after the message",
            rest.len()
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn batches_round_trip(parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..20)) {
            let frame = encode_batch(&parts);
            let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
            prop_assert_eq!(len, frame.len() - 4);
            let got = decode_batch(&frame[4..], 64).unwrap();
            prop_assert_eq!(got, parts.iter().map(|p| p.as_slice()).collect::<Vec<_>>());
        }

        #[test]
        fn garbage_batches_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(parts) = decode_batch(&bytes, 16) {
                for p in parts {
                    let _ = decode_msg::<RequestEnvelope>(p);
                }
            }
        }
    }

    #[test]
    fn bounds_are_checked() {
        let frame = encode_batch(&[vec![1, 2, 3], vec![4]]);
        let payload = &frame[4..];
        assert_eq!(
            decode_batch(&payload[..payload.len() - 1], 16),
            Err(ProtoError::Malformed)
        );
        assert!(matches!(
            decode_batch(payload, 1),
            Err(ProtoError::TooMany { count: 2, max: 1 })
        ));
        let mut huge = vec![BATCH_TAG];
        huge.extend_from_slice(&1u32.to_be_bytes());
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode_batch(&huge, 16), Err(ProtoError::Malformed));
        assert_eq!(decode_batch(&[0x00], 16), Err(ProtoError::NotABatch(0)));
    }
}
