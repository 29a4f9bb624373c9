//! The real `kproxy` binary, started with `--once` inside a fresh network namespace on the
//! generated cluster, from either source: a manifests directory, or the fake API server
//! (`tests/e2e/support/fake_apiserver.rs`, listening inside that namespace, serving paged lists
//! as the real one does). Measured: the time from exec to the end of its first complete sync
//! (reading the objects, desired-state build, render, plan, apply, and the process exit), the
//! sync itself as the binary logs it, and the process's peak RSS.
//!
//! Peak RSS: the bench re-executes itself as a tiny wrapper (`--rss-wrapper -- CMD…`) whose
//! only child is the measured process: it samples the child's own `VmHWM` until it exits, and
//! `getrusage(RUSAGE_CHILDREN).ru_maxrss` after the wait gives the largest of the child and the
//! tools it ran (no unsafe `wait4`, no cgroup).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::Ns;
use crate::common::objects::{NODE_NAME, node, service, slice};
use crate::fake_apiserver::FakeApiServer;

/// What one run of the binary measured.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BinaryRun {
    /// Exec to exit, with `--once` (which exits right after the first complete sync).
    pub(crate) wall: Duration,
    /// The first sync as the binary logs it (`sync complete`, `elapsed_ms`): build + render +
    /// plan + apply.
    pub(crate) sync: Duration,
    /// The largest peak resident set of kproxy and the tools it ran (`ru_maxrss`).
    pub(crate) max_rss_kib: u64,
    /// kproxy's own peak resident set (`VmHWM`).
    pub(crate) own_rss_kib: u64,
    /// Kernel objects the first sync added (the binary's own count).
    pub(crate) added: u64,
    /// The first sync's phases as the binary logs them: build, render, plan, apply.
    pub(crate) phases: [Duration; 4],
}

/// Services per manifest file: kproxy refuses a file over 64 MiB (about 35,000 services of 10
/// endpoints in this JSON), so large states are split as a real export directory would be.
const SERVICES_PER_FILE: usize = 5_000;

/// Writes `n` services x `e` endpoints (and the node) into `dir` as JSON `List`s of at most
/// [`SERVICES_PER_FILE`] services with their slices.
pub(crate) fn write_manifests(dir: &Path, n: usize, e: usize) {
    for (file, first) in (0..n.max(1)).step_by(SERVICES_PER_FILE).enumerate() {
        let range = first..(first + SERVICES_PER_FILE).min(n);
        let mut items = if file == 0 { vec![node()] } else { Vec::new() };
        items.extend(range.clone().map(service));
        items.extend(range.map(|i| slice(i, e, 0)));
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
        let text = serde_json::to_string(&list).unwrap();
        std::fs::write(dir.join(format!("cluster-{file:03}.json")), text).unwrap();
    }
}

/// The environment the image gives kproxy: the `ENV` instructions of the Dockerfile's last
/// stage (the runtime's, not the build's). Every run of the binary here gets exactly these, so
/// the figures are those of kproxy as shipped (the allocator's settings among them).
pub(crate) fn image_env() -> Vec<(String, String)> {
    let text = include_str!("../../Dockerfile");
    let runtime = text.rsplit_once("\nFROM ").map_or(text, |(_, last)| last);
    // Join continued lines, then read `ENV A=1 B=2` instructions.
    let joined = runtime.replace("\\\n", " ");
    let env: Vec<(String, String)> = joined
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ENV "))
        .flat_map(|pairs| pairs.split_whitespace())
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert!(
        env.iter().any(|(k, _)| k.starts_with("MIMALLOC_")),
        "the Dockerfile's runtime stage sets no allocator setting: {env:?}"
    );
    // This reader takes `ENV K=V` with plain values only: anything a shell would quote or
    // expand must fail here rather than reach kproxy misread.
    assert!(
        env.iter().all(|(_, v)| !v.contains(['"', '\'', '$', '\\'])),
        "the Dockerfile's runtime ENV needs a fuller reader: {env:?}"
    );
    env
}

/// The `kproxy` binary the benchmark runs: cargo's, or `KPROXY_BENCH_BINARY` (a heap-profiling
/// build, docs/memory.md).
pub(crate) fn kproxy_binary() -> String {
    std::env::var("KPROXY_BENCH_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kproxy").into())
}

