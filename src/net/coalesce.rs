//! The batching decision of the per-peer queues, as plain data: which queued
//! messages go out in the next frame, and when.
//!
//! Messages are *urgent* (votes, AppendEntries carrying entries, their
//! replies) or *lazy* (heartbeats: AppendEntries without entries, and their
//! replies). An urgent message makes the queue flush at once, taking every
//! lazy message along; a lazy message waits at most `lazy_linger` for
//! company. So a node leading 1,000 idle groups sends a handful of frames per
//! heartbeat interval to each peer instead of 1,000, while a write never
//! waits for a timer.
//!
//! The caller passes the time in: no clocks, no I/O, property-tested below.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How soon a message must leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// Flush now (with whatever else is queued).
    Urgent,
    /// May wait up to the linger for other messages to share its frame.
    Lazy,
}

/// Limits of one frame and of waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoalesceLimits {
    /// Most message bytes in one frame (a single larger message goes alone).
    pub frame_bytes_max: usize,
    /// Most messages in one frame.
    pub frame_msgs_max: usize,
    /// Longest a lazy message waits for company.
    pub lazy_linger: Duration,
}

struct Queued<T> {
    item: T,
    bytes: usize,
    urgency: Urgency,
    at: Instant,
}

/// Queued messages of one peer direction and the flush rule over them.
pub struct Coalescer<T> {
    limits: CoalesceLimits,
    queue: VecDeque<Queued<T>>,
    bytes: usize,
    urgent: usize,
}

impl<T> Coalescer<T> {
    /// An empty queue with `limits` (`frame_msgs_max` at least 1).
    pub fn new(limits: CoalesceLimits) -> Self {
        assert!(
            limits.frame_msgs_max >= 1,
            "a frame holds at least one message"
        );
        Coalescer {
            limits,
            queue: VecDeque::new(),
            bytes: 0,
            urgent: 0,
        }
    }

    /// Queues one encoded message of `bytes` bytes.
    pub fn push(&mut self, item: T, bytes: usize, urgency: Urgency, now: Instant) {
        self.bytes += bytes;
        if urgency == Urgency::Urgent {
            self.urgent += 1;
        }
        self.queue.push_back(Queued {
            item,
            bytes,
            urgency,
            at: now,
        });
    }

    /// Messages queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether a frame should be sent now.
    pub fn is_due(&self, now: Instant) -> bool {
        match self.queue.front() {
            None => false,
            Some(first) => {
                self.urgent > 0
                    || self.bytes >= self.limits.frame_bytes_max
                    || self.queue.len() >= self.limits.frame_msgs_max
                    || now >= first.at + self.limits.lazy_linger
            }
        }
    }

    /// When the oldest lazy message's wait ends (`None` when empty). When
    /// [`Self::is_due`] holds the deadline is already past or irrelevant.
    pub fn deadline(&self) -> Option<Instant> {
        self.queue.front().map(|q| q.at + self.limits.lazy_linger)
    }

