//! The real `kproxy` binary, started on generated manifests with `--once` inside a fresh
//! network namespace: the time from exec to the end of its first complete sync (manifest
//! parsing, desired-state build, render, plan, apply, and the process exit), the sync itself
//! as the binary logs it, and the process's peak RSS.
//!
//! Peak RSS: the bench re-executes itself as a tiny wrapper (`--rss-wrapper -- CMD…`) whose
//! only child is the measured process, so `getrusage(RUSAGE_CHILDREN).ru_maxrss` after the
//! wait is exactly that process's high-water mark (no unsafe `wait4`, no cgroup).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::Ns;
use crate::common::objects::{NODE_NAME, list};

/// What one run of the binary measured.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BinaryRun {
    /// Exec to exit, with `--once` (which exits right after the first complete sync).
    pub(crate) wall: Duration,
    /// The first sync as the binary logs it (`sync complete`, `elapsed_ms`): build + render +
    /// plan + apply.
    pub(crate) sync: Duration,
    /// The process's peak resident set.
    pub(crate) max_rss_kib: u64,
    /// Kernel objects the first sync added (the binary's own count).
    pub(crate) added: u64,
}

/// Writes `n` services x `e` endpoints (and the node) as one JSON `List` into `dir`.
pub(crate) fn write_manifests(dir: &Path, n: usize, e: usize) {
    let text = serde_json::to_string(&list(n, e)).unwrap();
    std::fs::write(dir.join("cluster.json"), text).unwrap();
}

/// The wrapper's side: runs `argv` as its only child, then prints
/// `WALL_NS MAX_RSS_KIB EXIT_CODE` on stdout; the child's output goes to stderr.
pub(crate) fn rss_wrapper(argv: &[String]) -> ! {
    let (program, args) = argv.split_first().expect("--rss-wrapper -- PROGRAM ARGS…");
    let t = Instant::now();
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .status()
        .unwrap();
    let wall = t.elapsed();
    let usage =
        nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    println!(
        "{} {} {}",
        wall.as_nanos(),
        usage.max_rss(),
        status.code().unwrap_or(-1)
    );
    std::process::exit(0)
}

/// Runs `kproxy --once` (which serves no admin socket, probes or metrics) in `--proxy-mode mode` (plus `extra` flags) on the manifests in `dir`,
/// in a namespace of its own.
pub(crate) fn run(mode: &str, extra: &[&str], dir: &Path) -> Result<BinaryRun, String> {
    let ns = Ns::new("bench", "bin");
    let dir = dir.display().to_string();
    let mut args: Vec<&str> = vec![
        "--rss-wrapper",
        "--",
        "ip",
        "netns",
        "exec",
        &ns.0,
        env!("CARGO_BIN_EXE_kproxy"),
        "--manifests",
        &dir,
        "--once",
        "--proxy-mode",
        mode,
        "--hostname-override",
        NODE_NAME,
        "--cluster-cidr",
        "10.244.0.0/16",
        "--healthz-bind-address=",
        "--metrics-bind-address=",
        "--log-format",
        "json",
    ];
    args.extend_from_slice(extra);
    let out = Command::new(std::env::current_exe().unwrap())
        .args(&args)
        .env("RUST_LOG", "info")
        .output()
        .map_err(|e| format!("cannot run the wrapper: {e}"))?;
    drop(ns);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let logs = String::from_utf8_lossy(&out.stderr);
    let fields: Vec<u64> = stdout
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let [wall, rss, code] = fields[..] else {
        return Err(format!("the wrapper printed {stdout:?}"));
    };
    if code != 0 {
        let tail: Vec<&str> = logs.lines().rev().take(3).collect();
        return Err(format!("kproxy exited with {code}: {tail:?}"));
    }
    // The first `sync complete` line: its elapsed_ms and added count.
    let line = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "sync complete")
        .ok_or_else(|| "kproxy logged no `sync complete`".to_string())?;
    let sync_ms = line["fields"]["elapsed_ms"].as_f64().unwrap_or(0.0);
    Ok(BinaryRun {
        wall: Duration::from_nanos(wall),
        sync: Duration::from_secs_f64(sync_ms / 1000.0),
        max_rss_kib: rss,
        added: line["fields"]["added"].as_u64().unwrap_or(0),
    })
}
