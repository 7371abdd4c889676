//! Replicated commands and their outcomes.
//!
//! A [`Command`] is what a shard's Raft log carries and its state machine
//! applies. Every outcome is a value ([`OpResult`], [`CommandResponse`]): a
//! failed compare-and-swap or a key outside the shard is an answer, not an
//! error.

use crate::limits::{self, LimitError, BATCH_BYTES_MAX, BATCH_OPS_MAX};
use crate::session::SessionStamp;
use crate::{NodeId, ShardDescriptor, ShardId};
use serde::{Deserialize, Serialize};

/// One key operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Set `key` to `value`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The new value.
        value: Vec<u8>,
    },
    /// Remove `key` (a no-op when absent).
    Delete {
        /// The key.
        key: Vec<u8>,
    },
    /// Compare-and-swap: when the current value equals `expected` (`None`:
    /// the key is absent), set it to `new` (`None`: delete it).
    Cas {
        /// The key.
        key: Vec<u8>,
        /// The value the caller believes is current; `None` means absent.
        expected: Option<Vec<u8>>,
        /// The value to install; `None` deletes the key.
        new: Option<Vec<u8>>,
    },
    /// Set `key` to `value` and return the value it replaced (a put that
    /// reads first: ask for it only when the old value is wanted).
    Swap {
        /// The key.
        key: Vec<u8>,
        /// The new value.
        value: Vec<u8>,
    },
}

impl Op {
    /// The key this operation touches.
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. }
            | Op::Delete { key }
            | Op::Cas { key, .. }
            | Op::Swap { key, .. } => key,
        }
    }

    /// Key and value bytes carried by the operation.
    pub fn payload_bytes(&self) -> usize {
        match self {
            Op::Put { key, value } | Op::Swap { key, value } => key.len() + value.len(),
            Op::Delete { key } => key.len(),
            Op::Cas { key, expected, new } => {
                key.len() + expected.as_ref().map_or(0, Vec::len) + new.as_ref().map_or(0, Vec::len)
            }
        }
    }

    /// Checks key and value sizes against [`crate::limits`].
    pub fn validate(&self) -> Result<(), LimitError> {
        limits::check_key(self.key())?;
        match self {
            Op::Put { value, .. } | Op::Swap { value, .. } => limits::check_value(value),
            Op::Delete { .. } => Ok(()),
            Op::Cas { expected, new, .. } => {
                if let Some(v) = expected {
                    limits::check_value(v)?;
                }
                if let Some(v) = new {
                    limits::check_value(v)?;
                }
                Ok(())
            }
        }
    }
}