    /// Takes the next frame's messages in queue order: as many as fit the
    /// limits, and always at least one. Empty when nothing is queued.
    pub fn take_frame(&mut self) -> Vec<T> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while let Some(q) = self.queue.front() {
            let fits = out.is_empty()
                || (out.len() < self.limits.frame_msgs_max
                    && bytes + q.bytes <= self.limits.frame_bytes_max);
            if !fits {
                break;
            }
            let q = self.queue.pop_front().expect("front exists");
            bytes += q.bytes;
            self.bytes -= q.bytes;
            if q.urgency == Urgency::Urgent {
                self.urgent -= 1;
            }
            out.push(q.item);
        }
        out
    }

    /// Takes every queued message (the connection went away).
    pub fn drain(&mut self) -> Vec<T> {
        self.bytes = 0;
        self.urgent = 0;
        self.queue.drain(..).map(|q| q.item).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> CoalesceLimits {
        CoalesceLimits {
            frame_bytes_max: 1000,
            frame_msgs_max: 8,
            lazy_linger: Duration::from_millis(50),
        }
    }

    #[test]
    fn heartbeats_wait_for_company_and_writes_do_not() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(limits());
        c.push(1, 10, Urgency::Lazy, t0);
        c.push(2, 10, Urgency::Lazy, t0 + Duration::from_millis(10));
        assert!(!c.is_due(t0 + Duration::from_millis(20)));
        assert_eq!(c.deadline(), Some(t0 + Duration::from_millis(50)));
        assert!(c.is_due(t0 + Duration::from_millis(50)));
        c.push(3, 10, Urgency::Urgent, t0 + Duration::from_millis(20));
        assert!(c.is_due(t0 + Duration::from_millis(20)));
        assert_eq!(c.take_frame(), vec![1, 2, 3]);
        assert!(c.is_empty() && !c.is_due(t0 + Duration::from_secs(9)));
    }

    #[test]
    fn a_full_frame_flushes_and_an_oversized_message_goes_alone() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(limits());
        c.push(1, 5000, Urgency::Lazy, t0);
        c.push(2, 10, Urgency::Lazy, t0);
        assert!(c.is_due(t0));
        assert_eq!(c.take_frame(), vec![1]);
        assert_eq!(c.take_frame(), vec![2]);
        for i in 0..9 {
            c.push(i, 1, Urgency::Lazy, t0);
        }
        assert!(c.is_due(t0));
        assert_eq!(c.take_frame().len(), 8);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Push { bytes: usize, urgent: bool },
        Advance(u64),
        Flush,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (1usize..600, any::<bool>()).prop_map(|(bytes, urgent)| Step::Push { bytes, urgent }),
            2 => (0u64..80).prop_map(Step::Advance),
            1 => Just(Step::Flush),
        ]
    }

    proptest! {
        /// Driven like the sender task (flush whenever due), every message
        /// leaves exactly once, in order; frames respect the limits unless a
        /// lone message is larger; an urgent message never waits; a lazy one
        /// waits at most the linger.
        #[test]
        fn order_limits_and_waits(steps in proptest::collection::vec(step(), 1..200)) {
            let l = limits();
            let t0 = Instant::now();
            let mut now = t0;
            let mut c = Coalescer::new(l);
            let mut next = 0u64;
            let mut pushed_at = std::collections::HashMap::new();
            let mut out = Vec::new();
            let mut sizes = std::collections::HashMap::new();
            for s in steps {
                match s {
                    Step::Push { bytes, urgent } => {
                        let u = if urgent { Urgency::Urgent } else { Urgency::Lazy };
                        c.push(next, bytes, u, now);
                        pushed_at.insert(next, (now, urgent));
                        sizes.insert(next, bytes);
                        next += 1;
                    }
                    Step::Advance(ms) => {
                        // The sender wakes at the deadline, never later.
                        let target = now + Duration::from_millis(ms);
                        while let Some(d) = c.deadline() {
                            if d > target || c.is_due(now) { break; }
                            now = d;
                            while c.is_due(now) {
                                let f = c.take_frame();
                                check_frame(&f, &sizes, &l);
                                out.extend(f.into_iter().map(|i| (i, now)));
                            }
                        }
                        now = target;
                    }
                    Step::Flush => {}
                }
                while c.is_due(now) {
                    let f = c.take_frame();
                    check_frame(&f, &sizes, &l);
                    out.extend(f.into_iter().map(|i| (i, now)));
                }
            }
            let rest = c.drain();
            let ids: Vec<u64> = out.iter().map(|(i, _)| *i).chain(rest.iter().copied()).collect();
            prop_assert_eq!(ids, (0..next).collect::<Vec<_>>());
            for (i, sent) in out {
                let (at, urgent) = pushed_at[&i];
                let waited = sent - at;
                if urgent {
                    prop_assert_eq!(waited, Duration::ZERO);
                } else {
                    prop_assert!(waited <= l.lazy_linger, "lazy message waited {waited:?}");
                }
            }
        }
    }

    fn check_frame(f: &[u64], sizes: &std::collections::HashMap<u64, usize>, l: &CoalesceLimits) {
        assert!(!f.is_empty());
        assert!(f.len() <= l.frame_msgs_max);
        let bytes: usize = f.iter().map(|i| sizes[i]).sum();
        assert!(f.len() == 1 || bytes <= l.frame_bytes_max);
    }
}
