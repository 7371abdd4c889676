//! A real network for the fault tests: one network namespace per node, each
//! joined by a veth pair to a bridge in the test's own namespace (where the
//! clients run), addresses from the benchmarking range 198.18.0.0/24. Faults
//! are made by the kernel on that path:
//!
//! - **partitions and loss**: nftables rules on the bridge (`bridge` family:
//!   `forward` for node-to-node traffic, `input`/`output` for traffic between
//!   the nodes and the clients), loss with `numgen random`;
//! - **duplication**: nftables `dup` on the egress of each bridge port (every
//!   packet into a node's namespace);
//! - **delay and reordering**: this kernel has no `netem` qdisc
//!   (`CONFIG_NET_SCH_NETEM` is not set), so every packet leaving a node (and
//!   the clients) towards the bridge is queued to user space with iptables'
//!   `NFQUEUE` and released by [`Delayer`] after a delay plus a random
//!   jitter; a jitter larger than the gap between packets reorders them.
//!
//! Names are fixed (`tslab-*`): one lab at a time (the suite runs tests one
//! by one), and leftovers of a killed run are removed before a new lab is
//! made. Needs root; where the kernel refuses namespaces the lab panics
//! with a message saying so.

use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The host index of the test process itself (the clients); nodes are 1..=n.
pub const CLIENTS: usize = 0;
const BRIDGE: &str = "tslab-br";
const TABLE: &str = "tslab";
const DUP_TABLE: &str = "tslab_dup";
const QUEUE: u16 = 7;
const MAX_NODES: usize = 9;

pub fn netns(host: usize) -> String {
    format!("tslab-n{host}")
}

fn port(host: usize) -> String {
    format!("tslab-v{host}")
}

/// A host's address: the clients at .1, node i at .(10 + i).
pub fn ip(host: usize) -> Ipv4Addr {
    match host {
        CLIENTS => Ipv4Addr::new(198, 18, 0, 1),
        i => Ipv4Addr::new(198, 18, 0, 10 + i as u8),
    }
}

/// A fault the network makes until healed.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Every packet from `a` to `b` is dropped, for each `(a, b)` (host 0 is
    /// the clients).
    Drop(Vec<(usize, usize)>),
    /// Each packet between any two hosts is lost with this probability (%).
    Loss(u32),
    /// Each packet into a node is delivered twice with this probability (%).
    Duplicate(u32),
    /// Each packet leaving any host waits `ms` plus up to `jitter_ms` more.
    Delay { ms: u64, jitter_ms: u64 },
}

/// Runs a command; its stderr on failure.
fn run(args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    use std::io::Write;
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("`{}` not runnable ({e}): run tools/setup.sh", args[0]))?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) {
    run(args, None).unwrap_or_else(|e| panic!("network lab: {e}"));
}

fn nft(script: &str) {
    run(&["nft", "-f", "-"], Some(script))
        .unwrap_or_else(|e| panic!("network lab: {e}\nscript:\n{script}"));
}

/// The namespaces, the bridge and the nftables table have fixed names, one
/// set per machine: a test holds this while its lab exists, so tests run in
/// parallel take turns with it (a test that panicked does not block the
/// next: the poison is ignored, and `create` clears leftovers).
static LAB_IN_USE: Mutex<()> = Mutex::new(());

/// The namespaces, the bridge and the faults in force.
pub struct Lab {
    nodes: usize,
    delayers: Vec<Delayer>,
    // Dropped after `Drop::drop` has removed the lab.
    _turn: MutexGuard<'static, ()>,
}

