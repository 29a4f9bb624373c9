//! Services, EndpointSlices and Nodes as JSON values, with every field the proxy reads, for the
//! fake API server ([`super::fake_apiserver::FakeApiServer::apply`]) and for a manifests
//! directory ([`super::manifests::Manifests::object`]).

use serde_json::{Value, json};

use super::manifests::{NAMESPACE, Port};

/// The topology label nodes carry their zone in.
pub(crate) const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

fn family_of(ip: &str) -> &'static str {
    if ip.contains(':') { "IPv6" } else { "IPv4" }
}

/// A Service under construction; [`Svc::json`] renders it.
#[derive(Debug, Clone)]
pub(crate) struct Svc {
    name: String,
    cluster_ips: Vec<String>,
    ports: Vec<Port>,
    type_: &'static str,
    external_ips: Vec<String>,
    lb_ips: Vec<String>,
    source_ranges: Vec<String>,
    affinity_timeout: Option<u32>,
    external_policy: Option<&'static str>,
    internal_policy: Option<&'static str>,
}

impl Svc {
    /// A ClusterIP Service. One cluster IP makes it single-stack; two (IPv4 first) make it
    /// `RequireDualStack`.
    pub(crate) fn new(name: &str, cluster_ips: &[&str], ports: &[Port]) -> Svc {
        Svc {
            name: name.to_string(),
            cluster_ips: cluster_ips.iter().map(|s| s.to_string()).collect(),
            ports: ports.to_vec(),
            type_: "ClusterIP",
            external_ips: Vec::new(),
            lb_ips: Vec::new(),
            source_ranges: Vec::new(),
            affinity_timeout: None,
            external_policy: None,
            internal_policy: None,
        }
    }

    /// `type: NodePort` (ports need [`Port::node_port`]).
    pub(crate) fn node_port(mut self) -> Svc {
        self.type_ = "NodePort";
        self
    }

    /// `type: LoadBalancer` with these VIP-mode ingress IPs and source ranges (none: open).
    pub(crate) fn load_balancer(mut self, ingress: &[&str], source_ranges: &[&str]) -> Svc {
        self.type_ = "LoadBalancer";
        self.lb_ips = ingress.iter().map(|s| s.to_string()).collect();
        self.source_ranges = source_ranges.iter().map(|s| s.to_string()).collect();
        self
    }

    /// `spec.externalIPs`.
    pub(crate) fn external_ips(mut self, ips: &[&str]) -> Svc {
        self.external_ips = ips.iter().map(|s| s.to_string()).collect();
        self
    }

    /// `sessionAffinity: ClientIP` with this timeout.
    pub(crate) fn client_ip_affinity(mut self, timeout_seconds: u32) -> Svc {
        self.affinity_timeout = Some(timeout_seconds);
        self
    }

    /// `externalTrafficPolicy` (`Local` or `Cluster`).
    pub(crate) fn external_policy(mut self, policy: &'static str) -> Svc {
        self.external_policy = Some(policy);
        self
    }

    /// `internalTrafficPolicy` (`Local` or `Cluster`).
    pub(crate) fn internal_policy(mut self, policy: &'static str) -> Svc {
        self.internal_policy = Some(policy);
        self
    }

