//! The batch system's entries applied to the product's state machine
//! ([`StateMachine`]: user data, client sessions, the applied position,
//! splits and merges), every group's entries of a round in one write
//! where they can share it ([`apply_together`]).
//!
//! An entry's data is a postcard-encoded [`Command`] ([`encode_command`]);
//! an entry without data is a new leader's blank, and a log compaction
//! entry ([`compaction_point`]) is applied as one. Each is handed to the
//! state machine as an openraft entry at log id (term, node 0, index): the
//! state machine records that as its applied position, and
//! [`ShardApplier::add`] reads the index back when the group is opened
//! again.

use std::collections::HashMap;

use raft::eraftpb::{Entry, EntryType};

use super::driver::compaction_point;
use super::runtime::Applier;
use crate::command::{Command, CommandResponse};
use crate::raft::{log_id, EntryPayload};
use crate::storage::{apply_together, StateMachine, StoreError};
use crate::{NodeId, ShardId};

/// A command as a batch-system entry's data.
pub fn encode_command(cmd: &Command) -> Vec<u8> {
    postcard::to_allocvec(cmd).expect("commands encode into memory")
}

/// Applies every group's entries to its shard's state machine.
#[derive(Default)]
pub struct ShardApplier {
    /// The node's engine, where [`Applier::open`] opens shards.
    engine: Option<crate::storage::Engine>,
    machines: HashMap<ShardId, StateMachine>,
    /// Children created by the splits of the last apply, not opened yet.
    created: Vec<(crate::storage::Engine, ShardId)>,
}

impl ShardApplier {
    /// An applier that opens shards ([`Applier::open`]) on `engine`.
    pub fn new(engine: crate::storage::Engine) -> ShardApplier {
        ShardApplier {
            engine: Some(engine),
            ..ShardApplier::default()
        }
    }

    /// Takes `shard`'s state machine; returns the index it applied (what
    /// [`super::Driver::open_group`] takes, so nothing is applied twice).
    pub fn add(&mut self, shard: ShardId, mut machine: StateMachine) -> u64 {
        let applied = machine.applied().map_or(0, |l| l.index);
        machine.run_on_batch();
        self.machines.insert(shard, machine);
        applied
    }

    fn convert(shard: ShardId, e: &Entry) -> Result<crate::raft::Entry, StoreError> {
        let payload = match e.get_entry_type() {
            // A new leader's blank, or a log compaction (the driver's
            // business: the state machine only records its position).
            EntryType::EntryNormal if e.data.is_empty() || compaction_point(e).is_some() => {
                EntryPayload::Blank
            }
            EntryType::EntryNormal => {
                EntryPayload::Normal(postcard::from_bytes::<Command>(&e.data).map_err(|err| {
                    StoreError::corrupt(format!("entry {} of {shard}", e.index), err)
                })?)
            }
            // The loop hands a configuration change over as the
            // configuration it made (raft-rs applied it first).
            EntryType::EntryConfChange => {
                use protobuf::Message as _;
                let conf = raft::eraftpb::ConfState::parse_from_bytes(&e.data).map_err(|err| {
                    StoreError::corrupt(format!("configuration entry {} of {shard}", e.index), err)
                })?;
                let voters: std::collections::BTreeSet<NodeId> =
                    conf.voters.iter().copied().map(NodeId).collect();
                let learners: Vec<NodeId> = conf.learners.iter().copied().map(NodeId).collect();
                EntryPayload::Membership(crate::raft::Membership::new_with_defaults(
                    vec![voters],
                    learners,
                ))
            }
            other => {
                return Err(StoreError::Failed {
                    cause: format!(
                        "{shard}: entry {} is a {other:?}, not applied here",
                        e.index
                    ),
                })
            }
        };
        Ok(crate::raft::Entry {
            log_id: log_id(e.term, NodeId(0), e.index),
            payload,
        })
    }
}

impl Applier for ShardApplier {
    type Response = CommandResponse;

    /// One write for the round's client writes, whatever the number of
    /// groups ([`apply_together`]).
    fn apply(
        &mut self,
        committed: &[(ShardId, Vec<Entry>)],
    ) -> Result<Vec<Vec<CommandResponse>>, StoreError> {
        let mut converted = HashMap::with_capacity(committed.len());
        for (i, (shard, entries)) in committed.iter().enumerate() {
            if !self.machines.contains_key(shard) {
                return Err(StoreError::UnknownShard { shard: *shard });
            }
            let entries = entries
                .iter()
                .map(|e| Self::convert(*shard, e))
                .collect::<Result<Vec<_>, _>>()?;
            if converted.insert(*shard, (i, entries)).is_some() {
                return Err(StoreError::Failed {
                    cause: format!("{shard} appears twice in one round's committed entries"),
                });
            }
        }
        let mut order = Vec::with_capacity(committed.len());
        let mut parts = Vec::with_capacity(committed.len());
        for (shard, machine) in &mut self.machines {
            if let Some((i, entries)) = converted.remove(shard) {
                order.push(i);
                parts.push((machine, entries));
            }
        }
        let answered = apply_together(parts).map_err(|e| StoreError::Failed {
            cause: format!("apply: {e}"),
        })?;
        // Splits among them: only the round's groups can have created any.
        for (shard, _) in committed {
            if let Some(machine) = self.machines.get_mut(shard) {
                for child in machine.take_batch_created() {
                    self.created.push((machine.engine().clone(), child));
                }
            }
        }
        let mut out: Vec<Vec<CommandResponse>> = vec![Vec::new(); committed.len()];
        for (i, responses) in order.into_iter().zip(answered) {
            out[i] = responses;
        }
        Ok(out)
    }

    fn remove(&mut self, shard: ShardId) {
        self.machines.remove(&shard);
    }

    fn open(&mut self, shard: ShardId) -> Result<u64, StoreError> {
        let engine = self
            .engine
            .clone()
            .or_else(|| self.machines.values().next().map(|m| m.engine().clone()))
            .ok_or(StoreError::UnknownShard { shard })?;
        let (_log, machine) = engine.open_shard(shard)?;
        Ok(self.add(shard, machine))
    }

    /// Opens the state machines of the children that splits applied here
    /// created (the split's write holds their whole starting state) and
    /// takes them in.
    fn take_created(&mut self) -> Result<Vec<(ShardId, u64)>, StoreError> {
        let mut out = Vec::with_capacity(self.created.len());
        for (engine, child) in std::mem::take(&mut self.created) {
            let (_log, machine) = engine.open_shard(child)?;
            out.push((child, self.add(child, machine)));
        }
        Ok(out)
    }
}
