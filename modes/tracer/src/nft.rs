//! An evaluator for the subset of nft rule syntax kproxy writes (the nftables mode's table and
//! the IPVS mode's `kproxy-ipvs` table), shared by both modes' tracers. Pure: it reads a
//! [`View`] of chains and set elements, never the kernel.
//!
//! Supported: concatenated selectors (`ip daddr . meta l4proto . th dport`), set and map
//! lookups (`@set`, `!= @set`, `vmap @map`), literals and anonymous sets, `fib saddr|daddr type
//! local`, `iifname "NAME"` and `iifname "PREFIX*"` (also `meta iifname`; empty for a packet
//! the node sends, as in an output hook), `ct state new`, `ct status dnat`, `meta mark & M == V`, `meta mark set meta mark |
//! / ^ M`, `numgen random mod N [offset K]` (in `dnat ... map` and in `numgen ... I goto`),
//! `dnat to ADDR:PORT`, `jump`, `goto`, `return`, `accept`, `drop`, `reject`, `masquerade`,
//! `update @set { ... }`. Anything else is an error naming the token.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::{Env, Hop, Packet};

/// Where the evaluator finds set and map elements. Keys and values use ` . ` between
/// components, as the renderers write them; a map element's value is `Some`.
pub trait Sets {
    /// Whether the set or map exists.
    fn exists(&self, set: &str) -> bool;
    /// The element whose key is exactly `key`.
    fn exact(&self, set: &str, key: &str) -> Option<Option<String>>;
    /// The elements whose key holds a prefix (`10.0.0.0/8`) or a range, which an exact
    /// lookup cannot find.
    fn ranged(&self, set: &str) -> Vec<(String, Option<String>)>;
}

/// Sets as plain lists (small tables: the IPVS mode's, tests).
impl Sets for BTreeMap<String, Vec<(String, Option<String>)>> {
    fn exists(&self, set: &str) -> bool {
        self.contains_key(set)
    }
    fn exact(&self, set: &str, key: &str) -> Option<Option<String>> {
        self.get(set)?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }
    fn ranged(&self, set: &str) -> Vec<(String, Option<String>)> {
        self.get(set)
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.contains('/') || k.contains('-'))
            .cloned()
            .collect()
    }
}

/// Chains as rule texts, and where their sets' elements are.
pub struct View<'a> {
    /// Chain name → rule texts.
    pub chains: BTreeMap<String, Vec<String>>,
    /// The sets and maps.
    pub sets: &'a dyn Sets,
}

/// How a walk ended for one branch.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// Fell off the end of the base chain (policy accept).
    Continue,
    /// `accept`.
    Accept,
    /// `drop`.
    Drop,
    /// `reject`.
    Reject,
    /// `masquerade`.
    Masquerade,
}

/// One weighted possibility of a walk.
#[derive(Debug, Clone)]
pub struct Branch {
    /// Probability of this branch.
    pub prob: f64,
    /// Packet mark.
    pub mark: u32,
    /// The destination after DNAT, if a rule DNATed.
    pub dnat: Option<SocketAddr>,
    /// The chain that decided a drop or reject, and the map whose verdict it was (if any).
    pub decided: Option<(String, Option<String>)>,
    /// Keys of verdict-map elements that matched, with the map name, in order.
    pub dispatched: Vec<(String, String)>,
    /// Affinity sets consulted (ClientIP affinity), by name.
    pub affinity_sets: Vec<String>,
}

impl Branch {
    /// A fresh branch of probability 1.
    pub fn new() -> Self {
        Self {
            prob: 1.0,
            mark: 0,
            dnat: None,
            decided: None,
            dispatched: Vec::new(),
            affinity_sets: Vec::new(),
        }
    }

    fn dst(&self, pkt: &Packet) -> IpAddr {
        self.dnat.map_or(pkt.dst, |d| d.ip())
    }

    fn dport(&self, pkt: &Packet) -> u16 {
        self.dnat.map_or(pkt.dst_port, |d| d.port())
    }
}

impl Default for Branch {
    fn default() -> Self {
        Self::new()
    }
}

