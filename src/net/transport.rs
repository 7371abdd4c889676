//! The QUIC transport of one node: one connection per node pair, one
//! coalescing Raft stream per direction, a stream per snapshot transfer.
//!
//! Connection ownership is fixed by id: the node with the lower id dials, the
//! higher one accepts, so a pair never holds two connections. Each side
//! opens its own Raft stream on the shared connection for the requests it
//! sends; the other side answers on that stream. Every stream starts with a
//! [`Hello`] whose sender id is checked against the certificate before
//! anything else on the connection is read.
//!
//! Outbound Raft messages of every shard to a peer go through that peer's
//! bounded queue; one task per peer turns the queue into frames by the
//! [`Coalescer`] rule. Callers wait for their reply under the RPC's deadline.

use super::coalesce::{CoalesceLimits, Coalescer, Urgency};
use super::fault::Faults;
use super::proto::{
    self, close, Hello, PeerRequest, PeerResponse, Refusal, RequestEnvelope, ResponseEnvelope,
    SnapshotFrame, SnapshotReply, StreamKind,
};
use crate::limits::FRAME_BYTES_MAX;
use crate::metrics::NetMetrics;
use crate::node::Registry;
use crate::raft::{SnapshotMeta, Vote};
use crate::storage::snapshot::SnapshotData;
use crate::tls::{self, TlsIdentity};
use crate::wire;
use crate::{NodeId, ShardId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

/// Transport settings of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportConfig {
    /// Outbound messages queued per peer before senders wait. Default: 8192.
    pub peer_queue_max: usize,
    /// Message bytes per frame (a single larger message goes alone, up to the
    /// 16 MiB frame limit). Default: 4 MiB.
    pub frame_bytes_max: usize,
    /// Messages per frame. Default: 4096.
    pub frame_msgs_max: usize,
    /// Longest a heartbeat waits for other messages to share its frame.
    /// Must stay well below the heartbeat interval. Default: 50 ms.
    pub heartbeat_linger_ms: u64,
    /// Longest a heartbeat's reply waits for company. Default: 2 ms.
    pub reply_linger_ms: u64,
    /// Inbound requests per connection being handled at once. Default: 8192.
    pub inbound_in_flight_max: usize,
    /// Concurrent inbound snapshot transfers per node. Default: 4.
    pub snapshot_transfers_max: usize,
    /// Concurrent outbound snapshot transfers per node (more wait their
    /// turn). Default: 4.
    pub snapshot_sends_max: usize,
    /// Outbound snapshot bytes per second, per transfer (0: unlimited), so
    /// a move does not starve the node's Raft traffic. Default: 64 MiB/s.
    pub snapshot_send_bytes_per_sec: u64,
    /// Client connections served at once; more are refused. Default: 4096.
    pub client_connections_max: usize,
    /// Bytes per snapshot chunk on the wire. Default: 1 MiB.
    pub snapshot_chunk_bytes: usize,
    /// Dial timeout. Default: 2000 ms.
    pub connect_timeout_ms: u64,
    /// First reconnect backoff, doubled up to the maximum. Default: 50 ms.
    pub reconnect_backoff_ms_min: u64,
    /// Largest reconnect backoff. Default: 2000 ms.
    pub reconnect_backoff_ms_max: u64,
    /// A connection silent this long is dead. Default: 3000 ms.
    pub idle_timeout_ms: u64,
    /// Keep-alive interval on quiet connections. Default: 500 ms.
    pub keep_alive_ms: u64,
    /// Time a new connection has to send its first Hello. Default: 2000 ms.
    pub hello_timeout_ms: u64,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            peer_queue_max: 8192,
            frame_bytes_max: 4 << 20,
            frame_msgs_max: 4096,
            heartbeat_linger_ms: 50,
            reply_linger_ms: 2,
            inbound_in_flight_max: 8192,
            snapshot_transfers_max: 4,
            snapshot_sends_max: 4,
            snapshot_send_bytes_per_sec: 64 << 20,
            client_connections_max: 4096,
            snapshot_chunk_bytes: 1 << 20,
            connect_timeout_ms: 2000,
            reconnect_backoff_ms_min: 50,
            reconnect_backoff_ms_max: 2000,
            idle_timeout_ms: 3000,
            keep_alive_ms: 500,
            hello_timeout_ms: 2000,
        }
    }
}

