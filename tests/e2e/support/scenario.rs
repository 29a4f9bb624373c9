//! One scenario: the [`Topology`], a source of objects (a manifests directory or the fake API
//! server listening inside the node namespace), echo servers in the endpoints namespace, and
//! kproxy (iptables or nftables mode, see [`Mode`]) in the node namespace. Fields drop in order: kproxy first, then the
//! servers, the source, and the namespaces last.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::fake_apiserver::FakeApiServer;
use super::kproxy::{KproxyProcess, wait_until};
use super::manifests::{Manifests, object_file};
use super::objects;
use super::topology::{NODE_IP, NODE_IP6, Topology};
use super::traffic::{TcpEcho, UdpEcho, tcp_request};

/// The first sync (and every later convergence) must land within this.
pub(crate) const SYNC: Duration = Duration::from_secs(10);
/// A per-request timeout: everything is local, so a working path answers in microseconds.
pub(crate) const REQ: Duration = Duration::from_millis(500);
/// The per-request timeout while waiting for rules to appear: a SYN sent before the DNAT rule
/// exists is black-holed, and the next probe should follow soon.
pub(crate) const PROBE: Duration = Duration::from_millis(150);
/// How long a connection that is dropped is given before it counts as dropped.
pub(crate) const DROPPED: Duration = Duration::from_millis(700);

/// The node's name (the kproxy node).
pub(crate) const NODE: &str = "node-a";
/// The node every test's kproxy is: its name and the cluster's pod and service ranges.
pub(crate) const NODE_ARGS: &[&str] = &[
    "--hostname-override",
    NODE,
    "--cluster-cidr",
    "10.244.0.0/16,fd00:244::/56",
    "--service-cluster-ip-range",
    "10.96.0.0/12,fd00:96::/112",
];
/// Another node's name (endpoints there are not local).
pub(crate) const OTHER_NODE: &str = "node-b";

/// The kernel mode kproxy runs in (`--proxy-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `--proxy-mode iptables` with the nft backend.
    Iptables,
    /// `--proxy-mode nftables`.
    Nftables,
}

/// kproxy's flags in ipvs mode ([`Scenario::with_manifests_ipvs`]; only inside the IPVS lab
/// guest, `tests/ipvs-lab`): a short sync period, since graceful termination polls draining
/// real servers on each sync.
const IPVS_ARGS: &[&str] = &["--proxy-mode", "ipvs", "--ipvs-sync-period", "2s"];

/// kproxy's flags in userspace mode ([`Scenario::userspace`]).
const USERSPACE_ARGS: &[&str] = &[
    "--proxy-mode",
    "userspace",
    "--iptables-min-sync-period",
    "100ms",
];

impl Mode {
    /// The mode's own flags: `--proxy-mode` and its min-sync-period (plus the iptables backend).
    fn args(self) -> &'static [&'static str] {
        match self {
            Mode::Iptables => &[
                "--proxy-mode",
                "iptables",
                "--iptables-min-sync-period",
                "100ms",
                "--iptables-backend",
                "nft",
            ],
            Mode::Nftables => &[
                "--proxy-mode",
                "nftables",
                "--nftables-min-sync-period",
                "100ms",
            ],
        }
    }
}

/// Where kproxy reads Services, EndpointSlices and the Node from.
pub(crate) enum Source {
    /// `--manifests DIR`.
    Manifests(Manifests),
    /// `--master http://127.0.0.1:PORT`, the fake API server listening inside the node namespace.
    Api(FakeApiServer),
}

impl Source {
    /// Creates or replaces an object (see [`objects`]).
    pub(crate) fn apply(&self, object: &Value) {
        match self {
            Source::Manifests(m) => m.object(object),
            Source::Api(api) => {
                api.apply(object.clone());
            }
        }
    }

    /// Deletes an object of `kind` (`Service`, `EndpointSlice`, `Node`) named `name`.
    pub(crate) fn delete(&self, kind: &str, name: &str) {
        match self {
            Source::Manifests(m) => m.remove(&object_file(&serde_json::json!({
                "kind": kind,
                "metadata": {"name": name},
            }))),
            Source::Api(api) => {
                api.delete(kind, super::manifests::NAMESPACE, name)
                    .unwrap_or_else(|| panic!("no {kind} {name} to delete"));
            }
        }
    }

