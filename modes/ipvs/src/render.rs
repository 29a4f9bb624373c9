//! ProxyState → [`IpvsRules`]: virtual servers, service addresses and the netfilter table.
//!
//! Per service port (upstream's layout; `modes/ipvs/README.md`): one virtual server per
//! ClusterIP, externalIP and load-balancer IP at the service port, and one per NodePort address
//! at the NodePort. The ClusterIP's real servers follow internalTrafficPolicy, the others
//! externalTrafficPolicy. Every real server has weight 1 (NAT forwarding). ClientIP affinity
//! is IPVS persistence with the affinity timeout.
//!
//! What IPVS cannot do is in one small nftables table per family (`kproxy-ipvs`), static chains
//! plus named sets (`TABLE_DOC` below): masquerade marks, hairpin, loadBalancerSourceRanges,
//! DROP for Local policies without local endpoints, and REJECT of ports on service addresses
//! that no virtual server serves.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use kproxy_contract::{
    Endpoint, IpFamily, NodePortAddresses, NodeSettings, ProxyState, ServicePort,
};

use crate::model::{IpvsRules, NftTable, RsKey, VirtualServer, VsConfig, VsKey};

/// The nftables table name (both families).
pub const TABLE: &str = "kproxy-ipvs";

/// The named sets, in declaration order, with their purpose.
pub const SETS: [(&str, &str); 8] = [
    ("vips", "every address bound for a virtual server"),
    (
        "frontends",
        "every address . protocol . port a virtual server serves",
    ),
    (
        "masq-cluster",
        "ClusterIP frontends: masquerade sources outside the pod network",
    ),
    (
        "masq-external",
        "external frontends with externalTrafficPolicy Cluster: always masquerade",
    ),
    (
        "no-local-endpoints",
        "frontends whose Local policy has no local endpoint: drop",
    ),
    ("firewall", "load-balancer frontends with source ranges"),
    ("firewall-allow", "frontend . allowed source range"),
    (
        "hairpin",
        "local endpoint . itself: a pod reaching itself is masqueraded",
    ),
];

/// Inputs besides the desired state.
#[derive(Debug, Clone)]
pub struct RenderInput<'a> {
    /// The scheduler for every virtual server.
    pub scheduler: &'a str,
    /// Local addresses that may carry NodePorts when every local address does (loopback,
    /// link-local and kproxy's own service addresses already removed).
    pub local_addresses: &'a [IpAddr],
    /// Families to program.
    pub families: &'a [IpFamily],
}

/// Renders the whole desired state.
pub fn render(state: &ProxyState, input: &RenderInput<'_>) -> IpvsRules {
    let mut out = IpvsRules::default();
    let mut tables = BTreeMap::new();
    for &family in input.families {
        let mut sets: BTreeMap<&'static str, BTreeSet<String>> =
            SETS.iter().map(|(n, _)| (*n, BTreeSet::new())).collect();
        let node_port_addrs: Vec<IpAddr> = match &state.node.node_port_addresses {
            NodePortAddresses::AllLocal => input.local_addresses.to_vec(),
            NodePortAddresses::Only(list) => list.clone(),
        }
        .into_iter()
        .filter(|a| IpFamily::of(a) == family)
        .collect();
        for sp in state.family(family) {
            service_port(
                sp,
                &state.node,
                input.scheduler,
                &node_port_addrs,
                &mut out,
                &mut sets,
            );
        }
        tables.insert(
            family,
            NftTable {
                head: head(family, &state.node),
                sets,
            },
        );
    }
    out.nft = Some(tables);
    out
}

fn rs_map(eps: &[Endpoint]) -> BTreeMap<RsKey, u32> {
    eps.iter()
        .map(|e| {
            (
                RsKey {
                    addr: e.ip,
                    port: e.port,
                },
                1,
            )
        })
        .collect()
}

