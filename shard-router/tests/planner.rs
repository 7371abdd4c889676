//! The rebalance planner on synthetic cluster states: fixed scenarios, then
//! properties over random clusters (plan, apply every step, repeat).

use proptest::prelude::*;
use shard_router::planner::{check_step, misreplicated, StepError, LEADER_LOAD_TOLERANCE};
use shard_router::{
    apply_step, imbalance, plan, ClusterState, KeyRange, NodeId, NodeState, Plan, PlannerConfig,
    ShardDescriptor, ShardId, ShardState, Step,
};
use std::collections::{BTreeMap, BTreeSet};

fn node(id: u64) -> NodeState {
    NodeState::new(NodeId(id))
}

fn shard(id: u64, replicas: &[u64], leader: Option<u64>, bytes: u64) -> ShardState {
    ShardState {
        descriptor: ShardDescriptor::new(
            ShardId(id),
            KeyRange::full(),
            replicas.iter().map(|r| NodeId(*r)).collect(),
        ),
        leader: leader.map(NodeId),
        bytes,
        load: 0,
    }
}

/// `shards` shards of `r` replicas on consecutive nodes (round robin), leaders
/// rotating, so replica and leader counts are even.
fn balanced(nodes: u64, shards: u64, r: u64) -> ClusterState {
    ClusterState {
        nodes: (1..=nodes).map(node).collect(),
        shards: (0..shards)
            .map(|i| {
                let reps: Vec<u64> = (0..r).map(|k| (i + k) % nodes + 1).collect();
                let leader = reps[(i / nodes % r) as usize];
                shard(i + 1, &reps, Some(leader), 1000 + i)
            })
            .collect(),
    }
}

fn cfg(max_moves: usize, replication: usize) -> PlannerConfig {
    PlannerConfig {
        max_concurrent_moves: max_moves,
        split_bytes: None,
        replication,
    }
}

fn replicas_of(state: &ClusterState, s: u64) -> BTreeSet<NodeId> {
    state
        .shard(ShardId(s))
        .unwrap()
        .replicas()
        .iter()
        .copied()
        .collect()
}

/// Checks one plan's rules against the state it was made from, applying its
/// steps to `state` one by one and checking the invariants after each.
fn apply_checked(state: &mut ClusterState, p: &Plan, cfg: &PlannerConfig) {
    assert!(
        p.moves() <= cfg.max_concurrent_moves,
        "too many moves: {p:?}"
    );
    let mut moved = BTreeSet::new();
    let mut transferred = BTreeSet::new();
    let sizes: BTreeMap<ShardId, usize> = state
        .shards
        .iter()
        .map(|s| (s.id(), s.replicas().len()))
        .collect();
    let mut split = false;
    for step in &p.steps {
        match step {
            Step::MoveReplica {
                shard, from, to, ..
            } => {
                assert!(moved.insert(*shard), "two moves of {shard} in {p:?}");
                let to_node = state.node(*to).expect("target is a listed node");
                assert!(to_node.up && !to_node.draining, "target {to} not eligible");
                let from_node = state.node(*from);
                assert!(
                    from_node.is_some_and(|n| n.up || n.draining),
                    "moved a replica off down node {from}"
                );
            }
            Step::TransferLeader { shard, .. } => {
                assert!(!moved.contains(shard), "transfer after a move of {shard}");
                assert!(transferred.insert(*shard), "two transfers of {shard}");
            }
            Step::Split { .. } => {
                assert!(
                    moved.is_empty() && transferred.is_empty(),
                    "split not first"
                );
                split = true;
            }
        }
        if !matches!(step, Step::Split { .. }) {
            assert_eq!(check_step(state, step), Ok(()), "{step} in {p:?}");
        }
        apply_step(state, step);
        assert_eq!(state.check(), Ok(()), "after {step}");
    }
    if !split {
        for s in &state.shards {
            assert_eq!(sizes[&s.id()], s.replicas().len(), "voter count changed");
        }
    }
}

/// Plans and applies until the plan is empty; returns the number of rounds
/// that had steps, and every plan.
fn run(state: &mut ClusterState, cfg: &PlannerConfig, max_rounds: usize) -> (usize, Vec<Plan>) {
    let mut plans = Vec::new();
    for round in 0..=max_rounds {
        let p = plan(state, cfg);
        if p.is_empty() {
            return (round, plans);
        }
        apply_checked(state, &p, cfg);
        plans.push(p);
    }
    panic!("no fixpoint after {max_rounds} rounds: {state:?}");
}

/// Led load per eligible node (all nodes up in these tests).
fn led_load(s: &ClusterState) -> BTreeMap<NodeId, u64> {
    let mut led: BTreeMap<NodeId, u64> = s.nodes.iter().map(|n| (n.id, 0)).collect();
    for sh in &s.shards {
        if let Some(l) = sh.leader {
            *led.entry(l).or_default() += sh.load;
        }
    }
    led
}

