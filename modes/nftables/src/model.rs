//! What kproxy keeps in its nftables tables: chains with rules, sets and maps with elements.
//!
//! Elements are canonical strings in the form `nft -j list` gives back (see [`crate::live`]),
//! so the desired and the live table compare element by element. Rules are identified by a
//! short hash of their text, stored in the rule's comment, because nft prints rules back in a
//! normalised form that differs from what was written.

use std::collections::BTreeMap;

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
    pub elements: BTreeMap<String, Option<String>>,
}

impl PartialEq for Set {
    fn eq(&self, other: &Self) -> bool {
        self.is_map == other.is_map
            && self.signature == other.signature
            && self.elements == other.elements
    }
}

/// One family's table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    /// Chains by name.
    pub chains: BTreeMap<String, Chain>,
    /// Sets and maps by name.
    pub sets: BTreeMap<String, Set>,
}

/// Both families' tables, plus who owns which frontend (for grouping the dry-run diff).
#[derive(Debug, Clone, Default)]
pub struct NftRuleset {
    /// Per family. A family that is absent has no kproxy table.
    pub families: BTreeMap<IpFamily, Table>,
    /// Element key prefix (a frontend such as `10.96.0.10 . tcp . 80`) or chain → service port.
    pub owners: BTreeMap<String, String>,
}

impl PartialEq for NftRuleset {
    fn eq(&self, other: &Self) -> bool {
        self.families == other.families
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