fn service_port(
    sp: &ServicePort,
    node: &NodeSettings,
    scheduler: &str,
    node_port_addrs: &[IpAddr],
    out: &mut IpvsRules,
    sets: &mut BTreeMap<&'static str, BTreeSet<String>>,
) {
    let config = VsConfig {
        scheduler: scheduler.to_string(),
        persistence: sp.affinity.map(|a| {
            u32::try_from(a.timeout.as_secs())
                .unwrap_or(u32::MAX)
                .max(1)
        }),
    };
    let proto = sp.name.protocol;
    let owner = sp.name.to_string();
    let add = |out: &mut IpvsRules, addr: IpAddr, port: u16, eps: &[Endpoint]| -> bool {
        let key = VsKey {
            addr,
            protocol: proto,
            port,
        };
        if out.services.contains_key(&key) {
            tracing::debug!(%key, service = %owner, "frontend already served by another service port; skipped");
            return false;
        }
        out.services.insert(
            key,
            VirtualServer {
                config: config.clone(),
                dests: rs_map(eps),
            },
        );
        out.owners.insert(key, owner.clone());
        true
    };
    let elem = |addr: IpAddr, port: u16| format!("{addr} . {proto} . {port}");
    let mut put = |set: &'static str, e: String| {
        if let Some(s) = sets.get_mut(set) {
            s.insert(e);
        }
    };

    let internal = sp.internal_endpoints();
    let external = sp.external_endpoints();
    if let Some(cip) = sp.cluster_ip
        && add(out, cip, sp.port, internal)
    {
        out.vips.insert(cip);
        put("vips", cip.to_string());
        put("frontends", elem(cip, sp.port));
        put("masq-cluster", elem(cip, sp.port));
        if internal.is_empty() && sp.endpoints.any {
            put("no-local-endpoints", elem(cip, sp.port));
        }
    }
    let external_local = sp.external_policy == kproxy_contract::TrafficPolicy::Local;
    let mut external_frontend = |out: &mut IpvsRules, addr: IpAddr, port: u16, vip: bool| {
        if !add(out, addr, port, external) {
            return;
        }
        if vip {
            out.vips.insert(addr);
            put("vips", addr.to_string());
            put("frontends", elem(addr, port));
        }
        if !external_local {
            put("masq-external", elem(addr, port));
        }
        if external.is_empty() && sp.endpoints.any {
            put("no-local-endpoints", elem(addr, port));
        }
        // Upstream's usesFWChain: source ranges apply when the service has endpoints (without
        // any, IPVS itself refuses the connection, docs/semantics.md rule 5).
        if vip
            && sp.load_balancer_ips.contains(&addr)
            && !sp.source_ranges.is_empty()
            && sp.endpoints.any
        {
            put("firewall", elem(addr, port));
            for range in &sp.source_ranges {
                put(
                    "firewall-allow",
                    format!("{} . {}", elem(addr, port), prefix(range)),
                );
            }
            // Upstream: when the node itself is inside a range, the LB IPs are allowed sources
            // too (traffic the node sends to its own LB IP comes from that IP).
            if node
                .node_ips
                .iter()
                .any(|n| sp.source_ranges.iter().any(|r| r.contains(n)))
            {
                for lb in &sp.load_balancer_ips {
                    put("firewall-allow", format!("{} . {lb}", elem(addr, port)));
                }
            }
        }
    };
    for &ip in sp.external_ips.iter().chain(&sp.load_balancer_ips) {
        external_frontend(out, ip, sp.port, true);
    }
    if let Some(np) = sp.node_port {
        for &addr in node_port_addrs {
            external_frontend(out, addr, np, false);
        }
    }
    for ep in sp
        .endpoints
        .cluster
        .iter()
        .chain(&sp.endpoints.local)
        .filter(|e| e.is_local)
    {
        put(
            "hairpin",
            format!("{} . {proto} . {} . {}", ep.ip, ep.port, ep.ip),
        );
    }
}

fn prefix(net: &IpNet) -> String {
    format!("{}/{}", net.network(), net.prefix_len())
}

