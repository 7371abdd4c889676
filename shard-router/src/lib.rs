//! `shard-router`: the pure data structures of Tessera's range routing.
//!
//! Nothing here does I/O, spawns tasks or reads a clock, so every rule can be
//! unit- and property-tested on plain data.
//!
//! - [`ids`]: the newtype identifiers `ShardId` and `NodeId`.
//! - [`descriptor`]: a shard's key range, epoch and descriptor.
#![warn(missing_docs)]

pub mod descriptor;
pub mod ids;

pub use descriptor::{Epoch, KeyRange, ShardDescriptor};
pub use ids::{NodeId, ShardId};
