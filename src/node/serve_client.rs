//! Serving client requests ([`crate::api`]) on a node: the server trusts no
//! client, so every request is checked here (limits, shard hosted, epoch,
//! keys in range, this replica the leader) before any work.

use super::Registry;
use crate::api::mux::MUX_IN_FLIGHT_MAX;
use crate::api::{ApiError, NodeStatus, Request, Response, ShardStatus, SCAN_LIMIT_MAX};
use crate::command::{Command, CommandResponse};
use crate::limits::FRAME_BYTES_MAX;
use crate::metrics::NetMetrics;
use crate::{wire, Epoch, ShardDescriptor, ShardId};
use openraft::error::{ClientWriteError, RaftError};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// How long a replica move may wait for its learner to catch up.
const MOVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

fn admin_error(e: super::AdminError) -> ApiError {
    use super::AdminError;
    match e {
        AdminError::UnknownShard { shard } => ApiError::UnknownShard { shard },
        AdminError::NotLeader { shard, hint } => ApiError::NotLeader {
            shard,
            leader_hint: hint,
        },
        AdminError::Refused(reason) => ApiError::Invalid(reason),
        AdminError::Unavailable { shard, reason } => ApiError::Unavailable { shard, reason },
    }
}

/// What a failed proposal tells the client: where the leader is, or that
/// the shard cannot serve now.
fn write_error(
    shard: ShardId,
    e: RaftError<crate::raft::TypeConfig, ClientWriteError<crate::raft::TypeConfig>>,
) -> ApiError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ApiError::NotLeader {
            shard,
            leader_hint: f.leader_id,
        },
        e => ApiError::Unavailable {
            shard,
            reason: e.to_string(),
        },
    }
}

use crate::command::wall_clock_ms;

/// A shard's group as the serve path uses it: its openraft instance, or
/// the node's batch system it runs on.
enum Group {
    Open(Arc<super::ShardRaft>),
    Batch(Arc<super::batch::BatchShards>),
}

/// Serves every stream a client opens on `conn`, one request per stream.
pub(crate) async fn serve_connection(
    registry: Arc<Registry>,
    conn: quinn::Connection,
    metrics: Arc<NetMetrics>,
) {
    // The requests in flight on the connection's multiplexed streams, all
    // of them together (a client may open several).
    let mux_permits = Arc::new(tokio::sync::Semaphore::new(MUX_IN_FLIGHT_MAX));
    loop {
        let Ok((mut send, mut recv)) = conn.accept_bi().await else {
            return;
        };
        let (registry, conn) = (registry.clone(), conn.clone());
        let (metrics, mux_permits) = (metrics.clone(), mux_permits.clone());
        tokio::spawn(async move {
            let request = wire::read_frame(&mut recv, FRAME_BYTES_MAX).await;
            let resp = match request {
                Ok(Some(payload)) => match wire::decode_payload::<Request>(&payload) {
                    Ok(Request::Mux) if mux_unknown() => Response::Error(ApiError::Invalid(
                        "bad request: unknown variant (injected: node::mux_unknown)".into(),
                    )),
                    Ok(Request::Mux) => {
                        let Ok(done) = wire::encode_frame(&Response::Done, FRAME_BYTES_MAX) else {
                            return;
                        };
                        if send.write_all(&done).await.is_ok() {
                            metrics.client_mux_streams.fetch_add(1, Ordering::Relaxed);
                            let mux = Mux {
                                permits: mux_permits,
                                metrics,
                            };
                            serve_mux(registry, conn, mux, send, recv).await;
                        }
                        return;
                    }
                    Ok(req) => answer(&registry, &conn, req).await,
                    Err(e) => Response::Error(ApiError::Invalid(format!("bad request: {e}"))),
                },
                Ok(None) => return,
                Err(e) => Response::Error(ApiError::Invalid(format!("bad request frame: {e}"))),
            };
            crate::api::call::take_end(&mut recv);
            if let Some(frame) = answer_frame(&resp, None) {
                let _ = send.write_all(&frame).await;
            }
            let _ = send.finish();
        });
    }
}

