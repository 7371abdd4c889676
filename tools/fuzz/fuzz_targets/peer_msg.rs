//! The node-to-node messages (`tessera::net::proto`): `Hello`,
//! `RequestEnvelope` (AppendEntries with log entries and commands, Vote),
//! `ResponseEnvelope`, `SnapshotFrame` and `SnapshotReply`, decoded with
//! `decode_msg` from arbitrary bytes.
//!
//! Asserts: no panic; no allocation over one frame; whatever decodes
//! re-encodes canonically (`encode_msg` ∘ `decode_msg` is stable) and the
//! re-encoding decodes to an equal value where the type has `Eq`; a decoded
//! request's urgency is computable; commands carried by AppendEntries are
//! validated without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera::net::proto::{
    decode_msg, encode_msg, Hello, PeerRequest, Refusal, RequestEnvelope, ResponseEnvelope,
    SnapshotFrame, SnapshotReply,
};
use tessera_fuzz::{reencode, roundtrip_eq};

tessera_fuzz::limit_alloc!();

fn stable<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) {
    let canonical = reencode(v);
    assert_eq!(encode_msg(v), canonical);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = decode_msg::<Hello>(data) {
        roundtrip_eq(&h);
    }
    if let Ok(r) = decode_msg::<RequestEnvelope>(data) {
        let _ = r.req.urgency();
        if let PeerRequest::Append(a) = &r.req {
            for e in &a.entries {
                if let tessera::raft::EntryPayload::Normal(cmd) = &e.payload {
                    let _ = cmd.validate();
                }
            }
        }
        stable(&r);
    }
    if let Ok(r) = decode_msg::<ResponseEnvelope>(data) {
        stable(&r);
    }
    if let Ok(f) = decode_msg::<SnapshotFrame>(data) {
        stable(&f);
    }
    if let Ok(r) = decode_msg::<SnapshotReply>(data) {
        stable(&r);
    }
    if let Ok(r) = decode_msg::<Refusal>(data) {
        roundtrip_eq(&r);
        let _ = r.to_string();
    }
});
