//! One rule, written exactly the way `iptables-save` prints it back.
//!
//! Writing the canonical form (address before protocol before matches, `/32` host masks,
//! `--set-xmark` for MARK, probabilities as the kernel stores them) lets a plan compare rendered
//! rules with what `iptables-save` returns, so a full resync after a restart rewrites nothing
//! that is already right, and `--dry-run` against the live kernel shows only real differences.

use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use kproxy_contract::{IpFamily, Protocol};

/// A rule under construction. `Display`-free on purpose: [`RuleBuilder::build`] yields the text.
#[derive(Debug, Default, Clone)]
pub struct RuleBuilder {
    src: Option<(bool, String)>,
    dst: Option<(bool, String)>,
    in_iface: Option<(bool, String)>,
    proto: Option<Protocol>,
    matches: String,
}

/// Formats an address as a host CIDR (`/32`, `/128`).
pub fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

/// Formats a network the way iptables-save does (host bits cleared).
pub fn net(n: &IpNet) -> String {
    n.trunc().to_string()
}

/// Quotes a string as `xtables_save_string` does: bare when it is only `[A-Za-z0-9_-]`,
/// otherwise in double quotes. Characters that would need escaping are replaced, since our
/// comments are built from Kubernetes names and never need them.
pub fn quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c == '"' || c == '\\' || c == '\'' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    if safe {
        cleaned
    } else {
        format!("\"{cleaned}\"")
    }
}

impl RuleBuilder {
    /// An empty rule.
    pub fn new() -> Self {
        Self::default()
    }

    /// `-s`.
    pub fn src(mut self, src: impl Into<String>) -> Self {
        self.src = Some((false, src.into()));
        self
    }

    /// `! -s`.
    pub fn not_src(mut self, src: impl Into<String>) -> Self {
        self.src = Some((true, src.into()));
        self
    }

    /// `-d`.
    pub fn dst(mut self, dst: impl Into<String>) -> Self {
        self.dst = Some((false, dst.into()));
        self
    }

    /// `! -d`.
    pub fn not_dst(mut self, dst: impl Into<String>) -> Self {
        self.dst = Some((true, dst.into()));
        self
    }

    /// `-i NAME`, or `! -i NAME` when `negated`. NAME ending in `+` matches every interface
    /// whose name starts with what precedes it. The caller passes a checked name
    /// ([`kproxy_contract::check_interface_name`]): iptables-save prints it unquoted.
    pub fn in_iface(mut self, negated: bool, name: impl Into<String>) -> Self {
        self.in_iface = Some((negated, name.into()));
        self
    }

    /// `-p PROTO`.
    pub fn proto(mut self, proto: Protocol) -> Self {
        self.proto = Some(proto);
        self
    }

    /// `-m comment --comment TEXT`.
    pub fn comment(mut self, text: &str) -> Self {
        let _ = write!(self.matches, " -m comment --comment {}", quote(text));
        self
    }

    /// `-m PROTO --dport PORT` (needs [`proto`](Self::proto)).
    pub fn dport(mut self, proto: Protocol, port: u16) -> Self {
        let _ = write!(self.matches, " -m {proto} --dport {port}");
        self
    }

    /// Any other match, written verbatim (must already be canonical).
    pub fn raw(mut self, text: &str) -> Self {
        self.matches.push(' ');
        self.matches.push_str(text);
        self
    }

    /// `-m statistic --mode random --probability P` with P as the kernel stores it
    /// (`lround(2^31 · p)`) and iptables-save prints it (`%.11f`).
    pub fn probability(self, one_in: usize) -> Self {
        let scaled = ((1u64 << 31) as f64 / one_in as f64).round();
        let p = scaled / (1u64 << 31) as f64;
        self.raw(&format!("-m statistic --mode random --probability {p:.11}"))
    }

    /// Finishes the rule with `-j TARGET` (TARGET may carry options).
    pub fn jump(self, target: &str) -> String {
        let mut out = self.head();
        let _ = write!(out, " -j {target}");
        out.trim_start().to_string()
    }

    /// Finishes the rule without a target (a rule that only counts or documents).
    pub fn no_target(self) -> String {
        self.head().trim_start().to_string()
    }

