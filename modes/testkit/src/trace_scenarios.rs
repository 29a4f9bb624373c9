//! Hand-written trace scenarios every kernel mode's tracer must pass, shared so each mode's test
//! states only what differs: how it renders and traces, and which object the path must cross.

use kproxy_contract::{LocalTraffic, Protocol, ProxyState};
use kproxy_tracer::{Env, Origin, Packet, Trace, Verdict};

use crate::{ep, service, state};

/// A TCP packet from `src` to `dst:port`.
pub fn pkt(src: &str, dst: &str, port: u16, origin: Origin) -> Packet {
    Packet {
        src: src.parse().expect("test source address"),
        src_port: None,
        dst: dst.parse().expect("test destination address"),
        dst_port: port,
        proto: Protocol::Tcp,
        origin,
        in_iface: None,
    }
}

/// `ns/web:p` at 10.96.0.10 with one local and two remote endpoints: a pod's packet spreads over
/// all three in equal shares without masquerade and crosses `path_object`; the node's own packet
/// is masqueraded; the local endpoint reaching itself is masqueraded (hairpin), to the others not.
pub fn cluster_ip_spreads_and_masquerades(
    trace: impl Fn(&ProxyState, &Env, &Packet) -> Trace,
    path_object: &str,
) {
    let s = state(vec![service(
        "web",
        "10.96.0.10",
        vec![
            ep("10.244.1.1", true),
            ep("10.244.2.1", false),
            ep("10.244.2.2", false),
        ],
    )]);
    let env = Env::from_state(&s);
    let t = trace(&s, &env, &pkt("10.244.1.5", "10.96.0.10", 80, Origin::Pod));
    let Verdict::Forward {
        candidates,
        service,
        ..
    } = &t.verdict
    else {
        panic!("{:?}", t.verdict)
    };
    assert_eq!(service.as_deref(), Some("ns/web:p"));
    assert_eq!(candidates.len(), 3);
    for c in candidates {
        assert!((c.share - 1.0 / 3.0).abs() < 1e-6, "{c:?}");
        assert!(!c.masquerade, "pod source is not masqueraded");
    }
    assert!(
        t.path.iter().any(|h| h.object.contains(path_object)),
        "{:?}",
        t.path
    );
    let t = trace(
        &s,
        &env,
        &pkt("192.168.0.2", "10.96.0.10", 80, Origin::Node),
    );
    let Verdict::Forward { candidates, .. } = &t.verdict else {
        panic!("{:?}", t.verdict)
    };
    assert!(
        candidates.iter().all(|c| c.masquerade),
        "node source is masqueraded"
    );
    let t = trace(&s, &env, &pkt("10.244.1.1", "10.96.0.10", 80, Origin::Pod));
    let Verdict::Forward { candidates, .. } = &t.verdict else {
        panic!("{:?}", t.verdict)
    };
    for c in candidates {
        assert_eq!(
            c.masquerade,
            c.endpoint.ip().to_string() == "10.244.1.1",
            "{c:?}"
        );
    }
}

/// `ns/empty:p` at 10.96.0.11 without endpoints: its port is rejected (docs/semantics.md,
/// rule 5); returns the verdict for another port of the same address, where the modes differ.
pub fn no_endpoints_rejects(trace: impl Fn(&ProxyState, &Env, &Packet) -> Trace) -> Verdict {
    let s = state(vec![service("empty", "10.96.0.11", vec![])]);
    let env = Env::from_state(&s);
    let t = trace(&s, &env, &pkt("10.244.1.5", "10.96.0.11", 80, Origin::Pod));
    assert!(
        matches!(t.verdict, Verdict::Reject { rule: 5, .. }),
        "{:?}",
        t.verdict
    );
    trace(&s, &env, &pkt("10.244.1.5", "10.96.0.11", 81, Origin::Pod)).verdict
}

/// `ns/web:p` at 10.96.0.10 with one remote endpoint, on a node whose pods hang off the bridge
/// `cbr0`, then on one whose pods' veths are named `veth…`: a packet arriving on a pod's
/// interface is not masqueraded whatever its address, one arriving on another interface is,
/// and so is the node's own packet (an OUTPUT-hook chain has no input interface, so "not from
/// a pod" matches it).
pub fn interface_detectors_decide_masquerade(trace: impl Fn(&ProxyState, &Env, &Packet) -> Trace) {
    for (detector, pod_iface) in [
        (LocalTraffic::Interface("cbr0".into()), "cbr0"),
        (LocalTraffic::InterfacePrefix("veth".into()), "veth3f"),
    ] {
        let mut s = state(vec![service(
            "web",
            "10.96.0.10",
            vec![ep("10.244.2.1", false)],
        )]);
        std::sync::Arc::make_mut(&mut s.node).local_traffic = detector.clone();
        let env = Env::from_state(&s);
        let via = |src: &str, origin: Origin, iface: &str| Packet {
            in_iface: Some(iface.into()),
            ..pkt(src, "10.96.0.10", 80, origin)
        };
        for (p, masquerade) in [
            (via("172.16.0.9", Origin::Pod, pod_iface), false),
            (via("10.244.1.5", Origin::External, "eth0"), true),
            (via("192.168.0.2", Origin::Node, pod_iface), true),
        ] {
            let t = trace(&s, &env, &p);
            let Verdict::Forward { candidates, .. } = &t.verdict else {
                panic!("{detector:?} {p}: {:?}", t.verdict)
            };
            assert!(
                candidates.iter().all(|c| c.masquerade == masquerade),
                "{detector:?} {p}: {candidates:?}"
            );
        }
    }
}
