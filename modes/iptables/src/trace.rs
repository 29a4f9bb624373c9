//! `kproxy trace` over a [`Ruleset`]: walks the built-in hooks a new connection crosses
//! (nat PREROUTING or OUTPUT, filter FORWARD / INPUT / OUTPUT, nat POSTROUTING) through
//! kproxy's chains, interpreting exactly the match and target subset [`crate::render`] emits.
//! The same walker serves `--live`, since [`crate::ruleset::parse_save`] reads the kernel back
//! into the same type. Anything outside that subset makes the verdict
//! [`Verdict::Unknown`], never a guess.
//!
//! Probabilities: `-m statistic --mode random` splits the walk into weighted branches, so a
//! service chain yields every endpoint with its share. `-m recent --rcheck` (ClientIP affinity)
//! never matches: the trace is a client's first connection.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use kproxy_contract::{IpFamily, Protocol};
use kproxy_tracer::{
    Candidate, Env, FrontendKind, Hop, Packet, Trace, Verdict, add_candidate, fold_branches,
};

use crate::names;
use crate::ruleset::{Ruleset, Table, TableRules};

/// An address match: `addr/prefix` or iptables' `addr/mask` form (the dispatch tree's
/// non-contiguous masks).
#[derive(Debug, Clone, Copy)]
struct Net {
    v6: bool,
    addr: u128,
    mask: u128,
}

impl Net {
    fn parse(s: &str) -> Option<Net> {
        let (a, m) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.parse().ok()?;
        let (v6, bits) = match addr {
            IpAddr::V4(_) => (false, 32u32),
            IpAddr::V6(_) => (true, 128u32),
        };
        let mask = if m.is_empty() {
            full(bits)
        } else if let Ok(len) = m.parse::<u32>() {
            if len > bits {
                return None;
            }
            // `/128` shifts by the whole width: checked, not a panic.
            full(bits) & !full(bits).checked_shr(len).unwrap_or(0)
        } else {
            let mask: IpAddr = m.parse().ok()?;
            num(&mask)
        };
        Some(Net {
            v6,
            addr: num(&addr) & mask,
            mask,
        })
    }

    fn contains(&self, ip: &IpAddr) -> bool {
        ip.is_ipv6() == self.v6 && num(ip) & self.mask == self.addr
    }
}

fn full(bits: u32) -> u128 {
    if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    }
}

fn num(ip: &IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(*a)),
        IpAddr::V6(a) => u128::from(*a),
    }
}

/// One match of the subset kproxy writes.
#[derive(Debug, Clone)]
enum Match {
    Src(bool, Net),
    Dst(bool, Net),
    /// `[!] -i NAME`, `[!] -i PREFIX+` (the `bool` after the negation: a `+` wildcard).
    InIface(bool, String, bool),
    Proto(Protocol),
    Dport(Protocol, u16),
    SrcLocal,
    DstLocal,
    Probability(f64),
    RecentCheck(u64),
    RecentSet,
    /// `--ctstate` list (a new connection's first packet is `NEW`, and `DNAT` once NATed).
    CtState(bool, Vec<String>),
    Mark(bool, u32, u32),
}

/// What a rule does when it matches.
#[derive(Debug, Clone, PartialEq)]
enum Target {
    None,
    Jump(String),
    Goto(String),
    Accept,
    Drop,
    Reject,
    Return,
    Dnat(SocketAddr),
    SetXmark(u32, u32),
    Masquerade,
}

#[derive(Debug, Clone)]
struct Rule {
    matches: Vec<Match>,
    target: Target,
    comment: Option<String>,
}

