#![allow(clippy::unwrap_used, reason = "test fixtures")]
#![allow(
    clippy::disallowed_methods,
    reason = "tests time the tracer against the real clock"
)]

use kproxy_testkit::{ep, service, state, strategies};
use kproxy_tracer::{Dialect, Env, Origin, Verdict, model};
use proptest::prelude::*;

use kproxy_testkit::trace_scenarios::pkt;

use super::trace;
use crate::render::render;

#[test]
fn cluster_ip_spreads_over_endpoints_and_masquerades_outside_the_pod_network() {
    kproxy_testkit::trace_scenarios::cluster_ip_spreads_and_masquerades(
        |s, env, p| trace(&render(s), env, p),
        "map service-ips",
    );
}
#[test]
fn no_endpoints_rejects_and_other_ports_are_left_alone() {
    // nftables (docs/semantics.md, rule 24): an unused port of a live ClusterIP is rejected,
    // an unallocated service address dropped, anything else left alone.
    let other_port = kproxy_testkit::trace_scenarios::no_endpoints_rejects(|s, env, p| {
        trace(&render(s), env, p)
    });
    assert!(
        matches!(other_port, Verdict::Reject { rule: 24, .. }),
        "{other_port:?}"
    );
    let s = state(vec![service("empty", "10.96.0.11", vec![])]);
    let rules = render(&s);
    let env = Env::from_state(&s);
    let t = trace(
        &rules,
        &env,
        &pkt("10.244.1.5", "10.96.0.99", 80, Origin::Pod),
    );
    assert!(
        matches!(t.verdict, Verdict::Drop { rule: 24, .. }),
        "{:?}",
        t.verdict
    );
    let t = trace(&rules, &env, &pkt("10.244.1.5", "8.8.8.8", 80, Origin::Pod));
    assert_eq!(t.verdict, Verdict::NotService);
}

#[test]
fn source_ranges_apply_before_the_short_circuit() {
    let mut sp = service("lb", "10.96.0.12", vec![ep("10.244.2.1", false)]);
    sp.load_balancer_ips = vec!["198.51.100.1".parse().unwrap()];
    sp.node_port = Some(30001);
    sp.source_ranges = vec!["100.64.0.0/24".parse().unwrap()];
    sp.external_policy = kproxy_contract::TrafficPolicy::Local;
    sp.endpoints.local.clear();
    let s = state(vec![sp]);
    let rules = render(&s);
    let env = Env::from_state(&s);
    for src in ["10.244.1.5", "172.16.0.9"] {
        let p = pkt(src, "198.51.100.1", 80, Origin::Pod);
        let expected = model(&s, &env, &p, &Dialect::NFTABLES);
        assert!(
            matches!(expected, Verdict::Drop { rule: 13, .. }),
            "{expected:?}"
        );
        let got = trace(&rules, &env, &p).verdict;
        assert!(got.agrees_with(&expected).is_ok(), "{src}: {got:?}");
    }
}

/// The oracle can fail: a hand-altered table (one endpoint element rewritten) gives a verdict
/// that disagrees with the model, and a rule kproxy does not write is reported, not guessed.
#[test]
fn an_altered_table_disagrees_with_the_model() {
    let s = state(vec![service(
        "web",
        "10.96.0.10",
        vec![ep("10.244.2.1", false), ep("10.244.2.2", false)],
    )]);
    let mut rules = render(&s);
    let table = rules
        .families
        .get_mut(&kproxy_contract::IpFamily::V4)
        .unwrap();
    let map = table.sets.get_mut("endpoints-tcp").unwrap();
    let old = map.elements.insert(
        "10.96.0.10 . tcp . 80 . 1".into(),
        Some("10.244.2.9 . 8080".into()),
    );
    assert_eq!(old, Some(Some("10.244.2.2 . 8080".into())));
    let env = Env::from_state(&s);
    let p = pkt("10.244.1.5", "10.96.0.10", 80, Origin::Pod);
    let expected = model(&s, &env, &p, &Dialect::NFTABLES);
    assert!(
        trace(&rules, &env, &p)
            .verdict
            .agrees_with(&expected)
            .is_err()
    );
    let table = rules
        .families
        .get_mut(&kproxy_contract::IpFamily::V4)
        .unwrap();
    table
        .chains
        .get_mut("services")
        .unwrap()
        .rules
        .insert(0, crate::model::Rule::new("meta skuid 0 accept"));
    assert!(matches!(
        trace(&rules, &env, &p).verdict,
        Verdict::Unknown { .. }
    ));
}

/// `--live`: rules read back by identity get their text from a rendering; a rule no
/// rendering explains makes the verdict Unknown.
#[test]
fn live_rules_are_resolved_by_identity() {
    let s = state(vec![service(
        "web",
        "10.96.0.10",
        vec![ep("10.244.2.1", false)],
    )]);
    let rendered = render(&s);
    let mut live = rendered.clone();
    for t in live.families.values_mut() {
        t.chains = t
            .chains
            .iter()
            .map(|(name, c)| {
                let rules = c
                    .rules
                    .iter()
                    .map(|r| crate::model::Rule::from_id(r.id.clone()))
                    .collect();
                (name.clone(), crate::model::Chain { rules, ..c.clone() })
            })
            .collect();
    }
    let env = Env::from_state(&s);
    let p = pkt("10.244.1.5", "10.96.0.10", 80, Origin::Pod);
    assert!(matches!(
        trace(&live, &env, &p).verdict,
        Verdict::Unknown { .. }
    ));
    assert_eq!(super::resolve_live_rules(&mut live, &rendered), 0);
    assert_eq!(
        trace(&live, &env, &p).verdict,
        trace(&rendered, &env, &p).verdict
    );
}

#[test]
fn interface_detectors_decide_masquerade() {
    kproxy_testkit::trace_scenarios::interface_detectors_decide_masquerade(|s, env, p| {
        trace(&render(s), env, p)
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The nftables mode's rules and the model agree on every packet.
    #[test]
    fn nftables_rules_agree_with_the_model(
        (s, pkts) in strategies::case(),
    ) {
        let rules = render(&s);
        let env = strategies::env(&s);
        for p in &pkts {
            let expected = model(&s, &env, p, &Dialect::NFTABLES);
            let got = trace(&rules, &env, p);
            if let Err(why) = got.verdict.agrees_with(&expected) {
                let path: Vec<String> = got.path.iter().map(|h| format!("{}{}: {}", "  ".repeat(h.depth), h.object, h.detail)).collect();
                prop_assert!(false, "{p}: {why}\nmodel: {expected}\ntrace: {}\npath:\n{}\nstate: {:#?}", got.verdict, path.join("\n"), s);
            }
        }
    }
}

/// How long one trace takes at 10,000 services x 10 endpoints (the last service, so the walk
/// is the longest the layout allows). A measurement: `cargo test --release -p kproxy-nftables
/// -- --ignored trace_time`.
#[test]
#[ignore = "measurement"]
fn trace_time_at_ten_thousand_services() {
    let s = state(kproxy_testkit::many(10_000, 10));
    let rules = render(&s);
    let env = Env::from_state(&s);
    let p = pkt("10.244.1.5", "10.96.39.16", 80, Origin::Pod);
    let start = std::time::Instant::now();
    let n = 20;
    for _ in 0..n {
        let t = trace(&rules, &env, &p);
        assert!(
            t.verdict
                .agrees_with(&model(&s, &env, &p, &Dialect::NFTABLES))
                .is_ok(),
            "{:?}",
            t.verdict
        );
    }
    eprintln!(
        "nftables: {:?} per trace at 10,000 services",
        start.elapsed() / n
    );
}
