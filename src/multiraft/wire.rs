//! The batch system's frame: every Raft message one round has for one peer,
//! over all groups, as one transport request.
//!
//! Layout: a version byte, then per message the group's shard id (8 bytes,
//! big-endian), the message's length (4 bytes) and raft-rs's protobuf
//! message. Decoding checks every length against what is left before it
//! allocates, and bounds the message count.

use protobuf::Message as _;
use raft::eraftpb::Message;

use super::Envelope;
use crate::ShardId;

const VERSION: u8 = 1;
const HEAD: usize = 8 + 4;

/// Messages in one frame at most.
pub const FRAME_MESSAGES_MAX: usize = 65_536;

/// A frame that cannot be made or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// One message alone is larger than a frame may be.
    #[error("a raft message of {bytes} bytes for {shard} exceeds the frame limit of {max}")]
    TooLarge {
        /// The group.
        shard: ShardId,
        /// Its encoded size.
        bytes: usize,
        /// The frame limit.
        max: usize,
    },
    /// The bytes are not a frame of this version.
    #[error("bad raft frame: {0}")]
    Malformed(String),
}

/// Encodes `envs` into as few frames as fit `max_bytes` each, in order.
///
/// # Errors
/// [`FrameError::TooLarge`] when a single message does not fit a frame.
pub fn encode_frames(envs: &[Envelope], max_bytes: usize) -> Result<Vec<Vec<u8>>, FrameError> {
    let mut frames = Vec::new();
    let mut cur = vec![VERSION];
    let mut count = 0;
    for env in envs {
        let msg = env
            .msg
            .write_to_bytes()
            .map_err(|e| FrameError::Malformed(e.to_string()))?;
        let need = HEAD + msg.len();
        if 1 + need > max_bytes || msg.len() > u32::MAX as usize {
            return Err(FrameError::TooLarge {
                shard: env.shard,
                bytes: msg.len(),
                max: max_bytes,
            });
        }
        if cur.len() + need > max_bytes || count == FRAME_MESSAGES_MAX {
            frames.push(std::mem::replace(&mut cur, vec![VERSION]));
            count = 0;
        }
        cur.extend_from_slice(&env.shard.0.to_be_bytes());
        cur.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        cur.extend_from_slice(&msg);
        count += 1;
    }
    if count > 0 {
        frames.push(cur);
    }
    Ok(frames)
}

