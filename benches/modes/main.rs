//! The benchmark harness comparing kproxy's modes, side by side with rulesets in upstream
//! kube-proxy's layouts applied by the same tools in the same run.
//!
//! `cargo bench --bench modes` (as root) measures, for N services x E endpoints, each subject in
//! fresh network namespaces:
//! - control plane, through the mode crates as libraries (render + plan + apply against the
//!   real kernel, with a phase breakdown): full sync from empty, one endpoint change, one
//!   service added, one removed; kernel objects created;
//! - control plane, through the real `kproxy` binary (`--once` on generated manifests, and
//!   again from the fake API server with the same objects): start to the end of the first
//!   complete sync, and the process's peak RSS ([`binary`]);
//! - data plane, client → node → endpoint in three namespaces ([`dataplane`]): TCP connect
//!   latency (median, p99) to the first and the last service, one-stream bulk throughput and
//!   UDP round trips through a ClusterIP, each against the same traffic with no proxy.
//!
//! Subjects: kproxy's iptables mode (nft and legacy backends), nftables, userspace and IPVS
//! modes (IPVS only where the kernel has it: this harness says why not otherwise), and
//! upstream's iptables (both backends) and nftables layouts ([`upstream`]).
//!
//! Output ([`report`]): the machine, kernel and versions, then Markdown tables on stdout;
//! `results.json`, `results.md` and `modes.svg` (sync time and connect latency versus N) in
//! `$CARGO_TARGET_DIR/kproxy-bench/` (or `--out DIR`). A progress bar on stderr.
//!
//! `--quick` (also what `cargo test --benches` / `--all-targets` runs: no `--bench` argument)
//! uses small sizes so the harness cannot rot. Without root it prints why and exits 0.
#![allow(
    clippy::disallowed_methods,
    reason = "benchmarks start kproxy, proxies and ip/nft in their namespaces directly"
)]
#![allow(
    clippy::unwrap_used,
    reason = "benchmark harness: a failure should stop it loudly"
)]
#![allow(clippy::print_stdout, reason = "the harness prints its table")]

#[path = "../common/mod.rs"]
mod common;

/// The fake API server of the e2e tests: the API source's figures come from the same list and
/// watch protocol the tests check.
#[path = "../../tests/e2e/support/fake_apiserver.rs"]
#[allow(
    unreachable_pub,
    reason = "the tests' module, whose items are public to the e2e crate"
)]
mod fake_apiserver;

mod binary;
mod churn;
mod dataplane;
mod report;
mod upstream;

use std::any::Any;
use std::io::{IsTerminal as _, Write as _};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kproxy_contract::{
    Endpoint, IpFamily, Mode, Plan as _, ProxyState, ServicePort, ServicePortKey,
};
use kproxy_iptables::{Backend, IptablesCli, IptablesMode, RenderOptions};
use kproxy_ipvs::{IpvsMode, IpvsOptions, SystemKernel};
use kproxy_nftables::{NftCli, NftablesMode};
use kproxy_testkit::{many, state};
use kproxy_userspace::{IpRoute, UserspaceMode};

use binary::{BinaryRun, Source};
use common::Ns;
use dataplane::Load;

/// The same allocator as the `kproxy` binary, so control-plane times match the daemon's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Subject {
    Iptables(Backend),
    Nftables,
    Userspace,
    Ipvs,
    UpstreamIptables(Backend),
    UpstreamNftables,
    /// The floor of any iptables layout: one DNAT rule per endpoint in one chain
    /// ([`upstream::iptables_floor`]); its full sync is the least an iptables-restore of these
    /// services can cost.
    FloorIptables(Backend),
    /// The same rules with a chain per service port, jumped to from one dispatch chain
    /// ([`upstream::iptables_floor_chains`]): what per-service chains add to the floor.
    FloorChainsIptables(Backend),
}

