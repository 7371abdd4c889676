//! Nodes joining: learning a peer, admitting a new node, and a new node
//! announcing itself.

use super::*;

impl Node {
    /// Learns a node's address (a node joined), persisting it so restarts
    /// keep it.
    pub fn learn_peer(&self, p: PeerAddr) {
        if p.id == self.id {
            return;
        }
        self.transport.add_peer(p);
        if let Err(e) =
            crate::node::peers_file::save_current(&self.config.data_dir, || self.transport.peers())
        {
            tracing::warn!(error = %e, "could not persist the peer list");
        }
    }

    /// Announces `p` to every peer and learns it here; returns every node
    /// known here (this one included).
    pub(crate) async fn admit(&self, p: PeerAddr) -> Vec<PeerAddr> {
        self.learn_peer(p.clone());
        for peer in self.transport.peer_ids() {
            if peer == p.id {
                continue;
            }
            let _ = rpc::call(
                &self.transport,
                peer,
                meta::META_SHARD,
                &PeerRequest::AddPeer {
                    id: p.id,
                    addr: p.addr,
                },
                Duration::from_secs(5),
            )
            .await;
        }
        let mut all = self.transport.peers();
        all.push(PeerAddr {
            id: self.id,
            addr: self.addr(),
        });
        all.sort_by_key(|p| p.id);
        all
    }
}

/// Announces this node to the cluster (a `Join` to the configured peers,
/// with this node's certificate, until one answers) and learns every node
/// the answer names. A node started with `tessera serve` pointing at an
/// existing cluster joins this way; for known nodes it is a no-op.
pub(crate) async fn announce(node: Weak<Node>, identity: crate::tls::TlsIdentity) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let (me, addr, peers) = {
            let Some(n) = node.upgrade() else { return };
            (n.id, n.addr(), n.transport.peers())
        };
        if let (Ok(endpoint), Ok(cfg)) = (
            crate::api::call::endpoint(),
            crate::api::call::quic_config(&identity),
        ) {
            let req = crate::api::Request::Join { node: me, addr };
            for p in &peers {
                let timeout = Duration::from_secs(5);
                let Ok(conn) = crate::api::call::dial(&endpoint, &cfg, p.id, p.addr, timeout).await
                else {
                    continue;
                };
                let answer = crate::api::call::request(&conn, p.id, &req, timeout).await;
                conn.close(0u32.into(), b"joined");
                if let Ok(crate::api::Response::Peers(all)) = answer {
                    let Some(n) = node.upgrade() else { return };
                    for (id, addr) in all {
                        n.learn_peer(PeerAddr { id, addr });
                    }
                    tracing::info!(node = %me, via = %p.id, "announced to the cluster");
                    return;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
