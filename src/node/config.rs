//! A node's TOML configuration, validated once; errors name the field.
//!
//! ```toml
//! node_id = 1
//! listen_addr = "127.0.0.1:7001"
//! data_dir = "/var/lib/tessera/n1"
//! metrics_addr = "127.0.0.1:9001"     # optional: Prometheus text at /metrics
//!
//! [tls]
//! ca_cert = "certs/ca.pem"            # relative paths: from the config's folder
//! cert = "certs/node-1.pem"
//! key = "certs/node-1-key.pem"
//!
//! [[peers]]
//! id = 2
//! addr = "127.0.0.1:7002"
//!
//! [raft]                              # optional, defaults shown
//! heartbeat_interval_ms = 300
//! election_timeout_ms_min = 1500
//! election_timeout_ms_max = 3000
//! pre_vote = true
//! proposal_batch_max = 4096
//! replicate_before_flush = false
//! quiesce_after_ms = 10000            # idle groups sleep; 0 turns it off
//! dormant_after_ms = 30000            # sleeping replicas drop their instance
//! commit_linger_ms = 50               # a commit-only AppendEntries waits for entries
//! batch_data_shards = true            # bootstrap data shards on the batch system (false: openraft)
//!
//! [bootstrap]                         # optional: create shards on first start
//! shards = 16
//! members = [1, 2, 3]
//!
//! [transport]                         # optional, see TransportConfig
//! [storage]                           # optional, see StorageConfig (data_dir above wins)
//! ```

use crate::net::{PeerAddr, TransportConfig};
use crate::storage::StorageConfig;
use crate::tls::TlsFiles;
use crate::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A configuration error naming the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("read {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// The file is not valid TOML for a node config.
    #[error("parse {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (it names the line and field).
        reason: String,
    },
    /// A field has a value outside its rules.
    #[error("invalid config field `{field}`: {reason}")]
    Invalid {
        /// The field, dotted (`raft.heartbeat_interval_ms`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Raft timings shared by every group on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftTimings {
    /// Leader heartbeat interval; also the AppendEntries deadline.
    /// Default: 300 ms.
    pub heartbeat_interval_ms: u64,
    /// Shortest election timeout. At least 3 × the heartbeat interval.
    /// Default: 1500 ms.
    pub election_timeout_ms_min: u64,
    /// Longest election timeout (randomised between min and max).
    /// Default: 3000 ms.
    pub election_timeout_ms_max: u64,
    /// Entries per AppendEntries at most. Default: 256.
    pub max_payload_entries: u64,
    /// Applied entries since the last snapshot that trigger a new one. On
    /// the batch system (`batch_data_shards`): applied entries that
    /// trigger a log compaction (its snapshots are taken when a replica
    /// needs one). Default: 10000.
    pub snapshot_logs_since_last: u64,
    /// Log entries kept below the last snapshot when purging (a lagging
    /// follower within this distance catches up from the log, beyond it
    /// from a snapshot). On the batch system: applied entries kept below
    /// what every voter holds when compacting. Default: 1000.
    pub snapshot_logs_to_keep: u64,
    /// Pre-vote: a node whose election timer fires first asks whether it
    /// could win before it bumps its term, so a node that was partitioned or
    /// restarted cannot depose a healthy leader. Default: true.
    pub pre_vote: bool,
    /// Client writes gathered into one proposal (one log append, one
    /// AppendEntries) at most. Default: 4096.
    pub proposal_batch_max: u64,
    /// Replicate entries as soon as they are submitted to the log, before
    /// the local flush (the leader's and the followers' syncs overlap).
    /// Default: false: measured side by side (64 shards, 64 writing
    /// clients, 2 cores) it gave 2,354 writes/s at 665 µs of CPU each, off
    /// 2,699 at 568 µs: replicating later sends fewer, larger messages.
    pub replicate_before_flush: bool,
    /// Quiescence: a group whose leader appended nothing for this long,
    /// with every follower up to date, stops ticking on every replica (no
    /// heartbeats, no election timers) until a request or message wakes
    /// it; nodes ping each other once per heartbeat interval instead. A
    /// group no client request or admin command has reached since the
    /// node started sleeps as soon as it is settled, without this wait. 0
    /// turns it off. At least `election_timeout_ms_min` when on. Default:
    /// 10000 (on: the network soak runs clean with it, dormant replicas
    /// included). Batch-system groups (`batch_data_shards`) sleep after the
    /// same time, their followers after half an election timeout of silence,
    /// and the same pings wake the groups of a leader that went away.
    pub quiesce_after_ms: u64,
    /// With quiescence on: a replica asleep for this long drops its
    /// openraft instance (about 110 KiB of buffers, tasks and channels
    /// when idle) and is rebuilt from storage by the first thing that
    /// needs it (a client or admin request, a Raft message, a snapshot, a
    /// peer's death). 0 keeps every instance. Default: 30000.
    pub dormant_after_ms: u64,
    /// An AppendEntries that only tells a follower the new commit waits up
    /// to this long for the group's next entries to carry it (the leader
    /// answers its client on its own commit; followers apply up to this
    /// much later). 0 sends each at once. At most half of
    /// `heartbeat_interval_ms` is used. Default: 50.
    pub commit_linger_ms: u64,
    /// Bootstrap the data shards on the batch system
    /// ([`crate::multiraft`]: every data shard of the node stepped by one
    /// Raft loop, one synced write per round for all of them, one frame per
    /// peer) rather than on openraft (one set of tasks per shard). The meta
    /// shard stays on openraft. Decided at bootstrap and recorded with each
    /// shard: a node opens the shards it finds on the system they were
    /// created on, whatever this says later, and splits, moves and replica
    /// repair keep a shard's system. Both systems serve every request and
    /// admin command; the batch system writes about twice as fast with 64
    /// shards on 2 cores (README, "Raft for many groups at once").
    /// Default: true since 2026-12-08 (folders created earlier keep their
    /// openraft shards).
    pub batch_data_shards: bool,
}