/// What a shard's Raft log carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Operations applied atomically and in order: each sees the effect of the
    /// ones before it; a failed compare-and-swap writes nothing but does not
    /// stop the others.
    Write {
        /// The operations, at least one.
        ops: Vec<Op>,
    },
    /// Split the shard at `key`: it keeps `[start, key)` and its range
    /// version grows; shard `child` takes `[key, end)` on the same replicas,
    /// its state written in the same batch (its data already sits in the
    /// shared data column family). Refused (an answer, not an error) unless
    /// the shard is still at range version `version` and `key` lies strictly
    /// inside its range.
    Split {
        /// The first key of the new shard.
        key: Vec<u8>,
        /// The new shard's id (allocated by the meta shard).
        child: ShardId,
        /// The parent's range version the split was planned against.
        version: u64,
    },
    /// Meta shard only: hand out a fresh shard id (a counter in the meta
    /// range, first set above every recorded id).
    AllocShardId,
    /// Meta shard only: record descriptors, each only when newer (by epoch)
    /// than the one recorded, so replays and racing reporters are harmless.
    RecordRoutes {
        /// The descriptors.
        descriptors: Vec<ShardDescriptor>,
    },
    /// Meta shard only: record shards' load as their leaders measured it
    /// (the route-report path; see [`LoadReport`]). A report older than the
    /// one recorded for its shard, or for a shard without a route record,
    /// is ignored.
    RecordLoad {
        /// At most [`LOAD_REPORTS_MAX`] reports.
        reports: Vec<LoadReport>,
    },
    /// Applies nothing: proves that the shard commits (`tessera dev`'s
    /// start-up check), without a key in the user's key space.
    Noop,
    /// Every replica hashes its state as of this entry (in the
    /// background) for `tessera-ctl verify`; changes nothing
    /// ([`crate::digest`]).
    Digest,
    /// A [`Command::Write`] of a client session: applied at most once per
    /// stamp; a retry is answered with the first application's results
    /// (see [`crate::session`]).
    SessionWrite {
        /// The client, this write's sequence number and what it finished.
        stamp: SessionStamp,
        /// Log time: the proposing leader's clock, in ms since the epoch.
        at_ms: u64,
        /// The operations, at least one.
        ops: Vec<Op>,
    },
    /// Merge, step 1, on the right shard: freeze it for a merge into its
    /// left neighbour `into`. From this entry on it applies no write, split
    /// or merge of its own (its data is final), and its replicas refuse
    /// reads. The entry's batch is synced, so a replica that reports it
    /// applied holds the final data durably. Refused (an answer) unless the
    /// shard is at epoch `(version, conf_ver)` with exactly `voters` and no
    /// learners or joint configuration. A retry for the same `into` answers
    /// the freeze already in place.
    PrepareMerge {
        /// The left neighbour taking the range.
        into: ShardId,
        /// The range version the merge was planned at.
        version: u64,
        /// The configuration version it was planned at.
        conf_ver: u64,
        /// The voters both shards must have.
        voters: Vec<NodeId>,
        /// The proposing leader's clock (ms since the epoch): how old an
        /// abandoned freeze is.
        at_ms: u64,
    },
    /// Merge, step 2, on the left shard: take over `right`'s range (its
    /// data already sits in the shared data column family on every
    /// replica) and its client sessions, in one replicated step. Refused
    /// unless the left shard is still at range version `version`, adjacent
    /// to `right`, with the same voters and no learners. Each replica
    /// checks that its local replica of `right` applied the freeze at
    /// index `frozen_at`; then that replica is retired.
    CommitMerge {
        /// The right shard, as frozen.
        right: ShardDescriptor,
        /// The log index of the right shard's freeze.
        frozen_at: u64,
        /// The left shard's range version the merge was planned at.
        version: u64,
    },
    /// On the left shard: make sure no [`Command::CommitMerge`] planned
    /// before this entry applies from now on (the range version grows),
    /// unless the shard starting at `right_start` was merged already
    /// (answered [`CommandResponse::Merged`]). Lets a freeze be lifted
    /// safely.
    CancelMerge {
        /// The first key of the right shard.
        right_start: Vec<u8>,
    },
    /// On the right shard: lift a freeze for a merge into `into` (after
    /// the left shard refused or cancelled the merge).
    AbortMerge {
        /// The left neighbour named by the freeze.
        into: ShardId,
    },
    /// Meta shard only: forget the route record of `shard`, merged into
    /// its left neighbour, for good (later reports of it are ignored).
    RetireRoute {
        /// The merged shard.
        shard: ShardId,
    },
}

/// Milliseconds since the Unix epoch by this machine's clock (0 before
/// it): the time stamps of session writes and load reports.
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Most reports in one [`Command::RecordLoad`].
pub const LOAD_REPORTS_MAX: usize = 256;

/// One shard's load as its leader measured it, recorded in the meta shard
/// ([`Command::RecordLoad`]). Rates are decayed over about 10 s and rounded
/// to whole units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// The shard.
    pub shard: ShardId,
    /// The reporting leader's node.
    pub node: NodeId,
    /// When it was measured (the reporter's wall clock, ms since the Unix epoch).
    pub at_ms: u64,
    /// Keys read per second.
    pub reads_per_s: u64,
    /// Write operations per second.
    pub writes_per_s: u64,
    /// Key and value bytes written per second.
    pub write_bytes_per_s: u64,
    /// Approximate bytes of the shard's data on the leader's node.
    pub size_bytes: u64,
}

