//! Rulesets in upstream kube-proxy's layouts, rendered here from the same `ProxyState` and
//! applied with the same tools (`iptables-restore --noflush`, `nft -f`), so every kproxy figure
//! has an upstream-shaped comparison from the same run. Chain names come from a hash of the
//! service port (and endpoint), as upstream's do, so they are stable across states and an
//! incremental transaction can name exactly what changed.

use std::fmt::Write as _;

use kproxy_contract::{IpFamily, Protocol, ProxyState, ServicePort};

/// A stable 64-bit FNV-1a hash, printed as 16 hex digits (upstream: base32 of a SHA-256).
fn hash(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016X}")
}

fn proto(sp: &ServicePort) -> &'static str {
    match sp.name.protocol {
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
        Protocol::Tcp => "tcp",
    }
}

fn svc_id(sp: &ServicePort) -> String {
    hash(&[&sp.name.to_string()])
}

fn sep_id(sp: &ServicePort, ip: &str) -> String {
    hash(&[&sp.name.to_string(), ip])
}

/// The `statistic` match that gives endpoint `j` of `n` its share (upstream's probability
/// ladder: each rule takes 1/(n-j) of what reaches it; the last takes the rest).
fn share(j: usize, n: usize) -> String {
    if j + 1 < n {
        format!(
            "-m statistic --mode random --probability {:.10} ",
            1.0 / (n - j) as f64
        )
    } else {
        String::new()
    }
}

/// The `KUBE-SERVICES` jump of one service port.
fn iptables_dispatch(o: &mut String, sp: &ServicePort) {
    let (p, cip) = (proto(sp), sp.cluster_ip.unwrap_or_else(unspecified));
    let _ = writeln!(
        o,
        "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {p} -p {p} -d {cip} --dport {} -j KUBE-SVC-{}",
        sp.name,
        sp.port,
        svc_id(sp)
    );
}

fn unspecified() -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
}

/// One service port's chains (declarations into `chains`, rules into `rules`): a KUBE-SVC
/// chain with a probability ladder and a KUBE-SEP chain per endpoint (masquerade + DNAT).
fn iptables_service(chains: &mut String, rules: &mut String, sp: &ServicePort) {
    let (p, cip) = (proto(sp), sp.cluster_ip.unwrap_or_else(unspecified));
    let svc = format!("KUBE-SVC-{}", svc_id(sp));
    let _ = writeln!(chains, ":{svc} - [0:0]");
    let _ = writeln!(
        rules,
        "-A {svc} ! -s 10.244.0.0/16 -d {cip} -m {p} -p {p} --dport {} -j KUBE-MARK-MASQ",
        sp.port
    );
    let n = sp.endpoints.cluster.len();
    for (j, ep) in sp.endpoints.cluster.iter().enumerate() {
        let sep = format!("KUBE-SEP-{}", sep_id(sp, &ep.ip.to_string()));
        let _ = writeln!(chains, ":{sep} - [0:0]");
        let prob = share(j, n);
        let _ = writeln!(
            rules,
            "-A {svc} -m comment --comment \"{} -> {}\" {prob}-j {sep}",
            sp.name, ep.ip
        );
        let _ = writeln!(rules, "-A {sep} -s {}/32 -j KUBE-MARK-MASQ", ep.ip);
        let _ = writeln!(
            rules,
            "-A {sep} -m {p} -p {p} -j DNAT --to-destination {}:{}",
            ep.ip, ep.port
        );
    }
}

/// KUBE-SERVICES in full (upstream rewrites it on every sync).
fn iptables_services_chain(s: &ProxyState) -> String {
    let mut o = String::from(":KUBE-SERVICES - [0:0]\n");
    for sp in s.family(IpFamily::V4) {
        iptables_dispatch(&mut o, sp);
    }
    o
}

