//! `kproxy trace`: what happens to the first packet of a new connection, and why.
#![warn(missing_docs)]
//!
//! Two kinds of tracer answer the same question with the same [`Verdict`] type:
//!
//! - [`model`], a pure function over the [`ProxyState`]: the rules of `docs/semantics.md`
//!   (which endpoint set, masquerade or not, REJECT / DROP and the rule that decided it). It
//!   never looks at a kernel rule.
//! - one tracer per mode over that mode's rendered (or read-back) kernel objects, walking its
//!   chains, maps or virtual servers the way the kernel would.
//!
//! Property tests pin every mode's tracer to the model: for random states and packets,
//! `mode_trace(render(state), packet)` must [`agree`](Verdict::agrees_with) with
//! `model(state, packet, dialect)`. Where a mode legitimately behaves differently (upstream's own
//! per-mode differences, or what a userspace proxy cannot do) the difference is a named field
//! of [`Dialect`] that the model applies, never a relaxed comparison.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use kproxy_contract::{IpFamily, Protocol, ProxyState, ServicePort, TrafficPolicy};

pub mod nft;

/// A mode whose rules the tracer walks. `kproxy trace` reaches every mode through this trait
/// alone, so the command is the same code for all of them.
pub trait Traceable: kproxy_contract::Mode {
    /// What happens to `packet` in `rules`, rendered or read back.
    fn trace(&self, rules: &Self::Rules, env: &Env, packet: &Packet) -> Trace;

    /// The [`kproxy_contract::Mode::Facts`] of a machine whose local addresses are `local`,
    /// for a trace that must not depend on the machine it runs on (the node's own addresses
    /// stand for it). Default: the mode's facts do not involve local addresses.
    fn facts_for(&self, local: &[IpAddr]) -> Self::Facts {
        let _ = local;
        Self::Facts::default()
    }

    /// Completes rules read back with what the kernel does not return and the rendering knows
    /// (nftables: which rendered rule each live rule is; IPVS: its nft table, which is not read
    /// back). Returns how many live rules the rendering does not know: the trace stops at them.
    fn complete_live(&self, live: &mut Self::Rules, rendered: &Self::Rules) -> usize {
        let _ = (live, rendered);
        0
    }

    /// Why this mode's live state cannot be traced, when it cannot (the userspace mode's
    /// listeners live in the daemon, not in the kernel).
    fn live_unavailable(&self) -> Option<&'static str> {
        None
    }
}

/// Where a packet comes from: decides which netfilter hooks it crosses (PREROUTING or OUTPUT).
/// The verdict never depends on it beyond that: addresses and the ingress interface decide
/// (the local-traffic detector, a local source).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A pod on this node (enters through PREROUTING from its veth).
    Pod,
    /// The node itself (a host-network process: OUTPUT).
    Node,
    /// Another host (enters through PREROUTING).
    External,
}

impl Origin {
    /// The spelling of `--from`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Pod => "pod",
            Self::Node => "node",
            Self::External => "external",
        }
    }

    /// Whether the packet is generated locally (OUTPUT) rather than received (PREROUTING).
    pub fn is_local(&self) -> bool {
        matches!(self, Self::Node)
    }
}

/// The first packet of a new connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Packet {
    /// Source address.
    pub src: IpAddr,
    /// Source port, if known (nothing kproxy programs depends on it).
    pub src_port: Option<u16>,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port.
    pub dst_port: u16,
    /// Transport protocol.
    pub proto: Protocol,
    /// Where it comes from.
    pub origin: Origin,
    /// The interface it arrived on (what `-i` / `iifname` compare), when known. A packet the
    /// node itself sends has none whatever this says: see [`Packet::ingress`].
    pub in_iface: Option<String>,
}

impl Packet {
    /// The family of the packet (its destination's).
    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.dst)
    }

    /// The input interface name the kernel's rules see: empty for a packet the node sends
    /// (OUTPUT-hook chains have no input device, so `! -i br0` and `iifname != "br0"` match
    /// it and `-i br0` does not) and for a received packet whose interface is unknown.
    pub fn ingress(&self) -> &str {
        match (&self.in_iface, self.origin.is_local()) {
            (Some(name), false) => name,
            _ => "",
        }
    }
}

