//! Node metrics: counters kept by the transport and the storage engine,
//! rendered as Prometheus text and served over plain HTTP (`GET /metrics`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Transport counters of one node.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Raft messages sent (requests and replies).
    pub messages_sent: AtomicU64,
    /// Batch frames sent (requests and replies).
    pub frames_sent: AtomicU64,
    /// Raft messages received.
    pub messages_received: AtomicU64,
    /// Batch frames received.
    pub frames_received: AtomicU64,
    /// Frames or messages refused as malformed.
    pub bad_frames: AtomicU64,
    /// Connections refused (handshake, ALPN, Hello or identity).
    pub connections_refused: AtomicU64,
    /// Peer connections established (dialed or accepted).
    pub connections_established: AtomicU64,
    /// Snapshots streamed to peers.
    pub snapshots_sent: AtomicU64,
    /// Snapshots received and handed to their group.
    pub snapshots_received: AtomicU64,
    /// Snapshot bytes streamed out.
    pub snapshot_bytes_sent: AtomicU64,
    /// Snapshot bytes received.
    pub snapshot_bytes_received: AtomicU64,
    /// Client connections accepted.
    pub client_connections: AtomicU64,
    /// Multiplexed client streams opened ([`crate::api::mux`]).
    pub client_mux_streams: AtomicU64,
    /// Client requests served on multiplexed streams.
    pub client_mux_requests: AtomicU64,
}

/// A point-in-time copy of every node metric.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// See [`NetMetrics::messages_sent`].
    pub messages_sent: u64,
    /// See [`NetMetrics::frames_sent`].
    pub frames_sent: u64,
    /// See [`NetMetrics::messages_received`].
    pub messages_received: u64,
    /// See [`NetMetrics::frames_received`].
    pub frames_received: u64,
    /// See [`NetMetrics::bad_frames`].
    pub bad_frames: u64,
    /// See [`NetMetrics::connections_refused`].
    pub connections_refused: u64,
    /// See [`NetMetrics::connections_established`].
    pub connections_established: u64,
    /// See [`NetMetrics::snapshots_sent`].
    pub snapshots_sent: u64,
    /// See [`NetMetrics::snapshots_received`].
    pub snapshots_received: u64,
    /// See [`NetMetrics::client_connections`].
    pub client_connections: u64,
    /// See [`NetMetrics::client_mux_streams`].
    pub client_mux_streams: u64,
    /// See [`NetMetrics::client_mux_requests`].
    pub client_mux_requests: u64,
    /// WAL syncs of the node's log writer.
    pub syncs: u64,
    /// Log append requests written (one per openraft `append`, any number
    /// of entries).
    pub log_appends: u64,
    /// Log entries appended.
    pub log_entries: u64,
    /// Client commands applied by the node's state machines.
    pub commands_applied: u64,
    /// State machine writes (one `WriteBatch` each; several shards'
    /// entries can share one).
    pub apply_writes: u64,
    /// Shard replicas hosted.
    pub shards_hosted: u64,
    /// Shards this node currently leads.
    pub shards_led: u64,
    /// 1 when this node leads the meta shard.
    pub meta_leader: u64,
    /// Replicas destroyed by replica GC (removed from their shard).
    pub replicas_destroyed: u64,
    /// Empty replicas created by replica repair (a split or move missed).
    pub replicas_repaired: u64,
    /// Replicas replica repair did not create because a batch-system
    /// replica here overlaps them (a split this node has not applied yet,
    /// whose child it creates itself when it does).
    pub repairs_deferred: u64,
    /// Tombstones of removed replicas held by this node.
    pub tombstones: u64,
    /// Replicas asleep (quiescent) right now.
    pub groups_quiescent: u64,
    /// Times a replica went to sleep.
    pub hibernations: u64,
    /// Sleeping replicas whose openraft instance is dropped right now.
    pub groups_dormant: u64,
    /// Times a sleeping replica's instance was dropped.
    pub dormancies: u64,
    /// Times a dormant replica was rebuilt.
    pub revivals: u64,
    /// Wake-ups of sleeping replicas, by cause (label, count).
    pub wakes: Vec<(&'static str, u64)>,
    /// Elections seen: term increases of hosted groups.
    pub elections: u64,
    /// Frames the batch system's Raft loop sent to peers (each one
    /// transport request carrying many groups' messages).
    pub batch_frames: u64,
    /// Raft messages in those frames.
    pub batch_messages: u64,
    /// Log compactions of the batch system's groups written here.
    pub batch_log_compactions: u64,
    /// The batch system's replicas asleep here right now (quiescence).
    pub batch_groups_asleep: u64,
    /// Times one of the batch system's sleeping replicas woke here.
    pub batch_group_wakes: u64,
    /// Log entries of the batch system's groups held here right now (each
    /// group's log from its compaction point to its last entry).
    pub batch_log_entries: u64,
    /// Snapshots installed here as seeds of batch-system replicas (a
    /// move's target, or a replica behind its leader's compacted log).
    pub batch_seeds_installed: u64,
}

