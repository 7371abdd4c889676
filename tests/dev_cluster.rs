//! The README's main command end to end: `tessera dev` as a real process
//! (3 nodes over QUIC in it), killed with SIGKILL and started again on the
//! same folder, resumes every shard with its data; `tessera serve` refuses
//! a bad config naming the field.

#[allow(dead_code)]
#[path = "common/wait.rs"]
mod wait;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A child process killed when dropped: a failing assertion must not leave
/// a cluster running (and eating the CPU of every later test).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// A child's output lines, read by a thread, for bounded waits on them.
fn lines_of(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Starts `tessera dev` and returns it with its `ready` line (bounded wait).
fn start_dev(dir: &Path) -> (Reaped, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["dev", "--shards", "8", "--data-dir"])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tessera dev");
    let stdout = child.stdout.take().expect("stdout");
    let rx = lines_of(stdout);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("ready") => return (Reaped(child), line),
            Ok(_) => continue,
            Err(e) => {
                let _ = child.kill();
                panic!("tessera dev printed no ready line within 120 s: {e}");
            }
        }
    }
}

fn boot_number(line: &str) -> u64 {
    let at = line.find("boot #").expect("boot number in the ready line") + 6;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn dev_cluster_resumes_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tessera-data");
    let (mut first, line) = start_dev(&data);
    assert!(line.contains("8 shards on 3 nodes"), "{line}");
    assert_eq!(boot_number(&line), 1, "{line}");
    let cluster = std::fs::read_to_string(data.join("cluster.toml")).unwrap();
    for needle in ["ca_cert", "client_cert", "client_key", "[[nodes]]"] {
        assert!(
            cluster.contains(needle),
            "cluster.toml lacks {needle}: {cluster}"
        );
    }
    ctl_round_trip(&data.join("cluster.toml"));
    plain_client_has_no_admin_rights(&data);
    first.kill().unwrap();
    first.wait().unwrap();

    // Every node's data survived SIGKILL: each shard's boot counter was 1 on
    // the replica that leads it now, so the next boot is #2.
    let (mut second, line) = start_dev(&data);
    assert_eq!(boot_number(&line), 2, "{line}");
    // What tessera-ctl wrote before the SIGKILL is still there.
    let got = ctl(&data.join("cluster.toml"), &["get", "greeting"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout), "hello\n");
    // SIGTERM shuts down gracefully.
    let pid = second.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let exit = second.wait().unwrap();
    assert!(exit.success(), "graceful shutdown exits 0: {exit:?}");
}

/// `tessera-ctl`, built beside `tessera` by the workspace test run.
fn ctl(cluster: &Path, args: &[&str]) -> std::process::Output {
    let bin = Path::new(env!("CARGO_BIN_EXE_tessera")).with_file_name("tessera-ctl");
    assert!(
        bin.exists(),
        "{} is missing: run the workspace tests (cargo test --workspace)",
        bin.display()
    );
    Command::new(bin)
        .arg("--cluster")
        .arg(cluster)
        .args(args)
        .output()
        .expect("run tessera-ctl")
}

