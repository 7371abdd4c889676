//! `tessera-ctl bench`: one load generator for two stores.
//!
//! The workload (key choice, value size, read/write mix, one request in
//! flight per client, the pre-write for reads, the histogram) is written
//! once, against [`Conn`]; `--target` only picks which store a `Conn`
//! talks to: a Tessera cluster (`--cluster`) or an etcd cluster
//! (`--endpoints`), so the two can be compared like for like.

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Workload {
    Write,
    Read,
    Mixed,
}

/// The store a bench loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Target {
    /// The Tessera cluster of `--cluster`.
    Tessera,
    /// The etcd cluster of `--endpoints` (etcd's v3 gRPC API).
    Etcd,
}

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// What each client does: `write` (puts), `read` (gets of
    /// pre-written keys) or `mixed` (half and half).
    #[arg(long, value_enum, default_value_t = Workload::Mixed)]
    workload: Workload,
    /// Concurrent clients, each with its own connections (see
    /// --connections).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Connection sets the clients share, round robin (Tessera: one
    /// `Client` each, i.e. one QUIC connection per node carrying many
    /// concurrent requests; etcd: one gRPC channel each). Default: one per
    /// client.
    #[arg(long, value_name = "N")]
    connections: Option<usize>,
    /// Requests each client keeps in flight at once (pipelined on its
    /// connections), for both targets.
    #[arg(long, default_value_t = 1, value_name = "N")]
    in_flight: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Distinct keys (spread over the key space).
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// The store to load: `tessera` (the cluster of --cluster) or `etcd`
    /// (the cluster of --endpoints), with the identical workload.
    #[arg(long, value_enum, default_value_t = Target::Tessera)]
    target: Target,
    /// etcd client addresses, HOST:PORT,... (`http://` optional); required
    /// with --target etcd.
    #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Tessera only: writes without the client session (a retry may apply
    /// a write twice), to measure what exactly-once costs.
    #[arg(long)]
    at_least_once: bool,
    /// A skewed load, OPS:RANGE in percent: OPS% of the requests go to keys
    /// in the first RANGE% of the key space (by first byte), the rest are
    /// spread over all of it. E.g. `--skew 80:10`. Default: uniform.
    #[arg(long, value_name = "OPS:RANGE", value_parser = parse_skew)]
    skew: Option<Skew>,
    /// Also print throughput, latency and errors of every interval of this
    /// many seconds as the run goes (to see a rebalance or a fault in the
    /// latencies).
    #[arg(long, value_name = "SECONDS")]
    report_every: Option<u64>,
}

/// `--skew`: the share of requests that go to the hot part of the key
/// space, and the hot part's share of it (both in percent, 1..=100).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Skew {
    ops: u8,
    range: u8,
}

fn parse_skew(s: &str) -> Result<Skew, String> {
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected OPS:RANGE, e.g. 80:10"))?;
    let pct = |x: &str| -> Result<u8, String> {
        match x.trim().parse::<u8>() {
            Ok(v) if (1..=100).contains(&v) => Ok(v),
            _ => Err(format!("{x:?}: expected a percentage from 1 to 100")),
        }
    };
    Ok(Skew {
        ops: pct(a)?,
        range: pct(b)?,
    })
}

impl Skew {
    /// The key of draw `seq` over `keys` keys: hot for `ops`% of draws
    /// (first byte inside the first `range`% of the byte range).
    fn key(self, seq: u64, keys: u64) -> Vec<u8> {
        let i = (seq >> 20) % keys;
        let mut k = bench_key(i);
        if (seq >> 8) % 100 < u64::from(self.ops) {
            let hot = (256 * u64::from(self.range) / 100).max(1);
            k[0] = (u64::from(k[0]) % hot) as u8;
        }
        k
    }
}

/// One client's connection to the store under test. Reads are
/// linearizable and writes durable on both: Tessera's only kind, etcd's
/// defaults (`serializable = false`; the leader fsyncs its WAL).
#[derive(Clone)]
enum Conn {
    Tessera(tessera::Client),
    Etcd(Box<etcd_client::KvClient>),
}

