//! The inbound side: accept connections, check every stream's Hello
//! against the certificate, hand client connections to the node, and serve
//! a peer's Raft stream (each request to the node's [`super::Inbound`], the
//! replies coalesced back).

use super::coalesce::{CoalesceLimits, Urgency};
use super::link::{pump, Outbound};
use super::proto::{self, close, Hello, StreamKind};
use super::snapshot::serve_snapshot;
use super::transport::Inner;
use super::ClientConn;
use crate::limits::FRAME_BYTES_MAX;
use crate::tls;
use crate::wire;
use crate::NodeId;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};

pub(super) async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        tokio::spawn(handle_incoming(inner.clone(), incoming));
    }
}

pub(super) fn refuse(inner: &Inner, conn: &quinn::Connection, why: &str) {
    tracing::warn!(me = %inner.me, remote = %conn.remote_address(), why, "refusing connection");
    inner
        .metrics
        .connections_refused
        .fetch_add(1, Ordering::Relaxed);
    conn.close(close::REFUSED.into(), why.as_bytes());
}

/// A new inbound connection: handshake (the CA check is rustls'), ALPN, then
/// the first stream's Hello is checked against the certificate before the
/// connection is attached to its peer.
async fn handle_incoming(inner: Arc<Inner>, incoming: quinn::Incoming) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "handshake failed");
            inner
                .metrics
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    match tls::negotiated_alpn(&conn).as_deref() {
        Some(p) if p == tls::PEER_ALPN => {}
        Some(p) if p == tls::CLIENT_ALPN => {
            let Ok(permit) = inner.client_permits.clone().try_acquire_owned() else {
                refuse(&inner, &conn, "too many client connections");
                return;
            };
            inner
                .metrics
                .client_connections
                .fetch_add(1, Ordering::Relaxed);
            if let Err(e) = inner.clients.try_send(ClientConn {
                conn: conn.clone(),
                permit,
            }) {
                let why = match e {
                    mpsc::error::TrySendError::Full(_) => "client connections queue full",
                    mpsc::error::TrySendError::Closed(_) => "node not serving clients",
                };
                refuse(&inner, &conn, why);
            }
            return;
        }
        _ => {
            refuse(&inner, &conn, "unknown ALPN");
            return;
        }
    }
    let hello_timeout = Duration::from_millis(inner.cfg.hello_timeout_ms);
    let first = tokio::time::timeout(hello_timeout, async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let hello = read_hello(&mut recv).await?;
        Ok::<_, String>((send, recv, hello))
    })
    .await;
    let (send, recv, hello) = match first {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return refuse(&inner, &conn, &format!("no hello: {e}")),
        Err(_) => return refuse(&inner, &conn, "no hello in time"),
    };
    if let Err(e) = check_hello(&inner, &conn, &hello) {
        return refuse(&inner, &conn, &e);
    }
    if hello.from > inner.me {
        return refuse(&inner, &conn, "the lower node id dials");
    }
    let peer = {
        let peers = inner.peers.lock().expect("peers poisoned");
        peers.get(&hello.from).cloned()
    };
    let Some(peer) = peer else {
        return refuse(&inner, &conn, "unknown peer");
    };
    inner
        .metrics
        .connections_established
        .fetch_add(1, Ordering::Relaxed);
    tracing::info!(me = %inner.me, peer = %hello.from, "peer connected");
    if let Some(old) = peer.conn.send_replace(Some(conn.clone())) {
        old.close(close::REPLACED.into(), b"replaced by a newer connection");
    }
    tokio::spawn(handle_stream(inner.clone(), hello, send, recv));
    serve_connection(inner, conn, peer.id).await;
}

async fn read_hello(recv: &mut quinn::RecvStream) -> Result<Hello, String> {
    let payload = wire::read_frame(recv, 1024)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("stream ended before hello")?;
    wire::decode_payload(&payload).map_err(|e| e.to_string())
}

fn check_hello(inner: &Inner, conn: &quinn::Connection, hello: &Hello) -> Result<(), String> {
    if hello.to != inner.me {
        return Err(format!("hello for {} reached {}", hello.to, inner.me));
    }
    tls::verify_claimed_node(conn, hello.from).map_err(|e| e.to_string())
}

