//! The admin API: routes and node status, `verify`, splits, replica
//! moves and leader transfers.

use super::*;

/// Overall deadline of an admin call (a move streams a whole shard).
pub(super) const ADMIN_DEADLINE: Duration = Duration::from_secs(600);
/// One attempt of a replica move: the server waits up to 300 s for its
/// learner.
pub(super) const MOVE_ATTEMPT: Duration = Duration::from_secs(320);
/// One attempt of a split or leader transfer (elections included).
pub(super) const ADMIN_ATTEMPT: Duration = Duration::from_secs(30);

impl Client {
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

impl Client {
    /// The shards' load as their leaders last reported it to the meta
    /// shard (reads, writes and written bytes per second, size, and when
    /// it was measured), in shard id order. Every node hosting a replica
    /// of the meta shard is asked; per shard the newest report wins.
    ///
    /// # Errors
    /// [`ClientError::Timeout`] when no node with a replica of the meta
    /// shard answers.
    pub async fn load_reports(&self) -> Result<Vec<crate::command::LoadReport>, ClientError> {
        let mut newest: std::collections::BTreeMap<ShardId, crate::command::LoadReport> =
            std::collections::BTreeMap::new();
        let mut answered = false;
        let mut last = String::from("no node answered");
        for (node, _) in self.nodes() {
            match self.call_node(node, &Request::LoadReports).await {
                Ok(Response::LoadReports(reports)) => {
                    answered = true;
                    for r in reports {
                        if newest.get(&r.shard).is_none_or(|k| r.at_ms > k.at_ms) {
                            newest.insert(r.shard, r);
                        }
                    }
                }
                Ok(Response::Error(e)) => last = format!("{node}: {e}"),
                Ok(other) => last = format!("{node}: unexpected answer {other:?}"),
                Err(e) => last = e.to_string(),
            }
        }
        if !answered {
            return Err(ClientError::Timeout {
                deadline: self.inner.opts.attempt_timeout,
                last_error: last,
            });
        }
        Ok(newest.into_values().collect())
    }

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
    pub(super) async fn replica_digest(
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

    pub(super) fn cached(&self, shard: ShardId) -> Option<ShardDescriptor> {
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

    /// Merges the shard that starts at `key` into its left neighbour
    /// (admin). When their replicas are on different nodes, the right
    /// shard's are first moved onto the left shard's nodes (one move at a
    /// time); then the left shard takes the range in one replicated step,
    /// without copying data. Returns the grown left shard. Clients keep
    /// working throughout: requests to the right shard are refused with
    /// retryable errors for the moment of the merge, then routed anew.
    ///
    /// # Errors
    /// [`ClientError::Limit`] for a bad key (the empty key: the first shard
    /// has no left neighbour); [`ClientError::Refused`] when no shard
    /// starts at `key`, when either shard is
    /// splitting, moving, merging or changing membership, or for the meta
    /// shard; [`ClientError::Timeout`].
    pub async fn merge(&self, key: &[u8]) -> Result<ShardDescriptor, ClientError> {
        crate::limits::check_key(key)?;
        let invalid = |why: String| ClientError::Refused(ApiError::Invalid(why));
        let shown = shard_router::descriptor::escape(key);
        // Each round either moves one replica or merges; a replica set
        // differs by at most every voter.
        for _ in 0..16 {
            let routes = self.routes().await?;
            let right = routes.iter().find(|d| d.range.start == key).cloned();
            let left = routes.iter().find(|d| d.range.end == key).cloned();
            let (Some(left), Some(right)) = (left, right) else {
                return Err(invalid(format!("no shard starts at {shown}")));
            };
            let missing = left.replicas.iter().find(|n| !right.replicas.contains(n));
            let extra = right.replicas.iter().find(|n| !left.replicas.contains(n));
            match (extra, missing) {
                (Some(&from), Some(&to)) => {
                    self.move_replica(right.id, from, to).await?;
                    continue;
                }
                (None, None) => {}
                _ => {
                    return Err(invalid(format!(
                        "{} is on {:?} and {} on {:?}: replica counts differ",
                        left.id, left.replicas, right.id, right.replicas
                    )))
                }
            }
            let r = self
                .with_target(
                    Target::Shard(left.id),
                    |_| Request::Merge {
                        left: left.id,
                        right: right.id,
                    },
                    |resp| match resp {
                        Response::Descriptor(d) => Ok(d),
                        other => Err(unexpected(other)),
                    },
                    self.inner.opts.deadline.max(ADMIN_ATTEMPT),
                    ADMIN_ATTEMPT,
                )
                .await;
            let merged = match r {
                Ok(d) => d,
                Err(ClientError::Refused(ApiError::Invalid(reason))) => {
                    // A retried attempt after one that merged is refused
                    // (the right shard is gone): answer the merge.
                    let _ = self.refresh_routes().await;
                    match self.route(key) {
                        Some(d) if d.id == left.id && d.range.start.as_slice() < key => d,
                        _ => return Err(invalid(reason)),
                    }
                }
                Err(e) => return Err(e),
            };
            self.learn_route(merged.clone());
            return Ok(merged);
        }
        Err(invalid(format!(
            "the replicas of the shards around {shown} kept changing"
        )))
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