/// Sum of squared deviations of the led load from its mean.
fn load_spread(s: &ClusterState) -> f64 {
    let led = led_load(s);
    let mean = led.values().sum::<u64>() as f64 / led.len() as f64;
    led.values().map(|v| (*v as f64 - mean).powi(2)).sum()
}

#[test]
fn hot_leaders_are_spread_by_load_with_counts_kept_even() {
    // Counts are even (3 nodes, 12 shards, 4 leaders each), but every hot
    // shard is led by node 1.
    let mut state = balanced(3, 12, 3);
    for sh in &mut state.shards {
        sh.load = if sh.leader == Some(NodeId(1)) { 100 } else { 1 };
    }
    let before = load_spread(&state);
    let p = plan(&state, &PlannerConfig::default());
    assert!(!p.is_empty(), "a node leading all the load is rebalanced");
    assert!(
        p.steps
            .iter()
            .all(|s| matches!(s, Step::TransferLeader { .. })),
        "load is balanced by transfers only: {p:?}"
    );
    let mut s = state.clone();
    let (rounds, _) = run(&mut s, &PlannerConfig::default(), 50);
    assert!(rounds >= 1);
    let im = imbalance(&s);
    assert!(im.is_balanced(), "counts stay balanced: {im:?}");
    assert!(load_spread(&s) < before / 4.0, "{:?}", led_load(&s));
    // No load at all: nothing to do beyond counts.
    let cold = balanced(3, 12, 3);
    assert!(plan(&cold, &PlannerConfig::default()).is_empty());
}

#[test]
fn a_node_leading_too_little_is_given_load() {
    // 5 nodes, 20 shards, 4 leaders each. Nodes 1-4 lead 400 each (within
    // 20% of the mean, 352); node 5 leads 160, 55% under it.
    let mut state = balanced(5, 20, 3);
    for sh in &mut state.shards {
        sh.load = if sh.leader == Some(NodeId(5)) {
            40
        } else {
            100
        };
    }
    let before = load_spread(&state);
    let cfg = PlannerConfig::default();
    let p = plan(&state, &cfg);
    assert!(!p.is_empty(), "a node under the band is given load");
    assert!(
        p.steps
            .iter()
            .all(|s| matches!(s, Step::TransferLeader { .. })),
        "by transfers only: {p:?}"
    );
    let mut s = state.clone();
    run(&mut s, &cfg, 50);
    assert!(imbalance(&s).is_balanced(), "counts stay balanced");
    let led = led_load(&s);
    let mean = led.values().sum::<u64>() as f64 / led.len() as f64;
    assert!(
        led.values()
            .all(|v| (*v as f64 - mean).abs() <= mean * LEADER_LOAD_TOLERANCE),
        "every node within 20% of the mean: {led:?}"
    );
    assert!(load_spread(&s) < before, "{before} -> {}", load_spread(&s));
}

/// `n` times the sum of squared deviations from the mean of `weight` summed
/// per eligible node over the replicas it holds (exact).
fn replica_spread(s: &ClusterState, weight: fn(&ShardState) -> u64) -> i128 {
    let eligible: Vec<NodeId> = s
        .nodes
        .iter()
        .filter(|n| n.is_eligible())
        .map(|n| n.id)
        .collect();
    let mut w: BTreeMap<NodeId, i128> = eligible.iter().map(|n| (*n, 0)).collect();
    for sh in &s.shards {
        let reps: BTreeSet<&NodeId> = sh.replicas().iter().collect();
        for r in reps {
            if let Some(v) = w.get_mut(r) {
                *v += i128::from(weight(sh));
            }
        }
    }
    let n = w.len() as i128;
    let sum: i128 = w.values().sum();
    n * w.values().map(|v| v * v).sum::<i128>() - sum * sum
}

#[test]
fn hot_replicas_are_spread_by_load_with_counts_kept_even() {
    // Counts are even (6 nodes, 12 shards, 6 replicas and 2 leaders each),
    // but node 6 follows every hot shard.
    let mut state = balanced(6, 12, 3);
    for sh in &mut state.shards {
        let follows = sh.replicas().contains(&NodeId(6)) && sh.leader != Some(NodeId(6));
        sh.load = if follows { 100 } else { 1 };
    }
    let before = replica_spread(&state, |s| s.load);
    let cfg = PlannerConfig::default();
    let mut s = state.clone();
    let mut moves = 0;
    for _ in 0..50 {
        let p = plan(&s, &cfg);
        if p.is_empty() {
            break;
        }
        for st in &p.steps {
            if let Step::MoveReplica { shard, from, .. } = st {
                // Load moves never take a leader's replica.
                assert_ne!(s.shard(*shard).unwrap().leader, Some(*from), "{p:?}");
                moves += 1;
            }
        }
        apply_checked(&mut s, &p, &cfg);
    }
    assert!(plan(&s, &cfg).is_empty(), "a fixpoint");
    assert!(moves > 0, "replicas moved for load");
    let im = imbalance(&s);
    assert!(im.is_balanced(), "counts stay balanced: {im:?}");
    let after = replica_spread(&s, |s| s.load);
    assert!(after < before / 4, "{before} -> {after}");
}

