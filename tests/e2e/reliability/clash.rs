//! Guarantees 8 and 9, ports and processes that clash: a rolling update with surge runs the new
//! kproxy next to the old one for a while, in the same network namespace, on the same ports,
//! socket path and kernel tables, sometimes in another mode. Each test runs real kproxy
//! processes side by side (issue #20, items 5-9):
//!
//! - a health-check node port the old kproxy still holds is served by the new one within one
//!   retry period of the old one's exit, and reported while it is not;
//! - idle connections to the health-check node ports, /healthz or /metrics hold at most a
//!   bounded number of file descriptors and are closed after the header timeout: under a
//!   300-file limit, 290 idle connections leave /healthz answering and every sync succeeding;
//! - after a mode switch with overlap (the old mode's kproxy restores its rules once the new
//!   one removed them, then exits), the leftovers are removed again;
//! - two nftables kproxies applying the same changes never fail a sync;
//! - the admin socket path: a regular file there is left alone, a symlinked parent directory is
//!   refused, and a daemon's exit removes only its own socket.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::http;
use crate::support::kproxy::{KproxyProcess, wait_until};
use crate::support::manifests::{Manifests, Port};
use crate::support::netns::Netns;
use crate::support::objects::{Ep, Svc, endpoint_slice};
use crate::support::scenario::{Mode, NODE, NODE_ARGS, SYNC, Scenario, sock};
use crate::support::topology::{NODE_IP, POD_V4};

const HTTP: Port = Port::tcp("http", 80, 8080);
const HTTP_NP: Port = HTTP.with_node_port(30080);
/// The health-check node port of the `lb` service.
const HC_PORT: u16 = 32001;
/// kproxy's retry period for listeners that cannot bind.
const RETRY: Duration = Duration::from_secs(5);

/// A LoadBalancer service `name` with externalTrafficPolicy=Local, its health-check node port,
/// and one endpoint on this node.
fn lb_local(s: &Scenario, name: &str, vip: &str, hc_port: u16) {
    let mut svc = Svc::new(name, &[vip], &[HTTP_NP])
        .load_balancer(&["10.0.8.50"], &[])
        .external_policy("Local")
        .json();
    svc["spec"]["healthCheckNodePort"] = serde_json::json!(hc_port);
    s.apply(&svc);
    s.apply(&endpoint_slice(
        name,
        &format!("{name}-v4"),
        &[Ep::ready(POD_V4[0]).on(NODE)],
        &[HTTP],
    ));
}

/// `GET path` on `addr` from the client namespace answered 200.
fn ok_from_client(s: &Scenario, addr: SocketAddr, path: &str) -> bool {
    http::get(&s.topo.client, addr, path).is_some_and(|(code, _)| code == 200)
}

fn synced(k: &KproxyProcess) -> bool {
    k.stderr().contains("sync complete")
}

fn sync_failures(k: &KproxyProcess) -> usize {
    k.stderr().matches("sync failed").count()
}

// --- 5: a freed health-check node port ----------------------------------------------------------