/// A walker over one [`View`] for one packet.
pub struct Walker<'a> {
    view: &'a View<'a>,
    env: &'a Env,
    pkt: &'a Packet,
    /// Objects visited.
    pub path: Vec<Hop>,
    /// The first thing that could not be interpreted.
    pub error: Option<String>,
    /// A prefix for hop objects (`ip kproxy`).
    pub table: String,
}

#[derive(Debug, Clone)]
enum Val {
    Addr(IpAddr),
    Str(String),
    /// An interface name (`iifname`): compared with nft's string semantics.
    Name(String),
    Num(u64),
    Numgen(u64, u64),
}

impl Val {
    fn text(&self) -> String {
        match self {
            Val::Addr(a) => a.to_string(),
            Val::Str(s) => s.clone(),
            Val::Name(s) => format!("\"{s}\""),
            Val::Num(n) => n.to_string(),
            Val::Numgen(..) => "<numgen>".into(),
        }
    }
}

/// Whether one value matches one element component (a prefix contains an address).
fn component_matches(v: &Val, comp: &str) -> bool {
    let comp = comp.trim();
    match v {
        Val::Addr(a) => {
            if comp.contains('/') {
                comp.parse::<IpNet>().is_ok_and(|n| n.contains(a))
            } else {
                comp.parse::<IpAddr>().is_ok_and(|c| c == *a)
            }
        }
        Val::Name(name) => name_matches(name, comp),
        _ => v.text() == comp,
    }
}

/// nft's comparison of an interface name with a string literal: quoted or bare, and a trailing
/// `*` makes it a prefix (`"veth*"`). An empty name (no interface) matches no non-empty prefix.
fn name_matches(name: &str, literal: &str) -> bool {
    let lit = literal
        .strip_prefix('"')
        .and_then(|l| l.strip_suffix('"'))
        .unwrap_or(literal);
    match lit.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == lit,
    }
}

fn key_matches(vals: &[Val], key: &str) -> bool {
    let comps: Vec<&str> = key.split(" . ").collect();
    comps.len() == vals.len() && vals.iter().zip(comps).all(|(v, c)| component_matches(v, c))
}

const MAX_DEPTH: usize = 16;

