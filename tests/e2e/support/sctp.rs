//! SCTP packets without an SCTP stack. This kernel has no SCTP sockets (`socket(…, IPPROTO_SCTP)`
//! fails with EPROTONOSUPPORT), but netfilter tracks and NATs SCTP all the same. So the client
//! sends a hand-made SCTP INIT through a raw socket and the endpoints namespace catches it with
//! another raw socket: where the packet arrives (address and port) is what the node's rules did
//! to it.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::netns::Netns;

const IPPROTO_SCTP: i32 = 132;

/// CRC32c (Castagnoli), as SCTP's checksum (RFC 4960 appendix B); bitwise, the packets are tiny.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An SCTP INIT chunk from `src_port` to `dst_port`, tagged with `tag` (its initiate tag), with
/// a valid checksum: conntrack drops SCTP packets whose CRC is wrong.
fn init_packet(src_port: u16, dst_port: u16, tag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&src_port.to_be_bytes());
    p.extend_from_slice(&dst_port.to_be_bytes());
    p.extend_from_slice(&0u32.to_be_bytes()); // verification tag: 0 in an INIT
    p.extend_from_slice(&0u32.to_be_bytes()); // checksum, filled below
    p.extend_from_slice(&[1, 0]); // chunk type INIT, flags
    p.extend_from_slice(&20u16.to_be_bytes()); // chunk length
    p.extend_from_slice(&tag.to_be_bytes()); // initiate tag
    p.extend_from_slice(&65_535u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    p.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    p.extend_from_slice(&tag.to_be_bytes()); // initial TSN
    let crc = crc32c(&p);
    // The checksum is carried in little-endian order (Linux: cpu_to_le32 of the CRC).
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

fn raw_socket(ns: &Netns, v6: bool) -> Socket {
    ns.in_ns(move || {
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        Socket::new(domain, Type::RAW, Some(Protocol::from(IPPROTO_SCTP))).expect("raw SCTP socket")
    })
}

/// Where one INIT arrived: the destination address and port the endpoint saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arrival {
    /// Destination address of the packet as it arrived.
    pub(crate) dst: IpAddr,
    /// Destination SCTP port.
    pub(crate) dst_port: u16,
}

/// Catches SCTP packets arriving in a namespace.
pub(crate) struct SctpCatcher {
    socket: Socket,
    v6: bool,
}

impl SctpCatcher {
    /// A raw SCTP socket in `ns` for one family.
    pub(crate) fn new(ns: &Netns, v6: bool) -> SctpCatcher {
        let socket = raw_socket(ns, v6);
        if v6 {
            // IPv6 raw sockets hand over the payload only; ask for the destination address.
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::Ipv6RecvPacketInfo,
                &true,
            )
            .expect("IPV6_RECVPKTINFO");
        }
        SctpCatcher { socket, v6 }
    }

    /// The first INIT carrying `tag` within `timeout`.
    pub(crate) fn catch(&self, tag: u32, timeout: Duration) -> Option<Arrival> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            self.socket
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .ok()?;
            let arrival = if self.v6 {
                self.recv_v6(tag)
            } else {
                self.recv_v4(tag)
            };
            match arrival {
                Ok(Some(a)) => return Some(a),
                Ok(None) => continue,
                Err(_) => return None,
            }
        }
    }

    fn recv_v4(&self, tag: u32) -> std::io::Result<Option<Arrival>> {
        use std::os::fd::AsRawFd as _;
        let mut data = [0u8; 2048];
        let n = nix::sys::socket::recv(
            self.socket.as_raw_fd(),
            &mut data,
            nix::sys::socket::MsgFlags::empty(),
        )
        .map_err(std::io::Error::from)?;
        // IPv4 raw sockets deliver the IP header too.
        let data = &data[..n];
        let ihl = usize::from(data.first().copied().unwrap_or(0) & 0x0f) * 4;
        if data.len() < ihl + 32 {
            return Ok(None);
        }
        let dst = IpAddr::from([data[16], data[17], data[18], data[19]]);
        Ok(parse_init(&data[ihl..], tag).map(|dst_port| Arrival { dst, dst_port }))
    }

    fn recv_v6(&self, tag: u32) -> std::io::Result<Option<Arrival>> {
        use std::io::IoSliceMut;
        use std::os::fd::AsRawFd as _;
        let mut data = [0u8; 2048];
        let mut iov = [IoSliceMut::new(&mut data)];
        let mut cmsg = nix::cmsg_space!(nix::libc::in6_pktinfo);
        let msg = nix::sys::socket::recvmsg::<nix::sys::socket::SockaddrIn6>(
            self.socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            nix::sys::socket::MsgFlags::empty(),
        )
        .map_err(std::io::Error::from)?;
        let mut dst = None;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let nix::sys::socket::ControlMessageOwned::Ipv6PacketInfo(info) = c {
                dst = Some(IpAddr::from(info.ipi6_addr.s6_addr));
            }
        }
        let n = msg.bytes;
        let Some(dst) = dst else {
            return Ok(None);
        };
        Ok(parse_init(&data[..n], tag).map(|dst_port| Arrival { dst, dst_port }))
    }
}

/// The destination port of an INIT whose initiate tag is `tag`.
fn parse_init(sctp: &[u8], tag: u32) -> Option<u16> {
    if sctp.len() < 32 || sctp[12] != 1 {
        return None;
    }
    let got = u32::from_be_bytes([sctp[16], sctp[17], sctp[18], sctp[19]]);
    (got == tag).then(|| u16::from_be_bytes([sctp[2], sctp[3]]))
}

/// Sends one INIT from `ns` to `dst` with initiate tag `tag`.
pub(crate) fn send_init(ns: &Netns, dst: SocketAddr, src_port: u16, tag: u32) {
    let socket = raw_socket(ns, dst.is_ipv6());
    let packet = init_packet(src_port, dst.port(), tag);
    // Raw sockets take port 0: the SCTP header carries the port.
    let to = SockAddr::from(SocketAddr::new(dst.ip(), 0));
    socket.send_to(&packet, &to).expect("send the SCTP INIT");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn init_round_trip() {
        let p = init_packet(40000, 9999, 0xabcd);
        assert_eq!(parse_init(&p, 0xabcd), Some(9999));
        assert_eq!(parse_init(&p, 0xabce), None);
    }
}