/// Splits a rule the way a shell would, keeping double-quoted strings whole.
fn tokens(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in rule.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

fn proto(s: &str) -> Option<Protocol> {
    match s {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        "sctp" => Some(Protocol::Sctp),
        _ => None,
    }
}

fn hex(s: &str) -> Option<u32> {
    let s = s.trim_start_matches("0x");
    u32::from_str_radix(s, 16).ok()
}

fn value_mask(s: &str) -> Option<(u32, u32)> {
    let (v, m) = s.split_once('/').unwrap_or((s, "0xffffffff"));
    Some((hex(v)?, hex(m)?))
}

/// Parses one rule body; `Err` names what is outside the subset kproxy writes.
fn parse(rule: &str) -> Result<Rule, String> {
    let t = tokens(rule);
    let mut i = 0;
    let mut r = Rule {
        matches: Vec::new(),
        target: Target::None,
        comment: None,
    };
    let mut neg = false;
    let mut module = String::new();
    let arg = |i: usize| -> Result<&str, String> {
        t.get(i)
            .map(String::as_str)
            .ok_or_else(|| format!("`{rule}`: missing argument"))
    };
    while i < t.len() {
        let tok = t[i].as_str();
        match tok {
            "!" => {
                neg = true;
                i += 1;
                continue;
            }
            "-s" | "-d" => {
                let n =
                    Net::parse(arg(i + 1)?).ok_or_else(|| format!("bad address in `{rule}`"))?;
                r.matches.push(if tok == "-s" {
                    Match::Src(neg, n)
                } else {
                    Match::Dst(neg, n)
                });
                i += 2;
            }
            "-i" => {
                let name = arg(i + 1)?;
                let (name, wildcard) = match name.strip_suffix('+') {
                    Some(prefix) => (prefix, true),
                    None => (name, false),
                };
                r.matches
                    .push(Match::InIface(neg, name.to_string(), wildcard));
                i += 2;
            }
            "-p" => {
                let p = proto(arg(i + 1)?).ok_or_else(|| format!("protocol in `{rule}`"))?;
                r.matches.push(Match::Proto(p));
                i += 2;
            }
            "-m" => {
                module = arg(i + 1)?.to_string();
                i += 2;
            }
            "--comment" => {
                r.comment = Some(arg(i + 1)?.to_string());
                i += 2;
            }
            "--dport" => {
                let p = proto(&module)
                    .ok_or_else(|| format!("--dport without -m PROTO in `{rule}`"))?;
                let port = arg(i + 1)?
                    .parse()
                    .map_err(|_| format!("port in `{rule}`"))?;
                r.matches.push(Match::Dport(p, port));
                i += 2;
            }
            "--dst-type" | "--src-type" if module == "addrtype" => {
                if arg(i + 1)? != "LOCAL" || neg {
                    return Err(format!("addrtype form in `{rule}`"));
                }
                r.matches.push(if tok == "--src-type" {
                    Match::SrcLocal
                } else {
                    Match::DstLocal
                });
                i += 2;
            }
            "--mode" if module == "statistic" && arg(i + 1)? == "random" => i += 2,
            "--probability" => {
                let p = arg(i + 1)?
                    .parse()
                    .map_err(|_| format!("probability in `{rule}`"))?;
                r.matches.push(Match::Probability(p));
                i += 2;
            }
            "--rcheck" => {
                r.matches.push(Match::RecentCheck(0));
                i += 1;
            }
            "--seconds" => {
                let s = arg(i + 1)?
                    .parse()
                    .map_err(|_| format!("seconds in `{rule}`"))?;
                if let Some(Match::RecentCheck(x)) = r.matches.last_mut() {
                    *x = s;
                }
                i += 2;
            }
            "--set" if module == "recent" => {
                r.matches.push(Match::RecentSet);
                i += 1;
            }
            "--reap" | "--rsource" => i += 1,
            "--name" | "--mask" => i += 2,
            "--ctstate" => {
                let states = arg(i + 1)?.split(',').map(str::to_string).collect();
                r.matches.push(Match::CtState(neg, states));
                i += 2;
            }
            "--mark" => {
                let (v, m) = value_mask(arg(i + 1)?).ok_or_else(|| format!("mark in `{rule}`"))?;
                r.matches.push(Match::Mark(neg, v, m));
                i += 2;
            }
            "-j" | "-g" => {
                let target = arg(i + 1)?;
                let rest: Vec<&str> = t[i + 2..].iter().map(String::as_str).collect();
                r.target = match (target, rest.as_slice()) {
                    ("ACCEPT", []) => Target::Accept,
                    ("DROP", []) => Target::Drop,
                    ("RETURN", []) => Target::Return,
                    ("REJECT", _) => Target::Reject,
                    ("MASQUERADE", _) => Target::Masquerade,
                    ("DNAT", ["--to-destination", to]) => Target::Dnat(
                        to.parse()
                            .map_err(|_| format!("DNAT destination in `{rule}`"))?,
                    ),
                    ("MARK", ["--set-xmark", vm]) => {
                        let (v, m) = value_mask(vm).ok_or_else(|| format!("mark in `{rule}`"))?;
                        Target::SetXmark(v, m)
                    }
                    (chain, []) if names::is_owned(chain) => {
                        if tok == "-g" {
                            Target::Goto(chain.to_string())
                        } else {
                            Target::Jump(chain.to_string())
                        }
                    }
                    _ => return Err(format!("target outside kproxy's subset in `{rule}`")),
                };
                break;
            }
            other => return Err(format!("`{other}` is outside kproxy's subset in `{rule}`")),
        }
        neg = false;
    }
    Ok(r)
}

/// How a walk through one chain ended for one branch.
#[derive(Debug, Clone, PartialEq)]
enum End {
    /// Fell off the end: the caller continues.
    Continue,
    /// RETURN: this chain stops, the caller continues.
    Return,
    Accept,
    Drop,
    Reject,
    Dnat(SocketAddr),
    Masquerade,
}

/// One weighted possibility of a walk.
#[derive(Debug, Clone)]
struct Branch {
    prob: f64,
    mark: u32,
    /// Source/destination as the current table sees them.
    dst: IpAddr,
    /// The chain and rule that decided a DROP/REJECT.
    decided: Option<(String, String)>,
    /// The service port named by the rule that DNATed.
    service: Option<String>,
    frontend: Option<FrontendKind>,
    affinity: Option<u64>,
    /// POSTROUTING masqueraded it.
    masquerade: bool,
}

struct Walker<'a> {
    env: &'a Env,
    pkt: &'a Packet,
    owners: &'a BTreeMap<String, String>,
    table_name: Table,
    table: &'a TableRules,
    path: Vec<Hop>,
    error: Option<String>,
}

