//! Who may speak to a node, and what a hostile peer can do to it.
//!
//! Every attack runs a real QUIC client against a real node: it connects,
//! opens the first stream, sends a Hello and a Raft request, and reads. A
//! refused attack gets no answer on that stream, and the node counts no
//! Raft message received. A positive control with a correct identity gets
//! an answer, so the refusals are not accidents of the harness.

mod common;

use common::cluster::{init_tracing, whole_range_shard, TestCluster, Timings};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tessera::limits::FRAME_BYTES_MAX;
use tessera::net::proto::{self, Hello, RequestHead, StreamKind};
use tessera::raft::rpc::{PeerRequest, PeerResponse, Refusal};
use tessera::raft::Vote;
use tessera::tls::issue::{ClusterCa, Issued};
use tessera::tls::{self, TlsIdentity, PEER_ALPN};
use tessera::{wire, NodeId, ShardId};

fn transport() -> Arc<quinn::TransportConfig> {
    Arc::new(quinn::TransportConfig::default())
}

fn client_cfg(ca: &ClusterCa, issued: &Issued, alpn: &[u8]) -> quinn::ClientConfig {
    ca.identity(issued)
        .client_config(alpn, transport())
        .unwrap()
}

fn vote_batch(claim: u64, shard: u64) -> Vec<u8> {
    let head = RequestHead {
        id: 1,
        shard: ShardId(shard),
        urgent: true,
    };
    let req = PeerRequest::Vote(openraft::raft::VoteRequest::new(
        Vote::new(1, NodeId(claim)),
        None,
    ));
    let body = postcard::to_stdvec(&req).unwrap();
    proto::encode_batch(&[proto::encode_request(&head, &body)])
}

/// Connects as `claim`, sends a Hello and `frames` on the first stream, and
/// returns the first answer frame, or why there was none.
async fn attack(
    cfg: quinn::ClientConfig,
    target: SocketAddr,
    victim: u64,
    claim: u64,
    frames: Vec<Vec<u8>>,
) -> Result<Vec<u8>, String> {
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(cfg, target, &tls::node_server_name(NodeId(victim)))
        .map_err(|e| format!("connect: {e}"))?
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("open: {e}"))?;
    let hello = Hello {
        from: NodeId(claim),
        to: NodeId(victim),
        kind: StreamKind::Raft,
    };
    let mut all = vec![wire::encode_frame(&hello, 1024).unwrap()];
    all.extend(frames);
    for f in all {
        send.write_all(&f)
            .await
            .map_err(|e| format!("write: {e}"))?;
    }
    let _ = send.finish();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        wire::read_frame(&mut recv, FRAME_BYTES_MAX),
    )
    .await;
    match r {
        Ok(Ok(Some(p))) => Ok(p),
        other => Err(format!("no answer: {other:?}")),
    }
}

