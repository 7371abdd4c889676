//! Bounded wire frames (`tessera::wire`) and batch framing
//! (`tessera::net::proto::decode_batch`) over arbitrary bytes.
//!
//! Asserts: no panic; no allocation over one frame (the global allocator
//! aborts); every frame read is within the limit in force and consumed
//! exactly `4 + len` bytes; a payload that decodes (as a client `Request`,
//! `Response` or a `Command`) re-encodes canonically, and the re-encoded
//! frame reads back to the same payload; a batch that splits re-encodes to
//! exactly its input bytes (the batch format is canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera::api::{Request, Response};
use tessera::command::Command;
use tessera::limits::FRAME_BYTES_MAX;
use tessera::net::proto::{decode_batch, decode_msg, decode_request, encode_batch};
use tessera::raft::rpc::{PeerRequest, PeerResponse};
use tessera::wire::{decode_payload, encode_frame, read_frame, WireError};
use tessera_fuzz::{block_on, reencode, roundtrip_eq};

tessera_fuzz::limit_alloc!();

/// Frame limits a reader is configured with.
const MAXES: [usize; 4] = [0, 64, 4096, FRAME_BYTES_MAX];

fn check_payload<T>(payload: &[u8], max: usize)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Ok(v) = decode_payload::<T>(payload) else {
        return;
    };
    roundtrip_eq(&v);
    let canonical = reencode(&v);
    match encode_frame(&v, max) {
        Ok(frame) => {
            assert_eq!(&frame[4..], canonical.as_slice());
            let mut input: &[u8] = &frame;
            let back = block_on(read_frame(&mut input, max))
                .expect("an encoded frame reads back")
                .expect("not at the end");
            assert_eq!(back, canonical);
            assert!(input.is_empty());
            assert_eq!(decode_payload::<T>(&back).unwrap(), v);
        }
        Err(WireError::FrameTooLarge { len, max: m }) => {
            assert!(len > m && m <= max && len == canonical.len());
        }
        Err(e) => panic!("encode_frame failed: {e}"),
    }
}

fn check_batch(payload: &[u8], max_msgs: usize) {
    let Ok(parts) = decode_batch(payload, max_msgs) else {
        return;
    };
    assert!(parts.len() <= max_msgs);
    let frame = encode_batch(&parts.iter().map(|p| p.to_vec()).collect::<Vec<_>>());
    assert_eq!(
        u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
        payload.len()
    );
    assert_eq!(&frame[4..], payload, "a batch re-encodes to its bytes");
    for p in parts {
        if let Ok((_, body)) = decode_request(p) {
            if let Ok(r) = decode_msg::<PeerRequest>(body) {
                let _ = r.urgency();
                reencode(&r);
            }
        }
        if let Ok(r) = decode_msg::<PeerResponse>(p) {
            reencode(&r);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, stream)) = data.split_first() else {
        return;
    };
    let max = MAXES[(sel & 3) as usize];
    let max_msgs = [1usize, 16, 1024, 4096][((sel >> 2) & 3) as usize];

    // The whole input as one payload and as one batch.
    check_payload::<Command>(stream, max);
    check_payload::<Request>(stream, max);
    check_payload::<Response>(stream, max);
    check_batch(stream, max_msgs);

    // The input as a stream of frames.
    let mut input: &[u8] = stream;
    loop {
        let before = input.len();
        match block_on(read_frame(&mut input, max)) {
            Ok(Some(payload)) => {
                assert!(payload.len() <= max);
                assert_eq!(before - input.len(), 4 + payload.len());
                check_payload::<Command>(&payload, max);
                check_payload::<Request>(&payload, max);
                check_payload::<Response>(&payload, max);
                check_batch(&payload, max_msgs);
            }
            Ok(None) => {
                assert_eq!(before, 0);
                break;
            }
            Err(WireError::FrameTooLarge { len, max: m }) => {
                assert!(len > m && m <= max);
                break;
            }
            Err(WireError::Truncated) => break,
            Err(e) => panic!("unexpected frame error: {e}"),
        }
    }
});
