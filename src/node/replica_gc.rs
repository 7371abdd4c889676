//! Replica GC and repair: a node compares the replicas it hosts with the
//! meta shard's table and
//! - destroys replicas that a newer configuration no longer lists (removed
//!   while this node was down, or a drop that failed), after a grace period
//!   in which they stop campaigning and apply nothing;
//! - creates empty replicas of shards the table lists on this node that it
//!   does not host (a split it never applied because a snapshot overtook
//!   it, a move whose create step it missed): their own group's leader then
//!   brings them up to date with a snapshot.
//!
//! The decisions are a pure function ([`plan`]) of the hosted replicas, the
//! table and what was seen last round; [`run`] only gathers and executes.

use super::Node;
use crate::{NodeId, ShardDescriptor, ShardId};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// A replica hosted here, as the GC sees it.
#[derive(Debug, Clone)]
pub(crate) struct Hosted {
    /// Its own descriptor.
    pub descriptor: ShardDescriptor,
    /// Its last applied log index.
    pub applied: u64,
}

/// A replica that looked removed, and when it was first seen so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Suspect {
    /// When first seen removed.
    pub since: Instant,
    /// Its applied index then: a replica that applies anything meanwhile
    /// is still served by a leader.
    pub applied: u64,
}

/// What one round decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Looks removed: stop campaigning, check again later.
    Suspect(ShardId),
    /// No longer looks removed: may campaign again.
    Clear(ShardId),
    /// Removed for the whole grace period: destroy it.
    Destroy(ShardId),
    /// Listed here but not hosted: create an empty replica.
    Create(ShardDescriptor),
}

/// One round's decisions. `tombstones` holds the configuration version of
/// each removed replica's tombstone; `suspects` what earlier rounds saw.
pub(crate) fn plan(
    me: NodeId,
    hosted: &[Hosted],
    table: &[ShardDescriptor],
    tombstones: &HashMap<ShardId, u64>,
    suspects: &HashMap<ShardId, Suspect>,
    now: Instant,
    grace: Duration,
) -> Vec<Action> {
    let table: BTreeMap<ShardId, &ShardDescriptor> = table.iter().map(|d| (d.id, d)).collect();
    // A set: 10,000 hosted replicas each looked up in a list made every
    // pass quadratic (the largest cost of an idle 10,000-shard node).
    let hosted_ids: std::collections::HashSet<ShardId> =
        hosted.iter().map(|h| h.descriptor.id).collect();
    let mut out = Vec::new();
    for h in hosted {
        let local = &h.descriptor;
        let removed = table
            .get(&local.id)
            .is_some_and(|m| m.epoch.conf_ver > local.epoch.conf_ver && !m.replicas.contains(&me));
        match (removed, suspects.get(&local.id)) {
            (true, Some(s)) if s.applied == h.applied && now >= s.since + grace => {
                out.push(Action::Destroy(local.id))
            }
            // Still applying (or not long enough): keep watching.
            (true, Some(s)) if s.applied == h.applied => {}
            (true, _) => out.push(Action::Suspect(local.id)),
            (false, Some(_)) => out.push(Action::Clear(local.id)),
            (false, None) => {}
        }
    }
    for (id, m) in &table {
        if *id == crate::meta::META_SHARD || !m.replicas.contains(&me) || hosted_ids.contains(id) {
            continue;
        }
        // A tombstone newer than the table's entry: the table lags behind
        // this replica's removal.
        if tombstones.get(id).is_some_and(|t| m.epoch.conf_ver < *t) {
            continue;
        }
        out.push(Action::Create((*m).clone()));
    }
    out
}

/// The table to compare with: this node's meta replica, else any node's.
async fn table(n: &Node, client: &crate::Client) -> Option<Vec<ShardDescriptor>> {
    if let Some(t) = n.meta_routes() {
        return Some(t);
    }
    client.routes().await.ok()
}

