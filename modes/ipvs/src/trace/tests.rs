#![allow(clippy::unwrap_used, reason = "test fixtures")]

use kproxy_contract::{IpFamily, ProxyState};
use kproxy_testkit::{ep, service, state, strategies};
use kproxy_tracer::{Dialect, Env, Origin, Verdict, model};
use proptest::prelude::*;

use kproxy_testkit::trace_scenarios::pkt;

use super::trace;
use crate::model::IpvsRules;
use crate::render::{RenderInput, render};

fn rendered(s: &ProxyState) -> IpvsRules {
    render(
        s,
        &RenderInput {
            scheduler: "rr",
            local_addresses: &s.node.node_ips,
            families: &[IpFamily::V4, IpFamily::V6],
        },
    )
}

#[test]
fn virtual_server_weights_become_shares() {
    let s = state(vec![service(
        "web",
        "10.96.0.10",
        vec![ep("10.244.1.1", true), ep("10.244.2.1", false)],
    )]);
    let mut rules = rendered(&s);
    let env = Env::from_state(&s);
    let p = pkt("10.244.1.5", "10.96.0.10", 80, Origin::Pod);
    let t = trace(&rules, &env, &p);
    assert!(
        t.verdict
            .agrees_with(&model(&s, &env, &p, &Dialect::IPVS))
            .is_ok(),
        "{:?}",
        t.verdict
    );
    // Weight 3 to one real server: 3/4 of new connections go there, and the model disagrees.
    let (key, vs) = rules.services().iter().next().unwrap();
    let (key, mut vs) = (*key, (**vs).clone());
    *vs.dests.values_mut().next().unwrap() = 3;
    rules.insert_server(key, std::sync::Arc::new(vs));
    let t = trace(&rules, &env, &p);
    let Verdict::Forward { candidates, .. } = &t.verdict else {
        panic!("{:?}", t.verdict)
    };
    assert!(
        candidates
            .iter()
            .any(|c| (c.share - 0.75).abs() < 1e-9 && c.weight == Some(3))
    );
    assert!(
        t.verdict
            .agrees_with(&model(&s, &env, &p, &Dialect::IPVS))
            .is_err()
    );
    // A port no virtual server serves on a service address: REJECT (docs/semantics.md, rule 24).
    let t = trace(
        &rules,
        &env,
        &pkt("10.244.1.5", "10.96.0.10", 81, Origin::Pod),
    );
    assert!(
        matches!(t.verdict, Verdict::Reject { rule: 24, .. }),
        "{:?}",
        t.verdict
    );
}

#[test]
fn interface_detectors_decide_masquerade() {
    kproxy_testkit::trace_scenarios::interface_detectors_decide_masquerade(|s, env, p| {
        trace(&rendered(s), env, p)
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The IPVS mode's virtual servers and table agree with the model (IPVS dialect).
    #[test]
    fn ipvs_rules_agree_with_the_model(
        (s, pkts) in strategies::case(),
    ) {
        let rules = rendered(&s);
        let env = strategies::env(&s);
        for p in &pkts {
            let expected = model(&s, &env, p, &Dialect::IPVS);
            let got = trace(&rules, &env, p);
            if let Err(why) = got.verdict.agrees_with(&expected) {
                let path: Vec<String> = got.path.iter().map(|h| format!("{}{}: {}", "  ".repeat(h.depth), h.object, h.detail)).collect();
                prop_assert!(false, "{p}: {why}\nmodel: {expected}\ntrace: {}\npath:\n{}\nstate: {:#?}", got.verdict, path.join("\n"), s);
            }
        }
    }
}