impl TransportConfig {
    /// Checks every field; the error names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let pos = |f: &'static str, v: u64| {
            if v == 0 {
                Err((f, "must be at least 1".to_string()))
            } else {
                Ok(())
            }
        };
        pos("peer_queue_max", self.peer_queue_max as u64)?;
        pos("frame_msgs_max", self.frame_msgs_max as u64)?;
        pos("inbound_in_flight_max", self.inbound_in_flight_max as u64)?;
        pos("snapshot_transfers_max", self.snapshot_transfers_max as u64)?;
        pos("snapshot_sends_max", self.snapshot_sends_max as u64)?;
        pos("client_connections_max", self.client_connections_max as u64)?;
        pos("connect_timeout_ms", self.connect_timeout_ms)?;
        pos("reconnect_backoff_ms_min", self.reconnect_backoff_ms_min)?;
        pos("idle_timeout_ms", self.idle_timeout_ms)?;
        pos("keep_alive_ms", self.keep_alive_ms)?;
        pos("hello_timeout_ms", self.hello_timeout_ms)?;
        if self.frame_bytes_max < 4096 || self.frame_bytes_max > FRAME_BYTES_MAX / 2 {
            return Err((
                "frame_bytes_max",
                format!("must be within 4096..={}", FRAME_BYTES_MAX / 2),
            ));
        }
        if self.snapshot_chunk_bytes < 4096 || self.snapshot_chunk_bytes > FRAME_BYTES_MAX / 2 {
            return Err((
                "snapshot_chunk_bytes",
                format!("must be within 4096..={}", FRAME_BYTES_MAX / 2),
            ));
        }
        if self.reconnect_backoff_ms_max < self.reconnect_backoff_ms_min {
            return Err((
                "reconnect_backoff_ms_max",
                "must be at least reconnect_backoff_ms_min".into(),
            ));
        }
        if self.keep_alive_ms >= self.idle_timeout_ms {
            return Err(("keep_alive_ms", "must be below idle_timeout_ms".into()));
        }
        Ok(())
    }
}

/// Why a call to a peer got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No connection to the peer (down, not yet connected, or lost while
    /// the call waited).
    #[error("{peer} is unreachable: {reason}")]
    Unreachable {
        /// The peer.
        peer: NodeId,
        /// Why.
        reason: String,
    },
    /// The deadline passed without an answer.
    #[error("no answer from {peer} within {after:?}")]
    Timeout {
        /// The peer.
        peer: NodeId,
        /// The deadline.
        after: Duration,
    },
    /// The peer answered, but not with a Raft response.
    #[error("{peer} refused: {refusal}")]
    Refused {
        /// The peer.
        peer: NodeId,
        /// Its reason.
        refusal: Refusal,
    },
    /// The stream broke mid-transfer or the peer broke the protocol.
    #[error("transfer to {peer} failed: {reason}")]
    Stream {
        /// The peer.
        peer: NodeId,
        /// Why.
        reason: String,
    },
    /// The transfer was cancelled by the caller.
    #[error("cancelled")]
    Cancelled,
}

/// A peer this node talks to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAddr {
    /// The peer's node id.
    pub id: NodeId,
    /// Its QUIC address.
    pub addr: SocketAddr,
}

struct Outbound {
    bytes: Vec<u8>,
    urgency: Urgency,
}

struct Peer {
    id: NodeId,
    addr: Mutex<SocketAddr>,
    tx: mpsc::Sender<Outbound>,
    /// The verified connection, when there is one.
    conn: watch::Sender<Option<quinn::Connection>>,
    /// Whether the Raft stream to the peer is up (calls fail fast when not).
    ready: watch::Sender<bool>,
    pending: Mutex<HashMap<u64, oneshot::Sender<PeerResponse>>>,
    next_id: AtomicU64,
}

