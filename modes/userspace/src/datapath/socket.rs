//! Listening sockets with the options a proxy needs.
//!
//! Every listening socket is bound with `SO_REUSEPORT`, for two reasons:
//! - per-core sockets: each data-path worker has its own socket on every listener address, and the
//!   kernel spreads connections and UDP flows over them by a hash of the 4-tuple, so a connection
//!   is accepted, proxied and closed on one core, with no lock and no cross-thread wake-up
//!   (a worker about to sleep takes what waits in a busy one's queue: `steal.rs`);
//! - upgrades: a new kproxy started next to a running one (a DaemonSet surge rollout) binds the
//!   same addresses alongside the old process instead of failing with `EADDRINUSE`, so new
//!   connections always find a listener (see `handover.rs`).
//!
//! `SO_REUSEPORT` only groups sockets of the same effective user, so another user's process can
//! never join a kproxy listener.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;

use socket2::{Domain, Protocol, Socket, Type};

/// Pending connections per listener before the kernel refuses more (capped by somaxconn).
const BACKLOG: i32 = 4096;

fn socket(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    // A restarted kproxy binds again while its old connections sit in TIME_WAIT.
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
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

/// A non-blocking TCP listener on `addr`. Accepted sockets inherit `TCP_NODELAY` from it
/// (the kernel clones the listener's options), which saves a system call per connection.
pub(super) fn tcp_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = socket(addr, Type::STREAM, Protocol::TCP)?;
    s.set_tcp_nodelay(true)?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// A non-blocking UDP socket bound to `addr` (a specific address, so replies leave from it), with
/// UDP GRO where the kernel has it (the receive path splits coalesced datagrams itself).
pub(super) fn udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = socket(addr, Type::DGRAM, Protocol::UDP)?;
    enable_gro(&s);
    Ok(s.into())
}

/// Asks for coalesced receives (`UDP_GRO`, Linux 5.0). Without it the kernel delivers one
/// datagram per receive, which is also handled.
pub(super) fn enable_gro<F: AsFd>(fd: &F) {
    let _ = nix::sys::socket::setsockopt(fd, nix::sys::socket::sockopt::UdpGroSegment, &true);
}

/// The socket's inode number, as `/proc/net/{tcp,udp}*` list it.
pub(super) fn inode<F: AsFd>(fd: &F) -> u64 {
    nix::sys::stat::fstat(fd).map_or(0, |st| st.st_ino)
}

/// How many listener sockets may be held before listeners get one socket each instead of one
/// per thread: a quarter of the open-file limit, so the rest stays for connections (two
/// descriptors each) and UDP flows (one each). A TCP listener socket that has had a connection
/// holds a second descriptor (`steal.rs`) for at most this many sockets, so the duplicates never
/// take more than another quarter.
/// Called after [`raise_nofile_limit`].
pub(super) fn listener_socket_budget() -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| {
        usize::try_from(soft / 4).unwrap_or(usize::MAX)
    })
}

/// Raises the soft open-file limit to the hard one: every proxied TCP connection holds two
/// sockets and every UDP flow one. (Go programs, upstream kube-proxy included, do this at start.)
pub(super) fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-file limit"),
            Err(err) => tracing::debug!(error = %err, "cannot raise the open-file limit"),
        }
    }
}
