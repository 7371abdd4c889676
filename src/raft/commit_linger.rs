//! Commit-only AppendEntries ride on the next one.
//!
//! openraft's replication stream sends an AppendEntries without entries
//! whenever the commit advances and no new entries are there to carry it:
//! with one write in flight per group (many groups, few writes each), that is
//! a second round trip per write to every follower, as costly as the first
//! and useless to the client (the leader applies and answers on its own
//! commit). [`coalesce`] wraps the request stream: a request without entries
//! waits up to the linger for the next request, and is dropped when that one
//! carries everything it did (same vote and previous log id, a commit at
//! least as new). A follower then learns the commit with the next write's
//! entries, or after the linger at the latest.
//!
//! Nothing the leader relies on changes: the dropped request is acknowledged
//! by the response to the one that replaced it (responses acknowledge by
//! matching log id, and the replaced request's send time is not later than
//! its replacement's), heartbeats and probes end their stream at once and go
//! out unheld, and a held request is never reordered behind one it does not
//! cover.

use super::TypeConfig;
use futures_util::{Stream, StreamExt};
use openraft::raft::AppendEntriesRequest;
use std::time::Duration;

type Request = AppendEntriesRequest<TypeConfig>;

/// Whether sending `next` alone gives the follower everything `held` would
/// have: `held` carries no entries, both come from the same leader and start
/// after the same log id, and `next` commits at least as far.
pub fn supersedes(next: &Request, held: &Request) -> bool {
    held.entries.is_empty()
        && next.vote == held.vote
        && next.prev_log_id == held.prev_log_id
        && next.leader_commit >= held.leader_commit
}

/// Whether the node is busy enough that holding commit-only requests pays
/// (asked each time one would be held).
pub type Busy = std::sync::Arc<dyn Fn() -> bool + Send + Sync>;

struct State<S> {
    input: S,
    busy: Busy,
    /// The input has ended: it must not be polled again.
    ended: bool,
    /// A request taken while holding one it does not supersede: next out.
    carried: Option<Request>,
    linger: Duration,
}

/// `input` with each entry-less request held up to `linger` for one that
/// supersedes it (see the module docs), while `busy` says so. With one write
/// at a time a held commit only moves the follower's apply onto the next
/// write's path (measured: 1 client, p50 0.71 → 0.75 ms), so an idle node
/// sends it at once. A zero linger passes `input` through unchanged in
/// effect.
pub fn coalesce<S>(
    input: S,
    linger: Duration,
    busy: Busy,
) -> impl Stream<Item = Request> + Send + Unpin
where
    S: Stream<Item = Request> + Send + Unpin + 'static,
{
    let state = State {
        input,
        busy,
        ended: false,
        carried: None,
        linger,
    };
    Box::pin(futures_util::stream::unfold(state, next_request))
}

