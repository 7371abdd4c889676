//! The client library end to end against a real cluster over QUIC: range
//! routing, scans across shards against a model, stale routes corrected
//! from typed errors, limits enforced by client and server, concurrency.

mod common;

use common::cluster::{init_tracing, TestCluster, Timings};
use common::spread_key as key;
use std::collections::BTreeMap;
use std::time::Duration;
use tessera::api::{ApiError, Request, Response};
use tessera::client::{ClientError, ClientOptions};
use tessera::command::Op;
use tessera::limits::{LimitError, BATCH_OPS_MAX, KEY_BYTES_MAX, VALUE_BYTES_MAX};
use tessera::{Client, NodeId};

const WAIT: Duration = Duration::from_secs(60);

async fn ready(ids: &[u64], shards: u64) -> TestCluster {
    ready_with(ids, shards, Timings::fast()).await
}

async fn ready_with(ids: &[u64], shards: u64, timings: Timings) -> TestCluster {
    let members: Vec<u64> = ids.to_vec();
    let c = TestCluster::start(ids, &[], Some((shards, members)), timings).await;
    c.wait_leaders(WAIT).await.unwrap();
    c
}

fn client(c: &TestCluster) -> Client {
    client_with(c, ClientOptions::default())
}

/// A plain (non-admin) client of every running node.
fn client_with(c: &TestCluster, opts: ClientOptions) -> Client {
    let issued = c.ca.issue_client("test").unwrap();
    let nodes: Vec<(NodeId, std::net::SocketAddr)> = c.up().map(|n| (n.id(), n.addr())).collect();
    Client::from_identity(&c.ca.identity(&issued), nodes, opts).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_across_shards_match_a_model() {
    init_tracing();
    let c = ready(&[1, 2, 3], 16).await;
    let cl = client(&c);
    let mut model = BTreeMap::new();
    for i in 0..400u32 {
        let (k, v) = (key(i), format!("v{i}").into_bytes());
        cl.put(&k, &v).await.unwrap();
        model.insert(k, v);
    }
    for i in (0..400u32).step_by(7) {
        assert!(cl.delete(&key(i)).await.unwrap());
        model.remove(&key(i));
    }
    tracing::info!("phase: full scan, bounded scans, limits");
    let all = cl.scan(b"", b"", 10_000).await.unwrap();
    let want: Vec<_> = model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    assert_eq!(all, want);
    // A range spanning at least 8 of the 16 shards (first bytes 0x10..0xa0).
    let (lo, hi) = (vec![0x10u8], vec![0xa0u8]);
    let spanned: Vec<_> = model
        .range(lo.clone()..hi.clone())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(cl.scan(&lo, &hi, 10_000).await.unwrap(), spanned);
    for limit in [1usize, 5, 40, 150] {
        let got = cl.scan(&lo, &hi, limit).await.unwrap();
        assert_eq!(got, spanned[..limit.min(spanned.len())], "limit {limit}");
    }
    let routes = cl.routes().await.unwrap();
    let spanned_shards = routes
        .iter()
        .filter(|d| d.range.start < hi && (d.range.end.is_empty() || d.range.end > lo))
        .count();
    assert!(spanned_shards >= 8, "{spanned_shards} shards spanned");
    // Each request is one stream whose end both sides read: neither asks
    // the other to stop sending (a STOP_SENDING frame, and the packets it
    // costs, per request). One may still slip through when a stream's end
    // arrives in a packet after its frame, so a tenth is allowed.
    let stats = cl.connection_stats().await;
    assert!(!stats.is_empty(), "the client has connections");
    let requests: u64 = stats.iter().map(|(_, s)| s.frame_tx.stream).sum();
    let stops: u64 = stats
        .iter()
        .map(|(_, s)| s.frame_tx.stop_sending + s.frame_rx.stop_sending)
        .sum();
    assert!(requests >= 458, "{requests} request frames sent");
    assert!(
        stops <= requests / 10,
        "{stops} STOP_SENDING frames for {requests} requests"
    );
    drop(cl);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_routes_are_corrected_without_wrong_answers() {
    init_tracing();
    // 4 nodes: every shard lives on 3 of them, so one node lacks each shard.
    let c = ready(&[1, 2, 3, 4], 8).await;
    let cl = client(&c);
    let k = key(1);
    cl.put(&k, b"one").await.unwrap();
    let d = cl
        .routes()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.range.contains(&k))
        .unwrap();

    tracing::info!("phase: leadership moves; the cached leader is stale");
    let old = c.wait_leader(d.id, WAIT).await.unwrap();
    let target = *d.replicas.iter().find(|n| **n != old).unwrap();
    c.transfer_leader(d.id, target, WAIT).await.unwrap();
    let before = cl.retries();
    assert_eq!(cl.get(&k).await.unwrap().as_deref(), Some(&b"one"[..]));
    cl.put(&k, b"two").await.unwrap();
    assert_eq!(cl.get(&k).await.unwrap().as_deref(), Some(&b"two"[..]));
    let retried = cl.retries() - before;
    assert!((1..=5).contains(&retried), "{retried} retries");

    tracing::info!("phase: the cache says the shard lives on a node that lacks it");
    let absent = (1..=4)
        .map(NodeId)
        .find(|n| !d.replicas.contains(n))
        .unwrap();
    let mut wrong = d.clone();
    wrong.replicas = vec![absent];
    wrong.leader_hint = Some(absent);
    let stale = client(&c);
    stale.learn_route(wrong);
    let before = stale.retries();
    assert_eq!(stale.get(&k).await.unwrap().as_deref(), Some(&b"two"[..]));
    stale.put(&k, b"three").await.unwrap();
    assert_eq!(cl.get(&k).await.unwrap().as_deref(), Some(&b"three"[..]));
    let retried = stale.retries() - before;
    assert!((1..=5).contains(&retried), "{retried} retries");

    tracing::info!("phase: an old epoch is answered with the current descriptor");
    let mut old_epoch = d.clone();
    old_epoch.epoch.conf_ver += 7; // unknown to the server: a mismatch either way
    let raw = cl
        .call_node(
            c.wait_leader(d.id, WAIT).await.unwrap(),
            &Request::Get {
                shard: d.id,
                epoch: old_epoch.epoch,
                keys: vec![k.clone()],
            },
        )
        .await
        .unwrap();
    match raw {
        Response::Error(ApiError::EpochMismatch { current, .. }) => {
            assert_eq!(current[0].id, d.id);
            assert_eq!(current[0].epoch, d.epoch);
        }
        other => panic!("expected EpochMismatch, got {other:?}"),
    }

    tracing::info!("phase: the meta shard's table covers shards n1 does not host");
    let meta_hosts: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let table = common::wait::until("the meta shard records 8 routes", WAIT, || async {
        match cl.call_node(meta_hosts[0], &Request::Routes).await {
            Ok(Response::Routes(r)) if r.len() == 8 => Ok(r),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap();
    let map =
        tessera::shard_router::RangeMap::new(table.clone()).expect("routes cover the key space");
    assert_eq!(map.len(), 8);
    assert!(
        table.iter().any(|d| !d.replicas.contains(&NodeId(1))),
        "n1 answered only for its own replicas"
    );
    assert!(c.node(1).raft(tessera::meta::META_SHARD).is_some());
    drop((cl, stale));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_input_is_refused_by_client_and_server() {
    init_tracing();
    let c = ready(&[1, 2, 3], 4).await;
    let cl = client(&c);
    let big_key = vec![b'k'; KEY_BYTES_MAX + 1];
    let big_value = vec![b'v'; VALUE_BYTES_MAX + 1];
    assert!(matches!(
        cl.put(&big_key, b"v").await,
        Err(ClientError::Limit(LimitError::KeySize { .. }))
    ));
    assert!(matches!(
        cl.put(b"", b"v").await,
        Err(ClientError::Limit(LimitError::KeySize { len: 0, .. }))
    ));
    assert!(matches!(
        cl.put(b"k", &big_value).await,
        Err(ClientError::Limit(LimitError::ValueSize { .. }))
    ));
    assert!(matches!(
        cl.get(&big_key).await,
        Err(ClientError::Limit(LimitError::KeySize { .. }))
    ));
    let keys: Vec<Vec<u8>> = (0..=BATCH_OPS_MAX as u32).map(key).collect();
    let pairs: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (k.as_slice(), &b"v"[..])).collect();
    assert!(matches!(
        cl.batch_put(&pairs).await,
        Err(ClientError::Limit(LimitError::BatchOps { .. }))
    ));
    let vals: Vec<Vec<u8>> = (0..5).map(|_| vec![0u8; VALUE_BYTES_MAX]).collect();
    let heavy: Vec<(&[u8], &[u8])> = keys[..5]
        .iter()
        .zip(&vals)
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    assert!(matches!(
        cl.batch_put(&heavy).await,
        Err(ClientError::Limit(LimitError::BatchBytes { .. }))
    ));

    tracing::info!("phase: raw requests that bypass the client's checks");
    let d = cl
        .routes()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.range.contains(b"k"))
        .unwrap();
    let leader = c.wait_leader(d.id, WAIT).await.unwrap();
    let raw = [
        Request::Write {
            shard: d.id,
            epoch: d.epoch,
            ops: vec![Op::Put {
                key: b"k".to_vec(),
                value: big_value.clone(),
            }],
            session: None,
        },
        Request::Write {
            shard: d.id,
            epoch: d.epoch,
            ops: vec![Op::Delete {
                key: big_key.clone(),
            }],
            session: None,
        },
        Request::Get {
            shard: d.id,
            epoch: d.epoch,
            keys: vec![Vec::new()],
        },
        Request::Write {
            shard: d.id,
            epoch: d.epoch,
            ops: Vec::new(),
            session: None,
        },
    ];
    for r in raw {
        match cl.call_node(leader, &r).await.unwrap() {
            Response::Error(ApiError::Limit(_)) => {}
            other => panic!("server accepted an oversized request: {other:?}"),
        }
    }
    // Nothing was written, and the node keeps serving.
    assert_eq!(cl.get(b"k").await.unwrap(), None);
    cl.put(b"k", b"small").await.unwrap();
    assert_eq!(cl.get(b"k").await.unwrap().as_deref(), Some(&b"small"[..]));
    drop(cl);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_clients_read_back_every_acknowledged_write() {
    init_tracing();
    let c = ready(&[1, 2, 3], 16).await;
    let mut tasks = Vec::new();
    for w in 0..16u32 {
        let cl = client(&c);
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..30u32 {
                let k = key(w * 1000 + i);
                let v = format!("w{w}-{i}").into_bytes();
                cl.put(&k, &v).await.expect("put acknowledged");
                acked.push((k, v));
            }
            (cl, acked)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    let reader = client(&c);
    for (_, acked) in &all {
        for (k, v) in acked {
            assert_eq!(reader.get(k).await.unwrap().as_ref(), Some(v));
        }
    }
    let keys: Vec<&[u8]> = all[0].1.iter().map(|(k, _)| k.as_slice()).collect();
    let got = reader.batch_get(&keys).await.unwrap();
    assert!(got
        .iter()
        .zip(&all[0].1)
        .all(|(g, (_, v))| g.as_ref() == Some(v)));
    drop((all, reader));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_and_batches_behave_like_a_register_per_key() {
    init_tracing();
    let c = ready(&[1, 2, 3], 8).await;
    let cl = client(&c);
    let k = key(9);
    let won = cl.cas(&k, None, Some(b"first")).await.unwrap();
    assert!(won.succeeded && won.current.is_none());
    let lost = cl.cas(&k, None, Some(b"second")).await.unwrap();
    assert!(!lost.succeeded);
    assert_eq!(lost.current.as_deref(), Some(&b"first"[..]));
    let swapped = cl.cas(&k, Some(b"first"), Some(b"third")).await.unwrap();
    assert!(swapped.succeeded);
    let deleted = cl.cas(&k, Some(b"third"), None).await.unwrap();
    assert!(deleted.succeeded);
    assert_eq!(cl.get(&k).await.unwrap(), None);

    // A swap answers what it replaced; a put then a swap sees the put.
    assert_eq!(cl.swap(&k, b"s1").await.unwrap(), None);
    cl.put(&k, b"p2").await.unwrap();
    assert_eq!(
        cl.swap(&k, b"s3").await.unwrap().as_deref(),
        Some(&b"p2"[..])
    );
    assert_eq!(cl.get(&k).await.unwrap().as_deref(), Some(&b"s3"[..]));

    // A batch spanning many shards lands whole; batch_get reads it back in order.
    let keys: Vec<Vec<u8>> = (0..200u32).map(key).collect();
    let vals: Vec<Vec<u8>> = (0..200u32).map(|i| format!("b{i}").into_bytes()).collect();
    let pairs: Vec<(&[u8], &[u8])> = keys
        .iter()
        .zip(&vals)
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    cl.batch_put(&pairs).await.unwrap();
    let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let got = cl.batch_get(&refs).await.unwrap();
    let want: Vec<Option<Vec<u8>>> = vals.into_iter().map(Some).collect();
    assert_eq!(got, want);
    // Shards are written at once, but one key's writes keep their batch
    // order: every key twice, interleaved across all shards; the later wins.
    let firsts: Vec<Vec<u8>> = (0..200u32).map(|i| format!("x{i}").into_bytes()).collect();
    let lasts: Vec<Vec<u8>> = (0..200u32).map(|i| format!("y{i}").into_bytes()).collect();
    let mut twice: Vec<(&[u8], &[u8])> = Vec::new();
    for half in [&firsts, &lasts] {
        for (k, v) in keys.iter().zip(half.iter()).rev() {
            twice.push((k.as_slice(), v.as_slice()));
        }
    }
    cl.batch_put(&twice).await.unwrap();
    let got = cl.batch_get(&refs).await.unwrap();
    let want: Vec<Option<Vec<u8>>> = lasts.into_iter().map(Some).collect();
    assert_eq!(got, want, "a key's later write in one batch wins");
    drop(cl);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_beyond_the_limit_are_refused() {
    init_tracing();
    let t = Timings {
        client_connections_max: 1,
        ..Timings::fast()
    };
    let c = TestCluster::start(&[1], &[], Some((1, vec![1])), t).await;
    c.wait_leader(tessera::ShardId(1), WAIT).await.unwrap();
    let first = client(&c);
    first.put(b"k", b"v").await.unwrap();
    let issued = c.ca.issue_client("second").unwrap();
    let opts = ClientOptions {
        deadline: Duration::from_secs(2),
        ..Default::default()
    };
    let second = Client::from_identity(
        &c.ca.identity(&issued),
        vec![(NodeId(1), c.node(1).addr())],
        opts,
    )
    .unwrap();
    assert!(
        matches!(second.get(b"k").await, Err(ClientError::Timeout { .. })),
        "a second connection was served"
    );
    assert!(c.node(1).metrics().connections_refused >= 1);
    // The first client still works.
    assert_eq!(first.get(b"k").await.unwrap().as_deref(), Some(&b"v"[..]));
    drop((first, second));
    c.shutdown().await;
}

/// Roles in certificates: a plain client certificate reads and writes but
/// gets a typed permission error for admin commands (nothing changes); the
/// admin certificate may split, move replicas and transfer leadership.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_need_an_admin_certificate() {
    init_tracing();
    let c = ready(&[1, 2, 3], 2).await;
    let plain = client(&c);
    plain.put(b"m-key", b"v").await.unwrap();
    let before = plain.routes().await.unwrap();
    let denied = |r: Result<(), ClientError>, what: &str| match r {
        Err(ClientError::Refused(ApiError::PermissionDenied { request })) => {
            assert_eq!(request, what)
        }
        other => panic!("{what} with a plain client certificate: {other:?}"),
    };
    denied(plain.split(b"m").await.map(|_| ()), "split");
    let d = before[0].clone();
    let (from, to) = (d.replicas[0], d.replicas[1]);
    denied(plain.transfer_leader(d.id, to).await, "transfer-leader");
    denied(
        plain.move_replica(d.id, from, NodeId(9)).await.map(|_| ()),
        "move-replica",
    );
    // The second shard's start: a merge of it into the first.
    let second = before.iter().find(|x| !x.range.start.is_empty()).unwrap();
    denied(plain.merge(&second.range.start).await.map(|_| ()), "merge");
    let shape = |ds: Vec<tessera::ShardDescriptor>| -> Vec<_> {
        ds.into_iter()
            .map(|d| (d.id, d.range, d.epoch, d.replicas))
            .collect()
    };
    assert_eq!(
        shape(plain.routes().await.unwrap()),
        shape(before.clone()),
        "a refused admin command changed the shards"
    );

    tracing::info!("phase: the admin certificate may");
    let admin = c.client();
    let (left, right) = admin.split(b"m").await.unwrap();
    assert_eq!(left.range.end, b"m".to_vec());
    assert_eq!(right.range.start, b"m".to_vec());
    // Data requests work with either certificate, across the new boundary.
    assert_eq!(plain.get(b"m-key").await.unwrap(), Some(b"v".to_vec()));
    assert_eq!(admin.get(b"m-key").await.unwrap(), Some(b"v".to_vec()));
    // A batch the plain client groups by its pre-split route straddles
    // the new boundary: regrouped, not retried whole until the deadline.
    let straddling = plain_after_split(&c, &before);
    straddling
        .batch_put(&[(b"a-key", b"1"), (b"z-key", b"2")])
        .await
        .unwrap();
    assert_eq!(
        straddling.batch_get(&[b"a-key", b"z-key"]).await.unwrap(),
        vec![Some(b"1".to_vec()), Some(b"2".to_vec())]
    );
}

/// A plain client whose route cache holds `routes` (from before a split).
fn plain_after_split(c: &TestCluster, routes: &[tessera::ShardDescriptor]) -> Client {
    let cl = client(c);
    for d in routes {
        cl.learn_route(d.clone());
    }
    cl
}

/// Responses are bounded in bytes: 20 MiB of values in one shard (more
/// than a 16 MiB frame) come back through scans and a multi-key get, page
/// by page, each page within the node's response bound (4 MiB by default,
/// plus the pair that crosses it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_larger_than_a_frame_come_back_in_bounded_pages() {
    init_tracing();
    // openraft's replication deadline is the heartbeat interval: at
    // `fast`'s 100 ms, a debug build on a slower 2-core machine could not
    // replicate a 1 MiB entry in time and retried it until the client's
    // 90 s deadline (a CI run, 2026-12-07). 1.5 s leaves it room.
    let c = ready_with(&[1, 2, 3], 1, Timings::many_groups()).await;
    // 1 MiB writes on a debug build sharing 2 cores: an attempt may take
    // longer than the default 5 s (a CI run saw every attempt of one put
    // time out); each attempt and the call stay bounded.
    let cl = client_with(
        &c,
        ClientOptions {
            attempt_timeout: Duration::from_secs(20),
            deadline: Duration::from_secs(90),
            ..ClientOptions::default()
        },
    );
    let value = |i: u8| vec![i; VALUE_BYTES_MAX];
    let keys: Vec<Vec<u8>> = (0..20u8)
        .map(|i| format!("big-{i:02}").into_bytes())
        .collect();
    for (i, k) in keys.iter().enumerate() {
        cl.put(k, &value(i as u8)).await.unwrap();
    }

    tracing::info!("phase: a scanner pages through the range");
    let bound = tessera::limits::RESPONSE_BYTES_DEFAULT + KEY_BYTES_MAX + VALUE_BYTES_MAX;
    let mut pages = cl.scanner(b"big-", b"big.").unwrap();
    let (mut seen, mut n_pages) = (Vec::new(), 0);
    while let Some(page) = pages.next_page(10_000).await.unwrap() {
        n_pages += 1;
        let bytes: usize = page.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(bytes <= bound, "a page of {bytes} bytes");
        seen.extend(page);
    }
    assert!(n_pages >= 5, "20 MiB in {n_pages} pages");
    let want: Vec<(Vec<u8>, Vec<u8>)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), value(i as u8)))
        .collect();
    assert!(seen == want, "the pages differ from what was written");
    assert!(cl.scan(b"big-", b"big.", 100).await.unwrap() == want);

    tracing::info!("phase: one multi-key get of every key");
    let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let got = cl.batch_get(&refs).await.unwrap();
    assert_eq!(got.len(), keys.len());
    for (i, v) in got.into_iter().enumerate() {
        assert!(v == Some(value(i as u8)), "value {i} differs");
    }
}

/// `Client::verify_shard` (what `tessera-ctl verify` runs): after writes,
/// every replica's digest at one log index agrees; a replica that diverges
/// behind Raft's back is the one reported different; a plain client
/// certificate may not ask.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_the_replica_that_differs() {
    init_tracing();
    let c = ready(&[1, 2, 3], 2).await;
    let admin = c.client();
    for i in 0..50u32 {
        admin.put(&key(i), b"v").await.unwrap();
    }
    let shards = admin.routes().await.unwrap();
    let mut pairs = 0;
    for d in &shards {
        let v = admin.verify_shard(d.id).await.unwrap();
        assert!(v.agrees(), "{v:?}");
        assert_eq!(v.replicas.len(), d.replicas.len());
        if d.id != tessera::meta::META_SHARD {
            pairs += v.replicas[0].1.as_ref().unwrap().pairs;
        }
    }
    assert_eq!(pairs, 50, "the digests count every written key once");

    tracing::info!("phase: one replica diverges behind Raft's back");
    let d = shards
        .iter()
        .find(|d| d.id != tessera::meta::META_SHARD)
        .unwrap();
    let victim = *d.replicas.last().unwrap();
    let mut k = d.range.start.clone();
    k.extend_from_slice(b"diverged");
    c.node(victim.0)
        .engine()
        .write_behind_raft(&k, b"x")
        .unwrap();
    let v = admin.verify_shard(d.id).await.unwrap();
    assert!(!v.agrees(), "{v:?}");
    let digest_of = |n: NodeId| {
        v.replicas
            .iter()
            .find(|(m, _)| *m == n)
            .unwrap()
            .1
            .clone()
            .unwrap()
    };
    let others: Vec<_> = d
        .replicas
        .iter()
        .filter(|n| **n != victim)
        .map(|n| digest_of(*n))
        .collect();
    assert!(others.windows(2).all(|w| w[0] == w[1]), "{v:?}");
    assert!(others.iter().all(|o| *o != digest_of(victim)), "{v:?}");
    assert!(matches!(
        client(&c).verify_shard(d.id).await,
        Err(ClientError::Refused(ApiError::PermissionDenied { .. }))
    ));
}

/// Node status reports each shard's load where requests are served (keys
/// read, write operations and bytes per second, decayed) and a size that
/// counts data still in memtables: a freshly written shard is not 0 bytes,
/// and shards nobody touched read no load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_load_and_unflushed_size_are_reported() {
    init_tracing();
    let c = ready(&[1, 2, 3], 4).await;
    let cl = client(&c);
    let value = vec![7u8; 1024];
    let keys: Vec<Vec<u8>> = (0..200u32)
        .map(|i| {
            let mut k = vec![0x10];
            k.extend_from_slice(format!("load-{i:04}").as_bytes());
            k
        })
        .collect();
    for k in &keys {
        cl.put(k, &value).await.unwrap();
    }
    for k in &keys {
        assert_eq!(cl.get(k).await.unwrap().as_deref(), Some(&value[..]));
    }
    let mut hot = None;
    let mut cold = Vec::new();
    for n in c.up() {
        let st = cl.node_status(n.id()).await.unwrap();
        for s in st.shards {
            // (The meta shard is reported too; only data shards here.)
            if s.leader != Some(n.id()) || s.descriptor.id == tessera::meta::META_SHARD {
                continue;
            }
            if s.descriptor.range.contains(&keys[0]) {
                hot = Some(s);
            } else {
                cold.push(s);
            }
        }
    }
    let hot = hot.expect("the written shard's leader reports it");
    assert!(hot.writes_per_s > 0.0 && hot.reads_per_s > 0.0, "{hot:?}");
    // Every write carried a 1 KiB value and a key.
    assert!(
        hot.write_bytes_per_s >= 1024.0 * hot.writes_per_s,
        "{hot:?}"
    );
    assert!(
        hot.size_bytes >= 100 * 1024,
        "200 KiB written and not flushed must count: {hot:?}"
    );
    assert_eq!(cold.len(), 3, "every other shard has a leader: {cold:?}");
    for s in &cold {
        assert_eq!(
            (s.reads_per_s, s.writes_per_s, s.write_bytes_per_s),
            (0.0, 0.0, 0.0),
            "no request reached {:?}",
            s.descriptor.id
        );
    }
    // The leaders report the same to the meta shard (every 5 s, what
    // changed): the written shard's load and size, the idle ones at 0.
    let hot_id = hot.descriptor.id;
    let hot_leader = hot.leader;
    let reports = common::wait::until("load reports in the meta shard", WAIT, || async {
        let r = cl.load_reports().await.map_err(|e| e.to_string())?;
        // The reads came after the writes: a report sent between them
        // shows writes and no reads yet, so wait for one with both.
        let busy = r.iter().any(|x| {
            x.shard == hot_id
                && x.writes_per_s > 0
                && x.reads_per_s > 0
                && x.size_bytes >= 100 * 1024
        });
        let all = cold
            .iter()
            .all(|s| r.iter().any(|x| x.shard == s.descriptor.id));
        if busy && all {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await
    .unwrap();
    let h = reports.iter().find(|x| x.shard == hot_id).unwrap();
    assert_eq!(Some(h.node), hot_leader, "reported by its leader: {h:?}");
    // (Rates are rounded to whole units.)
    assert!(
        h.reads_per_s > 0 && h.write_bytes_per_s + 1024 >= 1024 * h.writes_per_s,
        "{h:?}"
    );
    for s in &cold {
        let r = reports.iter().find(|x| x.shard == s.descriptor.id).unwrap();
        assert_eq!((r.reads_per_s, r.writes_per_s), (0, 0), "{r:?}");
    }
    // Reports live in the meta shard's own key space: a scan of the
    // user's key space sees the written keys and nothing else.
    let all = cl.scan(b"", b"", 10_000).await.unwrap();
    assert_eq!(all.len(), keys.len(), "only the user's keys");
}

/// One `Client` shared by 64 tasks: their first requests share one dial
/// per node, requests made while others are in flight travel on one
/// multiplexed stream per node, and every answer
/// reaches the task that asked (each reads back its own writes). A node
/// restarted under load ends its stream: the requests on it fail over to
/// retries, a new stream is opened on the new connection, and nothing
/// acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_shared_by_many_tasks_multiplexes_and_every_answer_reaches_its_caller() {
    init_tracing();
    let mut c = ready(&[1, 2, 3], 8).await;
    let accepted =
        |c: &TestCluster| -> u64 { c.up().map(|n| n.metrics().client_connections).sum() };
    let before = accepted(&c);
    let cl = client(&c);
    let run = |cl: Client, phase: u32| async move {
        let mut tasks = Vec::new();
        for w in 0..64u32 {
            let cl = cl.clone();
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..15u32 {
                    let k = key(phase * 100_000 + w * 1000 + i);
                    let v = format!("p{phase}-w{w}-{i}").into_bytes();
                    cl.put(&k, &v).await.expect("put acknowledged");
                    let got = cl.get(&k).await.expect("get answered");
                    assert_eq!(got.as_ref(), Some(&v), "task {w} got another's answer");
                    acked.push((k, v));
                }
                acked
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("task"));
        }
        all
    };
    let mut acked = run(cl.clone(), 0).await;
    // The 64 tasks' first requests found no connection together: they
    // waited for one dial per node instead of each making its own.
    let dialed = accepted(&c) - before;
    assert!(
        (1..=3).contains(&dialed),
        "one connection per node, {dialed} accepted"
    );
    let mux = |c: &TestCluster| -> (u64, u64) {
        c.up().fold((0, 0), |(s, r), n| {
            let m = n.metrics();
            (s + m.client_mux_streams, r + m.client_mux_requests)
        })
    };
    let (streams, served) = mux(&c);
    assert!(served > 0, "no request took a multiplexed stream");
    assert!(
        (1..=3).contains(&streams),
        "one multiplexed stream per node at most, {streams} opened"
    );

    tracing::info!("phase: a node restarts under load");
    let load = tokio::spawn(run(cl.clone(), 1));
    c.kill(2).await;
    c.restart(2).await;
    acked.extend(load.await.expect("load"));
    acked.extend(run(cl.clone(), 2).await);
    let (_, after) = mux(&c);
    assert!(
        after > 0,
        "the restarted cluster serves multiplexed requests"
    );
    let reader = client(&c);
    for (k, v) in &acked {
        assert_eq!(reader.get(k).await.unwrap().as_ref(), Some(v), "lost {k:?}");
    }
    assert_eq!(acked.len(), 3 * 64 * 15);
    drop((cl, reader));
    c.shutdown().await;
}

/// The multiplexed stream's protocol seen raw: answers come by id (in any
/// order), a request that does not decode or breaks a limit is answered
/// with a typed error on its id, and a frame without an id ends the stream
/// while the node goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multiplexed_stream_answers_by_id_and_refuses_bad_requests() {
    use tessera::limits::FRAME_BYTES_MAX;
    use tessera::wire;
    init_tracing();
    let c = ready(&[1], 1).await;
    let issued = c.ca.issue_client("raw").unwrap();
    let identity = c.ca.identity(&issued);
    let endpoint = tessera::api::call::endpoint().unwrap();
    let quic = tessera::api::call::quic_config(&identity).unwrap();
    let conn = tessera::api::call::dial(&endpoint, &quic, NodeId(1), c.node(1).addr(), WAIT)
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = wire::encode_frame(&Request::Mux, FRAME_BYTES_MAX).unwrap();
    send.write_all(&hello).await.unwrap();
    let done = wire::read_frame(&mut recv, FRAME_BYTES_MAX)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        wire::decode_payload::<Response>(&done).unwrap(),
        Response::Done
    );

    let d = c.client().routes().await.unwrap().remove(0);
    let oversized = Request::Write {
        shard: d.id,
        epoch: d.epoch,
        ops: vec![Op::Put {
            key: b"k".to_vec(),
            value: vec![0u8; VALUE_BYTES_MAX + 1],
        }],
        session: None,
    };
    let mut out = Vec::new();
    out.extend(wire::encode_frame(&(11u64, &Request::Routes), FRAME_BYTES_MAX).unwrap());
    // Id 12, then bytes that are no request.
    out.extend(5u32.to_be_bytes());
    out.extend([12u8, 0xff, 0xff, 0xff, 0xff]);
    out.extend(wire::encode_frame(&(13u64, &Request::Mux), FRAME_BYTES_MAX).unwrap());
    out.extend(wire::encode_frame(&(14u64, &oversized), FRAME_BYTES_MAX).unwrap());
    send.write_all(&out).await.unwrap();
    let mut answers = std::collections::BTreeMap::new();
    for _ in 0..4 {
        let p = wire::read_frame(&mut recv, FRAME_BYTES_MAX)
            .await
            .unwrap()
            .unwrap();
        let (id, r) = wire::decode_payload::<(u64, Response)>(&p).unwrap();
        answers.insert(id, r);
    }
    assert!(
        matches!(&answers[&11], Response::Routes(ds) if !ds.is_empty()),
        "{answers:?}"
    );
    assert!(
        matches!(&answers[&12], Response::Error(ApiError::Invalid(_))),
        "{answers:?}"
    );
    assert!(
        matches!(&answers[&13], Response::Error(ApiError::Invalid(_))),
        "{answers:?}"
    );
    assert!(
        matches!(&answers[&14], Response::Error(ApiError::Limit(_))),
        "{answers:?}"
    );

    // A varint longer than any u64: no id, so the stream ends.
    let mut bad = 11u32.to_be_bytes().to_vec();
    bad.extend([0xffu8; 11]);
    send.write_all(&bad).await.unwrap();
    assert!(
        matches!(wire::read_frame(&mut recv, FRAME_BYTES_MAX).await, Ok(None)),
        "the stream goes on after a frame without an id"
    );
    let m = c.node(1).metrics();
    assert_eq!((m.client_mux_streams, m.client_mux_requests), (1, 4));
    // Nothing was written, and the node serves on.
    let cl = client(&c);
    assert_eq!(cl.get(b"k").await.unwrap(), None);
    cl.put(b"k", b"v").await.unwrap();
    drop((cl, conn));
    c.shutdown().await;
}