impl Conn {
    async fn connect(
        cluster: &Path,
        target: Target,
        endpoints: &[String],
        at_least_once: bool,
    ) -> Result<Conn> {
        Ok(match target {
            Target::Tessera => {
                let opts = tessera::client::ClientOptions {
                    exactly_once: !at_least_once,
                    ..Default::default()
                };
                Conn::Tessera(
                    tessera::Client::connect_with(cluster, opts)
                        .await
                        .with_context(|| format!("open cluster file {}", cluster.display()))?,
                )
            }
            Target::Etcd => {
                // The same per-call bound as Tessera's client (30 s, its
                // default deadline); etcd-client dials lazily, so an
                // unreachable cluster shows at the first request, as with
                // Tessera.
                let opts = etcd_client::ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(30));
                let client = etcd_client::Client::connect(endpoints, Some(opts))
                    .await
                    .with_context(|| format!("connect to etcd at {}", endpoints.join(",")))?;
                Conn::Etcd(Box::new(client.kv_client()))
            }
        })
    }

    async fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        match self {
            Conn::Tessera(c) => c.put(key, value).await?,
            Conn::Etcd(c) => {
                c.put(key, value, None).await?;
            }
        }
        Ok(())
    }

    /// A read; a missing key is an answer, not an error, on both stores.
    async fn get(&mut self, key: &[u8]) -> Result<()> {
        match self {
            Conn::Tessera(c) => {
                c.get(key).await?;
            }
            Conn::Etcd(c) => {
                // No options: a linearizable read (etcd's default).
                c.get(key, None).await?;
            }
        }
        Ok(())
    }
}

/// A key spread over the key space (its first byte mixes the index), so a
/// bench touches every shard.
fn bench_key(i: u64) -> Vec<u8> {
    let mut k = vec![(i.wrapping_mul(2_654_435_761) >> 13) as u8];
    k.extend_from_slice(format!("bench/{i:010}").as_bytes());
    k
}

/// What the cluster spent on the run, read from the nodes' metrics.
mod cost {
    use anyhow::{Context, Result};
    use std::collections::BTreeMap;
    use std::path::Path;
    use tessera::metrics::{fetch, parse_metric, parse_metric_f64};

    /// One node's counters at one moment.
    #[derive(Debug, Clone, Default)]
    pub(super) struct NodeCounters {
        syncs: u64,
        appends: u64,
        entries: u64,
        /// Raft messages sent: the transport's, where a batch-system
        /// frame (many groups' messages) counts as one, corrected by the
        /// batch system's own count of the messages inside.
        messages: u64,
        frames: u64,
        /// Client commands applied, and the state machine writes they took.
        applied: u64,
        apply_writes: u64,
        pid: u64,
        cpu: f64,
    }

    /// Every node of the cluster file that serves metrics, by node id.
    pub(super) async fn scrape(cluster: &Path) -> Result<BTreeMap<u64, NodeCounters>> {
        let file = tessera::cluster_file::ClusterFile::load(cluster)
            .with_context(|| format!("read cluster file {}", cluster.display()))?;
        let mut out = BTreeMap::new();
        for n in file.nodes {
            let Some(addr) = n.metrics_addr else { continue };
            let Ok(text) = fetch(addr).await else {
                continue;
            };
            let g = |name| parse_metric(&text, name).unwrap_or(0);
            out.insert(
                n.id.0,
                NodeCounters {
                    syncs: g("tessera_storage_syncs_total"),
                    appends: g("tessera_log_appends_total"),
                    entries: g("tessera_log_entries_total"),
                    applied: g("tessera_commands_applied_total"),
                    apply_writes: g("tessera_apply_writes_total"),
                    messages: (g("tessera_raft_messages_sent_total")
                        + g("tessera_batch_messages_total"))
                    .saturating_sub(g("tessera_batch_frames_total")),
                    frames: g("tessera_raft_frames_sent_total"),
                    pid: g("tessera_process_id"),
                    cpu: parse_metric_f64(&text, "process_cpu_seconds_total").unwrap_or(0.0),
                },
            );
        }
        Ok(out)
    }

    /// `cost: ...` lines: appends per sync of each node, Raft messages per
    /// frame and frames (each one QUIC packet between nodes, at these
    /// sizes) per operation, and cluster CPU per acknowledged operation
    /// (each process counted once: `tessera dev` runs every node in one).
    pub(super) fn report(
        before: &BTreeMap<u64, NodeCounters>,
        after: &BTreeMap<u64, NodeCounters>,
        ops: u64,
    ) -> String {
        if after.is_empty() {
            return "cost: no node serves metrics (metrics_addr in the cluster file)".into();
        }
        let mut per_node = Vec::new();
        let (mut messages, mut frames) = (0u64, 0u64);
        let (mut applied, mut apply_writes) = (0u64, 0u64);
        let mut cpu_by_pid: BTreeMap<u64, f64> = BTreeMap::new();
        for (id, a) in after {
            let b = before.get(id).cloned().unwrap_or_default();
            let syncs = a.syncs.saturating_sub(b.syncs);
            let appends = a.appends.saturating_sub(b.appends);
            let entries = a.entries.saturating_sub(b.entries);
            per_node.push(format!(
                "n{id} {:.1} ({:.1} entries)",
                appends as f64 / syncs.max(1) as f64,
                entries as f64 / syncs.max(1) as f64
            ));
            messages += a.messages.saturating_sub(b.messages);
            applied += a.applied.saturating_sub(b.applied);
            apply_writes += a.apply_writes.saturating_sub(b.apply_writes);
            frames += a.frames.saturating_sub(b.frames);
            if b.pid == a.pid {
                cpu_by_pid.insert(a.pid, a.cpu - b.cpu);
            }
        }
        let cpu: f64 = cpu_by_pid.values().sum();
        format!(
            "cost: appends per sync {}; Raft messages per frame {:.1} ({:.2} frames per op); cluster CPU {:.0} µs per op ({:.2} CPU s over {} processes); commands per apply write {:.1}",
            per_node.join(", "),
            messages as f64 / frames.max(1) as f64,
            frames as f64 / ops.max(1) as f64,
            cpu * 1e6 / ops.max(1) as f64,
            cpu,
            cpu_by_pid.len(),
            applied as f64 / apply_writes.max(1) as f64
        )
    }
}

