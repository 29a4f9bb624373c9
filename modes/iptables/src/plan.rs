//! The difference between two rulesets as one `iptables-restore --noflush` payload per family.
//!
//! Only chains whose rules differ are written, so a change to one service rewrites that
//! service's chains and the one dispatch leaf that points to it, whatever the cluster's size.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::fmt;
use std::sync::Arc;

use kproxy_contract::{IpFamily, PlanStats};

use crate::names;
use crate::ruleset::{Jump, Ruleset, Table, TableRules};

/// From this many new chains in one table (a first sync, a full rewrite), a plan creates its new
/// per-service chains in an `iptables-restore` of their own before the one that links them in:
/// see [`TablePlan::staged`]. Below it, one restore per family, as always.
pub const STAGE_MIN: usize = 500;

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
    /// Indices into `write` of the new chains created first, in a transaction of their own,
    /// in this order (every chain after the chains it jumps to).
    ///
    /// `iptables-nft-restore --noflush` (1.8.9) keeps the names of the chains its input
    /// mentions in a sorted list, walked from the start for every line: a restore that
    /// creates 10,000 service chains and the tree that reaches them spent most of its time
    /// (3 s of 4.5 at 10,000 services) comparing chain names. Chains created in a restore of
    /// their own, each followed by its rules in descending name order, keep that walk short,
    /// and the second restore (everything else: the dispatch tree, rewritten chains, jumps,
    /// deletions) starts from an empty list. Traffic cannot tell: nothing jumps to a new chain
    /// before the second restore links it in, which is one transaction as before. If that one
    /// fails, the staged chains are unreferenced leftovers that the next sync's read-back
    /// rewrites or deletes.
    pub staged: Vec<usize>,
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

/// Computes the plan that turns `live` into `desired`, staging many new chains when `stage`
/// says to ([`TablePlan::staged`]).
pub fn plan(live: &Ruleset, desired: &Ruleset, stage_new: bool) -> IptablesPlan {
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
        let mut tp = plan_table(old, new);
        if stage_new {
            tp.staged = stage(&tp);
        }
        if !tp.is_empty() {
            out.tables.insert((family, table), tp);
        }
    }
    out
}

/// The chains `rule` jumps or goes to that kproxy owns.
fn owned_target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" || w == "--jump" || w == "--goto" {
            return words.next().filter(|t| names::is_owned(t));
        }
    }
    None
}

/// [`TablePlan::staged`]: the new chains of `tp` outside the dispatch tree whose targets exist
/// before the plan runs or are staged themselves, ordered targets first and otherwise by
/// descending name; none when there are fewer than [`STAGE_MIN`].
fn stage(tp: &TablePlan) -> Vec<usize> {
    let new: HashMap<&str, usize> = tp
        .write
        .iter()
        .enumerate()
        .filter(|(_, w)| w.old.is_none())
        .map(|(i, w)| (w.name.as_str(), i))
        .collect();
    // The tree's lines jump to service chains, which sort after it: they go with the second
    // restore, whose list of names starts empty.
    let mut staged: BTreeSet<&str> = new
        .keys()
        .copied()
        .filter(|n| !n.starts_with(names::SERVICES_TREE))
        .collect();
    if staged.len() < STAGE_MIN {
        return Vec::new();
    }
    // Each candidate's targets, parsed once.
    let targets: HashMap<&str, Vec<&str>> = staged
        .iter()
        .map(|&n| {
            let mut t: Vec<&str> = tp.write[new[n]]
                .rules
                .iter()
                .filter_map(|r| owned_target(r))
                .filter(|t| *t != n)
                .collect();
            t.sort_unstable();
            t.dedup();
            (n, t)
        })
        .collect();
    // A staged chain may only jump to chains that exist already or are staged too.
    loop {
        let keep: BTreeSet<&str> = staged
            .iter()
            .copied()
            .filter(|n| {
                targets[n]
                    .iter()
                    .all(|t| !new.contains_key(t) || staged.contains(t))
            })
            .collect();
        if keep.len() == staged.len() {
            break;
        }
        staged = keep;
    }
    if staged.len() < STAGE_MIN {
        return Vec::new();
    }
    // Targets first; among the chains ready, the greatest name (a max-heap).
    let mut waiting: HashMap<&str, usize> = HashMap::new();
    let mut users: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut ready: BinaryHeap<&str> = BinaryHeap::new();
    for &n in &staged {
        let deps: Vec<&str> = targets[n]
            .iter()
            .copied()
            .filter(|t| staged.contains(t))
            .collect();
        if deps.is_empty() {
            ready.push(n);
        }
        for d in &deps {
            users.entry(*d).or_default().push(n);
        }
        waiting.insert(n, deps.len());
    }
    let mut order = Vec::with_capacity(staged.len());
    while let Some(n) = ready.pop() {
        order.push(new[n]);
        for u in users.get(n).into_iter().flatten() {
            if let Some(w) = waiting.get_mut(u) {
                *w -= 1;
                if *w == 0 {
                    ready.push(u);
                }
            }
        }
    }
    // A cycle (never rendered) would leave chains unordered: then stage nothing.
    if order.len() == staged.len() {
        order
    } else {
        Vec::new()
    }
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

/// One of a family's `iptables-restore` transactions (see [`TablePlan::staged`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The staged new chains, each followed by its rules.
    Staged,
    /// Everything else: the only transaction when nothing is staged.
    Main,
}

