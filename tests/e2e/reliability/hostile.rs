//! Guarantee 8, hostile addresses (issue #20, items 10-12; the CVE-2020-8554 and
//! CVE-2020-8558 class): a Service cannot take the node's own addresses, loopback or the
//! special addresses, an endpoint cannot point a service at the node's loopback, and two
//! Services claiming the same frontend get one deterministic winner, the older one, in every
//! mode.
//!
//! The "node" is the node namespace of the standard topology: its own servers (an sshd-like
//! TCP server on its address, loopback-only services) must keep answering the node and the
//! client whatever the Services in the manifests directory claim. `--manifests` has no API
//! server in front of it, so kproxy is the only validator here.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::kproxy::wait_until;
use crate::support::manifests::Port;
use crate::support::netns::Netns;
use crate::support::objects::{Ep, Svc, endpoint_slice};
use crate::support::scenario::{Mode, REQ, Scenario, sock};
use crate::support::topology::{NODE_IP, POD_V4};
use crate::support::traffic::{TcpEcho, tcp_request};

/// A plain HTTP-ish port: 80 → 8080.
const HTTP: Port = Port::tcp("http", 80, 8080);

/// How long one check may take to show the expected answer (rules are already in place when
/// the checks start; this only absorbs a late sync).
const SETTLE: Duration = Duration::from_secs(3);

/// Retries a TCP request from `ns` until it answers `want` or [`SETTLE`] passes; `Err` names
/// what it got instead.
fn expect_answer(ns: &Netns, dst: SocketAddr, want: &str) -> Result<(), String> {
    let mut last: Option<io::Result<String>> = None;
    let ok = wait_until(SETTLE, || {
        let r = tcp_request(ns, dst, REQ);
        let hit = matches!(&r, Ok(id) if id == want);
        last = Some(r);
        hit
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{dst} from {}: expected {want:?}, got {last:?}",
            ns.name()
        ))
    }
}

