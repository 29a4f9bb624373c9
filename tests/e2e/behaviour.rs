//! Service behaviours (docs/semantics.md) with real packets, in both kernel modes: NodePorts,
//! externalIPs, load-balancer source ranges, session affinity, traffic policies, terminating
//! endpoints, masquerading, hairpin, topology hints and IPv6.
//!
//! Each behaviour is a function of the [`Mode`]; [`both_modes!`] turns it into a module holding
//! two tests, `NAME::iptables` and `NAME::nftables`. Where the modes differ by design
//! (upstream's nftables-only differences, docs/semantics.md "Where the modes differ") the
//! function says so where it branches.
//!
//! Every test builds its own namespaces ([`Scenario`]); kproxy reads manifests. Endpoints on
//! `node-a` are local to kproxy's node, endpoints on `node-b` are not (all pods actually live in
//! the one endpoints namespace). Echo servers that report the peer address show whether the
//! node masqueraded a connection: masqueraded traffic arrives from the node's address on the
//! pods' link, 10.0.2.1.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::support::family::Fam;
use crate::support::kproxy::wait_until;
use crate::support::manifests::Port;
use crate::support::objects::{Ep, Svc, endpoint_slice, node, node_with_pod_cidrs};
use crate::support::scenario::{
    DROPPED, Mode, NODE, OTHER_NODE, PROBE, REQ, SYNC, Scenario, assert_spread, assert_timed_out,
    ip, sock,
};
use crate::support::topology::{NODE_IP, NODE_IP6, POD_V4, POD_V6, client_v4, client_v6};
use crate::support::traffic::{
    assert_tcp_refused, split_peer, tally, tcp_request, tcp_request_from, udp_request,
};