impl IptablesPlan {
    /// The `iptables-restore --noflush` inputs for one family, in the order they run (the
    /// staged chains first, when there are any), as text: what `--dry-run`'s trace log shows.
    pub fn restore_payloads(&self, family: IpFamily) -> Vec<String> {
        self.restore_inputs(family)
            .iter()
            .map(|input| {
                let mut out = String::with_capacity(input.len);
                self.write_restore(family, input.part, &mut out)
                    .expect("writing to a String never fails");
                out
            })
            .collect()
    }

    /// The same inputs as [`Self::restore_payloads`], each written to the tool's pipe as it is
    /// produced: a first sync at 10,000 services is 16 MiB of text, which as one string was
    /// the largest block at the process's peak (heap profile, issue #17). Parts with nothing to
    /// do are left out.
    ///
    /// Order matters within a part: declaring a chain (`:NAME`) creates or flushes it, so in the
    /// main part every rewritten or doomed chain is declared first; rules are appended; stale
    /// jumps are removed before the chains they point to are deleted; new jumps are inserted
    /// last, when their targets exist. The staged part declares each chain just before its
    /// rules, every chain after the chains it jumps to.
    pub fn restore_inputs(&self, family: IpFamily) -> Vec<RestoreInput<'_>> {
        [Part::Staged, Part::Main]
            .into_iter()
            .filter_map(|part| {
                let mut size = ByteCount(0);
                self.write_restore(family, part, &mut size)
                    .expect("counting never fails");
                (size.0 > 0).then_some(RestoreInput {
                    plan: self,
                    family,
                    part,
                    len: size.0,
                })
            })
            .collect()
    }

    fn write_restore(
        &self,
        family: IpFamily,
        part: Part,
        out: &mut impl fmt::Write,
    ) -> fmt::Result {
        for ((f, table), tp) in &self.tables {
            if *f != family {
                continue;
            }
            if part == Part::Staged {
                if tp.staged.is_empty() {
                    continue;
                }
                writeln!(out, "*{table}")?;
                for &i in &tp.staged {
                    let w = &tp.write[i];
                    writeln!(out, ":{} - [0:0]", w.name)?;
                    for r in w.rules.iter() {
                        writeln!(out, "-A {} {r}", w.name)?;
                    }
                }
                out.write_str("COMMIT\n")?;
                continue;
            }
            let staged: BTreeSet<usize> = tp.staged.iter().copied().collect();
            let writes = || {
                tp.write
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !staged.contains(i))
                    .map(|(_, w)| w)
            };
            if writes().next().is_none()
                && tp.delete.is_empty()
                && tp.del_jumps.is_empty()
                && tp.add_jumps.is_empty()
            {
                continue;
            }
            writeln!(out, "*{table}")?;
            for w in writes() {
                writeln!(out, ":{} - [0:0]", w.name)?;
            }
            for (name, _) in &tp.delete {
                writeln!(out, ":{name} - [0:0]")?;
            }
            for w in writes() {
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

/// One `iptables-restore` input of a family, written on demand (see
/// [`IptablesPlan::restore_inputs`]).
#[derive(Debug, Clone, Copy)]
pub struct RestoreInput<'a> {
    plan: &'a IptablesPlan,
    family: IpFamily,
    part: Part,
    len: usize,
}

impl RestoreInput<'_> {
    /// Which transaction this is.
    pub fn part(&self) -> Part {
        self.part
    }
}

impl kproxy_contract::command::Input for RestoreInput<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn write_to(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let mut adapter = IoWrite { out, error: None };
        match self
            .plan
            .write_restore(self.family, self.part, &mut adapter)
        {
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
            if !tp.staged.is_empty() {
                writeln!(
                    f,
                    "# {} new chains are created first, in an iptables-restore of their own; nothing jumps to them before the second",
                    tp.staged.len()
                )?;
            }
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