fn ctl_ok(cluster: &Path, args: &[&str]) -> String {
    let out = ctl(cluster, args);
    assert!(
        out.status.success(),
        "tessera-ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn ctl_round_trip(cluster: &Path) {
    // A fresh cluster's key space is the user's, and empty.
    assert_eq!(ctl_ok(cluster, &["scan"]), "");
    // Arbitrary bytes are printed escaped (no control byte reaches the
    // terminal, no tab splits a line), exactly with --raw.
    ctl_ok(cluster, &["put", "bin\tkey", "red\x1b[31m\\"]);
    assert_eq!(ctl_ok(cluster, &["get", "bin\tkey"]), "red\\x1b[31m\\\\\n");
    assert_eq!(
        ctl(cluster, &["get", "--raw", "bin\tkey"]).stdout,
        b"red\x1b[31m\\\n"
    );
    assert_eq!(
        ctl_ok(cluster, &["scan"]),
        "bin\\x09key\tred\\x1b[31m\\\\\n"
    );
    ctl_ok(cluster, &["delete", "bin\tkey"]);
    ctl_ok(cluster, &["put", "greeting", "hello"]);
    for (k, v) in [("a1", "x"), ("m2", "y"), ("z3", "z")] {
        ctl_ok(cluster, &["put", k, v]);
    }
    assert_eq!(ctl_ok(cluster, &["get", "greeting"]), "hello\n");
    let missing = ctl(cluster, &["get", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&missing.stderr).trim(), "not found");
    ctl_ok(cluster, &["delete", "m2"]);
    let verified = ctl_ok(cluster, &["verify"]);
    assert!(
        verified.contains("every replica of every shard agrees"),
        "{verified}"
    );
    assert_eq!(
        ctl_ok(cluster, &["scan", "--start", "a", "--end", "zz"]),
        "a1\tx\ngreeting\thello\nz3\tz\n"
    );
    assert_eq!(
        ctl_ok(cluster, &["scan", "--limit", "1", "--start", "b"]),
        "greeting\thello\n"
    );
    let status: serde_json::Value = serde_json::from_str(&ctl_ok(cluster, &["status", "--json"]))
        .expect("status --json is JSON");
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(nodes
        .iter()
        .all(|n| n["up"] == true && n["addr"].is_string() && n["id"].is_u64()));
    let shards = status["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 8);
    assert_eq!(shards[0]["start"], "");
    assert_eq!(shards[7]["end"], "");
    for s in shards {
        assert!(s["leader"].is_u64(), "{s}");
        assert_eq!(s["replicas"].as_array().unwrap().len(), 3);
        // The default: data shards on the batch system.
        assert_eq!(s["raft"], "batch", "{s}");
        assert!(s["epoch"].is_object() && s["size_bytes"].is_u64() && s["id"].is_u64());
        for rate in ["reads_per_s", "writes_per_s", "write_bytes_per_s"] {
            assert!(s[rate].as_f64().is_some_and(|r| r >= 0.0), "{rate}: {s}");
        }
        assert_eq!(
            ids(s, "hosted_on"),
            ids(s, "replicas"),
            "every replica is hosted: {s}"
        );
    }
    // The leaders' load reports in the meta shard: every shard within a
    // few seconds (each leader reports what it leads every 5 s).
    let reports = wait::until_blocking(
        "load reports for the 8 shards",
        Duration::from_secs(60),
        || {
            let out = ctl_ok(cluster, &["load-reports", "--json"]);
            let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
            let n = v.as_array().map_or(0, |a| a.len());
            if n == 8 {
                Ok(v)
            } else {
                Err(out)
            }
        },
    )
    .unwrap();
    for r in reports.as_array().unwrap() {
        assert!(
            r["node"].is_u64() && r["age_s"].is_f64() && r["size_bytes"].is_u64(),
            "{r}"
        );
    }
    let table = ctl_ok(cluster, &["load-reports"]);
    assert!(table.contains("8 shards reported"), "{table}");
    let table = ctl_ok(cluster, &["status"]);
    assert!(table.contains("up") && table.contains("shard"), "{table}");
    // The summary counts every shard; 8 are few enough to list them all.
    assert!(
        table.contains("8 shards: 0 without a leader, 0 with replicas missing or left over"),
        "{table}"
    );
    let shard_row =
        |l: &&str| l.starts_with('s') && l[1..].starts_with(|c: char| c.is_ascii_digit());
    assert_eq!(table.lines().filter(shard_row).count(), 8, "{table}");
    // Filters: one shard, or the shards with a replica on a node.
    let one = ctl_ok(cluster, &["status", "--shard", "s3"]);
    let rows: Vec<&str> = one.lines().filter(shard_row).collect();
    assert!(rows.len() == 1 && rows[0].starts_with("s3 "), "{one}");
    let on_n2 = ctl_ok(cluster, &["status", "--node", "2"]);
    assert!(on_n2.contains("8 shards with a replica on n2"), "{on_n2}");
    let missing = ctl(cluster, &["status", "--shard", "999"]);
    assert!(!missing.status.success(), "an unknown shard is an error");
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no node reports s999"),
        "{missing:?}"
    );
    // The mixed run shares one connection set among its 4 clients.
    for (workload, connections) in [("write", "4"), ("read", "4"), ("mixed", "1")] {
        let out = ctl_ok(
            cluster,
            &[
                "bench",
                "--workload",
                workload,
                "--clients",
                "4",
                "--connections",
                connections,
                "--duration",
                "1",
                "--keys",
                "50",
            ],
        );
        assert!(
            out.contains(&format!("over {connections} connection sets")),
            "{out}"
        );
        let rate = out
            .lines()
            .find_map(|l| l.strip_suffix(" ops/s"))
            .unwrap_or_else(|| panic!("no `N ops/s` line: {out}"));
        assert!(rate.parse::<u64>().unwrap() > 0, "{out}");
        assert!(
            out.contains("p50 ") && out.contains("p99 ") && out.contains("p99.9 "),
            "{out}"
        );
    }
    let bad = ctl(Path::new("/nonexistent/cluster.toml"), &["get", "k"]);
    assert!(!bad.status.success() && !bad.stderr.is_empty());
}

#[test]
fn serve_names_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        r#"node_id = 0
listen_addr = "127.0.0.1:0"
data_dir = "d"
[tls]
ca_cert = "ca.pem"
cert = "n.pem"
key = "n-key.pem"
"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node_id"), "{err}");
}

