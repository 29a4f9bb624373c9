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

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::netns::Netns;

/// A connect that takes longer than this failed: a SYN dropped by a gap in the rules is
/// retransmitted only after 1 s, so a shorter bound turns every drop into a counted failure.
pub(crate) const CONNECT: Duration = Duration::from_millis(900);
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

fn tcp_once(dst: SocketAddr) -> io::Result<String> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    socket.connect_timeout(&SockAddr::from(dst), CONNECT)?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(REPLY))?;
    let mut out = String::new();
    stream.read_to_string(&mut out)?;
    Ok(out)
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