/// Reads one frame.
///
/// # Errors
/// [`FrameError::Malformed`] for anything that is not a whole frame of
/// valid messages.
pub fn decode_frame(bytes: &[u8]) -> Result<Vec<Envelope>, FrameError> {
    let bad = |why: String| FrameError::Malformed(why);
    let (&version, mut rest) = bytes.split_first().ok_or_else(|| bad("empty".into()))?;
    if version != VERSION {
        return Err(bad(format!("version {version}, expected {VERSION}")));
    }
    let mut out = Vec::new();
    while !rest.is_empty() {
        if out.len() == FRAME_MESSAGES_MAX {
            return Err(bad(format!("more than {FRAME_MESSAGES_MAX} messages")));
        }
        if rest.len() < HEAD {
            return Err(bad(format!(
                "{} bytes left, a message head is {HEAD}",
                rest.len()
            )));
        }
        let shard = u64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(rest[8..12].try_into().expect("4 bytes")) as usize;
        rest = &rest[HEAD..];
        if len > rest.len() {
            return Err(bad(format!(
                "a message of {len} bytes with {} left",
                rest.len()
            )));
        }
        let msg = Message::parse_from_bytes(&rest[..len])
            .map_err(|e| bad(format!("message for shard {shard}: {e}")))?;
        rest = &rest[len..];
        out.push(Envelope {
            shard: ShardId(shard),
            msg,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use raft::eraftpb::{Entry, MessageType};

    fn envelope(shard: u64, from: u64, to: u64, entries: &[Vec<u8>]) -> Envelope {
        let mut msg = Message::default();
        msg.set_msg_type(MessageType::MsgAppend);
        msg.from = from;
        msg.to = to;
        msg.term = 7;
        msg.set_entries(
            entries
                .iter()
                .enumerate()
                .map(|(i, d)| Entry {
                    index: i as u64 + 1,
                    term: 7,
                    data: d.clone().into(),
                    ..Default::default()
                })
                .collect::<Vec<_>>()
                .into(),
        );
        Envelope {
            shard: ShardId(shard),
            msg,
        }
    }

    proptest! {
        #[test]
        fn frames_round_trip_in_order_within_the_limit(
            msgs in proptest::collection::vec(
                (0u64..1000, 1u64..4, 1u64..4, proptest::collection::vec(
                    proptest::collection::vec(any::<u8>(), 0..300), 0..4)),
                0..40),
            max in 400usize..4000,
        ) {
            let envs: Vec<Envelope> = msgs
                .iter()
                .map(|(s, f, t, e)| envelope(*s, *f, *t, e))
                .collect();
            match encode_frames(&envs, max) {
                Ok(frames) => {
                    let mut back = Vec::new();
                    for f in &frames {
                        prop_assert!(f.len() <= max, "frame of {} over {max}", f.len());
                        back.extend(decode_frame(f).unwrap());
                    }
                    prop_assert_eq!(back.len(), envs.len());
                    for (a, b) in back.iter().zip(&envs) {
                        prop_assert_eq!(a.shard, b.shard);
                        prop_assert_eq!(&a.msg, &b.msg);
                    }
                }
                Err(FrameError::TooLarge { bytes, .. }) => {
                    prop_assert!(1 + HEAD + bytes > max);
                }
                Err(e) => prop_assert!(false, "{e}"),
            }
        }

        #[test]
        fn any_bytes_decode_to_a_frame_or_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            match decode_frame(&bytes) {
                // Every message has its head: the count is bounded by the size.
                Ok(envs) => prop_assert!(envs.len() <= bytes.len() / HEAD),
                Err(FrameError::Malformed(_)) => {}
                Err(e) => prop_assert!(false, "{e}"),
            }
        }

        #[test]
        fn a_truncated_frame_is_refused(cut in 1usize..60) {
            let f = &encode_frames(&[envelope(3, 1, 2, &[vec![9; 40]])], 1 << 20).unwrap()[0];
            let cut = cut.min(f.len() - 1);
            prop_assert!(decode_frame(&f[..f.len() - cut]).is_err());
        }
    }

    #[test]
    fn a_message_larger_than_a_frame_is_refused_by_name() {
        let big = envelope(5, 1, 2, &[vec![0; 2000]]);
        let err = encode_frames(&[big], 1000).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { shard, max: 1000, .. } if shard == ShardId(5))
        );
    }

    /// RUSTSEC-2024-0437 (`protobuf` < 3.7.2: unknown fields of the group
    /// wire type, nested deep, recurse without bound and overflow the
    /// stack). Checked against the version this crate parses with: a
    /// message whose unknown field opens 200,000 nested groups, at the top
    /// and inside an entry, is refused as malformed on a 256 KiB stack (a
    /// recursion per group would need far more) and nothing is decoded.
    #[test]
    fn nested_unknown_groups_are_refused_without_recursing() {
        fn groups(n: usize) -> Vec<u8> {
            // Field 99, wire type 3 (start group): tag (99 << 3) | 3 = 795,
            // varint 0x9b 0x06.
            [0x9b, 0x06].repeat(n)
        }
        fn frame(msg: &[u8]) -> Vec<u8> {
            let mut f = vec![VERSION];
            f.extend_from_slice(&1u64.to_be_bytes());
            f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            f.extend_from_slice(msg);
            f
        }
        let base = envelope(1, 1, 2, &[b"x".to_vec()])
            .msg
            .write_to_bytes()
            .unwrap();
        let mut top = base.clone();
        top.extend(groups(200_000));
        // An entry (field 7, length-delimited) whose own unknown field nests.
        let mut entry = Entry::default().write_to_bytes().unwrap();
        entry.extend(groups(200_000));
        let mut inner = base;
        let mut os = protobuf::CodedOutputStream::vec(&mut inner);
        os.write_bytes(7, &entry).unwrap();
        os.flush().unwrap();
        drop(os);
        for (what, msg) in [("top", top), ("entry", inner)] {
            let f = frame(&msg);
            let got = std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || decode_frame(&f).map(|e| e.len()))
                .unwrap()
                .join()
                .expect("decoding must not overflow the stack");
            assert!(
                matches!(got, Err(FrameError::Malformed(_))),
                "{what}: {got:?}"
            );
        }
    }

    #[test]
    fn a_frame_of_another_version_is_refused() {
        let mut f = encode_frames(&[envelope(1, 1, 2, &[])], 1 << 20)
            .unwrap()
            .remove(0);
        f[0] = 9;
        assert!(
            matches!(decode_frame(&f), Err(FrameError::Malformed(m)) if m.contains("version 9"))
        );
    }
}
