//! ProxyState → [`Ruleset`]: upstream kube-proxy's iptables layout under `KPROXY-` names, with
//! one structural change: destination dispatch is a tree of chains (see [`dispatch`]), so a new
//! connection to the 10,000th service walks about fifty rules, not ten thousand.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use kproxy_contract::{
    Endpoint, IpFamily, LocalMatch, NodePortAddresses, NodeSettings, ProxyState, ServicePort,
    ServicePortKey, TrafficPolicy,
};

use crate::dispatch;
use crate::names::{self, *};
use crate::rule::{self, RecentAction, RuleBuilder, host, net};
use crate::ruleset::{Jump, Ruleset, Table};

/// Options of the iptables mode that do not come from the cluster.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// `nf_conntrack_tcp_be_liberal` is 1: the INVALID-drop workaround is not needed.
    pub tcp_be_liberal: bool,
}

/// One service port's share of one family's ruleset: the chains it owns and the rules it adds
/// to the shared chains. It depends only on the service port, the node settings and whether
/// rules carry comments, so an unchanged service port reuses its fragment from the last render
/// and its chains keep the same `Arc`s, which the plan then skips without comparing a rule.
#[derive(Debug, Default)]
struct Fragment {
    /// `ns/name:port`, the owner shown by the dry-run.
    owner: String,
    /// nat chains this service port owns (SVC, SVL, EXT, FW, SEP), with their rules.
    chains: Vec<(String, Arc<Vec<String>>)>,
    /// (destination, rule) pairs for the nat dispatch tree.
    nat_dispatch: Vec<(IpAddr, String)>,
    /// (destination, rule) pairs for filter KPROXY-SERVICES.
    filter_services: Vec<(IpAddr, String)>,
    /// (destination, rule) pairs for filter KPROXY-EXTERNAL-SERVICES.
    filter_external: Vec<(IpAddr, String)>,
    /// NodePort rules of filter KPROXY-EXTERNAL-SERVICES (matched by addrtype, not address).
    filter_external_nodeports: Vec<String>,
    /// Rules of nat KPROXY-NODEPORTS.
    nat_nodeports: Vec<String>,
    /// Rules of filter KPROXY-NODEPORTS (health-check node ports).
    filter_nodeports: Vec<String>,
    /// Rules of filter KPROXY-PROXY-FIREWALL.
    proxy_firewall: Vec<String>,
}

impl Fragment {
    /// Upstream's large-cluster mode, applied to this fragment's rules.
    fn strip_comments(&mut self) {
        fn strip(rules: &mut Vec<String>) {
            rules.retain_mut(|r| {
                *r = rule::without_comment(r);
                // A rule that was only a comment documented the chain; nothing is left of it.
                !r.is_empty()
            });
        }
        for (_, rules) in &mut self.chains {
            strip(Arc::make_mut(rules));
        }
        for (_, r) in self
            .nat_dispatch
            .iter_mut()
            .chain(&mut self.filter_services)
            .chain(&mut self.filter_external)
        {
            *r = rule::without_comment(r);
        }
        for rules in [
            &mut self.filter_external_nodeports,
            &mut self.nat_nodeports,
            &mut self.filter_nodeports,
            &mut self.proxy_firewall,
        ] {
            strip(rules);
        }
    }
}

/// What every fragment depends on besides its service port.
#[derive(Debug, Clone)]
struct FragmentContext {
    node: Arc<NodeSettings>,
    comments: bool,
}

impl FragmentContext {
    fn same(&self, other: &FragmentContext) -> bool {
        self.comments == other.comments
            && (Arc::ptr_eq(&self.node, &other.node) || self.node == other.node)
    }
}

/// The fragments of the last render, so the next one renders only the service ports that
/// changed. At 10,000 services a full render formats about 125,000 rules; an incremental one
/// formats a handful and re-assembles the rest from `Arc`s.
#[derive(Debug, Default)]
pub struct RenderCache {
    context: Option<FragmentContext>,
    fragments: HashMap<ServicePortKey, (Arc<ServicePort>, Arc<Fragment>)>,
}

impl RenderCache {
    /// How many service ports the cache holds fragments for.
    pub fn len(&self) -> usize {
        self.fragments.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.fragments.is_empty()
    }
}

