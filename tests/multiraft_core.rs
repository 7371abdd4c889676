//! The node-level batch system (`tessera::multiraft`) over an in-process
//! network: many groups per node, one synced write per round, messages grouped
//! per peer, restarts from what is stored, and no acknowledged entry lost
//! when a leader changes.

#[path = "common/multiraft.rs"]
mod harness;

use harness::LocalCluster;
use raft::eraftpb::MessageType;
use std::collections::BTreeMap;
use tessera::multiraft::{Driver, DriverConfig, DriverError, GroupStore};
use tessera::storage::{Engine, StorageConfig, StoreError};
use tessera::ShardId;

const GROUPS: u64 = 64;

#[test]
fn every_group_elects_and_commits_on_every_replica() {
    let mut c = LocalCluster::new(3, GROUPS);
    let leaders = c.elect_spread();
    for (g, l) in &leaders {
        c.propose_at(*l, *g, format!("w{}", g.0).as_bytes());
    }
    c.pump();
    for g in leaders.keys() {
        c.wait_applied(*g, format!("w{}", g.0).as_bytes(), 20, "first writes");
    }
    // Every node applied exactly one write per group, in log order.
    for (id, node) in &c.nodes {
        for g in &c.groups {
            let applied = &node.applied[g];
            assert_eq!(
                applied.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>(),
                vec![format!("w{}", g.0).into_bytes()],
                "node {id}, {g}"
            );
        }
    }
}

#[test]
fn one_round_appends_every_led_group_with_one_sync() {
    let mut c = LocalCluster::new(3, GROUPS);
    let leaders = c.elect_spread();
    let led_by_1: Vec<ShardId> = leaders
        .iter()
        .filter(|(_, l)| **l == 1)
        .map(|(g, _)| *g)
        .collect();
    assert!(led_by_1.len() > 1, "node 1 leads several groups");
    let n1 = &mut c.nodes.get_mut(&1).unwrap().driver;
    for g in &led_by_1 {
        n1.propose(*g, b"x".to_vec()).expect("propose");
    }
    let before = n1.stats();
    let round = n1.round().expect("round");
    let after = n1.stats();
    assert_eq!(round.readies, led_by_1.len(), "one ready per led group");
    assert_eq!(round.entries, led_by_1.len(), "one entry per led group");
    assert_eq!(after.syncs - before.syncs, 1, "one sync for all of them");
    assert_eq!(after.appends - before.appends, led_by_1.len() as u64);
    // One batch per peer, each carrying every group's append.
    assert_eq!(
        round.messages.keys().copied().collect::<Vec<_>>(),
        vec![2, 3],
        "messages grouped by destination"
    );
    for envs in round.messages.values() {
        let mut shards: Vec<ShardId> = envs.iter().map(|e| e.shard).collect();
        shards.sort();
        shards.dedup();
        assert_eq!(
            shards, led_by_1,
            "every led group's append in the peer's batch"
        );
    }
}

