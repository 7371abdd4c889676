//! Snapshot streams: one QUIC stream per transfer, the file sent in paced
//! chunks and received into a file before the node installs it.

use super::proto::{close, Hello, SnapshotFrame, StreamKind};
use super::transport::SendError;
use super::transport::{write_msg, Inner};
use super::Transport;
use crate::limits::FRAME_BYTES_MAX;
use crate::wire;
use crate::{NodeId, ShardId};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

impl Transport {
    /// Streams the snapshot `file` of `shard` with its `head` (opaque) to
    /// `to` on a stream of its own, and waits for the receiver's reply
    /// (opaque: sent once it has installed the file, or refused it).
    ///
    /// # Errors
    /// [`SendError`]; a broken stream leaves nothing installed on the peer.
    pub async fn send_snapshot(
        &self,
        to: NodeId,
        shard: ShardId,
        head: Vec<u8>,
        file: &Path,
        deadline: Duration,
    ) -> Result<Vec<u8>, SendError> {
        let unreachable = |reason: String| SendError::Unreachable { peer: to, reason };
        let stream_err = |reason: String| SendError::Stream { peer: to, reason };
        let peer = self
            .peer(to)
            .ok_or_else(|| unreachable("unknown peer".into()))?;
        if self.inner.faults.is_blocked(self.inner.me, to) {
            return Err(unreachable("link blocked by the fault layer".into()));
        }
        let conn = peer
            .connection()
            .ok_or_else(|| unreachable("not connected".into()))?;
        let chunk = self.inner.cfg.snapshot_chunk_bytes;
        let rate = self.inner.cfg.snapshot_send_bytes_per_sec;
        let me = self.inner.me;
        let metrics = self.inner.metrics.clone();
        let sends = self.inner.snapshot_sends.clone();
        let work = async move {
            let _permit = sends
                .acquire_owned()
                .await
                .map_err(|_| unreachable("transport closed".into()))?;
            let started = tokio::time::Instant::now();
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let hello = Hello {
                from: me,
                to,
                kind: StreamKind::Snapshot,
            };
            write_msg(&mut send, &hello)
                .await
                .map_err(|e| stream_err(e.to_string()))?;
            write_msg(&mut send, &SnapshotFrame::Head { shard, head })
                .await
                .map_err(|e| stream_err(e.to_string()))?;
            let mut file = tokio::fs::File::open(file)
                .await
                .map_err(|e| stream_err(format!("open {}: {e}", file.display())))?;
            let mut sent = 0u64;
            loop {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; chunk];
                let mut filled = 0;
                while filled < chunk {
                    let n = file
                        .read(&mut buf[filled..])
                        .await
                        .map_err(|e| stream_err(format!("read snapshot: {e}")))?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    break;
                }
                buf.truncate(filled);
                sent += filled as u64;
                if rate > 0 {
                    // Pace to the configured rate.
                    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                    tokio::time::sleep_until(started + due).await;
                }
                write_msg(&mut send, &SnapshotFrame::Chunk(buf))
                    .await
                    .map_err(|e| stream_err(e.to_string()))?;
                metrics
                    .snapshot_bytes_sent
                    .fetch_add(filled as u64, Ordering::Relaxed);
            }
            write_msg(&mut send, &SnapshotFrame::End { bytes: sent })
                .await
                .map_err(|e| stream_err(e.to_string()))?;
            send.finish().map_err(|e| stream_err(e.to_string()))?;
            let reply = wire::read_frame(&mut recv, 64 * 1024)
                .await
                .map_err(|e| stream_err(e.to_string()))?
                .ok_or_else(|| stream_err("no reply".into()))?;
            wire::decode_payload::<Vec<u8>>(&reply).map_err(|e| stream_err(e.to_string()))
        };
        let r = tokio::time::timeout(deadline, work)
            .await
            .unwrap_or(Err(SendError::Timeout {
                peer: to,
                after: deadline,
            }));
        if r.is_ok() {
            self.inner
                .metrics
                .snapshots_sent
                .fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

/// Receives one snapshot into a file of the folder the node names, then
/// hands it to the node, and sends the node's reply back.
pub(super) async fn serve_snapshot(
    inner: Arc<Inner>,
    from: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let Ok(_permit) = inner.snapshot_permits.clone().acquire_owned().await else {
        return;
    };
    let reply = match receive_snapshot(&inner, from, &mut recv).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(me = %inner.me, peer = %from, error = %e, "snapshot transfer failed");
            let _ = recv.stop(close::PROTOCOL.into());
            return;
        }
    };
    if let Ok(frame) = wire::encode_frame(&reply, 64 * 1024) {
        let _ = send.write_all(&frame).await;
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}

async fn receive_snapshot(
    inner: &Inner,
    from: NodeId,
    recv: &mut quinn::RecvStream,
) -> Result<Vec<u8>, String> {
    let head = wire::read_frame(recv, 1 << 20)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("stream ended before the head")?;
    let SnapshotFrame::Head { shard, head } =
        wire::decode_payload(&head).map_err(|e| e.to_string())?
    else {
        return Err("snapshot stream must start with a head".into());
    };
    let dir = match inner.inbound.snapshot_folder(shard) {
        Ok(dir) => dir,
        Err(refusal) => return Ok(refusal),
    };
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| format!("create {}: {e}", dir.display()))?;
    let seq = inner.snapshot_seq.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!(
        "receiving-{}-{}-{seq}.snap",
        from.0,
        std::process::id()
    ));
    let result = async {
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| format!("create {}: {e}", path.display()))?;
        let mut got = 0u64;
        loop {
            let frame = wire::read_frame(recv, FRAME_BYTES_MAX)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("stream ended inside the snapshot")?;
            match wire::decode_payload::<SnapshotFrame>(&frame).map_err(|e| e.to_string())? {
                SnapshotFrame::Chunk(bytes) => {
                    // Tests slow transfers down here to interrupt one.
                    if let Some(ms) = fail::eval("snapshot::receive_chunk", |arg| {
                        arg.and_then(|a| a.parse::<u64>().ok()).unwrap_or(100)
                    }) {
                        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                    }
                    got += bytes.len() as u64;
                    file.write_all(&bytes)
                        .await
                        .map_err(|e| format!("write snapshot: {e}"))?;
                }
                SnapshotFrame::End { bytes } => {
                    if bytes != got {
                        return Err(format!("snapshot of {bytes} bytes arrived with {got}"));
                    }
                    break;
                }
                SnapshotFrame::Head { .. } => return Err("second head in one stream".into()),
            }
        }
        file.sync_all()
            .await
            .map_err(|e| format!("sync snapshot: {e}"))?;
        drop(file);
        inner
            .metrics
            .snapshot_bytes_received
            .fetch_add(got, Ordering::Relaxed);
        Ok(inner
            .inbound
            .snapshot(from, shard, head, path.clone())
            .await)
    }
    .await;
    // Installed files were linked under their own name; this one is spare.
    let _ = tokio::fs::remove_file(&path).await;
    if result.is_ok() {
        inner
            .metrics
            .snapshots_received
            .fetch_add(1, Ordering::Relaxed);
    }
    result
}
