//! Stale UDP conntrack cleanup with real packets, in both kernel modes (docs/semantics.md,
//! rule 20): a client that keeps one UDP socket (one source port, so one conntrack entry) follows
//! the service's endpoints, and TCP connections are never touched.
//!
//! `conntrack -L` runs inside the test's node namespace only (each namespace has its own table),
//! for assertions on TCP entries and for diagnostics.

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::support::family::Fam;
use crate::support::kproxy::wait_until;
use crate::support::manifests::Port;
use crate::support::netns::Netns;
use crate::support::objects::{Ep, Svc, endpoint_slice};
use crate::support::require_root;
use crate::support::scenario::{Mode, OTHER_NODE, PROBE, Scenario, sock};
use crate::support::topology::POD_V4;
use crate::support::traffic::udp_request_from;

const DNS: Port = Port::udp("dns", 53, 5353);
const HTTP: Port = Port::tcp("http", 80, 8080);
/// How long a kept UDP socket may take to follow the endpoints once the rules are in place.
const FOLLOW: Duration = Duration::from_secs(3);

fn start(s: &mut Scenario) {
    // `-v 2`: the cleanup's debug lines are in the logs printed on failure.
    s.start_kproxy(&["-v", "2"]);
}

fn eps_on(addrs: &[&str]) -> Vec<Ep> {
    addrs.iter().map(|a| Ep::ready(a).on(OTHER_NODE)).collect()
}

