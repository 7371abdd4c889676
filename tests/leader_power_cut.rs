//! A leader's power cut. Applies and the commit index are written without
//! a sync of their own (the log is durable; they are replayed from it). A
//! leader that restarts quickly must not carry on as leader of the same
//! term (openraft's "leader restore"): its state machine may have lost
//! applies, and nothing would tell it the commit index it knows is stale,
//! so a linearizable read could answer from before an acknowledged write.
//!
//! Three real `tessera serve` processes; the leader is SIGKILLed right
//! after a few writes (unsynced WAL bytes live in the process, so its
//! unsynced applies and commit index are lost as in a power cut) and
//! restarted at once, well inside the election timeout. It must not take
//! up leadership of its old term again (openraft's leader restore): only a
//! new election makes it leader. Every acknowledged write must read back,
//! and every replica must agree. Runs with the data shard on the batch
//! system and on openraft.
#![cfg(feature = "failpoints")]

#[allow(dead_code)]
#[path = "common/procs.rs"]
mod procs;

#[allow(dead_code)]
#[path = "common/wait.rs"]
mod wait;

use procs::{admin_client, loopback_nodes, start_on_loopback, write_cluster};
use std::time::Duration;
use tessera::api::ShardStatus;
use tessera::node::NodeConfig;
use tessera::{Client, NodeId, ShardId};

/// `node`'s status of `shard`.
async fn shard_on(client: &Client, node: NodeId, shard: ShardId) -> Result<ShardStatus, String> {
    let status = client.node_status(node).await.map_err(|e| e.to_string())?;
    status
        .shards
        .into_iter()
        .find(|s| s.descriptor.id == shard)
        .ok_or_else(|| format!("{node} hosts no replica of {shard}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_lost_its_unsynced_tail_does_not_lead_the_same_term_again() {
    power_cut(false).await;
}

/// The same with the data shard on the batch system
/// (`raft.batch_data_shards`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_leader_that_lost_its_unsynced_tail_does_not_lead_the_same_term_again() {
    power_cut(true).await;
}

/// The two runs take turns (each runs three processes).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The power cut with the data shard on the batch system or on openraft.
async fn power_cut(batch: bool) {
    let _turn = TURN.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let nodes = loopback_nodes(3);
    // One data shard, initialised (and so led) by n1.
    let (ca, configs) = write_cluster(dir.path(), "power-cut", &nodes, 1);
    for path in &configs {
        // Elections only long after a restart: the restarted leader is back
        // before its followers would elect anyone else. No quiescence: the
        // leader heartbeats throughout.
        let mut c = NodeConfig::load(path).unwrap();
        c.raft.election_timeout_ms_min = 6000;
        c.raft.election_timeout_ms_max = 9000;
        c.raft.quiesce_after_ms = 0;
        c.raft.batch_data_shards = batch;
        std::fs::write(path, c.to_toml()).unwrap();
    }
    let mut procs = start_on_loopback(&nodes, configs);
    let client = admin_client(&ca, &nodes, Duration::from_secs(60), Duration::from_secs(5));
    client.put(b"before", b"1").await.expect("service up");
    let shard = client
        .routes()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.range.contains(b"k"))
        .expect("a shard for the keys");
    assert_eq!(
        shard.replicas.first(),
        Some(&NodeId(1)),
        "n1 initialises the shard"
    );

    // Writes through n1, the leader: each is durable in the log, but its
    // apply and the commit index n1 records are not synced by themselves.
    let mut acked = Vec::new();
    for i in 0..6u32 {
        let (k, v) = (format!("k{i}").into_bytes(), format!("v{i}").into_bytes());
        client.put(&k, &v).await.expect("write acknowledged");
        acked.push((k, v));
    }
    let before = shard_on(&client, NodeId(1), shard.id).await.unwrap();
    assert_eq!(before.batch, batch, "the shard's Raft system: {before:?}");
    let term_before = before.term;
    // The power cut: n1's unsynced log tail is lost; it is back at once.
    procs[0].sigkill();
    procs[0].start(None);
    // n1 may lead again, but only after winning an election: a restored
    // leader of the old term would serve reads from a state machine that
    // lost its unsynced applies, with no way to tell it is stale.
    let what = format!("n1 knows a leader of {} after its restart", shard.id);
    let status = wait::until(&what, Duration::from_secs(60), || async {
        let s = shard_on(&client, NodeId(1), shard.id).await?;
        match s.leader {
            Some(_) => Ok(s),
            None => Err(format!("{s:?}")),
        }
    })
    .await
    .unwrap();
    assert!(
        status.term > term_before,
        "{:?} leads {} at term {} again after its power cut, without an election (term before: {term_before})",
        status.leader,
        shard.id,
        status.term
    );
    // New writes after the restart, then every acknowledged write reads
    // back (through whichever replica leads now).
    for i in 6..9u32 {
        let (k, v) = (format!("k{i}").into_bytes(), format!("v{i}").into_bytes());
        client.put(&k, &v).await.expect("write acknowledged");
        acked.push((k, v));
    }
    for (k, v) in &acked {
        let got = client.get(k).await.expect("read");
        assert_eq!(
            got.as_deref(),
            Some(v.as_slice()),
            "acknowledged write of {} lost after the leader's power cut",
            String::from_utf8_lossy(k)
        );
    }
    // And the replicas hold the same data (verify compares them at one
    // applied index; a replica still catching up is asked again).
    let what = format!("verify: the replicas of {} agree", shard.id);
    wait::until(&what, Duration::from_secs(60), || async {
        match client.verify_shard(shard.id).await {
            Ok(v) if v.agrees() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap();
}