/// `client QUIC: ...`: what the load generator's QUIC connections sent
/// and received per operation (datagrams, and the frames that are not
/// requests or answers: acknowledgements, stream credit, stops).
async fn client_quic(sets: &[Conn], ops: u64) -> String {
    let mut t = tessera::client::ConnectionStats::default();
    for c in sets {
        let Conn::Tessera(c) = c else { continue };
        for (_, s) in c.connection_stats().await {
            t.udp_tx.datagrams += s.udp_tx.datagrams;
            t.udp_tx.ios += s.udp_tx.ios;
            t.udp_rx.datagrams += s.udp_rx.datagrams;
            t.frame_tx.acks += s.frame_tx.acks;
            t.frame_rx.acks += s.frame_rx.acks;
            t.frame_tx.stream += s.frame_tx.stream;
            t.frame_rx.stream += s.frame_rx.stream;
            t.frame_tx.max_streams_bidi += s.frame_tx.max_streams_bidi;
            t.frame_rx.max_streams_bidi += s.frame_rx.max_streams_bidi;
            t.frame_tx.stop_sending += s.frame_tx.stop_sending;
            t.frame_rx.stop_sending += s.frame_rx.stop_sending;
            t.frame_tx.max_data += s.frame_tx.max_data;
            t.frame_rx.max_data += s.frame_rx.max_data;
            t.frame_tx.ping += s.frame_tx.ping;
        }
    }
    let per = |n: u64| n as f64 / ops.max(1) as f64;
    format!(
        "client QUIC per op (whole run): datagrams out {:.2} ({:.2} sends), in {:.2}; frames out/in: ACK {:.2}/{:.2}, STREAM {:.2}/{:.2}, MAX_STREAMS {:.2}/{:.2}, STOP_SENDING {:.2}/{:.2}, MAX_DATA {:.2}/{:.2}, PING {:.3}",
        per(t.udp_tx.datagrams),
        per(t.udp_tx.ios),
        per(t.udp_rx.datagrams),
        per(t.frame_tx.acks),
        per(t.frame_rx.acks),
        per(t.frame_tx.stream),
        per(t.frame_rx.stream),
        per(t.frame_tx.max_streams_bidi),
        per(t.frame_rx.max_streams_bidi),
        per(t.frame_tx.stop_sending),
        per(t.frame_rx.stop_sending),
        per(t.frame_tx.max_data),
        per(t.frame_rx.max_data),
        per(t.frame_tx.ping),
    )
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds")
}