impl fmt::Display for Packet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let src = match self.src_port {
            Some(p) => SocketAddr::new(self.src, p).to_string(),
            None => self.src.to_string(),
        };
        write!(
            f,
            "{} {src} -> {} from {}",
            self.proto,
            SocketAddr::new(self.dst, self.dst_port),
            self.origin.as_str()
        )?;
        match self.ingress() {
            "" => Ok(()),
            iface => write!(f, " via {iface}"),
        }
    }
}

/// What the node around the rules looks like: which addresses are local (`addrtype LOCAL`,
/// `fib ... type local`). Loopback addresses are always local.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    /// The node's local addresses (loopback implied).
    pub local_addresses: BTreeSet<IpAddr>,
}

impl Env {
    /// An environment whose local addresses are the node's addresses of `state`.
    pub fn from_state(state: &ProxyState) -> Self {
        Self {
            local_addresses: state.node.node_ips.iter().copied().collect(),
        }
    }

    /// Whether an address is local to the node.
    pub fn is_local(&self, ip: &IpAddr) -> bool {
        ip.is_loopback() || self.local_addresses.contains(ip)
    }
}

/// Which kind of frontend a packet hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrontendKind {
    /// The ClusterIP (internalTrafficPolicy applies).
    ClusterIp,
    /// An externalIP.
    ExternalIp,
    /// A LoadBalancer ingress IP.
    LoadBalancer,
    /// A NodePort on a node address.
    NodePort,
}

impl FrontendKind {
    /// Human spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::ClusterIp => "cluster IP",
            Self::ExternalIp => "external IP",
            Self::LoadBalancer => "load-balancer IP",
            Self::NodePort => "node port",
        }
    }
}

/// One endpoint a forwarded connection may go to.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The endpoint.
    pub endpoint: SocketAddr,
    /// The probability that a new connection goes there (weights normalised).
    pub share: f64,
    /// The raw weight when the mode schedules by weight (IPVS), for display.
    pub weight: Option<u32>,
    /// Whether the connection is masqueraded (SNAT to the node) on its way there.
    pub masquerade: bool,
}

/// Adds a walk branch that ends at `endpoint` with probability `share` to `candidates`: a
/// branch to the same endpoint with the same masquerade decision adds to its share, another is
/// a candidate of its own (`weight` is asked only then).
pub fn add_candidate(
    candidates: &mut Vec<Candidate>,
    endpoint: SocketAddr,
    masquerade: bool,
    share: f64,
    weight: impl FnOnce() -> Option<u32>,
) {
    match candidates
        .iter_mut()
        .find(|c| c.endpoint == endpoint && c.masquerade == masquerade)
    {
        Some(c) => c.share += share,
        None => candidates.push(Candidate {
            endpoint,
            share,
            weight: weight(),
            masquerade,
        }),
    }
}

/// The answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// DNATed to one of the candidates.
    Forward {
        /// The service port (`ns/name:port`), when the objects say which (a read-back ruleset
        /// may not).
        service: Option<String>,
        /// The frontend that matched, when known.
        frontend: Option<FrontendKind>,
        /// The candidates, shares summing to 1.
        candidates: Vec<Candidate>,
        /// ClientIP affinity timeout in seconds: a client seen within it goes back to its
        /// previous endpoint (the candidates describe a client's first connection).
        affinity: Option<u64>,
    },
    /// Refused with an ICMP port unreachable (or, userspace, a TCP reset).
    Reject {
        /// The number of the rule of `docs/semantics.md` that decided it (0: none did).
        rule: u8,
        /// Why, in words.
        reason: String,
    },
    /// Silently dropped.
    Drop {
        /// The number of the rule of `docs/semantics.md` that decided it (0: none did).
        rule: u8,
        /// Why, in words.
        reason: String,
    },
    /// kproxy's objects leave the packet alone (it is routed as any other packet).
    NotService,
    /// The tracer met something it cannot interpret (a live object kproxy did not write).
    Unknown {
        /// What.
        reason: String,
    },
}

