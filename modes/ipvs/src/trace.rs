//! `kproxy trace` over [`IpvsRules`]: the `kproxy-ipvs` netfilter table's chains (interpreted
//! by the shared nft evaluator, [`kproxy_tracer::nft`]) around the virtual-server
//! lookup IPVS does at LOCAL_IN (priority 98, after the filter chains) or LOCAL_OUT (-99, after
//! nat output). A virtual server's real servers become candidates with their weights' shares;
//! a virtual server without real servers is IPVS's own ICMP port unreachable
//! (docs/semantics.md, rule 5).
//!
//! `--live`: the virtual servers and service addresses are read back from the kernel, but the
//! netfilter table is not parsed back by this mode, so a live trace uses the rendered table's
//! chains and sets around the live virtual servers.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use kproxy_contract::IpFamily;
use kproxy_tracer::nft::{Branch, End, View, Walker};
use kproxy_tracer::{
    Candidate, Env, FrontendKind, Hop, Packet, Trace, Verdict, add_candidate, fold_branches,
};

use crate::model::{IpvsRules, NftTable, VsKey};
use crate::render::family_name;

/// The chains of the table's text, by name (the base-chain declaration line skipped), and
/// its sets' elements.
type SetList = BTreeMap<String, Vec<(String, Option<String>)>>;

fn chains_and_sets(table: &NftTable) -> (BTreeMap<String, Vec<String>>, SetList) {
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in table.head.lines() {
        let l = line.trim();
        if let Some(name) = l.strip_prefix("chain ").and_then(|r| r.strip_suffix(" {")) {
            current = Some(name.to_string());
            chains.insert(name.to_string(), Vec::new());
        } else if l == "}" {
            current = None;
        } else if let Some(c) = &current
            && !l.starts_with("type ")
            && !l.is_empty()
        {
            chains.entry(c.clone()).or_default().push(l.to_string());
        }
    }
    let sets = table
        .sets
        .iter()
        .map(|(name, elems)| {
            (
                (*name).to_string(),
                elems.iter().map(|e| (e.clone(), None)).collect(),
            )
        })
        .collect();
    (chains, sets)
}

