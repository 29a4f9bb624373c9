//! The pure part of conntrack cleanup: which flows are stale in a given state.
//!
//! Only UDP and SCTP flows are ever stale; TCP flows are never touched (graceful termination of
//! TCP relies on established connections surviving endpoint changes, and TCP clients reconnect
//! on their own).
//!
//! A *frontend* is what kproxy's rules match on: a service address (ClusterIP, externalIP,
//! load-balancer IP) with the service port, or a NodePort on any node address. The rules, in
//! order, for one flow:
//!
//! 1. **DNATed** (`IPS_DST_NAT`) and its original destination is a frontend (an address frontend
//!    first, then a NodePort by destination port): stale unless the reply source (the endpoint
//!    the flow was sent to) is one of that service port's *serving* endpoints, address and port
//!    ([`StaleReason::EndpointNotServing`]). Serving, not just "in the list new connections
//!    use": a terminating endpoint that still serves keeps its flows, as upstream. A service
//!    scaled to zero has no serving endpoint, so all its flows go (a case upstream first missed;
//!    rule 20c of docs/semantics.md, generalised to every frontend).
//! 2. **DNATed**, its original destination is no current frontend, but it was a frontend in the
//!    previous sync, or the address lies in a service CIDR (kproxy owns those, so this also
//!    covers services deleted while kproxy was down): stale ([`StaleReason::FrontendRemoved`];
//!    rule 20b, generalised to ports, externalIPs, LB IPs and NodePorts).
//! 3. **Not NATed at all** (neither DNAT nor SNAT) and its original destination is a frontend
//!    that now forwards this flow to endpoints: stale ([`StaleReason::NowHasEndpoints`];
//!    rule 20a). Such an entry was created while the frontend had no endpoints (or did not
//!    exist yet): the packet was routed or dropped, and since NAT is decided only for a flow's
//!    first packet, the flow would bypass the DNAT rules for as long as the client keeps
//!    sending. Deleting a non-NATed UDP entry is harmless even in the rare case it is not ours:
//!    the next packet recreates it identically. "Forwards this flow" depends on the source for
//!    an externalTrafficPolicy=Local frontend without local endpoints: only pod traffic is
//!    short-circuited to the cluster's endpoints. A conntrack entry records addresses, not the
//!    interface a flow arrived on, so only the source-address detector can tell pod flows
//!    apart; under an interface detector every flow counts as not from a pod (see
//!    [`from_local_pod`]).
//!
//! Everything else is left alone, in particular SNAT-only flows and flows to addresses kproxy
//! does not own.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use kproxy_contract::{IpFamily, Protocol, ProxyState, ServicePort, TrafficPolicy};

use super::Flow;

/// Why a flow is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StaleReason {
    /// DNATed to an endpoint that no longer serves this frontend.
    EndpointNotServing,
    /// DNATed for a frontend that no longer exists.
    FrontendRemoved,
    /// Not NATed, to a frontend that now has endpoints.
    NowHasEndpoints,
}

impl StaleReason {
    /// A short name for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::EndpointNotServing => "endpoint-not-serving",
            Self::FrontendRemoved => "frontend-removed",
            Self::NowHasEndpoints => "now-has-endpoints",
        }
    }
}

/// Which kind of frontend matched: it decides the endpoint list new flows use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// ClusterIP: internalTrafficPolicy.
    Internal,
    /// externalIP, LB IP, NodePort: externalTrafficPolicy.
    External,
}

/// The frontends of one state, indexed for lookups by a flow's original destination.
#[derive(Default)]
struct Frontends<'s> {
    addresses: HashMap<(Protocol, IpAddr, u16), (&'s ServicePort, Kind)>,
    node_ports: HashMap<(Protocol, IpFamily, u16), &'s ServicePort>,
}

impl<'s> Frontends<'s> {
    fn of(state: &'s ProxyState) -> Self {
        let mut out = Frontends::default();
        for sp in state.services.values() {
            let proto = sp.name.protocol;
            // The first service (in key order) wins a duplicate frontend, which validation
            // should have prevented anyway.
            if let Some(ip) = sp.cluster_ip {
                out.addresses
                    .entry((proto, ip, sp.port))
                    .or_insert((sp, Kind::Internal));
            }
            for &ip in sp.external_ips.iter().chain(&sp.load_balancer_ips) {
                out.addresses
                    .entry((proto, ip, sp.port))
                    .or_insert((sp, Kind::External));
            }
            if let Some(np) = sp.node_port {
                out.node_ports.entry((proto, sp.family, np)).or_insert(sp);
            }
        }
        out
    }

