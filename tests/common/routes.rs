//! Route and data checks shared by the split and merge tests.

use super::cluster::TestCluster;
use std::collections::BTreeMap;
use std::time::Duration;
use tessera::shard_router::RangeMap;
use tessera::{Client, NodeId, ShardDescriptor, ShardId};

const WAIT: Duration = Duration::from_secs(60);

/// The hosted data shards' descriptors of every running node, checked to
/// be disjoint on each node.
pub fn hosted(c: &TestCluster) -> BTreeMap<NodeId, Vec<ShardDescriptor>> {
    let mut out = BTreeMap::new();
    for n in c.up() {
        // A replica frozen for a merge is left out: its left neighbour
        // covers it from the merge until the node drops it.
        let descs: Vec<ShardDescriptor> = n
            .shard_ids()
            .into_iter()
            .filter(|s| n.engine().merging(*s).is_none())
            .filter_map(|s| n.engine().descriptor(s).ok())
            .collect();
        for (i, a) in descs.iter().enumerate() {
            for b in &descs[i + 1..] {
                let overlap = (b.range.end.is_empty() || a.range.start < b.range.end)
                    && (a.range.end.is_empty() || b.range.start < a.range.end);
                assert!(
                    !overlap,
                    "{}: {} {} overlaps {} {}",
                    n.id(),
                    a.id,
                    a.range,
                    b.id,
                    b.range
                );
            }
        }
        out.insert(n.id(), descs);
    }
    out
}

/// Checks that the routes tile the key space, that every replica agrees
/// with them, and that every acknowledged write is read back, by key and by
/// one full scan.
pub async fn check_ownership_and_data(
    c: &TestCluster,
    cl: &Client,
    acked: &BTreeMap<Vec<u8>, Vec<u8>>,
) -> Vec<ShardDescriptor> {
    // Routes tile the key space once the splits in flight are recorded (a
    // node may already know a parent's shrunk range but not its child yet:
    // a client meeting that gap asks again).
    let routes = super::wait::until("routes tile the key space", WAIT, || async {
        let routes = cl.routes().await.map_err(|e| e.to_string())?;
        let map = RangeMap::new(routes.clone()).map_err(|e| format!("{e:?}"))?;
        map.check().map_err(|e| format!("{e:?}"))?;
        Ok(routes)
    })
    .await
    .unwrap();
    // Every replica's descriptor is the routed one (after catching up).
    c.wait_until("replicas agree with the routes", WAIT, |c| {
        hosted(c).values().flatten().all(|d| {
            routes
                .iter()
                .any(|r| r.id == d.id && r.range == d.range && r.epoch.version == d.epoch.version)
        })
    })
    .await
    .unwrap();
    for (k, v) in acked {
        let owners: Vec<ShardId> = routes
            .iter()
            .filter(|d| d.range.contains(k))
            .map(|d| d.id)
            .collect();
        assert_eq!(owners.len(), 1, "key {k:?} owned by {owners:?}");
        assert_eq!(
            cl.get(k).await.unwrap().as_ref(),
            Some(v),
            "acknowledged write {k:?}"
        );
    }
    let all = cl.scan(b"", b"", 100_000).await.unwrap();
    let want: Vec<(Vec<u8>, Vec<u8>)> = acked.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    assert_eq!(all.len(), want.len(), "full scan has every key once");
    assert_eq!(all, want, "full scan equals the model");
    routes
}
