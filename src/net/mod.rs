//! Node-to-node networking over QUIC: a wing on the ground floor. It moves
//! opaque per-shard bodies with an urgency and snapshot files, and hands
//! what arrives to the node's [`Inbound`]; it imports neither the node, the
//! storage nor the Raft layer (which gives the bodies their meaning:
//! [`crate::raft::rpc`]).
//!
//! - [`transport`]: the endpoint, the peer table and calls.
//! - [`link`]: the outbound side of one peer link (connect, our Raft stream,
//!   coalesced frames, responses).
//! - [`accept`]: the inbound side (accepting, Hello checks, serving a peer's
//!   Raft stream, handing client connections on).
//! - [`snapshot`]: snapshot streams, sent in paced chunks, received into a
//!   file.
//! - [`config`]: settings and peer addresses.
//! - [`ports`]: free loopback ports for clusters on one machine.
//! - [`coalesce`]: the pure batching rule (which messages share a frame).
//! - [`proto`]: Hello, batch framing and message heads on the streams.
//! - [`fault`]: the test fault layer (blocked links, message loss).

pub mod accept;
pub mod coalesce;
pub mod config;
pub mod fault;
pub mod link;
pub mod ports;
pub mod proto;
pub mod snapshot;
pub mod transport;

pub use config::{InvalidField, PeerAddr, TransportConfig};
pub use fault::Faults;
pub use transport::{SendError, Transport, TransportError, Wiring};

use crate::{NodeId, ShardId};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A boxed future answering one inbound message.
pub type Answer = Pin<Box<dyn Future<Output = Vec<u8>> + Send + 'static>>;

/// What the node gives the transport for inbound traffic. Bodies are
/// opaque here; the node decodes them.
pub trait Inbound: Send + Sync + 'static {
    /// Answers one request `body` for `shard` from node `from` (the node
    /// its certificate names): the reply's body.
    fn request(&self, from: NodeId, shard: ShardId, body: Vec<u8>) -> Answer;
    /// Where to receive a snapshot of `shard` (a new file in a folder on
    /// the store's file system), or the reply refusing it at once.
    fn snapshot_folder(&self, shard: ShardId) -> Result<PathBuf, Vec<u8>>;
    /// A snapshot of `shard` from `from`, received whole into `file`, with
    /// its `head`: installs it; the reply's body. The transport removes the
    /// file afterwards (an install keeps its own link to it).
    fn snapshot(&self, from: NodeId, shard: ShardId, head: Vec<u8>, file: PathBuf) -> Answer;
}

/// Whether client requests are waiting on this node's groups: while any
/// is, every message goes out at once instead of lingering for company,
/// and what already lingers is sent now.
#[derive(Debug, Default)]
pub struct Expediter {
    waiting: AtomicUsize,
    flush: tokio::sync::Notify,
}

/// Held while a client request waits; see [`Expediter`].
pub struct Expedite<'a>(&'a AtomicUsize);

impl Drop for Expedite<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Expediter {
    /// Marks a client request as waiting until the guard drops, and flushes
    /// what lingers.
    pub fn expedite(&self) -> Expedite<'_> {
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        // Only the first waiter needs to wake the queues: while any request
        // waits, new messages go out urgent, and queues look at
        // `expedited` every time they wake.
        if before == 0 {
            self.flush.notify_waiters();
        }
        Expedite(&self.waiting)
    }

    /// Whether a client request is waiting.
    pub fn expedited(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    /// What coalescing queues listen to for an immediate flush.
    pub fn flush_signal(&self) -> &tokio::sync::Notify {
        &self.flush
    }
}

/// A client connection (client ALPN, handshake done) for the node to serve,
/// with the permit that counts it against `client_connections_max`.
pub struct ClientConn {
    /// The connection.
    pub conn: quinn::Connection,
    /// Dropped when the node is done with the connection.
    pub permit: tokio::sync::OwnedSemaphorePermit,
}
