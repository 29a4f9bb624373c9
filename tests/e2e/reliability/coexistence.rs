//! Guarantee 5, coexistence: the rules and tables of other software on the node survive kproxy's
//! start, its syncs, a SIGKILL and restart, and `--cleanup`, unchanged: a CNI's chains
//! (flannel/bridge-plugin style, NAT and filter), Docker's chains, upstream kube-proxy's KUBE-*
//! chains (a node being migrated), in IPv4 and IPv6, and a firewall's own nftables table (with a
//! set and base chains on the same hooks kproxy uses).
//!
//! "Unchanged" is compared on `iptables-nft-save` output with kproxy's own lines and the
//! packet counters left out (traffic moves counters), and on `nft list table` output byte for
//! byte.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::kproxy::KproxyProcess;
use crate::support::manifests::Port;
use crate::support::netns::Netns;
use crate::support::objects::{Ep, Svc, endpoint_slice};
use crate::support::rules::foreign;
use crate::support::scenario::{Mode, Scenario, sock};
use crate::support::topology::POD_V4;

const HTTP: Port = Port::tcp("http", 80, 8080);
const VIP: &str = "10.96.0.10";

/// A CNI (bridge plugin + portmap), Docker and upstream kube-proxy, as `iptables-save` would
/// show them on such a node.
const FOREIGN_V4: &str = "\
*nat
:CNI-HOSTPORT-DNAT - [0:0]
:CNI-3f2a9c1b7e4d5a6f0b1c2d3e - [0:0]
:DOCKER - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-PROXY-CANARY - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A POSTROUTING -s 10.88.0.0/16 -m comment --comment \"name: \\\"cbr0\\\" id: \\\"3f2a9c\\\"\" -j CNI-3f2a9c1b7e4d5a6f0b1c2d3e
-A CNI-3f2a9c1b7e4d5a6f0b1c2d3e -d 10.88.0.0/16 -j ACCEPT
-A CNI-3f2a9c1b7e4d5a6f0b1c2d3e ! -d 224.0.0.0/4 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -m comment --comment \"ns1/svc1:p80\" -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment \"ns1/svc1:p80\" -m tcp -j DNAT --to-destination 10.180.0.1:80
COMMIT
*filter
:CNI-FORWARD - [0:0]
:DOCKER - [0:0]
:DOCKER-USER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-PROXY-CANARY - [0:0]
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment \"CNI firewall plugin rules\" -j CNI-FORWARD
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A CNI-FORWARD -d 10.88.0.0/16 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A CNI-FORWARD -s 10.88.0.0/16 -j ACCEPT
-A DOCKER-USER -j RETURN
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
COMMIT
*mangle
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
";

/// The IPv6 side: a CNI chain and upstream kube-proxy's top-level chains.
const FOREIGN_V6: &str = "\
*nat
:CNI-HOSTPORT-DNAT - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A PREROUTING -j KUBE-SERVICES
-A KUBE-SERVICES -d fd00:30::41/128 -p tcp -m tcp --dport 80 -j DNAT --to-destination [fd00:180::1]:80
COMMIT
*filter
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -j RETURN
COMMIT
";

/// A host firewall's own table: a set, and base chains on the hooks kproxy also uses.
const FIREWALL: &str = "\
table inet host-firewall {
	set blocked {
		type ipv4_addr
		flags interval
		elements = { 203.0.113.0/28, 198.51.100.7 }
	}
	chain input {
		type filter hook input priority filter + 10; policy accept;
		ip saddr @blocked drop
		tcp dport 22 accept comment \"ssh\"
	}
	chain forward {
		type filter hook forward priority filter + 10; policy accept;
		ip saddr @blocked drop
	}
	chain prerouting {
		type nat hook prerouting priority dstnat + 5; policy accept;
		tcp dport 2222 redirect to :22
	}
}
";