/// What one client measured.
struct Tally {
    hist: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

pub(crate) async fn bench(cluster: &Path, args: BenchArgs) -> Result<()> {
    let BenchArgs {
        workload,
        clients,
        duration,
        keys,
        value_size,
        target,
        endpoints,
        in_flight,
        at_least_once,
        connections,
        skew,
        report_every,
    } = args;
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    match target {
        Target::Etcd if endpoints.is_empty() => bail!(
            "bench --target etcd needs --endpoints HOST:PORT,... \
             (the etcd members' client addresses, e.g. 127.0.0.1:2379)"
        ),
        Target::Tessera if !endpoints.is_empty() => {
            bail!("--endpoints is for --target etcd; a Tessera cluster is named by --cluster")
        }
        Target::Etcd if at_least_once => bail!("--at-least-once is for --target tessera"),
        _ => {}
    }
    if clients == 0 || keys == 0 || duration == 0 || in_flight == 0 || connections == Some(0) {
        bail!("--clients, --in-flight, --connections, --keys and --duration must be at least 1");
    }
    if report_every == Some(0) {
        bail!("--report-every must be at least 1 second");
    }
    if clients.saturating_mul(in_flight) > 65_536 {
        bail!("--clients × --in-flight is over 65536 requests in flight");
    }
    // Tessera's value limit bounds both targets, so they run the same values.
    tessera::limits::check_value(&vec![0; value_size])?;
    let sets = connections.unwrap_or(clients).clamp(1, clients);
    let mut shared = Vec::with_capacity(sets);
    for _ in 0..sets {
        shared.push(Conn::connect(cluster, target, &endpoints, at_least_once).await?);
    }
    let workers: Vec<Conn> = (0..clients).map(|i| shared[i % sets].clone()).collect();
    let value = vec![b'v'; value_size];
    if workload != Workload::Write {
        // Reads find values: pre-write up to 1,000 keys, spread over the clients.
        let n = keys.min(1000);
        let mut tasks = Vec::new();
        for (w, cl) in workers.iter().enumerate() {
            let (mut cl, value) = (cl.clone(), value.clone());
            tasks.push(tokio::spawn(async move {
                for i in (w as u64..n).step_by(clients) {
                    cl.put(&bench_key(i), &value).await?;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await?.context("pre-write the keys to read")?;
        }
    }
    let cost_before = match target {
        Target::Tessera => Some(cost::scrape(cluster).await?),
        Target::Etcd => None,
    };
    let stop = Instant::now() + Duration::from_secs(duration);
    let started = Instant::now();
    // Each interval's latencies and errors, swapped out by the reporter.
    let interval = std::sync::Arc::new(std::sync::Mutex::new((histogram(), 0u64)));
    let reporter = report_every.map(|secs| {
        let interval = interval.clone();
        tokio::spawn(async move {
            let every = Duration::from_secs(secs);
            let mut at = 0;
            loop {
                tokio::time::sleep(every).await;
                at += secs;
                let (h, errors) = std::mem::replace(
                    &mut *interval.lock().expect("interval poisoned"),
                    (histogram(), 0),
                );
                let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
                println!(
                    "at {at} s: {:.0} ops/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {errors} errors",
                    h.len() as f64 / secs as f64,
                    ms(0.5),
                    ms(0.99),
                    h.max() as f64 / 1000.0
                );
            }
        })
    });
    let mut tasks = Vec::new();
    let streams = workers
        .into_iter()
        .enumerate()
        .flat_map(|(w, cl)| (0..in_flight).map(move |f| (w * in_flight + f, cl.clone())));
    for (w, mut cl) in streams {
        let (value, interval) = (value.clone(), interval.clone());
        let readable = if workload == Workload::Write {
            keys
        } else {
            keys.min(1000)
        };
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally {
                hist: histogram(),
                errors: 0,
                first_error: None,
            };
            let mut seq = w as u64;
            while Instant::now() < stop {
                seq = seq
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let write = match workload {
                    Workload::Write => true,
                    Workload::Read => false,
                    Workload::Mixed => seq >> 63 == 1,
                };
                let t0 = Instant::now();
                let res = match (write, skew) {
                    (true, Some(s)) => cl.put(&s.key(seq, keys), &value).await,
                    (true, None) => cl.put(&bench_key((seq >> 20) % keys), &value).await,
                    (false, _) => cl.get(&bench_key((seq >> 20) % readable)).await,
                };
                match res {
                    Ok(()) => {
                        let us = (t0.elapsed().as_micros() as u64).max(1);
                        let _ = tally.hist.record(us);
                        if report_every.is_some() {
                            let _ = interval.lock().expect("interval poisoned").0.record(us);
                        }
                    }
                    Err(e) => {
                        tally.errors += 1;
                        tally.first_error.get_or_insert_with(|| format!("{e:#}"));
                        if report_every.is_some() {
                            interval.lock().expect("interval poisoned").1 += 1;
                        }
                    }
                }
            }
            tally
        }));
    }
    let mut total = histogram();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let tally = t.await?;
        total.add(&tally.hist).expect("same bounds");
        errors += tally.errors;
        first_error = first_error.or(tally.first_error);
    }
    if let Some(r) = reporter {
        r.abort();
    }
    let secs = started.elapsed().as_secs_f64();
    let ms = |q: f64| total.value_at_quantile(q) as f64 / 1000.0;
    let mut out = std::io::stdout().lock();
    let against = match target {
        Target::Tessera => String::new(),
        Target::Etcd => format!(", etcd at {}", endpoints.join(",")),
    };
    writeln!(
        out,
        "workload {workload:?}, {clients} clients × {in_flight} in flight over {sets} connection sets, {duration} s, {keys} keys, {value_size}-byte values{against}"
    )?;
    writeln!(out, "{:.0} ops/s", total.len() as f64 / secs)?;
    writeln!(
        out,
        "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms ({} ops, {errors} errors)",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        total.len()
    )?;
    if let Some(before) = cost_before {
        let after = cost::scrape(cluster).await?;
        writeln!(out, "{}", cost::report(&before, &after, total.len()))?;
    }
    if target == Target::Tessera {
        writeln!(out, "{}", client_quic(&shared, total.len()).await)?;
    }
    if let Some(e) = first_error {
        eprintln!("bench: {errors} errors; the first: {e}");
    }
    Ok(())
}
