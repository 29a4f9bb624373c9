//! Guarantee 7, security: nothing listens beyond the configured health and metrics addresses
//! (the kernel modes; the userspace mode listens on exactly its service frontends besides);
//! NodePorts are never served on localhost (IPv4 or IPv6) and `route_localnet` stays off;
//! packets in conntrack state INVALID are dropped before they reach a pod in iptables mode and
//! left alone in nftables mode, as upstream; load-balancer source ranges apply to traffic from
//! pods as well. (The DaemonSet's RBAC, list/watch only, is checked by `deploy_manifests.rs`.)

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::support::manifests::Port;
use crate::support::netns::Netns;
use crate::support::objects::{Ep, Svc, endpoint_slice};
use crate::support::scenario::{Mode, PROBE, REQ, Scenario, assert_timed_out, ip, sock};
use crate::support::topology::{NODE_IP, POD_V4, client_v4};
use crate::support::traffic::{tcp_request, tcp_request_from};

const HTTP: Port = Port::tcp("http", 80, 8080);
const DNS: Port = Port::udp("dns", 53, 5353);
const NODE_PORT: u16 = 30080;
const HEALTHZ: &str = "10.0.1.1:10256";
const METRICS: &str = "127.0.0.1:10249";

/// `proto local-address:port` of every listening TCP socket and bound UDP socket in `ns`.
fn listeners(ns: &Netns) -> BTreeSet<String> {
    ns.run("ss", &["-H", "-l", "-n", "-t", "-u"])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(format!("{} {}", f.first()?, f.get(4)?))
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A NodePort service (TCP and UDP) with one endpoint, kproxy started with health and metrics
/// on specific addresses, the first sync done.
fn nodeport_scenario(s: &mut Scenario) {
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.udp_server(POD_V4[0], 5353, "ep1");
    s.apply(
        &Svc::new(
            "np",
            &["10.96.0.10"],
            &[
                HTTP.with_node_port(NODE_PORT),
                DNS.with_node_port(NODE_PORT),
            ],
        )
        .node_port()
        .json(),
    );
    s.apply(&endpoint_slice(
        "np",
        "np-v4",
        &[Ep::ready(POD_V4[0])],
        &[HTTP, DNS],
    ));
    s.start_kproxy(&[
        "--healthz-bind-address",
        HEALTHZ,
        "--metrics-bind-address",
        METRICS,
    ]);
    let np = sock(NODE_IP, NODE_PORT);
    s.wait_tcp("nodeport", np, "ep1");
}

fn listens_only_where_configured(mode: Mode) {
    let mut s = Scenario::with_manifests_in(mode);
    nodeport_scenario(&mut s);
    let seen = listeners(&s.topo.node);
    assert_eq!(
        seen,
        set(&[&format!("tcp {HEALTHZ}"), &format!("tcp {METRICS}")]),
        "{mode:?}: listening sockets in the node namespace"
    );
    localhost_nodeports_not_served(&s);
    s.kproxy().assert_running();
}

/// NodePorts on 127.0.0.1 and ::1 are not forwarded (kproxy has no
/// `--iptables-localhost-nodeports`; upstream's nftables and ipvs modes never do it, and no mode
/// does it for IPv6), and the node's `route_localnet` stays 0.
fn localhost_nodeports_not_served(s: &Scenario) {
    for dst in [sock("127.0.0.1", NODE_PORT), sock("::1", NODE_PORT)] {
        let r = tcp_request(&s.topo.node, dst, REQ);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
            "{dst} from the node: {r:?}"
        );
    }
    assert_eq!(
        s.topo.node.sysctl_get("net.ipv4.conf.all.route_localnet"),
        "0"
    );
}

#[test]
fn listens_only_on_configured_addresses_iptables() {
    if crate::support::require_root("listens_only_on_configured_addresses_iptables") {
        listens_only_where_configured(Mode::Iptables);
    }
}

#[test]
fn listens_only_on_configured_addresses_nftables() {
    if crate::support::require_root("listens_only_on_configured_addresses_nftables") {
        listens_only_where_configured(Mode::Nftables);
    }
}

/// Userspace mode proxies by listening: exactly its frontends (ClusterIP and NodePort, TCP and
/// UDP) besides health and metrics.
#[test]
fn listens_only_on_configured_addresses_userspace() {
    if !crate::support::require_root("listens_only_on_configured_addresses_userspace") {
        return;
    }
    let mut s = Scenario::with_manifests().userspace();
    nodeport_scenario(&mut s);
    let seen = listeners(&s.topo.node);
    let want = set(&[
        &format!("tcp {HEALTHZ}"),
        &format!("tcp {METRICS}"),
        "tcp 10.96.0.10:80",
        "udp 10.96.0.10:53",
        &format!("tcp 0.0.0.0:{NODE_PORT}"),
        &format!("udp {NODE_IP}:{NODE_PORT}"),
    ]);
    assert_eq!(
        seen, want,
        "userspace: listening sockets in the node namespace"
    );
    s.kproxy().assert_running();
}

// --- conntrack INVALID --------------------------------------------------------------------------

/// A TCP segment with SYN and RST both set (conntrack marks it INVALID), from `src` to `dst`,
/// with a correct checksum.
fn invalid_segment(src: Ipv4Addr, dst: SocketAddr) -> Vec<u8> {
    let IpAddr::V4(dst_ip) = dst.ip() else {
        panic!("IPv4 only")
    };
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = 0x02 | 0x04; // SYN | RST
    tcp[14..16].copy_from_slice(&1024u16.to_be_bytes());
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&src.octets());
    add(&dst_ip.octets());
    add(&[0, 6, 0, 20]);
    add(&tcp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let checksum = !(u16::try_from(sum).unwrap_or(0));
    tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
    tcp
}