/// A right shard's freeze for a merge, as its replicas keep it (in
/// `shard_meta` and in snapshots).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeMarker {
    /// The left neighbour taking the range.
    pub into: ShardId,
    /// The freeze entry's log index.
    pub at: u64,
    /// The proposing leader's clock when it froze (ms since the epoch).
    pub at_ms: u64,
}

impl Command {
    /// A single put.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Command::Write {
            ops: vec![Op::Put {
                key: key.into(),
                value: value.into(),
            }],
        }
    }

    /// A single delete.
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Command::Write {
            ops: vec![Op::Delete { key: key.into() }],
        }
    }

    /// Checks every operation and the batch against [`crate::limits`].
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            Command::Write { ops } | Command::SessionWrite { ops, .. } => validate_ops(ops),
            Command::Split { key, .. } => limits::check_key(key),
            Command::CancelMerge { right_start, .. } => limits::check_key(right_start),
            Command::RecordLoad { reports } if reports.len() > LOAD_REPORTS_MAX => {
                Err(LimitError::BatchOps {
                    ops: reports.len(),
                    max: LOAD_REPORTS_MAX,
                })
            }
            Command::PrepareMerge { .. }
            | Command::CommitMerge { .. }
            | Command::AbortMerge { .. }
            | Command::RetireRoute { .. }
            | Command::AllocShardId
            | Command::RecordRoutes { .. }
            | Command::RecordLoad { .. }
            | Command::Noop
            | Command::Digest => Ok(()),
        }
    }
}

/// Checks a batch of operations against [`crate::limits`]: 1..=1024
/// operations, each key and value within bounds, at most 4 MiB in all.
pub fn validate_ops(ops: &[Op]) -> Result<(), LimitError> {
    if ops.is_empty() || ops.len() > BATCH_OPS_MAX {
        return Err(LimitError::BatchOps {
            ops: ops.len(),
            max: BATCH_OPS_MAX,
        });
    }
    let mut bytes = 0usize;
    for op in ops {
        op.validate()?;
        bytes += op.payload_bytes();
    }
    if bytes > BATCH_BYTES_MAX {
        return Err(LimitError::BatchBytes {
            bytes,
            max: BATCH_BYTES_MAX,
        });
    }
    Ok(())
}

/// The outcome of one [`Op`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    /// A put happened. `prev` is the value it replaced for an
    /// [`Op::Swap`]; a plain [`Op::Put`] does not read it and says `None`.
    Put {
        /// The previous value, if any (swaps only).
        prev: Option<Vec<u8>>,
    },
    /// A delete happened; `prev` is the value it removed.
    Delete {
        /// The previous value, if any.
        prev: Option<Vec<u8>>,
    },
    /// A compare-and-swap was evaluated.
    Cas {
        /// Whether the swap happened.
        succeeded: bool,
        /// The value before the operation (what `expected` was compared with).
        current: Option<Vec<u8>>,
    },
}

/// A short summary for logs (openraft prints entries): the first key of a
/// write, escaped, and how many operations it has; never values.
impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use shard_router::descriptor::escape;
        match self {
            Command::Write { ops } => match ops.first() {
                Some(op) => write!(f, "write({} ops, first {})", ops.len(), escape(op.key())),
                None => write!(f, "write(0 ops)"),
            },
            Command::SessionWrite { stamp, ops, .. } => write!(
                f,
                "write({} ops, first {}, client {:032x} seq {})",
                ops.len(),
                ops.first().map_or_else(String::new, |op| escape(op.key())),
                stamp.client,
                stamp.seq
            ),
            Command::Split {
                key,
                child,
                version,
            } => write!(
                f,
                "split(at {}, child {child}, version {version})",
                escape(key)
            ),
            Command::AllocShardId => write!(f, "alloc-shard-id"),
            Command::Noop => write!(f, "noop"),
            Command::Digest => write!(f, "digest"),
            Command::RecordRoutes { descriptors } => {
                write!(f, "record-routes({} descriptors)", descriptors.len())
            }
            Command::PrepareMerge { into, version, .. } => {
                write!(f, "prepare-merge(into {into}, version {version})")
            }
            Command::CommitMerge {
                right,
                frozen_at,
                version,
            } => write!(
                f,
                "commit-merge({} frozen at {frozen_at}, version {version})",
                right.id
            ),
            Command::CancelMerge { right_start } => {
                write!(f, "cancel-merge(at {})", escape(right_start))
            }
            Command::AbortMerge { into } => write!(f, "abort-merge(into {into})"),
            Command::RetireRoute { shard } => write!(f, "retire-route({shard})"),
            Command::RecordLoad { reports } => write!(f, "record-load({} shards)", reports.len()),
        }
    }
}

