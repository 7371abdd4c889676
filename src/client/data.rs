//! The data API: reads, writes (exactly once under a session), batches
//! and scans.

use super::*;

impl Client {
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

    /// Reads several keys (linearizable per shard), in order: one request
    /// per shard, all shards at once.
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
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        // Owned copies for reads that run as tasks (made when first needed).
        let mut owned: Option<Arc<Vec<Vec<u8>>>> = None;
        while !pending.is_empty() {
            // A key whose shard the route cache does not know is read
            // first, with every pending key its shard owns (that learns the
            // route); then one read per shard, every shard at once.
            let unknown = pending
                .iter()
                .copied()
                .find(|&i| self.route(keys[i]).is_none());
            let mut groups: Vec<Vec<usize>> = match unknown {
                Some(_) => vec![pending.clone()],
                None => {
                    let ks: Vec<&[u8]> = pending.iter().map(|&i| keys[i]).collect();
                    self.group_by_shard(&ks)
                        .into_iter()
                        .map(|g| g.into_iter().map(|j| pending[j]).collect())
                        .collect()
                }
            };
            let parts = if groups.len() == 1 {
                let part = groups.pop().expect("one group");
                let first = unknown.unwrap_or(part[0]);
                vec![self.get_part(keys, first, part).await?]
            } else {
                let all = owned
                    .get_or_insert_with(|| Arc::new(keys.iter().map(|k| k.to_vec()).collect()))
                    .clone();
                let mut running = tokio::task::JoinSet::new();
                for part in groups {
                    let (c, all) = (self.clone(), all.clone());
                    running.spawn(async move { c.get_part(&all, part[0], part).await });
                }
                join_all(running, self.inner.opts.deadline).await?
            };
            for (i, v) in parts.into_iter().flatten() {
                out[i] = Some(v);
            }
            pending.retain(|&i| out[i].is_none());
        }
        Ok(out
            .into_iter()
            .map(|v| v.expect("every key read"))
            .collect())
    }

    /// Reads, from the shard owning `keys[first]`, `first` and every other
    /// key of `candidates` that shard owns (from one snapshot there); the
    /// node may answer a prefix when the values are larger than one
    /// response. Returns `(position, value)` for what was answered.
    async fn get_part<K: AsRef<[u8]>>(
        &self,
        keys: &[K],
        first: usize,
        candidates: Vec<usize>,
    ) -> Result<Vec<(usize, Option<Vec<u8>>)>, ClientError> {
        let sent: Mutex<Vec<usize>> = Mutex::new(Vec::new());
        let values = self
            .with_route(
                keys[first].as_ref(),
                |d| {
                    let mut s = sent.lock().expect("sent poisoned");
                    *s = candidates
                        .iter()
                        .copied()
                        .filter(|&i| i == first || d.range.contains(keys[i].as_ref()))
                        .collect();
                    Request::Get {
                        shard: d.id,
                        epoch: d.epoch,
                        keys: s.iter().map(|&i| keys[i].as_ref().to_vec()).collect(),
                    }
                },
                |r| match r {
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
        Ok(sent.into_iter().zip(values).collect())
    }

    /// Opens a write of this client's session (`None` when exactly-once
    /// is off), waiting while [`SESSION_WINDOW`] writes are open.
    pub(super) async fn open_write(&self) -> Result<Option<OpenWrite>, ClientError> {
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
    pub(super) fn write_request(
        d: &ShardDescriptor,
        ops: Vec<Op>,
        open: Option<&OpenWrite>,
    ) -> Request {
        Request::Write {
            shard: d.id,
            epoch: d.epoch,
            ops,
            session: open.map(OpenWrite::stamp),
        }
    }

    pub(super) async fn write_one(&self, op: Op) -> Result<OpResult, ClientError> {
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
    /// together, as one request; the shards' requests are sent all at once
    /// and are not atomic together (each shard's part succeeds or fails on
    /// its own; on an error, the first is returned once every part is
    /// done). Writes of one key apply in batch order.
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
        // A key whose shard the route cache does not know is written alone
        // first, which learns that shard's route. It is the first pending
        // write of its key (all writes of one key share its route), so the
        // key's writes keep their order.
        while let Some(i) = pending.iter().position(|op| self.route(op.key()).is_none()) {
            let op = pending.remove(i);
            self.write_one(op).await?;
        }
        // Then one write per shard, every shard at once, each group in
        // batch order.
        let keys: Vec<&[u8]> = pending.iter().map(Op::key).collect();
        let groups = self.group_by_shard(&keys);
        let mut ops: Vec<Option<Op>> = pending.into_iter().map(Some).collect();
        let groups: Vec<Vec<Op>> = groups
            .into_iter()
            .map(|g| g.into_iter().filter_map(|i| ops[i].take()).collect())
            .collect();
        let mut running = tokio::task::JoinSet::new();
        for group in groups {
            let c = self.clone();
            running.spawn(async move { c.put_group(group).await });
        }
        join_all(running, self.inner.opts.deadline).await.map(drop)
    }

    /// Positions of `keys` grouped by the shard the route cache gives them,
    /// each group in order. Every position of one key is in the group of
    /// its first (the cache may change meanwhile: another task of this
    /// client can refresh it); a key without a cached route is a group of
    /// its own.
    fn group_by_shard(&self, keys: &[&[u8]]) -> Vec<Vec<usize>> {
        let mut groups: Vec<(Option<ShardId>, Vec<usize>)> = Vec::new();
        let mut group_of: HashMap<&[u8], usize> = HashMap::new();
        for (i, &k) in keys.iter().enumerate() {
            let g = *group_of.entry(k).or_insert_with(|| {
                let shard = self.route(k).map(|d| d.id);
                match groups
                    .iter()
                    .position(|(s, _)| shard.is_some() && *s == shard)
                {
                    Some(g) => g,
                    None => {
                        groups.push((shard, Vec::new()));
                        groups.len() - 1
                    }
                }
            });
            groups[g].1.push(i);
        }
        groups.into_iter().map(|(_, g)| g).collect()
    }

    /// Writes `group` (keys the route cache gives one shard) as one
    /// request; key by key when that shard turns out to have shrunk.
    async fn put_group(&self, group: Vec<Op>) -> Result<(), ClientError> {
        let first = group[0].key().to_vec();
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
            Ok(()) => Ok(()),
            // The shard shrank under us and nothing of the group was
            // applied (a session write's earlier application would have
            // been answered, not refused): write the group key by key,
            // each a new write.
            Err(ClientError::Refused(ApiError::KeyNotInRange { .. })) => {
                for op in group {
                    self.write_one(op).await?;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
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

/// Waits for every task of `running` (none is abandoned half way) and
/// returns their results, or the first error; a task's panic is the
/// caller's. A task cancelled (the runtime shutting down) left its request
/// indeterminate, reported as a timeout of `deadline`.
async fn join_all<T: 'static>(
    mut running: tokio::task::JoinSet<Result<T, ClientError>>,
    deadline: Duration,
) -> Result<Vec<T>, ClientError> {
    let mut first = None;
    let mut done_ok = Vec::new();
    while let Some(done) = running.join_next().await {
        match done {
            Ok(Ok(v)) => done_ok.push(v),
            Ok(Err(e)) => {
                first.get_or_insert(e);
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => {
                first.get_or_insert(ClientError::Timeout {
                    deadline,
                    last_error: format!("batch part cancelled: {e}"),
                });
            }
        }
    }
    first.map_or(Ok(done_ok), Err)
}
