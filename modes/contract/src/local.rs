//! Local-traffic detection: how the rules recognise a packet sent by one of this node's pods
//! (upstream's "local traffic detector", chosen by `--detect-local-mode`).
//!
//! Two behaviours hang on the answer. A ClusterIP connection that does *not* come from a local
//! pod is masqueraded, so the endpoint's reply returns through this node, which holds the
//! connection's DNAT. And a connection that *does* come from a local pod to an
//! externalTrafficPolicy=Local frontend is short-circuited to every endpoint of the service:
//! only external clients need their source address preserved, and a pod must reach the service
//! even when this node has no endpoint of it.
//!
//! A detector looks either at the source address (the pod CIDR of the packet's family) or at
//! the interface the packet arrived on (the bridge every pod hangs off, or the common name
//! prefix of per-pod veths). The control plane picks one; each mode renders the per-family
//! [`LocalMatch`] in its own syntax, and the trace model ([`crate::trace::model`]) evaluates
//! the same [`LocalMatch`] so every mode's rendering is checked against one meaning.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::IpFamily;

/// The longest interface name the kernel accepts: `IFNAMSIZ` (16) less the terminating NUL.
pub const MAX_INTERFACE_NAME: usize = 15;

/// How the rules recognise traffic from this node's pods (upstream's local-traffic detector).
///
/// `Default` is [`LocalTraffic::None`]: without a configured pod network nothing can be told
/// apart, and guessing would masquerade (or preserve) the wrong connections.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub enum LocalTraffic {
    /// Upstream's no-op detector: no rule asks "is this from a pod?" at all. ClusterIP
    /// connections are then masqueraded only with masquerade-all, and pods get no
    /// externalTrafficPolicy=Local short-circuit (the node's own traffic still does).
    #[default]
    None,
    /// The source address is inside the CIDR of the packet's family. At most one CIDR per
    /// family, as upstream uses the first of each; [`LocalTraffic::source_cidrs`] keeps that
    /// invariant. A family without a CIDR has no detector (as [`LocalTraffic::None`]).
    SourceCidrs(Vec<IpNet>),
    /// The packet arrived on exactly this interface (a bridge every pod is attached to), in
    /// both families.
    Interface(String),
    /// The packet arrived on an interface whose name starts with this (per-pod veths such as
    /// `cali…` or `veth…`), in both families.
    InterfacePrefix(String),
}