#[test]
fn big_replicas_are_spread_by_bytes_when_there_is_no_load() {
    let mut state = balanced(6, 12, 3);
    for sh in &mut state.shards {
        let follows = sh.replicas().contains(&NodeId(6)) && sh.leader != Some(NodeId(6));
        sh.bytes = if follows { 1 << 30 } else { 1 << 20 };
    }
    let before = replica_spread(&state, |s| s.bytes);
    let mut s = state.clone();
    let (rounds, _) = run(&mut s, &PlannerConfig::default(), 50);
    assert!(rounds >= 1);
    assert!(imbalance(&s).is_balanced());
    assert!(replica_spread(&s, |s| s.bytes) < before / 4);
}

#[test]
fn balanced_cluster_gives_an_empty_plan() {
    let state = balanced(3, 64, 3);
    let im = imbalance(&state);
    assert!(im.is_balanced(), "{im:?}");
    assert!(plan(&state, &PlannerConfig::default()).is_empty());
    // Also with more nodes than replicas.
    let state = balanced(5, 64, 3);
    assert!(imbalance(&state).is_balanced());
    assert!(plan(&state, &PlannerConfig::default()).is_empty());
}

#[test]
fn new_nodes_receive_the_smallest_shards_first() {
    let mut state = balanced(3, 64, 3);
    // Sizes not in id order: shard i is (i * 37 % 64 + 1) KiB.
    for (i, s) in state.shards.iter_mut().enumerate() {
        s.bytes = ((i as u64 * 37) % 64 + 1) * 1024;
    }
    state.nodes.push(node(4));
    state.nodes.push(node(5));
    let cfg = cfg(4, 3);
    let p = plan(&state, &cfg);
    assert_eq!(p.moves(), 4, "{p:?}");
    let mut by_size: Vec<&ShardState> = state.shards.iter().collect();
    by_size.sort_by_key(|s| s.bytes);
    let smallest: BTreeSet<ShardId> = by_size.iter().take(4).map(|s| s.id()).collect();
    let mut moved = BTreeSet::new();
    for step in &p.steps {
        if let Step::MoveReplica { shard, to, .. } = step {
            assert!([NodeId(4), NodeId(5)].contains(to), "{step}");
            moved.insert(*shard);
        }
    }
    assert_eq!(moved, smallest);
    assert_eq!(
        p.bytes_to_move(),
        by_size.iter().take(4).map(|s| s.bytes).sum()
    );

    let mut state2 = state.clone();
    let (rounds, plans) = run(&mut state2, &cfg, 200);
    assert!(rounds > 1);
    assert!(plans.iter().all(|p| p.moves() <= 4));
    let im = imbalance(&state2);
    assert!(im.is_balanced(), "{im:?}");
    // 192 replicas over 5 nodes: 38 or 39 each (38.4 ± 1 also allows 39.4).
    for n in &im.nodes {
        assert!((38..=39).contains(&n.replicas), "{n:?}");
        assert!((12..=13).contains(&n.leaders), "{n:?}");
    }
}

#[test]
fn draining_node_ends_empty() {
    let mut state = balanced(4, 40, 3);
    state.nodes[1].draining = true;
    let cfg = cfg(3, 3);
    run(&mut state, &cfg, 200);
    let im = imbalance(&state);
    let n2 = im.nodes.iter().find(|n| n.id == NodeId(2)).unwrap();
    assert_eq!((n2.replicas, n2.leaders), (0, 0));
    assert!(im.is_balanced(), "{im:?}");
    assert!(misreplicated(&state, &cfg).is_empty());
}

#[test]
fn leader_imbalance_is_fixed_by_transfers_only() {
    // Every shard on every node, all led by n1.
    let mut state = ClusterState {
        nodes: (1..=3).map(node).collect(),
        shards: (1..=30)
            .map(|i| shard(i, &[1, 2, 3], Some(1), 10))
            .collect(),
    };
    let p = plan(&state, &PlannerConfig::default());
    assert!(!p.is_empty());
    assert_eq!(p.moves(), 0);
    assert_eq!(p.transfers(), p.len());
    apply_checked(&mut state, &p, &PlannerConfig::default());
    let im = imbalance(&state);
    assert!(im.is_balanced(), "{im:?}");
    assert!(plan(&state, &PlannerConfig::default()).is_empty());

    // Round robin placement on 4 nodes, leaders on each shard's lowest replica
    // id: still fixable by transfers alone (some need a chain).
    let mut state = balanced(4, 20, 3);
    for s in &mut state.shards {
        s.leader = s.replicas().iter().min().copied();
    }
    let p = plan(&state, &PlannerConfig::default());
    assert_eq!(p.moves(), 0);
    assert!(p.transfers() > 0);
    apply_checked(&mut state, &p, &PlannerConfig::default());
    assert!(imbalance(&state).is_balanced());
}