const MAX_DEPTH: usize = 32;

impl Walker<'_> {
    fn matches(&self, m: &Match, b: &Branch) -> Option<f64> {
        let yes = |c: bool| if c { Some(1.0) } else { None };
        match m {
            Match::Src(neg, n) => yes(n.contains(&self.pkt.src) != *neg),
            Match::Dst(neg, n) => yes(n.contains(&b.dst) != *neg),
            Match::InIface(neg, name, wildcard) => {
                // The kernel compares the input device's name; in a chain reached from OUTPUT
                // there is none (an empty name), which `Packet::ingress` gives.
                let iface = self.pkt.ingress();
                let hit = if *wildcard {
                    iface.starts_with(name.as_str())
                } else {
                    iface == name
                };
                yes(hit != *neg)
            }
            Match::Proto(p) => yes(*p == self.pkt.proto),
            Match::Dport(p, port) => yes(*p == self.pkt.proto && *port == self.pkt.dst_port),
            Match::SrcLocal => yes(self.env.is_local(&self.pkt.src)),
            Match::DstLocal => yes(self.env.is_local(&b.dst)),
            Match::Probability(p) => (*p > 0.0).then_some(*p),
            Match::RecentCheck(_) => None,
            Match::RecentSet => Some(1.0),
            Match::CtState(neg, states) => {
                // The first packet of a new connection; DNAT once the nat table rewrote it.
                let natted = b.dst != self.pkt.dst;
                let hit = states.iter().any(|s| s == "NEW" || (s == "DNAT" && natted));
                yes(hit != *neg)
            }
            Match::Mark(neg, v, m) => yes(((b.mark & m) == *v) != *neg),
        }
    }

    /// Walks `chain` for branch `b`; returns every resulting branch with how it ended.
    fn chain(
        &mut self,
        chain: &str,
        rules: &[String],
        b: Branch,
        depth: usize,
    ) -> Vec<(Branch, End)> {
        if depth > MAX_DEPTH {
            self.error = Some(format!("chain nesting deeper than {MAX_DEPTH} at {chain}"));
            return vec![(b, End::Continue)];
        }
        let mut live = vec![b];
        let mut done = Vec::new();
        let mut returned = Vec::new();
        for text in rules {
            if live.is_empty() {
                break;
            }
            let rule = match parse(text) {
                Ok(r) => r,
                Err(e) => {
                    self.error.get_or_insert(e);
                    continue;
                }
            };
            let mut next = Vec::new();
            for mut b in live {
                // An affinity check that a first connection fails still says the service
                // port has ClientIP affinity.
                for m in &rule.matches {
                    if let Match::RecentCheck(s) = m {
                        b.affinity = Some(*s);
                    }
                }
                let mut p = 1.0;
                let mut hit = true;
                for m in &rule.matches {
                    match self.matches(m, &b) {
                        Some(x) => p *= x,
                        None => {
                            hit = false;
                            break;
                        }
                    }
                }
                if !hit {
                    next.push(b);
                    continue;
                }
                let mut taken = b.clone();
                taken.prob *= p;
                if p < 1.0 {
                    let mut missed = b.clone();
                    missed.prob *= 1.0 - p;
                    next.push(missed);
                }
                let detail = if p < 1.0 {
                    format!("[p={p:.4}] {text}")
                } else {
                    text.clone()
                };
                self.path.push(Hop {
                    depth,
                    object: format!("{} {chain}", self.table_name),
                    detail,
                });
                for (b, end) in self.target(chain, text, &rule, taken, depth) {
                    match end {
                        End::Continue => next.push(b),
                        End::Return => returned.push((b, End::Continue)),
                        end => done.push((b, end)),
                    }
                }
            }
            live = next;
        }
        done.extend(live.into_iter().map(|b| (b, End::Continue)));
        done.extend(returned);
        done
    }

    fn target(
        &mut self,
        chain: &str,
        text: &str,
        rule: &Rule,
        mut b: Branch,
        depth: usize,
    ) -> Vec<(Branch, End)> {
        let decided = |mut b: Branch| {
            b.decided = Some((chain.to_string(), text.to_string()));
            b
        };
        match &rule.target {
            Target::None => vec![(b, End::Continue)],
            Target::Accept => vec![(b, End::Accept)],
            Target::Drop => vec![(decided(b), End::Drop)],
            Target::Reject => vec![(decided(b), End::Reject)],
            Target::Masquerade => vec![(b, End::Masquerade)],
            Target::Return => vec![(b, End::Return)],
            Target::SetXmark(v, m) => {
                b.mark = (b.mark & !m) ^ v;
                vec![(b, End::Continue)]
            }
            Target::Dnat(to) => {
                b.service = self
                    .owners
                    .get(chain)
                    .cloned()
                    .or_else(|| {
                        rule.comment
                            .as_ref()
                            .map(|c| c.split(" -> ").next().unwrap_or(c).to_string())
                    })
                    .or(b.service);
                vec![(b, End::Dnat(*to))]
            }
            Target::Jump(next) | Target::Goto(next) => {
                let dispatch = self.table_name == Table::Nat
                    && (chain == names::SERVICES || chain.starts_with(names::SERVICES_TREE));
                if let Some(c) = rule.comment.as_ref().filter(|_| dispatch) {
                    if c.ends_with(" cluster IP") {
                        b.frontend = Some(FrontendKind::ClusterIp);
                    } else if c.ends_with(" external IP") {
                        b.frontend = Some(FrontendKind::ExternalIp);
                    } else if c.ends_with(" loadbalancer IP") {
                        b.frontend = Some(FrontendKind::LoadBalancer);
                    }
                }
                if next == names::NODEPORTS && self.table_name == Table::Nat {
                    b.frontend = Some(FrontendKind::NodePort);
                }
                let Some(rules) = self.table.chains.get(next) else {
                    self.error = Some(format!("{chain} jumps to {next}, which does not exist"));
                    return vec![(b, End::Continue)];
                };
                let rules = rules.clone();
                let out = self.chain(next, &rules, b, depth + 1);
                if matches!(rule.target, Target::Goto(_)) {
                    // A goto returns to the caller's caller; kproxy never writes one.
                    self.error
                        .get_or_insert(format!("goto in {chain} is outside kproxy's subset"));
                }
                out
            }
        }
    }
}

