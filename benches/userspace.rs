//! The userspace mode's data path against the same traffic without a proxy and through the L4
//! proxies people deploy: HAProxy, nginx (stream) and socat.
//!
//! `cargo bench --bench userspace` (as root) builds three network namespaces,
//!
//! ```text
//!  client 10.1.1.2 ──veth── 10.1.1.1 node 10.1.2.1 ──veth── 10.1.2.2 server
//! ```
//!
//! and measures, for each subject — `direct` (the client talks to the server, the node routes),
//! `kproxy (splice)` and `kproxy (buffered)` (the kproxy binary in `--proxy-mode userspace` in
//! the node, each copy method once; a ClusterIP per server port; and splice on one shared
//! multi-thread runtime, `KPROXY_USERSPACE_THREADS=shared`), `haproxy` and `nginx stream`
//! (Debian's packages, with the configs in `benches/configs/`: threads = cores, no per-connection
//! logging) and `socat` (`TCP-LISTEN:…,fork` / `UDP-LISTEN:…,fork`), each started in the node by
//! this harness and stopped by pid — :
//! - bulk throughput of one TCP stream and of 16 parallel streams (bytes the server received
//!   per second);
//! - connections per second, each a fresh connection carrying a 1 KiB request and a 1 KiB
//!   response (8 concurrent clients);
//! - latency of one such request on a fresh connection (one client, sequential): p50 and p99;
//! - UDP round trips per second (64-byte datagrams, echo) over 4, 64 and 1,024 flows (client
//!   sockets), each with one request outstanding.
//!
//! `KPROXY_BENCH_BEFORE=/path/to/kproxy` adds that binary as a subject (`kproxy before`), so a
//! change is measured against its baseline in the same run and the same namespaces.
//!
//! Then, for kproxy alone: its memory with 10,000 idle proxied TCP connections and then 10,000
//! UDP flows (resident set growth per connection and per flow, file descriptors, and the
//! kernel's objects per socket from `/proc/slabinfo`).
//!
//! With every throughput figure it records where the CPU went (`common::cpu`): the machine's busy
//! cores and idle share and the subject's user and system time. From them the report gives, per
//! figure, a ceiling: the share of direct that a proxy whose own code took no CPU time could reach
//! on this path when client, proxy and server share the cores.
//!
//! `KPROXY_BENCH_PIN=1` gives the proxy a core of its own: the harness (client and server) runs
//! on CPU 0, every subject on CPU 1 (so kproxy, HAProxy and nginx each run one worker), as on a
//! node whose proxy does not compete with the endpoints. Direct then has one core. The report
//! then gives CPU 0's busy share and, as the ceiling, what CPU 0 would carry if it were never
//! idle: when it is busy all the time, the endpoints' core sets the pace, whatever the proxy.
//!
//! The full profile runs 5 rounds, each measuring every subject in turn, and reports the median
//! of each figure and its spread (the development machine is shared, so load elsewhere comes and
//! goes), with the load average at the start and the end. It prints Markdown tables and writes
//! them to `target/kproxy-bench/userspace.md`, with a plot (`userspace.svg`). `--quick` (what
//! `cargo test --benches` runs) uses short runs, one round and 1,000 connections for the memory
//! figure, so the harness cannot rot. Without root it prints why and exits 0; a proxy that is not
//! installed is left out with a note.
#![allow(
    clippy::disallowed_methods,
    reason = "benchmarks start kproxy, proxies and ip/nft in their namespaces directly"
)]
#![allow(
    clippy::unwrap_used,
    reason = "benchmark harness: a failure should stop it loudly"
)]
#![allow(clippy::print_stdout, reason = "the harness prints its table")]

mod common;

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::cpu::{self, Usage};
use common::{
    CLIENT, NODE, Proc, RR, SERVER, SINK, Topology, addr, bulk, conn_rate, have, request_latency,
    servers, topology, udp_flows,
};

/// Service addresses (ClusterIPs) kproxy serves.
const SVC_SINK: &str = "10.96.0.1";
const SVC_RR: &str = "10.96.0.2";
const SVC_ECHO: &str = "10.96.0.3";
const SVC_HOLD: &str = "10.96.0.4";
/// The UDP echo every subject's UDP traffic ends at: a socket per thread (`SO_REUSEPORT`).
const ECHO_FAST: u16 = 5354;
/// The server port that holds idle connections (memory measurement).
const HOLD: u16 = 8082;
/// UDP flow counts measured.
const FLOWS: [usize; 3] = [4, 64, 1024];

/// Where a subject's traffic goes.
#[derive(Clone, Copy)]
struct Targets {
    sink: SocketAddr,
    rr: SocketAddr,
    /// None: the subject does not proxy UDP.
    echo: Option<SocketAddr>,
}

#[derive(Default, Clone)]
struct Figures {
    bulk1: f64,
    bulk16: f64,
    /// Bulk streams that never got the server's greeting (a broken path, shown in the table).
    failed_streams: usize,
    cps: f64,
    p50: Duration,
    p99: Duration,
    /// Round trips per second for each of [`FLOWS`] (None: no UDP).
    udp: [Option<f64>; 3],
    /// CPU use while each throughput figure was measured, indexed by [`PARTS`].
    cpu: [Option<Usage>; 6],
}

