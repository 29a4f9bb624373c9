//! What this node is: its addresses (from the Node object), its zone, and the local addresses
//! that accept NodePorts. Combined with the configuration into [`NodeSettings`].

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kproxy_contract::{IpFamily, LocalTraffic, NodePortAddresses, NodeSettings};

use crate::config::{Config, NodePortSetting};

/// The zone label topology hints are compared with.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The node's addresses, primary first per family: InternalIP before ExternalIP, as upstream's
/// `GetNodeHostIPs`. Unparseable addresses are ignored.
pub fn node_ips(node: Option<&Node>) -> Vec<IpAddr> {
    let Some(addresses) = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
    else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = Vec::new();
    for kind in ["InternalIP", "ExternalIP"] {
        for a in addresses.iter().filter(|a| a.type_ == kind) {
            if let Ok(ip) = a.address.trim().parse::<IpAddr>()
                && !out.contains(&ip)
            {
                out.push(ip);
            }
        }
    }
    // Stable per-family order: the first address of each family is that family's primary.
    out.sort_by_key(IpFamily::of);
    out
}

/// The node's zone label, if any.
pub fn zone(node: Option<&Node>) -> Option<String> {
    node?.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned()
}

/// Local interface addresses of this network namespace.
pub fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ifa in addrs {
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            out.push(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            out.push(IpAddr::V6(v6.ip()));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Combines configuration, the Node object and the local addresses.
pub fn settings(config: &Config, node: Option<&Node>, local: &[IpAddr]) -> NodeSettings {
    let node_ips = node_ips(node);
    let node_port_addresses = match &config.nodeport_addresses {
        NodePortSetting::AllLocal => NodePortAddresses::AllLocal,
        NodePortSetting::Primary => {
            let mut primary: Vec<IpAddr> = Vec::new();
            for family in IpFamily::ALL {
                if let Some(ip) = node_ips.iter().find(|ip| IpFamily::of(ip) == family) {
                    primary.push(*ip);
                }
            }
            NodePortAddresses::Only(primary)
        }
        NodePortSetting::Cidrs(cidrs) => NodePortAddresses::Only(matching(local, cidrs)),
    };
    NodeSettings {
        node_name: config.hostname.clone(),
        node_ips,
        local_traffic: LocalTraffic::source_cidrs(&config.cluster_cidrs),
        service_cidrs: config.service_cidrs.clone(),
        masquerade_all: config.masquerade_all,
        masquerade_bit: config.masquerade_bit,
        node_port_addresses,
    }
}

/// Local addresses inside the CIDRs. Loopback is dropped: kproxy serves NodePorts on localhost
/// only when asked, and never for IPv6 (a deliberate difference; see the README).
fn matching(local: &[IpAddr], cidrs: &[IpNet]) -> Vec<IpAddr> {
    local
        .iter()
        .filter(|ip| !ip.is_loopback() && cidrs.iter().any(|c| c.contains(*ip)))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ips_prefer_internal_and_group_families() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n", "labels": {ZONE_LABEL: "z1"}},
            "status": {"addresses": [
                {"type": "Hostname", "address": "n"},
                {"type": "ExternalIP", "address": "203.0.113.5"},
                {"type": "InternalIP", "address": "fd00::5"},
                {"type": "InternalIP", "address": "192.168.0.5"},
                {"type": "InternalIP", "address": "not-an-ip"}
            ]}
        }))
        .expect("node");
        let ips = node_ips(Some(&node));
        let want: Vec<IpAddr> = ["192.168.0.5", "203.0.113.5", "fd00::5"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        assert_eq!(ips, want);
        assert_eq!(zone(Some(&node)).as_deref(), Some("z1"));
    }

    #[test]
    fn nodeport_cidrs_select_local_addresses_without_loopback() {
        let local: Vec<IpAddr> = ["127.0.0.1", "10.0.1.1", "10.0.2.1", "::1"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        let cidrs = vec![
            "10.0.1.0/24".parse().expect("net"),
            "127.0.0.0/8".parse().expect("net"),
        ];
        assert_eq!(
            matching(&local, &cidrs),
            vec!["10.0.1.1".parse::<IpAddr>().expect("ip")]
        );
    }
}