/// Rules for one family under construction.
struct FamilyWriter<'a> {
    family: IpFamily,
    node: &'a NodeSettings,
    out: &'a mut Ruleset,
    /// (destination, rule) pairs for the nat dispatch tree.
    nat_dispatch: Vec<(IpAddr, String)>,
    /// (destination, rule) pairs for filter KPROXY-SERVICES.
    filter_services: Vec<(IpAddr, String)>,
    /// (destination, rule) pairs for filter KPROXY-EXTERNAL-SERVICES.
    filter_external: Vec<(IpAddr, String)>,
    /// NodePort rules of filter KPROXY-EXTERNAL-SERVICES (matched by addrtype, not address).
    filter_external_nodeports: Vec<String>,
}

/// Renders the whole desired state, both families, from scratch.
pub fn render(state: &ProxyState, opts: &RenderOptions) -> Ruleset {
    render_cached(state, opts, &IpFamily::ALL, &mut RenderCache::default())
}

/// Renders the desired state for `families`, reusing the fragments in `cache` of service ports
/// that did not change (same `Arc`, or equal) and leaving this render's fragments in it.
pub fn render_cached(
    state: &ProxyState,
    opts: &RenderOptions,
    families: &[IpFamily],
    cache: &mut RenderCache,
) -> Ruleset {
    let endpoints: usize = state
        .services
        .values()
        .map(|sp| sp.endpoints.cluster.len())
        .sum();
    let context = FragmentContext {
        node: state.node.clone(),
        comments: endpoints <= LARGE_CLUSTER_ENDPOINTS,
    };
    if !cache.context.as_ref().is_some_and(|c| c.same(&context)) {
        cache.fragments.clear();
    }
    let mut previous = std::mem::take(&mut cache.fragments);
    let mut out = Ruleset::default();
    for &family in families {
        let mut w = FamilyWriter {
            family,
            node: &state.node,
            out: &mut out,
            nat_dispatch: Vec::new(),
            filter_services: Vec::new(),
            filter_external: Vec::new(),
            filter_external_nodeports: Vec::new(),
        };
        w.static_chains(opts);
        let local = state.node.local_traffic.for_rules(family);
        for (key, sp) in state.services.iter().filter(|(k, _)| k.family == family) {
            let fragment = match previous.remove(key) {
                Some((old, fragment)) if Arc::ptr_eq(&old, sp) || old == *sp => fragment,
                _ => {
                    let mut f = ServiceWriter {
                        family,
                        node: &state.node,
                        local,
                        frag: Fragment::default(),
                    }
                    .service_port(sp);
                    if !context.comments {
                        f.strip_comments();
                    }
                    Arc::new(f)
                }
            };
            w.add(&fragment);
            cache.fragments.insert(key.clone(), (sp.clone(), fragment));
        }
        w.finish();
        if !context.comments {
            drop_shared_comments(&mut out, family);
        }
    }
    cache.context = Some(context);
    out
}

/// Upstream's large-cluster mode: above this many endpoints, rules carry no comments, which
/// shrinks every restore (upstream measured "even by 40%+"); the dry-run still groups by service
/// through the chain owners.
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// Strips comments from the chains no service port owns (per-service chains were stripped in
/// their fragments).
fn drop_shared_comments(out: &mut Ruleset, family: IpFamily) {
    let owners = &out.owners;
    let Some(rules) = out.families.get_mut(&family) else {
        return;
    };
    for table in rules.tables.values_mut() {
        for (name, rules) in table.chains.iter_mut() {
            if owners.contains_key(name) {
                continue;
            }
            if !rules.iter().any(|r| r.contains("-m comment")) {
                continue;
            }
            Arc::make_mut(rules).retain_mut(|r| {
                *r = rule::without_comment(r);
                !r.is_empty()
            });
        }
    }
}

