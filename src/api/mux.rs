//! Many requests on one long-lived stream of a client connection.
//!
//! A stream per request costs QUIC a stream's state, its opening and
//! closing frames, and at least one datagram each way per request: many
//! requests made at once by the tasks sharing a [`crate::Client`] still
//! leave one by one. A multiplexed stream carries them all:
//!
//! ```text
//! client: frame(Request::Mux)                 node: frame(Response::Done)
//! client: frame((id, Request)) ...            node: frame((id, Response)) ...
//! ```
//!
//! (frames as in [`crate::wire`]; `id` is the client's, answered in any
//! order). Each side's writer takes every frame queued when it runs and
//! writes them together, so requests (and answers) that became ready at
//! once share datagrams. A node that does not know `Request::Mux` answers
//! it with an error and the client keeps a stream per request.
//!
//! Bounded: the requests in flight on one stream ([`MUX_IN_FLIGHT_MAX`];
//! beyond it a node stops reading the stream, and QUIC's flow control
//! holds the client back), the bytes one write gathers
//! ([`MUX_WRITE_BYTES`]), and which requests take it ([`MUX_FRAME_MAX`]:
//! larger ones keep their own stream, so they never hold up small ones).

use super::call::NodeCallError;
use super::{Request, Response};
use crate::limits::FRAME_BYTES_MAX;
use crate::{wire, NodeId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Requests in flight on one multiplexed stream at most.
pub const MUX_IN_FLIGHT_MAX: usize = 1024;
/// Bytes one write of a multiplexed stream gathers at most (a single larger
/// frame still goes alone).
pub const MUX_WRITE_BYTES: usize = 64 << 10;
/// Encoded requests larger than this take a stream of their own.
pub const MUX_FRAME_MAX: usize = 16 << 10;

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

/// The client's end of one multiplexed stream.
pub struct MuxStream {
    tx: mpsc::Sender<Vec<u8>>,
    waiting: Waiting,
    next: AtomicU64,
    closed: Arc<AtomicBool>,
}

impl MuxStream {
    /// Opens a multiplexed stream on `conn` to `node` within `timeout`;
    /// `Ok(None)` when the node does not serve them.
    ///
    /// # Errors
    /// [`NodeCallError::Stream`] or [`NodeCallError::Timeout`].
    pub async fn open(
        conn: &quinn::Connection,
        node: NodeId,
        timeout: Duration,
    ) -> Result<Option<MuxStream>, NodeCallError> {
        let stream = |reason: String| NodeCallError::Stream { node, reason };
        let hello = wire::encode_frame(&Request::Mux, FRAME_BYTES_MAX).expect("a small frame");
        let work = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| stream(e.to_string()))?;
            send.write_all(&hello)
                .await
                .map_err(|e| stream(e.to_string()))?;
            let payload = wire::read_frame(&mut recv, FRAME_BYTES_MAX)
                .await
                .map_err(|e| stream(e.to_string()))?
                .ok_or_else(|| stream("no answer to the stream's opening".into()))?;
            Ok::<_, NodeCallError>((send, recv, payload))
        };
        let (send, recv, payload) =
            tokio::time::timeout(timeout, work)
                .await
                .map_err(|_| NodeCallError::Timeout {
                    node,
                    after: timeout,
                })??;
        match wire::decode_payload::<Response>(&payload) {
            Ok(Response::Done) => {}
            // An older node: no multiplexed streams there.
            _ => return Ok(None),
        }
        let (tx, rx) = mpsc::channel(MUX_IN_FLIGHT_MAX);
        let waiting: Waiting = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        tokio::spawn(write_loop(send, rx, Some(closed.clone())));
        tokio::spawn(read_answers(recv, waiting.clone(), closed.clone()));
        Ok(Some(MuxStream {
            tx,
            waiting,
            next: AtomicU64::new(1),
            closed,
        }))
    }

    /// Whether the stream ended (a new one is needed).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends `frame` (an encoded `(id, Request)`, from [`MuxStream::frame`])
    /// and waits for its answer within `timeout`.
    ///
    /// # Errors
    /// [`NodeCallError::Stream`] when the stream ended first,
    /// [`NodeCallError::Timeout`].
    pub async fn request(
        &self,
        node: NodeId,
        (id, frame): (u64, Vec<u8>),
        timeout: Duration,
    ) -> Result<Response, NodeCallError> {
        let lost = || NodeCallError::Stream {
            node,
            reason: "the connection's request stream ended".into(),
        };
        let (reply, answer) = oneshot::channel();
        self.waiting
            .lock()
            .expect("mux waiting poisoned")
            .insert(id, reply);
        // The reader marks the stream closed before it drops the waiting
        // requests: one registered after that sees the mark.
        if self.is_closed() {
            self.forget(id);
            return Err(lost());
        }
        let work = async {
            self.tx.send(frame).await.map_err(|_| lost())?;
            answer.await.map_err(|_| lost())
        };
        let r = tokio::time::timeout(timeout, work).await;
        if r.is_err() {
            self.forget(id);
        }
        r.map_err(|_| NodeCallError::Timeout {
            node,
            after: timeout,
        })?
    }

    /// `req` encoded for this stream with a fresh id; `None` when it is
    /// too large for it (it takes a stream of its own).
    pub fn frame(&self, req: &Request) -> Option<(u64, Vec<u8>)> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let frame = wire::encode_frame(&(id, req), MUX_FRAME_MAX).ok()?;
        Some((id, frame))
    }

    fn forget(&self, id: u64) {
        self.waiting
            .lock()
            .expect("mux waiting poisoned")
            .remove(&id);
    }
}