    /// The manifests directory (panics for an API source).
    pub(crate) fn manifests(&self) -> &Manifests {
        match self {
            Source::Manifests(m) => m,
            Source::Api(_) => panic!("this scenario reads the API, not manifests"),
        }
    }

    /// The fake API server (panics for a manifests source).
    pub(crate) fn api(&self) -> &FakeApiServer {
        match self {
            Source::Api(api) => api,
            Source::Manifests(_) => panic!("this scenario reads manifests, not the API"),
        }
    }

    fn args(&self) -> Vec<String> {
        match self {
            Source::Manifests(m) => vec!["--manifests".into(), m.arg()],
            Source::Api(api) => vec!["--master".into(), api.url()],
        }
    }
}

/// One scenario. See the module documentation.
pub(crate) struct Scenario {
    pub(crate) mode: Mode,
    /// kproxy runs in ipvs mode instead of `mode` (the IPVS lab guest).
    ipvs: bool,
    /// kproxy runs in userspace mode instead of `mode` ([`Scenario::userspace`]).
    userspace: bool,
    /// iptables mode uses the legacy backend ([`Scenario::legacy_iptables`]).
    legacy: bool,
    /// Extra environment for kproxy ([`Scenario::env`]).
    env: Vec<(String, String)>,
    /// An open-file limit for kproxy ([`Scenario::nofile`]).
    nofile: Option<u64>,
    pub(crate) kproxy: Option<KproxyProcess>,
    tcp: Vec<TcpEcho>,
    udp: BTreeMap<String, UdpEcho>,
    pub(crate) source: Source,
    pub(crate) topo: Topology,
}

impl Scenario {
    /// The topology and a manifests directory holding the Node `node-a` (iptables mode).
    pub(crate) fn with_manifests() -> Scenario {
        Scenario::with_manifests_in(Mode::Iptables)
    }

    /// The topology and a manifests directory holding the Node `node-a`, for kproxy in `mode`.
    pub(crate) fn with_manifests_in(mode: Mode) -> Scenario {
        let topo = Topology::new();
        let mut s = Scenario::finish(Source::Manifests(Manifests::new()), topo);
        s.mode = mode;
        s
    }

    /// The topology and a manifests directory holding the Node `node-a`, for kproxy in ipvs
    /// mode (needs a kernel with IPVS: the lab guest of `tests/ipvs-lab`).
    pub(crate) fn with_manifests_ipvs() -> Scenario {
        let mut s = Scenario::with_manifests();
        s.ipvs = true;
        s
    }

