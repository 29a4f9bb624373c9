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

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use imbl::OrdSet;
use ipnet::IpNet;
use kproxy_contract::{
    Endpoint, IpFamily, NodePortAddresses, NodeSettings, Protocol, ProxyState, ServicePort,
    ServicePortKey,
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

/// The addresses of `family` that carry NodePorts.
fn node_port_addresses(
    state: &ProxyState,
    input: &RenderInput<'_>,
    family: IpFamily,
) -> Vec<IpAddr> {
    match &state.node.node_port_addresses {
        NodePortAddresses::AllLocal => input.local_addresses.to_vec(),
        NodePortAddresses::Only(list) => list.clone(),
    }
    .into_iter()
    .filter(|a| IpFamily::of(a) == family)
    .collect()
}

/// A family's table with its set declarations and no elements.
fn empty_table(family: IpFamily, node: &NodeSettings) -> NftTable {
    NftTable {
        head: head(family, node),
        sets: SETS.iter().map(|(n, _)| (*n, OrdSet::new())).collect(),
    }
}

/// Renders the whole desired state from scratch: every service port's [`Fragment`], then the
/// frontends in service-port order, the first claim of a frontend winning. [`render_cached`]
/// must give exactly this (a property test holds it to it).
pub fn render(state: &ProxyState, input: &RenderInput<'_>) -> IpvsRules {
    let mut out = IpvsRules::default();
    let mut tables = BTreeMap::new();
    let mut vip_users = HashMap::new();
    for &family in input.families {
        let mut table = empty_table(family, &state.node);
        let addrs = node_port_addresses(state, input, family);
        for sp in state.family(family) {
            let f = Fragment::render(family, &state.node, input.scheduler, &addrs, sp);
            for fe in &f.frontends {
                if out.services().contains_key(&fe.key) {
                    skipped(fe, &f);
                    continue;
                }
                apply_frontend(&mut out, &mut table, &mut vip_users, &f, fe);
            }
            for h in &f.hairpins {
                insert_element(&mut table, "hairpin", h.to_string());
            }
        }
        tables.insert(family, table);
    }
    out.nft = Some(tables);
    out
}

fn skipped(fe: &Frontend, f: &Fragment) {
    tracing::debug!(key = %fe.key, service = %f.owner, "frontend already served by another service port; skipped");
}

/// One service port's share of the rules, rendered from it alone: its frontends (each a
/// virtual server with what the netfilter table holds for it) and its hairpin elements.
/// Whether a frontend is programmed depends on the other service ports (the first in key order
/// that claims an `address . protocol . port` keeps it), so that is decided when fragments are
/// put together.
#[derive(Debug, PartialEq, Eq)]
pub struct Fragment {
    family: IpFamily,
    /// `ns/name:port`.
    owner: Arc<str>,
    /// In claim order, each key once (a service port claiming a frontend twice, say an
    /// externalIP that is also its LB IP, keeps the first).
    frontends: Vec<Frontend>,
    /// Local endpoints reaching themselves, each once.
    hairpins: Vec<Hairpin>,
}

/// A frontend: its virtual server and its set elements.
#[derive(Debug, PartialEq, Eq)]
struct Frontend {
    key: VsKey,
    /// Shared by every frontend of the service port with the same endpoints.
    server: Arc<VirtualServer>,
    /// Whether its address is a service address (bound to the dummy interface, in `vips`).
    vip: bool,
    /// Set elements besides `vips`, each keyed by this frontend (no other frontend writes
    /// them, so they need no counting).
    elements: Vec<(&'static str, String)>,
}

/// A `hairpin` element: an endpoint reaching itself through a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Hairpin {
    ip: IpAddr,
    protocol: Protocol,
    port: u16,
}

impl fmt::Display for Hairpin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} . {} . {} . {}",
            self.ip, self.protocol, self.port, self.ip
        )
    }
}

