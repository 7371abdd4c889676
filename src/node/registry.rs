//! The registry of a node's Raft groups, looked up by shard id, and the
//! node's side of the transport ([`NodeInbound`]): inbound Raft messages
//! and snapshots, decoded and handed to their group.

use super::*;

/// The Raft groups hosted by a node, looked up by shard id; what inbound
/// Raft traffic is dispatched to.
pub struct Registry {
    pub(super) me: NodeId,
    pub(super) engine: Engine,
    pub(super) groups: DashMap<ShardId, Slot>,
    /// Client requests waiting on groups: while any is, heartbeats skip the
    /// linger (shared with the transport).
    pub(super) expediter: Arc<Expediter>,
    /// The fault layer (its broken-read switch is consulted on reads, in
    /// builds with the `failpoints` feature).
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    pub(super) faults: Arc<Faults>,
    /// The node, for requests that need more than the groups.
    pub(super) node: std::sync::OnceLock<std::sync::Weak<Node>>,
    /// Most key and value bytes in one response (`api.response_bytes_max`).
    pub(super) response_bytes_max: usize,
    /// Which replicas sleep (quiescence).
    pub(crate) quiesce: super::quiesce::Quiescence,
    /// Per-shard reads, writes and written bytes per second.
    pub(crate) load: super::load::LoadTracker,
    /// The shards that run on the batch system (set once at start, after
    /// the transport it sends through).
    pub(super) batch: std::sync::OnceLock<Arc<super::batch::BatchShards>>,
}

/// A hosted replica's group.
#[derive(Clone)]
pub(crate) enum Slot {
    /// Its openraft instance runs. Whoever uses it holds a clone of the
    /// `Arc`: a replica is made dormant only while nobody does.
    Live(Arc<ShardRaft>),
    /// Asleep, with its openraft instance dropped (an idle instance holds
    /// about 110 KiB: buffers, tasks, channels). Its state is all in
    /// storage; the first thing that needs the group rebuilds it
    /// ([`Node::revive`], one at a time per replica under this lock).
    Dormant(Arc<tokio::sync::Mutex<()>>),
}

/// A replica as status and routing see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReplicaView {
    pub leader: Option<NodeId>,
    pub term: u64,
    /// The index its state machine applied (0: nothing yet).
    pub applied: u64,
    /// The first index in its log: entries before it were purged or
    /// compacted (`None`: a dormant replica, whose log is not open).
    pub log_first: Option<u64>,
}

impl Registry {
    /// Renews the lease of this node's replica of a group it leads when the
    /// lease is lapsing, before a write: openraft 0.10 refuses writes once no
    /// quorum acknowledged the leader for `election_timeout_max`
    /// (`ForwardToLeader` without a leader, `LeaseExpired`), which a leader
    /// that slept that long (quiescence) or was rebuilt from dormancy has.
    /// Lapsing means unacknowledged for half of that; heartbeats keep a
    /// working leader's acknowledgement younger than one heartbeat
    /// interval, so a busy leader only pays the metrics read. The renewal is
    /// one heartbeat round, expedited, waited for up to
    /// `election_timeout_min`; if no quorum answers in time the write goes
    /// on and openraft refuses it as before.
    pub(crate) async fn renew_lapsing_lease(&self, raft: &ShardRaft) {
        let half = Duration::from_millis(raft.config().election_timeout_max / 2);
        let lapsing = {
            let m = raft.metrics();
            let m = m.borrow_watched();
            m.state == ServerState::Leader && !acked_within(&m, half)
        };
        if !lapsing {
            return;
        }
        let _expedite = self.expedite();
        if raft.trigger().heartbeat().await.is_err() {
            return;
        }
        let within = Duration::from_millis(raft.config().election_timeout_min);
        let _ = raft
            .wait(Some(within))
            .metrics(
                |m| m.state != ServerState::Leader || acked_within(m, half),
                "the leader's lease renewed",
            )
            .await;
    }

