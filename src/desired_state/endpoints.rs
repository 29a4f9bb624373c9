//! EndpointSlices → the endpoints of one service port (docs/semantics.md, rules 1-4, 17).
//!
//! Mirrors upstream `pkg/proxy/endpointslicecache.go` (`endpointInfoByServicePort`,
//! `addEndpoints`) for reading slices and `pkg/proxy/topology.go` (`CategorizeEndpoints`) for
//! choosing the Cluster and Local lists. Each slice is parsed once per build ([`parse_slice`]),
//! so an invalid field is reported once however many service ports read the slice.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use kproxy_contract::{Endpoint, Endpoints, IpFamily, Protocol};

use super::admission;
use super::parse;
use super::skipped::Skipped;
use super::topology::{self, Location};
use crate::cache::ObjectKey;
use crate::source::slim::{Slice, SliceEndpoint};

/// One endpoint of a slice with its conditions resolved; the port comes from the slice port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// `addresses[0]`, as upstream (the other addresses are the same pod's, unused).
    pub ip: IpAddr,
    /// `nodeName` is this node.
    pub is_local: bool,
    /// Ready: usable by default. Normalised to `ready && serving && !terminating`.
    pub ready: bool,
    /// Serving (nil = true, the API default).
    pub serving: bool,
    /// Terminating (nil = false).
    pub terminating: bool,
    /// `hints.forZones[].name`.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name`.
    pub node_hints: Vec<String>,
}

impl Candidate {
    /// Usable only when no ready endpoint exists for the policy (docs/semantics.md, rules 3-4).
    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }

    /// Preference when the same (ip, port) appears twice. Upstream prefers a non-terminating
    /// copy (an IP reused by a new pod while the old one terminates) and otherwise keeps
    /// whichever slice Go's map iteration visits last; kproxy ranks the copies so the result
    /// does not depend on slice order: not terminating, then ready, then serving, then local.
    fn rank(&self) -> (bool, bool, bool, bool) {
        (!self.terminating, self.ready, self.serving, self.is_local)
    }
}

/// One valid slice port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlicePort {
    /// `name`, `""` when unset.
    pub name: String,
    /// `protocol`, TCP when unset.
    pub protocol: Protocol,
    /// `port`.
    pub port: u16,
}

/// A slice after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedSlice {
    /// From `addressType`.
    pub family: IpFamily,
    /// Valid ports.
    pub ports: Vec<SlicePort>,
    /// Valid endpoints.
    pub endpoints: Vec<Candidate>,
}

/// The key of a slice, for reports.
pub(crate) fn slice_key(slice: &Slice) -> ObjectKey {
    ObjectKey::new(
        slice.metadata.namespace.clone().unwrap_or_default(),
        slice.metadata.name.clone().unwrap_or_default(),
    )
}

/// Validates a slice. `None` for FQDN slices (never used by kube-proxy) and unknown address
/// types.
pub(crate) fn parse_slice(
    slice: &Slice,
    node_name: &str,
    skipped: &mut Vec<Skipped>,
) -> Option<ParsedSlice> {
    let key = slice_key(slice);
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        "FQDN" => return None,
        other => {
            skipped.push(Skipped::slice(
                &key,
                "addressType",
                format!("{other:?} is not a known address type (IPv4, IPv6, FQDN); slice skipped"),
            ));
            return None;
        }
    };
    Some(ParsedSlice {
        family,
        ports: slice_ports(&key, slice, skipped),
        endpoints: slice
            .endpoints
            .iter()
            .enumerate()
            .filter_map(|(i, ep)| candidate(&key, family, i, ep, node_name, skipped))
            .collect(),
    })
}

/// Valid slice ports.
///
/// Upstream ignores a port whose `name` is nil (the EndpointSlice controller always sets it,
/// `""` for an unnamed port); kproxy reads nil as `""` so hand-written slices for an unnamed
/// service port work. A nil or zero `port` is skipped, as upstream.
fn slice_ports(key: &ObjectKey, slice: &Slice, skipped: &mut Vec<Skipped>) -> Vec<SlicePort> {
    let raw = slice.ports.as_deref().unwrap_or_default();
    let mut out = Vec::with_capacity(raw.len());
    for (i, p) in raw.iter().enumerate() {
        let protocol = match parse::protocol(p.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(reason) => {
                skipped.push(Skipped::slice(
                    key,
                    format!("ports[{i}].protocol"),
                    format!("{reason}; port skipped"),
                ));
                continue;
            }
        };
        let port = match p.port {
            Some(n) => match parse::port(n) {
                Some(port) => port,
                None => {
                    skipped.push(Skipped::slice(
                        key,
                        format!("ports[{i}].port"),
                        format!("{}; port skipped", parse::bad_port(n)),
                    ));
                    continue;
                }
            },
            None => {
                skipped.push(Skipped::slice(
                    key,
                    format!("ports[{i}].port"),
                    "not set; port skipped",
                ));
                continue;
            }
        };
        out.push(SlicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol,
            port,
        });
    }
    out
}

