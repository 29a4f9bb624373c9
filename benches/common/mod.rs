//! What the benchmark targets share: network namespaces and the client → node → server topology,
//! the servers at the far end, the traffic generators (TCP bulk, request/response, connect
//! latency, UDP round trips), and the generated Service/EndpointSlice objects.
//!
//! Each bench target includes this module (`mod common;`) and uses a part of it.
#![allow(dead_code, reason = "each bench target uses a different part")]

pub(crate) mod cpu;
pub(crate) mod objects;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

pub(crate) const CLIENT: &str = "10.1.1.2";
pub(crate) const NODE: &str = "10.1.1.1";
pub(crate) const NODE_SERVER_SIDE: &str = "10.1.2.1";
pub(crate) const SERVER: &str = "10.1.2.2";
/// Server ports: bulk sink (it greets each connection with one byte, so a client knows the
/// whole path is up), 1 KiB request/response, UDP echo.
pub(crate) const SINK: u16 = 8080;
pub(crate) const RR: u16 = 8081;
pub(crate) const ECHO: u16 = 5353;

/// A network namespace, deleted on drop.
pub(crate) struct Ns(pub(crate) String);

impl Ns {
    /// `kpx-{prefix}-{pid}-{role}`.
    pub(crate) fn new(prefix: &str, role: &str) -> Ns {
        let name = format!("kpx-{prefix}-{}-{role}", std::process::id());
        cmd("ip", &["netns", "add", &name]);
        let ns = Ns(name);
        ns.ip(&["link", "set", "lo", "up"]);
        // Many short connections: the whole port range, and TIME_WAIT ports reused.
        ns.sysctl("net/ipv4/ip_local_port_range", "1024 65535");
        ns.sysctl("net/ipv4/tcp_tw_reuse", "1");
        ns
    }

    pub(crate) fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.0.as_str()];
        full.extend_from_slice(args);
        cmd("ip", &full);
    }

    /// `ip -n NS -batch -`: many addresses or routes in one process.
    pub(crate) fn ip_batch(&self, script: &str) {
        let mut child = Command::new("ip")
            .args(["-n", &self.0, "-batch", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "ip -batch failed");
    }

    pub(crate) fn sysctl(&self, key: &str, value: &str) {
        let (path, value) = (format!("/proc/sys/{key}"), value.to_string());
        self.run(move || std::fs::write(path, value).unwrap());
    }

    /// Runs `f` on a thread inside the namespace (sockets made there stay there).
    pub(crate) fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().unwrap()
    }

    pub(crate) fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let file = std::fs::File::open(path).unwrap();
            setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
    }

    /// Moves the calling thread into the namespace until the guard drops, so every tool the
    /// thread spawns (iptables-restore, nft, ip) and every thread it starts works there.
    pub(crate) fn enter(&self) -> Entered {
        let original = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
        let target = std::fs::File::open(format!("/run/netns/{}", self.0)).unwrap();
        setns(&target, CloneFlags::CLONE_NEWNET).unwrap();
        Entered { original }
    }

    /// `ip netns exec NS program args…`, in the background, in a process group of its own (so
    /// forked children go with it).
    pub(crate) fn child(&self, program: &str, args: &[&str], env: &[(&str, &str)]) -> Child {
        use std::os::unix::process::CommandExt as _;
        Command::new("ip")
            .process_group(0)
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .output();
    }
}

/// The calling thread back in its original namespace on drop.
pub(crate) struct Entered {
    original: std::fs::File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let _ = setns(&self.original, CloneFlags::CLONE_NEWNET);
    }
}