impl Fragment {
    /// The fragment of `sp` (of `family`) with `node_port_addrs` carrying its NodePort.
    pub fn render(
        family: IpFamily,
        node: &NodeSettings,
        scheduler: &str,
        node_port_addrs: &[IpAddr],
        sp: &ServicePort,
    ) -> Fragment {
        let config = VsConfig {
            scheduler: scheduler.to_string(),
            persistence: sp.affinity.map(|a| {
                u32::try_from(a.timeout.as_secs())
                    .unwrap_or(u32::MAX)
                    .max(1)
            }),
        };
        let proto = sp.name.protocol;
        let server = |eps: &[Endpoint]| {
            Arc::new(VirtualServer {
                config: config.clone(),
                dests: rs_map(eps),
            })
        };
        let internal = server(sp.internal_endpoints());
        let external = server(sp.external_endpoints());
        let mut frontends: Vec<Frontend> = Vec::new();
        let key = |addr: IpAddr, port: u16| VsKey {
            addr,
            protocol: proto,
            port,
        };
        let elem = |addr: IpAddr, port: u16| format!("{addr} . {proto} . {port}");

        if let Some(cip) = sp.cluster_ip
            && let Some(elements) = claim(&mut frontends, key(cip, sp.port), &internal, true)
        {
            elements.push(("frontends", elem(cip, sp.port)));
            elements.push(("masq-cluster", elem(cip, sp.port)));
            if sp.internal_endpoints().is_empty() && sp.endpoints.any {
                elements.push(("no-local-endpoints", elem(cip, sp.port)));
            }
        }
        let external_local = sp.external_policy == kproxy_contract::TrafficPolicy::Local;
        let no_external = sp.external_endpoints().is_empty();
        let node_in_range = node
            .node_ips
            .iter()
            .any(|n| sp.source_ranges.iter().any(|r| r.contains(n)));
        let mut external_frontend = |addr: IpAddr, port: u16, vip: bool| {
            let Some(elements) = claim(&mut frontends, key(addr, port), &external, vip) else {
                return;
            };
            if vip {
                elements.push(("frontends", elem(addr, port)));
            }
            if !external_local {
                elements.push(("masq-external", elem(addr, port)));
            }
            if no_external && sp.endpoints.any {
                elements.push(("no-local-endpoints", elem(addr, port)));
            }
            // Upstream's usesFWChain: source ranges apply when the service has endpoints
            // (without any, IPVS itself refuses the connection, docs/semantics.md rule 5).
            if vip
                && sp.load_balancer_ips.contains(&addr)
                && !sp.source_ranges.is_empty()
                && sp.endpoints.any
            {
                elements.push(("firewall", elem(addr, port)));
                for range in &sp.source_ranges {
                    elements.push((
                        "firewall-allow",
                        format!("{} . {}", elem(addr, port), prefix(range)),
                    ));
                }
                // Upstream: when the node itself is inside a range, the LB IPs are allowed
                // sources too (traffic the node sends to its own LB IP comes from that IP).
                if node_in_range {
                    for lb in &sp.load_balancer_ips {
                        elements.push(("firewall-allow", format!("{} . {lb}", elem(addr, port))));
                    }
                }
            }
        };
        for &ip in sp.external_ips.iter().chain(&sp.load_balancer_ips) {
            external_frontend(ip, sp.port, true);
        }
        if let Some(np) = sp.node_port {
            for &addr in node_port_addrs {
                external_frontend(addr, np, false);
            }
        }
        let mut hairpins: Vec<Hairpin> = Vec::new();
        for ep in sp
            .endpoints
            .cluster
            .iter()
            .chain(&sp.endpoints.local)
            .filter(|e| e.is_local)
        {
            let h = Hairpin {
                ip: ep.ip,
                protocol: proto,
                port: ep.port,
            };
            if !hairpins.contains(&h) {
                hairpins.push(h);
            }
        }
        frontends.shrink_to_fit();
        Fragment {
            family,
            owner: sp.name.to_string().into(),
            frontends,
            hairpins,
        }
    }

    /// The frontend at `key`.
    fn frontend(&self, key: &VsKey) -> Option<&Frontend> {
        self.frontends.iter().find(|f| f.key == *key)
    }
}