/// Whether to answer the opening of a multiplexed stream as a node built
/// before them does (it cannot decode the request): only with the
/// `node::mux_unknown` failpoint (tests of the client's fallback).
fn mux_unknown() -> bool {
    fail::fail_point!("node::mux_unknown", |_| true);
    false
}

/// Answers one decoded request of `conn` (on a stream of its own or a
/// multiplexed one).
async fn answer(registry: &Registry, conn: &quinn::Connection, req: Request) -> Response {
    match req {
        Request::Join { node, .. } if crate::tls::verify_claimed_node(conn, node).is_err() => {
            Response::Error(ApiError::Invalid(format!(
                "a join for {node} must come with {node}'s certificate"
            )))
        }
        req if req.is_admin() && !registry.admin_peer(conn) => {
            Response::Error(ApiError::PermissionDenied {
                request: req.name().into(),
            })
        }
        req => match req.validate() {
            // Boxed: serving is a large future (every request kind's
            // state), and a task's future is copied when it is spawned and
            // when it finishes; the box keeps the tasks small.
            Ok(()) => Box::pin(registry.serve(req)).await,
            Err(e) => Response::Error(ApiError::Limit(e)),
        },
    }
}

/// `resp` as a frame: plain, or with its multiplexed stream's `id`.
/// Responses are bounded where they are built; one that still does not
/// fit a frame is answered with an error, never dropped.
fn answer_frame(resp: &Response, id: Option<u64>) -> Option<Vec<u8>> {
    let encode = |r: &Response| match id {
        Some(id) => wire::encode_frame(&(id, r), FRAME_BYTES_MAX),
        None => wire::encode_frame(r, FRAME_BYTES_MAX),
    };
    encode(resp)
        .or_else(|e| {
            encode(&Response::Error(ApiError::Internal(format!(
                "the answer is too large: {e}"
            ))))
        })
        .ok()
}

/// What a connection's multiplexed streams share.
struct Mux {
    /// Their requests in flight.
    permits: Arc<tokio::sync::Semaphore>,
    metrics: Arc<NetMetrics>,
}

/// Serves a multiplexed stream ([`crate::api::mux`]): every request as it
/// comes, concurrently, answered as it finishes. At most
/// [`MUX_IN_FLIGHT_MAX`] are in flight on the connection's multiplexed
/// streams together; beyond that the stream is not read until one
/// finishes (QUIC's flow control then holds the client back). A request
/// that does not decode is answered with an error; a frame without an id
/// ends the stream.
async fn serve_mux(
    registry: Arc<Registry>,
    conn: quinn::Connection,
    mux: Mux,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(MUX_IN_FLIGHT_MAX);
    let writer = tokio::spawn(crate::api::mux::write_loop(send, rx, None));
    while let Ok(Some(payload)) = wire::read_frame(&mut recv, FRAME_BYTES_MAX).await {
        let Ok((id, rest)) = postcard::take_from_bytes::<u64>(&payload) else {
            break;
        };
        let Ok(permit) = mux.permits.clone().acquire_owned().await else {
            break;
        };
        mux.metrics
            .client_mux_requests
            .fetch_add(1, Ordering::Relaxed);
        let req = wire::decode_payload::<Request>(rest);
        let (registry, conn, tx) = (registry.clone(), conn.clone(), tx.clone());
        tokio::spawn(async move {
            let resp = match req {
                Ok(req) => answer(&registry, &conn, req).await,
                Err(e) => Response::Error(ApiError::Invalid(format!("bad request: {e}"))),
            };
            if let Some(frame) = answer_frame(&resp, Some(id)) {
                let _ = tx.send(frame).await;
            }
            drop(permit);
        });
    }
    drop(tx);
    let _ = writer.await;
}

impl Registry {
    fn descriptor(&self, shard: ShardId) -> Result<ShardDescriptor, ApiError> {
        self.engine
            .descriptor(shard)
            .map_err(|_| ApiError::UnknownShard { shard })
    }

