//! Route bookkeeping: starting groups the engine created, and recording
//! changed descriptors in the meta shard.

use super::*;

/// Starts the groups of shards created by splits applied on this node, and
/// drops the replicas merges retired.
pub(crate) async fn start_created(node: Weak<Node>, signal: Arc<tokio::sync::Notify>) {
    loop {
        {
            let Some(n) = node.upgrade() else { return };
            for shard in n.engine.take_created() {
                if let Err(e) = n.start_group(shard).await {
                    tracing::error!(%shard, error = %e, "could not start a shard created by a split");
                }
            }
            n.drop_retired().await;
        }
        signal.notified().await;
    }
}

/// Keeps the meta shard's table current: every second, the descriptors of
/// the shards this node leads whose epoch it has not recorded yet.
pub(crate) async fn report_routes(node: Weak<Node>) {
    let mut recorded: HashMap<ShardId, crate::Epoch> = HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let Some(n) = node.upgrade() else { return };
        n.lift_abandoned_freezes().await;
        let mut pending = Vec::new();
        for shard in n.shards_led() {
            if let Ok(mut d) = n.engine.descriptor(shard) {
                if recorded.get(&shard) != Some(&d.epoch) {
                    d.leader_hint = Some(n.id);
                    pending.push(d);
                }
            }
        }
        for chunk in pending.chunks(256) {
            let cmd = Command::RecordRoutes {
                descriptors: chunk.to_vec(),
            };
            if n.propose(meta::META_SHARD, cmd, Duration::from_secs(5))
                .await
                .is_ok()
            {
                for d in chunk {
                    recorded.insert(d.id, d.epoch);
                }
            }
        }
    }
}