/// Runs replica GC and repair every `replica_gc.interval_ms`, and at once
/// when `wake` is notified (a snapshot showed a split this node missed).
pub(crate) async fn run(
    node: Weak<Node>,
    identity: crate::tls::TlsIdentity,
    wake: Arc<tokio::sync::Notify>,
) {
    let (every, grace) = {
        let Some(n) = node.upgrade() else { return };
        let c = n.config.replica_gc;
        (
            Duration::from_millis(c.interval_ms),
            Duration::from_millis(c.grace_ms),
        )
    };
    let mut suspects: HashMap<ShardId, Suspect> = HashMap::new();
    let mut client = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = wake.notified() => {}
        }
        let Some(n) = node.upgrade() else { return };
        if client.is_none() {
            client = n.own_client(&identity);
        }
        let Some(c) = client.as_ref() else { continue };
        let Some(table) = table(&n, c).await else {
            continue;
        };
        let hosted: Vec<Hosted> = n
            .shard_ids()
            .into_iter()
            .filter_map(|s| {
                let descriptor = n.engine.descriptor(s).ok()?;
                // A dormant replica is hosted too (its view is what it
                // fell asleep at): leaving it out would have it "repaired".
                let applied = n.registry.view(s)?.applied;
                Some(Hosted {
                    descriptor,
                    applied,
                })
            })
            .collect();
        let tombstones: HashMap<ShardId, u64> = table
            .iter()
            .filter_map(|d| Some((d.id, n.engine.tombstone(d.id).ok()??)))
            .collect();
        let now = Instant::now();
        for action in plan(n.id, &hosted, &table, &tombstones, &suspects, now, grace) {
            // A batch-system replica removed while this node was down is
            // destroyed as an openraft one is (it cannot win an election
            // meanwhile: pre-vote); it has no campaign switch to flip.
            match action {
                Action::Suspect(s) => {
                    let applied = hosted
                        .iter()
                        .find(|h| h.descriptor.id == s)
                        .map_or(0, |h| h.applied);
                    suspects.insert(
                        s,
                        Suspect {
                            since: now,
                            applied,
                        },
                    );
                    // A dormant replica is rebuilt not campaigning.
                    n.no_campaign.insert(s);
                    if let Some(r) = n.raft(s) {
                        r.runtime_config().elect(false);
                    }
                    tracing::info!(node = %n.id, shard = %s, "replica GC: this replica looks removed; it stops campaigning");
                }
                Action::Clear(s) => {
                    suspects.remove(&s);
                    n.no_campaign.remove(&s);
                    if let Some(r) = n.raft(s) {
                        r.runtime_config().elect(true);
                    }
                }
                Action::Destroy(s) if n.engine.merging(s).is_some() => {
                    // Frozen for a merge: its data is its left neighbour's
                    // to take; only the merge (or its cancellation) ends it.
                    tracing::info!(node = %n.id, shard = %s, "replica GC: a replica frozen for a merge is kept");
                }
                Action::Destroy(s) => {
                    suspects.remove(&s);
                    n.no_campaign.remove(&s);
                    match n.drop_replica_local(s).await {
                        Ok(()) => {
                            n.gc_counters
                                .destroyed
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::info!(node = %n.id, shard = %s, "replica GC: removed replica destroyed");
                        }
                        Err(e) => {
                            tracing::warn!(node = %n.id, shard = %s, error = %e, "replica GC: destroy failed")
                        }
                    }
                }
                Action::Create(d) if n.batch_shard_overlapping(&d.range).is_some() => {
                    // A batch-system replica here still holds part of its
                    // range: the listed shard is a split child this
                    // replica has not applied yet (it creates the child's
                    // batch group when it does). An empty openraft replica
                    // made now would take its place for good.
                    let parent = n.batch_shard_overlapping(&d.range);
                    n.gc_counters
                        .deferred
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(node = %n.id, shard = %d.id, ?parent, "replica repair: not created, a batch-system replica here overlaps it (a split not applied yet)");
                }
                Action::Create(d) => match runs_on_batch(n.id, c, &d).await {
                    None => {
                        tracing::info!(node = %n.id, shard = %d.id, "replica repair: not created yet, no other replica told which Raft system the shard runs on")
                    }
                    Some(batch) => repair(&n, &d, batch).await,
                },
            }
        }
    }
}

/// Which Raft system `d` runs on, as another of its replicas reports it
/// (`None`: none answered with it hosted). A node's configuration says
/// only what its bootstrap created, and an empty replica on the other
/// system would never hear from its group.
async fn runs_on_batch(me: NodeId, c: &crate::client::Client, d: &ShardDescriptor) -> Option<bool> {
    for &peer in d.leader_hint.iter().chain(&d.replicas) {
        if peer == me {
            continue;
        }
        if let Ok(st) = c.node_status(peer).await {
            if let Some(s) = st.shards.iter().find(|s| s.descriptor.id == d.id) {
                return Some(s.batch);
            }
        }
    }
    None
}

/// Creates an empty replica of `d` on its system: its leader brings it up
/// to date (openraft with a snapshot; the batch system from its log, or
/// with a seed when the log was compacted past it).
async fn repair(n: &Node, d: &ShardDescriptor, batch: bool) {
    let created = if batch {
        n.create_batch_replica_local(d).await
    } else {
        n.create_replica_local(d).await
    };
    match created {
        Ok(()) => {
            n.gc_counters
                .repaired
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(node = %n.id, shard = %d.id, range = %d.range, batch, "replica repair: created an empty replica; its leader brings it up to date");
        }
        Err(e) => {
            tracing::warn!(node = %n.id, shard = %d.id, error = %e, "replica repair: create failed")
        }
    }
}

