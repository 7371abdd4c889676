//! The transport's settings and the peer list entries.

use crate::limits::FRAME_BYTES_MAX;
use crate::NodeId;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// A transport setting out of its range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transport.{field}: {reason}")]
pub struct InvalidField {
    /// The field.
    pub field: &'static str,
    /// What is wrong with its value.
    pub reason: String,
}

/// Transport settings of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportConfig {
    /// Outbound messages queued per peer before senders wait. Default: 8192.
    pub peer_queue_max: usize,
    /// Message bytes per frame (a single larger message goes alone, up to the
    /// 16 MiB frame limit). Default: 4 MiB.
    pub frame_bytes_max: usize,
    /// Messages per frame. Default: 4096.
    pub frame_msgs_max: usize,
    /// Longest a heartbeat waits for other messages to share its frame.
    /// Must stay well below the heartbeat interval. Default: 50 ms.
    pub heartbeat_linger_ms: u64,
    /// Longest a heartbeat's reply waits for company. Default: 2 ms.
    pub reply_linger_ms: u64,
    /// Inbound requests per connection being handled at once. Default: 8192.
    pub inbound_in_flight_max: usize,
    /// Concurrent inbound snapshot transfers per node. Default: 4.
    pub snapshot_transfers_max: usize,
    /// Concurrent outbound snapshot transfers per node (more wait their
    /// turn). Default: 4.
    pub snapshot_sends_max: usize,
    /// Outbound snapshot bytes per second, per transfer (0: unlimited), so
    /// a move does not starve the node's Raft traffic. Default: 64 MiB/s.
    pub snapshot_send_bytes_per_sec: u64,
    /// Client connections served at once; more are refused. Default: 4096.
    pub client_connections_max: usize,
    /// Bytes per snapshot chunk on the wire. Default: 1 MiB.
    pub snapshot_chunk_bytes: usize,
    /// Dial timeout. Default: 2000 ms.
    pub connect_timeout_ms: u64,
    /// First reconnect backoff, doubled up to the maximum. Default: 50 ms.
    pub reconnect_backoff_ms_min: u64,
    /// Largest reconnect backoff. Default: 2000 ms.
    pub reconnect_backoff_ms_max: u64,
    /// A connection silent this long is dead. Default: 3000 ms.
    pub idle_timeout_ms: u64,
    /// Keep-alive interval on quiet connections. Default: 500 ms.
    pub keep_alive_ms: u64,
    /// Time a new connection has to send its first Hello. Default: 2000 ms.
    pub hello_timeout_ms: u64,
    /// How many ack-eliciting packets this node asks each peer, node or
    /// client, to receive before it must acknowledge them (QUIC's ACK
    /// frequency extension; the peer still acknowledges within its
    /// `max_ack_delay`, 25 ms, and at once when packets arrive out of
    /// order). 1 is QUIC's own rule, an acknowledgement for every other
    /// packet, and sends no ACK_FREQUENCY frame. Above 1, fewer
    /// acknowledgements are fewer datagrams (with 64 clients sharing one
    /// connection set, 1.14 UDP datagrams per write became 0.93 at 32),
    /// but a sender whose congestion window is below the threshold waits
    /// for the peer's 25 ms timer on every round trip (at 32, test clusters
    /// of 256 and 1,000 openraft groups on two cores stalled past their
    /// 60 s waits). Only for links that never run window-limited. Within
    /// 1..=1024.
    /// Default: 1.
    pub ack_eliciting_threshold: u32,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            peer_queue_max: 8192,
            frame_bytes_max: 4 << 20,
            frame_msgs_max: 4096,
            heartbeat_linger_ms: 50,
            reply_linger_ms: 2,
            inbound_in_flight_max: 8192,
            snapshot_transfers_max: 4,
            snapshot_sends_max: 4,
            snapshot_send_bytes_per_sec: 64 << 20,
            client_connections_max: 4096,
            snapshot_chunk_bytes: 1 << 20,
            connect_timeout_ms: 2000,
            reconnect_backoff_ms_min: 50,
            reconnect_backoff_ms_max: 2000,
            idle_timeout_ms: 3000,
            keep_alive_ms: 500,
            hello_timeout_ms: 2000,
            ack_eliciting_threshold: 1,
        }
    }
}

impl TransportConfig {
    /// Checks every field; the error names the field.
    ///
    /// # Errors
    /// [`InvalidField`]: the first field out of its range.
    pub fn validate(&self) -> Result<(), InvalidField> {
        let pos = |f: &'static str, v: u64| {
            if v == 0 {
                Err((f, "must be at least 1".to_string()))
            } else {
                Ok(())
            }
        };
        self.check(pos)
            .map_err(|(field, reason)| InvalidField { field, reason })
    }

    fn check(
        &self,
        pos: impl Fn(&'static str, u64) -> Result<(), (&'static str, String)>,
    ) -> Result<(), (&'static str, String)> {
        pos("peer_queue_max", self.peer_queue_max as u64)?;
        pos("frame_msgs_max", self.frame_msgs_max as u64)?;
        pos("inbound_in_flight_max", self.inbound_in_flight_max as u64)?;
        pos("snapshot_transfers_max", self.snapshot_transfers_max as u64)?;
        pos("snapshot_sends_max", self.snapshot_sends_max as u64)?;
        pos("client_connections_max", self.client_connections_max as u64)?;
        pos("connect_timeout_ms", self.connect_timeout_ms)?;
        pos("reconnect_backoff_ms_min", self.reconnect_backoff_ms_min)?;
        pos("idle_timeout_ms", self.idle_timeout_ms)?;
        pos("keep_alive_ms", self.keep_alive_ms)?;
        pos("hello_timeout_ms", self.hello_timeout_ms)?;
        if self.frame_bytes_max < 4096 || self.frame_bytes_max > FRAME_BYTES_MAX / 2 {
            return Err((
                "frame_bytes_max",
                format!("must be within 4096..={}", FRAME_BYTES_MAX / 2),
            ));
        }
        if self.snapshot_chunk_bytes < 4096 || self.snapshot_chunk_bytes > FRAME_BYTES_MAX / 2 {
            return Err((
                "snapshot_chunk_bytes",
                format!("must be within 4096..={}", FRAME_BYTES_MAX / 2),
            ));
        }
        if self.reconnect_backoff_ms_max < self.reconnect_backoff_ms_min {
            return Err((
                "reconnect_backoff_ms_max",
                "must be at least reconnect_backoff_ms_min".into(),
            ));
        }
        if !(1..=1024).contains(&self.ack_eliciting_threshold) {
            return Err(("ack_eliciting_threshold", "must be within 1..=1024".into()));
        }
        if self.keep_alive_ms >= self.idle_timeout_ms {
            return Err(("keep_alive_ms", "must be below idle_timeout_ms".into()));
        }
        Ok(())
    }
}

/// A peer this node talks to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAddr {
    /// The peer's node id.
    pub id: NodeId,
    /// Its QUIC address.
    pub addr: SocketAddr,
}