/// What applying one log entry produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum CommandResponse {
    /// A blank or membership entry: nothing to report.
    #[default]
    Empty,
    /// The results of a [`Command::Write`], one per operation, in order.
    Write(Vec<OpResult>),
    /// The command named a key outside the shard's range at the time it was
    /// applied (the range changed, e.g. by a split); nothing was written.
    KeyNotInRange {
        /// The first offending key.
        key: Vec<u8>,
    },
    /// A [`Command::Split`] took effect.
    Split {
        /// The parent, shrunk.
        left: ShardDescriptor,
        /// The new shard.
        right: ShardDescriptor,
    },
    /// A [`Command::Split`] was refused; nothing changed.
    SplitRefused {
        /// Why.
        reason: String,
        /// The shard's descriptor as it is.
        current: ShardDescriptor,
    },
    /// A [`Command::AllocShardId`] handed out this id.
    Allocated(ShardId),
    /// A [`Command::RecordRoutes`] was applied.
    Recorded,
    /// The command cannot be carried out yet (nothing changed): e.g. an id
    /// allocation before the meta shard holds the bootstrap routes.
    NotReady(String),
    /// A [`Command::SessionWrite`] applied earlier, whose results were too
    /// large to keep: it took effect once; nothing was applied now.
    AppliedEarlier,
    /// A [`Command::SessionWrite`] its client had given up on (below what
    /// it acknowledged) or with a malformed stamp: nothing was applied.
    Abandoned,
    /// The shard is frozen for a merge into `into`: nothing was applied.
    Frozen {
        /// The left neighbour taking the range.
        into: ShardId,
    },
    /// A [`Command::PrepareMerge`] took effect (or was in place already).
    MergePrepared {
        /// The freeze entry's log index.
        at: u64,
        /// The frozen shard.
        descriptor: ShardDescriptor,
    },
    /// The merge happened: the left shard with the whole range.
    Merged {
        /// The left shard, grown.
        left: ShardDescriptor,
    },
    /// A merge step was refused; nothing changed.
    MergeRefused {
        /// Why.
        reason: String,
    },
    /// A [`Command::CancelMerge`] or [`Command::AbortMerge`] took effect:
    /// the merge cannot happen any more, or the freeze is lifted.
    MergeCancelled,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_batches() {
        assert!(Command::put("k", "v").validate().is_ok());
        assert!(matches!(
            Command::Write { ops: vec![] }.validate(),
            Err(LimitError::BatchOps { ops: 0, .. })
        ));
        let many = (0..=BATCH_OPS_MAX)
            .map(|i| Op::Delete {
                key: i.to_be_bytes().to_vec(),
            })
            .collect();
        assert!(matches!(
            Command::Write { ops: many }.validate(),
            Err(LimitError::BatchOps { .. })
        ));
        let big = (0..5)
            .map(|i| Op::Put {
                key: vec![i],
                value: vec![0; limits::VALUE_BYTES_MAX],
            })
            .collect();
        assert!(matches!(
            Command::Write { ops: big }.validate(),
            Err(LimitError::BatchBytes { .. })
        ));
        let bad_cas = Command::Write {
            ops: vec![Op::Cas {
                key: b"k".to_vec(),
                expected: None,
                new: Some(vec![0; limits::VALUE_BYTES_MAX + 1]),
            }],
        };
        assert!(matches!(
            bad_cas.validate(),
            Err(LimitError::ValueSize { .. })
        ));
    }
}