/// Whether `req` may travel on a multiplexed stream: the data requests
/// whose answers are small (scans, whose pages are large, and admin
/// requests keep a stream each).
pub fn multiplexed(req: &Request) -> bool {
    matches!(req, Request::Get { .. } | Request::Write { .. })
}

/// Writes what `rx` brings to `send`: every frame queued when it runs, in
/// one write (up to [`MUX_WRITE_BYTES`]). Ends when `rx` closes or the
/// stream fails; marks `closed` then.
pub(crate) async fn write_loop(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<Vec<u8>>,
    closed: Option<Arc<AtomicBool>>,
) {
    while let Some(mut buf) = rx.recv().await {
        // The tasks woken with the one that queued this frame (answers
        // that arrived together, a round's acknowledgements) queue theirs
        // before the write.
        tokio::task::yield_now().await;
        while buf.len() < MUX_WRITE_BYTES {
            match rx.try_recv() {
                Ok(f) => buf.extend_from_slice(&f),
                Err(_) => break,
            }
        }
        if send.write_all(&buf).await.is_err() {
            break;
        }
    }
    if let Some(c) = closed {
        c.store(true, Ordering::Release);
    }
    let _ = send.finish();
}

/// Hands each answer read from `recv` to its request; at the end of the
/// stream (or a bad frame) marks it closed and drops the requests still
/// waiting (they fail at once).
async fn read_answers(mut recv: quinn::RecvStream, waiting: Waiting, closed: Arc<AtomicBool>) {
    while let Ok(Some(payload)) = wire::read_frame(&mut recv, FRAME_BYTES_MAX).await {
        let Ok((id, resp)) = wire::decode_payload::<(u64, Response)>(&payload) else {
            break;
        };
        let reply = waiting.lock().expect("mux waiting poisoned").remove(&id);
        if let Some(reply) = reply {
            let _ = reply.send(resp);
        }
    }
    closed.store(true, Ordering::Release);
    waiting.lock().expect("mux waiting poisoned").clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Command;
    use crate::{Epoch, ShardId};

    #[test]
    fn only_small_data_requests_are_multiplexed() {
        let get = Request::Get {
            shard: ShardId(1),
            epoch: Epoch::default(),
            keys: vec![b"k".to_vec()],
        };
        assert!(multiplexed(&get));
        assert!(!multiplexed(&Request::Routes));
        assert!(!multiplexed(&Request::NodeStatus));
        let (tx, _rx) = mpsc::channel(1);
        let s = MuxStream {
            tx,
            waiting: Arc::default(),
            next: AtomicU64::new(7),
            closed: Arc::default(),
        };
        let (id, frame) = s.frame(&get).expect("small");
        assert_eq!(id, 7);
        let payload = &frame[4..];
        let (back_id, back) = wire::decode_payload::<(u64, Request)>(payload).unwrap();
        assert_eq!((back_id, &back), (7, &get));
        let big = Request::Write {
            shard: ShardId(1),
            epoch: Epoch::default(),
            ops: match Command::put("k", vec![0u8; MUX_FRAME_MAX]) {
                Command::Write { ops } => ops,
                _ => unreachable!(),
            },
            session: None,
        };
        assert!(
            s.frame(&big).is_none(),
            "a large write keeps its own stream"
        );
        assert_eq!(s.frame(&get).unwrap().0, 9, "ids keep rising");
    }
}
