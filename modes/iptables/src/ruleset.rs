//! The rules kproxy owns, per family and table, and the parser for `iptables-save` output.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use kproxy_contract::IpFamily;

use crate::names;

/// An iptables table kproxy writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// Filtering: REJECT/DROP of services without endpoints, firewall, forward accepts.
    Filter,
    /// NAT: dispatch, DNAT to endpoints, masquerade.
    Nat,
}

impl Table {
    /// Every table kproxy writes, in restore order.
    pub const ALL: [Table; 2] = [Table::Filter, Table::Nat];

    /// The name iptables uses.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Filter => "filter",
            Self::Nat => "nat",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rule kproxy keeps in a built-in chain to reach its own chains, e.g.
/// `PREROUTING: -j KPROXY-SERVICES`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Jump {
    /// The built-in chain (PREROUTING, INPUT, ...).
    pub builtin: String,
    /// The rule body, canonical (`-m conntrack --ctstate NEW -j KPROXY-SERVICES`).
    pub rule: String,
}

/// One table's kproxy content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableRules {
    /// Chains kproxy owns, by name, each with its rule bodies (the text after `-A NAME `).
    /// Shared, so a render reuses an unchanged service's chains and the plan skips them by
    /// pointer (`Arc`'s equality checks the pointer first).
    pub chains: BTreeMap<String, Arc<Vec<String>>>,
    /// Jumps from built-in chains into kproxy's chains.
    pub jumps: BTreeSet<Jump>,
}

/// Everything kproxy owns in one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FamilyRules {
    /// Per table.
    pub tables: BTreeMap<Table, TableRules>,
}

/// Everything kproxy owns, plus who owns each per-service chain (for dry-run grouping only;
/// ignored by comparisons).
#[derive(Debug, Clone, Default)]
pub struct Ruleset {
    /// Per family.
    pub families: BTreeMap<IpFamily, FamilyRules>,
    /// Chain name → the service port it belongs to (`ns/name:port`).
    pub owners: BTreeMap<String, String>,
}

impl PartialEq for Ruleset {
    fn eq(&self, other: &Self) -> bool {
        self.families == other.families
    }
}

impl Ruleset {
    /// The table rules of one family, created empty if absent.
    pub fn table_mut(&mut self, family: IpFamily, table: Table) -> &mut TableRules {
        self.families
            .entry(family)
            .or_default()
            .tables
            .entry(table)
            .or_default()
    }

    /// The table rules of one family, if any.
    pub fn table(&self, family: IpFamily, table: Table) -> Option<&TableRules> {
        self.families.get(&family)?.tables.get(&table)
    }

    /// Total number of rules (chains' rules plus jumps).
    pub fn rule_count(&self) -> usize {
        self.families
            .values()
            .flat_map(|f| f.tables.values())
            .map(|t| t.chains.values().map(|r| r.len()).sum::<usize>() + t.jumps.len())
            .sum()
    }
}

/// Parses `iptables-save -t TABLE` output, keeping only what kproxy owns: `KPROXY-*` chains
/// with their rules, and rules in other chains that jump to a `KPROXY-*` chain.
pub fn parse_save(text: &str) -> TableRules {
    let mut out = TableRules::default();
    for line in text.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if names::is_owned(name) {
                out.chains.entry(name.to_string()).or_default();
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (chain, body) = rest.split_once(' ').unwrap_or((rest, ""));
            if names::is_owned(chain) {
                Arc::make_mut(out.chains.entry(chain.to_string()).or_default())
                    .push(body.to_string());
            } else if jumps_to_owned(body) {
                out.jumps.insert(Jump {
                    builtin: chain.to_string(),
                    rule: body.to_string(),
                });
            }
        }
    }
    out
}

fn jumps_to_owned(body: &str) -> bool {
    let mut words = body.split_whitespace();
    while let Some(w) = words.next() {
        if (w == "-j" || w == "-g") && words.next().is_some_and(names::is_owned) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_keeps_only_owned_objects() {
        let save = "\
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KPROXY-SERVICES - [0:0]
:KPROXY-EMPTY - [0:0]
-A PREROUTING -j KUBE-SERVICES
-A PREROUTING -m conntrack --ctstate NEW -j KPROXY-SERVICES
-A KUBE-SERVICES -j RETURN
-A KPROXY-SERVICES -d 10.0.0.1/32 -j KPROXY-SVC-X
COMMIT
";
        let t = parse_save(save);
        assert_eq!(t.chains.len(), 2);
        assert!(t.chains["KPROXY-EMPTY"].is_empty());
        assert_eq!(
            *t.chains["KPROXY-SERVICES"],
            vec!["-d 10.0.0.1/32 -j KPROXY-SVC-X"]
        );
        assert_eq!(t.jumps.len(), 1);
        assert_eq!(
            t.jumps.iter().next().map(|j| j.builtin.as_str()),
            Some("PREROUTING")
        );
    }
}
