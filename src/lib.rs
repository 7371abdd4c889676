//! Tessera: a multi-raft sharded key-value storage engine.
//!
//! Map of the crate:
//!
//! - [`limits`]: the size limits every edge enforces (key, value, batch, frame).
//! - [`command`]: the replicated commands (put, delete, compare-and-swap, batches)
//!   and their outcomes; what a shard's state machine applies.
//! - [`storage`] (feature `server`): one RocksDB per node shared by every shard
//!   replica, openraft `storage-v2` log and state-machine stores, the node-wide
//!   group-commit log writer, logical range snapshots.
//! - [`raft`] (feature `server`): the openraft type configuration.
//! - [`meta`]: the meta shard's id and the layout of its route records
//!   (above every user key).
//! - [`digest`]: replica digests at one log index (`tessera-ctl verify`).
//! - [`session`]: client sessions, which make retried writes apply exactly
//!   once (pure: the per-shard table every replica keeps alike).
//! - [`api`]: the client protocol (requests, responses, typed routing errors).
//! - [`client`]: [`Client`], the async client library (range routing,
//!   route cache corrected by typed errors, retries under a deadline).
//! - [`cluster_file`]: `cluster.toml`, what a client needs to reach a cluster.
//! - [`wire`]: bounded length-prefixed frames.
//! - [`tls`]: the cluster CA, node and client certificates, mutual-TLS
//!   configurations for QUIC.
//! - [`net`] (feature `server`): the QUIC transport between nodes: one
//!   connection per node pair, coalesced Raft traffic, snapshot streams.
//! - [`node`] (feature `server`): a node: storage + transport + the registry
//!   of its shards' Raft groups; its TOML configuration.
//! - [`metrics`]: node counters as Prometheus text (served by nodes, read by
//!   `tessera-ctl bench`).
//!
//! Identifiers and shard descriptors come from the pure `shard-router` crate and
//! are re-exported here.
#![warn(missing_docs)]

pub mod api;
pub mod client;
pub mod cluster_file;
pub mod command;
pub mod digest;
pub mod limits;
pub mod meta;
pub mod metrics;
#[cfg(feature = "server")]
pub mod multiraft;
#[cfg(feature = "server")]
pub mod net;
#[cfg(feature = "server")]
pub mod node;
#[cfg(feature = "server")]
pub mod raft;
pub mod rebalance;
pub mod session;
#[cfg(feature = "server")]
pub mod storage;
pub mod tls;
pub mod wire;

pub use client::Client;
pub use shard_router;
pub use shard_router::{Epoch, KeyRange, NodeId, ShardDescriptor, ShardId};