/// A surge update: the new kproxy starts while the old one still serves the health-check node
/// port. Once the old one exits the new one serves the port within one retry period, and while
/// it cannot it says so (`kproxy_unbound_listeners`).
#[test]
fn a_freed_health_check_port_is_served_again() {
    if !crate::support::require_root("a_freed_health_check_port_is_served_again") {
        return;
    }
    let mut s = Scenario::with_manifests_in(Mode::Iptables);
    s.tcp_server(POD_V4[0], 8080, "ep1");
    lb_local(&s, "lb", "10.96.1.50", HC_PORT);
    let only = format!("{NODE_IP}/32");
    let hc = sock(NODE_IP, HC_PORT);
    let mut old = s.spawn_kproxy(&["--nodeport-addresses", &only]);
    assert!(
        wait_until(SYNC, || ok_from_client(&s, hc, "/")),
        "the old kproxy never served the health-check port\n{}",
        old.stderr()
    );
    let metrics: SocketAddr = "127.0.0.1:10249".parse().expect("addr");
    let mut new = s.spawn_kproxy(&[
        "--nodeport-addresses",
        &only,
        "--metrics-bind-address=127.0.0.1:10249",
    ]);
    assert!(wait_until(SYNC, || synced(&new)), "{}", new.stderr());
    // While the old one holds the port: what does the new one report?
    let unbound_series = "kproxy_unbound_listeners{listener=\"health_check_node_port\"}";
    let mut while_held = None;
    wait_until(Duration::from_secs(3), || {
        while_held = http::get(&s.topo.node, metrics, "/metrics")
            .and_then(|(_, text)| http::metric(&text, unbound_series));
        while_held.is_some()
    });
    old.assert_running();
    new.assert_running();

    let status = old.terminate(Duration::from_secs(10)).expect("old exits");
    assert!(status.success(), "{status}\n{}", old.stderr());
    let freed = Instant::now();
    let served = wait_until(RETRY * 3, || ok_from_client(&s, hc, "/"));
    let took = freed.elapsed();
    new.assert_running();
    assert!(
        served,
        "the health-check node port was never served again after the old kproxy exited \
         (waited {took:?})\n----- new kproxy:\n{}",
        new.stderr()
    );
    let mut after = None;
    wait_until(Duration::from_secs(2), || {
        after = http::get(&s.topo.node, metrics, "/metrics")
            .and_then(|(_, text)| http::metric(&text, unbound_series));
        after == Some(0.0)
    });
    eprintln!(
        "summary: health-check port served again {:.1} s after the old kproxy exited; \
         {unbound_series} {while_held:?} while held, {after:?} after",
        took.as_secs_f64()
    );
    assert!(took < RETRY + Duration::from_secs(2), "took {took:?}");
    assert_eq!(while_held, Some(1.0), "not reported while unbound");
    assert_eq!(after, Some(0.0), "still reported once bound");
    assert_eq!(sync_failures(&new), 0, "{}", new.stderr());
}

// --- 6: idle connections ------------------------------------------------------------------------

/// Opens up to `n` TCP connections to `addr` from `ns` and leaves them idle (nothing sent).
/// Connections the server's backlog cannot take time out and are not counted; after three such
/// in a row the rest are not tried.
fn idle_connections(ns: &Netns, addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    ns.in_ns(move || {
        let mut open = Vec::new();
        let mut misses = 0;
        for _ in 0..n {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(c) => {
                    misses = 0;
                    open.push(c);
                }
                Err(_) => {
                    misses += 1;
                    if misses == 3 {
                        break;
                    }
                }
            }
        }
        open
    })
}

