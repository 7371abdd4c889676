//! One request over the client protocol, below the client library: a QUIC
//! endpoint and configuration for the client ALPN, dialing a node, and one
//! request/answer exchange on a stream of its own. [`crate::Client`] builds
//! on it; so does a node announcing itself to the cluster (a join), which
//! needs no routing or retries.

use super::{Request, Response};
use crate::limits::FRAME_BYTES_MAX;
use crate::tls::{self, TlsError, TlsIdentity};
use crate::{wire, NodeId};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Why one request to one node got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeCallError {
    /// The node is in no list this client knows (nor in the answers of the
    /// nodes it asked).
    #[error("{0} is not a known node")]
    UnknownNode(NodeId),
    /// No connection could be made.
    #[error("connect to {node}: {reason}")]
    Connect {
        /// The node.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// The node did not answer within the attempt's timeout.
    #[error("{node} did not answer within {after:?}")]
    Timeout {
        /// The node.
        node: NodeId,
        /// The timeout.
        after: Duration,
    },
    /// The request or its answer was lost on the way, or did not decode.
    #[error("{node}: {reason}")]
    Stream {
        /// The node.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// The node answered something this request cannot produce.
    #[error("{node} answered unexpectedly: {answer}")]
    Unexpected {
        /// The node.
        node: NodeId,
        /// The answer.
        answer: String,
    },
    /// No node answered (the last one's error).
    #[error("no node answered (last: {0})")]
    NoneAnswered(Box<NodeCallError>),
}

/// The QUIC client configuration for the client protocol with `identity`'s
/// certificate.
///
/// # Errors
/// [`TlsError`] when the identity is unusable.
pub fn quic_config(identity: &TlsIdentity) -> Result<quinn::ClientConfig, TlsError> {
    let mut tc = quinn::TransportConfig::default();
    tc.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(10)).expect("fits"),
    ));
    tc.keep_alive_interval(Some(Duration::from_secs(2)));
    identity.client_config(tls::CLIENT_ALPN, Arc::new(tc))
}

/// A client endpoint on an ephemeral port (IPv6 when the host has it).
///
/// # Errors
/// The socket error.
pub fn endpoint() -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::client((std::net::Ipv6Addr::UNSPECIFIED, 0).into())
        .or_else(|_| quinn::Endpoint::client((std::net::Ipv4Addr::UNSPECIFIED, 0).into()))
}

/// Connects to `node` at `addr` (its certificate must name it) within
/// `timeout`.
///
/// # Errors
/// [`NodeCallError::Connect`].
pub async fn dial(
    endpoint: &quinn::Endpoint,
    cfg: &quinn::ClientConfig,
    node: NodeId,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<quinn::Connection, NodeCallError> {
    let connect = |reason: String| NodeCallError::Connect { node, reason };
    let connecting = endpoint
        .connect_with(cfg.clone(), addr, &tls::node_server_name(node))
        .map_err(|e| connect(e.to_string()))?;
    tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| connect("timed out".into()))?
        .map_err(|e| connect(e.to_string()))
}

/// Takes the end of `recv` (one frame per stream, already read) if it
/// has arrived, without waiting; returns whether it had. A stream dropped
/// before its end was read makes quinn send the peer a STOP_SENDING
/// frame: measured at one extra frame each way per request (and the
/// packets and acknowledgements it costs) before the end was taken. An end
/// not there yet (or more data, which the protocol never sends) is left to
/// that stop.
pub(crate) fn take_end(recv: &mut quinn::RecvStream) -> bool {
    use std::future::Future;
    let mut one = [0u8; 1];
    let read = std::pin::pin!(recv.read(&mut one));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    matches!(read.poll(&mut cx), std::task::Poll::Ready(Ok(None)))
}

/// What the client makes of `node`'s answer `resp` (however it came).
///
/// # Errors
/// Only with the `client::lose_write_reply` failpoint (tests: the reply of
/// a write that took effect is lost on its way back; the client sees a
/// transport error and retries).
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
pub(crate) fn answered(node: NodeId, resp: Response) -> Result<Response, NodeCallError> {
    fail::fail_point!(
        "client::lose_write_reply",
        matches!(resp, Response::Written(_)),
        |_| Err(NodeCallError::Stream {
            node,
            reason: "the reply was lost (injected)".into()
        })
    );
    Ok(resp)
}

/// Sends `req` to `node` on a new stream of `conn` and reads its answer,
/// within `timeout`.
///
/// # Errors
/// [`NodeCallError::Stream`] or [`NodeCallError::Timeout`].
pub async fn request(
    conn: &quinn::Connection,
    node: NodeId,
    req: &Request,
    timeout: Duration,
) -> Result<Response, NodeCallError> {
    let stream = |reason: String| NodeCallError::Stream { node, reason };
    let frame = wire::encode_frame(req, FRAME_BYTES_MAX).map_err(|e| stream(e.to_string()))?;
    let work = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| stream(e.to_string()))?;
        send.write_all(&frame)
            .await
            .map_err(|e| stream(e.to_string()))?;
        let _ = send.finish();
        let payload = wire::read_frame(&mut recv, FRAME_BYTES_MAX)
            .await
            .map_err(|e| stream(e.to_string()))?
            .ok_or_else(|| stream("no answer".into()))?;
        take_end(&mut recv);
        let resp = wire::decode_payload::<Response>(&payload).map_err(|e| stream(e.to_string()))?;
        answered(node, resp)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| NodeCallError::Timeout {
            node,
            after: timeout,
        })?
}