impl FamilyWriter<'_> {
    fn chain(&mut self, table: Table, name: &str) -> &mut Vec<String> {
        Arc::make_mut(
            self.out
                .table_mut(self.family, table)
                .chains
                .entry(name.to_string())
                .or_default(),
        )
    }

    fn jump(&mut self, table: Table, builtin: &str, rule: String) {
        self.out.table_mut(self.family, table).jumps.insert(Jump {
            builtin: builtin.to_string(),
            rule,
        });
    }

    /// Adds one service port's fragment: its chains by `Arc`, its shared-chain rules by copy.
    fn add(&mut self, f: &Fragment) {
        let nat = self.out.table_mut(self.family, Table::Nat);
        for (name, rules) in &f.chains {
            nat.chains.insert(name.clone(), rules.clone());
        }
        for (name, _) in &f.chains {
            self.out.owners.insert(name.clone(), f.owner.clone());
        }
        self.nat_dispatch.extend(f.nat_dispatch.iter().cloned());
        self.filter_services
            .extend(f.filter_services.iter().cloned());
        self.filter_external
            .extend(f.filter_external.iter().cloned());
        self.filter_external_nodeports
            .extend(f.filter_external_nodeports.iter().cloned());
        if !f.nat_nodeports.is_empty() {
            self.chain(Table::Nat, NODEPORTS)
                .extend(f.nat_nodeports.iter().cloned());
        }
        if !f.filter_nodeports.is_empty() {
            self.chain(Table::Filter, NODEPORTS)
                .extend(f.filter_nodeports.iter().cloned());
        }
        if !f.proxy_firewall.is_empty() {
            self.chain(Table::Filter, PROXY_FIREWALL)
                .extend(f.proxy_firewall.iter().cloned());
        }
    }

    // === static chains and jumps from the built-in chains ===

    fn static_chains(&mut self, opts: &RenderOptions) {
        let new = "-m conntrack --ctstate NEW";
        for (builtin, target) in [
            ("INPUT", EXTERNAL_SERVICES),
            ("FORWARD", EXTERNAL_SERVICES),
            ("FORWARD", SERVICES),
            ("OUTPUT", SERVICES),
            ("INPUT", PROXY_FIREWALL),
            ("FORWARD", PROXY_FIREWALL),
            ("OUTPUT", PROXY_FIREWALL),
        ] {
            self.jump(Table::Filter, builtin, format!("{new} -j {target}"));
        }
        self.jump(Table::Filter, "INPUT", format!("-j {NODEPORTS}"));
        self.jump(Table::Filter, "FORWARD", format!("-j {FORWARD}"));
        self.jump(Table::Nat, "PREROUTING", format!("-j {SERVICES}"));
        self.jump(Table::Nat, "OUTPUT", format!("-j {SERVICES}"));
        self.jump(Table::Nat, "POSTROUTING", format!("-j {POSTROUTING}"));

        for c in [
            SERVICES,
            EXTERNAL_SERVICES,
            NODEPORTS,
            PROXY_FIREWALL,
            CANARY,
        ] {
            self.chain(Table::Filter, c);
        }
        for c in [SERVICES, NODEPORTS, CANARY] {
            self.chain(Table::Nat, c);
        }

        let mark = self.node.masquerade_mark();
        let forward = self.chain(Table::Filter, FORWARD);
        if !opts.tcp_be_liberal {
            // Out-of-window packets would otherwise reach the pod un-DNATed and be answered
            // with a RST (docs/semantics.md, rule 21).
            forward.push(
                RuleBuilder::new()
                    .comment("kproxy drop invalid conntrack state")
                    .raw("-m conntrack --ctstate INVALID")
                    .jump("DROP"),
            );
        }
        forward.push(
            RuleBuilder::new()
                .comment("kproxy forwarding rules")
                .raw(&format!("-m mark --mark {mark:#x}/{mark:#x}"))
                .jump("ACCEPT"),
        );
        forward.push(
            RuleBuilder::new()
                .comment("kproxy forwarding conntrack rule")
                .raw("-m conntrack --ctstate RELATED,ESTABLISHED")
                .jump("ACCEPT"),
        );

        *self.chain(Table::Nat, MARK_MASQ) =
            vec![RuleBuilder::new().jump(&format!("MARK --set-xmark {mark:#x}/{mark:#x}"))];
        *self.chain(Table::Nat, POSTROUTING) = vec![
            RuleBuilder::new()
                .raw(&format!("-m mark ! --mark {mark:#x}/{mark:#x}"))
                .jump("RETURN"),
            // Clear the mark so a packet that is NATed again (e.g. by another proxy) is not
            // masqueraded twice.
            RuleBuilder::new().jump(&format!("MARK --set-xmark {mark:#x}/0x0")),
            RuleBuilder::new()
                .comment("kproxy service traffic requiring SNAT")
                .jump("MASQUERADE --random-fully"),
        ];
    }
}