/// How many SYN+RST segments to port 8080 arrive in `ns` within `within`, counted on a raw
/// socket (which sees every incoming TCP packet) opened before `send` runs.
fn count_arrivals(ns: &Netns, within: Duration, send: impl FnOnce()) -> usize {
    let raw = ns
        .in_ns(|| Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP)))
        .expect("raw socket");
    // std's datagram socket reads any datagram-style fd with recv(2), IP header included.
    let raw = std::net::UdpSocket::from(raw);
    raw.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    send();
    let deadline = Instant::now() + within;
    let mut seen = 0;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        let Ok(n) = raw.recv(&mut buf) else { continue };
        let packet = &buf[..n];
        let ihl = usize::from(packet.first().copied().unwrap_or(0) & 0x0f) * 4;
        let port = packet
            .get(ihl + 2..ihl + 4)
            .map(|p| u16::from_be_bytes([p[0], p[1]]));
        let flags = packet.get(ihl + 13).copied().unwrap_or(0);
        if port == Some(8080) && flags & 0x06 == 0x06 {
            seen += 1;
        }
    }
    seen
}

/// The INVALID-drop rule's packet counter (iptables mode).
fn invalid_drops(s: &Scenario) -> u64 {
    let out = s.topo.node.run(
        "iptables-nft",
        &[
            "-w",
            "-t",
            "filter",
            "-L",
            "KPROXY-FORWARD",
            "-v",
            "-x",
            "-n",
        ],
    );
    out.lines()
        .find(|l| l.contains("INVALID"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .expect("an INVALID rule in KPROXY-FORWARD")
}

fn invalid_state(mode: Mode) {
    let mut s = Scenario::with_manifests_in(mode);
    nodeport_scenario(&mut s);
    let pod = sock(POD_V4[0], 8080);
    let src = match client_v4(0) {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => unreachable!("an IPv4 client address"),
    };
    let segment = invalid_segment(src, pod);
    let before = (mode == Mode::Iptables).then(|| invalid_drops(&s));
    let client = &s.topo.client;
    let arrived = count_arrivals(&s.topo.endpoints, Duration::from_millis(500), || {
        let raw = client
            .in_ns(|| Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP)))
            .expect("raw socket");
        for _ in 0..5 {
            raw.send_to(&segment, &SockAddr::from(pod)).expect("send");
        }
    });
    match mode {
        Mode::Iptables => {
            let dropped = invalid_drops(&s) - before.unwrap_or(0);
            assert_eq!(arrived, 0, "INVALID segments reached the pod");
            assert!(dropped >= 5, "the INVALID rule counted {dropped}");
        }
        // Upstream's nftables mode has no INVALID drop (use --conntrack-tcp-be-liberal): the
        // segments are forwarded like any other.
        Mode::Nftables => assert_eq!(arrived, 5, "segments forwarded in nftables mode"),
    }
    s.kproxy().assert_running();
}

#[test]
fn invalid_conntrack_state_iptables_drops() {
    if crate::support::require_root("invalid_conntrack_state_iptables_drops") {
        invalid_state(Mode::Iptables);
    }
}

#[test]
fn invalid_conntrack_state_nftables_forwards_as_upstream() {
    if crate::support::require_root("invalid_conntrack_state_nftables_forwards_as_upstream") {
        invalid_state(Mode::Nftables);
    }
}

// --- source ranges from pods --------------------------------------------------------------------

fn source_ranges_from_pods(mode: Mode) {
    let mut s = Scenario::with_manifests_in(mode);
    s.tcp_server(POD_V4[0], 8080, "ep1");
    let lb = "10.0.7.50";
    // The client's primary address and one pod may use the LB IP; other pods may not.
    s.apply(
        &Svc::new("lb", &["10.96.0.20"], &[HTTP.with_node_port(NODE_PORT)])
            .load_balancer(&[lb], &["10.0.1.2/32", &format!("{}/32", POD_V4[2])])
            .json(),
    );
    s.apply(&endpoint_slice(
        "lb",
        "lb-v4",
        &[Ep::ready(POD_V4[0])],
        &[HTTP],
    ));
    s.start_kproxy(&[]);
    let dst = sock(lb, 80);
    s.wait_tcp("allowed client", dst, "ep1");
    s.wait_for(
        "allowed pod",
        |t| tcp_request_from(&t.endpoints, Some(ip(POD_V4[2])), dst, PROBE),
        "ep1",
    );
    for pod in [POD_V4[1], POD_V4[3]] {
        let r = tcp_request_from(&s.topo.endpoints, Some(ip(pod)), dst, REQ);
        assert_timed_out(
            &format!("{pod} (not in the source ranges) to the LB IP"),
            &r,
        );
    }
    // A client address outside the ranges is dropped too.
    let r = tcp_request_from(&s.topo.client, Some(client_v4(1)), dst, REQ);
    assert_timed_out("a client outside the source ranges", &r);
    s.kproxy().assert_running();
}

#[test]
fn source_ranges_apply_to_pods_iptables() {
    if crate::support::require_root("source_ranges_apply_to_pods_iptables") {
        source_ranges_from_pods(Mode::Iptables);
    }
}

#[test]
fn source_ranges_apply_to_pods_nftables() {
    if crate::support::require_root("source_ranges_apply_to_pods_nftables") {
        source_ranges_from_pods(Mode::Nftables);
    }
}
