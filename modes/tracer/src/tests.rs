#![allow(clippy::unwrap_used, reason = "test fixtures")]

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use kproxy_contract::{
    Endpoint, Endpoints, LocalTraffic, NodeSettings, ServicePortKey, ServicePortName,
};

fn sp(eps: Vec<Endpoint>, local: Vec<Endpoint>) -> ServicePort {
    ServicePort {
        name: ServicePortName {
            namespace: "ns".into(),
            name: "web".into(),
            port: "http".into(),
            protocol: Protocol::Tcp,
        },
        family: IpFamily::V4,
        cluster_ip: Some("10.96.0.10".parse().unwrap()),
        port: 80,
        node_port: Some(30080),
        external_ips: vec![],
        load_balancer_ips: vec!["198.51.100.1".parse().unwrap()],
        source_ranges: vec!["100.64.0.0/24".parse().unwrap()],
        affinity: None,
        external_policy: TrafficPolicy::Local,
        internal_policy: TrafficPolicy::Cluster,
        health_check_node_port: None,
        endpoints: Endpoints {
            any: !eps.is_empty(),
            serving: eps.clone().into(),
            cluster: eps.into(),
            local_ready: local.len(),
            local,
        },
    }
}

fn st(sp: ServicePort) -> ProxyState {
    st_with(
        sp,
        LocalTraffic::SourceCidrs(vec!["10.244.0.0/16".parse().unwrap()]),
    )
}

fn st_with(sp: ServicePort, local_traffic: LocalTraffic) -> ProxyState {
    let mut services = BTreeMap::new();
    services.insert(
        ServicePortKey {
            family: sp.family,
            name: sp.name.clone(),
        },
        Arc::new(sp),
    );
    ProxyState {
        node: Arc::new(NodeSettings {
            node_ips: vec!["192.168.0.2".parse().unwrap()],
            local_traffic,
            service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
            masquerade_bit: 14,
            ..NodeSettings::default()
        }),
        services,
    }
}

fn pkt(src: &str, dst: &str, port: u16, origin: Origin) -> Packet {
    Packet {
        src: src.parse().unwrap(),
        src_port: None,
        dst: dst.parse().unwrap(),
        dst_port: port,
        proto: Protocol::Tcp,
        origin,
        in_iface: None,
    }
}

fn via(mut p: Packet, iface: &str) -> Packet {
    p.in_iface = Some(iface.into());
    p
}

/// The masquerade decisions of the candidates, or the verdict's kind.
fn masq(v: &Verdict) -> Result<Vec<bool>, &'static str> {
    match v {
        Verdict::Forward { candidates, .. } => {
            Ok(candidates.iter().map(|c| c.masquerade).collect())
        }
        other => Err(other.kind()),
    }
}

fn remote() -> Endpoint {
    Endpoint {
        ip: "10.244.2.1".parse().unwrap(),
        port: 8080,
        is_local: false,
    }
}

#[test]
fn etp_local_without_local_endpoints_drops_outsiders_and_short_circuits_pods() {
    let s = st(sp(vec![remote()], vec![]));
    let env = Env::from_state(&s);
    let d = Dialect::IPTABLES;
    let v = model(
        &s,
        &env,
        &pkt("172.16.0.9", "192.168.0.2", 30080, Origin::External),
        &d,
    );
    assert!(matches!(v, Verdict::Drop { rule: 7, .. }), "{v:?}");
    let v = model(
        &s,
        &env,
        &pkt("10.244.1.5", "192.168.0.2", 30080, Origin::Pod),
        &d,
    );
    assert!(
        matches!(&v, Verdict::Forward { candidates, .. } if candidates.len() == 1 && !candidates[0].masquerade),
        "{v:?}"
    );
    let v = model(
        &s,
        &env,
        &pkt("192.168.0.2", "192.168.0.2", 30080, Origin::Node),
        &d,
    );
    assert!(
        matches!(&v, Verdict::Forward { candidates, .. } if candidates[0].masquerade),
        "{v:?}"
    );
    // IPVS has no short-circuit: the pod is dropped too.
    let v = model(
        &s,
        &env,
        &pkt("10.244.1.5", "192.168.0.2", 30080, Origin::Pod),
        &Dialect::IPVS,
    );
    assert!(matches!(v, Verdict::Drop { rule: 7, .. }), "{v:?}");
}

#[test]
fn source_ranges_drop_before_anything_else() {
    let s = st(sp(vec![remote()], vec![]));
    let env = Env::from_state(&s);
    let v = model(
        &s,
        &env,
        &pkt("10.244.1.5", "198.51.100.1", 80, Origin::Pod),
        &Dialect::IPTABLES,
    );
    assert!(matches!(v, Verdict::Drop { rule: 13, .. }), "{v:?}");
}

#[test]
fn unused_ports_and_unallocated_addresses_depend_on_the_dialect() {
    let s = st(sp(vec![remote()], vec![]));
    let env = Env::from_state(&s);
    let other_port = pkt("10.244.1.5", "10.96.0.10", 81, Origin::Pod);
    let unallocated = pkt("10.244.1.5", "10.96.0.99", 80, Origin::Pod);
    assert_eq!(
        model(&s, &env, &other_port, &Dialect::IPTABLES),
        Verdict::NotService
    );
    assert!(matches!(
        model(&s, &env, &other_port, &Dialect::NFTABLES),
        Verdict::Reject { rule: 24, .. }
    ));
    assert!(matches!(
        model(&s, &env, &unallocated, &Dialect::NFTABLES),
        Verdict::Drop { rule: 24, .. }
    ));
    assert_eq!(
        model(&s, &env, &unallocated, &Dialect::IPTABLES),
        Verdict::NotService
    );
}

