//! IPVS end-to-end tests. They run inside the lab guest (a Debian kernel with `ip_vs`), driven
//! by [`crate::host`]; on a kernel without IPVS they cannot work, hence `#[ignore]`.
//!
//! Each test builds the standard client / node / endpoints namespaces, runs kproxy in ipvs mode
//! in the node namespace and sends real TCP and UDP traffic through the virtual servers.

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use kproxy_contract::Protocol;
use kproxy_ipvs::model::VsConfig;
use kproxy_ipvs::{IpvsKernel as _, IpvsOp, IpvsTimeouts, RsKey, SystemKernel, VsKey};

use crate::support::kproxy::wait_until;
use crate::support::manifests::Port;
use crate::support::objects::{Ep, Svc, endpoint_slice};
use crate::support::scenario::{
    DROPPED, NODE, OTHER_NODE, PROBE, REQ, SYNC, Scenario, assert_spread, assert_timed_out, sock,
};
use crate::support::topology::{NODE_IP, POD_V4, POD_V6, client_v4};
use crate::support::traffic::{
    assert_tcp_refused, split_peer, tally, tcp_request, tcp_request_from, udp_request,
};

const HTTP: Port = Port::tcp("http", 80, 8080);
const DNS: Port = Port::udp("dns", 53, 5353);
const NODE_PORT: u16 = 30080;
/// The node's address on the pods' link: what masqueraded connections come from.
const NODE_POD_SIDE: &str = "10.0.2.1";

fn eps(addrs: &[&str], node: &str) -> Vec<Ep> {
    addrs.iter().map(|a| Ep::ready(a).on(node)).collect()
}

fn ipvs(s: &Scenario) -> String {
    s.save(false)
}

fn wait_tcp(s: &mut Scenario, dst: SocketAddr) {
    s.wait_for_result(
        &format!("tcp {dst}"),
        |t| tcp_request(&t.client, dst, PROBE),
        |r| r.is_ok(),
    );
}

