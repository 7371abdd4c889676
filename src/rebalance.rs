//! Rebalancing a running cluster: read its state through a [`Client`],
//! plan with `shard-router`'s pure planner, execute the steps (moves and
//! leader transfers) with a bounded number of moves at once, and plan
//! again until the plan is empty.
//!
//! Every step is an idempotent admin request that the cluster re-checks,
//! so an interrupted run started again continues from the cluster's state.

use crate::client::{Client, ClientError, NodeCallError};
use crate::{NodeId, ShardId};
use shard_router::planner::{self, ClusterState, NodeState, Plan, PlannerConfig, ShardState, Step};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The cluster as its nodes report it: every node that answers is up, each
/// shard's newest descriptor, its leader, its largest replica size, its
/// load summed over its replicas (at least what its leader reported to
/// the meta shard in the last 30 s). Every shard, on either Raft system
/// (see [`cluster_states`] for them apart).
///
/// # Errors
/// [`NodeCallError::NoneAnswered`] when no node answers.
pub async fn cluster_state(client: &Client) -> Result<ClusterState, NodeCallError> {
    let (state, batch) = cluster_states(client).await?;
    Ok(joined(state, batch))
}

/// The two populations of [`cluster_states`] as one state, shards in id
/// order.
pub fn joined(mut openraft: ClusterState, batch: ClusterState) -> ClusterState {
    openraft.shards.extend(batch.shards);
    openraft.shards.sort_by_key(|s| s.descriptor.id);
    openraft
}

/// [`cluster_state`] in two: the openraft shards, and the batch-system
/// shards (which can have their leadership transferred but cannot move
/// or split yet). Both name the same nodes.
///
/// # Errors
/// As [`cluster_state`].
pub async fn cluster_states(
    client: &Client,
) -> Result<(ClusterState, ClusterState), NodeCallError> {
    let nodes = client.refresh_nodes().await?;
    let mut state = ClusterState::default();
    let mut shards: BTreeMap<ShardId, ShardState> = BTreeMap::new();
    let mut batch_ids = std::collections::BTreeSet::new();
    for (id, _) in nodes {
        let status = client.node_status(id).await;
        state.nodes.push(NodeState {
            id,
            up: status.is_ok(),
            draining: false,
        });
        let Ok(status) = status else { continue };
        for s in status.shards {
            if s.batch {
                batch_ids.insert(s.descriptor.id);
            }
            let entry = shards.entry(s.descriptor.id).or_insert_with(|| ShardState {
                descriptor: s.descriptor.clone(),
                leader: None,
                bytes: 0,
                load: 0,
            });
            if s.descriptor.epoch > entry.descriptor.epoch {
                entry.descriptor = s.descriptor.clone();
            }
            entry.bytes = entry.bytes.max(s.size_bytes);
            // Recent operations, as the serving replica counts them.
            entry.load += (s.reads_per_s + s.writes_per_s).round() as u64;
            if s.leader == Some(id) {
                entry.leader = Some(id);
            }
        }
    }
    // A leader that just restarted counts its load from 0 again: the load
    // its predecessor reported to the meta shard, if recent, is the floor.
    if let Ok(reports) = client.load_reports().await {
        let now = crate::command::wall_clock_ms();
        for r in reports {
            let fresh = now.saturating_sub(r.at_ms) <= LOAD_REPORT_FRESH_MS;
            if let Some(s) = shards.get_mut(&r.shard).filter(|_| fresh) {
                s.load = s.load.max(r.reads_per_s + r.writes_per_s);
            }
        }
    }
    // A replica list names voters only; a leader outside it is stale.
    for s in shards.values_mut() {
        if s.leader
            .is_some_and(|l| !s.descriptor.replicas.contains(&l))
        {
            s.leader = None;
        }
    }
    let mut batch = ClusterState {
        nodes: state.nodes.clone(),
        shards: Vec::new(),
    };
    for (id, s) in shards {
        if batch_ids.contains(&id) {
            batch.shards.push(s);
        } else {
            state.shards.push(s);
        }
    }
    Ok((state, batch))
}

/// One round's plan for both populations of [`cluster_states`], each
/// planned in full (splits, moves, leader transfers) on its own: a shard
/// never merges or shares a move budget across the two Raft systems.
pub fn plan(openraft: &ClusterState, batch: &ClusterState, cfg: &PlannerConfig) -> Plan {
    let mut plan = planner::plan(openraft, cfg);
    if !batch.shards.is_empty() {
        plan.steps.extend(planner::plan(batch, cfg).steps);
    }
    plan
}

/// A load report in the meta shard younger than this is taken as a floor
/// of the shard's load (see [`cluster_state`]).
const LOAD_REPORT_FRESH_MS: u64 = 30_000;

/// The longest rest after a move (see [`rebalance`]).
const MOVE_REST_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// What a rebalance run reports as it goes.
pub trait Progress: Send + Sync {
    /// A round's plan, before it runs.
    fn planned(&self, _round: usize, _plan: &Plan) {}
    /// A step started.
    fn started(&self, _step: &Step) {}
    /// A step finished (`Err` with the reason when it failed).
    fn finished(&self, _step: &Step, _result: &Result<(), String>) {}
}

