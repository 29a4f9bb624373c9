//! The desired state: plain data, no Kubernetes types, one IP family per service port.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::LocalTraffic;

/// An IP family. Each family is programmed independently, as upstream runs one proxier per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of an address.
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    /// The family of a CIDR.
    pub fn of_net(net: &IpNet) -> Self {
        match net {
            IpNet::V4(_) => Self::V4,
            IpNet::V6(_) => Self::V6,
        }
    }

    /// Both families, IPv4 first.
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// A transport protocol a service port can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The lower-case name the kernel tools use (`tcp`, `udp`, `sctp`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Cluster or Local, for both externalTrafficPolicy and internalTrafficPolicy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum TrafficPolicy {
    /// Any ready endpoint in the cluster.
    #[default]
    Cluster,
    /// Only endpoints on this node.
    Local,
}

/// Identifies a service port the way upstream does: `namespace/name:portName` plus protocol.
///
/// Shared strings: a service port's name is a key in the desired state and in every mode's
/// render cache (the nftables mode holds it once per element group it contributes to), and a
/// clone copies three pointers instead of allocating three strings (issue #17).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    /// The Service's namespace.
    pub namespace: Arc<str>,
    /// The Service's name.
    pub name: Arc<str>,
    /// The port's name; empty for a single unnamed port.
    pub port: Arc<str>,
    /// The port's protocol.
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    /// `ns/name:port` (`ns/name` for an unnamed port): upstream's spelling, used in comments and
    /// in chain-name hashes so our chain suffixes match upstream's for the same service.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// The key of a service port in one family's view: dual-stack services appear once per family.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortKey {
    /// The family this entry programs.
    pub family: IpFamily,
    /// The service port.
    pub name: ServicePortName,
}

/// ClientIP session affinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionAffinity {
    /// How long a client stays pinned after its last new connection.
    pub timeout: Duration,
}

/// One endpoint a service port may forward to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// The endpoint's address (same family as the service port).
    pub ip: IpAddr,
    /// The endpoint's port (the resolved targetPort).
    pub port: u16,
    /// Whether the endpoint runs on this node.
    pub is_local: bool,
}

/// The endpoints of a service port, already chosen by the control plane.
///
/// Both lists are final: ready endpoints, or serving-terminating ones when no ready one exists
/// for that policy (never a mix); topology hints already applied to `cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct Endpoints {
    /// Used when the applicable traffic policy is Cluster. Sorted. Shared with `serving` when
    /// the two are the same list (nearly always: every endpoint ready, no topology hints), which
    /// saves a copy of every service port's endpoints (9.5 MiB at 50,000 services of 10).
    pub cluster: Arc<[Endpoint]>,
    /// Used when the applicable traffic policy is Local. Sorted.
    pub local: Vec<Endpoint>,
    /// Whether any usable endpoint exists anywhere. `false` means REJECT (no endpoints);
    /// `true` with an empty `local` list and a Local policy means DROP.
    pub any: bool,
    /// Every serving endpoint (ready, or terminating but still serving), whatever topology and
    /// locality chose above. Not used for new connections: it is the set an existing UDP/SCTP
    /// flow may keep using, so conntrack cleanup leaves flows to a gracefully terminating
    /// endpoint alone (upstream's reconciler keys on `IsServing()`). Sorted.
    pub serving: Arc<[Endpoint]>,
    /// How many local endpoints are ready (not the terminating fallback): what a health-check
    /// node port reports, so a load balancer stops sending to a node whose pods are all going.
    pub local_ready: usize,
}