#[test]
fn leader_chain_when_no_direct_transfer_exists() {
    // n1 leads 3, n3 none, and they share no shard: n1 must hand one
    // leadership to n2 (or n4), which hands one of its own to n3.
    let state = ClusterState {
        nodes: (1..=4).map(node).collect(),
        shards: vec![
            shard(1, &[1, 2], Some(1), 1),
            shard(2, &[1, 2], Some(1), 1),
            shard(3, &[1, 4], Some(1), 1),
            shard(4, &[2, 3], Some(2), 1),
            shard(5, &[2, 4], Some(2), 1),
            shard(6, &[3, 4], Some(4), 1),
            shard(7, &[3, 4], Some(4), 1),
        ],
    };
    let im = imbalance(&state);
    assert!(im.replicas_balanced() && !im.leaders_balanced(), "{im:?}");
    let cfg = cfg(4, 2);
    let p = plan(&state, &cfg);
    assert_eq!(p.moves(), 0, "{p:?}");
    assert_eq!(p.transfers(), 2, "{p:?}");
    assert!(p.steps.iter().all(|s| !matches!(
        s,
        Step::TransferLeader {
            from: NodeId(1),
            to: NodeId(3),
            ..
        }
    )));
    let mut s = state.clone();
    apply_checked(&mut s, &p, &cfg);
    assert!(imbalance(&s).is_balanced(), "{:?}", imbalance(&s));
    assert!(plan(&s, &cfg).is_empty());
}

#[test]
fn leaders_that_transfers_cannot_fix_get_a_replica_move() {
    // Single-replica shards: n1 leads 3, n2 holds one more replica but only
    // leaderless shards. A lone move would break replica balance, so the
    // planner swaps a led shard for a leaderless one.
    let mut shards: Vec<ShardState> = (1..=3).map(|i| shard(i, &[1], Some(1), 1)).collect();
    shards.extend((4..=7).map(|i| shard(i, &[2], None, 1)));
    let mut state = ClusterState {
        nodes: (1..=2).map(node).collect(),
        shards,
    };
    let cfg1 = cfg(4, 1);
    let p = plan(&state, &cfg1);
    assert_eq!(p.moves(), 2, "{p:?}");
    assert_eq!(p.transfers(), 0, "{p:?}");
    apply_checked(&mut state, &p, &cfg1);
    let im = imbalance(&state);
    assert!(im.is_balanced(), "{im:?}");

    // Three replicas on four nodes, 18 each. The shards on n4 have no leader
    // (say, elections pending), the six on {n1, n2, n3} lead 2/2/2, so n4 (0)
    // is more than one below the mean (1.5) and no transfer reaches it: a
    // replica of a led shard must land on n4 first.
    let mut shards: Vec<ShardState> = (1..=6)
        .map(|i| shard(i, &[1, 2, 3], Some((i - 1) % 3 + 1), 1))
        .collect();
    for (k, reps) in [[2, 3, 4], [1, 3, 4], [1, 2, 4]].iter().enumerate() {
        for j in 0..6 {
            shards.push(shard(7 + 6 * k as u64 + j, reps, None, 1));
        }
    }
    let mut state = ClusterState {
        nodes: (1..=4).map(node).collect(),
        shards,
    };
    let im = imbalance(&state);
    assert!(im.replicas_balanced() && !im.leaders_balanced(), "{im:?}");
    let cfg3 = cfg(4, 3);
    let p = plan(&state, &cfg3);
    assert_eq!(p.transfers(), 0, "{p:?}");
    assert!(p.moves() > 0, "{p:?}");
    for step in &p.steps {
        assert!(
            matches!(step, Step::MoveReplica { to: NodeId(4), .. }),
            "{p:?}"
        );
    }
    apply_checked(&mut state, &p, &cfg3);
    assert!(imbalance(&state).replicas_balanced());
    let p = plan(&state, &cfg3);
    assert!(p.transfers() > 0 && p.moves() == 0, "{p:?}");
    apply_checked(&mut state, &p, &cfg3);
    assert!(imbalance(&state).is_balanced(), "{:?}", imbalance(&state));
    assert!(plan(&state, &cfg3).is_empty());
}

#[test]
fn never_moves_to_a_node_holding_the_shard() {
    // n4 already holds shard 1 (the smallest), so shard 1 can only go to n5.
    let mut state = ClusterState {
        nodes: (1..=5).map(node).collect(),
        shards: vec![
            shard(1, &[1, 2, 4], Some(2), 1),
            shard(2, &[1, 2, 3], Some(2), 5),
            shard(3, &[1, 2, 3], Some(3), 5),
            shard(4, &[1, 3, 4], Some(3), 5),
            shard(5, &[1, 2, 3], Some(1), 5),
        ],
    };
    let cfg = cfg(4, 3);
    let mut rounds = 0;
    loop {
        let p = plan(&state, &cfg);
        if p.is_empty() {
            break;
        }
        for step in &p.steps {
            if let Step::MoveReplica { shard, to, .. } = step {
                assert!(!replicas_of(&state, shard.0).contains(to), "{step}");
            }
        }
        apply_checked(&mut state, &p, &cfg);
        rounds += 1;
        assert!(rounds < 20);
    }
    assert!(imbalance(&state).is_balanced());
}

