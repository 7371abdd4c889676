//! Replicated commands (`tessera::command`) and the client protocol
//! (`tessera::api`), postcard-decoded and validated.
//!
//! Asserts: no panic; no allocation over one frame; whatever decodes
//! re-encodes canonically and round-trips to an equal value; validation
//! never panics, and a command or request that validates always fits in one
//! wire frame (`encode_frame` under `FRAME_BYTES_MAX` succeeds), with its key
//! and value bytes within `BATCH_BYTES_MAX`. A second half builds commands
//! from the input with `arbitrary` and checks the same through a frame.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use tessera::api::{ApiError, Request, Response};
use tessera::command::{Command, CommandResponse, Op, OpResult};
use tessera::limits::{LimitError, BATCH_BYTES_MAX, BATCH_OPS_MAX, FRAME_BYTES_MAX};
use tessera::wire::{decode_payload, encode_frame, read_frame};
use tessera_fuzz::{block_on, roundtrip_eq};

tessera_fuzz::limit_alloc!();

fn fits_a_frame<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
    v: &T,
) {
    let frame = encode_frame(v, FRAME_BYTES_MAX).expect("a valid message fits one frame");
    let mut input: &[u8] = &frame;
    let payload = block_on(read_frame(&mut input, FRAME_BYTES_MAX))
        .unwrap()
        .unwrap();
    assert_eq!(&decode_payload::<T>(&payload).unwrap(), v);
}

fn check_command(cmd: &Command) {
    roundtrip_eq(cmd);
    if cmd.validate().is_ok() {
        if let Command::Write { ops } = cmd {
            assert!(!ops.is_empty() && ops.len() <= BATCH_OPS_MAX);
            assert!(ops.iter().map(Op::payload_bytes).sum::<usize>() <= BATCH_BYTES_MAX);
        }
        fits_a_frame(cmd);
    }
}

#[derive(Arbitrary, Debug)]
enum AOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    Cas(Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>),
}

fuzz_target!(|data: &[u8]| {
    if let Ok(cmd) = postcard::from_bytes::<Command>(data) {
        check_command(&cmd);
    }
    if let Ok(op) = postcard::from_bytes::<Op>(data) {
        roundtrip_eq(&op);
        let _ = op.validate();
    }
    if let Ok(req) = postcard::from_bytes::<Request>(data) {
        roundtrip_eq(&req);
        if req.validate().is_ok() {
            fits_a_frame(&req);
        }
    }
    if let Ok(resp) = postcard::from_bytes::<Response>(data) {
        roundtrip_eq(&resp);
        if let Response::Error(e) = &resp {
            let _ = e.to_string();
        }
    }
    if let Ok(r) = postcard::from_bytes::<CommandResponse>(data) {
        roundtrip_eq(&r);
    }
    if let Ok(r) = postcard::from_bytes::<OpResult>(data) {
        roundtrip_eq(&r);
    }
    if let Ok(e) = postcard::from_bytes::<ApiError>(data) {
        roundtrip_eq(&e);
        let _ = e.to_string();
    }
    if let Ok(e) = postcard::from_bytes::<LimitError>(data) {
        roundtrip_eq(&e);
        let _ = e.to_string();
    }

    // Structured: commands built from the input.
    let mut u = Unstructured::new(data);
    if let Ok(aops) = Vec::<AOp>::arbitrary(&mut u) {
        let ops = aops
            .into_iter()
            .map(|o| match o {
                AOp::Put(key, value) => Op::Put { key, value },
                AOp::Delete(key) => Op::Delete { key },
                AOp::Cas(key, expected, new) => Op::Cas { key, expected, new },
            })
            .collect();
        let cmd = Command::Write { ops };
        check_command(&cmd);
        // Every command (valid or not) that fits a frame reads back equal.
        if let Ok(frame) = encode_frame(&cmd, FRAME_BYTES_MAX) {
            let mut input: &[u8] = &frame;
            let p = block_on(read_frame(&mut input, FRAME_BYTES_MAX)).unwrap().unwrap();
            assert_eq!(decode_payload::<Command>(&p).unwrap(), cmd);
        }
    }
});
