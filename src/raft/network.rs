//! openraft's network for one shard's group, on the node's shared transport.
//!
//! Errors map the way openraft expects: no connection (or a peer without the
//! shard yet) is `Unreachable`, so openraft backs off; a missed deadline is
//! `Timeout`. An AppendEntries too large for one frame is cut to fit and
//! answered with `PartialSuccess` for what was sent.

use super::rpc::{self, CallError, PeerRequest, PeerResponse, Refusal, SnapshotHead};
use crate::command::Command;
use crate::net::Transport;
use crate::raft::{Entry, EntryPayload, Snapshot, SnapshotData, TypeConfig, Vote};
use crate::{NodeId, ShardId};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::raft::{TransferLeaderRequest, TransferLeaderResponse};
use openraft::BasicNode;
use std::time::Duration;

use futures_util::Stream;
use openraft::base::{BoxFuture, BoxStream};
use openraft::raft::StreamAppendResult;

/// One item of a stream of AppendEntries responses.
type StreamAppendItem = Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>;

/// Makes one [`PeerClient`] per target for a shard's group.
#[derive(Clone)]
pub struct NetworkFactory {
    transport: Transport,
    shard: ShardId,
    message_bytes_max: usize,
    commit_linger: Duration,
    busy: super::commit_linger::Busy,
}

impl NetworkFactory {
    /// The network of `shard`'s group; AppendEntries are cut to at most
    /// `message_bytes_max` of entry payload (at least one entry each), and
    /// one that only advances the commit waits up to `commit_linger` for
    /// the next one to carry it while `busy` says the node is busy (see
    /// [`super::commit_linger`]).
    pub fn new(
        transport: Transport,
        shard: ShardId,
        message_bytes_max: usize,
        commit_linger: Duration,
        busy: super::commit_linger::Busy,
    ) -> Self {
        NetworkFactory {
            transport,
            shard,
            message_bytes_max,
            commit_linger,
            busy,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> PeerClient {
        PeerClient {
            transport: self.transport.clone(),
            shard: self.shard,
            target,
            message_bytes_max: self.message_bytes_max,
            commit_linger: self.commit_linger,
            busy: self.busy.clone(),
        }
    }
}

/// One group's view of one peer.
pub struct PeerClient {
    transport: Transport,
    shard: ShardId,
    target: NodeId,
    message_bytes_max: usize,
    commit_linger: Duration,
    busy: super::commit_linger::Busy,
}

fn io_err(e: &CallError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn rpc_error(e: CallError, action: openraft::RPCTypes, me: NodeId) -> RPCError<TypeConfig> {
    match e {
        CallError::Timeout { peer, after } => RPCError::Timeout(openraft::error::Timeout {
            action,
            id: me,
            target: peer,
            timeout: after,
        }),
        CallError::Refused {
            refusal: Refusal::Failed(_),
            ..
        }
        | CallError::Stream { .. } => RPCError::Network(NetworkError::new(&io_err(&e))),
        CallError::Unreachable { .. } | CallError::Refused { .. } => {
            RPCError::Unreachable(Unreachable::new(&io_err(&e)))
        }
    }
}

fn unexpected_answer(to: &str, other: PeerResponse) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&std::io::Error::other(format!(
        "unexpected answer to {to}: {other:?}"
    ))))
}

/// Approximate encoded size of an entry (payload plus framing slack).
fn entry_bytes(e: &Entry) -> usize {
    64 + match &e.payload {
        EntryPayload::Blank => 0,
        EntryPayload::Normal(Command::Write { ops }) => {
            ops.iter().map(|op| op.payload_bytes() + 16).sum::<usize>()
        }
        EntryPayload::Normal(Command::SessionWrite { ops, .. }) => {
            48 + ops.iter().map(|op| op.payload_bytes() + 16).sum::<usize>()
        }
        EntryPayload::Normal(Command::Split { key, .. }) => key.len() + 32,
        EntryPayload::Normal(
            Command::AllocShardId
            | Command::Noop
            | Command::Digest
            | Command::AbortMerge { .. }
            | Command::RetireRoute { .. },
        ) => 8,
        EntryPayload::Normal(Command::PrepareMerge { voters, .. }) => 32 + 9 * voters.len(),
        EntryPayload::Normal(Command::CancelMerge { right_start }) => right_start.len() + 16,
        EntryPayload::Normal(Command::CommitMerge { right, .. }) => {
            right.range.start.len() + right.range.end.len() + 80 + 9 * right.replicas.len()
        }
        EntryPayload::Normal(Command::RecordRoutes { descriptors }) => descriptors
            .iter()
            .map(|d| d.range.start.len() + d.range.end.len() + 64 + 9 * d.replicas.len())
            .sum::<usize>(),
        EntryPayload::Normal(Command::RecordLoad { reports }) => 64 * reports.len(),
        EntryPayload::Membership(m) => 256 * (m.nodes().count() + 1),
    }
}