/// Under a 300-file limit, 290 idle connections to the health-check node port, then to
/// /healthz: kproxy holds only a bounded number of them, /healthz (then /metrics and the
/// health-check port) keeps answering, and changes keep being programmed.
#[test]
fn idle_connections_do_not_exhaust_kproxy() {
    if !crate::support::require_root("idle_connections_do_not_exhaust_kproxy") {
        return;
    }
    const LIMIT: u64 = 300;
    const IDLE: usize = 290;
    let mut s = Scenario::with_manifests_in(Mode::Iptables).nofile(LIMIT);
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.tcp_server(POD_V4[1], 8080, "ep2");
    lb_local(&s, "lb", "10.96.1.50", HC_PORT);
    let only = format!("{NODE_IP}/32");
    let healthz = sock(NODE_IP, 10256);
    let metrics = sock(NODE_IP, 10249);
    let hc = sock(NODE_IP, HC_PORT);
    s.start_kproxy(&[
        "--nodeport-addresses",
        &only,
        "--healthz-bind-address=10.0.1.1:10256",
        "--metrics-bind-address=10.0.1.1:10249",
    ]);
    assert!(
        wait_until(SYNC, || ok_from_client(&s, hc, "/")
            && ok_from_client(&s, healthz, "/healthz")),
        "not serving\n{}",
        s.kproxy().stderr()
    );
    let baseline = s.kproxy().open_fds();

    // Phase 1: the health-check node port, reachable from outside the node.
    let idle = idle_connections(&s.topo.client, hc, IDLE);
    std::thread::sleep(Duration::from_secs(1));
    let held_hc = s.kproxy().open_fds();
    let t = Instant::now();
    let healthz_ok = wait_until(Duration::from_secs(3), || {
        ok_from_client(&s, healthz, "/healthz")
    });
    assert!(
        healthz_ok,
        "/healthz did not answer with {} idle connections open to the health-check port \
         (kproxy holds {held_hc} files, {baseline} before; limit {LIMIT})\n{}",
        idle.len(),
        s.kproxy().stderr()
    );
    let healthz_took = t.elapsed();
    s.apply(&Svc::new("web", &["10.96.1.60"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "web",
        "web-v4",
        &[Ep::ready(POD_V4[1])],
        &[HTTP],
    ));
    s.wait_tcp(
        "a new service under idle load",
        sock("10.96.1.60", 80),
        "ep2",
    );
    let opened_hc = idle.len();
    drop(idle);

    // Phase 2: /healthz itself.
    let idle = idle_connections(&s.topo.client, healthz, IDLE);
    std::thread::sleep(Duration::from_secs(1));
    let held_healthz = s.kproxy().open_fds();
    assert!(
        wait_until(Duration::from_secs(3), || ok_from_client(
            &s, metrics, "/metrics"
        ) && ok_from_client(&s, hc, "/")),
        "/metrics or the health-check port did not answer with {} idle connections open to \
         /healthz (kproxy holds {held_healthz} files)\n{}",
        idle.len(),
        s.kproxy().stderr()
    );
    s.apply(&endpoint_slice(
        "web",
        "web-v4",
        &[Ep::ready(POD_V4[0])],
        &[HTTP],
    ));
    s.wait_tcp(
        "an endpoint change under idle load",
        sock("10.96.1.60", 80),
        "ep1",
    );
    let opened_healthz = idle.len();
    drop(idle);
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(3), || ok_from_client(
            &s, healthz, "/healthz"
        )),
        "/healthz did not recover once the idle connections closed"
    );
    let recovered = t.elapsed();
    s.kproxy().assert_running();
    eprintln!(
        "summary: limit {LIMIT} files; baseline {baseline} open; {opened_hc} idle connections \
         to the health-check port -> {held_hc} open, /healthz answered in {:.0} ms; \
         {opened_healthz} idle to /healthz -> {held_healthz} open; /healthz answered again \
         {:.0} ms after they closed; sync failures {}",
        healthz_took.as_secs_f64() * 1000.0,
        recovered.as_secs_f64() * 1000.0,
        sync_failures(s.kproxy())
    );
    assert_eq!(sync_failures(s.kproxy()), 0, "{}", s.kproxy().stderr());
    assert!(
        held_hc < baseline + 80 && held_healthz < baseline + 80,
        "kproxy holds too many connections: {held_hc} and {held_healthz} files, {baseline} before"
    );
}

// --- 7: a mode switch with overlap --------------------------------------------------------------

fn iptables_rules(ns: &Netns) -> String {
    [
        ns.run("iptables-nft-save", &[]),
        ns.run("ip6tables-nft-save", &[]),
    ]
    .concat()
    .lines()
    .filter(|l| l.contains("KPROXY"))
    .collect::<Vec<_>>()
    .join("\n")
}

