//! Listening sockets with the options a proxy needs.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Pending connections per listener before the kernel refuses more (capped by somaxconn).
const BACKLOG: i32 = 4096;

fn socket(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    // A restarted kproxy binds again while its old connections sit in TIME_WAIT.
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // `[::]:NODEPORT` must not also take the IPv4 port (that listener is separate).
        s.set_only_v6(true)?;
        // IPv6 binds only addresses assigned to an interface; a local route on `lo` is not
        // enough (IPv4 accepts it). The route still delivers the packets to this socket.
        s.set_freebind_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// A non-blocking TCP listener on `addr`.
pub(super) fn tcp_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = socket(addr, Type::STREAM, Protocol::TCP)?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// A non-blocking UDP socket bound to `addr` (a specific address, so replies leave from it).
pub(super) fn udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    Ok(socket(addr, Type::DGRAM, Protocol::UDP)?.into())
}