#[test]
fn moving_the_leader_replica_transfers_leadership_first() {
    let state = ClusterState {
        nodes: vec![
            NodeState {
                draining: true,
                ..node(1)
            },
            node(2),
            node(3),
            node(4),
        ],
        shards: vec![shard(7, &[1, 2, 3], Some(1), 100)],
    };
    let p = plan(&state, &PlannerConfig::default());
    assert_eq!(
        p.steps,
        vec![
            Step::TransferLeader {
                shard: ShardId(7),
                from: NodeId(1),
                to: NodeId(2),
            },
            Step::MoveReplica {
                shard: ShardId(7),
                from: NodeId(1),
                to: NodeId(4),
                bytes: 100,
            },
        ]
    );
    // The rule as check_step sees it.
    assert_eq!(
        check_step(&state, &p.steps[1]),
        Err(StepError::SourceIsLeader {
            shard: ShardId(7),
            node: NodeId(1)
        })
    );
    let mut s = state.clone();
    apply_checked(&mut s, &p, &PlannerConfig::default());
    assert!(plan(&s, &PlannerConfig::default()).is_empty());
}

#[test]
fn balance_move_from_a_leader_transfers_first() {
    // Every shard on n1..n3 led by n1; a new n4. The smallest shard is moved
    // wherever it comes from, with a transfer first if its source leads it.
    let mut state = ClusterState {
        nodes: (1..=4).map(node).collect(),
        shards: (1..=12)
            .map(|i| shard(i, &[1, 2, 3], Some(1), 100 * i))
            .collect(),
    };
    let cfg = cfg(2, 3);
    let p = plan(&state, &cfg);
    let mut led_by_source = 0;
    for (i, step) in p.steps.iter().enumerate() {
        if let Step::MoveReplica { shard, from, .. } = step {
            if state.shard(*shard).unwrap().leader == Some(*from) {
                led_by_source += 1;
                assert!(
                    matches!(&p.steps[i - 1], Step::TransferLeader { shard: s, from: f, .. } if s == shard && f == from),
                    "{p:?}"
                );
            }
        }
    }
    assert!(led_by_source > 0, "{p:?}");
    run(&mut state, &cfg, 100);
    assert!(imbalance(&state).is_balanced());
}

#[test]
fn single_replica_shard_moves_with_its_leadership() {
    let state = ClusterState {
        nodes: vec![
            NodeState {
                draining: true,
                ..node(1)
            },
            node(2),
        ],
        shards: vec![shard(1, &[1], Some(1), 9)],
    };
    let p = plan(&state, &cfg(4, 1));
    assert_eq!(
        p.steps,
        vec![Step::MoveReplica {
            shard: ShardId(1),
            from: NodeId(1),
            to: NodeId(2),
            bytes: 9
        }]
    );
    let mut s = state.clone();
    apply_checked(&mut s, &p, &cfg(4, 1));
    assert_eq!(s.shards[0].leader, Some(NodeId(2)));
}

#[test]
fn down_node_is_never_a_target_and_keeps_its_replicas() {
    // n4 is down and empty, n5 up and empty, n3's replicas of shard 1 sit on
    // down n6 too.
    let mut state = balanced(3, 30, 3);
    state.nodes.push(NodeState {
        up: false,
        ..node(4)
    });
    state.nodes.push(node(5));
    state.nodes.push(NodeState {
        up: false,
        ..node(6)
    });
    state.shards.push(shard(100, &[1, 2, 6], Some(1), 1));
    let cfg = cfg(4, 3);
    let (_, plans) = run(&mut state, &cfg, 100);
    for step in plans.iter().flat_map(|p| &p.steps) {
        if let Step::MoveReplica { from, to, .. } | Step::TransferLeader { from, to, .. } = step {
            assert_ne!(*to, NodeId(4));
            assert_ne!(*to, NodeId(6));
            assert_ne!(*from, NodeId(6));
        }
    }
    assert!(replicas_of(&state, 100).contains(&NodeId(6)));
    let im = imbalance(&state);
    assert!(im.is_balanced(), "{im:?}");
    let n4 = im.nodes.iter().find(|n| n.id == NodeId(4)).unwrap();
    assert_eq!(n4.replicas, 0);
}

#[test]
fn down_and_draining_node_is_emptied_when_shards_have_a_majority() {
    let mut state = balanced(4, 20, 3);
    state.nodes[3] = NodeState {
        id: NodeId(4),
        up: false,
        draining: true,
    };
    // Leaders recorded on the dead node would be stale: none there.
    for s in &mut state.shards {
        if s.leader == Some(NodeId(4)) {
            s.leader = s.replicas().iter().copied().find(|r| *r != NodeId(4));
        }
    }
    let cfg = cfg(4, 3);
    run(&mut state, &cfg, 100);
    let im = imbalance(&state);
    assert!(im.is_balanced(), "{im:?}");
}