impl Default for RaftTimings {
    fn default() -> Self {
        RaftTimings {
            heartbeat_interval_ms: 300,
            election_timeout_ms_min: 1500,
            election_timeout_ms_max: 3000,
            max_payload_entries: 256,
            snapshot_logs_since_last: 10_000,
            snapshot_logs_to_keep: 1000,
            pre_vote: true,
            proposal_batch_max: 4096,
            replicate_before_flush: false,
            quiesce_after_ms: 10_000,
            dormant_after_ms: 30_000,
            commit_linger_ms: 50,
            batch_data_shards: true,
        }
    }
}

/// Automatic splits: a shard whose data grows past `max_bytes` is split at
/// its middle key by its leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SplitConfig {
    /// Largest shard before it is split (0: never split automatically).
    /// Default: 96 MiB (TiKV's region size).
    pub max_bytes: u64,
    /// How often a leader checks its shards' sizes and loads. Default:
    /// 10000 ms.
    pub check_interval_ms: u64,
    /// Split a shard whose load (keys read plus write operations per
    /// second, decayed over about 10 s, as its leader counts them) reaches
    /// this, at the median of its recent request keys, so each half takes
    /// about half of it. A single hot key cannot be split. 0: never split
    /// by load. Default: 0.
    pub load_ops_per_s: u64,
    /// Merge small, cold neighbours automatically: a leader merges the
    /// right neighbour of a shard it leads into it when both hold less
    /// than this many bytes, both are cold (see `merge_max_ops_per_s`),
    /// this node leads both and their replicas are on the same nodes.
    /// 0: never merge automatically (`tessera-ctl merge` still works).
    /// Default: 0.
    pub merge_max_bytes: u64,
    /// A shard counts as cold for automatic merges while its load (as for
    /// `load_ops_per_s`) stays below this. Default: 1.
    pub merge_max_ops_per_s: u64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            max_bytes: 96 << 20,
            check_interval_ms: 10_000,
            load_ops_per_s: 0,
            merge_max_bytes: 0,
            merge_max_ops_per_s: 1,
        }
    }
}

