//! An in-memory nftables that applies a schedule's transactions (`nft -f` scripts and netlink
//! element batches) the way the kernel applies each: all of it or nothing, with errors for references to missing chains and sets, duplicate
//! objects, and deleting what is still referenced. It also models an nft 1.0.6 limitation (see
//! [`typeof_conflict`]): a rule added after the `typeof` map it uses was created must agree with
//! the map's transport protocol.

use std::collections::BTreeMap;

use kproxy_contract::{Cause, IpFamily};

use crate::kernel::NftKernel;
use crate::model::{Chain, Table};
use crate::netlink::NetlinkError;
use crate::plan::NftPlan;
use crate::steps::{StepKernel, elements_text, netlink_elements};

/// The fake kernel.
#[derive(Debug, Clone, Default)]
pub struct FakeNft {
    tables: BTreeMap<IpFamily, Table>,
    /// Transactions applied successfully.
    pub applied: usize,
    /// Of which `nft -f` scripts.
    pub nft_transactions: usize,
    /// Of which netlink element batches.
    pub netlink_batches: usize,
    /// Every transaction applied, in order, as its schedule prints it ([`crate::steps::Schedule::text`]).
    pub transactions: Vec<String>,
    /// When set, the next apply fails with this message and changes nothing.
    pub fail_next: Option<String>,
}

impl FakeNft {
    /// An empty kernel.
    pub fn new() -> Self {
        Self::default()
    }

    /// Deletes a family's table behind kproxy's back (an administrator's `nft flush ruleset`).
    pub fn remove_table(&mut self, family: IpFamily) {
        self.tables.remove(&family);
    }

    /// A table, if present.
    pub fn table(&self, family: IpFamily) -> Option<&Table> {
        self.tables.get(&family)
    }

    fn err(msg: String) -> Cause {
        Cause::Failed {
            program: "fake-nft".into(),
            status: "exit status: 1".into(),
            stderr: msg,
        }
    }

    fn apply_to(tables: &mut BTreeMap<IpFamily, Table>, plan: &NftPlan) -> Result<(), String> {
        for (family, fp) in &plan.families {
            if fp.delete_table {
                tables.remove(family);
                continue;
            }
            if fp.recreate {
                tables.remove(family);
            }
            let t = tables.entry(*family).or_default();
            let existing: Vec<String> = t.sets.keys().cloned().collect();
            for (name, set) in &fp.add_sets {
                if t.sets.contains_key(name) {
                    return Err(format!("set {name} exists"));
                }
                t.sets.insert(name.clone(), set.clone());
            }
            for (name, chain) in &fp.add_chains {
                t.chains.entry(name.clone()).or_insert_with(|| Chain {
                    base: chain.base.clone(),
                    rules: vec![],
                });
            }
            for (set, elems) in &fp.delete_elements {
                let s = t.sets.get_mut(set).ok_or_else(|| format!("no set {set}"))?;
                for (k, _) in elems {
                    s.elements
                        .remove(k)
                        .ok_or_else(|| format!("{set}: no element {k}"))?;
                }
            }
            for (name, chain, _) in &fp.write_chains {
                let c = t
                    .chains
                    .get_mut(name)
                    .ok_or_else(|| format!("no chain {name}"))?;
                for r in &chain.rules {
                    for set in r
                        .text
                        .split_whitespace()
                        .filter_map(|w| w.strip_prefix('@'))
                    {
                        if existing.iter().any(|e| e == set)
                            && let Some(s) = t.sets.get(set)
                            && let Some(e) = typeof_conflict(&r.text, &s.decl)
                        {
                            return Err(format!("chain {name}: @{set}: {e}"));
                        }
                    }
                }
                c.rules = chain.rules.clone();
            }
            for (set, elems) in &fp.add_elements {
                let s = t.sets.get_mut(set).ok_or_else(|| format!("no set {set}"))?;
                for (k, v) in elems {
                    if s.elements.insert_shared(k.clone(), v.clone()).is_some() {
                        return Err(format!("{set}: element {k} exists"));
                    }
                }
            }
            for name in &fp.delete_chains {
                t.chains
                    .remove(name)
                    .ok_or_else(|| format!("no chain {name}"))?;
            }
            for (name, _) in &fp.delete_sets {
                t.sets
                    .remove(name)
                    .ok_or_else(|| format!("no set {name}"))?;
            }
            check_references(t)?;
        }
        Ok(())
    }
}

