//! The openraft type configuration shared by every shard's Raft group.

use crate::command::{Command, CommandResponse};
use crate::storage::snapshot::SnapshotData;
use crate::NodeId;

openraft::declare_raft_types!(
    /// Tessera's Raft types: commands in, command responses out, logical
    /// range snapshots on disk.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = SnapshotData,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A log id in Tessera's types.
pub type LogId = openraft::LogId<NodeId>;
/// A vote in Tessera's types.
pub type Vote = openraft::Vote<NodeId>;
/// A log entry in Tessera's types.
pub type Entry = openraft::Entry<TypeConfig>;
/// Membership as stored by the state machine.
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
/// Snapshot metadata in Tessera's types.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
/// openraft's storage error in Tessera's types.
pub type StorageError = openraft::StorageError<NodeId>;

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

fn unreachable_err() -> openraft::error::Unreachable {
    openraft::error::Unreachable::new(&std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "no network: single-replica group",
    ))
}

impl openraft::RaftNetwork<TypeConfig> for NoNetwork {
    async fn append_entries(
        &mut self,
        _rpc: openraft::raft::AppendEntriesRequest<TypeConfig>,
        _option: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::AppendEntriesResponse<NodeId>,
        openraft::error::RPCError<NodeId, openraft::BasicNode, openraft::error::RaftError<NodeId>>,
    > {
        Err(openraft::error::RPCError::Unreachable(unreachable_err()))
    }

    async fn vote(
        &mut self,
        _rpc: openraft::raft::VoteRequest<NodeId>,
        _option: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::VoteResponse<NodeId>,
        openraft::error::RPCError<NodeId, openraft::BasicNode, openraft::error::RaftError<NodeId>>,
    > {
        Err(openraft::error::RPCError::Unreachable(unreachable_err()))
    }

    async fn full_snapshot(
        &mut self,
        _vote: Vote,
        _snapshot: openraft::Snapshot<TypeConfig>,
        _cancel: impl std::future::Future<Output = openraft::error::ReplicationClosed> + Send + 'static,
        _option: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::SnapshotResponse<NodeId>,
        openraft::error::StreamingError<TypeConfig, openraft::error::Fatal<NodeId>>,
    > {
        Err(openraft::error::StreamingError::Unreachable(
            unreachable_err(),
        ))
    }
}
