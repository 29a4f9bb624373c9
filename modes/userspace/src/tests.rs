//! Rendering, planning and endpoint choice, without sockets (those are exercised end to end in
//! network namespaces by `tests/e2e/userspace.rs`).
#![allow(clippy::unwrap_used, reason = "tests")]
#![allow(clippy::disallowed_methods, reason = "tests time real sockets")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use kproxy_contract::*;
use kproxy_testkit::conformance::OnFakeKernel;
use kproxy_testkit::{ep, service, state};

use crate::datapath::pick::{Affinity, candidates};
use crate::model::{Frontend, ListenerKey, Transport};
use crate::routes::{FakeRoutes, parse_routes};
use crate::{Options, UserspaceMode, plan, render};

fn key(t: Transport, addr: &str) -> ListenerKey {
    ListenerKey {
        transport: t,
        addr: addr.parse().unwrap(),
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn cluster_ip_gets_an_address_and_a_listener_per_frontend_with_endpoints() {
    let mut a = service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false), ep("10.244.1.2", true)],
    );
    a.external_ips = vec!["192.0.2.10".parse().unwrap()];
    a.node_port = Some(30080);
    let empty = service("b", "10.96.0.11", vec![]);
    let r = render::render(&state(vec![a, empty]));
    let addrs: Vec<String> = r.addresses.iter().map(ToString::to_string).collect();
    // A service without endpoints still gets its address: the kernel refuses for it.
    assert_eq!(addrs, ["10.96.0.10", "10.96.0.11", "192.0.2.10"]);
    let keys: Vec<String> = r.listeners.keys().map(ToString::to_string).collect();
    assert_eq!(
        keys,
        [
            "tcp 0.0.0.0:30080",
            "tcp 10.96.0.10:80",
            "tcp 192.0.2.10:80"
        ]
    );
    let t = &r.listeners[&key(Transport::Tcp, "10.96.0.10:80")];
    assert_eq!(t.frontend, Frontend::ClusterIp);
    assert_eq!(t.endpoints, [sa("10.244.1.1:8080"), sa("10.244.1.2:8080")]);
}

#[test]
fn local_policies_choose_local_endpoints_only() {
    let mut a = service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false), ep("10.244.1.2", true)],
    );
    a.internal_policy = TrafficPolicy::Local;
    a.external_policy = TrafficPolicy::Local;
    a.node_port = Some(30080);
    let mut b = service("b", "10.96.0.11", vec![ep("10.244.1.3", false)]);
    b.internal_policy = TrafficPolicy::Local;
    let r = render::render(&state(vec![a, b]));
    assert_eq!(
        r.listeners[&key(Transport::Tcp, "10.96.0.10:80")].endpoints,
        [sa("10.244.1.2:8080")]
    );
    assert_eq!(
        r.listeners[&key(Transport::Tcp, "0.0.0.0:30080")].endpoints,
        [sa("10.244.1.2:8080")]
    );
    // No local endpoint: no listener (refused), but the address stays and both endpoints are
    // still kept for established connections of the other frontends.
    assert!(
        !r.listeners
            .contains_key(&key(Transport::Tcp, "10.96.0.11:80"))
    );
    assert!(r.addresses.contains(&"10.96.0.11".parse().unwrap()));
    let t = &r.listeners[&key(Transport::Tcp, "10.96.0.10:80")];
    assert!(t.keep.contains(&sa("10.244.1.1:8080")));
}

#[test]
fn udp_node_ports_listen_on_node_addresses_and_source_ranges_apply_to_lb_ips_only() {
    let mut u = service("u", "10.96.0.12", vec![ep("10.244.1.1", false)]);
    u.name.protocol = Protocol::Udp;
    u.node_port = Some(30053);
    u.load_balancer_ips = vec!["198.51.100.1".parse().unwrap()];
    u.source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
    let r = render::render(&state(vec![u]));
    let keys: Vec<String> = r.listeners.keys().map(ToString::to_string).collect();
    assert_eq!(
        keys,
        [
            "udp 10.96.0.12:80",
            "udp 192.168.0.2:30053",
            "udp 198.51.100.1:80"
        ]
    );
    let lb = &r.listeners[&key(Transport::Udp, "198.51.100.1:80")];
    assert!(lb.allows("203.0.113.7".parse().unwrap()));
    assert!(!lb.allows("10.0.0.1".parse().unwrap()));
    let np = &r.listeners[&key(Transport::Udp, "192.168.0.2:30053")];
    assert!(np.allows("10.0.0.1".parse().unwrap()));
}