#[test]
#[ignore = "needs IPVS: runs inside the lab guest (tests/ipvs-lab/run.sh)"]
fn clusterip_tcp_spreads_over_endpoints_and_masquerades_outside_sources() {
    let mut s = Scenario::with_manifests_ipvs();
    s.tcp_server_reporting_peer(POD_V4[0], 8080, "ep1");
    s.tcp_server_reporting_peer(POD_V4[1], 8080, "ep2");
    s.tcp_server(POD_V6[0], 8080, "ep6");
    s.apply(&Svc::new("web", &["10.96.1.1", "fd00:96::1"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "web",
        "web-v4",
        &eps(&[POD_V4[0], POD_V4[1]], OTHER_NODE),
        &[HTTP],
    ));
    s.apply(&endpoint_slice(
        "web",
        "web-v6",
        &eps(&[POD_V6[0]], OTHER_NODE),
        &[HTTP],
    ));
    s.start_kproxy(&[]);

    let vip = sock("10.96.1.1", 80);
    wait_tcp(&mut s, vip);
    let seen = tally(40, || {
        tcp_request(&s.topo.client, vip, REQ).map(|a| split_peer(&a).0.to_string())
    });
    assert_spread(&seen, &["ep1", "ep2"], 10);
    // The client is outside the pod network: masqueraded to the node's pod-side address.
    let answer = tcp_request(&s.topo.client, vip, REQ).unwrap();
    assert_eq!(split_peer(&answer).1, NODE_POD_SIDE, "{answer}");
    // IPv6 through its own virtual server.
    let vip6 = sock("fd00:96::1", 80);
    wait_tcp(&mut s, vip6);
    assert_eq!(tcp_request(&s.topo.client, vip6, REQ).unwrap(), "ep6");
    let table = ipvs(&s);
    assert!(table.contains("TCP  10.96.1.1:80 rr"), "{table}");
    assert!(table.contains("TCP  [fd00:96::1]:80 rr"), "{table}");
    // The address is on kproxy's dummy interface; an unserved port on it is rejected.
    let addrs = s
        .topo
        .node
        .run("ip", &["-o", "addr", "show", "dev", "kproxy-ipvs0"]);
    assert!(addrs.contains("10.96.1.1/32"), "{addrs}");
    assert_tcp_refused(
        &s.topo.client,
        None,
        sock("10.96.1.1", 22),
        Duration::from_secs(1),
    );
}

#[test]
#[ignore = "needs IPVS: runs inside the lab guest (tests/ipvs-lab/run.sh)"]
fn clusterip_udp_reaches_every_endpoint() {
    let mut s = Scenario::with_manifests_ipvs();
    s.udp_server(POD_V4[0], 5353, "u1");
    s.udp_server(POD_V4[1], 5353, "u2");
    s.apply(&Svc::new("dns", &["10.96.0.10"], &[DNS]).json());
    s.apply(&endpoint_slice(
        "dns",
        "dns-v4",
        &eps(&[POD_V4[0], POD_V4[1]], OTHER_NODE),
        &[DNS],
    ));
    s.start_kproxy(&[]);
    let vip = sock("10.96.0.10", 53);
    s.wait_for_result("udp", |t| udp_request(&t.client, vip, PROBE), |r| r.is_ok());
    // Each request comes from a new socket (a new source port): a new IPVS connection.
    let seen = tally(30, || udp_request(&s.topo.client, vip, REQ));
    assert_spread(&seen, &["u1", "u2"], 5);
    assert!(ipvs(&s).contains("UDP  10.96.0.10:53 rr"), "{}", ipvs(&s));
}

#[test]
#[ignore = "needs IPVS: runs inside the lab guest (tests/ipvs-lab/run.sh)"]
fn nodeport_is_served_on_the_node_addresses_with_the_chosen_scheduler() {
    let mut s = Scenario::with_manifests_ipvs();
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.tcp_server(POD_V4[1], 8080, "ep2");
    let np = HTTP.with_node_port(NODE_PORT);
    s.apply(&Svc::new("np", &["10.96.1.2"], &[np]).node_port().json());
    s.apply(&endpoint_slice(
        "np",
        "np-v4",
        &eps(&[POD_V4[0], POD_V4[1]], OTHER_NODE),
        &[np],
    ));
    s.start_kproxy(&["--ipvs-scheduler", "wrr"]);
    let dst = sock(NODE_IP, NODE_PORT);
    wait_tcp(&mut s, dst);
    let seen = tally(30, || tcp_request(&s.topo.client, dst, REQ));
    assert_spread(&seen, &["ep1", "ep2"], 5);
    let table = ipvs(&s);
    assert!(
        table.contains(&format!("TCP  {NODE_IP}:{NODE_PORT} wrr")),
        "{table}"
    );
    // Every node address gets one (the pods' side too), loopback none.
    assert!(
        table.contains(&format!("TCP  {NODE_POD_SIDE}:{NODE_PORT} wrr")),
        "{table}"
    );
    assert!(!table.contains("127.0.0.1"), "{table}");
}

#[test]
#[ignore = "needs IPVS: runs inside the lab guest (tests/ipvs-lab/run.sh)"]
fn a_service_without_endpoints_refuses_connections() {
    let mut s = Scenario::with_manifests_ipvs();
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.apply(&Svc::new("empty", &["10.96.1.3"], &[HTTP]).json());
    s.apply(&endpoint_slice("empty", "empty-v4", &[], &[HTTP]));
    s.apply(&Svc::new("full", &["10.96.1.4"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "full",
        "full-v4",
        &eps(&[POD_V4[0]], OTHER_NODE),
        &[HTTP],
    ));
    s.start_kproxy(&[]);
    wait_tcp(&mut s, sock("10.96.1.4", 80));
    assert!(ipvs(&s).contains("TCP  10.96.1.3:80 rr"), "{}", ipvs(&s));
    // IPVS answers a virtual server without real servers with ICMP port unreachable.
    assert_tcp_refused(
        &s.topo.client,
        None,
        sock("10.96.1.3", 80),
        Duration::from_secs(1),
    );
}

#[test]
#[ignore = "needs IPVS: runs inside the lab guest (tests/ipvs-lab/run.sh)"]
fn client_ip_affinity_pins_each_client_to_one_endpoint() {
    let mut s = Scenario::with_manifests_ipvs();
    for (i, id) in ["ep1", "ep2", "ep3"].iter().enumerate() {
        s.tcp_server(POD_V4[i], 8080, id);
    }
    s.apply(
        &Svc::new("sticky", &["10.96.1.5"], &[HTTP])
            .client_ip_affinity(600)
            .json(),
    );
    s.apply(&endpoint_slice(
        "sticky",
        "sticky-v4",
        &eps(&[POD_V4[0], POD_V4[1], POD_V4[2]], OTHER_NODE),
        &[HTTP],
    ));
    s.start_kproxy(&[]);
    let vip = sock("10.96.1.5", 80);
    wait_tcp(&mut s, vip);
    assert!(ipvs(&s).contains("persistent 600"), "{}", ipvs(&s));
    let mut chosen = BTreeSet::new();
    for i in 0..6 {
        let src = Some(client_v4(i));
        let seen = tally(8, || tcp_request_from(&s.topo.client, src, vip, REQ));
        assert_eq!(seen.len(), 1, "client {src:?} was spread: {seen:?}");
        chosen.extend(seen.into_keys());
    }
    assert!(chosen.len() >= 2, "six clients all pinned to {chosen:?}");
}

#[test]
#[ignore = "needs IPVS: runs inside the lab guest (tests/ipvs-lab/run.sh)"]
fn external_policy_local_keeps_the_source_and_drops_without_local_endpoints() {
    let mut s = Scenario::with_manifests_ipvs();
    s.tcp_server_reporting_peer(POD_V4[0], 8080, "local");
    s.tcp_server_reporting_peer(POD_V4[1], 8080, "remote");
    let np = HTTP.with_node_port(NODE_PORT);
    s.apply(
        &Svc::new("etp", &["10.96.1.6"], &[np])
            .node_port()
            .external_policy("Local")
            .json(),
    );
    let mut list = eps(&[POD_V4[0]], NODE);
    list.extend(eps(&[POD_V4[1]], OTHER_NODE));
    s.apply(&endpoint_slice("etp", "etp-v4", &list, &[np]));
    let np2 = Port::tcp("http", 80, 8080).with_node_port(NODE_PORT + 1);
    s.apply(
        &Svc::new("etp-none", &["10.96.1.7"], &[np2])
            .node_port()
            .external_policy("Local")
            .json(),
    );
    s.apply(&endpoint_slice(
        "etp-none",
        "etp-none-v4",
        &eps(&[POD_V4[1]], OTHER_NODE),
        &[np2],
    ));
    s.start_kproxy(&[]);

    let dst = sock(NODE_IP, NODE_PORT);
    wait_tcp(&mut s, dst);
    let seen = tally(20, || tcp_request(&s.topo.client, dst, REQ));
    let client = client_v4(0).to_string();
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        [format!("local from {client}")],
        "only the local endpoint, and the client's own address"
    );
    // The ClusterIP (internal policy Cluster) still uses both.
    let vip = sock("10.96.1.6", 80);
    let ids = tally(30, || {
        tcp_request(&s.topo.client, vip, REQ).map(|a| split_peer(&a).0.to_string())
    });
    assert_spread(&ids, &["local", "remote"], 3);
    // No local endpoint: dropped (not refused), as upstream's other modes.
    let r = tcp_request(&s.topo.client, sock(NODE_IP, NODE_PORT + 1), DROPPED);
    assert_timed_out("ETP=Local without local endpoints", &r);
}

/// A TCP server that answers its identity and then echoes until the client closes: a
/// long-lived connection.
fn holding_server(
    s: &Scenario,
    addr: SocketAddr,
    identity: &'static str,
) -> std::thread::JoinHandle<()> {
    let listener = s
        .topo
        .endpoints
        .in_ns(move || TcpListener::bind(addr))
        .unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let _ = conn.write_all(identity.as_bytes());
                let mut buf = [0u8; 64];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    })
}

