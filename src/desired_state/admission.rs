//! Which addresses a Service may claim as a frontend and an endpoint may point at (issue #20,
//! items 10-11; the CVE-2020-8554 / CVE-2020-8558 class).
//!
//! Every source is checked the same way for what would let a Service take over the node:
//!
//! * No frontend (ClusterIP, externalIP, LoadBalancer IP) and no endpoint may be a special
//!   address ([`special`]): unspecified, loopback, link-local, multicast or broadcast. Upstream's
//!   API validation (`ValidateEndpointIP`, formerly `ValidateNonSpecialIP`) refuses
//!   unspecified, loopback, link-local and link-local multicast for endpoints and externalIPs;
//!   kproxy also refuses every multicast address and 255.255.255.255 (a packet to one is never
//!   a connection to a service), and applies the list to ClusterIPs and LoadBalancer IPs too.
//! * A ClusterIP is never one of the node's addresses. An externalIP or LoadBalancer IP on one
//!   is accepted only when `--external-ip-cidrs` is given and covers it (an explicit opt-in,
//!   as with upstream's externalIP admission controls); `--external-ip-cidrs` is also an
//!   allow-list for every externalIP and LoadBalancer IP.
//!
//! The node's addresses are [`NodeSettings::node_ips`]: the Node's `status.addresses`
//! (InternalIP, ExternalIP) and `--bind-address`. Not the interface addresses of the node's
//! namespace: those also hold service addresses that are local on purpose (kproxy's own
//! `kproxy-ipvs0`, upstream's `kube-ipvs0` during a migration, NodeLocal DNSCache's binding of
//! the kube-dns ClusterIP, the VIPs kube-vip or keepalived put on an uplink), which would
//! then be refused, and they change under the builder's feet (read once per sync, so the build
//! would no longer be a function of the objects and the configuration). An address of the node
//! that is not in its Node object is covered by `--external-ip-cidrs`, which refuses every
//! externalIP and LoadBalancer IP outside the list.
//!
//! With `--manifests` nothing validated the objects before kproxy, so the builder also checks
//! what the API server would have refused ([`ManifestChecks`]): a ClusterIP outside the service
//! CIDRs (`--service-cluster-ip-range`, when given) and a NodePort or healthCheckNodePort outside
//! `--service-node-port-range`. Objects from the API are not checked again: the API server's
//! own ranges may differ from what kproxy was told.

use std::net::IpAddr;

use ipnet::IpNet;
use kproxy_contract::{IpFamily, NodeSettings};

use crate::config::{Config, PortRange, SourceConfig};

/// What the builder admits, from the configuration. A change forces a full build.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Admission {
    /// The checks the API server would have made; `Some` when objects come from `--manifests`.
    pub manifests: Option<ManifestChecks>,
    /// `--external-ip-cidrs`: the allow-list of externalIPs and LoadBalancer IPs.
    pub external_ip_cidrs: Option<Vec<IpNet>>,
}

/// The API server's checks that only matter without an API server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ManifestChecks {
    /// `--service-node-port-range`.
    pub node_port_range: PortRange,
}

impl Admission {
    /// The admission rules `config` asks for.
    pub fn from_config(config: &Config) -> Self {
        Self {
            manifests: matches!(config.source, SourceConfig::Manifests(_)).then(|| {
                ManifestChecks {
                    node_port_range: config.node_port_range,
                }
            }),
            external_ip_cidrs: config.external_ip_cidrs.clone(),
        }
    }
}

/// Why `ip` can never be a frontend or an endpoint, or `None`.
pub(crate) fn special(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_unspecified() {
                Some("is unspecified (0.0.0.0)")
            } else if v4.is_loopback() {
                Some("is in the loopback range (127.0.0.0/8)")
            } else if v4.is_link_local() {
                Some("is in the link-local range (169.254.0.0/16)")
            } else if v4.is_multicast() {
                Some("is a multicast address (224.0.0.0/4)")
            } else if v4.is_broadcast() {
                Some("is the broadcast address (255.255.255.255)")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_unspecified() {
                Some("is unspecified (::)")
            } else if v6.is_loopback() {
                Some("is the loopback address (::1)")
            } else if v6.segments()[0] & 0xffc0 == 0xfe80 {
                Some("is in the link-local range (fe80::/10)")
            } else if v6.is_multicast() {
                Some("is a multicast address (ff00::/8)")
            } else {
                None
            }
        }
    }
}

