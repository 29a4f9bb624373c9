//! An in-memory iptables that applies restore payloads the way the kernel does: all of a
//! payload or none of it, with the same errors for missing chains, dangling jumps and deleting
//! referenced chains. It holds foreign chains too, so tests can check we never touch them.

use std::collections::BTreeMap;

use kproxy_contract::command::Input as _;
use kproxy_contract::{Cause, IpFamily};

use crate::kernel::IptablesKernel;
use crate::plan::RestoreInput;
use crate::ruleset::Table;

type Chains = BTreeMap<String, Vec<String>>;

/// The fake kernel.
#[derive(Debug, Clone, Default)]
pub struct FakeIptables {
    tables: BTreeMap<(IpFamily, Table), Chains>,
    /// Every payload applied successfully, in order.
    pub applied: Vec<String>,
    /// When set, the next restore fails with this message (and changes nothing).
    pub fail_next: Option<String>,
}

const BUILTIN: &[(Table, &[&str])] = &[
    (Table::Filter, &["INPUT", "FORWARD", "OUTPUT"]),
    (
        Table::Nat,
        &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
    ),
];

fn is_builtin(table: Table, chain: &str) -> bool {
    BUILTIN
        .iter()
        .any(|(t, cs)| *t == table && cs.contains(&chain))
}

fn target_of(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" {
            return words.next();
        }
    }
    None
}

/// Targets that are extensions, not chains.
fn is_extension_target(t: &str) -> bool {
    t.chars().all(|c| c.is_ascii_uppercase()) && !t.contains('-')
}

impl FakeIptables {
    /// An empty kernel with only the built-in chains.
    pub fn new() -> Self {
        let mut tables = BTreeMap::new();
        for family in IpFamily::ALL {
            for (table, chains) in BUILTIN {
                tables.insert(
                    (family, *table),
                    chains.iter().map(|c| (c.to_string(), Vec::new())).collect(),
                );
            }
        }
        Self {
            tables,
            applied: Vec::new(),
            fail_next: None,
        }
    }

    /// The chains of one table (for assertions).
    pub fn chains(&self, family: IpFamily, table: Table) -> &Chains {
        static EMPTY: Chains = BTreeMap::new();
        self.tables.get(&(family, table)).unwrap_or(&EMPTY)
    }

    fn apply(
        &self,
        family: IpFamily,
        payload: &str,
    ) -> Result<BTreeMap<(IpFamily, Table), Chains>, String> {
        let mut tables = self.tables.clone();
        let mut current: Option<Table> = None;
        for (n, line) in payload.lines().enumerate() {
            let fail = |msg: &str| format!("line {} failed: {msg}: {line}", n + 1);
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(t) = line.strip_prefix('*') {
                current = Some(match t {
                    "filter" => Table::Filter,
                    "nat" => Table::Nat,
                    _ => return Err(fail("unknown table")),
                });
                continue;
            }
            let table = current.ok_or_else(|| fail("no table"))?;
            let chains = tables.entry((family, table)).or_default();
            if line == "COMMIT" {
                for (name, rules) in chains.iter() {
                    for r in rules {
                        if let Some(t) = target_of(r)
                            && !is_extension_target(t)
                            && !chains.contains_key(t)
                        {
                            return Err(format!("chain {name} jumps to missing chain {t}"));
                        }
                    }
                }
                current = None;
                continue;
            }
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                chains.insert(name.to_string(), Vec::new());
                continue;
            }
            let (op, rest) = line.split_once(' ').ok_or_else(|| fail("bad line"))?;
            let (chain, body) = rest.split_once(' ').unwrap_or((rest, ""));
            match op {
                "-A" | "-I" => {
                    let rules = chains.get_mut(chain).ok_or_else(|| fail("no such chain"))?;
                    if op == "-A" {
                        rules.push(body.to_string());
                    } else {
                        rules.insert(0, body.to_string());
                    }
                }
                "-D" => {
                    let rules = chains.get_mut(chain).ok_or_else(|| fail("no such chain"))?;
                    let pos = rules
                        .iter()
                        .position(|r| r == body)
                        .ok_or_else(|| fail("no such rule"))?;
                    rules.remove(pos);
                }
                "-X" => {
                    if is_builtin(table, chain) {
                        return Err(fail("cannot delete built-in chain"));
                    }
                    let referenced = chains
                        .iter()
                        .any(|(_, rs)| rs.iter().any(|r| target_of(r) == Some(chain)));
                    if referenced {
                        return Err(fail("chain is still referenced"));
                    }
                    chains.remove(chain).ok_or_else(|| fail("no such chain"))?;
                }
                _ => return Err(fail("unsupported operation")),
            }
        }
        if current.is_some() {
            return Err("missing COMMIT".to_string());
        }
        Ok(tables)
    }

    /// Flushes and deletes every chain of a table but the built-in ones, as an administrator's
    /// `iptables -t TABLE -F; iptables -t TABLE -X` would.
    pub fn wipe(&mut self, family: IpFamily, table: Table) {
        if let Some(chains) = self.tables.get_mut(&(family, table)) {
            chains.retain(|name, _| is_builtin(table, name));
            for rules in chains.values_mut() {
                rules.clear();
            }
        }
    }

    /// Adds a foreign chain with rules (to prove kproxy leaves it alone).
    pub fn add_foreign(&mut self, family: IpFamily, table: Table, chain: &str, rules: &[&str]) {
        self.tables.entry((family, table)).or_default().insert(
            chain.to_string(),
            rules.iter().map(|r| r.to_string()).collect(),
        );
    }
}

impl IptablesKernel for FakeIptables {
    /// As the nft backend, so tests see staged plans.
    fn stages_new_chains(&self) -> bool {
        true
    }

    fn save(&mut self, family: IpFamily, table: Table) -> Result<String, Cause> {
        let mut out = format!("*{table}\n");
        for name in self.chains(family, table).keys() {
            let policy = if is_builtin(table, name) {
                "ACCEPT"
            } else {
                "-"
            };
            out.push_str(&format!(":{name} {policy} [0:0]\n"));
        }
        for (name, rules) in self.chains(family, table) {
            for r in rules {
                out.push_str(&format!("-A {name} {r}\n"));
            }
        }
        out.push_str("COMMIT\n");
        Ok(out)
    }

    fn chain_exists(&mut self, family: IpFamily, table: Table, chain: &str) -> Result<bool, Cause> {
        Ok(self.chains(family, table).contains_key(chain))
    }

    fn restore(&mut self, family: IpFamily, payload: &RestoreInput<'_>) -> Result<(), Cause> {
        let payload = payload.text();
        let payload = payload.as_str();
        let program = "fake-iptables-restore".to_string();
        if let Some(msg) = self.fail_next.take() {
            return Err(Cause::Failed {
                program,
                status: "exit status: 1".into(),
                stderr: msg,
            });
        }
        match self.apply(family, payload) {
            Ok(tables) => {
                self.tables = tables;
                self.applied.push(payload.to_string());
                Ok(())
            }
            Err(stderr) => Err(Cause::Failed {
                program,
                status: "exit status: 1".into(),
                stderr,
            }),
        }
    }
}