/// Automatic rebalancing: the node leading the meta shard runs the planner
/// and executor of `tessera-ctl rebalance` itself, one pass (until the
/// plan comes out empty, at most 50 rounds) every `interval_ms`, with its
/// own node certificate (nodes may make admin requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RebalanceConfig {
    /// Whether this node balances the cluster when it leads the meta
    /// shard. Default: false (also in `tessera dev`); turn it on in every
    /// node's file, since the meta shard's leadership moves.
    pub auto: bool,
    /// Pause between passes. Default: 60000 ms. Minimum: 1000.
    pub interval_ms: u64,
    /// Replica moves at once, as `--max-concurrent-moves`. Default: 2.
    /// 1..=64.
    pub max_concurrent_moves: usize,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        RebalanceConfig {
            auto: false,
            interval_ms: 60_000,
            max_concurrent_moves: 2,
        }
    }
}

/// Replica garbage collection and repair: each node compares the replicas
/// it hosts with the meta shard's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicaGcConfig {
    /// How often the table is compared. Default: 10000 ms. Minimum: 1.
    pub interval_ms: u64,
    /// How long a replica must look removed (a newer configuration without
    /// this node, and nothing applied meanwhile) before it is destroyed.
    /// It stops campaigning at once. Default: 30000 ms.
    pub grace_ms: u64,
}

impl Default for ReplicaGcConfig {
    fn default() -> Self {
        ReplicaGcConfig {
            interval_ms: 10_000,
            grace_ms: 30_000,
        }
    }
}

/// The client protocol's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Most key and value bytes in one response: a scan or multi-key get
    /// answers the pairs or values that fit (at least one) and the client
    /// asks for the rest. Default: 4 MiB. Minimum: one largest pair
    /// (8 KiB key + 1 MiB value). Maximum: 12 MiB (a frame is 16 MiB).
    pub response_bytes_max: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            response_bytes_max: crate::limits::RESPONSE_BYTES_DEFAULT,
        }
    }
}

/// Shards created on first start (identically on every member).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    /// Shards, splitting the key space evenly by first byte (by the first
    /// two beyond 256; 1..=10000).
    pub shards: u64,
    /// The nodes of the initial cluster; each shard gets up to 3 of them.
    pub members: Vec<NodeId>,
}

/// Everything one node needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id (at least 1; its certificate must name it).
    pub node_id: NodeId,
    /// QUIC listen address for peers and clients.
    pub listen_addr: SocketAddr,
    /// Data folder (RocksDB and snapshot files).
    pub data_dir: PathBuf,
    /// Where to serve Prometheus metrics; none when absent.
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
    /// Certificates and key.
    pub tls: TlsFiles,
    /// The other nodes.
    #[serde(default)]
    pub peers: Vec<PeerAddr>,
    /// Raft timings.
    #[serde(default)]
    pub raft: RaftTimings,
    /// Transport limits and timings.
    #[serde(default)]
    pub transport: TransportConfig,
    /// Storage settings (`data_dir` is taken from the top level).
    #[serde(default)]
    pub storage: StorageConfig,
    /// Initial shards, created when the data folder holds none.
    #[serde(default)]
    pub bootstrap: Option<Bootstrap>,
    /// Automatic splits.
    #[serde(default)]
    pub split: SplitConfig,
    /// Replica garbage collection and repair.
    #[serde(default)]
    pub replica_gc: ReplicaGcConfig,
    /// Automatic rebalancing (off by default).
    #[serde(default)]
    pub rebalance: RebalanceConfig,
    /// Client protocol bounds.
    #[serde(default)]
    pub api: ApiConfig,
}