/// Tolerance on shares: iptables stores probabilities in units of 2^-31.
pub const SHARE_TOLERANCE: f64 = 1e-6;

/// What a walk's branches add up to, for the tracers that follow each branch of a packet
/// (probabilistic rules) to its end: the refusal when every branch was refused, a forward when
/// every branch forwarded (`forward` makes it from the candidates), not a service when no branch
/// did either; otherwise there is no one verdict. `plain` is the probability of the branches
/// that ended neither refused nor forwarded; it counts as none within [`SHARE_TOLERANCE`].
pub fn fold_branches(
    refused: Option<Verdict>,
    candidates: Vec<Candidate>,
    plain: f64,
    forward: impl FnOnce(Vec<Candidate>) -> Verdict,
) -> Verdict {
    let all_decided = plain <= SHARE_TOLERANCE;
    match (refused, candidates.is_empty()) {
        (Some(v), true) if all_decided => v,
        (None, true) => Verdict::NotService,
        (None, false) if all_decided => forward(candidates),
        _ => Verdict::Unknown {
            reason: "branches of the walk end differently (some forwarded, some not)".into(),
        },
    }
}

impl Verdict {
    /// Whether the packet is forwarded (exit status 0) rather than dropped or rejected (3).
    pub fn is_forward(&self) -> bool {
        matches!(self, Self::Forward { .. } | Self::NotService)
    }

    /// A short name: FORWARD, REJECT, DROP, NOT-A-SERVICE, UNKNOWN.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Forward { .. } => "FORWARD",
            Self::Reject { .. } => "REJECT",
            Self::Drop { .. } => "DROP",
            Self::NotService => "NOT-A-SERVICE",
            Self::Unknown { .. } => "UNKNOWN",
        }
    }

    /// `Ok` when two verdicts say the same thing: same kind, same rule for REJECT/DROP, same
    /// endpoints with the same shares (within [`SHARE_TOLERANCE`]) and the same masquerade
    /// decision per endpoint, same affinity; the service port and frontend when both sides
    /// know them. Reasons (free text) and the weights' scale are not compared. `Err` says what
    /// differs.
    pub fn agrees_with(&self, other: &Verdict) -> Result<(), String> {
        match (self, other) {
            (Self::NotService, Self::NotService) => Ok(()),
            (Self::Reject { rule: a, .. }, Self::Reject { rule: b, .. })
            | (Self::Drop { rule: a, .. }, Self::Drop { rule: b, .. }) => {
                if a == b {
                    Ok(())
                } else {
                    Err(format!("{} by rule {a} vs rule {b}", self.kind()))
                }
            }
            (
                Self::Forward {
                    service: sa,
                    frontend: fa,
                    candidates: ca,
                    affinity: aa,
                },
                Self::Forward {
                    service: sb,
                    frontend: fb,
                    candidates: cb,
                    affinity: ab,
                },
            ) => {
                if let (Some(a), Some(b)) = (sa, sb)
                    && a != b
                {
                    return Err(format!("service {a} vs {b}"));
                }
                if let (Some(a), Some(b)) = (fa, fb)
                    && a != b
                {
                    return Err(format!("frontend {a:?} vs {b:?}"));
                }
                if aa != ab {
                    return Err(format!("affinity {aa:?} vs {ab:?}"));
                }
                let norm = |c: &[Candidate]| {
                    let mut v: Vec<(SocketAddr, f64, bool)> = Vec::new();
                    for x in c {
                        match v.iter_mut().find(|(e, _, _)| *e == x.endpoint) {
                            Some(e) => e.1 += x.share,
                            None => v.push((x.endpoint, x.share, x.masquerade)),
                        }
                    }
                    v.retain(|(_, s, _)| *s > SHARE_TOLERANCE);
                    v.sort_by_key(|a| a.0);
                    v
                };
                let (na, nb) = (norm(ca), norm(cb));
                let same = na.len() == nb.len()
                    && na.iter().zip(&nb).all(|(x, y)| {
                        x.0 == y.0 && (x.1 - y.1).abs() <= SHARE_TOLERANCE && x.2 == y.2
                    });
                if same {
                    Ok(())
                } else {
                    Err(format!("candidates {na:?} vs {nb:?}"))
                }
            }
            _ => Err(format!("{} vs {}", self.kind(), other.kind())),
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Forward {
                service,
                frontend,
                candidates,
                affinity,
            } => {
                write!(f, "FORWARD")?;
                if let Some(s) = service {
                    write!(f, " via service port {s}")?;
                }
                if let Some(fe) = frontend {
                    write!(f, " ({})", fe.as_str())?;
                }
                if let Some(t) = affinity {
                    write!(f, ", ClientIP affinity {t}s")?;
                }
                for c in candidates {
                    write!(f, "\n  -> {:<24} {:>7.3}%", c.endpoint, c.share * 100.0)?;
                    if let Some(w) = c.weight {
                        write!(f, " (weight {w})")?;
                    }
                    write!(
                        f,
                        "  {}",
                        if c.masquerade {
                            "masqueraded (SNAT to the node)"
                        } else {
                            "source preserved"
                        }
                    )?;
                }
                Ok(())
            }
            Self::Reject { rule, reason } => {
                write!(f, "REJECT: {reason} (docs/semantics.md, rule {rule})")
            }
            Self::Drop { rule, reason } => {
                write!(f, "DROP: {reason} (docs/semantics.md, rule {rule})")
            }
            Self::NotService => write!(
                f,
                "NOT A SERVICE: no kproxy object matches; the packet is routed as any other"
            ),
            Self::Unknown { reason } => write!(f, "UNKNOWN: {reason}"),
        }
    }
}

