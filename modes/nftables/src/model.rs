//! What kproxy keeps in its nftables tables: chains with rules, sets and maps with elements.
//!
//! Elements are canonical strings in the form `nft -j list` gives back (see [`crate::live`]),
//! so the desired and the live table compare element by element. Rules are identified by a
//! short hash of their text, stored in the rule's comment, because nft prints rules back in a
//! normalised form that differs from what was written.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use imbl::OrdMap;

use kproxy_contract::IpFamily;
use sha2::{Digest, Sha256};

/// The name of kproxy's table in both families.
pub const TABLE: &str = "kproxy";

/// A rule: its text (without the comment) and its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// nft syntax, without the trailing identity comment.
    pub text: String,
    /// Identity: 8 hex digits of the text's SHA-256, written as the rule's comment.
    pub id: String,
}

impl Rule {
    /// A rule from its text.
    pub fn new(text: impl Into<String>) -> Self {
        let text = text.into();
        let id = rule_id(&text);
        Self { text, id }
    }

    /// A rule read back from the kernel: only its identity is known.
    pub fn from_id(id: impl Into<String>) -> Self {
        let id = id.into();
        Self {
            text: format!("<rule {id}>"),
            id,
        }
    }
}

/// The identity of a rule text.
pub fn rule_id(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    data_encoding::HEXLOWER.encode(&digest[..4])
}

/// A chain. Rules compare by identity only.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    /// For base chains, the hook declaration (`type nat hook prerouting priority -100`).
    pub base: Option<BaseChain>,
    /// The rules, in order.
    pub rules: Vec<Rule>,
}

impl PartialEq for Chain {
    fn eq(&self, other: &Self) -> bool {
        self.base == other.base
            && self.rules.len() == other.rules.len()
            && self
                .rules
                .iter()
                .zip(&other.rules)
                .all(|(a, b)| a.id == b.id)
    }
}

/// A base chain's hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseChain {
    /// `nat` or `filter`.
    pub kind: &'static str,
    /// `prerouting`, `input`, ...
    pub hook: &'static str,
    /// Priority.
    pub priority: i32,
}

/// A named set or map.
#[derive(Debug, Clone)]
pub struct Set {
    /// `set` or `map`.
    pub is_map: bool,
    /// The declaration body used to create it (`typeof ... ; flags interval ;`).
    pub decl: String,
    /// What identifies its type when read back: key types, value type, flags, timeout.
    pub signature: String,
    /// Elements: key → value (maps) or key → None (sets).
    pub elements: Elements,
}

impl PartialEq for Set {
    fn eq(&self, other: &Self) -> bool {
        self.is_map == other.is_map
            && self.signature == other.signature
            && self.elements == other.elements
    }
}

/// An element's key or value, as nft spells it. Shared, not copied: a plan, the applied rules
/// and the next render point at the strings one render made (a first sync at 10,000 services
/// plans 130,000 elements; as copies they were 15 MiB at the peak).
pub type Text = Arc<str>;

/// Borrowed elements, as [`Elements::diff`] returns them.
pub type ElementRefs<'a> = Vec<(&'a Text, &'a Option<Text>)>;

/// The elements of one key → value group (see [`Elements`]), sorted by key.
///
/// A sorted vector, not a `BTreeMap`: most groups hold one element (a ClusterIP's entry in
/// `service-ips`, in `masq-internal`, in `cluster-ips`), and a map's first node is 368 bytes
/// whatever it holds: 40,000 of them, 14 MiB, at 10,000 services (heap profile, issue #17).
/// One element here is 32 bytes. It grows by half its length, so a vector built one insert at a
/// time carries at most a third of slack and a lone element none. Groups are small (one
/// frontend's or one NodePort's elements), so an insert's shift is cheap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Group(Vec<(Text, Option<Text>)>);

impl Group {
    /// No elements.
    pub const fn new() -> Self {
        Group(Vec::new())
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| (**k).cmp(key))
    }

    /// Adds or replaces an element; returns the previous value if the key was present.
    pub fn insert(&mut self, key: Text, value: Option<Text>) -> Option<Option<Text>> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                if self.0.len() == self.0.capacity() {
                    self.0.reserve_exact(1 + self.0.len() / 2);
                }
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    /// Removes an element; returns its value if it was present.
    pub fn remove(&mut self, key: &str) -> Option<Option<Text>> {
        let i = self.find(key).ok()?;
        Some(self.0.remove(i).1)
    }

    /// The value of an element (`Some(None)` for a set member).
    pub fn get(&self, key: &str) -> Option<&Option<Text>> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The elements in key order.
    pub fn iter(&self) -> GroupIter<'_> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// The elements in key order, as stored (key and value together).
    pub fn entries(&self) -> std::slice::Iter<'_, (Text, Option<Text>)> {
        self.0.iter()
    }
}