impl Peer {
    fn fail_pending(&self) {
        self.pending.lock().expect("pending poisoned").clear();
    }

    fn connection(&self) -> Option<quinn::Connection> {
        self.conn
            .borrow()
            .clone()
            .filter(|c| c.close_reason().is_none())
    }
}

struct Inner {
    me: NodeId,
    endpoint: quinn::Endpoint,
    client_cfg: quinn::ClientConfig,
    cfg: TransportConfig,
    peers: Mutex<HashMap<NodeId, Arc<Peer>>>,
    registry: Arc<Registry>,
    metrics: Arc<NetMetrics>,
    faults: Arc<Faults>,
    shutdown: watch::Sender<bool>,
    snapshot_permits: Arc<Semaphore>,
    client_permits: Arc<Semaphore>,
    /// Outbound snapshot transfers in progress (bounded).
    snapshot_sends: Arc<Semaphore>,
    snapshot_seq: AtomicU64,
}

/// The node's QUIC transport (cheap to clone).
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

fn quic_transport_config(cfg: &TransportConfig) -> Arc<quinn::TransportConfig> {
    let mut tc = quinn::TransportConfig::default();
    // Peers use a few streams (Raft, snapshots); clients one per request.
    tc.max_concurrent_bidi_streams(256u32.into());
    tc.max_concurrent_uni_streams(0u32.into());
    tc.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_millis(cfg.idle_timeout_ms))
            .expect("idle timeout fits QUIC's range"),
    ));
    tc.keep_alive_interval(Some(Duration::from_millis(cfg.keep_alive_ms)));
    tc.stream_receive_window((32u32 << 20).into());
    tc.receive_window((128u32 << 20).into());
    tc.send_window(128 << 20);
    Arc::new(tc)
}

/// Starting the transport failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TLS material unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The listen address could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What the transport hands inbound traffic to and reports into.
pub struct Wiring {
    /// Where inbound Raft requests and snapshots go.
    pub registry: Arc<Registry>,
    /// Counters the transport keeps.
    pub metrics: Arc<NetMetrics>,
    /// The fault layer (none in production).
    pub faults: Arc<Faults>,
}

impl Transport {
    /// Binds `listen` and starts accepting peers; `peers` are dialed (lower
    /// ids) or awaited (higher ids) from now on.
    ///
    /// # Errors
    /// [`TransportError`] when the TLS material is unusable or the address
    /// cannot be bound.
    pub fn start(
        me: NodeId,
        listen: SocketAddr,
        peers: &[PeerAddr],
        identity: &TlsIdentity,
        cfg: TransportConfig,
        wiring: Wiring,
    ) -> Result<Transport, TransportError> {
        let Wiring {
            registry,
            metrics,
            faults,
        } = wiring;
        let qtc = quic_transport_config(&cfg);
        let server_cfg = identity.server_config(qtc.clone())?;
        let client_cfg = identity.client_config(tls::PEER_ALPN, qtc)?;
        let endpoint =
            quinn::Endpoint::server(server_cfg, listen).map_err(|source| TransportError::Bind {
                addr: listen,
                source,
            })?;
        let inner = Arc::new(Inner {
            me,
            endpoint,
            client_cfg,
            snapshot_permits: Arc::new(Semaphore::new(cfg.snapshot_transfers_max)),
            client_permits: Arc::new(Semaphore::new(cfg.client_connections_max)),
            snapshot_sends: Arc::new(Semaphore::new(cfg.snapshot_sends_max)),
            cfg,
            peers: Mutex::new(HashMap::new()),
            registry,
            metrics,
            faults,
            shutdown: watch::channel(false).0,
            snapshot_seq: AtomicU64::new(0),
        });
        let t = Transport { inner };
        for p in peers {
            t.add_peer(p.clone());
        }
        tokio::spawn(accept_loop(t.inner.clone()));
        Ok(t)
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner
            .endpoint
            .local_addr()
            .expect("bound endpoint has an address")
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.me
    }