/// nft 1.0.6 rebuilds a `typeof` map's fields from the kernel's metadata when a later
/// transaction adds a rule using the map, and evaluates them in the rule's protocol context: a
/// `th dport` field always conflicts ("conflicting protocols specified: tcp vs. th"), a
/// `udp dport` field conflicts with a rule matching `meta l4proto tcp`. (Measured with nft 1.0.6;
/// a map created in the same transaction as the rule is not affected.)
fn typeof_conflict(rule: &str, decl: &str) -> Option<String> {
    let fields = decl.strip_prefix("typeof ")?;
    let words: Vec<&str> = rule.split_whitespace().collect();
    let rule_proto = words
        .windows(3)
        .find(|w| w[0] == "meta" && w[1] == "l4proto")
        .map_or("ip", |w| w[2]);
    let fields: Vec<&str> = fields.split_whitespace().collect();
    fields.windows(2).find_map(|w| match (w[0], w[1]) {
        ("th", "dport") => Some(format!(
            "conflicting protocols specified: {rule_proto} vs. th"
        )),
        (p @ ("tcp" | "udp" | "sctp"), "dport") if p != rule_proto => Some(format!(
            "conflicting protocols specified: {rule_proto} vs. {p}"
        )),
        _ => None,
    })
}

/// Every `goto`/`jump` target and `@set` a rule or element names must exist.
fn check_references(t: &Table) -> Result<(), String> {
    let check_word = |w: &str| -> Result<(), String> {
        if let Some(set) = w.strip_prefix('@')
            && !t.sets.contains_key(set)
        {
            return Err(format!("reference to missing set {set}"));
        }
        Ok(())
    };
    for (name, c) in &t.chains {
        for r in &c.rules {
            let words: Vec<&str> = r.text.split_whitespace().collect();
            for pair in words.windows(2) {
                if (pair[0] == "goto" || pair[0] == "jump") && !t.chains.contains_key(pair[1]) {
                    return Err(format!(
                        "chain {name}: {} to missing chain {}",
                        pair[0], pair[1]
                    ));
                }
            }
            for w in words {
                check_word(w)?;
            }
        }
    }
    for (set, s) in &t.sets {
        for v in s.elements.values().flatten() {
            if let Some(target) = v.strip_prefix("goto ").or_else(|| v.strip_prefix("jump "))
                && !t.chains.contains_key(target)
            {
                return Err(format!("{set}: element points to missing chain {target}"));
            }
        }
    }
    Ok(())
}

impl NftKernel for FakeNft {
    fn list(&mut self, family: IpFamily) -> Result<Option<Table>, Cause> {
        Ok(self.tables.get(&family).cloned())
    }

    fn table_exists(&mut self, family: IpFamily) -> Result<bool, Cause> {
        Ok(self.tables.contains_key(&family))
    }
}

/// Each step is a transaction of its own, checked as the kernel checks one: a schedule in the
/// wrong order (an element leading to a chain a later step creates, a chain deleted while an
/// element still leads to it) fails here.
impl StepKernel for FakeNft {
    fn nft(&mut self, plan: &NftPlan) -> Result<(), Cause> {
        self.transaction(plan, Transaction::Nft).map_err(Self::err)
    }

    fn elements(&mut self, plan: &NftPlan) -> Result<(), NetlinkError> {
        self.transaction(&netlink_elements(plan), Transaction::Netlink)
            .map_err(|msg| NetlinkError::Rejected {
                what: format!("apply a batch ({msg})"),
                errno: 22,
                source: std::io::Error::from_raw_os_error(22),
                detail: String::new(),
                missing: None,
            })
    }
}

/// Which kind of transaction the fake is applying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transaction {
    Nft,
    Netlink,
}

impl FakeNft {
    fn transaction(&mut self, plan: &NftPlan, kind: Transaction) -> Result<(), String> {
        if let Some(msg) = self.fail_next.take() {
            return Err(msg);
        }
        if kind == Transaction::Netlink
            && plan.families.keys().any(|f| !self.tables.contains_key(f))
        {
            return Err("a netlink batch for a table that does not exist".into());
        }
        let mut copy = self.tables.clone();
        Self::apply_to(&mut copy, plan)?;
        self.tables = copy;
        self.applied += 1;
        let text = match kind {
            Transaction::Nft => {
                self.nft_transactions += 1;
                plan.script()
            }
            Transaction::Netlink => {
                self.netlink_batches += 1;
                elements_text(plan)
            }
        };
        self.transactions.push(text);
        Ok(())
    }
}
