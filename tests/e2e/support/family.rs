//! One behaviour test, both IP families: every address a test uses is written once, as its IPv4
//! literal, and [`Fam::a`] gives the IPv6 twin in the same (dual-stack) topology.
//!
//! The mapping follows the topology's plan (`topology.rs`):
//! * `10.0.N.M` (client, node and gateway links, external and LB addresses) → `fd00:N::M`;
//! * `10.244.1.M` (the pods) → `fd00:244::M`, other `10.244.A.M` (extra "pod" sources) →
//!   `fd00:244:0:A::M`, all inside the IPv6 cluster CIDR `fd00:244::/56`;
//! * `10.96.A.B` (ClusterIPs) → `fd00:96::XXXX` with `XXXX = A*256+B` in hex, inside the
//!   IPv6 service CIDR `fd00:96::/112`.
//!
//! Host digits are copied as written (`10.0.1.100` → `fd00:1::100`), so a test's printed
//! address and its expected answer stay recognisable in either family.

use std::net::{IpAddr, SocketAddr};

use super::topology::{NODE_IP, NODE_IP6, POD_V4, POD_V6, client_v4, client_v6};

/// The family a behaviour test runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fam {
    /// IPv4 (iptables, `ip kproxy`).
    V4,
    /// IPv6 (ip6tables, `ip6 kproxy`).
    V6,
}

impl Fam {
    /// The family of `addr`.
    pub(crate) fn of(addr: SocketAddr) -> Fam {
        if addr.is_ipv4() { Fam::V4 } else { Fam::V6 }
    }

    /// Whether this is IPv6 (what `Scenario::save` and `wait_rules` take).
    pub(crate) fn v6(self) -> bool {
        self == Fam::V6
    }

    /// The address (or CIDR) `v4` in this family.
    pub(crate) fn a(self, v4: &str) -> String {
        match self {
            Fam::V4 => v4.to_string(),
            Fam::V6 => to_v6(v4),
        }
    }

    /// [`Fam::a`] parsed.
    pub(crate) fn ip(self, v4: &str) -> IpAddr {
        self.a(v4).parse().expect("a test address")
    }

    /// The `i`-th pod address.
    pub(crate) fn pod(self, i: usize) -> &'static str {
        match self {
            Fam::V4 => POD_V4[i],
            Fam::V6 => POD_V6[i],
        }
    }

    /// The node's InternalIP (the client side).
    pub(crate) fn node_ip(self) -> &'static str {
        match self {
            Fam::V4 => NODE_IP,
            Fam::V6 => NODE_IP6,
        }
    }

    /// The node's address on the pods' link: where masqueraded connections come from.
    pub(crate) fn node_pod_side(self) -> &'static str {
        match self {
            Fam::V4 => "10.0.2.1",
            Fam::V6 => "fd00:2::1",
        }
    }

    /// The client's `i`-th address.
    pub(crate) fn client(self, i: u8) -> IpAddr {
        match self {
            Fam::V4 => client_v4(i),
            Fam::V6 => client_v6(i),
        }
    }

    /// The host prefix length (`/32` or `/128`), as rules print it.
    pub(crate) fn host_prefix(self) -> u8 {
        match self {
            Fam::V4 => 32,
            Fam::V6 => 128,
        }
    }

    /// A suffix for object names (`web-v4`, `web-v6`).
    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Fam::V4 => "v4",
            Fam::V6 => "v6",
        }
    }
}

fn to_v6(v4: &str) -> String {
    if let Some((addr, len)) = v4.split_once('/') {
        let len: u8 = len.parse().expect("prefix length");
        // A /24 is one link or pool: its twin is that /64 (or /56 for the pod CIDR).
        let v6_len = match len {
            24 => 64,
            16 if addr.starts_with("10.244.") => 56,
            l => l + 96,
        };
        return format!("{}/{v6_len}", to_v6(addr));
    }
    let o: Vec<u16> = v4
        .split('.')
        .map(|p| p.parse().expect("an IPv4 literal"))
        .collect();
    assert_eq!(o.len(), 4, "an IPv4 literal: {v4}");
    match (o[0], o[1], o[2], o[3]) {
        (10, 0, n, m) => format!("fd00:{n}::{m}"),
        (10, 244, 1, m) => format!("fd00:244::{m}"),
        (10, 244, 0, 0) => "fd00:244::".into(),
        // The 4th group: fd00:244::/56 fixes the first three and the 4th's high byte.
        (10, 244, a, m) => format!("fd00:244:0:{a}::{m}"),
        (10, 96, a, b) => format!("fd00:96::{:x}", a * 256 + b),
        _ => panic!("no IPv6 twin for {v4}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twins() {
        assert_eq!(Fam::V6.a("10.0.1.1"), NODE_IP6);
        assert_eq!(Fam::V6.ip("10.0.1.2"), client_v6(0));
        assert_eq!(Fam::V6.a("10.244.1.10"), POD_V6[0]);
        assert_eq!(Fam::V6.a("10.96.1.9"), "fd00:96::109");
        assert_eq!(Fam::V6.a("10.0.1.2/31"), "fd00:1::2/127");
        assert_eq!(Fam::V6.a("10.244.9.0/24"), "fd00:244:0:9::0/64");
        let pods: ipnet::IpNet = "fd00:244::/56".parse().expect("cidr");
        assert!(pods.contains(&Fam::V6.ip("10.244.9.2")));
        assert_eq!(Fam::V4.a("10.96.1.9"), "10.96.1.9");
    }
}
