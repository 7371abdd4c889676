//! The node-to-node messages: the transport's `Hello`, request and response
//! heads (`tessera::net::proto`) and `SnapshotFrame`, and the Raft layer's
//! bodies (`tessera::raft::rpc`: `PeerRequest` with AppendEntries carrying
//! log entries and commands, `PeerResponse`, `SnapshotReply`, `Refusal`),
//! decoded from arbitrary bytes.
//!
//! Asserts: no panic; no allocation over one frame; whatever decodes
//! re-encodes canonically (`encode_msg` ∘ `decode_msg` is stable) and the
//! re-encoding decodes to an equal value where the type has `Eq`; a decoded
//! request's urgency is computable; commands carried by AppendEntries are
//! validated without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera::net::proto::{
    decode_msg, decode_request, decode_response, encode_msg, encode_request, encode_response,
    Hello, SnapshotFrame,
};
use tessera::raft::rpc::{PeerRequest, PeerResponse, Refusal, SnapshotReply};
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
    if let Ok((head, body)) = decode_request(data) {
        // Head and body split, join and split again to the same parts.
        let again = encode_request(&head, body);
        assert_eq!(decode_request(&again).unwrap(), (head, body));
    }
    if let Ok((id, body)) = decode_response(data) {
        let again = encode_response(id, body);
        assert_eq!(decode_response(&again).unwrap(), (id, body));
    }
    if let Ok(r) = decode_msg::<PeerRequest>(data) {
        let _ = r.urgency();
        if let PeerRequest::Append(a) = &r {
            for e in &a.entries {
                if let tessera::raft::EntryPayload::Normal(cmd) = &e.payload {
                    let _ = cmd.validate();
                }
            }
        }
        stable(&r);
    }
    if let Ok(r) = decode_msg::<PeerResponse>(data) {
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