/// `VmHWM` of a live process, in KiB.
fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The wrapper's side: runs `argv` as its only child, then prints
/// `WALL_NS MAX_RSS_KIB OWN_HWM_KIB EXIT_CODE` on stdout; the child's output goes to stderr.
/// `MAX_RSS_KIB` (`ru_maxrss` of the children) is the largest of the child and every process
/// it waited for (iptables-restore, nft); `OWN_HWM_KIB` is the child's own `VmHWM`, sampled
/// every few milliseconds until it exits (the high-water mark only grows, so the last sample
/// misses at most the final few milliseconds).
pub(crate) fn rss_wrapper(argv: &[String]) -> ! {
    let (program, args) = argv.split_first().expect("--rss-wrapper -- PROGRAM ARGS…");
    let t = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut own = 0;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        own = vm_hwm(pid).unwrap_or(0).max(own);
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall = t.elapsed();
    let usage =
        nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    println!(
        "{} {} {own} {}",
        wall.as_nanos(),
        usage.max_rss(),
        status.code().unwrap_or(-1)
    );
    std::process::exit(0)
}

/// Where the binary reads the cluster from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Source<'a> {
    /// `--manifests DIR` (written by [`write_manifests`]).
    Manifests(&'a Path),
    /// The fake API server, filled with the same `n` services x `e` endpoints for each run.
    Api {
        /// Endpoints per service.
        endpoints: usize,
    },
}

/// A fake API server inside `ns` holding the node and `n` services x `e` endpoints (the same
/// objects as [`write_manifests`]).
fn api_server(ns: &Ns, n: usize, e: usize) -> FakeApiServer {
    let listener = ns.run(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let api = FakeApiServer::start_on(listener);
    api.apply(node());
    for i in 0..n.max(1) {
        api.apply(service(i));
        api.apply(slice(i, e, 0));
    }
    api
}

/// Runs `kproxy --once` (which serves no admin socket, probes or metrics) in `--proxy-mode mode` (plus `extra` flags) on the cluster
/// from `source`, in a namespace of its own. The first sync must have programmed all `n`
/// services (plus the first one's UDP port): a run that read less is an error, not a figure.
pub(crate) fn run(
    mode: &str,
    extra: &[&str],
    source: Source<'_>,
    n: usize,
) -> Result<BinaryRun, String> {
    let ns = Ns::new("bench", "bin");
    let (api, source_args) = match source {
        Source::Manifests(dir) => (None, ["--manifests".into(), dir.display().to_string()]),
        Source::Api { endpoints } => {
            let api = api_server(&ns, n, endpoints);
            let url = api.url();
            (Some(api), ["--master".into(), url])
        }
    };
    let binary = kproxy_binary();
    let mut args: Vec<&str> = vec![
        "--rss-wrapper",
        "--",
        "ip",
        "netns",
        "exec",
        &ns.0,
        &binary,
        &source_args[0],
        &source_args[1],
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
        .envs(image_env())
        .env("RUST_LOG", "info")
        .output()
        .map_err(|e| format!("cannot run the wrapper: {e}"))?;
    drop(api);
    drop(ns);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let logs = String::from_utf8_lossy(&out.stderr);
    let fields: Vec<u64> = stdout
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let [wall, rss, own, code] = fields[..] else {
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
    let programmed = line["fields"]["service_ports"].as_u64().unwrap_or(0);
    if programmed != n as u64 + 1 {
        let tail: Vec<&str> = logs.lines().take(5).collect();
        return Err(format!(
            "kproxy's first sync programmed {programmed} service ports, expected {}: {tail:?}",
            n + 1
        ));
    }
    let field = |name: &str| {
        Duration::from_secs_f64(line["fields"][name].as_f64().unwrap_or(0.0).max(0.0) / 1000.0)
    };
    Ok(BinaryRun {
        wall: Duration::from_nanos(wall),
        sync: field("elapsed_ms"),
        max_rss_kib: rss,
        own_rss_kib: own,
        added: line["fields"]["added"].as_u64().unwrap_or(0),
        phases: ["build_ms", "render_ms", "plan_ms", "apply_ms"].map(field),
    })
}