/// Tokens of a rule: whitespace-separated, braces and commas on their own.
fn tokens(rule: &str) -> Vec<String> {
    rule.replace('{', " { ")
        .replace('}', " } ")
        .replace(',', " , ")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn parse_num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A statement ending a rule.
enum Stmt {
    Jump(String),
    Goto(String),
    Return,
    Accept,
    Drop,
    Reject,
    Masquerade,
    Vmap(Vec<Val>, String),
    DnatTo(SocketAddr),
    DnatMap(Vec<Val>, String),
    MarkOr(u32),
    MarkXor(u32),
    Update,
    /// `numgen random mod N I goto C` (affinity chains): matched with probability 1/N.
    NumgenGoto(u64, String),
}

impl<'a> Walker<'a> {
    /// A walker for `pkt` over `view`.
    pub fn new(
        view: &'a View<'a>,
        env: &'a Env,
        pkt: &'a Packet,
        table: impl Into<String>,
    ) -> Self {
        Self {
            view,
            env,
            pkt,
            path: Vec::new(),
            error: None,
            table: table.into(),
        }
    }

    /// Walks every branch in `live` through the base chains `chains` in order (the hooks a
    /// packet crosses, by priority): a branch dropped or rejected goes to `refused` with how it
    /// ended, the others come back to go on.
    pub fn base_chains(
        &mut self,
        chains: &[&str],
        live: Vec<Branch>,
        refused: &mut Vec<(Branch, End)>,
    ) -> Vec<Branch> {
        let mut live = live;
        for chain in chains {
            let mut next = Vec::new();
            for b in live {
                for (b, end) in self.base_chain(chain, b) {
                    match end {
                        End::Drop | End::Reject => refused.push((b, end)),
                        _ => next.push(b),
                    }
                }
            }
            live = next;
        }
        live
    }

    /// Walks a base chain; returns every branch with how it ended.
    pub fn base_chain(&mut self, chain: &str, b: Branch) -> Vec<(Branch, End)> {
        let Some(rules) = self.view.chains.get(chain) else {
            return vec![(b, End::Continue)];
        };
        self.path.push(Hop {
            depth: 0,
            object: format!("{} chain {chain}", self.table),
            detail: "(base chain)".into(),
        });
        let rules = rules.clone();
        self.chain(chain, &rules, b, 1)
            .into_iter()
            .map(|(b, e)| (b, e.unwrap_or(End::Continue)))
            .collect()
    }

    /// `None` end: continue in the caller.
    fn chain(
        &mut self,
        name: &str,
        rules: &[String],
        b: Branch,
        depth: usize,
    ) -> Vec<(Branch, Option<End>)> {
        if depth > MAX_DEPTH {
            self.error
                .get_or_insert(format!("chains nested deeper than {MAX_DEPTH} at {name}"));
            return vec![(b, None)];
        }
        let mut live = vec![b];
        let mut done = Vec::new();
        for text in rules {
            if live.is_empty() {
                break;
            }
            let mut next = Vec::new();
            for b in live {
                match self.rule(name, text, b, depth) {
                    Ok(outs) => {
                        for (b, end, cont) in outs {
                            match (end, cont) {
                                (None, true) => next.push(b),
                                (end, _) => done.push((b, end)),
                            }
                        }
                    }
                    Err(e) => {
                        self.error.get_or_insert(e);
                        return vec![];
                    }
                }
            }
            live = next;
        }
        done.extend(live.into_iter().map(|b| (b, None)));
        done
    }

    fn selector(&self, t: &[String], i: &mut usize, b: &Branch) -> Result<Val, String> {
        let pkt = self.pkt;
        if t.get(*i).map(String::as_str) == Some("iifname") {
            *i += 1;
            return Ok(Val::Name(pkt.ingress().to_string()));
        }
        let two = (
            t.get(*i).map(String::as_str),
            t.get(*i + 1).map(String::as_str),
        );
        let v = match two {
            (Some("ip" | "ip6"), Some("saddr")) => Val::Addr(pkt.src),
            (Some("ip" | "ip6"), Some("daddr")) => Val::Addr(b.dst(pkt)),
            (Some("meta"), Some("l4proto")) => Val::Str(pkt.proto.as_str().into()),
            (Some("meta"), Some("iifname")) => Val::Name(pkt.ingress().to_string()),
            (Some("th" | "tcp" | "udp" | "sctp"), Some("dport")) => {
                Val::Num(u64::from(b.dport(pkt)))
            }
            (Some("ct"), Some("state")) => Val::Str("new".into()),
            (Some("ct"), Some("status")) => {
                Val::Str(if b.dnat.is_some() { "dnat" } else { "none" }.into())
            }
            (Some("fib"), Some(which @ ("saddr" | "daddr"))) => {
                if t.get(*i + 2).map(String::as_str) != Some("type") {
                    return Err("fib without `type`".into());
                }
                let addr = if which == "saddr" {
                    pkt.src
                } else {
                    b.dst(pkt)
                };
                *i += 1;
                Val::Str(
                    if self.env.is_local(&addr) {
                        "local"
                    } else {
                        "unicast"
                    }
                    .into(),
                )
            }
            (Some("meta"), Some("mark")) => {
                // `meta mark & M`
                if t.get(*i + 2).map(String::as_str) == Some("&") {
                    let m = t
                        .get(*i + 3)
                        .and_then(|s| parse_num(s))
                        .ok_or("mark mask")?;
                    *i += 2;
                    Val::Num(u64::from(b.mark) & m)
                } else {
                    Val::Num(u64::from(b.mark))
                }
            }
            (Some("numgen"), Some("random")) => {
                if t.get(*i + 2).map(String::as_str) != Some("mod") {
                    return Err("numgen without mod".into());
                }
                let n = t
                    .get(*i + 3)
                    .and_then(|s| parse_num(s))
                    .ok_or("numgen modulus")?;
                *i += 2;
                let mut off = 0;
                if t.get(*i + 2).map(String::as_str) == Some("offset") {
                    off = t
                        .get(*i + 3)
                        .and_then(|s| parse_num(s))
                        .ok_or("numgen offset")?;
                    *i += 2;
                }
                Val::Numgen(n, off)
            }
            (a, b2) => {
                return Err(format!(
                    "selector `{} {}` is outside kproxy's subset",
                    a.unwrap_or(""),
                    b2.unwrap_or("")
                ));
            }
        };
        *i += 2;
        Ok(v)
    }

    fn concat(&self, t: &[String], i: &mut usize, b: &Branch) -> Result<Vec<Val>, String> {
        let mut vals = vec![self.selector(t, i, b)?];
        while t.get(*i).map(String::as_str) == Some(".") {
            *i += 1;
            vals.push(self.selector(t, i, b)?);
        }
        Ok(vals)
    }

    fn set_has(&self, name: &str, vals: &[Val]) -> Result<bool, String> {
        Ok(self.lookup(name, vals)?.is_some())
    }

    fn map_get(&self, name: &str, vals: &[Val]) -> Result<Option<(String, String)>, String> {
        Ok(self
            .lookup(name, vals)?
            .map(|(k, v)| (k, v.unwrap_or_default())))
    }

    /// The element matching `vals`: the exact key first, then the elements holding a prefix.
    fn lookup(&self, name: &str, vals: &[Val]) -> Result<Option<(String, Option<String>)>, String> {
        let sets = self.view.sets;
        if !sets.exists(name) {
            return Err(format!("set or map @{name} does not exist"));
        }
        let key = vals.iter().map(Val::text).collect::<Vec<_>>().join(" . ");
        if let Some(v) = sets.exact(name, &key) {
            return Ok(Some((key, v)));
        }
        Ok(sets
            .ranged(name)
            .into_iter()
            .find(|(k, _)| key_matches(vals, k)))
    }

    /// Evaluates one rule: `(branch, end, continue)` triples; `end` `None` with `continue`
    /// means the next rule sees the branch; `None` without `continue` means RETURN.
    #[allow(
        clippy::type_complexity,
        reason = "a private result shape, documented above"
    )]
    fn rule(
        &mut self,
        chain: &str,
        text: &str,
        b: Branch,
        depth: usize,
    ) -> Result<Vec<(Branch, Option<End>, bool)>, String> {
        let t = tokens(text);
        let mut i = 0;
        let mut b = b;
        let miss = |b: Branch| Ok(vec![(b, None, true)]);
        let stmt = loop {
            let tok = t
                .get(i)
                .map(String::as_str)
                .ok_or_else(|| format!("rule `{text}` has no statement"))?;
            match tok {
                "jump" | "goto" => {
                    let c = t.get(i + 1).ok_or("jump without target")?.clone();
                    break if tok == "jump" {
                        Stmt::Jump(c)
                    } else {
                        Stmt::Goto(c)
                    };
                }
                "return" => break Stmt::Return,
                "accept" => break Stmt::Accept,
                "drop" => break Stmt::Drop,
                "reject" => break Stmt::Reject,
                "masquerade" => break Stmt::Masquerade,
                "counter" => {
                    i += 1;
                    continue;
                }
                "update" => {
                    // `update @set { ip saddr }`: affinity memory, nothing to trace; the rule
                    // goes on.
                    let end = t[i..]
                        .iter()
                        .position(|x| x == "}")
                        .ok_or("unclosed update")?
                        + i;
                    if end + 1 >= t.len() {
                        break Stmt::Update;
                    }
                    i = end + 1;
                    continue;
                }
                "dnat" => {
                    // dnat [ip|ip6] to ...
                    let mut j = i + 1;
                    if matches!(t.get(j).map(String::as_str), Some("ip" | "ip6")) {
                        j += 1;
                    }
                    if t.get(j).map(String::as_str) != Some("to") {
                        return Err(format!("`{text}`: dnat without `to`"));
                    }
                    j += 1;
                    let arg = t.get(j).ok_or("dnat target")?;
                    if let Ok(sa) = arg.parse::<SocketAddr>() {
                        break Stmt::DnatTo(sa);
                    }
                    let vals = self.concat(&t, &mut j, &b)?;
                    if t.get(j).map(String::as_str) != Some("map") {
                        return Err(format!("`{text}`: dnat expression outside kproxy's subset"));
                    }
                    let m = t
                        .get(j + 1)
                        .and_then(|m| m.strip_prefix('@'))
                        .ok_or("map name")?;
                    break Stmt::DnatMap(vals, m.to_string());
                }
                "meta" if t.get(i + 2).map(String::as_str) == Some("set") => {
                    // meta mark set meta mark | X  /  ^ X
                    let op = t.get(i + 5).map(String::as_str);
                    let v = t
                        .get(i + 6)
                        .and_then(|s| parse_num(s))
                        .ok_or("mark value")?;
                    let v = u32::try_from(v).map_err(|_| "mark value")?;
                    if i + 7 < t.len() {
                        // More statements follow (`... meta mark set ... masquerade`).
                        match op {
                            Some("|") => b.mark |= v,
                            Some("^") => b.mark ^= v,
                            _ => {
                                return Err(format!(
                                    "`{text}`: mark statement outside kproxy's subset"
                                ));
                            }
                        }
                        i += 7;
                        continue;
                    }
                    break match op {
                        Some("|") => Stmt::MarkOr(v),
                        Some("^") => Stmt::MarkXor(v),
                        _ => {
                            return Err(format!(
                                "`{text}`: mark statement outside kproxy's subset"
                            ));
                        }
                    };
                }
                _ => {}
            }
            let vals = self.concat(&t, &mut i, &b)?;
            if let [Val::Numgen(n, _)] = vals.as_slice() {
                // numgen random mod N I goto C
                let idx = t.get(i).and_then(|s| parse_num(s)).ok_or("numgen index")?;
                if idx != 0 || t.get(i + 1).map(String::as_str) != Some("goto") {
                    return Err(format!("`{text}`: numgen form outside kproxy's subset"));
                }
                let c = t.get(i + 2).ok_or("goto target")?.clone();
                break Stmt::NumgenGoto(*n, c);
            }
            let op = t
                .get(i)
                .map(String::as_str)
                .ok_or_else(|| format!("`{text}` ends after a selector"))?;
            let (neg, rhs_at) = match op {
                "!=" => (true, i + 1),
                "==" => (false, i + 1),
                _ => (false, i),
            };
            let rhs = t.get(rhs_at).map(String::as_str).unwrap_or("");
            if rhs == "vmap" {
                let m = t
                    .get(rhs_at + 1)
                    .and_then(|m| m.strip_prefix('@'))
                    .ok_or("vmap name")?;
                break Stmt::Vmap(vals, m.to_string());
            }
            let (hit, after) = if let Some(set) = rhs.strip_prefix('@') {
                if set.starts_with("affinity-") {
                    // ClientIP affinity memory: empty for a client's first connection.
                    (false, rhs_at + 1)
                } else {
                    (self.set_has(set, &vals)?, rhs_at + 1)
                }
            } else if rhs == "{" {
                let end = t[rhs_at..]
                    .iter()
                    .position(|x| x == "}")
                    .ok_or("unclosed {")?
                    + rhs_at;
                let any = t[rhs_at + 1..end]
                    .iter()
                    .filter(|x| *x != ",")
                    .any(|x| vals.len() == 1 && component_matches(&vals[0], x));
                (any, end + 1)
            } else {
                if vals.len() != 1 {
                    return Err(format!("`{text}`: concatenation compared with a literal"));
                }
                let lit = match (&vals[0], parse_num(rhs)) {
                    (Val::Num(n), Some(x)) => *n == x,
                    _ => component_matches(&vals[0], rhs),
                };
                (lit, rhs_at + 1)
            };
            if hit == neg {
                return miss(b);
            }
            i = after;
        };
        self.path.push(Hop {
            depth,
            object: format!("{} chain {chain}", self.table),
            detail: text.to_string(),
        });
        if let Some(set) = t.iter().find_map(|x| x.strip_prefix("@affinity-")) {
            b.affinity_sets.push(format!("affinity-{set}"));
        }
        let decided = |mut b: Branch, map: Option<String>| {
            b.decided = Some((chain.to_string(), map));
            b
        };
        Ok(match stmt {
            Stmt::Return => vec![(b, None, false)],
            Stmt::Accept => vec![(b, Some(End::Accept), false)],
            Stmt::Drop => vec![(decided(b, None), Some(End::Drop), false)],
            Stmt::Reject => vec![(decided(b, None), Some(End::Reject), false)],
            Stmt::Masquerade => vec![(b, Some(End::Masquerade), false)],
            Stmt::Update => vec![(b, None, true)],
            Stmt::MarkOr(m) => {
                b.mark |= m;
                vec![(b, None, true)]
            }
            Stmt::MarkXor(m) => {
                b.mark ^= m;
                vec![(b, None, true)]
            }
            Stmt::DnatTo(sa) => {
                b.dnat = Some(sa);
                vec![(b, Some(End::Accept), false)]
            }
            Stmt::DnatMap(vals, map) => {
                let Some(Val::Numgen(n, off)) = vals.last().cloned() else {
                    return Err(format!("`{text}`: dnat map without numgen"));
                };
                let mut out = Vec::new();
                let mut missing = 0.0;
                for idx in off..off + n {
                    let mut key = vals.clone();
                    *key.last_mut().ok_or("empty key")? = Val::Num(idx);
                    let mut nb = b.clone();
                    nb.prob /= n as f64;
                    match self.map_get(&map, &key)? {
                        Some((k, v)) => {
                            let target = parse_endpoint(&v).ok_or_else(|| {
                                format!("map @{map}: value `{v}` is not an address . port")
                            })?;
                            self.path.push(Hop {
                                depth: depth + 1,
                                object: format!("{} map {map}", self.table),
                                detail: format!("[p={:.4}] {k} : {v}", 1.0 / n as f64),
                            });
                            nb.dnat = Some(target);
                            out.push((nb, Some(End::Accept), false));
                        }
                        None => {
                            missing += nb.prob;
                            // A lookup miss breaks the rule: the next rule sees the packet.
                            out.push((nb, None, true));
                        }
                    }
                }
                if missing > 0.0 {
                    self.path.push(Hop {
                        depth: depth + 1,
                        object: format!("{} map {map}", self.table),
                        detail: format!("no element for some numgen values (p={missing:.4})"),
                    });
                }
                out
            }
            Stmt::NumgenGoto(n, c) => {
                let p = 1.0 / n as f64;
                let mut taken = b.clone();
                taken.prob *= p;
                let mut rest = b;
                rest.prob *= 1.0 - p;
                let mut out: Vec<_> = self
                    .enter(&c, taken, depth)?
                    .into_iter()
                    .map(|(b, e)| (b, e, false))
                    .collect();
                if rest.prob > 0.0 {
                    out.push((rest, None, true));
                }
                out
            }
            Stmt::Jump(c) => self
                .enter(&c, b, depth)?
                .into_iter()
                .map(|(b, e)| {
                    let cont = e.is_none();
                    (b, e, cont)
                })
                .collect(),
            Stmt::Goto(c) => self
                .enter(&c, b, depth)?
                .into_iter()
                .map(|(b, e)| (b, e, false))
                .collect(),
            Stmt::Vmap(vals, map) => match self.map_get(&map, &vals)? {
                None => vec![(b, None, true)],
                Some((k, v)) => {
                    self.path.push(Hop {
                        depth: depth + 1,
                        object: format!("{} map {map}", self.table),
                        detail: format!("{k} : {v}"),
                    });
                    b.dispatched.push((map.clone(), k));
                    let mut w = v.split_whitespace();
                    match (w.next(), w.next()) {
                        (Some("drop"), None) => {
                            vec![(decided(b, Some(map)), Some(End::Drop), false)]
                        }
                        (Some("accept"), None) => vec![(b, Some(End::Accept), false)],
                        (Some("jump"), Some(c)) => self
                            .enter(c, b, depth)?
                            .into_iter()
                            .map(|(b, e)| {
                                let cont = e.is_none();
                                (b, e, cont)
                            })
                            .collect(),
                        (Some("goto"), Some(c)) => {
                            let mut b = b;
                            // Remember which map sent it, for the rule number of a reject.
                            b.decided = Some((chain.to_string(), Some(map)));
                            self.enter(c, b, depth)?
                                .into_iter()
                                .map(|(b, e)| (b, e, false))
                                .collect()
                        }
                        _ => {
                            return Err(format!(
                                "map @{map}: verdict `{v}` outside kproxy's subset"
                            ));
                        }
                    }
                }
            },
        })
    }

    fn enter(
        &mut self,
        chain: &str,
        b: Branch,
        depth: usize,
    ) -> Result<Vec<(Branch, Option<End>)>, String> {
        let rules = self
            .view
            .chains
            .get(chain)
            .ok_or_else(|| format!("chain {chain} does not exist"))?
            .clone();
        let keep = b.decided.clone();
        Ok(self
            .chain(chain, &rules, b, depth + 1)
            .into_iter()
            .map(|(mut b, e)| {
                // A reject chain entered from a map keeps the map as the decider.
                if let (Some(End::Reject | End::Drop), Some((_, Some(map)))) = (&e, &keep)
                    && b.decided
                        .as_ref()
                        .is_some_and(|(c, m)| c == chain && m.is_none())
                {
                    b.decided = Some((chain.to_string(), Some(map.clone())));
                }
                (b, e)
            })
            .collect())
    }
}

