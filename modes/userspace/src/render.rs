//! `ProxyState` → [`UserspaceRules`]: one listener per frontend that has endpoints, one local
//! address per service IP. Pure.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use kproxy_contract::{Endpoint, IpFamily, NodePortAddresses, Protocol, ProxyState, ServicePort};

use crate::model::{Frontend, ListenerKey, Table, Transport, UserspaceRules};

/// Renders the desired state.
///
/// - ClusterIPs, externalIPs and LoadBalancer IPs become local addresses whether or not the
///   service has endpoints: with no listener on a local address the kernel itself refuses (TCP
///   RST, ICMP port unreachable), which is the "no endpoints" behaviour.
/// - Each frontend with at least one endpoint under its traffic policy gets a listener.
/// - NodePorts listen on the `--nodeport-addresses` addresses; without them, TCP NodePorts
///   listen on the family's wildcard address and UDP NodePorts on the node's addresses.
/// - SCTP service ports are listed in `unsupported`.
pub fn render(state: &ProxyState) -> UserspaceRules {
    let mut out = UserspaceRules::default();
    for sp in state.services.values() {
        let transport = match sp.name.protocol {
            Protocol::Tcp => Transport::Tcp,
            Protocol::Udp => Transport::Udp,
            Protocol::Sctp => {
                out.unsupported.insert(
                    format!("{} ({}, {})", sp.name, sp.name.protocol, sp.family),
                    "the userspace mode proxies TCP and UDP only".into(),
                );
                continue;
            }
        };
        render_service(&mut out, state, sp, transport);
    }
    out
}

fn render_service(out: &mut UserspaceRules, state: &ProxyState, sp: &ServicePort, t: Transport) {
    let keep: BTreeSet<SocketAddr> = sp
        .endpoints
        .serving
        .iter()
        .chain(sp.endpoints.cluster.iter())
        .chain(&sp.endpoints.local)
        .map(sock)
        .collect();
    let table = |frontend: Frontend, eps: &[Endpoint]| -> Option<Arc<Table>> {
        if eps.is_empty() {
            return None;
        }
        Some(Arc::new(Table {
            service: sp.name.clone(),
            family: sp.family,
            frontend,
            endpoints: eps.iter().map(sock).collect(),
            keep: keep.clone(),
            affinity: sp.affinity.map(|a| a.timeout),
            source_ranges: if frontend == Frontend::LoadBalancer {
                sp.source_ranges.clone()
            } else {
                Vec::new()
            },
        }))
    };
    let internal = table(Frontend::ClusterIp, sp.internal_endpoints());
    let mut add = |ip: IpAddr, port: u16, table: &Option<Arc<Table>>| {
        if let Some(table) = table {
            out.listeners.insert(
                ListenerKey {
                    transport: t,
                    addr: SocketAddr::new(ip, port),
                },
                table.clone(),
            );
        }
    };
    if let Some(ip) = sp.cluster_ip {
        add(ip, sp.port, &internal);
    }
    let external = table(Frontend::ExternalIp, sp.external_endpoints());
    for ip in &sp.external_ips {
        add(*ip, sp.port, &external);
    }
    let lb = table(Frontend::LoadBalancer, sp.external_endpoints());
    for ip in &sp.load_balancer_ips {
        add(*ip, sp.port, &lb);
    }
    if let Some(np) = sp.node_port {
        let node_port = table(Frontend::NodePort, sp.external_endpoints());
        match &state.node.node_port_addresses {
            // TCP: the wildcard address is "every local address". UDP cannot reply from the
            // right address through a wildcard socket, so it listens on the node's addresses.
            NodePortAddresses::AllLocal if t == Transport::Tcp => {
                add(wildcard(sp.family), np, &node_port);
            }
            NodePortAddresses::AllLocal => {
                for ip in state
                    .node
                    .node_ips
                    .iter()
                    .filter(|ip| IpFamily::of(ip) == sp.family)
                {
                    add(*ip, np, &node_port);
                }
            }
            NodePortAddresses::Only(ips) => {
                for ip in ips.iter().filter(|ip| IpFamily::of(ip) == sp.family) {
                    add(*ip, np, &node_port);
                }
            }
        }
    }
    out.addresses.extend(
        sp.cluster_ip
            .iter()
            .chain(&sp.external_ips)
            .chain(&sp.load_balancer_ips)
            .copied(),
    );
}

fn sock(ep: &Endpoint) -> SocketAddr {
    SocketAddr::new(ep.ip, ep.port)
}

/// The "every local address" address of a family.
pub fn wildcard(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpFamily::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}
