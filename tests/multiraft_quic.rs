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

/// What node 2 sent and received on its connection to node 1 while node 1
/// sent it `n` one-way messages one at a time, each once node 2 received
/// the one before (Raft's traffic between two nodes at low load, and a
/// client's requests: packets that arrive alone).
async fn acks_for_one_way_traffic(threshold: u32, n: usize) -> (u64, u64) {
    use tessera::net::coalesce::Urgency;
    use tessera::NodeId;
    let cfg = tessera::net::TransportConfig {
        ack_eliciting_threshold: threshold,
        ..Default::default()
    };
    // Two bare transports (no Raft loop behind them).
    let mut ts = harness::quic::start_transports(2, cfg).await;
    let one = ts.remove(&1).expect("node 1").transport;
    let two = ts.remove(&2).expect("node 2").transport;
    let received = || {
        two.peer_quic_stats(NodeId(1))
            .expect("node 2 has a connection")
            .udp_rx
            .datagrams
    };
    let before = two
        .peer_quic_stats(NodeId(1))
        .expect("node 2 has a connection");
    for i in 0..n {
        let seen = received();
        // Not a valid batch frame: node 2's loop-less inbound drops it, and
        // its QUIC stack acknowledges it all the same.
        one.send(
            NodeId(2),
            ShardId(u64::MAX),
            vec![i as u8; 100],
            Urgency::Urgent,
            DEADLINE,
        )
        .await
        .expect("send");
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while received() == seen {
            assert!(
                tokio::time::Instant::now() < deadline,
                "node 2 received message {i} within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    let after = two.peer_quic_stats(NodeId(1)).unwrap();
    one.shutdown();
    two.shutdown();
    (
        after.frame_tx.acks - before.frame_tx.acks,
        after.udp_rx.datagrams - before.udp_rx.datagrams,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_asks_its_peers_for_fewer_acknowledgements() {
    // QUIC's own rule (threshold 1): an acknowledgement for about every
    // other packet; at 32, one per 33 packets, or per 25 ms.
    let (acks_standard, rx_standard) = acks_for_one_way_traffic(1, 200).await;
    let (acks_sparse, rx_sparse) = acks_for_one_way_traffic(32, 200).await;
    eprintln!(
        "threshold 1: {acks_standard} ACKs for {rx_standard} packets; 32: {acks_sparse} for {rx_sparse}"
    );
    assert!(
        rx_standard >= 200 && rx_sparse >= 200,
        "each message travels in a packet of its own: {rx_standard}, {rx_sparse}"
    );
    assert!(
        acks_standard * 3 >= rx_standard,
        "threshold 1 acknowledges about every other packet: {acks_standard} ACKs for {rx_standard} packets"
    );
    assert!(
        acks_sparse * 4 <= rx_sparse,
        "threshold 32 acknowledges far fewer: {acks_sparse} ACKs for {rx_sparse} packets"
    );
}
