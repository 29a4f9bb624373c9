//! Service → frontends: which service ports exist, with which addresses and policies.
//!
//! Mirrors upstream `pkg/proxy/serviceport.go` (`newBaseServiceInfo`),
//! `pkg/proxy/servicechangetracker.go` (`serviceToServiceMap`), `pkg/proxy/util`
//! (`ShouldSkipService`, `GetClusterIPByFamily`, `MapIPsByIPFamily`, `IsVIPMode`) and
//! `pkg/api/v1/service/util.go` (`ExternallyAccessible`, `ExternalPolicyLocal`,
//! `NeedsHealthCheck`). A Service is validated once ([`parse`]) and then expanded into one
//! [`ServicePort`] per (family, port) ([`ServiceSpec::frontend`]), so an invalid field is
//! reported once even for a dual-stack Service.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::LoadBalancerIngress;
use kproxy_contract::{
    Endpoints, IpFamily, Protocol, ServicePort, ServicePortName, SessionAffinity, TrafficPolicy,
};

use super::admission::Guard;
use super::parse;
use super::skipped::Skipped;
use crate::cache::ObjectKey;
use crate::source::slim::Service;

/// Upstream's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: i32 = 10_800;
/// The largest timeout API validation accepts (1 day).
pub const MAX_AFFINITY_TIMEOUT_SECS: i32 = 86_400;

/// One valid entry of `spec.ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PortSpec {
    /// The port's name, `""` when unnamed.
    pub name: Arc<str>,
    /// The port's protocol.
    pub protocol: Protocol,
    /// The service port number.
    pub port: u16,
    /// The NodePort, for NodePort and LoadBalancer Services.
    pub node_port: Option<u16>,
}

/// A Service after validation, before it is split per family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServiceSpec {
    /// At most one ClusterIP per family.
    pub cluster_ips: Vec<IpAddr>,
    /// Valid ports, unique by (name, protocol).
    pub ports: Vec<PortSpec>,
    /// Valid `spec.externalIPs`, both families, duplicates removed.
    pub external_ips: Vec<IpAddr>,
    /// VIP-mode LoadBalancer ingress IPs, both families, duplicates removed.
    pub load_balancer_ips: Vec<IpAddr>,
    /// Valid `spec.loadBalancerSourceRanges`, both families.
    pub source_ranges: Vec<IpNet>,
    /// ClientIP affinity.
    pub affinity: Option<SessionAffinity>,
    /// Effective externalTrafficPolicy.
    pub external_policy: TrafficPolicy,
    /// Effective internalTrafficPolicy.
    pub internal_policy: TrafficPolicy,
    /// Health-check NodePort (ETP=Local LoadBalancer only).
    pub health_check_node_port: Option<u16>,
}

impl ServiceSpec {
    /// The ClusterIP of one family, if the Service has one.
    pub(crate) fn cluster_ip(&self, family: IpFamily) -> Option<IpAddr> {
        self.cluster_ips
            .iter()
            .copied()
            .find(|ip| IpFamily::of(ip) == family)
    }

    /// The frontend of one port in one family, with no endpoints yet. `None` when the Service
    /// has no ClusterIP in that family (upstream: a single-stack Service has no rules in the
    /// other family).
    pub(crate) fn frontend(
        &self,
        key: &ObjectKey,
        family: IpFamily,
        port: &PortSpec,
    ) -> Option<ServicePort> {
        let cluster_ip = self.cluster_ip(family)?;
        let of_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
            ips.iter()
                .copied()
                .filter(|ip| IpFamily::of(ip) == family)
                .collect()
        };
        Some(ServicePort {
            name: ServicePortName {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                port: port.name.clone(),
                protocol: port.protocol,
            },
            family,
            cluster_ip: Some(cluster_ip),
            port: port.port,
            node_port: port.node_port,
            external_ips: of_family(&self.external_ips),
            load_balancer_ips: of_family(&self.load_balancer_ips),
            source_ranges: self
                .source_ranges
                .iter()
                .copied()
                .filter(|n| IpFamily::of_net(n) == family)
                .collect(),
            affinity: self.affinity,
            external_policy: self.external_policy,
            internal_policy: self.internal_policy,
            health_check_node_port: self.health_check_node_port,
            endpoints: Endpoints::default(),
        })
    }
}

/// `spec.type`, defaulted to ClusterIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