/// One object a tracer visited: a chain and rule, a map element, a virtual server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// Nesting depth, for indentation.
    pub depth: usize,
    /// The object (`nat KPROXY-SERVICES`, `map service-ips`, `virtual server -t 10.96.0.10:53`).
    pub object: String,
    /// What matched there (the rule text, the element, ...).
    pub detail: String,
}

/// A tracer's full answer: the verdict and the path that led to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// The verdict.
    pub verdict: Verdict,
    /// The objects visited, in order.
    pub path: Vec<Hop>,
}

impl Trace {
    /// A trace with a verdict and no path yet.
    pub fn new(verdict: Verdict) -> Self {
        Self {
            verdict,
            path: Vec::new(),
        }
    }
}

/// How one mode's semantics depart from the rules of `docs/semantics.md`, on purpose (its
/// section "Where the modes differ" lists them). The model applies these, so the comparison
/// with each mode's tracer stays exact. Each field says where the difference comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dialect {
    /// nftables (upstream too, rule 24): a new connection to a live ClusterIP on a port no
    /// service uses is REJECTed.
    pub reject_unused_cluster_ip_ports: bool,
    /// nftables (upstream too, rule 24): an address in a service CIDR that no service holds is
    /// DROPped.
    pub drop_unallocated_service_cidr: bool,
    /// IPVS: every service address is bound to the node, and a port no virtual server serves
    /// on any of them (ClusterIP, externalIP, LB IP) is REJECTed.
    pub reject_unserved_ports_on_service_addresses: bool,
    /// IPVS (upstream's known gap): no externalTrafficPolicy=Local short-circuit; pods and the
    /// node get only the local endpoints of an ETP=Local frontend, like external clients.
    pub no_etp_local_short_circuit: bool,
    /// iptables (upstream too): the filter rules for external frontends without usable
    /// endpoints hang off INPUT and FORWARD only, so the node's own connections to a non-local
    /// externalIP / LB IP of such a service are not dropped or rejected (they are routed).
    pub external_filters_skip_node_output: bool,
    /// iptables (upstream too): the NodePort REJECT/DROP rules match `addrtype LOCAL`, every
    /// local address, not only the `--nodeport-addresses` ones.
    pub nodeport_filters_on_every_local_address: bool,
    /// iptables (upstream too): KPROXY-PROXY-FIREWALL runs before KPROXY-EXTERNAL-SERVICES and
    /// drops every packet to a source-ranged LB frontend that nothing DNATed, so the rule-7
    /// DROP of such a frontend without local endpoints is done (and reported) by the rule-13
    /// firewall rule. Still a DROP either way.
    pub lb_firewall_drops_first: bool,
    /// userspace: the proxy opens its own connection to the endpoint, so the endpoint always
    /// sees the node as the source (every candidate is "masqueraded").
    pub proxy_always_masquerades: bool,
    /// userspace: TCP NodePorts without `--nodeport-addresses` listen on the wildcard address,
    /// so every local address answers them, service addresses and loopback included.
    pub tcp_nodeports_on_every_local_address: bool,
    /// userspace: source ranges are checked against the client address only (no allowance for
    /// the LB IP itself when the node is inside a range).
    pub no_lb_self_source_allowance: bool,
}

