//! The userspace mode's data path against the same traffic without a proxy and through `socat`.
//!
//! `cargo bench --bench userspace` (as root) builds three network namespaces,
//!
//! ```text
//!  client 10.1.1.2 ──veth── 10.1.1.1 node 10.1.2.1 ──veth── 10.1.2.2 server
//! ```
//!
//! and measures, for each subject — `direct` (the client talks to the server, the node routes),
//! `kproxy splice` and `kproxy buffered` (the kproxy binary in `--proxy-mode userspace` in the
//! node, each copy method once; a ClusterIP per server port) and `socat` (`socat
//! TCP-LISTEN:…,fork` / `UDP-LISTEN:…,fork` in the node, Debian's package) — :
//! - bulk throughput of one TCP stream and of 16 parallel streams (bytes the server received
//!   per second);
//! - connections per second, each a fresh connection carrying a 1 KiB request and a 1 KiB
//!   response (8 concurrent clients);
//! - latency of one such request on a fresh connection (one client, sequential): p50 and p99;
//! - UDP round trips per second (4 clients, 64-byte datagrams, echo).
//!
//! The full profile runs 5 rounds, each measuring every subject in turn, and reports the median
//! of each figure (the development machine is shared, so load elsewhere comes and goes).
//! It prints a Markdown table (each figure also as a ratio to `direct`) and writes it to
//! `target/kproxy-bench/userspace.md`. `--quick` (what `cargo test --benches` runs) uses short
//! runs so the harness cannot rot. Without root it prints why and exits 0; without socat the
//! socat column is left out with a note.
#![allow(
    clippy::unwrap_used,
    reason = "benchmark harness: a failure should stop it loudly"
)]
#![allow(clippy::print_stdout, reason = "the harness prints its table")]

mod common;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use common::{
    CLIENT, ECHO, NODE, Proc, RR, SERVER, SINK, Topology, addr, bulk, conn_rate, have,
    request_latency, servers, topology, udp_rate,
};

/// Service addresses (ClusterIPs) kproxy serves.
const SVC_SINK: &str = "10.96.0.1";
const SVC_RR: &str = "10.96.0.2";
const SVC_ECHO: &str = "10.96.0.3";
/// socat's ports on the node.
const SOCAT_SINK: u16 = 9080;
const SOCAT_RR: u16 = 9081;
const SOCAT_ECHO: u16 = 9053;

/// Where a subject's traffic goes.
#[derive(Clone, Copy)]
struct Targets {
    sink: SocketAddr,
    rr: SocketAddr,
    echo: SocketAddr,
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
    udp_pps: f64,
}

struct Profile {
    d: Duration,
    latency_n: usize,
    rounds: usize,
}

/// One way to carry the traffic.
#[derive(Clone, Copy)]
enum Subject {
    /// No proxy: the node routes.
    Direct,
    /// The kproxy binary in userspace mode with this `KPROXY_USERSPACE_COPY`.
    Kproxy(&'static str),
    /// socat in the node.
    Socat,
}

impl Subject {
    fn name(self) -> String {
        match self {
            Subject::Direct => "direct".into(),
            Subject::Kproxy(m) => format!("kproxy userspace ({m})"),
            Subject::Socat => "socat".into(),
        }
    }