/// Counters of the GC, for metrics.
#[derive(Debug, Default)]
pub(crate) struct GcCounters {
    pub destroyed: std::sync::atomic::AtomicU64,
    pub repaired: std::sync::atomic::AtomicU64,
    pub deferred: std::sync::atomic::AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Epoch, KeyRange};

    fn desc(id: u64, conf_ver: u64, replicas: &[u64]) -> ShardDescriptor {
        let mut d = ShardDescriptor::new(
            ShardId(id),
            KeyRange::full(),
            replicas.iter().map(|&n| NodeId(n)).collect(),
        );
        d.epoch = Epoch {
            version: 1,
            conf_ver,
        };
        d
    }

    fn hosted(id: u64, conf_ver: u64, applied: u64) -> Hosted {
        Hosted {
            descriptor: desc(id, conf_ver, &[1, 2, 3]),
            applied,
        }
    }

    const GRACE: Duration = Duration::from_secs(30);

    #[test]
    fn a_removed_replica_is_destroyed_only_after_a_quiet_grace_period() {
        let me = NodeId(3);
        let t0 = Instant::now();
        let table = vec![desc(7, 5, &[1, 2, 4])];
        let h = vec![hosted(7, 3, 100)];
        let none = HashMap::new();
        let mut suspects = HashMap::new();
        assert_eq!(
            plan(me, &h, &table, &none, &suspects, t0, GRACE),
            vec![Action::Suspect(ShardId(7))]
        );
        suspects.insert(
            ShardId(7),
            Suspect {
                since: t0,
                applied: 100,
            },
        );
        // Not long enough yet.
        assert!(plan(me, &h, &table, &none, &suspects, t0 + GRACE / 2, GRACE).is_empty());
        // It applied something meanwhile: a leader still serves it.
        let busy = vec![hosted(7, 3, 101)];
        assert_eq!(
            plan(me, &busy, &table, &none, &suspects, t0 + GRACE, GRACE),
            vec![Action::Suspect(ShardId(7))]
        );
        assert_eq!(
            plan(me, &h, &table, &none, &suspects, t0 + GRACE, GRACE),
            vec![Action::Destroy(ShardId(7))]
        );
    }

    #[test]
    fn a_lagging_table_never_destroys_or_recreates() {
        let me = NodeId(3);
        let t0 = Instant::now();
        let none = HashMap::new();
        // The table is older than the replica (a learner being added, or
        // the table not updated yet): nothing to do.
        let table = vec![desc(7, 3, &[1, 2, 4])];
        assert!(plan(me, &[hosted(7, 3, 1)], &table, &none, &none_s(), t0, GRACE).is_empty());
        // A suspect the table no longer condemns is cleared.
        let mut s = HashMap::new();
        s.insert(
            ShardId(7),
            Suspect {
                since: t0,
                applied: 1,
            },
        );
        assert_eq!(
            plan(me, &[hosted(7, 3, 1)], &table, &none, &s, t0 + GRACE, GRACE),
            vec![Action::Clear(ShardId(7))]
        );
        // Removed here at conf_ver 6: a table entry from conf_ver 5 still
        // naming this node is older than the removal.
        let mut tomb = HashMap::new();
        tomb.insert(ShardId(8), 6);
        let table = vec![desc(8, 5, &[1, 2, 3])];
        assert!(plan(me, &[], &table, &tomb, &none_s(), t0, GRACE).is_empty());
        let table = vec![desc(8, 6, &[1, 2, 3])];
        assert_eq!(
            plan(me, &[], &table, &tomb, &none_s(), t0, GRACE),
            vec![Action::Create(desc(8, 6, &[1, 2, 3]))]
        );
    }

    #[test]
    fn a_shard_listed_here_but_not_hosted_is_created() {
        let me = NodeId(3);
        let table = vec![desc(1, 1, &[1, 2, 3]), desc(2, 1, &[1, 2, 4])];
        let acts = plan(
            me,
            &[hosted(1, 1, 5)],
            &table,
            &HashMap::new(),
            &none_s(),
            Instant::now(),
            GRACE,
        );
        assert!(acts.is_empty(), "{acts:?}");
        let table = vec![desc(1, 1, &[1, 2, 3]), desc(9, 1, &[1, 2, 3])];
        let acts = plan(
            me,
            &[hosted(1, 1, 5)],
            &table,
            &HashMap::new(),
            &none_s(),
            Instant::now(),
            GRACE,
        );
        assert_eq!(acts, vec![Action::Create(desc(9, 1, &[1, 2, 3]))]);
    }

    fn none_s() -> HashMap<ShardId, Suspect> {
        HashMap::new()
    }
}
