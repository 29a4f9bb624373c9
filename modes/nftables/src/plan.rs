//! The difference between two rulesets as one nft transaction (both families in one `nft -f`).
//!
//! Only what differs is sent: element additions and deletions, chains whose rules changed, new
//! and stale chains and sets. If a set's type or a base chain's hook changed (a kproxy upgrade),
//! the family's table is deleted and rebuilt inside the same transaction, so traffic never sees
//! a half-built table.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};

use kproxy_contract::{IpFamily, PlanStats};

use crate::model::{Chain, Elements, NftRuleset, Set, TABLE, Table, TableDelta, Text, family_name};

/// Elements per `add element` / `delete element` statement.
const CHUNK: usize = 2_000;

/// Plans with more element changes than this are printed per set, not per service.
const GROUP_LIMIT: usize = 1_000;

/// The changes to one family's table.
#[derive(Debug, Clone, Default)]
pub struct FamilyPlan {
    /// Delete the whole table first (type change), then build it from scratch.
    pub recreate: bool,
    /// Delete the table and everything in it (`--cleanup`, or a family no longer programmed).
    pub delete_table: bool,
    /// Sets and maps to create.
    pub add_sets: Vec<(String, Set)>,
    /// Chains to create (declared before anything refers to them).
    pub add_chains: Vec<(String, Chain)>,
    /// Chains whose rules are (re)written: flushed, then filled.
    pub write_chains: Vec<(String, Chain, bool)>,
    /// Elements to delete, per set: key → old value.
    pub delete_elements: BTreeMap<String, ElementList>,
    /// Elements to add, per set.
    pub add_elements: BTreeMap<String, ElementList>,
    /// Chains to delete.
    pub delete_chains: Vec<String>,
    /// Sets and maps to delete (name, is a map).
    pub delete_sets: Vec<(String, bool)>,
    /// Set name → signature of every desired set, so the netlink path knows how to encode
    /// elements of sets that already exist (see [`crate::steps`]).
    pub signatures: BTreeMap<String, String>,
}

/// The elements a plan adds to or deletes from one set.
#[derive(Debug, Clone)]
pub enum ElementList {
    /// Listed one by one (the difference between two versions of a set).
    Listed(Vec<(Text, Option<Text>)>),
    /// Every element of a new set: the desired set itself, shared, not listed. At a first sync
    /// that is nearly the whole plan (130,000 elements at 10,000 services; listed, 4 MiB at
    /// the peak).
    Whole(Elements),
}

impl ElementList {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            ElementList::Listed(v) => v.len(),
            ElementList::Whole(e) => e.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements, in the set's order.
    pub fn iter(&self) -> Box<dyn Iterator<Item = &(Text, Option<Text>)> + '_> {
        match self {
            ElementList::Listed(v) => Box::new(v.iter()),
            ElementList::Whole(e) => Box::new(e.entries()),
        }
    }
}

impl From<Vec<(Text, Option<Text>)>> for ElementList {
    fn from(list: Vec<(Text, Option<Text>)>) -> ElementList {
        ElementList::Listed(list)
    }
}

impl<'a> IntoIterator for &'a ElementList {
    type Item = &'a (Text, Option<Text>);
    type IntoIter = Box<dyn Iterator<Item = &'a (Text, Option<Text>)> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl FamilyPlan {
    fn is_empty(&self) -> bool {
        !self.recreate
            && !self.delete_table
            && self.add_sets.is_empty()
            && self.add_chains.is_empty()
            && self.write_chains.is_empty()
            && self.delete_elements.is_empty()
            && self.add_elements.is_empty()
            && self.delete_chains.is_empty()
            && self.delete_sets.is_empty()
    }
}

/// One sync's transaction.
#[derive(Debug, Clone, Default)]
pub struct NftPlan {
    /// Per family.
    pub families: BTreeMap<IpFamily, FamilyPlan>,
    /// Frontend or chain → service port, for grouping the printed transaction.
    pub owners: imbl::OrdMap<String, String>,
    /// Which way its element changes may go, for the schedule it is printed as (the mode's).
    pub via: crate::steps::Via,
}