    /// Starts the subject's processes (stopped when the returned value drops) and says where
    /// its traffic goes.
    fn start(self, t: &Topology, manifests: &std::path::Path) -> (Vec<Proc>, Targets) {
        match self {
            Subject::Direct => (
                Vec::new(),
                Targets {
                    sink: addr(SERVER, SINK),
                    rr: addr(SERVER, RR),
                    echo: addr(SERVER, ECHO),
                },
            ),
            Subject::Kproxy(method) => {
                let admin = format!("--admin-socket={}", manifests.join("admin.sock").display());
                let kproxy = Proc(t.node.child(
                    env!("CARGO_BIN_EXE_kproxy"),
                    &[
                        "--proxy-mode",
                        "userspace",
                        "--manifests",
                        &manifests.display().to_string(),
                        "--hostname-override",
                        "bench-node",
                        "--healthz-bind-address=",
                        "--metrics-bind-address=",
                        &admin,
                    ],
                    &[("KPROXY_USERSPACE_COPY", method), ("RUST_LOG", "warn")],
                ));
                (
                    vec![kproxy],
                    Targets {
                        sink: addr(SVC_SINK, 80),
                        rr: addr(SVC_RR, 80),
                        echo: addr(SVC_ECHO, 53),
                    },
                )
            }
            Subject::Socat => {
                let sink = format!("TCP:{SERVER}:{SINK}");
                let rr = format!("TCP:{SERVER}:{RR}");
                let echo = format!("UDP:{SERVER}:{ECHO}");
                let l_sink =
                    format!("TCP-LISTEN:{SOCAT_SINK},bind={NODE},fork,reuseaddr,backlog=4096");
                let l_rr = format!("TCP-LISTEN:{SOCAT_RR},bind={NODE},fork,reuseaddr,backlog=4096");
                let l_echo = format!("UDP-LISTEN:{SOCAT_ECHO},bind={NODE},fork,reuseaddr");
                // `-T 2`: a per-client child exits after 2 s idle (UDP has no end of stream).
                (
                    vec![
                        Proc(t.node.child("socat", &[&l_sink, &sink], &[])),
                        Proc(t.node.child("socat", &[&l_rr, &rr], &[])),
                        Proc(t.node.child("socat", &["-T", "2", &l_echo, &echo], &[])),
                    ],
                    Targets {
                        sink: addr(NODE, SOCAT_SINK),
                        rr: addr(NODE, SOCAT_RR),
                        echo: addr(NODE, SOCAT_ECHO),
                    },
                )
            }
        }
    }
}

/// The median of each figure over rounds.
fn median(rounds: &[Figures]) -> Figures {
    fn mid<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v[v.len() / 2]
    }
    Figures {
        bulk1: mid(rounds.iter().map(|f| f.bulk1).collect()),
        bulk16: mid(rounds.iter().map(|f| f.bulk16).collect()),
        failed_streams: rounds.iter().map(|f| f.failed_streams).sum(),
        cps: mid(rounds.iter().map(|f| f.cps).collect()),
        p50: mid(rounds.iter().map(|f| f.p50).collect()),
        p99: mid(rounds.iter().map(|f| f.p99).collect()),
        udp_pps: mid(rounds.iter().map(|f| f.udp_pps).collect()),
    }
}

fn measure(t: &Topology, to: Targets, p: &Profile, received: &AtomicU64) -> Figures {
    let (one, sixteen) = (
        bulk(&t.client, to.sink, 1, p.d, received),
        bulk(&t.client, to.sink, 16, p.d, received),
    );
    Figures {
        bulk1: one.bytes_per_s,
        bulk16: sixteen.bytes_per_s,
        failed_streams: one.failed + sixteen.failed,
        cps: conn_rate(&t.client, to.rr, 8, p.d),
        p50: Duration::ZERO,
        p99: Duration::ZERO,
        udp_pps: udp_rate(&t.client, client_ip(), to.echo, 4, p.d),
    }
    .with_latency(request_latency(&t.client, to.rr, p.latency_n))
}

impl Figures {
    fn with_latency(mut self, (p50, p99): (Duration, Duration)) -> Figures {
        self.p50 = p50;
        self.p99 = p99;
        self
    }
}

fn client_ip() -> std::net::IpAddr {
    CLIENT.parse().unwrap()
}

