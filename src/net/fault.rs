//! The fault layer: blocked links and random message loss, consulted by the
//! transport on every send. Off (and free) unless a test turns it on.

use crate::NodeId;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

/// Faults shared by the nodes of a test cluster.
#[derive(Debug, Default)]
pub struct Faults {
    active: AtomicBool,
    blocked: Mutex<HashSet<(NodeId, NodeId)>>,
    /// Messages dropped per million.
    drop_ppm: AtomicU32,
    /// The deliberately broken build for checker tests: reads are served by
    /// whichever replica is asked, from its local state, without a read
    /// index. Never set outside tests.
    unsafe_local_reads: AtomicBool,
}

impl Faults {
    /// No faults.
    pub fn none() -> Self {
        Faults::default()
    }

    fn refresh(&self) {
        let any = !self.blocked.lock().expect("faults poisoned").is_empty()
            || self.drop_ppm.load(Ordering::Relaxed) > 0;
        self.active.store(any, Ordering::Relaxed);
    }

    /// Blocks messages from `from` to `to` (one way).
    pub fn block(&self, from: NodeId, to: NodeId) {
        self.blocked
            .lock()
            .expect("faults poisoned")
            .insert((from, to));
        self.refresh();
    }

    /// Blocks both directions between `a` and `b`.
    pub fn partition(&self, a: NodeId, b: NodeId) {
        self.block(a, b);
        self.block(b, a);
    }

    /// Cuts `node` off from every node in `others`, both ways.
    pub fn isolate(&self, node: NodeId, others: &[NodeId]) {
        for o in others {
            if *o != node {
                self.partition(node, *o);
            }
        }
    }

    /// Removes every blocked link.
    pub fn heal(&self) {
        self.blocked.lock().expect("faults poisoned").clear();
        self.refresh();
    }

    /// Drops this fraction (0.0 to 1.0) of messages at random.
    pub fn set_drop_fraction(&self, fraction: f64) {
        let ppm = (fraction.clamp(0.0, 1.0) * 1_000_000.0) as u32;
        self.drop_ppm.store(ppm, Ordering::Relaxed);
        self.refresh();
    }

    /// Turns the deliberately broken read path on or off (tests that prove
    /// the linearizability checker can fail).
    pub fn set_unsafe_local_reads(&self, on: bool) {
        self.unsafe_local_reads.store(on, Ordering::Relaxed);
    }

    /// Whether reads skip the leader check and the read index.
    pub fn unsafe_local_reads(&self) -> bool {
        self.unsafe_local_reads.load(Ordering::Relaxed)
    }

    /// Whether `from` may not send to `to`.
    pub fn is_blocked(&self, from: NodeId, to: NodeId) -> bool {
        self.active.load(Ordering::Relaxed)
            && self
                .blocked
                .lock()
                .expect("faults poisoned")
                .contains(&(from, to))
    }

    /// Whether to drop the message being sent.
    pub fn should_drop(&self) -> bool {
        if !self.active.load(Ordering::Relaxed) {
            return false;
        }
        let ppm = self.drop_ppm.load(Ordering::Relaxed);
        ppm > 0 && rand::random::<u32>() % 1_000_000 < ppm
    }
}
