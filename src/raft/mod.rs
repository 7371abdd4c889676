//! The Raft layer: openraft's type configuration shared by every shard's
//! group (a leaf: it imports no storage, transport or node code), the
//! messages between nodes ([`rpc`]) and openraft's network on top of the
//! transport ([`network`]).
//!
//! openraft is pinned at `=0.10.0-alpha.37`: its core submits log I/O without
//! waiting for the flush, batches client writes, and has pre-vote and leader
//! transfer (see the README's design note on openraft 0.10).

pub mod commit_linger;
pub mod network;
pub mod rpc;

use crate::command::{Command, CommandResponse};
use crate::NodeId;
use openraft::type_config::alias;
use openraft::vote::RaftLeaderId;
use std::path::{Path, PathBuf};

openraft::declare_raft_types!(
    /// Tessera's Raft types: commands in, command responses out.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A log id in Tessera's types.
pub type LogId = alias::LogIdOf<TypeConfig>;
/// The leader id a log id carries.
pub type CommittedLeaderId = alias::CommittedLeaderIdOf<TypeConfig>;
/// A vote in Tessera's types.
pub type Vote = alias::VoteOf<TypeConfig>;
/// A log entry in Tessera's types.
pub type Entry = alias::EntryOf<TypeConfig>;
/// A log entry's payload.
pub type EntryPayload = alias::EntryPayloadOf<TypeConfig>;
/// A membership configuration.
pub type Membership = openraft::Membership<NodeId, openraft::BasicNode>;
/// The voters of `m`, sorted, when it is settled: no joint configuration
/// and no learners (what a merge needs of both shards); otherwise why not.
pub fn settled_voters(m: &Membership) -> Result<Vec<NodeId>, String> {
    if m.get_joint_config().len() > 1 {
        return Err("a membership change is in progress".into());
    }
    if m.learner_ids().next().is_some() {
        return Err("the shard has learners".into());
    }
    let mut v: Vec<NodeId> = m.voter_ids().collect();
    v.sort();
    Ok(v)
}

/// Membership as stored by the state machine.
pub type StoredMembership = alias::StoredMembershipOf<TypeConfig>;
/// Snapshot metadata in Tessera's types.
pub type SnapshotMeta = alias::SnapshotMetaOf<TypeConfig>;
/// A snapshot: its metadata and its file.
pub type Snapshot = alias::SnapshotOf<TypeConfig, SnapshotData>;
/// A group's metrics.
pub type RaftMetrics = openraft::RaftMetrics<TypeConfig>;

/// openraft's `SnapshotData` for Tessera: a complete snapshot file on disk
/// (written and read by [`crate::storage::snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotData {
    path: PathBuf,
}

impl SnapshotData {
    /// Refers to a snapshot file (checked when read).
    pub fn from_file(path: impl Into<PathBuf>) -> Self {
        SnapshotData { path: path.into() }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The log id of `index` written by the leader of `term` on `node`.
pub fn log_id(term: u64, node: NodeId, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, node), index)
}

/// A network for single-replica groups: every RPC fails as `Unreachable`.
///
/// A group whose only voter is the local node never needs a peer; this lets
/// such groups (the single-node smoke run, storage tests on real Raft groups)
/// run without a transport.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNetwork;

impl openraft::RaftNetworkFactory<TypeConfig> for NoNetwork {
    type Network = NoNetwork;

    async fn new_client(&mut self, _target: NodeId, _node: &openraft::BasicNode) -> NoNetwork {
        NoNetwork
    }
}

fn unreachable_err() -> openraft::error::Unreachable<TypeConfig> {
    openraft::error::Unreachable::new(&std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "no network: single-replica group",
    ))
}

impl openraft::RaftNetworkV2<TypeConfig> for NoNetwork {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        _rpc: openraft::raft::AppendEntriesRequest<TypeConfig>,
        _option: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::AppendEntriesResponse<TypeConfig>,
        openraft::error::RPCError<TypeConfig>,
    > {
        Err(openraft::error::RPCError::Unreachable(unreachable_err()))
    }

    async fn vote(
        &mut self,
        _rpc: openraft::raft::VoteRequest<TypeConfig>,
        _option: openraft::network::RPCOption,
    ) -> Result<openraft::raft::VoteResponse<TypeConfig>, openraft::error::RPCError<TypeConfig>>
    {
        Err(openraft::error::RPCError::Unreachable(unreachable_err()))
    }

    async fn full_snapshot(
        &mut self,
        _vote: Vote,
        _snapshot: Snapshot,
        _cancel: impl std::future::Future<Output = openraft::error::ReplicationClosed> + Send + 'static,
        _option: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::SnapshotResponse<TypeConfig>,
        openraft::error::StreamingError<TypeConfig>,
    > {
        Err(openraft::error::StreamingError::Unreachable(
            unreachable_err(),
        ))
    }
}