/// The manifests kproxy reads: three ClusterIP services onto the server.
fn manifests() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("kpx-ubench-")
        .tempdir()
        .unwrap();
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Node\nmetadata: {name: bench-node}\nstatus:\n  addresses: [{type: InternalIP, address: 10.1.1.1}]\n",
    );
    for (name, ip, port, target, proto) in [
        ("sink", SVC_SINK, 80, SINK, "TCP"),
        ("rr", SVC_RR, 80, RR, "TCP"),
        ("echo", SVC_ECHO, 53, ECHO, "UDP"),
    ] {
        write!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  ports: [{{name: p, port: {port}, targetPort: {target}, protocol: {proto}}}]\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: bench\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: p, port: {target}, protocol: {proto}}}]\nendpoints:\n  - addresses: [{SERVER}]\n    conditions: {{ready: true}}\n"
        )
        .unwrap();
    }
    std::fs::write(dir.path().join("bench.yaml"), yaml).unwrap();
    dir
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --benches` runs this without `--bench`: the quick profile.
    let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
    if !nix::unistd::geteuid().is_root() {
        println!("userspace bench: SKIP, needs root (network namespaces)");
        return;
    }
    let profile = if quick {
        Profile {
            d: Duration::from_millis(300),
            latency_n: 200,
            rounds: 1,
        }
    } else {
        Profile {
            d: Duration::from_secs(2),
            latency_n: 3000,
            rounds: 5,
        }
    };
    let t = topology("ubench");
    let received = Arc::new(AtomicU64::new(0));
    let _servers = servers(
        &t.server,
        SERVER.parse().unwrap(),
        &[SERVER.parse().unwrap()],
        received.clone(),
    );
    let dir = manifests();
    let socat = have("socat");
    let mut notes = String::new();
    if !socat {
        notes.push_str("socat is not installed (`apt-get install socat`): no socat row.\n");
    }
    let mut subjects = vec![
        Subject::Direct,
        Subject::Kproxy("splice"),
        Subject::Kproxy("buffered"),
    ];
    if socat {
        subjects.push(Subject::Socat);
    }
    // Rounds interleave the subjects, so a burst of load elsewhere on the machine hits them
    // alike; each figure is the median over the rounds.
    let mut samples: Vec<Vec<Figures>> = vec![Vec::new(); subjects.len()];
    for _ in 0..profile.rounds {
        for (i, subject) in subjects.iter().enumerate() {
            let (_running, to) = subject.start(&t, dir.path());
            common::wait_ready(&t.client, client_ip(), to.sink, to.echo);
            samples[i].push(measure(&t, to, &profile, &received));
        }
    }
    let rows: Vec<(String, Figures)> = subjects
        .iter()
        .zip(samples)
        .map(|(s, f)| (s.name(), median(&f)))
        .collect();
    notes.push_str(&format!(
        "Each figure is the median of {} interleaved rounds; load average at the end: {}.\n",
        profile.rounds,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    ));
    report(&rows, quick, &notes);
}

fn report(rows: &[(String, Figures)], quick: bool, notes: &str) {
    let base = rows[0].1.clone();
    let ratio = |v: f64, b: f64| if b > 0.0 { v / b * 100.0 } else { 0.0 };
    let gbit = |v: f64| v * 8.0 / 1e9;
    let mut out = format!(
        "userspace data path ({} profile; {} CPUs)\n\n| subject | 1 stream Gbit/s | 16 streams Gbit/s | conn/s (1 KiB req/resp) | latency p50 | p99 (added) | UDP round trips/s |\n|---|---|---|---|---|---|---|\n",
        if quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    for (name, f) in rows {
        let added = f.p99.as_secs_f64() - base.p99.as_secs_f64();
        writeln!(
            out,
            "| {name} | {:.2} ({:.0}%) | {:.2} ({:.0}%) | {:.0} ({:.0}%) | {:.0} µs | {:.0} µs ({:+.0} µs) | {:.0} ({:.0}%) |",
            gbit(f.bulk1),
            ratio(f.bulk1, base.bulk1),
            gbit(f.bulk16),
            ratio(f.bulk16, base.bulk16),
            f.cps,
            ratio(f.cps, base.cps),
            f.p50.as_secs_f64() * 1e6,
            f.p99.as_secs_f64() * 1e6,
            added * 1e6,
            f.udp_pps,
            ratio(f.udp_pps, base.udp_pps),
        )
        .unwrap();
    }
    if let (Some(k), Some(s)) = (
        rows.iter().find(|(n, _)| n.contains("splice")),
        rows.iter().find(|(n, _)| n == "socat"),
    ) {
        writeln!(
            out,
            "\nkproxy (splice) vs socat: {:.1}x the connection rate, {:.1}x the 16-stream throughput.",
            k.1.cps / s.1.cps.max(1.0),
            k.1.bulk16 / s.1.bulk16.max(1.0)
        )
        .unwrap();
    }
    for (name, f) in rows.iter().filter(|(_, f)| f.failed_streams > 0) {
        writeln!(
            out,
            "\n**{name}: {} bulk stream(s) never received the server's first byte within 10 s** (the server speaks first: it greets each connection with one byte).",
            f.failed_streams
        )
        .unwrap();
    }
    out.push_str(notes);
    print!("{out}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/kproxy-bench");
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| std::path::PathBuf::from(t).join("kproxy-bench"))
        .unwrap_or(dir);
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("userspace.md"), &out);
    }
}
