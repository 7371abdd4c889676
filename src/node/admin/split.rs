//! Splits: a leader splits its shard at a key (one replicated step), and
//! the automatic split of shards that outgrew `split.max_bytes`.

use super::*;

impl Node {
    /// Splits `shard` (led here) at `key`: a fresh id from the meta shard,
    /// the split command through the shard's log, both descriptors recorded
    /// in the meta shard, and the new shard campaigning here. Returns the
    /// two halves once the new one has a leader.
    ///
    /// # Errors
    /// [`AdminError::Refused`] for a key not strictly inside the range (or
    /// the meta shard); [`AdminError::NotLeader`] when this node does not
    /// lead; [`AdminError::Unavailable`] when a step timed out.
    pub async fn split_shard(
        &self,
        shard: ShardId,
        key: Vec<u8>,
    ) -> Result<(ShardDescriptor, ShardDescriptor), AdminError> {
        if shard == meta::META_SHARD {
            return Err(AdminError::Refused("the meta shard is not split".into()));
        }
        if let Some(b) = self.registry.batch_for(shard).cloned() {
            return self.split_batch_shard(&b, shard, key).await;
        }
        let raft = self.led(shard).await?;
        let joint = raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .get_joint_config()
            .len()
            > 1;
        if joint {
            // The child would inherit the joint configuration (the state
            // machine refuses such a split too).
            return Err(AdminError::Unavailable {
                shard,
                reason: "a membership change is in progress; split again after it".into(),
            });
        }
        let d = self.split_checked(shard, &key)?;
        let child = self.alloc_shard_id(shard).await?;
        let cmd = Command::Split {
            key,
            child,
            version: d.epoch.version,
        };
        let _expedite = self.registry.expedite();
        self.registry.renew_lapsing_lease(&raft).await;
        let resp = match raft.client_write(cmd).await {
            Ok(r) => r.data,
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                return Err(AdminError::NotLeader {
                    shard,
                    hint: f.leader_id,
                })
            }
            Err(e) => return Err(raft_error(shard, e)),
        };
        let (left, mut right) = split_answer(shard, resp)?;
        right.leader_hint = Some(self.id);
        // The new group starts from the split's log id on every replica;
        // campaigning here makes its first leader this node.
        let started = Instant::now();
        let child_raft = loop {
            if let Some(r) = self.group(child).await {
                break r;
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(AdminError::Unavailable {
                    shard: child,
                    reason: "the new shard's group did not start".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let _ = child_raft.trigger().elect(false).await;
        let _ = child_raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.current_leader.is_some(),
                "split: the new shard elects",
            )
            .await;
        self.record_split(shard, left, right).await
    }

    /// [`Node::split_shard`] of a shard on the batch Raft system: the same
    /// steps, the split proposed through the node's Raft loop; every
    /// replica starts the child's group there as it applies the split.
    async fn split_batch_shard(
        &self,
        b: &Arc<super::super::batch::BatchShards>,
        shard: ShardId,
        key: Vec<u8>,
    ) -> Result<(ShardDescriptor, ShardDescriptor), AdminError> {
        b.leading(shard)?;
        let d = self.split_checked(shard, &key)?;
        let child = self.alloc_shard_id(shard).await?;
        let cmd = Command::Split {
            key,
            child,
            version: d.epoch.version,
        };
        let (_, resp) = b
            .propose(shard, &cmd)
            .await
            .map_err(|e| crate::node::batch::admin_error(shard, e))?;
        let (left, mut right) = split_answer(shard, resp)?;
        right.leader_hint = Some(self.id);
        b.elect_split_child(child).await?;
        self.record_split(shard, left, right).await
    }

    /// `shard`'s descriptor, when `key` lies strictly inside its range.
    fn split_checked(&self, shard: ShardId, key: &[u8]) -> Result<ShardDescriptor, AdminError> {
        let d = self
            .engine
            .descriptor(shard)
            .map_err(|_| AdminError::UnknownShard { shard })?;
        if key <= d.range.start.as_slice() || !d.range.contains(key) {
            return Err(AdminError::Refused(format!(
                "split key {} is not strictly inside {shard}'s range {}",
                shard_router::descriptor::escape(key),
                d.range
            )));
        }
        Ok(d)
    }

    /// A fresh shard id from the meta shard, for a split of `shard`.
    async fn alloc_shard_id(&self, shard: ShardId) -> Result<ShardId, AdminError> {
        match self
            .propose(meta::META_SHARD, Command::AllocShardId, PROPOSE_TIMEOUT)
            .await?
        {
            CommandResponse::Allocated(id) => Ok(id),
            other => Err(AdminError::Unavailable {
                shard,
                reason: format!("id allocation answered {other:?}"),
            }),
        }
    }

    /// Records both halves of a split of `shard` in the meta shard (best
    /// effort: the route reporter records them later) and returns them.
    async fn record_split(
        &self,
        shard: ShardId,
        left: ShardDescriptor,
        right: ShardDescriptor,
    ) -> Result<(ShardDescriptor, ShardDescriptor), AdminError> {
        let child = right.id;
        if let Err(e) = self
            .propose(
                meta::META_SHARD,
                Command::RecordRoutes {
                    descriptors: vec![left.clone(), right.clone()],
                },
                PROPOSE_TIMEOUT,
            )
            .await
        {
            // The route reporter records them later; clients are corrected
            // by the shards themselves meanwhile.
            tracing::warn!(%shard, %child, error = %e, "split: routes not recorded yet");
        }
        tracing::info!(%shard, %child, left = %left.range, right = %right.range, "split done");
        Ok((left, right))
    }
}

/// The two halves a split answered, or why it was refused.
fn split_answer(
    shard: ShardId,
    resp: CommandResponse,
) -> Result<(ShardDescriptor, ShardDescriptor), AdminError> {
    match resp {
        CommandResponse::Split { left, right } => Ok((left, right)),
        CommandResponse::SplitRefused { reason, .. } => Err(AdminError::Refused(reason)),
        CommandResponse::Frozen { into } => Err(AdminError::Refused(format!(
            "{shard} is frozen for a merge into {into}"
        ))),
        other => Err(AdminError::Unavailable {
            shard,
            reason: format!("split answered {other:?}"),
        }),
    }
}

/// Splits `d` at the median of its recent request keys when its load
/// (reads plus writes per second) reaches `hot`; whether it split.
async fn split_if_hot(n: &Node, d: &ShardDescriptor, hot: u64) -> bool {
    let rates = n.registry.load.rates(d.id);
    let load = rates.reads_per_s + rates.writes_per_s;
    if load < hot as f64 {
        return false;
    }
    let Some(key) = crate::node::load::load_split_key(&n.registry.load.samples(d.id), &d.range)
    else {
        return false;
    };
    tracing::info!(shard = %d.id, load, key = %shard_router::descriptor::escape(&key), "shard over the load limit: splitting");
    match n.split_shard(d.id, key).await {
        Ok((l, r)) => {
            // Both halves are measured afresh.
            n.registry.load.forget(l.id);
            tracing::info!(left = %l.id, right = %r.id, "load split done");
            true
        }
        Err(e) => {
            tracing::warn!(shard = %d.id, error = %e, "load split failed");
            false
        }
    }
}

/// Merges, for each shard led here, its right neighbour into it when both
/// are small and cold, this node leads both and their replicas coincide
/// (`split.merge_max_bytes`, `split.merge_max_ops_per_s`). A shard just
/// merged is not considered again in the same round.
async fn merge_cold_neighbours(n: &Node) {
    let (max, cold) = (
        n.config.split.merge_max_bytes,
        n.config.split.merge_max_ops_per_s as f64,
    );
    let led: Vec<ShardDescriptor> = n
        .shards_led()
        .into_iter()
        .filter_map(|s| n.engine.descriptor(s).ok())
        .collect();
    let by_start: HashMap<&[u8], &ShardDescriptor> =
        led.iter().map(|d| (d.range.start.as_slice(), d)).collect();
    let small = |d: &ShardDescriptor| {
        let r = n.registry.load.rates(d.id);
        n.engine.merging(d.id).is_none()
            && r.reads_per_s + r.writes_per_s < cold
            && n.engine.approximate_size(&d.range) < max
    };
    let mut touched = std::collections::HashSet::new();
    for left in &led {
        if left.range.end.is_empty() || touched.contains(&left.id) {
            continue;
        }
        let Some(&right) = by_start.get(left.range.end.as_slice()) else {
            continue;
        };
        let mut a = left.replicas.clone();
        let mut b = right.replicas.clone();
        a.sort();
        b.sort();
        if a != b || touched.contains(&right.id) || !small(left) || !small(right) {
            continue;
        }
        touched.insert(left.id);
        touched.insert(right.id);
        tracing::info!(left = %left.id, right = %right.id, "small, cold neighbours: merging");
        match n.merge_shards(left.id, right.id).await {
            Ok(d) => tracing::info!(shard = %d.id, range = %d.range, "automatic merge done"),
            Err(e) => {
                tracing::warn!(left = %left.id, right = %right.id, error = %e, "automatic merge failed")
            }
        }
    }
}

/// Splits the shards this node leads once they outgrow
/// `split.max_bytes`, at their middle key, and those whose load reaches
/// `split.load_ops_per_s`, at the median of their recent request keys,
/// checking every `split.check_interval_ms`.
pub(crate) async fn auto_split(node: Weak<Node>) {
    let (max, hot, every, merge_max) = {
        let Some(n) = node.upgrade() else { return };
        (
            n.config.split.max_bytes,
            n.config.split.load_ops_per_s,
            Duration::from_millis(n.config.split.check_interval_ms),
            n.config.split.merge_max_bytes,
        )
    };
    if max == 0 && hot == 0 && merge_max == 0 {
        return;
    }
    // Per shard: bytes applied when last measured, and the size then.
    let mut checked: HashMap<ShardId, (u64, u64)> = HashMap::new();
    loop {
        tokio::time::sleep(every).await;
        let Some(n) = node.upgrade() else { return };
        if merge_max > 0 {
            merge_cold_neighbours(&n).await;
        }
        for shard in n.shards_led() {
            let Ok(d) = n.engine.descriptor(shard) else {
                continue;
            };
            if n.engine.merging(shard).is_some() {
                continue;
            }
            if hot > 0 && split_if_hot(&n, &d, hot).await {
                continue;
            }
            if max == 0 {
                continue;
            }
            // Cheap test first: the last measured size plus what was
            // applied since (or RocksDB's on-disk estimate) must reach the
            // limit before the range is scanned.
            let written = n.engine.written(shard);
            if let Some(&(at, measured)) = checked.get(&shard) {
                let fresh = written.saturating_sub(at);
                let estimate = n.engine.approximate_size(&d.range);
                if measured + fresh < max && estimate < max {
                    continue;
                }
            }
            let engine = n.engine.clone();
            let range = d.range.clone();
            let point = tokio::task::spawn_blocking(move || engine.split_point(&range, max)).await;
            let Ok(Ok((bytes, key))) = point else {
                continue;
            };
            checked.insert(shard, (written, bytes));
            let Some(key) = key else {
                continue;
            };
            tracing::info!(%shard, bytes, key = %shard_router::descriptor::escape(&key), "shard over the size limit: splitting");
            // The parent keeps about half.
            checked.insert(shard, (written, bytes / 2));
            match n.split_shard(shard, key).await {
                Ok((l, r)) => {
                    tracing::info!(left = %l.id, right = %r.id, "automatic split done");
                }
                Err(e) => tracing::warn!(%shard, error = %e, "automatic split failed"),
            }
        }
    }
}