/// Renders one service port into its [`Fragment`].
struct ServiceWriter<'a> {
    family: IpFamily,
    node: &'a NodeSettings,
    /// The family's local-traffic detector; `None` writes no "from a pod?" rules at all.
    local: Option<LocalMatch<'a>>,
    frag: Fragment,
}

/// Adds the local-traffic detector's match to a rule, upstream's spellings: `-s CIDR`,
/// `-i BRIDGE` or `-i PREFIX+` for traffic from local pods (`local`), `! -s CIDR`, `! -i ...`
/// for everything else. In a chain reached from OUTPUT there is no input interface, so
/// `! -i` matches the node's own packets and `-i` never does.
fn detect_local(rule: RuleBuilder, m: LocalMatch<'_>, local: bool) -> RuleBuilder {
    match m {
        LocalMatch::SourceCidr(cidr) if local => rule.src(net(cidr)),
        LocalMatch::SourceCidr(cidr) => rule.not_src(net(cidr)),
        LocalMatch::Interface(name) => rule.in_iface(!local, name),
        LocalMatch::InterfacePrefix(prefix) => rule.in_iface(!local, format!("{prefix}+")),
    }
}

impl ServiceWriter<'_> {
    // === one service port ===

    fn service_port(mut self, sp: &ServicePort) -> Fragment {
        let family = self.family;
        let proto = sp.name.protocol;
        let name = sp.name.to_string();
        let svc_chain = service_chain(&sp.name);
        let svl_chain = service_local_chain(&sp.name);
        let ext_chain = external_chain(&sp.name);
        let fw_chain = firewall_chain(&sp.name);

        let has_endpoints = sp.endpoints.any;
        let cluster_eps = &sp.endpoints.cluster;
        let local_eps = &sp.endpoints.local;
        let externally_accessible = sp.has_external_frontends();
        let has_internal = !sp.internal_endpoints().is_empty();
        let has_external = !sp.external_endpoints().is_empty();

        let uses_cluster_chain = !cluster_eps.is_empty()
            && (sp.internal_policy == TrafficPolicy::Cluster || externally_accessible);
        let uses_local_chain = !local_eps.is_empty()
            && (sp.internal_policy == TrafficPolicy::Local
                || (sp.external_policy == TrafficPolicy::Local && externally_accessible));
        let uses_ext_chain = has_endpoints && externally_accessible;
        let uses_fw_chain = uses_ext_chain && !sp.source_ranges.is_empty();

        let internal_chain = match sp.internal_policy {
            TrafficPolicy::Cluster => &svc_chain,
            TrafficPolicy::Local => &svl_chain,
        };
        let external_policy_chain = match sp.external_policy {
            TrafficPolicy::Cluster => &svc_chain,
            TrafficPolicy::Local => &svl_chain,
        };
        let lb_chain = if uses_fw_chain { &fw_chain } else { &ext_chain };

        // What filter rules do when there is nothing to forward to: REJECT without any
        // endpoint, DROP when only the Local policy lacks endpoints (docs/semantics.md,
        // rules 5-7).
        let (internal_filter, internal_why) = if !has_endpoints {
            (rule::reject(family), "has no endpoints")
        } else {
            ("DROP", "has no local endpoints")
        };
        let external_filter = internal_filter;
        let external_why = internal_why;

        // --- ClusterIP ---
        if let Some(cip) = sp.cluster_ip {
            let base = RuleBuilder::new().dst(host(cip)).proto(proto);
            if has_internal {
                let r = base
                    .comment(&format!("{name} cluster IP"))
                    .dport(proto, sp.port)
                    .jump(internal_chain);
                self.frag.nat_dispatch.push((cip, r));
            } else {
                let r = base
                    .comment(&format!("{name} {internal_why}"))
                    .dport(proto, sp.port)
                    .jump(internal_filter);
                self.frag.filter_services.push((cip, r));
            }
        }

        // External destinations jump to the EXT chain whenever the service has endpoints at
        // all, even when the external policy has none: the EXT chain short-circuits pod and
        // node traffic to the Cluster endpoints (docs/semantics.md, rule 7). What falls through
        // it is not DNATed and meets the filter DROP/REJECT rules below, written when the
        // policy has no endpoints.

        // --- externalIPs ---
        for ip in &sp.external_ips {
            let base = RuleBuilder::new().dst(host(*ip)).proto(proto);
            if uses_ext_chain {
                let r = base
                    .clone()
                    .comment(&format!("{name} external IP"))
                    .dport(proto, sp.port)
                    .jump(&ext_chain);
                self.frag.nat_dispatch.push((*ip, r));
            }
            if !has_external {
                let r = base
                    .comment(&format!("{name} {external_why}"))
                    .dport(proto, sp.port)
                    .jump(external_filter);
                self.frag.filter_external.push((*ip, r));
            }
        }

        // --- LoadBalancer IPs ---
        for ip in &sp.load_balancer_ips {
            let base = RuleBuilder::new().dst(host(*ip)).proto(proto);
            if uses_ext_chain {
                let r = base
                    .clone()
                    .comment(&format!("{name} loadbalancer IP"))
                    .dport(proto, sp.port)
                    .jump(lb_chain);
                self.frag.nat_dispatch.push((*ip, r));
            }
            if uses_fw_chain {
                let r = base
                    .clone()
                    .comment(&format!("{name} traffic not accepted by {fw_chain}"))
                    .dport(proto, sp.port)
                    .jump("DROP");
                self.frag.proxy_firewall.push(r);
            }
            if !has_external {
                let r = base
                    .comment(&format!("{name} {external_why}"))
                    .dport(proto, sp.port)
                    .jump(external_filter);
                self.frag.filter_external.push((*ip, r));
            }
        }

        // --- NodePort ---
        if let Some(np) = sp.node_port {
            if uses_ext_chain {
                let r = RuleBuilder::new()
                    .proto(proto)
                    .comment(&name)
                    .dport(proto, np)
                    .jump(&ext_chain);
                self.frag.nat_nodeports.push(r);
            }
            if !has_external {
                let r = RuleBuilder::new()
                    .proto(proto)
                    .comment(&format!("{name} {external_why}"))
                    .raw("-m addrtype --dst-type LOCAL")
                    .dport(proto, np)
                    .jump(external_filter);
                self.frag.filter_external_nodeports.push(r);
            }
        }
        if let Some(hc) = sp.health_check_node_port {
            let r = RuleBuilder::new()
                .proto(kproxy_contract::Protocol::Tcp)
                .comment(&format!("{name} health check node port"))
                .dport(kproxy_contract::Protocol::Tcp, hc)
                .jump("ACCEPT");
            self.frag.filter_nodeports.push(r);
        }

        // --- per-service chains ---
        // ClusterIP masquerading heads the internal policy chain (SVC or SVL, as upstream's
        // internalTrafficChain): it applies whichever endpoints internal traffic may use.
        let mut internal_masq = Vec::new();
        if has_internal && let Some(cip) = sp.cluster_ip {
            let masq = RuleBuilder::new().dst(host(cip)).proto(proto);
            if self.node.masquerade_all {
                internal_masq.push(
                    masq.comment(&format!("{name} cluster IP"))
                        .dport(proto, sp.port)
                        .jump(MARK_MASQ),
                );
            } else if let Some(local) = self.local {
                // Traffic from outside the pod network is masqueraded so replies come back
                // through this node.
                internal_masq.push(
                    detect_local(masq, local, false)
                        .comment(&format!("{name} cluster IP"))
                        .dport(proto, sp.port)
                        .jump(MARK_MASQ),
                );
            }
        }
        let (mut svc_rules, mut svl_rules) = match sp.internal_policy {
            TrafficPolicy::Cluster => (internal_masq, Vec::new()),
            TrafficPolicy::Local => (Vec::new(), internal_masq),
        };
        if uses_cluster_chain {
            let mut rules = std::mem::take(&mut svc_rules);
            self.endpoint_rules(sp, cluster_eps, &mut rules);
            self.own(&svc_chain, rules);
        }
        if uses_local_chain {
            let mut rules = std::mem::take(&mut svl_rules);
            self.endpoint_rules(sp, local_eps, &mut rules);
            self.own(&svl_chain, rules);
        }
        if uses_ext_chain {
            let mut rules = Vec::new();
            if sp.external_policy == TrafficPolicy::Cluster {
                rules.push(
                    RuleBuilder::new()
                        .comment(&format!(
                            "masquerade traffic for {name} external destinations"
                        ))
                        .jump(MARK_MASQ),
                );
            } else {
                if let Some(local) = self.local {
                    rules.push(
                        detect_local(RuleBuilder::new(), local, true)
                            .comment(&format!("pod traffic for {name} external destinations"))
                            .jump(&svc_chain),
                    );
                }
                rules.push(
                    RuleBuilder::new()
                        .comment(&format!(
                            "masquerade LOCAL traffic for {name} external destinations"
                        ))
                        .raw("-m addrtype --src-type LOCAL")
                        .jump(MARK_MASQ),
                );
                rules.push(
                    RuleBuilder::new()
                        .comment(&format!(
                            "route LOCAL traffic for {name} external destinations"
                        ))
                        .raw("-m addrtype --src-type LOCAL")
                        .jump(&svc_chain),
                );
            }
            if has_external {
                rules.push(RuleBuilder::new().jump(external_policy_chain));
            }
            self.own(&ext_chain, rules);
        }
        if uses_fw_chain {
            let mut rules = Vec::new();
            for range in &sp.source_ranges {
                rules.push(
                    RuleBuilder::new()
                        .src(net(range))
                        .comment(&format!("{name} loadbalancer IP"))
                        .jump(&ext_chain),
                );
            }
            // If the node itself is inside an allowed range, traffic it sends to its own LB IPs
            // arrives with the LB IP as source (docs/semantics.md, rule 13).
            let node_allowed = self
                .node
                .node_ips
                .iter()
                .any(|ip| sp.source_ranges.iter().any(|r| r.contains(ip)));
            if node_allowed {
                for ip in &sp.load_balancer_ips {
                    rules.push(
                        RuleBuilder::new()
                            .src(host(*ip))
                            .comment(&format!("{name} loadbalancer IP"))
                            .jump(&ext_chain),
                    );
                }
            }
            rules.push(
                RuleBuilder::new()
                    .comment(&format!(
                        "other traffic to {name} will be dropped by {PROXY_FIREWALL}"
                    ))
                    .no_target(),
            );
            self.own(&fw_chain, rules);
        }

        // --- endpoint chains ---
        // Only endpoints that need more than a DNAT get a chain: local ones (hairpin
        // masquerade) and those of affinity services (`recent --set`). The rest are DNATed
        // straight from the service chain, which at 10,000 services x 10 remote endpoints saves
        // 100,000 chains, the dominant cost of an iptables-nft restore.
        let mut done = std::collections::BTreeSet::new();
        for ep in cluster_eps
            .iter()
            .filter(|_| uses_cluster_chain)
            .chain(local_eps.iter().filter(|_| uses_local_chain))
            .filter(|ep| needs_endpoint_chain(sp, ep))
        {
            let chain = names::endpoint_chain(&sp.name, ep);
            if !done.insert(chain.clone()) {
                continue;
            }
            let mut dnat = RuleBuilder::new().proto(proto).comment(&name);
            if sp.affinity.is_some() {
                dnat = dnat.raw(&rule::recent(family, &chain, RecentAction::Set));
            }
            let mut rules = Vec::new();
            if ep.is_local {
                // Hairpin: a pod reaching itself through the service must be masqueraded or the
                // reply never returns through the NAT. Only a local pod can be its own client.
                rules.push(
                    RuleBuilder::new()
                        .src(host(ep.ip))
                        .comment(&name)
                        .jump(MARK_MASQ),
                );
            }
            rules.push(
                dnat.raw(&format!("-m {proto}"))
                    .jump(&format!("DNAT --to-destination {}", dnat_target(ep))),
            );
            self.own(&chain, rules);
        }
        self.frag.owner = sp.name.to_string();
        self.frag
    }

    fn own(&mut self, chain: &str, rules: Vec<String>) {
        self.frag.chains.push((chain.to_string(), Arc::new(rules)));
    }

    /// Affinity checks, then the random cascade (rule i of n matches with probability
    /// 1/(n-i); the last one always matches).
    fn endpoint_rules(&self, sp: &ServicePort, eps: &[Endpoint], rules: &mut Vec<String>) {
        let name = sp.name.to_string();
        if let Some(aff) = sp.affinity {
            for ep in eps {
                let sep = names::endpoint_chain(&sp.name, ep);
                rules.push(
                    RuleBuilder::new()
                        .comment(&format!("{name} -> {}", endpoint_str(ep)))
                        .raw(&rule::recent(
                            self.family,
                            &sep,
                            RecentAction::Check {
                                seconds: aff.timeout.as_secs(),
                            },
                        ))
                        .jump(&sep),
                );
            }
        }
        let n = eps.len();
        let proto = sp.name.protocol;
        for (i, ep) in eps.iter().enumerate() {
            let comment = format!("{name} -> {}", endpoint_str(ep));
            if needs_endpoint_chain(sp, ep) {
                let mut r = RuleBuilder::new().comment(&comment);
                if i + 1 < n {
                    r = r.probability(n - i);
                }
                rules.push(r.jump(&names::endpoint_chain(&sp.name, ep)));
            } else {
                let mut r = RuleBuilder::new().proto(proto).comment(&comment);
                if i + 1 < n {
                    r = r.probability(n - i);
                }
                rules.push(
                    r.raw(&format!("-m {proto}"))
                        .jump(&format!("DNAT --to-destination {}", dnat_target(ep))),
                );
            }
        }
    }
}