impl Dialect {
    /// The iptables mode.
    pub const IPTABLES: Dialect = Dialect {
        reject_unused_cluster_ip_ports: false,
        drop_unallocated_service_cidr: false,
        reject_unserved_ports_on_service_addresses: false,
        no_etp_local_short_circuit: false,
        external_filters_skip_node_output: true,
        nodeport_filters_on_every_local_address: true,
        lb_firewall_drops_first: true,
        proxy_always_masquerades: false,
        tcp_nodeports_on_every_local_address: false,
        no_lb_self_source_allowance: false,
    };
    /// The nftables mode.
    pub const NFTABLES: Dialect = Dialect {
        reject_unused_cluster_ip_ports: true,
        drop_unallocated_service_cidr: true,
        reject_unserved_ports_on_service_addresses: false,
        no_etp_local_short_circuit: false,
        external_filters_skip_node_output: false,
        nodeport_filters_on_every_local_address: false,
        lb_firewall_drops_first: false,
        proxy_always_masquerades: false,
        tcp_nodeports_on_every_local_address: false,
        no_lb_self_source_allowance: false,
    };
    /// The userspace mode. Its refusals are the kernel's answer to a port nobody listens on,
    /// so its property test compares forwarding decisions exactly and refusals only as "not
    /// forwarded" (see `kproxy_userspace::trace`).
    pub const USERSPACE: Dialect = Dialect {
        reject_unused_cluster_ip_ports: false,
        drop_unallocated_service_cidr: false,
        reject_unserved_ports_on_service_addresses: true,
        no_etp_local_short_circuit: true,
        external_filters_skip_node_output: false,
        nodeport_filters_on_every_local_address: false,
        lb_firewall_drops_first: false,
        proxy_always_masquerades: true,
        tcp_nodeports_on_every_local_address: true,
        no_lb_self_source_allowance: true,
    };
    /// The IPVS mode.
    pub const IPVS: Dialect = Dialect {
        reject_unused_cluster_ip_ports: false,
        drop_unallocated_service_cidr: false,
        reject_unserved_ports_on_service_addresses: true,
        no_etp_local_short_circuit: true,
        external_filters_skip_node_output: false,
        nodeport_filters_on_every_local_address: false,
        lb_firewall_drops_first: false,
        proxy_always_masquerades: false,
        tcp_nodeports_on_every_local_address: false,
        no_lb_self_source_allowance: false,
    };
}

/// A frontend of a service port that a packet's destination matched.
struct Hit<'a> {
    sp: &'a ServicePort,
    kind: FrontendKind,
}

/// Whether `ip` is one of the addresses that accept NodePorts.
pub fn is_nodeport_address(state: &ProxyState, env: &Env, ip: &IpAddr) -> bool {
    match &state.node.node_port_addresses {
        kproxy_contract::NodePortAddresses::AllLocal => env.is_local(ip) && !ip.is_loopback(),
        kproxy_contract::NodePortAddresses::Only(list) => list.contains(ip),
    }
}

fn find_ip_frontend<'a>(state: &'a ProxyState, pkt: &Packet) -> Option<Hit<'a>> {
    state.family(pkt.family()).find_map(|sp| {
        if sp.name.protocol != pkt.proto || sp.port != pkt.dst_port {
            return None;
        }
        let kind = if sp.cluster_ip == Some(pkt.dst) {
            FrontendKind::ClusterIp
        } else if sp.external_ips.contains(&pkt.dst) {
            FrontendKind::ExternalIp
        } else if sp.load_balancer_ips.contains(&pkt.dst) {
            FrontendKind::LoadBalancer
        } else {
            return None;
        };
        Some(Hit { sp, kind })
    })
}

