//! Destination dispatch as a fixed-depth tree of chains.
//!
//! Upstream's KUBE-SERVICES is one linear list: a new connection to the last of 10,000 services
//! is compared with 10,000 rules. Here the root chain branches on the lowest 4 bits of the
//! destination address, the next level on the next 4 bits, the third on 4 more, and only the
//! leaf holds the per-address rules. The masks are non-contiguous (`0.0.0.5/0.0.0.15`), which
//! iptables matches as `(daddr & mask) == addr`. A packet walks at most 16 + 16 + 16 rules plus
//! its leaf (about 2-3 rules per leaf at 10,000 services allocated from one service CIDR); and
//! since an address's leaf never moves, adding or removing a service rewrites one leaf chain (and
//! at most two branch chains when a leaf appears or disappears), never the whole dispatch.

use std::collections::BTreeMap;
use std::net::IpAddr;

use kproxy_contract::IpFamily;

/// Bits per level and number of levels (12 bits: 4096 leaves at most).
const BITS: u32 = 4;
const LEVELS: u32 = 3;

/// The low `bits` bits of an address.
fn low_bits(ip: &IpAddr, bits: u32) -> u32 {
    let v: u128 = match ip {
        IpAddr::V4(v4) => u128::from(u32::from(*v4)),
        IpAddr::V6(v6) => u128::from(*v6),
    };
    (v & ((1u128 << bits) - 1)) as u32
}

/// `-d VALUE/MASK` matching the low `bits` bits equal to `value`.
fn masked(family: IpFamily, value: u32, bits: u32) -> String {
    let mask = (1u32 << bits) - 1;
    match family {
        IpFamily::V4 => format!(
            "{}/{}",
            std::net::Ipv4Addr::from(value),
            std::net::Ipv4Addr::from(mask)
        ),
        IpFamily::V6 => format!(
            "{}/{}",
            std::net::Ipv6Addr::from(u128::from(value)),
            std::net::Ipv6Addr::from(u128::from(mask))
        ),
    }
}

fn chain_name(prefix: &str, value: u32, level: u32) -> String {
    // Hex digits, lowest nibble first, one per level reached.
    let digits: String = (0..level)
        .map(|l| format!("{:x}", (value >> (l * BITS)) & 0xf))
        .collect();
    format!("{prefix}{digits}")
}

/// Builds the tree under `root` for `(destination, rule)` pairs, preserving the order of the
/// rules within a leaf. Returns every chain with its rules; the root is always present.
pub fn build(
    root: &str,
    prefix: &str,
    family: IpFamily,
    rules: Vec<(IpAddr, String)>,
) -> BTreeMap<String, Vec<String>> {
    let mut leaves: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (ip, rule) in rules {
        leaves
            .entry(low_bits(&ip, BITS * LEVELS))
            .or_default()
            .push(rule);
    }
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    chains.insert(root.to_string(), Vec::new());
    for (key, rules) in leaves {
        for level in 1..=LEVELS {
            let bits = level * BITS;
            let value = key & ((1 << bits) - 1);
            let parent = if level == 1 {
                root.to_string()
            } else {
                chain_name(prefix, value, level - 1)
            };
            let child = chain_name(prefix, value, level);
            let jump = format!("-d {} -j {child}", masked(family, value, bits));
            let parent_rules = chains.entry(parent).or_default();
            if !parent_rules.contains(&jump) {
                parent_rules.push(jump);
            }
            chains.entry(child).or_default();
        }
        chains
            .entry(chain_name(prefix, key, LEVELS))
            .or_default()
            .extend(rules);
    }
    chains
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn leaves_are_keyed_on_low_bits() {
        let t = build(
            "ROOT",
            "P-",
            IpFamily::V4,
            vec![
                (ip("10.96.0.10"), "r1".into()),
                (ip("10.96.16.10"), "r2".into()),
                (ip("10.96.1.10"), "r3".into()),
            ],
        );
        // 10.96.0.10 and 10.96.16.10 share their low 12 bits (0x00a).
        assert_eq!(t["P-a00"], vec!["r1", "r2"]);
        assert_eq!(t["P-a01"], vec!["r3"]);
        assert_eq!(t["ROOT"], vec!["-d 0.0.0.10/0.0.0.15 -j P-a"]);
        assert_eq!(t["P-a"], vec!["-d 0.0.0.10/0.0.0.255 -j P-a0"]);
        assert_eq!(
            t["P-a0"],
            vec![
                "-d 0.0.0.10/0.0.15.255 -j P-a00",
                "-d 0.0.1.10/0.0.15.255 -j P-a01"
            ]
        );
    }

    #[test]
    fn walk_length_stays_small_at_ten_thousand_services() {
        let rules: Vec<_> = (0..10_000u32)
            .map(|i| {
                let addr =
                    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 96, 0, 1)) + i);
                (IpAddr::V4(addr), format!("svc{i}"))
            })
            .collect();
        let t = build("ROOT", "P-", IpFamily::V4, rules);
        let longest_leaf = t
            .iter()
            .filter(|(k, _)| k.len() == "P-".len() + 3)
            .map(|(_, v)| v.len())
            .max()
            .unwrap_or(0);
        // Worst-case rules walked: three branch levels of at most 16 rules, plus a leaf.
        assert!(t["ROOT"].len() <= 16);
        assert!(longest_leaf <= 3, "longest leaf {longest_leaf}");
    }

    #[test]
    fn ipv6_masks() {
        let t = build(
            "ROOT",
            "P-",
            IpFamily::V6,
            vec![(ip("fd00::1:23"), "r".into())],
        );
        assert_eq!(t["ROOT"], vec!["-d ::3/::f -j P-3"]);
        assert_eq!(t["P-3"], vec!["-d ::23/::ff -j P-32"]);
        assert_eq!(t["P-32"], vec!["-d ::23/::fff -j P-320"]);
    }
}