/// iptables → nftables with overlap: the new (nftables) kproxy removes the old one's rules, the
/// old one restores them at its next check (every second here), again and again for 6 s, and
/// then exits. The new one removes them again. The old kproxy runs this version too (a later
/// rolling update): it has run for a while, so its own checks for other modes' rules have
/// thinned out, and it never removes the new one's tables.
#[test]
fn a_mode_switch_with_overlap_leaves_no_old_rules() {
    if !crate::support::require_root("a_mode_switch_with_overlap_leaves_no_old_rules") {
        return;
    }
    let mut s = Scenario::with_manifests_in(Mode::Iptables);
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.apply(
        &Svc::new("web", &["10.96.1.70"], &[HTTP_NP])
            .node_port()
            .json(),
    );
    s.apply(&endpoint_slice(
        "web",
        "web-v4",
        &[Ep::ready(POD_V4[0])],
        &[HTTP],
    ));
    let vip = sock("10.96.1.70", 80);
    let mut old = s.spawn_kproxy(&["--iptables-sync-period=1s"]);
    assert!(
        wait_until(SYNC, || iptables_rules(&s.topo.node).contains("10.96.1.70")),
        "{}",
        old.stderr()
    );
    // The old kproxy's own leftover checks: 0, 1, 3, 7, 15, then 31 s after its first sync.
    std::thread::sleep(Duration::from_millis(16_500));
    s.mode = Mode::Nftables;
    let started = Instant::now();
    let mut new = s.spawn_kproxy(&["--iptables-sync-period=3s"]);
    assert!(
        wait_until(SYNC, || new.stderr().contains("iptables rules removed")),
        "{}",
        new.stderr()
    );
    // The old kproxy's next check finds its canary gone and writes everything again.
    assert!(
        wait_until(SYNC, || old.stderr().contains("full resync")
            && iptables_rules(&s.topo.node).contains("10.96.1.70")),
        "the old kproxy did not restore its rules\n{}",
        old.stderr()
    );
    // Both run for 6 s (the new one checks again at 3 s, the old one restores within 1 s),
    // and the old one exits right after writing its rules back.
    std::thread::sleep(Duration::from_secs(6).saturating_sub(started.elapsed()));
    assert!(
        wait_until(SYNC, || iptables_rules(&s.topo.node).contains("10.96.1.70")),
        "{}",
        old.stderr()
    );
    let restores = old.stderr().matches("full resync").count();
    let status = old.terminate(Duration::from_secs(10)).expect("old exits");
    assert!(status.success(), "{status}");
    let exited = Instant::now();
    let removed = wait_until(Duration::from_secs(30), || {
        iptables_rules(&s.topo.node).is_empty()
    });
    let took = exited.elapsed();
    new.assert_running();
    assert!(
        removed,
        "the old mode's rules are still there {took:?} after the old kproxy exited:\n{}\n\
         ----- new kproxy:\n{}",
        iptables_rules(&s.topo.node),
        new.stderr()
    );
    assert_eq!(
        crate::support::traffic::tcp_request(&s.topo.client, vip, Duration::from_millis(500))
            .ok()
            .as_deref(),
        Some("ep1"),
        "the service does not answer through the nftables rules"
    );
    eprintln!(
        "summary: the old kproxy restored its rules {restores} times in a {:.1} s overlap; \
         they were removed {:.1} s after it exited ({:.1} s after the new one started; sync \
         period 3 s); sync failures {}",
        exited.duration_since(started).as_secs_f64(),
        took.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        sync_failures(&new)
    );
    assert_eq!(sync_failures(&new), 0, "{}", new.stderr());
    let rewrites = new
        .stderr()
        .lines()
        .filter(|l| l.contains("sync complete") && !l.contains(" added=0 "))
        .count();
    assert_eq!(
        rewrites,
        1,
        "the new kproxy had to write its rules again: the old one removed them\n{}",
        new.stderr()
    );
}

// --- 8: two nftables kproxies -------------------------------------------------------------------