fn find_nodeport<'a>(state: &'a ProxyState, pkt: &Packet) -> Option<&'a ServicePort> {
    state
        .family(pkt.family())
        .find(|sp| sp.name.protocol == pkt.proto && sp.node_port == Some(pkt.dst_port))
        .map(|sp| &**sp)
}

/// The local-traffic detector's answer: whether `pkt` comes from a local pod, `None` when the
/// family has no detector (no rule asks). An invalid interface name counts as no detector, as
/// the renderers treat it.
fn from_pod_network(state: &ProxyState, pkt: &Packet) -> Option<bool> {
    let detector = state.node.local_traffic.matcher(pkt.family()).ok()??;
    Some(detector.matches(&pkt.src, pkt.ingress()))
}

/// The model: what the rules of `docs/semantics.md` say happens to `pkt`, in `dialect`.
pub fn model(state: &ProxyState, env: &Env, pkt: &Packet, dialect: &Dialect) -> Verdict {
    if IpFamily::of(&pkt.src) != pkt.family() {
        return Verdict::Unknown {
            reason: "source and destination are of different families".into(),
        };
    }
    let service_address = |ip: &IpAddr| {
        state.family(pkt.family()).any(|sp| {
            sp.cluster_ip == Some(*ip)
                || sp.external_ips.contains(ip)
                || sp.load_balancer_ips.contains(ip)
        })
    };
    let wildcard = dialect.tcp_nodeports_on_every_local_address
        && pkt.proto == Protocol::Tcp
        && state.node.node_port_addresses == kproxy_contract::NodePortAddresses::AllLocal
        && (env.is_local(&pkt.dst) || service_address(&pkt.dst));
    let hit = find_ip_frontend(state, pkt).or_else(|| {
        (wildcard || is_nodeport_address(state, env, &pkt.dst))
            .then(|| find_nodeport(state, pkt))
            .flatten()
            .map(|sp| Hit {
                sp,
                kind: FrontendKind::NodePort,
            })
    });
    let Some(Hit { sp, kind }) = hit else {
        return unserved(state, env, pkt, dialect);
    };
    let name = sp.name.to_string();
    let external = kind != FrontendKind::ClusterIp;
    // Filters that run in INPUT/FORWARD only (iptables) do not see the node's own packets to
    // an address that is not local.
    let filtered = !(dialect.external_filters_skip_node_output
        && external
        && pkt.origin.is_local()
        && !env.is_local(&pkt.dst));
    // Rule 13: source ranges, before DNAT, on LB IPs only, when the service has endpoints.
    if kind == FrontendKind::LoadBalancer && !sp.source_ranges.is_empty() && sp.endpoints.any {
        let node_in_range = state
            .node
            .node_ips
            .iter()
            .any(|n| sp.source_ranges.iter().any(|r| r.contains(n)));
        let allowed = sp.source_ranges.iter().any(|r| r.contains(&pkt.src))
            || (node_in_range
                && !dialect.no_lb_self_source_allowance
                && sp.load_balancer_ips.contains(&pkt.src));
        if !allowed {
            return Verdict::Drop {
                rule: 13,
                reason: format!(
                    "{name}: source {} is outside loadBalancerSourceRanges",
                    pkt.src
                ),
            };
        }
    }
    if !sp.endpoints.any {
        return if filtered {
            Verdict::Reject {
                rule: 5,
                reason: format!("{name} has no endpoints"),
            }
        } else {
            Verdict::NotService
        };
    }
    let pod = from_pod_network(state, pkt);
    let src_local = env.is_local(&pkt.src);
    let (eps, masq, rule_if_empty) = match kind {
        FrontendKind::ClusterIp => {
            let masq = state.node.masquerade_all || pod.is_some_and(|from_pod| !from_pod);
            (sp.internal_endpoints(), masq, 6)
        }
        _ => match sp.external_policy {
            TrafficPolicy::Cluster => (&sp.endpoints.cluster[..], true, 7),
            TrafficPolicy::Local if dialect.no_etp_local_short_circuit => {
                (&sp.endpoints.local[..], false, 7)
            }
            TrafficPolicy::Local => {
                if pod == Some(true) {
                    (&sp.endpoints.cluster[..], false, 7)
                } else if src_local {
                    (&sp.endpoints.cluster[..], true, 7)
                } else {
                    (&sp.endpoints.local[..], false, 7)
                }
            }
        },
    };
    if eps.is_empty() {
        if !filtered {
            return Verdict::NotService;
        }
        if dialect.lb_firewall_drops_first
            && kind == FrontendKind::LoadBalancer
            && !sp.source_ranges.is_empty()
        {
            return Verdict::Drop {
                rule: 13,
                reason: format!(
                    "{name}: not DNATed (no local endpoints), dropped by the source-range firewall"
                ),
            };
        }
        return Verdict::Drop {
            rule: rule_if_empty,
            reason: format!(
                "{name} has no local endpoints for its {} policy",
                if kind == FrontendKind::ClusterIp {
                    "internal traffic"
                } else {
                    "external traffic"
                }
            ),
        };
    }
    let n = eps.len() as f64;
    Verdict::Forward {
        service: Some(name),
        frontend: Some(kind),
        candidates: eps
            .iter()
            .map(|ep| Candidate {
                endpoint: SocketAddr::new(ep.ip, ep.port),
                share: 1.0 / n,
                weight: None,
                // Rule 11: hairpin (only a local pod can be its own client).
                masquerade: masq
                    || (ep.is_local && ep.ip == pkt.src)
                    || dialect.proxy_always_masquerades,
            })
            .collect(),
        affinity: sp.affinity.map(|a| a.timeout.as_secs()),
    }
}

