//! Chain names.
//!
//! Per-service chains use upstream's hash (`base32(sha256(servicePortName + protocol))`, first 16
//! characters) behind our own `KPROXY-` prefixes, so an operator who knows a service's
//! `KUBE-SVC-XPGD46QRK7WJZT7O` finds ours as `KPROXY-SVC-XPGD46QRK7WJZT7O`, and the two proxies'
//! chains never collide.

use kproxy_contract::{Endpoint, ServicePortName};
use sha2::{Digest, Sha256};

/// The prefix of every chain kproxy owns. Anything else is never touched.
pub const PREFIX: &str = "KPROXY-";

/// nat: the entry point from PREROUTING and OUTPUT; filter: REJECT/DROP for services without
/// (local) endpoints on their ClusterIPs.
pub const SERVICES: &str = "KPROXY-SERVICES";
/// filter: REJECT/DROP for external destinations without usable endpoints.
pub const EXTERNAL_SERVICES: &str = "KPROXY-EXTERNAL-SERVICES";
/// nat: NodePort dispatch; filter: health-check node ports ACCEPT.
pub const NODEPORTS: &str = "KPROXY-NODEPORTS";
/// nat: SNAT of marked connections.
pub const POSTROUTING: &str = "KPROXY-POSTROUTING";
/// nat: sets the masquerade mark.
pub const MARK_MASQ: &str = "KPROXY-MARK-MASQ";
/// filter: conntrack INVALID drop and accepts for service traffic in FORWARD.
pub const FORWARD: &str = "KPROXY-FORWARD";
/// filter: drops LoadBalancer traffic not allowed by loadBalancerSourceRanges.
pub const PROXY_FIREWALL: &str = "KPROXY-PROXY-FIREWALL";
/// An empty chain whose disappearance means someone flushed our rules.
pub const CANARY: &str = "KPROXY-CANARY";
/// The prefix of the destination dispatch tree's chains under [`SERVICES`] (`KPROXY-DST-a`,
/// `-a0`, `-a00`; `src/dispatch.rs`).
///
/// It sorts before every per-service prefix (`KPROXY-EXT-`, `-FW-`, `-SEP-`, `-SVC-`, `-SVL-`)
/// on purpose. `iptables-nft-restore --noflush` keeps the chains a restore names in a sorted
/// list and walks it from the start for every line (iptables 1.8.9, `nft-cache.c`), so a line
/// costs as many string comparisons as there are names below its chain's. The tree's 4,400
/// chains at 10,000 services each jump to per-service chains; named `KPROXY-SVCS-…` (after
/// them) every tree line walked past up to 10,000 service chains.
pub const SERVICES_TREE: &str = "KPROXY-DST-";

/// Whether a chain name belongs to kproxy.
pub fn is_owned(chain: &str) -> bool {
    chain.starts_with(PREFIX)
}

fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut encoded = data_encoding::BASE32.encode(&digest);
    encoded.truncate(16);
    encoded
}

fn port_proto_hash(name: &ServicePortName) -> String {
    hash16(&format!("{name}{}", name.protocol))
}

/// `KPROXY-SVC-…`: the Cluster-policy endpoint chain.
pub fn service_chain(name: &ServicePortName) -> String {
    format!("KPROXY-SVC-{}", port_proto_hash(name))
}

/// `KPROXY-SVL-…`: the Local-policy endpoint chain.
pub fn service_local_chain(name: &ServicePortName) -> String {
    format!("KPROXY-SVL-{}", port_proto_hash(name))
}

/// `KPROXY-EXT-…`: traffic to external destinations (NodePort, externalIPs, LB IPs).
pub fn external_chain(name: &ServicePortName) -> String {
    format!("KPROXY-EXT-{}", port_proto_hash(name))
}

/// `KPROXY-FW-…`: loadBalancerSourceRanges.
pub fn firewall_chain(name: &ServicePortName) -> String {
    format!("KPROXY-FW-{}", port_proto_hash(name))
}

/// `KPROXY-SEP-…`: one endpoint of one service port.
pub fn endpoint_chain(name: &ServicePortName, ep: &Endpoint) -> String {
    hash_endpoint("KPROXY-SEP-", name, ep)
}

fn hash_endpoint(prefix: &str, name: &ServicePortName, ep: &Endpoint) -> String {
    let addr = std::net::SocketAddr::new(ep.ip, ep.port);
    format!(
        "{prefix}{}",
        hash16(&format!("{name}{}{addr}", name.protocol))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kproxy_contract::Protocol;

    fn spn(ns: &str, svc: &str, port: &str) -> ServicePortName {
        ServicePortName {
            namespace: ns.into(),
            name: svc.into(),
            port: port.into(),
            protocol: Protocol::Tcp,
        }
    }

    /// Upstream's verified vectors (TestOverallIPTablesRules), with our prefix.
    #[test]
    fn chain_names_use_upstream_hashes() {
        assert_eq!(
            service_chain(&spn("ns1", "svc1", "p80")),
            "KPROXY-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            service_chain(&spn("ns2", "svc2", "p80")),
            "KPROXY-SVC-GNZBNJ2PO5MGZ6GT"
        );
        assert_eq!(
            service_chain(&spn("ns5", "svc5", "p80")),
            "KPROXY-SVC-NUKIZ6OKUXPJNT4C"
        );
        let ep = Endpoint {
            ip: "10.180.0.1".parse().expect("ip"),
            port: 80,
            is_local: false,
        };
        assert_eq!(
            endpoint_chain(&spn("ns1", "svc1", "p80"), &ep),
            "KPROXY-SEP-SXIVWICOYRO3J4NJ"
        );
        let ep = Endpoint {
            ip: "10.180.0.3".parse().expect("ip"),
            port: 80,
            is_local: false,
        };
        assert_eq!(
            endpoint_chain(&spn("ns5", "svc5", "p80"), &ep),
            "KPROXY-SEP-I77PXRDZVX7PMWMN"
        );
    }

    #[test]
    fn names_fit_iptables_limit() {
        // iptables chain names are at most 28 characters.
        let n = spn("a-very-long-namespace-name", "and-a-long-service", "port");
        for c in [
            service_chain(&n),
            service_local_chain(&n),
            external_chain(&n),
            firewall_chain(&n),
        ] {
            assert!(c.len() <= 28, "{c}");
        }
    }
}