/// Two nftables kproxies in one namespace (a surge update in the same mode) apply the same 20
/// changes: endpoints leaving and coming back, a service created and deleted, with the chains
/// their endpoint counts need. Neither ever fails a sync, and the table ends as one kproxy alone
/// would leave it.
#[test]
fn two_nftables_kproxies_apply_every_change() {
    if !crate::support::require_root("two_nftables_kproxies_apply_every_change") {
        return;
    }
    let mut s = Scenario::with_manifests_in(Mode::Nftables);
    for (i, id) in ["ep1", "ep2", "ep3"].into_iter().enumerate() {
        s.tcp_server(POD_V4[i], 8080, id);
    }
    let eps = |n: usize| -> Vec<Ep> { (0..n).map(|i| Ep::ready(POD_V4[i])).collect() };
    // `web` goes between 3 endpoints and 1, and `extra` (2 endpoints) comes and goes: element
    // changes, and the `pick-2` and `pick-3` chains created and deleted.
    s.apply(&Svc::new("web", &["10.96.1.80"], &[HTTP]).json());
    s.apply(&endpoint_slice("web", "web-v4", &eps(3), &[HTTP]));
    let a = s.spawn_kproxy(&[]);
    assert!(wait_until(SYNC, || synced(&a)), "{}", a.stderr());
    let b = s.spawn_kproxy(&[]);
    assert!(wait_until(SYNC, || synced(&b)), "{}", b.stderr());
    let syncs = |k: &KproxyProcess| k.stderr().matches("sync complete").count();
    for i in 0..20 {
        let before = (syncs(&a), syncs(&b));
        match i % 4 {
            0 => s.apply(&endpoint_slice("web", "web-v4", &eps(1), &[HTTP])),
            1 => s.apply(&endpoint_slice("web", "web-v4", &eps(3), &[HTTP])),
            2 => {
                s.apply(&Svc::new("extra", &["10.96.1.81"], &[HTTP]).json());
                s.apply(&endpoint_slice("extra", "extra-v4", &eps(2), &[HTTP]));
            }
            _ => {
                s.source.delete("EndpointSlice", "extra-v4");
                s.source.delete("Service", "extra");
            }
        }
        // Both have seen the change (each syncs at least once more, failed or not).
        assert!(
            wait_until(SYNC, || (syncs(&a) > before.0 || sync_failures(&a) > 0)
                && (syncs(&b) > before.1 || sync_failures(&b) > 0)),
            "change {i} not synced"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_secs(1));
    let failures = (sync_failures(&a), sync_failures(&b));
    let refused: Vec<String> = [&a, &b]
        .iter()
        .flat_map(|k| {
            k.stderr()
                .lines()
                .filter(|l| l.contains("sync failed"))
                .map(|l| l.chars().take(300).collect::<String>())
                .collect::<Vec<_>>()
        })
        .take(4)
        .collect();
    eprintln!(
        "summary: 20 changes applied by two nftables kproxies: {} + {} syncs, failures {} + {}",
        syncs(&a),
        syncs(&b),
        failures.0,
        failures.1
    );
    assert_eq!(
        failures,
        (0, 0),
        "syncs failed while two kproxies applied the same changes:\n{}",
        refused.join("\n")
    );
    // The table is what one kproxy alone leaves: a third, fresh kproxy finds nothing to change.
    let table = s.save(false);
    drop((a, b));
    let (check, status) = KproxyProcess::run(
        &s.topo.node,
        &[
            &["--manifests", &s.source.manifests().arg()],
            NODE_ARGS,
            &[
                "--proxy-mode",
                "nftables",
                "--healthz-bind-address=",
                "--metrics-bind-address=",
                "--once",
            ],
        ]
        .concat(),
        SYNC,
    );
    assert!(status.success(), "{}", check.stderr());
    assert!(
        check.stderr().contains("added=0 removed=0"),
        "the table differs from what one kproxy writes:\n{}\n{table}",
        check.stderr()
    );
}

// --- 9: the admin socket path -------------------------------------------------------------------

fn daemon(ns: &Netns, manifests: &Manifests, socket: &Path) -> KproxyProcess {
    KproxyProcess::start(
        ns,
        &[
            "--manifests",
            &manifests.arg(),
            "--hostname-override=node-a",
            "--iptables-backend=nft",
            "--healthz-bind-address=",
            "--metrics-bind-address=",
            &format!("--admin-socket={}", socket.display()),
        ],
    )
}

/// `GET /services` on the admin socket: the status code, if anything answered.
fn ask(socket: &Path) -> Option<u16> {
    let mut c = std::os::unix::net::UnixStream::connect(socket).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    c.write_all(b"GET /services HTTP/1.1\r\nHost: kproxy\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    c.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// A regular file at the admin socket path is left as it is (kproxy reports it and serves
/// everything else); a symlinked parent directory is not followed.
#[test]
fn the_admin_socket_never_replaces_a_file_or_follows_a_symlinked_parent() {
    if !crate::support::require_root(
        "the_admin_socket_never_replaces_a_file_or_follows_a_symlinked_parent",
    ) {
        return;
    }
    let ns = Netns::new("admin");
    let manifests = Manifests::new();
    manifests.node("node-a", &[NODE_IP]);
    let dir = tempfile::tempdir().expect("tempdir");

    let file = dir.path().join("precious");
    std::fs::write(&file, "not a socket\n").expect("write");
    let mut k = daemon(&ns, &manifests, &file);
    assert!(wait_until(SYNC, || synced(&k)), "{}", k.stderr());
    std::thread::sleep(Duration::from_millis(500));
    k.assert_running();
    let content = std::fs::read_to_string(&file).unwrap_or_else(|e| format!("<{e}>"));
    assert_eq!(
        content,
        "not a socket\n",
        "the regular file at the admin socket path was replaced\n{}",
        k.stderr()
    );
    assert!(
        k.stderr().contains("is not a socket"),
        "not reported\n{}",
        k.stderr()
    );
    drop(k);

    let real = dir.path().join("real");
    std::fs::create_dir(&real).expect("mkdir");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let mut k = daemon(&ns, &manifests, &link.join("kproxy.sock"));
    assert!(wait_until(SYNC, || synced(&k)), "{}", k.stderr());
    std::thread::sleep(Duration::from_millis(500));
    k.assert_running();
    let created: Vec<_> = std::fs::read_dir(&real)
        .expect("read_dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        created.is_empty(),
        "a socket was created through the symlinked parent: {created:?}\n{}",
        k.stderr()
    );
    let log = k.stderr();
    assert!(log.contains("symbolic link"), "not reported\n{log}");
    drop(k);
    eprintln!(
        "summary: file left alone; symlinked parent refused: {}",
        log.lines()
            .filter(|l| l.contains("admin socket"))
            .take(2)
            .collect::<Vec<_>>()
            .join(" | ")
    );
}

/// Two daemons given the same path (a surge update): the old one's exit leaves the new one's
/// socket, which answers within one retry period.
#[test]
fn two_daemons_on_one_admin_socket_path_never_remove_each_others_socket() {
    if !crate::support::require_root(
        "two_daemons_on_one_admin_socket_path_never_remove_each_others_socket",
    ) {
        return;
    }
    let ns = Netns::new("admin");
    let manifests = Manifests::new();
    manifests.node("node-a", &[NODE_IP]);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kproxy.sock");
    let mut old = daemon(&ns, &manifests, &path);
    assert!(
        wait_until(SYNC, || ask(&path) == Some(200)),
        "{}",
        old.stderr()
    );
    let mut new = daemon(&ns, &manifests, &path);
    assert!(wait_until(SYNC, || synced(&new)), "{}", new.stderr());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ask(&path), Some(200), "nothing answers during the overlap");
    let status = old.terminate(Duration::from_secs(10)).expect("old exits");
    assert!(status.success(), "{status}");
    let exited = Instant::now();
    let answered = wait_until(RETRY + Duration::from_secs(3), || ask(&path) == Some(200));
    let took = exited.elapsed();
    new.assert_running();
    assert!(
        answered,
        "nothing answers on {} after the old daemon exited (exists: {})\n----- new:\n{}",
        path.display(),
        path.exists(),
        new.stderr()
    );
    let status = new.terminate(Duration::from_secs(10)).expect("new exits");
    assert!(status.success(), "{status}");
    assert!(!path.exists(), "the last daemon left its socket behind");
    eprintln!(
        "summary: the new daemon answered on the shared path {:.1} s after the old one exited",
        took.as_secs_f64()
    );
}
