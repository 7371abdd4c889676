//! Size limits enforced at every edge, before allocation.
//!
//! Keys are 1 B to 8 KiB, values at most 1 MiB, one batch at most 1,024
//! operations and 4 MiB, one wire frame at most 16 MiB. Over a limit the caller
//! gets a [`LimitError`] naming the limit; nothing is written.

use thiserror::Error;

/// Smallest key, in bytes.
pub const KEY_BYTES_MIN: usize = 1;
/// Largest key, in bytes (8 KiB).
pub const KEY_BYTES_MAX: usize = 8 * 1024;

/// Length of the end of the user key space: the key of `KEY_BYTES_MAX + 1`
/// bytes of `0xff`, which sorts after every valid user key. Internal
/// records (the meta shard's) live at or above it; a scan may name it as
/// its end bound.
pub const USER_KEYS_END_BYTES: usize = KEY_BYTES_MAX + 1;

/// The end of the user key space (see [`USER_KEYS_END_BYTES`]): the one
/// definition every layer uses.
pub fn user_keys_end() -> Vec<u8> {
    vec![0xff; USER_KEYS_END_BYTES]
}
/// Largest value, in bytes (1 MiB).
pub const VALUE_BYTES_MAX: usize = 1024 * 1024;
/// Most operations in one batch.
pub const BATCH_OPS_MAX: usize = 1024;
/// Most key and value bytes in one batch (4 MiB).
pub const BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Largest frame on the wire or in a snapshot file (16 MiB).
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Default bound on the key and value bytes of one response (scan pages,
/// multi-key gets); nodes take theirs from `api.response_bytes_max`.
pub const RESPONSE_BYTES_DEFAULT: usize = 4 * 1024 * 1024;

/// A request over one of the limits above.
#[derive(Debug, Clone, PartialEq, Eq, Error, serde::Serialize, serde::Deserialize)]
pub enum LimitError {
    /// The key is empty or longer than [`KEY_BYTES_MAX`].
    #[error("key of {len} bytes is outside {min}..={max} bytes")]
    KeySize {
        /// The offending key's length.
        len: usize,
        /// [`KEY_BYTES_MIN`].
        min: usize,
        /// [`KEY_BYTES_MAX`].
        max: usize,
    },
    /// The value is longer than [`VALUE_BYTES_MAX`].
    #[error("value of {len} bytes exceeds the {max}-byte limit")]
    ValueSize {
        /// The offending value's length.
        len: usize,
        /// [`VALUE_BYTES_MAX`].
        max: usize,
    },
    /// The batch has no operation, or more than [`BATCH_OPS_MAX`].
    #[error("batch of {ops} operations is outside 1..={max}")]
    BatchOps {
        /// Operations in the batch.
        ops: usize,
        /// [`BATCH_OPS_MAX`].
        max: usize,
    },
    /// The batch's keys and values add up to more than [`BATCH_BYTES_MAX`].
    #[error("batch of {bytes} bytes exceeds the {max}-byte limit")]
    BatchBytes {
        /// Key and value bytes in the batch.
        bytes: usize,
        /// [`BATCH_BYTES_MAX`].
        max: usize,
    },
    /// A frame announced a length over [`FRAME_BYTES_MAX`].
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameSize {
        /// The announced length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
}

/// Checks a key's length.
pub fn check_key(key: &[u8]) -> Result<(), LimitError> {
    if key.len() < KEY_BYTES_MIN || key.len() > KEY_BYTES_MAX {
        return Err(LimitError::KeySize {
            len: key.len(),
            min: KEY_BYTES_MIN,
            max: KEY_BYTES_MAX,
        });
    }
    Ok(())
}

/// Checks a value's length.
pub fn check_value(value: &[u8]) -> Result<(), LimitError> {
    if value.len() > VALUE_BYTES_MAX {
        return Err(LimitError::ValueSize {
            len: value.len(),
            max: VALUE_BYTES_MAX,
        });
    }
    Ok(())
}

/// Checks a frame length announced by a peer before anything is allocated.
pub fn check_frame_len(len: usize, max: usize) -> Result<(), LimitError> {
    if len > max {
        return Err(LimitError::FrameSize { len, max });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_bounds() {
        assert!(matches!(
            check_key(b""),
            Err(LimitError::KeySize { len: 0, .. })
        ));
        assert!(check_key(b"k").is_ok());
        assert!(check_key(&vec![0; KEY_BYTES_MAX]).is_ok());
        assert!(check_key(&vec![0; KEY_BYTES_MAX + 1]).is_err());
    }

    #[test]
    fn value_and_frame_bounds() {
        assert!(check_value(&vec![0; VALUE_BYTES_MAX]).is_ok());
        assert!(matches!(
            check_value(&vec![0; VALUE_BYTES_MAX + 1]),
            Err(LimitError::ValueSize { .. })
        ));
        assert!(check_frame_len(FRAME_BYTES_MAX, FRAME_BYTES_MAX).is_ok());
        assert!(check_frame_len(FRAME_BYTES_MAX + 1, FRAME_BYTES_MAX).is_err());
    }
}