/// A [`Progress`] that reports nothing.
pub struct Quiet;
impl Progress for Quiet {}

/// The outcome of [`rebalance`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Rounds planned (the last one empty unless stopped or out of rounds).
    pub rounds: usize,
    /// Replica moves done.
    pub moves: usize,
    /// Leader transfers done.
    pub transfers: usize,
    /// Bytes of the shards moved (approximate: their sizes).
    pub bytes_moved: u64,
    /// Steps that failed (each retried by the next round's plan).
    pub failed: usize,
    /// Whether the run was stopped before the plan came out empty.
    pub interrupted: bool,
    /// Whether the last plan was empty: the cluster is balanced.
    pub balanced: bool,
}

/// Plans and executes until the plan is empty, `max_rounds` ran, or
/// `stop` is set (Ctrl-C): steps in flight then finish, no new one starts.
/// After each move its slot rests as long as the move took (at most 30 s),
/// so moves occupy at most half of the time and clients keep their
/// latencies.
///
/// # Errors
/// [`ClientError`] only when the cluster state cannot be read at all.
pub async fn rebalance(
    client: &Client,
    cfg: &PlannerConfig,
    max_rounds: usize,
    stop: Arc<AtomicBool>,
    progress: Arc<dyn Progress>,
) -> Result<Summary, ClientError> {
    let mut summary = Summary::default();
    for round in 1..=max_rounds {
        if stop.load(Ordering::Relaxed) {
            summary.interrupted = true;
            return Ok(summary);
        }
        let (state, batch) =
            cluster_states(client)
                .await
                .map_err(|last_error| ClientError::Timeout {
                    deadline: std::time::Duration::ZERO,
                    last_error: last_error.to_string(),
                })?;
        let plan = plan(&state, &batch, cfg);
        summary.rounds = round;
        progress.planned(round, &plan);
        if plan.is_empty() {
            summary.balanced = true;
            return Ok(summary);
        }
        // One chain of steps per shard, in plan order (a transfer before
        // the move it prepares); chains run side by side, at most
        // `max_concurrent_moves` at once.
        let mut chains: BTreeMap<ShardId, Vec<Step>> = BTreeMap::new();
        let mut order = Vec::new();
        for step in plan.steps {
            let shard = step.shard();
            if !chains.contains_key(&shard) {
                order.push(shard);
            }
            chains.entry(shard).or_default().push(step);
        }
        let permits = Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent_moves.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for shard in order {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let chain = chains.remove(&shard).unwrap_or_default();
            let permit = permits.clone().acquire_owned().await.expect("never closed");
            let (client, progress, stop) = (client.clone(), progress.clone(), stop.clone());
            tasks.spawn(async move {
                let _permit = permit;
                let mut done = Vec::new();
                for step in chain {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    progress.started(&step);
                    let began = std::time::Instant::now();
                    let r = run_step(&client, &step).await;
                    progress.finished(&step, &r);
                    let ok = r.is_ok();
                    let moved = matches!(step, Step::MoveReplica { .. });
                    done.push((step, r));
                    if !ok {
                        break;
                    }
                    if moved {
                        // A move's slot rests as long as the move took:
                        // moves take at most half of each slot's time, so
                        // client requests get the disks and cores between
                        // them (the rebalance takes about twice as long).
                        let rest = began.elapsed().min(MOVE_REST_MAX);
                        if !stop.load(Ordering::Relaxed) {
                            tokio::time::sleep(rest).await;
                        }
                    }
                }
                done
            });
        }
        while let Some(r) = tasks.join_next().await {
            for (step, result) in r.unwrap_or_default() {
                match (&step, result) {
                    (Step::MoveReplica { bytes, .. }, Ok(())) => {
                        summary.moves += 1;
                        summary.bytes_moved += bytes;
                    }
                    (Step::TransferLeader { .. }, Ok(())) => summary.transfers += 1,
                    (Step::Split { .. }, Ok(())) => {}
                    (_, Err(_)) => summary.failed += 1,
                }
            }
        }
    }
    summary.interrupted = stop.load(Ordering::Relaxed);
    Ok(summary)
}

async fn run_step(client: &Client, step: &Step) -> Result<(), String> {
    match step {
        Step::MoveReplica {
            shard, from, to, ..
        } => client
            .move_replica(*shard, *from, *to)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Step::TransferLeader { shard, to, .. } => client
            .transfer_leader(*shard, *to)
            .await
            .map_err(|e| e.to_string()),
        Step::Split { shard, .. } => Err(format!(
            "{shard}: splits are planned only with a size limit; run `tessera-ctl split KEY`"
        )),
    }
}

/// Replica and leader counts per node, for reports and tests.
pub fn counts(state: &ClusterState) -> BTreeMap<NodeId, (usize, usize)> {
    let mut out: BTreeMap<NodeId, (usize, usize)> = state
        .nodes
        .iter()
        .filter(|n| n.up)
        .map(|n| (n.id, (0, 0)))
        .collect();
    for s in &state.shards {
        for r in &s.descriptor.replicas {
            out.entry(*r).or_default().0 += 1;
        }
        if let Some(l) = s.leader {
            out.entry(l).or_default().1 += 1;
        }
    }
    out
}
