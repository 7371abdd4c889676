//! `tessera::Client`: the async client library.
//!
//! A client reads a cluster file, connects to nodes over QUIC with its
//! client certificate (client ALPN), learns routes, and sends each request to
//! the leader of the shard that owns the key. Stale routes are corrected from
//! the servers' typed answers (`NotLeader`, `EpochMismatch`,
//! `KeyNotInRange`, `UnknownShard`) and retried with backoff under an overall
//! deadline; a stale route costs a round trip, never a wrong answer.
//!
//! This module builds without the `server` feature: an application that
//! only talks to a cluster compiles neither RocksDB nor openraft.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tessera::client::ClientError> {
//! let client = tessera::Client::connect("tessera-data/cluster.toml").await?;
//! client.put(b"greeting", b"hello").await?;
//! assert_eq!(client.get(b"greeting").await?.as_deref(), Some(&b"hello"[..]));
//! # Ok(()) }
//! ```

pub use crate::api::call::NodeCallError;
use crate::api::{ApiError, NodeStatus, Request, Response, SCAN_LIMIT_MAX};
use crate::cluster_file::{ClusterFile, ClusterFileError};
use crate::command::{Op, OpResult};
use crate::digest::{DigestStatus, ShardDigest, ShardVerification};
use crate::limits::{self, LimitError};
use crate::session::{ClientId, SessionStamp, SESSION_WINDOW};
use crate::tls::{TlsError, TlsFiles, TlsIdentity};
use crate::{NodeId, ShardDescriptor, ShardId};
use shard_router::RouteCache;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod admin;
mod data;
mod nodes;
mod retry;

pub use data::Scanner;
/// A connection's transport counters ([`Client::connection_stats`]).
pub use quinn::ConnectionStats;
use retry::{unexpected, Target};

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request is over a limit; nothing was sent.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// The cluster file is unreadable.
    #[error(transparent)]
    ClusterFile(#[from] ClusterFileError),
    /// The TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The deadline passed before the request was served. A write that
    /// timed out is indeterminate: it may still take effect.
    #[error("deadline of {deadline:?} passed: {last_error}")]
    Timeout {
        /// The overall deadline.
        deadline: Duration,
        /// The last error seen while retrying.
        last_error: String,
    },
    /// The server refused the request for a reason retrying cannot fix.
    #[error("refused: {0}")]
    Refused(ApiError),
    /// The local QUIC endpoint could not be created.
    #[error("client endpoint: {0}")]
    Endpoint(std::io::Error),
    /// The server answered something this request cannot produce (a
    /// client and server of mismatched versions).
    #[error("unexpected answer: {0}")]
    Protocol(String),
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Overall deadline of one call, retries included. Default: 30 s.
    pub deadline: Duration,
    /// Deadline of one attempt (one request to one node). Default: 5 s.
    pub attempt_timeout: Duration,
    /// First retry backoff, doubled per retry up to 500 ms. Default: 10 ms.
    pub backoff_min: Duration,
    /// Writes apply exactly once: each carries this client's session
    /// stamp, and a retry of a write that was applied (its reply lost, or
    /// its attempt timed out after it committed) is answered with the first
    /// application's results instead of being applied again. Off: a retry
    /// may apply a write twice (at least once). Default: on.
    ///
    /// Servers remember a session for 10 minutes of inactivity
    /// ([`crate::session::SESSION_TTL_MS`]); keep `deadline` well below.
    pub exactly_once: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            deadline: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(10),
            exactly_once: true,
        }
    }
}

/// The outcome of [`Client::cas`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasOutcome {
    /// Whether the swap happened.
    pub succeeded: bool,
    /// The value before the operation.
    pub current: Option<Vec<u8>>,
}

struct Inner {
    endpoint: quinn::Endpoint,
    quic: quinn::ClientConfig,
    nodes: Mutex<Vec<(NodeId, SocketAddr)>>,
    /// Held for lookups and inserts only (never across an await): every
    /// request looks its node up here.
    conns: Mutex<HashMap<NodeId, quinn::Connection>>,
    /// Per node: requests in flight, the dial lock and the multiplexed
    /// request stream ([`crate::api::mux`]).
    per_node: Mutex<HashMap<NodeId, Arc<PerNode>>>,
    routes: Mutex<RouteCache>,
    opts: ClientOptions,
    retries: std::sync::atomic::AtomicU64,
    /// Requests answered on a multiplexed stream.
    multiplexed: std::sync::atomic::AtomicU64,
    session: Mutex<SessionState>,
    /// Signalled when a write of the session finishes (room in its window).
    session_room: tokio::sync::Notify,
}

/// A node's requests in flight, its dial lock and its multiplexed stream.
#[derive(Default)]
struct PerNode {
    /// Requests to the node in flight (on any stream).
    calls: std::sync::atomic::AtomicUsize,
    /// Held while dialing the node (one handshake at a time), with the
    /// last dial's failure.
    dial: tokio::sync::Mutex<Option<crate::api::call::NodeCallError>>,
    /// Dials of the node that failed.
    dial_failures: std::sync::atomic::AtomicU64,
    /// Held while the multiplexed stream is opened.
    slot: tokio::sync::Mutex<MuxSlot>,
}