fn run_stdin(ns: &Netns, cmd: &[&str], input: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .args(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything that is not kproxy's: both iptables families (nft backend) and the firewall
/// table.
fn snapshot(ns: &Netns) -> String {
    format!(
        "{}\n{}\n{}",
        foreign(&ns.run("iptables-nft-save", &[])),
        foreign(&ns.run("ip6tables-nft-save", &[])),
        ns.run("nft", &["list", "table", "inet", "host-firewall"]),
    )
}

/// kproxy's own state: KPROXY lines (iptables mode) or its tables (nftables mode).
fn kproxy_state(ns: &Netns) -> String {
    let iptables = [
        ns.run("iptables-nft-save", &[]),
        ns.run("ip6tables-nft-save", &[]),
    ]
    .concat();
    let mut own: Vec<&str> = iptables.lines().filter(|l| l.contains("KPROXY")).collect();
    let tables = ns.run("nft", &["list", "tables"]);
    own.extend(tables.lines().filter(|l| l.contains("kproxy")));
    own.join("\n")
}

fn slice(s: &Scenario, pods: &[usize]) {
    let eps: Vec<Ep> = pods.iter().map(|&i| Ep::ready(POD_V4[i])).collect();
    s.apply(&endpoint_slice("web", "web-v4", &eps, &[HTTP]));
}

fn coexistence(mode: Mode) {
    let mut s = Scenario::with_manifests_in(mode);
    let node = &s.topo.node;
    run_stdin(node, &["iptables-nft-restore", "--noflush"], FOREIGN_V4);
    run_stdin(node, &["ip6tables-nft-restore", "--noflush"], FOREIGN_V6);
    run_stdin(node, &["nft", "-f", "-"], FIREWALL);
    let before = snapshot(node);
    for want in [
        "KUBE-SVC-XPGD46QRK7WJZT7O",
        "DOCKER-ISOLATION-STAGE-2",
        "CNI-FORWARD",
        "@blocked",
    ] {
        assert!(before.contains(want), "{want} missing:\n{before}");
    }

    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.tcp_server(POD_V4[1], 8080, "ep2");
    s.apply(&Svc::new("web", &[VIP], &[HTTP]).json());
    slice(&s, &[0]);
    s.start_kproxy(&[]);
    let vip = sock(VIP, 80);
    s.wait_tcp("start", vip, "ep1");
    assert_eq!(
        snapshot(&s.topo.node),
        before,
        "kproxy's start changed foreign state"
    );

    // Syncs: endpoint changes, a new service, a full resync after a restart.
    slice(&s, &[1]);
    s.wait_tcp("sync 1", vip, "ep2");
    s.apply(&Svc::new("other", &["10.96.0.11"], &[HTTP]).json());
    slice(&s, &[0]);
    s.wait_tcp("sync 2", vip, "ep1");
    drop(s.kproxy.take()); // SIGKILL
    s.start_kproxy(&[]);
    slice(&s, &[1]);
    s.wait_tcp("sync after restart", vip, "ep2");
    assert_eq!(
        snapshot(&s.topo.node),
        before,
        "kproxy's syncs changed foreign state"
    );
    assert!(!kproxy_state(&s.topo.node).is_empty());
    drop(s.kproxy.take());

    let manifests = match &s.source {
        crate::support::scenario::Source::Manifests(m) => m.arg(),
        crate::support::scenario::Source::Api(_) => unreachable!("a manifests scenario"),
    };
    let (p, status) = KproxyProcess::run(
        &s.topo.node,
        &[
            "--cleanup",
            "--manifests",
            &manifests,
            "--hostname-override",
            "node-a",
        ],
        Duration::from_secs(30),
    );
    assert!(status.success(), "--cleanup failed:\n{}", p.stderr());
    assert_eq!(
        snapshot(&s.topo.node),
        before,
        "--cleanup changed foreign state"
    );
    let left = kproxy_state(&s.topo.node);
    assert!(left.is_empty(), "--cleanup left kproxy state:\n{left}");
    // Upstream kube-proxy's rules still work: its DNAT is in place for its ClusterIP.
    let save = s.topo.node.run("iptables-nft-save", &["-t", "nat"]);
    assert!(save.contains("--to-destination 10.180.0.1:80"), "{save}");
}

#[test]
fn coexistence_iptables() {
    if crate::support::require_root("coexistence_iptables") {
        coexistence(Mode::Iptables);
    }
}

#[test]
fn coexistence_nftables() {
    if crate::support::require_root("coexistence_nftables") {
        coexistence(Mode::Nftables);
    }
}