/// A throughput figure: its name, its unit of work, and how to read it (work per second).
type Part = (&'static str, Unit, fn(&Figures) -> Option<f64>);

/// The throughput figures, in the order of [`Figures::cpu`]: name, unit of work, and the figure
/// itself (work per second).
const PARTS: [Part; 6] = [
    ("1 stream", Unit::Gigabyte, |f| Some(f.bulk1)),
    ("16 streams", Unit::Gigabyte, |f| Some(f.bulk16)),
    ("conn/s", Unit::Connection, |f| Some(f.cps)),
    ("UDP 4 flows", Unit::RoundTrip, |f| f.udp[0]),
    ("UDP 64 flows", Unit::RoundTrip, |f| f.udp[1]),
    ("UDP 1,024 flows", Unit::RoundTrip, |f| f.udp[2]),
];
const BULK1: usize = 0;
const BULK16: usize = 1;
const CPS: usize = 2;
const UDP: usize = 3;

/// What one unit of a throughput figure is, for CPU time per unit.
#[derive(Clone, Copy)]
enum Unit {
    Gigabyte,
    Connection,
    RoundTrip,
}

impl Unit {
    /// How a CPU time in seconds per unit is written.
    fn cost(self, cpu_s_per_unit: f64) -> String {
        match self {
            // Figures are bytes per second.
            Unit::Gigabyte => format!("{:.0} ms/GB", cpu_s_per_unit * 1e9 * 1e3),
            Unit::Connection | Unit::RoundTrip => format!("{:.1} µs", cpu_s_per_unit * 1e6),
        }
    }
}

struct Profile {
    d: Duration,
    latency_n: usize,
    rounds: usize,
    idle: usize,
}

/// One way to carry the traffic.
#[derive(Clone)]
enum Subject {
    /// No proxy: the node routes.
    Direct,
    /// A kproxy binary in userspace mode with this `KPROXY_USERSPACE_COPY`.
    Kproxy {
        label: String,
        binary: String,
        copy: &'static str,
        threads: &'static str,
    },
    /// HAProxy with `benches/configs/haproxy.cfg`.
    Haproxy,
    /// nginx with `benches/configs/nginx.conf`.
    Nginx,
    /// socat in the node.
    Socat,
}

fn config(name: &str) -> String {
    format!("{}/benches/configs/{name}", env!("CARGO_MANIFEST_DIR"))
}

impl Subject {
    fn name(&self) -> String {
        match self {
            Subject::Direct => "direct".into(),
            Subject::Kproxy { label, .. } => label.clone(),
            Subject::Haproxy => "haproxy".into(),
            Subject::Nginx => "nginx stream".into(),
            Subject::Socat => "socat".into(),
        }
    }

    /// Starts the subject's processes (stopped when the returned value drops) and says where
    /// its traffic goes.
    fn start(&self, t: &Topology, dir: &std::path::Path) -> (Vec<Proc>, Targets) {
        let node = |port| addr(NODE, port);
        match self {
            Subject::Direct => (
                Vec::new(),
                Targets {
                    sink: addr(SERVER, SINK),
                    rr: addr(SERVER, RR),
                    echo: Some(addr(SERVER, ECHO_FAST)),
                },
            ),
            Subject::Kproxy {
                binary,
                copy,
                threads,
                ..
            } => (
                vec![start_kproxy(t, dir, binary, copy, threads)],
                Targets {
                    sink: addr(SVC_SINK, 80),
                    rr: addr(SVC_RR, 80),
                    echo: Some(addr(SVC_ECHO, 53)),
                },
            ),
            Subject::Haproxy => (
                vec![Proc(subject_child(
                    &t.node,
                    "haproxy",
                    &["-f", &config("haproxy.cfg"), "-db"],
                    &[],
                ))],
                Targets {
                    sink: node(9180),
                    rr: node(9181),
                    echo: None,
                },
            ),
            Subject::Nginx => {
                let prefix = dir.join("nginx");
                let _ = std::fs::create_dir_all(&prefix);
                let pid = format!("pid {}/nginx.pid;", prefix.display());
                (
                    vec![Proc(subject_child(
                        &t.node,
                        "nginx",
                        &[
                            "-c",
                            &config("nginx.conf"),
                            "-p",
                            &prefix.display().to_string(),
                            "-g",
                            &pid,
                        ],
                        &[],
                    ))],
                    Targets {
                        sink: node(9280),
                        rr: node(9281),
                        echo: Some(node(9253)),
                    },
                )
            }
            Subject::Socat => {
                let sink = format!("TCP:{SERVER}:{SINK}");
                let rr = format!("TCP:{SERVER}:{RR}");
                let echo = format!("UDP:{SERVER}:{ECHO_FAST}");
                let l_sink = format!("TCP-LISTEN:9080,bind={NODE},fork,reuseaddr,backlog=4096");
                let l_rr = format!("TCP-LISTEN:9081,bind={NODE},fork,reuseaddr,backlog=4096");
                let l_echo = format!("UDP-LISTEN:9053,bind={NODE},fork,reuseaddr");
                // `-T 2`: a per-client child exits after 2 s idle (UDP has no end of stream).
                (
                    vec![
                        Proc(subject_child(&t.node, "socat", &[&l_sink, &sink], &[])),
                        Proc(subject_child(&t.node, "socat", &[&l_rr, &rr], &[])),
                        Proc(subject_child(
                            &t.node,
                            "socat",
                            &["-T", "2", &l_echo, &echo],
                            &[],
                        )),
                    ],
                    Targets {
                        sink: node(9080),
                        rr: node(9081),
                        echo: Some(node(9053)),
                    },
                )
            }
        }
    }
}

/// `KPROXY_BENCH_PIN=1`: the proxy gets a core of its own. The harness (client and server
/// threads) runs on CPU 0 and every subject's processes on CPU 1, as on a node where the proxy
/// does not compete with the endpoints for cores. `direct` then has one core for client and
/// server; the default (unpinned) shares every core among all three.
fn pinned() -> bool {
    std::env::var_os("KPROXY_BENCH_PIN").is_some()
}

/// Starts a subject's process in the node namespace, on CPU 1 when [`pinned`].
fn subject_child(
    node: &common::Ns,
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Child {
    if pinned() {
        let mut with = vec!["-c", "1", program];
        with.extend_from_slice(args);
        node.child("taskset", &with, env)
    } else {
        node.child(program, args, env)
    }
}

fn start_kproxy(
    t: &Topology,
    dir: &std::path::Path,
    binary: &str,
    copy: &str,
    threads: &str,
) -> Proc {
    let admin = format!("--admin-socket={}", dir.join("admin.sock").display());
    Proc(subject_child(
        &t.node,
        binary,
        &[
            "--proxy-mode",
            "userspace",
            "--manifests",
            &dir.join("manifests").display().to_string(),
            "--hostname-override",
            "bench-node",
            "--healthz-bind-address=",
            "--metrics-bind-address=",
            &admin,
        ],
        &[
            ("KPROXY_USERSPACE_COPY", copy),
            ("KPROXY_USERSPACE_THREADS", threads),
            ("RUST_LOG", "warn"),
        ],
    ))
}

/// The median of each figure over rounds.
fn median(rounds: &[Figures]) -> Figures {
    Figures {
        bulk1: mid(rounds.iter().map(|f| f.bulk1).collect()),
        bulk16: mid(rounds.iter().map(|f| f.bulk16).collect()),
        failed_streams: rounds.iter().map(|f| f.failed_streams).sum(),
        cps: mid(rounds.iter().map(|f| f.cps).collect()),
        p50: mid(rounds.iter().map(|f| f.p50).collect()),
        p99: mid(rounds.iter().map(|f| f.p99).collect()),
        udp: std::array::from_fn(|i| {
            let v: Vec<f64> = rounds.iter().filter_map(|f| f.udp[i]).collect();
            (!v.is_empty()).then(|| mid(v))
        }),
        cpu: std::array::from_fn(|i| {
            let v: Vec<Usage> = rounds.iter().filter_map(|f| f.cpu[i]).collect();
            (!v.is_empty()).then(|| Usage {
                idle_pct: mid(v.iter().map(|u| u.idle_pct).collect()),
                busy: mid(v.iter().map(|u| u.busy).collect()),
                user: mid(v.iter().map(|u| u.user).collect()),
                system: mid(v.iter().map(|u| u.system).collect()),
                cpu0_busy: mid(v.iter().map(|u| u.cpu0_busy).collect()),
            })
        }),
    }
}

fn mid<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn range(v: impl Iterator<Item = f64>) -> (f64, f64) {
    v.fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)))
}