impl NetMetrics {
    /// Counts one batch frame of `messages` sent.
    pub fn frame_sent(&self, messages: usize) {
        self.frames_sent.fetch_add(1, Ordering::Relaxed);
        self.messages_sent
            .fetch_add(messages as u64, Ordering::Relaxed);
    }

    /// Counts one batch frame of `messages` received.
    pub fn frame_received(&self, messages: usize) {
        self.frames_received.fetch_add(1, Ordering::Relaxed);
        self.messages_received
            .fetch_add(messages as u64, Ordering::Relaxed);
    }

    /// Fills the transport part of a snapshot.
    pub fn fill(&self, s: &mut MetricsSnapshot) {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        s.messages_sent = g(&self.messages_sent);
        s.frames_sent = g(&self.frames_sent);
        s.messages_received = g(&self.messages_received);
        s.frames_received = g(&self.frames_received);
        s.bad_frames = g(&self.bad_frames);
        s.connections_refused = g(&self.connections_refused);
        s.connections_established = g(&self.connections_established);
        s.snapshots_sent = g(&self.snapshots_sent);
        s.snapshots_received = g(&self.snapshots_received);
        s.client_connections = g(&self.client_connections);
        s.client_mux_streams = g(&self.client_mux_streams);
        s.client_mux_requests = g(&self.client_mux_requests);
    }
}