impl Subject {
    fn name(self) -> String {
        match self {
            Subject::Iptables(b) => format!("kproxy iptables ({})", b.as_str()),
            Subject::Nftables => "kproxy nftables".into(),
            Subject::Userspace => "kproxy userspace".into(),
            Subject::Ipvs => "kproxy ipvs".into(),
            Subject::UpstreamIptables(b) => format!("upstream-layout iptables ({})", b.as_str()),
            Subject::UpstreamNftables => "upstream-layout nftables".into(),
            Subject::FloorIptables(b) => format!("floor iptables ({})", b.as_str()),
            Subject::FloorChainsIptables(b) => {
                format!("floor iptables, a chain per service ({})", b.as_str())
            }
        }
    }

    /// `--proxy-mode` and extra flags of the binary run (none for the upstream layouts).
    fn binary(self) -> Option<(&'static str, Vec<&'static str>)> {
        match self {
            Subject::Iptables(b) => Some((
                "iptables",
                vec![
                    "--iptables-backend",
                    match b {
                        Backend::Nft => "nft",
                        Backend::Legacy => "legacy",
                    },
                ],
            )),
            Subject::Nftables => Some(("nftables", vec![])),
            Subject::Userspace => Some(("userspace", vec![])),
            Subject::Ipvs => Some(("ipvs", vec![])),
            Subject::UpstreamIptables(_)
            | Subject::UpstreamNftables
            | Subject::FloorIptables(_)
            | Subject::FloorChainsIptables(_) => None,
        }
    }
}

/// Where one control-plane step spent its time.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Phases {
    pub(crate) render: Duration,
    pub(crate) plan: Duration,
    pub(crate) apply: Duration,
}

/// One subject at one size.
#[derive(Debug, Default, Clone)]
pub(crate) struct Row {
    pub(crate) subject: String,
    pub(crate) services: usize,
    pub(crate) endpoints: usize,
    /// Not measured, and why.
    pub(crate) skipped: Option<String>,
    pub(crate) full_sync: Duration,
    pub(crate) endpoint_change: Option<Duration>,
    pub(crate) service_add: Option<Duration>,
    pub(crate) service_delete: Option<Duration>,
    pub(crate) objects: usize,
    pub(crate) full_phases: Option<Phases>,
    pub(crate) endpoint_phases: Option<Phases>,
    /// The `kproxy` binary's run on manifests, or why it failed.
    pub(crate) binary: Option<Result<BinaryRun, String>>,
    /// The same from the (fake) API server.
    pub(crate) binary_api: Option<Result<BinaryRun, String>>,
    pub(crate) dataplane: Option<dataplane::Figures>,
}

fn pipe(cmd: &str, args: &[&str], input: &str) {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "{cmd} {args:?} failed");
}

/// Times one render + plan + apply of `to`, from `from`.
fn step<M: Mode>(
    mode: &mut M,
    memo: &mut M::Memo,
    from: &M::Rules,
    to: &ProxyState,
) -> (Duration, M::Rules, usize, Phases) {
    let t = Instant::now();
    let facts = mode.observe();
    let desired = mode.render(to, &facts, memo);
    let render = t.elapsed();
    let plan = mode.plan(from, &desired);
    let planned = t.elapsed();
    mode.apply(&plan).unwrap();
    let total = t.elapsed();
    let stats = plan.stats();
    let phases = Phases {
        render,
        plan: planned - render,
        apply: total - planned,
    };
    (total, desired, stats.added, phases)
}

fn key(sp: &ServicePort) -> ServicePortKey {
    ServicePortKey {
        family: sp.family,
        name: sp.name.clone(),
    }
}

/// The states the control-plane steps go through: the generated one, one endpoint of the
/// middle service replaced, one service added, that service removed again. Each shares every
/// unchanged service port's `Arc` with the previous one, as the daemon's incremental
/// desired-state build does.
struct Steps {
    s0: ProxyState,
    s1: ProxyState,
    s2: ProxyState,
    s3: ProxyState,
    before: Arc<ServicePort>,
    changed: Arc<ServicePort>,
    added: Arc<ServicePort>,
}

