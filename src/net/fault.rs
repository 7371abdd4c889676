//! The fault layer of the in-process test clusters: blocked links and random
//! message loss, consulted by the transport on every send, and a
//! deliberately broken read path for the checker's own tests.
//!
//! A test switch: it exists only in builds with the `failpoints` feature
//! (the test command's). Without it [`Faults`] has no state and no setters,
//! and every check is a constant `false` the compiler removes, so a release
//! build carries none of it.

use crate::NodeId;
#[cfg(feature = "failpoints")]
use std::collections::HashSet;
#[cfg(feature = "failpoints")]
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
#[cfg(feature = "failpoints")]
use std::sync::Mutex;

/// Faults shared by the nodes of a test cluster.
#[derive(Debug, Default)]
pub struct Faults {
    #[cfg(feature = "failpoints")]
    active: AtomicBool,
    #[cfg(feature = "failpoints")]
    blocked: Mutex<HashSet<(NodeId, NodeId)>>,
    /// Messages dropped per million.
    #[cfg(feature = "failpoints")]
    drop_ppm: AtomicU32,
    /// The deliberately broken build for checker tests: reads are served by
    /// whichever replica is asked, from its local state, without a read
    /// index. Never set outside tests.
    #[cfg(feature = "failpoints")]
    unsafe_local_reads: AtomicBool,
}

impl Faults {
    /// No faults.
    pub fn none() -> Self {
        Faults::default()
    }

    /// Whether reads skip the leader check and the read index.
    #[inline]
    pub fn unsafe_local_reads(&self) -> bool {
        #[cfg(feature = "failpoints")]
        return self.unsafe_local_reads.load(Ordering::Relaxed);
        #[cfg(not(feature = "failpoints"))]
        false
    }

    /// Whether `from` may not send to `to`.
    #[inline]
    pub fn is_blocked(&self, from: NodeId, to: NodeId) -> bool {
        #[cfg(feature = "failpoints")]
        return self.active.load(Ordering::Relaxed)
            && self
                .blocked
                .lock()
                .expect("faults poisoned")
                .contains(&(from, to));
        #[cfg(not(feature = "failpoints"))]
        {
            let _ = (from, to);
            false
        }
    }

    /// Whether to drop the message being sent.
    #[inline]
    pub fn should_drop(&self) -> bool {
        #[cfg(feature = "failpoints")]
        {
            if !self.active.load(Ordering::Relaxed) {
                return false;
            }
            let ppm = self.drop_ppm.load(Ordering::Relaxed);
            ppm > 0 && rand::random::<u32>() % 1_000_000 < ppm
        }
        #[cfg(not(feature = "failpoints"))]
        false
    }
}

#[cfg(feature = "failpoints")]
impl Faults {
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
}
