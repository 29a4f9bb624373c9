//! ProxyState → [`NftRuleset`].
//!
//! Layout (see the crate README): a fixed set of chains and a few named sets and maps, so a
//! service costs elements, not chains or sets. The key trick is endpoint choice without a
//! per-service anonymous `numgen` map: a frontend (`addr . proto . port`) is dispatched through
//! the verdict map `service-ips` to the chain `pick-N`, where N is its endpoint count; `pick-N`
//! DNATs through the shared map `endpoints-PROTO` (one per transport protocol), keyed on the
//! frontend and `numgen random mod N`. Pick chains exist once per distinct endpoint count, so
//! their number stays small whatever the cluster's size.
//!
//! Why one endpoints map per protocol: the maps need `typeof` (a `numgen` value has no fixed-size
//! `type`), and nft 1.0.6 (Debian 12) cannot add a rule that uses a `typeof` map with a `th dport`
//! field once the map exists in the kernel: it re-reads the field from the map's metadata and
//! fails with "conflicting protocols specified: tcp vs. th". A protocol-specific `tcp dport`
//! field works for rules matching `meta l4proto tcp`, so `pick-N`'s rule for each protocol uses
//! that protocol's map, and a new `pick-N` chain can be added in any later sync. ClientIP affinity needs per-client memory per endpoint; services using it get
//! upstream's per-service chains and per-endpoint timeout sets (they are few).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use foldhash::fast::RandomState;
use kproxy_contract::{
    Endpoint, IpFamily, NodePortAddresses, NodeSettings, Protocol, ProxyState, ServicePort,
    ServicePortKey, TrafficPolicy,
};
use sha2::{Digest, Sha256};

use crate::model::{
    BaseChain, Chain, Delta, Elements, Generation, Group, NftRuleset, Rule, Set, Table, Text,
    group_of,
};

/// Offset of the short-circuit endpoint set within a frontend's `endpoints` keys: the ETP=Local
/// short-circuit (pod and node sources use Cluster endpoints) shares the map with the policy's
/// own list, in a disjoint index range.
pub const SHORT_CIRCUIT_OFFSET: u32 = 1 << 20;

/// The transport protocols, each with its own endpoints maps.
const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

/// The family's shared sets and maps, as `Writer::declare_sets` declares them. A fragment names
/// the sets it has elements in by these `'static` strings rather than its own copies: 10,000
/// fragments of four or five sets each held 50,000 copies of a dozen names (issue #17).
pub(crate) const SHARED_SETS: [&str; 23] = [
    "service-ips",
    "service-ips-short-circuit",
    "no-endpoint-services",
    "service-nodeports",
    "nodeports-short-circuit",
    "no-endpoint-nodeports",
    "masq-internal",
    "masq-external",
    "masq-local-source",
    "firewall-ips",
    "nodeport-masq",
    "nodeport-masq-local-source",
    "cluster-ips",
    "nodeport-ips",
    "service-cidrs",
    "hairpin",
    "firewall-allow",
    "endpoints-tcp",
    "endpoints-udp",
    "endpoints-sctp",
    "nodeport-endpoints-tcp",
    "nodeport-endpoints-udp",
    "nodeport-endpoints-sctp",
];

/// A set's name as a fragment holds it: borrowed from [`SHARED_SETS`], or a copy for a name
/// that is not there (none today; a test checks the list against the declared sets).
fn shared_set_name(set: &str) -> Cow<'static, str> {
    SHARED_SETS
        .iter()
        .find(|n| **n == set)
        .map_or_else(|| Cow::Owned(set.to_string()), |n| Cow::Borrowed(*n))
}

/// Syntax that differs between `ip` and `ip6` tables.
#[derive(Clone, Copy)]
struct Fam {
    family: IpFamily,
}

impl Fam {
    fn addr(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        }
    }
    fn addr_type(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => "ipv4_addr",
            IpFamily::V6 => "ipv6_addr",
        }
    }
    fn loopback(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => "127.0.0.0/8",
            IpFamily::V6 => "::1",
        }
    }
}

/// Renders the whole desired state, both families, from scratch.
pub fn render(state: &ProxyState) -> NftRuleset {
    render_cached(state, &IpFamily::ALL, &mut RenderCache::default())
}

/// A fragment's groups of one shared set: group key → elements.
type SharedGroups = Vec<(Text, Arc<Group>)>;

/// A service port that changed: its key, its old fragment and its new one.
type Change = (ServicePortKey, Option<Arc<Fragment>>, Option<Arc<Fragment>>);