/// The built-in chain's kproxy jumps, in kernel order: the plan inserts them with `-I` in
/// sorted order, so the last one sorted is first in the kernel.
fn builtin(table: &TableRules, hook: &str) -> Vec<String> {
    let mut rules: Vec<String> = table
        .jumps
        .iter()
        .filter(|j| j.builtin == hook)
        .map(|j| j.rule.clone())
        .collect();
    rules.reverse();
    rules
}

/// Traces `pkt` through `rules`.
pub fn trace(rules: &Ruleset, env: &Env, pkt: &Packet) -> Trace {
    let family = pkt.family();
    if IpFamily::of(&pkt.src) != family {
        return Trace::new(Verdict::Unknown {
            reason: "source and destination are of different families".into(),
        });
    }
    let empty = TableRules::default();
    let nat = rules.table(family, Table::Nat).unwrap_or(&empty);
    let filter = rules.table(family, Table::Filter).unwrap_or(&empty);
    let mut path = Vec::new();
    let mut error = None;
    let start = Branch {
        prob: 1.0,
        mark: 0,
        dst: pkt.dst,
        decided: None,
        service: None,
        frontend: None,
        affinity: None,
        masquerade: false,
    };
    let mut run =
        |table_name: Table, table: &TableRules, hook: &str, b: Branch, path: &mut Vec<Hop>| {
            let mut w = Walker {
                env,
                pkt,
                owners: &rules.owners,
                table_name,
                table,
                path: Vec::new(),
                error: None,
            };
            path.push(Hop {
                depth: 0,
                object: format!("{table_name} {hook}"),
                detail: format!(
                    "(built-in hook; kproxy's jumps: {})",
                    table.jumps.iter().filter(|j| j.builtin == hook).count()
                ),
            });
            let out = w.chain(hook, &builtin(table, hook), b, 1);
            path.extend(w.path);
            if let Some(e) = w.error {
                error.get_or_insert(e);
            }
            out
        };

    // 1. nat: destination NAT.
    let nat_hook = if pkt.origin.is_local() {
        "OUTPUT"
    } else {
        "PREROUTING"
    };
    let mut outcomes: Vec<(Branch, End)> = Vec::new();
    for (mut b, end) in run(Table::Nat, nat, nat_hook, start, &mut path) {
        let dnat = match end {
            End::Dnat(to) => Some(to),
            _ => None,
        };
        if let Some(to) = dnat {
            b.dst = to.ip();
        }
        path.push(Hop {
            depth: 0,
            object: "after nat".into(),
            detail: match dnat {
                Some(to) => format!("branch p={:.4}: DNAT to {to}", b.prob),
                None => format!("branch p={:.4}: not DNATed", b.prob),
            },
        });
        // 2. filter, after routing on the (possibly rewritten) destination.
        let mut hooks = Vec::new();
        if pkt.origin.is_local() {
            hooks.push("OUTPUT");
        }
        if env.is_local(&b.dst) {
            hooks.push("INPUT");
        } else if !pkt.origin.is_local() {
            hooks.push("FORWARD");
        }
        let mut branches = vec![b];
        for hook in hooks {
            let mut next = Vec::new();
            for b in branches {
                for (b, end) in run(Table::Filter, filter, hook, b, &mut path) {
                    match end {
                        End::Drop | End::Reject => outcomes.push((b, end)),
                        _ => next.push(b),
                    }
                }
            }
            branches = next;
        }
        // 3. nat POSTROUTING: masquerade.
        for b in branches {
            for (mut b, end) in run(Table::Nat, nat, "POSTROUTING", b, &mut path) {
                b.masquerade = end == End::Masquerade;
                outcomes.push((b, dnat.map_or(End::Continue, End::Dnat)));
            }
        }
    }
    let verdict = match error {
        Some(reason) => Verdict::Unknown { reason },
        None => verdict(outcomes),
    };
    Trace { verdict, path }
}