    /// Adds a peer (or updates its address) and starts its link task.
    pub fn add_peer(&self, p: PeerAddr) {
        if p.id == self.inner.me {
            return;
        }
        let mut peers = self.inner.peers.lock().expect("peers poisoned");
        if let Some(existing) = peers.get(&p.id) {
            *existing.addr.lock().expect("addr poisoned") = p.addr;
            return;
        }
        let (tx, rx) = mpsc::channel(self.inner.cfg.peer_queue_max);
        let peer = Arc::new(Peer {
            id: p.id,
            addr: Mutex::new(p.addr),
            tx,
            conn: watch::channel(None).0,
            ready: watch::channel(false).0,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        });
        peers.insert(p.id, peer.clone());
        tokio::spawn(peer_task(self.inner.clone(), peer, rx));
    }

    /// The ids of every known peer, in id order.
    pub fn peer_ids(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self
            .inner
            .peers
            .lock()
            .expect("peers poisoned")
            .keys()
            .copied()
            .collect();
        ids.sort();
        ids
    }

    /// Every known peer with its address, in id order.
    pub fn peers(&self) -> Vec<PeerAddr> {
        let mut all: Vec<PeerAddr> = self
            .inner
            .peers
            .lock()
            .expect("peers poisoned")
            .values()
            .map(|p| PeerAddr {
                id: p.id,
                addr: *p.addr.lock().expect("addr poisoned"),
            })
            .collect();
        all.sort_by_key(|p| p.id);
        all
    }

    fn peer(&self, id: NodeId) -> Option<Arc<Peer>> {
        self.inner
            .peers
            .lock()
            .expect("peers poisoned")
            .get(&id)
            .cloned()
    }

    /// Whether the Raft stream to `peer` is up.
    pub fn is_connected(&self, peer: NodeId) -> bool {
        self.peer(peer).is_some_and(|p| *p.ready.borrow())
    }