/// Fails with every problem found, one per line.
fn assert_no_failures(what: &str, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{what}: {} failure(s):\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// For each `(object, field)`, `log` has exactly one line naming both (each refusal is
/// reported once, however many syncs ran); adds a failure for each that does not.
fn reported_once(log: &str, refusals: &[(&str, &str)], failures: &mut Vec<String>) {
    for (object, field) in refusals {
        let n = log
            .lines()
            .filter(|l| l.contains(object) && l.contains(field))
            .count();
        if n != 1 {
            failures.push(format!("{object} {field}: reported {n} times (want 1)"));
        }
    }
}

/// Whether a rule line names the address `ip` itself (`-d IP/32`, `IP:PORT`, `IP . tcp ...`),
/// not merely a string containing it (the iptables tree's `0.0.0.0/0.0.0.15` branches).
fn mentions(line: &str, ip: &str) -> bool {
    line.split(|c: char| c.is_whitespace() || matches!(c, ',' | '{' | '}' | '"'))
        .map(|t| t.trim_end_matches("/32"))
        .map(|t| t.split(':').next().unwrap_or(t))
        .any(|t| t == ip)
}

/// A single-endpoint slice for `service` (namespace `default`): `addr` on port `target`.
fn slice_to(service: &str, addr: &str, port: Port) -> Value {
    endpoint_slice(
        service,
        &format!("{service}-v4"),
        &[Ep::ready(addr)],
        &[port],
    )
}

// --- items 10 and 11: the node's own addresses ------------------------------------------------

/// The node's own servers, each on an address a Service tries to claim.
const SSHD_EXT: u16 = 2222; // externalIP = the node's IP
const UNUSED: u16 = 2224; // no Service uses it: nftables rejected it once a ClusterIP was the node's IP
const SSHD_LB: u16 = 2226; // LoadBalancer ingress IP = the node's IP
const SSHD_CIP: u16 = 2227; // ClusterIP = the node's IP
const SSHD_NP: u16 = 2228; // NodePort outside 30000-32767
const LOOP_EXT: u16 = 2223; // externalIP 127.0.0.1
const LOOP_SECRET: u16 = 2225; // a loopback-only service an endpoint 127.0.0.1 pointed at
const LOOP_CIP: u16 = 2229; // ClusterIP 127.0.0.1
const WILD: u16 = 2230; // externalIPs 0.0.0.0, 255.255.255.255, 224.0.0.1

/// The hostile Services (all in `default`, all pointing at the pod `POD_V4[0]:8080`, which
/// answers "pod", except `to-loopback`) and a good one (`good`, 10.96.1.9:80).
fn hostile_services(s: &Scenario) {
    let port = |name: &'static str, p: u16| Port::tcp(name, p, 8080);
    let np = port("http", 80).with_node_port(SSHD_NP);
    let cases: Vec<(Svc, Port)> = vec![
        (
            Svc::new("ext-on-node", &["10.96.1.1"], &[port("ssh", SSHD_EXT)])
                .external_ips(&[NODE_IP]),
            port("ssh", SSHD_EXT),
        ),
        (
            Svc::new("lb-on-node", &["10.96.1.2"], &[port("ssh", SSHD_LB)])
                .load_balancer(&[NODE_IP], &[]),
            port("ssh", SSHD_LB),
        ),
        (
            Svc::new("cip-on-node", &[NODE_IP], &[port("ssh", SSHD_CIP)]),
            port("ssh", SSHD_CIP),
        ),
        (Svc::new("np-2228", &["10.96.1.4"], &[np]).node_port(), np),
        (
            Svc::new("ext-loopback", &["10.96.1.5"], &[port("l", LOOP_EXT)])
                .external_ips(&["127.0.0.1"]),
            port("l", LOOP_EXT),
        ),
        (
            Svc::new("cip-loopback", &["127.0.0.1"], &[port("l", LOOP_CIP)]),
            port("l", LOOP_CIP),
        ),
        (
            Svc::new("wild", &["10.96.1.8"], &[port("w", WILD)]).external_ips(&[
                "0.0.0.0",
                "255.255.255.255",
                "224.0.0.1",
            ]),
            port("w", WILD),
        ),
        (Svc::new("good", &["10.96.1.9"], &[HTTP]), HTTP),
    ];
    for (svc, p) in &cases {
        let json = svc.json();
        let name = json["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        s.apply(&json);
        s.apply(&slice_to(&name, POD_V4[0], *p));
    }
    // A ClusterIP whose only endpoint is the node's loopback-only service.
    let secret = Port::tcp("http", 80, LOOP_SECRET);
    s.apply(&Svc::new("to-loopback", &["10.96.1.7"], &[secret]).json());
    s.apply(&slice_to("to-loopback", "127.0.0.1", secret));
}

/// Items 10 and 11 in a kernel mode: every node-local server keeps answering the node (and,
/// for the node's address, the client) although Services claim its address and port, the
/// ClusterIP whose endpoint is 127.0.0.1 does not reach the loopback-only service, and each
/// refused address is reported once (Service name and field).
fn node_addresses_stay_the_nodes(mode: Mode) {
    let mut s = Scenario::with_manifests_in(mode);
    s.tcp_server(POD_V4[0], 8080, "pod");
    // The node's own servers: an sshd-like one per claimed port on its address, one on a port
    // nobody claims, loopback-only ones.
    let node_ip = |p: u16| sock(NODE_IP, p);
    let lo = |p: u16| sock("127.0.0.1", p);
    let servers: Vec<(SocketAddr, &str)> = vec![
        (node_ip(SSHD_EXT), "sshd-ext"),
        (node_ip(UNUSED), "node-unused"),
        (node_ip(SSHD_LB), "sshd-lb"),
        (node_ip(SSHD_CIP), "sshd-cip"),
        (node_ip(SSHD_NP), "sshd-np"),
        (lo(LOOP_EXT), "loopback-ext"),
        (lo(LOOP_SECRET), "loopback-secret"),
        (lo(LOOP_CIP), "loopback-cip"),
    ];
    let _node_servers: Vec<TcpEcho> = servers
        .iter()
        .map(|(addr, id)| TcpEcho::start(&s.topo.node, *addr, id))
        .collect();
    hostile_services(&s);
    s.start_kproxy(&[]);
    s.wait_tcp("the good service", sock("10.96.1.9", 80), "pod");

    let mut failures = Vec::new();
    for (addr, id) in &servers {
        // The node reaches every one of its servers.
        if let Err(e) = expect_answer(&s.topo.node, *addr, id) {
            failures.push(e);
        }
        // The client reaches those on the node's address.
        if !addr.ip().is_loopback()
            && let Err(e) = expect_answer(&s.topo.client, *addr, id)
        {
            failures.push(e);
        }
    }
    // The loopback-only service is not exposed through a ClusterIP, and no rule points at it.
    let exposed = tcp_request(&s.topo.client, sock("10.96.1.7", 80), REQ);
    if matches!(&exposed, Ok(id) if id == "loopback-secret") {
        failures.push(format!(
            "10.96.1.7:80 from the client reached the node's loopback-only service: {exposed:?}"
        ));
    }
    let rules = s.save(false);
    for special in ["127.0.0.1", "0.0.0.0", "255.255.255.255", "224.0.0.1"] {
        let hits: Vec<&str> = rules.lines().filter(|l| mentions(l, special)).collect();
        if !hits.is_empty() {
            failures.push(format!("the rules mention {special}: {hits:#?}"));
        }
    }
    // Each refusal is logged once, with the Service's name and the field.
    let log = s.kproxy().stderr();
    reported_once(
        &log,
        &[
            ("default/ext-on-node", "spec.externalIPs[0]"),
            ("default/lb-on-node", "status.loadBalancer.ingress[0].ip"),
            ("default/cip-on-node", "spec.clusterIPs[0]"),
            ("default/np-2228", "spec.ports[0].nodePort"),
            ("default/ext-loopback", "spec.externalIPs[0]"),
            ("default/cip-loopback", "spec.clusterIPs[0]"),
            ("default/wild", "spec.externalIPs[0]"),
            ("default/wild", "spec.externalIPs[1]"),
            ("default/wild", "spec.externalIPs[2]"),
            ("default/to-loopback-v4", "endpoints[0].addresses[0]"),
        ],
        &mut failures,
    );
    s.kproxy().assert_running();
    assert_no_failures(&format!("{mode:?}"), &failures);
    eprintln!(
        "hostile addresses {mode:?}: {} node servers answered the node (and the client on the \
         node's address); 10 refusals reported once each",
        servers.len()
    );
}

#[test]
fn node_addresses_stay_the_nodes_iptables() {
    if crate::support::require_root("node_addresses_stay_the_nodes_iptables") {
        node_addresses_stay_the_nodes(Mode::Iptables);
    }
}

#[test]
fn node_addresses_stay_the_nodes_nftables() {
    if crate::support::require_root("node_addresses_stay_the_nodes_nftables") {
        node_addresses_stay_the_nodes(Mode::Nftables);
    }
}

/// Item 11 in userspace mode, where a frontend is a listening socket and a local route:
/// externalIP 0.0.0.0 must not become a wildcard listener (which took the port on every
/// address of the node), 255.255.255.255 and 224.0.0.1 must not become local routes, and an
/// endpoint 127.0.0.1 must not let the client reach the node's loopback-only service through
/// kproxy's own connection.
#[test]
fn special_addresses_userspace() {
    if !crate::support::require_root("special_addresses_userspace") {
        return;
    }
    let mut s = Scenario::with_manifests().userspace();
    s.tcp_server(POD_V4[0], 8080, "pod");
    let _secret = TcpEcho::start(
        &s.topo.node,
        sock("127.0.0.1", LOOP_SECRET),
        "loopback-secret",
    );
    let w = Port::tcp("w", WILD, 8080);
    s.apply(
        &Svc::new("wild", &["10.96.1.8"], &[w])
            .external_ips(&["0.0.0.0", "255.255.255.255", "224.0.0.1"])
            .json(),
    );
    s.apply(&slice_to("wild", POD_V4[0], w));
    let secret = Port::tcp("http", 80, LOOP_SECRET);
    s.apply(&Svc::new("to-loopback", &["10.96.1.7"], &[secret]).json());
    s.apply(&slice_to("to-loopback", "127.0.0.1", secret));
    s.apply(&Svc::new("good", &["10.96.1.9"], &[HTTP]).json());
    s.apply(&slice_to("good", POD_V4[0], HTTP));
    s.start_kproxy(&[]);
    s.wait_tcp("the good service", sock("10.96.1.9", 80), "pod");
    // Its ClusterIP works: the Service keeps what is valid.
    s.wait_tcp("wild's ClusterIP", sock("10.96.1.8", WILD), "pod");

    let mut failures = Vec::new();
    let listening = s.topo.node.run("ss", &["-H", "-l", "-n", "-t"]);
    for l in listening.lines() {
        if l.contains(&format!("0.0.0.0:{WILD}")) || l.contains(&format!("*:{WILD}")) {
            failures.push(format!("a wildcard listener on port {WILD}: {l}"));
        }
    }
    let routes = s.save(false);
    for special in ["0.0.0.0", "255.255.255.255", "224.0.0.1"] {
        if routes.lines().any(|l| mentions(l, special)) {
            failures.push(format!("a local route for {special}:\n{routes}"));
        }
    }
    let exposed = tcp_request(&s.topo.client, sock("10.96.1.7", 80), REQ);
    if matches!(&exposed, Ok(id) if id == "loopback-secret") {
        failures.push(format!(
            "10.96.1.7:80 from the client reached the node's loopback-only service: {exposed:?}"
        ));
    }
    // The node can still serve the port itself.
    let own = s
        .topo
        .node
        .in_ns(|| std::net::TcpListener::bind(sock(NODE_IP, WILD)));
    if let Err(e) = &own {
        failures.push(format!("the node cannot bind {NODE_IP}:{WILD} itself: {e}"));
    }
    drop(own);
    let log = s.kproxy().stderr();
    reported_once(
        &log,
        &[
            ("default/wild", "spec.externalIPs[0]"),
            ("default/wild", "spec.externalIPs[1]"),
            ("default/wild", "spec.externalIPs[2]"),
            ("default/to-loopback-v4", "endpoints[0].addresses[0]"),
        ],
        &mut failures,
    );
    s.kproxy().assert_running();
    assert_no_failures("userspace", &failures);
}

// --- item 12: conflicting frontends ------------------------------------------------------------

/// An object moved to namespace `ns` and given a creation time.
fn placed(mut object: Value, ns: &str, created: &str) -> Value {
    object["metadata"]["namespace"] = json!(ns);
    object["metadata"]["creationTimestamp"] = json!(created);
    object
}

const OLD: &str = "2020-01-01T00:00:00Z";
const NEW: &str = "2024-01-01T00:00:00Z";

/// One Service (namespace `ns`, created at `created`) and its slice: endpoint `pod:target`.
fn service_in(s: &Scenario, ns: &str, created: &str, svc: Svc, port: Port, pod: &str) {
    let json = svc.json();
    let name = json["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    s.apply(&placed(json, ns, created));
    s.apply(&placed(slice_to(&name, pod, port), ns, created));
}

/// Item 12: pairs of Services claiming the same frontend, the older one sorting last in one
/// pair and first in the other (iptables used to give the frontend to the Service that sorts
/// first, nftables to the one that sorts last). In every mode the older Service wins, the
/// younger keeps its other frontends, and each lost frontend is reported once.
fn conflicting_frontends_older_wins(mode: Mode) {
    let mut s = Scenario::with_manifests_in(mode);
    let (p0, p1, p2, p3) = (POD_V4[0], POD_V4[1], POD_V4[2], POD_V4[3]);
    for (pod, id8080, id8081) in [
        (p0, "api", "np-old"),
        (p1, "evil", "np-new"),
        (p2, "web", "share-old"),
        (p3, "hog", "share-new"),
    ] {
        s.tcp_server(pod, 8080, id8080);
        s.tcp_server(pod, 8081, id8081);
    }
    let https = Port::tcp("https", 443, 8080);
    let alt = Port::tcp("http", 80, 8081);
    // The `kubernetes` Service (older, sorts last) and a younger one whose externalIP:port is
    // its ClusterIP:port.
    service_in(
        &s,
        "zzz-system",
        OLD,
        Svc::new("kubernetes", &["10.96.0.1"], &[https]),
        https,
        p0,
    );
    service_in(
        &s,
        "aaa",
        NEW,
        Svc::new("evil", &["10.96.1.9"], &[https]).external_ips(&["10.96.0.1"]),
        https,
        p1,
    );
    // The same with the older Service sorting first.
    service_in(
        &s,
        "aaa",
        OLD,
        Svc::new("web", &["10.96.1.20"], &[HTTP]),
        HTTP,
        p2,
    );
    service_in(
        &s,
        "zzz",
        NEW,
        Svc::new("hog", &["10.96.1.21"], &[HTTP]).external_ips(&["10.96.1.20"]),
        HTTP,
        p3,
    );
    // Two NodePort Services with the same NodePort.
    let np = alt.with_node_port(30090);
    service_in(
        &s,
        "zzz",
        OLD,
        Svc::new("np-old", &["10.96.1.31"], &[np]).node_port(),
        np,
        p0,
    );
    service_in(
        &s,
        "aaa",
        NEW,
        Svc::new("np-new", &["10.96.1.30"], &[np]).node_port(),
        np,
        p1,
    );
    // Two Services sharing an externalIP:port.
    service_in(
        &s,
        "zzz",
        OLD,
        Svc::new("share-old", &["10.96.1.41"], &[alt]).external_ips(&["10.0.7.7"]),
        alt,
        p2,
    );
    service_in(
        &s,
        "aaa",
        NEW,
        Svc::new("share-new", &["10.96.1.40"], &[alt]).external_ips(&["10.0.7.7"]),
        alt,
        p3,
    );
    s.start_kproxy(&[]);
    s.wait_tcp("the kubernetes Service", sock("10.96.1.21", 80), "hog");

    let mut failures = Vec::new();
    for (dst, want) in [
        // The contested frontends: the older Service's.
        (sock("10.96.0.1", 443), "api"),
        (sock("10.96.1.20", 80), "web"),
        (sock(NODE_IP, 30090), "np-old"),
        (sock("10.0.7.7", 80), "share-old"),
        // The younger Services keep their other frontends.
        (sock("10.96.1.9", 443), "evil"),
        (sock("10.96.1.21", 80), "hog"),
        (sock("10.96.1.30", 80), "np-new"),
        (sock("10.96.1.40", 80), "share-new"),
    ] {
        if let Err(e) = expect_answer(&s.topo.client, dst, want) {
            failures.push(e);
        }
    }
    let log = s.kproxy().stderr();
    reported_once(
        &log,
        &[
            ("aaa/evil", "spec.externalIPs[0]"),
            ("zzz/hog", "spec.externalIPs[0]"),
            ("aaa/np-new", "spec.ports[0].nodePort"),
            ("aaa/share-new", "spec.externalIPs[0]"),
        ],
        &mut failures,
    );
    s.kproxy().assert_running();
    assert_no_failures(&format!("{mode:?}"), &failures);
}

#[test]
fn conflicting_frontends_older_wins_iptables() {
    if crate::support::require_root("conflicting_frontends_older_wins_iptables") {
        conflicting_frontends_older_wins(Mode::Iptables);
    }
}

#[test]
fn conflicting_frontends_older_wins_nftables() {
    if crate::support::require_root("conflicting_frontends_older_wins_nftables") {
        conflicting_frontends_older_wins(Mode::Nftables);
    }
}