/// Traces `pkt` through `rules`.
pub fn trace(rules: &IpvsRules, env: &Env, pkt: &Packet) -> Trace {
    let family = pkt.family();
    if IpFamily::of(&pkt.src) != family {
        return Trace::new(Verdict::Unknown {
            reason: "source and destination are of different families".into(),
        });
    }
    let Some(table) = rules.nft.as_ref().and_then(|t| t.get(&family)) else {
        return Trace::new(Verdict::Unknown {
            reason: "no kproxy-ipvs table for this family (a read-back state has none; trace with the desired state)".into(),
        });
    };
    let (chains, sets) = chains_and_sets(table);
    let v = View {
        chains,
        sets: &sets,
    };
    let mut w = Walker::new(&v, env, pkt, format!("{} kproxy-ipvs", family_name(family)));
    let local_dst = env.is_local(&pkt.dst) || rules.vips.contains(&pkt.dst);
    let mut outcomes: Vec<(Branch, End)> = Vec::new();
    let chains: &[&str] = if pkt.origin.is_local() {
        &["filter-output", "nat-output"]
    } else if local_dst {
        &["nat-prerouting", "filter-input"]
    } else {
        &["nat-prerouting"]
    };
    let live = w.base_chains(chains, vec![Branch::new()], &mut outcomes);
    let key = VsKey {
        addr: pkt.dst,
        protocol: pkt.proto,
        port: pkt.dst_port,
    };
    let vs = (local_dst || pkt.origin.is_local())
        .then(|| rules.services().get(&key))
        .flatten();
    let mut path = std::mem::take(&mut w.path);
    let mut after = Vec::new();
    let mut no_dest = false;
    match vs {
        None => after = live,
        Some(vs) => {
            let total: u32 = vs.dests.values().sum();
            path.push(Hop {
                depth: 0,
                object: format!("ipvs virtual server {key}"),
                detail: format!(
                    "scheduler {}{}, {} real server(s)",
                    vs.config.scheduler,
                    vs.config
                        .persistence
                        .map(|p| format!(", persistent {p}s"))
                        .unwrap_or_default(),
                    vs.dests.len()
                ),
            });
            if total == 0 {
                no_dest = !live.is_empty();
            }
            for b in live {
                for (rs, weight) in &vs.dests {
                    if *weight == 0 || total == 0 {
                        continue;
                    }
                    let share = f64::from(*weight) / f64::from(total);
                    path.push(Hop {
                        depth: 1,
                        object: format!("ipvs real server {rs}"),
                        detail: format!("weight {weight} (share {share:.4})"),
                    });
                    let mut nb = b.clone();
                    nb.prob *= share;
                    nb.dnat = Some(SocketAddr::new(rs.addr, rs.port));
                    after.push(nb);
                }
            }
        }
    }
    w.path = Vec::new();
    for b in after {
        for (b, end) in w.base_chain("nat-postrouting", b) {
            outcomes.push((b, end));
        }
    }
    path.append(&mut w.path);
    if let Some(reason) = w.error.take() {
        return Trace {
            verdict: Verdict::Unknown { reason },
            path,
        };
    }
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut refused = None;
    let mut plain = 0.0;
    let fe_set = |set: &str| {
        table
            .sets
            .get(set)
            .is_some_and(|s| s.contains(&format!("{} . {} . {}", pkt.dst, pkt.proto, pkt.dst_port)))
    };
    for (b, end) in &outcomes {
        match (end, b.dnat) {
            (End::Drop | End::Reject, _) => {
                let (_, _) = b.decided.clone().unwrap_or_default();
                refused = Some(if *end == End::Reject {
                    Verdict::Reject {
                        rule: 24,
                        reason: "no virtual server serves this port of a service address".into(),
                    }
                } else if fe_set("firewall")
                    && b.decided.is_some()
                    && !dropped_by_local_policy(&path)
                {
                    Verdict::Drop {
                        rule: 13,
                        reason: "source outside loadBalancerSourceRanges".into(),
                    }
                } else if fe_set("masq-cluster") {
                    Verdict::Drop {
                        rule: 6,
                        reason: "no local endpoints for internal traffic".into(),
                    }
                } else {
                    Verdict::Drop {
                        rule: 7,
                        reason: "no local endpoints for external traffic".into(),
                    }
                });
            }
            (_, Some(to)) => {
                let masquerade = *end == End::Masquerade;
                let weight = || {
                    vs.and_then(|vs| {
                        vs.dests
                            .get(&crate::model::RsKey {
                                addr: to.ip(),
                                port: to.port(),
                            })
                            .copied()
                    })
                };
                add_candidate(&mut candidates, to, masquerade, b.prob, weight);
            }
            _ => plain += b.prob,
        }
    }
    if refused.is_none() && candidates.is_empty() && no_dest {
        let verdict = Verdict::Reject {
            rule: 5,
            reason: "the virtual server has no real servers (IPVS answers port unreachable)".into(),
        };
        return Trace { verdict, path };
    }
    let verdict = fold_branches(refused, candidates, plain, |candidates| {
        Verdict::Forward {
            service: rules.owners.get(&key).map(|o| o.to_string()),
            frontend: if fe_set("masq-cluster") {
                Some(FrontendKind::ClusterIp)
            } else if !rules.vips.contains(&pkt.dst) {
                Some(FrontendKind::NodePort)
            } else if fe_set("firewall") {
                Some(FrontendKind::LoadBalancer)
            } else {
                // An externalIP or an LB IP without source ranges: the table cannot tell.
                None
            },
            candidates,
            affinity: vs.and_then(|v| v.config.persistence).map(u64::from),
        }
    });
    Trace { verdict, path }
}

/// Whether the drop came from the `@no-local-endpoints` rule (the last hop names it).
fn dropped_by_local_policy(path: &[Hop]) -> bool {
    path.iter()
        .rev()
        .find(|h| h.detail.ends_with(" drop"))
        .is_some_and(|h| h.detail.contains("@no-local-endpoints"))
}

#[cfg(test)]
mod tests;

impl<K: crate::kernel::IpvsKernel> kproxy_tracer::Traceable for crate::IpvsMode<K> {
    fn trace(&self, rules: &IpvsRules, env: &Env, packet: &Packet) -> Trace {
        trace(rules, env, packet)
    }

    fn facts_for(&self, local: &[std::net::IpAddr]) -> crate::LocalAddresses {
        crate::LocalAddresses(local.to_vec())
    }

    /// The kproxy-ipvs table is not read back (see the module documentation): the rendered one
    /// stands in for it.
    fn complete_live(&self, live: &mut IpvsRules, rendered: &IpvsRules) -> usize {
        live.nft = rendered.nft.clone();
        0
    }
}
