//! Echo servers inside a namespace and clients that talk to them.
//!
//! A server answers every TCP connection or UDP datagram with its identity (`"ep1"`), so a client
//! can tell which endpoint a service sent it to. Servers run on std threads and stop on drop.
//! Clients create their socket inside the namespace (see [`Netns::in_ns`]) and may bind a chosen
//! source address: REJECT's ICMP errors are rate-limited per client address (machine notes), so a
//! test that expects many refusals spreads them over several source addresses.

use std::collections::BTreeMap;
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::netns::Netns;

/// How often server loops look at their stop flag.
const POLL: Duration = Duration::from_millis(10);

/// A TCP server that writes its identity to each connection, then closes it.
#[derive(Debug)]
pub(crate) struct TcpEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEcho {
    /// Listens on `addr` inside `ns`.
    pub(crate) fn start(ns: &Netns, addr: SocketAddr, identity: &str) -> TcpEcho {
        TcpEcho::start_inner(ns, addr, identity, false)
    }

    /// Like [`TcpEcho::start`], but answers `IDENTITY from PEER-IP`: the source address the
    /// connection arrived with (see [`split_peer`]).
    pub(crate) fn start_reporting_peer(ns: &Netns, addr: SocketAddr, identity: &str) -> TcpEcho {
        TcpEcho::start_inner(ns, addr, identity, true)
    }

    fn start_inner(ns: &Netns, addr: SocketAddr, identity: &str, report_peer: bool) -> TcpEcho {
        let listener = ns
            .in_ns(move || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind tcp {addr} in {}: {e}", ns.name()));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let identity = identity.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("tcp-{identity}"))
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut conn, peer)) => {
                            let _ = conn.set_nonblocking(false);
                            let answer = if report_peer {
                                format!("{identity} from {}", peer.ip())
                            } else {
                                identity.clone()
                            };
                            let _ = conn.write_all(answer.as_bytes());
                            let _ = conn.shutdown(Shutdown::Write);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(POLL);
                        }
                        Err(_) => std::thread::sleep(POLL),
                    }
                }
            })
            .expect("spawn tcp server");
        TcpEcho {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP server that answers each datagram with its identity.
#[derive(Debug)]
pub(crate) struct UdpEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    /// Binds `addr` inside `ns`.
    pub(crate) fn start(ns: &Netns, addr: SocketAddr, identity: &str) -> UdpEcho {
        let socket = ns
            .in_ns(move || UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("bind udp {addr} in {}: {e}", ns.name()));
        socket.set_read_timeout(Some(POLL)).expect("read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let identity = identity.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("udp-{identity}"))
            .spawn(move || {
                let mut buf = [0u8; 2048];
                while !flag.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(identity.as_bytes(), peer);
                    }
                }
            })
            .expect("spawn udp server");
        UdpEcho {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Splits a [`TcpEcho::start_reporting_peer`] answer into (identity, peer address).
pub(crate) fn split_peer(answer: &str) -> (&str, &str) {
    answer
        .split_once(" from ")
        .unwrap_or_else(|| panic!("not an identity-and-peer answer: {answer:?}"))
}

fn socket_for(
    dst: SocketAddr,
    ty: Type,
    proto: Protocol,
    src: Option<IpAddr>,
) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(dst), ty, Some(proto))?;
    if let Some(ip) = src {
        socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    Ok(socket)
}

/// Connects from `ns` to `dst` and reads the server's identity (everything until EOF).
pub(crate) fn tcp_request(ns: &Netns, dst: SocketAddr, timeout: Duration) -> io::Result<String> {
    tcp_request_from(ns, None, dst, timeout)
}

/// [`tcp_request`] from a chosen source address (one of `ns`'s own).
pub(crate) fn tcp_request_from(
    ns: &Netns,
    src: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<String> {
    ns.in_ns(move || {
        let socket = socket_for(dst, Type::STREAM, Protocol::TCP, src)?;
        socket.connect_timeout(&SockAddr::from(dst), timeout)?;
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(timeout))?;
        let mut out = String::new();
        stream.read_to_string(&mut out)?;
        Ok(out)
    })
}

/// Sends one datagram from `ns` to `dst` and returns the reply.
pub(crate) fn udp_request(ns: &Netns, dst: SocketAddr, timeout: Duration) -> io::Result<String> {
    udp_request_from(ns, None, dst, timeout)
}

/// [`udp_request`] from a chosen source address (one of `ns`'s own).
pub(crate) fn udp_request_from(
    ns: &Netns,
    src: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<String> {
    ns.in_ns(move || {
        let socket = socket_for(dst, Type::DGRAM, Protocol::UDP, src)?;
        let socket: UdpSocket = socket.into();
        socket.connect(dst)?;
        socket.set_read_timeout(Some(timeout))?;
        socket.send(b"ping")?;
        let mut buf = [0u8; 2048];
        let n = socket.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// What `n` requests returned: identity (or `error: KIND`) → count.
pub(crate) fn tally(
    n: usize,
    mut request: impl FnMut() -> io::Result<String>,
) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let key = match request() {
            Ok(identity) => identity,
            Err(e) => format!("error: {:?}", e.kind()),
        };
        *seen.entry(key).or_insert(0) += 1;
    }
    seen
}

/// Asserts a TCP connect from `ns` (source `src`) to `dst` is refused quickly — an RST or an
/// ICMP port-unreachable, surfacing as `ConnectionRefused` well within `within` — not a timeout.
pub(crate) fn assert_tcp_refused(
    ns: &Netns,
    src: Option<IpAddr>,
    dst: SocketAddr,
    within: Duration,
) {
    let start = Instant::now();
    // Give the connect more time than `within`, so a slow refusal reads as "slow", not "timeout".
    let result = tcp_request_from(ns, src, dst, within * 3);
    let elapsed = start.elapsed();
    match result {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => assert!(
            elapsed <= within,
            "connect to {dst} was refused, but only after {elapsed:?} (expected within {within:?})"
        ),
        other => panic!(
            "connect to {dst} from {src:?}: expected ConnectionRefused, got {other:?} after {elapsed:?}"
        ),
    }
}
