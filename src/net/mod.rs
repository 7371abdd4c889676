//! Node-to-node networking over QUIC.
//!
//! - [`transport`]: endpoint, one connection per node pair, per-peer
//!   coalescing queues, snapshot streams, inbound dispatch.
//! - [`coalesce`]: the pure batching rule (which messages share a frame).
//! - [`proto`]: the messages and batch framing on the streams.
//! - [`network`]: openraft's `RaftNetworkFactory` on top of the transport.
//! - [`fault`]: the test fault layer (blocked links, message loss).

pub mod coalesce;
pub mod fault;
pub mod network;
pub mod proto;
pub mod transport;

pub use fault::Faults;
pub use network::NetworkFactory;
pub use transport::{CallError, PeerAddr, Transport, TransportConfig, TransportError, Wiring};