/// A node's multiplexed stream as last opened: on which connection, and
/// the stream (`None`: the node does not serve them).
#[derive(Default)]
struct MuxSlot {
    conn: Option<usize>,
    stream: Option<Arc<crate::api::mux::MuxStream>>,
}

/// This client's session: its id, the next sequence number, and the
/// writes still open (neither answered, failed nor abandoned).
struct SessionState {
    id: ClientId,
    next: u64,
    open: std::collections::BTreeSet<u64>,
}

/// One open write of the session; finished when dropped (the call ended,
/// however it ended: the write will never be sent again).
struct OpenWrite {
    inner: Arc<Inner>,
    seq: u64,
}

impl OpenWrite {
    /// The stamp of an attempt: everything below the oldest open write is
    /// finished.
    fn stamp(&self) -> SessionStamp {
        let s = self.inner.session.lock().expect("session poisoned");
        SessionStamp {
            client: s.id,
            seq: self.seq,
            // This write is open itself, so the oldest is at most it.
            acked: s.open.first().copied().unwrap_or(self.seq),
        }
    }
}

impl Drop for OpenWrite {
    fn drop(&mut self) {
        self.inner
            .session
            .lock()
            .expect("session poisoned")
            .open
            .remove(&self.seq);
        self.inner.session_room.notify_waiters();
    }
}

/// A connection to a Tessera cluster (cheap to clone; share one).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// One attempt's failure, and what it teaches the route cache.
enum AttemptError {
    /// Retry (after the cache was corrected).
    Retry(String),
    /// Retry at once: the answer said where to go (a new leader, newer
    /// descriptors), so waiting would only add latency. A few in a row at
    /// most, then it counts as [`AttemptError::Retry`].
    Redirect(String),
    /// Give up.
    Fatal(ClientError),
}

impl Client {
    /// Connects using a cluster file (node addresses, CA, client
    /// certificate and key) with default options.
    ///
    /// # Errors
    /// [`ClientError::ClusterFile`] or [`ClientError::Tls`] when the file or
    /// the certificates are unusable. Nodes are dialed lazily: an
    /// unreachable cluster shows at the first request.
    pub async fn connect(cluster_file: impl AsRef<Path>) -> Result<Client, ClientError> {
        Self::connect_with(cluster_file, ClientOptions::default()).await
    }

    /// [`Self::connect`] with options.
    ///
    /// # Errors
    /// As [`Self::connect`].
    pub async fn connect_with(
        cluster_file: impl AsRef<Path>,
        opts: ClientOptions,
    ) -> Result<Client, ClientError> {
        let f = ClusterFile::load(cluster_file.as_ref())?;
        let identity = TlsIdentity::load(&TlsFiles {
            ca_cert: f.ca_cert.clone(),
            cert: f.client_cert.clone(),
            key: f.client_key.clone(),
        })?;
        let nodes = f.nodes.iter().map(|n| (n.id, n.addr)).collect();
        Self::from_identity(&identity, nodes, opts)
    }

    /// A client from loaded TLS material and node addresses.
    ///
    /// # Errors
    /// [`ClientError::Tls`] or [`ClientError::Endpoint`].
    pub fn from_identity(
        identity: &TlsIdentity,
        nodes: Vec<(NodeId, SocketAddr)>,
        opts: ClientOptions,
    ) -> Result<Client, ClientError> {
        let quic = crate::api::call::quic_config(identity)?;
        let endpoint = crate::api::call::endpoint().map_err(ClientError::Endpoint)?;
        Ok(Client {
            inner: Arc::new(Inner {
                endpoint,
                quic,
                nodes: Mutex::new(nodes),
                conns: Mutex::new(HashMap::new()),
                per_node: Mutex::new(HashMap::new()),
                routes: Mutex::new(RouteCache::new()),
                opts,
                retries: std::sync::atomic::AtomicU64::new(0),
                multiplexed: std::sync::atomic::AtomicU64::new(0),
                session: Mutex::new(SessionState {
                    id: rand::random::<ClientId>(),
                    next: 1,
                    open: std::collections::BTreeSet::new(),
                }),
                session_room: tokio::sync::Notify::new(),
            }),
        })
    }

    /// Retries made so far (routing corrections, unavailable leaders).
    pub fn retries(&self) -> u64 {
        self.inner
            .retries
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requests answered on a node's multiplexed stream so far (the rest
    /// took a stream each: requests alone in flight to their node, scans,
    /// admin requests, large batches, and every request to a node that
    /// does not serve multiplexed streams).
    pub fn multiplexed(&self) -> u64 {
        self.inner
            .multiplexed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Seeds or corrects the route cache with a descriptor (tests and tools
    /// that know better; the client corrects itself either way).
    pub fn learn_route(&self, d: ShardDescriptor) {
        self.inner.routes.lock().expect("routes poisoned").insert(d);
    }

    /// The nodes of the cluster file.
    pub fn nodes(&self) -> Vec<(NodeId, SocketAddr)> {
        self.inner.nodes.lock().expect("nodes poisoned").clone()
    }

    fn node_addr(&self, node: NodeId) -> Option<SocketAddr> {
        self.inner
            .nodes
            .lock()
            .expect("nodes poisoned")
            .iter()
            .find(|(id, _)| *id == node)
            .map(|(_, a)| *a)
    }
}