#[test]
fn shard_without_an_up_majority_is_never_touched() {
    let state = ClusterState {
        nodes: vec![
            NodeState {
                draining: true,
                ..node(1)
            },
            NodeState {
                up: false,
                ..node(2)
            },
            NodeState {
                up: false,
                ..node(3)
            },
            node(4),
            node(5),
            node(6),
        ],
        shards: vec![
            shard(1, &[1, 2, 3], Some(1), 1),
            shard(2, &[1, 4, 5], Some(1), 1),
            // Leader recorded on a down node: stale, wait for fresh state.
            shard(3, &[2, 4, 5], Some(2), 1),
        ],
    };
    let mut s = state.clone();
    let cfg = cfg(4, 3);
    let (_, plans) = run(&mut s, &cfg, 20);
    for step in plans.iter().flat_map(|p| &p.steps) {
        assert_eq!(step.shard(), ShardId(2), "{step}");
    }
    assert_eq!(s.shards[0], state.shards[0]);
    assert_eq!(s.shards[2], state.shards[2]);
    assert!(!replicas_of(&s, 2).contains(&NodeId(1)));
    assert_eq!(
        check_step(
            &state,
            &Step::MoveReplica {
                shard: ShardId(1),
                from: NodeId(1),
                to: NodeId(4),
                bytes: 1
            }
        ),
        Err(StepError::NoQuorum { shard: ShardId(1) })
    );
}

#[test]
fn splits_come_first_and_their_shards_wait() {
    let mut state = balanced(3, 6, 3);
    state.shards[2].bytes = 10_000;
    state.nodes.push(node(4));
    let cfg = PlannerConfig {
        split_bytes: Some(4_000),
        ..PlannerConfig::default()
    };
    let p = plan(&state, &cfg);
    assert_eq!(
        p.steps[0],
        Step::Split {
            shard: ShardId(3),
            bytes: 10_000
        }
    );
    assert_eq!(p.splits(), 1);
    assert!(p.steps[1..].iter().all(|s| s.shard() != ShardId(3)));
    let mut s = state.clone();
    let (_, plans) = run(&mut s, &cfg, 50);
    // 10000 -> 5000 + 5000 -> four of 2500.
    assert_eq!(plans.iter().map(Plan::splits).sum::<usize>(), 3);
    assert_eq!(s.shards.len(), 9);
    assert!(s.shards.iter().all(|s| s.bytes <= 4_000));
    assert!(imbalance(&s).is_balanced());
}

#[test]
fn zero_move_budget_still_transfers() {
    let mut state = balanced(3, 9, 3);
    state.nodes.push(node(4));
    for s in &mut state.shards {
        s.leader = Some(NodeId(1));
    }
    let p = plan(&state, &cfg(0, 3));
    assert_eq!(p.moves(), 0);
    assert!(p.transfers() > 0);
}

#[test]
fn plan_ignores_input_order() {
    let mut state = balanced(3, 40, 3);
    for (i, s) in state.shards.iter_mut().enumerate() {
        s.bytes = (i as u64 * 7919) % 101;
        s.leader = Some(NodeId(1 + (i as u64 % 2)));
    }
    state.nodes.push(node(4));
    state.nodes[0].draining = true;
    let mut rev = state.clone();
    rev.nodes.reverse();
    rev.shards.reverse();
    let cfg = cfg(3, 3);
    assert_eq!(plan(&state, &cfg), plan(&rev, &cfg));
    assert_eq!(plan(&state, &cfg), plan(&state, &cfg));
}

#[test]
fn summaries_and_display() {
    let p = Plan {
        steps: vec![
            Step::Split {
                shard: ShardId(1),
                bytes: 10,
            },
            Step::TransferLeader {
                shard: ShardId(2),
                from: NodeId(1),
                to: NodeId(2),
            },
            Step::MoveReplica {
                shard: ShardId(2),
                from: NodeId(1),
                to: NodeId(3),
                bytes: 7,
            },
        ],
    };
    assert_eq!(
        (p.len(), p.moves(), p.transfers(), p.splits()),
        (3, 1, 1, 1)
    );
    assert_eq!(p.bytes_to_move(), 7);
    assert_eq!(p.steps[2].to_string(), "move s2 n1 -> n3 (7 bytes)");
    assert_eq!(p.steps[1].to_string(), "transfer leader s2 n1 -> n2");
    fn serde<T: serde::Serialize + serde::de::DeserializeOwned>() {}
    serde::<Plan>();
    serde::<ClusterState>();
    serde::<PlannerConfig>();
    serde::<shard_router::Imbalance>();
    let im = imbalance(&balanced(3, 3, 3));
    assert_eq!(im.mean_replicas, 3.0);
    assert_eq!(im.max_leader_deviation, 0.0);
}

// ---- properties ----

