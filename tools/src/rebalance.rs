//! `tessera-ctl rebalance`: shows the plan (table or JSON) and, without
//! `--dry-run`, executes it round after round with progress bars; with
//! `--watch`, keeps doing so until Ctrl-C.

use anyhow::{Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tessera::rebalance::{self, Progress};
use tessera::shard_router::planner::{self, Plan, PlannerConfig, Step};
use tessera::Client;

fn step_row(i: usize, s: &Step) -> String {
    match s {
        Step::MoveReplica {
            shard,
            from,
            to,
            bytes,
        } => format!("{i:>4}  move-replica     {shard:<6} {from:<5} {to:<5} {bytes:>12}"),
        Step::TransferLeader { shard, from, to } => {
            format!(
                "{i:>4}  transfer-leader  {shard:<6} {from:<5} {to:<5} {:>12}",
                "-"
            )
        }
        Step::Split { shard, bytes } => {
            format!(
                "{i:>4}  split            {shard:<6} {:<5} {:<5} {bytes:>12}",
                "-", "-"
            )
        }
    }
}

fn print_plan(plan: &Plan) {
    if plan.is_empty() {
        println!("plan: empty (the cluster is balanced)");
        return;
    }
    println!(
        "plan: {} steps ({} moves, {} leader transfers), {} bytes to copy",
        plan.len(),
        plan.moves(),
        plan.transfers(),
        plan.bytes_to_move()
    );
    println!(
        "{:>4}  {:<16} {:<6} {:<5} {:<5} {:>12}",
        "#", "step", "shard", "from", "to", "bytes"
    );
    for (i, s) in plan.steps.iter().enumerate() {
        println!("{}", step_row(i + 1, s));
    }
}

struct Bars {
    steps: ProgressBar,
    bytes: ProgressBar,
}

impl Progress for Bars {
    fn planned(&self, round: usize, plan: &Plan) {
        self.steps.inc_length(plan.len() as u64);
        self.bytes.inc_length(plan.bytes_to_move());
        self.steps
            .set_message(format!("round {round}: {} steps planned", plan.len()));
    }
    fn started(&self, step: &Step) {
        self.steps.set_message(format!("{step}"));
    }
    fn finished(&self, step: &Step, result: &Result<(), String>) {
        self.steps.inc(1);
        if let (Step::MoveReplica { bytes, .. }, Ok(())) = (step, result) {
            self.bytes.inc(*bytes);
        }
        if let Err(e) = result {
            self.steps
                .println(format!("failed: {step}: {e} (the next round retries)"));
        }
    }
}

/// Runs `rebalance`: the plan (`dry_run`), or passes until balanced; with
/// `watch`, a new pass every `watch` until Ctrl-C.
pub async fn run(
    client: &Client,
    dry_run: bool,
    max_moves: usize,
    json: bool,
    watch: Option<std::time::Duration>,
) -> Result<()> {
    let cfg = PlannerConfig {
        max_concurrent_moves: max_moves.max(1),
        ..PlannerConfig::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    if !dry_run {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.store(true, Ordering::Relaxed);
                eprintln!("interrupted: letting the steps in flight finish; run again to continue");
            }
        });
    }
    loop {
        let interrupted = pass(client, &cfg, dry_run, json, stop.clone()).await?;
        if interrupted {
            std::process::exit(130);
        }
        let Some(every) = watch.filter(|_| !dry_run) else {
            return Ok(());
        };
        if !json {
            println!(
                "watching: next pass in {} s (Ctrl-C to stop)",
                every.as_secs_f64()
            );
        }
        let until = Instant::now() + every;
        while Instant::now() < until {
            if stop.load(Ordering::Relaxed) {
                // Between passes nothing is in flight: a clean stop.
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

/// One pass: plan (and print it), then, unless `dry_run`, execute rounds
/// until balanced or `stop`; whether it was interrupted.
async fn pass(
    client: &Client,
    cfg: &PlannerConfig,
    dry_run: bool,
    json: bool,
    stop: Arc<AtomicBool>,
) -> Result<bool> {
    let (state, batch) = rebalance::cluster_states(client)
        .await
        .map_err(|e| anyhow::anyhow!("no node answered: {e}"))?;
    let plan = rebalance::plan(&state, &batch, cfg);
    if dry_run {
        if json {
            let imbalance = planner::imbalance(&rebalance::joined(state, batch));
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "steps": plan.steps,
                    "moves": plan.moves(),
                    "transfers": plan.transfers(),
                    "bytes_to_move": plan.bytes_to_move(),
                    "imbalance": imbalance,
                }))?
            );
        } else {
            print_plan(&plan);
        }
        return Ok(false);
    }
    if !json {
        print_plan(&plan);
    }
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>6} [{bar:30}] {pos}/{len} {msg}")
        .expect("template")
        .progress_chars("=> ");
    let steps = multi.add(
        ProgressBar::new(0)
            .with_style(style.clone())
            .with_prefix("steps"),
    );
    let bytes = multi.add(
        ProgressBar::new(0)
            .with_style(
                ProgressStyle::with_template(
                    "{prefix:>6} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
                )
                .expect("template")
                .progress_chars("=> "),
            )
            .with_prefix("bytes"),
    );
    let started = Instant::now();
    let summary = rebalance::rebalance(
        client,
        cfg,
        50,
        stop,
        Arc::new(Bars {
            steps: steps.clone(),
            bytes: bytes.clone(),
        }),
    )
    .await
    .context("rebalance")?;
    steps.finish_and_clear();
    bytes.finish_and_clear();
    let after = rebalance::cluster_state(client)
        .await
        .map_err(|e| anyhow::anyhow!("no node answered: {e}"))?;
    let counts = rebalance::counts(&after);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "rounds": summary.rounds,
                "moves": summary.moves,
                "transfers": summary.transfers,
                "bytes_moved": summary.bytes_moved,
                "failed": summary.failed,
                "interrupted": summary.interrupted,
                "balanced": summary.balanced,
                "seconds": started.elapsed().as_secs_f64(),
                "nodes": counts.iter().map(|(n, (r, l))| serde_json::json!({"id": n.0, "replicas": r, "leaders": l})).collect::<Vec<_>>(),
            }))?
        );
    } else {
        println!(
            "{}: {} moves, {} leader transfers, {} bytes moved, {} failed steps, {} rounds, {:.1} s",
            if summary.balanced {
                "balanced"
            } else if summary.interrupted {
                "interrupted"
            } else {
                "not balanced yet"
            },
            summary.moves,
            summary.transfers,
            summary.bytes_moved,
            summary.failed,
            summary.rounds,
            started.elapsed().as_secs_f64()
        );
        for (n, (r, l)) in &counts {
            println!("  {n}: {r} replicas, {l} leaders");
        }
    }
    Ok(summary.interrupted)
}
