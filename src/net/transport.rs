//! The QUIC transport of one node: one connection per node pair, one
//! coalescing Raft stream per direction, a stream per snapshot transfer.
//!
//! Connection ownership is fixed by id: the node with the lower id dials, the
//! higher one accepts, so a pair never holds two connections. Each side
//! opens its own Raft stream on the shared connection for the requests it
//! sends; the other side answers on that stream. Every stream starts with a
//! [`super::proto::Hello`] whose sender id is checked against the certificate before
//! anything else on the connection is read.
//!
//! Outbound messages of every shard to a peer go through that peer's
//! bounded queue; one task per peer ([`super::link`]) turns the queue into
//! frames by the [`super::coalesce::Coalescer`] rule. Callers wait for their
//! reply under the call's deadline. What a message means is not the
//! transport's business: it carries opaque bodies per shard, with an
//! urgency, and hands inbound ones to the node's [`Inbound`].

use super::coalesce::Urgency;
use super::fault::Faults;
use super::link::{peer_task, Outbound, Peer};
use super::proto::{self, close, RequestHead};
use super::{accept, ClientConn, Expediter, Inbound, PeerAddr, TransportConfig};
use crate::limits::FRAME_BYTES_MAX;
use crate::metrics::NetMetrics;
use crate::tls::{self, TlsIdentity};
use crate::wire;
use crate::{NodeId, ShardId};
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

/// Why a message to a peer got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
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
    /// The stream broke mid-transfer or the peer broke the protocol.
    #[error("transfer to {peer} failed: {reason}")]
    Stream {
        /// The peer.
        peer: NodeId,
        /// Why.
        reason: String,
    },
}

pub(super) struct Inner {
    pub(super) me: NodeId,
    pub(super) endpoint: quinn::Endpoint,
    pub(super) client_cfg: quinn::ClientConfig,
    pub(super) cfg: TransportConfig,
    pub(super) peers: Mutex<HashMap<NodeId, Arc<Peer>>>,
    /// Where inbound requests and snapshots go.
    pub(super) inbound: Arc<dyn Inbound>,
    /// Whether client requests wait (heartbeats then skip their linger).
    pub(super) expediter: Arc<Expediter>,
    /// Where client connections go.
    pub(super) clients: mpsc::Sender<ClientConn>,
    pub(super) metrics: Arc<NetMetrics>,
    pub(super) faults: Arc<Faults>,
    pub(super) shutdown: watch::Sender<bool>,
    pub(super) snapshot_permits: Arc<Semaphore>,
    pub(super) client_permits: Arc<Semaphore>,
    /// Outbound snapshot transfers in progress (bounded).
    pub(super) snapshot_sends: Arc<Semaphore>,
    pub(super) snapshot_seq: AtomicU64,
    /// When a Raft frame (request or reply) last arrived from each peer:
    /// liveness that a busy peer proves with its traffic, before a ping
    /// queued behind that traffic is answered.
    pub(super) heard: Mutex<HashMap<NodeId, Instant>>,
}

