//! `kproxy trace` over an [`NftRuleset`]: the hooks a new connection crosses, in priority
//! order (filter -110 firewall, nat -100 DNAT, filter 0, nat postrouting 100), interpreted by
//! the shared nft evaluator ([`kproxy_tracer::nft`]) over this table's chains, sets
//! and maps.
//!
//! `--live`: `nft -j` gives rules back by identity only (their comment, see
//! [`crate::model::Rule`]), so [`resolve_live_rules`] fills in each live rule's text from a
//! rendered ruleset with the same identity (the identity is a hash of the text, so a match
//! means the same rule). Every element of every set and map is the kernel's own. A live rule
//! no rendering explains makes the trace [`Verdict::Unknown`].

use std::collections::HashMap;

use kproxy_contract::IpFamily;
use kproxy_tracer::nft::{Branch, End, Sets, View, Walker};
use kproxy_tracer::{
    Candidate, Env, FrontendKind, Hop, Packet, Trace, Verdict, add_candidate, fold_branches,
};

use crate::model::{NftRuleset, Table, family_name};

/// Replaces the placeholder text of live rules with the text of the rendered rule of the same
/// identity. Returns how many rules stayed unexplained.
pub fn resolve_live_rules(live: &mut NftRuleset, rendered: &NftRuleset) -> usize {
    let known: HashMap<&str, &str> = rendered
        .families
        .values()
        .flat_map(|t| t.chains.values())
        .flat_map(|c| c.rules.iter())
        .map(|r| (r.id.as_str(), r.text.as_str()))
        .collect();
    let mut unknown = 0;
    for table in live.families.values_mut() {
        let names: Vec<String> = table.chains.keys().cloned().collect();
        for name in names {
            let Some(chain) = table.chains.get_mut(&name) else {
                continue;
            };
            for rule in &mut chain.rules {
                match known.get(rule.id.as_str()) {
                    Some(text) => rule.text = (*text).to_string(),
                    None => unknown += 1,
                }
            }
        }
    }
    unknown
}

/// The table's sets for the evaluator: exact lookups through [`crate::model::Elements::get`]
/// (no copy of a 10,000-service table's ~10^5 elements per trace).
struct TableSets<'a>(&'a Table);

impl Sets for TableSets<'_> {
    fn exists(&self, set: &str) -> bool {
        self.0.sets.contains_key(set)
    }
    fn exact(&self, set: &str, key: &str) -> Option<Option<String>> {
        let value = self.0.sets.get(set)?.elements.get(key)?;
        Some(value.as_deref().map(String::from))
    }
    fn ranged(&self, set: &str) -> Vec<(String, Option<String>)> {
        let Some(s) = self.0.sets.get(set) else {
            return Vec::new();
        };
        // Only interval sets hold prefixes (`service-cidrs`, `firewall-allow`).
        if !s.signature.contains("interval") && !s.decl.contains("interval") {
            return Vec::new();
        }
        s.elements
            .iter()
            .filter(|(k, _)| k.contains('/') || k.contains('-'))
            .map(|(k, v)| (k.to_string(), v.as_deref().map(String::from)))
            .collect()
    }
}

fn view<'a>(table: &Table, sets: &'a TableSets<'a>) -> View<'a> {
    View {
        chains: table
            .chains
            .iter()
            .map(|(n, c)| (n.clone(), c.rules.iter().map(|r| r.text.clone()).collect()))
            .collect(),
        sets,
    }
}

/// Traces `pkt` through `rules`.
pub fn trace(rules: &NftRuleset, env: &Env, pkt: &Packet) -> Trace {
    let family = pkt.family();
    if IpFamily::of(&pkt.src) != family {
        return Trace::new(Verdict::Unknown {
            reason: "source and destination are of different families".into(),
        });
    }
    let Some(table) = rules.families.get(&family) else {
        return Trace::new(Verdict::NotService);
    };
    if let Some(r) = table
        .chains
        .values()
        .flat_map(|c| &c.rules)
        .find(|r| r.text.starts_with("<rule "))
    {
        return Trace::new(Verdict::Unknown {
            reason: format!(
                "live rule {} is not one kproxy renders for this configuration",
                r.id
            ),
        });
    }
    let sets = TableSets(table);
    let v = view(table, &sets);
    let mut w = Walker::new(&v, env, pkt, format!("{} kproxy", family_name(family)));
    let local = pkt.origin.is_local();
    // Hooks before routing, in priority order.
    let pre: &[&str] = if local {
        &["filter-output-pre-dnat", "nat-output", "filter-output"]
    } else {
        &["filter-prerouting-pre-dnat", "nat-prerouting"]
    };
    let mut outcomes: Vec<(Branch, End)> = Vec::new();
    let live = w.base_chains(pre, vec![Branch::new()], &mut outcomes);
    // After routing: input if the (DNATed) destination is local, else forward.
    let mut after = Vec::new();
    for b in live {
        let dst = b.dnat.map_or(pkt.dst, |d| d.ip());
        w.path.push(Hop {
            depth: 0,
            object: "after routing".into(),
            detail: match b.dnat {
                Some(to) => format!("branch p={:.4}: DNAT to {to}", b.prob),
                None => format!("branch p={:.4}: not DNATed", b.prob),
            },
        });
        let chains: &[&str] = if env.is_local(&dst) {
            &["filter-input"]
        } else if local {
            &[]
        } else {
            &["filter-forward"]
        };
        after.extend(w.base_chains(chains, vec![b], &mut outcomes));
    }
    for b in after {
        for (b, end) in w.base_chain("nat-postrouting", b) {
            outcomes.push((b, end));
        }
    }
    let path = std::mem::take(&mut w.path);
    let verdict = match w.error.take() {
        Some(reason) => Verdict::Unknown { reason },
        None => verdict(rules, table, pkt, outcomes),
    };
    Trace { verdict, path }
}

