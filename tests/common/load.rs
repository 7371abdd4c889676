//! A client load for admin-under-load tests: `n` clients, each writing
//! unique keys spread over the key space and reading its own earlier
//! writes back, one request at a time, recording what was acknowledged
//! and every error it saw.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tessera::Client;

/// The key client `c` writes as its `i`-th: first letters spread over
/// `a..z`, so every shard of a lettered split gets some.
pub fn load_key(c: usize, i: u64) -> Vec<u8> {
    let letter = b'a' + ((i * 7 + c as u64) % 26) as u8;
    let mut k = vec![letter];
    k.extend_from_slice(format!("/c{c:02}/{i:06}").as_bytes());
    k
}

/// A running load.
pub struct Load {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    acked: Arc<Mutex<BTreeMap<Vec<u8>, Vec<u8>>>>,
    errors: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What a load did.
pub struct LoadResult {
    pub ops: u64,
    pub acked: BTreeMap<Vec<u8>, Vec<u8>>,
    pub errors: Vec<String>,
}

impl LoadResult {
    /// The clients saw no error at all (retries inside the client are fine).
    pub fn assert_no_errors(&self) {
        assert!(
            self.errors.is_empty(),
            "clients saw {} errors, first: {:?}",
            self.errors.len(),
            &self.errors[..self.errors.len().min(10)]
        );
    }

    /// Every acknowledged write reads back (linearizable reads).
    pub async fn assert_acknowledged_readable(&self, cl: &Client) {
        for (k, v) in &self.acked {
            assert_eq!(
                cl.get(k).await.unwrap().as_ref(),
                Some(v),
                "acknowledged write {:?}",
                String::from_utf8_lossy(k)
            );
        }
    }
}

impl Load {
    /// Starts `n` clients on clones of `client` (one request in flight each).
    pub fn start(client: &Client, n: usize, value_bytes: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for c in 0..n {
            let (cl, stop, ops, acked, errors) = (
                client.clone(),
                stop.clone(),
                ops.clone(),
                acked.clone(),
                errors.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let k = load_key(c, i);
                    let mut v = format!("v{c}-{i}-").into_bytes();
                    v.resize(value_bytes.max(v.len()), b'x');
                    match cl.put(&k, &v).await {
                        Ok(()) => {
                            acked.lock().unwrap().insert(k.clone(), v.clone());
                        }
                        Err(e) => errors.lock().unwrap().push(format!("put {i}: {e}")),
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                    if i % 3 == 2 {
                        // Read back an earlier acknowledged write of ours.
                        let back = load_key(c, i / 2);
                        let want = acked.lock().unwrap().get(&back).cloned();
                        match cl.get(&back).await {
                            Ok(got) if want.is_none() || got == want => {}
                            Ok(got) => errors.lock().unwrap().push(format!(
                                "get {}: {:?}, want {:?}",
                                String::from_utf8_lossy(&back),
                                got.map(|g| String::from_utf8_lossy(&g).into_owned()),
                                want.map(|g| String::from_utf8_lossy(&g).into_owned())
                            )),
                            Err(e) => errors.lock().unwrap().push(format!("get: {e}")),
                        }
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
            }));
        }
        Load {
            stop,
            ops,
            acked,
            errors,
            tasks,
        }
    }

    /// Operations completed so far.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Stops the clients and returns what they saw.
    pub async fn finish(self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("load client panicked");
        }
        LoadResult {
            ops: self.ops.load(Ordering::Relaxed),
            acked: std::mem::take(&mut *self.acked.lock().unwrap()),
            errors: std::mem::take(&mut *self.errors.lock().unwrap()),
        }
    }
}

/// Waits until the load has done `more` operations beyond now (bounded).
pub async fn wait_ops(load: &Load, more: u64, timeout: std::time::Duration) {
    let target = load.ops() + more;
    let deadline = std::time::Instant::now() + timeout;
    while load.ops() < target {
        if std::time::Instant::now() >= deadline {
            let errors = load.errors.lock().unwrap();
            panic!(
                "wait_ops: the load did not reach {target} operations within {timeout:?} (at {}); last errors: {:?}",
                load.ops(),
                &errors[errors.len().saturating_sub(5)..]
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
