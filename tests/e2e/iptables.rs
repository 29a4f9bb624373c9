//! iptables mode through the real kernel: kproxy programs the node namespace, packets go from the
//! client namespace through the node to echo servers in the endpoints namespace.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::kproxy::{KproxyProcess, wait_until};
use crate::support::manifests::{self, Manifests, Port};
use crate::support::netns::Netns;
use crate::support::require_root;
use crate::support::rules::foreign;
use crate::support::topology::{NODE_IP, NODE_IP6, POD_V4, POD_V6, Topology};
use crate::support::traffic::{TcpEcho, tcp_request};

/// The first sync must land within this.
const SYNC: Duration = Duration::from_secs(10);
/// The per-request timeout while waiting for rules to appear: a SYN sent before the DNAT rule
/// exists is black-holed, and the next probe should follow soon.
const PROBE: Duration = Duration::from_millis(150);
/// How long kproxy's one-shot runs (`--once`, `--cleanup`) may take.
const ONE_SHOT: Duration = Duration::from_secs(20);

const HTTP: Port = Port::tcp("http", 80, 8080);
const DNS: Port = Port::udp("dns", 53, 5353);

/// The flags every test passes, reading objects from `manifests`.
fn base_args(manifests: &Manifests, backend: Backend) -> Vec<String> {
    [
        "--manifests",
        &manifests.arg(),
        "--hostname-override",
        "node-a",
        "--cluster-cidr",
        "10.244.0.0/16,fd00:244::/56",
        "--service-cluster-ip-range",
        "10.96.0.0/12,fd00:96::/112",
        "--healthz-bind-address=",
        "--metrics-bind-address=",
        "--iptables-min-sync-period",
        "100ms",
        // Pinned, so the rules kproxy writes are the ones the test reads back with the same
        // backend's tools, whatever the host's `iptables` alternative points at.
        "--iptables-backend",
        backend.name(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Which iptables backend kproxy is told to use and the test reads back with.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    /// `iptables-nft`, `ip6tables-legacy-save`, …
    fn tool(self, v6: bool, suffix: &str) -> String {
        let base = if v6 { "ip6tables" } else { "iptables" };
        format!("{base}-{}{suffix}", self.name())
    }
}

/// One scenario. Fields drop in order: kproxy first, then the servers, then the namespaces.
struct Scenario {
    kproxy: Option<KproxyProcess>,
    tcp: Vec<TcpEcho>,
    manifests: Manifests,
    topo: Topology,
    backend: Backend,
}

impl Scenario {
    /// [`Scenario::new`] with a chosen iptables backend.
    fn with_backend(backend: Backend) -> Scenario {
        let topo = Topology::new();
        let manifests = Manifests::new();
        manifests.node("node-a", &[NODE_IP, NODE_IP6]);
        Scenario {
            kproxy: None,
            tcp: Vec::new(),
            manifests,
            topo,
            backend,
        }
    }

    /// A TCP echo server on `ip:port` in the endpoints namespace answering `identity`.
    fn tcp_server(&mut self, ip: &str, port: u16, identity: &str) {
        let addr = SocketAddr::new(ip.parse().expect("pod ip"), port);
        self.tcp
            .push(TcpEcho::start(&self.topo.endpoints, addr, identity));
    }

    /// Starts kproxy in the node namespace with the standard flags.
    fn start_kproxy(&mut self) {
        let args = base_args(&self.manifests, self.backend);
        self.kproxy = Some(KproxyProcess::start(&self.topo.node, &refs(&args)));
    }

    fn kproxy(&mut self) -> &mut KproxyProcess {
        self.kproxy.as_mut().expect("kproxy started")
    }

    /// `iptables-save` (or `ip6tables-save`) of the scenario's backend in the node namespace.
    fn save(&self, v6: bool) -> String {
        save(&self.topo.node, self.backend, v6)
    }

    /// The scenario's `iptables` (or `ip6tables`) in the node namespace.
    fn iptables(&self, v6: bool, args: &[&str]) -> String {
        self.topo.node.run(&self.backend.tool(v6, ""), args)
    }

    /// Waits until `request` returns `want`, failing the test (with kproxy's logs) after `SYNC`.
    fn wait_for(
        &mut self,
        what: &str,
        mut request: impl FnMut(&Topology) -> io::Result<String>,
        want: &str,
    ) {
        let start = Instant::now();
        let mut last = None;
        let ok = wait_until(SYNC, || {
            let r = request(&self.topo);
            let hit = matches!(&r, Ok(id) if id == want);
            last = Some(r);
            hit
        });
        if !ok {
            self.kproxy().assert_running();
            panic!("{what}: never answered {want:?} within {SYNC:?}; last result {last:?}");
        }
        eprintln!("{what}: answered after {:?}", start.elapsed());
    }
}

fn save(ns: &Netns, backend: Backend, v6: bool) -> String {
    ns.run(&backend.tool(v6, "-save"), &[])
}

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("ip"), port)
}

