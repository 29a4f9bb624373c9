//! Parsing of the scalar fields kube-proxy reads: IPs, CIDRs, ports and protocols.
//!
//! Upstream parses addresses with `netutils.ParseIPSloppy` / `ParseCIDRSloppy`
//! (`k8s.io/utils/net`), which accept IPv4 octets with leading zeros (`010.0.0.1` is `10.0.0.1`,
//! decimal, never octal): objects created before the API server tightened validation still carry
//! them. Go also treats an IPv4-mapped IPv6 address as IPv4. Both are mirrored here so an old
//! object means the same thing to kproxy as to kube-proxy.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use kproxy_contract::Protocol;

/// Parses an IP address like Go's `ParseIPSloppy`: leading zeros allowed in IPv4 octets,
/// IPv4-mapped IPv6 addresses returned as IPv4.
pub(crate) fn ip(s: &str) -> Option<IpAddr> {
    let addr = s
        .parse::<IpAddr>()
        .ok()
        .or_else(|| sloppy_v4(s).map(IpAddr::V4))?;
    Some(match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    })
}

/// Dotted-quad IPv4 whose octets may carry leading zeros (read as decimal).
fn sloppy_v4(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = part.trim_start_matches('0');
        *octet = if digits.is_empty() {
            0
        } else if digits.len() > 3 {
            return None;
        } else {
            digits.parse().ok()?
        };
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

/// Parses a CIDR like Go's `ParseCIDRSloppy`, returning the network (host bits cleared, as Go's
/// `ParseCIDR` does). The address part is not mapped to IPv4: a `::ffff:a.b.c.d/n` range stays
/// IPv6.
pub(crate) fn cidr(s: &str) -> Option<IpNet> {
    let (addr, prefix) = s.split_once('/')?;
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let prefix: u8 = prefix.parse().ok()?;
    let addr = addr
        .parse::<IpAddr>()
        .ok()
        .or_else(|| sloppy_v4(addr).map(IpAddr::V4))?;
    IpNet::new(addr, prefix).ok().map(|n| n.trunc())
}

/// A port number from the API (`int32`), valid only in 1..=65535.
pub(crate) fn port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

/// A protocol name; the API defaults an unset protocol to TCP.
pub(crate) fn protocol(p: Option<&str>) -> Result<Protocol, String> {
    match p {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(format!(
            "{other:?} is not a supported protocol (TCP, UDP, SCTP)"
        )),
    }
}

/// The reason text for an invalid port number.
pub(crate) fn bad_port(p: i32) -> String {
    format!("{p} is not a valid port (1-65535)")
}

/// Why `name` is not a DNS label, or `None` if it is one: at most 63 characters of `a-z`, `0-9`
/// and `-`, ending with a letter or digit, and starting with a letter (DNS-1035, Service names)
/// or also a digit (DNS-1123, namespaces). The API server enforces this; a hand-written
/// manifest may not.
pub(crate) fn bad_dns_label(name: &str, digit_first: bool) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || (digit_first && b.is_ascii_digit()))
        && !name.ends_with('-');
    (!ok).then(|| format!("{name:?} is not a valid DNS label (at most 63 of a-z, 0-9 and '-')"))
}

/// Why `name` is not an IANA service name (a port name: at most 15 characters of `a-z`, `0-9`
/// and `-`, at least one letter, no leading, trailing or double `-`), or `None` if it is one.
pub(crate) fn bad_port_name(name: &str) -> Option<String> {
    let ok = name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    (!ok).then(|| {
        format!("{name:?} is not a valid port name (at most 15 of a-z, 0-9 and '-', with a letter)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_sloppy_cases() {
        let cases: &[(&str, Option<&str>)] = &[
            ("10.0.0.1", Some("10.0.0.1")),
            ("010.000.0.01", Some("10.0.0.1")),
            ("0.0.0.0", Some("0.0.0.0")),
            ("256.0.0.1", None),
            ("1.2.3", None),
            ("1.2.3.4.5", None),
            ("1.2.3.-4", None),
            ("", None),
            (" 10.0.0.1", None),
            ("fd00::1", Some("fd00::1")),
            ("::ffff:10.1.2.3", Some("10.1.2.3")),
            ("fd00::1%eth0", None),
            ("None", None),
        ];
        for (input, want) in cases {
            let want = want.map(|w| w.parse::<IpAddr>().expect("test address"));
            assert_eq!(ip(input), want, "input {input:?}");
        }
    }

    #[test]
    fn cidr_sloppy_cases() {
        let cases: &[(&str, Option<&str>)] = &[
            ("10.0.0.0/8", Some("10.0.0.0/8")),
            ("10.1.2.3/8", Some("10.0.0.0/8")),
            ("010.0.0.0/8", Some("10.0.0.0/8")),
            ("10.0.0.0/33", None),
            ("10.0.0.0", None),
            ("10.0.0.0/", None),
            ("10.0.0.0/+8", None),
            ("fd00::/64", Some("fd00::/64")),
            ("fd00::/129", None),
        ];
        for (input, want) in cases {
            let want = want.map(|w| w.parse::<IpNet>().expect("test cidr"));
            assert_eq!(cidr(input), want, "input {input:?}");
        }
    }

    #[test]
    fn port_and_protocol_cases() {
        assert_eq!(port(0), None);
        assert_eq!(port(-1), None);
        assert_eq!(port(65536), None);
        assert_eq!(port(1), Some(1));
        assert_eq!(port(65535), Some(65535));
        assert_eq!(protocol(None), Ok(Protocol::Tcp));
        assert_eq!(protocol(Some("UDP")), Ok(Protocol::Udp));
        assert_eq!(protocol(Some("SCTP")), Ok(Protocol::Sctp));
        assert!(protocol(Some("tcp")).is_err());
    }
}