async fn next_request<S>(mut st: State<S>) -> Option<(Request, State<S>)>
where
    S: Stream<Item = Request> + Send + Unpin,
{
    let mut req = match st.carried.take() {
        Some(r) => r,
        None if st.ended => return None,
        None => st.input.next().await?,
    };
    if !req.entries.is_empty() || st.linger.is_zero() || !(st.busy)() {
        return Some((req, st));
    }
    let deadline = tokio::time::Instant::now() + st.linger;
    while req.entries.is_empty() {
        match tokio::time::timeout_at(deadline, st.input.next()).await {
            Ok(Some(next)) if supersedes(&next, &req) => req = next,
            Ok(Some(next)) => {
                st.carried = Some(next);
                break;
            }
            // A one-off stream (a heartbeat, a probe) ends right after its
            // request: it goes out at once.
            Ok(None) => {
                st.ended = true;
                break;
            }
            Err(_) => break,
        }
    }
    Some((req, st))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{Entry, EntryPayload, LogId, Vote};

    fn log_id(term: u64, index: u64) -> LogId {
        crate::raft::log_id(term, crate::NodeId(1), index)
    }

    fn vote(term: u64) -> Vote {
        Vote::new_committed(term, crate::NodeId(1))
    }

    fn req(term: u64, prev: Option<u64>, entries: &[u64], commit: Option<u64>) -> Request {
        AppendEntriesRequest {
            vote: vote(term),
            prev_log_id: prev.map(|i| log_id(term, i)),
            leader_commit: commit.map(|i| log_id(term, i)),
            entries: entries
                .iter()
                .map(|i| Entry {
                    log_id: log_id(term, *i),
                    payload: EntryPayload::Blank,
                })
                .collect(),
        }
    }

    #[test]
    fn supersedes_needs_same_vote_prev_and_a_commit_as_new() {
        let held = req(2, Some(5), &[], Some(5));
        assert!(supersedes(&req(2, Some(5), &[6], Some(5)), &held));
        assert!(supersedes(&req(2, Some(5), &[], Some(6)), &held));
        assert!(
            !supersedes(&req(2, Some(5), &[6], Some(4)), &held),
            "older commit"
        );
        assert!(
            !supersedes(&req(2, Some(6), &[7], Some(6)), &held),
            "other prev"
        );
        assert!(
            !supersedes(&req(3, Some(5), &[6], Some(5)), &held),
            "other vote"
        );
        let data = req(2, Some(4), &[5], Some(4));
        assert!(
            !supersedes(&req(2, Some(4), &[5], Some(5)), &data),
            "entries are never dropped"
        );
    }

    fn always() -> Busy {
        std::sync::Arc::new(|| true)
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_node_sends_commits_at_once() {
        let (tx, inp) = input();
        let mut out = coalesce(
            inp,
            Duration::from_secs(3600),
            std::sync::Arc::new(|| false),
        );
        tx.send(req(2, Some(5), &[], Some(5))).unwrap();
        let started = tokio::time::Instant::now();
        let sent = out.next().await.unwrap();
        assert_eq!((sent.entries.len(), started.elapsed()), (0, Duration::ZERO));
    }

    /// A channel-fed input: the test decides when the next request exists.
    fn input() -> (
        tokio::sync::mpsc::UnboundedSender<Request>,
        impl Stream<Item = Request> + Send + Unpin + 'static,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (tx, tokio_stream_of(rx))
    }

    fn tokio_stream_of(
        rx: tokio::sync::mpsc::UnboundedReceiver<Request>,
    ) -> impl Stream<Item = Request> + Send + Unpin + 'static {
        Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|r| (r, rx))
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn a_commit_rides_on_the_next_entries() {
        let (tx, inp) = input();
        let mut out = coalesce(inp, Duration::from_millis(50), always());
        tx.send(req(2, Some(4), &[5], Some(4))).unwrap();
        tx.send(req(2, Some(5), &[], Some(5))).unwrap();
        tx.send(req(2, Some(5), &[6], Some(5))).unwrap();
        let first = out.next().await.unwrap();
        assert_eq!(first.entries.len(), 1);
        let second = out.next().await.unwrap();
        assert_eq!(
            (
                second.prev_log_id,
                second.entries.len(),
                second.leader_commit
            ),
            (Some(log_id(2, 5)), 1, Some(log_id(2, 5))),
            "the commit-only request is replaced by the entries that carry its commit"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_commit_goes_out_after_the_linger() {
        let (tx, inp) = input();
        let mut out = coalesce(inp, Duration::from_millis(50), always());
        tx.send(req(2, Some(5), &[], Some(5))).unwrap();
        // The paused clock jumps to the linger's end: nothing else comes.
        let held = out.next().await.unwrap();
        assert_eq!(
            (held.entries.len(), held.leader_commit),
            (0, Some(log_id(2, 5)))
        );
        // A later request still flows.
        tx.send(req(2, Some(5), &[6], Some(5))).unwrap();
        assert_eq!(out.next().await.unwrap().entries.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_one_off_stream_is_not_held_and_ends() {
        let hb = req(2, Some(5), &[], Some(5));
        let mut out = coalesce(
            Box::pin(futures_util::stream::once(async move { hb })),
            Duration::from_secs(3600),
            always(),
        );
        let started = tokio::time::Instant::now();
        let sent = out.next().await.unwrap();
        assert!(sent.entries.is_empty());
        assert_eq!(started.elapsed(), Duration::ZERO, "not held");
        assert!(out.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_it_does_not_cover_follows_the_held_one() {
        let (tx, inp) = input();
        let mut out = coalesce(inp, Duration::from_millis(50), always());
        tx.send(req(2, Some(5), &[], Some(5))).unwrap();
        // A new term: not the same leader's request.
        tx.send(req(3, Some(5), &[6], Some(5))).unwrap();
        let a = out.next().await.unwrap();
        let b = out.next().await.unwrap();
        assert_eq!((a.entries.len(), a.vote), (0, vote(2)));
        assert_eq!((b.entries.len(), b.vote), (1, vote(3)));
    }
}
