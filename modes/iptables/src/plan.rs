//! The difference between two rulesets as one `iptables-restore --noflush` payload per family.
//!
//! Only chains whose rules differ are written, so a change to one service rewrites that
//! service's chains and the one dispatch leaf that points to it, whatever the cluster's size.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use kproxy_contract::{IpFamily, PlanStats};

use crate::ruleset::{Jump, Ruleset, Table, TableRules};

/// A chain to (re)write: declared (which creates or flushes it), then filled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainWrite {
    /// Chain name.
    pub name: String,
    /// Its new rules.
    pub rules: Arc<Vec<String>>,
    /// Its rules before, when it existed.
    pub old: Option<Arc<Vec<String>>>,
}

/// The changes to one table of one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TablePlan {
    /// Chains to create or rewrite.
    pub write: Vec<ChainWrite>,
    /// Chains to flush and delete, with the rules they held.
    pub delete: Vec<(String, Arc<Vec<String>>)>,
    /// Jumps to insert into built-in chains.
    pub add_jumps: Vec<Jump>,
    /// Jumps to remove from built-in chains.
    pub del_jumps: Vec<Jump>,
}

impl TablePlan {
    fn is_empty(&self) -> bool {
        self.write.is_empty()
            && self.delete.is_empty()
            && self.add_jumps.is_empty()
            && self.del_jumps.is_empty()
    }
}

/// One sync's change: per family, per table.
#[derive(Debug, Clone, Default)]
pub struct IptablesPlan {
    /// The changes, per family and table.
    pub tables: BTreeMap<(IpFamily, Table), TablePlan>,
    /// Chain → service port, for grouping the printed diff.
    pub owners: BTreeMap<String, String>,
}

/// Computes the plan that turns `live` into `desired`.
pub fn plan(live: &Ruleset, desired: &Ruleset) -> IptablesPlan {
    let mut out = IptablesPlan {
        owners: desired.owners.clone(),
        ..Default::default()
    };
    let empty = TableRules::default();
    let keys: BTreeSet<(IpFamily, Table)> = live
        .families
        .iter()
        .chain(desired.families.iter())
        .flat_map(|(f, fr)| fr.tables.keys().map(move |t| (*f, *t)))
        .collect();
    for (family, table) in keys {
        let old = live.table(family, table).unwrap_or(&empty);
        let new = desired.table(family, table).unwrap_or(&empty);
        let tp = plan_table(old, new);
        if !tp.is_empty() {
            out.tables.insert((family, table), tp);
        }
    }
    out
}

fn plan_table(old: &TableRules, new: &TableRules) -> TablePlan {
    let mut tp = TablePlan::default();
    for (name, rules) in &new.chains {
        match old.chains.get(name) {
            Some(existing) if existing == rules => {}
            existing => tp.write.push(ChainWrite {
                name: name.clone(),
                rules: rules.clone(),
                old: existing.cloned(),
            }),
        }
    }
    for (name, rules) in &old.chains {
        if !new.chains.contains_key(name) {
            tp.delete.push((name.clone(), rules.clone()));
        }
    }
    tp.add_jumps = new.jumps.difference(&old.jumps).cloned().collect();
    tp.del_jumps = old.jumps.difference(&new.jumps).cloned().collect();
    tp
}

impl IptablesPlan {
    /// The `iptables-restore --noflush` input for one family, or `None` if nothing changes.
    ///
    /// Order matters: declaring a chain (`:NAME`) creates or flushes it, so every rewritten or
    /// doomed chain is declared first; rules are appended; stale jumps are removed before the
    /// chains they point to are deleted; new jumps are inserted last, when their targets exist.
    ///
    /// Written twice, first only counted, so the string is allocated once at its size. The
    /// apply does not hold it at all: it streams a [`RestoreInput`] to the tool.
    pub fn restore_payload(&self, family: IpFamily) -> Option<String> {
        let input = self.restore_input(family)?;
        let mut out = String::with_capacity(input.len);
        self.write_restore(family, &mut out)
            .expect("writing to a String never fails");
        Some(out)
    }

    /// The same input as [`Self::restore_payload`], written to the tool's pipe as it is
    /// produced: a first sync at 10,000 services is 16 MiB of text, which as one string was
    /// the largest block at the process's peak (heap profile, issue #17). `None` if nothing
    /// changes.
    pub fn restore_input(&self, family: IpFamily) -> Option<RestoreInput<'_>> {
        let mut size = ByteCount(0);
        self.write_restore(family, &mut size)
            .expect("counting never fails");
        (size.0 > 0).then_some(RestoreInput {
            plan: self,
            family,
            len: size.0,
        })
    }

    fn write_restore(&self, family: IpFamily, out: &mut impl fmt::Write) -> fmt::Result {
        for ((f, table), tp) in &self.tables {
            if *f != family {
                continue;
            }
            writeln!(out, "*{table}")?;
            for w in &tp.write {
                writeln!(out, ":{} - [0:0]", w.name)?;
            }
            for (name, _) in &tp.delete {
                writeln!(out, ":{name} - [0:0]")?;
            }
            for w in &tp.write {
                for r in w.rules.iter() {
                    writeln!(out, "-A {} {r}", w.name)?;
                }
            }
            for j in &tp.del_jumps {
                writeln!(out, "-D {} {}", j.builtin, j.rule)?;
            }
            for (name, _) in &tp.delete {
                writeln!(out, "-X {name}")?;
            }
            for j in &tp.add_jumps {
                writeln!(out, "-I {} {}", j.builtin, j.rule)?;
            }
            out.write_str("COMMIT\n")?;
        }
        Ok(())
    }

    /// The families this plan touches.
    pub fn families(&self) -> BTreeSet<IpFamily> {
        self.tables.keys().map(|(f, _)| *f).collect()
    }
}