/// `10.0.0.1 . 8080` or `fd00::1 . 8080` → a socket address.
pub fn parse_endpoint(v: &str) -> Option<SocketAddr> {
    let (a, p) = v.split_once(" . ")?;
    Some(SocketAddr::new(
        a.trim().parse().ok()?,
        p.trim().parse().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test fixtures")]

    use super::*;
    use crate::Origin;
    use kproxy_contract::Protocol;

    /// The mark a packet from `origin` arriving on `iface` leaves the chain with: each rule
    /// that matches sets its own bit.
    fn marks(rules: &[&str], origin: Origin, iface: Option<&str>) -> u32 {
        let sets: BTreeMap<String, Vec<(String, Option<String>)>> = BTreeMap::new();
        let view = View {
            chains: [(
                "c".to_string(),
                rules.iter().map(|r| r.to_string()).collect(),
            )]
            .into(),
            sets: &sets,
        };
        let env = Env::default();
        let pkt = Packet {
            src: "10.0.1.2".parse().unwrap(),
            src_port: None,
            dst: "10.96.0.1".parse().unwrap(),
            dst_port: 80,
            proto: Protocol::Tcp,
            origin,
            in_iface: iface.map(str::to_string),
        };
        let mut w = Walker::new(&view, &env, &pkt, "ip kproxy");
        let out = w.base_chain("c", Branch::new());
        assert_eq!(w.error, None);
        assert_eq!(out.len(), 1);
        out[0].0.mark
    }

    #[test]
    fn iifname_compares_names_prefixes_and_the_empty_output_name() {
        let rules = [
            "iifname \"cbr0\" meta mark set meta mark | 0x00000001",
            "iifname != \"cbr0\" meta mark set meta mark | 0x00000002",
            "iifname \"veth*\" meta mark set meta mark | 0x00000004",
            "meta iifname != \"veth*\" meta mark set meta mark | 0x00000008",
        ];
        assert_eq!(marks(&rules, Origin::Pod, Some("cbr0")), 1 | 8);
        assert_eq!(marks(&rules, Origin::Pod, Some("cbr01")), 2 | 8);
        assert_eq!(marks(&rules, Origin::Pod, Some("veth12")), 2 | 4);
        assert_eq!(marks(&rules, Origin::External, None), 2 | 8);
        // The node's own packet: no input interface, whatever the packet claims.
        assert_eq!(marks(&rules, Origin::Node, Some("cbr0")), 2 | 8);
    }

    #[test]
    fn iifname_in_an_anonymous_set() {
        let rules = ["iifname { \"eth0\", \"veth*\" } meta mark set meta mark | 0x00000001"];
        assert_eq!(marks(&rules, Origin::Pod, Some("veth9")), 1);
        assert_eq!(marks(&rules, Origin::Pod, Some("eth1")), 0);
    }
}
