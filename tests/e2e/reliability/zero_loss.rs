//! Guarantee 1, zero-loss updates: while a client keeps opening TCP connections and sending UDP
//! datagrams to the service `live`, 1,000 changes go through the (fake) API server's watch:
//! other services are created, changed and deleted, and `live`'s endpoint set changes (never to
//! empty). Every pod keeps running throughout, so every connection and every datagram must be
//! answered.
//!
//! The one loss that is not a bug, in every mode and upstream too: a UDP datagram in flight to
//! an endpoint at the very moment that endpoint's removal is programmed. Its flow is deleted
//! (conntrack cleanup in the kernel modes, the flow's end in userspace), so the pod's reply no
//! longer matches it. A lost datagram is excused only when it was sent within [`IN_FLIGHT`]
//! before a sync that removed one of `live`'s endpoints completed (kproxy's own log timestamps);
//! every other loss fails the test. TCP has no excuse at all: established flows are never
//! touched, and a new connection must always meet complete rules.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use crate::support::load::{Load, LoadReport};
use crate::support::manifests::Port;
use crate::support::objects::{Ep, Svc, endpoint_slice};
use crate::support::scenario::{Mode, PROBE, SYNC, Scenario, sock};
use crate::support::topology::POD_V4;
use crate::support::traffic::tcp_request;

const HTTP: Port = Port::tcp("http", 80, 8080);
const DNS: Port = Port::udp("dns", 53, 5353);
const VIP: &str = "10.96.0.10";
/// How many API writes the test makes.
const CHANGES: usize = 1000;
/// Pause between two writes: 1,000 writes take about 15 s, so with a 100 ms min-sync-period
/// kproxy runs well over a hundred syncs, each folding in a handful of changes.
const PACE: Duration = Duration::from_millis(12);
/// One request per generator every this long.
const LOAD_PACE: Duration = Duration::from_millis(4);
/// How long before a removing sync's completion a lost datagram counts as in flight.
const IN_FLIGHT: Duration = Duration::from_millis(100);
/// `live`'s endpoint sets, in turn (indices into the first three pods); never empty.
const LIVE_SETS: [&[usize]; 6] = [&[0, 1], &[1, 2], &[0, 2], &[0, 1, 2], &[2], &[0]];
/// Other services cycle through these write kinds, one per round.
const OTHER_STEPS: usize = 6;

fn live_slice(set: &[usize]) -> serde_json::Value {
    let eps: Vec<Ep> = set.iter().map(|&i| Ep::ready(POD_V4[i])).collect();
    endpoint_slice("live", "live-v4", &eps, &[HTTP, DNS])
}

/// The `step`-th write to the other service `k` (`other-K`, ClusterIP 10.96.1.K).
fn other_write(s: &Scenario, k: usize, step: usize) {
    let name = format!("other-{k}");
    let slice = format!("{name}-v4");
    let ip = format!("10.96.1.{k}");
    let extra = Port::tcp("extra", 81, 8081);
    match step {
        0 => s.apply(&Svc::new(&name, &[&ip], &[HTTP]).json()),
        1 => s.apply(&endpoint_slice(
            &name,
            &slice,
            &[Ep::ready(POD_V4[3])],
            &[HTTP],
        )),
        2 => s.apply(&endpoint_slice(
            &name,
            &slice,
            &[Ep::ready(POD_V4[3]), Ep::ready(POD_V4[0])],
            &[HTTP],
        )),
        3 => s.apply(&Svc::new(&name, &[&ip], &[HTTP, extra]).json()),
        4 => s.source.delete("EndpointSlice", &slice),
        _ => s.source.delete("Service", &name),
    }
}

/// What the run did, for the assertions and the printed summary.
struct Run {
    report: LoadReport,
    /// When each write that removed one of `live`'s endpoints was made.
    removals: Vec<SystemTime>,
    /// kproxy's log.
    log: String,
}

/// The completion times of the syncs that programmed a removal: for each removal, the first
/// `sync complete` logged after it.
fn removing_syncs(log: &str, removals: &[SystemTime]) -> BTreeSet<SystemTime> {
    let syncs: Vec<SystemTime> = log
        .lines()
        .filter(|l| l.contains("sync complete"))
        .filter_map(|l| humantime::parse_rfc3339_weak(l.split_whitespace().next()?).ok())
        .collect();
    removals
        .iter()
        .filter_map(|r| syncs.iter().find(|c| *c > r).copied())
        .collect()
}

