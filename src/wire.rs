//! Length-prefixed frames for node-to-node and client traffic.
//!
//! ```text
//! frame = len: u32 BE | payload (postcard)
//! ```
//!
//! The length is checked against the limit before anything is allocated,
//! and every failure is a typed [`WireError`]: a peer sending garbage,
//! truncated or oversized frames costs a closed stream, never a panic or an
//! unbounded allocation.

use crate::limits::{self, FRAME_BYTES_MAX};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What can go wrong with a frame.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The announced or encoded length is over the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// The length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The payload is not a valid message.
    #[error("undecodable frame: {0}")]
    Decode(#[from] postcard::Error),
    /// The underlying stream failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as one frame (length prefix included).
///
/// # Errors
/// [`WireError::FrameTooLarge`] when the payload exceeds `max`.
pub fn encode_frame<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, WireError> {
    let mut out = vec![0u8; 4];
    out = postcard::to_extend(msg, out)?;
    let len = out.len() - 4;
    check_len(len, max)?;
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// The one frame-length rule: `max`, never above [`FRAME_BYTES_MAX`].
fn check_len(len: usize, max: usize) -> Result<(), WireError> {
    let max = max.min(FRAME_BYTES_MAX);
    limits::check_frame_len(len, max).map_err(|_| WireError::FrameTooLarge { len, max })
}

/// Decodes one payload (without its length prefix); bytes left over after
/// the value make it undecodable (found by the `frame` fuzz target).
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    let (v, rest) = postcard::take_from_bytes(payload)?;
    if !rest.is_empty() {
        return Err(WireError::Decode(postcard::Error::DeserializeUnexpectedEnd));
    }
    Ok(v)
}

/// Reads one frame's payload; `Ok(None)` at a clean end of stream.
///
/// # Errors
/// [`WireError::FrameTooLarge`] before allocating when the announced length
/// exceeds `max`; [`WireError::Truncated`] when the stream ends mid-frame.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, WireError> {
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut head[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(WireError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(head) as usize;
    check_len(len, max)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => WireError::Truncated,
            _ => WireError::Io(e),
        })?;
    Ok(Some(payload))
}

/// Writes one already-encoded frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> Result<(), WireError> {
    w.write_all(frame).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, Op};
    use proptest::prelude::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn oversized_length_is_refused_before_reading_the_payload() {
        // Announces 4 GiB but carries nothing: refused on the header alone.
        let mut input: &[u8] = &u32::MAX.to_be_bytes();
        let r = rt().block_on(read_frame(&mut input, FRAME_BYTES_MAX));
        assert!(matches!(r, Err(WireError::FrameTooLarge { .. })), "{r:?}");
        let big = Command::put("k", vec![0u8; 2048]);
        assert!(matches!(
            encode_frame(&big, 1024),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn truncated_and_clean_ends_are_told_apart() {
        let frame = encode_frame(&Command::delete("k"), 1024).unwrap();
        let mut cut: &[u8] = &frame[..frame.len() - 1];
        assert!(matches!(
            rt().block_on(read_frame(&mut cut, 1024)),
            Err(WireError::Truncated)
        ));
        let mut half_header: &[u8] = &frame[..2];
        assert!(matches!(
            rt().block_on(read_frame(&mut half_header, 1024)),
            Err(WireError::Truncated)
        ));
        let mut empty: &[u8] = &[];
        assert!(matches!(
            rt().block_on(read_frame(&mut empty, 1024)),
            Ok(None)
        ));
    }

    proptest! {
        #[test]
        fn frames_round_trip(keys in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..64), 1..20)) {
            let cmd = Command::Write { ops: keys.into_iter().map(|k| Op::Delete { key: k }).collect() };
            let frame = encode_frame(&cmd, FRAME_BYTES_MAX).unwrap();
            let mut input: &[u8] = &frame;
            let payload = rt().block_on(read_frame(&mut input, FRAME_BYTES_MAX)).unwrap().unwrap();
            prop_assert_eq!(decode_payload::<Command>(&payload).unwrap(), cmd);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut input: &[u8] = &bytes;
            if let Ok(Some(p)) = rt().block_on(read_frame(&mut input, 4096)) {
                let _ = decode_payload::<Command>(&p);
            }
            let _ = decode_payload::<Command>(&bytes);
        }
    }
}