    pub(super) fn new(
        me: NodeId,
        engine: Engine,
        faults: Arc<Faults>,
        response_bytes_max: usize,
        quiesce: bool,
        sample_keys: bool,
    ) -> Self {
        Registry {
            me,
            engine,
            groups: DashMap::new(),
            expediter: Arc::new(Expediter::default()),
            faults,
            node: std::sync::OnceLock::new(),
            response_bytes_max,
            quiesce: super::quiesce::Quiescence::new(quiesce),
            load: super::load::LoadTracker::new(sample_keys),
            batch: std::sync::OnceLock::new(),
        }
    }

    /// Held while a client request waits on a group: heartbeats skip the
    /// linger (a read barrier waits for them; a write's replication may wait
    /// behind its group's lingering heartbeat), and what already lingers is
    /// sent now.
    pub(crate) fn expedite(&self) -> Expedite<'_> {
        self.expediter.expedite()
    }

    /// Every hosted shard, the meta shard included, in no order.
    pub(super) fn shard_ids_all(&self) -> Vec<ShardId> {
        self.groups.iter().map(|e| *e.key()).collect()
    }

    /// Hosted data shards (the meta shard excluded), in id order.
    pub(super) fn shard_ids(&self) -> Vec<ShardId> {
        let mut ids: Vec<ShardId> = self
            .groups
            .iter()
            .map(|e| *e.key())
            .filter(|s| *s != meta::META_SHARD)
            .collect();
        ids.sort();
        ids
    }

    /// The group's running instance; `None` when the shard is not hosted
    /// or its replica is dormant (see [`Slot::Dormant`]; [`Registry::group`]
    /// rebuilds it).
    pub(super) fn live(&self, shard: ShardId) -> Option<Arc<ShardRaft>> {
        match self.groups.get(&shard).as_deref() {
            Some(Slot::Live(r)) => Some(r.clone()),
            _ => None,
        }
    }

    /// The batch system, when `shard` runs on it here.
    pub(super) fn batch_for(&self, shard: ShardId) -> Option<&Arc<super::batch::BatchShards>> {
        self.batch.get().filter(|b| b.hosts(shard))
    }

    /// `shard`'s replica on the batch system, when it runs there here.
    pub(super) fn batch_group(&self, shard: ShardId) -> Option<crate::multiraft::GroupView> {
        self.batch.get()?.group(shard)
    }

    /// Every hosted data shard, openraft's and the batch system's, in id
    /// order.
    pub(super) fn data_shard_ids(&self) -> Vec<ShardId> {
        let mut ids = self.shard_ids();
        ids.extend(self.batch.get().map(|b| b.shards()).unwrap_or_default());
        ids.sort();
        ids
    }

    /// Whether this node hosts a replica of `shard` (running or dormant).
    pub(super) fn hosts(&self, shard: ShardId) -> bool {
        self.groups.contains_key(&shard)
    }

    /// The group's running instance, rebuilt from storage first when the
    /// replica is dormant; `None` when the shard is not hosted (or the
    /// node is stopping).
    pub(super) async fn group(&self, shard: ShardId) -> Option<Arc<ShardRaft>> {
        match self.groups.get(&shard).as_deref()? {
            Slot::Live(r) => return Some(r.clone()),
            Slot::Dormant(_) => {}
        }
        self.node()?.revive(shard).await
    }

    /// Whether this node leads `shard` (whose slot is `slot`): a sleeping
    /// replica's leadership is the vote it sleeps under (it cannot change
    /// until the group wakes), an awake one's its metrics.
    pub(super) fn leads(&self, shard: ShardId, slot: &Slot) -> bool {
        match self.quiesce.sleeping_under(shard) {
            // An uninitialised replica sleeps under node 0: not led.
            Some(leader) => leader == self.me,
            None => match slot {
                Slot::Live(r) => super::leadership(r, self.me).0,
                Slot::Dormant(_) => false,
            },
        }
    }

    /// Whether this node hosts and leads `shard`.
    pub(super) fn leads_hosted(&self, shard: ShardId) -> bool {
        self.groups
            .get(&shard)
            .is_some_and(|slot| self.leads(shard, &slot))
    }

    /// What status and routing need of a replica: from
    /// its metrics, or from what a dormant replica fell asleep under.
    pub(super) fn view(&self, shard: ShardId) -> Option<ReplicaView> {
        if let Some(g) = self.batch_group(shard) {
            return Some(ReplicaView {
                leader: g.leader.map(NodeId),
                term: g.term,
                applied: g.applied,
                log_first: Some(g.log_first),
            });
        }
        match self.groups.get(&shard).as_deref()? {
            Slot::Live(r) => {
                let m = r.metrics();
                let m = m.borrow_watched();
                Some(ReplicaView {
                    leader: m.current_leader,
                    term: m.current_term,
                    applied: m.last_applied.map_or(0, |l| l.index),
                    log_first: Some(m.purged.as_ref().map_or(1, |l| l.index + 1)),
                })
            }
            Slot::Dormant(_) => {
                let s = self.quiesce.asleep(shard)?;
                Some(ReplicaView {
                    leader: (s.vote.leader_id.term > 0).then(|| s.leader()),
                    term: s.vote.leader_id.term,
                    applied: s.last.map_or(0, |l| l.index),
                    log_first: None,
                })
            }
        }
    }

    /// The descriptors recorded in this node's replica of the meta shard
    /// (`None` when it hosts none). Routes are hints: every data request is
    /// checked against the serving shard's own descriptor, so a lagging
    /// replica of the meta shard costs a retry, never a wrong answer.
    pub fn meta_routes(&self) -> Option<Vec<ShardDescriptor>> {
        self.hosts(meta::META_SHARD).then_some(())?;
        let r = meta::meta_range();
        let pairs = self.engine.scan(&r.start, &r.end, usize::MAX).ok()?;
        Some(
            pairs
                .iter()
                .filter(|(k, _)| meta::route_key_shard(k).is_some())
                .filter_map(|(_, v)| postcard::from_bytes::<ShardDescriptor>(v).ok())
                .collect(),
        )
    }

    /// Whether `conn`'s peer may make admin requests: it holds an admin
    /// certificate, or the certificate of a cluster node (this one or a
    /// known peer; nodes rebalance the cluster when configured to).
    pub(super) fn admin_peer(&self, conn: &quinn::Connection) -> bool {
        if crate::tls::peer_is_admin(conn) {
            return true;
        }
        let peers = self
            .node
            .get()
            .and_then(std::sync::Weak::upgrade)
            .map(|n| n.transport.peer_ids())
            .unwrap_or_default();
        crate::tls::peer_is_node(conn, peers.into_iter().chain(std::iter::once(self.me)))
    }

    /// The load reports recorded in this node's replica of the meta shard
    /// (`None` when it hosts none), in shard id order.
    pub fn meta_load_reports(&self) -> Option<Vec<crate::command::LoadReport>> {
        self.hosts(meta::META_SHARD).then_some(())?;
        let start = meta::load_prefix();
        let mut end = start.clone();
        end.extend_from_slice(&[0xff; 9]);
        let pairs = self.engine.scan(&start, &end, usize::MAX).ok()?;
        Some(
            pairs
                .iter()
                .filter_map(|(_, v)| postcard::from_bytes(v).ok())
                .collect(),
        )
    }

    /// Serves the client connections the transport hands over, each until
    /// it closes (holding its permit).
    pub(super) async fn serve_clients(
        self: Arc<Self>,
        mut conns: tokio::sync::mpsc::Receiver<ClientConn>,
        metrics: Arc<crate::metrics::NetMetrics>,
    ) {
        while let Some(ClientConn { conn, permit }) = conns.recv().await {
            let (registry, metrics) = (self.clone(), metrics.clone());
            tokio::spawn(async move {
                serve_client::serve_connection(registry, conn, metrics).await;
                drop(permit);
            });
        }
    }

    /// Hands one Raft request from node `from` to its group. A vote or an
    /// append must speak for its sender: only the candidate asks for votes
    /// and only the leader appends (each peer connection is bound to one
    /// node by its certificate).
    pub async fn handle_request(
        &self,
        from: NodeId,
        shard: ShardId,
        req: PeerRequest,
    ) -> PeerResponse {
        let claimed = match &req {
            PeerRequest::Append(r) => Some(r.vote.leader_id.node_id),
            PeerRequest::Vote(v) | PeerRequest::PreVote(v) => Some(v.vote.leader_id.node_id),
            PeerRequest::Hibernate { vote, .. } => Some(vote.leader_id.node_id),
            _ => None,
        };
        if let Some(claimed) = claimed.filter(|c| *c != from) {
            tracing::warn!(%shard, %claimed, sender = %from, "a Raft message for another node refused");
            return PeerResponse::Refused(Refusal::NotTheSender {
                shard,
                claimed,
                sender: from,
            });
        }
        if !matches!(
            req,
            PeerRequest::Append(_)
                | PeerRequest::Vote(_)
                | PeerRequest::PreVote(_)
                | PeerRequest::TransferLeader(_)
        ) {
            return self.handle_admin(shard, req).await;
        }
        let Some(raft) = self.group(shard).await else {
            return PeerResponse::Refused(Refusal::UnknownShard(shard));
        };
        self.quiesce.on_raft_request(shard, &raft, &req);
        /// openraft's answer, or its error as a refusal.
        fn answered<T, E: std::fmt::Display>(
            r: Result<T, E>,
            wrap: fn(T) -> PeerResponse,
        ) -> PeerResponse {
            r.map_or_else(
                |e| PeerResponse::Refused(Refusal::Failed(e.to_string())),
                wrap,
            )
        }
        match req {
            PeerRequest::Append(r) => {
                // Entries to append: the log writer may wait a little for
                // other groups' appends while this one is in progress.
                let _in_progress =
                    (!r.entries.is_empty()).then(|| self.engine.write_in_progress(shard));
                answered(raft.append_entries(r).await, PeerResponse::Append)
            }
            PeerRequest::Vote(v) => answered(raft.vote(v).await, PeerResponse::Vote),
            PeerRequest::PreVote(v) => answered(raft.pre_vote(v).await, PeerResponse::Vote),
            PeerRequest::TransferLeader(t) => answered(
                raft.handle_transfer_leader(t).await,
                PeerResponse::TransferLeader,
            ),
            other => self.handle_admin(shard, other).await,
        }
    }

    /// Where a received snapshot of a hosted shard is written.
    pub fn snapshot_dir(&self, shard: ShardId) -> Option<PathBuf> {
        (self.groups.contains_key(&shard) || self.batch_for(shard).is_some())
            .then(|| self.engine.shard_snapshot_dir(shard))
    }

    /// Hands a fully received snapshot file from node `from` to its group.
    ///
    /// # Errors
    /// [`Refusal`] when the shard is not hosted, the snapshot speaks for
    /// another leader than its sender, is older than the replica, or its
    /// group failed.
    pub async fn install_snapshot(
        &self,
        from: NodeId,
        shard: ShardId,
        vote: Vote,
        meta: SnapshotMeta,
        data: SnapshotData,
    ) -> Result<Vote, Refusal> {
        // A replica on the batch system (a move's target): the snapshot
        // seeds it, its group restarts from it.
        let batch = self.batch_for(shard).cloned();
        let raft = match &batch {
            Some(_) => None,
            None => Some(
                self.group(shard)
                    .await
                    .ok_or(Refusal::UnknownShard(shard))?,
            ),
        };
        // Only a leader sends its snapshot, under its own vote.
        if vote.leader_id.node_id != from {
            return Err(Refusal::NotTheSender {
                shard,
                claimed: vote.leader_id.node_id,
                sender: from,
            });
        }
        // Never older than what this replica already is: a snapshot taken
        // before a split or membership change it has applied would bring
        // back a range and configuration that no longer exist. (An empty
        // replica has applied nothing: whatever it installs is trimmed to
        // the keys no newer replica here owns, and its log replays the rest.)
        let local = self
            .engine
            .descriptor(shard)
            .map_err(|_| Refusal::UnknownShard(shard))?;
        let stateful = self
            .engine
            .ownership()
            .get(shard)
            .is_some_and(|c| c.initialized);
        let header = crate::storage::snapshot::read_header(data.path())
            .map_err(|e| Refusal::Failed(e.to_string()))?;
        let theirs = header.descriptor.epoch;
        if stateful && !theirs.covers(&local.epoch) {
            tracing::warn!(%shard, snapshot = ?theirs, local = ?local.epoch, "stale snapshot refused");
            return Err(Refusal::StaleSnapshot {
                shard,
                snapshot: theirs,
                local: local.epoch,
            });
        }
        let Some(raft) = raft else {
            let b = batch.expect("one of the two");
            b.install_seed(&self.engine, shard, meta, data).await?;
            return Ok(vote);
        };
        self.quiesce.touch(shard, &raft, super::quiesce::Wake::Raft);
        let snapshot = crate::raft::Snapshot {
            meta,
            snapshot: data,
        };
        let installed = raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map(|r| r.vote)
            .map_err(|e| Refusal::Failed(e.to_string()))?;
        if theirs.version > local.epoch.version {
            // The shard split while this replica was away: the children it
            // is a member of are found and created by replica repair.
            if let Some(n) = self.node() {
                n.gc_wake.notify_one();
            }
        }
        Ok(installed)
    }
}

