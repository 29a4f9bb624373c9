//! Steady client load through a service while something else happens (updates, restarts, API
//! outages): every TCP connection and UDP datagram is counted, and every failure is kept with
//! the moment it started, so a test can assert "none failed" and print what it measured.
//!
//! Each generator is one thread that entered the client namespace once ([`Netns::spawn_in`]),
//! so the request rate is not limited by thread creation. TCP: a new connection per request
//! (connect, read the echo server's identity to EOF). UDP: a new socket per datagram, so every
//! datagram is a new flow that the current rules NAT.

use std::collections::BTreeMap;
use std::io::{self, Read as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

use super::netns::Netns;

/// How long a connect may take. A SYN dropped by a gap in the rules is retransmitted after 1 s;
/// such a connect is counted as failed whether or not the retransmission then got through
/// ([`syn_retransmits`]), so this bound only has to outlast the machine's own stalls.
/// (A bound just under 1 s, used before, also failed connects the rules had not dropped: in CI
/// a SYN that landed on a server's TIME_WAIT, whose answer the node then dropped as INVALID;
/// the source ports and the reset in `tcp_once` now keep such state out of the way.)
pub(crate) const CONNECT: Duration = Duration::from_secs(3);
/// A connect with a SYN retransmission that took at least this long lost its SYN: Linux resends
/// an unanswered SYN after 1 s (a margin below it for timer slack).
const SILENT_SYN_RESENT: Duration = Duration::from_millis(900);
/// How long a reply (TCP identity, UDP answer) may take.
pub(crate) const REPLY: Duration = Duration::from_secs(1);

/// What one generator saw.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Requests answered.
    pub(crate) ok: usize,
    /// Answers by identity (which endpoint served).
    pub(crate) answers: BTreeMap<String, usize>,
    /// Failed requests: when each was sent (wall clock, comparable with kproxy's log
    /// timestamps), and what happened.
    pub(crate) failures: Vec<(SystemTime, String)>,
}

impl Tally {
    /// Requests made.
    pub(crate) fn sent(&self) -> usize {
        self.ok + self.failures.len()
    }

    fn record(&mut self, sent: SystemTime, took: Duration, result: io::Result<String>) {
        match result {
            Ok(id) if !id.is_empty() => {
                self.ok += 1;
                *self.answers.entry(id).or_insert(0) += 1;
            }
            Ok(_) => self.failures.push((sent, "empty answer".into())),
            Err(e) => self
                .failures
                .push((sent, format!("{:?}: {e} after {took:?}", e.kind()))),
        }
    }
}

/// Running generators; [`Load::stop`] ends them and returns their tallies.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    tcp: Option<JoinHandle<Tally>>,
    udp: Option<JoinHandle<Tally>>,
}

/// The tallies of a [`Load`].
#[derive(Debug, Default)]
pub(crate) struct LoadReport {
    /// TCP connections.
    pub(crate) tcp: Tally,
    /// UDP datagrams.
    pub(crate) udp: Tally,
}

impl Load {
    /// Starts a TCP generator towards `tcp` and a UDP one towards `udp` (either optional), each
    /// sending one request every `pace` from `ns`.
    pub(crate) fn start(
        ns: &Netns,
        tcp: Option<SocketAddr>,
        udp: Option<SocketAddr>,
        pace: Duration,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let spawn = |dst: SocketAddr, request: fn(SocketAddr) -> io::Result<String>, name| {
            let stop = Arc::clone(&stop);
            ns.spawn_in(name, move || {
                let mut tally = Tally::default();
                while !stop.load(Ordering::Relaxed) {
                    let (sent, start) = (SystemTime::now(), Instant::now());
                    let result = request(dst);
                    tally.record(sent, start.elapsed(), result);
                    std::thread::sleep(pace);
                }
                tally
            })
        };
        Load {
            tcp: tcp.map(|dst| spawn(dst, tcp_once, "load-tcp")),
            udp: udp.map(|dst| spawn(dst, udp_once, "load-udp")),
            stop,
        }
    }