pub(crate) fn cmd(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `program` is on the PATH.
pub(crate) fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Kills a background process and its process group (its forked children) on drop.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// ```text
///  client 10.1.1.2 ──veth── 10.1.1.1 node 10.1.2.1 ──veth── 10.1.2.2 server
/// ```
/// The node forwards; client and server route everything through it.
pub(crate) struct Topology {
    pub(crate) client: Ns,
    pub(crate) node: Ns,
    pub(crate) server: Ns,
}

pub(crate) fn topology(prefix: &str) -> Topology {
    let (client, node, server) = (
        Ns::new(prefix, "client"),
        Ns::new(prefix, "node"),
        Ns::new(prefix, "server"),
    );
    node.sysctl("net/ipv4/ip_forward", "1");
    for (a, a_ip, b, b_ip, dev) in [
        (&client, CLIENT, &node, NODE, "c"),
        (&node, NODE_SERVER_SIDE, &server, SERVER, "s"),
    ] {
        let (da, db) = (format!("{dev}0"), format!("{dev}1"));
        a.ip(&[
            "link", "add", &da, "type", "veth", "peer", "name", &db, "netns", &b.0,
        ]);
        a.ip(&["addr", "add", &format!("{a_ip}/24"), "dev", &da]);
        b.ip(&["addr", "add", &format!("{b_ip}/24"), "dev", &db]);
        a.ip(&["link", "set", &da, "up"]);
        b.ip(&["link", "set", &db, "up"]);
    }
    client.ip(&["route", "add", "default", "via", NODE]);
    server.ip(&["route", "add", "default", "via", NODE_SERVER_SIDE]);
    Topology {
        client,
        node,
        server,
    }
}

/// The servers in `ns`: on `tcp_ip` a sink that greets each connection with one byte and then
/// counts what it receives, and a 1 KiB request/response server; a UDP echo on each of
/// `udp_ips` (one socket per address, so every reply leaves from the address the request was
/// sent to, as conntrack needs to reverse a DNAT). They stop when the returned value drops.
pub(crate) fn servers(
    ns: &Ns,
    tcp_ip: IpAddr,
    udp_ips: &[IpAddr],
    received: Arc<AtomicU64>,
) -> Servers {
    let mut fds = Vec::new();
    let sink = ns.run(move || TcpListener::bind((tcp_ip, SINK)).unwrap());
    fds.push(sink.as_fd().try_clone_to_owned().unwrap());
    std::thread::spawn(move || {
        while let Ok((mut conn, _)) = sink.accept() {
            let received = received.clone();
            let _ = conn.set_nodelay(true);
            if conn.write_all(b"k").is_err() {
                continue;
            }
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    let rr = Arc::new(ns.run(move || TcpListener::bind((tcp_ip, RR)).unwrap()));
    fds.push(rr.as_fd().try_clone_to_owned().unwrap());
    for _ in 0..8 {
        let rr = rr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok((mut conn, _)) = rr.accept() {
                let _ = conn.set_nodelay(true);
                if conn.read_exact(&mut buf).is_ok() && conn.write_all(&buf).is_ok() {
                    // The client closes first (its side keeps the TIME_WAIT).
                    let _ = conn.read(&mut buf);
                }
            }
        });
    }
    let stop = Arc::new(AtomicBool::new(false));
    for &ip in udp_ips {
        let echo = ns.run(move || UdpSocket::bind((ip, ECHO)).unwrap());
        serve_udp_echo(echo, stop.clone());
    }
    Servers {
        listeners: fds,
        stop,
    }
}

/// The servers' sockets: listeners shut down on drop (which wakes their threads out of
/// `accept`), UDP echo threads told to stop, so they end and the namespace can go.
pub(crate) struct Servers {
    listeners: Vec<OwnedFd>,
    stop: Arc<AtomicBool>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for fd in &self.listeners {
            let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
    }
}

pub(crate) fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Connects to the sink and waits for its greeting: the whole path (and any proxy) is up.
/// Generous timeouts: under a bulk load a proxy on a busy shared machine can take a while to
/// set up a new connection, which is a slow figure, not a failure.
fn greeted(to: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(s)
}

/// One bulk measurement: bytes per second the sink received, and how many streams never got
/// the sink's greeting through the path (reported, not fatal: a benchmark shows a broken path
/// rather than hiding every other figure).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Bulk {
    pub(crate) bytes_per_s: f64,
    pub(crate) failed: usize,
}

/// `streams` clients write for `d` once greeted.
pub(crate) fn bulk(
    client: &Ns,
    to: SocketAddr,
    streams: usize,
    d: Duration,
    received: &AtomicU64,
) -> Bulk {
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..streams)
        .map(|_| {
            let stop = stop.clone();
            client.spawn(move || {
                let Ok(mut s) = greeted(to) else {
                    return false;
                };
                let buf = vec![0x5au8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    if s.write_all(&buf).is_err() {
                        break;
                    }
                }
                let _ = s.shutdown(Shutdown::Write);
                true
            })
        })
        .collect();
    // Let every stream reach its steady state before counting.
    std::thread::sleep(d / 5);
    let (b0, t0) = (received.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(d);
    let (b1, t1) = (received.load(Ordering::Relaxed), t0.elapsed());
    stop.store(true, Ordering::Relaxed);
    let failed = writers
        .into_iter()
        .map(std::thread::JoinHandle::join)
        .filter(|r| !matches!(r, Ok(true)))
        .count();
    if failed > 0 {
        eprintln!(
            "WARNING: {failed} of {streams} bulk streams to {to} never got the server's greeting within 10 s"
        );
    }
    Bulk {
        bytes_per_s: (b1 - b0) as f64 / t1.as_secs_f64(),
        failed,
    }
}

/// `n` sequential connects to the sink, each timed until its greeting arrived (the endpoint
/// answered, not just a proxy's listener), sorted.
pub(crate) fn connect_latency(client: &Ns, to: SocketAddr, n: usize) -> Vec<Duration> {
    let mut samples = client.run(move || {
        (0..n)
            .map(|_| {
                let t = Instant::now();
                let s = greeted(to).unwrap_or_else(|e| panic!("connect to {to}: {e}"));
                let d = t.elapsed();
                drop(s);
                d
            })
            .collect::<Vec<_>>()
    });
    samples.sort();
    samples
}

/// The median and the 99th percentile of sorted samples.
pub(crate) fn p50_p99(sorted: &[Duration]) -> (Duration, Duration) {
    let n = sorted.len();
    if n == 0 {
        return (Duration::ZERO, Duration::ZERO);
    }
    (sorted[n / 2], sorted[(n * 99 / 100).min(n - 1)])
}

/// One fresh connection carrying a 1 KiB request and a 1 KiB response.
pub(crate) fn one_request(to: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0x42u8; 1024];
    s.write_all(&buf).is_ok() && s.read_exact(&mut buf).is_ok()
}

