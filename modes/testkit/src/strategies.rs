//! proptest strategies for the tracers' property tests: small random states whose addresses
//! and ports come from small pools, and packets biased to hit them (service addresses and
//! ports, node ports, LB IPs inside and outside source ranges, unallocated service addresses,
//! pod, node and external sources), so a few hundred cases exercise every rule of
//! `docs/semantics.md`.
//! Nodes carry every kind of local-traffic detector (pod CIDR, none, bridge, name prefix) and
//! packets arrive on interfaces that do and do not match them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use kproxy_contract::{
    Endpoint, Endpoints, IpFamily, LocalTraffic, NodePortAddresses, NodeSettings, Protocol,
    ProxyState, ServicePort, ServicePortKey, ServicePortName, SessionAffinity, TrafficPolicy,
};
use kproxy_tracer::{Env, Origin, Packet};
use proptest::prelude::*;
use proptest::sample::{select, subsequence};

/// An address of the pools, in IPv4 or mapped into IPv6 (`fd00::` + the 32 IPv4 bits), so
/// an IPv6 state has the same shape (and the same containments) as its IPv4 twin.
fn addr(s: &str, v6: bool) -> IpAddr {
    let v4: std::net::Ipv4Addr = s.parse().unwrap();
    if v6 {
        IpAddr::V6(std::net::Ipv6Addr::from(
            (0xfd00u128 << 112) | u128::from(u32::from(v4)),
        ))
    } else {
        IpAddr::V4(v4)
    }
}

/// A CIDR of the pools, mapped like [`addr`] (prefix length + 96 in IPv6).
fn cidr(s: &str, v6: bool) -> IpNet {
    let (a, len) = s.split_once('/').unwrap();
    let len: u8 = len.parse().unwrap();
    IpNet::new(addr(a, v6), if v6 { len + 96 } else { len }).unwrap()
}

/// The node's addresses: the primary, and a second one only some states use for NodePorts.
pub const NODE_IPS: [&str; 2] = ["192.168.0.2", "192.168.0.3"];
const CLUSTER_IPS: [&str; 5] = [
    "10.96.0.1",
    "10.96.0.2",
    "10.96.0.3",
    "10.96.0.4",
    "10.96.0.5",
];
const EXTERNAL_IPS: [&str; 2] = ["203.0.113.1", "203.0.113.2"];
const LB_IPS: [&str; 2] = ["198.51.100.1", "198.51.100.2"];
const RANGES: [&str; 3] = ["100.64.0.0/24", "192.168.0.0/24", "10.244.1.0/24"];
const PORTS: [u16; 3] = [53, 80, 443];
const NODE_PORTS: [u16; 3] = [30001, 30002, 30003];
/// Local endpoints live in 10.244.1.0/24 (this node's pod range), remote ones in 10.244.2.0/24.
const ENDPOINTS: [(&str, u16, bool); 6] = [
    ("10.244.1.1", 8080, true),
    ("10.244.1.2", 8080, true),
    ("10.244.1.3", 9090, true),
    ("10.244.2.1", 8080, false),
    ("10.244.2.2", 8080, false),
    ("10.244.2.3", 9090, false),
];
/// Sources: local pods (also endpoints, for hairpin), a remote pod, external hosts (one
/// inside a source range), the node, an LB IP (the node-in-range case).
const SOURCES: [&str; 8] = [
    "10.244.1.1",
    "10.244.1.3",
    "10.244.2.1",
    "100.64.0.5",
    "172.16.0.9",
    "192.168.0.2",
    "198.51.100.1",
    "192.168.0.77",
];

/// The bridge of the bridge detector.
pub const BRIDGE: &str = "cbr0";
/// The prefix of the interface-name-prefix detector.
pub const IFACE_PREFIX: &str = "veth";
/// Interfaces packets arrive on: the bridge, the bare prefix and a veth (prefix matches), and
/// near misses of both (a longer bridge name, a shorter prefix), and the uplink.
const INTERFACES: [&str; 6] = ["cbr0", "veth", "veth7a", "cbr01", "vet0", "eth0"];

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![
        4 => Just(Protocol::Tcp),
        2 => Just(Protocol::Udp),
        1 => Just(Protocol::Sctp)
    ]
}

fn policy() -> impl Strategy<Value = TrafficPolicy> {
    prop_oneof![Just(TrafficPolicy::Cluster), Just(TrafficPolicy::Local)]
}