    fn node_or_stopping(&self) -> Result<std::sync::Arc<super::Node>, ApiError> {
        self.node()
            .ok_or_else(|| ApiError::Internal("the node is stopping".into()))
    }

    /// Looks up the group, checks the epoch and that this replica leads.
    async fn check(
        &self,
        shard: ShardId,
        epoch: Epoch,
    ) -> Result<(Group, ShardDescriptor), ApiError> {
        // Leadership first: only the leader's descriptor is current (a
        // follower's may lag behind a split or a membership change).
        let batch = self.batch.get().and_then(|b| Some((b, b.group(shard)?)));
        let group = if let Some((b, g)) = batch {
            // As the loop published it after its last round: a replica
            // deposed since refuses the proposal or read itself.
            if !g.leading {
                return Err(ApiError::NotLeader {
                    shard,
                    leader_hint: g.leader.map(crate::NodeId),
                });
            }
            Group::Batch(b.clone())
        } else {
            let raft = self
                .group(shard)
                .await
                .ok_or(ApiError::UnknownShard { shard })?;
            let (leads, leader_hint) = super::leadership(&raft, self.me);
            if !leads {
                return Err(ApiError::NotLeader { shard, leader_hint });
            }
            Group::Open(raft)
        };
        let d = self.descriptor(shard)?;
        if let Some(m) = self.engine.merging(shard) {
            return Err(self.frozen(&d, m.into));
        }
        if d.epoch != epoch {
            return Err(self.mismatch(d));
        }
        if let Group::Open(raft) = &group {
            self.quiesce
                .touch(shard, raft, super::quiesce::Wake::Client);
            self.renew_lapsing_lease(raft).await;
        }
        Ok((group, d))
    }

    /// Proposes `cmd` through `group`; answers its log index and what
    /// applying it answered.
    async fn propose(
        &self,
        shard: ShardId,
        group: &Group,
        cmd: Command,
    ) -> Result<(u64, CommandResponse), ApiError> {
        match group {
            Group::Open(raft) => raft
                .client_write(cmd)
                .await
                .map(|r| (r.log_id.index, r.data))
                .map_err(|e| write_error(shard, e)),
            Group::Batch(b) => b.propose(shard, &cmd).await,
        }
    }

    /// `EpochMismatch` with the shard's current descriptor and, when hosted
    /// here, its right neighbour (after a split: the new shard that took
    /// the keys the client may be after).
    fn mismatch(&self, d: ShardDescriptor) -> ApiError {
        let shard = d.id;
        let mut current = vec![];
        if !d.range.end.is_empty() {
            for s in self.data_shard_ids() {
                if let Ok(n) = self.descriptor(s) {
                    if n.range.start == d.range.end && n.epoch.version > 0 {
                        current.push(self.with_leader(n));
                    }
                }
            }
        }
        current.insert(0, self.with_leader(d));
        ApiError::EpochMismatch { shard, current }
    }

    /// A request to a shard frozen for a merge into `into`: once the left
    /// neighbour here holds the range, the client is sent there; until
    /// then it retries (the freeze lasts until the merge commits or is
    /// cancelled).
    fn frozen(&self, d: &ShardDescriptor, into: ShardId) -> ApiError {
        if let Ok(left) = self.descriptor(into) {
            if left.range.contains(&d.range.start) && left.range.start < d.range.start {
                return ApiError::EpochMismatch {
                    shard: d.id,
                    current: vec![self.with_leader(left)],
                };
            }
        }
        ApiError::Unavailable {
            shard: d.id,
            reason: format!("merging into {into}"),
        }
    }

    /// After a read barrier: the shard must still be as it was checked (a
    /// split applied meanwhile moved keys to another shard).
    fn recheck(&self, before: &ShardDescriptor) -> Result<(), ApiError> {
        let now = self.descriptor(before.id)?;
        if let Some(m) = self.engine.merging(before.id) {
            return Err(self.frozen(&now, m.into));
        }
        if now.epoch.version != before.epoch.version || now.range != before.range {
            return Err(self.mismatch(now));
        }
        Ok(())
    }

