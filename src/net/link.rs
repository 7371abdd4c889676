//! The link to one peer: connect (dial or wait to be dialed), run our Raft
//! stream on the connection, turn the peer's queue into coalesced batch
//! frames, and complete waiting calls with the responses.

use super::coalesce::{CoalesceLimits, Coalescer, Urgency};
use super::proto::{self, close, Hello, StreamKind};
use super::transport::{write_msg, Inner};
use super::{accept, TransportConfig};
use crate::metrics::NetMetrics;
use crate::tls;
use crate::NodeId;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

pub(super) struct Outbound {
    pub(super) bytes: Vec<u8>,
    pub(super) urgency: Urgency,
}

pub(super) struct Peer {
    pub(super) id: NodeId,
    pub(super) addr: Mutex<SocketAddr>,
    pub(super) tx: mpsc::Sender<Outbound>,
    /// The verified connection, when there is one.
    pub(super) conn: watch::Sender<Option<quinn::Connection>>,
    /// Whether the Raft stream to the peer is up (calls fail fast when not).
    pub(super) ready: watch::Sender<bool>,
    pub(super) pending: Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>,
    pub(super) next_id: AtomicU64,
}

impl Peer {
    pub(super) fn fail_pending(&self) {
        self.pending.lock().expect("pending poisoned").clear();
    }

    pub(super) fn connection(&self) -> Option<quinn::Connection> {
        self.conn
            .borrow()
            .clone()
            .filter(|c| c.close_reason().is_none())
    }
}

fn is_shutdown(inner: &Inner) -> bool {
    *inner.shutdown.borrow()
}

fn backoff(cfg: &TransportConfig, attempt: u32) -> Duration {
    let base = cfg
        .reconnect_backoff_ms_min
        .saturating_mul(1u64 << attempt.min(16))
        .min(cfg.reconnect_backoff_ms_max);
    // Jitter keeps restarted nodes from redialing in lockstep.
    let jitter = rand::random::<u64>() % (base / 2 + 1);
    Duration::from_millis(base / 2 + jitter)
}