fn endpoints(v6: bool) -> impl Strategy<Value = Endpoints> {
    (
        subsequence(ENDPOINTS.to_vec(), 0..=4),
        any::<bool>(),
        0..3usize,
    )
        .prop_map(move |(picked, terminating_local, extra)| {
            let cluster: Vec<Endpoint> = picked
                .iter()
                .map(|(a, p, l)| Endpoint {
                    ip: addr(a, v6),
                    port: *p,
                    is_local: *l,
                })
                .collect();
            let mut local: Vec<Endpoint> = cluster.iter().copied().filter(|e| e.is_local).collect();
            // The Local list falls back to serving-terminating local endpoints on its own
            // (docs/semantics.md, rule 4): a local endpoint the Cluster list does not have.
            if local.is_empty() && terminating_local && !cluster.is_empty() {
                let (a, p, l) = ENDPOINTS[extra];
                local.push(Endpoint {
                    ip: addr(a, v6),
                    port: p,
                    is_local: l,
                });
            }
            let mut serving: Vec<Endpoint> = cluster.iter().chain(&local).copied().collect();
            serving.sort();
            serving.dedup();
            Endpoints {
                any: !cluster.is_empty(),
                local_ready: local.len(),
                cluster: cluster.into(),
                local,
                serving: serving.into(),
            }
        })
}

prop_compose! {
    fn service_port(i: usize, v6: bool)(
        protocol in protocol(),
        cluster_ip in proptest::option::weighted(0.9, select(CLUSTER_IPS.to_vec())),
        port in select(PORTS.to_vec()),
        node_port in proptest::option::weighted(0.5, select(NODE_PORTS.to_vec())),
        external_ips in subsequence(EXTERNAL_IPS.to_vec(), 0..=1),
        load_balancer_ips in subsequence(LB_IPS.to_vec(), 0..=2),
        source_ranges in subsequence(RANGES.to_vec(), 0..=2),
        affinity in proptest::option::weighted(0.2, select(vec![600u64, 10800])),
        external_policy in policy(),
        internal_policy in policy(),
        endpoints in endpoints(v6),
    ) -> ServicePort {
        ServicePort {
            name: ServicePortName {
                namespace: "ns".into(),
                name: format!("s{i}").into(),
                port: "p".into(),
                protocol,
            },
            family: if v6 { IpFamily::V6 } else { IpFamily::V4 },
            cluster_ip: cluster_ip.map(|a| addr(a, v6)),
            port,
            // A NodePort or LoadBalancer service always has a ClusterIP and a NodePort.
            node_port: if load_balancer_ips.is_empty() { node_port } else { node_port.or(Some(NODE_PORTS[i % 3])) },
            external_ips: external_ips.into_iter().map(|a| addr(a, v6)).collect(),
            source_ranges: if load_balancer_ips.is_empty() { Vec::new() } else { source_ranges.into_iter().map(|r| cidr(r, v6)).collect() },
            load_balancer_ips: load_balancer_ips.into_iter().map(|a| addr(a, v6)).collect(),
            affinity: affinity.map(|s| SessionAffinity { timeout: Duration::from_secs(s) }),
            external_policy,
            internal_policy,
            health_check_node_port: None,
            endpoints,
        }
    }
}

/// Every kind of local-traffic detector: the pod CIDR (upstream's default), none, a bridge, an
/// interface name prefix.
fn local_traffic(v6: bool) -> impl Strategy<Value = LocalTraffic> {
    prop_oneof![
        3 => Just(LocalTraffic::SourceCidrs(vec![cidr("10.244.0.0/16", v6)])),
        1 => Just(LocalTraffic::None),
        2 => Just(LocalTraffic::Interface(BRIDGE.into())),
        2 => Just(LocalTraffic::InterfacePrefix(IFACE_PREFIX.into())),
    ]
}

prop_compose! {
    fn node(v6: bool)(
        local_traffic in local_traffic(v6),
        masquerade_all in proptest::bool::weighted(0.2),
        two_ips in any::<bool>(),
        only_primary in any::<bool>(),
    ) -> NodeSettings {
        let node_ips: Vec<IpAddr> = NODE_IPS.iter().take(if two_ips { 2 } else { 1 }).map(|a| addr(a, v6)).collect();
        NodeSettings {
            node_name: "node-a".into(),
            node_port_addresses: if only_primary {
                NodePortAddresses::Only(vec![node_ips[0]])
            } else {
                NodePortAddresses::AllLocal
            },
            node_ips,
            local_traffic,
            service_cidrs: vec![cidr("10.96.0.0/16", v6)],
            masquerade_all,
            masquerade_bit: 14,
        }
    }
}

/// Drops the frontends a cluster could not have twice: an `address . protocol . port` or a
/// `protocol . NodePort` already used by an earlier service port, and the same address used
/// as two kinds of frontend.
fn dedupe(mut sps: Vec<ServicePort>) -> Vec<ServicePort> {
    let mut ip_frontends = BTreeSet::new();
    let mut node_ports = BTreeSet::new();
    let mut kind_of: BTreeMap<IpAddr, u8> = BTreeMap::new();
    for sp in &mut sps {
        let proto = sp.name.protocol;
        let mut claim = |addr: IpAddr, kind: u8| {
            kind_of.entry(addr).or_insert(kind) == &kind
                && ip_frontends.insert((addr, proto, sp.port))
        };
        if let Some(c) = sp.cluster_ip
            && !claim(c, 0)
        {
            sp.cluster_ip = None;
        }
        sp.external_ips.retain(|a| claim(*a, 1));
        sp.load_balancer_ips.retain(|a| claim(*a, 2));
        if sp.load_balancer_ips.is_empty() {
            sp.source_ranges.clear();
        }
        if let Some(np) = sp.node_port
            && !node_ports.insert((proto, np))
        {
            sp.node_port = None;
        }
    }
    sps
}

