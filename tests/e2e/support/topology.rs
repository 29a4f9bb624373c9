//! The standard three-namespace scenario: a client, the node kproxy programs, and the pods.
//!
//! ```text
//!                         default via 10.0.9.254 / fd00:9::fe (upstream: a black hole)
//!  client                 node (kproxy, forwarding on)           endpoints (pods)
//!  10.0.1.2-9/24  ──veth── 10.0.1.1/24 | 10.0.2.1/24  ──veth── 10.0.2.2/24
//!  fd00:1::2-9/64          fd00:1::1/64 | fd00:2::1/64           fd00:2::2/64
//!  default via node        10.244.0.0/16, fd00:244::/56          10.244.1.10-13/32
//!                            via the endpoints namespace          fd00:244::10-13/128
//!                                                                 default via node
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::netns::{Netns, veth};

/// The node's address on the client side (its InternalIP).
pub(crate) const NODE_IP: &str = "10.0.1.1";
/// The node's IPv6 address on the client side.
pub(crate) const NODE_IP6: &str = "fd00:1::1";

/// The node's (unowned) default gateway, on its upstream link.
pub(crate) const UPSTREAM_GW: &str = "10.0.9.254";
/// The node's (unowned) IPv6 default gateway on the client side.
pub(crate) const UPSTREAM_GW6: &str = "fd00:9::fe";

/// Pod IPv4 addresses present in the endpoints namespace.
pub(crate) const POD_V4: [&str; 4] = ["10.244.1.10", "10.244.1.11", "10.244.1.12", "10.244.1.13"];
/// Pod IPv6 addresses present in the endpoints namespace.
pub(crate) const POD_V6: [&str; 4] = [
    "fd00:244::10",
    "fd00:244::11",
    "fd00:244::12",
    "fd00:244::13",
];

/// How many source addresses per family the client has (10.0.1.2.., fd00:1::2..).
pub(crate) const CLIENT_ADDRS: u8 = 8;

/// The three namespaces. Dropping it deletes them all.
#[derive(Debug)]
pub(crate) struct Topology {
    /// Where test traffic starts.
    pub(crate) client: Netns,
    /// Where kproxy runs and programs rules; routes between client and pods.
    pub(crate) node: Netns,
    /// Holds the pod IPs; echo servers listen here.
    pub(crate) endpoints: Netns,
    /// The client's interface towards the node (for extra client addresses).
    pub(crate) client_dev: String,
    /// The node's interface towards the client.
    pub(crate) node_uplink_dev: String,
}

impl Topology {
    /// Builds the scenario in fresh namespaces.
    pub(crate) fn new() -> Topology {
        let client = Netns::new("client");
        let node = Netns::new("node");
        let endpoints = Netns::new("ep");
        node.enable_forwarding();

        let mut client_addrs: Vec<String> = Vec::new();
        for i in 0..CLIENT_ADDRS {
            client_addrs.push(format!("{}/24", client_v4(i)));
            client_addrs.push(format!("{}/64", client_v6(i)));
        }
        let client_refs: Vec<&str> = client_addrs.iter().map(String::as_str).collect();
        let uplink = veth(
            &client,
            &client_refs,
            &node,
            &[&format!("{NODE_IP}/24"), &format!("{NODE_IP6}/64")],
        );
        client.route("default", NODE_IP);
        client.route("default", NODE_IP6);
        // A real node routes everything (a default route upstream), so a packet to a service IP
        // without DNAT reaches the filter FORWARD chain (REJECT) instead of failing the route
        // lookup. Upstream is a veth pair with both ends in the node: the gateway is a permanent
        // neighbour nobody owns, so the far end drops what it receives (not its MAC), a silent
        // black hole. Not the client's link: forwarding a packet back out the interface it came
        // in sends an ICMP redirect, which spends the client's ICMP budget and swallows the
        // REJECT's port-unreachable.
        let upstream = veth(&node, &["10.0.9.1/24", "fd00:9::1/64"], &node, &[]);
        for gw in [UPSTREAM_GW, UPSTREAM_GW6] {
            node.ip(&[
                "neigh",
                "add",
                gw,
                "lladdr",
                "02:00:00:00:00:fe",
                "dev",
                &upstream.a_dev,
                "nud",
                "permanent",
            ]);
            node.route("default", gw);
        }

        let mut pod_addrs = vec!["10.0.2.2/24".to_string(), "fd00:2::2/64".to_string()];
        pod_addrs.extend(POD_V4.iter().map(|a| format!("{a}/32")));
        pod_addrs.extend(POD_V6.iter().map(|a| format!("{a}/128")));
        let pod_refs: Vec<&str> = pod_addrs.iter().map(String::as_str).collect();
        let downlink = veth(
            &node,
            &["10.0.2.1/24", "fd00:2::1/64"],
            &endpoints,
            &pod_refs,
        );
        node.route("10.244.0.0/16", "10.0.2.2");
        node.route("fd00:244::/56", "fd00:2::2");
        endpoints.route("default", "10.0.2.1");
        endpoints.route("default", "fd00:2::1");
        for link in [&uplink, &downlink, &upstream] {
            link.wait_up();
        }

        Topology {
            client,
            node,
            endpoints,
            client_dev: uplink.a_dev.clone(),
            node_uplink_dev: uplink.b_dev.clone(),
        }
    }
}