    /// The topology and the fake API server, listening on 127.0.0.1 inside the node namespace,
    /// holding the Node `node-a`.
    pub(crate) fn with_api() -> Scenario {
        let topo = Topology::new();
        let listener = topo
            .node
            .in_ns(|| std::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the fake API server inside the node namespace");
        Scenario::finish(Source::Api(FakeApiServer::start_on(listener)), topo)
    }

    fn finish(source: Source, topo: Topology) -> Scenario {
        source.apply(&objects::node(NODE, &[NODE_IP, NODE_IP6], None));
        Scenario {
            mode: Mode::Iptables,
            ipvs: false,
            userspace: false,
            legacy: false,
            env: Vec::new(),
            nofile: None,
            kproxy: None,
            tcp: Vec::new(),
            udp: BTreeMap::new(),
            source,
            topo,
        }
    }

    /// From now on [`Scenario::start_kproxy`] runs kproxy in userspace mode; [`Scenario::save`]
    /// then lists kproxy's local routes.
    pub(crate) fn userspace(mut self) -> Scenario {
        self.userspace = true;
        self
    }

    /// From now on iptables mode uses `--iptables-backend legacy` (x_tables and the xtables
    /// lock), and [`Scenario::save`] reads `iptables-legacy-save`.
    pub(crate) fn legacy_iptables(mut self) -> Scenario {
        self.legacy = true;
        self
    }

    /// Sets an environment variable for every kproxy this scenario starts.
    pub(crate) fn env(mut self, key: &str, value: &str) -> Scenario {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// From now on every kproxy this scenario starts runs with this open-file limit.
    pub(crate) fn nofile(mut self, limit: u64) -> Scenario {
        self.nofile = Some(limit);
        self
    }

    /// Creates or replaces an object.
    pub(crate) fn apply(&self, object: &Value) {
        self.source.apply(object);
    }

    /// A TCP echo server on `ip:port` in the endpoints namespace answering `identity`.
    pub(crate) fn tcp_server(&mut self, ip: &str, port: u16, identity: &str) {
        let addr = SocketAddr::new(ip.parse().expect("pod ip"), port);
        self.tcp
            .push(TcpEcho::start(&self.topo.endpoints, addr, identity));
    }

    /// A TCP echo server answering `IDENTITY from PEER-IP`.
    pub(crate) fn tcp_server_reporting_peer(&mut self, ip: &str, port: u16, identity: &str) {
        let addr = SocketAddr::new(ip.parse().expect("pod ip"), port);
        self.tcp.push(TcpEcho::start_reporting_peer(
            &self.topo.endpoints,
            addr,
            identity,
        ));
    }

    /// A UDP echo server on `ip:port` in the endpoints namespace answering `identity`.
    pub(crate) fn udp_server(&mut self, ip: &str, port: u16, identity: &str) {
        let addr = SocketAddr::new(ip.parse().expect("pod ip"), port);
        let server = UdpEcho::start(&self.topo.endpoints, addr, identity);
        self.udp.insert(identity.to_string(), server);
    }

    /// Stops the UDP echo server `identity` (its pod is gone).
    pub(crate) fn stop_udp_server(&mut self, identity: &str) {
        self.udp
            .remove(identity)
            .expect("a UDP server by that name");
    }

    /// Starts kproxy (in the scenario's [`Mode`]) in the node namespace with the standard flags
    /// plus `extra`. A flag in `extra` replaces the standard flag of the same name (so a test can
    /// bind `--metrics-bind-address` where the default disables it).
    pub(crate) fn start_kproxy(&mut self, extra: &[&str]) {
        self.kproxy = Some(self.spawn_kproxy(extra));
    }

    /// A kproxy started as [`Scenario::start_kproxy`] starts one, which the scenario does not
    /// keep: a second instance in the same namespace (a rolling update's surge pod).
    pub(crate) fn spawn_kproxy(&self, extra: &[&str]) -> KproxyProcess {
        let mut extra: Vec<&str> = extra.to_vec();
        if self.legacy {
            extra.extend(["--iptables-backend", "legacy"]);
        }
        let mut args = self.source.args();
        args.extend(
            NODE_ARGS
                .iter()
                .chain(&["--healthz-bind-address=", "--metrics-bind-address="])
                .chain(if self.ipvs {
                    IPVS_ARGS
                } else if self.userspace {
                    USERSPACE_ARGS
                } else {
                    self.mode.args()
                })
                .map(|s| s.to_string()),
        );
        let mut args = without_flags_of(args, &extra);
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        KproxyProcess::start_limited(&self.topo.node, &refs, &env, self.nofile)
    }

    /// The running kproxy.
    pub(crate) fn kproxy(&mut self) -> &mut KproxyProcess {
        self.kproxy.as_mut().expect("kproxy started")
    }

    /// The rules of one family in the node namespace: `iptables-nft-save` (or
    /// `ip6tables-nft-save`) in iptables mode, `nft list table ip[6] kproxy` in nftables mode,
    /// `ipvsadm -Ln` (both families) in ipvs mode.
    pub(crate) fn save(&self, v6: bool) -> String {
        if self.ipvs {
            // Empty until kproxy has created virtual servers.
            let out = self.topo.node.exec("ipvsadm", &["-Ln"]);
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        if self.userspace {
            let family = if v6 { "-6" } else { "-4" };
            return self.topo.node.run(
                "ip",
                &[family, "route", "show", "table", "local", "proto", "201"],
            );
        }
        if self.mode == Mode::Nftables {
            let family = if v6 { "ip6" } else { "ip" };
            // Empty until kproxy has created the table.
            let out = self
                .topo
                .node
                .exec("nft", &["list", "table", family, "kproxy"]);
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        let tool = match (v6, self.legacy) {
            (false, false) => "iptables-nft-save",
            (true, false) => "ip6tables-nft-save",
            (false, true) => "iptables-legacy-save",
            (true, true) => "ip6tables-legacy-save",
        };
        self.topo.node.run(tool, &[])
    }

    /// Waits until `request` returns `want`, failing the test (with kproxy's logs) after `SYNC`.
    pub(crate) fn wait_for(
        &mut self,
        what: &str,
        mut request: impl FnMut(&Topology) -> io::Result<String>,
        want: &str,
    ) {
        self.wait_for_result(what, |t| request(t), |r| matches!(r, Ok(id) if id == want));
    }

    /// Waits until a TCP request from the client's primary address to `dst` answers `want`.
    pub(crate) fn wait_tcp(&mut self, what: &str, dst: SocketAddr, want: &str) {
        self.wait_for(what, |t| tcp_request(&t.client, dst, PROBE), want);
    }

    /// Waits until `request`'s result satisfies `accept`, failing the test (with kproxy's logs)
    /// after `SYNC`.
    pub(crate) fn wait_for_result(
        &mut self,
        what: &str,
        mut request: impl FnMut(&Topology) -> io::Result<String>,
        accept: impl Fn(&io::Result<String>) -> bool,
    ) {
        self.wait_for_result_within(SYNC, what, &mut request, accept);
    }

    /// [`Scenario::wait_for_result`] with a chosen bound.
    pub(crate) fn wait_for_result_within(
        &mut self,
        within: Duration,
        what: &str,
        mut request: impl FnMut(&Topology) -> io::Result<String>,
        accept: impl Fn(&io::Result<String>) -> bool,
    ) {
        let start = Instant::now();
        let mut last = None;
        let ok = wait_until(within, || {
            let r = request(&self.topo);
            let hit = accept(&r);
            last = Some(r);
            hit
        });
        if !ok {
            self.kproxy().assert_running();
            panic!("{what}: no acceptable answer within {within:?}; last result {last:?}");
        }
        eprintln!("{what}: answered after {:?}", start.elapsed());
    }

    /// Waits until the rules of one family satisfy `pred` (polling the rules spends no ICMP
    /// budget, unlike probing a rejecting service).
    pub(crate) fn wait_rules(&mut self, what: &str, v6: bool, pred: impl Fn(&str) -> bool) {
        let ok = wait_until(SYNC, || pred(&self.save(v6)));
        if !ok {
            self.kproxy().assert_running();
            panic!(
                "{what}: rules never matched within {SYNC:?}:\n{}",
                self.save(v6)
            );
        }
    }
}

/// `args` without the flags (`--name value` or `--name=value`) that `extra` sets again.
fn without_flags_of(args: Vec<String>, extra: &[&str]) -> Vec<String> {
    let name = |a: &str| a.split('=').next().unwrap_or(a).to_string();
    let replaced: Vec<String> = extra
        .iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| name(a))
        .collect();
    let mut out = Vec::new();
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        if a.starts_with("--") && replaced.contains(&name(&a)) {
            if !a.contains('=') {
                args.next(); // its value
            }
            continue;
        }
        out.push(a);
    }
    out
}

/// `ip:port`.
pub(crate) fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("ip"), port)
}

/// An address literal.
pub(crate) fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// Asserts `seen` holds exactly `identities`, each at least `min` times, and nothing else.
pub(crate) fn assert_spread(seen: &BTreeMap<String, usize>, identities: &[&str], min: usize) {
    let keys: Vec<&str> = seen.keys().map(String::as_str).collect();
    let mut want = identities.to_vec();
    want.sort_unstable();
    assert_eq!(keys, want, "responses: {seen:?}");
    for id in identities {
        assert!(
            seen[*id] >= min,
            "{id} answered fewer than {min} times: {seen:?}"
        );
    }
}

/// Asserts a request timed out (the packets were dropped or black-holed): not refused, not
/// answered.
pub(crate) fn assert_timed_out(what: &str, result: &io::Result<String>) {
    match result {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) => {}
        other => panic!("{what}: expected a timeout (dropped), got {other:?}"),
    }
}