#[test]
fn a_replica_that_applied_past_its_stored_commit_reopens() {
    // A state machine can be ahead of the stored commit: a commit that
    // changes alone is not written, and the node loop applies a round's
    // committed entries before the round's log write, so a crash can keep
    // the apply's write and lose the log write.
    let mut c = LocalCluster::new(3, 1);
    let g = ShardId(1);
    let l = c.elect_spread()[&g];
    let f = (1..=3).find(|n| *n != l).expect("a follower");
    c.propose_at(l, g, b"x");
    c.pump();
    // The follower learns that x committed from the leader's next
    // heartbeat; it applies x and then "crashes" before its log write.
    let mut crashed_at = None;
    for _ in 0..20 {
        let leader = c.nodes.get_mut(&l).expect("running");
        leader.driver.tick();
        let round = leader.driver.round().expect("leader round");
        c.deliver(l, round);
        let node = c.nodes.get_mut(&f).expect("running");
        let (mut round, write) = node.driver.begin_round();
        let commits_x = round
            .committed
            .iter()
            .filter(|(s, _)| *s == g)
            .flat_map(|(_, es)| es)
            .any(|e| &e.data[..] == b"x");
        if commits_x {
            let last = round.committed[0].1.last().expect("non-empty").index;
            node.driver.applied(g, last).expect("applied");
            drop(write);
            crashed_at = Some(last);
            break;
        }
        let written = write.write().expect("log write");
        node.driver.finish_round(&mut round, written);
        c.deliver(f, round);
    }
    let applied = crashed_at.expect("the follower was told x committed within 20 heartbeats");
    c.stop(f);
    {
        let engine = tessera::storage::Engine::open(tessera::storage::StorageConfig::new(c.dir(f)))
            .expect("open engine");
        let stored = GroupStore::open(&engine, g).expect("open store");
        assert!(
            stored.hard_state().commit < applied,
            "the stored commit {} is behind the applied {applied}",
            stored.hard_state().commit
        );
    }
    c.restart_applied(f, &[(g, applied)].into_iter().collect());
    assert_eq!(
        c.nodes[&f].driver.applied_index(g),
        Some(applied),
        "the follower resumes from what it applied"
    );
    c.propose_at(l, g, b"y");
    c.pump();
    c.wait_applied(g, b"y", 20, "a write after the reopen");
    assert_eq!(
        c.nodes[&f].applied[&g]
            .iter()
            .map(|(_, d)| d.clone())
            .collect::<Vec<_>>(),
        vec![b"y".to_vec()],
        "the reopened follower applies what follows, and x not again"
    );
    // A state machine past the end of the log is refused as corrupt.
    c.stop(f);
    let engine = tessera::storage::Engine::open(tessera::storage::StorageConfig::new(c.dir(f)))
        .expect("open engine");
    let mut d = tessera::multiraft::Driver::new(engine, f, Default::default());
    let err = d
        .open_group(g, 1_000_000)
        .expect_err("applied past the log");
    assert!(
        err.to_string().contains("past the last entry"),
        "a typed corruption error: {err}"
    );
}

#[test]
fn a_leaders_appends_leave_before_its_own_write() {
    let mut c = LocalCluster::new(3, 4);
    let leaders = c.elect_spread();
    let (&g, _) = leaders
        .iter()
        .find(|(_, l)| **l == 1)
        .expect("node 1 leads a group");
    let n1 = c.nodes.get_mut(&1).unwrap();
    let at = n1.driver.propose(g, b"x".to_vec()).expect("propose").index;
    let engine = n1.engine.clone();
    // The first half of the round hands out what may leave before the
    // write (what the node loop sends then). Per peer: whether its frame
    // carries the new entry, and the last index of the leader's log in
    // RocksDB when the frame was handed out.
    let (mut round, write) = n1.driver.begin_round();
    let frames = std::mem::take(&mut round.messages);
    let early: Vec<(u64, bool, u64)> = frames
        .iter()
        .map(|(to, frame)| {
            let carries = frame.iter().any(|e| {
                e.shard == g
                    && e.msg.get_msg_type() == MessageType::MsgAppend
                    && e.msg.entries.iter().any(|x| x.index == at)
            });
            (*to, carries, GroupStore::last_written(&engine, g).unwrap())
        })
        .collect();
    assert_eq!(
        early,
        vec![(2, true, at - 1), (3, true, at - 1)],
        "both followers get the entry before the leader has written it"
    );
    let written = write.write().expect("log write");
    n1.driver.finish_round(&mut round, written);
    assert_eq!(
        GroupStore::last_written(&engine, g).unwrap(),
        at,
        "written by the round"
    );
    assert!(
        round
            .messages
            .values()
            .flatten()
            .all(|e| e.msg.get_msg_type() != MessageType::MsgAppend),
        "no append waits for the write"
    );
    // Delivered with what waited for the write, the entry commits as usual.
    for (to, frame) in frames {
        round.messages.entry(to).or_default().extend(frame);
    }
    c.deliver(1, round);
    c.wait_applied(g, b"x", 50, "the early-sent entry commits");
}

#[test]
fn a_proposal_to_a_follower_is_refused_with_the_leader() {
    let mut c = LocalCluster::new(3, 4);
    let leaders = c.elect_spread();
    let g = ShardId(1);
    let leader = leaders[&g];
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let err = c
        .nodes
        .get_mut(&follower)
        .unwrap()
        .driver
        .propose(g, b"nope".to_vec())
        .expect_err("a follower refuses");
    assert!(
        matches!(err, DriverError::NotLeader { shard, leader: Some(l) } if shard == g && l == leader),
        "{err}"
    );
    let err = c
        .nodes
        .get_mut(&leader)
        .unwrap()
        .driver
        .propose(ShardId(99), b"nope".to_vec())
        .expect_err("unknown group");
    assert!(matches!(err, DriverError::UnknownGroup { shard } if shard == ShardId(99)));
}