/// Accepts the streams a verified peer opens on `conn`.
pub(super) async fn serve_connection(inner: Arc<Inner>, conn: quinn::Connection, peer: NodeId) {
    loop {
        let (send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let inner2 = inner.clone();
        let conn2 = conn.clone();
        tokio::spawn(async move {
            let hello = tokio::time::timeout(
                Duration::from_millis(inner2.cfg.hello_timeout_ms),
                read_hello(&mut recv),
            )
            .await;
            match hello {
                Ok(Ok(h)) if h.from == peer => match check_hello(&inner2, &conn2, &h) {
                    Ok(()) => handle_stream(inner2, h, send, recv).await,
                    Err(e) => refuse(&inner2, &conn2, &e),
                },
                Ok(Ok(_)) => refuse(&inner2, &conn2, "stream hello names another node"),
                Ok(Err(e)) => refuse(&inner2, &conn2, &format!("bad hello: {e}")),
                Err(_) => refuse(&inner2, &conn2, "no hello in time"),
            }
        });
    }
}

async fn handle_stream(
    inner: Arc<Inner>,
    hello: Hello,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    match hello.kind {
        StreamKind::Raft => serve_raft_requests(inner, hello.from, send, recv).await,
        StreamKind::Snapshot => serve_snapshot(inner, hello.from, send, recv).await,
    }
}

/// Reads the next batch frame of a Raft stream from `from`: `None` at the
/// end of the stream (clean or lost), or after a malformed frame, which
/// closes the connection.
pub(super) async fn read_batch_frame(
    inner: &Inner,
    from: NodeId,
    recv: &mut quinn::RecvStream,
) -> Option<Vec<u8>> {
    match wire::read_frame(recv, FRAME_BYTES_MAX).await {
        Ok(p) => {
            if p.is_some() {
                let mut heard = inner.heard.lock().expect("heard poisoned");
                heard.insert(from, std::time::Instant::now());
            }
            p
        }
        Err(wire::WireError::Io(e)) => {
            tracing::debug!(peer = %from, error = %e, "raft stream ended");
            None
        }
        Err(e) => {
            protocol_error(inner, from, &e.to_string());
            None
        }
    }
}

/// Serves a peer's Raft stream: decode batches, hand every request to its
/// group, send the replies back coalesced.
async fn serve_raft_requests(
    inner: Arc<Inner>,
    from: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let (tx, mut rx) = mpsc::channel::<Outbound>(inner.cfg.inbound_in_flight_max);
    let limits = CoalesceLimits {
        frame_bytes_max: inner.cfg.frame_bytes_max,
        frame_msgs_max: inner.cfg.frame_msgs_max,
        lazy_linger: Duration::from_millis(inner.cfg.reply_linger_ms),
    };
    let metrics = inner.metrics.clone();
    let inner2 = inner.clone();
    let writer = tokio::spawn(async move {
        let r = pump(&mut rx, &mut send, limits, &metrics, &inner2.expediter).await;
        let _ = send.finish();
        r
    });
    let permits = Arc::new(Semaphore::new(inner.cfg.inbound_in_flight_max));
    while let Some(payload) = read_batch_frame(&inner, from, &mut recv).await {
        let parts = match proto::decode_batch(&payload, inner.cfg.frame_msgs_max) {
            Ok(p) => p,
            Err(e) => {
                protocol_error(&inner, from, &e.to_string());
                break;
            }
        };
        let mut reqs = Vec::with_capacity(parts.len());
        for p in &parts {
            match proto::decode_request(p) {
                Ok((head, body)) => reqs.push((head, body.to_vec())),
                Err(e) => {
                    protocol_error(&inner, from, &e.to_string());
                    reqs.clear();
                    break;
                }
            }
        }
        if reqs.len() != parts.len() {
            break;
        }
        inner.metrics.frame_received(reqs.len());
        for (head, body) in reqs {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let (inner, tx) = (inner.clone(), tx.clone());
            let answer = inner.inbound.request(from, head.shard, body);
            if head.id == proto::ONEWAY_ID {
                // Expects no reply: the work is done, nothing goes back.
                tokio::spawn(async move {
                    let _ = answer.await;
                    drop(permit);
                });
                continue;
            }
            tokio::spawn(async move {
                // A reply is as urgent as its request.
                let urgency = match head.urgent {
                    true => Urgency::Urgent,
                    false => Urgency::Lazy,
                };
                let resp = answer.await;
                drop(permit);
                if inner.faults.is_blocked(inner.me, from) || inner.faults.should_drop() {
                    return;
                }
                let bytes = proto::encode_response(head.id, &resp);
                let _ = tx.send(Outbound { bytes, urgency }).await;
            });
        }
    }
    drop(tx);
    let _ = writer.await;
}

pub(super) fn protocol_error(inner: &Inner, from: NodeId, what: &str) {
    tracing::warn!(me = %inner.me, peer = %from, error = what, "protocol error; closing connection");
    inner.metrics.bad_frames.fetch_add(1, Ordering::Relaxed);
    let peer = inner
        .peers
        .lock()
        .expect("peers poisoned")
        .get(&from)
        .cloned();
    if let Some(c) = peer.and_then(|p| p.connection()) {
        c.close(close::PROTOCOL.into(), what.as_bytes());
    }
}