    /// The frontend a flow was sent to: an address frontend, else a NodePort.
    fn lookup(&self, protocol: Protocol, dst: SocketAddr) -> Option<(&'s ServicePort, Kind)> {
        self.addresses
            .get(&(protocol, dst.ip(), dst.port()))
            .copied()
            .or_else(|| {
                self.node_ports
                    .get(&(protocol, IpFamily::of(&dst.ip()), dst.port()))
                    .map(|sp| (*sp, Kind::External))
            })
    }
}

/// The flows in `flows` that are stale in `current`, with the reason (see the module
/// documentation). `previous` is the state of the last sync, if any.
pub fn stale_flows<'f>(
    current: &ProxyState,
    previous: Option<&ProxyState>,
    flows: &'f [Flow],
) -> Vec<(&'f Flow, StaleReason)> {
    let now = Frontends::of(current);
    let before = previous.map(Frontends::of).unwrap_or_default();
    flows
        .iter()
        .filter_map(|flow| stale(&now, &before, current, flow).map(|reason| (flow, reason)))
        .collect()
}

fn stale(
    now: &Frontends<'_>,
    before: &Frontends<'_>,
    current: &ProxyState,
    flow: &Flow,
) -> Option<StaleReason> {
    if !matches!(flow.protocol, Protocol::Udp | Protocol::Sctp) {
        return None;
    }
    let dst = flow.original.dst;
    let frontend = now.lookup(flow.protocol, dst);
    if flow.dnat {
        return match frontend {
            Some((sp, _)) => {
                let endpoint = flow.reply.src;
                let serving = sp
                    .endpoints
                    .serving
                    .iter()
                    .any(|e| e.ip == endpoint.ip() && e.port == endpoint.port());
                (!serving).then_some(StaleReason::EndpointNotServing)
            }
            None => {
                let in_service_cidr = current
                    .node
                    .service_cidrs
                    .iter()
                    .any(|net| net.contains(&dst.ip()));
                (in_service_cidr || before.lookup(flow.protocol, dst).is_some())
                    .then_some(StaleReason::FrontendRemoved)
            }
        };
    }
    if flow.snat {
        return None;
    }
    let (sp, kind) = frontend?;
    forwards(sp, kind, current, flow.original.src.ip()).then_some(StaleReason::NowHasEndpoints)
}

/// Whether the rules now DNAT a new flow from `src` to this frontend (instead of rejecting or
/// dropping it).
fn forwards(sp: &ServicePort, kind: Kind, state: &ProxyState, src: IpAddr) -> bool {
    match kind {
        Kind::Internal => !sp.internal_endpoints().is_empty(),
        Kind::External => {
            // ETP=Local without local endpoints still forwards pod traffic to the cluster-wide
            // endpoints (the short-circuit for traffic from the pod network).
            let from_pods =
                sp.external_policy == TrafficPolicy::Local && from_local_pod(state, src);
            !sp.external_endpoints().is_empty() || (from_pods && !sp.endpoints.cluster.is_empty())
        }
    }
}

/// Whether a flow from `src` is known to come from a local pod, as the rules' local-traffic
/// detector decides. Only a source-address detector can answer from a conntrack entry, which
/// holds no interface. Under an interface detector (bridge, name prefix) the answer is "no",
/// on purpose: an un-NATed entry is then deleted only when every source's new flows would be
/// DNATed. The other guess would delete entries of external clients whose new flows the rules
/// drop, cutting flows the rules have no better answer for; this one, at worst, leaves a pod's
/// UDP flow that started before the service had endpoints bypassing the DNAT for as long as
/// the pod keeps sending on it (what every such flow did before conntrack cleanup existed).
fn from_local_pod(state: &ProxyState, src: IpAddr) -> bool {
    state
        .node
        .local_traffic
        .cidr(IpFamily::of(&src))
        .is_some_and(|cidr| cidr.contains(&src))
}
