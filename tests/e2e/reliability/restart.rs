//! Guarantee 2, restart without a gap, under continuous load (TCP and UDP): SIGKILL and restart
//! in the same mode, then a switch iptables → nftables → iptables. No connection fails and no
//! datagram is lost at any point; after each restart the kernel state equals the state before
//! (no duplicates, no leftovers), and after the round trip the iptables rules are exactly the
//! ones the first kproxy wrote, with no kproxy nftables table left. (`behaviour.rs` has the
//! per-mode restart and the one-way switch checks with sequential requests.)

use std::time::Duration;

use crate::support::load::Load;
use crate::support::manifests::Port;
use crate::support::netns::Netns;
use crate::support::objects::{Ep, Svc, endpoint_slice};
use crate::support::scenario::{Mode, SYNC, Scenario, sock};
use crate::support::topology::{POD_V4, POD_V6};

const HTTP: Port = Port::tcp("http", 80, 8080);
const DNS: Port = Port::udp("dns", 53, 5353);

/// Both families' iptables rules without comments and counters, and the list of nft tables.
fn state(ns: &Netns) -> (Vec<String>, Vec<String>) {
    let rules = [
        ns.run("iptables-nft-save", &[]),
        ns.run("ip6tables-nft-save", &[]),
    ]
    .concat()
    .lines()
    .filter(|l| !l.starts_with('#'))
    .map(|l| l.split(" [").next().unwrap_or(l).to_string())
    .collect();
    let tables = ns
        .run("nft", &["list", "tables"])
        .lines()
        .map(str::to_string)
        .collect();
    (rules, tables)
}

/// Starts kproxy in `mode` and waits for its first sync.
fn restart(s: &mut Scenario, mode: Mode) {
    drop(s.kproxy.take()); // SIGKILL
    std::thread::sleep(Duration::from_millis(300));
    s.mode = mode;
    s.start_kproxy(&[]);
    let synced = crate::support::kproxy::wait_until(SYNC, || {
        s.kproxy
            .as_ref()
            .is_some_and(|k| k.stderr().contains("sync complete"))
    });
    assert!(synced, "no first sync in {mode:?}");
    // The previous mode's objects go right after the first sync.
    std::thread::sleep(Duration::from_millis(500));
}

#[test]
fn restart_and_mode_round_trip_under_load() {
    if !crate::support::require_root("restart_and_mode_round_trip_under_load") {
        return;
    }
    let mut s = Scenario::with_manifests_in(Mode::Iptables);
    for (i, id) in ["ep1", "ep2"].into_iter().enumerate() {
        s.tcp_server(POD_V4[i], 8080, id);
        s.udp_server(POD_V4[i], 5353, id);
        s.tcp_server(POD_V6[i], 8080, &format!("v6-{id}"));
    }
    s.apply(&Svc::new("web", &["10.96.1.30", "fd00:96::130"], &[HTTP, DNS]).json());
    s.apply(&endpoint_slice(
        "web",
        "web-v4",
        &[Ep::ready(POD_V4[0]), Ep::ready(POD_V4[1])],
        &[HTTP, DNS],
    ));
    s.apply(&endpoint_slice(
        "web",
        "web-v6",
        &[Ep::ready(POD_V6[0]), Ep::ready(POD_V6[1])],
        &[HTTP, DNS],
    ));
    s.start_kproxy(&[]);
    let vip = sock("10.96.1.30", 80);
    s.wait_tcp("first sync", vip, "ep1");
    s.wait_tcp("both endpoints", vip, "ep2");
    let before = state(&s.topo.node);
    assert!(before.0.iter().any(|l| l.contains("KPROXY")));

    let v4 = Load::start(
        &s.topo.client,
        Some(vip),
        Some(sock("10.96.1.30", 53)),
        Duration::from_millis(5),
    );
    let v6 = Load::start(
        &s.topo.client,
        Some(sock("fd00:96::130", 80)),
        None,
        Duration::from_millis(10),
    );
    restart(&mut s, Mode::Iptables);
    assert_eq!(
        state(&s.topo.node),
        before,
        "state changed across a restart"
    );
    let log = s.kproxy().stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("sync complete") && l.contains("added=0 removed=0")),
        "the restarted kproxy rewrote rules:\n{log}"
    );
    restart(&mut s, Mode::Nftables);
    let (rules, tables) = state(&s.topo.node);
    assert!(
        !rules.iter().any(|l| l.contains("KPROXY")) && tables.iter().any(|t| t.contains("kproxy")),
        "after the switch to nftables: {rules:#?} {tables:#?}"
    );
    restart(&mut s, Mode::Iptables);
    let v4 = v4.stop();
    let v6 = v6.stop();
    eprintln!(
        "restart and mode round trip: tcp v4 {} failed {}, udp {} lost {}, tcp v6 {} failed {}",
        v4.tcp.sent(),
        v4.tcp.failures.len(),
        v4.udp.sent(),
        v4.udp.failures.len(),
        v6.tcp.sent(),
        v6.tcp.failures.len()
    );
    assert_eq!(
        state(&s.topo.node),
        before,
        "the round trip did not restore the exact iptables state"
    );
    for (what, failures) in [
        ("tcp v4", &v4.tcp.failures),
        ("udp v4", &v4.udp.failures),
        ("tcp v6", &v6.tcp.failures),
    ] {
        assert!(failures.is_empty(), "{what}: {failures:?}");
    }
    assert!(v4.tcp.sent() > 100 && v4.udp.sent() > 100 && v6.tcp.sent() > 50);
    s.kproxy().assert_running();
}