/// Measures every part `KPROXY_BENCH_PARTS` asks for (`bulk`, `cps`, `udp`, or `tcp` for every TCP
/// part; all by default), each with the CPU it took: the machine's and that of the process
/// groups `groups` (the subject's).
fn measure(
    t: &Topology,
    to: Targets,
    p: &Profile,
    received: &AtomicU64,
    groups: &[u32],
) -> Figures {
    let parts = std::env::var("KPROXY_BENCH_PARTS").unwrap_or_default();
    let want = |part: &str| parts.is_empty() || parts == part || (parts == "tcp" && part != "udp");
    let mut f = Figures::default();
    if want("bulk") {
        let (one, u1) = cpu::during(groups, || bulk(&t.client, to.sink, 1, p.d, received));
        let (sixteen, u16) = cpu::during(groups, || bulk(&t.client, to.sink, 16, p.d, received));
        f.bulk1 = one.bytes_per_s;
        f.bulk16 = sixteen.bytes_per_s;
        f.failed_streams = one.failed + sixteen.failed;
        f.cpu[BULK1] = Some(u1);
        f.cpu[BULK16] = Some(u16);
    }
    if want("cps") {
        let (cps, u) = cpu::during(groups, || conn_rate(&t.client, to.rr, 8, p.d));
        f.cps = cps;
        f.cpu[CPS] = Some(u);
    }
    if want("latency") {
        (f.p50, f.p99) = request_latency(&t.client, to.rr, p.latency_n);
    }
    if want("udp")
        && let Some(echo) = to.echo
    {
        for (i, &flows) in FLOWS.iter().enumerate() {
            let (rate, u) = cpu::during(groups, || {
                udp_flows(&t.client, client_ip(), echo, flows, 4, p.d)
            });
            f.udp[i] = Some(rate);
            f.cpu[UDP + i] = Some(u);
        }
    }
    f
}