/// Validates a Service. `None` when it programs nothing: ExternalName, headless, or no usable
/// ClusterIP (upstream `ShouldSkipService` plus an empty `GetClusterIPByFamily` for every family).
///
/// `guard` refuses the addresses and NodePorts a Service must not claim (see
/// [`super::admission`]); each is reported and left out, the rest of the Service keeps working.
pub(crate) fn parse(
    key: &ObjectKey,
    svc: &Service,
    guard: Guard<'_>,
    skipped: &mut Vec<Skipped>,
) -> Option<ServiceSpec> {
    // Names end up in chain names and rule comments: the API server only admits DNS labels, so
    // anything else came from a hand-written manifest and is refused before it gets that far.
    let bad_name = parse::bad_dns_label(&key.name, false)
        .map(|r| ("metadata.name", r))
        .or_else(|| {
            // Objects without a namespace (cluster-wide manifests) have an empty one.
            (!key.namespace.is_empty())
                .then(|| parse::bad_dns_label(&key.namespace, true))
                .flatten()
                .map(|r| ("metadata.namespace", r))
        });
    if let Some((field, reason)) = bad_name {
        skipped.push(Skipped::service(
            key,
            field,
            format!("{reason}; Service skipped"),
        ));
        return None;
    }
    let Some(spec) = svc.spec.as_ref() else {
        skipped.push(Skipped::service(key, "spec", "missing; Service skipped"));
        return None;
    };
    let ty = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        Some(other) => {
            skipped.push(Skipped::service(
                key,
                "spec.type",
                format!("{other:?} is not a known Service type; treated as ClusterIP"),
            ));
            ServiceType::ClusterIp
        }
    };
    if ty == ServiceType::ExternalName {
        return None;
    }
    let cluster_ips = cluster_ips(key, svc, guard, skipped)?;

    let raw_external_ips = spec.external_ips.as_deref().unwrap_or_default();
    // Upstream `ExternallyAccessible`: only these types can receive traffic from outside, so
    // only they can have a Local external policy (`ExternalPolicyLocal`).
    let externally_accessible = match ty {
        ServiceType::NodePort | ServiceType::LoadBalancer => true,
        ServiceType::ClusterIp => !raw_external_ips.is_empty(),
        ServiceType::ExternalName => false,
    };
    let external_policy =
        if externally_accessible && spec.external_traffic_policy.as_deref() == Some("Local") {
            TrafficPolicy::Local
        } else {
            TrafficPolicy::Cluster
        };
    let internal_policy = if spec.internal_traffic_policy.as_deref() == Some("Local") {
        TrafficPolicy::Local
    } else {
        TrafficPolicy::Cluster
    };

    // Upstream `NeedsHealthCheck`: LoadBalancer with a Local external policy. A missing port is
    // only logged upstream, so it is not reported here either.
    let health_check_node_port = match (ty, external_policy, spec.health_check_node_port) {
        (ServiceType::LoadBalancer, TrafficPolicy::Local, Some(p)) if p != 0 => {
            let port = parse::port(p);
            let refused = match port {
                None => Some(parse::bad_port(p)),
                Some(port) => guard.node_port(port),
            };
            if let Some(reason) = refused {
                skipped.push(Skipped::service(
                    key,
                    "spec.healthCheckNodePort",
                    format!("{reason}; health check skipped"),
                ));
                None
            } else {
                port
            }
        }
        _ => None,
    };

    let ports = ports(key, svc, ty, guard, skipped);
    let mut external_ips = addresses(key, "spec.externalIPs", raw_external_ips, guard, skipped);
    let mut load_balancer_ips = load_balancer_ips(key, svc, guard, skipped);
    own_duplicates(
        key,
        svc,
        &cluster_ips,
        &mut external_ips,
        &mut load_balancer_ips,
        skipped,
    );
    Some(ServiceSpec {
        cluster_ips,
        ports,
        external_ips,
        load_balancer_ips,
        source_ranges: source_ranges(key, svc, skipped),
        affinity: affinity(key, svc, skipped),
        external_policy,
        internal_policy,
        health_check_node_port,
    })
}

