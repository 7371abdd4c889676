//! The nodes a client talks to: their connections (one per node, dialed
//! on demand), one request to one node, and learning nodes and routes
//! from them.

use super::*;
use std::sync::atomic::Ordering;

impl Client {
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

    /// What this client's open QUIC connections sent and received so far
    /// (one row per node it is connected to): datagrams, frames by kind,
    /// round-trip time. For diagnostics, such as `tessera-ctl bench`'s
    /// per-operation transport cost.
    pub async fn connection_stats(&self) -> Vec<(NodeId, quinn::ConnectionStats)> {
        let conns = self.inner.conns.lock().expect("conns poisoned");
        let mut out: Vec<_> = conns.iter().map(|(n, c)| (*n, c.stats())).collect();
        out.sort_by_key(|(n, _)| *n);
        out
    }

    pub(super) async fn connection(
        &self,
        node: NodeId,
    ) -> Result<quinn::Connection, NodeCallError> {
        if let Some(c) = self.open_connection(node) {
            return Ok(c);
        }
        // One dial per node at a time: the requests that find no
        // connection together (a client's first burst) wait for one
        // handshake instead of each making its own. The table itself is
        // not held while dialing, so a dead node's handshake timing out
        // holds up only the requests to that node.
        let per_node = self.per_node(node);
        let failures = per_node.dial_failures.load(Ordering::Acquire);
        let mut last_failure = per_node.dial.lock().await;
        if let Some(c) = self.open_connection(node) {
            return Ok(c);
        }
        // A dial failed while this one waited: it fails the same way at
        // once (a down node costs the requests waiting for it one
        // handshake timeout, not one each in turn).
        if per_node.dial_failures.load(Ordering::Acquire) != failures {
            if let Some(e) = last_failure.clone() {
                return Err(e);
            }
        }
        let addr = match self.node_addr(node) {
            Some(a) => a,
            None => {
                // A node that joined later: ask the others for it.
                let _ = Box::pin(self.refresh_nodes()).await;
                self.node_addr(node)
                    .ok_or(NodeCallError::UnknownNode(node))?
            }
        };
        let conn = crate::api::call::dial(
            &self.inner.endpoint,
            &self.inner.quic,
            node,
            addr,
            self.inner.opts.attempt_timeout,
        )
        .await
        .inspect_err(|e| {
            *last_failure = Some(e.clone());
            per_node.dial_failures.fetch_add(1, Ordering::AcqRel);
        })?;
        self.inner
            .conns
            .lock()
            .expect("conns poisoned")
            .insert(node, conn.clone());
        Ok(conn)
    }

    /// `node`'s connection, when one is open.
    fn open_connection(&self, node: NodeId) -> Option<quinn::Connection> {
        let conns = self.inner.conns.lock().expect("conns poisoned");
        conns
            .get(&node)
            .filter(|c| c.close_reason().is_none())
            .cloned()
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
        let conn = self.connection(node).await?;
        let per_node = self.per_node(node);
        let in_flight = InFlight::enter(&per_node.calls);
        // A request alone takes its own stream (the multiplexed one's
        // writer would add a task hop for nothing to share); one made while
        // others to the node are in flight takes the shared stream, where
        // requests that leave together share datagrams.
        if in_flight.others > 0 && crate::api::mux::multiplexed(req) {
            if let Some(mux) = self.mux(&per_node, node, &conn, timeout).await? {
                if let Some(frame) = mux.frame(req) {
                    let resp = mux.request(node, frame, timeout).await?;
                    self.inner.multiplexed.fetch_add(1, Ordering::Relaxed);
                    return crate::api::call::answered(node, resp);
                }
            }
        }
        crate::api::call::request(&conn, node, req, timeout).await
    }

    fn per_node(&self, node: NodeId) -> Arc<PerNode> {
        self.inner
            .per_node
            .lock()
            .expect("per_node poisoned")
            .entry(node)
            .or_default()
            .clone()
    }

    /// `node`'s multiplexed stream on `conn`, opened if it has none (or
    /// its last one ended); `None` when the node does not serve them.
    async fn mux(
        &self,
        per_node: &PerNode,
        node: NodeId,
        conn: &quinn::Connection,
        timeout: Duration,
    ) -> Result<Option<Arc<crate::api::mux::MuxStream>>, NodeCallError> {
        let mut slot = per_node.slot.lock().await;
        let current = slot.conn == Some(conn.stable_id());
        if current && slot.stream.as_ref().is_none_or(|s| !s.is_closed()) {
            return Ok(slot.stream.clone());
        }
        let stream = crate::api::mux::MuxStream::open(conn, node, timeout)
            .await?
            .map(Arc::new);
        slot.conn = Some(conn.stable_id());
        slot.stream = stream.clone();
        Ok(stream)
    }

    /// Asks nodes for their routes and learns them.
    pub(super) async fn refresh_routes(&self) -> Result<(), String> {
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
}

/// One request in flight to a node, counted while it lives.
struct InFlight<'a> {
    calls: &'a std::sync::atomic::AtomicUsize,
    /// Requests to the node in flight when this one started.
    others: usize,
}

impl<'a> InFlight<'a> {
    fn enter(calls: &'a std::sync::atomic::AtomicUsize) -> Self {
        let others = calls.fetch_add(1, Ordering::AcqRel);
        InFlight { calls, others }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.calls.fetch_sub(1, Ordering::AcqRel);
    }
}