impl MetricsSnapshot {
    /// Prometheus text exposition, every metric labelled with the node id.
    pub fn to_prometheus(&self, node: crate::NodeId) -> String {
        let rows: [(&str, &str, &str, u64); 37] = [
            (
                "tessera_log_appends_total",
                "counter",
                "Raft log appends written by the node-wide log writer",
                self.log_appends,
            ),
            (
                "tessera_log_entries_total",
                "counter",
                "Raft log entries appended",
                self.log_entries,
            ),
            (
                "tessera_raft_messages_sent_total",
                "counter",
                "Raft messages sent to peers (requests and replies)",
                self.messages_sent,
            ),
            (
                "tessera_raft_frames_sent_total",
                "counter",
                "Batch frames sent to peers; messages per frame = messages / frames",
                self.frames_sent,
            ),
            (
                "tessera_batch_frames_total",
                "counter",
                "Frames the batch system's Raft loop sent to peers (one transport request each)",
                self.batch_frames,
            ),
            (
                "tessera_batch_messages_total",
                "counter",
                "Raft messages in the batch system's frames; per frame = messages / frames",
                self.batch_messages,
            ),
            (
                "tessera_batch_log_compactions_total",
                "counter",
                "Log compactions of the batch system's groups written on this node",
                self.batch_log_compactions,
            ),
            (
                "tessera_batch_groups_asleep",
                "gauge",
                "The batch system's replicas asleep on this node (quiescence: they do not tick)",
                self.batch_groups_asleep,
            ),
            (
                "tessera_batch_group_wakes_total",
                "counter",
                "Times one of the batch system's sleeping replicas woke on this node",
                self.batch_group_wakes,
            ),
            (
                "tessera_batch_log_entries",
                "gauge",
                "Log entries the batch system's groups hold on this node",
                self.batch_log_entries,
            ),
            (
                "tessera_batch_seeds_installed_total",
                "counter",
                "Snapshots installed as seeds of batch-system replicas here (a move's target, or a replica behind the compacted log)",
                self.batch_seeds_installed,
            ),
            (
                "tessera_raft_messages_received_total",
                "counter",
                "Raft messages received from peers",
                self.messages_received,
            ),
            (
                "tessera_raft_frames_received_total",
                "counter",
                "Batch frames received from peers",
                self.frames_received,
            ),
            (
                "tessera_bad_frames_total",
                "counter",
                "Malformed frames or messages refused",
                self.bad_frames,
            ),
            (
                "tessera_connections_refused_total",
                "counter",
                "Connections refused (TLS, ALPN, hello, identity)",
                self.connections_refused,
            ),
            (
                "tessera_connections_established_total",
                "counter",
                "Peer connections established",
                self.connections_established,
            ),
            (
                "tessera_snapshots_sent_total",
                "counter",
                "Snapshots streamed to peers",
                self.snapshots_sent,
            ),
            (
                "tessera_snapshots_received_total",
                "counter",
                "Snapshots received from peers",
                self.snapshots_received,
            ),
            (
                "tessera_client_connections_total",
                "counter",
                "Client connections accepted",
                self.client_connections,
            ),
            (
                "tessera_client_mux_streams_total",
                "counter",
                "Multiplexed client request streams opened",
                self.client_mux_streams,
            ),
            (
                "tessera_client_mux_requests_total",
                "counter",
                "Client requests served on multiplexed streams",
                self.client_mux_requests,
            ),
            (
                "tessera_storage_syncs_total",
                "counter",
                "WAL syncs of the node-wide log writer",
                self.syncs,
            ),
            (
                "tessera_commands_applied_total",
                "counter",
                "Client commands applied by state machines",
                self.commands_applied,
            ),
            (
                "tessera_apply_writes_total",
                "counter",
                "State machine writes (one batch each; shards on the batch Raft system share one per round)",
                self.apply_writes,
            ),
            (
                "tessera_shards_hosted",
                "gauge",
                "Shard replicas hosted by this node",
                self.shards_hosted,
            ),
            (
                "tessera_shards_led",
                "gauge",
                "Shards this node leads",
                self.shards_led,
            ),
            (
                "tessera_meta_leader",
                "gauge",
                "1 when this node leads the meta shard",
                self.meta_leader,
            ),
            (
                "tessera_replicas_destroyed_total",
                "counter",
                "Replicas destroyed by replica GC (no longer members of their shard)",
                self.replicas_destroyed,
            ),
            (
                "tessera_replicas_repaired_total",
                "counter",
                "Replicas created by replica repair (a split or move this node missed)",
                self.replicas_repaired,
            ),
            (
                "tessera_replica_repairs_deferred_total",
                "counter",
                "Replicas repair did not create: a batch-system replica here overlaps them (a split not applied yet)",
                self.repairs_deferred,
            ),
            (
                "tessera_tombstones",
                "gauge",
                "Tombstones of removed replicas on this node",
                self.tombstones,
            ),
            (
                "tessera_groups_quiescent",
                "gauge",
                "Replicas asleep: no ticks, no heartbeats, no election timer",
                self.groups_quiescent,
            ),
            (
                "tessera_hibernations_total",
                "counter",
                "Times a replica on this node went to sleep",
                self.hibernations,
            ),
            (
                "tessera_groups_dormant",
                "gauge",
                "Sleeping replicas whose openraft instance is dropped until something needs it",
                self.groups_dormant,
            ),
            (
                "tessera_dormancies_total",
                "counter",
                "Times a sleeping replica on this node dropped its openraft instance",
                self.dormancies,
            ),
            (
                "tessera_revivals_total",
                "counter",
                "Times a dormant replica on this node was rebuilt from storage",
                self.revivals,
            ),
            (
                "tessera_elections_total",
                "counter",
                "Elections seen on this node (term increases of hosted groups)",
                self.elections,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, v) in rows {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name}{{node=\"{}\"}} {v}", node.0);
        }
        let _ = writeln!(
            out,
            "# HELP tessera_wakes_total Sleeping replicas woken, by cause"
        );
        let _ = writeln!(out, "# TYPE tessera_wakes_total counter");
        for (cause, v) in &self.wakes {
            let _ = writeln!(
                out,
                "tessera_wakes_total{{node=\"{}\",cause=\"{cause}\"}} {v}",
                node.0
            );
        }
        // The process, not the node: nodes sharing one process (`tessera
        // dev`) report the same figures; the pid tells them apart.
        if let Some(cpu) = process_cpu_seconds() {
            let _ = writeln!(
                out,
                "# HELP process_cpu_seconds_total User and system CPU time of the process"
            );
            let _ = writeln!(out, "# TYPE process_cpu_seconds_total counter");
            let _ = writeln!(out, "process_cpu_seconds_total {cpu:.2}");
        }
        let _ = writeln!(out, "# HELP tessera_process_id The serving process's id");
        let _ = writeln!(out, "# TYPE tessera_process_id gauge");
        let _ = writeln!(out, "tessera_process_id {}", std::process::id());
        out
    }
}

/// CPU seconds (user + system) this process used, from `/proc/self/stat`
/// (clock ticks of USER_HZ, 100 on Linux). `None` elsewhere.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces, in parentheses).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 here.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// The first sample's value text of metric `name`.
fn sample<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next())
}