fn verdict(
    rules: &NftRuleset,
    table: &Table,
    pkt: &Packet,
    outcomes: Vec<(Branch, End)>,
) -> Verdict {
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut refused = None;
    let mut plain = 0.0;
    let (mut service, mut frontend, mut affinity) = (None, None, None);
    let cluster_ip = table
        .sets
        .get("cluster-ips")
        .is_some_and(|s| s.elements.contains_key(&pkt.dst.to_string()));
    for (b, end) in &outcomes {
        match (end, b.dnat) {
            (End::Drop | End::Reject, _) => {
                let (chain, map) = b.decided.clone().unwrap_or_default();
                let reject = *end == End::Reject;
                let (rule, reason) = match (chain.as_str(), map.as_deref()) {
                    (_, Some("no-endpoint-services" | "no-endpoint-nodeports")) if reject => {
                        (5, "the service has no endpoints".to_string())
                    }
                    (_, Some("no-endpoint-services")) if cluster_ip => {
                        (6, "no local endpoints for internal traffic".to_string())
                    }
                    (_, Some("no-endpoint-services" | "no-endpoint-nodeports")) => {
                        (7, "no local endpoints for external traffic".to_string())
                    }
                    ("firewall-check", _) => {
                        (13, "source outside loadBalancerSourceRanges".to_string())
                    }
                    ("cluster-ips-check", _) if reject => {
                        (24, "no service uses this port of the ClusterIP".to_string())
                    }
                    ("cluster-ips-check", _) => {
                        (24, "unallocated address in a service CIDR".to_string())
                    }
                    (c, _) => (0, format!("in chain {c}")),
                };
                let reason = format!(
                    "{reason} (chain {chain}{})",
                    map.map(|m| format!(", map {m}")).unwrap_or_default()
                );
                refused = Some(if reject {
                    Verdict::Reject { rule, reason }
                } else {
                    Verdict::Drop { rule, reason }
                });
            }
            (_, Some(to)) => {
                let masquerade = *end == End::Masquerade;
                add_candidate(&mut candidates, to, masquerade, b.prob, || None);
                for (map, key) in &b.dispatched {
                    if service.is_none() {
                        service = rules.owners.get(key).cloned();
                    }
                    if frontend.is_none() {
                        frontend = match map.as_str() {
                            "service-nodeports" | "nodeports-short-circuit" => {
                                Some(FrontendKind::NodePort)
                            }
                            "service-ips" | "service-ips-short-circuit" if cluster_ip => {
                                Some(FrontendKind::ClusterIp)
                            }
                            "service-ips" | "service-ips-short-circuit"
                                if table
                                    .sets
                                    .get("firewall-ips")
                                    .is_some_and(|s| s.elements.contains_key(key)) =>
                            {
                                Some(FrontendKind::LoadBalancer)
                            }
                            _ => None,
                        };
                    }
                }
                if let Some(set) = b.affinity_sets.first() {
                    affinity = affinity
                        .or_else(|| table.sets.get(set).and_then(|s| timeout(&s.signature)));
                }
            }
            _ => plain += b.prob,
        }
    }
    fold_branches(refused, candidates, plain, |candidates| Verdict::Forward {
        service,
        frontend,
        candidates,
        affinity,
    })
}

/// The timeout of an affinity set's signature (`ipv4_addr flags timeout timeout 600`).
fn timeout(signature: &str) -> Option<u64> {
    let mut w = signature.split_whitespace().rev();
    let n = w.next()?.trim_end_matches('s').parse().ok()?;
    (w.next()? == "timeout").then_some(n)
}

#[cfg(test)]
mod tests;

impl<K: crate::NftKernel> kproxy_tracer::Traceable for crate::NftablesMode<K> {
    fn trace(&self, rules: &NftRuleset, env: &Env, packet: &Packet) -> Trace {
        trace(rules, env, packet)
    }

    fn complete_live(&self, live: &mut NftRuleset, rendered: &NftRuleset) -> usize {
        resolve_live_rules(live, rendered)
    }
}