/// Computes the transaction that turns `live` into `desired`.
///
/// When `desired` was rendered incrementally from exactly `live` (same generation), only the
/// parts its [`crate::model::Delta`] names are compared: everything else is shared.
pub fn plan(live: &NftRuleset, desired: &NftRuleset) -> NftPlan {
    if let Some(plan) = plan_delta(live, desired) {
        return plan;
    }
    plan_full(live, desired)
}

/// The plan from the delta alone, when it applies (see [`plan`]).
fn plan_delta(live: &NftRuleset, desired: &NftRuleset) -> Option<NftPlan> {
    let delta = desired.delta.as_ref()?;
    if !delta.base.same_render(&live.generation) {
        return None;
    }
    if live.families.keys().ne(desired.families.keys()) {
        return None;
    }
    let mut out = NftPlan {
        owners: desired.owners.clone(),
        ..NftPlan::default()
    };
    for (family, td) in &delta.families {
        let (Some(old), Some(new)) = (live.families.get(family), desired.families.get(family))
        else {
            return None;
        };
        let (old, new) = (restrict(old, td), restrict(new, td));
        if needs_recreate(&old, &new) {
            return None;
        }
        let fp = plan_table(&old, &new);
        if !fp.is_empty() {
            out.families.insert(*family, fp);
        }
    }
    Some(out)
}

/// The part of `table` a delta names: its touched chains and whole sets, and the touched
/// element groups of the other sets.
fn restrict(table: &Table, td: &TableDelta) -> Table {
    let mut out = Table::default();
    for name in &td.chains {
        if let Some(c) = table.chains.get(name) {
            out.chains.insert(name.clone(), c.clone());
        }
    }
    for name in &td.sets {
        if let Some(s) = table.sets.get(name) {
            out.sets.insert(name.clone(), s.clone());
        }
    }
    for (set, group) in &td.groups {
        let Some(s) = table.sets.get(set) else {
            continue;
        };
        let target = out.sets.entry(set.clone()).or_insert_with(|| Set {
            elements: Elements::default(),
            ..s.clone()
        });
        if let Some(g) = s.elements.group(group) {
            target.elements.set_group(group, g.clone());
        }
    }
    out
}

/// Compares the whole tables.
pub(crate) fn plan_full(live: &NftRuleset, desired: &NftRuleset) -> NftPlan {
    let mut out = NftPlan {
        owners: desired.owners.clone(),
        ..NftPlan::default()
    };
    let empty = Table::default();
    let families: BTreeSet<IpFamily> = live
        .families
        .keys()
        .chain(desired.families.keys())
        .copied()
        .collect();
    for family in families {
        let fp = match (live.families.get(&family), desired.families.get(&family)) {
            (Some(_), None) => FamilyPlan {
                delete_table: true,
                ..FamilyPlan::default()
            },
            (old, Some(new)) => {
                let old = old.unwrap_or(&empty);
                if needs_recreate(old, new) {
                    let mut fp = plan_table(&empty, new);
                    fp.recreate = true;
                    fp
                } else {
                    plan_table(old, new)
                }
            }
            (None, None) => continue,
        };
        if !fp.is_empty() {
            out.families.insert(family, fp);
        }
    }
    out
}

/// Deletes and rebuilds every desired table inside one transaction (see `Mode::plan_rebuild`).
pub fn rebuild(live: &NftRuleset, desired: &NftRuleset) -> NftPlan {
    let mut out = NftPlan {
        owners: desired.owners.clone(),
        ..NftPlan::default()
    };
    let empty = Table::default();
    for (family, new) in &desired.families {
        let mut fp = plan_table(&empty, new);
        fp.recreate = true;
        out.families.insert(*family, fp);
    }
    for family in live.families.keys() {
        if !desired.families.contains_key(family) {
            out.families.insert(
                *family,
                FamilyPlan {
                    delete_table: true,
                    ..FamilyPlan::default()
                },
            );
        }
    }
    out
}