    /// Refuses a read of `range` through `d` when this node's bytes there
    /// are not `d`'s own (another replica here claims them at the same or a
    /// newer version: a stale or orphaned replica awaiting its drop, or a
    /// snapshot installed around a newer neighbour). Answering would serve
    /// that other replica's state; the client retries instead.
    fn check_owned(&self, d: &ShardDescriptor, range: &crate::KeyRange) -> Result<(), ApiError> {
        if self.engine.owns_range(d.id, range, d.epoch.version) {
            Ok(())
        } else {
            Err(ApiError::Unavailable {
                shard: d.id,
                reason: "another replica on this node claims keys of the read".into(),
            })
        }
    }

    fn with_leader(&self, mut d: ShardDescriptor) -> ShardDescriptor {
        if let Some(v) = self.view(d.id) {
            d.leader_hint = v.leader.or(d.leader_hint);
        }
        d
    }

    /// A linearizable read barrier; heartbeats it sends skip the coalescing
    /// linger.
    async fn read_barrier(&self, shard: ShardId, group: &Group) -> Result<(), ApiError> {
        let raft = match group {
            Group::Open(raft) => raft,
            Group::Batch(b) => return b.read_barrier(shard).await.map(|_| ()),
        };
        let _expedite = self.expedite();
        raft.ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
            .await
            .map(|_| ())
            .map_err(|e| match e {
                RaftError::APIError(openraft::error::LinearizableReadError::ForwardToLeader(f)) => {
                    ApiError::NotLeader {
                        shard,
                        leader_hint: f.leader_id,
                    }
                }
                other => ApiError::Unavailable {
                    shard,
                    reason: other.to_string(),
                },
            })
    }

    /// Answers one validated request.
    pub(crate) async fn serve(&self, req: Request) -> Response {
        match self.serve_inner(req).await {
            Ok(r) => r,
            Err(e) => Response::Error(e),
        }
    }

    /// The values of `keys` from one RocksDB snapshot: as many (in order,
    /// at least one) as fit the response bound; the client asks again for
    /// the rest.
    fn read_local(&self, keys: &[Vec<u8>]) -> Result<Response, ApiError> {
        self.engine
            .get_many(keys, self.response_bytes_max)
            .map(Response::Values)
            .map_err(|e| ApiError::Internal(e.to_string()))
    }

