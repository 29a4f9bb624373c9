//! `--proxy-mode userspace` end to end: client namespace → node namespace running kproxy (no
//! netfilter rule anywhere) → endpoint namespace, with real TCP and UDP traffic.
//!
//! What is checked: TCP and UDP (the UDP reply's source is the service address), IPv6, no
//! endpoints → refused at once, failover past a dead endpoint (refusing and black-holed),
//! ClientIP affinity, Local traffic policy, NodePorts, updates under live traffic (established
//! connections survive unrelated changes; a removed endpoint's connection closes after the grace
//! period; a removed service's listener closes at once), `--dry-run` output, `--cleanup`.

use std::collections::BTreeSet;
use std::io::{self, BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::kproxy::{KproxyProcess, wait_until};
use crate::support::manifests::Port;
use crate::support::netns::Netns;
use crate::support::objects::{Ep, Svc, endpoint_slice};
use crate::support::require_root;
use crate::support::scenario::{
    NODE, NODE_ARGS, OTHER_NODE, PROBE, REQ, SYNC, Scenario, Source, assert_spread, sock,
};
use crate::support::topology::{NODE_IP, POD_V4, POD_V6, client_v4};
use crate::support::traffic::{
    assert_tcp_refused, split_peer, tally, tcp_request, tcp_request_from, udp_request,
};

const HTTP: Port = Port::tcp("http", 80, 8080);
const DNS: Port = Port::udp("dns", 53, 5353);
/// The node's address on the pods' link: every proxied connection comes from it.
const NODE_POD_SIDE: &str = "10.0.2.1";

fn eps(addrs: &[&str], node: &str) -> Vec<Ep> {
    addrs.iter().map(|a| Ep::ready(a).on(node)).collect()
}

/// The standard scenario with a manifests directory. kproxy is started by [`start`], not by
/// `Scenario::start_kproxy` (whose modes are the kernel ones).
fn scenario() -> Scenario {
    Scenario::with_manifests()
}

fn manifests_arg(s: &Scenario) -> String {
    match &s.source {
        Source::Manifests(m) => m.arg(),
        Source::Api(_) => unreachable!("a manifests scenario"),
    }
}

/// The flags every run here uses: manifests, node name, userspace mode, fast syncs, no HTTP.
fn base_args(s: &Scenario) -> Vec<String> {
    let manifests = manifests_arg(s);
    [
        &["--manifests", manifests.as_str()][..],
        NODE_ARGS,
        &[
            "--proxy-mode",
            "userspace",
            "--iptables-min-sync-period",
            "100ms",
            "--healthz-bind-address=",
            "--metrics-bind-address=",
        ],
    ]
    .concat()
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// Starts `kproxy --proxy-mode userspace` in the node namespace.
fn start(s: &mut Scenario, extra: &[&str]) {
    let mut args = base_args(s);
    args.extend(extra.iter().map(|a| a.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    s.kproxy = Some(KproxyProcess::start(&s.topo.node, &refs));
}

/// Waits until kproxy's routes of one family satisfy `pred`.
fn wait_routes(s: &mut Scenario, what: &str, v6: bool, pred: impl Fn(&str) -> bool) {
    if !wait_until(SYNC, || pred(&routes(&s.topo.node, v6))) {
        s.kproxy().assert_running();
        panic!(
            "{what}: routes never matched:\n{}",
            routes(&s.topo.node, v6)
        );
    }
}

fn wait_tcp(s: &mut Scenario, dst: SocketAddr, want: &str) {
    s.wait_for(
        &format!("tcp {dst}"),
        |t| tcp_request(&t.client, dst, PROBE),
        want,
    );
}

/// kproxy's routes of one family in the node namespace.
fn routes(node: &Netns, v6: bool) -> String {
    node.run(
        "ip",
        &[
            if v6 { "-6" } else { "-4" },
            "route",
            "show",
            "table",
            "local",
            "proto",
            "201",
        ],
    )
}

/// Nothing of netfilter exists in the node: the mode works without it. Checked once kproxy has
/// looked for other modes' leftovers, which must not create legacy iptables tables either.
fn assert_no_netfilter(kproxy: &KproxyProcess, node: &Netns) {
    crate::support::rules::assert_no_legacy_tables(kproxy, node);
    let nft = node.exec("nft", &["list", "ruleset"]);
    let text = String::from_utf8_lossy(&nft.stdout);
    assert!(
        !text.contains("table"),
        "the userspace mode created netfilter state:\n{text}"
    );
}

#[test]
fn userspace_tcp_udp_and_ipv6_reach_endpoints_from_the_service_address() {
    if !require_root("userspace_tcp_udp_and_ipv6_reach_endpoints_from_the_service_address") {
        return;
    }
    let mut s = scenario();
    s.tcp_server_reporting_peer(POD_V4[0], 8080, "ep1");
    s.tcp_server_reporting_peer(POD_V4[1], 8080, "ep2");
    s.tcp_server(POD_V6[0], 8080, "v6-ep1");
    s.udp_server(POD_V4[2], 5353, "u1");
    s.apply(&Svc::new("web", &["10.96.1.1", "fd00:96::1"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "web",
        "web-v4",
        &eps(&[POD_V4[0], POD_V4[1]], OTHER_NODE),
        &[HTTP],
    ));
    s.apply(&endpoint_slice(
        "web",
        "web-v6",
        &eps(&[POD_V6[0]], OTHER_NODE),
        &[HTTP],
    ));
    s.apply(&Svc::new("dns", &["10.96.1.2"], &[DNS]).json());
    s.apply(&endpoint_slice(
        "dns",
        "dns-v4",
        &eps(&[POD_V4[2]], OTHER_NODE),
        &[DNS],
    ));
    start(&mut s, &[]);

    let vip = sock("10.96.1.1", 80);
    s.wait_for_result(
        "tcp 10.96.1.1:80",
        |t| tcp_request(&t.client, vip, PROBE),
        |r| r.is_ok(),
    );
    let seen = tally(20, || tcp_request(&s.topo.client, vip, REQ));
    let ids: std::collections::BTreeMap<String, usize> = seen
        .iter()
        .map(|(k, v)| (split_peer(k).0.to_string(), *v))
        .collect();
    // Round-robin: exactly half each.
    assert_spread(&ids, &["ep1", "ep2"], 10);
    // The endpoint sees the node (documented: no client-IP preservation).
    for answer in seen.keys() {
        assert_eq!(split_peer(answer).1, NODE_POD_SIDE, "{answer}");
    }
    wait_tcp(&mut s, sock("fd00:96::1", 80), "v6-ep1");

    // UDP: the reply comes from the service address and port, not from the node's.
    let dns = sock("10.96.1.2", 53);
    s.wait_for(
        "udp 10.96.1.2:53",
        |t| udp_request(&t.client, dns, PROBE),
        "u1",
    );
    let (reply, from) = udp_unconnected(&s.topo.client, dns, REQ).expect("udp reply");
    assert_eq!((reply.as_str(), from), ("u1", dns));

    assert!(routes(&s.topo.node, false).contains("10.96.1.1"));
    assert!(routes(&s.topo.node, true).contains("fd00:96::1"));
    assert_no_netfilter(s.kproxy.as_ref().expect("kproxy started"), &s.topo.node);
    s.kproxy().assert_running();
}

/// Sends one datagram from an unconnected socket and returns the reply and its source.
fn udp_unconnected(
    ns: &Netns,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<(String, SocketAddr)> {
    ns.in_ns(move || {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(timeout))?;
        socket.send_to(b"ping", dst)?;
        let mut buf = [0u8; 2048];
        let (n, from) = socket.recv_from(&mut buf)?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    })
}

#[test]
fn userspace_no_endpoints_refuses_at_once() {
    if !require_root("userspace_no_endpoints_refuses_at_once") {
        return;
    }
    let mut s = scenario();
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.apply(&Svc::new("web", &["10.96.1.1"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "web",
        "web-v4",
        &eps(&[POD_V4[0]], OTHER_NODE),
        &[HTTP],
    ));
    s.apply(&Svc::new("empty", &["10.96.1.3"], &[HTTP, DNS]).json());
    start(&mut s, &[]);
    wait_tcp(&mut s, sock("10.96.1.1", 80), "ep1");
    wait_routes(&mut s, "10.96.1.3 is local", false, |r| {
        r.contains("10.96.1.3")
    });
    // TCP: an RST from the node at once, every time (no ICMP rate limit on RSTs).
    for i in 0..8 {
        assert_tcp_refused(
            &s.topo.client,
            Some(client_v4(i)),
            sock("10.96.1.3", 80),
            REQ,
        );
    }
    // UDP: port unreachable, surfacing on a connected socket as "refused".
    match udp_request(&s.topo.client, sock("10.96.1.3", 53), REQ) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        other => panic!("udp to a service without endpoints: {other:?}"),
    }
    // Endpoints appear: served without a restart.
    s.apply(&endpoint_slice(
        "empty",
        "empty-v4",
        &eps(&[POD_V4[0]], OTHER_NODE),
        &[HTTP],
    ));
    wait_tcp(&mut s, sock("10.96.1.3", 80), "ep1");
    s.kproxy().assert_running();
}

#[test]
fn userspace_failover_to_the_next_endpoint() {
    if !require_root("userspace_failover_to_the_next_endpoint") {
        return;
    }
    let mut s = scenario();
    // POD_V4[0] exists but nothing listens (RST); 10.244.9.9 is routed towards the endpoints
    // namespace, which does not own it and does not forward: a black hole (connect timeout).
    s.tcp_server(POD_V4[1], 8080, "ep2");
    s.apply(&Svc::new("web", &["10.96.1.1"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "web",
        "web-v4",
        &eps(&[POD_V4[0], POD_V4[1]], OTHER_NODE),
        &[HTTP],
    ));
    s.apply(&Svc::new("hole", &["10.96.1.5"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "hole",
        "hole-v4",
        &eps(&["10.244.9.9", POD_V4[1]], OTHER_NODE),
        &[HTTP],
    ));
    start(&mut s, &[]);
    let vip = sock("10.96.1.1", 80);
    wait_tcp(&mut s, vip, "ep2");
    // Half of these start at the dead endpoint; every one still reaches the live one.
    let seen = tally(20, || tcp_request(&s.topo.client, vip, REQ));
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        [("ep2".to_string(), 20)]
    );

    let hole = sock("10.96.1.5", 80);
    wait_tcp(&mut s, hole, "ep2");
    let mut slow = Duration::ZERO;
    for _ in 0..4 {
        let start = Instant::now();
        assert_eq!(
            tcp_request(&s.topo.client, hole, Duration::from_secs(3)).unwrap(),
            "ep2"
        );
        slow = slow.max(start.elapsed());
    }
    // One of the four started at the black hole: it waited out the 1 s connect timeout, no
    // more, then went on to the live endpoint.
    assert!(
        slow >= Duration::from_millis(900) && slow < Duration::from_millis(2500),
        "slowest request took {slow:?}"
    );
    s.kproxy().assert_running();
}

#[test]
fn userspace_client_ip_affinity_and_local_policy() {
    if !require_root("userspace_client_ip_affinity_and_local_policy") {
        return;
    }
    let mut s = scenario();
    for (i, id) in ["ep1", "ep2", "ep3"].into_iter().enumerate() {
        s.tcp_server(POD_V4[i], 8080, id);
    }
    s.apply(
        &Svc::new("sticky", &["10.96.1.4"], &[HTTP])
            .client_ip_affinity(600)
            .json(),
    );
    s.apply(&endpoint_slice(
        "sticky",
        "sticky-v4",
        &eps(&[POD_V4[0], POD_V4[1], POD_V4[2]], OTHER_NODE),
        &[HTTP],
    ));
    // internalTrafficPolicy Local: only the endpoint on this node.
    s.apply(
        &Svc::new("local", &["10.96.1.6"], &[HTTP])
            .internal_policy("Local")
            .json(),
    );
    s.apply(&endpoint_slice(
        "local",
        "local-v4",
        &[
            Ep::ready(POD_V4[0]).on(OTHER_NODE),
            Ep::ready(POD_V4[2]).on(NODE),
        ],
        &[HTTP],
    ));
    start(&mut s, &[]);
    let vip = sock("10.96.1.4", 80);
    s.wait_for_result(
        "10.96.1.4:80",
        |t| tcp_request(&t.client, vip, PROBE),
        |r| r.is_ok(),
    );
    let mut chosen = BTreeSet::new();
    for i in 0..8 {
        let seen = tally(6, || {
            tcp_request_from(&s.topo.client, Some(client_v4(i)), vip, REQ)
        });
        assert_eq!(
            seen.len(),
            1,
            "6 connections from {}: {seen:?}",
            client_v4(i)
        );
        chosen.extend(seen.into_keys());
    }
    assert!(chosen.len() >= 2, "8 clients all landed on {chosen:?}");

    let local = sock("10.96.1.6", 80);
    wait_tcp(&mut s, local, "ep3");
    let seen = tally(10, || tcp_request(&s.topo.client, local, REQ));
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        [("ep3".to_string(), 10)]
    );
    s.kproxy().assert_running();
}

#[test]
fn userspace_nodeports_tcp_and_udp() {
    if !require_root("userspace_nodeports_tcp_and_udp") {
        return;
    }
    let mut s = scenario();
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.udp_server(POD_V4[1], 5353, "u1");
    let http = HTTP.with_node_port(30080);
    let dns = DNS.with_node_port(30053);
    s.apply(
        &Svc::new("np", &["10.96.1.7"], &[http, dns])
            .node_port()
            .json(),
    );
    s.apply(&endpoint_slice(
        "np",
        "np-v4",
        &eps(&[POD_V4[0]], OTHER_NODE),
        &[http],
    ));
    s.apply(&endpoint_slice(
        "np",
        "np-dns-v4",
        &eps(&[POD_V4[1]], OTHER_NODE),
        &[dns],
    ));
    start(&mut s, &[]);
    wait_tcp(&mut s, sock(NODE_IP, 30080), "ep1");
    // TCP NodePorts listen on every local address by default (the pods' side too).
    assert_eq!(
        tcp_request(&s.topo.client, sock(NODE_POD_SIDE, 30080), REQ).unwrap(),
        "ep1"
    );
    let np = sock(NODE_IP, 30053);
    s.wait_for("udp nodeport", |t| udp_request(&t.client, np, PROBE), "u1");
    let (reply, from) = udp_unconnected(&s.topo.client, np, REQ).unwrap();
    assert_eq!((reply.as_str(), from), ("u1", np));
    s.kproxy().assert_running();
}

/// A TCP server that keeps connections open and answers every line with `IDENTITY LINE`.
struct LineEcho {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LineEcho {
    fn start(ns: &Netns, addr: SocketAddr, identity: &str) -> LineEcho {
        let listener = ns
            .in_ns(move || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let id = identity.to_string();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let id = id.clone();
                        let flag = flag.clone();
                        std::thread::spawn(move || serve_lines(conn, &id, &flag));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        LineEcho {
            stop,
            thread: Some(thread),
        }
    }
}

fn serve_lines(conn: TcpStream, id: &str, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let mut writer = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer.write_all(format!("{id} {line}").as_bytes()).is_err() {
                    return;
                }
                line.clear();
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

impl Drop for LineEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A long-lived client connection through the proxy.
struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Session {
    fn open(ns: &Netns, src: IpAddr, dst: SocketAddr) -> io::Result<Session> {
        let stream = ns.in_ns(move || {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.bind(&SocketAddr::new(src, 0).into())?;
            socket.connect_timeout(&dst.into(), REQ)?;
            Ok::<TcpStream, io::Error>(socket.into())
        })?;
        stream.set_read_timeout(Some(REQ))?;
        Ok(Session {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// Sends `msg` and returns the identity that echoed it.
    fn ping(&mut self, msg: &str) -> io::Result<String> {
        self.writer.write_all(format!("{msg}\n").as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let (id, echoed) = line
            .trim_end()
            .split_once(' ')
            .unwrap_or((line.as_str(), ""));
        assert_eq!(echoed, msg, "echo mismatch: {line:?}");
        Ok(id.to_string())
    }
}

#[test]
fn userspace_updates_under_live_traffic() {
    if !require_root("userspace_updates_under_live_traffic") {
        return;
    }
    let mut s = scenario();
    let echo: Vec<LineEcho> = ["ep1", "ep2", "ep3"]
        .iter()
        .enumerate()
        .map(|(i, id)| LineEcho::start(&s.topo.endpoints, sock(POD_V4[i], 8080), id))
        .collect();
    s.apply(&Svc::new("live", &["10.96.1.8"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "live",
        "live-v4",
        &eps(&[POD_V4[0], POD_V4[1]], OTHER_NODE),
        &[HTTP],
    ));
    s.apply(&Svc::new("gone", &["10.96.1.9"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "gone",
        "gone-v4",
        &eps(&[POD_V4[2]], OTHER_NODE),
        &[HTTP],
    ));
    start(&mut s, &["--userspace-grace-period", "1s"]);
    let vip = sock("10.96.1.8", 80);
    s.wait_for_result(
        "10.96.1.8:80",
        |t| Session::open(&t.client, client_v4(0), vip).and_then(|mut c| c.ping("hello")),
        |r| r.is_ok(),
    );
    // One established connection to each endpoint (round-robin alternates).
    let mut by_ep = std::collections::BTreeMap::new();
    for i in 0..4 {
        let mut c = Session::open(&s.topo.client, client_v4(0), vip).unwrap();
        let id = c.ping(&format!("open {i}")).unwrap();
        by_ep.entry(id).or_insert(c);
    }
    assert_eq!(by_ep.keys().collect::<Vec<_>>(), ["ep1", "ep2"]);

    // An unrelated change: a third endpoint joins. Both connections carry on.
    s.apply(&endpoint_slice(
        "live",
        "live-v4",
        &eps(&[POD_V4[0], POD_V4[1], POD_V4[2]], OTHER_NODE),
        &[HTTP],
    ));
    s.wait_for_result(
        "ep3 serves 10.96.1.8",
        |t| tcp_line(&t.client, vip),
        |r| matches!(r, Ok(id) if id == "ep3"),
    );
    for (id, c) in &mut by_ep {
        assert_eq!(&c.ping("after add").unwrap(), id);
    }

    // ep2 is removed: its connection stays for the grace period (1 s), then closes; ep1's stays.
    s.apply(&endpoint_slice(
        "live",
        "live-v4",
        &eps(&[POD_V4[0], POD_V4[2]], OTHER_NODE),
        &[HTTP],
    ));
    let removed_at = Instant::now();
    let mut ep2 = by_ep.remove("ep2").unwrap();
    let mut ep1 = by_ep.remove("ep1").unwrap();
    // Once new connections no longer reach ep2, the update is applied.
    assert!(
        wait_until(SYNC, || {
            (0..4).all(|_| tcp_line(&s.topo.client, vip).is_ok_and(|id| id != "ep2"))
        }),
        "ep2 still chosen"
    );
    let applied = removed_at.elapsed();
    assert_eq!(
        ep2.ping("within grace").unwrap(),
        "ep2",
        "closed before the grace period"
    );
    let closed = wait_until(Duration::from_secs(5), || ep2.ping("still there?").is_err());
    assert!(closed, "the removed endpoint's connection was never closed");
    let lifetime = removed_at.elapsed();
    assert!(
        lifetime >= Duration::from_millis(900) && lifetime < applied + Duration::from_secs(3),
        "closed {lifetime:?} after the removal (update applied within {applied:?})"
    );
    assert_eq!(ep1.ping("survivor").unwrap(), "ep1");

    // A removed service's listener closes at once (its address goes too).
    s.source.delete("Service", "gone");
    wait_routes(&mut s, "10.96.1.9 removed", false, |r| {
        !r.contains("10.96.1.9")
    });
    let listening = s.topo.node.run("ss", &["-Hltn"]);
    assert!(!listening.contains("10.96.1.9:80"), "{listening}");
    assert!(listening.contains("10.96.1.8:80"), "{listening}");
    assert_eq!(ep1.ping("still").unwrap(), "ep1");
    drop(echo);
    s.kproxy().assert_running();
}

/// One request on a fresh connection: the identity of the endpoint that answered.
fn tcp_line(ns: &Netns, dst: SocketAddr) -> io::Result<String> {
    let mut c = Session::open(ns, client_v4(1), dst)?;
    let id = c.ping("probe")?;
    let _ = c.writer.shutdown(Shutdown::Both);
    Ok(id)
}

#[test]
fn userspace_dry_run_restart_and_cleanup() {
    if !require_root("userspace_dry_run_restart_and_cleanup") {
        return;
    }
    let mut s = scenario();
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.apply(&Svc::new("web", &["10.96.1.1"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "web",
        "web-v4",
        &eps(&[POD_V4[0]], OTHER_NODE),
        &[HTTP],
    ));
    s.apply(&Svc::new("empty", &["10.96.1.3"], &[HTTP]).json());
    // An externalIP that is the node's own address: served (allowed explicitly: without
    // --external-ip-cidrs covering it, a frontend on a node address is refused), but its
    // kernel route is not ours.
    let allow = ["--external-ip-cidrs", "10.0.1.1/32"];
    let alt = Port::tcp("alt", 81, 8080);
    s.apply(
        &Svc::new("own", &["10.96.1.11"], &[alt])
            .external_ips(&[NODE_IP])
            .json(),
    );
    s.apply(&endpoint_slice(
        "own",
        "own-v4",
        &eps(&[POD_V4[0]], OTHER_NODE),
        &[alt],
    ));

    // --dry-run: the listeners and addresses that would be added; nothing changes.
    let base = base_args(&s);
    let mut dry: Vec<&str> = base.iter().map(String::as_str).collect();
    dry.extend(["--once", "--dry-run"]);
    dry.extend(allow);
    let (p, status) = KproxyProcess::run(&s.topo.node, &dry, SYNC);
    assert!(status.success(), "dry run failed: {}", p.stderr());
    let out = p.stdout();
    for want in [
        "+ address 10.96.1.1\n",
        "+ address 10.96.1.3\n",
        "# service default/web:http (tcp, IPv4)\n+ listen tcp 10.96.1.1:80 cluster-ip -> 10.244.1.10:8080\n",
    ] {
        assert!(out.contains(want), "dry run lacks {want:?}:\n{out}");
    }
    // The service without endpoints gets an address but no listener.
    assert!(!out.contains("10.96.1.3:80"), "{out}");
    assert_eq!(routes(&s.topo.node, false), "", "dry run changed routes");

    start(&mut s, &allow);
    wait_tcp(&mut s, sock("10.96.1.1", 80), "ep1");
    wait_tcp(&mut s, sock(NODE_IP, 81), "ep1");
    assert!(
        !routes(&s.topo.node, false).contains(NODE_IP),
        "took over the node's route"
    );
    // A restart finds its routes in place and opens its listeners again.
    let first = s.kproxy.take();
    drop(first);
    assert!(routes(&s.topo.node, false).contains("10.96.1.1"));
    start(
        &mut s,
        &["--iptables-sync-period", "1s", allow[0], allow[1]],
    );
    wait_tcp(&mut s, sock("10.96.1.1", 80), "ep1");
    // A deleted route is put back within a sync period (the periodic probe sees it gone).
    s.topo.node.ip(&[
        "route",
        "del",
        "local",
        "10.96.1.1/32",
        "dev",
        "lo",
        "table",
        "local",
        "proto",
        "201",
    ]);
    wait_routes(&mut s, "10.96.1.1 restored", false, |r| {
        r.contains("10.96.1.1")
    });
    wait_tcp(&mut s, sock("10.96.1.1", 80), "ep1");
    let again = s.kproxy.take();
    drop(again);

    // --cleanup removes kproxy's routes and leaves a foreign local route alone.
    s.topo.node.ip(&[
        "route",
        "add",
        "local",
        "10.99.0.1/32",
        "dev",
        "lo",
        "table",
        "local",
    ]);
    let mut clean: Vec<&str> = base.iter().map(String::as_str).collect();
    clean.push("--cleanup");
    let (p, status) = KproxyProcess::run(&s.topo.node, &clean, SYNC);
    assert!(status.success(), "cleanup failed: {}", p.stderr());
    assert_eq!(routes(&s.topo.node, false), "");
    let all = s.topo.node.run("ip", &["route", "show", "table", "local"]);
    assert!(all.contains("10.99.0.1"), "{all}");
    assert!(
        all.contains(&format!("local {NODE_IP} dev")),
        "the node's own local route is gone:\n{all}"
    );
    assert!(!all.contains("10.96.1."), "{all}");
}

#[test]
fn userspace_external_ips_and_load_balancer_source_ranges() {
    if !require_root("userspace_external_ips_and_load_balancer_source_ranges") {
        return;
    }
    let mut s = scenario();
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.apply(
        &Svc::new("lb", &["10.96.1.10"], &[HTTP.with_node_port(30090)])
            .external_ips(&["192.0.2.20"])
            .load_balancer(&["192.0.2.10"], &["10.0.1.2/32"])
            .json(),
    );
    s.apply(&endpoint_slice(
        "lb",
        "lb-v4",
        &eps(&[POD_V4[0]], OTHER_NODE),
        &[HTTP.with_node_port(30090)],
    ));
    start(&mut s, &[]);
    // The LB IP serves the allowed source (client_v4(0) is 10.0.1.2) ...
    wait_tcp(&mut s, sock("192.0.2.10", 80), "ep1");
    // ... and resets every other one.
    for i in 1..4 {
        match tcp_request_from(
            &s.topo.client,
            Some(client_v4(i)),
            sock("192.0.2.10", 80),
            REQ,
        ) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!(
                "LB IP from {}: expected a reset, got {other:?}",
                client_v4(i)
            ),
        }
    }
    // Source ranges apply to LB IPs only: the externalIP and the ClusterIP serve everyone.
    for dst in [sock("192.0.2.20", 80), sock("10.96.1.10", 80)] {
        assert_eq!(
            tcp_request_from(&s.topo.client, Some(client_v4(3)), dst, REQ).unwrap(),
            "ep1",
            "{dst}"
        );
    }
    let r = routes(&s.topo.node, false);
    for a in ["10.96.1.10", "192.0.2.10", "192.0.2.20"] {
        assert!(r.contains(a), "{a} not local:\n{r}");
    }
    s.kproxy().assert_running();
}

/// One client socket (fixed source port) sending datagrams through the proxy.
struct UdpClient(UdpSocket);

impl UdpClient {
    fn new(ns: &Netns, dst: SocketAddr) -> UdpClient {
        let s = ns
            .in_ns(move || {
                let s = UdpSocket::bind((client_v4(2), 0))?;
                s.connect(dst)?;
                Ok::<_, io::Error>(s)
            })
            .unwrap();
        s.set_read_timeout(Some(REQ)).unwrap();
        UdpClient(s)
    }

    fn ask(&self) -> io::Result<String> {
        self.0.send(b"ping")?;
        let mut buf = [0u8; 64];
        let n = self.0.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

#[test]
fn userspace_udp_flows_stick_expire_when_idle_and_end_with_their_endpoint() {
    if !require_root("userspace_udp_flows_stick_expire_when_idle_and_end_with_their_endpoint") {
        return;
    }
    let mut s = scenario();
    s.udp_server(POD_V4[0], 5353, "u1");
    s.udp_server(POD_V4[1], 5353, "u2");
    s.apply(&Svc::new("dns", &["10.96.1.2"], &[DNS]).json());
    s.apply(&endpoint_slice(
        "dns",
        "dns-v4",
        &eps(&[POD_V4[0], POD_V4[1]], OTHER_NODE),
        &[DNS],
    ));
    start(&mut s, &["--udp-timeout", "300ms"]);
    let dns = sock("10.96.1.2", 53);
    s.wait_for_result(
        "udp 10.96.1.2:53",
        |t| udp_request(&t.client, dns, PROBE),
        |r| r.is_ok(),
    );
    // One client socket is one flow: every datagram goes to the same endpoint.
    let c = UdpClient::new(&s.topo.client, dns);
    let first = c.ask().unwrap();
    for _ in 0..5 {
        assert_eq!(c.ask().unwrap(), first);
    }
    // Idle past --udp-timeout: the flow expired, the next datagram is a new flow, placed
    // round-robin on the other endpoint.
    std::thread::sleep(Duration::from_millis(1000));
    let second = c.ask().unwrap();
    assert_ne!(second, first, "the idle flow did not expire");
    // The flow's endpoint is removed: the flow ends at once and the next datagram goes to the
    // endpoint that is left (no grace period for UDP, as conntrack cleanup in the kernel modes).
    let (remaining_ip, remaining) = if second == "u1" {
        (POD_V4[1], "u2")
    } else {
        (POD_V4[0], "u1")
    };
    s.apply(&endpoint_slice(
        "dns",
        "dns-v4",
        &eps(&[remaining_ip], OTHER_NODE),
        &[DNS],
    ));
    assert!(
        wait_until(SYNC, || c.ask().is_ok_and(|id| id == remaining)),
        "the flow kept going to the removed endpoint"
    );
    s.kproxy().assert_running();
}

/// What a client saw over a stretch of time: one fresh connection (a request and its answer)
/// every `every`.
#[derive(Debug, Default)]
struct Probes {
    ok: usize,
    refused: usize,
    reset: usize,
    other: Vec<String>,
    /// When each failure happened.
    failures: Vec<Instant>,
    /// When each success happened.
    successes: Vec<Instant>,
}

/// One line on a fresh connection from the calling thread's namespace; the identity answered.
fn line_request(dst: SocketAddr) -> io::Result<String> {
    let stream = TcpStream::connect_timeout(&dst, REQ)?;
    stream.set_read_timeout(Some(REQ))?;
    (&stream).write_all(b"probe\n")?;
    let mut line = String::new();
    if BufReader::new(&stream).read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line.split(' ').next().unwrap_or_default().to_string())
}

/// Opens a fresh connection through `vip` every `every` until `stop`, and tallies the outcomes.
fn probe_loop(
    ns: &Netns,
    vip: SocketAddr,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Probes> {
    let path = format!("/run/netns/{}", ns.name());
    std::thread::spawn(move || {
        // This thread lives in the client namespace (setns is per thread).
        let file = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut p = Probes::default();
        while !stop.load(Ordering::Relaxed) {
            let at = Instant::now();
            match line_request(vip) {
                Ok(_) => {
                    p.ok += 1;
                    p.successes.push(at);
                }
                Err(e) => {
                    p.failures.push(at);
                    match e.kind() {
                        io::ErrorKind::ConnectionRefused => p.refused += 1,
                        io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof => {
                            p.reset += 1
                        }
                        _ => p.other.push(e.to_string()),
                    }
                }
            }
            std::thread::sleep(every.saturating_sub(at.elapsed()));
        }
        p
    })
}

/// Issue #19: a surge upgrade (a new kproxy started next to the running one, then SIGTERM to the
/// old one, as a DaemonSet rollout with `maxSurge: 1, maxUnavailable: 0` does) refuses and resets
/// nothing while a client opens a connection every 10 ms; a connection established through the
/// old kproxy keeps working after its SIGTERM and the old kproxy exits once it has closed. Then
/// a crash (SIGKILL) with an immediate restart: the window of refused connections is measured and
/// bounded.
#[test]
fn userspace_surge_upgrade_refuses_nothing_and_a_crash_window_is_bounded() {
    if !require_root("userspace_surge_upgrade_refuses_nothing_and_a_crash_window_is_bounded") {
        return;
    }
    let s = scenario();
    let _echo = LineEcho::start(&s.topo.endpoints, sock(POD_V4[0], 8080), "ep1");
    s.apply(&Svc::new("web", &["10.96.1.8"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "web",
        "web-v4",
        &eps(&[POD_V4[0]], OTHER_NODE),
        &[HTTP],
    ));
    let mut args = base_args(&s);
    args.extend(["--userspace-grace-period".into(), "3s".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut old = KproxyProcess::start(&s.topo.node, &args);
    let vip = sock("10.96.1.8", 80);
    assert!(
        wait_until(SYNC, || tcp_line(&s.topo.client, vip).is_ok()),
        "the first kproxy never served"
    );
    let mut session = Session::open(&s.topo.client, client_v4(0), vip).unwrap();
    assert_eq!(session.ping("before").unwrap(), "ep1");

    // KPROXY_E2E_PROBE_EVERY_US and KPROXY_E2E_PROBE_LOOPS make the client harder (several
    // loops, no pause) for a measurement; the test's own load is one connection every 10 ms.
    let every = Duration::from_micros(
        std::env::var("KPROXY_E2E_PROBE_EVERY_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000),
    );
    let loops: usize = std::env::var("KPROXY_E2E_PROBE_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let stop = Arc::new(AtomicBool::new(false));
    let probes: Vec<_> = (0..loops)
        .map(|_| probe_loop(&s.topo.client, vip, every, stop.clone()))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // The surge: the new process starts, and the old one is told to stop right away (the worst
    // order: the old one must wait until the new one listens).
    let mut new = KproxyProcess::start(&s.topo.node, &args);
    let term = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // The established connection still works through the stopping process.
    for i in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(session.ping(&format!("draining {i}")).unwrap(), "ep1");
    }
    assert!(
        old.try_wait().is_none(),
        "the old kproxy did not wait for its connection"
    );
    drop(session);
    let closed = Instant::now();
    let status = old
        .wait(Duration::from_secs(5))
        .expect("the old kproxy never exited");
    let exited = Instant::now();
    assert!(status.success(), "old kproxy: {status}\n{}", old.stderr());
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let p = probes
        .into_iter()
        .map(|h| h.join().unwrap())
        .fold(Probes::default(), |mut a, b| {
            a.ok += b.ok;
            a.refused += b.refused;
            a.reset += b.reset;
            a.other.extend(b.other);
            a.failures.extend(b.failures);
            a.successes.extend(b.successes);
            a
        });
    let log = old.stderr();
    eprintln!(
        "surge upgrade: {} connections ok, {} refused, {} reset, other {:?}; old kproxy exited {:?} after SIGTERM, {:?} after its last connection closed\n{}",
        p.ok,
        p.refused,
        p.reset,
        p.other,
        exited - term,
        exited - closed,
        log.lines()
            .filter(|l| l.contains("hand"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        p.refused == 0 && p.reset == 0 && p.other.is_empty(),
        "surge upgrade: {} refused, {} reset, other {:?} (of {})",
        p.refused,
        p.reset,
        p.other,
        p.ok + p.failures.len()
    );
    assert!(p.ok >= 100, "too few probes: {}", p.ok);
    assert!(log.contains("handed_over=1"), "{log}");
    assert!(
        exited - closed < Duration::from_secs(2),
        "the old kproxy lingered {:?} after its last connection",
        exited - closed
    );
    new.assert_running();

    // A crash: SIGKILL, and the replacement started at once (kubelet restarts a crashed
    // container; its own delay comes on top). Connections are refused from the kill until the
    // new process has bound its listeners.
    let stop = Arc::new(AtomicBool::new(false));
    let probes = probe_loop(&s.topo.client, vip, Duration::from_millis(10), stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = new.wait(Duration::from_secs(5));
    let mut restarted = KproxyProcess::start(&s.topo.node, &args);
    assert!(
        wait_until(SYNC, || tcp_line(&s.topo.client, vip).is_ok()),
        "the restarted kproxy never served"
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let p = probes.join().unwrap();
    let first_ok_after = p
        .successes
        .iter()
        .find(|t| **t > killed)
        .map(|t| *t - killed);
    let window = match (p.failures.first(), p.failures.last()) {
        (Some(a), Some(b)) => *b - *a + Duration::from_millis(10),
        _ => Duration::ZERO,
    };
    eprintln!(
        "crash (SIGKILL, immediate restart): {} refused, {} reset, other {:?}; refusals for {window:?}; first success {first_ok_after:?} after the kill",
        p.refused, p.reset, p.other
    );
    assert!(
        window < Duration::from_secs(2),
        "refused for {window:?} after a crash"
    );
    restarted.assert_running();
}