/// The ClusterIPs, at most one per family (the first valid one). `spec.clusterIPs` wins over
/// `spec.clusterIP`, which is only read when the list is empty (old objects, hand-written
/// manifests).
///
/// Upstream (`GetClusterIPByFamily`) indexes `spec.clusterIPs` by `spec.ipFamilies`; the API
/// server keeps both consistent, so reading each address's own family gives the same answer
/// without trusting a second list.
///
/// A ClusterIP `guard` refuses (special, the node's own, outside the service CIDRs of a
/// manifest) skips its family, as an invalid one does.
fn cluster_ips(
    key: &ObjectKey,
    svc: &Service,
    guard: Guard<'_>,
    skipped: &mut Vec<Skipped>,
) -> Option<Vec<IpAddr>> {
    let spec = svc.spec.as_ref()?;
    let list: Vec<(String, &str)> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
            .collect(),
        _ => spec
            .cluster_ip
            .as_deref()
            .filter(|ip| !ip.is_empty())
            .map(|ip| ("spec.clusterIP".to_owned(), ip))
            .into_iter()
            .collect(),
    };
    // Headless: upstream `IsServiceIPSet` looks at the primary ClusterIP only.
    match list.first() {
        None => {
            skipped.push(Skipped::service(
                key,
                "spec.clusterIP",
                "not set (no ClusterIP allocated); service skipped",
            ));
            return None;
        }
        Some((_, "None")) => return None,
        Some(_) => {}
    }
    let mut out: Vec<IpAddr> = Vec::with_capacity(2);
    // Families whose first ClusterIP was refused: a later one of the family is still a second.
    let mut refused: Vec<IpFamily> = Vec::new();
    for (field, raw) in list {
        match parse::ip(raw) {
            Some(ip)
                if out.iter().all(|o| IpFamily::of(o) != IpFamily::of(&ip))
                    && !refused.contains(&IpFamily::of(&ip)) =>
            {
                match guard.cluster_ip(ip) {
                    None => out.push(ip),
                    Some(why) => {
                        refused.push(IpFamily::of(&ip));
                        skipped.push(Skipped::service(
                            key,
                            field,
                            format!("{raw:?} {why}; this family is skipped"),
                        ));
                    }
                }
            }
            Some(_) => skipped.push(Skipped::service(
                key,
                field,
                format!("{raw:?} is a second ClusterIP of the same family; address ignored"),
            )),
            None => skipped.push(Skipped::service(
                key,
                field,
                format!("{raw:?} is not a valid IP address; this family is skipped"),
            )),
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Valid `spec.ports`, unique by (name, protocol).
///
/// Upstream keys its map by (name, protocol) so a duplicate silently replaces the earlier
/// entry; the API server rejects duplicates, so this only matters for manifests, where keeping
/// the first and reporting the second is clearer.
fn ports(
    key: &ObjectKey,
    svc: &Service,
    ty: ServiceType,
    guard: Guard<'_>,
    skipped: &mut Vec<Skipped>,
) -> Vec<PortSpec> {
    let raw = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    let mut out: Vec<(usize, PortSpec)> = Vec::with_capacity(raw.len());
    for (i, p) in raw.iter().enumerate() {
        let protocol = match parse::protocol(p.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(reason) => {
                skipped.push(Skipped::service(
                    key,
                    format!("spec.ports[{i}].protocol"),
                    format!("{reason}; port skipped"),
                ));
                continue;
            }
        };
        let Some(port) = parse::port(p.port) else {
            skipped.push(Skipped::service(
                key,
                format!("spec.ports[{i}].port"),
                format!("{}; port skipped", parse::bad_port(p.port)),
            ));
            continue;
        };
        let name = p.name.clone().unwrap_or_default();
        if let Some(reason) = Some(name.as_str())
            .filter(|n| !n.is_empty())
            .and_then(parse::bad_port_name)
        {
            skipped.push(Skipped::service(
                key,
                format!("spec.ports[{i}].name"),
                format!("{reason}; port skipped"),
            ));
            continue;
        }
        if let Some((first, _)) = out
            .iter()
            .find(|(_, o)| o.port == port && o.protocol == protocol)
        {
            skipped.push(Skipped::service(
                key,
                format!("spec.ports[{i}].port"),
                format!(
                    "{port}/{} duplicates spec.ports[{first}]; port skipped",
                    protocol.as_str().to_uppercase()
                ),
            ));
            continue;
        }
        if let Some((first, _)) = out
            .iter()
            .find(|(_, o)| *o.name == *name && o.protocol == protocol)
        {
            skipped.push(Skipped::service(
                key,
                format!("spec.ports[{i}]"),
                format!(
                    "name {name:?} and protocol {} duplicate spec.ports[{first}]; port skipped",
                    protocol.as_str().to_uppercase()
                ),
            ));
            continue;
        }
        // NodePorts only exist for NodePort and LoadBalancer Services; 0 means "none allocated"
        // (e.g. `allocateLoadBalancerNodePorts: false`).
        let node_port = match (ty, p.node_port) {
            (ServiceType::NodePort | ServiceType::LoadBalancer, Some(np)) if np != 0 => {
                let node_port = parse::port(np);
                // The API server refuses a NodePort twice in one Service (same protocol): each
                // mode would pick another of the two ports.
                let twice = node_port.and_then(|n| {
                    out.iter()
                        .find(|(_, o)| o.node_port == Some(n) && o.protocol == protocol)
                        .map(|(first, _)| *first)
                });
                let refused = match (node_port, twice) {
                    (None, _) => Some(parse::bad_port(np)),
                    (Some(n), Some(first)) => Some(format!(
                        "{n}/{} duplicates spec.ports[{first}].nodePort",
                        protocol.as_str().to_uppercase()
                    )),
                    (Some(n), None) => guard.node_port(n),
                };
                if let Some(reason) = refused {
                    skipped.push(Skipped::service(
                        key,
                        format!("spec.ports[{i}].nodePort"),
                        format!("{reason}; NodePort skipped"),
                    ));
                    None
                } else {
                    node_port
                }
            }
            _ => None,
        };
        out.push((
            i,
            PortSpec {
                name: name.into(),
                protocol,
                port,
                node_port,
            },
        ));
    }
    out.into_iter().map(|(_, p)| p).collect()
}

/// Parses a list of externalIPs, reporting and dropping invalid ones and those `guard` refuses,
/// dropping duplicates.
fn addresses(
    key: &ObjectKey,
    field: &str,
    raw: &[String],
    guard: Guard<'_>,
    skipped: &mut Vec<Skipped>,
) -> Vec<IpAddr> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, s) in raw.iter().enumerate() {
        match parse::ip(s) {
            Some(ip) if !out.contains(&ip) => match guard.external(ip) {
                None => out.push(ip),
                Some(why) => skipped.push(Skipped::service(
                    key,
                    format!("{field}[{i}]"),
                    format!("{s:?} {why}; address skipped"),
                )),
            },
            Some(_) => {}
            None => skipped.push(Skipped::service(
                key,
                format!("{field}[{i}]"),
                format!("{s:?} is not a valid IP address; address skipped"),
            )),
        }
    }
    out
}