/// Reads one metric's value as a float (first sample of `name`).
pub fn parse_metric_f64(text: &str, name: &str) -> Option<f64> {
    sample(text, name)?.parse().ok()
}

/// Reads one metric's value from Prometheus text (first sample of `name`).
pub fn parse_metric(text: &str, name: &str) -> Option<u64> {
    sample(text, name)?.parse().ok()
}

/// Serves `GET /metrics` on `addr` with whatever `render` returns; other
/// paths get 404. Requests are read up to 8 KiB; one connection at a time
/// per task, at most 64 at once.
///
/// # Errors
/// The bind error.
pub async fn serve_http(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let permits = Arc::new(tokio::sync::Semaphore::new(64));
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let render = render.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                    while n < buf.len() {
                        match sock.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => n += k,
                        }
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                })
                .await;
                if read.is_err() {
                    return;
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let ok = head.starts_with("GET /metrics ") || head.starts_with("GET / ");
                let (status, body) = if ok {
                    ("200 OK", render())
                } else {
                    ("404 Not Found", "not found\n".to_string())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok((local, task))
}

/// Fetches `http://addr/metrics` (a tiny client for tools and tests).
///
/// # Errors
/// Connection or protocol errors as `std::io::Error`.
pub async fn fetch(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: tessera\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    s.take(16 << 20).read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => Err(std::io::Error::other("bad metrics response")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_parses_back() {
        let s = MetricsSnapshot {
            frames_sent: 7,
            shards_led: 3,
            ..Default::default()
        };
        let text = s.to_prometheus(crate::NodeId(2));
        assert_eq!(
            parse_metric(&text, "tessera_raft_frames_sent_total"),
            Some(7)
        );
        assert_eq!(parse_metric(&text, "tessera_shards_led"), Some(3));
        assert_eq!(parse_metric(&text, "tessera_shards"), None);
        assert_eq!(
            parse_metric(&text, "tessera_process_id"),
            Some(u64::from(std::process::id()))
        );
        let cpu = parse_metric_f64(&text, "process_cpu_seconds_total").expect("on Linux");
        assert!(cpu >= 0.0);
    }
}