/// Nodes join and receive replicas through the command line alone:
/// `tessera add-node`, `tessera serve`, `tessera-ctl split`, `move-replica`
/// and `rebalance` (whose dry run on the balanced cluster is empty).
#[test]
fn a_node_added_with_the_cli_joins_and_takes_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tessera-data");
    let cluster = data.join("cluster.toml");
    let (mut dev, _) = start_dev(&data);
    let plan: serde_json::Value =
        serde_json::from_str(&ctl_ok(&cluster, &["rebalance", "--dry-run", "--json"])).unwrap();
    assert_eq!(plan["steps"].as_array().unwrap().len(), 0, "{plan}");
    let added = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["add-node", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    assert!(String::from_utf8_lossy(&added.stdout).contains("n4"));
    let mut n4 = Reaped(
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["serve", "--config"])
            .arg(data.join("node-4").join("node.toml"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait::until_blocking(
        "n4 joins (status shows 4 nodes up)",
        Duration::from_secs(60),
        || {
            let out = ctl(&cluster, &["status", "--json"]);
            let up = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|s| {
                    s["nodes"]
                        .as_array()
                        .map(|n| n.iter().filter(|n| n["up"] == true).count())
                });
            match up {
                Some(4) => Ok(()),
                _ => Err(String::from_utf8_lossy(&out.stdout).into_owned()),
            }
        },
    )
    .unwrap();
    let split = ctl_ok(&cluster, &["split", "k"]);
    assert!(
        split.contains("left:") && split.contains("right:"),
        "{split}"
    );
    let moved = ctl_ok(
        &cluster,
        &["move-replica", "--shard", "1", "--from", "3", "--to", "4"],
    );
    assert!(moved.contains("moved s1"), "{moved}");
    let summary: serde_json::Value =
        serde_json::from_str(&ctl_ok(&cluster, &["rebalance", "--json"])).unwrap();
    assert_eq!(summary["balanced"], true, "{summary}");
    let nodes = summary["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 4, "{summary}");
    assert!(
        nodes.iter().all(|n| n["replicas"].as_u64().unwrap() >= 6),
        "{summary}"
    );
    watch_rebalances_until_ctrl_c(&cluster);
    // After the split, the move and the rebalance, every shard is hosted
    // by exactly its replicas (no orphan left, none missing).
    let status: serde_json::Value =
        serde_json::from_str(&ctl_ok(&cluster, &["status", "--json"])).unwrap();
    for s in status["shards"].as_array().unwrap() {
        assert_eq!(
            ids(s, "hosted_on"),
            ids(s, "replicas"),
            "hosted where it is a member: {s}"
        );
    }
    ctl_ok(&cluster, &["put", "after-join", "yes"]);
    assert_eq!(ctl_ok(&cluster, &["get", "after-join"]), "yes\n");

    // add-node with the folder given as a relative path, twice: the
    // cluster file's certificate paths stay as written (they once grew a
    // `tessera-data/` prefix per call) and clients still load them.
    for _ in 0..2 {
        let added = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .current_dir(dir.path())
            .args(["add-node", "--data-dir", "tessera-data"])
            .output()
            .unwrap();
        assert!(added.status.success(), "{added:?}");
    }
    let text = std::fs::read_to_string(&cluster).unwrap();
    for path in [
        "\"certs/ca.pem\"",
        "\"certs/admin.pem\"",
        "\"certs/admin-key.pem\"",
    ] {
        assert!(text.contains(path), "{path} rewritten: {text}");
    }
    assert_eq!(ctl_ok(&cluster, &["get", "after-join"]), "yes\n");
    let _ = n4.kill();
    let _ = dev.kill();
    let _ = (n4.wait(), dev.wait());
}

/// The node ids in field `field` (`replicas`, `hosted_on`) of a shard in
/// `status --json`, sorted.
fn ids(s: &serde_json::Value, field: &str) -> Vec<u64> {
    let mut v: Vec<u64> = s[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    v.sort();
    v
}

/// `tessera dev`'s cluster file names the admin certificate; the plain
/// client certificate beside it reads and writes through `tessera-ctl` but
/// is refused admin commands with a permission error.
fn plain_client_has_no_admin_rights(data: &Path) {
    let admin = std::fs::read_to_string(data.join("cluster.toml")).unwrap();
    assert!(admin.contains("certs/admin.pem"), "{admin}");
    let plain = data.join("cluster-plain.toml");
    std::fs::write(
        &plain,
        admin
            .replace("certs/admin.pem", "certs/client.pem")
            .replace("certs/admin-key.pem", "certs/client-key.pem"),
    )
    .unwrap();
    ctl_ok(&plain, &["put", "plain", "yes"]);
    assert_eq!(ctl_ok(&plain, &["get", "plain"]), "yes\n");
    let split = ctl(&plain, &["split", "plain"]);
    assert!(!split.status.success());
    let err = String::from_utf8_lossy(&split.stderr);
    assert!(err.contains("permission denied"), "{err}");
    ctl_ok(&plain, &["delete", "plain"]);
}

/// `rebalance --watch 1` passes again every second (each pass ends with its
/// summary line) until Ctrl-C (SIGINT), on which it exits.
fn watch_rebalances_until_ctrl_c(cluster: &Path) {
    let bin = Path::new(env!("CARGO_BIN_EXE_tessera")).with_file_name("tessera-ctl");
    let mut child = Reaped(
        Command::new(bin)
            .arg("--cluster")
            .arg(cluster)
            .args(["rebalance", "--watch", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn rebalance --watch"),
    );
    let stdout = child.stdout.take().expect("stdout");
    let rx = lines_of(stdout);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let (mut passes, mut watching) = (0, false);
    while passes < 2 || !watching {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("rebalance --watch: {passes} passes within 120 s: {e}"));
        passes += usize::from(line.starts_with("balanced:"));
        watching |= line.starts_with("watching: next pass in 1 s");
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < until,
            "rebalance --watch still running 60 s after SIGINT"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // 0 when stopped between passes, 130 when a pass was under way.
    assert!(
        matches!(status.code(), Some(0) | Some(130)),
        "rebalance --watch ended with {status:?}"
    );
}
