#![allow(clippy::unwrap_used, reason = "test fixtures")]

use kproxy_contract::Protocol;
use kproxy_testkit::{ep, service, state, strategies};
use kproxy_tracer::{Dialect, Env, Origin, Packet, Verdict, model};
use proptest::prelude::*;

use super::trace;
use crate::render::render;

#[test]
fn listeners_forward_from_the_node_and_refuse_unserved_service_ports() {
    let s = state(vec![service(
        "web",
        "10.96.0.10",
        vec![ep("10.244.1.1", true), ep("10.244.2.1", false)],
    )]);
    let rules = render(&s);
    let env = Env::from_state(&s);
    let mut p = Packet {
        src: "10.244.1.5".parse().unwrap(),
        src_port: None,
        dst: "10.96.0.10".parse().unwrap(),
        dst_port: 80,
        proto: Protocol::Tcp,
        origin: Origin::Pod,
        in_iface: None,
    };
    let t = trace(&rules, &env, &p);
    let Verdict::Forward { candidates, .. } = &t.verdict else {
        panic!("{:?}", t.verdict)
    };
    assert_eq!(candidates.len(), 2);
    assert!(
        candidates
            .iter()
            .all(|c| c.masquerade && (c.share - 0.5).abs() < 1e-9)
    );
    p.dst_port = 81;
    assert!(matches!(
        trace(&rules, &env, &p).verdict,
        Verdict::Reject { .. }
    ));
    p.dst = "8.8.8.8".parse().unwrap();
    assert_eq!(trace(&rules, &env, &p).verdict, Verdict::NotService);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The userspace listener table agrees with the model (userspace dialect). Forwarding is
    /// compared exactly (service, endpoints, shares, masquerade, affinity); a refusal is
    /// compared as "not forwarded", because a userspace refusal is the kernel's answer to a
    /// port nobody listens on and the listener table cannot say which rule removed the
    /// listener. SCTP is left out: the mode does not proxy it (it reports SCTP service ports
    /// as unsupported and programs nothing for them), so the model sees the state without them
    /// and no SCTP packets are traced.
    #[test]
    fn userspace_listeners_agree_with_the_model(
        (s, pkts) in strategies::case(),
    ) {
        let rules = render(&s);
        let env = strategies::env(&s);
        let mut served = s.clone();
        served.services.retain(|_, sp| sp.name.protocol != Protocol::Sctp);
        for p in pkts.iter().filter(|p| p.proto != Protocol::Sctp) {
            let expected = model(&served, &env, p, &Dialect::USERSPACE);
            let got = trace(&rules, &env, p);
            let ok = match (&expected, &got.verdict) {
                (Verdict::Forward { .. }, _) | (_, Verdict::Forward { .. }) => got.verdict.agrees_with(&expected),
                // A NodePort the policy leaves without endpoints has no listener: on a node
                // address the kernel's refusal is that of any closed port, which the trace
                // calls "not a service" (the mode owns no object there).
                (_, Verdict::NotService) if s.node.node_ips.contains(&p.dst) => Ok(()),
                (Verdict::NotService, v) | (v, Verdict::NotService) if v != &Verdict::NotService => Err("refused vs not a service".to_string()),
                _ => Ok(()),
            };
            if let Err(why) = ok {
                prop_assert!(false, "{p}: {why}\nmodel: {expected}\ntrace: {}\npath: {:?}\nstate: {:#?}", got.verdict, got.path, s);
            }
        }
    }
}