/// Upstream kube-proxy's iptables layout: linear KUBE-SERVICES (hooked from PREROUTING and
/// OUTPUT), a KUBE-SVC chain per service and a KUBE-SEP chain per endpoint.
pub(crate) fn iptables_full(s: &ProxyState) -> String {
    let mut chains = String::from("*nat\n:KUBE-MARK-MASQ - [0:0]\n");
    let mut rules = String::new();
    for sp in s.family(IpFamily::V4) {
        iptables_service(&mut chains, &mut rules, sp);
    }
    chains.push_str(&iptables_services_chain(s));
    chains.push_str(&rules);
    chains.push_str(
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\nCOMMIT\n",
    );
    chains
}

/// The rules any iptables layout needs, and nothing else: a DNAT rule per endpoint (iptables
/// has no other way to rewrite to one address of many), each matching its service's address,
/// protocol and port and taking its share by a `statistic` match, all in one chain, and no
/// masquerade rules. Not a working proxy (every packet walks the whole list): a floor for the
/// time `iptables-restore` needs to load these services in any layout.
pub(crate) fn iptables_floor(s: &ProxyState) -> String {
    floor(s, false)
}

/// [`iptables_floor`]'s rules in a chain per service port, each jumped to from one dispatch
/// chain by its address, protocol and port: the floor of a layout with per-service chains.
pub(crate) fn iptables_floor_chains(s: &ProxyState) -> String {
    floor(s, true)
}

fn floor(s: &ProxyState, chains: bool) -> String {
    let mut decl = String::from("*nat\n:KPROXY-FLOOR - [0:0]\n");
    let mut o = String::new();
    for sp in s.family(IpFamily::V4) {
        let (p, cip) = (proto(sp), sp.cluster_ip.unwrap_or_else(unspecified));
        let chain = if chains {
            let chain = format!("KPF-{}", svc_id(sp));
            let _ = writeln!(decl, ":{chain} - [0:0]");
            let _ = writeln!(
                o,
                "-A KPROXY-FLOOR -d {cip} -p {p} -m {p} --dport {} -j {chain}",
                sp.port
            );
            chain
        } else {
            "KPROXY-FLOOR".to_string()
        };
        let n = sp.endpoints.cluster.len();
        for (j, ep) in sp.endpoints.cluster.iter().enumerate() {
            let share = share(j, n);
            if chains {
                let _ = writeln!(
                    o,
                    "-A {chain} -p {p} -m {p} {share}-j DNAT --to-destination {}:{}",
                    ep.ip, ep.port
                );
            } else {
                let _ = writeln!(
                    o,
                    "-A {chain} -d {cip} -p {p} -m {p} --dport {} {share}-j DNAT --to-destination {}:{}",
                    sp.port, ep.ip, ep.port
                );
            }
        }
    }
    decl.push_str(&o);
    decl.push_str("COMMIT\n");
    decl
}

/// The chains one service port owns in upstream's iptables layout.
pub(crate) fn iptables_chains(sp: &ServicePort) -> Vec<String> {
    std::iter::once(format!("KUBE-SVC-{}", svc_id(sp)))
        .chain(
            sp.endpoints
                .cluster
                .iter()
                .map(|ep| format!("KUBE-SEP-{}", sep_id(sp, &ep.ip.to_string()))),
        )
        .collect()
}

/// Upstream's partial sync: KUBE-SERVICES rewritten in full, the chains of the service ports
/// in `write` rewritten (declaring a chain flushes it), the chains in `gone` flushed and
/// deleted.
pub(crate) fn iptables_partial(s: &ProxyState, write: &[&ServicePort], gone: &[String]) -> String {
    let mut chains = String::from("*nat\n");
    let mut rules = String::new();
    for sp in write {
        iptables_service(&mut chains, &mut rules, sp);
    }
    for chain in gone {
        let _ = writeln!(chains, ":{chain} - [0:0]");
    }
    chains.push_str(&iptables_services_chain(s));
    chains.push_str(&rules);
    for chain in gone {
        let _ = writeln!(chains, "-X {chain}");
    }
    chains.push_str("COMMIT\n");
    chains
}