/// The checks of one build: the admission rules and this node's addresses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Guard<'a> {
    pub admission: &'a Admission,
    pub node: &'a NodeSettings,
}

impl Guard<'_> {
    fn is_node_address(&self, ip: IpAddr) -> bool {
        self.node.node_ips.contains(&ip)
    }

    /// Why `ip` cannot be a ClusterIP, or `None`.
    pub(crate) fn cluster_ip(&self, ip: IpAddr) -> Option<String> {
        if let Some(why) = special(ip) {
            return Some(why.to_string());
        }
        if self.is_node_address(ip) {
            return Some(format!(
                "is an address of this node (Node {:?}): a ClusterIP there would capture the \
                 node's own traffic",
                self.node.node_name
            ));
        }
        let family = IpFamily::of(&ip);
        let cidrs: Vec<&IpNet> = self
            .node
            .service_cidrs
            .iter()
            .filter(|n| IpFamily::of_net(n) == family)
            .collect();
        if self.admission.manifests.is_some()
            && !self.node.service_cidrs.is_empty()
            && !cidrs.iter().any(|n| n.contains(&ip))
        {
            let list: Vec<String> = self
                .node
                .service_cidrs
                .iter()
                .map(ToString::to_string)
                .collect();
            return Some(format!(
                "is outside the service CIDRs (--service-cluster-ip-range {})",
                list.join(",")
            ));
        }
        None
    }

    /// Why `ip` cannot be an externalIP or LoadBalancer IP, or `None`.
    pub(crate) fn external(&self, ip: IpAddr) -> Option<String> {
        if let Some(why) = special(ip) {
            return Some(why.to_string());
        }
        let allowed = self
            .admission
            .external_ip_cidrs
            .as_ref()
            .map(|list| list.iter().any(|n| n.contains(&ip)));
        if self.is_node_address(ip) && allowed != Some(true) {
            return Some(format!(
                "is an address of this node (Node {:?}): it would capture the node's own \
                 traffic; allowed only inside --external-ip-cidrs",
                self.node.node_name
            ));
        }
        if allowed == Some(false) {
            return Some("is outside --external-ip-cidrs".to_string());
        }
        None
    }

    /// Why `port` cannot be a NodePort (or healthCheckNodePort), or `None`.
    pub(crate) fn node_port(&self, port: u16) -> Option<String> {
        let checks = self.admission.manifests.as_ref()?;
        (!checks.node_port_range.contains(port)).then(|| {
            format!(
                "{port} is outside the NodePort range {} (--service-node-port-range)",
                checks.node_port_range
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn special_addresses() {
        for (addr, want) in [
            ("0.0.0.0", Some("unspecified")),
            ("::", Some("unspecified")),
            ("127.0.0.1", Some("loopback")),
            ("127.255.0.9", Some("loopback")),
            ("::1", Some("loopback")),
            ("169.254.169.254", Some("link-local")),
            ("fe80::1", Some("link-local")),
            ("febf::1", Some("link-local")),
            ("224.0.0.1", Some("multicast")),
            ("239.1.2.3", Some("multicast")),
            ("ff02::1", Some("multicast")),
            ("ff0e::1", Some("multicast")),
            ("255.255.255.255", Some("broadcast")),
            ("10.0.0.1", None),
            ("192.0.2.255", None),
            ("fec0::1", None),
            ("fd00::1", None),
            ("2001:db8::1", None),
        ] {
            let got = special(ip(addr));
            match want {
                Some(w) => assert!(got.is_some_and(|g| g.contains(w)), "{addr}: {got:?}"),
                None => assert_eq!(got, None, "{addr}"),
            }
        }
    }

    fn node() -> NodeSettings {
        NodeSettings {
            node_name: "node-a".into(),
            node_ips: vec![ip("192.168.0.2"), ip("fd00::2")],
            service_cidrs: vec!["10.96.0.0/12".parse().expect("cidr")],
            ..NodeSettings::default()
        }
    }

    #[test]
    fn cluster_ips() {
        let node = node();
        let api = Admission::default();
        let manifests = Admission {
            manifests: Some(ManifestChecks {
                node_port_range: PortRange::DEFAULT_NODE_PORTS,
            }),
            ..Admission::default()
        };
        let g = Guard {
            admission: &api,
            node: &node,
        };
        assert_eq!(g.cluster_ip(ip("10.96.0.1")), None);
        // Only manifests are held to the service CIDRs.
        assert_eq!(g.cluster_ip(ip("10.200.0.1")), None);
        assert!(
            g.cluster_ip(ip("192.168.0.2"))
                .is_some_and(|r| r.contains("node-a"))
        );
        assert!(g.cluster_ip(ip("127.0.0.1")).is_some());
        let g = Guard {
            admission: &manifests,
            node: &node,
        };
        assert_eq!(g.cluster_ip(ip("10.96.0.1")), None);
        assert!(
            g.cluster_ip(ip("10.200.0.1"))
                .is_some_and(|r| r.contains("--service-cluster-ip-range 10.96.0.0/12"))
        );
        // No IPv6 service CIDR: the API server would not have allocated one.
        assert!(g.cluster_ip(ip("fd00:96::1")).is_some());
        // No service CIDRs at all: nothing to check against.
        let bare = NodeSettings {
            service_cidrs: Vec::new(),
            ..node.clone()
        };
        let g = Guard {
            admission: &manifests,
            node: &bare,
        };
        assert_eq!(g.cluster_ip(ip("10.200.0.1")), None);
    }

    #[test]
    fn external_ips_and_the_allow_list() {
        let node = node();
        let open = Admission::default();
        let g = Guard {
            admission: &open,
            node: &node,
        };
        assert_eq!(g.external(ip("203.0.113.7")), None);
        assert!(
            g.external(ip("192.168.0.2"))
                .is_some_and(|r| r.contains("--external-ip-cidrs"))
        );
        assert!(g.external(ip("fd00::2")).is_some());
        assert!(g.external(ip("0.0.0.0")).is_some());
        let listed = Admission {
            external_ip_cidrs: Some(vec![
                "203.0.113.0/24".parse().expect("cidr"),
                "192.168.0.2/32".parse().expect("cidr"),
            ]),
            ..Admission::default()
        };
        let g = Guard {
            admission: &listed,
            node: &node,
        };
        assert_eq!(g.external(ip("203.0.113.7")), None);
        // A node address inside the list is the operator's explicit choice.
        assert_eq!(g.external(ip("192.168.0.2")), None);
        assert!(
            g.external(ip("fd00::2"))
                .is_some_and(|r| r.contains("node"))
        );
        assert!(
            g.external(ip("198.51.100.1"))
                .is_some_and(|r| r.contains("outside"))
        );
        // Special addresses stay refused whatever the list says.
        let everything = Admission {
            external_ip_cidrs: Some(vec!["0.0.0.0/0".parse().expect("cidr")]),
            ..Admission::default()
        };
        let g = Guard {
            admission: &everything,
            node: &node,
        };
        assert!(g.external(ip("127.0.0.1")).is_some());
        assert!(g.external(ip("255.255.255.255")).is_some());
    }

    #[test]
    fn from_the_configuration() {
        use clap::Parser as _;
        let config = |extra: &[&str]| {
            let mut argv = vec!["kproxy", "--hostname-override", "n1"];
            argv.extend_from_slice(extra);
            crate::config::from_args(&crate::cli::Args::try_parse_from(argv).expect("flags"))
                .expect("config")
        };
        let api = Admission::from_config(&config(&["--external-ip-cidrs", "203.0.113.0/24"]));
        assert_eq!(api.manifests, None);
        assert_eq!(
            api.external_ip_cidrs,
            Some(vec!["203.0.113.0/24".parse().expect("cidr")])
        );
        let dir = tempfile::tempdir().expect("a manifests directory");
        let dir = dir.path().display().to_string();
        let manifests = Admission::from_config(&config(&[
            "--manifests",
            &dir,
            "--service-node-port-range",
            "2000-3000",
        ]));
        assert_eq!(
            manifests.manifests,
            Some(ManifestChecks {
                node_port_range: PortRange {
                    first: 2000,
                    last: 3000
                }
            })
        );
        assert_eq!(manifests.external_ip_cidrs, None);
    }

    #[test]
    fn node_ports_only_checked_for_manifests() {
        let node = node();
        let api = Admission::default();
        let g = Guard {
            admission: &api,
            node: &node,
        };
        assert_eq!(g.node_port(22), None);
        let manifests = Admission {
            manifests: Some(ManifestChecks {
                node_port_range: PortRange {
                    first: 30000,
                    last: 30010,
                },
            }),
            ..Admission::default()
        };
        let g = Guard {
            admission: &manifests,
            node: &node,
        };
        assert_eq!(g.node_port(30000), None);
        assert_eq!(g.node_port(30010), None);
        assert!(g.node_port(2222).is_some_and(|r| r.contains("30000-30010")));
        assert!(g.node_port(30011).is_some());
    }
}
