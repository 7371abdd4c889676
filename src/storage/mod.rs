//! One RocksDB per node, shared by every shard replica on it.
//!
//! - [`Engine`] is the node-wide handle: it opens the database with one column
//!   family per *kind* of data ([`keys`]), runs the group-commit [`writer`], and
//!   opens per-shard stores.
//! - [`LogStore`] implements openraft's `RaftLogStorage` for one shard.
//! - [`StateMachine`] implements openraft's `RaftStateMachine` for one shard.
//! - [`snapshot`] holds the logical range snapshot file format.
//!
//! Durability contract: a log append is readable when `append` returns and
//! durable when its flush callback fires, which happens only after the sync
//! that covers it; a vote is durable before `save_vote` returns. Any failed
//! write or sync fail-stops the engine: nothing is acknowledged after it.

mod config;
mod engine;
mod error;
pub mod keys;
mod log_store;
pub mod log_tail;
pub mod snapshot;
mod state_machine;
mod writer;

pub use config::{CommitMode, StorageConfig};
pub use engine::{AppendHook, Engine, ShardState};
pub use error::StoreError;
pub use log_store::LogStore;
pub use state_machine::{apply_together, export_now, StateMachine};
pub(crate) use writer::Cf;
pub use writer::{StorageStats, WriteInProgress};
