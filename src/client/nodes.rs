//! The nodes a client talks to: their connections (one per node, dialed
//! on demand), one request to one node, and learning nodes and routes
//! from them.

use super::*;

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
        let conns = self.inner.conns.lock().await;
        let mut out: Vec<_> = conns.iter().map(|(n, c)| (*n, c.stats())).collect();
        out.sort_by_key(|(n, _)| *n);
        out
    }

    pub(super) async fn connection(
        &self,
        node: NodeId,
    ) -> Result<quinn::Connection, NodeCallError> {
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
        let conn = crate::api::call::dial(
            &self.inner.endpoint,
            &self.inner.quic,
            node,
            addr,
            self.inner.opts.attempt_timeout,
        )
        .await?;
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
        let conn = self.connection(node).await?;
        crate::api::call::request(&conn, node, req, timeout).await
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