#[test]
fn a_restarted_node_keeps_its_log_and_term_and_catches_up() {
    let mut c = LocalCluster::new(3, 8);
    let leaders = c.elect_spread();
    for (g, l) in &leaders {
        c.propose_at(*l, *g, b"before");
    }
    for g in leaders.keys() {
        c.wait_applied(*g, b"before", 20, "writes before the restart");
    }
    let stored = |c: &LocalCluster, id: u64| -> Vec<(u64, u64)> {
        c.groups
            .iter()
            .map(|g| {
                let s = c.nodes[&id].driver.store(*g).unwrap();
                (s.last(), s.hard_state().term)
            })
            .collect()
    };
    let before = stored(&c, 2);
    c.stop(2);
    c.restart(2);
    assert_eq!(stored(&c, 2), before, "log end and term survive a restart");
    let leaders = c.wait_leaders(200, "after the restart");
    for (g, l) in &leaders {
        c.propose_at(*l, *g, b"after");
    }
    for g in leaders.keys() {
        c.wait_applied(*g, b"after", 40, "writes after the restart");
    }
    // The restarted node applied from the start again: both writes, in order.
    for g in &c.groups {
        let data: Vec<Vec<u8>> = c.nodes[&2].applied[g]
            .iter()
            .map(|(_, d)| d.clone())
            .collect();
        assert_eq!(data, vec![b"before".to_vec(), b"after".to_vec()], "{g}");
    }
}

#[test]
fn a_deposed_leaders_unacknowledged_entry_is_replaced_and_never_applied() {
    let mut c = LocalCluster::new(3, 1);
    let g = ShardId(1);
    let leaders = c.elect_spread();
    let old = leaders[&g];
    c.propose_at(old, g, b"acked");
    c.wait_applied(g, b"acked", 20, "the acknowledged write");
    // Cut the leader off, then propose on it: the entry is in its log only.
    c.isolated.insert(old);
    c.propose_at(old, g, b"lost");
    c.pump();
    let old_last = c.nodes[&old].driver.store(g).unwrap().last();
    // The other two elect a new leader and commit another write at that index.
    let new = {
        let mut found = None;
        for _ in 0..300 {
            c.tick();
            found = (1..=3)
                .filter(|id| *id != old)
                .find(|id| c.nodes[id].driver.is_leader(g));
            if found.is_some() {
                break;
            }
        }
        found.expect("a new leader among the connected two within 300 ticks")
    };
    c.propose_at(new, g, b"winner");
    c.wait_applied(g, b"winner", 40, "the new leader's write");
    // Heal: the old leader's suffix is replaced by the new leader's.
    c.isolated.clear();
    c.wait_applied(g, b"winner", 200, "the old leader catching up");
    for (id, node) in &c.nodes {
        let data: Vec<&[u8]> = node.applied[&g].iter().map(|(_, d)| &d[..]).collect();
        assert!(
            !data.contains(&&b"lost"[..]),
            "node {id} applied an unacknowledged entry"
        );
        assert!(
            data.contains(&&b"acked"[..]),
            "node {id} lost an acknowledged entry"
        );
    }
    let leader_last = c.nodes[&new].driver.store(g).unwrap().last();
    assert!(
        leader_last >= old_last,
        "the new log reaches past the replaced entry"
    );
    // Every node's log agrees entry by entry (same terms at every index).
    let terms = |c: &LocalCluster, id: u64| -> Vec<u64> {
        use raft::Storage;
        let s = c.nodes[&id].driver.store(g).unwrap();
        (1..=s.last()).map(|i| s.term(i).unwrap()).collect()
    };
    assert_eq!(
        terms(&c, old),
        terms(&c, new),
        "the old leader's log matches the new one"
    );
    // And after a restart, from RocksDB rather than the in-memory tail.
    c.stop(old);
    c.restart(old);
    assert_eq!(
        terms(&c, old),
        terms(&c, new),
        "the replaced suffix is replaced on disk too"
    );
}