#[test]
#[ignore = "needs IPVS: runs inside the lab guest (tests/ipvs-lab/run.sh)"]
fn a_removed_endpoint_drains_gracefully_then_goes() {
    let mut s = Scenario::with_manifests_ipvs();
    s.tcp_server(POD_V4[0], 8080, "ep1");
    let _holder = holding_server(&s, sock(POD_V4[1], 8080), "ep2");
    s.apply(&Svc::new("drain", &["10.96.1.8"], &[HTTP]).json());
    // ep2 joins only after the first probes: a connection to it that closed normally would sit
    // in TIME_WAIT (two minutes of "inactive") and hold the drain open.
    s.apply(&endpoint_slice(
        "drain",
        "drain-v4",
        &eps(&[POD_V4[0]], OTHER_NODE),
        &[HTTP],
    ));
    s.start_kproxy(&[]);
    let vip = sock("10.96.1.8", 80);
    wait_tcp(&mut s, vip);
    s.apply(&endpoint_slice(
        "drain",
        "drain-v4",
        &eps(&[POD_V4[0], POD_V4[1]], OTHER_NODE),
        &[HTTP],
    ));
    let rs = format!("{}:8080", POD_V4[1]);
    assert!(
        wait_until(SYNC, || ipvs(&s).contains(&rs)),
        "ep2 never added:\n{}",
        ipvs(&s)
    );

    // A long-lived connection to ep2. Every client socket here ends with a reset (IPVS: CLOSE,
    // 10 s), never a normal close.
    let mut held = None;
    for _ in 0..40 {
        let mut c = s
            .topo
            .client
            .in_ns(move || TcpStream::connect_timeout(&vip, REQ))
            .unwrap();
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        c.set_read_timeout(Some(REQ)).unwrap();
        let mut id = [0u8; 3];
        c.read_exact(&mut id).unwrap();
        if &id == b"ep2" {
            held = Some(c);
            break;
        }
    }
    let mut held = held.expect("rr never chose ep2");

    // ep2 leaves the slice: weight 0, its connection keeps working, new ones go to ep1.
    s.apply(&endpoint_slice(
        "drain",
        "drain-v4",
        &eps(&[POD_V4[0]], OTHER_NODE),
        &[HTTP],
    ));
    let drained = wait_until(SYNC, || {
        ipvs(&s)
            .lines()
            .any(|l| l.contains(&rs) && l.split_whitespace().nth(3) == Some("0"))
    });
    assert!(drained, "ep2 never got weight 0:\n{}", ipvs(&s));
    let seen = tally(10, || tcp_request(&s.topo.client, vip, REQ));
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), ["ep1"]);
    held.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    held.read_exact(&mut back).unwrap();
    assert_eq!(
        &back, b"ping",
        "the established connection survives the drain"
    );
    // Still there while the connection lives (several syncs later).
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        ipvs(&s).contains(&rs),
        "removed while a connection was open:\n{}",
        ipvs(&s)
    );

    // The client resets the connection (IPVS: CLOSE, 10 s): then the next syncs remove ep2.
    drop(held);
    let gone = wait_until(Duration::from_secs(40), || !ipvs(&s).contains(&rs));
    assert!(gone, "ep2 was never removed:\n{}", ipvs(&s));
}

