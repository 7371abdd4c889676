//! `tessera-ctl bench --target etcd` against a real single-member etcd
//! (Debian's etcd-server, which tools/setup.sh installs) on loopback.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const CTL: &str = env!("CARGO_BIN_EXE_tessera-ctl");

/// `etcd` on PATH, or a panic saying how to get it.
fn etcd_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .expect("no `etcd` on PATH: install Debian's etcd-server (bash tools/setup.sh does)")
}

/// A port that was free a moment ago (the listener is dropped on return).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port on 127.0.0.1")
        .port()
}

/// One etcd process, killed (and reaped) on drop.
struct Etcd {
    child: Child,
    log: PathBuf,
    client_port: u16,
}

impl Etcd {
    fn start(dir: &Path) -> Etcd {
        let (client_port, peer_port) = (free_port(), free_port());
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = dir.join("etcd.log");
        let log_file = std::fs::File::create(&log).expect("create etcd.log");
        let child = Command::new(etcd_binary())
            .arg("--name=t1")
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg("--logger=zap")
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=t1={peer}"))
            .arg("--initial-cluster-state=new")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone log handle"))
            .stderr(log_file)
            .spawn()
            .expect("spawn etcd");
        Etcd {
            child,
            log,
            client_port,
        }
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// One `GET /health` on the client port: whether etcd says it is
    /// healthy (it has a leader and serves).
    fn healthy(&self) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        reply.contains(r#""health":"true""#)
    }

    /// Waits until the client port accepts connections and etcd reports
    /// itself healthy, at most `limit`; panics with etcd's log otherwise.
    fn wait_healthy(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll etcd") {
                panic!(
                    "etcd exited ({status}) before serving; log:\n{}",
                    self.log_tail()
                );
            }
            if self.healthy() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "etcd on 127.0.0.1:{} not healthy within {limit:?}; log:\n{}",
                    self.client_port,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `tessera-ctl ARGS` in `dir`, at most `limit`; panics (after killing
/// it) if it runs longer.
fn ctl(dir: &Path, args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(CTL)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tessera-ctl");
    // Drain the pipes on threads so a chatty child cannot block on them.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll tessera-ctl") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tessera-ctl {args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

#[test]
fn bench_etcd_mixed_runs_with_zero_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut etcd = Etcd::start(dir.path());
    etcd.wait_healthy(Duration::from_secs(20));
    let endpoint = etcd.endpoint();
    // Run in a folder without ./tessera-data: etcd needs no cluster file.
    let out = ctl(
        dir.path(),
        &[
            "bench",
            "--target",
            "etcd",
            "--endpoints",
            &endpoint,
            "--workload",
            "mixed",
            "--clients",
            "4",
            "--duration",
            "2",
        ],
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench failed ({}):\n{stdout}\n{stderr}\netcd log:\n{}",
        out.status,
        etcd.log_tail()
    );
    let ops_per_s: f64 = stdout
        .lines()
        .find_map(|l| l.strip_suffix(" ops/s")?.parse().ok())
        .unwrap_or_else(|| panic!("no `<number> ops/s` line in:\n{stdout}"));
    assert!(ops_per_s > 0.0, "throughput 0:\n{stdout}\n{stderr}");
    let errors: u64 = stdout
        .lines()
        .find_map(|l| {
            let head = l.strip_suffix(" errors)")?;
            head.rsplit(' ').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no `(N ops, E errors)` in:\n{stdout}"));
    assert_eq!(
        errors, 0,
        "bench against etcd had errors:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("etcd at {endpoint}")),
        "the header names the target:\n{stdout}"
    );
}

#[test]
fn bench_etcd_without_endpoints_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = ctl(
        dir.path(),
        &["bench", "--target", "etcd", "--duration", "1"],
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "bench --target etcd without --endpoints succeeded"
    );
    assert!(
        stderr.contains("--target etcd needs --endpoints HOST:PORT"),
        "unclear error: {stderr}"
    );
    assert!(out.stdout.is_empty(), "no bench output expected");
}