impl Lab {
    /// Makes `nodes` namespaces on one bridge. Panics (with the reason) when
    /// the kernel or the tools refuse.
    pub fn create(nodes: usize) -> Lab {
        assert!((1..=MAX_NODES).contains(&nodes));
        let turn = LAB_IN_USE.lock().unwrap_or_else(|e| e.into_inner());
        remove_leftovers();
        if let Err(e) = run(&["ip", "netns", "add", &netns(1)], None) {
            panic!(
                "the network fault tests need network namespaces (run as root on a kernel \
                 with CONFIG_NET_NS): {e}"
            );
        }
        must(&["ip", "link", "add", BRIDGE, "type", "bridge"]);
        must(&["ip", "addr", "add", "198.18.0.1/24", "dev", BRIDGE]);
        must(&["ip", "link", "set", BRIDGE, "up"]);
        for i in 1..=nodes {
            let (ns, port) = (netns(i), port(i));
            if i > 1 {
                must(&["ip", "netns", "add", &ns]);
            }
            must(&[
                "ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            must(&["ip", "link", "set", &port, "master", BRIDGE]);
            must(&["ip", "link", "set", &port, "up"]);
            let addr = format!("{}/24", ip(i));
            must(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            must(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        nft(&format!(
            "table bridge {TABLE} {{\n\
               chain forward {{ type filter hook forward priority 0; }}\n\
               chain input {{ type filter hook input priority 0; }}\n\
               chain output {{ type filter hook output priority 0; }}\n\
             }}\n"
        ));
        Lab {
            nodes,
            delayers: Vec::new(),
            _turn: turn,
        }
    }

    /// Node `i`'s address for port `port`.
    pub fn addr(&self, i: usize, port: u16) -> SocketAddr {
        SocketAddr::new(ip(i).into(), port)
    }

    /// Puts `fault` in force (on top of any other).
    pub fn apply(&mut self, fault: &Fault) {
        match fault {
            Fault::Drop(pairs) => {
                let mut script = String::new();
                for &(a, b) in pairs {
                    // Node to node crosses the bridge; the clients' own
                    // traffic enters (input) or leaves (output) it.
                    let chain = match (a, b) {
                        (CLIENTS, _) => "output",
                        (_, CLIENTS) => "input",
                        _ => "forward",
                    };
                    script.push_str(&format!(
                        "add rule bridge {TABLE} {chain} ip saddr {} ip daddr {} drop\n",
                        ip(a),
                        ip(b)
                    ));
                }
                nft(&script);
            }
            Fault::Loss(pct) => {
                let mut script = String::new();
                for chain in ["forward", "input", "output"] {
                    script.push_str(&format!(
                        "add rule bridge {TABLE} {chain} ip saddr 198.18.0.0/24 \
                         numgen random mod 100 < {pct} drop\n"
                    ));
                }
                nft(&script);
            }
            Fault::Duplicate(pct) => {
                let mut script = format!("table netdev {DUP_TABLE} {{\n");
                for i in 1..=self.nodes {
                    let port = port(i);
                    script.push_str(&format!(
                        "  chain e{i} {{ type filter hook egress device \"{port}\" priority 0; \
                         ip saddr 198.18.0.0/24 numgen random mod 100 < {pct} dup to \"{port}\"; }}\n"
                    ));
                }
                script.push_str("}\n");
                nft(&script);
            }
            Fault::Delay { ms, jitter_ms } => {
                for host in 0..=self.nodes {
                    self.delayers.push(Delayer::start(host, *ms, *jitter_ms));
                }
                // Queued only once someone listens (`--queue-bypass`).
                for host in 0..=self.nodes {
                    queue_rule(host, "-A").unwrap_or_else(|e| panic!("network lab: {e}"));
                }
            }
        }
    }

    /// Removes every fault: the rules, then the delayers (which release
    /// what they hold).
    pub fn heal(&mut self) {
        nft(&format!(
            "flush chain bridge {TABLE} forward\n\
             flush chain bridge {TABLE} input\n\
             flush chain bridge {TABLE} output\n"
        ));
        let _ = run(&["nft", "delete", "table", "netdev", DUP_TABLE], None);
        if !self.delayers.is_empty() {
            for host in 0..=self.nodes {
                while queue_rule(host, "-D").is_ok() {}
            }
            for d in self.delayers.drain(..) {
                d.stop();
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for host in 0..=self.nodes {
            while queue_rule(host, "-D").is_ok() {}
        }
        for d in self.delayers.drain(..) {
            d.stop();
        }
        remove_leftovers();
    }
}

/// Adds (`-A`) or deletes (`-D`) the rule queueing `host`'s outgoing
/// packets to the delayer.
fn queue_rule(host: usize, op: &str) -> Result<(), String> {
    let q = QUEUE.to_string();
    let (prefix, dev): (Vec<String>, &str) = match host {
        CLIENTS => (vec![], BRIDGE),
        i => (
            ["ip", "netns", "exec", &netns(i)]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            "eth0",
        ),
    };
    let mut args: Vec<&str> = prefix.iter().map(String::as_str).collect();
    args.extend([
        "iptables",
        op,
        "OUTPUT",
        "-o",
        dev,
        "-j",
        "NFQUEUE",
        "--queue-num",
        &q,
        "--queue-bypass",
    ]);
    run(&args, None)
}

fn remove_leftovers() {
    let _ = run(&["nft", "delete", "table", "bridge", TABLE], None);
    let _ = run(&["nft", "delete", "table", "netdev", DUP_TABLE], None);
    while queue_rule(CLIENTS, "-D").is_ok() {}
    for i in 1..=MAX_NODES {
        // Deleting a namespace deletes its end of the veth, and so the pair.
        let _ = run(&["ip", "netns", "del", &netns(i)], None);
    }
    let _ = run(&["ip", "link", "del", BRIDGE], None);
}

/// Holds the packets a host sends (queued to user space by NFQUEUE) for a
/// delay plus a random jitter, then lets them go, possibly out of order.
struct Delayer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Delayer {
    fn start(host: usize, ms: u64, jitter_ms: u64) -> Delayer {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || match enter_and_bind(host) {
                Ok(queue) => {
                    let _ = ready_tx.send(Ok(()));
                    hold_and_release(queue, &stop, ms, jitter_ms);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Delayer { stop, thread },
            Ok(Err(e)) => panic!("network lab: delayer for host {host}: {e}"),
            Err(_) => panic!("network lab: delayer for host {host} did not start"),
        }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("delayer thread");
    }
}

/// Moves this thread into `host`'s network namespace (nothing for the
/// clients' host, which is the test's own).
pub fn enter(host: usize) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    if host != CLIENTS {
        let path = format!("/run/netns/{}", netns(host));
        let f = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        // SAFETY: setns on a namespace file this thread holds open; it
        // changes only this thread's network namespace.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Runs `f` on a thread inside `host`'s namespace.
pub fn in_host<T: Send + 'static>(
    host: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        enter(host).unwrap_or_else(|e| panic!("network lab: {e}"));
        f()
    })
}

/// Moves this thread into `host`'s namespace and binds the queue there.
fn enter_and_bind(host: usize) -> Result<nfq::Queue, String> {
    enter(host)?;
    let mut q = nfq::Queue::open().map_err(|e| format!("open NFQUEUE: {e}"))?;
    q.bind(QUEUE)
        .map_err(|e| format!("bind NFQUEUE {QUEUE}: {e}"))?;
    q.set_queue_max_len(QUEUE, 4096)
        .map_err(|e| format!("NFQUEUE length: {e}"))?;
    q.set_fail_open(QUEUE, true)
        .map_err(|e| format!("NFQUEUE fail-open: {e}"))?;
    q.set_nonblocking(true);
    Ok(q)
}

fn hold_and_release(mut q: nfq::Queue, stop: &AtomicBool, ms: u64, jitter_ms: u64) {
    use rand::Rng;
    use std::cmp::Reverse;
    let mut due: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut held: HashMap<u64, nfq::Message> = HashMap::new();
    let mut seq = 0u64;
    let mut rng = rand::thread_rng();
    loop {
        let stopping = stop.load(Ordering::Acquire);
        loop {
            match q.recv() {
                Ok(msg) => {
                    let wait = ms + rng.gen_range(0..=jitter_ms);
                    seq += 1;
                    due.push(Reverse((Instant::now() + Duration::from_millis(wait), seq)));
                    held.insert(seq, msg);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("NFQUEUE receive: {e}"),
            }
        }
        let now = Instant::now();
        while let Some(Reverse((at, s))) = due.peek().copied() {
            if at > now && !stopping {
                break;
            }
            due.pop();
            let mut msg = held.remove(&s).expect("held packet");
            msg.set_verdict(nfq::Verdict::Accept);
            // A packet whose verdict fails is dropped by the kernel: loss,
            // which the protocols above must survive anyway.
            let _ = q.verdict(msg);
        }
        if stopping {
            let _ = q.unbind(QUEUE);
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