/// One family's `iptables-restore` input, written on demand (see
/// [`IptablesPlan::restore_input`]).
#[derive(Debug, Clone, Copy)]
pub struct RestoreInput<'a> {
    plan: &'a IptablesPlan,
    family: IpFamily,
    len: usize,
}

impl kproxy_contract::command::Input for RestoreInput<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn write_to(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let mut adapter = IoWrite { out, error: None };
        match self.plan.write_restore(self.family, &mut adapter) {
            Ok(()) => Ok(()),
            Err(fmt::Error) => Err(adapter
                .error
                .unwrap_or_else(|| std::io::Error::other("formatting failed"))),
        }
    }
}

/// `fmt::Write` onto an `io::Write`, keeping the I/O error that stopped it.
struct IoWrite<'w> {
    out: &'w mut dyn std::io::Write,
    error: Option<std::io::Error>,
}

impl fmt::Write for IoWrite<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.out.write_all(s.as_bytes()).map_err(|e| {
            self.error = Some(e);
            fmt::Error
        })
    }
}

/// A `fmt::Write` that only counts the bytes written to it.
struct ByteCount(usize);

impl fmt::Write for ByteCount {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

impl kproxy_contract::Plan for IptablesPlan {
    fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    fn stats(&self) -> PlanStats {
        let mut s = PlanStats::default();
        for tp in self.tables.values() {
            s.containers_touched += tp.write.len() + tp.delete.len();
            s.added += tp.add_jumps.len();
            s.removed += tp.del_jumps.len();
            for w in &tp.write {
                let (added, removed) =
                    line_diff(w.old.as_deref().map_or(&[][..], Vec::as_slice), &w.rules);
                s.added += added.len();
                s.removed += removed.len();
            }
            s.removed += tp.delete.iter().map(|(_, r)| r.len()).sum::<usize>();
        }
        s
    }
}

/// Rules only in `new` and rules only in `old`, each in its own order.
fn line_diff<'a>(old: &'a [String], new: &'a [String]) -> (Vec<&'a String>, Vec<&'a String>) {
    let old_set: BTreeSet<&String> = old.iter().collect();
    let new_set: BTreeSet<&String> = new.iter().collect();
    (
        new.iter().filter(|r| !old_set.contains(r)).collect(),
        old.iter().filter(|r| !new_set.contains(r)).collect(),
    )
}

impl fmt::Display for IptablesPlan {
    /// The dry-run diff: per family and table, grouped by the service port that owns each chain
    /// (kproxy's shared chains under "kproxy", chains no longer wanted under "stale").
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tables.is_empty() {
            return writeln!(f, "no changes");
        }
        for ((family, table), tp) in &self.tables {
            writeln!(f, "=== {family} table {table} ===")?;
            let mut groups: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for j in &tp.del_jumps {
                groups
                    .entry("kproxy")
                    .or_default()
                    .push(format!("- -A {} {}", j.builtin, j.rule));
            }
            for j in &tp.add_jumps {
                groups
                    .entry("kproxy")
                    .or_default()
                    .push(format!("+ -I {} {}", j.builtin, j.rule));
            }
            for w in &tp.write {
                let group = self.owners.get(&w.name).map_or("kproxy", String::as_str);
                let lines = groups.entry(group).or_default();
                if w.old.is_none() {
                    lines.push(format!("+ :{}", w.name));
                }
                let old = w.old.as_deref().map_or(&[][..], Vec::as_slice);
                let (added, removed) = line_diff(old, &w.rules);
                if w.old.is_some() && added.is_empty() && removed.is_empty() {
                    lines.push(format!("~ {} (same rules, new order)", w.name));
                }
                for r in removed {
                    lines.push(format!("- -A {} {r}", w.name));
                }
                for r in added {
                    lines.push(format!("+ -A {} {r}", w.name));
                }
            }
            for (name, rules) in &tp.delete {
                let lines = groups.entry("stale").or_default();
                for r in rules.iter() {
                    lines.push(format!("- -A {name} {r}"));
                }
                lines.push(format!("- :{name}"));
            }
            for (group, lines) in groups {
                writeln!(f, "# {group}")?;
                for l in lines {
                    writeln!(f, "{l}")?;
                }
            }
        }
        Ok(())
    }
}