/// One service port in one family: its frontends, policies and chosen endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServicePort {
    /// Which service port this is.
    pub name: ServicePortName,
    /// The family of every address below.
    pub family: IpFamily,
    /// The ClusterIP of this family, if the Service has one.
    pub cluster_ip: Option<IpAddr>,
    /// The service port number.
    pub port: u16,
    /// The NodePort, for NodePort and LoadBalancer Services.
    pub node_port: Option<u16>,
    /// `spec.externalIPs` of this family.
    pub external_ips: Vec<IpAddr>,
    /// LoadBalancer ingress IPs of this family (ipMode Proxy excluded).
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` of this family; empty means every source is allowed.
    pub source_ranges: Vec<IpNet>,
    /// ClientIP affinity, if configured.
    pub affinity: Option<SessionAffinity>,
    /// externalTrafficPolicy (applies to NodePort, externalIPs and LB IPs).
    pub external_policy: TrafficPolicy,
    /// internalTrafficPolicy (applies to the ClusterIP).
    pub internal_policy: TrafficPolicy,
    /// The health-check NodePort of an ETP=Local LoadBalancer Service.
    pub health_check_node_port: Option<u16>,
    /// The endpoints to forward to.
    pub endpoints: Endpoints,
}

impl ServicePort {
    /// The endpoints traffic to the ClusterIP may use, per internalTrafficPolicy.
    pub fn internal_endpoints(&self) -> &[Endpoint] {
        match self.internal_policy {
            TrafficPolicy::Cluster => &self.endpoints.cluster,
            TrafficPolicy::Local => &self.endpoints.local,
        }
    }

    /// The endpoints external traffic may use, per externalTrafficPolicy.
    pub fn external_endpoints(&self) -> &[Endpoint] {
        match self.external_policy {
            TrafficPolicy::Cluster => &self.endpoints.cluster,
            TrafficPolicy::Local => &self.endpoints.local,
        }
    }

    /// Whether the service is reachable from outside the cluster network (NodePort, externalIPs,
    /// LB IPs).
    pub fn has_external_frontends(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }
}

/// Which local addresses accept NodePort traffic, already resolved by the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub enum NodePortAddresses {
    /// Every local address (upstream's default for iptables and ipvs), loopback excluded.
    #[default]
    AllLocal,
    /// Exactly these addresses.
    Only(Vec<IpAddr>),
}

/// Node-wide settings every mode needs. Changes here force a full resync.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct NodeSettings {
    /// This node's name.
    pub node_name: String,
    /// This node's addresses (from the Node object, then the flags), primary first per family.
    pub node_ips: Vec<IpAddr>,
    /// How the rules recognise traffic from this node's pods: it is not masqueraded on
    /// ClusterIPs and takes the ETP=Local short-circuit. [`LocalTraffic::None`] (the default)
    /// disables both, as upstream's no-op detector.
    pub local_traffic: LocalTraffic,
    /// Service CIDRs (`--service-cluster-ip-range`).
    pub service_cidrs: Vec<IpNet>,
    /// Masquerade every service connection.
    pub masquerade_all: bool,
    /// The fwmark bit that flags a connection for masquerade (upstream default 14).
    pub masquerade_bit: u8,
    /// Addresses that accept NodePorts.
    pub node_port_addresses: NodePortAddresses,
}

impl NodeSettings {
    /// The masquerade mark, `1 << masquerade_bit`.
    pub fn masquerade_mark(&self) -> u32 {
        1u32 << u32::from(self.masquerade_bit.min(31))
    }
}

/// One immutable snapshot of everything this node programs.
///
/// Service ports are `Arc`-shared between snapshots so an unchanged service costs a pointer copy,
/// and so a mode can recognise unchanged services by `Arc::ptr_eq`.
#[derive(Debug, Clone, Default)]
pub struct ProxyState {
    /// Node-wide settings.
    pub node: Arc<NodeSettings>,
    /// Every service port of both families, sorted for stable renders and diffs.
    pub services: BTreeMap<ServicePortKey, Arc<ServicePort>>,
}

impl ProxyState {
    /// The service ports of one family, in key order.
    pub fn family(&self, family: IpFamily) -> impl Iterator<Item = &Arc<ServicePort>> {
        self.services
            .iter()
            .filter(move |(k, _)| k.family == family)
            .map(|(_, v)| v)
    }
}