/// `conntrack -L` of one family in the node namespace (diagnostics).
fn conntrack_list(node: &Netns, f: Fam) -> String {
    let family = if f.v6() { "ipv6" } else { "ipv4" };
    let out = node.exec("conntrack", &["-L", "-f", family]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A UDP socket in the client namespace, bound to the client's primary address, connected to
/// `dst`: every request leaves from the same address and port.
fn kept_udp_socket(s: &Scenario, dst: SocketAddr) -> UdpSocket {
    let src = Fam::of(dst).client(0);
    s.topo
        .client
        .in_ns(move || -> io::Result<UdpSocket> {
            let socket = UdpSocket::bind(SocketAddr::new(src, 0))?;
            socket.connect(dst)?;
            socket.set_read_timeout(Some(PROBE))?;
            Ok(socket)
        })
        .expect("client udp socket")
}

fn ask(socket: &UdpSocket) -> String {
    let mut buf = [0u8; 64];
    match socket.send(b"ping").and_then(|_| socket.recv(&mut buf)) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => format!("error: {:?}", e.kind()),
    }
}

/// Waits (bounded by the scenario's sync bound) until fresh sockets from another client
/// address reach `want`: the rules are programmed. Fresh sockets have fresh source ports, so no
/// old entry applies to them.
fn wait_programmed(s: &mut Scenario, vip: SocketAddr, want: &str) {
    s.wait_for(
        &format!("fresh udp {vip} -> {want}"),
        |t| udp_request_from(&t.client, Some(Fam::of(vip).client(1)), vip, PROBE),
        want,
    );
}

/// Asks through the kept socket until it answers `want`, within [`FOLLOW`]; fails with the
/// node's conntrack table and kproxy's logs.
fn wait_kept_socket(s: &mut Scenario, socket: &UdpSocket, want: &str, what: &str) {
    let start = Instant::now();
    let mut last = String::new();
    let ok = wait_until(FOLLOW, || {
        last = ask(socket);
        last == want
    });
    if !ok {
        let f = socket.peer_addr().map_or(Fam::V4, Fam::of);
        let table = conntrack_list(&s.topo.node, f);
        s.kproxy().assert_running();
        panic!(
            "{what}: the kept UDP socket still does not reach {want} after {:?}; last answer \
             {last:?} (a stale conntrack entry keeps the flow on its old path)\nconntrack -L:\n{table}",
            start.elapsed()
        );
    }
    eprintln!(
        "{what}: kept socket reached {want} after {:?}",
        start.elapsed()
    );
}

// --- the endpoint is replaced --------------------------------------------------------------

both_families!(udp_flow_follows_a_replaced_endpoint);
fn udp_flow_follows_a_replaced_endpoint(mode: Mode, f: Fam) {
    let mut s = Scenario::with_manifests_in(mode);
    s.udp_server(f.pod(0), 5353, "ep1");
    s.udp_server(f.pod(1), 5353, "ep2");
    let slice = format!("dns-{}", f.suffix());
    s.apply(&Svc::new("dns", &[&f.a("10.96.1.53")], &[DNS]).json());
    s.apply(&endpoint_slice("dns", &slice, &eps_on(&[f.pod(0)]), &[DNS]));
    start(&mut s);
    let vip = sock(&f.a("10.96.1.53"), 53);
    wait_programmed(&mut s, vip, "ep1");

    let socket = kept_udp_socket(&s, vip);
    assert_eq!(ask(&socket), "ep1");
    let table = conntrack_list(&s.topo.node, f);
    assert!(
        table.contains("dport=53") && table.contains(&format!("src={}", f.pod(0))),
        "expected a DNATed entry for the kept socket:\n{table}"
    );

    // The pod is replaced: the old one goes away, a new one takes its place.
    s.apply(&endpoint_slice("dns", &slice, &eps_on(&[f.pod(1)]), &[DNS]));
    s.stop_udp_server("ep1");
    wait_programmed(&mut s, vip, "ep2");
    wait_kept_socket(&mut s, &socket, "ep2", "endpoint replaced");
    // The client sticks to the new endpoint.
    assert_eq!(ask(&socket), "ep2");
    s.kproxy().assert_running();
}

// --- no endpoints, then the first one ------------------------------------------------------

both_families!(udp_flow_reaches_the_first_endpoint);
/// A REJECTed first packet leaves no confirmed entry in either mode (the packet dies in the
/// filter hook, before conntrack confirmation), so the first phase passes with or without
/// cleanup; the scaled-to-zero-and-back phase does need it: without cleanup the kept flow stays
/// DNATed to the removed endpoint.
fn udp_flow_reaches_the_first_endpoint(mode: Mode, f: Fam) {
    let slice = format!("dns-{}", f.suffix());
    let mut s = Scenario::with_manifests_in(mode);
    s.udp_server(f.pod(0), 5353, "ep1");
    s.apply(&Svc::new("dns", &[&f.a("10.96.1.53")], &[DNS]).json());
    s.apply(&endpoint_slice("dns", &slice, &[], &[DNS]));
    start(&mut s);
    let vip = sock(&f.a("10.96.1.53"), 53);
    // No endpoints: the service rejects (an ICMP port unreachable, ConnectionRefused).
    s.wait_for_result(
        "udp to a service without endpoints is refused",
        |t| udp_request_from(&t.client, Some(Fam::of(vip).client(1)), vip, PROBE),
        |r| matches!(r, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused),
    );

    // The client keeps sending from one socket while there is nobody to answer.
    let socket = kept_udp_socket(&s, vip);
    for _ in 0..3 {
        assert_ne!(ask(&socket), "ep1");
    }
    eprintln!(
        "conntrack -L with no endpoints:\n{}",
        conntrack_list(&s.topo.node, f)
    );

    s.apply(&endpoint_slice("dns", &slice, &eps_on(&[f.pod(0)]), &[DNS]));
    // Other clients see it first: the rules are in place.
    wait_programmed(&mut s, vip, "ep1");
    wait_kept_socket(&mut s, &socket, "ep1", "first endpoint");

    // Scaled to zero and back (docs/semantics.md, rule 20c): the same socket follows again.
    s.apply(&endpoint_slice("dns", &slice, &[], &[DNS]));
    s.wait_for_result(
        "scaled to zero: refused again",
        |t| udp_request_from(&t.client, Some(f.client(2)), vip, PROBE),
        |r| matches!(r, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused),
    );
    // Other clients are refused as soon as the rules change; the kept flow is cut when the
    // cleanup that follows the apply deletes its entry (its endpoint no longer serves).
    let mut last = String::new();
    let cut = wait_until(FOLLOW, || {
        last = ask(&socket);
        last != "ep1"
    });
    assert!(
        cut,
        "scaled to zero: the kept socket still reaches ep1\n{}",
        conntrack_list(&s.topo.node, f)
    );
    s.apply(&endpoint_slice("dns", &slice, &eps_on(&[f.pod(0)]), &[DNS]));
    wait_programmed(&mut s, vip, "ep1");
    wait_kept_socket(&mut s, &socket, "ep1", "scaled back up");
    s.kproxy().assert_running();
}

// --- the service appears after the client started sending ----------------------------------

both_families!(udp_flow_reaches_a_service_created_later);
/// In iptables mode a packet to an address no service holds is routed (here to a black hole),
/// which confirms a non-NATed entry: without cleanup the flow never meets the new DNAT rule.
/// nftables mode drops such packets (unallocated service IP), so no entry exists there.
fn udp_flow_reaches_a_service_created_later(mode: Mode, f: Fam) {
    let slice = format!("dns-{}", f.suffix());
    let mut s = Scenario::with_manifests_in(mode);
    s.udp_server(f.pod(0), 5353, "ep1");
    // Another service, so the first sync has something to program.
    s.apply(&Svc::new("other", &[&f.a("10.96.1.54")], &[DNS]).json());
    s.apply(&endpoint_slice(
        "other",
        &format!("other-{}", f.suffix()),
        &eps_on(&[f.pod(0)]),
        &[DNS],
    ));
    start(&mut s);
    wait_programmed(&mut s, sock(&f.a("10.96.1.54"), 53), "ep1");

    // The client sends to an address no service holds yet.
    let vip = sock(&f.a("10.96.1.53"), 53);
    let socket = kept_udp_socket(&s, vip);
    for _ in 0..3 {
        assert_ne!(ask(&socket), "ep1");
    }
    eprintln!(
        "conntrack -L before the service exists:\n{}",
        conntrack_list(&s.topo.node, f)
    );

    s.apply(&Svc::new("dns", &[&f.a("10.96.1.53")], &[DNS]).json());
    s.apply(&endpoint_slice("dns", &slice, &eps_on(&[f.pod(0)]), &[DNS]));
    wait_programmed(&mut s, vip, "ep1");
    wait_kept_socket(&mut s, &socket, "ep1", "new service");
    s.kproxy().assert_running();
}

// --- TCP is never touched ------------------------------------------------------------------

/// A TCP server that keeps each connection open and answers every read with
/// `IDENTITY:DATA`. Stops on drop.
struct TcpLineEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpLineEcho {
    fn start(ns: &Netns, addr: SocketAddr, identity: &str) -> TcpLineEcho {
        let listener = ns
            .in_ns(move || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let identity = identity.to_string();
        let thread = std::thread::spawn(move || {
            let mut conns: Vec<JoinHandle<()>> = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let flag = Arc::clone(&flag);
                        let identity = identity.clone();
                        conns.push(std::thread::spawn(move || serve(conn, &identity, &flag)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        TcpLineEcho {
            stop,
            thread: Some(thread),
        }
    }
}

fn serve(mut conn: TcpStream, identity: &str, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let mut answer = format!("{identity}:").into_bytes();
                answer.extend_from_slice(&buf[..n]);
                if conn.write_all(&answer).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for TcpLineEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One request-response on a kept TCP connection.
fn tcp_exchange(conn: &mut TcpStream, msg: &str) -> io::Result<String> {
    conn.write_all(msg.as_bytes())?;
    let mut buf = [0u8; 256];
    let n = conn.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The `id=` of the TCP entry whose original source port is `sport`, from `conntrack -L`.
fn tcp_entry_id(node: &Netns, sport: u16) -> Option<String> {
    let port = sport.to_string();
    let out = node.exec(
        "conntrack",
        &["-L", "-p", "tcp", "--orig-port-src", &port, "-o", "id"],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("id=")))
        .map(str::to_string)
}

fn tcp_connection_survives_endpoint_changes(mode: Mode) {
    let mut s = Scenario::with_manifests_in(mode);
    let _tcp0 = TcpLineEcho::start(&s.topo.endpoints, sock(POD_V4[0], 8080), "t0");
    let _tcp1 = TcpLineEcho::start(&s.topo.endpoints, sock(POD_V4[1], 8080), "t1");
    s.udp_server(POD_V4[0], 5353, "u0");
    s.udp_server(POD_V4[1], 5353, "u1");
    // One service, a TCP and a UDP port, with one slice per port so their endpoints can differ.
    s.apply(&Svc::new("app", &["10.96.1.80"], &[HTTP, DNS]).json());
    s.apply(&endpoint_slice(
        "app",
        "app-tcp",
        &eps_on(&[POD_V4[0]]),
        &[HTTP],
    ));
    s.apply(&endpoint_slice(
        "app",
        "app-udp",
        &eps_on(&[POD_V4[0]]),
        &[DNS],
    ));
    start(&mut s);
    let tcp_vip = sock("10.96.1.80", 80);
    let udp_vip = sock("10.96.1.80", 53);
    wait_programmed(&mut s, udp_vip, "u0");

    let mut conn = s
        .topo
        .client
        .in_ns(move || -> io::Result<TcpStream> {
            let conn = TcpStream::connect_timeout(&tcp_vip, Duration::from_secs(2))?;
            conn.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(conn)
        })
        .expect("tcp connection to the ClusterIP");
    assert_eq!(tcp_exchange(&mut conn, "a").unwrap(), "t0:a");
    let sport = conn.local_addr().unwrap().port();
    let id_before = tcp_entry_id(&s.topo.node, sport)
        .unwrap_or_else(|| panic!("no TCP entry:\n{}", conntrack_list(&s.topo.node, Fam::V4)));
    let socket = kept_udp_socket(&s, udp_vip);
    assert_eq!(ask(&socket), "u0");

    // Endpoint changes of the same service: TCP gains an endpoint (its own stays), UDP's is
    // replaced (so the cleanup has stale entries to delete in the same sync).
    s.apply(&endpoint_slice(
        "app",
        "app-tcp",
        &eps_on(&[POD_V4[0], POD_V4[1]]),
        &[HTTP],
    ));
    s.apply(&endpoint_slice(
        "app",
        "app-udp",
        &eps_on(&[POD_V4[1]]),
        &[DNS],
    ));
    wait_programmed(&mut s, udp_vip, "u1");
    wait_kept_socket(&mut s, &socket, "u1", "udp endpoint replaced");

    // Then the TCP service loses the endpoint it gained: the connection's endpoint remains.
    s.apply(&endpoint_slice(
        "app",
        "app-tcp",
        &eps_on(&[POD_V4[0]]),
        &[HTTP],
    ));
    s.apply(&endpoint_slice(
        "app",
        "app-udp",
        &eps_on(&[POD_V4[0]]),
        &[DNS],
    ));
    wait_programmed(&mut s, udp_vip, "u0");
    wait_kept_socket(&mut s, &socket, "u0", "udp endpoint replaced back");

    for msg in ["b", "c", "d"] {
        assert_eq!(
            tcp_exchange(&mut conn, msg).unwrap(),
            format!("t0:{msg}"),
            "the TCP connection broke"
        );
    }
    let id_after = tcp_entry_id(&s.topo.node, sport);
    assert_eq!(
        id_after.as_deref(),
        Some(id_before.as_str()),
        "the TCP conntrack entry was replaced:\n{}",
        conntrack_list(&s.topo.node, Fam::V4)
    );
    let logs = s.kproxy().stderr() + &s.kproxy().stdout();
    assert!(
        logs.contains("deleting stale conntrack entry"),
        "the cleanup never deleted anything:\n{logs}"
    );
    s.kproxy().assert_running();
}

#[test]
fn iptables_tcp_connection_survives_endpoint_changes() {
    if require_root("iptables_tcp_connection_survives_endpoint_changes") {
        tcp_connection_survives_endpoint_changes(Mode::Iptables);
    }
}

#[test]
fn nftables_tcp_connection_survives_endpoint_changes() {
    if require_root("nftables_tcp_connection_survives_endpoint_changes") {
        tcp_connection_survives_endpoint_changes(Mode::Nftables);
    }
}