/// `status.loadBalancer.ingress`, empty when unset.
fn ingress(svc: &Service) -> &[LoadBalancerIngress] {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default()
}

/// Each `status.loadBalancer.ingress[i].ip` as written (empty where unset), so a position in
/// it is the index a log line names.
pub(super) fn ingress_ips(svc: &Service) -> Vec<String> {
    ingress(svc)
        .iter()
        .map(|i| i.ip.clone().unwrap_or_default())
        .collect()
}

/// VIP-mode ingress IPs from `status.loadBalancer.ingress` (upstream `IsVIPMode`: an unset
/// `ipMode` means VIP; `Proxy`, or anything else, means traffic must go through the load
/// balancer, so no rule is written). Hostname-only entries are ignored, as upstream.
fn load_balancer_ips(
    key: &ObjectKey,
    svc: &Service,
    guard: Guard<'_>,
    skipped: &mut Vec<Skipped>,
) -> Vec<IpAddr> {
    let ingress = ingress(svc);
    let mut out = Vec::with_capacity(ingress.len());
    for (i, ing) in ingress.iter().enumerate() {
        let Some(raw) = ing.ip.as_deref().filter(|ip| !ip.is_empty()) else {
            continue;
        };
        match ing.ip_mode.as_deref() {
            None | Some("VIP") => {}
            Some("Proxy") => continue,
            Some(other) => {
                skipped.push(Skipped::service(
                    key,
                    format!("status.loadBalancer.ingress[{i}].ipMode"),
                    format!("{other:?} is not a known ipMode (VIP, Proxy); address skipped"),
                ));
                continue;
            }
        }
        match parse::ip(raw) {
            Some(ip) if !out.contains(&ip) => match guard.external(ip) {
                None => out.push(ip),
                Some(why) => skipped.push(Skipped::service(
                    key,
                    format!("status.loadBalancer.ingress[{i}].ip"),
                    format!("{raw:?} {why}; address skipped"),
                )),
            },
            Some(_) => {}
            None => skipped.push(Skipped::service(
                key,
                format!("status.loadBalancer.ingress[{i}].ip"),
                format!("{raw:?} is not a valid IP address; address skipped"),
            )),
        }
    }
    out
}