/// The link to one peer: get a connection (dial or wait for it), run the
/// Raft stream on it until it breaks, repeat.
pub(super) async fn peer_task(
    inner: Arc<Inner>,
    peer: Arc<Peer>,
    mut rx: mpsc::Receiver<Outbound>,
) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut attempt = 0u32;
    let dialer = inner.me < peer.id;
    loop {
        if is_shutdown(&inner) {
            return;
        }
        let conn = if dialer {
            match dial(&inner, &peer).await {
                Ok(c) => {
                    attempt = 0;
                    peer.conn.send_replace(Some(c.clone()));
                    tokio::spawn(accept::serve_connection(inner.clone(), c.clone(), peer.id));
                    c
                }
                Err(e) => {
                    tracing::debug!(peer = %peer.id, error = %e, "dial failed");
                    let wait = backoff(&inner.cfg, attempt);
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.wait_for(|s| *s) => return,
                    }
                    continue;
                }
            }
        } else {
            let mut w = peer.conn.subscribe();
            let got = tokio::select! {
                c = w.wait_for(|c| c.as_ref().is_some_and(|c| c.close_reason().is_none())) => {
                    c.ok().and_then(|c| c.clone())
                }
                _ = shutdown.wait_for(|s| *s) => return,
            };
            match got {
                Some(c) => c,
                None => return,
            }
        };
        if let Err(e) = run_raft_stream(&inner, &peer, &conn, &mut rx).await {
            tracing::debug!(peer = %peer.id, error = %e, "raft stream ended");
        }
        peer.ready.send_replace(false);
        peer.fail_pending();
        while rx.try_recv().is_ok() {}
        if dialer {
            conn.close(close::PROTOCOL.into(), b"raft stream ended");
            let wait = backoff(&inner.cfg, attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        } else {
            // Wait for this connection to go away (the dialer redials).
            tokio::select! {
                _ = conn.closed() => {}
                _ = tokio::time::sleep(Duration::from_millis(inner.cfg.reconnect_backoff_ms_max)) => {
                    conn.close(close::PROTOCOL.into(), b"raft stream ended");
                }
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

async fn dial(inner: &Inner, peer: &Peer) -> Result<quinn::Connection, String> {
    let addr = *peer.addr.lock().expect("addr poisoned");
    let connecting = inner
        .endpoint
        .connect_with(
            inner.client_cfg.clone(),
            addr,
            &tls::node_server_name(peer.id),
        )
        .map_err(|e| e.to_string())?;
    let conn = tokio::time::timeout(
        Duration::from_millis(inner.cfg.connect_timeout_ms),
        connecting,
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    inner
        .metrics
        .connections_established
        .fetch_add(1, Ordering::Relaxed);
    tracing::info!(me = %inner.me, peer = %peer.id, %addr, "connected");
    Ok(conn)
}

/// Opens our Raft stream on `conn` and pumps the peer's queue into it until
/// the stream or connection breaks.
async fn run_raft_stream(
    inner: &Arc<Inner>,
    peer: &Arc<Peer>,
    conn: &quinn::Connection,
    rx: &mut mpsc::Receiver<Outbound>,
) -> Result<(), String> {
    let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let hello = Hello {
        from: inner.me,
        to: peer.id,
        kind: StreamKind::Raft,
    };
    write_msg(&mut send, &hello)
        .await
        .map_err(|e| e.to_string())?;
    peer.ready.send_replace(true);
    let reader = tokio::spawn(read_responses(inner.clone(), peer.clone(), recv));
    let limits = CoalesceLimits {
        frame_bytes_max: inner.cfg.frame_bytes_max,
        frame_msgs_max: inner.cfg.frame_msgs_max,
        lazy_linger: Duration::from_millis(inner.cfg.heartbeat_linger_ms),
    };
    let mut shutdown = inner.shutdown.subscribe();
    let r = tokio::select! {
        r = pump(rx, &mut send, limits, &inner.metrics, &inner.expediter) => r,
        _ = conn.closed() => Err("connection closed".to_string()),
        _ = shutdown.wait_for(|s| *s) => Ok(()),
    };
    reader.abort();
    r
}

/// Turns queued messages into batch frames by the coalescing rule and writes
/// them. Returns when the queue closes or a write fails.
pub(super) async fn pump(
    rx: &mut mpsc::Receiver<Outbound>,
    send: &mut quinn::SendStream,
    limits: CoalesceLimits,
    metrics: &NetMetrics,
    expediter: &super::Expediter,
) -> Result<(), String> {
    let flush = expediter.flush_signal();
    let mut co: Coalescer<Vec<u8>> = Coalescer::new(limits);
    // Send everything queued, due or not: while a client request waits on
    // this node (lingering heartbeats may hold up its group's replication;
    // the first waiter's notification wakes this loop) and when the queue
    // closes.
    let mut force = false;
    let mut closed = false;
    loop {
        let now = Instant::now();
        force |= expediter.expedited();
        while co.is_due(now) || (force && !co.is_empty()) {
            let parts = co.take_frame();
            let frame = proto::encode_batch(&parts);
            send.write_all(&frame).await.map_err(|e| e.to_string())?;
            metrics.frame_sent(parts.len());
        }
        force = false;
        if closed {
            return Ok(());
        }
        let deadline = co.deadline();
        tokio::select! {
            m = rx.recv() => match m {
                Some(m) => {
                    let now = Instant::now();
                    let urgent = m.urgency == Urgency::Urgent;
                    let len = m.bytes.len();
                    co.push(m.bytes, len, m.urgency, now);
                    // Gather whatever else is already queued (bounded: a
                    // few frames' worth, then write). Before an urgent
                    // flush, let the tasks that became ready in this
                    // scheduling round queue theirs too: one frame for all
                    // of them instead of one each.
                    let cap = limits.frame_msgs_max * 4;
                    gather(rx, &mut co, cap, now);
                    if urgent && co.len() < cap {
                        tokio::task::yield_now().await;
                        gather(rx, &mut co, cap, Instant::now());
                    }
                }
                None => (force, closed) = (true, true),
            },
            _ = sleep_until_opt(deadline) => {}
            _ = flush.notified() => force = true,
        }
    }
}

/// Moves what is already queued in `rx` into `co`, up to `cap` messages.
fn gather(
    rx: &mut mpsc::Receiver<Outbound>,
    co: &mut Coalescer<Vec<u8>>,
    cap: usize,
    now: Instant,
) {
    while co.len() < cap {
        match rx.try_recv() {
            Ok(m) => {
                let len = m.bytes.len();
                co.push(m.bytes, len, m.urgency, now);
            }
            Err(_) => break,
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Reads response frames of our Raft stream and completes the waiting calls.
async fn read_responses(inner: Arc<Inner>, peer: Arc<Peer>, mut recv: quinn::RecvStream) {
    while let Some(payload) = accept::read_batch_frame(&inner, peer.id, &mut recv).await {
        let parts = match proto::decode_batch(&payload, inner.cfg.frame_msgs_max) {
            Ok(p) => p,
            Err(e) => return accept::protocol_error(&inner, peer.id, &e.to_string()),
        };
        inner.metrics.frame_received(parts.len());
        for p in parts {
            match proto::decode_response(p) {
                Ok((id, body)) => {
                    let waiter = peer.pending.lock().expect("pending poisoned").remove(&id);
                    if let Some(w) = waiter {
                        let _ = w.send(body.to_vec());
                    }
                }
                Err(e) => {
                    tracing::warn!(peer = %peer.id, error = %e, "undecodable response");
                    inner.metrics.bad_frames.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