#[test]
fn entries_beyond_the_memory_tail_are_read_back_from_rocksdb() {
    use raft::{GetEntriesContext, Storage};
    let mut c = LocalCluster::new(3, 1);
    let g = ShardId(1);
    let leader = c.elect_spread()[&g];
    let total = tessera::multiraft::TAIL_ENTRIES + 500;
    for chunk in 0..total / 100 {
        for i in 0..100 {
            let w = format!("e{}", chunk * 100 + i).into_bytes();
            c.propose_at(leader, g, &w);
        }
        c.pump();
    }
    let last_write = format!("e{}", total / 100 * 100 - 1).into_bytes();
    c.wait_applied(g, &last_write, 40, "every write");
    let read_all = |c: &LocalCluster, id: u64| -> Vec<Vec<u8>> {
        let s = c.nodes[&id].driver.store(g).unwrap();
        s.entries(1, s.last() + 1, None, GetEntriesContext::empty(false))
            .unwrap()
            .into_iter()
            .filter(|e| !e.data.is_empty())
            .map(|e| e.data.to_vec())
            .collect()
    };
    let want: Vec<Vec<u8>> = (0..total / 100 * 100)
        .map(|i| format!("e{i}").into_bytes())
        .collect();
    assert_eq!(
        read_all(&c, leader),
        want,
        "leader: tail and RocksDB together"
    );
    // A size limit still returns at least one entry, and a prefix.
    let s = c.nodes[&leader].driver.store(g).unwrap();
    let limited = s
        .entries(1, s.last() + 1, Some(1), GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(limited.len(), 1, "one entry under a one-byte limit");
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    c.stop(follower);
    c.restart(follower);
    assert_eq!(
        read_all(&c, follower),
        want,
        "a restarted follower: all from RocksDB"
    );
}

#[test]
fn a_peer_cannot_propose_read_or_address_another_node() {
    use raft::eraftpb::{Entry, Message, MessageType};
    use tessera::multiraft::Envelope;
    let mut c = LocalCluster::new(3, 1);
    let g = ShardId(1);
    let leader = c.elect_spread()[&g];
    let peer = (1..=3).find(|id| *id != leader).unwrap();
    let before = c.nodes[&leader].driver.store(g).unwrap().last();
    let msg = |t: MessageType, to: u64| {
        let mut m = Message::default();
        m.set_msg_type(t);
        m.from = peer;
        m.to = to;
        m.set_entries(
            vec![Entry {
                data: b"injected".to_vec().into(),
                ..Default::default()
            }]
            .into(),
        );
        Envelope { shard: g, msg: m }
    };
    let d = &mut c.nodes.get_mut(&leader).unwrap().driver;
    for (t, to) in [
        (MessageType::MsgPropose, leader),
        (MessageType::MsgReadIndex, leader),
        (MessageType::MsgAppend, leader + 10),
    ] {
        let err = d.step(msg(t, to)).expect_err("refused");
        assert!(
            matches!(err, DriverError::Refused { shard, .. } if shard == g),
            "{err}"
        );
    }
    c.pump();
    assert_eq!(
        c.nodes[&leader].driver.store(g).unwrap().last(),
        before,
        "nothing was appended"
    );
}

#[test]
fn a_new_leader_confirms_read_points_only_after_committing_in_its_term() {
    let mut c = LocalCluster::new(3, 1);
    let g = ShardId(1);
    // Node 1 wins the election, but its first entry reaches nobody.
    c.appends_dropped.insert(1);
    c.nodes
        .get_mut(&1)
        .unwrap()
        .driver
        .campaign(g)
        .expect("campaign");
    c.pump();
    let d = &mut c.nodes.get_mut(&1).unwrap().driver;
    assert!(d.is_leader(g), "node 1 won the election");
    assert!(!d.can_read(g), "nothing of its term is committed yet");
    let err = d.read_index(g, 7).expect_err("not ready");
    assert!(
        matches!(err, DriverError::NotReady { shard } if shard == g),
        "{err}"
    );
    // Its entry commits once AppendEntries flow; then the read is confirmed.
    c.appends_dropped.clear();
    for _ in 0..20 {
        if c.nodes[&1].driver.can_read(g) {
            break;
        }
        c.tick();
    }
    let d = &mut c.nodes.get_mut(&1).unwrap().driver;
    assert!(
        d.can_read(g),
        "the leader's first entry is committed within 20 ticks"
    );
    d.read_index(g, 8).expect("read index");
    c.pump();
    let confirmed: Vec<u64> = c.reads[&1]
        .iter()
        .filter(|(s, ctx, _)| *s == g && *ctx == 8)
        .map(|(_, _, index)| *index)
        .collect();
    assert_eq!(confirmed.len(), 1, "the read point is confirmed once");
    assert!(confirmed[0] >= 1, "it covers the leader's first entry");
}

#[test]
fn a_ready_larger_than_the_memory_tail_stays_readable_until_written() {
    use raft::eraftpb::Entry;
    use raft::{GetEntriesContext, Storage};
    use tessera::multiraft::{GroupStore, TAIL_ENTRIES};
    let dir = tempfile::tempdir().unwrap();
    let engine =
        tessera::storage::Engine::open(tessera::storage::StorageConfig::new(dir.path())).unwrap();
    let g = ShardId(1);
    GroupStore::bootstrap(&engine, g, &[1, 2, 3]).unwrap();
    let mut store = GroupStore::open(&engine, g).unwrap();
    let n = TAIL_ENTRIES as u64 + 500;
    let entries: Vec<Entry> = (1..=n)
        .map(|i| Entry {
            index: i,
            term: 1,
            data: i.to_be_bytes().to_vec().into(),
            ..Default::default()
        })
        .collect();
    let mut batch = rocksdb::WriteBatch::default();
    store.stage(&entries, None, &mut batch);
    // Not written yet: every staged entry is still served from memory.
    let read = store
        .entries(1, n + 1, None, GetEntriesContext::empty(false))
        .expect("staged entries are readable before the write");
    assert_eq!(read, entries);
}

/// Drivers that compact a log once `every` entries can go, keeping `keep`.
fn compacting(every: u64, keep: u64) -> DriverConfig {
    DriverConfig {
        compact_every: every,
        compact_keep: keep,
        ..DriverConfig::default()
    }
}

/// Ticks until every running node's log of `g` starts after `beyond`;
/// returns that first index, the same on every node. Panics with `what`
/// after `max_ticks`.
fn wait_compacted(
    c: &mut LocalCluster,
    g: ShardId,
    beyond: u64,
    max_ticks: usize,
    what: &str,
) -> u64 {
    for _ in 0..max_ticks {
        let firsts: Vec<u64> = c
            .nodes
            .values()
            .map(|n| n.driver.store(g).expect("open").first())
            .collect();
        if firsts.iter().all(|f| *f > beyond) && firsts.windows(2).all(|w| w[0] == w[1]) {
            return firsts[0];
        }
        c.tick();
    }
    panic!(
        "{what}: the log of {g} was not compacted past {beyond} on every node in {max_ticks} ticks"
    );
}

#[test]
fn a_log_is_compacted_on_every_replica_and_reopens_from_its_compaction_point() {
    use raft::{GetEntriesContext, Storage};
    let config = compacting(20, 5);
    let mut c = LocalCluster::with_config(3, 1, config.clone());
    let g = ShardId(1);
    let leader = c.elect_spread()[&g];
    for i in 0..60 {
        c.propose_at(leader, g, format!("w{i}").as_bytes());
        if i % 10 == 9 {
            c.pump();
        }
    }
    c.wait_applied(g, b"w59", 40, "every write");
    let first = wait_compacted(&mut c, g, 20, 20, "60 writes, compaction every 20");
    let applied = c.nodes[&leader].driver.applied_index(g).unwrap();
    assert!(
        first <= applied + 1 - 5,
        "{} applied entries are kept below the point every voter holds (first {first}, applied {applied})",
        5
    );
    for (id, n) in &c.nodes {
        // The entries are gone from RocksDB, and raft-rs is told so.
        assert_eq!(
            GroupStore::first_written(&n.engine, g).unwrap(),
            Some(first),
            "node {id}: the first entry left in RocksDB"
        );
        let s = n.driver.store(g).unwrap();
        assert!(matches!(
            s.entries(first - 1, first + 1, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(raft::StorageError::Compacted))
        ));
        assert!(
            s.term(first - 1).unwrap() > 0,
            "node {id}: the compaction point keeps its term"
        );
        assert!(n.driver.stats().compactions >= 1, "node {id}");
    }
    // The group goes on from its compacted log.
    c.propose_at(leader, g, b"after");
    c.wait_applied(g, b"after", 40, "a write after the compaction");

    // A follower reopens from its compaction point.
    let f = (1..=3).find(|id| *id != leader).unwrap();
    let applied_f = c.nodes[&f].driver.applied_index(g).unwrap();
    let view = c.nodes[&f].driver.view(g).unwrap();
    c.stop(f);
    {
        // A state machine behind the compaction point lost entries the log
        // no longer has: refused, typed, rather than applied with a gap.
        let engine = Engine::open(StorageConfig::new(c.dir(f))).unwrap();
        let mut d = Driver::new(engine, f, config.clone());
        match d.open_group(g, first - 2) {
            Err(DriverError::Store(StoreError::Corrupt { .. })) => {}
            other => panic!("a state machine at {} opened: {other:?}", first - 2),
        }
    }
    c.restart_applied(f, &[(g, applied_f)].into());
    let reopened = c.nodes[&f].driver.view(g).unwrap();
    assert_eq!(
        (reopened.log_first, reopened.log_last),
        (view.log_first, view.log_last),
        "the log's range survives a restart"
    );
    let l = c.wait_leaders(200, "after the restart")[&g];
    c.propose_at(l, g, b"after restart");
    c.wait_applied(g, b"after restart", 40, "a write after the restart");
    let data: Vec<Vec<u8>> = c.nodes[&f].applied[&g]
        .iter()
        .map(|(_, d)| d.clone())
        .collect();
    assert_eq!(
        data,
        vec![b"after restart".to_vec()],
        "the restarted follower applies from its applied index on"
    );
}

#[test]
fn a_voter_that_is_away_holds_compaction_back_and_catches_up_from_the_log() {
    let mut c = LocalCluster::with_config(3, 1, compacting(20, 0));
    let g = ShardId(1);
    let leader = c.elect_spread()[&g];
    let away = (1..=3).find(|id| *id != leader).unwrap();
    c.propose_at(leader, g, b"w0");
    c.wait_applied(g, b"w0", 20, "the first write");
    let held = c.nodes[&away].driver.store(g).unwrap().last();
    c.isolated.insert(away);
    for i in 1..100 {
        c.propose_at(leader, g, format!("w{i}").as_bytes());
        if i % 10 == 9 {
            c.pump();
        }
    }
    c.wait_applied(g, b"w99", 40, "writes while a voter is away");
    // Many ticks, each a chance to compact: the log keeps everything the
    // voter that is away needs (no snapshot could replace it).
    for _ in 0..30 {
        c.tick();
    }
    for (id, n) in &c.nodes {
        let s = n.driver.store(g).unwrap();
        assert!(
            s.first() <= held + 1,
            "node {id} compacted to {} while n{away} holds only up to {held}",
            s.first() - 1
        );
        assert_eq!(n.driver.stats().compactions, 0, "node {id}");
    }
    c.isolated.remove(&away);
    c.wait_applied(g, b"w99", 100, "the voter back catches up from the log");
    let first = wait_compacted(&mut c, g, held + 1, 40, "every voter caught up");
    assert!(first > 20, "compacted to {}", first - 1);
    let data: Vec<Vec<u8>> = c.nodes[&away].applied[&g]
        .iter()
        .map(|(_, d)| d.clone())
        .collect();
    let want: Vec<Vec<u8>> = (0..100).map(|i| format!("w{i}").into_bytes()).collect();
    assert_eq!(data, want, "n{away} applied every write once, in order");
}

/// Drivers whose idle groups sleep: a leader after 6 settled ticks, its
/// followers after half an election timeout (5 ticks) of silence.
fn sleepy() -> DriverConfig {
    DriverConfig {
        sleep_after_ticks: 6,
        compact_every: 0,
        ..DriverConfig::default()
    }
}

/// Ticks until every running node's replica of every group sleeps; panics
/// with `what` after `max_ticks`.
fn wait_asleep(c: &mut LocalCluster, max_ticks: usize, what: &str) {
    for _ in 0..max_ticks {
        let all = c
            .nodes
            .values()
            .all(|n| c.groups.iter().all(|g| n.driver.is_asleep(*g)));
        if all {
            return;
        }
        c.tick();
    }
    panic!("{what}: not every replica slept within {max_ticks} ticks");
}

/// Three nodes with `groups` sleepy groups, leaders spread, one write
/// ("w1") applied in each, then every replica asleep.
fn asleep_after_a_write(groups: u64) -> (LocalCluster, BTreeMap<ShardId, u64>) {
    let mut c = LocalCluster::with_config(3, groups, sleepy());
    let leaders = c.elect_spread();
    for (g, l) in &leaders {
        c.propose_at(*l, *g, b"w1");
    }
    for g in leaders.keys() {
        c.wait_applied(*g, b"w1", 40, "the first writes");
    }
    wait_asleep(&mut c, 60, "after the first writes");
    (c, leaders)
}

/// Each running node's term of each group.
fn terms(c: &LocalCluster) -> BTreeMap<(u64, ShardId), u64> {
    c.nodes
        .iter()
        .flat_map(|(id, n)| {
            c.groups
                .iter()
                .map(move |g| ((*id, *g), n.driver.view(*g).unwrap().term))
        })
        .collect()
}

#[test]
fn idle_groups_sleep_on_every_replica_and_wake_for_a_write_without_an_election() {
    let (mut c, leaders) = asleep_after_a_write(8);
    let before = terms(&c);
    // Asleep, a group costs nothing: ticks produce no message at all (no
    // heartbeats, no election), however many pass.
    for _ in 0..50 {
        let ids: Vec<u64> = c.nodes.keys().copied().collect();
        for id in ids {
            let n = c.nodes.get_mut(&id).unwrap();
            n.driver.tick();
            let round = n.driver.round().unwrap();
            assert!(
                round.messages.is_empty(),
                "node {id} sent {:?}",
                round.messages
            );
        }
    }
    // A write wakes its group (only it) and commits under the same leader.
    let g = ShardId(1);
    let l = leaders[&g];
    c.propose_at(l, g, b"w2");
    c.wait_applied(g, b"w2", 40, "a write to a sleeping group");
    for (id, n) in &c.nodes {
        for other in c.groups.iter().filter(|o| **o != g) {
            assert!(n.driver.is_asleep(*other), "node {id}: {other} woke");
        }
    }
    // A linearizable read of a sleeping group is confirmed too.
    wait_asleep(&mut c, 60, "after the write");
    c.nodes
        .get_mut(&l)
        .unwrap()
        .driver
        .read_index(g, 77)
        .unwrap();
    for _ in 0..20 {
        if c.reads[&l].iter().any(|(s, ctx, _)| *s == g && *ctx == 77) {
            break;
        }
        c.tick();
    }
    assert!(
        c.reads[&l].iter().any(|(s, ctx, _)| *s == g && *ctx == 77),
        "the read point of a sleeping group was confirmed"
    );
    wait_asleep(&mut c, 60, "after the read");
    assert_eq!(terms(&c), before, "no group held an election");
    let stats = c.nodes[&l].driver.stats();
    assert!(stats.sleeps > stats.wakes && stats.wakes >= 2, "{stats:?}");
}

#[test]
fn a_dead_leaders_sleeping_groups_elect_once_woken_and_the_others_sleep_on() {
    let (mut c, leaders) = asleep_after_a_write(6);
    let before = terms(&c);
    let dead = 1;
    let orphans: Vec<ShardId> = leaders
        .iter()
        .filter(|(_, l)| **l == dead)
        .map(|(g, _)| *g)
        .collect();
    assert!(!orphans.is_empty(), "n{dead} leads some groups");
    c.stop(dead);
    // Asleep, the survivors do not notice by themselves.
    for _ in 0..50 {
        c.tick();
    }
    for g in &orphans {
        assert_eq!(c.agreed_leader(*g), None, "{g} elected while asleep");
    }
    // The node's liveness check tells them (`Mailbox::wake_led_by`).
    for n in c.nodes.values_mut() {
        n.driver.wake_led_by(dead);
    }
    let now = c.wait_leaders(200, "the dead leader's groups elect");
    for g in &orphans {
        assert_ne!(now[g], dead);
        c.propose_at(now[g], *g, b"w2");
        c.wait_applied(*g, b"w2", 40, "a write under the new leader");
    }
    // The other groups kept their leader and term, asleep throughout.
    for (g, l) in leaders.iter().filter(|(_, l)| **l != dead) {
        assert_eq!(now[g], *l);
        for (id, n) in &c.nodes {
            assert!(n.driver.is_asleep(*g), "node {id}: {g} woke");
            assert_eq!(n.driver.view(*g).unwrap().term, before[&(*id, *g)]);
        }
    }
}

#[test]
fn a_group_nobody_wrote_to_sleeps_once_settled_and_a_written_one_waits() {
    // Leaders of used groups wait 1,000 settled ticks; unused ones sleep
    // after two heartbeats carried their settled commit.
    let mut c = LocalCluster::with_config(
        3,
        4,
        DriverConfig {
            sleep_after_ticks: 1000,
            ..sleepy()
        },
    );
    let leaders = c.elect_spread();
    wait_asleep(&mut c, 40, "groups nobody wrote to");
    let g = ShardId(1);
    c.propose_at(leaders[&g], g, b"w");
    c.wait_applied(g, b"w", 40, "a write");
    for _ in 0..40 {
        c.tick();
    }
    for (id, n) in &c.nodes {
        assert!(!n.driver.is_asleep(g), "node {id}: the written group slept");
        for other in c.groups.iter().filter(|o| **o != g) {
            assert!(n.driver.is_asleep(*other), "node {id}: {other} woke");
        }
    }
}

/// Every append raft-rs sends under the groups' configuration
/// (`multiraft::raft_config`) names entries that follow its index. A
/// follower acknowledges an append as `index + entries.len()`, whatever
/// its entries' own indexes: an append whose entries start at its index
/// makes it acknowledge an entry it never wrote, and the leader later
/// sends it a commit past its log (raft-rs panics: `to_commit N is out of
/// range [last_index N-1]`, which the network-fault suite hit on the batch
/// system). raft-rs's `batch_append` builds such an append: it folds new
/// entries into an empty append still pending for the same follower
/// (sent when its progress was ahead) without checking that they follow
/// that append's index. Three in-memory replicas on a network that
/// drops, duplicates and reorders messages and hands each replica
/// several at once (as the node loop steps a round's inbound before its
/// ready); every message is checked, and no replica may panic.
#[test]
fn appends_name_entries_that_follow_their_index_under_a_lossy_network() {
    use raft::eraftpb::{ConfState, Message};
    use raft::storage::MemStorage;
    use raft::RawNode;
    use rand::{Rng, SeedableRng};
    use tessera::multiraft::raft_config;

    let logger = slog::Logger::root(slog::Discard, slog::o!());
    for seed in 0..60u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let config = DriverConfig::default();
        let mut nodes: Vec<RawNode<MemStorage>> = (1..=3u64)
            .map(|id| {
                let store =
                    MemStorage::new_with_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
                RawNode::new(&raft_config(id, &config, 0), store, &logger).unwrap()
            })
            .collect();
        let mut net: Vec<Message> = Vec::new();
        let mut proposed = 0u64;
        for step in 0..3000u32 {
            for (i, n) in nodes.iter_mut().enumerate() {
                if rng.gen_bool(0.3) {
                    n.tick();
                }
                if n.raft.state == raft::StateRole::Leader && rng.gen_bool(0.5) {
                    proposed += 1;
                    let _ = n.propose(vec![], proposed.to_be_bytes().to_vec());
                }
                // A handful of messages for this replica at once, in any
                // order, some lost, some twice.
                let mut mine: Vec<Message> = Vec::new();
                let mut k = 0;
                while k < net.len() {
                    if net[k].to == i as u64 + 1 && rng.gen_bool(0.6) {
                        mine.push(net.swap_remove(k));
                    } else {
                        k += 1;
                    }
                }
                for m in mine {
                    if rng.gen_bool(0.1) {
                        continue;
                    }
                    if rng.gen_bool(0.1) {
                        let _ = n.step(m.clone());
                    }
                    let _ = n.step(m);
                }
                if !n.has_ready() {
                    continue;
                }
                let mut rd = n.ready();
                let mut out = rd.take_messages();
                n.store().wl().append(rd.entries()).unwrap();
                if let Some(hs) = rd.hs() {
                    n.mut_store().wl().set_hardstate(hs.clone());
                }
                out.extend(rd.take_persisted_messages());
                let mut light = n.advance(rd);
                out.extend(light.take_messages());
                if let Some(c) = light.commit_index() {
                    n.mut_store().wl().mut_hard_state().set_commit(c);
                }
                n.advance_apply();
                for m in &out {
                    if m.get_msg_type() == MessageType::MsgAppend && !m.entries.is_empty() {
                        let first = m.entries[0].index;
                        assert_eq!(
                            first,
                            m.index + 1,
                            "seed {seed}, step {step}: node {} sent {} an append at index {} whose entries start at {first}",
                            m.from,
                            m.to,
                            m.index
                        );
                    }
                }
                net.extend(out);
            }
        }
        assert!(proposed > 0, "seed {seed}: no leader ever proposed");
    }
}