/// One family's detector, borrowed from a [`LocalTraffic`] whose interface name is valid: what
/// a renderer writes and what the trace model evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalMatch<'a> {
    /// Source address inside this CIDR.
    SourceCidr(&'a IpNet),
    /// Arrived on this interface.
    Interface(&'a str),
    /// Arrived on an interface whose name starts with this.
    InterfacePrefix(&'a str),
}

/// An interface name a detector cannot use: no rule can be written from it safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {name:?} is not a usable interface name: {reason}")]
pub struct InvalidInterfaceName {
    /// The configuration field it came from (`detectLocal.bridgeInterface`,
    /// `detectLocal.interfaceNamePrefix`), so the operator knows what to fix.
    pub field: &'static str,
    /// The name as configured.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Checks that `name` can be an interface name (or an interface name prefix) in a rule.
///
/// The kernel allows at most [`MAX_INTERFACE_NAME`] bytes and no `/`, `:` or whitespace. The
/// rules need more: iptables-save prints interface names unquoted and reads a trailing `+` as a
/// wildcard, and nft reads `*` inside a quoted string as one. So only ASCII letters, digits,
/// `-`, `_` and `.` are accepted (every name CNI plugins and bridges use), which can never close
/// a quote, start a comment, split a token or turn into a wildcard.
pub fn check_interface_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > MAX_INTERFACE_NAME {
        return Err("it is longer than 15 bytes (the kernel's IFNAMSIZ)");
    }
    if name == "." || name == ".." {
        return Err("the kernel refuses `.` and `..`");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("only ASCII letters, digits, `-`, `_` and `.` are accepted");
    }
    Ok(())
}

impl LocalTraffic {
    /// The source-address detector for `cidrs`: the first CIDR of each family, host bits
    /// cleared; [`LocalTraffic::None`] when there is none.
    pub fn source_cidrs<'a>(cidrs: impl IntoIterator<Item = &'a IpNet>) -> Self {
        let mut first: Vec<IpNet> = Vec::new();
        for c in cidrs {
            if !first
                .iter()
                .any(|f| IpFamily::of_net(f) == IpFamily::of_net(c))
            {
                first.push(c.trunc());
            }
        }
        if first.is_empty() {
            Self::None
        } else {
            Self::SourceCidrs(first)
        }
    }

    /// The pod CIDR of `family`, for a source-address detector; `None` for every other kind
    /// (an interface detector says nothing about addresses).
    pub fn cidr(&self, family: IpFamily) -> Option<&IpNet> {
        match self {
            Self::SourceCidrs(cidrs) => cidrs.iter().find(|c| IpFamily::of_net(c) == family),
            _ => None,
        }
    }

    /// The configuration field an interface detector's name comes from.
    fn field(&self) -> &'static str {
        match self {
            Self::InterfacePrefix(_) => "detectLocal.interfaceNamePrefix",
            _ => "detectLocal.bridgeInterface",
        }
    }

    /// The detector of `family`: `Ok(None)` when that family has none (no-op), an error when
    /// the interface name cannot be written into a rule (see [`check_interface_name`]).
    pub fn matcher(
        &self,
        family: IpFamily,
    ) -> Result<Option<LocalMatch<'_>>, InvalidInterfaceName> {
        let checked = |name: &str| {
            check_interface_name(name).map_err(|reason| InvalidInterfaceName {
                field: self.field(),
                name: name.to_string(),
                reason,
            })
        };
        Ok(match self {
            Self::None => None,
            Self::SourceCidrs(_) => self.cidr(family).map(LocalMatch::SourceCidr),
            Self::Interface(name) => {
                checked(name)?;
                Some(LocalMatch::Interface(name))
            }
            Self::InterfacePrefix(prefix) => {
                checked(prefix)?;
                // A prefix as long as the longest name matches that one name only, and neither
                // iptables nor nft accepts a wildcard after it (both count the terminating NUL
                // against IFNAMSIZ): it is an exact match.
                Some(if prefix.len() == MAX_INTERFACE_NAME {
                    LocalMatch::Interface(prefix)
                } else {
                    LocalMatch::InterfacePrefix(prefix)
                })
            }
        })
    }

    /// What a renderer writes for `family`: the detector, or nothing when there is none or its
    /// interface name is invalid. An invalid name is logged (naming the field) and treated as
    /// no detector, so a configuration error the control plane let through can never produce a
    /// rule the kernel refuses or, worse, misreads; rendering does not fail for it.
    pub fn for_rules(&self, family: IpFamily) -> Option<LocalMatch<'_>> {
        self.matcher(family).unwrap_or_else(|e| {
            tracing::error!(
                field = e.field,
                name = %e.name,
                reason = e.reason,
                "invalid local-traffic detector; no rule will treat any traffic as coming from a local pod"
            );
            None
        })
    }

    /// Whether the rules of `family` ask "is this from a pod?" at all.
    pub fn is_implemented(&self, family: IpFamily) -> bool {
        matches!(self.matcher(family), Ok(Some(_)))
    }
}

impl LocalMatch<'_> {
    /// Whether a packet from `src` that arrived on `in_iface` is local pod traffic. An empty
    /// `in_iface` means none, as the kernel sees a packet the node itself sends: interface
    /// detectors never match it (prefixes are never empty).
    pub fn matches(&self, src: &IpAddr, in_iface: &str) -> bool {
        match self {
            Self::SourceCidr(cidr) => cidr.contains(src),
            Self::Interface(name) => in_iface == *name,
            Self::InterfacePrefix(prefix) => in_iface.starts_with(prefix),
        }
    }

    /// The nft expression matching local pod traffic (`local`) or everything else: `ip saddr
    /// CIDR`, `ip6 saddr != CIDR`, `iifname "br0"`, `iifname != "veth*"`. Both data planes that
    /// write nft (the nftables mode and the IPVS mode's `kproxy-ipvs` table) use this one
    /// spelling, which the shared evaluator in [`crate::trace::nft`] reads back. Interface
    /// names are safe inside quotes (see [`check_interface_name`]).
    pub fn nft(&self, family: IpFamily, local: bool) -> String {
        let op = if local { "" } else { "!= " };
        match self {
            Self::SourceCidr(cidr) => {
                let a = match family {
                    IpFamily::V4 => "ip",
                    IpFamily::V6 => "ip6",
                };
                format!("{a} saddr {op}{}", cidr.trunc())
            }
            Self::Interface(name) => format!("iifname {op}\"{name}\""),
            Self::InterfacePrefix(prefix) => format!("iifname {op}\"{prefix}*\""),
        }
    }
}

