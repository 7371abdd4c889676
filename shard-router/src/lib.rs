//! `shard-router`: the pure data structures of Tessera's range routing.
//!
//! Nothing here does I/O, spawns tasks or reads a clock, so every rule can be
//! unit- and property-tested on plain data.
//!
//! - [`ids`]: the newtype identifiers `ShardId` and `NodeId`.
//! - [`descriptor`]: a shard's key range, epoch and descriptor.
//! - [`range_map`]: which shard owns which key (no gap, no overlap).
//! - [`route_cache`]: a client's possibly stale view, corrected from typed errors.
//! - [`ownership`]: which hosted replica of one node owns which keys.
//! - [`planner`]: the pure rebalance planner (replica moves, leader transfers, splits).
#![warn(missing_docs)]

pub mod descriptor;
pub mod ids;
pub mod ownership;
pub mod planner;
pub mod range_map;
pub mod route_cache;

pub use descriptor::{Epoch, KeyRange, ShardDescriptor};
pub use ids::{NodeId, ShardId};
pub use ownership::{Claim, Ownership};
pub use planner::{
    apply_step, check_step, imbalance, plan, ClusterState, Imbalance, NodeState, Plan,
    PlannerConfig, ShardState, Step,
};
pub use range_map::{RangeMap, RangeMapError};
pub use route_cache::RouteCache;
