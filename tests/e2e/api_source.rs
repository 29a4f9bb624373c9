//! kproxy fed by the (fake) Kubernetes API instead of manifests: real packets through a
//! ClusterIP while Services and EndpointSlices change on the API server, and rules that survive
//! an API outage.

use std::time::{Duration, Instant};

use crate::support::fake_apiserver::Kind;
use crate::support::kproxy::wait_until;
use crate::support::manifests::Port;
use crate::support::objects::{Ep, Svc, endpoint_slice, node};
use crate::support::require_root;
use crate::support::scenario::{
    NODE, PROBE, REQ, SYNC, Scenario, assert_spread, assert_timed_out, sock,
};
use crate::support::topology::{NODE_IP, NODE_IP6, POD_V4, client_v4};
use crate::support::traffic::{tally, tcp_request, tcp_request_from, udp_request};

const HTTP: Port = Port::tcp("http", 80, 8080);
const DNS: Port = Port::udp("dns", 53, 5353);
const VIP: &str = "10.96.0.10";

/// `web` with an HTTP (TCP) and a DNS (UDP) port, and its slice with these pods.
fn web(s: &Scenario, pods: &[&str]) {
    s.apply(&Svc::new("web", &[VIP], &[HTTP, DNS]).json());
    slice(s, pods);
}

fn slice(s: &Scenario, pods: &[&str]) {
    let eps: Vec<Ep> = pods.iter().map(|p| Ep::ready(p)).collect();
    s.apply(&endpoint_slice("web", "web-v4", &eps, &[HTTP, DNS]));
}

/// Echo servers (TCP 8080, UDP 5353) on the first three pods: ep1, ep2, ep3.
fn servers(s: &mut Scenario) {
    for (i, id) in ["ep1", "ep2", "ep3"].into_iter().enumerate() {
        s.tcp_server(POD_V4[i], 8080, id);
        s.udp_server(POD_V4[i], 5353, id);
    }
}

/// Waits until `n` TCP requests in a row all answer `only`.
fn wait_converged(s: &mut Scenario, within: Duration, only: &str) {
    let vip = sock(VIP, 80);
    s.wait_for_result_within(
        within,
        &format!("{VIP}:80 converges to {only}"),
        |t| {
            let seen = tally(10, || tcp_request(&t.client, vip, REQ));
            Ok(format!("{seen:?}"))
        },
        |r| matches!(r, Ok(seen) if *seen == format!("{{\"{only}\": 10}}")),
    );
}

#[test]
fn api_clusterip_follows_endpoint_and_service_changes() {
    if !require_root("api_clusterip_follows_endpoint_and_service_changes") {
        return;
    }
    let mut s = Scenario::with_api();
    servers(&mut s);
    web(&s, &[POD_V4[0], POD_V4[1]]);
    s.start_kproxy(&[]);

    let vip = sock(VIP, 80);
    let dns = sock(VIP, 53);
    s.wait_for(
        "tcp 10.96.0.10:80",
        |t| tcp_request(&t.client, vip, PROBE),
        "ep1",
    );
    let seen = tally(40, || tcp_request(&s.topo.client, vip, REQ));
    assert_spread(&seen, &["ep1", "ep2"], 5);
    let seen = tally(40, || udp_request(&s.topo.client, dns, REQ));
    assert_spread(&seen, &["ep1", "ep2"], 5);

    // One endpoint goes away on the API server: traffic converges to the other one, for both
    // protocols (each UDP request comes from a new source port: a new conntrack entry).
    slice(&s, &[POD_V4[1]]);
    wait_converged(&mut s, SYNC, "ep2");
    let seen = tally(20, || tcp_request(&s.topo.client, vip, REQ));
    assert_spread(&seen, &["ep2"], 20);
    let seen = tally(20, || udp_request(&s.topo.client, dns, REQ));
    assert_spread(&seen, &["ep2"], 20);

    // The Service is deleted: its rules go, and connections are no longer DNATed. The node
    // routes the VIP upstream (a black hole), so a connect times out; it must not reach a pod.
    s.source.delete("Service", "web");
    let gone = wait_until(SYNC, || !s.save(false).contains("10.96.0.10/32"));
    assert!(
        gone,
        "rules for {VIP} remain after the Service was deleted:\n{}",
        s.save(false)
    );
    for i in 0..3 {
        let r = tcp_request_from(&s.topo.client, Some(client_v4(i)), vip, PROBE);
        assert_timed_out("tcp to the deleted service", &r);
    }
    let r = udp_request(&s.topo.client, dns, PROBE);
    assert_timed_out("udp to the deleted service", &r);
    s.kproxy().assert_running();
}