fn run(s: &mut Scenario) -> Run {
    for (i, id) in ["ep1", "ep2", "ep3", "ep4"].into_iter().enumerate() {
        s.tcp_server(POD_V4[i], 8080, id);
        s.udp_server(POD_V4[i], 5353, id);
    }
    s.apply(&Svc::new("live", &[VIP], &[HTTP, DNS]).json());
    s.apply(&live_slice(LIVE_SETS[0]));
    s.start_kproxy(&[]);
    let vip = sock(VIP, 80);
    s.wait_tcp("tcp 10.96.0.10:80", vip, "ep1");
    s.wait_tcp("tcp 10.96.0.10:80", vip, "ep2");

    let load = Load::start(&s.topo.client, Some(vip), Some(sock(VIP, 53)), LOAD_PACE);
    let mut removals = Vec::new();
    let mut live = LIVE_SETS[0];
    let mut live_changes = 0;
    for i in 0..CHANGES {
        if i % 5 == 0 {
            live_changes += 1;
            let next = LIVE_SETS[live_changes % LIVE_SETS.len()];
            if live.iter().any(|e| !next.contains(e)) {
                removals.push(SystemTime::now());
            }
            s.apply(&live_slice(next));
            live = next;
        } else {
            // 40 other services; each round of 40 writes moves every one to its next step.
            let k = i % 40;
            other_write(s, k, (i / 40) % OTHER_STEPS);
        }
        std::thread::sleep(PACE);
    }
    // Let the last changes land under load too.
    std::thread::sleep(Duration::from_secs(1));
    let report = load.stop();
    s.kproxy().assert_running();
    // The final endpoint set is programmed.
    let want: BTreeSet<String> = live.iter().map(|i| format!("ep{}", i + 1)).collect();
    s.wait_for_result_within(
        SYNC,
        "the final endpoint set",
        |t| {
            let seen: BTreeSet<String> = (0..30)
                .filter_map(|_| tcp_request(&t.client, vip, PROBE).ok())
                .collect();
            Ok(format!("{seen:?}"))
        },
        |r| matches!(r, Ok(seen) if *seen == format!("{want:?}")),
    );
    let log = s.kproxy().stderr();
    Run {
        report,
        removals,
        log,
    }
}

/// Runs the scenario and checks the guarantee; `label` names the mode in the summary line.
fn zero_loss(mut s: Scenario, label: &str) {
    let Run {
        report,
        removals,
        log,
    } = run(&mut s);
    let syncs = log.lines().filter(|l| l.contains("sync complete")).count();
    assert!(!log.contains("panicked"), "kproxy panicked:\n{log}");
    let removing = removing_syncs(&log, &removals);
    let (excused, unexcused): (Vec<_>, Vec<_>) = report.udp.failures.iter().partition(|(t, _)| {
        removing
            .iter()
            .any(|c| *t <= *c && c.duration_since(*t).unwrap_or_default() <= IN_FLIGHT)
    });
    eprintln!(
        "zero-loss {label}: changes={CHANGES} (removals of live endpoints: {}), syncs={syncs}, \
         tcp connections={} failed={}, udp datagrams={} answered={} lost in flight to a \
         removed endpoint={} other losses={}; answers tcp {:?} udp {:?}",
        removals.len(),
        report.tcp.sent(),
        report.tcp.failures.len(),
        report.udp.sent(),
        report.udp.ok,
        excused.len(),
        unexcused.len(),
        report.tcp.answers,
        report.udp.answers,
    );
    assert!(
        report.tcp.failures.is_empty(),
        "{label}: {} of {} TCP connections failed: {:?}",
        report.tcp.failures.len(),
        report.tcp.sent(),
        report.tcp.failures
    );
    assert!(
        unexcused.is_empty(),
        "{label}: UDP datagrams lost outside endpoint removals: {unexcused:?}"
    );
    assert!(
        report.tcp.sent() > 1000 && report.udp.sent() > 1000,
        "{label}: too little traffic to mean anything"
    );
    // Every endpoint that was in the set served: the load really followed the changes.
    for id in ["ep1", "ep2", "ep3"] {
        assert!(
            report.tcp.answers.contains_key(id),
            "{label}: {id} never answered: {:?}",
            report.tcp.answers
        );
    }
    assert!(
        syncs > 20,
        "{label}: only {syncs} syncs: the changes were not spread over many syncs"
    );
}

#[test]
fn zero_loss_updates_iptables() {
    if crate::support::require_root("zero_loss_updates_iptables") {
        let mut s = Scenario::with_api();
        s.mode = Mode::Iptables;
        zero_loss(s, "iptables");
    }
}

/// The rare refused connect this test once met (1 of 1,354, under the full suite's load) was a
/// SYN straddling a commit: `service-ips` looked up before the generation flip (`goto pick-3`),
/// the endpoints map after it (index 2 gone); `pick-N` now ends with a fallback to index 0
/// (`modes/nftables/README.md`, "One packet, two generations").
#[test]
fn zero_loss_updates_nftables() {
    if crate::support::require_root("zero_loss_updates_nftables") {
        let mut s = Scenario::with_api();
        s.mode = Mode::Nftables;
        zero_loss(s, "nftables");
    }
}

/// Userspace mode: connections here are short (one answer, then EOF), so the grace-period reset
/// of connections to a removed endpoint never applies; a UDP flow to a removed endpoint ends at
/// once, the same in-flight case as above.
#[test]
fn zero_loss_updates_userspace() {
    if crate::support::require_root("zero_loss_updates_userspace") {
        zero_loss(Scenario::with_api().userspace(), "userspace");
    }
}