    /// Waits until the Raft streams to every peer are up, or `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let peers: Vec<_> = self
            .inner
            .peers
            .lock()
            .expect("peers poisoned")
            .values()
            .cloned()
            .collect();
        tokio::time::timeout(timeout, async {
            for p in peers {
                let mut rx = p.ready.subscribe();
                let _ = rx.wait_for(|r| *r).await;
            }
        })
        .await
        .is_ok()
    }

    /// Sends one Raft request to `to` for `shard` and waits for the answer.
    ///
    /// # Errors
    /// [`CallError`]: unreachable peer, deadline passed, or a refusal.
    pub async fn call(
        &self,
        to: NodeId,
        shard: ShardId,
        req: PeerRequest,
        deadline: Duration,
    ) -> Result<PeerResponse, CallError> {
        let unreachable = |reason: &str| CallError::Unreachable {
            peer: to,
            reason: reason.to_string(),
        };
        let peer = self.peer(to).ok_or_else(|| unreachable("unknown peer"))?;
        if self.inner.faults.is_blocked(self.inner.me, to) {
            return Err(unreachable("link blocked by the fault layer"));
        }
        if !*peer.ready.borrow() {
            return Err(unreachable("not connected"));
        }
        // A waiting client request may wait for these heartbeats: no
        // linger then.
        let urgency = if self.inner.registry.expedited() {
            Urgency::Urgent
        } else {
            req.urgency()
        };
        let id = peer.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = proto::encode_msg(&RequestEnvelope { id, shard, req });
        if bytes.len() > FRAME_BYTES_MAX - 64 {
            return Err(CallError::Stream {
                peer: to,
                reason: format!("message of {} bytes exceeds the frame limit", bytes.len()),
            });
        }
        let (tx, rx) = oneshot::channel();
        peer.pending
            .lock()
            .expect("pending poisoned")
            .insert(id, tx);
        let forget = || {
            peer.pending.lock().expect("pending poisoned").remove(&id);
        };
        let dropped = self.inner.faults.should_drop();
        let result = tokio::time::timeout(deadline, async {
            if !dropped {
                peer.tx
                    .send(Outbound { bytes, urgency })
                    .await
                    .map_err(|_| unreachable("link closed"))?;
            }
            rx.await.map_err(|_| unreachable("connection lost"))
        })
        .await;
        match result {
            Ok(Ok(PeerResponse::Refused(refusal))) => Err(CallError::Refused { peer: to, refusal }),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                forget();
                Err(e)
            }
            Err(_) => {
                forget();
                Err(CallError::Timeout {
                    peer: to,
                    after: deadline,
                })
            }
        }
    }

    /// Streams a snapshot file to `to` on a stream of its own and waits for
    /// the receiver to install it.
    ///
    /// # Errors
    /// [`CallError`]; a broken stream leaves nothing installed on the peer.
    pub async fn send_snapshot(
        &self,
        to: NodeId,
        shard: ShardId,
        vote: Vote,
        meta: SnapshotMeta,
        data: &SnapshotData,
        deadline: Duration,
    ) -> Result<Vote, CallError> {
        let unreachable = |reason: String| CallError::Unreachable { peer: to, reason };
        let stream_err = |reason: String| CallError::Stream { peer: to, reason };
        let peer = self
            .peer(to)
            .ok_or_else(|| unreachable("unknown peer".into()))?;
        if self.inner.faults.is_blocked(self.inner.me, to) {
            return Err(unreachable("link blocked by the fault layer".into()));
        }
        let conn = peer
            .connection()
            .ok_or_else(|| unreachable("not connected".into()))?;
        let chunk = self.inner.cfg.snapshot_chunk_bytes;
        let rate = self.inner.cfg.snapshot_send_bytes_per_sec;
        let me = self.inner.me;
        let metrics = self.inner.metrics.clone();
        let sends = self.inner.snapshot_sends.clone();
        let work = async move {
            let _permit = sends
                .acquire_owned()
                .await
                .map_err(|_| unreachable("transport closed".into()))?;
            let started = tokio::time::Instant::now();
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let hello = Hello {
                from: me,
                to,
                kind: StreamKind::Snapshot,
            };
            write_msg(&mut send, &hello)
                .await
                .map_err(|e| stream_err(e.to_string()))?;
            write_msg(&mut send, &SnapshotFrame::Head { shard, vote, meta })
                .await
                .map_err(|e| stream_err(e.to_string()))?;
            let mut file = tokio::fs::File::open(data.path())
                .await
                .map_err(|e| stream_err(format!("open {}: {e}", data.path().display())))?;
            let mut sent = 0u64;
            loop {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; chunk];
                let mut filled = 0;
                while filled < chunk {
                    let n = file
                        .read(&mut buf[filled..])
                        .await
                        .map_err(|e| stream_err(format!("read snapshot: {e}")))?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    break;
                }
                buf.truncate(filled);
                sent += filled as u64;
                if rate > 0 {
                    // Pace to the configured rate.
                    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                    tokio::time::sleep_until(started + due).await;
                }
                write_msg(&mut send, &SnapshotFrame::Chunk(buf))
                    .await
                    .map_err(|e| stream_err(e.to_string()))?;
                metrics
                    .snapshot_bytes_sent
                    .fetch_add(filled as u64, Ordering::Relaxed);
            }
            write_msg(&mut send, &SnapshotFrame::End { bytes: sent })
                .await
                .map_err(|e| stream_err(e.to_string()))?;
            send.finish().map_err(|e| stream_err(e.to_string()))?;
            let reply = wire::read_frame(&mut recv, 64 * 1024)
                .await
                .map_err(|e| stream_err(e.to_string()))?
                .ok_or_else(|| stream_err("no reply".into()))?;
            let reply: SnapshotReply =
                wire::decode_payload(&reply).map_err(|e| stream_err(e.to_string()))?;
            match reply {
                SnapshotReply::Done { vote } => Ok(vote),
                SnapshotReply::Refused(refusal) => Err(CallError::Refused { peer: to, refusal }),
            }
        };
        let r = tokio::time::timeout(deadline, work)
            .await
            .unwrap_or(Err(CallError::Timeout {
                peer: to,
                after: deadline,
            }));
        if r.is_ok() {
            self.inner
                .metrics
                .snapshots_sent
                .fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Closes every connection and stops every task.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        self.inner
            .endpoint
            .close(close::SHUTDOWN.into(), b"node shutting down");
    }

    /// Waits until the endpoint's connections are closed (after
    /// [`Self::shutdown`]).
    pub async fn wait_closed(&self) {
        self.inner.endpoint.wait_idle().await;
    }
}

