//! The batch system between nodes over real QUIC (loopback, mutual TLS):
//! each round's messages for a peer travel as one frame.

#[path = "common/multiraft.rs"]
mod harness;

use harness::quic::QuicCluster;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tessera::multiraft::LoopConfig;
use tessera::ShardId;

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_read_points_over_quic() {
    let groups = 32u64;
    let c = QuicCluster::start(
        3,
        groups,
        LoopConfig {
            tick: Duration::from_millis(20),
            ..LoopConfig::default()
        },
    )
    .await;
    let c = std::sync::Arc::new(c);
    let mut tasks = Vec::new();
    for g in 1..=groups {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..4 {
                let data = format!("g{g}-{i}").into_bytes();
                c.router
                    .propose(&c.loops, ShardId(g), &data, DEADLINE)
                    .await
                    .unwrap_or_else(|e| panic!("group {g} write {i}: {e}"));
            }
            let (node, _) = c
                .router
                .read_index(&c.loops, ShardId(g), DEADLINE)
                .await
                .unwrap_or_else(|e| panic!("group {g} read point: {e}"));
            let applied = c.applied[&node].lock().unwrap()[&ShardId(g)].clone();
            let want: Vec<Vec<u8>> = (0..4).map(|i| format!("g{g}-{i}").into_bytes()).collect();
            assert_eq!(
                applied, want,
                "the read point's node applied every write, in order"
            );
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    // Every node sent its Raft traffic over its transport.
    for (id, m) in &c.metrics {
        assert!(
            m.frames_sent.load(Ordering::Relaxed) > 0,
            "node {id} sent no frame over QUIC"
        );
    }
}