fn steps(n: usize, e: usize) -> Steps {
    let mut services = many(n, e);
    services.push(dataplane::udp_probe(&services[0]));
    let s0 = state(services.clone());
    let before = Arc::new(services[n / 2].clone());
    let mut changed = services[n / 2].clone();
    std::sync::Arc::make_mut(&mut changed.endpoints.cluster)[0] = Endpoint {
        ip: "10.250.0.1".parse().unwrap(),
        port: 8080,
        is_local: false,
    };
    let changed = Arc::new(changed);
    let mut s1 = s0.clone();
    s1.services.insert(key(&changed), changed.clone());
    let added = Arc::new(many(n + 1, e).pop().unwrap());
    let mut s2 = s1.clone();
    s2.services.insert(key(&added), added.clone());
    let mut s3 = s2.clone();
    s3.services.remove(&key(&added));
    Steps {
        s0,
        s1,
        s2,
        s3,
        before,
        changed,
        added,
    }
}

/// The four steps through a kproxy mode; the mode is returned so its process state (the
/// userspace mode's listeners) lives on for the data-plane measurement.
fn measure_kproxy<M: Mode>(mut mode: M, row: &mut Row, st: &Steps) -> Box<dyn Any> {
    let memo = &mut M::Memo::default();
    let (full, believed, objects, phases) = step(&mut mode, memo, &M::Rules::default(), &st.s0);
    row.full_sync = full;
    row.full_phases = Some(phases);
    row.objects = objects;
    let (d, believed, _, phases) = step(&mut mode, memo, &believed, &st.s1);
    row.endpoint_change = Some(d);
    row.endpoint_phases = Some(phases);
    let (d, believed, _, _) = step(&mut mode, memo, &believed, &st.s2);
    row.service_add = Some(d);
    let (d, _, _, _) = step(&mut mode, memo, &believed, &st.s3);
    row.service_delete = Some(d);
    Box::new(mode)
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// The same steps as upstream would write them.
fn measure_upstream(subject: Subject, row: &mut Row, st: &Steps) {
    match subject {
        Subject::UpstreamIptables(b) => {
            let tool = format!("iptables-{}-restore", b.as_str());
            let apply = |text: &str| timed(|| pipe(&tool, &["--noflush"], text));
            let text = upstream::iptables_full(&st.s0);
            row.objects = text.lines().filter(|l| l.starts_with("-A")).count();
            row.full_sync = apply(&text);
            let old = upstream::iptables_chains(&st.before);
            let new = upstream::iptables_chains(&st.changed);
            let gone: Vec<String> = old.into_iter().filter(|c| !new.contains(c)).collect();
            row.endpoint_change = Some(apply(&upstream::iptables_partial(
                &st.s1,
                &[&st.changed],
                &gone,
            )));
            row.service_add = Some(apply(&upstream::iptables_partial(
                &st.s2,
                &[&st.added],
                &[],
            )));
            row.service_delete = Some(apply(&upstream::iptables_partial(
                &st.s3,
                &[],
                &upstream::iptables_chains(&st.added),
            )));
        }
        Subject::FloorIptables(b) | Subject::FloorChainsIptables(b) => {
            let tool = format!("iptables-{}-restore", b.as_str());
            let text = if matches!(subject, Subject::FloorIptables(_)) {
                upstream::iptables_floor(&st.s0)
            } else {
                upstream::iptables_floor_chains(&st.s0)
            };
            row.objects = text.lines().filter(|l| l.starts_with("-A")).count();
            row.full_sync = timed(|| pipe(&tool, &["--noflush"], &text));
        }
        Subject::UpstreamNftables => {
            let apply = |text: &str| timed(|| pipe("nft", &["-f", "-"], text));
            let text = upstream::nft_full(&st.s0);
            row.objects = text.lines().count();
            row.full_sync = apply(&text);
            row.endpoint_change = Some(apply(&upstream::nft_change(&st.before, &st.changed)));
            row.service_add = Some(apply(&upstream::nft_add(&st.added)));
            row.service_delete = Some(apply(&upstream::nft_delete(&st.added)));
        }
        _ => unreachable!("not an upstream layout"),
    }
}

/// The control-plane steps of `subject` in the namespace the calling thread is in.
fn control_plane(subject: Subject, row: &mut Row, st: &Steps) -> Option<Box<dyn Any>> {
    let families = vec![IpFamily::V4];
    Some(match subject {
        Subject::Iptables(b) => measure_kproxy(
            IptablesMode::new(IptablesCli::new(b), families, RenderOptions::default()),
            row,
            st,
        ),
        Subject::Nftables => measure_kproxy(NftablesMode::new(NftCli, families), row, st),
        Subject::Userspace => measure_kproxy(
            UserspaceMode::new(IpRoute, kproxy_userspace::Options::default()),
            row,
            st,
        ),
        Subject::Ipvs => measure_kproxy(
            IpvsMode::new(SystemKernel::new(), IpvsOptions::default()),
            row,
            st,
        ),
        Subject::UpstreamIptables(_)
        | Subject::UpstreamNftables
        | Subject::FloorIptables(_)
        | Subject::FloorChainsIptables(_) => {
            measure_upstream(subject, row, st);
            return None;
        }
    })
}

/// What a run measures.
struct Profile {
    quick: bool,
    sizes: Vec<usize>,
    endpoints: Vec<usize>,
    dataplane_sizes: Vec<usize>,
    load: Load,
    binary: bool,
    only: Option<String>,
}

fn profile(args: &[String]) -> Profile {
    // `cargo test --benches` runs this without `--bench`: the quick profile.
    let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
    let list = |flag: &str| -> Option<Vec<usize>> {
        let i = args.iter().position(|a| a == flag)?;
        Some(
            args.get(i + 1)?
                .split(',')
                .filter_map(|v| v.trim().parse().ok())
                .collect(),
        )
    };
    let (sizes, endpoints, dataplane_sizes, load) = if quick {
        (
            vec![100, 1_000],
            vec![2],
            vec![100, 1_000],
            Load {
                connects: 50,
                rounds: 1,
                bulk: Duration::from_millis(200),
                udp: Duration::from_millis(200),
            },
        )
    } else {
        (
            vec![100, 1_000, 5_000, 10_000, 20_000],
            vec![2, 10],
            vec![100, 1_000, 10_000],
            Load {
                connects: 300,
                rounds: 3,
                bulk: Duration::from_secs(1),
                udp: Duration::from_secs(1),
            },
        )
    };
    Profile {
        quick,
        sizes: list("--sizes").unwrap_or(sizes),
        endpoints: list("--endpoints").unwrap_or(endpoints),
        dataplane_sizes: list("--dataplane-sizes").unwrap_or(dataplane_sizes),
        load,
        binary: !args.iter().any(|a| a == "--no-binary"),
        only: args
            .iter()
            .position(|a| a == "--only")
            .and_then(|i| args.get(i + 1).cloned()),
    }
}

/// Why `subject` is not measured at this size, if it is not.
fn skip(
    subject: Subject,
    n: usize,
    e: usize,
    p: &Profile,
    ipvs: &Result<(), String>,
) -> Option<String> {
    let named = p.only.is_some();
    match subject {
        Subject::Ipvs => ipvs.clone().err().map(|why| {
            format!("no IPVS in this kernel ({why}); tests/ipvs-lab measures the mode in a qemu guest")
        }),
        // Upstream's layout through iptables-nft 1.8.9 has one chain per endpoint, and that
        // tool's restore time grows faster than linearly with the chain count (16,000 empty
        // chains: 14.5 s here); at 10,000 x 10 it did not finish within 20 minutes.
        Subject::UpstreamIptables(Backend::Nft) if n * e > 10_000 && !named => Some(
            "iptables-nft restore time grows faster than linearly with chains; measured up to 10,000 endpoints (`--only` forces it)".into(),
        ),
        // An anonymous verdict map per service: 89 s at 10,000 x 2 and 218 s at 10,000 x 10 in
        // earlier runs, growing faster than linearly.
        Subject::UpstreamNftables if n > 10_000 && !named => Some(
            "nft load time grows faster than linearly (minutes at 10,000); measured up to 10,000 services (`--only` forces it)".into(),
        ),
        // One socket per service port, plus the runtime's and the bench's own descriptors.
        Subject::Userspace => {
            let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map_or(0, |(soft, _)| soft);
            (n as u64 + 1_000 > limit).then(|| {
                format!("needs a socket per service port; the open-file limit here is {limit} and cannot be raised (no CAP_SYS_RESOURCE)")
            })
        }
        _ => None,
    }
}

/// Whether the IPVS mode can run here: probed in a fresh namespace.
fn ipvs_available() -> Result<(), String> {
    let ns = Ns::new("bench", "probe");
    let _in = ns.enter();
    kproxy_ipvs::probe().map_err(|e| e.to_string())
}

/// One subject at one size, in fresh namespaces.
fn measure(
    subject: Subject,
    n: usize,
    e: usize,
    p: &Profile,
    manifests: Option<&std::path::Path>,
) -> Row {
    let mut row = Row {
        subject: subject.name(),
        services: n,
        endpoints: e,
        ..Row::default()
    };
    let st = steps(n, e);
    // The floor rulesets are loaded, not hooked into the packet path: no traffic to measure.
    let carries_traffic = !matches!(
        subject,
        Subject::FloorIptables(_) | Subject::FloorChainsIptables(_)
    );
    if p.dataplane_sizes.contains(&n) && carries_traffic {
        let (path, base) = dataplane::prepare(&st.s0);
        let _in = path.t.node.enter();
        let keep = control_plane(subject, &mut row, &st);
        // The data plane runs on the final state of the control-plane steps (the same first
        // and last services).
        row.dataplane = Some(dataplane::measure(&path, &base, &st.s3, p.load));
        drop(keep);
    } else {
        let ns = Ns::new("bench", "node");
        let _in = ns.enter();
        drop(control_plane(subject, &mut row, &st));
    }
    if let (Some((mode, extra)), Some(dir)) = (subject.binary(), manifests) {
        row.binary = Some(binary::run(mode, &extra, Source::Manifests(dir), n));
        row.binary_api = Some(binary::run(mode, &extra, Source::Api { endpoints: e }, n));
    }
    row
}

/// Room for the userspace mode's listeners (one socket per service port) at 20,000 services:
/// this process's and its children's open-file limit, not a host setting.
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let want = 262_144;
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < want
        && setrlimit(Resource::RLIMIT_NOFILE, want, hard.max(want)).is_err()
    {
        // Without CAP_SYS_RESOURCE: up to the hard limit.
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--rss-wrapper") {
        binary::rss_wrapper(&args[i + 2..]);
    }
    // A benchmark that cannot run here fails and says why, rather than passing as if it ran.
    assert!(
        nix::unistd::geteuid().is_root(),
        "the modes benchmark needs root (network namespaces, iptables, nft): run it as root"
    );
    let p = profile(&args);
    raise_nofile();
    if let Some(seconds) = flag_value(&args, "--churn") {
        run_churn(&args, &p, seconds.parse().unwrap_or(60));
        return;
    }
    let started = Instant::now();
    let machine = report::Machine::collect(p.quick);
    let ipvs = ipvs_available();
    let subjects: Vec<Subject> = [
        Subject::Iptables(Backend::Nft),
        Subject::UpstreamIptables(Backend::Nft),
        Subject::FloorIptables(Backend::Nft),
        Subject::FloorChainsIptables(Backend::Nft),
        Subject::Iptables(Backend::Legacy),
        Subject::UpstreamIptables(Backend::Legacy),
        Subject::Nftables,
        Subject::UpstreamNftables,
        Subject::Userspace,
        Subject::Ipvs,
    ]
    .into_iter()
    .filter(|s| {
        p.only
            .as_ref()
            .is_none_or(|o| o.split(',').any(|part| s.name().contains(part)))
    })
    .collect();
    let total = p.sizes.len() * p.endpoints.len() * subjects.len();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    let mut rows = Vec::new();
    for &e in &p.endpoints {
        for &n in &p.sizes {
            let dir = tempfile::Builder::new()
                .prefix("kpx-bench-")
                .tempdir()
                .unwrap();
            if p.binary {
                binary::write_manifests(dir.path(), n, e);
            }
            for &subject in &subjects {
                let what = format!("{} at {n} services x {e} endpoints", subject.name());
                // indicatif draws nothing when stderr is not a terminal (CI logs): a line each.
                if !std::io::stderr().is_terminal() {
                    eprintln!("[{}/{total}] {what}", rows.len() + 1);
                }
                bar.set_message(what);
                let row = match skip(subject, n, e, &p, &ipvs) {
                    Some(why) => Row {
                        subject: subject.name(),
                        services: n,
                        endpoints: e,
                        skipped: Some(why),
                        ..Row::default()
                    },
                    None => measure(subject, n, e, &p, p.binary.then_some(dir.path())),
                };
                bar.inc(1);
                rows.push(row);
            }
        }
    }
    bar.finish_and_clear();
    report::report(&rows, &machine, started.elapsed(), &args);
    if p.quick {
        // The churn subject in miniature, so it cannot rot.
        run_churn(&args, &p, 3);
    }
}

fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).map(String::as_str)
}

/// `--churn SECONDS` (with `--churn-rate` changes per second, 100 by default, after an idle
/// phase of `--churn-idle` seconds, 60 by default): the first of
/// `--sizes` and `--endpoints` (10,000 x 10 by default), see [`churn`]. Writes `churn.md`,
/// `churn.json` and `churn.svg` next to the other results.
fn run_churn(args: &[String], p: &Profile, seconds: u64) {
    let idle = flag_value(args, "--churn-idle")
        .and_then(|v| v.parse().ok())
        .unwrap_or(if p.quick { 1 } else { 60 });
    let (n, e, rate) = if p.quick {
        (100, 2, 50)
    } else {
        (
            flag_value(args, "--sizes")
                .and_then(|v| v.split(',').next()?.trim().parse().ok())
                .unwrap_or(10_000),
            flag_value(args, "--endpoints")
                .and_then(|v| v.split(',').next()?.trim().parse().ok())
                .unwrap_or(10),
            flag_value(args, "--churn-rate")
                .and_then(|v| v.parse().ok())
                .unwrap_or(100),
        )
    };
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let run = churn::run(n, e, rate, seconds, idle).unwrap();
    let window = if seconds >= 120 { 30 } else { seconds.max(1) };
    let mut text = churn::markdown(&run, window);
    text.push_str(&format!(
        "\nload average before: {}; after: {}\n",
        load_before.trim(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    ));
    print!("{text}");
    let dir = report::out_dir(args);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("churn.md"), &text).unwrap();
    // The plot's latency points are finer than the table's windows: 10 s (1 s for short runs).
    churn::plot(
        &run,
        if seconds >= 60 { 10 } else { 1 },
        &dir.join("churn.svg"),
    );
    let json = serde_json::json!({
        "services": run.services, "endpoints": run.endpoints, "rate": run.rate,
        "seconds": run.seconds, "changes": run.changes, "missing": run.missing,
        "mismatched_services": run.mismatched,
        "start_to_synced_s": run.start_to_synced.as_secs_f64(),
        "latencies_s": run.latencies.iter().map(|(at, l)| [at.as_secs_f64(), l.as_secs_f64()]).collect::<Vec<_>>(),
        "idle": {"seconds": run.idle.0.as_secs_f64(), "cpu_pct": run.idle.1, "rss_kib": run.idle.2},
        "samples": run.samples.iter().map(|(t, rss, cpu)| serde_json::json!({"t_s": t, "rss_kib": rss, "cpu_pct": cpu})).collect::<Vec<_>>(),
    });
    std::fs::write(
        dir.join("churn.json"),
        serde_json::to_string(&json).unwrap(),
    )
    .unwrap();
    assert!(
        run.missing == 0 && run.mismatched == 0,
        "changes were lost: {} missing, {} services wrong",
        run.missing,
        run.mismatched
    );
}