#[test]
fn sctp_is_reported_not_served() {
    let mut s = service("s", "10.96.0.13", vec![ep("10.244.1.1", false)]);
    s.name.protocol = Protocol::Sctp;
    let r = render::render(&state(vec![s]));
    assert!(r.listeners.is_empty());
    assert!(r.addresses.is_empty());
    assert_eq!(r.unsupported.len(), 1);
    let p = plan::plan(&Default::default(), &r);
    assert!(!kproxy_contract::Plan::is_empty(&p));
    assert!(
        p.to_string().contains("# not served: ns/s:p (sctp, IPv4)"),
        "{p}"
    );
}

#[test]
fn plan_opens_updates_and_closes_and_prints_by_service() {
    let before = render::render(&state(vec![
        service("a", "10.96.0.10", vec![ep("10.244.1.1", false)]),
        service("b", "10.96.0.11", vec![ep("10.244.1.2", false)]),
    ]));
    let after = render::render(&state(vec![
        service(
            "a",
            "10.96.0.10",
            vec![ep("10.244.1.1", false), ep("10.244.1.3", false)],
        ),
        service("c", "10.96.0.12", vec![ep("10.244.1.4", false)]),
    ]));
    let p = plan::plan(&before, &after);
    assert_eq!(p.open.len(), 1);
    assert_eq!(p.update.len(), 1);
    assert_eq!(p.close.len(), 1);
    assert_eq!(
        p.add_addresses,
        ["10.96.0.12".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        p.remove_addresses,
        ["10.96.0.11".parse::<std::net::IpAddr>().unwrap()]
    );
    let text = p.to_string();
    let want = "\
# local addresses (routes `local ADDR dev lo proto 201`)
+ address 10.96.0.12
- address 10.96.0.11
# service ns/a:p (tcp, IPv4)
~ endpoints tcp 10.96.0.10:80 cluster-ip -> 10.244.1.1:8080 10.244.1.3:8080
# service ns/b:p (tcp, IPv4)
- close tcp 10.96.0.11:80 cluster-ip -> 10.244.1.2:8080
# service ns/c:p (tcp, IPv4)
+ listen tcp 10.96.0.12:80 cluster-ip -> 10.244.1.4:8080
";
    assert_eq!(text, want);
    assert!(kproxy_contract::Plan::is_empty(&plan::plan(&after, &after)));
    let stats = kproxy_contract::Plan::stats(&p);
    assert_eq!(
        (stats.added, stats.removed, stats.containers_touched),
        (2, 2, 1)
    );
}

impl OnFakeKernel for UserspaceMode<FakeRoutes> {
    /// Routes, then listeners, then route removals: a refused step leaves the earlier ones.
    const TRANSACTIONAL: bool = false;

    fn refuse_next_write(&mut self) {
        self.routes
            .refuse_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn holds_nothing_of_ours(&mut self) -> bool {
        self.routes.routes.lock().unwrap().is_empty()
    }

    /// Endpoint-less: a served frontend would bind a real socket outside any namespace.
    fn states() -> Vec<ProxyState> {
        kproxy_testkit::conformance::states()
            .iter()
            .map(kproxy_testkit::conformance::without_endpoints)
            .collect()
    }
}

/// The checks every mode passes: convergence, a refused apply and its retry, cleanup.
#[test]
fn conformance() {
    kproxy_testkit::conformance::check(|| {
        UserspaceMode::new(FakeRoutes::default(), Options::default())
    });
}

#[test]
fn mode_adds_and_removes_only_its_routes_and_cleans_up() {
    let routes = FakeRoutes::default();
    let mut m = UserspaceMode::new(routes.clone(), Options::default());
    // Endpoint-less services: addresses only, so no socket is bound outside a namespace.
    let s = state(vec![
        service("a", "10.96.0.10", vec![]),
        service("b", "fd00:96::1", vec![]),
    ]);
    let desired = m.render_once(&s);
    let live = m.read_live().unwrap();
    m.apply(&m.plan(&live, &desired)).unwrap();
    assert_eq!(routes.routes.lock().unwrap().len(), 2);
    let live = m.read_live().unwrap();
    assert_eq!(live, desired);
    assert!(kproxy_contract::Plan::is_empty(&m.plan(&live, &desired)));
    assert!(!m.drifted());
    // Someone deletes one of our routes: the probe reports drift.
    routes
        .routes
        .lock()
        .unwrap()
        .remove(&"10.96.0.10".parse().unwrap());
    assert!(m.drifted());
    let live = m.read_live().unwrap();
    m.apply(&m.plan(&live, &desired)).unwrap();
    assert!(!m.drifted());
    m.cleanup().unwrap();
    assert!(routes.routes.lock().unwrap().is_empty());
}

#[test]
fn round_robin_spreads_and_failover_tries_the_others() {
    let s = state(vec![service(
        "a",
        "10.96.0.10",
        vec![
            ep("10.244.1.1", false),
            ep("10.244.1.2", false),
            ep("10.244.1.3", false),
        ],
    )]);
    let r = render::render(&s);
    let t = &r.listeners[&key(Transport::Tcp, "10.96.0.10:80")];
    let rr = AtomicUsize::new(0);
    let client = "10.0.0.1".parse().unwrap();
    let firsts: Vec<SocketAddr> = (0..3)
        .map(|_| candidates(t, &rr, None, client, 4)[0])
        .collect();
    assert_eq!(firsts, t.endpoints);
    // Each attempt list holds every endpoint once, the chosen one first.
    let c = candidates(t, &rr, None, client, 4);
    assert_eq!(c, t.endpoints);
    assert_eq!(candidates(t, &rr, None, client, 2).len(), 2);
}

#[test]
fn affinity_pins_a_client_until_its_timeout() {
    let mut svc = service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false), ep("10.244.1.2", false)],
    );
    svc.affinity = Some(SessionAffinity {
        timeout: Duration::from_secs(5),
    });
    let r = render::render(&state(vec![svc]));
    let t = Arc::clone(&r.listeners[&key(Transport::Tcp, "10.96.0.10:80")]);
    let rr = AtomicUsize::new(0);
    let aff = Affinity::default();
    let client = "10.0.0.1".parse().unwrap();
    let first = candidates(&t, &rr, Some(&aff), client, 4)[0];
    aff.record(client, first, Duration::from_secs(5), Instant::now());
    for _ in 0..5 {
        assert_eq!(candidates(&t, &rr, Some(&aff), client, 4)[0], first);
    }
    // Another client is not pinned.
    let other = "10.0.0.2".parse().unwrap();
    let seen: std::collections::BTreeSet<SocketAddr> = (0..4)
        .map(|_| candidates(&t, &rr, Some(&aff), other, 4)[0])
        .collect();
    assert_eq!(seen.len(), 2);
    // An expired pin is ignored.
    let old = Instant::now() - Duration::from_secs(6);
    aff.record(client, t.endpoints[1], Duration::from_secs(5), old);
    assert_eq!(
        aff.lookup(client, Duration::from_secs(5), Instant::now()),
        None
    );
}

#[test]
fn route_listing_parses_ip_json_and_ignores_garbage() {
    let json = r#"[{"type":"local","dst":"10.96.1.1","dev":"lo"},{"type":"local","dst":"fd00:96::1","dev":"lo"},{"dst":"bogus"},{"x":1}]"#;
    let got: Vec<String> = parse_routes(json).iter().map(ToString::to_string).collect();
    assert_eq!(got, ["10.96.1.1", "fd00:96::1"]);
    assert!(parse_routes("").is_empty());
    assert!(parse_routes("not json").is_empty());
}