async fn write_msg<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), wire::WireError> {
    let frame = wire::encode_frame(msg, FRAME_BYTES_MAX)?;
    send.write_all(&frame)
        .await
        .map_err(|e| wire::WireError::Io(e.into()))?;
    Ok(())
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
async fn peer_task(inner: Arc<Inner>, peer: Arc<Peer>, mut rx: mpsc::Receiver<Outbound>) {
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
                    tokio::spawn(serve_connection(inner.clone(), c.clone(), peer.id));
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
        r = pump(rx, &mut send, limits, &inner.metrics, inner.registry.flush_signal()) => r,
        _ = conn.closed() => Err("connection closed".to_string()),
        _ = shutdown.wait_for(|s| *s) => Ok(()),
    };
    reader.abort();
    r
}

/// Turns queued messages into batch frames by the coalescing rule and writes
/// them. Returns when the queue closes or a write fails.
async fn pump(
    rx: &mut mpsc::Receiver<Outbound>,
    send: &mut quinn::SendStream,
    limits: CoalesceLimits,
    metrics: &NetMetrics,
    flush: &tokio::sync::Notify,
) -> Result<(), String> {
    let mut co: Coalescer<Vec<u8>> = Coalescer::new(limits);
    // Send everything queued, due or not: set when a client request starts
    // waiting on this node (lingering heartbeats may hold up its group's
    // replication) and when the queue closes.
    let mut force = false;
    let mut closed = false;
    loop {
        let now = Instant::now();
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

/// Reads the next batch frame of a Raft stream from `from`: `None` at the
/// end of the stream (clean or lost), or after a malformed frame, which
/// closes the connection.
async fn read_batch_frame(
    inner: &Inner,
    from: NodeId,
    recv: &mut quinn::RecvStream,
) -> Option<Vec<u8>> {
    match wire::read_frame(recv, FRAME_BYTES_MAX).await {
        Ok(p) => p,
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

/// Reads response frames of our Raft stream and completes the waiting calls.
async fn read_responses(inner: Arc<Inner>, peer: Arc<Peer>, mut recv: quinn::RecvStream) {
    while let Some(payload) = read_batch_frame(&inner, peer.id, &mut recv).await {
        let parts = match proto::decode_batch(&payload, inner.cfg.frame_msgs_max) {
            Ok(p) => p,
            Err(e) => return protocol_error(&inner, peer.id, &e.to_string()),
        };
        inner.metrics.frame_received(parts.len());
        for p in parts {
            match proto::decode_msg::<ResponseEnvelope>(p) {
                Ok(env) => {
                    let waiter = peer
                        .pending
                        .lock()
                        .expect("pending poisoned")
                        .remove(&env.id);
                    if let Some(w) = waiter {
                        let _ = w.send(env.resp);
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

async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        tokio::spawn(handle_incoming(inner.clone(), incoming));
    }
}

fn refuse(inner: &Inner, conn: &quinn::Connection, why: &str) {
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
            let Ok(_permit) = inner.client_permits.clone().try_acquire_owned() else {
                refuse(&inner, &conn, "too many client connections");
                return;
            };
            inner.registry.clone().serve_client(conn).await;
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
async fn serve_connection(inner: Arc<Inner>, conn: quinn::Connection, peer: NodeId) {
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
        let r = pump(
            &mut rx,
            &mut send,
            limits,
            &metrics,
            inner2.registry.flush_signal(),
        )
        .await;
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
        let mut envs = Vec::with_capacity(parts.len());
        for p in &parts {
            match proto::decode_msg::<RequestEnvelope>(p) {
                Ok(env) => envs.push(env),
                Err(e) => {
                    protocol_error(&inner, from, &e.to_string());
                    envs.clear();
                    break;
                }
            }
        }
        if envs.len() != parts.len() {
            break;
        }
        inner.metrics.frame_received(envs.len());
        for env in envs {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let (inner, tx) = (inner.clone(), tx.clone());
            tokio::spawn(async move {
                let urgency = env.req.urgency();
                let resp = inner
                    .registry
                    .handle_request(from, env.shard, env.req)
                    .await;
                drop(permit);
                if inner.faults.is_blocked(inner.me, from) || inner.faults.should_drop() {
                    return;
                }
                let bytes = proto::encode_msg(&ResponseEnvelope { id: env.id, resp });
                let _ = tx.send(Outbound { bytes, urgency }).await;
            });
        }
    }
    drop(tx);
    let _ = writer.await;
}

fn protocol_error(inner: &Inner, from: NodeId, what: &str) {
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

/// Receives one snapshot into a file of the shard's snapshot folder, then
/// hands it to the shard's group.
async fn serve_snapshot(
    inner: Arc<Inner>,
    from: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let Ok(_permit) = inner.snapshot_permits.clone().acquire_owned().await else {
        return;
    };
    let reply = match receive_snapshot(&inner, from, &mut recv).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(me = %inner.me, peer = %from, error = %e, "snapshot transfer failed");
            let _ = recv.stop(close::PROTOCOL.into());
            return;
        }
    };
    if let Ok(frame) = wire::encode_frame(&reply, 64 * 1024) {
        let _ = send.write_all(&frame).await;
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}

async fn receive_snapshot(
    inner: &Inner,
    from: NodeId,
    recv: &mut quinn::RecvStream,
) -> Result<SnapshotReply, String> {
    let head = wire::read_frame(recv, 1 << 20)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("stream ended before the head")?;
    let SnapshotFrame::Head { shard, vote, meta } =
        wire::decode_payload(&head).map_err(|e| e.to_string())?
    else {
        return Err("snapshot stream must start with a head".into());
    };
    let Some(dir) = inner.registry.snapshot_dir(shard) else {
        return Ok(SnapshotReply::Refused(Refusal::UnknownShard(shard)));
    };
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| format!("create {}: {e}", dir.display()))?;
    let seq = inner.snapshot_seq.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!(
        "receiving-{}-{}-{seq}.snap",
        from.0,
        std::process::id()
    ));
    let result = async {
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| format!("create {}: {e}", path.display()))?;
        let mut got = 0u64;
        loop {
            let frame = wire::read_frame(recv, FRAME_BYTES_MAX)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("stream ended inside the snapshot")?;
            match wire::decode_payload::<SnapshotFrame>(&frame).map_err(|e| e.to_string())? {
                SnapshotFrame::Chunk(bytes) => {
                    // Tests slow transfers down here to interrupt one.
                    if let Some(ms) = fail::eval("snapshot::receive_chunk", |arg| {
                        arg.and_then(|a| a.parse::<u64>().ok()).unwrap_or(100)
                    }) {
                        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                    }
                    got += bytes.len() as u64;
                    file.write_all(&bytes)
                        .await
                        .map_err(|e| format!("write snapshot: {e}"))?;
                }
                SnapshotFrame::End { bytes } => {
                    if bytes != got {
                        return Err(format!("snapshot of {bytes} bytes arrived with {got}"));
                    }
                    break;
                }
                SnapshotFrame::Head { .. } => return Err("second head in one stream".into()),
            }
        }
        file.sync_all()
            .await
            .map_err(|e| format!("sync snapshot: {e}"))?;
        drop(file);
        inner
            .metrics
            .snapshot_bytes_received
            .fetch_add(got, Ordering::Relaxed);
        inner
            .registry
            .install_snapshot(from, shard, vote, meta, SnapshotData::from_file(&path))
            .await
            .map(|vote| SnapshotReply::Done { vote })
            .or_else(|refusal| Ok(SnapshotReply::Refused(refusal)))
    }
    .await;
    // Installed files were linked under their own name; this one is spare.
    let _ = tokio::fs::remove_file(&path).await;
    if result.is_ok() {
        inner
            .metrics
            .snapshots_received
            .fetch_add(1, Ordering::Relaxed);
    }
    result
}