/// One service port's share of one family's table: its elements (already grouped, see
/// [`crate::model::Elements`]), its affinity chains and sets, the pick chains it needs and the
/// frontends it owns. It depends only on the service port and the node settings.
///
/// Plain vectors, not the table's persistent maps: a fragment is built once per change and
/// kept per service port, so it should be small (10,000 of them live in the cache).
#[derive(Debug, Default)]
struct Fragment {
    /// Elements of the family's shared sets: set → group → elements.
    shared: Vec<(Cow<'static, str>, SharedGroups)>,
    /// Its own chains and sets (ClientIP affinity; usually empty).
    table: Table,
    picks: BTreeSet<(bool, bool, usize)>,
    owners: Vec<(String, String)>,
}

impl Fragment {
    fn render(family: IpFamily, node: &NodeSettings, sp: &ServicePort) -> Self {
        let mut sw = Writer::scratch(family, node);
        let mut owners = BTreeMap::new();
        sw.service_port(sp, &mut owners);
        let shared = std::mem::take(&mut sw.shared)
            .into_iter()
            .map(|(set, groups)| {
                let groups = groups
                    .into_iter()
                    .map(|(g, elements)| (g, Arc::new(elements)))
                    .collect();
                (set, groups)
            })
            .collect();
        Fragment {
            shared,
            table: sw.t,
            picks: sw.picks,
            owners: owners.into_iter().collect(),
        }
    }

    /// Every group key this fragment has elements in, in any shared set.
    fn group_keys(&self) -> BTreeSet<&Text> {
        self.shared
            .iter()
            .flat_map(|(_, groups)| groups.iter().map(|(g, _)| g))
            .collect()
    }

    /// Its elements of one group of one shared set.
    fn group(&self, set: &str, group: &str) -> Option<&Arc<Group>> {
        let (_, groups) = self.shared.iter().find(|(s, _)| s == set)?;
        groups.iter().find(|(g, _)| &**g == group).map(|(_, e)| e)
    }

    /// Sets it declares itself (ClientIP affinity).
    fn own_sets(&self) -> impl Iterator<Item = (&String, &Set)> {
        self.table.sets.iter()
    }
}

/// What the last render left for the next one: the fragment of every service port and, per
/// family, which service ports contribute to each element group and how many need each pick
/// chain. With these, a render after a few changes touches only what those changes touch.
#[derive(Debug, Default)]
pub struct RenderCache {
    node: Option<Arc<NodeSettings>>,
    families: Vec<IpFamily>,
    fragments: HashMap<ServicePortKey, (Arc<ServicePort>, Arc<Fragment>), RandomState>,
    per_family: BTreeMap<IpFamily, FamilyIndex>,
    last: Option<NftRuleset>,
}

/// One family's index into the last render.
#[derive(Debug, Default)]
struct FamilyIndex {
    /// Element group key → the service ports whose fragments have elements in it.
    contributors: HashMap<Text, Contributors, RandomState>,
    /// Pick chain → how many fragments use it.
    picks: BTreeMap<(bool, bool, usize), usize>,
    /// Number of fragments.
    fragments: usize,
}

/// The service ports contributing elements to one group, in key order. Usually one or a few (a
/// frontend's or an endpoint's address: one per port of a multi-port service), so a sorted
/// `Vec`, one allocation the size of its keys, rather than a `BTreeSet`, whose first node has
/// room for eleven (9 MiB at 10,000 services).
#[derive(Debug, Default)]
struct Contributors(Vec<ServicePortKey>);

impl Contributors {
    fn insert(&mut self, key: &ServicePortKey) {
        if let Err(at) = self.0.binary_search(key) {
            // Grown one at a time: a lone contributor (the usual case) in room for four was
            // 2.6 MiB at 10,000 services.
            self.0.reserve_exact(1);
            self.0.insert(at, key.clone());
        }
    }

    fn remove(&mut self, key: &ServicePortKey) {
        if let Ok(at) = self.0.binary_search(key) {
            self.0.remove(at);
        }
    }
}

impl FamilyIndex {
    /// The service ports contributing to group `g`, in key order.
    fn contributors(&self, g: &str) -> &[ServicePortKey] {
        self.contributors.get(g).map_or(&[], |c| c.0.as_slice())
    }

    fn add(&mut self, key: &ServicePortKey, fragment: &Fragment) {
        for g in fragment.group_keys() {
            self.contributors.entry(g.clone()).or_default().insert(key);
        }
        for pick in &fragment.picks {
            *self.picks.entry(*pick).or_default() += 1;
        }
        self.fragments += 1;
    }

