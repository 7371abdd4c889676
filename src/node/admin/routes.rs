//! Route bookkeeping: starting groups the engine created, and recording
//! changed descriptors in the meta shard.

use super::*;
use crate::command::LoadReport;
use crate::node::load;

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

/// Load reports are considered every this many turns of the report loop
/// (seconds).
const LOAD_REPORT_TURNS: u64 = 5;

/// A led shard whose load is idle is looked at again (its size read) at
/// most this often.
const LOAD_RECHECK_IDLE: Duration = Duration::from_secs(60);

/// A busy shard's unchanged load is reported again this often, so a
/// reader can tell a current report from one its leader stopped sending.
const LOAD_REPORT_REFRESH: Duration = Duration::from_secs(60);

/// Keeps the meta shard's table current: every second, the descriptors of
/// the shards this node leads whose epoch it has not recorded yet; every
/// [`LOAD_REPORT_TURNS`] seconds, the load of the shards it leads whose
/// load moved since it last reported it ([`load::load_changed`]).
pub(crate) async fn report_routes(node: Weak<Node>) {
    let mut recorded: HashMap<ShardId, crate::Epoch> = HashMap::new();
    let mut loads = LoadReports::default();
    for turn in 1u64.. {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let Some(n) = node.upgrade() else { return };
        n.lift_abandoned_freezes().await;
        if turn % LOAD_REPORT_TURNS == 0 {
            loads.report(&n).await;
        }
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

/// What this node last reported of the shards it leads, and when it last
/// looked at each.
#[derive(Default)]
struct LoadReports {
    /// shard → (the report the meta shard holds, when it was sent, when
    /// the shard was last looked at).
    last: HashMap<ShardId, (LoadReport, Instant, Instant)>,
}

impl LoadReports {
    /// Reports the led shards whose load moved (or was never reported, or
    /// is busy and was last reported [`LOAD_REPORT_REFRESH`] ago).
    async fn report(&mut self, n: &Node) {
        let now = Instant::now();
        let led = n.shards_led();
        let led_set: std::collections::HashSet<ShardId> = led.iter().copied().collect();
        self.last.retain(|s, _| led_set.contains(s));
        let mut pending = Vec::new();
        for shard in led {
            let rates = n.registry.load.rates(shard);
            let busy = rates.reads_per_s + rates.writes_per_s >= 0.5;
            let last = self.last.get(&shard);
            if !busy && last.is_some_and(|(_, _, seen)| now - *seen < LOAD_RECHECK_IDLE) {
                continue;
            }
            let Ok(d) = n.engine.descriptor(shard) else {
                continue;
            };
            let r = LoadReport {
                shard,
                node: n.id,
                at_ms: crate::command::wall_clock_ms(),
                reads_per_s: rates.reads_per_s.round() as u64,
                writes_per_s: rates.writes_per_s.round() as u64,
                write_bytes_per_s: rates.write_bytes_per_s.round() as u64,
                size_bytes: n.engine.approximate_size(&d.range),
            };
            let due = match last {
                None => true,
                Some((prev, sent, _)) => {
                    load::load_changed(prev, &r) || (busy && now - *sent >= LOAD_REPORT_REFRESH)
                }
            };
            if due {
                pending.push(r);
            } else if let Some(e) = self.last.get_mut(&shard) {
                e.2 = now;
            }
        }
        for chunk in pending.chunks(crate::command::LOAD_REPORTS_MAX) {
            let cmd = Command::RecordLoad {
                reports: chunk.to_vec(),
            };
            if n.propose(meta::META_SHARD, cmd, Duration::from_secs(5))
                .await
                .is_ok()
            {
                for r in chunk {
                    self.last.insert(r.shard, (r.clone(), now, now));
                }
            }
        }
    }
}