const T: &str = "ip kube-proxy";

/// One service port in upstream's nftables layout: a chain per endpoint, a service chain with
/// an anonymous `numgen random mod N vmap`, and an element of the `service-ips` map.
fn nft_service(o: &mut String, sp: &ServicePort) {
    let id = svc_id(sp);
    let svc = format!("service-{id}");
    let _ = writeln!(o, "add chain {T} {svc}");
    let mut vmap = Vec::new();
    for (j, ep) in sp.endpoints.cluster.iter().enumerate() {
        let epc = format!("endpoint-{}", sep_id(sp, &ep.ip.to_string()));
        let _ = writeln!(
            o,
            "add chain {T} {epc}\nadd rule {T} {epc} ip saddr {} meta mark set meta mark | 0x4000\nadd rule {T} {epc} meta l4proto {} dnat to {}:{}",
            ep.ip,
            proto(sp),
            ep.ip,
            ep.port
        );
        vmap.push(format!("{j} : goto {epc}"));
    }
    if !vmap.is_empty() {
        let _ = writeln!(
            o,
            "add rule {T} {svc} numgen random mod {} vmap {{ {} }}",
            vmap.len(),
            vmap.join(", ")
        );
    }
    let _ = writeln!(
        o,
        "add element {T} service-ips {{ {} . {} . {} : goto {svc} }}",
        sp.cluster_ip.unwrap_or_else(unspecified),
        proto(sp),
        sp.port
    );
}

/// Upstream kube-proxy's nftables layout, hooked from prerouting and output.
pub(crate) fn nft_full(s: &ProxyState) -> String {
    let mut o = format!(
        "add table {T}\n\
         add chain {T} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
         add chain {T} nat-output {{ type nat hook output priority -100 ; }}\n\
         add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}\n\
         add rule {T} nat-prerouting ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule {T} nat-output ip daddr . meta l4proto . th dport vmap @service-ips\n"
    );
    for sp in s.family(IpFamily::V4) {
        nft_service(&mut o, sp);
    }
    o
}

/// Removes one service port (its element, its chains) in one transaction's text.
fn nft_remove(o: &mut String, sp: &ServicePort, keep_element: bool) {
    let svc = format!("service-{}", svc_id(sp));
    if !keep_element {
        let _ = writeln!(
            o,
            "delete element {T} service-ips {{ {} . {} . {} }}",
            sp.cluster_ip.unwrap_or_else(unspecified),
            proto(sp),
            sp.port
        );
    }
    let _ = writeln!(o, "flush chain {T} {svc}");
    for ep in sp.endpoints.cluster.iter() {
        let epc = format!("endpoint-{}", sep_id(sp, &ep.ip.to_string()));
        let _ = writeln!(o, "flush chain {T} {epc}\ndelete chain {T} {epc}");
    }
    if !keep_element {
        let _ = writeln!(o, "delete chain {T} {svc}");
    }
}

/// Upstream's incremental nftables transaction for one changed service port: its service
/// chain flushed and refilled, its endpoint chains replaced.
pub(crate) fn nft_change(before: &ServicePort, after: &ServicePort) -> String {
    let mut o = String::new();
    nft_remove(&mut o, before, true);
    let mut add = String::new();
    nft_service(&mut add, after);
    // The element already exists (same service port): only chains and rules are re-added.
    for line in add.lines().filter(|l| !l.starts_with("add element")) {
        let _ = writeln!(o, "{line}");
    }
    o
}

/// Upstream's transaction adding one service port.
pub(crate) fn nft_add(sp: &ServicePort) -> String {
    let mut o = String::new();
    nft_service(&mut o, sp);
    o
}

/// Upstream's transaction removing one service port.
pub(crate) fn nft_delete(sp: &ServicePort) -> String {
    let mut o = String::new();
    nft_remove(&mut o, sp, false);
    o
}