/// A random state: up to five service ports of one family (`v6`) on a node with one or two
/// addresses of that family.
pub fn state(v6: bool) -> impl Strategy<Value = ProxyState> {
    let sps = (0..5usize)
        .map(|i| service_port(i, v6))
        .collect::<Vec<_>>()
        .prop_flat_map(|all| (Just(all), 0..=5usize))
        .prop_map(|(all, n)| all.into_iter().take(n).collect::<Vec<_>>());
    (node(v6), sps).prop_map(|(node, sps)| {
        let services = dedupe(sps)
            .into_iter()
            .map(|sp| {
                (
                    ServicePortKey {
                        family: sp.family,
                        name: sp.name.clone(),
                    },
                    Arc::new(sp),
                )
            })
            .collect();
        ProxyState {
            node: Arc::new(node),
            services,
        }
    })
}

/// `a` with, per service port of either state, `a`'s, `b`'s or none (by `pick`, one entry per
/// service port in key order; missing entries keep `a`'s). Mixing two random states gives
/// service ports that claim each other's frontends, which neither state has on its own: what
/// the incremental renders' property tests need.
pub fn mix(a: &ProxyState, b: &ProxyState, pick: &[u8]) -> ProxyState {
    let mut out = a.clone();
    let keys: BTreeSet<_> = a
        .services
        .keys()
        .chain(b.services.keys())
        .cloned()
        .collect();
    for (i, key) in keys.into_iter().enumerate() {
        match pick.get(i).copied().unwrap_or(0) % 3 {
            0 => {}
            1 => match b.services.get(&key) {
                Some(sp) => {
                    out.services.insert(key, sp.clone());
                }
                None => {
                    out.services.remove(&key);
                }
            },
            _ => {
                out.services.remove(&key);
            }
        }
    }
    out
}

/// Two random states of one family on the same node and a `pick` for [`mix`].
pub fn two_states() -> impl Strategy<Value = (ProxyState, ProxyState, Vec<u8>)> {
    any::<bool>()
        .prop_flat_map(|v6| (state(v6), state(v6), prop::collection::vec(any::<u8>(), 10)))
        .prop_map(|(a, mut b, pick)| {
            b.node = a.node.clone();
            (a, b, pick)
        })
}

/// The environment of a state: the node's addresses are local.
pub fn env(state: &ProxyState) -> Env {
    Env::from_state(state)
}

/// A state and 24 packets for it, IPv4 or (one case in three) IPv6.
pub fn case() -> impl Strategy<Value = (ProxyState, Vec<Packet>)> {
    proptest::bool::weighted(1.0 / 3.0)
        .prop_flat_map(|v6| (state(v6), proptest::collection::vec(packet(v6), 24)))
}

/// Packets biased towards the frontends of a [`state`] of the same family.
pub fn packet(v6: bool) -> impl Strategy<Value = Packet> {
    let dst = select(
        CLUSTER_IPS
            .iter()
            .chain(&EXTERNAL_IPS)
            .chain(&LB_IPS)
            .chain(&NODE_IPS)
            .chain(&["10.96.0.200", "8.8.8.8", "10.244.2.1"])
            .map(|a| addr(a, v6))
            .collect::<Vec<_>>(),
    );
    let port = prop_oneof![
        3 => select(PORTS.to_vec()),
        2 => select(NODE_PORTS.to_vec()),
        1 => Just(8080u16),
        1 => Just(9999u16),
    ];
    (
        select(SOURCES.to_vec()),
        dst,
        port,
        protocol(),
        any::<bool>(),
        proptest::option::weighted(0.8, select(INTERFACES.to_vec())),
    )
        .prop_map(move |(src, dst, dst_port, proto, pod, in_iface)| {
            let src = addr(src, v6);
            let origin = if NODE_IPS.iter().any(|n| addr(n, v6) == src) {
                Origin::Node
            } else if cidr("10.244.0.0/16", v6).contains(&src) && pod {
                Origin::Pod
            } else {
                Origin::External
            };
            // A node packet claims a pod's interface (which the rules must not see) rather
            // than any of the pool's.
            let in_iface = match origin {
                Origin::Node => in_iface.map(|_| if pod { BRIDGE } else { "veth7a" }),
                _ => in_iface,
            };
            Packet {
                src,
                src_port: Some(40000),
                dst,
                dst_port,
                proto,
                origin,
                in_iface: in_iface.map(str::to_string),
            }
        })
}