/// How many leading entries fit `budget` bytes (at least one when any).
fn entries_that_fit(entries: &[Entry], budget: usize) -> usize {
    let mut total = 0usize;
    for (i, e) in entries.iter().enumerate() {
        total += entry_bytes(e);
        if total > budget && i > 0 {
            return i;
        }
    }
    entries.len()
}

impl PeerClient {
    /// Sends a vote or pre-vote request and takes its answer.
    async fn ask_vote(
        &mut self,
        req: PeerRequest,
        action: openraft::RPCTypes,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let me = self.transport.node_id();
        let resp = rpc::call(
            &self.transport,
            self.target,
            self.shard,
            &req,
            option.hard_ttl(),
        )
        .await
        .map_err(|e| rpc_error(e, action, me))?;
        match resp {
            PeerResponse::Vote(r) => Ok(r),
            other => Err(unexpected_answer("Vote", other)),
        }
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotData;

    /// One request at a time, as openraft's default, on the input with
    /// commit-only requests coalesced into the next one.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, StreamAppendItem>, RPCError<TypeConfig>>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let input = super::commit_linger::coalesce(input, self.commit_linger, self.busy.clone());
        openraft::network::stream_append_sequential(self, input, option)
    }

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let keep = entries_that_fit(&rpc.entries, self.message_bytes_max);
        let cut = if keep < rpc.entries.len() {
            rpc.entries.truncate(keep);
            rpc.entries.last().map(|e| e.log_id)
        } else {
            None
        };
        let me = self.transport.node_id();
        let resp = rpc::call(
            &self.transport,
            self.target,
            self.shard,
            &PeerRequest::Append(rpc),
            option.hard_ttl(),
        )
        .await
        .map_err(|e| rpc_error(e, openraft::RPCTypes::AppendEntries, me))?;
        match resp {
            PeerResponse::Append(AppendEntriesResponse::Success) if cut.is_some() => {
                Ok(AppendEntriesResponse::PartialSuccess(cut))
            }
            PeerResponse::Append(r) => Ok(r),
            other => Err(unexpected_answer("AppendEntries", other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.ask_vote(PeerRequest::Vote(rpc), openraft::RPCTypes::Vote, option)
            .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.ask_vote(PeerRequest::PreVote(rpc), openraft::RPCTypes::Vote, option)
            .await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let me = self.transport.node_id();
        let resp = rpc::call(
            &self.transport,
            self.target,
            self.shard,
            &PeerRequest::TransferLeader(req),
            option.hard_ttl(),
        )
        .await
        .map_err(|e| rpc_error(e, openraft::RPCTypes::TransferLeader, me))?;
        match resp {
            PeerResponse::TransferLeader(r) => Ok(r),
            other => Err(unexpected_answer("TransferLeader", other)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        // A snapshot may take far longer than one heartbeat: allow at least
        // a minute, more for a long hard TTL.
        let deadline = option.hard_ttl().max(Duration::from_secs(60));
        let head = SnapshotHead {
            vote,
            meta: snapshot.meta.clone(),
        };
        let send = rpc::send_snapshot(
            &self.transport,
            self.target,
            self.shard,
            &head,
            &snapshot.snapshot,
            deadline,
        );
        let r = tokio::select! {
            r = send => r,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        match r {
            Ok(vote) => Ok(SnapshotResponse { vote }),
            Err(CallError::Timeout { peer, after }) => {
                Err(StreamingError::Timeout(openraft::error::Timeout {
                    action: openraft::RPCTypes::InstallSnapshot,
                    id: self.transport.node_id(),
                    target: peer,
                    timeout: after,
                }))
            }
            Err(
                e @ (CallError::Unreachable { .. }
                | CallError::Refused {
                    refusal:
                        Refusal::UnknownShard(_)
                        | Refusal::StaleSnapshot { .. }
                        | Refusal::Tombstoned { .. },
                    ..
                }),
            ) => Err(StreamingError::Unreachable(Unreachable::new(&io_err(&e)))),
            Err(e) => Err(StreamingError::Network(NetworkError::new(&io_err(&e)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64, value_bytes: usize) -> Entry {
        Entry {
            log_id: crate::raft::log_id(1, NodeId(1), i),
            payload: EntryPayload::Normal(Command::put(vec![1], vec![0; value_bytes])),
        }
    }

    #[test]
    fn appends_are_cut_to_the_budget_but_never_to_nothing() {
        let es: Vec<Entry> = (1..=10).map(|i| entry(i, 1000)).collect();
        assert_eq!(entries_that_fit(&es, 1 << 20), 10);
        assert_eq!(entries_that_fit(&es, 3000), 2);
        let huge = vec![entry(1, 5 << 20), entry(2, 1)];
        assert_eq!(entries_that_fit(&huge, 1 << 20), 1);
        assert_eq!(entries_that_fit(&[], 10), 0);
    }
}
