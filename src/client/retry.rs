//! The retry engine: find the shard for a request, send it to the
//! likeliest leader, correct the route cache from typed answers, retry
//! with backoff under the deadline.

use super::*;

impl Client {
    pub(super) fn route(&self, key: &[u8]) -> Option<ShardDescriptor> {
        self.inner
            .routes
            .lock()
            .expect("routes poisoned")
            .lookup(key)
            .cloned()
    }

    /// Applies a refusal to the route cache; says whether to retry.
    pub(super) fn correct(&self, d: &ShardDescriptor, e: ApiError) -> AttemptError {
        let mut cache = self.inner.routes.lock().expect("routes poisoned");
        match e {
            ApiError::NotLeader { shard, leader_hint } => {
                let hinted = leader_hint.filter(|h| Some(*h) != d.leader_hint);
                // No (new) hint: try the replica after the one we asked.
                let next = hinted.or_else(|| Some(replica_after(d, target(d))));
                cache.set_leader(shard, next);
                let why = format!("{shard}: not the leader");
                if hinted.is_some() {
                    AttemptError::Redirect(why)
                } else {
                    AttemptError::Retry(why)
                }
            }
            ApiError::EpochMismatch { shard, current } => {
                let mut learned = false;
                for c in current {
                    learned |= cache.insert(c);
                }
                let why = format!("{shard}: epoch mismatch");
                if learned {
                    AttemptError::Redirect(why)
                } else {
                    // The node knows less than we do: ask another replica.
                    cache.set_leader(shard, Some(replica_after(d, target(d))));
                    AttemptError::Retry(why)
                }
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
    pub(super) async fn with_route<T>(
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
    pub(super) async fn with_target<T>(
        &self,
        target_shard: Target<'_>,
        make: impl Fn(&ShardDescriptor) -> Request,
        mut accept: impl FnMut(Response) -> Result<T, AttemptError>,
        deadline: Duration,
        attempt_timeout: Duration,
    ) -> Result<T, ClientError> {
        let start = Instant::now();
        let mut backoff = self.inner.opts.backoff_min;
        let mut redirects = 0;
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
                Err(AttemptError::Redirect(e)) if redirects < REDIRECTS_AT_ONCE_MAX => {
                    // Straight to where the answer pointed.
                    redirects += 1;
                    self.inner
                        .retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if start.elapsed() >= deadline {
                        return Err(ClientError::Timeout {
                            deadline,
                            last_error: e,
                        });
                    }
                    continue;
                }
                Err(AttemptError::Retry(e) | AttemptError::Redirect(e)) => e,
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
}

/// Redirects (a new leader hint, newer descriptors) followed without a
/// pause, per request; beyond them the usual backoff applies (two nodes
/// each naming the other during an election must not spin).
const REDIRECTS_AT_ONCE_MAX: u32 = 3;

/// What a request is for: the shard owning a key, or a shard by id.
#[derive(Clone, Copy)]
pub(super) enum Target<'a> {
    Key(&'a [u8]),
    /// The shard owning this key, for a request whose other keys must be
    /// in the same shard: when one of them is not (the shard split), the
    /// call ends with `KeyNotInRange` (after the cache is corrected) so
    /// the caller regroups, instead of sending the same keys again.
    Group(&'a [u8]),
    Shard(ShardId),
}

/// The node a request for `d` goes to: its leader hint, else its first
/// replica.
pub(super) fn target(d: &ShardDescriptor) -> NodeId {
    d.leader_hint.unwrap_or(d.replicas[0])
}

/// The replica after `node` in `d`'s list (wrapping; counted from the first
/// when `node` is not a replica).
pub(super) fn replica_after(d: &ShardDescriptor, node: NodeId) -> NodeId {
    let i = d.replicas.iter().position(|r| *r == node).unwrap_or(0);
    d.replicas[(i + 1) % d.replicas.len()]
}

pub(super) fn unexpected(r: Response) -> AttemptError {
    AttemptError::Fatal(ClientError::Refused(ApiError::Invalid(format!(
        "unexpected answer {r:?}"
    ))))
}
