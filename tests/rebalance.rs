//! Rebalancing a live cluster (issue: rebalance tool): 3 nodes with 64
//! shards, two nodes join, the planner's steps run through the client's
//! admin API while clients write; every node ends within ±1 of the mean
//! replica and leader counts, clients see no errors and lose nothing; the
//! plan for a balanced cluster is empty.

mod common;

use common::cluster::{init_tracing, TestCluster, Timings};
use common::load::{wait_ops, Load};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tessera::client::ClientOptions;
use tessera::meta;
use tessera::rebalance;
use tessera::shard_router::planner::{self, PlannerConfig};
use tessera::{Client, ShardId};

const WAIT: Duration = Duration::from_secs(120);

fn client(c: &TestCluster) -> Client {
    let issued = c.ca.issue_admin("test").unwrap();
    let opts = ClientOptions {
        deadline: Duration::from_secs(90),
        ..ClientOptions::default()
    };
    Client::from_identity(&c.ca.identity(&issued), c.config_addrs(), opts).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_join_and_rebalance_evens_out_replicas_and_leaders() {
    init_tracing();
    let mut c = TestCluster::start(
        &[1, 2, 3],
        &[],
        Some((64, vec![1, 2, 3])),
        Timings::many_active_groups(),
    )
    .await;
    for s in 1..=64 {
        c.wait_leader(ShardId(s), WAIT).await.unwrap();
    }
    c.wait_leader(meta::META_SHARD, WAIT).await.unwrap();
    let cl = client(&c);
    // A 3-node cluster with 3 replicas per shard is balanced in replicas;
    // data shards' leaders are spread at bootstrap, and the meta shard's
    // (led by the first node) may take one transfer.
    let cfg = PlannerConfig::default();
    let state = rebalance::cluster_state(&cl).await.unwrap();
    // The 64 data shards and the meta shard, planned like any other.
    assert_eq!(state.shards.len(), 65);
    let plan = planner::plan(&state, &cfg);
    assert!(
        plan.moves() == 0 && plan.transfers() <= 1,
        "balanced cluster, yet a plan: {:?}",
        plan.steps
    );

    let load = Load::start(&cl, 4, 64);
    wait_ops(&load, 100, WAIT).await;
    c.add_node(4).await;
    c.add_node(5).await;
    c.wait_until("every node knows every other", WAIT, |c| {
        c.up().all(|n| n.transport().peer_ids().len() == 4)
    })
    .await
    .unwrap();
    let summary = rebalance::rebalance(
        &cl,
        &cfg,
        60,
        Arc::new(AtomicBool::new(false)),
        Arc::new(rebalance::Quiet),
    )
    .await
    .unwrap();
    tracing::info!(?summary, "rebalanced");
    assert!(summary.balanced, "the plan came out empty: {summary:?}");
    assert!(
        summary.moves >= 60,
        "replicas moved onto the new nodes: {summary:?}"
    );
    wait_ops(&load, 100, WAIT).await;
    let r = load.finish().await;
    r.assert_no_errors();
    r.assert_acknowledged_readable(&cl).await;
    let after = rebalance::cluster_state(&cl).await.unwrap();
    let counts = rebalance::counts(&after);
    let n = counts.len() as f64;
    assert_eq!(counts.len(), 5);
    let mean_r = counts.values().map(|c| c.0).sum::<usize>() as f64 / n;
    let mean_l = counts.values().map(|c| c.1).sum::<usize>() as f64 / n;
    for (node, (reps, leads)) in &counts {
        assert!(
            (*reps as f64 - mean_r).abs() <= 1.0,
            "{node}: {reps} replicas, mean {mean_r}"
        );
        assert!(
            (*leads as f64 - mean_l).abs() <= 1.0,
            "{node}: {leads} leaders, mean {mean_l}"
        );
    }
    assert_eq!(
        counts.values().map(|c| c.0).sum::<usize>(),
        65 * 3,
        "still 3 replicas each"
    );
    // Counts are at a fixpoint (a dry run may still shift load, which the
    // decaying rates keep changing).
    let im = planner::imbalance(&after);
    assert!(im.is_balanced(), "balanced: {im:?}");
    c.shutdown().await;
}

/// `[rebalance] auto = true` in every node's file: nobody runs
/// `tessera-ctl rebalance`, yet when a node joins, the meta shard's leader
/// plans and moves replicas and leaderships onto it (with its own node
/// certificate) until counts are within ±1 of the mean, while a client
/// writes without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_rebalance_by_themselves_when_configured() {
    init_tracing();
    let t = Timings {
        rebalance: tessera::node::RebalanceConfig {
            auto: true,
            interval_ms: 1000,
            max_concurrent_moves: 4,
        },
        ..Timings::many_active_groups()
    };
    let mut c = TestCluster::start(&[1, 2, 3], &[], Some((16, vec![1, 2, 3])), t).await;
    for s in 1..=16 {
        c.wait_leader(ShardId(s), WAIT).await.unwrap();
    }
    c.wait_leader(meta::META_SHARD, WAIT).await.unwrap();
    let cl = client(&c);
    let load = Load::start(&cl, 2, 16);
    wait_ops(&load, 50, WAIT).await;
    c.add_node(4).await;
    let settled = common::wait::until("the cluster balances itself onto n4", WAIT, || async {
        let st = rebalance::cluster_state(&cl)
            .await
            .map_err(|e| e.to_string())?;
        let counts = rebalance::counts(&st);
        let n4 = counts.get(&tessera::NodeId(4)).copied().unwrap_or_default();
        let im = planner::imbalance(&st);
        // 17 shards × 3 replicas over 4 nodes: 12.75 each; 4.25 leaders
        // (and no move half done: still 3 replicas each).
        let total: usize = counts.values().map(|c| c.0).sum();
        if counts.len() == 4 && im.is_balanced() && n4.0 >= 12 && n4.1 >= 4 && total == 17 * 3 {
            Ok(counts)
        } else {
            Err(format!("{counts:?} {im:?}"))
        }
    })
    .await
    .unwrap();
    tracing::info!(?settled, "balanced by the nodes");
    wait_ops(&load, 50, WAIT).await;
    let r = load.finish().await;
    r.assert_no_errors();
    r.assert_acknowledged_readable(&cl).await;
    c.shutdown().await;
}
