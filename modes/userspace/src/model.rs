//! What the userspace mode runs, as plain data: listeners with their endpoint tables, and the
//! service addresses made local to the node. Both the desired state (rendered) and the live
//! state (what this process runs plus the routes read back) are a [`UserspaceRules`], so a plan
//! is a diff of two values.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use kproxy_contract::{IpFamily, ServicePortName};

/// The transports this mode proxies. SCTP is not one of them (tokio has no SCTP sockets); such
/// service ports are reported, not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    /// TCP: accept, connect to an endpoint, copy both ways.
    Tcp,
    /// UDP: per-client flows with idle expiry.
    Udp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// One listening socket: a transport and an address. `0.0.0.0`/`::` stand for "every local
/// address" (NodePorts without `--nodeport-addresses`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenerKey {
    /// TCP or UDP.
    pub transport: Transport,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl fmt::Display for ListenerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.transport, self.addr)
    }
}

/// Which frontend of a service a listener serves: decides the traffic policy and whether the
/// source ranges apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Frontend {
    /// The ClusterIP (internalTrafficPolicy).
    ClusterIp,
    /// An externalIP (externalTrafficPolicy).
    ExternalIp,
    /// A LoadBalancer ingress IP (externalTrafficPolicy, loadBalancerSourceRanges).
    LoadBalancer,
    /// A NodePort (externalTrafficPolicy).
    NodePort,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ClusterIp => "cluster-ip",
            Self::ExternalIp => "external-ip",
            Self::LoadBalancer => "load-balancer",
            Self::NodePort => "node-port",
        })
    }
}

/// Everything a listener needs to place one new connection or flow. Immutable: an update swaps
/// in a new table, so connections in flight keep the one they started with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Table {
    /// The service port (its family tells dual-stack entries apart).
    pub service: ServicePortName,
    /// The family of the service port.
    pub family: IpFamily,
    /// Which frontend this is.
    pub frontend: Frontend,
    /// The endpoints new connections may use, after the traffic policy. Never empty: a frontend
    /// without endpoints has no listener, so the kernel refuses its connections (TCP RST, ICMP
    /// port unreachable for UDP).
    pub endpoints: Vec<SocketAddr>,
    /// Endpoints whose established connections stay up: every serving endpoint (ready, or
    /// terminating but serving) of the service port. A connection to any other endpoint is
    /// closed after the grace period.
    pub keep: BTreeSet<SocketAddr>,
    /// ClientIP session affinity timeout.
    pub affinity: Option<Duration>,
    /// Allowed client ranges (LoadBalancer frontends); empty allows every client.
    pub source_ranges: Vec<IpNet>,
}

impl Table {
    /// Whether a client may use this frontend (loadBalancerSourceRanges).
    pub fn allows(&self, client: IpAddr) -> bool {
        self.source_ranges.is_empty() || self.source_ranges.iter().any(|n| n.contains(&client))
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ->", self.frontend)?;
        for ep in &self.endpoints {
            write!(f, " {ep}")?;
        }
        if let Some(t) = self.affinity {
            write!(f, " affinity ClientIP {}s", t.as_secs())?;
        }
        if !self.source_ranges.is_empty() {
            write!(f, " from")?;
            for r in &self.source_ranges {
                write!(f, " {r}")?;
            }
        }
        let extra: Vec<String> = self
            .keep
            .iter()
            .filter(|k| !self.endpoints.contains(k))
            .map(ToString::to_string)
            .collect();
        if !extra.is_empty() {
            write!(f, " (keeping {})", extra.join(" "))?;
        }
        Ok(())
    }
}

/// The userspace mode's whole state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserspaceRules {
    /// Service addresses (ClusterIPs, externalIPs, LoadBalancer IPs) made local to the node by a
    /// `local` route on `lo` that kproxy owns.
    pub addresses: BTreeSet<IpAddr>,
    /// Listening sockets and what they forward to.
    pub listeners: BTreeMap<ListenerKey, Arc<Table>>,
    /// Service ports this mode cannot serve, with the reason (never dropped silently).
    pub unsupported: BTreeMap<String, String>,
}