    fn head(&self) -> String {
        let mut out = String::new();
        if let Some((neg, s)) = &self.src {
            let _ = write!(out, " {}-s {s}", if *neg { "! " } else { "" });
        }
        if let Some((neg, d)) = &self.dst {
            let _ = write!(out, " {}-d {d}", if *neg { "! " } else { "" });
        }
        if let Some((neg, i)) = &self.in_iface {
            let _ = write!(out, " {}-i {i}", if *neg { "! " } else { "" });
        }
        if let Some(p) = self.proto {
            let _ = write!(out, " -p {p}");
        }
        out.push_str(&self.matches);
        out
    }
}

/// The rule without its `-m comment --comment TEXT` match (comments are written by
/// [`RuleBuilder::comment`], so they are either a bare word or a quoted string without quotes).
pub fn without_comment(rule: &str) -> String {
    let Some(start) = rule.find("-m comment --comment ") else {
        return rule.to_string();
    };
    let rest = &rule[start + "-m comment --comment ".len()..];
    let end = if let Some(quoted) = rest.strip_prefix('"') {
        quoted.find('"').map_or(rest.len(), |i| i + 2)
    } else {
        rest.find(' ').unwrap_or(rest.len())
    };
    let tail = rest[end..].trim_start();
    let head = rule[..start].trim_end();
    match (head.is_empty(), tail.is_empty()) {
        (true, _) => tail.to_string(),
        (false, true) => head.to_string(),
        (false, false) => format!("{head} {tail}"),
    }
}

/// `-m recent` options for ClientIP affinity, in iptables-save's order.
pub fn recent(family: IpFamily, name: &str, action: RecentAction) -> String {
    let mask = match family {
        IpFamily::V4 => "255.255.255.255",
        IpFamily::V6 => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    };
    match action {
        RecentAction::Check { seconds } => format!(
            "-m recent --rcheck --seconds {seconds} --reap --name {name} --mask {mask} --rsource"
        ),
        RecentAction::Set => format!("-m recent --set --name {name} --mask {mask} --rsource"),
    }
}

/// What a `-m recent` match does.
#[derive(Debug, Clone, Copy)]
pub enum RecentAction {
    /// Match clients seen within `seconds`, forgetting older entries.
    Check {
        /// The affinity timeout.
        seconds: u64,
    },
    /// Record the client.
    Set,
}

/// The REJECT target for a family.
pub fn reject(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "REJECT --reject-with icmp-port-unreachable",
        IpFamily::V6 => "REJECT --reject-with icmp6-port-unreachable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_order_matches_iptables_save() {
        let r = RuleBuilder::new()
            .comment("ns1/svc1:p80 cluster IP")
            .dport(Protocol::Tcp, 80)
            .proto(Protocol::Tcp)
            .dst(host("10.96.0.10".parse().expect("ip")))
            .not_src("10.244.0.0/16")
            .jump("KPROXY-MARK-MASQ");
        assert_eq!(
            r,
            "! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp --dport 80 -j KPROXY-MARK-MASQ"
        );
        // iptables-save prints the input interface after the addresses, before the protocol.
        let r = RuleBuilder::new()
            .proto(Protocol::Tcp)
            .in_iface(true, "veth+")
            .dst(host("10.96.0.10".parse().expect("ip")))
            .jump("X");
        assert_eq!(r, "-d 10.96.0.10/32 ! -i veth+ -p tcp -j X");
    }

    #[test]
    fn probabilities_round_trip_like_the_kernel() {
        assert!(
            RuleBuilder::new()
                .probability(2)
                .jump("X")
                .contains("0.50000000000")
        );
        // 1/3 is stored as 715827883 / 2^31.
        assert!(
            RuleBuilder::new()
                .probability(3)
                .jump("X")
                .contains("0.33333333349")
        );
    }

    #[test]
    fn comments_can_be_removed() {
        assert_eq!(
            without_comment(
                "-d 10.0.0.1/32 -p tcp -m comment --comment \"a b\" -m tcp --dport 80 -j X"
            ),
            "-d 10.0.0.1/32 -p tcp -m tcp --dport 80 -j X"
        );
        assert_eq!(without_comment("-m comment --comment x -j Y"), "-j Y");
        assert_eq!(
            without_comment("-m comment --comment \"only a comment\""),
            ""
        );
        assert_eq!(without_comment("-j Z"), "-j Z");
    }

    #[test]
    fn quoting_follows_xtables_save_string() {
        assert_eq!(quote("abc-1_x"), "abc-1_x");
        assert_eq!(quote("a b"), "\"a b\"");
        assert_eq!(quote("ns/x"), "\"ns/x\"");
        assert_eq!(quote("a\"b"), "\"a_b\"");
    }
}