/// The nft family keyword.
pub fn family_name(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

/// The table without elements: set declarations and the static chains. Depends only on the
/// node settings, so it changes (and the table is rewritten) only when they do.
fn head(family: IpFamily, node: &NodeSettings) -> String {
    let (a, addr_t) = match family {
        IpFamily::V4 => ("ip", "ipv4_addr"),
        IpFamily::V6 => ("ip6", "ipv6_addr"),
    };
    let fe = format!("{a} daddr . meta l4proto . th dport");
    let frontend_t = format!("{addr_t} . inet_proto . inet_service");
    let mark = node.masquerade_mark();
    let mut t = String::new();
    let _ = writeln!(t, "table {} {TABLE} {{", family_name(family));
    let _ = writeln!(
        t,
        "\tcomment \"kproxy --proxy-mode ipvs: what IPVS cannot do (masquerade, hairpin, source ranges, Local policies, unserved ports)\""
    );
    for (name, doc) in SETS {
        let (ty, flags) = match name {
            "vips" => (addr_t.to_string(), ""),
            "firewall-allow" => (format!("{frontend_t} . {addr_t}"), " flags interval;"),
            "hairpin" => (format!("{frontend_t} . {addr_t}"), ""),
            _ => (frontend_t.clone(), ""),
        };
        let _ = writeln!(t, "\tset {name} {{ type {ty};{flags} comment \"{doc}\"; }}");
    }
    let mut mark_rules = Vec::new();
    let set_mark = format!("meta mark set meta mark | {mark:#010x}");
    if node.masquerade_all {
        mark_rules.push(format!("{fe} @masq-cluster {set_mark}"));
    } else if let Some(local) = node.local_traffic.for_rules(family) {
        // Reached from both nat hooks: in the output hook `iifname` is empty, so under an
        // interface detector the node's own ClusterIP connections are masqueraded, as upstream.
        let outside = local.nft(family, false);
        mark_rules.push(format!("{fe} @masq-cluster {outside} {set_mark}"));
    }
    mark_rules.push(format!("{fe} @masq-external {set_mark}"));
    let chains: [(&str, Option<&str>, Vec<String>); 7] = [
        (
            "nat-prerouting",
            Some("type nat hook prerouting priority dstnat; policy accept;"),
            vec!["jump mark-for-masquerade".into()],
        ),
        (
            "nat-output",
            Some("type nat hook output priority -100; policy accept;"),
            vec!["jump mark-for-masquerade".into()],
        ),
        ("mark-for-masquerade", None, mark_rules),
        (
            "nat-postrouting",
            Some("type nat hook postrouting priority srcnat; policy accept;"),
            vec![
                format!("{fe} . {a} saddr @hairpin masquerade"),
                format!(
                    "meta mark & {mark:#010x} == {mark:#010x} meta mark set meta mark ^ {mark:#010x} masquerade fully-random"
                ),
            ],
        ),
        // IPVS takes packets for its virtual servers in LOCAL_IN at priority 98 (after the
        // filter hook) and in LOCAL_OUT at -99 (so the output check runs at mangle, -150).
        (
            "filter-input",
            Some("type filter hook input priority filter; policy accept;"),
            vec!["ct state new jump service-filter".into()],
        ),
        (
            "filter-output",
            Some("type filter hook output priority mangle; policy accept;"),
            vec!["ct state new jump service-filter".into()],
        ),
        (
            "service-filter",
            None,
            vec![
                // Source ranges first: docs/semantics.md rule 13 is checked before any endpoint
                // choice.
                format!("{fe} @firewall {fe} . {a} saddr != @firewall-allow drop"),
                format!("{fe} @no-local-endpoints drop"),
                format!(
                    "meta l4proto {{ tcp, udp, sctp }} {a} daddr @vips {fe} != @frontends reject"
                ),
            ],
        ),
    ];
    for (name, base, rules) in chains {
        let _ = writeln!(t, "\tchain {name} {{");
        if let Some(b) = base {
            let _ = writeln!(t, "\t\t{b}");
        }
        for r in rules {
            let _ = writeln!(t, "\t\t{r}");
        }
        let _ = writeln!(t, "\t}}");
    }
    t.push_str("}\n");
    t
}