/// One endpoint, or `None` (reported) when its first address is missing, invalid or of the
/// wrong family.
fn candidate(
    key: &ObjectKey,
    family: IpFamily,
    i: usize,
    ep: &SliceEndpoint,
    node_name: &str,
    skipped: &mut Vec<Skipped>,
) -> Option<Candidate> {
    let Some(raw) = ep.address.as_deref() else {
        skipped.push(Skipped::slice(
            key,
            format!("endpoints[{i}].addresses"),
            "empty; endpoint skipped",
        ));
        return None;
    };
    let Some(ip) = parse::ip(raw) else {
        skipped.push(Skipped::slice(
            key,
            format!("endpoints[{i}].addresses[0]"),
            format!("{raw:?} is not a valid IP address; endpoint skipped"),
        ));
        return None;
    };
    if IpFamily::of(&ip) != family {
        skipped.push(Skipped::slice(
            key,
            format!("endpoints[{i}].addresses[0]"),
            format!("{raw:?} is not an {family} address as addressType says; endpoint skipped"),
        ));
        return None;
    }
    // Upstream's API validation (`ValidateEndpointIP`) refuses these; a manifest may not.
    // An endpoint 127.0.0.1 would expose the node's loopback-only services through the
    // service (the userspace mode connects to it itself; a kernel mode DNATs the node's own
    // connections there).
    if let Some(why) = admission::special(ip) {
        skipped.push(Skipped::slice(
            key,
            format!("endpoints[{i}].addresses[0]"),
            format!("{raw:?} {why}; endpoint skipped"),
        ));
        return None;
    }
    let cond = ep.conditions.clone().unwrap_or_default();
    let serving = cond.serving.unwrap_or(true);
    let terminating = cond.terminating.unwrap_or(false);
    // Upstream takes `ready` as given. The controller sets ready = serving && !terminating; an
    // object that claims otherwise (only hand-written ones can) is not trusted with traffic as
    // ready, which keeps "ready" and "terminating" disjoint (rule 17).
    let ready = cond.ready.unwrap_or(true) && serving && !terminating;
    let hints = ep.hints.as_deref();
    Some(Candidate {
        ip,
        // Upstream `isLocal`: an empty node name never matches.
        is_local: !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name),
        ready,
        serving,
        terminating,
        zone_hints: hints
            .and_then(|h| h.for_zones.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|z| z.name.clone())
            .collect(),
        node_hints: hints
            .and_then(|h| h.for_nodes.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|n| n.name.clone())
            .collect(),
    })
}

/// The endpoints of service port (`name`, `protocol`) in one family, from every slice of the
/// service, deduplicated by (ip, port) (see [`Candidate::rank`]). Slice ports match by name and
/// protocol; the port number comes from the slice (the resolved targetPort), so one service port
/// can have endpoints on different numbers during a rollout, as upstream.
pub(crate) fn collect<'s>(
    slices: &'s [ParsedSlice],
    family: IpFamily,
    name: &str,
    protocol: Protocol,
) -> BTreeMap<(IpAddr, u16), &'s Candidate> {
    let mut out: BTreeMap<(IpAddr, u16), &Candidate> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s.family == family) {
        for port in slice
            .ports
            .iter()
            .filter(|p| p.name == name && p.protocol == protocol)
        {
            for c in &slice.endpoints {
                out.entry((c.ip, port.port))
                    .and_modify(|old| {
                        if c.rank() > old.rank() {
                            *old = c;
                        }
                    })
                    .or_insert(c);
            }
        }
    }
    out
}

/// Chooses the Cluster and Local lists (upstream `CategorizeEndpoints`):
///
/// * Cluster: ready endpoints after topology filtering; if there is no ready endpoint at all,
///   the serving-terminating ones.
/// * Local: local ready endpoints; if none, local serving-terminating ones.
/// * `any`: some endpoint is usable anywhere (upstream `hasAnyEndpoints`), which is exactly
///   "Cluster is non-empty", since topology never empties a list that has ready endpoints.
///
/// Both lists are always computed: which one applies is the mode's choice, per policy.
pub(crate) fn categorize(
    candidates: &BTreeMap<(IpAddr, u16), &Candidate>,
    here: Location<'_>,
) -> Endpoints {
    let mode = topology::mode(candidates.values().copied(), here);
    let pick = |keep: &dyn Fn(&Candidate) -> bool| -> Vec<Endpoint> {
        // BTreeMap order is (ip, port), and `is_local` is a function of the entry, so this is
        // already `Endpoint`'s order.
        let mut list: Vec<Endpoint> = candidates
            .iter()
            .filter(|(_, c)| keep(c))
            .map(|(&(ip, port), c)| Endpoint {
                ip,
                port,
                is_local: c.is_local,
            })
            .collect();
        // A filter gives `collect` no length, so ten endpoints sat in room for sixteen: 2.7
        // MiB of every desired state at 10,000 services of 10 (heap profile, issue #17).
        list.shrink_to_fit();
        list
    };
    let mut cluster = pick(&|c| c.ready && topology::available(c, mode, here));
    if cluster.is_empty() {
        cluster = pick(&|c| c.serving_terminating());
    }
    let mut local = pick(&|c| c.is_local && c.ready);
    let local_ready = local.len();
    if local.is_empty() {
        local = pick(&|c| c.is_local && c.serving_terminating());
    }
    let any = !cluster.is_empty() || !local.is_empty();
    let serving = pick(&|c| c.serving);
    let cluster: Arc<[Endpoint]> = cluster.into();
    // One list for both when they are the same (the usual case).
    let serving = if serving[..] == cluster[..] {
        cluster.clone()
    } else {
        serving.into()
    };
    Endpoints {
        cluster,
        local,
        any,
        serving,
        local_ready,
    }
}