    /// The object.
    pub(crate) fn json(&self) -> Value {
        let families: Vec<&str> = self.cluster_ips.iter().map(|ip| family_of(ip)).collect();
        let policy = if self.cluster_ips.len() > 1 {
            "RequireDualStack"
        } else {
            "SingleStack"
        };
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                let mut port = json!({
                    "name": p.name,
                    "protocol": p.protocol,
                    "port": p.port,
                    "targetPort": p.target,
                });
                if let Some(np) = p.node_port {
                    port["nodePort"] = json!(np);
                }
                port
            })
            .collect();
        let mut spec = json!({
            "type": self.type_,
            "clusterIP": self.cluster_ips.first().expect("a cluster IP"),
            "clusterIPs": self.cluster_ips,
            "ipFamilies": families,
            "ipFamilyPolicy": policy,
            "ports": ports,
        });
        if !self.external_ips.is_empty() {
            spec["externalIPs"] = json!(self.external_ips);
        }
        if !self.source_ranges.is_empty() {
            spec["loadBalancerSourceRanges"] = json!(self.source_ranges);
        }
        if let Some(t) = self.affinity_timeout {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
        }
        if let Some(p) = self.external_policy {
            spec["externalTrafficPolicy"] = json!(p);
        }
        if let Some(p) = self.internal_policy {
            spec["internalTrafficPolicy"] = json!(p);
        }
        let mut svc = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": self.name, "namespace": NAMESPACE},
            "spec": spec,
        });
        if !self.lb_ips.is_empty() {
            let ingress: Vec<Value> = self.lb_ips.iter().map(|ip| json!({"ip": ip})).collect();
            svc["status"] = json!({"loadBalancer": {"ingress": ingress}});
        }
        svc
    }
}

/// One endpoint of an EndpointSlice.
#[derive(Debug, Clone)]
pub(crate) struct Ep {
    addr: String,
    node: String,
    ready: bool,
    serving: bool,
    terminating: bool,
    zone_hint: Option<String>,
}

impl Ep {
    /// A ready endpoint on `node-b` (not the kproxy node `node-a`).
    pub(crate) fn ready(addr: &str) -> Ep {
        Ep {
            addr: addr.to_string(),
            node: "node-b".to_string(),
            ready: true,
            serving: true,
            terminating: false,
            zone_hint: None,
        }
    }

    /// A terminating endpoint that still serves (`ready: false, serving: true,
    /// terminating: true`), on `node-b`.
    pub(crate) fn terminating(addr: &str) -> Ep {
        Ep {
            ready: false,
            serving: true,
            terminating: true,
            ..Ep::ready(addr)
        }
    }

    /// On node `node`.
    pub(crate) fn on(mut self, node: &str) -> Ep {
        self.node = node.to_string();
        self
    }

    /// With a `hints.forZones` entry for `zone`.
    pub(crate) fn zone_hint(mut self, zone: &str) -> Ep {
        self.zone_hint = Some(zone.to_string());
        self
    }

    fn json(&self) -> Value {
        let mut ep = json!({
            "addresses": [self.addr],
            "conditions": {
                "ready": self.ready,
                "serving": self.serving,
                "terminating": self.terminating,
            },
            "nodeName": self.node,
        });
        if let Some(zone) = &self.zone_hint {
            ep["hints"] = json!({"forZones": [{"name": zone}]});
        }
        ep
    }
}

/// An EndpointSlice of `service` named `slice`; the address type follows the first endpoint
/// (IPv4 when empty).
pub(crate) fn endpoint_slice(service: &str, slice: &str, eps: &[Ep], ports: &[Port]) -> Value {
    let family = eps.first().map_or("IPv4", |e| family_of(&e.addr));
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| json!({"name": p.name, "protocol": p.protocol, "port": p.target}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice,
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": family,
        "endpoints": eps.iter().map(Ep::json).collect::<Vec<_>>(),
        "ports": ports,
    })
}

/// A Node with InternalIP(s) and, optionally, a zone label.
pub(crate) fn node(name: &str, ips: &[&str], zone: Option<&str>) -> Value {
    let mut labels = json!({"kubernetes.io/hostname": name});
    if let Some(zone) = zone {
        labels[ZONE_LABEL] = json!(zone);
    }
    let addresses: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"type": "InternalIP", "address": ip}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {"addresses": addresses},
    })
}

/// [`node`] with `spec.podCIDRs` (and `spec.podCIDR`, the first of them): the ranges this
/// node's pods get their addresses from, which `--detect-local-mode=NodeCIDR` reads.
pub(crate) fn node_with_pod_cidrs(name: &str, ips: &[&str], pod_cidrs: &[&str]) -> Value {
    let mut n = node(name, ips, None);
    n["spec"] = json!({"podCIDR": pod_cidrs.first(), "podCIDRs": pod_cidrs});
    n
}
