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
    /// Concurrent clients, each with its own connections and one
    /// request in flight.
    #[arg(long, default_value_t = 16)]
    clients: usize,
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
    async fn connect(cluster: &Path, target: Target, endpoints: &[String]) -> Result<Conn> {
        Ok(match target {
            Target::Tessera => Conn::Tessera(
                tessera::Client::connect(cluster)
                    .await
                    .with_context(|| format!("open cluster file {}", cluster.display()))?,
            ),
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
        _ => {}
    }
    if clients == 0 || keys == 0 || duration == 0 {
        bail!("--clients, --keys and --duration must be at least 1");
    }
    // Tessera's value limit bounds both targets, so they run the same values.
    tessera::limits::check_value(&vec![0; value_size])?;
    let mut workers = Vec::with_capacity(clients);
    for _ in 0..clients {
        workers.push(Conn::connect(cluster, target, &endpoints).await?);
    }
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
    let stop = Instant::now() + Duration::from_secs(duration);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (w, mut cl) in workers.into_iter().enumerate() {
        let value = value.clone();
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
                let res = if write {
                    cl.put(&bench_key((seq >> 20) % keys), &value).await
                } else {
                    cl.get(&bench_key((seq >> 20) % readable)).await
                };
                match res {
                    Ok(()) => {
                        let _ = tally.hist.record((t0.elapsed().as_micros() as u64).max(1));
                    }
                    Err(e) => {
                        tally.errors += 1;
                        tally.first_error.get_or_insert_with(|| format!("{e:#}"));
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
    let secs = started.elapsed().as_secs_f64();
    let ms = |q: f64| total.value_at_quantile(q) as f64 / 1000.0;
    let mut out = std::io::stdout().lock();
    let against = match target {
        Target::Tessera => String::new(),
        Target::Etcd => format!(", etcd at {}", endpoints.join(",")),
    };
    writeln!(
        out,
        "workload {workload:?}, {clients} clients, {duration} s, {keys} keys, {value_size}-byte values{against}"
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
    if let Some(e) = first_error {
        eprintln!("bench: {errors} errors; the first: {e}");
    }
    Ok(())
}