    /// Stops the generators and returns what they saw.
    pub(crate) fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let join = |h: Option<JoinHandle<Tally>>| {
            h.map(|h| h.join().expect("load generator panicked"))
                .unwrap_or_default()
        };
        LoadReport {
            tcp: join(self.tcp.take()),
            udp: join(self.udp.take()),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The source ports the TCP generator uses, in turn: below the kernel's ephemeral range
/// (32768–60999), so the test's other connections never take them, and enough of them that no
/// port comes round again within a test (at 100 connections a second, 227 s). A port used
/// again while some state of its last connection lingers (a server's TIME_WAIT or FIN_WAIT2, a
/// conntrack entry) gets its SYN answered by a stray ACK, and the client resends it: a
/// retransmission that is the kernel's, not a gap in the rules.
const SOURCE_PORTS: std::ops::Range<u16> = 10_000..32_768;

thread_local! {
    static NEXT_PORT: std::cell::Cell<u16> = const { std::cell::Cell::new(SOURCE_PORTS.start) };
}

/// A TCP socket for `dst` bound to the generator's next free source port.
fn bound_socket(dst: SocketAddr) -> io::Result<Socket> {
    let any: std::net::IpAddr = if dst.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    for _ in 0..100 {
        let port = NEXT_PORT.get();
        NEXT_PORT.set(if port + 1 >= SOURCE_PORTS.end {
            SOURCE_PORTS.start
        } else {
            port + 1
        });
        let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
        match socket.bind(&SockAddr::from(SocketAddr::new(any, port))) {
            Ok(()) => return Ok(socket),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("no free source port in 100 tries"))
}

fn tcp_once(dst: SocketAddr) -> io::Result<String> {
    let before = syn_retransmits()?;
    let socket = bound_socket(dst)?;
    let start = Instant::now();
    socket.connect_timeout(&SockAddr::from(dst), CONNECT)?;
    let took = start.elapsed();
    let retransmitted = syn_retransmits()? - before;
    // A SYN that nothing answered is resent after the initial RTO of 1 s; one answered by a
    // stray ACK (some state of an earlier connection with the same addresses and ports) is
    // resent at once. Only the first is a lost packet.
    if retransmitted > 0 && took >= SILENT_SYN_RESENT {
        return Err(io::Error::other(format!(
            "connected, but only after {retransmitted} SYN retransmission(s): a packet was lost"
        )));
    }
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(REPLY))?;
    let mut out = String::new();
    stream.read_to_string(&mut out)?;
    // Close with a reset rather than a FIN: the server, which closed first, then holds no
    // TIME_WAIT for this connection. Otherwise, at a hundred connections a second, the client's
    // source ports wrap within the server's 60 s TIME_WAIT, and behind the node's masquerade a
    // new SYN can land on an old TIME_WAIT that rejects it (PAWS) and answers with an ACK: the
    // client resets and resends its SYN, which counts as a retransmission, and when the node's
    // conntrack drops that ACK as INVALID the resend waits the full 1 s. Kernel behaviour that
    // upstream's rules share, not a gap in the rules.
    SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
    Ok(out)
}

/// The SYN retransmissions this thread's network namespace has made so far (`TcpExt:
/// TCPSynRetrans`). The generator is the only thing connecting from its namespace while it runs
/// (a test's own probes retransmit only when packets are lost too), so a change across one
/// connect is that connect's SYN lost. Read from the kernel's counters rather than the socket's
/// `TCP_INFO`, which would need unsafe code.
fn syn_retransmits() -> io::Result<u64> {
    let netstat = std::fs::read_to_string("/proc/thread-self/net/netstat")?;
    let mut lines = netstat.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let found = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == "TCPSynRetrans");
        if let Some((_, value)) = found {
            return value.parse().map_err(io::Error::other);
        }
    }
    Err(io::Error::other(
        "no TcpExt TCPSynRetrans in /proc/thread-self/net/netstat",
    ))
}

fn udp_once(dst: SocketAddr) -> io::Result<String> {
    let any: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse().expect("addr")
    } else {
        "[::]:0".parse().expect("addr")
    };
    let socket = UdpSocket::bind(any)?;
    socket.connect(dst)?;
    socket.set_read_timeout(Some(REPLY))?;
    socket.send(b"ping")?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The generator's own check: a 200 ms gap that drops SYNs on the node is counted as failed
/// connections (retransmitted SYNs that then got through), and nothing else is.
#[test]
fn load_counts_a_dropped_syn_as_a_failure() {
    use super::topology::{POD_V4, Topology};
    use super::traffic::TcpEcho;

    if !super::require_root("load_counts_a_dropped_syn_as_a_failure") {
        return;
    }
    let topo = Topology::new();
    let pod = SocketAddr::new(POD_V4[0].parse().expect("ip"), 8080);
    let _server = TcpEcho::start(&topo.endpoints, pod, "ep1");
    let load = Load::start(&topo.client, Some(pod), None, Duration::from_millis(10));
    std::thread::sleep(Duration::from_millis(500));
    let gap = "table inet gap { chain gate { type filter hook forward priority 0; \
               tcp dport 8080 tcp flags & (syn | ack) == syn drop; }; }";
    topo.node.run("nft", &[gap]);
    std::thread::sleep(Duration::from_millis(200));
    topo.node.run("nft", &["delete table inet gap"]);
    std::thread::sleep(Duration::from_secs(2));
    let report = load.stop();
    let tcp = &report.tcp;
    assert!(tcp.ok > 50, "{tcp:?}");
    assert!(!tcp.failures.is_empty(), "the gap went unnoticed: {tcp:?}");
    assert!(
        tcp.failures
            .iter()
            .all(|(_, why)| why.contains("SYN retransmission")),
        "{:?}",
        tcp.failures
    );
}