/// The node's side of the transport: decodes inbound bodies as Raft
/// messages ([`rpc`]) and hands them to the registry.
pub(super) struct NodeInbound(pub(super) Arc<Registry>);

impl Inbound for NodeInbound {
    fn request(&self, from: NodeId, shard: ShardId, body: Vec<u8>) -> Answer {
        if shard == crate::multiraft::quic::FRAME_SHARD {
            // A batch-system frame (many groups); dropped until the loop
            // runs, as Raft tolerates.
            return match self.0.batch.get() {
                Some(b) => b.inbound().request(from, shard, body),
                None => Box::pin(async { Vec::new() }),
            };
        }
        let registry = self.0.clone();
        Box::pin(async move {
            let resp = match postcard::from_bytes::<PeerRequest>(&body) {
                Ok(req) => {
                    drop(body);
                    registry.handle_request(from, shard, req).await
                }
                Err(e) => {
                    PeerResponse::Refused(Refusal::Failed(format!("undecodable request: {e}")))
                }
            };
            rpc::encode_response(&resp)
        })
    }

    fn snapshot_folder(&self, shard: ShardId) -> Result<PathBuf, Vec<u8>> {
        self.0.snapshot_dir(shard).ok_or_else(|| {
            rpc::encode_snapshot_reply(&SnapshotReply::Refused(Refusal::UnknownShard(shard)))
        })
    }

    fn snapshot(&self, from: NodeId, shard: ShardId, head: Vec<u8>, file: PathBuf) -> Answer {
        let registry = self.0.clone();
        Box::pin(async move {
            let reply = match postcard::from_bytes::<SnapshotHead>(&head) {
                Ok(SnapshotHead { vote, meta }) => registry
                    .install_snapshot(from, shard, vote, meta, SnapshotData::from_file(file))
                    .await
                    .map_or_else(SnapshotReply::Refused, |vote| SnapshotReply::Done { vote }),
                Err(e) => SnapshotReply::Refused(Refusal::Failed(format!(
                    "undecodable snapshot head: {e}"
                ))),
            };
            rpc::encode_snapshot_reply(&reply)
        })
    }
}
