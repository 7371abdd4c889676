//! The batch system over the node's QUIC transport: a round's frame for a
//! peer goes out as one one-way transport message (no reply: Raft's own
//! messages answer it), and an inbound frame is checked and handed to the
//! loop's mailbox.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::runtime::{Mailbox, Outbound};
use super::wire::{decode_frame, encode_frames};
use super::Envelope;
use crate::limits::FRAME_BYTES_MAX;
use crate::net::coalesce::Urgency;
use crate::net::{Answer, Inbound, Transport};
use crate::{NodeId, ShardId};
use tokio::sync::Semaphore;

/// The shard id a frame travels under in the transport's request head (it
/// carries many groups; each message names its own): `u64::MAX`, which no
/// shard may have, so a node's inbound can tell frames from the requests of
/// one shard.
pub const FRAME_SHARD: ShardId = ShardId(u64::MAX);

/// Frames at most this large (below the transport's own limit, which
/// also counts the request head).
pub const FRAME_BYTES: usize = FRAME_BYTES_MAX - 4096;

/// Sends each round's frames over the transport, from the loop's thread,
/// on a Tokio runtime's tasks (one per frame, each under `deadline`).
pub struct QuicOutbound {
    transport: Transport,
    runtime: tokio::runtime::Handle,
    deadline: Duration,
    counters: Arc<FrameCounters>,
    /// Frames in flight per peer, bounded.
    in_flight: HashMap<u64, Arc<Semaphore>>,
}

/// Frames on their way into one peer's link at most (its queue full, or the
/// peer not taking them); beyond it a round's frame is dropped (Raft
/// resends), so a slow peer cannot pile up tasks.
pub const FRAMES_IN_FLIGHT_MAX: usize = 64;

/// What a [`QuicOutbound`] sent.
#[derive(Debug, Default)]
pub struct FrameCounters {
    /// Frames made (each one transport request, or one of `dropped`).
    pub frames: AtomicU64,
    /// Raft messages in them.
    pub messages: AtomicU64,
    /// Frames dropped because [`FRAMES_IN_FLIGHT_MAX`] were on their way.
    pub dropped: AtomicU64,
}

impl QuicOutbound {
    /// Frames go through `transport` on `runtime`.
    pub fn new(transport: Transport, runtime: tokio::runtime::Handle, deadline: Duration) -> Self {
        QuicOutbound {
            transport,
            runtime,
            deadline,
            counters: Arc::default(),
            in_flight: HashMap::new(),
        }
    }

    /// Its counters (shared: they keep counting after the loop took it).
    pub fn counters(&self) -> Arc<FrameCounters> {
        self.counters.clone()
    }
}

impl Outbound for QuicOutbound {
    fn send(&mut self, to: u64, frame: Vec<Envelope>) {
        let frames = match encode_frames(&frame, FRAME_BYTES) {
            Ok(f) => f,
            Err(e) => {
                // Raft resends: a lost message is a delay, not a loss.
                tracing::warn!(error = %e, peer = to, "raft frame dropped");
                return;
            }
        };
        self.counters
            .messages
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        self.counters
            .frames
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        let permits = self
            .in_flight
            .entry(to)
            .or_insert_with(|| Arc::new(Semaphore::new(FRAMES_IN_FLIGHT_MAX)));
        for bytes in frames {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let t = self.transport.clone();
            let deadline = self.deadline;
            self.runtime.spawn(async move {
                let _permit = permit;
                if let Err(e) = t
                    .send(NodeId(to), FRAME_SHARD, bytes, Urgency::Urgent, deadline)
                    .await
                {
                    tracing::debug!(error = %e, peer = to, "raft frame not delivered");
                }
            });
        }
    }
}

/// Takes frames from peers into a loop's mailbox (set once the loop runs;
/// frames before that are dropped, as Raft tolerates).
#[derive(Default)]
pub struct FrameInbound {
    deliver: OnceLock<Deliver>,
}

type Deliver = Box<dyn Fn(Vec<Envelope>) -> bool + Send + Sync>;

impl FrameInbound {
    /// Where frames go from now on.
    pub fn attach<R: Send + 'static>(&self, mailbox: Mailbox<R>) {
        let _ = self.deliver.set(Box::new(move |f| mailbox.deliver(f)));
    }

    /// Checks a frame from `from` (the node its certificate names) and
    /// hands it on: messages that claim another sender are dropped.
    fn take(&self, from: NodeId, body: &[u8]) {
        let envs = match decode_frame(body) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, peer = %from, "bad raft frame dropped");
                return;
            }
        };
        let (ok, forged): (Vec<Envelope>, Vec<Envelope>) =
            envs.into_iter().partition(|e| e.msg.from == from.0);
        if !forged.is_empty() {
            tracing::warn!(peer = %from, count = forged.len(), "raft messages naming another sender dropped");
        }
        if let Some(deliver) = self.deliver.get() {
            deliver(ok);
        }
    }
}

impl Inbound for FrameInbound {
    fn request(&self, from: NodeId, _shard: ShardId, body: Vec<u8>) -> Answer {
        self.take(from, &body);
        Box::pin(async { Vec::new() })
    }

    fn snapshot_folder(&self, _shard: ShardId) -> Result<std::path::PathBuf, Vec<u8>> {
        // Logs are not compacted yet: no snapshots to receive.
        Err(Vec::new())
    }

    fn snapshot(
        &self,
        _from: NodeId,
        _shard: ShardId,
        _head: Vec<u8>,
        _file: std::path::PathBuf,
    ) -> Answer {
        Box::pin(async { Vec::new() })
    }
}