/// `both_modes!(NAME)` declares `mod NAME` with the tests `iptables` and `nftables`, each running
/// the function `NAME(Mode)`. `both_modes!(NAME, nftables: #[ignore = "why"])` puts the
/// attribute on the nftables test only.
macro_rules! both_modes {
    ($name:ident $(, nftables: #[$nft:meta])?) => {
        mod $name {
            use crate::support::scenario::Mode;

            #[test]
            fn iptables() {
                if crate::support::require_root(concat!(stringify!($name), "::iptables")) {
                    super::$name(Mode::Iptables);
                }
            }

            #[test]
            $(#[$nft])?
            fn nftables() {
                if crate::support::require_root(concat!(stringify!($name), "::nftables")) {
                    super::$name(Mode::Nftables);
                }
            }
        }
    };
}

const HTTP: Port = Port::tcp("http", 80, 8080);
const NODE_PORT: u16 = 30080;
/// HTTP with NodePort 30080.
const HTTP_NP: Port = HTTP.with_node_port(NODE_PORT);

fn eps_on(addrs: &[&str], node: &str) -> Vec<Ep> {
    addrs.iter().map(|a| Ep::ready(a).on(node)).collect()
}

/// Waits until a request from the client's primary address to `dst` answers `want`.
fn wait_tcp(s: &mut Scenario, dst: SocketAddr, want: &str) {
    s.wait_for(
        &format!("tcp {dst}"),
        |t| tcp_request(&t.client, dst, PROBE),
        want,
    );
}

/// The distinct answers of `n` TCP requests from `src` (None: the primary address) to `dst`.
fn answers(s: &Scenario, src: Option<IpAddr>, dst: SocketAddr, n: usize) -> BTreeSet<String> {
    tally(n, || tcp_request_from(&s.topo.client, src, dst, REQ))
        .into_keys()
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

// --- ClusterIP basics -----------------------------------------------------------------------

const DNS: Port = Port::udp("dns", 53, 5353);

both_families!(clusterip_tcp_and_udp_reach_every_endpoint);
fn clusterip_tcp_and_udp_reach_every_endpoint(mode: Mode, f: Fam) {
    let mut s = Scenario::with_manifests_in(mode);
    for (i, id) in ["ep1", "ep2"].into_iter().enumerate() {
        s.tcp_server(f.pod(i), 8080, id);
        s.udp_server(f.pod(i), 5353, id);
    }
    s.apply(&Svc::new("web", &[&f.a("10.96.0.10")], &[HTTP, DNS]).json());
    s.apply(&endpoint_slice(
        "web",
        &format!("web-{}", f.suffix()),
        &eps_on(&[f.pod(0), f.pod(1)], OTHER_NODE),
        &[HTTP, DNS],
    ));
    s.start_kproxy(&[]);
    let vip = sock(&f.a("10.96.0.10"), 80);
    wait_tcp(&mut s, vip, "ep1");
    // 40 fair coin flips: P(a side below 5) is about 1e-7.
    let seen = tally(40, || tcp_request(&s.topo.client, vip, REQ));
    assert_spread(&seen, &["ep1", "ep2"], 5);
    // Each request comes from a new ephemeral port: a new conntrack entry, a new choice.
    let dns = sock(&f.a("10.96.0.10"), 53);
    let seen = tally(40, || udp_request(&s.topo.client, dns, REQ));
    assert_spread(&seen, &["ep1", "ep2"], 5);
    s.kproxy().assert_running();
}

// One service with a ClusterIP in each family: each family's endpoints answer on its own
// address.
both_modes!(dual_stack_service_serves_each_family_from_its_endpoints);
fn dual_stack_service_serves_each_family_from_its_endpoints(mode: Mode) {
    let mut s = Scenario::with_manifests_in(mode);
    s.tcp_server(POD_V4[0], 8080, "v4-ep1");
    s.tcp_server(POD_V6[0], 8080, "v6-ep1");
    s.tcp_server(POD_V6[1], 8080, "v6-ep2");
    s.apply(&Svc::new("dual", &["10.96.0.30", "fd00:96::30"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "dual",
        "dual-v4",
        &eps_on(&[POD_V4[0]], OTHER_NODE),
        &[HTTP],
    ));
    s.apply(&endpoint_slice(
        "dual",
        "dual-v6",
        &eps_on(&[POD_V6[0], POD_V6[1]], OTHER_NODE),
        &[HTTP],
    ));
    s.start_kproxy(&[]);
    let vip6 = sock("fd00:96::30", 80);
    wait_tcp(&mut s, vip6, "v6-ep1");
    let seen = tally(40, || tcp_request(&s.topo.client, vip6, REQ));
    assert_spread(&seen, &["v6-ep1", "v6-ep2"], 5);
    let seen = tally(10, || {
        tcp_request(&s.topo.client, sock("10.96.0.30", 80), REQ)
    });
    assert_spread(&seen, &["v4-ep1"], 10);
    s.kproxy().assert_running();
}

// Endpoints replaced and added, a port added (a second endpoint count: the nftables mode's
// `pick-2` chain is created now, its rules using maps that exist since the first sync), and the
// service removed: traffic follows each change, and a removed service stops answering.
both_families!(live_changes_follow_endpoints_ports_and_removal);
fn live_changes_follow_endpoints_ports_and_removal(mode: Mode, f: Fam) {
    let mut s = Scenario::with_manifests_in(mode);
    for (i, id) in [(0, "ep1"), (2, "ep3")] {
        s.tcp_server(f.pod(i), 8080, id);
        s.udp_server(f.pod(i), 5353, id);
    }
    let vip_ip = f.a("10.96.0.10");
    let slice = format!("web-{}", f.suffix());
    let web = |ports: &[Port]| Svc::new("web", &[&vip_ip], ports).json();
    s.apply(&web(&[HTTP]));
    s.apply(&endpoint_slice(
        "web",
        &slice,
        &eps_on(&[f.pod(0)], OTHER_NODE),
        &[HTTP],
    ));
    s.start_kproxy(&[]);
    let vip = sock(&vip_ip, 80);
    wait_tcp(&mut s, vip, "ep1");

    s.apply(&endpoint_slice(
        "web",
        &slice,
        &eps_on(&[f.pod(2)], OTHER_NODE),
        &[HTTP],
    ));
    wait_tcp(&mut s, vip, "ep3");
    let seen = tally(10, || tcp_request(&s.topo.client, vip, REQ));
    assert_spread(&seen, &["ep3"], 10);

    s.apply(&web(&[HTTP, DNS]));
    s.apply(&endpoint_slice(
        "web",
        &slice,
        &eps_on(&[f.pod(0), f.pod(2)], OTHER_NODE),
        &[HTTP, DNS],
    ));
    let both = wait_until(SYNC, || {
        tally(10, || tcp_request(&s.topo.client, vip, REQ)).len() == 2
    });
    assert!(
        both,
        "the second endpoint never answered:\n{}",
        s.save(f.v6())
    );
    let seen = tally(30, || tcp_request(&s.topo.client, vip, REQ));
    assert_spread(&seen, &["ep1", "ep3"], 3);
    let dns = sock(&vip_ip, 53);
    let seen = tally(30, || udp_request(&s.topo.client, dns, REQ));
    assert_spread(&seen, &["ep1", "ep3"], 3);

    // Removed: its rules go, and a connect is no longer DNATed. The node routes the VIP
    // upstream (a black hole), so it times out; it must not reach a pod.
    s.source.delete("Service", "web");
    s.source.delete("EndpointSlice", &slice);
    let gone = wait_until(SYNC, || !s.save(f.v6()).contains(&vip_ip));
    assert!(
        gone,
        "rules for {vip_ip} remain after the service was removed:\n{}",
        s.save(f.v6())
    );
    for i in 0..3u8 {
        let r = tcp_request_from(&s.topo.client, Some(f.client(4 + i)), vip, PROBE);
        assert_timed_out(&format!("{vip} after its removal"), &r);
    }
    s.kproxy().assert_running();
}

// --- (a) NodePort ---------------------------------------------------------------------------

both_families!(nodeport_reaches_endpoints_on_the_default_addresses);
fn nodeport_reaches_endpoints_on_the_default_addresses(mode: Mode, f: Fam) {
    let mut s = Scenario::with_manifests_in(mode);
    s.tcp_server(f.pod(0), 8080, "ep1");
    s.tcp_server(f.pod(1), 8080, "ep2");
    s.apply(
        &Svc::new("np", &[&f.a("10.96.1.1")], &[HTTP_NP])
            .node_port()
            .json(),
    );
    s.apply(&endpoint_slice(
        "np",
        &format!("np-{}", f.suffix()),
        &eps_on(&[f.pod(0), f.pod(1)], OTHER_NODE),
        &[HTTP_NP],
    ));
    s.start_kproxy(&[]);

    let np = sock(f.node_ip(), NODE_PORT);
    wait_tcp(&mut s, np, "ep1");
    let seen = tally(40, || tcp_request(&s.topo.client, np, REQ));
    assert_spread(&seen, &["ep1", "ep2"], 5);
    let other = sock(f.node_pod_side(), NODE_PORT);
    match mode {
        // iptables: without --nodeport-addresses every local address accepts NodePorts, the
        // pods' side too.
        Mode::Iptables => assert_eq!(answers(&s, None, other, 10).len(), 2, "{other}"),
        // nftables (by design, docs/semantics.md rule 22): the default is the node's primary IPs,
        // the InternalIPs of its Node object (NODE_IP above); another local address is not
        // NATed, and the node's own stack refuses (nothing listens there).
        Mode::Nftables => assert_nodeport_not_served(&s, other),
    }
    s.kproxy().assert_running();
}

/// nftables mode only (a difference by design, docs/semantics.md rule 22): without
/// `--nodeport-addresses` NodePorts listen on the node's primary IPs (its Node object's
/// InternalIPs, 10.0.1.1 and fd00:1::1), not on every local address as in iptables mode.
#[test]
fn nodeport_default_is_the_primary_node_ips_nftables() {
    if !crate::support::require_root("nodeport_default_is_the_primary_node_ips_nftables") {
        return;
    }
    let mut s = Scenario::with_manifests_in(Mode::Nftables);
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.tcp_server(POD_V6[0], 8080, "v6-ep1");
    s.apply(
        &Svc::new("np", &["10.96.1.1", "fd00:96::1"], &[HTTP_NP])
            .node_port()
            .json(),
    );
    s.apply(&endpoint_slice(
        "np",
        "np-v4",
        &eps_on(&[POD_V4[0]], OTHER_NODE),
        &[HTTP_NP],
    ));
    s.apply(&endpoint_slice(
        "np",
        "np-v6",
        &eps_on(&[POD_V6[0]], OTHER_NODE),
        &[HTTP_NP],
    ));
    s.start_kproxy(&[]);
    // The Node object's InternalIPs serve.
    wait_tcp(&mut s, sock(NODE_IP, NODE_PORT), "ep1");
    wait_tcp(&mut s, sock(NODE_IP6, NODE_PORT), "v6-ep1");
    // The node's other local addresses (the pods' link) do not.
    assert_nodeport_not_served(&s, sock(Fam::V4.node_pod_side(), NODE_PORT));
    assert_nodeport_not_served(&s, sock(Fam::V6.node_pod_side(), NODE_PORT));
    s.kproxy().assert_running();
}

/// A NodePort request to `dst` (a node address) is not forwarded: nothing listens on the node,
/// so its own stack refuses.
fn assert_nodeport_not_served(s: &Scenario, dst: SocketAddr) {
    let f = Fam::of(dst);
    for i in 0..3 {
        assert_tcp_refused(&s.topo.client, Some(f.client(i)), dst, REQ);
    }
}

both_families!(nodeport_addresses_limit_which_addresses_accept_nodeports);
fn nodeport_addresses_limit_which_addresses_accept_nodeports(mode: Mode, f: Fam) {
    let mut s = Scenario::with_manifests_in(mode);
    s.tcp_server(f.pod(0), 8080, "ep1");
    s.apply(
        &Svc::new("np", &[&f.a("10.96.1.1")], &[HTTP_NP])
            .node_port()
            .json(),
    );
    s.apply(&endpoint_slice(
        "np",
        &format!("np-{}", f.suffix()),
        &eps_on(&[f.pod(0)], OTHER_NODE),
        &[HTTP_NP],
    ));
    s.start_kproxy(&["--nodeport-addresses", &f.a("10.0.2.0/24")]);

    // The pods' side of the node is selected: forwarded.
    wait_tcp(&mut s, sock(f.node_pod_side(), NODE_PORT), "ep1");
    // The client side is not: not NATed at all, the node's own stack answers (nothing listens
    // there).
    let node_ip = f.node_ip();
    for i in 0..3 {
        let r = tcp_request_from(
            &s.topo.client,
            Some(f.client(i)),
            sock(node_ip, NODE_PORT),
            REQ,
        );
        assert!(
            r.is_err(),
            "{node_ip}:{NODE_PORT} was forwarded ({r:?}) although --nodeport-addresses excludes it"
        );
    }
    s.kproxy().assert_running();
}

// --- (b) externalIPs ------------------------------------------------------------------------

both_families!(external_ips_reach_endpoints);
fn external_ips_reach_endpoints(mode: Mode, f: Fam) {
    let mut s = Scenario::with_manifests_in(mode);
    s.tcp_server(f.pod(0), 8080, "ep1");
    s.tcp_server(f.pod(1), 8080, "ep2");
    // The client routes everything via the node (default route), 10.0.7.7 included; the node
    // owns no such address.
    let ext_ip = f.a("10.0.7.7");
    s.apply(
        &Svc::new("ext", &[&f.a("10.96.1.2")], &[HTTP])
            .external_ips(&[&ext_ip])
            .json(),
    );
    s.apply(&endpoint_slice(
        "ext",
        &format!("ext-{}", f.suffix()),
        &eps_on(&[f.pod(0), f.pod(1)], OTHER_NODE),
        &[HTTP],
    ));
    s.start_kproxy(&[]);

    let ext = sock(&ext_ip, 80);
    wait_tcp(&mut s, ext, "ep1");
    let seen = tally(40, || tcp_request(&s.topo.client, ext, REQ));
    assert_spread(&seen, &["ep1", "ep2"], 5);
    // Only the service's port is captured.
    let r = tcp_request(&s.topo.client, sock(&ext_ip, 81), PROBE);
    assert_timed_out(&format!("{ext_ip}:81 (not a service port)"), &r);
    s.kproxy().assert_running();
}

// --- (c) LoadBalancer source ranges ---------------------------------------------------------

both_families!(load_balancer_source_ranges_drop_other_sources);
fn load_balancer_source_ranges_drop_other_sources(mode: Mode, f: Fam) {
    let mut s = Scenario::with_manifests_in(mode);
    s.tcp_server(f.pod(0), 8080, "ep1");
    // Allowed: client addresses 0 and 1 (10.0.1.2 and 10.0.1.3).
    let lb_ip = f.a("10.0.8.8");
    s.apply(
        &Svc::new("lb", &[&f.a("10.96.1.3")], &[HTTP_NP])
            .load_balancer(&[&lb_ip], &[&f.a("10.0.1.2/31")])
            .json(),
    );
    s.apply(&endpoint_slice(
        "lb",
        &format!("lb-{}", f.suffix()),
        &eps_on(&[f.pod(0)], OTHER_NODE),
        &[HTTP_NP],
    ));
    s.start_kproxy(&[]);

    let lb = sock(&lb_ip, 80);
    let allowed = f.client(0);
    s.wait_for(
        &format!("tcp {lb} from {allowed}"),
        |t| tcp_request_from(&t.client, Some(allowed), lb, PROBE),
        "ep1",
    );
    assert_eq!(
        tcp_request_from(&s.topo.client, Some(f.client(1)), lb, REQ).unwrap(),
        "ep1"
    );
    for i in 4..7 {
        let src = f.client(i);
        let r = tcp_request_from(&s.topo.client, Some(src), lb, DROPPED);
        assert_timed_out(&format!("{lb} from {src} (outside the source ranges)"), &r);
    }
    // NodePorts of the same service ignore the source ranges.
    let np = sock(f.node_ip(), NODE_PORT);
    assert_eq!(
        tcp_request_from(&s.topo.client, Some(f.client(5)), np, REQ).unwrap(),
        "ep1"
    );
    s.kproxy().assert_running();
}

// --- (d) session affinity -------------------------------------------------------------------

both_families!(client_ip_affinity_pins_each_source_address);
fn client_ip_affinity_pins_each_source_address(mode: Mode, f: Fam) {
    let mut s = Scenario::with_manifests_in(mode);
    for (i, id) in ["ep1", "ep2", "ep3"].into_iter().enumerate() {
        s.tcp_server(f.pod(i), 8080, id);
    }
    let cip = f.a("10.96.1.4");
    s.apply(
        &Svc::new("sticky", &[&cip], &[HTTP])
            .client_ip_affinity(600)
            .json(),
    );
    s.apply(&endpoint_slice(
        "sticky",
        &format!("sticky-{}", f.suffix()),
        &eps_on(&[f.pod(0), f.pod(1), f.pod(2)], OTHER_NODE),
        &[HTTP],
    ));
    // More client addresses, so "different sources spread" is not left to a 1-in-2000 chance.
    let extra: Vec<IpAddr> = (0..16u8)
        .map(|i| f.ip(&format!("10.0.1.{}", 100 + i)))
        .collect();
    let link_prefix = if f.v6() { 64 } else { 24 };
    for a in &extra {
        s.topo
            .client
            .add_addr(&s.topo.client_dev, &format!("{a}/{link_prefix}"));
    }
    if f.v6() {
        // New IPv6 addresses are tentative until duplicate address detection is done.
        std::thread::sleep(Duration::from_secs(2));
    }
    s.start_kproxy(&[]);

    let vip = sock(&cip, 80);
    s.wait_for_result(
        &format!("{vip}"),
        |t| tcp_request(&t.client, vip, PROBE),
        |r| r.is_ok(),
    );
    let seen = answers(&s, None, vip, 20);
    assert_eq!(seen.len(), 1, "20 connections from one address: {seen:?}");

    let mut chosen = BTreeSet::new();
    for a in &extra {
        let seen = answers(&s, Some(*a), vip, 3);
        assert_eq!(seen.len(), 1, "3 connections from {a}: {seen:?}");
        chosen.extend(seen);
    }
    assert!(
        chosen.len() >= 2,
        "16 source addresses all landed on {chosen:?}"
    );
    s.kproxy().assert_running();
}

// --- (e) externalTrafficPolicy --------------------------------------------------------------

/// `np` (kproxy in `mode`) with ETP `policy`: ep1 on this node, ep2 elsewhere; servers report the peer.
fn etp_scenario(mode: Mode, f: Fam, policy: &'static str, local: bool) -> Scenario {
    let mut s = Scenario::with_manifests_in(mode);
    s.tcp_server_reporting_peer(f.pod(0), 8080, "ep1");
    s.tcp_server_reporting_peer(f.pod(1), 8080, "ep2");
    s.apply(
        &Svc::new("np", &[&f.a("10.96.1.5")], &[HTTP_NP])
            .node_port()
            .external_policy(policy)
            .json(),
    );
    let first = if local { NODE } else { OTHER_NODE };
    s.apply(&endpoint_slice(
        "np",
        &format!("np-{}", f.suffix()),
        &[
            Ep::ready(f.pod(0)).on(first),
            Ep::ready(f.pod(1)).on(OTHER_NODE),
        ],
        &[HTTP_NP],
    ));
    s
}

/// Adds a client address inside the cluster CIDR (10.244.9.2, a "pod" source) that the node
/// routes back to the client; returns it.
fn add_pod_source(s: &Scenario, f: Fam) -> IpAddr {
    let pod = f.ip("10.244.9.2");
    s.topo
        .client
        .add_addr(&s.topo.client_dev, &format!("{pod}/{}", f.host_prefix()));
    s.topo
        .node
        .route(&f.a("10.244.9.0/24"), &f.client(0).to_string());
    if f.v6() {
        // Wait out duplicate address detection.
        std::thread::sleep(Duration::from_secs(2));
    }
    pod
}

both_families!(etp_local_nodeport_reaches_local_endpoint_with_client_source);
fn etp_local_nodeport_reaches_local_endpoint_with_client_source(mode: Mode, f: Fam) {
    let mut s = etp_scenario(mode, f, "Local", true);
    s.start_kproxy(&[]);
    let np = sock(f.node_ip(), NODE_PORT);
    // An explicit source: IPv6 source selection among the client's addresses is the kernel's.
    let src = f.client(0);
    let want = format!("ep1 from {src}");
    s.wait_for(
        &format!("tcp {np} from {src}"),
        |t| tcp_request_from(&t.client, Some(src), np, PROBE),
        &want,
    );
    let seen = answers(&s, Some(src), np, 20);
    assert_eq!(seen, set(&[&want]), "ETP=Local NodePort from the client");
    s.kproxy().assert_running();
}

both_families!(etp_cluster_nodeport_is_masqueraded);
fn etp_cluster_nodeport_is_masqueraded(mode: Mode, f: Fam) {
    let mut s = etp_scenario(mode, f, "Cluster", true);
    s.start_kproxy(&[]);
    let np = sock(f.node_ip(), NODE_PORT);
    let masq = f.node_pod_side();
    let want = format!("ep1 from {masq}");
    wait_tcp(&mut s, np, &want);
    let seen = answers(&s, None, np, 40);
    assert_eq!(
        seen,
        set(&[&want, &format!("ep2 from {masq}")]),
        "ETP=Cluster NodePort from the client"
    );
    s.kproxy().assert_running();
}

both_families!(etp_local_without_local_endpoints_drops_external_but_not_pod_or_node_traffic);
fn etp_local_without_local_endpoints_drops_external_but_not_pod_or_node_traffic(
    mode: Mode,
    f: Fam,
) {
    let mut s = etp_scenario(mode, f, "Local", false);
    let pod = add_pod_source(&s, f);
    s.start_kproxy(&[]);
    let np = sock(f.node_ip(), NODE_PORT);
    // The ClusterIP (Cluster internal policy) works: the rules are in.
    let cip = sock(&f.a("10.96.1.5"), 80);
    s.wait_for_result(
        &format!("{cip}"),
        |t| tcp_request(&t.client, cip, PROBE),
        |r| r.is_ok(),
    );
    s.wait_rules("no local endpoints", f.v6(), |r| match mode {
        Mode::Iptables => r.contains("has no local endpoints"),
        Mode::Nftables => r.contains("tcp . 30080 : drop"),
    });
    // External clients: dropped (not refused).
    for i in 0..3 {
        let r = tcp_request_from(&s.topo.client, Some(f.client(i)), np, DROPPED);
        assert_timed_out("ETP=Local NodePort without local endpoints", &r);
    }
    // Pod traffic to the NodePort is short-circuited to all endpoints, not masqueraded
    // (docs/semantics.md, rule 7).
    let seen = answers(&s, Some(pod), np, 30);
    assert_eq!(
        seen,
        set(&[&format!("ep1 from {pod}"), &format!("ep2 from {pod}")]),
        "ETP=Local NodePort from a pod source"
    );
    // So is the node's own traffic (masqueraded).
    let from_node = tcp_request(&s.topo.node, np, REQ);
    assert!(
        matches!(&from_node, Ok(a) if a.starts_with("ep")),
        "ETP=Local NodePort from the node itself: {from_node:?}"
    );
    s.kproxy().assert_running();
}

// --- (f) internalTrafficPolicy --------------------------------------------------------------

fn itp_scenario(mode: Mode, f: Fam, local: bool) -> Scenario {
    let mut s = Scenario::with_manifests_in(mode);
    s.tcp_server_reporting_peer(f.pod(0), 8080, "ep1");
    s.tcp_server_reporting_peer(f.pod(1), 8080, "ep2");
    s.apply(
        &Svc::new("itp", &[&f.a("10.96.1.6")], &[HTTP])
            .internal_policy("Local")
            .json(),
    );
    let first = if local { NODE } else { OTHER_NODE };
    s.apply(&endpoint_slice(
        "itp",
        &format!("itp-{}", f.suffix()),
        &[
            Ep::ready(f.pod(0)).on(first),
            Ep::ready(f.pod(1)).on(OTHER_NODE),
        ],
        &[HTTP],
    ));
    s
}

both_families!(itp_local_uses_only_local_endpoints);
fn itp_local_uses_only_local_endpoints(mode: Mode, f: Fam) {
    let mut s = itp_scenario(mode, f, true);
    s.start_kproxy(&[]);
    let vip = sock(&f.a("10.96.1.6"), 80);
    // The client is off-cluster (outside --cluster-cidr): ClusterIP traffic from it is
    // masqueraded whatever the internal policy (docs/semantics.md, rule 10).
    let want = format!("ep1 from {}", f.node_pod_side());
    s.wait_for_result(
        &format!("{vip}"),
        |t| tcp_request(&t.client, vip, PROBE),
        |r| r.is_ok(),
    );
    let seen = answers(&s, None, vip, 20);
    assert_eq!(seen, set(&[&want]), "ITP=Local ClusterIP from the client");
    s.kproxy().assert_running();
}

both_families!(itp_local_without_local_endpoints_drops);
fn itp_local_without_local_endpoints_drops(mode: Mode, f: Fam) {
    let mut s = itp_scenario(mode, f, false);
    s.start_kproxy(&[]);
    let cip = f.a("10.96.1.6");
    let iptables_dst = format!("-d {cip}/{}", f.host_prefix());
    let nft_elem = format!("{cip} . tcp . 80 : drop");
    s.wait_rules("no local endpoints", f.v6(), |r| match mode {
        Mode::Iptables => r.contains("has no local endpoints") && r.contains(&iptables_dst),
        Mode::Nftables => r.contains(&nft_elem),
    });
    for i in 0..3 {
        let r = tcp_request_from(&s.topo.client, Some(f.client(i)), sock(&cip, 80), DROPPED);
        assert_timed_out("ITP=Local ClusterIP without local endpoints", &r);
    }
    s.kproxy().assert_running();
}

// --- (g) terminating endpoints --------------------------------------------------------------

both_families!(terminating_endpoints_serve_until_a_ready_one_exists);
fn terminating_endpoints_serve_until_a_ready_one_exists(mode: Mode, f: Fam) {
    let mut s = Scenario::with_manifests_in(mode);
    for (i, id) in ["ep1", "ep2", "ep3"].into_iter().enumerate() {
        s.tcp_server(f.pod(i), 8080, id);
    }
    let slice = format!("term-{}", f.suffix());
    s.apply(&Svc::new("term", &[&f.a("10.96.1.7")], &[HTTP]).json());
    let terminating = [Ep::terminating(f.pod(0)), Ep::terminating(f.pod(1))];
    s.apply(&endpoint_slice("term", &slice, &terminating, &[HTTP]));
    s.start_kproxy(&[]);

    let vip = sock(&f.a("10.96.1.7"), 80);
    wait_tcp(&mut s, vip, "ep1");
    let seen = tally(40, || tcp_request(&s.topo.client, vip, REQ));
    assert_spread(&seen, &["ep1", "ep2"], 5);

    // A ready endpoint appears: only it is used.
    let mut mixed = terminating.to_vec();
    mixed.push(Ep::ready(f.pod(2)));
    s.apply(&endpoint_slice("term", &slice, &mixed, &[HTTP]));
    s.wait_for_result(
        "only ep3",
        |t| {
            Ok(format!(
                "{:?}",
                tally(10, || tcp_request(&t.client, vip, REQ))
            ))
        },
        |r| matches!(r, Ok(seen) if seen == "{\"ep3\": 10}"),
    );
    let seen = tally(30, || tcp_request(&s.topo.client, vip, REQ));
    assert_spread(&seen, &["ep3"], 30);
    s.kproxy().assert_running();
}

// --- (h) masquerading -----------------------------------------------------------------------

/// `web` at 10.96.1.8 with one peer-reporting endpoint, and a client address (10.244.9.2)
/// inside the cluster CIDR that the node routes back to the client.
fn masq_scenario(mode: Mode, f: Fam) -> (Scenario, IpAddr) {
    let mut s = Scenario::with_manifests_in(mode);
    s.tcp_server_reporting_peer(f.pod(0), 8080, "ep1");
    s.apply(&Svc::new("web", &[&f.a("10.96.1.8")], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "web",
        &format!("web-{}", f.suffix()),
        &eps_on(&[f.pod(0)], OTHER_NODE),
        &[HTTP],
    ));
    let pod = add_pod_source(&s, f);
    (s, pod)
}

both_families!(clusterip_masquerades_only_sources_outside_the_cluster_cidr);
fn clusterip_masquerades_only_sources_outside_the_cluster_cidr(mode: Mode, f: Fam) {
    let (mut s, pod) = masq_scenario(mode, f);
    s.start_kproxy(&[]);
    let vip = sock(&f.a("10.96.1.8"), 80);
    wait_tcp(&mut s, vip, &format!("ep1 from {}", f.node_pod_side()));
    let from_pod = tcp_request_from(&s.topo.client, Some(pod), vip, REQ).unwrap();
    assert_eq!(split_peer(&from_pod), ("ep1", pod.to_string().as_str()));
    // Masquerading is marked, then done in POSTROUTING with fully random source ports (so two
    // nodes' SNATed flows to one endpoint do not race for the same port).
    let rules = s.save(f.v6());
    let want = match mode {
        Mode::Iptables => "-j MASQUERADE --random-fully",
        Mode::Nftables => "masquerade fully-random",
    };
    assert!(rules.contains(want), "no {want:?} in\n{rules}");
    s.kproxy().assert_running();
}

both_families!(masquerade_all_masquerades_pod_sources);
fn masquerade_all_masquerades_pod_sources(mode: Mode, f: Fam) {
    let (mut s, pod) = masq_scenario(mode, f);
    s.start_kproxy(&["--masquerade-all"]);
    let vip = sock(&f.a("10.96.1.8"), 80);
    wait_tcp(&mut s, vip, &format!("ep1 from {}", f.node_pod_side()));
    let from_pod = tcp_request_from(&s.topo.client, Some(pod), vip, REQ).unwrap();
    assert_eq!(split_peer(&from_pod), ("ep1", f.node_pod_side()));
    s.kproxy().assert_running();
}

// --- (h') local-traffic detection (--detect-local-mode) ---------------------------------------
//
// What counts as "from a local pod" decides who is masqueraded on a ClusterIP and who takes the
// externalTrafficPolicy=Local short-circuit. The client plays the pods: its link to the node
// (`node_uplink_dev`) stands for the pods' bridge or veths, and its address 10.244.9.2
// (`add_pod_source`) for a pod address; --cluster-cidr stays 10.244.0.0/16 in every test, so a
// detector that ignores it shows.

/// The `--detect-local-mode` flags of the bridge detector.
fn bridge_flags(bridge: &str) -> Vec<String> {
    vec![
        "--detect-local-mode=BridgeInterface".into(),
        format!("--pod-bridge-interface={bridge}"),
    ]
}

/// The `--detect-local-mode` flags of the interface-name-prefix detector.
fn prefix_flags(prefix: &str) -> Vec<String> {
    vec![
        "--detect-local-mode=InterfaceNamePrefix".into(),
        format!("--pod-interface-name-prefix={prefix}"),
    ]
}

/// A strict prefix of the node's interface towards the client (`vb7` → `vb`).
fn uplink_prefix(s: &Scenario) -> String {
    let dev = &s.topo.node_uplink_dev;
    dev.trim_end_matches(|c: char| c.is_ascii_digit())
        .to_string()
}

/// Starts kproxy with `flags` on [`masq_scenario`]'s ClusterIP and checks, for the client's
/// primary address and its pod-CIDR address, whether the endpoint sees the client's own source
/// (`true`: local pod traffic, not masqueraded) or the node's address (masqueraded).
fn assert_clusterip_sources(
    mut s: Scenario,
    f: Fam,
    pod: IpAddr,
    flags: &[String],
    client_preserved: bool,
    pod_preserved: bool,
) {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    s.start_kproxy(&flags);
    let vip = sock(&f.a("10.96.1.8"), 80);
    for (src, preserved) in [(f.client(0), client_preserved), (pod, pod_preserved)] {
        s.wait_for_result(
            &format!("{vip} from {src}"),
            |t| tcp_request_from(&t.client, Some(src), vip, PROBE),
            |r| r.is_ok(),
        );
        let want = if preserved {
            src.to_string()
        } else {
            f.node_pod_side().to_string()
        };
        for _ in 0..3 {
            let answer = tcp_request_from(&s.topo.client, Some(src), vip, REQ).unwrap();
            assert_eq!(
                split_peer(&answer),
                ("ep1", want.as_str()),
                "{vip} from {src} with {flags:?}"
            );
        }
    }
    s.kproxy().assert_running();
}

// Traffic arriving on the bridge is local, whatever its address: neither client address is
// masqueraded.
both_families!(detect_local_bridge_interface_preserves_traffic_arriving_on_it);
fn detect_local_bridge_interface_preserves_traffic_arriving_on_it(mode: Mode, f: Fam) {
    let (s, pod) = masq_scenario(mode, f);
    let flags = bridge_flags(&s.topo.node_uplink_dev);
    assert_clusterip_sources(s, f, pod, &flags, true, true);
}

// Another bridge: everything from the client is masqueraded, its pod-CIDR address too.
both_families!(detect_local_other_bridge_interface_masquerades);
fn detect_local_other_bridge_interface_masquerades(mode: Mode, f: Fam) {
    let (s, pod) = masq_scenario(mode, f);
    assert_clusterip_sources(s, f, pod, &bridge_flags("kpx-nobr0"), false, false);
}

both_families!(detect_local_interface_prefix_preserves_traffic_arriving_on_a_match);
fn detect_local_interface_prefix_preserves_traffic_arriving_on_a_match(mode: Mode, f: Fam) {
    let (s, pod) = masq_scenario(mode, f);
    let flags = prefix_flags(&uplink_prefix(&s));
    assert_clusterip_sources(s, f, pod, &flags, true, true);
}

both_families!(detect_local_other_interface_prefix_masquerades);
fn detect_local_other_interface_prefix_masquerades(mode: Mode, f: Fam) {
    let (s, pod) = masq_scenario(mode, f);
    assert_clusterip_sources(s, f, pod, &prefix_flags("kpxno"), false, false);
}

/// [`masq_scenario`] with the Node's `spec.podCIDRs` set to `pod_cidr` (an IPv4 literal) and
/// its IPv6 twin.
fn node_cidr_scenario(mode: Mode, f: Fam, pod_cidr: &str) -> (Scenario, IpAddr) {
    let (s, pod) = masq_scenario(mode, f);
    s.apply(&node_with_pod_cidrs(
        NODE,
        &[NODE_IP, NODE_IP6],
        &[&Fam::V4.a(pod_cidr), &Fam::V6.a(pod_cidr)],
    ));
    (s, pod)
}

// The Node's pod CIDR covers the pod source (10.244.9.0/24): it alone is preserved; the client's
// primary address, outside it, is masqueraded.
both_families!(detect_local_node_cidr_preserves_this_nodes_pod_range);
fn detect_local_node_cidr_preserves_this_nodes_pod_range(mode: Mode, f: Fam) {
    let (s, pod) = node_cidr_scenario(mode, f, "10.244.9.0/24");
    let flags = ["--detect-local-mode=NodeCIDR".to_string()];
    assert_clusterip_sources(s, f, pod, &flags, false, true);
}

// Another node's pod range (10.244.7.0/24): the pod source is masqueraded although it is inside
// --cluster-cidr, which NodeCIDR does not consult.
both_families!(detect_local_node_cidr_masquerades_other_pod_ranges);
fn detect_local_node_cidr_masquerades_other_pod_ranges(mode: Mode, f: Fam) {
    let (s, pod) = node_cidr_scenario(mode, f, "10.244.7.0/24");
    let flags = ["--detect-local-mode=NodeCIDR".to_string()];
    assert_clusterip_sources(s, f, pod, &flags, false, false);
}

/// ETP=Local NodePort without local endpoints (see [`etp_scenario`]) under an interface
/// detector that matches the client's link: the client is short-circuited to every endpoint
/// with its own source (not dropped, not masqueraded), and the node's own connection, which has
/// no input interface, is served masqueraded (`--src-type LOCAL` / `fib saddr type local`).
fn assert_etp_local_short_circuit(mode: Mode, f: Fam, flags: impl Fn(&Scenario) -> Vec<String>) {
    let mut s = etp_scenario(mode, f, "Local", false);
    let flags = flags(&s);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    s.start_kproxy(&flags);
    let np = sock(f.node_ip(), NODE_PORT);
    let src = f.client(0);
    s.wait_for_result(
        &format!("{np} from {src}"),
        |t| tcp_request_from(&t.client, Some(src), np, PROBE),
        |r| r.is_ok(),
    );
    let seen = answers(&s, Some(src), np, 30);
    assert_eq!(
        seen,
        set(&[&format!("ep1 from {src}"), &format!("ep2 from {src}")]),
        "ETP=Local NodePort from the client's link with {flags:?}"
    );
    let from_node = tcp_request(&s.topo.node, np, REQ);
    assert!(
        matches!(&from_node, Ok(a) if a.starts_with("ep")),
        "ETP=Local NodePort from the node itself: {from_node:?}"
    );
    s.kproxy().assert_running();
}

both_families!(detect_local_bridge_interface_short_circuits_etp_local);
fn detect_local_bridge_interface_short_circuits_etp_local(mode: Mode, f: Fam) {
    assert_etp_local_short_circuit(mode, f, |s| bridge_flags(&s.topo.node_uplink_dev));
}

both_families!(detect_local_interface_prefix_short_circuits_etp_local);
fn detect_local_interface_prefix_short_circuits_etp_local(mode: Mode, f: Fam) {
    assert_etp_local_short_circuit(mode, f, |s| prefix_flags(&uplink_prefix(s)));
}

// --- (i) hairpin ----------------------------------------------------------------------------

both_families!(hairpin_endpoint_reaches_itself_through_its_service);
fn hairpin_endpoint_reaches_itself_through_its_service(mode: Mode, f: Fam) {
    let mut s = Scenario::with_manifests_in(mode);
    s.tcp_server(f.pod(0), 8080, "ep1");
    s.apply(&Svc::new("self", &[&f.a("10.96.1.9")], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "self",
        &format!("self-{}", f.suffix()),
        &eps_on(&[f.pod(0)], NODE),
        &[HTTP],
    ));
    s.start_kproxy(&[]);
    let vip = sock(&f.a("10.96.1.9"), 80);
    // The pod connects to its own service from its own address.
    let pod = Some(ip(f.pod(0)));
    s.wait_for(
        &format!("hairpin {} -> {vip}", f.pod(0)),
        |t| tcp_request_from(&t.endpoints, pod, vip, PROBE),
        "ep1",
    );
    for _ in 0..5 {
        assert_eq!(
            tcp_request_from(&s.topo.endpoints, pod, vip, REQ).unwrap(),
            "ep1"
        );
    }
    s.kproxy().assert_running();
}

// --- (j) topology hints ---------------------------------------------------------------------

both_families!(zone_hints_keep_only_same_zone_endpoints);
fn zone_hints_keep_only_same_zone_endpoints(mode: Mode, f: Fam) {
    let mut s = Scenario::with_manifests_in(mode);
    for (i, id) in ["z1-a", "z1-b", "z2-a"].into_iter().enumerate() {
        s.tcp_server(f.pod(i), 8080, id);
    }
    s.apply(&node(NODE, &[NODE_IP, NODE_IP6], Some("zone-1")));
    s.apply(&Svc::new("zonal", &[&f.a("10.96.1.10")], &[HTTP]).json());
    let eps = [
        Ep::ready(f.pod(0)).zone_hint("zone-1"),
        Ep::ready(f.pod(1)).zone_hint("zone-1"),
        Ep::ready(f.pod(2)).zone_hint("zone-2"),
    ];
    s.apply(&endpoint_slice(
        "zonal",
        &format!("zonal-{}", f.suffix()),
        &eps,
        &[HTTP],
    ));
    s.start_kproxy(&[]);
    let vip = sock(&f.a("10.96.1.10"), 80);
    wait_tcp(&mut s, vip, "z1-a");
    let seen = tally(40, || tcp_request(&s.topo.client, vip, REQ));
    assert_spread(&seen, &["z1-a", "z1-b"], 5);
    s.kproxy().assert_running();
}

// --- (k) IPv6 -------------------------------------------------------------------------------

both_modes!(ipv6_nodeport_and_reject_without_endpoints);
fn ipv6_nodeport_and_reject_without_endpoints(mode: Mode) {
    let mut s = Scenario::with_manifests_in(mode);
    s.tcp_server(POD_V6[0], 8080, "v6-ep1");
    s.tcp_server(POD_V6[1], 8080, "v6-ep2");
    s.apply(
        &Svc::new("np6", &["fd00:96::11"], &[HTTP_NP])
            .node_port()
            .json(),
    );
    s.apply(&endpoint_slice(
        "np6",
        "np6-v6",
        &eps_on(&[POD_V6[0], POD_V6[1]], OTHER_NODE),
        &[HTTP_NP],
    ));
    let empty_np = Port::tcp("http", 80, 8080).with_node_port(30081);
    s.apply(
        &Svc::new("empty6", &["fd00:96::20"], &[empty_np])
            .node_port()
            .json(),
    );
    s.start_kproxy(&[]);

    let np = sock(NODE_IP6, NODE_PORT);
    wait_tcp(&mut s, np, "v6-ep1");
    let seen = tally(40, || tcp_request(&s.topo.client, np, REQ));
    assert_spread(&seen, &["v6-ep1", "v6-ep2"], 5);

    s.wait_rules("IPv6 REJECT", true, |r| match mode {
        Mode::Iptables => r.contains("-d fd00:96::20/128") && r.contains("REJECT"),
        Mode::Nftables => {
            r.contains("fd00:96::20 . tcp . 80 : goto reject-chain")
                && r.contains("tcp . 30081 : goto reject-chain")
        }
    });
    // ClusterIP and NodePort of the endpoint-less service: refused, not dropped, from several
    // source addresses (ICMPv6 errors are rate-limited per destination too). Over IPv6 the
    // refusal comes with the first SYN retransmission, about 1 s after connect(): the
    // port-unreachable for the first SYN travels the veth pairs synchronously and reaches the
    // client while connect() still holds the socket lock, so TCP discards it
    // (TcpExtLockDroppedIcmps; measured in bare namespaces without kproxy). A DROP would
    // never answer.
    let within = Duration::from_millis(1500);
    for i in 0..2 {
        assert_tcp_refused(
            &s.topo.client,
            Some(client_v6(i)),
            sock("fd00:96::20", 80),
            within,
        );
        assert_tcp_refused(
            &s.topo.client,
            Some(client_v6(i + 2)),
            sock(NODE_IP6, 30081),
            within,
        );
    }
    s.kproxy().assert_running();
}

// --- flushed tables are repaired (canary) ------------------------------------------------------

both_modes!(flushed_rules_are_restored_within_a_sync_period);

/// Someone flushes the NAT table (iptables) or deletes kproxy's table (nftables) behind its
/// back: the next periodic sync's canary probe notices, reads the kernel back and restores
/// everything, though no Service changed.
fn flushed_rules_are_restored_within_a_sync_period(mode: Mode) {
    let mut s = Scenario::with_manifests_in(mode);
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.apply(&Svc::new("web", &["10.96.1.20"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "web",
        "web-v4",
        &eps_on(&[POD_V4[0]], OTHER_NODE),
        &[HTTP],
    ));
    let period = match mode {
        Mode::Iptables => "--iptables-sync-period",
        Mode::Nftables => "--nftables-sync-period",
    };
    s.start_kproxy(&[period, "1s"]);
    let vip = sock("10.96.1.20", 80);
    wait_tcp(&mut s, vip, "ep1");
    match mode {
        Mode::Iptables => {
            s.topo.node.run("iptables-nft", &["-t", "nat", "-F"]);
            s.topo.node.run("iptables-nft", &["-t", "nat", "-X"]);
        }
        Mode::Nftables => {
            s.topo.node.run("nft", &["delete", "table", "ip", "kproxy"]);
        }
    }
    let broken = tcp_request_from(&s.topo.client, Some(client_v4(5)), vip, PROBE);
    assert!(
        broken.is_err(),
        "the flush did not break the service: {broken:?}"
    );
    wait_tcp(&mut s, vip, "ep1");
    s.kproxy().assert_running();
}

// --- restart without a gap ---------------------------------------------------------------------

both_modes!(sigkill_and_restart_keep_traffic_and_rules);

/// SIGKILL kproxy under traffic and start it again: no connection fails before, during or after
/// the restart, and the kernel state afterwards is byte-for-byte what it was (the restarted
/// kproxy reads it back, finds it right and rewrites nothing).
fn sigkill_and_restart_keep_traffic_and_rules(mode: Mode) {
    let mut s = Scenario::with_manifests_in(mode);
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.tcp_server(POD_V6[0], 8080, "v6-ep1");
    s.apply(&Svc::new("web", &["10.96.1.30", "fd00:96::130"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "web",
        "web-v4",
        &eps_on(&[POD_V4[0]], OTHER_NODE),
        &[HTTP],
    ));
    s.apply(&endpoint_slice(
        "web",
        "web-v6",
        &eps_on(&[POD_V6[0]], OTHER_NODE),
        &[HTTP],
    ));
    s.start_kproxy(&[]);
    let vip = sock("10.96.1.30", 80);
    wait_tcp(&mut s, vip, "ep1");
    let normalized = |s: &Scenario| -> Vec<String> {
        [false, true]
            .into_iter()
            .flat_map(|v6| s.save(v6).lines().map(str::to_string).collect::<Vec<_>>())
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(" [").next().unwrap_or(&l).to_string())
            .collect()
    };
    let before = normalized(&s);
    assert!(
        before.iter().any(|l| l.contains("10.96.1.30")),
        "{before:#?}"
    );

    let mut requests = 0;
    let mut request = |s: &Scenario| {
        requests += 1;
        let r = tcp_request(&s.topo.client, vip, REQ);
        assert_eq!(
            r.as_deref().ok(),
            Some("ep1"),
            "request {requests} failed: {r:?}"
        );
    };
    drop(s.kproxy.take()); // SIGKILL (Child::kill)
    for _ in 0..20 {
        request(&s);
    }
    s.start_kproxy(&[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !s.kproxy().stderr().contains("sync complete") {
        assert!(
            std::time::Instant::now() < deadline,
            "no sync after the restart"
        );
        request(&s);
    }
    for _ in 0..20 {
        request(&s);
    }
    assert_eq!(
        normalized(&s),
        before,
        "kernel state changed across the restart"
    );
    let log = s.kproxy().stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("sync complete") && l.contains("added=0 removed=0")),
        "the restarted kproxy rewrote rules:\n{log}"
    );
    s.kproxy().assert_running();
}

// --- mode switch ------------------------------------------------------------------------------

/// iptables → nftables → iptables on a live node: each new mode removes the previous mode's
/// objects only after its own first sync, so connections keep working throughout.
#[test]
fn mode_switch_removes_the_old_rules_after_the_new_are_in_place() {
    if !crate::support::require_root("mode_switch_removes_the_old_rules_after_the_new_are_in_place")
    {
        return;
    }
    let mut s = Scenario::with_manifests_in(Mode::Iptables);
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.apply(&Svc::new("web", &["10.96.1.40"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "web",
        "web-v4",
        &eps_on(&[POD_V4[0]], OTHER_NODE),
        &[HTTP],
    ));
    s.start_kproxy(&[]);
    let vip = sock("10.96.1.40", 80);
    wait_tcp(&mut s, vip, "ep1");
    let iptables_rules = |s: &Scenario| {
        s.topo
            .node
            .run("iptables-nft-save", &[])
            .contains("KPROXY-")
    };
    let nft_table = |s: &Scenario| {
        s.topo
            .node
            .run("nft", &["list", "tables"])
            .lines()
            .any(|l| l.trim() == "table ip kproxy")
    };
    assert!(iptables_rules(&s) && !nft_table(&s));

    for to in [Mode::Nftables, Mode::Iptables] {
        drop(s.kproxy.take());
        // The old mode's rules still carry traffic while no kproxy runs.
        assert_eq!(tcp_request(&s.topo.client, vip, REQ).unwrap(), "ep1");
        s.mode = to;
        s.start_kproxy(&[]);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !s.kproxy().stderr().contains("sync complete") {
            assert!(
                std::time::Instant::now() < deadline,
                "no first sync in {to:?}"
            );
            assert_eq!(tcp_request(&s.topo.client, vip, REQ).unwrap(), "ep1");
        }
        let gone = crate::support::kproxy::wait_until(Duration::from_secs(10), || match to {
            Mode::Nftables => !iptables_rules(&s) && nft_table(&s),
            Mode::Iptables => iptables_rules(&s) && !nft_table(&s),
        });
        assert!(
            gone,
            "the previous mode's objects were not removed after switching to {to:?}"
        );
        for _ in 0..10 {
            assert_eq!(tcp_request(&s.topo.client, vip, REQ).unwrap(), "ep1");
        }
    }
    s.kproxy().assert_running();
}

// --- health-check node ports ---------------------------------------------------------------------

both_modes!(health_check_node_port_reports_local_endpoints);

/// `GET http://NODE:PORT/` from the client namespace: (status, response text).
fn http_get(s: &Scenario, addr: SocketAddr) -> Option<(u16, String)> {
    s.topo.client.in_ns(move || -> Option<(u16, String)> {
        use std::io::{Read as _, Write as _};
        let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        c.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        c.read_to_string(&mut text).ok()?;
        Some((text.split_whitespace().nth(1)?.parse().ok()?, text))
    })
}

/// A LoadBalancer Service with externalTrafficPolicy=Local answers on its healthCheckNodePort:
/// 200 with the count of local ready endpoints (body and weight header) while this node has
/// one, 503 with 0 once its only local endpoint is gone.
fn health_check_node_port_reports_local_endpoints(mode: Mode) {
    let mut s = Scenario::with_manifests_in(mode);
    s.tcp_server(POD_V4[0], 8080, "ep1");
    let mut svc = Svc::new("lb", &["10.96.1.50"], &[HTTP_NP])
        .load_balancer(&["10.0.8.50"], &[])
        .external_policy("Local")
        .json();
    svc["spec"]["healthCheckNodePort"] = serde_json::json!(32001);
    s.apply(&svc);
    s.apply(&endpoint_slice(
        "lb",
        "lb-v4",
        &eps_on(&[POD_V4[0]], NODE),
        &[HTTP],
    ));
    // Only the node's own address serves NodePorts, and so health checks (as upstream).
    let only = format!("{NODE_IP}/32");
    s.start_kproxy(&["--nodeport-addresses", &only]);
    let hc = sock(NODE_IP, 32001);
    let ok = crate::support::kproxy::wait_until(Duration::from_secs(10), || {
        http_get(&s, hc).is_some_and(|(code, _)| code == 200)
    });
    if !ok {
        s.kproxy().assert_running();
        panic!(
            "health-check node port never answered 200: {:?}",
            http_get(&s, hc)
        );
    }
    let (_, text) = http_get(&s, hc).unwrap();
    let lower = text.to_ascii_lowercase();
    assert!(
        lower.contains("x-load-balancing-endpoint-weight: 1"),
        "{text}"
    );
    assert!(
        text.contains("\"localEndpoints\":1") && text.contains("\"serviceProxyHealthy\":true"),
        "{text}"
    );
    assert!(
        text.contains("\"namespace\":\"default\"") && text.contains("\"name\":\"lb\""),
        "{text}"
    );

    // Not on the node's loopback, which is not a NodePort address here.
    let loopback = s.topo.node.in_ns(|| {
        std::net::TcpStream::connect_timeout(&sock("127.0.0.1", 32001), Duration::from_millis(500))
            .is_ok()
    });
    assert!(
        !loopback,
        "health-check port listens beyond --nodeport-addresses"
    );

    // The only local endpoint moves to another node: 503, weight 0.
    s.apply(&endpoint_slice(
        "lb",
        "lb-v4",
        &eps_on(&[POD_V4[0]], OTHER_NODE),
        &[HTTP],
    ));
    let drained = crate::support::kproxy::wait_until(Duration::from_secs(10), || {
        http_get(&s, hc)
            .is_some_and(|(code, text)| code == 503 && text.contains("\"localEndpoints\":0"))
    });
    assert!(
        drained,
        "still healthy without local endpoints: {:?}",
        http_get(&s, hc)
    );
    s.kproxy().assert_running();
}

// --- (l) SCTP -------------------------------------------------------------------------------

// SCTP ClusterIP and NodePort: an INIT sent to the service arrives at the endpoint's address and
// target port (DNAT of SCTP, with the checksum the kernel recomputes). This kernel has no SCTP
// sockets, so the packets are hand-made and caught with raw sockets (`support/sctp.rs`).
both_families!(sctp_cluster_ip_and_node_port_reach_the_endpoint);
fn sctp_cluster_ip_and_node_port_reach_the_endpoint(mode: Mode, f: Fam) {
    use crate::support::sctp::{Arrival, SctpCatcher, send_init};
    const SCTP: Port = Port::sctp("sig", 9999, 9000).with_node_port(30099);
    let mut s = Scenario::with_manifests_in(mode);
    s.apply(
        &Svc::new("sig", &[&f.a("10.96.1.11")], &[SCTP])
            .node_port()
            .json(),
    );
    s.apply(&endpoint_slice(
        "sig",
        &format!("sig-{}", f.suffix()),
        &eps_on(&[f.pod(0)], OTHER_NODE),
        &[SCTP],
    ));
    let catcher = SctpCatcher::new(&s.topo.endpoints, f.v6());
    s.start_kproxy(&[]);
    let want = Arrival {
        dst: ip(f.pod(0)),
        dst_port: 9000,
    };
    let vip = sock(&f.a("10.96.1.11"), 9999);
    let np = sock(f.node_ip(), 30099);
    for (what, dst, base_tag) in [
        ("ClusterIP", vip, 0x5c70_0000u32),
        ("NodePort", np, 0x5c71_0000),
    ] {
        // Resend until the rules are in (a packet sent before them goes nowhere).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut tag = base_tag;
        let got = loop {
            tag += 1;
            send_init(&s.topo.client, dst, 40000 + (tag & 0xff) as u16, tag);
            if let Some(a) = catcher.catch(tag, Duration::from_millis(200)) {
                break Some(a);
            }
            if std::time::Instant::now() > deadline {
                break None;
            }
        };
        if got.is_none() {
            s.kproxy().assert_running();
        }
        assert_eq!(got, Some(want), "SCTP {what} {dst}");
    }
    // A port the service does not have is not translated.
    let stray = sock(&f.a("10.96.1.11"), 9998);
    send_init(&s.topo.client, stray, 40999, 0x5c72_0001);
    assert_eq!(
        catcher.catch(0x5c72_0001, Duration::from_millis(300)),
        None,
        "an INIT to {stray} reached the endpoint"
    );
    s.kproxy().assert_running();
}

// --- (m) REJECT and DROP without a service to reach -------------------------------------------

// A service without endpoints is refused (REJECT) in both modes. The nftables mode also refuses
// a port no service uses on a live ClusterIP, and drops packets to an unallocated address of the
// service CIDR (upstream's nftables-only refinements, docs/semantics.md rule 24); the iptables mode
// leaves both to routing, here a black hole, so they time out.
both_families!(services_without_a_target_are_rejected_or_dropped);
fn services_without_a_target_are_rejected_or_dropped(mode: Mode, f: Fam) {
    let mut s = Scenario::with_manifests_in(mode);
    s.tcp_server(f.pod(0), 8080, "ep1");
    s.apply(&Svc::new("web", &[&f.a("10.96.0.10")], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "web",
        &format!("web-{}", f.suffix()),
        &eps_on(&[f.pod(0)], OTHER_NODE),
        &[HTTP],
    ));
    s.apply(&Svc::new("empty", &[&f.a("10.96.0.20")], &[HTTP]).json());
    s.start_kproxy(&[]);
    wait_tcp(&mut s, sock(&f.a("10.96.0.10"), 80), "ep1");
    // Over IPv6 the refusal comes with the first SYN retransmission (see
    // ipv6_nodeport_and_reject_without_endpoints): allow for it.
    let refused_within = if f.v6() {
        Duration::from_millis(1500)
    } else {
        Duration::from_millis(300)
    };
    let empty = sock(&f.a("10.96.0.20"), 80);
    assert_tcp_refused(&s.topo.client, Some(f.client(1)), empty, refused_within);

    let unused_port = sock(&f.a("10.96.0.10"), 81);
    let unallocated = sock(&f.a("10.96.0.99"), 80);
    match mode {
        Mode::Nftables => {
            assert_tcp_refused(
                &s.topo.client,
                Some(f.client(2)),
                unused_port,
                refused_within,
            );
        }
        Mode::Iptables => {
            let r = tcp_request_from(&s.topo.client, Some(f.client(2)), unused_port, DROPPED);
            assert_timed_out(&format!("{unused_port} (iptables mode routes it)"), &r);
        }
    }
    let r = tcp_request_from(&s.topo.client, Some(f.client(3)), unallocated, DROPPED);
    assert_timed_out(&format!("{unallocated} (unallocated service address)"), &r);
    s.kproxy().assert_running();
}
