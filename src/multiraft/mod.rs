//! Many Raft groups stepped as one: the node-level batch system that issue 19's
//! remaining targets need (README, "Raft: openraft 0.10", the decision under
//! "Comparing with etcd").
//!
//! openraft runs every group as its own set of tasks (a core, one
//! replication task per follower, a state-machine worker), so a node with 64
//! busy shards does 64 groups' worth of task hand-offs, appends and frames
//! per write round. Here a group is a raft-rs [`raft::RawNode`]: a plain
//! state machine with no tasks of its own. One [`Driver`] per node steps
//! every group that has work in one [`Driver::round`]:
//! - the round's appends and hard states, over all groups, are **one**
//!   RocksDB write and one sync;
//! - its messages come out grouped by destination node (one frame per peer);
//! - its committed entries come out together, for one apply batch.
//!
//! What exists: the group store ([`GroupStore`]: log, hard state,
//! configuration in the node's RocksDB, an in-memory tail), the driver
//! (elections with pre-vote and check-quorum, proposals, replication with a
//! leader's appends sent before its own write, read points, leader transfer,
//! restart from what is stored), the node loop ([`NodeLoop`]), frames over
//! QUIC ([`quic`]) and the applier to the product's state machine
//! ([`ShardApplier`]). The node serves data shards from it when
//! `raft.batch_data_shards` created them (`crate::node`'s `batch` module).
//! Logs are compacted through the log itself: a leader proposes a
//! compaction entry once its group's log can drop enough entries that every
//! voter holds, and each replica drops its log up to the point named once
//! its state machine applied the entry ([`Driver::propose_compaction`]).
//! A split's child starts on every replica as it applies the split, its
//! log beginning right after the split's entry
//! ([`GroupStore::stage_split_child`]); a merged-away group is closed
//! ([`Mailbox::close`]); configuration changes (learner, promote, remove)
//! take effect as they are applied ([`Driver::apply_conf_change`]); idle
//! groups sleep (quiescence). Not built yet: raft-rs snapshots for a
//! lagging follower (a move's target is seeded out of band, and a voter
//! that is down holds every log of its groups back until it returns).

mod apply;
mod driver;
pub mod quic;
mod runtime;
mod store;
pub mod wire;

pub use apply::{encode_command, ShardApplier};
pub use driver::raft_config;
pub use driver::{
    compaction_point, Driver, DriverConfig, DriverError, DriverStats, Envelope, GroupMembership,
    GroupView, LogWrite, Proposed, Round, Written,
};
pub use runtime::{
    Applier, LoopConfig, LoopView, Mailbox, NodeLoop, Outbound, Proposal, RequestError,
};
pub use store::{GroupStore, SnapshotRequests, TAIL_ENTRIES};

/// raft-rs logs through `slog`; this drain hands its records to `tracing`
/// (the message and its logger's values, e.g. `shard=7 raft_id=3`, at the
/// matching level, under the target `raft`).
pub(crate) struct TracingDrain;

/// Collects a record's key-value pairs as `key=value` words.
struct KvWords(String);

impl slog::Serializer for KvWords {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        values: &slog::OwnedKVList,
    ) -> Result<(), slog::Never> {
        use slog::KV;
        let mut kv = KvWords(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let (msg, kv) = (record.msg(), kv.0);
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{msg}{kv}");
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}{kv}"),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}{kv}"),
            slog::Level::Debug => tracing::debug!(target: "raft", "{msg}{kv}"),
            slog::Level::Trace => tracing::trace!(target: "raft", "{msg}{kv}"),
        }
        Ok(())
    }
}