/// Requests per second with `clients` concurrent clients for `d`.
pub(crate) fn conn_rate(client: &Ns, to: SocketAddr, clients: usize, d: Duration) -> f64 {
    let start = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            client.spawn(move || {
                let mut ok = 0u64;
                while start.elapsed() < d {
                    if one_request(to) {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let total: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    total as f64 / start.elapsed().as_secs_f64()
}

/// p50 and p99 of `n` sequential requests.
pub(crate) fn request_latency(client: &Ns, to: SocketAddr, n: usize) -> (Duration, Duration) {
    let mut samples = client.run(move || {
        (0..n)
            .map(|_| {
                let s = Instant::now();
                assert!(one_request(to), "request to {to} failed");
                s.elapsed()
            })
            .collect::<Vec<_>>()
    });
    samples.sort();
    p50_p99(&samples)
}

/// One UDP round trip from `from`: a reply counts only when it comes from the address the
/// request went to.
pub(crate) fn udp_once(from: IpAddr, to: SocketAddr) -> bool {
    let s = UdpSocket::bind((from, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    s.send_to(b"x", to).is_ok() && s.recv_from(&mut [0u8; 16]).is_ok_and(|(_, p)| p == to)
}

/// UDP round trips per second with `clients` clients (64-byte datagrams) for `d`; replies from
/// any other address than `to` are not counted.
pub(crate) fn udp_rate(
    client: &Ns,
    from: IpAddr,
    to: SocketAddr,
    clients: usize,
    d: Duration,
) -> f64 {
    let start = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            client.spawn(move || {
                let s = UdpSocket::bind((from, 0)).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let (msg, mut buf, mut ok) = ([7u8; 64], [0u8; 2048], 0u64);
                while start.elapsed() < d {
                    if s.send_to(&msg, to).is_ok() {
                        match s.recv_from(&mut buf) {
                            Ok((_, peer)) if peer == to => ok += 1,
                            Ok(_) => {}
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                            Err(_) => {}
                        }
                    }
                }
                ok
            })
        })
        .collect();
    let total: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    total as f64 / start.elapsed().as_secs_f64()
}

/// Waits until the sink greets through `to` and a UDP round trip through `echo` succeeds.
pub(crate) fn wait_ready(client: &Ns, from: IpAddr, to: SocketAddr, echo: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !client.run(move || greeted(to).is_ok()) {
        assert!(Instant::now() < deadline, "{to} never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    while !client.run(move || udp_once(from, echo)) {
        assert!(Instant::now() < deadline, "{echo} never answered");
    }
}

/// Answers every datagram on `echo` with itself, on a thread of its own, until `stop` is set.
fn serve_udp_echo(echo: UdpSocket, stop: Arc<AtomicBool>) {
    // A UDP socket is not woken by shutdown(2) the way a listener is: poll a flag.
    echo.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            match echo.recv_from(&mut buf) {
                Ok((n, peer)) => {
                    let _ = echo.send_to(&buf[..n], peer);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
    });
}

/// A UDP echo on `ip:port` in `ns` with one `SO_REUSEPORT` socket per thread (`threads`), so the
/// endpoint is not what limits many-flow runs. Stops when the returned flag is set.
pub(crate) fn udp_echo_reuseport(
    ns: &Ns,
    ip: IpAddr,
    port: u16,
    threads: usize,
) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    for _ in 0..threads {
        let echo = ns.run(move || {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(SocketAddr::new(ip, port)),
                socket2::Type::DGRAM,
                None,
            )
            .unwrap();
            s.set_reuse_port(true).unwrap();
            s.bind(&SocketAddr::new(ip, port).into()).unwrap();
            UdpSocket::from(s)
        });
        serve_udp_echo(echo, stop.clone());
    }
    stop
}

/// UDP round trips per second over `flows` client sockets (each its own flow through a proxy,
/// each with one 64-byte request outstanding), driven by `threads` threads with epoll, for `d`.
/// A connected socket only receives from the address it sent to, so a reply from any other
/// source is not counted. A request unanswered for 50 ms is sent again (a lost datagram must not
/// stop its flow).
pub(crate) fn udp_flows(
    client: &Ns,
    from: IpAddr,
    to: SocketAddr,
    flows: usize,
    threads: usize,
    d: Duration,
) -> f64 {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
    let threads = threads.clamp(1, flows.max(1));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let mine = flows / threads + usize::from(t < flows % threads);
            client.spawn(move || {
                let sockets: Vec<UdpSocket> = (0..mine)
                    .map(|_| {
                        let s = UdpSocket::bind((from, 0)).unwrap();
                        s.connect(to).unwrap();
                        s.set_nonblocking(true).unwrap();
                        s
                    })
                    .collect();
                let epoll = Epoll::new(EpollCreateFlags::empty()).unwrap();
                for (i, s) in sockets.iter().enumerate() {
                    epoll
                        .add(s, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))
                        .unwrap();
                }
                let msg = [7u8; 64];
                let mut sent_at = vec![Instant::now(); mine];
                for s in &sockets {
                    let _ = s.send(&msg);
                }
                let (mut events, mut buf, mut ok) =
                    (vec![EpollEvent::empty(); 256], [0u8; 2048], 0u64);
                let mut last_scan = Instant::now();
                while start.elapsed() < d {
                    let n = epoll
                        .wait(&mut events, EpollTimeout::from(10u16))
                        .unwrap_or(0);
                    for ev in &events[..n] {
                        let i = ev.data() as usize;
                        while sockets[i].recv(&mut buf).is_ok() {
                            ok += 1;
                            let _ = sockets[i].send(&msg);
                            sent_at[i] = Instant::now();
                        }
                    }
                    if last_scan.elapsed() > Duration::from_millis(20) {
                        last_scan = Instant::now();
                        for (i, s) in sockets.iter().enumerate() {
                            if sent_at[i].elapsed() > Duration::from_millis(50) {
                                let _ = s.send(&msg);
                                sent_at[i] = Instant::now();
                            }
                        }
                    }
                }
                ok
            })
        })
        .collect();
    let total: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    total as f64 / start.elapsed().as_secs_f64()
}

/// A TCP server on `ip:port` in `ns` that accepts and holds every connection open without
/// reading (idle connections for a memory measurement). Returns the number accepted so far;
/// the listener closes when the namespace goes.
pub(crate) fn hold_server(ns: &Ns, ip: IpAddr, port: u16) -> Arc<AtomicU64> {
    let listener = ns.run(move || {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(SocketAddr::new(ip, port)),
            socket2::Type::STREAM,
            None,
        )
        .unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&SocketAddr::new(ip, port).into()).unwrap();
        s.listen(4096).unwrap();
        TcpListener::from(s)
    });
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        loop {
            match listener.accept() {
                Ok((conn, _)) => {
                    held.push(conn);
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    eprintln!("hold server: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    });
    accepted
}

/// Raises this process's open-file limit (soft and hard) to `n` (root may): many-connection
/// measurements hold tens of thousands of sockets, and the processes the harness starts inherit it.
pub(crate) fn raise_nofile(n: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    if setrlimit(Resource::RLIMIT_NOFILE, n.max(soft), n.max(hard)).is_err() {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
