//! Automatic rebalancing (`[rebalance] auto = true` in `node.toml`): the
//! node leading the meta shard runs the planner and executor of
//! `tessera-ctl rebalance` ([`crate::rebalance`]), one pass every
//! `interval_ms`, through a client holding this node's own certificate.
//!
//! Only the meta shard's leader plans, so two nodes plan at once only
//! across a leadership change; every step is an idempotent admin request
//! that the cluster re-checks, so overlapping passes cost a refused step,
//! never a wrong one.

use super::*;
use crate::rebalance::{self, Progress};
use shard_router::planner::{PlannerConfig, Step};
use std::sync::atomic::AtomicBool;

/// Most rounds of one pass: a cluster not balanced by then continues at
/// the next interval (with fresh loads).
const ROUNDS_MAX: usize = 50;

/// Logs each step of an automatic pass.
struct Log;

impl Progress for Log {
    fn finished(&self, step: &Step, result: &Result<(), String>) {
        match result {
            Ok(()) => tracing::info!(%step, "automatic rebalance: step done"),
            Err(e) => tracing::warn!(%step, error = %e, "automatic rebalance: step failed"),
        }
    }
}

/// Runs a rebalance pass every `rebalance.interval_ms` while this node
/// leads the meta shard.
pub(crate) async fn auto_rebalance(node: Weak<Node>, identity: crate::tls::TlsIdentity) {
    let cfg = match node.upgrade() {
        Some(n) => n.config.rebalance,
        None => return,
    };
    let planner = PlannerConfig {
        max_concurrent_moves: cfg.max_concurrent_moves,
        ..PlannerConfig::default()
    };
    // Never set: a node stopping aborts this task, and with it the pass
    // (steps in flight are re-checked by the cluster if retried).
    let stop = Arc::new(AtomicBool::new(false));
    let mut client: Option<crate::Client> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(cfg.interval_ms)).await;
        {
            let Some(n) = node.upgrade() else { return };
            let leads_meta = n
                .raft(meta::META_SHARD)
                .is_some_and(|r| leadership(&r, n.id).0);
            if !leads_meta {
                continue;
            }
            if client.is_none() {
                client = n.own_client(&identity);
            }
            // (The node is not held during the pass: it may stop meanwhile.)
        }
        let Some(c) = client.as_ref() else { continue };
        match rebalance::rebalance(c, &planner, ROUNDS_MAX, stop.clone(), Arc::new(Log)).await {
            Ok(s) if s.moves + s.transfers + s.failed > 0 => tracing::info!(
                moves = s.moves,
                transfers = s.transfers,
                bytes_moved = s.bytes_moved,
                failed = s.failed,
                rounds = s.rounds,
                balanced = s.balanced,
                "automatic rebalance pass"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "automatic rebalance: cluster state unreadable"),
        }
    }
}