/// splitmix64: the test's own deterministic choice of replicas.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `r` distinct nodes out of `1..=n`, from `seed`.
fn pick(n: usize, r: usize, seed: u64) -> Vec<u64> {
    let mut all: Vec<u64> = (1..=n as u64).collect();
    let mut x = seed;
    for i in 0..r {
        x = mix(x);
        let j = i + (x % (n - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(r);
    all
}

type ShardSpec = (u64, Option<u8>, u64, u64);

fn build(n: usize, r: usize, up: &[bool], draining: &[bool], specs: &[ShardSpec]) -> ClusterState {
    let mut nodes: Vec<NodeState> = (0..n)
        .map(|i| NodeState {
            id: NodeId(i as u64 + 1),
            up: up[i],
            draining: draining[i],
        })
        .collect();
    // Keep at least `r` eligible nodes: revive and undrain the lowest ids.
    let mut i = 0;
    while nodes.iter().filter(|n| n.is_eligible()).count() < r {
        nodes[i].up = true;
        nodes[i].draining = false;
        i += 1;
    }
    let shards = specs
        .iter()
        .enumerate()
        .map(|(i, (seed, leader, bytes, load))| {
            let reps = pick(n, r, *seed);
            let leader = leader.map(|l| reps[l as usize % r]);
            ShardState {
                load: *load,
                ..shard(i as u64 + 1, &reps, leader, *bytes)
            }
        })
        .collect();
    ClusterState { nodes, shards }
}

fn cluster(with_down: bool) -> impl Strategy<Value = (ClusterState, PlannerConfig)> {
    (2usize..=8)
        .prop_flat_map(move |n| {
            let r = if n >= 3 {
                Just(3).boxed()
            } else {
                (1..=n).boxed()
            };
            let up = if with_down {
                proptest::collection::vec(proptest::bool::weighted(0.8), n).boxed()
            } else {
                Just(vec![true; n]).boxed()
            };
            (
                Just(n),
                r,
                up,
                proptest::collection::vec(proptest::bool::weighted(0.3), n),
                proptest::collection::vec(
                    (
                        any::<u64>(),
                        proptest::option::weighted(0.9, 0u8..3),
                        prop_oneof![0u64..1_000, 0u64..1_000_000_000],
                        0u64..100,
                    ),
                    1..100,
                ),
                2usize..=8,
            )
        })
        .prop_map(|(n, r, up, draining, specs, moves)| {
            let state = build(n, r, &up, &draining, &specs);
            (state, cfg(moves, r))
        })
}

// 256 cases by default; PROPTEST_CASES=N for a longer run. Failures are kept
// in tests/planner.proptest-regressions.
proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn plans_converge_to_balance((state, cfg) in cluster(false)) {
        let mut rev = state.clone();
        rev.nodes.reverse();
        rev.shards.reverse();
        prop_assert_eq!(plan(&state, &cfg), plan(&rev, &cfg));

        let mut s = state.clone();
        let (rounds, _) = run(&mut s, &cfg, 200);
        prop_assert!(rounds <= 200);
        let im = imbalance(&s);
        prop_assert!(im.replicas_balanced(), "{:?}", im);
        prop_assert!(im.leaders_balanced(), "{:?}", im);
        prop_assert!(im.drained(), "{:?}", im);
        for sh in &s.shards {
            let distinct: BTreeSet<_> = sh.replicas().iter().collect();
            prop_assert_eq!(distinct.len(), cfg.replication);
        }
        prop_assert!(misreplicated(&s, &cfg).is_empty());
        // Leaderless shards stay leaderless; the others keep a leader.
        for (a, b) in state.shards.iter().zip(&s.shards) {
            prop_assert_eq!(a.leader.is_some(), b.leader.is_some());
        }
    }

    /// A zero move budget and no split size (how `tessera-ctl rebalance`
    /// plans shards whose replicas cannot move) plans leader transfers
    /// only, reaches a fixpoint, and never changes a replica set.
    #[test]
    fn a_zero_move_budget_plans_transfers_only((state, cfg) in cluster(false)) {
        let cfg = PlannerConfig { max_concurrent_moves: 0, split_bytes: None, ..cfg };
        let mut s = state.clone();
        for _ in 0..200 {
            let p = plan(&s, &cfg);
            if p.is_empty() {
                break;
            }
            prop_assert!(
                p.steps.iter().all(|st| matches!(st, Step::TransferLeader { .. })),
                "{:?}", p
            );
            apply_checked(&mut s, &p, &cfg);
        }
        prop_assert!(plan(&s, &cfg).is_empty(), "no fixpoint in 200 rounds");
        for (a, b) in state.shards.iter().zip(&s.shards) {
            prop_assert_eq!(a.id(), b.id());
            prop_assert_eq!(a.replicas(), b.replicas());
        }
    }

    /// Once counts are balanced and nothing is left to drain, every round
    /// either only transfers leaders for load, strictly lowering the
    /// led-load spread, or only moves non-leader replicas, keeping it and
    /// strictly lowering the replica-load spread, or keeping that too and
    /// strictly lowering the replica-byte spread; at the fixpoint every
    /// node leads within 20% of the mean, or no single count-keeping
    /// transfer off a node over that band, or onto a node under it, would
    /// lower the spread.
    #[test]
    fn leader_load_rounds_only_lower_the_spread((state, cfg) in cluster(false)) {
        let mut s = state.clone();
        for round in 0..200 {
            let p = plan(&s, &cfg);
            if p.is_empty() {
                break;
            }
            let im = imbalance(&s);
            let settled = im.replicas_balanced() && im.leaders_balanced() && im.drained();
            let before = load_spread(&s);
            let (load_before, bytes_before) = (replica_spread(&s, |x| x.load), replica_spread(&s, |x| x.bytes));
            apply_checked(&mut s, &p, &cfg);
            if settled {
                let transfers = p.steps.iter().all(|st| matches!(st, Step::TransferLeader { .. }));
                let moves = p.steps.iter().all(|st| matches!(st, Step::MoveReplica { .. }));
                prop_assert!(transfers || moves, "{:?}", p);
                if transfers {
                    prop_assert!(load_spread(&s) < before, "round {}: {} -> {}", round, before, load_spread(&s));
                } else {
                    prop_assert_eq!(load_spread(&s), before, "round {}: moves changed led load", round);
                    let (l, b) = (replica_spread(&s, |x| x.load), replica_spread(&s, |x| x.bytes));
                    prop_assert!(
                        l < load_before || (l == load_before && b < bytes_before),
                        "round {}: replica load {} -> {}, bytes {} -> {}", round, load_before, l, bytes_before, b
                    );
                    prop_assert!(imbalance(&s).is_balanced(), "moves kept counts balanced");
                }
            }
        }
        prop_assert!(plan(&s, &cfg).is_empty(), "no fixpoint in 200 rounds");
        let led = led_load(&s);
        let eligible: Vec<NodeId> = s.nodes.iter().filter(|n| n.is_eligible()).map(|n| n.id).collect();
        let total: u64 = eligible.iter().map(|n| led[n]).sum();
        let mean = total as f64 / eligible.len() as f64;
        let max = eligible.iter().map(|n| led[n]).max().unwrap_or(0);
        let min = eligible.iter().map(|n| led[n]).min().unwrap_or(0);
        if total > 0 && (max as f64 > mean * 1.2 || (min as f64) < mean * 0.8) {
            // No improving transfer keeps leader counts within one of the mean.
            let counts = |s: &ClusterState| {
                let mut c: BTreeMap<NodeId, usize> = eligible.iter().map(|n| (*n, 0)).collect();
                for sh in &s.shards {
                    if let Some(v) = sh.leader.and_then(|l| c.get_mut(&l)) {
                        *v += 1;
                    }
                }
                c
            };
            let lc = counts(&s);
            let n = lc.len();
            let total_leaders: usize = lc.values().sum();
            for sh in &s.shards {
                let Some(from) = sh.leader else { continue };
                for to in sh.replicas() {
                    if *to == from || !eligible.contains(to) || !eligible.contains(&from) {
                        continue;
                    }
                    let hot = led[&from] as f64 > mean * 1.2;
                    let cold = (led[to] as f64) < mean * 0.8;
                    if !hot && !cold {
                        continue;
                    }
                    let (a, b, x) = (led[&from], led[to], sh.load);
                    // The planner's floor: a shift under 5% of the mean is noise.
                    let floor = ((mean * shard_router::planner::LOAD_SHIFT_MIN_SHARE).ceil() as u64).max(1);
                    if x < floor || a <= b || x >= a - b {
                        continue;
                    }
                    let mut after = lc.clone();
                    *after.get_mut(&from).unwrap() -= 1;
                    *after.get_mut(to).unwrap() += 1;
                    let even = after.values().all(|&c| c * n <= total_leaders + n && c * n + n >= total_leaders);
                    prop_assert!(!even, "{:?} could still go from {} to {}", sh.id(), from, to);
                }
            }
        }
    }

    #[test]
    fn plans_stay_safe_with_down_nodes((state, cfg) in cluster(true)) {
        let mut s = state.clone();
        run(&mut s, &cfg, 300);
        // Replicas on down, non-draining nodes never move.
        for (a, b) in state.shards.iter().zip(&s.shards) {
            for r in a.replicas() {
                let n = state.node(*r).unwrap();
                if !n.up && !n.draining {
                    prop_assert!(b.replicas().contains(r));
                }
            }
            // Shards that were not live are untouched.
            let up = a.replicas().iter().filter(|r| state.node(**r).unwrap().up).count();
            let leader_up = a.leader.is_none_or(|l| state.node(l).unwrap().up);
            if up * 2 <= a.replicas().len() || !leader_up {
                prop_assert_eq!(a, b);
            }
        }
        let im = imbalance(&s);
        // With every shard live, the drain and the balance complete too.
        let all_live = state.shards.iter().all(|a| {
            let up = a.replicas().iter().filter(|r| state.node(**r).unwrap().up).count();
            up * 2 > a.replicas().len() && a.leader.is_none_or(|l| state.node(l).unwrap().up)
        });
        let no_down_replica = state.shards.iter().all(|a| {
            a.replicas().iter().all(|r| {
                let n = state.node(*r).unwrap();
                n.up || n.draining
            })
        });
        if all_live && no_down_replica {
            prop_assert!(im.is_balanced(), "{:?}", im);
        }
    }
}