/// The client's `i`-th IPv4 address (0 is 10.0.1.2, the primary).
pub(crate) fn client_v4(i: u8) -> IpAddr {
    assert!(i < CLIENT_ADDRS, "the client has {CLIENT_ADDRS} addresses");
    IpAddr::V4(Ipv4Addr::new(10, 0, 1, 2 + i))
}

/// The client's `i`-th IPv6 address (0 is fd00:1::2, the primary).
pub(crate) fn client_v6(i: u8) -> IpAddr {
    assert!(i < CLIENT_ADDRS, "the client has {CLIENT_ADDRS} addresses");
    IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2 + u16::from(i)))
}

/// The harness itself, without kproxy: the client reaches pods through the node.
#[test]
fn topology_routes_client_to_pods() {
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::traffic::{TcpEcho, UdpEcho, tcp_request, tcp_request_from, udp_request};

    if !super::require_root("topology_routes_client_to_pods") {
        return;
    }
    let topo = Topology::new();
    // Sysctls went to the node's namespace, and only there.
    assert_eq!(topo.node.sysctl_get("net.ipv4.ip_forward"), "1");
    assert_eq!(topo.client.sysctl_get("net.ipv4.ip_forward"), "0");
    assert_eq!(
        topo.node
            .run("cat", &["/proc/sys/net/ipv6/conf/all/forwarding"])
            .trim(),
        "1"
    );
    let t = Duration::from_secs(2);
    let v4 = SocketAddr::new(POD_V4[0].parse().expect("ip"), 8080);
    let v6 = SocketAddr::new(POD_V6[1].parse().expect("ip"), 8080);
    let _a = TcpEcho::start(&topo.endpoints, v4, "ep1");
    let _b = TcpEcho::start(&topo.endpoints, v6, "ep2");
    let _c = UdpEcho::start(&topo.endpoints, v4, "u1");
    assert_eq!(tcp_request(&topo.client, v4, t).expect("tcp v4"), "ep1");
    assert_eq!(tcp_request(&topo.client, v6, t).expect("tcp v6"), "ep2");
    assert_eq!(
        tcp_request_from(&topo.client, Some(client_v4(5)), v4, t).expect("tcp v4 from .7"),
        "ep1"
    );
    assert_eq!(udp_request(&topo.client, v4, t).expect("udp v4"), "u1");
    // Nothing listens on 8081: the endpoints namespace answers with an RST.
    super::traffic::assert_tcp_refused(
        &topo.client,
        None,
        SocketAddr::new(v4.ip(), 8081),
        Duration::from_millis(300),
    );
}