impl fmt::Display for LocalTraffic {
    /// How an operator would describe it (`--detect-local-mode` terms), for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::SourceCidrs(cidrs) => {
                let list: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
                write!(f, "source in {}", list.join(","))
            }
            Self::Interface(name) => write!(f, "arrived on {name}"),
            Self::InterfacePrefix(prefix) => write!(f, "arrived on {prefix}*"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test fixtures")]

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn source_cidrs_keep_the_first_of_each_family() {
        let cidrs = [
            net("10.244.1.7/16"),
            net("fd00:244::/56"),
            net("10.245.0.0/16"),
        ];
        let d = LocalTraffic::source_cidrs(&cidrs);
        assert_eq!(
            d,
            LocalTraffic::SourceCidrs(vec![net("10.244.0.0/16"), net("fd00:244::/56")])
        );
        assert_eq!(d.cidr(IpFamily::V4), Some(&net("10.244.0.0/16")));
        assert_eq!(LocalTraffic::source_cidrs(&[]), LocalTraffic::None);
        let v4_only = LocalTraffic::source_cidrs(&cidrs[..1]);
        assert!(v4_only.is_implemented(IpFamily::V4));
        assert!(!v4_only.is_implemented(IpFamily::V6));
    }

    #[test]
    fn interface_detectors_cover_both_families_and_never_match_no_interface() {
        let src: IpAddr = "192.0.2.1".parse().unwrap();
        let br = LocalTraffic::Interface("cbr0".into());
        let veth = LocalTraffic::InterfacePrefix("veth".into());
        for family in IpFamily::ALL {
            let m = br.matcher(family).unwrap().unwrap();
            assert!(m.matches(&src, "cbr0"));
            assert!(!m.matches(&src, "cbr01"));
            assert!(!m.matches(&src, ""));
            let m = veth.matcher(family).unwrap().unwrap();
            assert!(m.matches(&src, "veth"));
            assert!(m.matches(&src, "veth1a2b"));
            assert!(!m.matches(&src, "eth0"));
            assert!(!m.matches(&src, ""));
        }
        assert_eq!(br.cidr(IpFamily::V4), None);
        // A prefix of the longest name length is that name.
        let longest = LocalTraffic::InterfacePrefix("br-1a2b3c4d5e6f".into());
        assert_eq!(
            longest.matcher(IpFamily::V4),
            Ok(Some(LocalMatch::Interface("br-1a2b3c4d5e6f")))
        );
        assert!(!LocalTraffic::None.is_implemented(IpFamily::V4));
    }

    #[test]
    fn nft_spelling() {
        let c4 = net("10.244.0.0/16");
        let c6 = net("fd00:244::/56");
        assert_eq!(
            LocalMatch::SourceCidr(&c4).nft(IpFamily::V4, true),
            "ip saddr 10.244.0.0/16"
        );
        assert_eq!(
            LocalMatch::SourceCidr(&c6).nft(IpFamily::V6, false),
            "ip6 saddr != fd00:244::/56"
        );
        assert_eq!(
            LocalMatch::Interface("cbr0").nft(IpFamily::V6, true),
            "iifname \"cbr0\""
        );
        assert_eq!(
            LocalMatch::InterfacePrefix("veth").nft(IpFamily::V4, false),
            "iifname != \"veth*\""
        );
    }

    #[test]
    fn unusable_interface_names_are_refused_naming_the_field() {
        for bad in [
            "",
            "sixteen-chars-xx",
            "a b",
            "a\"b",
            "a'b",
            "a/b",
            "a:b",
            "veth+",
            "veth*",
            "a\\b",
            "..",
            "é",
        ] {
            assert!(check_interface_name(bad).is_err(), "{bad:?}");
            let e = LocalTraffic::InterfacePrefix(bad.into())
                .matcher(IpFamily::V4)
                .unwrap_err();
            assert_eq!(e.field, "detectLocal.interfaceNamePrefix");
            let e = LocalTraffic::Interface(bad.into())
                .matcher(IpFamily::V6)
                .unwrap_err();
            assert_eq!(e.field, "detectLocal.bridgeInterface");
            assert!(e.to_string().contains("detectLocal.bridgeInterface"), "{e}");
            assert_eq!(
                LocalTraffic::Interface(bad.into()).for_rules(IpFamily::V4),
                None
            );
        }
        for good in [
            "cbr0",
            "cni0",
            "eth0.100",
            "vxlan.calico",
            "cilium_host",
            "br-1a2b3c4d5e6f",
        ] {
            assert_eq!(check_interface_name(good), Ok(()), "{good:?}");
        }
    }
}