/// The node's QUIC transport (cheap to clone).
#[derive(Clone)]
pub struct Transport {
    pub(super) inner: Arc<Inner>,
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
    if cfg.ack_eliciting_threshold > 1 {
        // The peer's max_ack_delay stays its own (25 ms by default).
        let mut af = quinn::AckFrequencyConfig::default();
        af.ack_eliciting_threshold(cfg.ack_eliciting_threshold.into());
        tc.ack_frequency_config(Some(af));
    }
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
    /// Where inbound requests and snapshots go.
    pub inbound: Arc<dyn Inbound>,
    /// Whether client requests wait (see [`Expediter`]).
    pub expediter: Arc<Expediter>,
    /// Where client connections go (with the permit that counts them).
    pub clients: mpsc::Sender<ClientConn>,
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
            inbound,
            expediter,
            clients,
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
            inbound,
            expediter,
            clients,
            metrics,
            faults,
            shutdown: watch::channel(false).0,
            snapshot_seq: AtomicU64::new(0),
            heard: Mutex::new(HashMap::new()),
        });
        let t = Transport { inner };
        for p in peers {
            t.add_peer(p.clone());
        }
        tokio::spawn(accept::accept_loop(t.inner.clone()));
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

    pub(super) fn peer(&self, id: NodeId) -> Option<Arc<Peer>> {
        self.inner
            .peers
            .lock()
            .expect("peers poisoned")
            .get(&id)
            .cloned()
    }

    /// How long ago a Raft frame (request or reply) last arrived from
    /// `peer`; `None` if none has since this transport started.
    pub fn heard_from(&self, peer: NodeId) -> Option<Duration> {
        let heard = self.inner.heard.lock().expect("heard poisoned");
        heard.get(&peer).map(Instant::elapsed)
    }

    /// The QUIC statistics of the connection to `peer` (packets, frames
    /// and acknowledgements each way), when there is one.
    pub fn peer_quic_stats(&self, peer: NodeId) -> Option<quinn::ConnectionStats> {
        self.peer(peer)?.connection().map(|c| c.stats())
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

    /// Sends one request `body` to `to` for `shard` and waits for the
    /// answer's body. `urgency` says whether it may wait for company in a
    /// frame (its reply inherits it).
    ///
    /// # Errors
    /// [`SendError`]: unreachable peer, deadline passed.
    pub async fn call(
        &self,
        to: NodeId,
        shard: ShardId,
        body: Vec<u8>,
        urgency: Urgency,
        deadline: Duration,
    ) -> Result<Vec<u8>, SendError> {
        let unreachable = |reason: &str| SendError::Unreachable {
            peer: to,
            reason: reason.to_string(),
        };
        let (peer, id, bytes, urgency) = self.request(to, shard, body, urgency, false)?;
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
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                forget();
                Err(e)
            }
            Err(_) => {
                forget();
                Err(SendError::Timeout {
                    peer: to,
                    after: deadline,
                })
            }
        }
    }

    /// Sends one request `body` to `to` for `shard` that expects no reply
    /// ([`proto::ONEWAY_ID`]): done once the peer's link took it (within
    /// `deadline`); whether it arrives is not reported, so only messages
    /// whose protocol resends them (Raft's) go this way.
    ///
    /// # Errors
    /// [`SendError`]: unreachable peer, the link's queue full until the
    /// deadline.
    pub async fn send(
        &self,
        to: NodeId,
        shard: ShardId,
        body: Vec<u8>,
        urgency: Urgency,
        deadline: Duration,
    ) -> Result<(), SendError> {
        let (peer, _, bytes, urgency) = self.request(to, shard, body, urgency, true)?;
        if self.inner.faults.should_drop() {
            return Ok(());
        }
        match tokio::time::timeout(deadline, peer.tx.send(Outbound { bytes, urgency })).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(SendError::Unreachable {
                peer: to,
                reason: "link closed".into(),
            }),
            Err(_) => Err(SendError::Timeout {
                peer: to,
                after: deadline,
            }),
        }
    }

    /// A request message for `to`, checked: the peer, its link, the size;
    /// a call's takes the next id, a one-way one [`proto::ONEWAY_ID`].
    fn request(
        &self,
        to: NodeId,
        shard: ShardId,
        body: Vec<u8>,
        urgency: Urgency,
        oneway: bool,
    ) -> Result<(Arc<Peer>, u64, Vec<u8>, Urgency), SendError> {
        let unreachable = |reason: &str| SendError::Unreachable {
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
        let urgency = if self.inner.expediter.expedited() {
            Urgency::Urgent
        } else {
            urgency
        };
        let id = if oneway {
            proto::ONEWAY_ID
        } else {
            peer.next_id.fetch_add(1, Ordering::Relaxed)
        };
        let head = RequestHead {
            id,
            shard,
            urgent: urgency == Urgency::Urgent,
        };
        let bytes = proto::encode_request(&head, &body);
        drop(body);
        if bytes.len() > FRAME_BYTES_MAX - 64 {
            return Err(SendError::Stream {
                peer: to,
                reason: format!("message of {} bytes exceeds the frame limit", bytes.len()),
            });
        }
        Ok((peer, id, bytes, urgency))
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

pub(super) async fn write_msg<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), wire::WireError> {
    let frame = wire::encode_frame(msg, FRAME_BYTES_MAX)?;
    send.write_all(&frame)
        .await
        .map_err(|e| wire::WireError::Io(e.into()))?;
    Ok(())
}