/// After the first sync the chains and jumps are in both families, and a dry run against the live
/// kernel finds nothing to change: every rendered rule survives iptables-save byte for byte.
#[test]
fn rules_round_trip_through_iptables_save() {
    if require_root("rules_round_trip_through_iptables_save") {
        round_trip(Backend::Nft);
    }
}

/// [`rules_round_trip_through_iptables_save`] with iptables-legacy, whose save output is
/// printed by different code (libiptc, not the nft translation).
#[test]
fn rules_round_trip_through_iptables_legacy_save() {
    if require_root("rules_round_trip_through_iptables_legacy_save") {
        round_trip(Backend::Legacy);
    }
}

fn round_trip(backend: Backend) {
    let mut s = Scenario::with_backend(backend);
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.tcp_server(POD_V6[0], 8080, "v6-ep1");
    s.manifests
        .service("dual", &["10.96.0.30", "fd00:96::30"], &[HTTP, DNS]);
    s.manifests
        .endpoint_slice("dual", "dual-v4", &[POD_V4[0], POD_V4[1]], &[HTTP, DNS]);
    s.manifests
        .endpoint_slice("dual", "dual-v6", &[POD_V6[0]], &[HTTP, DNS]);
    s.manifests.service("empty", &["10.96.0.20"], &[HTTP]);
    s.start_kproxy();
    let vip6 = sock("fd00:96::30", 80);
    s.wait_for(
        "[fd00:96::30]:80",
        |t| tcp_request(&t.client, vip6, PROBE),
        "v6-ep1",
    );

    for v6 in [false, true] {
        let text = s.save(v6);
        for want in [
            ":KPROXY-SERVICES",
            ":KPROXY-POSTROUTING",
            "-A PREROUTING -j KPROXY-SERVICES",
            "-A OUTPUT -j KPROXY-SERVICES",
            "-A POSTROUTING -j KPROXY-POSTROUTING",
            "-A FORWARD -j KPROXY-FORWARD",
            "-A INPUT -j KPROXY-NODEPORTS",
            "-A FORWARD -m conntrack --ctstate NEW -j KPROXY-SERVICES",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(want)),
                "{} lacks {want:?}:\n{text}",
                backend.tool(v6, "-save")
            );
        }
    }

    let mut args = base_args(&s.manifests, backend);
    args.extend(["--once".to_string(), "--dry-run".to_string()]);
    let live = [s.save(false), s.save(true)];
    let (dry, status) = KproxyProcess::run(&s.topo.node, &refs(&args), ONE_SHOT);
    let out = dry.stdout();
    assert!(
        status.success() && out.contains("no changes"),
        "kproxy --once --dry-run ({status}) wants changes against rules it wrote itself.\n\
         stdout:\n{out}\nstderr:\n{}\niptables-save:\n{}\nip6tables-save:\n{}",
        dry.stderr(),
        live[0],
        live[1]
    );
    assert_eq!(
        [
            without_counters(&s.save(false)),
            without_counters(&s.save(true))
        ],
        [without_counters(&live[0]), without_counters(&live[1])],
        "--dry-run changed the rules"
    );

    // The comparison is real: a rule removed behind kproxy's back shows up in the diff.
    s.iptables(true, &["-t", "filter", "-D", "KPROXY-FORWARD", "1"]);
    let (dry, status) = KproxyProcess::run(&s.topo.node, &refs(&args), ONE_SHOT);
    let out = dry.stdout();
    assert!(
        status.success() && !out.contains("no changes") && out.contains("KPROXY-FORWARD"),
        "kproxy --once --dry-run ({status}) missed a deleted rule:\n{out}\nstderr:\n{}",
        dry.stderr()
    );
    s.kproxy().assert_running();
}