#[test]
fn api_outage_keeps_rules_and_converges_after() {
    if !require_root("api_outage_keeps_rules_and_converges_after") {
        return;
    }
    let mut s = Scenario::with_api();
    servers(&mut s);
    web(&s, &[POD_V4[0], POD_V4[1]]);
    s.start_kproxy(&[]);
    let vip = sock(VIP, 80);
    let dns = sock(VIP, 53);
    s.wait_for(
        "tcp 10.96.0.10:80",
        |t| tcp_request(&t.client, vip, PROBE),
        "ep1",
    );
    // Both endpoints are programmed before the outage starts.
    s.wait_for(
        "tcp 10.96.0.10:80",
        |t| tcp_request(&t.client, vip, PROBE),
        "ep2",
    );

    // The API goes away (watches aborted, new connections closed). The rules stay.
    s.source.api().set_unavailable(true);
    std::thread::sleep(Duration::from_millis(2500));
    s.kproxy().assert_running();
    let seen = tally(40, || tcp_request(&s.topo.client, vip, REQ));
    assert_spread(&seen, &["ep1", "ep2"], 5);
    let seen = tally(40, || udp_request(&s.topo.client, dns, REQ));
    assert_spread(&seen, &["ep1", "ep2"], 5);

    // A change made while kproxy cannot see it changes nothing yet...
    slice(&s, &[POD_V4[2]]);
    std::thread::sleep(Duration::from_millis(500));
    let seen = tally(20, || tcp_request(&s.topo.client, vip, REQ));
    assert!(
        !seen.contains_key("ep3"),
        "kproxy saw a change while the API was unavailable: {seen:?}"
    );

    // ... and is picked up once the API is back (after the watcher's backoff).
    s.source.api().set_unavailable(false);
    wait_converged(&mut s, Duration::from_secs(30), "ep3");
    let seen = tally(20, || udp_request(&s.topo.client, dns, REQ));
    assert_spread(&seen, &["ep3"], 20);
    s.kproxy().assert_running();
}

/// A fresh node whose Node comes after the Services and EndpointSlices (its watch is a stream
/// of its own, and a cloud controller may add its addresses late): the first sync waits for it,
/// so even the first rules follow the node's zone. Without the wait they would ignore the
/// topology hints (no zone known yet) and send half the traffic to the other zone.
#[test]
fn api_first_sync_waits_for_a_late_node_and_follows_its_zone() {
    if !require_root("api_first_sync_waits_for_a_late_node_and_follows_its_zone") {
        return;
    }
    let mut s = Scenario::with_api();
    s.source.delete("Node", NODE);
    servers(&mut s);
    s.apply(&Svc::new("web", &[VIP], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "web",
        "web-zones",
        &[
            Ep::ready(POD_V4[0]).zone_hint("zone-a"),
            Ep::ready(POD_V4[1]).zone_hint("zone-b"),
        ],
        &[HTTP],
    ));
    s.start_kproxy(&[]);
    let vip = sock(VIP, 80);

    // Lists are in, the Node is not: nothing is programmed yet.
    std::thread::sleep(Duration::from_millis(2500));
    let r = tcp_request(&s.topo.client, vip, PROBE);
    assert_timed_out("the VIP before the Node exists", &r);
    let log = s.kproxy().stderr();
    assert!(
        !log.contains("first sync"),
        "the first sync ran without the Node:\n{log}"
    );

    s.apply(&node(NODE, &[NODE_IP, NODE_IP6], Some("zone-a")));
    s.wait_for(
        "tcp 10.96.0.10:80",
        |t| tcp_request(&t.client, vip, PROBE),
        "ep1",
    );
    let seen = tally(20, || tcp_request(&s.topo.client, vip, REQ));
    assert_spread(&seen, &["ep1"], 20);
    let log = s.kproxy().stderr();
    assert!(
        log.contains("services and endpoint slices listed; first sync")
            && !log.contains("was not seen with an address in time"),
        "{log}"
    );
    s.kproxy().assert_running();
}

/// A role that may not read Nodes (or a Node that never registers) delays the first sync by
/// the bounded wait, 30 s, and no longer: the services work, and the log says what is missing.
#[test]
fn api_node_not_readable_delays_the_first_sync_by_the_wait_only() {
    if !require_root("api_node_not_readable_delays_the_first_sync_by_the_wait_only") {
        return;
    }
    let mut s = Scenario::with_api();
    s.source.api().forbid(Kind::Node);
    servers(&mut s);
    web(&s, &[POD_V4[0]]);
    let started = Instant::now();
    s.start_kproxy(&[]);
    let vip = sock(VIP, 80);
    s.wait_for_result_within(
        Duration::from_secs(30) + SYNC,
        "tcp 10.96.0.10:80 after the Node wait",
        |t| tcp_request(&t.client, vip, PROBE),
        |r| matches!(r, Ok(id) if id == "ep1"),
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(29),
        "served after {waited:?}, inside the Node wait"
    );
    let log = s.kproxy().stderr();
    assert!(
        log.contains("was not seen with an address in time"),
        "no warning about the missing Node:\n{log}"
    );
    s.kproxy().assert_running();
}