/// A packet that hit no frontend: dialect-specific refusals, else left alone.
fn unserved(state: &ProxyState, env: &Env, pkt: &Packet, dialect: &Dialect) -> Verdict {
    let fam = || state.family(pkt.family());
    if dialect.reject_unserved_ports_on_service_addresses
        && fam().any(|sp| {
            sp.cluster_ip == Some(pkt.dst)
                || sp.external_ips.contains(&pkt.dst)
                || sp.load_balancer_ips.contains(&pkt.dst)
        })
    {
        return Verdict::Reject {
            rule: 24,
            reason: format!(
                "no service serves {}/{} on this service address",
                pkt.dst_port, pkt.proto
            ),
        };
    }
    if dialect.reject_unused_cluster_ip_ports && fam().any(|sp| sp.cluster_ip == Some(pkt.dst)) {
        return Verdict::Reject {
            rule: 24,
            reason: format!(
                "no service uses port {}/{} of ClusterIP {}",
                pkt.dst_port, pkt.proto, pkt.dst
            ),
        };
    }
    if dialect.drop_unallocated_service_cidr
        && state
            .node
            .service_cidrs
            .iter()
            .any(|c| c.contains(&pkt.dst))
    {
        return Verdict::Drop {
            rule: 24,
            reason: format!("{} is in a service CIDR but no service holds it", pkt.dst),
        };
    }
    // iptables: a NodePort without usable endpoints is refused on every local address.
    if dialect.nodeport_filters_on_every_local_address
        && env.is_local(&pkt.dst)
        && let Some(sp) = find_nodeport(state, pkt)
    {
        let name = sp.name.to_string();
        if !sp.endpoints.any {
            return Verdict::Reject {
                rule: 5,
                reason: format!("{name} has no endpoints"),
            };
        }
        if sp.external_endpoints().is_empty() {
            // Pods and the node are short-circuited only on the NodePort addresses, which this
            // address is not: nothing DNATs the packet, so the filter drops it.
            return Verdict::Drop {
                rule: 7,
                reason: format!("{name} has no local endpoints for its external traffic policy"),
            };
        }
    }
    Verdict::NotService
}

#[cfg(test)]
mod tests;