fn decode_answer(payload: &[u8]) -> PeerResponse {
    let parts = proto::decode_batch(payload, 16).unwrap();
    assert_eq!(parts.len(), 1);
    let (id, body) = proto::decode_response(parts[0]).unwrap();
    assert_eq!(id, 1);
    postcard::from_bytes(body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_before_any_raft_message() {
    init_tracing();
    // n3 runs alone; n1 and n2 are peers it would accept (lower ids dial).
    let c = TestCluster::start(&[3], &[1, 2], None, Timings::fast()).await;
    let victim = c.node(3).clone();
    let addr = victim.addr();
    let ca = &c.ca;
    let other_ca = ClusterCa::generate("other").unwrap();

    let mut attempts: Vec<(&str, quinn::ClientConfig, u64)> = Vec::new();
    // No client certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der()).unwrap();
    let no_cert = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut no_cert = no_cert;
    no_cert.alpn_protocols = vec![PEER_ALPN.to_vec()];
    attempts.push((
        "no certificate",
        quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(no_cert).unwrap(),
        )),
        2,
    ));
    // A node certificate from another CA (the attacker trusts the real CA).
    let foreign = other_ca.issue_node(NodeId(2)).unwrap();
    let foreign_id = TlsIdentity::from_der(
        ca.cert_der(),
        foreign.cert_der.clone(),
        foreign.key_der.clone_key(),
    );
    attempts.push((
        "certificate from another CA",
        foreign_id.client_config(PEER_ALPN, transport()).unwrap(),
        2,
    ));
    // An expired certificate from the right CA.
    let expired = ca.issue_expired_node(NodeId(2)).unwrap();
    attempts.push((
        "expired certificate",
        client_cfg(ca, &expired, PEER_ALPN),
        2,
    ));
    // n2's genuine certificate used to claim n1's id.
    let n2 = ca.issue_node(NodeId(2)).unwrap();
    attempts.push((
        "n2's certificate claiming n1",
        client_cfg(ca, &n2, PEER_ALPN),
        1,
    ));
    // A client certificate on the peer protocol.
    let client = ca.issue_client("c").unwrap();
    attempts.push((
        "client certificate as a node",
        client_cfg(ca, &client, PEER_ALPN),
        2,
    ));
    // The right certificate with the wrong ALPN.
    attempts.push(("wrong ALPN", client_cfg(ca, &n2, b"h3"), 2));

    for (what, cfg, claim) in attempts {
        tracing::info!(what, "phase: attack");
        let r = attack(cfg, addr, 3, claim, vec![vote_batch(claim, 99)]).await;
        assert!(r.is_err(), "{what}: got an answer");
        assert_eq!(
            victim.metrics().messages_received,
            0,
            "{what}: a Raft message was processed"
        );
    }
    assert!(victim.metrics().connections_refused >= 4);

    tracing::info!("phase: positive control, n2 as itself");
    let answer = attack(
        client_cfg(ca, &n2, PEER_ALPN),
        addr,
        3,
        2,
        vec![vote_batch(2, 99)],
    )
    .await
    .expect("n2 with its own certificate is served");
    assert!(matches!(
        decode_answer(&answer),
        PeerResponse::Refused(Refusal::UnknownShard(ShardId(99)))
    ));
    assert_eq!(victim.metrics().messages_received, 1);
    drop(victim);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_truncated_and_oversized_frames_cost_only_the_sender() {
    init_tracing();
    // n1 and n3 serve a shard; n2 is absent and the attacker holds its
    // certificate (the worst case: a compromised member).
    let c = TestCluster::start(&[1, 3], &[2], None, Timings::fast()).await;
    let d = whole_range_shard(&[1, 3]);
    c.create_shards(std::slice::from_ref(&d)).await;
    c.wait_leader(d.id, Duration::from_secs(30)).await.unwrap();
    let addr = c.node(3).addr();
    let n2 = c.ca.issue_node(NodeId(2)).unwrap();

    let mut garbage_batch = vec![0u8; 4];
    garbage_batch.extend_from_slice(&[0xB1, 0, 0, 0, 3, 0xff, 0xff]);
    let len = (garbage_batch.len() - 4) as u32;
    garbage_batch[..4].copy_from_slice(&len.to_be_bytes());
    let undecodable = proto::encode_batch(&[vec![0xff; 40]]);
    let oversized = u32::MAX.to_be_bytes().to_vec();
    let mut truncated = vote_batch(2, 1);
    truncated.truncate(truncated.len() - 3);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage batch", garbage_batch),
        ("undecodable message", undecodable),
        ("oversized length", oversized),
        ("truncated frame", truncated),
    ];
    let mut value = 0u64;
    for (what, frame) in cases {
        tracing::info!(what, "phase: hostile frame");
        let bad_before = c.node(3).metrics().bad_frames;
        let r = attack(client_cfg(&c.ca, &n2, PEER_ALPN), addr, 3, 2, vec![frame]).await;
        assert!(r.is_err(), "{what}: answered {r:?}");
        c.wait_until(&format!("{what} counted"), Duration::from_secs(10), |c| {
            c.node(3).metrics().bad_frames > bad_before
        })
        .await
        .unwrap();
        // Everyone else is still served: a write commits on n1 and n3.
        value += 1;
        let idx = c
            .put(
                d.id,
                b"still-serving",
                &value.to_be_bytes(),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        c.wait_applied(d.id, idx, &[1, 3], Duration::from_secs(30))
            .await
            .unwrap();
    }
    tracing::info!("phase: an unknown shard id gets a typed refusal");
    let answer = attack(
        client_cfg(&c.ca, &n2, PEER_ALPN),
        addr,
        3,
        2,
        vec![vote_batch(2, 4242)],
    )
    .await
    .unwrap();
    assert!(matches!(
        decode_answer(&answer),
        PeerResponse::Refused(Refusal::UnknownShard(ShardId(4242)))
    ));
    tracing::info!("phase: a member asking votes for another node is refused");
    let answer = attack(
        client_cfg(&c.ca, &n2, PEER_ALPN),
        addr,
        3,
        2,
        vec![vote_batch(1, d.id.0)],
    )
    .await
    .unwrap();
    assert!(
        matches!(
            decode_answer(&answer),
            PeerResponse::Refused(Refusal::NotTheSender {
                claimed: NodeId(1),
                sender: NodeId(2),
                ..
            })
        ),
        "a vote for n1 sent by n2 was handed to the group"
    );
    c.shutdown().await;
}
