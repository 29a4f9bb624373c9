#![allow(clippy::unwrap_used, reason = "test fixtures")]
#![allow(
    clippy::disallowed_methods,
    reason = "tests time the tracer against the real clock"
)]

use std::sync::Arc;

use kproxy_testkit::{ep, service, state, strategies};
use kproxy_tracer::{Dialect, Env, Origin, Verdict, model};
use proptest::prelude::*;

use kproxy_testkit::trace_scenarios::pkt;

use super::trace;
use crate::render::{RenderOptions, render};

#[test]
fn cluster_ip_spreads_over_endpoints_and_masquerades_outside_the_pod_network() {
    kproxy_testkit::trace_scenarios::cluster_ip_spreads_and_masquerades(
        |s, env, p| trace(&render(s, &RenderOptions::default()), env, p),
        "KPROXY-SVC-",
    );
}

#[test]
fn no_endpoints_rejects_and_other_ports_are_left_alone() {
    let other_port = kproxy_testkit::trace_scenarios::no_endpoints_rejects(|s, env, p| {
        trace(&render(s, &RenderOptions::default()), env, p)
    });
    assert_eq!(other_port, Verdict::NotService);
}

/// The oracle can fail: a hand-altered ruleset (one endpoint's DNAT rewritten) gives a verdict
/// that disagrees with the model.
#[test]
fn an_altered_ruleset_disagrees_with_the_model() {
    let s = state(vec![service(
        "web",
        "10.96.0.10",
        vec![ep("10.244.2.1", false), ep("10.244.2.2", false)],
    )]);
    let mut rules = render(&s, &RenderOptions::default());
    let nat = rules.table_mut(kproxy_contract::IpFamily::V4, crate::Table::Nat);
    let svc = crate::names::service_chain(&kproxy_testkit::spn("web"));
    let chain = Arc::make_mut(nat.chains.get_mut(&svc).unwrap());
    for r in chain.iter_mut() {
        *r = r.replace("10.244.2.2:8080", "10.244.2.9:8080");
    }
    let env = Env::from_state(&s);
    let p = pkt("10.244.1.5", "10.96.0.10", 80, Origin::Pod);
    let expected = model(&s, &env, &p, &Dialect::IPTABLES);
    assert!(
        trace(&rules, &env, &p)
            .verdict
            .agrees_with(&expected)
            .is_err()
    );
    // And an unknown match is reported, not guessed.
    let nat = rules.table_mut(kproxy_contract::IpFamily::V4, crate::Table::Nat);
    Arc::make_mut(nat.chains.get_mut(&svc).unwrap())
        .insert(0, "-m owner --uid-owner 0 -j ACCEPT".into());
    assert!(matches!(
        trace(&rules, &env, &p).verdict,
        Verdict::Unknown { .. }
    ));
}

#[test]
fn address_matches_cover_every_prefix_length() {
    for (net, ip, hit) in [
        ("fd00::1/128", "fd00::1", true),
        ("fd00::1/128", "fd00::2", false),
        ("10.0.0.1/32", "10.0.0.1", true),
        ("0.0.0.0/0", "10.0.0.1", true),
        ("::/0", "fd00::1", true),
        ("0.0.0.10/0.0.0.15", "10.96.0.26", true),
        ("::3/::f", "fd00::1:23", true),
        ("10.0.0.0/33", "10.0.0.1", false),
    ] {
        let got = super::Net::parse(net).is_some_and(|n| n.contains(&ip.parse().unwrap()));
        assert_eq!(got, hit, "{net} {ip}");
    }
}

#[test]
fn interface_detectors_decide_masquerade() {
    kproxy_testkit::trace_scenarios::interface_detectors_decide_masquerade(|s, env, p| {
        trace(&render(s, &RenderOptions::default()), env, p)
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The iptables mode's rules and the model agree on every packet.
    #[test]
    fn iptables_rules_agree_with_the_model(
        (s, pkts) in strategies::case(),
        liberal in any::<bool>(),
    ) {
        let rules = render(&s, &RenderOptions { tcp_be_liberal: liberal });
        let env = strategies::env(&s);
        for p in &pkts {
            let expected = model(&s, &env, p, &Dialect::IPTABLES);
            let got = trace(&rules, &env, p);
            if let Err(why) = got.verdict.agrees_with(&expected) {
                let path: Vec<String> = got.path.iter().map(|h| format!("{}{}: {}", "  ".repeat(h.depth), h.object, h.detail)).collect();
                prop_assert!(false, "{p}: {why}\nmodel: {expected}\ntrace: {}\npath:\n{}\nstate: {:#?}", got.verdict, path.join("\n"), s);
            }
        }
    }
}

/// How long one trace takes at 10,000 services x 10 endpoints (the last service, so the walk
/// is the longest the layout allows). A measurement: `cargo test --release -p kproxy-iptables
/// -- --ignored trace_time`.
#[test]
#[ignore = "measurement"]
fn trace_time_at_ten_thousand_services() {
    let s = state(kproxy_testkit::many(10_000, 10));
    let rules = render(&s, &RenderOptions::default());
    let env = Env::from_state(&s);
    let p = pkt("10.244.1.5", "10.96.39.16", 80, Origin::Pod);
    let start = std::time::Instant::now();
    let n = 20;
    for _ in 0..n {
        let t = trace(&rules, &env, &p);
        assert!(
            t.verdict
                .agrees_with(&model(&s, &env, &p, &Dialect::IPTABLES))
                .is_ok(),
            "{:?}",
            t.verdict
        );
    }
    eprintln!(
        "iptables: {:?} per trace at 10,000 services",
        start.elapsed() / n
    );
}