fn needs_recreate(old: &Table, new: &Table) -> bool {
    let set_changed = new.sets.iter().any(|(name, s)| {
        old.sets
            .get(name)
            .is_some_and(|o| o.signature != s.signature || o.is_map != s.is_map)
    });
    let base_changed = new
        .chains
        .iter()
        .any(|(name, c)| old.chains.get(name).is_some_and(|o| o.base != c.base));
    set_changed || base_changed
}

fn plan_table(old: &Table, new: &Table) -> FamilyPlan {
    let mut fp = FamilyPlan::default();
    for (name, set) in &new.sets {
        match old.sets.get(name) {
            None => {
                fp.add_sets.push((
                    name.clone(),
                    Set {
                        elements: Elements::default(),
                        ..set.clone()
                    },
                ));
                if !set.elements.is_empty() {
                    fp.add_elements
                        .insert(name.clone(), ElementList::Whole(set.elements.clone()));
                }
            }
            Some(o) => {
                let (add, del) = set.elements.diff(&o.elements);
                let owned = |v: Vec<(&Text, &Option<Text>)>| -> Vec<(Text, Option<Text>)> {
                    v.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect()
                };
                let (add, del) = (owned(add), owned(del));
                if !del.is_empty() {
                    fp.delete_elements.insert(name.clone(), del.into());
                }
                if !add.is_empty() {
                    fp.add_elements.insert(name.clone(), add.into());
                }
            }
        }
    }
    for (name, set) in &old.sets {
        if !new.sets.contains_key(name) {
            fp.delete_sets.push((name.clone(), set.is_map));
        }
    }
    for (name, chain) in &new.chains {
        match old.chains.get(name) {
            None => {
                fp.add_chains.push((name.clone(), chain.clone()));
                fp.write_chains.push((name.clone(), chain.clone(), false));
            }
            Some(o) if o != chain => fp.write_chains.push((name.clone(), chain.clone(), true)),
            Some(_) => {}
        }
    }
    for name in old.chains.keys() {
        if !new.chains.contains_key(name) {
            fp.delete_chains.push(name.clone());
        }
    }
    record_signatures(&mut fp, new);
    fp
}

/// Fills [`FamilyPlan::signatures`].
fn record_signatures(fp: &mut FamilyPlan, new: &Table) {
    fp.signatures = new
        .sets
        .iter()
        .map(|(name, set)| (name.clone(), set.signature.clone()))
        .collect();
}

impl NftPlan {
    /// The `nft -f` script: one transaction for every family.
    pub fn script(&self) -> String {
        Script(self).to_string()
    }

    /// The element changes alone (deletions, then additions), in nft syntax: what one netlink
    /// batch of this plan carries.
    pub fn write_element_changes(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (family, fp) in &self.families {
            let t = format!("{} {TABLE}", family_name(*family));
            write_elements(f, self, &t, "delete", &fp.delete_elements, false)?;
            write_elements(f, self, &t, "add", &fp.add_elements, true)?;
        }
        Ok(())
    }

    fn owner_of(&self, key: &str) -> Option<&str> {
        if let Some(o) = self.owners.get(key) {
            return Some(o);
        }
        // Endpoint and firewall keys extend a frontend key with one more field.
        let (prefix, _) = key.rsplit_once(" . ")?;
        self.owners.get(prefix).map(String::as_str)
    }
}

fn elem_text(k: &str, v: &Option<Text>) -> String {
    match v {
        Some(v) => format!("{k} : {v}"),
        None => k.to_string(),
    }
}

impl fmt::Display for NftPlan {
    /// What `--dry-run` prints: the plan's transactions as they are sent
    /// ([`crate::steps::Schedule`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::steps::Schedule::of(self, self.via).fmt(f)
    }
}

/// A plan as one `nft -f` script ([`NftPlan::script`]).
struct Script<'a>(&'a NftPlan);

