//! What this node is: its addresses (from the Node object), its zone, the local addresses
//! that accept NodePorts and how its pods' traffic is recognised. Combined with the
//! configuration into [`NodeSettings`].

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kproxy_contract::{IpFamily, LocalTraffic, NodePortAddresses, NodeSettings};

use crate::config::{Config, LocalDetectMode, NodePortSetting};

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

/// The node's addresses with `bindAddress` (when it names an address) as the primary IP of its
/// family, as upstream uses it: it overrides what the Node object says; no socket is bound.
pub fn with_bind_address(mut ips: Vec<IpAddr>, bind_address: Option<IpAddr>) -> Vec<IpAddr> {
    if let Some(bind) = bind_address {
        ips.retain(|ip| *ip != bind);
        let at = ips
            .iter()
            .position(|ip| IpFamily::of(ip) == IpFamily::of(&bind))
            .unwrap_or_else(|| {
                ips.iter()
                    .position(|ip| IpFamily::of(ip) > IpFamily::of(&bind))
                    .unwrap_or(ips.len())
            });
        ips.insert(at, bind);
    }
    ips
}

/// Combines configuration, the Node object and the local addresses.
pub fn settings(config: &Config, node: Option<&Node>, local: &[IpAddr]) -> NodeSettings {
    let node_ips = with_bind_address(node_ips(node), config.bind_address);
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
        local_traffic: local_traffic(&config.detect_local, &config.cluster_cidrs, node),
        service_cidrs: config.service_cidrs.clone(),
        masquerade_all: config.masquerade_all,
        masquerade_bit: config.masquerade_bit,
        node_port_addresses,
    }
}

/// The local-traffic detector `mode` selects, from the cluster CIDRs and the Node object.
/// Source-address detectors use the first CIDR of each family; a family without one has no
/// detector (upstream's no-op detector), so before the Node object is known `NodeCidr` detects
/// nothing and the next sync with the Node fixes that. Interface names are passed on as they
/// are: the modes refuse (and log) a name that cannot be written into a rule.
pub fn local_traffic(
    mode: &LocalDetectMode,
    cluster_cidrs: &[IpNet],
    node: Option<&Node>,
) -> LocalTraffic {
    match mode {
        LocalDetectMode::ClusterCidr => LocalTraffic::source_cidrs(cluster_cidrs),
        LocalDetectMode::NodeCidr => LocalTraffic::source_cidrs(&pod_cidrs(node)),
        LocalDetectMode::BridgeInterface(name) => LocalTraffic::Interface(name.clone()),
        LocalDetectMode::InterfaceNamePrefix(prefix) => {
            LocalTraffic::InterfacePrefix(prefix.clone())
        }
    }
}

/// The Node's pod CIDRs: `spec.podCIDRs`, or the older single `spec.podCIDR` when the list is
/// absent or empty. Unparseable entries are ignored.
pub fn pod_cidrs(node: Option<&Node>) -> Vec<IpNet> {
    let Some(spec) = node.and_then(|n| n.spec.as_ref()) else {
        return Vec::new();
    };
    let listed = spec.pod_cidrs.as_deref().filter(|l| !l.is_empty());
    let texts: Vec<&str> = match (listed, spec.pod_cidr.as_deref()) {
        (Some(list), _) => list.iter().map(String::as_str).collect(),
        (None, Some(one)) => vec![one],
        (None, None) => Vec::new(),
    };
    texts
        .into_iter()
        .filter_map(|t| t.trim().parse().ok())
        .collect()
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

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn node_with_spec(spec: serde_json::Value) -> Node {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "n"}, "spec": spec}))
            .expect("node")
    }

    #[test]
    fn cluster_cidr_detector_takes_the_first_cidr_of_each_family() {
        let cidrs = [
            net("10.244.0.0/16"),
            net("10.245.0.0/16"),
            net("fd00:244::/56"),
        ];
        assert_eq!(
            local_traffic(&LocalDetectMode::ClusterCidr, &cidrs, None),
            LocalTraffic::SourceCidrs(vec![net("10.244.0.0/16"), net("fd00:244::/56")])
        );
        assert_eq!(
            local_traffic(&LocalDetectMode::ClusterCidr, &[], None),
            LocalTraffic::None
        );
    }

    #[test]
    fn node_cidr_detector_reads_pod_cidrs_then_pod_cidr() {
        let cluster = [net("10.244.0.0/16")];
        let dual = node_with_spec(serde_json::json!({
            "podCIDR": "10.244.7.0/24",
            "podCIDRs": ["10.244.7.0/24", "not-a-cidr", "fd00:244:0:7::/64", "10.244.8.0/24"],
        }));
        assert_eq!(
            local_traffic(&LocalDetectMode::NodeCidr, &cluster, Some(&dual)),
            LocalTraffic::SourceCidrs(vec![net("10.244.7.0/24"), net("fd00:244:0:7::/64")])
        );
        let old = node_with_spec(serde_json::json!({"podCIDR": "10.244.9.0/24", "podCIDRs": []}));
        let d = local_traffic(&LocalDetectMode::NodeCidr, &cluster, Some(&old));
        assert_eq!(d, LocalTraffic::SourceCidrs(vec![net("10.244.9.0/24")]));
        assert!(
            !d.is_implemented(IpFamily::V6),
            "no IPv6 pod CIDR: no IPv6 detector"
        );
        // Not the cluster CIDR as a fallback: without pod CIDRs nothing is detected.
        let bare = node_with_spec(serde_json::json!({}));
        assert_eq!(
            local_traffic(&LocalDetectMode::NodeCidr, &cluster, Some(&bare)),
            LocalTraffic::None
        );
        assert_eq!(
            local_traffic(&LocalDetectMode::NodeCidr, &cluster, None),
            LocalTraffic::None
        );
    }

    #[test]
    fn interface_detectors_pass_the_name_on() {
        assert_eq!(
            local_traffic(&LocalDetectMode::BridgeInterface("cbr0".into()), &[], None),
            LocalTraffic::Interface("cbr0".into())
        );
        assert_eq!(
            local_traffic(
                &LocalDetectMode::InterfaceNamePrefix("veth".into()),
                &[net("10.244.0.0/16")],
                None
            ),
            LocalTraffic::InterfacePrefix("veth".into())
        );
    }

    #[test]
    fn bind_address_becomes_the_primary_ip_of_its_family() {
        let ips = |list: &[&str]| -> Vec<IpAddr> {
            list.iter().map(|s| s.parse().expect("ip")).collect()
        };
        let node = ips(&["192.168.0.5", "203.0.113.5", "fd00::5"]);
        let bind = "10.1.1.1".parse().ok();
        assert_eq!(
            with_bind_address(node.clone(), bind),
            ips(&["10.1.1.1", "192.168.0.5", "203.0.113.5", "fd00::5"])
        );
        let bind = "fd00::9".parse().ok();
        assert_eq!(
            with_bind_address(node.clone(), bind),
            ips(&["192.168.0.5", "203.0.113.5", "fd00::9", "fd00::5"])
        );
        // Already an address of the node: moved to the front of its family.
        let bind = "203.0.113.5".parse().ok();
        assert_eq!(
            with_bind_address(node.clone(), bind),
            ips(&["203.0.113.5", "192.168.0.5", "fd00::5"])
        );
        assert_eq!(with_bind_address(Vec::new(), bind), ips(&["203.0.113.5"]));
        assert_eq!(with_bind_address(node.clone(), None), node);
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
