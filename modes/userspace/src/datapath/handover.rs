//! Seeing a successor: which other sockets listen on our listener addresses.
//!
//! On SIGTERM a kproxy hands its listeners over to the kproxy that replaces it (started next to
//! it by a surge rollout, bound to the same addresses through `SO_REUSEPORT`). It keeps
//! accepting until each of its listener addresses has a socket that is not its own, then takes
//! what is queued and closes. "Not its own" is told by inode: `/proc/net/{tcp,tcp6,udp,udp6}`
//! list every socket of the network namespace with its inode, and this process knows the inodes
//! of its listeners (`fstat`). A hand-written parser of four fixed-format kernel files rather
//! than a dependency (the `procfs` crate would bring its own syscall layer for ~60 lines); the
//! sock_diag netlink dump would do the same with more code.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::model::{ListenerKey, Transport};

/// `TCP_LISTEN` in `/proc/net/tcp*`'s `st` column.
const TCP_LISTEN: u8 = 0x0A;
/// `TCP_CLOSE`: an unconnected UDP socket (a bound listener, not a flow).
const UDP_UNCONNECTED: u8 = 0x07;

/// The inodes of the listening sockets on each listener address, as the kernel lists them now.
pub(crate) fn listening() -> HashMap<ListenerKey, Vec<u64>> {
    let mut out: HashMap<ListenerKey, Vec<u64>> = HashMap::new();
    for (file, transport, state) in [
        ("/proc/net/tcp", Transport::Tcp, TCP_LISTEN),
        ("/proc/net/tcp6", Transport::Tcp, TCP_LISTEN),
        ("/proc/net/udp", Transport::Udp, UDP_UNCONNECTED),
        ("/proc/net/udp6", Transport::Udp, UDP_UNCONNECTED),
    ] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for (addr, inode) in parse(&text, state) {
            out.entry(ListenerKey { transport, addr })
                .or_default()
                .push(inode);
        }
    }
    out
}

/// Whether a socket other than `ours` listens on `key`.
pub(crate) fn has_successor(
    now: &HashMap<ListenerKey, Vec<u64>>,
    key: &ListenerKey,
    ours: &HashSet<u64>,
) -> bool {
    now.get(key)
        .is_some_and(|inodes| inodes.iter().any(|i| *i != 0 && !ours.contains(i)))
}

/// `(local address, inode)` of the lines of one `/proc/net/{tcp,udp}*` file in state `state`.
pub(crate) fn parse(text: &str, state: u8) -> Vec<(SocketAddr, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if u8::from_str_radix(f.get(3)?, 16).ok()? != state {
                return None;
            }
            Some((local(f.get(1)?)?, f.get(9)?.parse().ok()?))
        })
        .collect()
}

/// `0100007F:0050` (IPv4) or 32 hex digits and a port (IPv6): the kernel prints each 32-bit word
/// of the network-order address as a native-endian number, and the port in host order.
fn local(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn parses_the_kernels_socket_tables() {
        // Lines as a little-endian kernel prints them.
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100600A:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n   1: 0100600A:0050 0201010A:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4343 1\n";
        let got = parse(tcp, TCP_LISTEN);
        if cfg!(target_endian = "little") {
            assert_eq!(got, [("10.96.0.1:80".parse().unwrap(), 4242)]);
        }
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0000FDFD000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1\n";
        let got = parse(tcp6, TCP_LISTEN);
        if cfg!(target_endian = "little") {
            assert_eq!(got, [("[fdfd::1]:80".parse().unwrap(), 77)]);
        }
    }

    #[test]
    fn sees_its_own_sockets_and_another_processs() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let key = ListenerKey {
            transport: Transport::Tcp,
            addr: l.local_addr().unwrap(),
        };
        let ours: HashSet<u64> = [super::super::socket::inode(&l)].into();
        let now = listening();
        assert!(
            now.get(&key)
                .is_some_and(|i| i.iter().any(|i| ours.contains(i)))
        );
        assert!(!has_successor(&now, &key, &ours));
        assert!(has_successor(&now, &key, &HashSet::new()));
    }
}