impl fmt::Display for Script<'_> {
    /// Valid nft syntax, element changes grouped under `# service` comments.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plan = self.0;
        if plan.families.is_empty() {
            return writeln!(f, "# no changes");
        }
        for (family, fp) in &plan.families {
            let t = format!("{} {TABLE}", family_name(*family));
            writeln!(f, "# === {family} table {t} ===")?;
            if fp.delete_table {
                writeln!(f, "add table {t}\ndelete table {t}")?;
                continue;
            }
            writeln!(f, "add table {t}")?;
            if fp.recreate {
                writeln!(f, "delete table {t}\nadd table {t}")?;
            }
            for (name, set) in &fp.add_sets {
                let kind = if set.is_map { "map" } else { "set" };
                writeln!(f, "add {kind} {t} {name} {{ {} }}", set.decl)?;
            }
            for (name, chain) in &fp.add_chains {
                match &chain.base {
                    Some(b) => writeln!(
                        f,
                        "add chain {t} {name} {{ type {} hook {} priority {} ; policy accept ; }}",
                        b.kind, b.hook, b.priority
                    )?,
                    None => writeln!(f, "add chain {t} {name}")?,
                }
            }
            write_elements(f, plan, &t, "delete", &fp.delete_elements, false)?;
            for (name, chain, _) in &fp.write_chains {
                // Also for a chain this plan creates: another kproxy in the same namespace (a
                // surge update) may have created and filled it since we last looked, and `add
                // chain` leaves its rules; without the flush ours would be appended to them.
                writeln!(f, "flush chain {t} {name}")?;
                for r in &chain.rules {
                    writeln!(f, "add rule {t} {name} {} comment \"{}\"", r.text, r.id)?;
                }
            }
            write_elements(f, plan, &t, "add", &fp.add_elements, true)?;
            for name in &fp.delete_chains {
                // `add` first, so that deleting a chain another kproxy already deleted is not
                // an error (ENOENT would fail the whole transaction).
                writeln!(f, "add chain {t} {name}\ndelete chain {t} {name}")?;
            }
            for (name, is_map) in &fp.delete_sets {
                let kind = if *is_map { "map" } else { "set" };
                writeln!(f, "delete {kind} {t} {name}")?;
            }
        }
        Ok(())
    }
}

/// Element statements, grouped by owning service (then by set), chunked.
fn write_elements(
    f: &mut fmt::Formatter<'_>,
    plan: &NftPlan,
    t: &str,
    verb: &str,
    elements: &BTreeMap<String, ElementList>,
    with_values: bool,
) -> fmt::Result {
    // owner → set → elements. Large plans (a first sync) are not grouped: one statement per
    // 2,000 elements parses several times faster than one per service, and nobody reads them.
    let total: usize = elements.values().map(ElementList::len).sum();
    let group = total <= GROUP_LIMIT;
    let mut grouped: BTreeMap<&str, BTreeMap<&str, Vec<String>>> = BTreeMap::new();
    for (set, elems) in elements {
        for (k, v) in elems {
            let owner = if group {
                plan.owner_of(k).unwrap_or("kproxy")
            } else {
                "all services"
            };
            let text = if with_values {
                elem_text(k, v)
            } else {
                k.to_string()
            };
            grouped
                .entry(owner)
                .or_default()
                .entry(set)
                .or_default()
                .push(text);
        }
    }
    for (owner, sets) in grouped {
        writeln!(f, "# {owner}")?;
        for (set, elems) in sets {
            for chunk in elems.chunks(CHUNK) {
                let mut line = String::new();
                let _ = write!(line, "{verb} element {t} {set} {{ {} }}", chunk.join(", "));
                writeln!(f, "{line}")?;
            }
        }
    }
    Ok(())
}

impl kproxy_contract::Plan for NftPlan {
    fn is_empty(&self) -> bool {
        self.families.is_empty()
    }

    fn stats(&self) -> PlanStats {
        let mut s = PlanStats::default();
        for fp in self.families.values() {
            s.added += fp
                .add_elements
                .values()
                .map(ElementList::len)
                .sum::<usize>()
                + fp.write_chains
                    .iter()
                    .map(|(_, c, _)| c.rules.len())
                    .sum::<usize>();
            s.removed += fp
                .delete_elements
                .values()
                .map(ElementList::len)
                .sum::<usize>();
            s.containers_touched += fp.add_sets.len()
                + fp.delete_sets.len()
                + fp.write_chains.len()
                + fp.delete_chains.len();
        }
        s
    }
}