fn client_ip() -> IpAddr {
    CLIENT.parse().unwrap()
}

/// The manifests kproxy reads: four ClusterIP services onto the server.
fn write_manifests(dir: &std::path::Path) {
    let dir = dir.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Node\nmetadata: {name: bench-node}\nstatus:\n  addresses: [{type: InternalIP, address: 10.1.1.1}]\n",
    );
    for (name, ip, port, target, proto) in [
        ("sink", SVC_SINK, 80, SINK, "TCP"),
        ("rr", SVC_RR, 80, RR, "TCP"),
        ("echo", SVC_ECHO, 53, ECHO_FAST, "UDP"),
        ("hold", SVC_HOLD, 80, HOLD, "TCP"),
    ] {
        write!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  ports: [{{name: p, port: {port}, targetPort: {target}, protocol: {proto}}}]\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: bench\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: p, port: {target}, protocol: {proto}}}]\nendpoints:\n  - addresses: [{SERVER}]\n    conditions: {{ready: true}}\n"
        )
        .unwrap();
    }
    std::fs::write(dir.join("bench.yaml"), yaml).unwrap();
}

/// Waits until the sink greets through `to` and a UDP round trip through `echo` succeeds.
fn wait_ready(client: &common::Ns, to: Targets) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let sink = to.sink;
    while !client.run(move || {
        TcpStream::connect_timeout(&sink, Duration::from_secs(1))
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                std::io::Read::read_exact(&mut s, &mut [0u8; 1])
            })
            .is_ok()
    }) {
        assert!(Instant::now() < deadline, "{sink} never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(echo) = to.echo {
        while !client.run(move || common::udp_once(client_ip(), echo)) {
            assert!(Instant::now() < deadline, "{echo} never answered");
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --benches` runs this without `--bench`: the quick profile.
    let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
    // A benchmark that cannot run here fails and says why, rather than passing as if it ran.
    assert!(
        nix::unistd::geteuid().is_root(),
        "the userspace bench needs root (network namespaces): run it as root"
    );
    let profile = if quick {
        Profile {
            d: Duration::from_millis(300),
            latency_n: 200,
            rounds: 1,
            idle: 1_000,
        }
    } else {
        Profile {
            d: Duration::from_secs(2),
            latency_n: 3000,
            rounds: 5,
            idle: 10_000,
        }
    };
    let mut profile = profile;
    if let Some(r) = std::env::var("KPROXY_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        profile.rounds = r;
    }
    if let Some(n) = std::env::var("KPROXY_BENCH_LATENCY_N")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        profile.latency_n = n;
    }
    if let Some(ms) = std::env::var("KPROXY_BENCH_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        profile.d = Duration::from_millis(ms);
    }
    if pinned() {
        // Before any thread starts: every thread of the harness inherits CPU 0.
        let mut cpus = nix::sched::CpuSet::new();
        cpus.set(0).unwrap();
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).unwrap();
    }
    common::raise_nofile(200_000);
    let load_start = loadavg();
    let t = topology("ubench");
    let received = Arc::new(AtomicU64::new(0));
    let _servers = servers(
        &t.server,
        SERVER.parse().unwrap(),
        &[SERVER.parse().unwrap()],
        received.clone(),
    );
    let echo_stop = common::udp_echo_reuseport(&t.server, SERVER.parse().unwrap(), ECHO_FAST, 2);
    let held = common::hold_server(&t.server, SERVER.parse().unwrap(), HOLD);
    let dir = tempfile::Builder::new()
        .prefix("kpx-ubench-")
        .tempdir()
        .unwrap();
    write_manifests(dir.path());
    let mut notes = String::new();
    let kproxy = env!("CARGO_BIN_EXE_kproxy").to_string();
    let mut subjects = vec![
        Subject::Direct,
        Subject::Kproxy {
            label: "kproxy (splice)".into(),
            binary: kproxy.clone(),
            copy: "splice",
            threads: "per-core",
        },
        Subject::Kproxy {
            label: "kproxy (buffered)".into(),
            binary: kproxy.clone(),
            copy: "buffered",
            threads: "per-core",
        },
        Subject::Kproxy {
            label: "kproxy (splice, shared runtime)".into(),
            binary: kproxy.clone(),
            copy: "splice",
            threads: "shared",
        },
    ];
    if let Ok(before) = std::env::var("KPROXY_BENCH_BEFORE") {
        subjects.push(Subject::Kproxy {
            label: "kproxy before (splice)".into(),
            binary: before,
            copy: "splice",
            threads: "per-core",
        });
    }
    for (subject, program, package) in [
        (Subject::Haproxy, "haproxy", "haproxy"),
        (Subject::Nginx, "nginx", "nginx libnginx-mod-stream"),
        (Subject::Socat, "socat", "socat"),
    ] {
        let usable = have(program)
            && (program != "nginx"
                || std::path::Path::new("/usr/lib/nginx/modules/ngx_stream_module.so").exists());
        if usable {
            subjects.push(subject);
        } else {
            writeln!(
                notes,
                "{program} is not installed (`apt-get install {package}`): no {program} row."
            )
            .unwrap();
        }
    }
    // `KPROXY_BENCH_ONLY=kproxy,nginx`: direct and the subjects whose names contain one of these.
    if let Ok(only) = std::env::var("KPROXY_BENCH_ONLY") {
        subjects.retain(|s| {
            matches!(s, Subject::Direct) || only.split(',').any(|o| s.name().contains(o))
        });
    }
    let skip_memory = std::env::var_os("KPROXY_BENCH_NO_MEMORY").is_some();
    // Rounds interleave the subjects, so a burst of load elsewhere on the machine hits them
    // alike; each figure is the median over the rounds.
    let mut samples: Vec<Vec<Figures>> = vec![Vec::new(); subjects.len()];
    for round in 0..profile.rounds {
        for (i, subject) in subjects.iter().enumerate() {
            eprintln!("round {}/{}: {}", round + 1, profile.rounds, subject.name());
            let (running, to) = subject.start(&t, dir.path());
            wait_ready(&t.client, to);
            let groups: Vec<u32> = running.iter().map(|p| p.0.id()).collect();
            let f = measure(&t, to, &profile, &received, &groups);
            if let (Subject::Kproxy { .. }, Some(u)) = (subject, f.cpu[CPS]) {
                // The CPU table is only worth reading if the accounting sees the subject.
                assert!(
                    u.user + u.system > 0.0,
                    "no CPU time found for {}'s processes during conn/s",
                    subject.name()
                );
            }
            samples[i].push(f);
            drop(running);
            // Let the TIME_WAITs and the stopped proxy's sockets go before the next subject.
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let load_end = loadavg();
    let rows: Vec<(String, Figures, Vec<Figures>)> = subjects
        .iter()
        .zip(samples)
        .map(|(s, f)| (s.name(), median(&f), f))
        .collect();
    // Every idle proxied connection holds two descriptors in kproxy (and two in this harness:
    // client and server), so the TCP count stays under the open-file limit.
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(20_000, |(soft, _)| soft as usize);
    let n_tcp = profile.idle.min(limit.saturating_sub(2_000) / 2);
    if n_tcp < profile.idle {
        writeln!(
            notes,
            "The open-file limit is {limit} (hard; raising it needs CAP_SYS_RESOURCE, which this machine does not give): {n_tcp} idle TCP connections rather than {} (two descriptors each in kproxy).",
            profile.idle
        )
        .unwrap();
    }
    let memory = if skip_memory {
        String::new()
    } else {
        memory(&t, dir.path(), &kproxy, (n_tcp, profile.idle), &held)
    };
    echo_stop.store(true, Ordering::Relaxed);
    writeln!(
        notes,
        "\nEach figure is the median of {} interleaved rounds. Load average (1, 5, 15 min) at the start: {load_start}; at the end: {load_end}.",
        profile.rounds,
    )
    .unwrap();
    report(&rows, quick, &notes, &memory);
}

/// kproxy's memory with `n_tcp` idle proxied TCP connections, then (a fresh kproxy) with `n_udp`
/// UDP flows.
fn memory(
    t: &Topology,
    dir: &std::path::Path,
    kproxy: &str,
    (n_tcp, n_udp): (usize, usize),
    held: &Arc<AtomicU64>,
) -> String {
    let ready = Targets {
        sink: addr(SVC_SINK, 80),
        rr: addr(SVC_RR, 80),
        echo: Some(addr(SVC_ECHO, 53)),
    };
    // Warm up: the worker threads' UDP buffers and pipe pools exist before the baseline.
    let warm = |t: &Topology| {
        let _ = conn_rate(&t.client, addr(SVC_RR, 80), 8, Duration::from_millis(200));
        let _ = udp_flows(
            &t.client,
            client_ip(),
            addr(SVC_ECHO, 53),
            64,
            2,
            Duration::from_millis(200),
        );
        std::thread::sleep(Duration::from_millis(300));
    };

    // A fresh kproxy per kind, warmed up, with its resident set and descriptors before.
    let fresh = || {
        let proc = start_kproxy(t, dir, kproxy, "splice", "per-core");
        wait_ready(&t.client, ready);
        let pid = proc.0.id();
        warm(t);
        (proc, pid, rss(pid), fds(pid))
    };

    // Idle TCP connections: connected, nothing sent.
    let (proc, pid, rss0, fds0) = fresh();
    let before = held.load(Ordering::Relaxed);
    let hold = addr(SVC_HOLD, 80);
    let conns: Vec<TcpStream> = t.client.run(move || {
        (0..n_tcp)
            .map(|_| TcpStream::connect_timeout(&hold, Duration::from_secs(5)).unwrap())
            .collect()
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while held.load(Ordering::Relaxed) < before + n_tcp as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (rss1, fds1) = (rss(pid), fds(pid));
    // What the endpoint accepted (each idle connection proxied end to end).
    let n_tcp = usize::try_from(held.load(Ordering::Relaxed) - before).unwrap_or(n_tcp);
    drop(proc);
    drop(conns);
    std::thread::sleep(Duration::from_millis(300));

    // UDP flows: one client socket each, one round trip each.
    let (proc, pid, rss2, fds2) = fresh();
    let echo = addr(SVC_ECHO, 53);
    let flows: Vec<UdpSocket> = t.client.run(move || {
        let socks: Vec<UdpSocket> = (0..n_udp)
            .map(|_| {
                let s = UdpSocket::bind((client_ip(), 0)).unwrap();
                s.connect(echo).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                s
            })
            .collect();
        for s in &socks {
            for _ in 0..3 {
                if s.send(b"m").is_ok() && s.recv(&mut [0u8; 8]).is_ok() {
                    break;
                }
            }
        }
        socks
    });
    std::thread::sleep(Duration::from_millis(300));
    let (rss3, fds3) = (rss(pid), fds(pid));
    drop(proc);
    drop(flows);

    let per = |a: u64, b: u64, n: usize| (b.saturating_sub(a)) as f64 / n.max(1) as f64;
    let slab = slab_sizes();
    let obj = |name: &str| slab.iter().find(|(n, _)| n == name).map_or(0, |(_, s)| *s);
    let per_socket = obj("sock_inode_cache") + obj("filp") + obj("dentry") + obj("eventpoll_epi");
    let (tcp_k, udp_k) = (2 * (obj("TCP") + per_socket), obj("UDP") + per_socket);
    let mut out = String::new();
    writeln!(
        out,
        "\n### Memory (kproxy splice; {n_tcp} idle TCP connections, then a fresh kproxy with {n_udp} UDP flows)\n\n| | resident set growth per item | file descriptors per item | kernel objects per item (slabinfo sizes) |\n|---|---|---|---|"
    )
    .unwrap();
    writeln!(
        out,
        "| idle TCP connection (client → kproxy → endpoint) | {:.0} bytes | {:.2} | {tcp_k} bytes (2 TCP sockets: `TCP` {} + inode {} + file {} + dentry {} + epoll item {} each) |",
        per(rss0, rss1, n_tcp),
        per(fds0, fds1, n_tcp),
        obj("TCP"),
        obj("sock_inode_cache"),
        obj("filp"),
        obj("dentry"),
        obj("eventpoll_epi"),
    )
    .unwrap();
    writeln!(
        out,
        "| UDP flow | {:.0} bytes | {:.2} | {udp_k} bytes (1 UDP socket: `UDP` {} + the same per-socket objects) |",
        per(rss2, rss3, n_udp),
        per(fds2, fds3, n_udp),
        obj("UDP"),
    )
    .unwrap();
    writeln!(
        out,
        "\nResident set: {} KiB → {} KiB with the TCP connections; {} KiB → {} KiB with the UDP flows. Socket buffers are empty while idle (bounded by `net.ipv4.tcp_rmem`/`tcp_wmem` and `net.core.rmem_*` while data is queued); a pipe is held only while bytes move.",
        rss0 / 1024,
        rss1 / 1024,
        rss2 / 1024,
        rss3 / 1024
    )
    .unwrap();
    out
}

fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// `(name, object size)` of every slab cache.
fn slab_sizes() -> Vec<(String, u64)> {
    std::fs::read_to_string("/proc/slabinfo")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.first()?.to_string(), f.get(3)?.parse().ok()?))
        })
        .collect()
}

fn report(rows: &[(String, Figures, Vec<Figures>)], quick: bool, notes: &str, memory: &str) {
    let base = rows[0].1.clone();
    let ratio = |v: f64, b: f64| if b > 0.0 { v / b * 100.0 } else { 0.0 };
    let gbit = |v: f64| v * 8.0 / 1e9;
    let mut out = format!(
        "userspace data path ({} profile; {} CPUs, {})\n\n| subject | 1 stream Gbit/s | 16 streams Gbit/s | conn/s (1 KiB req/resp) | latency p50 | p99 (added) | UDP round trips/s, 4 flows | 64 flows | 1,024 flows |\n|---|---|---|---|---|---|---|---|---|\n",
        if quick { "quick" } else { "full" },
        cpu::machine_cpus(),
        if pinned() {
            "the proxy on CPU 1, client and server on CPU 0 (`KPROXY_BENCH_PIN=1`)"
        } else {
            "client, proxy and server share every CPU"
        },
    );
    for (name, f, _) in rows {
        let added = f.p99.as_secs_f64() - base.p99.as_secs_f64();
        let udp: Vec<String> = (0..FLOWS.len())
            .map(|i| match (f.udp[i], base.udp[i]) {
                (Some(v), Some(b)) => format!("{v:.0} ({:.0}%)", ratio(v, b)),
                _ => "n/a (no UDP)".into(),
            })
            .collect();
        writeln!(
            out,
            "| {name} | {:.2} ({:.0}%) | {:.2} ({:.0}%) | {:.0} ({:.0}%) | {:.0} µs | {:.0} µs ({:+.0} µs) | {} |",
            gbit(f.bulk1),
            ratio(f.bulk1, base.bulk1),
            gbit(f.bulk16),
            ratio(f.bulk16, base.bulk16),
            f.cps,
            ratio(f.cps, base.cps),
            f.p50.as_secs_f64() * 1e6,
            f.p99.as_secs_f64() * 1e6,
            added * 1e6,
            udp.join(" | "),
        )
        .unwrap();
    }
    if rows.iter().any(|(_, _, r)| r.len() > 1) {
        out.push_str("\nSpread over the rounds (lowest–highest):\n\n| subject | 1 stream Gbit/s | 16 streams Gbit/s | conn/s | p99 µs | UDP 4 / 64 / 1,024 flows |\n|---|---|---|---|---|---|\n");
        for (name, _, all) in rows {
            let r = |g: &dyn Fn(&Figures) -> f64| range(all.iter().map(g));
            let (b1, b16, c, p) = (
                r(&|f| gbit(f.bulk1)),
                r(&|f| gbit(f.bulk16)),
                r(&|f| f.cps),
                r(&|f| f.p99.as_secs_f64() * 1e6),
            );
            let udp: Vec<String> = (0..FLOWS.len())
                .map(|i| {
                    if all.iter().any(|f| f.udp[i].is_none()) {
                        "n/a".into()
                    } else {
                        let (lo, hi) = r(&|f| f.udp[i].unwrap_or(0.0));
                        format!("{lo:.0}–{hi:.0}")
                    }
                })
                .collect();
            writeln!(
                out,
                "| {name} | {:.2}–{:.2} | {:.2}–{:.2} | {:.0}–{:.0} | {:.0}–{:.0} | {} |",
                b1.0,
                b1.1,
                b16.0,
                b16.1,
                c.0,
                c.1,
                p.0,
                p.1,
                udp.join(" / ")
            )
            .unwrap();
        }
    }
    for (name, f, _) in rows.iter().filter(|(_, f, _)| f.failed_streams > 0) {
        writeln!(
            out,
            "\n**{name}: {} bulk stream(s) never received the server's first byte within 10 s** (the server speaks first: it greets each connection with one byte).",
            f.failed_streams
        )
        .unwrap();
    }
    out.push_str(&cpu_table(rows));
    out.push_str(notes);
    out.push_str(memory);
    print!("{out}");
    let _ = std::io::stdout().flush();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/kproxy-bench");
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| std::path::PathBuf::from(t).join("kproxy-bench"))
        .unwrap_or(dir);
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("userspace.md"), &out);
        plot(rows, &dir.join("userspace.svg"), quick);
    }
}

/// Where the CPU went during each throughput figure (medians), per unit of work, and the
/// ceiling that follows.
///
/// Shared cores: the share of direct's figure a proxy on this path could reach if its own code
/// took no CPU time at all and no core were ever idle, i.e. every core's time spent on the rest
/// of the path's cost per unit (the machine's busy time less the subject's user time). Client,
/// proxy and server share the cores, so this bounds any user-space proxy here.
///
/// Pinned: client and server have CPU 0 and the proxy CPU 1, so when CPU 0 is busy all the time
/// the endpoints' core, not the proxy, sets the pace. The ceiling is then the figure CPU 0 would
/// carry if it were never idle at its measured cost per unit (the client's and server's work and
/// the kernel's for the packets they send, which on veth includes the proxy's receive path):
/// the most this path reaches unless the proxy takes work off the endpoints' core.
fn cpu_table(rows: &[(String, Figures, Vec<Figures>)]) -> String {
    let cpus = cpu::machine_cpus() as f64;
    let base = &rows[0].1;
    // The prose and the header differ only where the pinned table adds CPU 0 and its ceiling.
    let (cpu0_text, ceiling_text, cpu0_head, cpu0_rule) = if pinned() {
        (
            " CPU 0's busy share (client and server run there, the proxy on CPU 1),",
            "the most this path could reach, as a share of direct, if CPU 0 were never idle at its measured cost per unit (its client and server work and the kernel's for the packets they send, which on veth includes the proxy's receive path). When CPU 0 is busy nearly all the time, the endpoints' core, not the proxy, sets the pace.",
            " CPU 0 busy |",
            "---|",
        )
    } else {
        (
            "",
            "the most a proxy on this path could reach, as a share of direct, if its own code took no CPU time and no core were idle (all cores on the path's remaining cost per unit: busy time less the subject's user time). The ceiling holds when client, proxy and server share the cores; with `KPROXY_BENCH_PIN=1` the report gives the endpoints' core's instead.",
            "",
            "",
        )
    };
    let mut out = format!(
        "\nWhere the CPU went (medians): the machine's busy cores and idle share,{cpu0_text} the subject's processes' user and system time (in cores), the machine's CPU time per unit of work and the subject's share of it, and the **ceiling**: {ceiling_text}\n\n| subject | figure | busy cores | idle |{cpu0_head} subject user | subject system | machine per unit | subject per unit | ceiling |\n|---|---|---|---|{cpu0_rule}---|---|---|---|---|\n"
    );
    for (name, f, _) in rows {
        for (i, (part, unit, figure)) in PARTS.iter().enumerate() {
            let (Some(u), Some(rate)) = (f.cpu[i], figure(f)) else {
                continue;
            };
            if rate <= 0.0 {
                continue;
            }
            let direct = figure(base).unwrap_or(0.0);
            let rest = (u.busy - u.user).max(1e-9);
            let ceiling = if direct <= 0.0 {
                "—".to_string()
            } else if pinned() {
                format!("{:.0}%", rate / u.cpu0_busy.max(1e-9) / direct * 100.0)
            } else if name == &rows[0].0 {
                "—".to_string()
            } else {
                format!("{:.0}%", cpus / rest * rate / direct * 100.0)
            };
            let cpu0 = if pinned() {
                format!(" {:.0}% |", u.cpu0_busy * 100.0)
            } else {
                String::new()
            };
            writeln!(
                out,
                "| {name} | {part} | {:.2} | {:.1}% |{cpu0} {:.2} | {:.2} | {} | {} | {ceiling} |",
                u.busy,
                u.idle_pct,
                u.user,
                u.system,
                unit.cost(u.busy / rate),
                unit.cost((u.user + u.system) / rate),
            )
            .unwrap();
        }
    }
    out
}

/// Grouped bars: each figure as a percentage of direct's, one bar per subject.
fn plot(rows: &[(String, Figures, Vec<Figures>)], path: &std::path::Path, quick: bool) {
    use plotters::prelude::*;
    let base = &rows[0].1;
    type Metric = (&'static str, fn(&Figures) -> Option<f64>);
    // The throughput figures, with latency (as a rate, so higher is better) after the TCP ones.
    let latency: Metric = ("1 / p99 latency", |f| {
        Some(1.0 / f.p99.as_secs_f64().max(1e-9))
    });
    let metrics: Vec<Metric> = PARTS[..UDP]
        .iter()
        .map(|&(name, _, figure)| (name, figure))
        .chain([latency])
        .chain(PARTS[UDP..].iter().map(|&(name, _, figure)| (name, figure)))
        .collect();
    let root = SVGBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let n = rows.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "userspace proxies as % of direct (higher is better; {} profile, {} CPUs{})",
                if quick { "quick" } else { "full" },
                cpu::machine_cpus(),
                if pinned() {
                    "; proxy on CPU 1, client and server on CPU 0"
                } else {
                    ""
                }
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..metrics.len() as f64, 0f64..165f64)
        .unwrap();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(metrics.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < metrics.len() {
                metrics[i].0.to_string()
            } else {
                String::new()
            }
        })
        .y_desc("% of direct")
        .draw()
        .unwrap();
    // direct black; kproxy in blues, its baseline grey; the other proxies in their own hues.
    let color = |name: &str, i: usize| -> RGBColor {
        match name {
            "direct" => RGBColor(0, 0, 0),
            "haproxy" => RGBColor(44, 160, 44),
            "nginx stream" => RGBColor(255, 127, 14),
            "socat" => RGBColor(148, 103, 189),
            n if n.contains("before") => RGBColor(160, 160, 160),
            _ => [
                RGBColor(31, 119, 180),
                RGBColor(120, 170, 220),
                RGBColor(23, 190, 207),
                RGBColor(57, 59, 121),
            ][i % 4],
        }
    };
    let width = 0.8 / n as f64;
    let mut kproxies = 0;
    for (s, (name, f, _)) in rows.iter().enumerate() {
        let color = color(name, kproxies);
        if name.starts_with("kproxy") && !name.contains("before") {
            kproxies += 1;
        }
        let bars: Vec<Rectangle<(f64, f64)>> = metrics
            .iter()
            .enumerate()
            .filter_map(|(m, (_, get))| {
                let (v, b) = (get(f)?, get(base)?);
                let pct = if b > 0.0 {
                    (v / b * 100.0).min(130.0)
                } else {
                    0.0
                };
                let x0 = m as f64 + 0.1 + s as f64 * width;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.9, pct)],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)
            .unwrap()
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .unwrap();
    root.present().unwrap();
}
