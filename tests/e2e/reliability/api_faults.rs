//! Guarantee 3, API faults: the API server closes every watch, forgets history (the resumed
//! watches get 410 Gone and relist), answers 500s, and then disappears for 60 s. Throughout, a
//! client keeps connecting through a service and no connection fails (the rules stay as they
//! were), kproxy reconnects with backoff (its connection attempts thin out, no busy loop), a
//! change made during the outage lands once the API is back (within the watchers' backoff cap,
//! 30 s as client-go's plus at most 20 % jitter, and one sync), and /healthz reports as
//! upstream's does: healthy throughout, because nothing was queued that kproxy failed to
//! program (an API outage is not a sync failure; upstream's `lastUpdated` is the current time
//! while healthy, and so is ours). Closed watches, 410 and 500s in isolation are covered by
//! `api_watch.rs`.

use std::time::{Duration, Instant};

use crate::support::http;
use crate::support::load::Load;
use crate::support::manifests::Port;
use crate::support::objects::{Ep, Svc, endpoint_slice};
use crate::support::scenario::{Mode, PROBE, Scenario, sock};
use crate::support::topology::POD_V4;
use crate::support::traffic::tcp_request;

const HTTP: Port = Port::tcp("http", 80, 8080);
const VIP: &str = "10.96.0.10";
const HEALTHZ: &str = "127.0.0.1:10256";
const OUTAGE: Duration = Duration::from_secs(60);
/// kproxy's sync period here: /healthz turns unhealthy after 2 × this with an unprogrammed
/// update, so the outage lasts three such windows.
const SYNC_PERIOD: &str = "10s";
/// The watchers' longest retry delay: client-go's 30 s cap plus kproxy's 20 % jitter
/// (`src/source/backoff.rs`).
const BACKOFF_CAP: Duration = Duration::from_secs(36);

fn slice(s: &Scenario, pods: &[usize]) {
    let eps: Vec<Ep> = pods.iter().map(|&i| Ep::ready(POD_V4[i])).collect();
    s.apply(&endpoint_slice("web", "web-v4", &eps, &[HTTP]));
}

/// The status of /healthz.
fn healthz(s: &Scenario) -> u16 {
    http::get(&s.topo.node, HEALTHZ.parse().expect("addr"), "/healthz")
        .expect("healthz answers")
        .0
}

#[test]
fn api_faults_and_a_60s_outage_keep_rules_backoff_health_and_converge() {
    if !crate::support::require_root(
        "api_faults_and_a_60s_outage_keep_rules_backoff_health_and_converge",
    ) {
        return;
    }
    let mut s = Scenario::with_api();
    s.mode = Mode::Iptables;
    for (i, id) in ["ep1", "ep2", "ep3"].into_iter().enumerate() {
        s.tcp_server(POD_V4[i], 8080, id);
    }
    s.apply(&Svc::new("web", &[VIP], &[HTTP]).json());
    slice(&s, &[0]);
    s.start_kproxy(&[
        "--healthz-bind-address",
        HEALTHZ,
        "--iptables-sync-period",
        SYNC_PERIOD,
    ]);
    let vip = sock(VIP, 80);
    s.wait_tcp("first sync", vip, "ep1");
    let load = Load::start(&s.topo.client, Some(vip), None, Duration::from_millis(10));

    // Watches cut, a change made meanwhile and history compacted (the resumed watches get 410
    // Gone and relist), and the first requests after that answered with 500s.
    let api = s.source.api();
    api.set_unavailable(true);
    slice(&s, &[1]);
    let api = s.source.api();
    api.compact();
    api.close_watches();
    api.fail_next(6, 500);
    api.set_unavailable(false);
    s.wait_tcp("after 410 and 500s", vip, "ep2");
    assert!(
        s.source.api().expired_watches() > 0,
        "no watch got 410 Gone"
    );

    // The outage.
    s.source.api().set_unavailable(true);
    let down = Instant::now();
    let mut health = Vec::new();
    let mut changed = false;
    while down.elapsed() < OUTAGE {
        health.push((down.elapsed(), healthz(&s)));
        if !changed && down.elapsed() > Duration::from_secs(5) {
            // A change kproxy cannot see yet.
            slice(&s, &[2]);
            changed = true;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let during = tcp_request(&s.topo.client, vip, PROBE);
    s.kproxy().assert_running();
    let refused = s.source.api().refused_connections();
    s.source.api().set_unavailable(false);
    let back = Instant::now();
    s.wait_for_result_within(
        BACKOFF_CAP + Duration::from_secs(5),
        "the change made during the outage",
        |t| tcp_request(&t.client, vip, PROBE),
        |r| matches!(r, Ok(id) if id == "ep3"),
    );
    let converged = back.elapsed();
    let report = load.stop();

    eprintln!(
        "refused at {:?}",
        refused
            .iter()
            .map(|t| t.duration_since(down).as_millis())
            .collect::<Vec<_>>()
    );
    let first_half = refused
        .iter()
        .filter(|t| t.duration_since(down) < OUTAGE / 2)
        .count();
    let second_half = refused.len() - first_half;
    let unhealthy: Vec<_> = health.iter().filter(|(_, code)| *code != 200).collect();
    eprintln!(
        "api faults: outage {OUTAGE:?}; connection attempts refused {} (first half {first_half}, \
         second half {second_half}); healthz samples {} unhealthy {}; converged {converged:?} after the API came back; tcp connections={} failed={}",
        refused.len(),
        health.len(),
        unhealthy.len(),
        report.tcp.sent(),
        report.tcp.failures.len(),
    );
    assert_eq!(
        during.ok().as_deref(),
        Some("ep2"),
        "rules changed during the outage"
    );
    assert!(
        report.tcp.failures.is_empty(),
        "connections failed: {:?}",
        report.tcp.failures
    );
    assert!(
        unhealthy.is_empty(),
        "/healthz flipped during the outage: {unhealthy:?}"
    );
    // Backoff: a few attempts, thinning out; a busy loop would make thousands.
    // Three watchers doubling from 0.8 s to 30 s make about six attempts each in 60 s, five of
    // them in the first half; a delay that never grows makes one a second.
    assert!(
        (3..=30).contains(&refused.len()),
        "{} connection attempts in {OUTAGE:?}",
        refused.len()
    );
    assert!(
        second_half * 2 <= first_half,
        "attempts did not thin out: {first_half} then {second_half}"
    );
    assert!(
        converged <= BACKOFF_CAP + Duration::from_secs(5),
        "{converged:?} to converge after the API came back"
    );
    let log = s.kproxy().stderr();
    assert!(
        log.contains("watch failed; retrying with backoff"),
        "the outage was not logged:\n{log}"
    );
}