/// A first sync that creates more new chains than the iptables mode stages at once
/// (`STAGE_MIN`, 500) runs on iptables-nft as two restores: the new service chains, then the
/// dispatch tree that links them in (`modes/iptables/README.md`). The dry run says so, the first
/// and the last service answer through the real kernel, and a dry run afterwards finds nothing
/// to change.
#[test]
fn a_first_sync_of_many_services_is_staged_and_serves() {
    if !require_root("a_first_sync_of_many_services_is_staged_and_serves") {
        return;
    }
    let mut s = Scenario::with_backend(Backend::Nft);
    s.tcp_server(POD_V4[0], 8080, "ep1");
    let n = 600;
    let ip = |i: usize| format!("10.96.{}.{}", 10 + i / 200, 1 + i % 200);
    let docs: Vec<String> = (0..n)
        .flat_map(|i| {
            let name = format!("many-{i}");
            [
                manifests::service(&name, &[&ip(i)], &[HTTP]),
                manifests::endpoint_slice(&name, &format!("{name}-a"), &[POD_V4[0]], &[HTTP]),
            ]
        })
        .collect();
    // One file, written before kproxy starts: its first sync sees every service.
    s.manifests.write("many", &docs.join("---\n"));

    let mut args = base_args(&s.manifests, Backend::Nft);
    args.extend(["--once".to_string(), "--dry-run".to_string()]);
    let (dry, status) = KproxyProcess::run(&s.topo.node, &refs(&args), ONE_SHOT);
    let out = dry.stdout();
    assert!(
        status.success() && out.contains("new chains are created first"),
        "the first sync's plan is not staged ({status}):\n{}\nstderr:\n{}",
        out.lines().take(20).collect::<Vec<_>>().join("\n"),
        dry.stderr()
    );

    s.start_kproxy();
    for i in [0, n - 1] {
        let vip = sock(&ip(i), 80);
        s.wait_for(&ip(i), |t| tcp_request(&t.client, vip, PROBE), "ep1");
    }
    let text = s.save(false);
    let service_chains = text
        .lines()
        .filter(|l| l.starts_with(":KPROXY-SVC-"))
        .count();
    assert!(service_chains >= n, "{service_chains} service chains");
    assert!(text.contains(":KPROXY-DST-"), "no dispatch tree:\n{text}");

    let (dry, status) = KproxyProcess::run(&s.topo.node, &refs(&args), ONE_SHOT);
    let out = dry.stdout();
    assert!(
        status.success() && out.contains("no changes"),
        "kproxy --once --dry-run ({status}) wants changes after a staged first sync:\n{}",
        out.lines().take(40).collect::<Vec<_>>().join("\n")
    );
    s.kproxy().assert_running();
}

/// iptables-save output without comment lines and counters.
fn without_counters(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(" [").next().unwrap_or(l).to_string())
        .collect()
}

/// `--cleanup` removes every KPROXY chain and jump, and leaves other software's rules exactly as
/// they were.
#[test]
fn cleanup_removes_only_kproxy_rules() {
    if require_root("cleanup_removes_only_kproxy_rules") {
        cleanup(Backend::Nft);
    }
}

/// [`cleanup_removes_only_kproxy_rules`] with iptables-legacy.
#[test]
fn cleanup_removes_only_kproxy_rules_legacy() {
    if require_root("cleanup_removes_only_kproxy_rules_legacy") {
        cleanup(Backend::Legacy);
    }
}