impl FamilyWriter<'_> {
    // === dispatch chains ===

    fn finish(&mut self) {
        let family = self.family;
        // NodePorts: the last rule of nat KPROXY-SERVICES.
        let nodeport_rules: Vec<String> = match &self.node.node_port_addresses {
            NodePortAddresses::AllLocal => {
                let lo = match family {
                    IpFamily::V4 => "127.0.0.0/8",
                    IpFamily::V6 => "::1/128",
                };
                vec![
                    RuleBuilder::new()
                        .not_dst(lo)
                        .comment("kproxy service nodeports; NOTE: this must be the last rule in this chain")
                        .raw("-m addrtype --dst-type LOCAL")
                        .jump(NODEPORTS),
                ]
            }
            NodePortAddresses::Only(ips) => ips
                .iter()
                .filter(|ip| IpFamily::of(ip) == family)
                .map(|ip| {
                    RuleBuilder::new()
                        .dst(host(*ip))
                        .comment("kproxy service nodeports; NOTE: this must be the last rule in this chain")
                        .jump(NODEPORTS)
                })
                .collect(),
        };
        let nat = std::mem::take(&mut self.nat_dispatch);
        let filter_services = std::mem::take(&mut self.filter_services);
        let filter_external = std::mem::take(&mut self.filter_external);
        let filter_np = std::mem::take(&mut self.filter_external_nodeports);

        let tree = dispatch::build(SERVICES, names::SERVICES_TREE, family, nat);
        self.install_tree(Table::Nat, SERVICES, tree, nodeport_rules);
        let tree = dispatch::build(SERVICES, names::SERVICES_TREE, family, filter_services);
        self.install_tree(Table::Filter, SERVICES, tree, Vec::new());
        let tree = dispatch::build(EXTERNAL_SERVICES, "KPROXY-EXTS-", family, filter_external);
        self.install_tree(Table::Filter, EXTERNAL_SERVICES, tree, filter_np);
    }

    fn install_tree(
        &mut self,
        table: Table,
        root: &str,
        tree: BTreeMap<String, Vec<String>>,
        tail: Vec<String>,
    ) {
        for (chain, rules) in tree {
            self.chain(table, &chain).extend(rules);
        }
        self.chain(table, root).extend(tail);
    }
}

/// Whether an endpoint needs its own chain (see the endpoint-chain comment in `service_port`).
fn needs_endpoint_chain(sp: &ServicePort, ep: &Endpoint) -> bool {
    ep.is_local || sp.affinity.is_some()
}

/// `ip:port`, `[ip6]:port`.
fn dnat_target(ep: &Endpoint) -> String {
    match ep.ip {
        IpAddr::V4(v4) => format!("{v4}:{}", ep.port),
        IpAddr::V6(v6) => format!("[{v6}]:{}", ep.port),
    }
}

fn endpoint_str(ep: &Endpoint) -> String {
    std::net::SocketAddr::new(ep.ip, ep.port).to_string()
}