/// Folds the branches into one verdict.
fn verdict(outcomes: Vec<(Branch, End)>) -> Verdict {
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut refused: Option<Verdict> = None;
    let mut plain = 0.0;
    let (mut service, mut frontend, mut affinity) = (None, None, None);
    for (b, end) in &outcomes {
        match end {
            End::Dnat(to) => {
                add_candidate(&mut candidates, *to, b.masquerade, b.prob, || None);
                service = service.or(b.service.clone());
                frontend = frontend.or(b.frontend);
                affinity = affinity.or(b.affinity);
            }
            End::Drop | End::Reject => {
                let (chain, _) = b.decided.clone().unwrap_or_default();
                let (rule, reason) = refusal_rule(&chain, end == &End::Reject);
                refused = Some(if end == &End::Reject {
                    Verdict::Reject { rule, reason }
                } else {
                    Verdict::Drop { rule, reason }
                });
            }
            _ => plain += b.prob,
        }
    }
    fold_branches(refused, candidates, plain, |candidates| Verdict::Forward {
        service,
        frontend,
        candidates,
        affinity,
    })
}

/// Which rule of `docs/semantics.md` a REJECT/DROP in `chain` implements (0: none).
fn refusal_rule(chain: &str, reject: bool) -> (u8, String) {
    if reject {
        return (
            5,
            format!("REJECT in {chain}: the service has no endpoints"),
        );
    }
    if chain == names::PROXY_FIREWALL {
        (
            13,
            format!("DROP in {chain}: source outside loadBalancerSourceRanges"),
        )
    } else if chain == names::SERVICES || chain.starts_with(names::SERVICES_TREE) {
        (
            6,
            format!("DROP in {chain}: no local endpoints for internal traffic"),
        )
    } else if chain == names::EXTERNAL_SERVICES || chain.starts_with("KPROXY-EXTS-") {
        (
            7,
            format!("DROP in {chain}: no local endpoints for external traffic"),
        )
    } else if chain == names::FORWARD {
        (21, format!("DROP in {chain}: conntrack INVALID"))
    } else {
        (0, format!("DROP in {chain}"))
    }
}

#[cfg(test)]
mod tests;

impl<K: crate::IptablesKernel> kproxy_tracer::Traceable for crate::IptablesMode<K> {
    fn trace(&self, rules: &Ruleset, env: &Env, packet: &Packet) -> Trace {
        trace(rules, env, packet)
    }
}