    fn remove(&mut self, key: &ServicePortKey, fragment: &Fragment) {
        for g in fragment.group_keys() {
            if let Some(c) = self.contributors.get_mut(g) {
                c.remove(key);
                if c.0.is_empty() {
                    self.contributors.remove(g);
                }
            }
        }
        for pick in &fragment.picks {
            if let Some(n) = self.picks.get_mut(pick) {
                *n -= 1;
                if *n == 0 {
                    self.picks.remove(pick);
                }
            }
        }
        self.fragments -= 1;
    }
}

/// Renders the desired state for `families`, reusing what `cache` holds from the last render:
/// unchanged service ports cost nothing, and the result records what changed (a
/// [`crate::model::Delta`]) so the plan against the last render's result is O(changes) too.
pub fn render_cached(
    state: &ProxyState,
    families: &[IpFamily],
    cache: &mut RenderCache,
) -> NftRuleset {
    let same_node = cache
        .node
        .as_ref()
        .is_some_and(|n| Arc::ptr_eq(n, &state.node) || **n == *state.node);
    let out = match cache.last.take() {
        Some(last) if same_node && cache.families == families => {
            render_changes(state, families, cache, last)
        }
        _ => render_all(state, families, cache),
    };
    cache.node = Some(state.node.clone());
    cache.families = families.to_vec();
    cache.last = Some(out.clone());
    out
}

/// A render from scratch (first render, or the node settings changed).
fn render_all(state: &ProxyState, families: &[IpFamily], cache: &mut RenderCache) -> NftRuleset {
    cache.fragments.clear();
    cache.per_family.clear();
    let mut out = NftRuleset {
        generation: Generation::first(),
        ..NftRuleset::default()
    };
    for &family in families {
        let mut w = Writer::new(family, &state.node);
        let index = cache.per_family.entry(family).or_default();
        let services: Vec<(&ServicePortKey, &Arc<ServicePort>)> = state
            .services
            .iter()
            .filter(|(k, _)| k.family == family)
            .collect();
        let fragments = render_fragments(family, &state.node, &services);
        for ((key, sp), fragment) in services.into_iter().zip(fragments) {
            w.add(&fragment);
            index.add(key, &fragment);
            for (k, v) in &fragment.owners {
                out.owners.insert(k.clone(), v.clone());
            }
            cache.fragments.insert(key.clone(), (sp.clone(), fragment));
        }
        out.families.insert(family, w.finish());
    }
    out
}

/// Below this many service ports a second thread costs more than it saves.
const PARALLEL_MIN: usize = 2_000;

/// The fragments of `services`, in order. A first render at 10,000 services spends most of its
/// time here, and each fragment depends only on its service port: the work is split across the
/// available cores (two here), the assembly stays sequential.
fn render_fragments(
    family: IpFamily,
    node: &NodeSettings,
    services: &[(&ServicePortKey, &Arc<ServicePort>)],
) -> Vec<Arc<Fragment>> {
    let one = |sps: &[(&ServicePortKey, &Arc<ServicePort>)]| -> Vec<Arc<Fragment>> {
        sps.iter()
            .map(|(_, sp)| Arc::new(Fragment::render(family, node, sp)))
            .collect()
    };
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    if threads < 2 || services.len() < PARALLEL_MIN {
        return one(services);
    }
    let chunk = services.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = services
            .chunks(chunk)
            .map(|part| scope.spawn(move || one(part)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(fragments) => fragments,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

/// A render that starts from the last one and replaces the fragments of the service ports
/// that changed, rebuilding only the element groups, chains and sets they touch.
fn render_changes(
    state: &ProxyState,
    families: &[IpFamily],
    cache: &mut RenderCache,
    last: NftRuleset,
) -> NftRuleset {
    let mut delta = Delta {
        base: last.generation.clone(),
        ..Delta::default()
    };
    let mut out = last;
    out.generation = out.generation.next();
    for &family in families {
        let index = cache.per_family.entry(family).or_default();
        // (key, old fragment, new fragment) for every service port that changed.
        let mut changes: Vec<Change> = Vec::new();
        let mut seen = 0;
        for (key, sp) in state.services.iter().filter(|(k, _)| k.family == family) {
            match cache.fragments.get(key) {
                Some((old, _)) if Arc::ptr_eq(old, sp) => seen += 1,
                Some((old, fragment)) => {
                    seen += 1;
                    if **old == **sp {
                        let fragment = fragment.clone();
                        cache.fragments.insert(key.clone(), (sp.clone(), fragment));
                        continue;
                    }
                    let new = Arc::new(Fragment::render(family, &state.node, sp));
                    changes.push((key.clone(), Some(fragment.clone()), Some(new.clone())));
                    cache.fragments.insert(key.clone(), (sp.clone(), new));
                }
                None => {
                    let new = Arc::new(Fragment::render(family, &state.node, sp));
                    changes.push((key.clone(), None, Some(new.clone())));
                    cache.fragments.insert(key.clone(), (sp.clone(), new));
                }
            }
        }
        if seen < index.fragments {
            let gone: Vec<ServicePortKey> = cache
                .fragments
                .keys()
                .filter(|k| k.family == family && !state.services.contains_key(*k))
                .cloned()
                .collect();
            for key in gone {
                if let Some((_, old)) = cache.fragments.remove(&key) {
                    changes.push((key, Some(old), None));
                }
            }
        }
        if changes.is_empty() {
            continue;
        }
        let table = out.families.entry(family).or_default();
        let td = delta.families.entry(family).or_default();
        let picks_before: BTreeSet<(bool, bool, usize)> = index.picks.keys().copied().collect();
        let mut owner_keys: BTreeSet<String> = BTreeSet::new();
        for (key, old, new) in &changes {
            for f in old.iter().chain(new) {
                for (set, groups) in &f.shared {
                    for (g, _) in groups {
                        td.groups.insert((set.to_string(), g.clone()));
                    }
                }
            }
            if let Some(old) = old {
                index.remove(key, old);
                for name in old.table.chains.keys() {
                    table.chains.remove(name);
                    td.chains.insert(name.clone());
                }
                for (name, _) in old.own_sets() {
                    table.sets.remove(name);
                    td.sets.insert(name.clone());
                }
                owner_keys.extend(old.owners.iter().map(|(k, _)| k.clone()));
            }
            if let Some(new) = new {
                index.add(key, new);
                for (name, chain) in &new.table.chains {
                    table.chains.insert(name.clone(), chain.clone());
                    td.chains.insert(name.clone());
                }
                for (name, set) in new.own_sets() {
                    table.sets.insert(name.clone(), set.clone());
                    td.sets.insert(name.clone());
                }
                owner_keys.extend(new.owners.iter().map(|(k, _)| k.clone()));
            }
        }
        // Each touched frontend's owner: the last contributor claiming it, as from scratch.
        for k in owner_keys {
            let owner = index
                .contributors(group_of(&k))
                .iter()
                .filter_map(|c| cache.fragments.get(c))
                .rev()
                .filter_map(|(_, f)| f.owners.iter().find(|(o, _)| *o == k))
                .next()
                .map(|(_, v)| v.clone());
            match owner {
                Some(v) => out.owners.insert(k, v),
                None => out.owners.remove(&k),
            };
        }
        // Each touched group, rebuilt from its contributors in key order (a later service
        // port's element wins, as in a render from scratch).
        for (set, g) in &td.groups {
            let Some(target) = table.sets.get_mut(set) else {
                continue;
            };
            let parts: Vec<&Arc<Group>> = index
                .contributors(g)
                .iter()
                .filter_map(|k| cache.fragments.get(k))
                .filter_map(|(_, f)| f.group(set, g))
                .collect();
            let group = match parts.as_slice() {
                [] => Arc::default(),
                [one] => Arc::clone(one),
                many => {
                    let mut merged = Group::new();
                    for part in many {
                        merged.extend(part.iter().map(|(k, v)| (k.clone(), v.clone())));
                    }
                    Arc::new(merged)
                }
            };
            target.elements.set_group(g, group);
        }
        let picks_after: BTreeSet<(bool, bool, usize)> = index.picks.keys().copied().collect();
        for pick in picks_before.symmetric_difference(&picks_after) {
            let name = pick_chain(pick.0, pick.1, pick.2);
            if picks_after.contains(pick) {
                table
                    .chains
                    .insert(name.clone(), pick_chain_body(Fam { family }, *pick));
            } else {
                table.chains.remove(&name);
            }
            td.chains.insert(name);
        }
    }
    out.delta = Some(Arc::new(delta));
    out
}

/// What a frontend is, for dispatch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Frontend {
    /// `addr . proto . port` (ClusterIP, externalIP, LB IP).
    Ip(IpAddr),
    /// `proto . port` on the NodePort addresses.
    NodePort(u16),
}

struct Writer<'a> {
    f: Fam,
    node: &'a NodeSettings,
    /// Renders one service port's fragment: sets are created on first use, not declared.
    scratch: bool,
    t: Table,
    /// A fragment's elements of the family's shared sets: set → group → elements.
    shared: BTreeMap<Cow<'static, str>, BTreeMap<Text, Group>>,
    /// Endpoint counts needing `pick-N` / `nodeport-pick-N` chains (with/without offset).
    picks: BTreeSet<(bool, bool, usize)>,
}

fn ep_value(ep: &Endpoint) -> String {
    format!("{} . {}", ep.ip, ep.port)
}

fn svc_hash(sp: &ServicePort) -> String {
    let digest = Sha256::digest(format!("{}{}", sp.name, sp.name.protocol).as_bytes());
    let mut h = data_encoding::BASE32.encode(&digest);
    h.truncate(8);
    h
}

/// `HASH-ns/name/proto/port`, upstream's chain-name style.
fn svc_chain_suffix(sp: &ServicePort) -> String {
    let port = if sp.name.port.is_empty() {
        "-"
    } else {
        &sp.name.port
    };
    let s = format!(
        "{}-{}/{}/{}/{}",
        svc_hash(sp),
        sp.name.namespace,
        sp.name.name,
        sp.name.protocol,
        port
    );
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-/_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(200)
        .collect()
}

impl<'a> Writer<'a> {
    fn new(family: IpFamily, node: &'a NodeSettings) -> Self {
        let mut w = Self::scratch(family, node);
        w.scratch = false;
        w.declare_sets();
        w
    }

    fn scratch(family: IpFamily, node: &'a NodeSettings) -> Self {
        Self {
            f: Fam { family },
            node,
            scratch: true,
            t: Table::default(),
            shared: BTreeMap::new(),
            picks: BTreeSet::new(),
        }
    }

    /// Adds a service port's fragment: element groups by `Arc`, affinity chains and sets by
    /// copy (they are few).
    fn add(&mut self, f: &Fragment) {
        for (name, groups) in &f.shared {
            if let Some(target) = self.t.sets.get_mut(&**name) {
                for (group, elements) in groups {
                    target.elements.extend_group(group, elements);
                }
            }
        }
        for (name, set) in &f.table.sets {
            if !self.t.sets.contains_key(name) {
                self.t.sets.insert(name.clone(), set.clone());
            }
        }
        for (name, chain) in &f.table.chains {
            self.t.chains.insert(name.clone(), chain.clone());
        }
        self.picks.extend(f.picks.iter().copied());
    }

    fn set(&mut self, name: &str, is_map: bool, decl: String, signature: String) {
        self.t.sets.insert(
            name.to_string(),
            Set {
                is_map,
                decl,
                signature,
                elements: Elements::default(),
            },
        );
    }

    fn elem(&mut self, set: &str, key: String, value: Option<String>) {
        if let Some(s) = self.t.sets.get_mut(set) {
            s.elements.insert(key, value);
        } else if self.scratch {
            // Declared by the family writer the fragment is added to.
            // Look up before allocating: most elements land in a set and group seen before.
            if !self.shared.contains_key(set) {
                self.shared.insert(shared_set_name(set), BTreeMap::new());
            }
            let groups = self.shared.get_mut(set).expect("inserted above");
            let group = group_of(&key);
            if !groups.contains_key(group) {
                groups.insert(Text::from(group), Group::new());
            }
            groups
                .get_mut(group)
                .expect("inserted above")
                .insert(key.into(), value.map(Text::from));
        }
    }

    fn declare_sets(&mut self) {
        let a = self.f.addr_type();
        let ad = self.f.addr();
        let frontend = format!("{a} . inet_proto . inet_service");
        for name in [
            "service-ips",
            "service-ips-short-circuit",
            "no-endpoint-services",
        ] {
            self.set(
                name,
                true,
                format!("type {frontend} : verdict ;"),
                format!("{frontend} : verdict"),
            );
        }
        for name in [
            "service-nodeports",
            "nodeports-short-circuit",
            "no-endpoint-nodeports",
        ] {
            self.set(
                name,
                true,
                "type inet_proto . inet_service : verdict ;".into(),
                "inet_proto . inet_service : verdict".into(),
            );
        }
        for name in [
            "masq-internal",
            "masq-external",
            "masq-local-source",
            "firewall-ips",
        ] {
            self.set(name, false, format!("type {frontend} ;"), frontend.clone());
        }
        for name in ["nodeport-masq", "nodeport-masq-local-source"] {
            self.set(
                name,
                false,
                "type inet_proto . inet_service ;".into(),
                "inet_proto . inet_service".into(),
            );
        }
        self.set("cluster-ips", false, format!("type {a} ;"), a.to_string());
        self.set("nodeport-ips", false, format!("type {a} ;"), a.to_string());
        self.set(
            "service-cidrs",
            false,
            format!("type {a} ; flags interval ;"),
            format!("{a} flags interval"),
        );
        self.set(
            "hairpin",
            false,
            format!("type {a} . {a} ;"),
            format!("{a} . {a}"),
        );
        self.set(
            "firewall-allow",
            false,
            format!("type {frontend} . {a} ; flags interval ;"),
            format!("{frontend} . {a} flags interval"),
        );
        // One endpoints map per protocol, typed with that protocol's `dport` (not `th dport`,
        // see the module documentation).
        for p in PROTOCOLS {
            self.set(
                &format!("endpoints-{p}"),
                true,
                format!(
                    "typeof {ad} daddr . meta l4proto . {p} dport . numgen random mod 1 : {ad} daddr . {p} dport ;"
                ),
                format!("{frontend} . integer : {a} . inet_service"),
            );
            self.set(
                &format!("nodeport-endpoints-{p}"),
                true,
                format!(
                    "typeof meta l4proto . {p} dport . numgen random mod 1 : {ad} daddr . {p} dport ;"
                ),
                format!("inet_proto . inet_service . integer : {a} . inet_service"),
            );
        }
        let node = self.node;
        let family = self.f.family;
        for cidr in node
            .service_cidrs
            .iter()
            .filter(|c| IpFamily::of_net(c) == family)
        {
            self.elem("service-cidrs", prefix(cidr), None);
        }
        if let NodePortAddresses::Only(ips) = &node.node_port_addresses {
            for ip in ips.iter().filter(|ip| IpFamily::of(ip) == family) {
                self.elem("nodeport-ips", ip.to_string(), None);
            }
        }
    }

    // === one service port ===

    fn service_port(&mut self, sp: &ServicePort, owners: &mut BTreeMap<String, String>) {
        let proto = sp.name.protocol;
        let name = sp.name.to_string();
        let has_endpoints = sp.endpoints.any;
        let internal = sp.internal_endpoints();
        let external = sp.external_endpoints();
        let cluster = &sp.endpoints.cluster;
        let etp_local = sp.external_policy == TrafficPolicy::Local;

        // Frontends, each with the endpoint list the policy gives it.
        let mut frontends: Vec<(Frontend, bool)> = Vec::new();
        if let Some(cip) = sp.cluster_ip {
            frontends.push((Frontend::Ip(cip), false));
            self.elem("cluster-ips", cip.to_string(), None);
        }
        for ip in sp.external_ips.iter().chain(&sp.load_balancer_ips) {
            frontends.push((Frontend::Ip(*ip), true));
        }
        if let Some(np) = sp.node_port {
            frontends.push((Frontend::NodePort(np), true));
        }

        for (fe, is_external) in frontends {
            let key = match fe {
                Frontend::Ip(ip) => format!("{ip} . {proto} . {}", sp.port),
                Frontend::NodePort(np) => format!("{proto} . {np}"),
            };
            owners.insert(key.clone(), name.clone());
            let nodeport = matches!(fe, Frontend::NodePort(_));
            let (dispatch, short, no_eps, eps_map) = if nodeport {
                (
                    "service-nodeports",
                    "nodeports-short-circuit",
                    "no-endpoint-nodeports",
                    "nodeport-endpoints",
                )
            } else {
                (
                    "service-ips",
                    "service-ips-short-circuit",
                    "no-endpoint-services",
                    "endpoints",
                )
            };
            let list = if is_external { external } else { internal };

            if !has_endpoints {
                self.elem(no_eps, key, Some("goto reject-chain".into()));
                continue;
            }
            // loadBalancerSourceRanges (LB IPs only, docs/semantics.md rule 13), whenever the
            // service has endpoints (upstream's usesFWChain): the filter runs before DNAT, so it
            // also covers the ETP=Local short-circuit and frontends whose policy has no
            // endpoint.
            if let Frontend::Ip(ip) = fe
                && sp.load_balancer_ips.contains(&ip)
                && !sp.source_ranges.is_empty()
            {
                self.elem("firewall-ips", key.clone(), None);
                for range in &sp.source_ranges {
                    self.elem("firewall-allow", format!("{key} . {}", prefix(range)), None);
                }
                let node_allowed = self
                    .node
                    .node_ips
                    .iter()
                    .any(|n| sp.source_ranges.iter().any(|r| r.contains(n)));
                if node_allowed {
                    for lb in &sp.load_balancer_ips {
                        self.elem("firewall-allow", format!("{key} . {lb}"), None);
                    }
                }
            }
            // Short-circuit for ETP=Local external frontends: pods and the node itself use the
            // Cluster endpoints (pods without masquerade, the node with it).
            if is_external && etp_local && !cluster.is_empty() {
                let verdict = self.endpoint_choice(sp, &key, eps_map, cluster, true, nodeport);
                self.elem(short, key.clone(), Some(verdict));
                let masq = if nodeport {
                    "nodeport-masq-local-source"
                } else {
                    "masq-local-source"
                };
                self.elem(masq, key.clone(), None);
            }
            if list.is_empty() {
                // Endpoints exist, but none the policy may use: DROP (docs/semantics.md,
                // rules 6 and 7).
                self.elem(no_eps, key, Some("drop".into()));
                continue;
            }
            let verdict = self.endpoint_choice(sp, &key, eps_map, list, false, nodeport);
            self.elem(dispatch, key.clone(), Some(verdict));
            if is_external {
                if !etp_local {
                    let masq = if nodeport {
                        "nodeport-masq"
                    } else {
                        "masq-external"
                    };
                    self.elem(masq, key.clone(), None);
                }
            } else {
                // Upstream heads whichever chain internal traffic uses (Cluster or Local) with
                // the masquerade rule for sources outside the pod network.
                self.elem("masq-internal", key.clone(), None);
            }
        }
        // Hairpin: a pod reaching itself through the service is masqueraded. Only a local pod
        // can be its own client (its packets cross this node's netfilter), so only local
        // endpoints need an element: at 10,000 services x 10 endpoints that is 100,000 fewer.
        for ep in cluster
            .iter()
            .chain(&sp.endpoints.local)
            .filter(|ep| ep.is_local)
        {
            self.elem("hairpin", format!("{} . {}", ep.ip, ep.ip), None);
        }
    }

    /// The verdict that picks an endpoint from `list` for one frontend, adding the elements it
    /// needs. Without affinity: `goto pick-N` with N elements in the endpoints map. With
    /// affinity: a per-service chain in upstream's style.
    fn endpoint_choice(
        &mut self,
        sp: &ServicePort,
        key: &str,
        eps_map: &str,
        list: &[Endpoint],
        short_circuit: bool,
        nodeport: bool,
    ) -> String {
        if let Some(aff) = sp.affinity {
            return self.affinity_chains(sp, list, aff.timeout.as_secs());
        }
        let offset = if short_circuit {
            SHORT_CIRCUIT_OFFSET
        } else {
            0
        };
        let eps_map = format!("{eps_map}-{}", sp.name.protocol);
        for (i, ep) in list.iter().enumerate() {
            let idx = offset + u32::try_from(i).unwrap_or(u32::MAX - offset);
            self.elem(&eps_map, format!("{key} . {idx}"), Some(ep_value(ep)));
        }
        self.picks.insert((nodeport, short_circuit, list.len()));
        format!("goto {}", pick_chain(nodeport, short_circuit, list.len()))
    }

    fn affinity_chains(&mut self, sp: &ServicePort, list: &[Endpoint], timeout: u64) -> String {
        let a = self.f.addr();
        let suffix = svc_chain_suffix(sp);
        let list_id = {
            let mut h = Sha256::new();
            for ep in list {
                h.update(ep_value(ep).as_bytes());
            }
            data_encoding::HEXLOWER.encode(&h.finalize()[..3])
        };
        let chain = format!("affinity-{list_id}-{suffix}");
        if self.t.chains.contains_key(&chain) {
            return format!("goto {chain}");
        }
        let mut rules = Vec::new();
        let mut ep_chains = Vec::new();
        for ep in list {
            let ep_id = {
                let digest = Sha256::digest(ep_value(ep).as_bytes());
                data_encoding::HEXLOWER.encode(&digest[..4])
            };
            let set = format!("affinity-{ep_id}-{suffix}");
            let ep_chain = format!("endpoint-{ep_id}-{suffix}");
            self.set(
                &set,
                false,
                format!(
                    "type {} ; flags dynamic,timeout ; timeout {timeout}s ;",
                    self.f.addr_type()
                ),
                format!("{} flags timeout timeout {timeout}", self.f.addr_type()),
            );
            rules.push(Rule::new(format!("{a} saddr @{set} goto {ep_chain}")));
            let target = match ep.ip {
                IpAddr::V4(v4) => format!("{v4}:{}", ep.port),
                IpAddr::V6(v6) => format!("[{v6}]:{}", ep.port),
            };
            let proto = sp.name.protocol;
            self.t.chains.insert(
                ep_chain.clone(),
                Chain {
                    base: None,
                    rules: vec![
                        Rule::new(format!("update @{set} {{ {a} saddr }}")),
                        Rule::new(format!("meta l4proto {proto} dnat {a} to {target}")),
                    ],
                },
            );
            ep_chains.push(ep_chain);
        }
        let n = ep_chains.len();
        for (i, c) in ep_chains.iter().enumerate() {
            if i + 1 < n {
                rules.push(Rule::new(format!("numgen random mod {} 0 goto {c}", n - i)));
            } else {
                rules.push(Rule::new(format!("goto {c}")));
            }
        }
        self.t
            .chains
            .insert(chain.clone(), Chain { base: None, rules });
        format!("goto {chain}")
    }

    // === static chains ===

    fn finish(mut self) -> Table {
        let a = self.f.addr();
        let mark = self.node.masquerade_mark();
        // The local-traffic detector, for pod traffic (`from_pod`) and everything else. These
        // rules sit in `services` and `nodeports`, reached from the prerouting and the output
        // hook: in the output hook `iifname` is empty, so the node's own packets are "not
        // local" under an interface detector, as in the iptables mode.
        let local = self.node.local_traffic.for_rules(self.f.family);
        let from_pod = local.map(|m| m.nft(self.f.family, true));
        let not_from_pod = local.map(|m| m.nft(self.f.family, false));
        let fe = format!("{a} daddr . meta l4proto . th dport");
        let np_match = match self.node.node_port_addresses {
            NodePortAddresses::AllLocal => {
                format!("fib daddr type local {a} daddr != {}", self.f.loopback())
            }
            NodePortAddresses::Only(_) => format!("{a} daddr @nodeport-ips"),
        };

        let mut base = |name: &str,
                        kind: &'static str,
                        hook: &'static str,
                        priority: i32,
                        rules: Vec<String>| {
            self.t.chains.insert(
                name.to_string(),
                Chain {
                    base: Some(BaseChain {
                        kind,
                        hook,
                        priority,
                    }),
                    rules: rules.into_iter().map(Rule::new).collect(),
                },
            );
        };
        base(
            "nat-prerouting",
            "nat",
            "prerouting",
            -100,
            vec!["jump services".into()],
        );
        base(
            "nat-output",
            "nat",
            "output",
            -100,
            vec!["jump services".into()],
        );
        base(
            "nat-postrouting",
            "nat",
            "postrouting",
            100,
            vec!["jump masquerading".into()],
        );
        base(
            "filter-prerouting-pre-dnat",
            "filter",
            "prerouting",
            -110,
            vec!["ct state new jump firewall-check".into()],
        );
        base(
            "filter-output-pre-dnat",
            "filter",
            "output",
            -110,
            vec!["ct state new jump firewall-check".into()],
        );
        base(
            "filter-input",
            "filter",
            "input",
            0,
            vec![
                "ct state new jump nodeport-endpoints-check".into(),
                "ct state new jump service-endpoints-check".into(),
            ],
        );
        for (name, hook) in [("filter-forward", "forward"), ("filter-output", "output")] {
            base(
                name,
                "filter",
                hook,
                0,
                vec![
                    "ct state new jump service-endpoints-check".into(),
                    "ct state new jump cluster-ips-check".into(),
                ],
            );
        }

        let mut services = Vec::new();
        match (&not_from_pod, self.node.masquerade_all) {
            (_, true) => services.push(format!("{fe} @masq-internal jump mark-for-masquerade")),
            (Some(outside), false) => services.push(format!(
                "{outside} {fe} @masq-internal jump mark-for-masquerade"
            )),
            (None, false) => {}
        }
        services.push(format!("{fe} @masq-external jump mark-for-masquerade"));
        services.push(format!(
            "fib saddr type local {fe} @masq-local-source jump mark-for-masquerade"
        ));
        if let Some(pod) = &from_pod {
            services.push(format!("{pod} {fe} vmap @service-ips-short-circuit"));
        }
        services.push(format!(
            "fib saddr type local {fe} vmap @service-ips-short-circuit"
        ));
        services.push(format!("{fe} vmap @service-ips"));
        services.push(format!("{np_match} jump nodeports"));

        let np = "meta l4proto . th dport";
        let mut nodeports = vec![
            format!("{np} @nodeport-masq jump mark-for-masquerade"),
            format!(
                "fib saddr type local {np} @nodeport-masq-local-source jump mark-for-masquerade"
            ),
        ];
        if let Some(pod) = &from_pod {
            nodeports.push(format!("{pod} {np} vmap @nodeports-short-circuit"));
        }
        nodeports.push(format!(
            "fib saddr type local {np} vmap @nodeports-short-circuit"
        ));
        nodeports.push(format!("{np} vmap @service-nodeports"));

        let regular: Vec<(&str, Vec<String>)> = vec![
            ("services", services),
            ("nodeports", nodeports),
            (
                "mark-for-masquerade",
                vec![format!("meta mark set meta mark | {mark:#010x}")],
            ),
            (
                "masquerading",
                vec![
                    format!(
                        "ct status dnat {a} saddr . {a} daddr @hairpin masquerade fully-random"
                    ),
                    format!("meta mark & {mark:#010x} == 0x00000000 return"),
                    format!("meta mark set meta mark ^ {mark:#010x}"),
                    "masquerade fully-random".into(),
                ],
            ),
            (
                "firewall-check",
                vec![format!(
                    "{fe} @firewall-ips {fe} . {a} saddr != @firewall-allow drop"
                )],
            ),
            (
                "service-endpoints-check",
                vec![format!("{fe} vmap @no-endpoint-services")],
            ),
            (
                "nodeport-endpoints-check",
                vec![format!("{np_match} {np} vmap @no-endpoint-nodeports")],
            ),
            (
                "cluster-ips-check",
                vec![
                    format!("{a} daddr @cluster-ips reject"),
                    format!("{a} daddr @service-cidrs drop"),
                ],
            ),
            ("reject-chain", vec!["reject".into()]),
        ];
        for (name, rules) in regular {
            self.t.chains.insert(
                name.to_string(),
                Chain {
                    base: None,
                    rules: rules.into_iter().map(Rule::new).collect(),
                },
            );
        }

        for pick in std::mem::take(&mut self.picks) {
            let chain = pick_chain_body(self.f, pick);
            self.t
                .chains
                .insert(pick_chain(pick.0, pick.1, pick.2), chain);
        }
        self.t
    }
}

/// The rules of `pick_chain(nodeport, short_circuit, n)`: DNAT through the protocol's endpoints
/// map, keyed on the frontend and `numgen random mod n`.
fn pick_chain_body(f: Fam, (nodeport, short, n): (bool, bool, usize)) -> Chain {
    let a = f.addr();
    let (key, map) = if nodeport {
        ("meta l4proto . th dport".to_string(), "nodeport-endpoints")
    } else {
        (format!("{a} daddr . meta l4proto . th dport"), "endpoints")
    };
    let offset = if short {
        format!(" offset {SHORT_CIRCUIT_OFFSET}")
    } else {
        String::new()
    };
    // The second round (n > 1) is the fallback for a map miss: see [`pick_moduli`].
    let rules = pick_moduli(n)
        .flat_map(|m| PROTOCOLS.iter().map(move |p| (m, p)))
        .map(|(m, p)| {
            Rule::new(format!(
                "meta l4proto {p} dnat {a} to {key} . numgen random mod {m}{offset} map @{map}-{p}"
            ))
        })
        .collect();
    Chain { base: None, rules }
}

/// The moduli of `pick-N`'s dnat rules: `N`, then (N > 1) `1`, a fallback that always draws
/// index 0 (the offset for short-circuit chains), which exists whenever the frontend has
/// endpoints.
///
/// Why the fallback: a transaction that changes a frontend from `goto pick-3` to `goto pick-2`
/// and deletes its index 2 is atomic for rules, but not across two set lookups of one packet.
/// Each set lookup reads the kernel's generation cursor anew (the chain walk reads it once),
/// so a packet whose `service-ips` lookup ran before the commit's generation flip and whose
/// endpoints-map lookup ran after it draws `numgen mod 3` in a map that has only indexes 0 and
/// 1: a miss, no DNAT, and `cluster-ips-check` rejects the connection (README, "One packet, two
/// generations": measured on 6.18; the zero-loss test met it once in ~1,350 connects under
/// load). The fallback runs in the same (new) generation as the miss, in which index 0 exists
/// if the frontend has endpoints at all; in a consistent state it is never reached.
fn pick_moduli(n: usize) -> impl Iterator<Item = usize> {
    std::iter::once(n).chain((n > 1).then_some(1))
}

/// The chain that picks among `n` endpoints.
pub fn pick_chain(nodeport: bool, short_circuit: bool, n: usize) -> String {
    let mut s = String::new();
    if nodeport {
        s.push_str("nodeport-");
    }
    s.push_str("pick-");
    if short_circuit {
        s.push_str("sc-");
    }
    let _ = write!(s, "{n}");
    s
}

/// A CIDR as `nft -j` prints it: a plain address for a host prefix.
fn prefix(net: &ipnet::IpNet) -> String {
    let n = net.trunc();
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}