/// Drops the externalIPs that are one of the Service's own ClusterIPs and the LoadBalancer IPs
/// that are one of those or an externalIP: on every port of the Service they would be the same
/// frontend twice, with different policies, which each mode would resolve its own way. The
/// ClusterIP is kept, then the externalIP (upstream iptables' rule order, and the order the
/// trace model matches in).
fn own_duplicates(
    key: &ObjectKey,
    svc: &Service,
    cluster_ips: &[IpAddr],
    external_ips: &mut Vec<IpAddr>,
    load_balancer_ips: &mut Vec<IpAddr>,
    skipped: &mut Vec<Skipped>,
) {
    let spec = svc.spec.as_ref();
    let raw_external = spec
        .and_then(|s| s.external_ips.as_deref())
        .unwrap_or_default();
    let index_of = |raw: &[String], ip: IpAddr| raw.iter().position(|r| parse::ip(r) == Some(ip));
    external_ips.retain(|ip| {
        if !cluster_ips.contains(ip) {
            return true;
        }
        let field = index_of(raw_external, *ip).map_or("spec.externalIPs".to_string(), |i| {
            format!("spec.externalIPs[{i}]")
        });
        skipped.push(Skipped::service(
            key,
            field,
            format!("\"{ip}\" is this Service's own ClusterIP; address skipped"),
        ));
        false
    });
    let ingress = ingress_ips(svc);
    load_balancer_ips.retain(|ip| {
        let what = if cluster_ips.contains(ip) {
            "ClusterIP"
        } else if external_ips.contains(ip) {
            "externalIP"
        } else {
            return true;
        };
        let field = index_of(&ingress, *ip)
            .map_or("status.loadBalancer.ingress".to_string(), |i| {
                format!("status.loadBalancer.ingress[{i}].ip")
            });
        skipped.push(Skipped::service(
            key,
            field,
            format!("\"{ip}\" is also this Service's own {what}; address skipped"),
        ));
        false
    });
}

/// `spec.loadBalancerSourceRanges`, whitespace-trimmed (upstream: validation "mistakenly allows
/// whitespace padding"), invalid entries reported and dropped.
///
/// As upstream (`MapCIDRsByIPFamily`), the list is split per family afterwards: a family left
/// with no range allows every source.
fn source_ranges(key: &ObjectKey, svc: &Service, skipped: &mut Vec<Skipped>) -> Vec<IpNet> {
    let raw = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.as_deref())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(raw.len());
    for (i, s) in raw.iter().enumerate() {
        match parse::cidr(s.trim()) {
            Some(net) if !out.contains(&net) => out.push(net),
            Some(_) => {}
            None => skipped.push(Skipped::service(
                key,
                format!("spec.loadBalancerSourceRanges[{i}]"),
                format!("{s:?} is not a valid CIDR; range skipped"),
            )),
        }
    }
    out
}

/// ClientIP affinity. Upstream dereferences `timeoutSeconds` unchecked (the API server defaults
/// it to 10800 and validates 1..=86400); here a missing value gets the default and an invalid
/// one gets the default plus a report.
fn affinity(key: &ObjectKey, svc: &Service, skipped: &mut Vec<Skipped>) -> Option<SessionAffinity> {
    let spec = svc.spec.as_ref()?;
    match spec.session_affinity.as_deref() {
        None | Some("None") => return None,
        Some("ClientIP") => {}
        Some(other) => {
            skipped.push(Skipped::service(
                key,
                "spec.sessionAffinity",
                format!("{other:?} is not a known affinity (None, ClientIP); affinity disabled"),
            ));
            return None;
        }
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    let secs = match timeout {
        None => DEFAULT_AFFINITY_TIMEOUT_SECS,
        Some(t) if (1..=MAX_AFFINITY_TIMEOUT_SECS).contains(&t) => t,
        Some(t) => {
            skipped.push(Skipped::service(
                key,
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                format!(
                    "{t} is not a valid timeout (1-{MAX_AFFINITY_TIMEOUT_SECS}); \
                     using the default {DEFAULT_AFFINITY_TIMEOUT_SECS}"
                ),
            ));
            DEFAULT_AFFINITY_TIMEOUT_SECS
        }
    };
    Some(SessionAffinity {
        timeout: Duration::from_secs(u64::from(secs.unsigned_abs())),
    })
}