    async fn serve_inner(&self, req: Request) -> Result<Response, ApiError> {
        let internal = |e: crate::storage::StoreError| ApiError::Internal(e.to_string());
        match req {
            #[cfg(feature = "failpoints")]
            Request::Get { shard, epoch, keys } if self.faults.unsafe_local_reads() => {
                // The deliberately broken build (tests only): any replica
                // answers from its local state, no leader check, no read
                // index.
                let _ = (epoch, self.descriptor(shard)?);
                self.read_local(&keys)
            }
            Request::Get { shard, epoch, keys } => {
                let (group, d) = self.check(shard, epoch).await?;
                if let Some(k) = keys.iter().find(|k| !d.range.contains(k)) {
                    return Err(ApiError::KeyNotInRange {
                        shard,
                        key: k.clone(),
                    });
                }
                self.read_barrier(shard, &group).await?;
                self.recheck(&d)?;
                for k in &keys {
                    let mut end = k.clone();
                    end.push(0);
                    self.check_owned(&d, &crate::KeyRange::new(k.clone(), end))?;
                }
                let values = self.read_local(&keys)?;
                self.load.record_reads(shard, keys.len() as u64);
                if let Some(k) = keys.first() {
                    self.load.sample(shard, k);
                }
                Ok(values)
            }
            Request::Write {
                shard,
                epoch,
                ops,
                session,
            } => {
                let (group, d) = self.check(shard, epoch).await?;
                // A session write goes to the state machine even with a key
                // outside the range: if an earlier attempt was applied here
                // before a split, its retry must be answered from the
                // session, not refused (the client would write it again).
                if let (None, Some(op)) =
                    (&session, ops.iter().find(|op| !d.range.contains(op.key())))
                {
                    return Err(ApiError::KeyNotInRange {
                        shard,
                        key: op.key().to_vec(),
                    });
                }
                let (n_ops, n_bytes) = (
                    ops.len() as u64,
                    ops.iter().map(|o| o.payload_bytes() as u64).sum::<u64>(),
                );
                if let Some(op) = ops.first() {
                    self.load.sample(shard, op.key());
                }
                let cmd = match session {
                    None => Command::Write { ops },
                    Some(stamp) if !stamp.is_valid() => {
                        return Err(ApiError::SessionRefused {
                            shard,
                            reason: format!("malformed session stamp {stamp:?}"),
                        })
                    }
                    // Log time is this leader's clock; the state machine
                    // never lets it go backwards.
                    Some(stamp) => Command::SessionWrite {
                        stamp,
                        at_ms: wall_clock_ms(),
                        ops,
                    },
                };
                // openraft's heartbeat linger and commit linger wait for these
                // (the batch system has neither).
                let _openraft = matches!(group, Group::Open(_))
                    .then(|| (self.expedite(), self.engine.write_in_progress(shard)));
                match self.propose(shard, &group, cmd).await {
                    Ok((_, data)) => match data {
                        CommandResponse::Write(results) => {
                            self.load.record_write(shard, n_ops, n_bytes);
                            Ok(Response::Written(results))
                        }
                        // The range changed between the check and the apply.
                        CommandResponse::KeyNotInRange { key } => {
                            Err(ApiError::KeyNotInRange { shard, key })
                        }
                        CommandResponse::AppliedEarlier => Err(ApiError::AppliedEarlier { shard }),
                        CommandResponse::Frozen { into } => Err(self.frozen(&d, into)),
                        CommandResponse::Abandoned => Err(ApiError::SessionRefused {
                            shard,
                            reason: "the client acknowledged later writes; not applied".into(),
                        }),
                        other => Err(ApiError::Internal(format!("write applied as {other:?}"))),
                    },
                    Err(e) => Err(e),
                }
            }
            Request::Scan {
                shard,
                epoch,
                start,
                end,
                limit,
            } => {
                let (group, d) = self.check(shard, epoch).await?;
                let limit = limit.clamp(1, SCAN_LIMIT_MAX) as usize;
                let from = std::cmp::max(start, d.range.start.clone());
                let to = match (end.is_empty(), d.range.end.is_empty()) {
                    (true, _) => d.range.end.clone(),
                    (false, true) => end,
                    (false, false) => std::cmp::min(end, d.range.end.clone()),
                };
                // Never past the user key space (the meta shard's records
                // sort above it).
                let system = crate::meta::system_prefix();
                let to = if to.is_empty() || to > system {
                    system
                } else {
                    to
                };
                self.read_barrier(shard, &group).await?;
                self.recheck(&d)?;
                if from < to {
                    self.check_owned(&d, &crate::KeyRange::new(from.clone(), to.clone()))?;
                }
                let (pairs, more) = if from >= to {
                    (Vec::new(), false)
                } else {
                    self.engine
                        .scan_page(&from, &to, limit, self.response_bytes_max)
                        .map_err(internal)?
                };
                self.load.record_reads(shard, pairs.len().max(1) as u64);
                self.load.sample(shard, &from);
                Ok(Response::Pairs { pairs, more })
            }
            Request::Routes => {
                // The meta shard's table when this node holds a replica of
                // it, else what the node's own replicas know; leader hints
                // from the local groups either way.
                let mut by_id = std::collections::BTreeMap::new();
                for d in self.meta_routes().unwrap_or_default() {
                    by_id.insert(d.id, d);
                }
                for shard in self.data_shard_ids() {
                    if let Ok(d) = self.descriptor(shard) {
                        let newer = by_id.get(&shard).is_none_or(|m| d.epoch >= m.epoch);
                        if newer {
                            by_id.insert(shard, d);
                        }
                    }
                }
                Ok(Response::Routes(
                    by_id.into_values().map(|d| self.with_leader(d)).collect(),
                ))
            }
            Request::LoadReports => {
                self.meta_load_reports()
                    .map(Response::LoadReports)
                    .ok_or(ApiError::UnknownShard {
                        shard: crate::meta::META_SHARD,
                    })
            }
            Request::Split { shard, epoch, key } => {
                self.check(shard, epoch).await?;
                let node = self.node_or_stopping()?;
                let (left, right) = node.split_shard(shard, key).await.map_err(admin_error)?;
                Ok(Response::Split { left, right })
            }
            Request::Merge { left, right } => {
                let node = self.node_or_stopping()?;
                let d = node.merge_shards(left, right).await.map_err(admin_error)?;
                Ok(Response::Descriptor(d))
            }
            Request::MoveReplica { shard, from, to } => {
                let node = self.node_or_stopping()?;
                let d = node
                    .move_replica(shard, from, to, MOVE_TIMEOUT)
                    .await
                    .map_err(admin_error)?;
                Ok(Response::Descriptor(d))
            }
            Request::TransferLeader { shard, to } => {
                let node = self.node_or_stopping()?;
                node.transfer_leader(shard, to).await.map_err(admin_error)?;
                Ok(Response::Done)
            }
            Request::Join { node: id, addr } => {
                let node = self.node_or_stopping()?;
                let all = node.admit(crate::net::PeerAddr { id, addr }).await;
                Ok(Response::Peers(
                    all.into_iter().map(|p| (p.id, p.addr)).collect(),
                ))
            }
            Request::Peers => {
                let node = self.node_or_stopping()?;
                let mut all: Vec<_> = node
                    .transport()
                    .peers()
                    .into_iter()
                    .map(|p| (p.id, p.addr))
                    .collect();
                all.push((node.id(), node.addr()));
                all.sort();
                Ok(Response::Peers(all))
            }
            Request::Mux => Err(ApiError::Invalid(
                "a multiplexed stream is opened by a stream's first request".into(),
            )),
            Request::MarkDigest { shard, epoch } => {
                let (group, _) = self.check(shard, epoch).await?;
                let (index, _) = self.propose(shard, &group, Command::Digest).await?;
                Ok(Response::DigestAt { index })
            }
            Request::Digest { shard, index } => {
                let applied = self
                    .view(shard)
                    .ok_or(ApiError::UnknownShard { shard })?
                    .applied;
                Ok(Response::Digest(self.engine.digest(shard, index, applied)))
            }
            Request::NodeStatus => {
                let mut shards = Vec::new();
                // The meta shard too, when hosted here: it is balanced and
                // moved like any other.
                let meta_here = self
                    .hosts(crate::meta::META_SHARD)
                    .then_some(crate::meta::META_SHARD);
                for shard in meta_here.into_iter().chain(self.data_shard_ids()) {
                    let Some(v) = self.view(shard) else {
                        continue;
                    };
                    let Ok(d) = self.descriptor(shard) else {
                        continue;
                    };
                    let load = self.load.rates(shard);
                    shards.push(ShardStatus {
                        batch: self.batch_for(shard).is_some(),
                        reads_per_s: load.reads_per_s,
                        writes_per_s: load.writes_per_s,
                        write_bytes_per_s: load.write_bytes_per_s,
                        size_bytes: self.engine.approximate_size(&d.range),
                        descriptor: d,
                        leader: v.leader,
                        applied_index: v.applied,
                        term: v.term,
                        log_first_index: v.log_first,
                    });
                }
                Ok(Response::NodeStatus(NodeStatus {
                    node: self.me,
                    shards,
                }))
            }
        }
    }
}
