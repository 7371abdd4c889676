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

use crate::api::{ApiError, NodeStatus, Request, Response, SCAN_LIMIT_MAX};
use crate::cluster_file::{ClusterFile, ClusterFileError};
use crate::command::{Op, OpResult};
use crate::digest::{DigestStatus, ShardDigest, ShardVerification};
use crate::limits::{self, LimitError, FRAME_BYTES_MAX};
use crate::session::{ClientId, SessionStamp, SESSION_WINDOW};
use crate::tls::{self, TlsError, TlsFiles, TlsIdentity};
use crate::{wire, NodeId, ShardDescriptor, ShardId};
use shard_router::RouteCache;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Why one request to one node got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeCallError {
    /// The node is in no list this client knows (nor in the answers of the
    /// nodes it asked).
    #[error("{0} is not a known node")]
    UnknownNode(NodeId),
    /// No connection could be made.
    #[error("connect to {node}: {reason}")]
    Connect {
        /// The node.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// The node did not answer within the attempt's timeout.
    #[error("{node} did not answer within {after:?}")]
    Timeout {
        /// The node.
        node: NodeId,
        /// The timeout.
        after: Duration,
    },
    /// The request or its answer was lost on the way, or did not decode.
    #[error("{node}: {reason}")]
    Stream {
        /// The node.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// The node answered something this request cannot produce.
    #[error("{node} answered unexpectedly: {answer}")]
    Unexpected {
        /// The node.
        node: NodeId,
        /// The answer.
        answer: String,
    },
    /// No node answered (the last one's error).
    #[error("no node answered (last: {0})")]
    NoneAnswered(Box<NodeCallError>),
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
    conns: tokio::sync::Mutex<HashMap<NodeId, quinn::Connection>>,
    routes: Mutex<RouteCache>,
    opts: ClientOptions,
    retries: std::sync::atomic::AtomicU64,
    session: Mutex<SessionState>,
    /// Signalled when a write of the session finishes (room in its window).
    session_room: tokio::sync::Notify,
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
        let mut tc = quinn::TransportConfig::default();
        tc.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(10)).expect("fits"),
        ));
        tc.keep_alive_interval(Some(Duration::from_secs(2)));
        let quic = identity.client_config(tls::CLIENT_ALPN, Arc::new(tc))?;
        let endpoint = quinn::Endpoint::client((std::net::Ipv6Addr::UNSPECIFIED, 0).into())
            .or_else(|_| quinn::Endpoint::client((std::net::Ipv4Addr::UNSPECIFIED, 0).into()))
            .map_err(ClientError::Endpoint)?;
        Ok(Client {
            inner: Arc::new(Inner {
                endpoint,
                quic,
                nodes: Mutex::new(nodes),
                conns: tokio::sync::Mutex::new(HashMap::new()),
                routes: Mutex::new(RouteCache::new()),
                opts,
                retries: std::sync::atomic::AtomicU64::new(0),
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

    /// Asks the known nodes for every node they know (nodes that joined
    /// after the cluster file was written) and learns them.
    ///
    /// # Errors
    /// The last node's error when none answered.
    pub async fn refresh_nodes(&self) -> Result<Vec<(NodeId, SocketAddr)>, NodeCallError> {
        let mut last = None;
        for (node, _) in self.nodes() {
            match self.call_node(node, &Request::Peers).await {
                Ok(Response::Peers(all)) => {
                    let mut nodes = self.inner.nodes.lock().expect("nodes poisoned");
                    for (id, addr) in all {
                        match nodes.iter_mut().find(|(n, _)| *n == id) {
                            Some(e) => e.1 = addr,
                            None => nodes.push((id, addr)),
                        }
                    }
                    nodes.sort();
                    return Ok(nodes.clone());
                }
                Ok(other) => {
                    last = Some(NodeCallError::Unexpected {
                        node,
                        answer: format!("{other:?}"),
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(NodeCallError::NoneAnswered(Box::new(
            last.unwrap_or(NodeCallError::UnknownNode(NodeId(0))),
        )))
    }

    async fn connection(&self, node: NodeId) -> Result<quinn::Connection, NodeCallError> {
        {
            let conns = self.inner.conns.lock().await;
            if let Some(c) = conns.get(&node) {
                if c.close_reason().is_none() {
                    return Ok(c.clone());
                }
            }
        }
        // The table is not held while dialing: a dead node's handshake
        // timing out must not hold up requests to the live ones.
        let addr = match self.node_addr(node) {
            Some(a) => a,
            None => {
                // A node that joined later: ask the others for it.
                let _ = Box::pin(self.refresh_nodes()).await;
                self.node_addr(node)
                    .ok_or(NodeCallError::UnknownNode(node))?
            }
        };
        let connect = |reason: String| NodeCallError::Connect { node, reason };
        let connecting = self
            .inner
            .endpoint
            .connect_with(self.inner.quic.clone(), addr, &tls::node_server_name(node))
            .map_err(|e| connect(e.to_string()))?;
        let conn = tokio::time::timeout(self.inner.opts.attempt_timeout, connecting)
            .await
            .map_err(|_| connect("timed out".into()))?
            .map_err(|e| connect(e.to_string()))?;
        let mut conns = self.inner.conns.lock().await;
        if let Some(c) = conns.get(&node) {
            if c.close_reason().is_none() {
                // Another request dialed it meanwhile: keep one connection.
                conn.close(0u32.into(), b"duplicate");
                return Ok(c.clone());
            }
        }
        conns.insert(node, conn.clone());
        Ok(conn)
    }

    /// Sends one request to one node and waits for its answer.
    ///
    /// # Errors
    /// [`NodeCallError`].
    pub async fn call_node(&self, node: NodeId, req: &Request) -> Result<Response, NodeCallError> {
        self.call_node_within(node, req, self.inner.opts.attempt_timeout)
            .await
    }

    /// [`Client::call_node`] with its own attempt timeout (admin requests
    /// that take long, such as a replica move).
    pub async fn call_node_within(
        &self,
        node: NodeId,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, NodeCallError> {
        let stream = |reason: String| NodeCallError::Stream { node, reason };
        let frame = wire::encode_frame(req, FRAME_BYTES_MAX).map_err(|e| stream(e.to_string()))?;
        let conn = self.connection(node).await?;
        let work = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| stream(e.to_string()))?;
            send.write_all(&frame)
                .await
                .map_err(|e| stream(e.to_string()))?;
            let _ = send.finish();
            let payload = wire::read_frame(&mut recv, FRAME_BYTES_MAX)
                .await
                .map_err(|e| stream(e.to_string()))?
                .ok_or_else(|| stream("no answer".into()))?;
            let resp =
                wire::decode_payload::<Response>(&payload).map_err(|e| stream(e.to_string()))?;
            // Tests: the reply of a write that took effect is lost on its
            // way back (the client sees a transport error and retries).
            fail::fail_point!(
                "client::lose_write_reply",
                matches!(resp, Response::Written(_)),
                |_| Err(stream("the reply was lost (injected)".into()))
            );
            Ok(resp)
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| NodeCallError::Timeout {
                node,
                after: timeout,
            })?
    }

    /// Asks nodes for their routes and learns them.
    async fn refresh_routes(&self) -> Result<(), String> {
        let mut last = String::from("no node answered");
        let mut learned = false;
        for (node, _) in self.nodes() {
            match self.call_node(node, &Request::Routes).await {
                Ok(Response::Routes(ds)) => {
                    let mut cache = self.inner.routes.lock().expect("routes poisoned");
                    for d in ds {
                        cache.insert(d);
                    }
                    learned = true;
                }
                Ok(other) => last = format!("{node}: unexpected answer {other:?}"),
                Err(e) => last = e.to_string(),
            }
        }
        if learned {
            Ok(())
        } else {
            Err(last)
        }
    }

    fn route(&self, key: &[u8]) -> Option<ShardDescriptor> {
        self.inner
            .routes
            .lock()
            .expect("routes poisoned")
            .lookup(key)
            .cloned()
    }

    /// Applies a refusal to the route cache; says whether to retry.
    fn correct(&self, d: &ShardDescriptor, e: ApiError) -> AttemptError {
        let mut cache = self.inner.routes.lock().expect("routes poisoned");
        match e {
            ApiError::NotLeader { shard, leader_hint } => {
                let next = leader_hint
                    .filter(|h| Some(*h) != d.leader_hint)
                    // No (new) hint: try the replica after the one we asked.
                    .or_else(|| Some(replica_after(d, target(d))));
                cache.set_leader(shard, next);
                AttemptError::Retry(format!("{shard}: not the leader"))
            }
            ApiError::EpochMismatch { shard, current } => {
                let mut learned = false;
                for c in current {
                    learned |= cache.insert(c);
                }
                if !learned {
                    // The node knows less than we do: ask another replica.
                    cache.set_leader(shard, Some(replica_after(d, target(d))));
                }
                AttemptError::Retry(format!("{shard}: epoch mismatch"))
            }
            ApiError::KeyNotInRange { shard, .. } | ApiError::UnknownShard { shard } => {
                cache.invalidate(shard);
                AttemptError::Retry(format!("{shard}: route is stale"))
            }
            ApiError::Unavailable { shard, reason } => {
                AttemptError::Retry(format!("{shard} unavailable: {reason}"))
            }
            // A node that failed or is stopping: another replica may serve
            // it (a write retried under its session applies once).
            ApiError::Internal(reason) => AttemptError::Retry(format!("internal error: {reason}")),
            e @ (ApiError::Limit(_)
            | ApiError::Invalid(_)
            | ApiError::AppliedEarlier { .. }
            | ApiError::PermissionDenied { .. }
            | ApiError::SessionRefused { .. }) => AttemptError::Fatal(ClientError::Refused(e)),
        }
    }

    /// Runs `make(descriptor)` against the shard owning `key` until it is
    /// answered, correcting routes and backing off under the deadline.
    async fn with_route<T>(
        &self,
        key: &[u8],
        make: impl Fn(&ShardDescriptor) -> Request,
        accept: impl FnMut(Response) -> Result<T, AttemptError>,
    ) -> Result<T, ClientError> {
        let (deadline, attempt) = (self.inner.opts.deadline, self.inner.opts.attempt_timeout);
        self.with_target(Target::Key(key), make, accept, deadline, attempt)
            .await
    }

    /// Runs `make(descriptor)` against the shard named by `target` (the
    /// one owning a key, or one shard id) until it is answered, correcting
    /// routes and backing off until `deadline`; each attempt may take
    /// `attempt`.
    async fn with_target<T>(
        &self,
        target_shard: Target<'_>,
        make: impl Fn(&ShardDescriptor) -> Request,
        mut accept: impl FnMut(Response) -> Result<T, AttemptError>,
        deadline: Duration,
        attempt_timeout: Duration,
    ) -> Result<T, ClientError> {
        let start = Instant::now();
        let mut backoff = self.inner.opts.backoff_min;
        // A shard the route table does not list (the meta shard): asked of
        // every node in turn, following leader hints.
        let mut unlisted: Option<ShardDescriptor> = None;
        loop {
            let attempt: Result<T, AttemptError> = async {
                let find = || match target_shard {
                    Target::Key(key) | Target::Group(key) => self.route(key),
                    Target::Shard(id) => self.cached(id),
                };
                let d = match find() {
                    Some(d) => d,
                    None => {
                        self.refresh_routes().await.map_err(AttemptError::Retry)?;
                        match (find(), target_shard) {
                            (Some(d), _) => d,
                            (None, Target::Shard(id)) => unlisted
                                .get_or_insert_with(|| {
                                    let nodes: Vec<NodeId> =
                                        self.nodes().into_iter().map(|(n, _)| n).collect();
                                    ShardDescriptor::new(id, crate::KeyRange::full(), nodes)
                                })
                                .clone(),
                            (None, Target::Key(_) | Target::Group(_)) => {
                                return Err(AttemptError::Retry("no route yet".into()))
                            }
                        }
                    }
                };
                let node = target(&d);
                match self
                    .call_node_within(node, &make(&d), attempt_timeout)
                    .await
                {
                    Ok(Response::Error(e)) if unlisted.as_ref().is_some_and(|u| u.id == d.id) => {
                        let u = unlisted.as_mut().expect("checked");
                        match e {
                            ApiError::NotLeader {
                                leader_hint: Some(h),
                                ..
                            } if h != node => u.leader_hint = Some(h),
                            ApiError::NotLeader { .. } | ApiError::UnknownShard { .. } => {
                                u.leader_hint = Some(replica_after(u, node));
                            }
                            ApiError::Unavailable { .. } => {}
                            other => return Err(AttemptError::Fatal(ClientError::Refused(other))),
                        }
                        Err(AttemptError::Retry(format!(
                            "{}: looking for its leader",
                            d.id
                        )))
                    }
                    Ok(Response::Error(e @ ApiError::KeyNotInRange { .. }))
                        if matches!(target_shard, Target::Group(_)) =>
                    {
                        let _ = self.correct(&d, e.clone());
                        Err(AttemptError::Fatal(ClientError::Refused(e)))
                    }
                    Ok(Response::Error(e)) => Err(self.correct(&d, e)),
                    Ok(resp) => accept(resp),
                    Err(e) => {
                        // The node is down or unreachable: try another replica.
                        let next = replica_after(&d, node);
                        if let Some(u) = unlisted.as_mut() {
                            u.leader_hint = Some(next);
                        }
                        self.inner
                            .routes
                            .lock()
                            .expect("routes poisoned")
                            .set_leader(d.id, Some(next));
                        Err(AttemptError::Retry(e.to_string()))
                    }
                }
            }
            .await;
            let last_error = match attempt {
                Ok(v) => return Ok(v),
                Err(AttemptError::Fatal(e)) => return Err(e),
                Err(AttemptError::Retry(e)) => e,
            };
            self.inner
                .retries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if start.elapsed() + backoff > deadline {
                return Err(ClientError::Timeout {
                    deadline,
                    last_error,
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Reads `key` (linearizable).
    ///
    /// # Examples
    /// ```no_run
    /// # async fn demo(client: tessera::Client) -> Result<(), tessera::client::ClientError> {
    /// if let Some(v) = client.get(b"k").await? {
    ///     println!("{}", String::from_utf8_lossy(&v));
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::Limit`] for a bad key; [`ClientError::Timeout`] when
    /// the cluster could not serve it within the deadline.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        Ok(self.batch_get(&[key]).await?.pop().flatten())
    }

    /// Reads several keys (linearizable per shard), in order.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn demo(client: tessera::Client) -> Result<(), tessera::client::ClientError> {
    /// let values = client.batch_get(&[b"a", b"b"]).await?;
    /// assert_eq!(values.len(), 2);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Self::get`]; more than 1,024 keys is [`ClientError::Limit`].
    pub async fn batch_get(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        if keys.is_empty() || keys.len() > limits::BATCH_OPS_MAX {
            return Err(LimitError::BatchOps {
                ops: keys.len(),
                max: limits::BATCH_OPS_MAX,
            }
            .into());
        }
        for k in keys {
            limits::check_key(k)?;
        }
        let mut out: Vec<Option<Option<Vec<u8>>>> = vec![None; keys.len()];
        // Positions still to read; each request takes the first one and
        // every other one its shard owns (read from one snapshot there).
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        while let Some(&first) = pending.first() {
            let sent: Mutex<Vec<usize>> = Mutex::new(Vec::new());
            let values = self
                .with_route(
                    keys[first],
                    |d| {
                        let mut s = sent.lock().expect("sent poisoned");
                        *s = pending
                            .iter()
                            .copied()
                            .filter(|&i| i == first || d.range.contains(keys[i]))
                            .collect();
                        Request::Get {
                            shard: d.id,
                            epoch: d.epoch,
                            keys: s.iter().map(|&i| keys[i].to_vec()).collect(),
                        }
                    },
                    |r| match r {
                        // The node answers a prefix when the values are
                        // larger than one response.
                        Response::Values(v)
                            if !v.is_empty()
                                && v.len() <= sent.lock().expect("sent poisoned").len() =>
                        {
                            Ok(v)
                        }
                        other => Err(unexpected(other)),
                    },
                )
                .await?;
            let sent = sent.into_inner().expect("sent poisoned");
            for (&i, v) in sent.iter().zip(values) {
                out[i] = Some(v);
            }
            pending.retain(|&i| out[i].is_none());
        }
        Ok(out
            .into_iter()
            .map(|v| v.expect("every key read"))
            .collect())
    }

    /// Opens a write of this client's session (`None` when exactly-once
    /// is off), waiting while [`SESSION_WINDOW`] writes are open.
    async fn open_write(&self) -> Result<Option<OpenWrite>, ClientError> {
        if !self.inner.opts.exactly_once {
            return Ok(None);
        }
        let deadline = self.inner.opts.deadline;
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let room = self.inner.session_room.notified();
            {
                let mut s = self.inner.session.lock().expect("session poisoned");
                let oldest = s.open.first().copied().unwrap_or(s.next);
                if s.next - oldest < SESSION_WINDOW {
                    let seq = s.next;
                    s.next += 1;
                    s.open.insert(seq);
                    return Ok(Some(OpenWrite {
                        inner: self.inner.clone(),
                        seq,
                    }));
                }
            }
            tokio::time::timeout_at(until, room)
                .await
                .map_err(|_| ClientError::Timeout {
                    deadline,
                    last_error: format!("{SESSION_WINDOW} writes of this client are in flight"),
                })?;
        }
    }

    /// A write request of `ops` to shard `d`, stamped when `open`.
    fn write_request(d: &ShardDescriptor, ops: Vec<Op>, open: Option<&OpenWrite>) -> Request {
        Request::Write {
            shard: d.id,
            epoch: d.epoch,
            ops,
            session: open.map(OpenWrite::stamp),
        }
    }

    async fn write_one(&self, op: Op) -> Result<OpResult, ClientError> {
        crate::command::validate_ops(std::slice::from_ref(&op))?;
        let key = op.key().to_vec();
        let open = self.open_write().await?;
        self.with_route(
            &key,
            |d| Self::write_request(d, vec![op.clone()], open.as_ref()),
            |r| match r {
                Response::Written(mut v) if v.len() == 1 => Ok(v.pop().expect("one")),
                other => Err(unexpected(other)),
            },
        )
        .await
    }

    /// Sets `key` to `value`, durably replicated before it returns.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn demo(client: tessera::Client) -> Result<(), tessera::client::ClientError> {
    /// client.put(b"user/42", b"{\"name\":\"Ada\"}").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::Limit`] (key 1 B..8 KiB, value ≤ 1 MiB);
    /// [`ClientError::Timeout`] (the write is then indeterminate).
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        self.write_one(Op::Put {
            key: key.to_vec(),
            value: value.to_vec(),
        })
        .await
        .map(|_| ())
    }

    /// Sets `key` to `value` and returns the value it replaced (one read
    /// more than [`Self::put`] on the leader).
    ///
    /// # Errors
    /// As [`Self::put`].
    pub async fn swap(&self, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        match self
            .write_one(Op::Swap {
                key: key.to_vec(),
                value: value.to_vec(),
            })
            .await?
        {
            OpResult::Put { prev } => Ok(prev),
            other => Err(ClientError::Protocol(format!(
                "a swap answered with {other:?}"
            ))),
        }
    }

    /// Removes `key`; returns whether it existed.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn demo(client: tessera::Client) -> Result<(), tessera::client::ClientError> {
    /// let existed = client.delete(b"session/7").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Self::put`].
    pub async fn delete(&self, key: &[u8]) -> Result<bool, ClientError> {
        match self.write_one(Op::Delete { key: key.to_vec() }).await? {
            OpResult::Delete { prev } => Ok(prev.is_some()),
            _ => Ok(false),
        }
    }

    /// Compare-and-swap: when `key`'s value equals `expected` (`None`:
    /// absent), set it to `new` (`None`: delete).
    ///
    /// # Examples
    /// ```no_run
    /// # async fn demo(client: tessera::Client) -> Result<(), tessera::client::ClientError> {
    /// let won = client.cas(b"lock", None, Some(b"me")).await?.succeeded;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Self::put`]; a failed comparison is `Ok` with `succeeded: false`.
    pub async fn cas(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<CasOutcome, ClientError> {
        let r = self
            .write_one(Op::Cas {
                key: key.to_vec(),
                expected: expected.map(<[u8]>::to_vec),
                new: new.map(<[u8]>::to_vec),
            })
            .await?;
        match r {
            OpResult::Cas { succeeded, current } => Ok(CasOutcome { succeeded, current }),
            other => Err(ClientError::Refused(ApiError::Invalid(format!(
                "unexpected result {other:?}"
            )))),
        }
    }

    /// Writes several pairs. Pairs of one shard are applied atomically
    /// together; pairs of different shards are not (each shard's part
    /// succeeds or fails on its own).
    ///
    /// # Examples
    /// ```no_run
    /// # async fn demo(client: tessera::Client) -> Result<(), tessera::client::ClientError> {
    /// client.batch_put(&[(b"a", b"1"), (b"b", b"2")]).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::Limit`] for more than 1,024 pairs or 4 MiB, or a bad
    /// key or value; [`ClientError::Timeout`].
    pub async fn batch_put(&self, pairs: &[(&[u8], &[u8])]) -> Result<(), ClientError> {
        let ops: Vec<Op> = pairs
            .iter()
            .map(|(k, v)| Op::Put {
                key: k.to_vec(),
                value: v.to_vec(),
            })
            .collect();
        crate::command::validate_ops(&ops)?;
        let mut pending = ops;
        while !pending.is_empty() {
            // Group what the cache says shares a shard with the first key.
            let first = pending[0].key().to_vec();
            let route = match self.route(&first) {
                Some(r) => r,
                None => {
                    // One routed write learns the route; then group.
                    let op = pending.remove(0);
                    self.write_one(op).await?;
                    continue;
                }
            };
            let (group, rest): (Vec<Op>, Vec<Op>) = pending
                .into_iter()
                .partition(|op| route.range.contains(op.key()));
            pending = rest;
            let open = self.open_write().await?;
            let r = self
                .with_target(
                    Target::Group(&first),
                    |d| Self::write_request(d, group.clone(), open.as_ref()),
                    |r| match r {
                        Response::Written(_) => Ok(()),
                        other => Err(unexpected(other)),
                    },
                    self.inner.opts.deadline,
                    self.inner.opts.attempt_timeout,
                )
                .await;
            drop(open);
            match r {
                Ok(()) => {}
                // The shard shrank under us and nothing of the group was
                // applied (a session write's earlier application would
                // have been answered, not refused): write the group key by
                // key, each a new write.
                Err(ClientError::Refused(ApiError::KeyNotInRange { .. })) => {
                    for op in group {
                        self.write_one(op).await?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Up to `limit` pairs with keys in `[start, end)` (empty `end`: to the
    /// end of the key space), in key order, across shard boundaries. Each
    /// shard's part is a linearizable read. The pairs are collected in
    /// memory: for a range of unknown size, page through it with
    /// [`Self::scanner`].
    ///
    /// # Examples
    /// ```no_run
    /// # async fn demo(client: tessera::Client) -> Result<(), tessera::client::ClientError> {
    /// for (k, v) in client.scan(b"user/", b"user0", 100).await? {
    ///     println!("{:?} = {:?}", k, v);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::Limit`] for an oversized bound; [`ClientError::Timeout`].
    pub async fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, ClientError> {
        let mut scanner = self.scanner(start, end)?;
        let mut out = Vec::new();
        while out.len() < limit {
            match scanner.next_page(limit - out.len()).await? {
                Some(page) => out.extend(page),
                None => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    /// The pairs with keys in `[start, end)` (empty `end`: to the end of
    /// the key space), page by page in key order: each page is one node's
    /// answer, bounded in pairs and in bytes (`api.response_bytes_max`), so
    /// a range of any size is read in bounded memory.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn demo(client: tessera::Client) -> Result<(), tessera::client::ClientError> {
    /// let mut pages = client.scanner(b"", b"")?;
    /// while let Some(page) = pages.next_page(1000).await? {
    ///     for (k, v) in page {
    ///         println!("{:?} = {} bytes", k, v.len());
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ClientError::Limit`] for an oversized bound.
    pub fn scanner(&self, start: &[u8], end: &[u8]) -> Result<Scanner, ClientError> {
        if start.len() > limits::KEY_BYTES_MAX {
            limits::check_key(start)?;
        }
        if end.len() > limits::USER_KEYS_END_BYTES {
            limits::check_key(end)?;
        }
        Ok(Scanner {
            client: self.clone(),
            cursor: start.to_vec(),
            end: end.to_vec(),
            done: false,
        })
    }

    /// Every shard descriptor the nodes report (refreshing the cache).
    ///
    /// # Errors
    /// [`ClientError::Timeout`] when no node answers.
    pub async fn routes(&self) -> Result<Vec<ShardDescriptor>, ClientError> {
        self.refresh_routes()
            .await
            .map_err(|last_error| ClientError::Timeout {
                deadline: self.inner.opts.attempt_timeout,
                last_error,
            })?;
        let cache = self.inner.routes.lock().expect("routes poisoned");
        Ok(cache.iter().cloned().collect())
    }

    /// One node's status (its shards, leaders, sizes).
    ///
    /// # Errors
    /// [`NodeCallError`] when it is down or answers something else.
    pub async fn node_status(&self, node: NodeId) -> Result<NodeStatus, NodeCallError> {
        match self.call_node(node, &Request::NodeStatus).await? {
            Response::NodeStatus(s) => Ok(s),
            other => Err(NodeCallError::Unexpected {
                node,
                answer: format!("{other:?}"),
            }),
        }
    }
}

/// A scan read page by page (see [`Client::scanner`]).
pub struct Scanner {
    client: Client,
    /// The first key not read yet.
    cursor: Vec<u8>,
    end: Vec<u8>,
    done: bool,
}

impl Scanner {
    /// The next page: at most `max_pairs` pairs (and at most
    /// [`SCAN_LIMIT_MAX`]), at least one; `None` once the range is read.
    /// Each page is a linearizable read of one shard.
    ///
    /// # Errors
    /// [`ClientError::Timeout`] when the cluster could not serve it within
    /// the deadline (the scanner can be asked again).
    pub async fn next_page(
        &mut self,
        max_pairs: usize,
    ) -> Result<Option<Vec<(Vec<u8>, Vec<u8>)>>, ClientError> {
        let want = max_pairs.clamp(1, SCAN_LIMIT_MAX as usize) as u32;
        while !self.done {
            if !self.end.is_empty() && self.cursor >= self.end {
                break;
            }
            let (cur, end) = (self.cursor.clone(), self.end.clone());
            let (pairs, more) = self
                .client
                .with_route(
                    &cur,
                    |d| Request::Scan {
                        shard: d.id,
                        epoch: d.epoch,
                        start: cur.clone(),
                        end: end.clone(),
                        limit: want,
                    },
                    |r| match r {
                        Response::Pairs { pairs, more } if pairs.len() <= want as usize => {
                            Ok((pairs, more))
                        }
                        other => Err(unexpected(other)),
                    },
                )
                .await?;
            if more {
                let mut next = match pairs.last() {
                    Some((k, _)) => k.clone(),
                    None => return Err(ClientError::Protocol("more pairs, but none sent".into())),
                };
                next.push(0);
                self.cursor = next;
            } else {
                // The shard is read: go on at the end of its range.
                match self.client.route(&cur).map(|d| d.range.end) {
                    Some(shard_end) if !shard_end.is_empty() && shard_end > cur => {
                        self.cursor = shard_end
                    }
                    _ => self.done = true,
                }
            }
            if !pairs.is_empty() {
                return Ok(Some(pairs));
            }
        }
        self.done = true;
        Ok(None)
    }
}

/// What a request is for: the shard owning a key, or a shard by id.
#[derive(Clone, Copy)]
enum Target<'a> {
    Key(&'a [u8]),
    /// The shard owning this key, for a request whose other keys must be
    /// in the same shard: when one of them is not (the shard split), the
    /// call ends with `KeyNotInRange` (after the cache is corrected) so
    /// the caller regroups, instead of sending the same keys again.
    Group(&'a [u8]),
    Shard(ShardId),
}

/// Overall deadline of an admin call (a move streams a whole shard).
const ADMIN_DEADLINE: Duration = Duration::from_secs(600);
/// One attempt of a replica move: the server waits up to 300 s for its
/// learner.
const MOVE_ATTEMPT: Duration = Duration::from_secs(320);
/// One attempt of a split or leader transfer (elections included).
const ADMIN_ATTEMPT: Duration = Duration::from_secs(30);

impl Client {
    /// Checks that every replica of `shard` holds the same state (admin):
    /// the leader commits a digest entry, each replica hashes its state as
    /// of that entry ([`crate::digest`]), and the digests are collected
    /// (each replica's within the deadline).
    ///
    /// # Errors
    /// [`ClientError::Refused`] (`PermissionDenied` without an admin
    /// certificate); [`ClientError::Timeout`] when no leader took the entry.
    /// A replica that cannot answer is reported in the result, not as an
    /// error.
    pub async fn verify_shard(&self, shard: ShardId) -> Result<ShardVerification, ClientError> {
        let index = self
            .with_target(
                Target::Shard(shard),
                |d| Request::MarkDigest {
                    shard: d.id,
                    epoch: d.epoch,
                },
                |r| match r {
                    Response::DigestAt { index } => Ok(index),
                    other => Err(unexpected(other)),
                },
                self.inner.opts.deadline,
                ADMIN_ATTEMPT,
            )
            .await?;
        let replicas = self.cached(shard).map(|d| d.replicas).unwrap_or_default();
        let until = Instant::now() + self.inner.opts.deadline;
        let mut out = Vec::with_capacity(replicas.len());
        for node in replicas {
            out.push((node, self.replica_digest(node, shard, index, until).await));
        }
        Ok(ShardVerification {
            shard,
            index,
            replicas: out,
        })
    }

    /// One replica's digest at `index`, waiting (until `until`) while it
    /// catches up to the entry or hashes.
    async fn replica_digest(
        &self,
        node: NodeId,
        shard: ShardId,
        index: u64,
        until: Instant,
    ) -> Result<ShardDigest, String> {
        let mut backoff = Duration::from_millis(20);
        loop {
            let last = match self
                .call_node(node, &Request::Digest { shard, index })
                .await
            {
                Ok(Response::Digest(DigestStatus::Done(d))) => return Ok(d),
                Ok(Response::Digest(DigestStatus::Failed(e))) => {
                    return Err(format!("hashing failed: {e}"))
                }
                Ok(Response::Digest(DigestStatus::Unknown)) => {
                    return Err(format!("applied past {index} without a digest there"))
                }
                Ok(Response::Error(ApiError::UnknownShard { .. })) => {
                    return Err("hosts no replica of the shard".into())
                }
                Ok(Response::Digest(s)) => format!("{s:?}"),
                Ok(other) => return Err(format!("unexpected answer {other:?}")),
                Err(e) => e.to_string(),
            };
            if Instant::now() + backoff > until {
                return Err(format!("no digest in time (last: {last})"));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    fn cached(&self, shard: ShardId) -> Option<ShardDescriptor> {
        self.inner
            .routes
            .lock()
            .expect("routes poisoned")
            .iter()
            .find(|d| d.id == shard)
            .cloned()
    }

    /// Splits the shard owning `key` at `key` (admin): the shard keeps the
    /// keys below it, a new shard takes `key` and above. Returns the two
    /// halves. Splitting at a key that already starts a shard answers that
    /// shard and its left neighbour (so a retried split is harmless).
    ///
    /// # Errors
    /// [`ClientError::Limit`] for a bad key; [`ClientError::Refused`] for
    /// the first key of the key space; [`ClientError::Timeout`].
    pub async fn split(
        &self,
        key: &[u8],
    ) -> Result<(ShardDescriptor, ShardDescriptor), ClientError> {
        crate::limits::check_key(key)?;
        let r = self
            .with_target(
                Target::Key(key),
                |d| Request::Split {
                    shard: d.id,
                    epoch: d.epoch,
                    key: key.to_vec(),
                },
                |resp| match resp {
                    Response::Split { left, right } => Ok((left, right)),
                    other => Err(unexpected(other)),
                },
                self.inner.opts.deadline.max(ADMIN_ATTEMPT),
                ADMIN_ATTEMPT,
            )
            .await;
        match r {
            Ok((left, right)) => {
                self.learn_route(left.clone());
                self.learn_route(right.clone());
                Ok((left, right))
            }
            Err(ClientError::Refused(ApiError::Invalid(reason))) => {
                let _ = self.refresh_routes().await;
                let right = self.route(key).filter(|d| d.range.start == key);
                let left = self
                    .inner
                    .routes
                    .lock()
                    .expect("routes poisoned")
                    .iter()
                    .find(|d| d.range.end == key)
                    .cloned();
                match (left, right) {
                    (Some(l), Some(r)) => Ok((l, r)),
                    _ => Err(ClientError::Refused(ApiError::Invalid(reason))),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Moves `shard`'s replica from node `from` to node `to` (admin):
    /// learner on `to`, snapshot streamed, promoted, `from` removed and its
    /// data deleted. Returns the shard's new descriptor. Safe to run again
    /// after an interruption: it continues from the group's state.
    ///
    /// # Errors
    /// [`ClientError::Refused`] for a move that makes no sense (`from` holds
    /// no replica, unknown `to`); [`ClientError::Timeout`].
    pub async fn move_replica(
        &self,
        shard: ShardId,
        from: NodeId,
        to: NodeId,
    ) -> Result<ShardDescriptor, ClientError> {
        let d = self
            .with_target(
                Target::Shard(shard),
                |_| Request::MoveReplica { shard, from, to },
                |resp| match resp {
                    Response::Descriptor(d) => Ok(d),
                    other => Err(unexpected(other)),
                },
                ADMIN_DEADLINE,
                MOVE_ATTEMPT,
            )
            .await?;
        self.learn_route(d.clone());
        Ok(d)
    }

    /// Makes voter `to` the leader of `shard` (admin).
    ///
    /// # Errors
    /// [`ClientError::Refused`] when `to` is not a voter of the shard;
    /// [`ClientError::Timeout`].
    pub async fn transfer_leader(&self, shard: ShardId, to: NodeId) -> Result<(), ClientError> {
        self.with_target(
            Target::Shard(shard),
            |_| Request::TransferLeader { shard, to },
            |resp| match resp {
                Response::Done => Ok(()),
                other => Err(unexpected(other)),
            },
            ADMIN_DEADLINE.min(Duration::from_secs(120)),
            ADMIN_ATTEMPT,
        )
        .await?;
        self.inner
            .routes
            .lock()
            .expect("routes poisoned")
            .set_leader(shard, Some(to));
        Ok(())
    }
}

/// The node a request for `d` goes to: its leader hint, else its first
/// replica.
fn target(d: &ShardDescriptor) -> NodeId {
    d.leader_hint.unwrap_or(d.replicas[0])
}

/// The replica after `node` in `d`'s list (wrapping; counted from the first
/// when `node` is not a replica).
fn replica_after(d: &ShardDescriptor, node: NodeId) -> NodeId {
    let i = d.replicas.iter().position(|r| *r == node).unwrap_or(0);
    d.replicas[(i + 1) % d.replicas.len()]
}

fn unexpected(r: Response) -> AttemptError {
    AttemptError::Fatal(ClientError::Refused(ApiError::Invalid(format!(
        "unexpected answer {r:?}"
    ))))
}