/// Adds a frontend at `key` unless the service port already has one there; returns its
/// element list to fill.
fn claim<'a>(
    frontends: &'a mut Vec<Frontend>,
    key: VsKey,
    server: &Arc<VirtualServer>,
    vip: bool,
) -> Option<&'a mut Vec<(&'static str, String)>> {
    if frontends.iter().any(|f| f.key == key) {
        return None;
    }
    frontends.push(Frontend {
        key,
        server: server.clone(),
        vip,
        elements: Vec::new(),
    });
    frontends.last_mut().map(|f| &mut f.elements)
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

fn insert_element(table: &mut NftTable, set: &'static str, element: String) {
    if let Some(s) = table.sets.get_mut(set) {
        s.insert(element);
    }
}

fn remove_element(table: &mut NftTable, set: &'static str, element: &str) {
    if let Some(s) = table.sets.get_mut(set) {
        s.remove(element);
    }
}

/// Puts the frontend `fe` of `f` into the rules: its virtual server, owner and elements, and
/// its address among the service addresses (counted: one address serves several frontends).
fn apply_frontend(
    out: &mut IpvsRules,
    table: &mut NftTable,
    vip_users: &mut HashMap<IpAddr, u32>,
    f: &Fragment,
    fe: &Frontend,
) {
    out.insert_server(fe.key, fe.server.clone());
    out.owners.insert(fe.key, f.owner.clone());
    if fe.vip {
        let users = vip_users.entry(fe.key.addr).or_default();
        *users += 1;
        if *users == 1 {
            out.vips.insert(fe.key.addr);
            insert_element(table, "vips", fe.key.addr.to_string());
        }
    }
    for (set, e) in &fe.elements {
        insert_element(table, set, e.clone());
    }
}

/// Takes back what [`apply_frontend`] put in.
fn unapply_frontend(
    out: &mut IpvsRules,
    table: &mut NftTable,
    vip_users: &mut HashMap<IpAddr, u32>,
    fe: &Frontend,
) {
    out.remove_server(&fe.key);
    out.owners.remove(&fe.key);
    if fe.vip
        && let Some(users) = vip_users.get_mut(&fe.key.addr)
    {
        *users -= 1;
        if *users == 0 {
            vip_users.remove(&fe.key.addr);
            out.vips.remove(&fe.key.addr);
            remove_element(table, "vips", &fe.key.addr.to_string());
        }
    }
    for (set, e) in &fe.elements {
        remove_element(table, set, e);
    }
}

/// What the last render left for the next one, so that a render after a few changes costs
/// O(changes): every service port's fragment, who claims each frontend, how many frontends
/// use each service address and how many service ports each hairpin element, and the last
/// result, which the next render changes in place (its persistent maps shared with the copy the
/// sync loop keeps).
#[derive(Debug, Default)]
pub struct RenderCache {
    /// What the last render took besides the state: node settings, scheduler, NodePort
    /// addresses, families. A change renders from scratch.
    inputs: Option<Inputs>,
    fragments: HashMap<ServicePortKey, (Arc<ServicePort>, Arc<Fragment>)>,
    claims: HashMap<VsKey, Claim>,
    vip_users: HashMap<IpAddr, u32>,
    hairpin_users: HashMap<(IpFamily, Hairpin), u32>,
    last: Option<IpvsRules>,
}

#[derive(Debug, PartialEq)]
struct Inputs {
    node: Arc<NodeSettings>,
    scheduler: String,
    local_addresses: Vec<IpAddr>,
    families: Vec<IpFamily>,
}

/// The service ports claiming one frontend, in key order (the first keeps it), and the
/// fragment whose frontend the rules hold.
#[derive(Debug, Default)]
struct Claim {
    contributors: Vec<ServicePortKey>,
    applied: Option<Arc<Fragment>>,
}

impl Claim {
    /// Adds `key`; returns its place (0: it keeps the frontend).
    fn insert(&mut self, key: &ServicePortKey) -> usize {
        match self.contributors.binary_search(key) {
            Ok(at) => at,
            Err(at) => {
                // Nearly always the only one: grown one at a time.
                self.contributors.reserve_exact(1);
                self.contributors.insert(at, key.clone());
                at
            }
        }
    }

    fn remove(&mut self, key: &ServicePortKey) {
        if let Ok(at) = self.contributors.binary_search(key) {
            self.contributors.remove(at);
        }
    }
}

/// One service port's change: its key, its fragment before and after.
type Change = (ServicePortKey, Option<Arc<Fragment>>, Option<Arc<Fragment>>);

/// Renders the desired state, starting from the last render that `cache` holds: unchanged
/// service ports (the same `Arc`, or an equal one) cost a pointer comparison, a changed one
/// re-renders its fragment and settles only the frontends it claims or gave up. Equal to
/// [`render`] of the same state.
pub fn render_cached(
    state: &ProxyState,
    input: &RenderInput<'_>,
    cache: &mut RenderCache,
) -> IpvsRules {
    let same = cache.inputs.as_ref().is_some_and(|i| {
        (Arc::ptr_eq(&i.node, &state.node) || *i.node == *state.node)
            && i.scheduler == input.scheduler
            && i.local_addresses == input.local_addresses
            && i.families == input.families
    });
    let mut out = match cache.last.take() {
        Some(last) if same => last,
        _ => {
            *cache = RenderCache::default();
            let mut empty = IpvsRules::default();
            empty.nft = Some(
                input
                    .families
                    .iter()
                    .map(|&f| (f, empty_table(f, &state.node)))
                    .collect(),
            );
            empty
        }
    };
    cache.inputs = Some(Inputs {
        node: state.node.clone(),
        scheduler: input.scheduler.to_string(),
        local_addresses: input.local_addresses.to_vec(),
        families: input.families.to_vec(),
    });

    let mut changes: Vec<Change> = Vec::new();
    let mut seen = 0;
    for &family in input.families {
        let addrs = node_port_addresses(state, input, family);
        for (key, sp) in state.services.iter().filter(|(k, _)| k.family == family) {
            let render = || {
                Arc::new(Fragment::render(
                    family,
                    &state.node,
                    input.scheduler,
                    &addrs,
                    sp,
                ))
            };
            match cache.fragments.get_mut(key) {
                Some((old, _)) if Arc::ptr_eq(old, sp) => seen += 1,
                Some((old, fragment)) => {
                    seen += 1;
                    if **old != **sp {
                        let new = render();
                        changes.push((key.clone(), Some(fragment.clone()), Some(new.clone())));
                        *fragment = new;
                    }
                    *old = sp.clone();
                }
                None => {
                    let new = render();
                    changes.push((key.clone(), None, Some(new.clone())));
                    cache.fragments.insert(key.clone(), (sp.clone(), new));
                }
            }
        }
    }
    if seen < cache.fragments.len() - changes.iter().filter(|(_, old, _)| old.is_none()).count() {
        let gone: Vec<ServicePortKey> = cache
            .fragments
            .keys()
            .filter(|k| !state.services.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some((_, old)) = cache.fragments.remove(&key) {
                changes.push((key, Some(old), None));
            }
        }
    }
    if changes.is_empty() {
        cache.last = Some(out.clone());
        return out;
    }

    let RenderCache {
        fragments,
        claims,
        vip_users,
        hairpin_users,
        ..
    } = cache;
    // Out of `out` while frontends move in and out of it; put back below.
    let mut tables = out.nft.take().unwrap_or_default();
    let mut touched: Vec<VsKey> = Vec::new();
    for (key, old, new) in &changes {
        if let Some(old) = old {
            for fe in &old.frontends {
                if let Some(c) = claims.get_mut(&fe.key) {
                    c.remove(key);
                }
                touched.push(fe.key);
            }
            for h in &old.hairpins {
                let k = (old.family, *h);
                if let Some(users) = hairpin_users.get_mut(&k) {
                    *users -= 1;
                    if *users == 0 {
                        hairpin_users.remove(&k);
                        if let Some(t) = tables.get_mut(&old.family) {
                            remove_element(t, "hairpin", &h.to_string());
                        }
                    }
                }
            }
        }
        if let Some(new) = new {
            for fe in &new.frontends {
                if claims.entry(fe.key).or_default().insert(key) > 0 {
                    skipped(fe, new);
                }
                touched.push(fe.key);
            }
            for h in &new.hairpins {
                let users = hairpin_users.entry((new.family, *h)).or_default();
                *users += 1;
                if *users == 1
                    && let Some(t) = tables.get_mut(&new.family)
                {
                    insert_element(t, "hairpin", h.to_string());
                }
            }
        }
    }
    touched.sort_unstable();
    touched.dedup();
    for key in touched {
        let Some(claim) = claims.get_mut(&key) else {
            continue;
        };
        let want = claim
            .contributors
            .first()
            .and_then(|w| fragments.get(w))
            .map(|(_, f)| f.clone());
        let same = match (&claim.applied, &want) {
            (Some(a), Some(w)) => Arc::ptr_eq(a, w),
            (None, None) => true,
            _ => false,
        };
        if !same {
            if let Some(a) = claim.applied.take()
                && let (Some(fe), Some(t)) = (a.frontend(&key), tables.get_mut(&a.family))
            {
                unapply_frontend(&mut out, t, vip_users, fe);
            }
            if let Some(w) = want
                && let (Some(fe), Some(t)) = (w.frontend(&key), tables.get_mut(&w.family))
            {
                apply_frontend(&mut out, t, vip_users, &w, fe);
                claim.applied = Some(w);
            }
        }
        if claim.contributors.is_empty() {
            claims.remove(&key);
        }
    }
    out.nft = Some(tables);
    cache.last = Some(out.clone());
    out
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