/// [`Group::iter`]'s iterator.
pub type GroupIter<'a> = std::iter::Map<
    std::slice::Iter<'a, (Text, Option<Text>)>,
    fn(&'a (Text, Option<Text>)) -> (&'a Text, &'a Option<Text>),
>;

impl<'a> IntoIterator for &'a Group {
    type Item = (&'a Text, &'a Option<Text>);
    type IntoIter = GroupIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl Extend<(Text, Option<Text>)> for Group {
    /// Inserts each in turn: a later element replaces an earlier one with the same key.
    fn extend<I: IntoIterator<Item = (Text, Option<Text>)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

/// A set's or map's elements, grouped by the first component of their key (a frontend's or an
/// endpoint's address, a protocol). Groups are shared (`Arc`): a render reuses the groups of
/// services that did not change, and [`Elements::diff`] skips a group that is the same
/// allocation on both sides, so an incremental sync at 10,000 services compares pointers, not
/// 130,000 elements. The grouping is a pure function of the key, so a table read back from
/// the kernel groups the same way as a rendered one.
#[derive(Debug, Clone, Default)]
pub struct Elements {
    groups: OrdMap<Text, Arc<Group>>,
    len: usize,
}

/// No elements (the other side of a group present on one side only).
static EMPTY: Group = Group::new();

/// The group of an element key: its first ` . `-separated component (a frontend's or an
/// endpoint's address), or its first two when the first is a protocol (`tcp . 30080`): grouping
/// NodePort keys by protocol alone would put every NodePort service in one group.
pub fn group_of(key: &str) -> &str {
    let Some((first, rest)) = key.split_once(" . ") else {
        return key;
    };
    if matches!(first, "tcp" | "udp" | "sctp") {
        let second = rest.split_once(" . ").map_or(rest, |(second, _)| second);
        return &key[..first.len() + 3 + second.len()];
    }
    first
}

impl Elements {
    /// Adds or replaces an element; returns the previous value if the key was present.
    pub fn insert(&mut self, key: String, value: Option<String>) -> Option<Option<Text>> {
        self.insert_shared(key.into(), value.map(Text::from))
    }

    /// Adds or replaces an element whose strings are already shared (a plan's, another
    /// table's); returns the previous value if the key was present.
    pub fn insert_shared(&mut self, key: Text, value: Option<Text>) -> Option<Option<Text>> {
        let g = group_of(&key);
        // Look up before allocating the group key: most elements join a group seen before.
        if !self.groups.contains_key(g) {
            self.groups.insert(Text::from(g), Arc::default());
        }
        let group = Arc::make_mut(self.groups.get_mut(g).expect("inserted above"));
        let old = group.insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes an element; returns its value if it was present.
    pub fn remove(&mut self, key: &str) -> Option<Option<Text>> {
        let g = group_of(key);
        let group = self.groups.get_mut(g)?;
        let old = Arc::make_mut(group).remove(key)?;
        if group.is_empty() {
            self.groups.remove(g);
        }
        self.len -= 1;
        Some(old)
    }

    /// The value of an element (`Some(None)` for a set member).
    pub fn get(&self, key: &str) -> Option<&Option<Text>> {
        self.groups.get(group_of(key))?.get(key)
    }

    /// Whether the key is an element.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every element, group by group.
    pub fn iter(&self) -> impl Iterator<Item = (&Text, &Option<Text>)> {
        self.groups.values().flat_map(|g| g.iter())
    }

    /// Every element, group by group, as stored (key and value together).
    pub fn entries(&self) -> impl Iterator<Item = &(Text, Option<Text>)> {
        self.groups.values().flat_map(|g| g.entries())
    }

    /// Every value.
    pub fn values(&self) -> impl Iterator<Item = &Option<Text>> {
        self.iter().map(|(_, v)| v)
    }

    /// Adds a whole group of elements (all keys must belong to `group`), sharing it when this
    /// set has no such group yet.
    pub fn extend_group(&mut self, group: &Text, elements: &Arc<Group>) {
        match self.groups.get_mut(group) {
            None => {
                self.len += elements.len();
                self.groups.insert(group.clone(), elements.clone());
            }
            Some(existing) => {
                let existing = Arc::make_mut(existing);
                for (k, v) in elements.iter() {
                    if existing.insert(k.clone(), v.clone()).is_none() {
                        self.len += 1;
                    }
                }
            }
        }
    }

    /// The groups, for building fragments.
    pub fn groups(&self) -> impl Iterator<Item = (&Text, &Arc<Group>)> {
        self.groups.iter()
    }

    /// One group, if it has elements.
    pub fn group(&self, group: &str) -> Option<&Arc<Group>> {
        self.groups.get(group)
    }

    /// Replaces a whole group (all keys must belong to `group`); an empty one removes it.
    pub fn set_group(&mut self, group: &Text, elements: Arc<Group>) {
        let old = if elements.is_empty() {
            self.groups.remove(group)
        } else {
            self.groups.insert(group.clone(), elements)
        };
        let new_len = self.groups.get(group).map_or(0, |g| g.len());
        self.len = self.len + new_len - old.map_or(0, |g| g.len());
    }

    /// Elements only in `self` (to add) and elements only in or different in `old` (to
    /// delete), skipping groups shared with `old`.
    pub fn diff<'a>(&'a self, old: &'a Elements) -> (ElementRefs<'a>, ElementRefs<'a>) {
        let mut add = Vec::new();
        let mut del = Vec::new();
        let mut new_groups = self.groups.iter().peekable();
        let mut old_groups = old.groups.iter().peekable();
        loop {
            let (n, o) = match (new_groups.peek(), old_groups.peek()) {
                (None, None) => break,
                (Some((nk, _)), Some((ok, _))) if nk == ok => {
                    let (_, n) = new_groups.next().expect("peeked");
                    let (_, o) = old_groups.next().expect("peeked");
                    if Arc::ptr_eq(n, o) {
                        continue;
                    }
                    (&**n, &**o)
                }
                (Some((nk, _)), Some((ok, _))) if nk < ok => {
                    (&**new_groups.next().expect("peeked").1, &EMPTY)
                }
                (Some(_), None) => (&**new_groups.next().expect("peeked").1, &EMPTY),
                _ => (&EMPTY, &**old_groups.next().expect("peeked").1),
            };
            for (k, v) in n {
                if o.get(k) != Some(v) {
                    add.push((k, v));
                }
            }
            for (k, v) in o {
                if n.get(k) != Some(v) {
                    del.push((k, v));
                }
            }
        }
        (add, del)
    }
}

impl PartialEq for Elements {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.groups == other.groups
    }
}

impl FromIterator<(String, Option<String>)> for Elements {
    fn from_iter<I: IntoIterator<Item = (String, Option<String>)>>(iter: I) -> Self {
        let mut e = Elements::default();
        for (k, v) in iter {
            e.insert(k, v);
        }
        e
    }
}

/// One family's table. Persistent maps: a clone shares everything, a change copies a path.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    /// Chains by name.
    pub chains: OrdMap<String, Chain>,
    /// Sets and maps by name.
    pub sets: OrdMap<String, Set>,
}

/// Both families' tables, plus who owns which frontend (for grouping the dry-run diff).
#[derive(Debug, Clone, Default)]
pub struct NftRuleset {
    /// Per family. A family that is absent has no kproxy table.
    pub families: BTreeMap<IpFamily, Table>,
    /// Element key prefix (a frontend such as `10.96.0.10 . tcp . 80`) or chain → service port.
    pub owners: OrdMap<String, String>,
    /// Which render produced this ruleset (none when read back from the kernel, or built by
    /// hand).
    pub generation: Generation,
    /// What changed since the render `delta.base` produced, when this one was rendered
    /// incrementally: the plan against exactly that ruleset then looks only at these parts.
    pub delta: Option<Arc<Delta>>,
}

impl PartialEq for NftRuleset {
    fn eq(&self, other: &Self) -> bool {
        self.families == other.families
    }
}

/// The parts of a table an incremental render touched. Anything not named here is the same
/// (shared) value in both rulesets.
#[derive(Debug, Clone, Default)]
pub struct Delta {
    /// The generation of the ruleset this one was derived from.
    pub base: Generation,
    /// Per family.
    pub families: BTreeMap<IpFamily, TableDelta>,
}

/// One family's touched parts.
#[derive(Debug, Clone, Default)]
pub struct TableDelta {
    /// Element groups (set, group key) whose elements may differ.
    pub groups: BTreeSet<(String, Text)>,
    /// Chains that may have been added, removed or rewritten.
    pub chains: BTreeSet<String>,
    /// Whole sets that may have been added, removed or changed.
    pub sets: BTreeSet<String>,
}

/// Which render produced a ruleset: the render from scratch its lineage began with, and how
/// many incremental renders followed. A lineage is known by identity, not by value (an
/// allocation that every ruleset of the lineage shares), so two lineages never compare as the
/// same render, whoever holds their memos and however many renders each has made; no counter
/// shared by the process is needed. The default, for a ruleset read back from the kernel or
/// built by hand, is the same render as none.
#[derive(Debug, Clone, Default)]
pub struct Generation {
    lineage: Option<Arc<Lineage>>,
    step: u64,
}

/// The identity of one lineage of renders (see [`Generation`]).
#[derive(Debug)]
struct Lineage;

impl Generation {
    /// The generation of a render from scratch: a new lineage.
    pub fn first() -> Self {
        Generation {
            lineage: Some(Arc::new(Lineage)),
            step: 0,
        }
    }

    /// The generation of a render derived from this one.
    pub fn next(&self) -> Self {
        Generation {
            lineage: self.lineage.clone(),
            step: self.step + 1,
        }
    }

    /// Whether both name the same render (never true for a ruleset that no render produced).
    pub fn same_render(&self, other: &Generation) -> bool {
        match (&self.lineage, &other.lineage) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) && self.step == other.step,
            _ => false,
        }
    }
}

impl NftRuleset {
    /// Number of elements and rules, for metrics and benchmarks.
    pub fn object_count(&self) -> usize {
        self.families
            .values()
            .map(|t| {
                t.sets.values().map(|s| s.elements.len()).sum::<usize>()
                    + t.chains.values().map(|c| c.rules.len()).sum::<usize>()
            })
            .sum()
    }
}

/// The nft spelling of a family's table.
pub fn family_name(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}
