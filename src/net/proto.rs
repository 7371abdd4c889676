//! The node-to-node protocol on one QUIC connection.
//!
//! ```text
//! stream  = frame(Hello) frame*            every stream opens with a Hello
//! Raft stream (one per direction):
//!   opener → acceptor: batch frames of requests  (RequestHead ‖ body)
//!   acceptor → opener: batch frames of responses (id: u64 ‖ body)
//! Snapshot stream (one per transfer):
//!   opener → acceptor: SnapshotFrame::Head, Chunk*, End
//!   acceptor → opener: one frame, the reply (body)
//! batch   = tag 0xB1 | count: u32 BE | (len: u32 BE | message)*
//! ```
//!
//! Heads are postcard; bodies are opaque to the transport (the node's Raft
//! layer encodes them, [`crate::raft::rpc`]).
//!
//! Frames are [`crate::wire`] frames (length checked before allocation).
//! Decoding a batch checks every length against what is left and the count
//! against a maximum: a garbage or truncated batch is a [`ProtoError`].

use crate::{NodeId, ShardId};
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

/// The head of a request on the Raft stream; the request's body (opaque
/// to the transport) follows it in the same batch message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHead {
    /// Matches the response to the request (unique per stream).
    pub id: u64,
    /// The shard whose group the request is for.
    pub shard: ShardId,
    /// Whether it (and so its reply) must leave at once.
    pub urgent: bool,
}

/// Frames of a snapshot stream, opener to acceptor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SnapshotFrame {
    /// What follows.
    Head {
        /// The shard.
        shard: ShardId,
        /// What the receiving node needs besides the file (opaque to the
        /// transport: the sender's vote and the snapshot's metadata).
        head: Vec<u8>,
    },
    /// Bytes of the snapshot file, in order.
    Chunk(Vec<u8>),
    /// The file is complete: its length, to check nothing was lost.
    End {
        /// Total bytes sent in chunks.
        bytes: u64,
    },
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

/// The request id of a message that expects no reply (ids of calls start
/// at 1): the acceptor hands it on and answers nothing.
pub const ONEWAY_ID: u64 = 0;

/// One request message: its head, then its body.
pub fn encode_request(head: &RequestHead, body: &[u8]) -> Vec<u8> {
    let mut out = postcard::to_stdvec(head).expect("postcard encodes a request head");
    out.extend_from_slice(body);
    out
}

/// Splits one request message into its head and body.
///
/// # Errors
/// [`ProtoError::Decode`] when the head is not valid.
pub fn decode_request(b: &[u8]) -> Result<(RequestHead, &[u8]), ProtoError> {
    postcard::take_from_bytes(b).map_err(|e| ProtoError::Decode(e.to_string()))
}

/// One response message: the request's id, then the body.
pub fn encode_response(id: u64, body: &[u8]) -> Vec<u8> {
    let mut out = postcard::to_stdvec(&id).expect("postcard encodes an id");
    out.extend_from_slice(body);
    out
}

/// Splits one response message into the request's id and the body.
///
/// # Errors
/// [`ProtoError::Decode`] when the id is not valid.
pub fn decode_response(b: &[u8]) -> Result<(u64, &[u8]), ProtoError> {
    postcard::take_from_bytes(b).map_err(|e| ProtoError::Decode(e.to_string()))
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
                    let _ = decode_request(p);
                    let _ = decode_response(p);
                }
            }
        }
    }

    #[test]
    fn envelopes_round_trip() {
        let head = RequestHead {
            id: 7,
            shard: ShardId(3),
            urgent: true,
        };
        let m = encode_request(&head, b"body");
        assert_eq!(decode_request(&m).unwrap(), (head, &b"body"[..]));
        let r = encode_response(u64::MAX, b"");
        assert_eq!(decode_response(&r).unwrap(), (u64::MAX, &b""[..]));
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