fn cleanup(backend: Backend) {
    let mut s = Scenario::with_backend(backend);
    // Foreign rules in every table kproxy writes, both families, some in built-in chains.
    for (v6, cidr) in [(false, "10.99.0.0/16"), (true, "fd00:99::/64")] {
        for table in ["nat", "filter"] {
            s.iptables(v6, &["-t", table, "-N", "CNI-TEST"]);
            s.iptables(
                v6,
                &["-t", table, "-A", "CNI-TEST", "-s", cidr, "-j", "RETURN"],
            );
            s.iptables(v6, &["-t", table, "-A", "CNI-TEST", "-j", "RETURN"]);
        }
        s.iptables(v6, &["-t", "nat", "-A", "POSTROUTING", "-j", "CNI-TEST"]);
        s.iptables(v6, &["-t", "filter", "-A", "FORWARD", "-j", "CNI-TEST"]);
    }
    let before = [foreign(&s.save(false)), foreign(&s.save(true))];
    for text in &before {
        assert!(
            text.contains(":CNI-TEST"),
            "foreign chains missing:\n{text}"
        );
    }

    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.manifests
        .service("dual", &["10.96.0.30", "fd00:96::30"], &[HTTP]);
    s.manifests
        .endpoint_slice("dual", "dual-v4", &[POD_V4[0]], &[HTTP]);
    s.manifests.service("empty", &["10.96.0.20"], &[HTTP]);
    s.start_kproxy();
    let vip = sock("10.96.0.30", 80);
    s.wait_for(
        "10.96.0.30:80",
        |t| tcp_request(&t.client, vip, PROBE),
        "ep1",
    );
    assert!(
        s.save(true).contains("KPROXY-SERVICES"),
        "no IPv6 rules after the first sync"
    );
    drop(s.kproxy.take());

    let mut args = base_args(&s.manifests, backend);
    args.push("--cleanup".to_string());
    let (cleanup, status) = KproxyProcess::run(&s.topo.node, &refs(&args), ONE_SHOT);
    assert!(
        status.success(),
        "kproxy --cleanup failed ({status}):\n{}",
        cleanup.stderr()
    );
    for (i, v6) in [false, true].into_iter().enumerate() {
        let after = s.save(v6);
        assert!(
            !after.contains("KPROXY"),
            "KPROXY left after --cleanup:\n{after}"
        );
        assert_eq!(
            foreign(&after),
            before[i],
            "--cleanup changed foreign rules ({})",
            if v6 { "ip6tables" } else { "iptables" }
        );
    }
}

/// Overlapping pod and service CIDRs are refused at start-up, before any rule is written.
#[test]
fn overlapping_cidrs_are_refused() {
    if !require_root("overlapping_cidrs_are_refused") {
        return;
    }
    let node = Netns::new("node");
    let manifests = Manifests::new();
    manifests.node("node-a", &[NODE_IP]);
    let args = [
        "--manifests",
        &manifests.arg(),
        "--hostname-override",
        "node-a",
        "--cluster-cidr",
        "10.0.0.0/8",
        "--service-cluster-ip-range",
        "10.96.0.0/12",
        "--healthz-bind-address=",
        "--metrics-bind-address=",
    ];
    let (p, status) = KproxyProcess::run(&node, &args, ONE_SHOT);
    let stderr = p.stderr();
    assert!(
        !status.success(),
        "kproxy accepted overlapping CIDRs; stderr:\n{stderr}"
    );
    for want in ["10.0.0.0/8", "10.96.0.0/12", "overlap"] {
        assert!(stderr.contains(want), "stderr lacks {want:?}:\n{stderr}");
    }
    for v6 in [false, true] {
        let text = save(&node, Backend::Nft, v6) + &save(&node, Backend::Legacy, v6);
        assert!(
            !text.contains("KPROXY"),
            "rules written despite the refusal:\n{text}"
        );
    }
}