#[test]
#[ignore = "needs IPVS: runs inside the lab guest (tests/ipvs-lab/run.sh)"]
fn cleanup_removes_only_kproxys_virtual_servers_interface_and_table() {
    let mut s = Scenario::with_manifests_ipvs();
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.apply(&Svc::new("c", &["10.96.1.9"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "c",
        "c-v4",
        &eps(&[POD_V4[0]], OTHER_NODE),
        &[HTTP],
    ));
    // Someone else's virtual server on an address that is not this node's.
    s.topo
        .node
        .run("ipvsadm", &["-A", "-t", "192.0.2.50:443", "-s", "wlc"]);
    s.start_kproxy(&[]);
    wait_tcp(&mut s, sock("10.96.1.9", 80));
    // A restart (read-back of the live state) keeps the foreign one and changes nothing.
    drop(s.kproxy.take());
    s.start_kproxy(&[]);
    std::thread::sleep(Duration::from_secs(2));
    s.kproxy().assert_running();
    assert_eq!(
        tcp_request(&s.topo.client, sock("10.96.1.9", 80), REQ).unwrap(),
        "ep1"
    );
    assert!(ipvs(&s).contains("192.0.2.50:443"), "{}", ipvs(&s));
    drop(s.kproxy.take());

    let (p, status) = crate::support::kproxy::KproxyProcess::run(
        &s.topo.node,
        &["--cleanup"],
        Duration::from_secs(30),
    );
    assert!(status.success(), "{}", p.stderr());
    let table = ipvs(&s);
    assert!(!table.contains("10.96.1.9"), "{table}");
    assert!(table.contains("TCP  192.0.2.50:443 wlc"), "{table}");
    let links = s.topo.node.run("ip", &["-o", "link"]);
    assert!(!links.contains("kproxy-ipvs0"), "{links}");
    let tables = s.topo.node.run("nft", &["list", "tables"]);
    assert!(!tables.contains("kproxy-ipvs"), "{tables}");
}

/// IPVS's connection timeouts in the node namespace, read with kproxy's own `GET_CONFIG`.
fn node_timeouts(s: &Scenario) -> IpvsTimeouts {
    s.topo
        .node
        .in_ns(|| SystemKernel::new().timeouts().map_err(|e| e.to_string()))
        .expect("IPVS_CMD_GET_CONFIG in the node namespace")
}

/// The kernel's defaults in a fresh namespace (`ipvsadm -L --timeout`: 900 120 300).
const KERNEL_TIMEOUTS: IpvsTimeouts = IpvsTimeouts {
    tcp: 900,
    tcp_fin: 120,
    udp: 300,
};

/// One service with one endpoint, for the tests of start-up settings.
fn one_service(s: &mut Scenario, name: &str, vip: &str) -> SocketAddr {
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.apply(&Svc::new(name, &[vip], &[HTTP]).json());
    s.apply(&endpoint_slice(
        name,
        &format!("{name}-v4"),
        &eps(&[POD_V4[0]], OTHER_NODE),
        &[HTTP],
    ));
    sock(vip, 80)
}

/// From the client, `vip` as an on-link address of its link to the node: the client asks by
/// ARP who has it, and only a node that answers ARP for its service addresses gets the
/// connection. (Normally the client routes through the node and never asks.)
fn on_link(s: &Scenario, vip: SocketAddr) {
    let host = format!("{}/32", vip.ip());
    let dev = s.topo.client_dev.clone();
    s.topo.client.ip(&["route", "add", &host, "dev", &dev]);
}

#[test]
#[ignore = "needs IPVS: runs inside the lab guest (tests/ipvs-lab/run.sh)"]
fn ipvs_timeouts_are_set_at_start_and_a_zero_leaves_the_kernels() {
    let mut s = Scenario::with_manifests_ipvs();
    let vip = one_service(&mut s, "timeouts", "10.96.1.30");
    assert_eq!(node_timeouts(&s), KERNEL_TIMEOUTS);
    let arp = |s: &Scenario| {
        (
            s.topo.node.sysctl_get("net.ipv4.conf.all.arp_ignore"),
            s.topo.node.sysctl_get("net.ipv4.conf.all.arp_announce"),
        )
    };
    let arp_before = arp(&s);
    s.start_kproxy(&["--ipvs-tcp-timeout=901s", "--ipvs-udp-timeout=31s"]);
    // Served: the first apply, and the start-up settings before it, are done.
    wait_tcp(&mut s, vip);
    let want = IpvsTimeouts {
        tcp: 901,
        tcp_fin: KERNEL_TIMEOUTS.tcp_fin,
        udp: 31,
    };
    assert_eq!(node_timeouts(&s), want, "{}", s.kproxy().stderr());
    let listed = s.topo.node.run("ipvsadm", &["-L", "--timeout"]);
    assert!(
        listed.contains("Timeout (tcp tcpfin udp): 901 120 31"),
        "{listed}"
    );
    // Strict ARP is off: the ARP sysctls are untouched, and the node answers ARP for its
    // service addresses on every link (what --ipvs-strict-arp is for).
    assert_eq!(arp(&s), arp_before);
    on_link(&s, vip);
    s.wait_for_result(
        "a connection to an on-link ClusterIP",
        |t| tcp_request(&t.client, vip, REQ),
        |r| r.as_deref().is_ok_and(|a| a == "ep1"),
    );
    drop(s.kproxy.take());

    // The kernel's side of "zero leaves it" (ip_vs_set_timeout), through kproxy's own
    // SET_CONFIG: each zero keeps the current value.
    let set = |s: &Scenario, t: IpvsTimeouts| {
        s.topo
            .node
            .in_ns(move || {
                SystemKernel::new()
                    .set_timeouts(&t)
                    .map_err(|e| e.to_string())
            })
            .expect("IPVS_CMD_SET_CONFIG");
    };
    set(
        &s,
        IpvsTimeouts {
            tcp: 902,
            tcp_fin: 0,
            udp: 0,
        },
    );
    let after_tcp = IpvsTimeouts { tcp: 902, ..want };
    assert_eq!(node_timeouts(&s), after_tcp);
    set(
        &s,
        IpvsTimeouts {
            tcp: 0,
            tcp_fin: 0,
            udp: 45,
        },
    );
    let after_udp = IpvsTimeouts {
        udp: 45,
        ..after_tcp
    };
    assert_eq!(node_timeouts(&s), after_udp);

    // A kproxy without timeout flags sends no SET_CONFIG: the values stay.
    s.start_kproxy(&[]);
    wait_tcp(&mut s, vip);
    assert_eq!(node_timeouts(&s), after_udp);
}

#[test]
#[ignore = "needs IPVS: runs inside the lab guest (tests/ipvs-lab/run.sh)"]
fn strict_arp_sets_arp_ignore_and_arp_announce_and_hides_service_addresses_from_arp() {
    let mut s = Scenario::with_manifests_ipvs();
    let vip = one_service(&mut s, "strict", "10.96.1.31");
    let ignore = "net.ipv4.conf.all.arp_ignore";
    let announce = "net.ipv4.conf.all.arp_announce";
    let before = (
        s.topo.node.sysctl_get(ignore),
        s.topo.node.sysctl_get(announce),
    );
    assert_ne!(before, ("1".to_string(), "2".to_string()), "already strict");
    s.start_kproxy(&["--ipvs-strict-arp"]);
    wait_tcp(&mut s, vip);
    assert_eq!(
        s.topo.node.sysctl_get(ignore),
        "1",
        "{}",
        s.kproxy().stderr()
    );
    assert_eq!(s.topo.node.sysctl_get(announce), "2");
    // The node no longer answers ARP for an address that is not on the asking link: the
    // on-link ClusterIP stays unresolved, while the routed one works.
    on_link(&s, vip);
    let r = tcp_request(&s.topo.client, vip, Duration::from_secs(3));
    assert!(r.is_err(), "answered by ARP: {r:?}");
    let neigh = s
        .topo
        .client
        .run("ip", &["neigh", "show", &vip.ip().to_string()]);
    assert!(!neigh.contains("lladdr"), "{neigh}");
    // No timeout flag: IPVS's timeouts are the kernel's.
    assert_eq!(node_timeouts(&s), KERNEL_TIMEOUTS);
    s.kproxy().assert_running();
}

#[test]
#[ignore = "needs IPVS: runs inside the lab guest (tests/ipvs-lab/run.sh)"]
fn a_foreign_virtual_server_inside_exclude_cidrs_survives_kproxys_syncs() {
    let mut s = Scenario::with_manifests_ipvs();
    let vip = one_service(&mut s, "own", "10.96.1.32");
    // Other software's virtual servers, made before kproxy starts: two on node addresses
    // (which kproxy owns for NodePorts), one inside the excluded range and one outside it,
    // and one on an address that is not the node's.
    let key = |addr: &str, port| VsKey {
        addr: addr.parse().unwrap(),
        protocol: Protocol::Tcp,
        port,
    };
    let inside = key(NODE_IP, 8443);
    let outside = key(NODE_POD_SIDE, 8443);
    let elsewhere = key("192.0.2.60", 443);
    let foreign_rs = RsKey {
        addr: "192.168.50.7".parse().unwrap(),
        port: 8443,
    };
    s.topo
        .node
        .in_ns(move || {
            let config = VsConfig {
                scheduler: "wlc".into(),
                persistence: None,
            };
            SystemKernel::new().execute(&[
                IpvsOp::AddService(inside, config.clone()),
                IpvsOp::AddDest(inside, foreign_rs, 3),
                IpvsOp::AddService(outside, config.clone()),
                IpvsOp::AddService(elsewhere, config),
            ])
        })
        .map_err(|e| e.to_string())
        .expect("add the foreign virtual servers");
    let listed = ipvs(&s);
    assert!(listed.contains("TCP  10.0.1.1:8443 wlc"), "{listed}");
    assert!(listed.contains("TCP  10.0.2.1:8443 wlc"), "{listed}");

    let exclude = "--ipvs-exclude-cidrs=10.0.1.0/24,fd00:1::/64";
    s.start_kproxy(&[exclude]);
    wait_tcp(&mut s, vip);
    assert_eq!(tcp_request(&s.topo.client, vip, REQ).unwrap(), "ep1");
    // The first sync is a full one (the kernel read back): the unprotected one on a node
    // address is deleted as before, the protected one stays with its real server.
    assert!(
        wait_until(SYNC, || !ipvs(&s).contains("10.0.2.1:8443")),
        "the foreign virtual server outside the excluded range was kept:
{}",
        ipvs(&s)
    );
    let check = |s: &Scenario| {
        let table = ipvs(s);
        assert!(table.contains("TCP  10.0.1.1:8443 wlc"), "{table}");
        assert!(table.contains("-> 192.168.50.7:8443"), "{table}");
        assert!(table.contains("TCP  192.0.2.60:443 wlc"), "{table}");
        assert!(table.contains("TCP  10.96.1.32:80 rr"), "{table}");
    };
    check(&s);

    // An incremental sync (a new service), periodic ones, and a restart (a full sync again).
    s.apply(&Svc::new("own2", &["10.96.1.33"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "own2",
        "own2-v4",
        &eps(&[POD_V4[0]], OTHER_NODE),
        &[HTTP],
    ));
    wait_tcp(&mut s, sock("10.96.1.33", 80));
    std::thread::sleep(Duration::from_secs(5));
    check(&s);
    drop(s.kproxy.take());
    s.start_kproxy(&[exclude]);
    std::thread::sleep(Duration::from_secs(5));
    s.kproxy().assert_running();
    assert_eq!(tcp_request(&s.topo.client, vip, REQ).unwrap(), "ep1");
    check(&s);
    let log = s.kproxy().stderr();
    let addrs = s
        .topo
        .node
        .run("ip", &["-o", "addr", "show", "dev", "kproxy-ipvs0"]);
    assert!(!log.contains("sync failed"), "{log}\n{addrs}");
}

/// The nftables mode on Debian 12's own kernel (6.1; the development host runs a much newer
/// one). Removing a ClientIP-affinity service deletes its chain in the same transaction as the
/// map element that jumped to it, which kernels before 6.2 refused while the element's reference
/// was still being released; every sync must succeed, first time.
#[test]
#[ignore = "runs inside the lab guest (tests/ipvs-lab/run.sh): a stock Debian 12 kernel"]
fn nftables_mode_on_the_stock_debian_kernel() {
    use crate::support::scenario::Mode;
    let mut s = Scenario::with_manifests_in(Mode::Nftables);
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.tcp_server(POD_V4[1], 8080, "ep2");
    s.apply(&Svc::new("web", &["10.96.1.20"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "web",
        "web-v4",
        &eps(&[POD_V4[0], POD_V4[1]], OTHER_NODE),
        &[HTTP],
    ));
    for i in 0..3u8 {
        let name = format!("sticky{i}");
        s.apply(
            &Svc::new(&name, &[&format!("10.96.1.{}", 21 + i)], &[HTTP])
                .client_ip_affinity(600)
                .json(),
        );
        s.apply(&endpoint_slice(
            &name,
            &format!("{name}-v4"),
            &eps(&[POD_V4[0], POD_V4[1]], OTHER_NODE),
            &[HTTP],
        ));
    }
    s.start_kproxy(&[]);
    let web = sock("10.96.1.20", 80);
    wait_tcp(&mut s, web);
    let seen = tally(30, || tcp_request(&s.topo.client, web, REQ));
    assert_spread(&seen, &["ep1", "ep2"], 3);
    wait_tcp(&mut s, sock("10.96.1.21", 80));
    assert!(s.save(false).contains("affinity"), "{}", s.save(false));

    // The affinity services go, one sync at a time and then together.
    for i in 0..3u8 {
        s.source.delete("Service", &format!("sticky{i}"));
        s.source.delete("EndpointSlice", &format!("sticky{i}-v4"));
        if i == 0 {
            s.wait_rules("sticky0 removed", false, |r| !r.contains("10.96.1.21 "));
        }
    }
    s.wait_rules("affinity chains removed", false, |r| {
        !r.contains("affinity") && !r.contains("10.96.1.23 ")
    });
    assert_eq!(
        tally(10, || tcp_request(&s.topo.client, web, REQ))
            .values()
            .sum::<usize>(),
        10
    );
    let log = s.kproxy().stderr();
    assert!(
        !log.contains("sync failed"),
        "a sync failed on the stock kernel:\n{log}"
    );
    s.kproxy().assert_running();
}

/// The installer corpus's ipvs cases (kubespray's default, GCE with `KUBE_PROXY_MODE=ipvs`) run
/// as the node's proxy: synced, /healthz and /metrics on exactly upstream's addresses, the OOM
/// score applied (the e2e tests check their effective values on the host).
#[test]
#[ignore = "needs IPVS: runs inside the lab guest (tests/ipvs-lab/run.sh)"]
fn installer_corpus_ipvs_cases_serve_probes_and_sync() {
    let hostname = crate::support::installers::hostname();
    let cases: Vec<_> = crate::support::installers::cases()
        .into_iter()
        .filter(|c| c.mode() == Some("ipvs"))
        .collect();
    assert!(cases.len() >= 2, "{} ipvs cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        match crate::support::installers::run_live(case, &hostname) {
            Ok(line) => println!("{line}"),
            Err(why) => failures.push(why),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// `--init-only` in ipvs mode does the mode's node set-up (strict ARP, IPVS timeouts) and exits
/// without programming a virtual server.
#[test]
#[ignore = "needs IPVS: runs inside the lab guest (tests/ipvs-lab/run.sh)"]
fn init_only_does_the_ipvs_node_setup_and_exits() {
    let node = crate::support::netns::Netns::new("init");
    let (p, status) = crate::support::kproxy::KproxyProcess::run(
        &node,
        &[
            "--proxy-mode=ipvs",
            "--init-only",
            "--master=https://10.96.0.1:443",
            "--hostname-override=node-a",
            "--ipvs-strict-arp",
            "--ipvs-tcp-timeout=777s",
        ],
        Duration::from_secs(20),
    );
    assert!(status.success(), "{}", p.stderr());
    assert_eq!(node.sysctl_get("net.ipv4.conf.all.arp_ignore").trim(), "1");
    assert_eq!(
        node.sysctl_get("net.ipv4.conf.all.arp_announce").trim(),
        "2"
    );
    let timeouts = node.in_ns(|| SystemKernel::new().timeouts().expect("GET_CONFIG"));
    assert_eq!(timeouts.tcp, 777, "{timeouts:?}");
    let servers = node.run("ipvsadm", &["-Ln"]);
    assert!(
        !servers
            .lines()
            .any(|l| l.starts_with("TCP") || l.starts_with("UDP")),
        "--init-only programmed virtual servers:\n{servers}"
    );
}

/// Two nftables kproxies in one namespace (a surge update) on the stock Debian kernel, which has
/// no `NFT_MSG_DESTROYSETELEM` (6.1): deletions are `DELSETELEM`, so whichever kproxy applies a
/// change second meets elements already deleted (ENOENT) and sends its batch again without
/// them, and chains are deleted as `add` then `delete`. Neither ever fails a sync.
#[test]
#[ignore = "runs inside the lab guest (tests/ipvs-lab/run.sh): a kernel before 6.3"]
fn two_nftables_kproxies_on_the_stock_debian_kernel() {
    use crate::support::kproxy::KproxyProcess;
    use crate::support::scenario::Mode;
    let mut s = Scenario::with_manifests_in(Mode::Nftables);
    for (i, id) in ["ep1", "ep2", "ep3"].into_iter().enumerate() {
        s.tcp_server(POD_V4[i], 8080, id);
    }
    let web = |n: usize| endpoint_slice("web", "web-v4", &eps(&POD_V4[..n], OTHER_NODE), &[HTTP]);
    s.apply(&Svc::new("web", &["10.96.1.30"], &[HTTP]).json());
    s.apply(&web(3));
    let a = s.spawn_kproxy(&["-v", "2"]);
    let synced = |k: &KproxyProcess| k.stderr().matches("sync complete").count();
    assert!(wait_until(SYNC, || synced(&a) > 0), "{}", a.stderr());
    let b = s.spawn_kproxy(&["-v", "2"]);
    assert!(wait_until(SYNC, || synced(&b) > 0), "{}", b.stderr());
    for i in 0..12 {
        let before = (synced(&a), synced(&b));
        match i % 4 {
            0 => s.apply(&web(1)),
            1 => s.apply(&web(3)),
            2 => {
                s.apply(&Svc::new("extra", &["10.96.1.31"], &[HTTP]).json());
                s.apply(&endpoint_slice(
                    "extra",
                    "extra-v4",
                    &eps(&POD_V4[..2], OTHER_NODE),
                    &[HTTP],
                ));
            }
            _ => {
                s.source.delete("EndpointSlice", "extra-v4");
                s.source.delete("Service", "extra");
            }
        }
        let failed = |k: &KproxyProcess| k.stderr().contains("sync failed");
        assert!(
            wait_until(SYNC, || (synced(&a) > before.0 || failed(&a))
                && (synced(&b) > before.1 || failed(&b))),
            "change {i} not synced"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_secs(1));
    let logs = format!("{}\n{}", a.stderr(), b.stderr());
    assert!(
        logs.contains("no NFT_MSG_DESTROYSETELEM"),
        "the probe should find no destroy on this kernel:\n{logs}"
    );
    let resent = logs.matches("applied without them").count();
    let failures: Vec<&str> = logs.lines().filter(|l| l.contains("sync failed")).collect();
    println!(
        "two nftables kproxies on the stock kernel: {} + {} syncs, {} batches sent again \
         without already deleted elements, {} failed syncs",
        synced(&a),
        synced(&b),
        resent,
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let seen = tally(10, || {
        tcp_request(&s.topo.client, sock("10.96.1.30", 80), REQ)
    });
    assert_eq!(seen.values().sum::<usize>(), 10, "{seen:?}");
}
