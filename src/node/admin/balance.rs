//! Automatic rebalancing (`[rebalance] auto = true` in `node.toml`): the
//! node leading the meta shard runs the planner and executor of
//! `tessera-ctl rebalance` ([`crate::rebalance`]), one pass every
//! `interval_ms`, through a client holding this node's own certificate.
//!
//! Only the meta shard's leader plans, and a pass stops once its node no
//! longer leads it, so two nodes plan at once only around a leadership
//! change. Every step is an admin request that the cluster re-checks (two
//! moves of one shard are serialized on its leader, and a move never
//! lowers the shard's voter count), so overlapping passes cost a refused
//! step, never a lost replica.

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
    let mut client: Option<crate::Client> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(cfg.interval_ms)).await;
        {
            let Some(n) = node.upgrade() else { return };
            if !leads_meta(&n) {
                continue;
            }
            if client.is_none() {
                client = n.own_client(&identity);
            }
            // (The node is not held during the pass: it may stop meanwhile.)
        }
        let Some(c) = client.as_ref() else { continue };
        // A pass stops (steps in flight finish, no new one starts) once
        // this node no longer leads the meta shard: the new leader runs
        // its own passes. A node stopping aborts this task, pass included.
        let stop = Arc::new(AtomicBool::new(false));
        let pass = rebalance::rebalance(c, &planner, ROUNDS_MAX, stop.clone(), Arc::new(Log));
        tokio::pin!(pass);
        let outcome = loop {
            tokio::select! {
                r = &mut pass => break r,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    if !node.upgrade().is_some_and(|n| leads_meta(&n)) {
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        };
        match outcome {
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

/// Whether `n` leads the meta shard.
fn leads_meta(n: &Node) -> bool {
    n.registry.leads_hosted(meta::META_SHARD)
}