impl NodeConfig {
    /// Reads and validates a config file; relative paths inside it are
    /// taken from the file's folder.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file or the field.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let mut cfg: NodeConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.data_dir,
            &mut cfg.tls.ca_cert,
            &mut cfg.tls.cert,
            &mut cfg.tls.key,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("node config serialises")
    }

    /// The storage settings with this node's data folder.
    pub fn storage_config(&self) -> StorageConfig {
        StorageConfig {
            data_dir: self.data_dir.clone(),
            ..self.storage.clone()
        }
    }

    /// Checks every field and the rules between fields.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id.0 == 0 {
            return Err(invalid("node_id", "must be at least 1"));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        if self.replica_gc.interval_ms == 0 {
            return Err(invalid("replica_gc.interval_ms", "must be at least 1"));
        }
        let pair = crate::limits::KEY_BYTES_MAX + crate::limits::VALUE_BYTES_MAX;
        let most = crate::limits::FRAME_BYTES_MAX - 4 * 1024 * 1024;
        if !(pair..=most).contains(&self.api.response_bytes_max) {
            return Err(invalid(
                "api.response_bytes_max",
                format!("must be within {pair}..={most}"),
            ));
        }
        if self.rebalance.interval_ms < 1000 {
            return Err(invalid("rebalance.interval_ms", "must be at least 1000"));
        }
        if !(1..=64).contains(&self.rebalance.max_concurrent_moves) {
            return Err(invalid(
                "rebalance.max_concurrent_moves",
                "must be within 1..=64",
            ));
        }
        if self.split.check_interval_ms == 0 {
            return Err(invalid("split.check_interval_ms", "must be at least 1"));
        }
        let s = self.split;
        if s.merge_max_bytes > 0
            && s.max_bytes > 0
            && s.merge_max_bytes.saturating_mul(2) > s.max_bytes
        {
            // Two merged shards must stay under the split limit, or they
            // would be split and merged again forever.
            return Err(invalid(
                "split.merge_max_bytes",
                "must be at most half of split.max_bytes",
            ));
        }
        let mut seen = HashSet::new();
        for (i, p) in self.peers.iter().enumerate() {
            if p.id == self.node_id {
                return Err(invalid(format!("peers[{i}].id"), "is this node's own id"));
            }
            if p.id.0 == 0 {
                return Err(invalid(format!("peers[{i}].id"), "must be at least 1"));
            }
            if !seen.insert(p.id) {
                return Err(invalid(
                    format!("peers[{i}].id"),
                    format!("{} listed twice", p.id),
                ));
            }
        }
        let r = &self.raft;
        if r.heartbeat_interval_ms == 0 {
            return Err(invalid("raft.heartbeat_interval_ms", "must be at least 1"));
        }
        if r.heartbeat_interval_ms * 3 > r.election_timeout_ms_min {
            return Err(invalid(
                "raft.election_timeout_ms_min",
                format!(
                    "{} is below 3 × heartbeat_interval_ms ({})",
                    r.election_timeout_ms_min, r.heartbeat_interval_ms
                ),
            ));
        }
        if r.election_timeout_ms_max <= r.election_timeout_ms_min {
            return Err(invalid(
                "raft.election_timeout_ms_max",
                "must be above election_timeout_ms_min",
            ));
        }
        if r.quiesce_after_ms != 0 && r.quiesce_after_ms < r.election_timeout_ms_min {
            return Err(invalid(
                "raft.quiesce_after_ms",
                format!(
                    "{} is below election_timeout_ms_min ({}); 0 turns quiescence off",
                    r.quiesce_after_ms, r.election_timeout_ms_min
                ),
            ));
        }
        if r.proposal_batch_max == 0 {
            return Err(invalid("raft.proposal_batch_max", "must be at least 1"));
        }
        if r.max_payload_entries == 0 {
            return Err(invalid("raft.max_payload_entries", "must be at least 1"));
        }
        if r.snapshot_logs_since_last == 0 {
            return Err(invalid(
                "raft.snapshot_logs_since_last",
                "must be at least 1",
            ));
        }
        self.transport
            .validate()
            .map_err(|e| invalid(format!("transport.{}", e.field), e.reason))?;
        if self.transport.heartbeat_linger_ms * 4 > r.heartbeat_interval_ms {
            return Err(invalid(
                "transport.heartbeat_linger_ms",
                "must be at most a quarter of raft.heartbeat_interval_ms",
            ));
        }
        self.storage_config()
            .validate()
            .map_err(|e| invalid(format!("storage.{}", e.field), e.reason))?;
        if let Some(b) = &self.bootstrap {
            if b.shards == 0 || b.shards > super::INITIAL_SHARDS_MAX {
                return Err(invalid(
                    "bootstrap.shards",
                    format!("must be within 1..={}", super::INITIAL_SHARDS_MAX),
                ));
            }
            if b.members.is_empty() {
                return Err(invalid("bootstrap.members", "must not be empty"));
            }
            for m in &b.members {
                if *m != self.node_id && !seen.contains(m) {
                    return Err(invalid(
                        "bootstrap.members",
                        format!("{m} is neither this node nor a peer"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// openraft's configuration for this node's groups.
    pub fn openraft_config(&self) -> openraft::Config {
        let r = &self.raft;
        openraft::Config {
            cluster_name: "tessera".into(),
            heartbeat_interval: r.heartbeat_interval_ms,
            election_timeout_min: r.election_timeout_ms_min,
            election_timeout_max: r.election_timeout_ms_max,
            max_payload_entries: r.max_payload_entries,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: r.snapshot_logs_to_keep,
            enable_pre_vote: Some(r.pre_vote),
            api_batch_capacity: r.proposal_batch_max,
            broadcast_submitted_on_append: Some(r.replicate_before_flush),
            // Never: applies and the commit index are not synced by
            // themselves (the log is, and they are replayed from it), so a
            // leader restarting after a power cut may hold a stale state
            // machine and a stale commit index. openraft's default lets it
            // lead its old term again at once, without an election, and
            // answer linearizable reads from that stale state (found by the
            // network soak; tests/leader_power_cut.rs). A new election
            // makes the new leader commit an entry of its own term first.
            enable_leader_restore: Some(false),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NodeConfig {
        NodeConfig {
            node_id: NodeId(1),
            listen_addr: "127.0.0.1:7001".parse().unwrap(),
            data_dir: "d".into(),
            metrics_addr: None,
            tls: TlsFiles {
                ca_cert: "ca.pem".into(),
                cert: "n1.pem".into(),
                key: "n1-key.pem".into(),
            },
            peers: vec![PeerAddr {
                id: NodeId(2),
                addr: "127.0.0.1:7002".parse().unwrap(),
            }],
            raft: RaftTimings::default(),
            transport: TransportConfig::default(),
            storage: StorageConfig::default(),
            bootstrap: Some(Bootstrap {
                shards: 4,
                members: vec![NodeId(1), NodeId(2)],
            }),
            split: Default::default(),
            replica_gc: Default::default(),
            rebalance: Default::default(),
            api: Default::default(),
        }
    }

    #[test]
    fn round_trips_through_toml_and_relative_paths_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, sample().to_toml()).unwrap();
        let back = NodeConfig::load(&path).unwrap();
        assert_eq!(back.node_id, NodeId(1));
        assert_eq!(back.data_dir, dir.path().join("d"));
        assert_eq!(back.tls.ca_cert, dir.path().join("ca.pem"));
        assert_eq!(back.peers, sample().peers);
    }

    #[test]
    fn errors_name_the_field() {
        let field = |c: NodeConfig| match c.validate().unwrap_err() {
            ConfigError::Invalid { field, .. } => field,
            e => panic!("{e}"),
        };
        let mut c = sample();
        c.raft.election_timeout_ms_min = 500;
        assert_eq!(field(c), "raft.election_timeout_ms_min");
        let mut c = sample();
        c.peers.push(c.peers[0].clone());
        assert_eq!(field(c), "peers[1].id");
        let mut c = sample();
        c.transport.frame_bytes_max = 1;
        assert_eq!(field(c), "transport.frame_bytes_max");
        for bad in [0, 1025] {
            let mut c = sample();
            c.transport.ack_eliciting_threshold = bad;
            assert_eq!(field(c), "transport.ack_eliciting_threshold");
        }
        let mut c = sample();
        c.bootstrap.as_mut().unwrap().members.push(NodeId(9));
        assert_eq!(field(c), "bootstrap.members");
        let mut c = sample();
        c.rebalance.interval_ms = 999;
        assert_eq!(field(c), "rebalance.interval_ms");
        let mut c = sample();
        c.rebalance.max_concurrent_moves = 0;
        assert_eq!(field(c), "rebalance.max_concurrent_moves");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "node_id = 1\nlisten_addr = 5\n").unwrap();
        assert!(matches!(
            NodeConfig::load(&path),
            Err(ConfigError::Parse { .. })
        ));
    }
}