/// A refusal names the rule that decided it and the document that states the rule, so a user
/// of `kproxy trace` can look it up.
#[test]
fn refusals_point_to_the_rule_in_docs_semantics() {
    let drop = Verdict::Drop {
        rule: 13,
        reason: "ns/web:http: source 192.0.2.9 is outside loadBalancerSourceRanges".into(),
    };
    assert_eq!(
        drop.to_string(),
        "DROP: ns/web:http: source 192.0.2.9 is outside loadBalancerSourceRanges \
         (docs/semantics.md, rule 13)"
    );
    let reject = Verdict::Reject {
        rule: 5,
        reason: "ns/web:http has no endpoints".into(),
    };
    assert_eq!(
        reject.to_string(),
        "REJECT: ns/web:http has no endpoints (docs/semantics.md, rule 5)"
    );
}

#[test]
fn agreement_compares_shares_and_masquerade() {
    let c = |ip: &str, share: f64, masquerade: bool| Candidate {
        endpoint: SocketAddr::new(ip.parse().unwrap(), 80),
        share,
        weight: None,
        masquerade,
    };
    let f = |cands| Verdict::Forward {
        service: None,
        frontend: None,
        candidates: cands,
        affinity: None,
    };
    let a = f(vec![c("10.0.0.1", 0.5, false), c("10.0.0.2", 0.5, false)]);
    assert!(
        a.agrees_with(&f(vec![
            c("10.0.0.2", 0.5, false),
            c("10.0.0.1", 0.5, false)
        ]))
        .is_ok()
    );
    assert!(
        a.agrees_with(&f(vec![
            c("10.0.0.1", 0.7, false),
            c("10.0.0.2", 0.3, false)
        ]))
        .is_err()
    );
    assert!(
        a.agrees_with(&f(vec![
            c("10.0.0.1", 0.5, true),
            c("10.0.0.2", 0.5, false)
        ]))
        .is_err()
    );
    assert!(a.agrees_with(&Verdict::NotService).is_err());
}

#[test]
fn interface_detectors_decide_by_ingress_interface_not_address() {
    let d = Dialect::IPTABLES;
    for detector in [
        LocalTraffic::Interface("cbr0".into()),
        LocalTraffic::InterfacePrefix("cbr".into()),
    ] {
        let s = st_with(sp(vec![remote()], vec![]), detector.clone());
        let env = Env::from_state(&s);
        // ClusterIP: an external address arriving on the bridge is local (not masqueraded);
        // a pod-CIDR address arriving elsewhere is not (masqueraded).
        let cip = pkt("172.16.0.9", "10.96.0.10", 80, Origin::Pod);
        assert_eq!(
            masq(&model(&s, &env, &via(cip.clone(), "cbr0"), &d)),
            Ok(vec![false]),
            "{detector:?}"
        );
        let pod = pkt("10.244.1.5", "10.96.0.10", 80, Origin::Pod);
        assert_eq!(
            masq(&model(&s, &env, &via(pod.clone(), "eth0"), &d)),
            Ok(vec![true])
        );
        assert_eq!(
            masq(&model(&s, &env, &pod, &d)),
            Ok(vec![true]),
            "no interface known"
        );
        // The node's own packets have no input interface, whatever the packet says.
        let node = via(pkt("192.168.0.2", "10.96.0.10", 80, Origin::Node), "cbr0");
        assert_eq!(node.ingress(), "");
        assert_eq!(masq(&model(&s, &env, &node, &d)), Ok(vec![true]));
        // ETP=Local without local endpoints: the short-circuit follows the interface.
        let np = pkt("10.244.1.5", "192.168.0.2", 30080, Origin::Pod);
        assert_eq!(
            masq(&model(&s, &env, &via(np.clone(), "cbr0"), &d)),
            Ok(vec![false])
        );
        assert_eq!(masq(&model(&s, &env, &via(np, "eth0"), &d)), Err("DROP"));
    }
}

#[test]
fn no_detector_neither_masquerades_clusterip_nor_short_circuits_pods() {
    let s = st_with(sp(vec![remote()], vec![]), LocalTraffic::None);
    let env = Env::from_state(&s);
    let d = Dialect::IPTABLES;
    let outsider = pkt("172.16.0.9", "10.96.0.10", 80, Origin::External);
    assert_eq!(masq(&model(&s, &env, &outsider, &d)), Ok(vec![false]));
    let pod = pkt("10.244.1.5", "192.168.0.2", 30080, Origin::Pod);
    assert_eq!(masq(&model(&s, &env, &via(pod, "cbr0"), &d)), Err("DROP"));
    // An invalid interface name is no detector either (what the renderers do with it).
    let s = st_with(
        sp(vec![remote()], vec![]),
        LocalTraffic::Interface("a b".into()),
    );
    assert_eq!(masq(&model(&s, &env, &outsider, &d)), Ok(vec![false]));
}

#[test]
fn packets_show_their_ingress_interface() {
    let p = via(pkt("10.244.1.5", "10.96.0.10", 80, Origin::Pod), "cbr0");
    assert_eq!(
        p.to_string(),
        "tcp 10.244.1.5 -> 10.96.0.10:80 from pod via cbr0"
    );
    let p = via(pkt("192.168.0.2", "10.96.0.10", 80, Origin::Node), "cbr0");
    assert_eq!(p.to_string(), "tcp 192.168.0.2 -> 10.96.0.10:80 from node");
}
