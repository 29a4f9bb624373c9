//! Conformance against the fake kernel, and the layout's scaling properties.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kproxy_contract::*;

use crate::fake::FakeNft;
use crate::{NftablesMode, plan};

fn spn(name: &str) -> ServicePortName {
    ServicePortName {
        namespace: "ns".into(),
        name: name.into(),
        port: "p".into(),
        protocol: Protocol::Tcp,
    }
}

fn ep(ip: &str, local: bool) -> Endpoint {
    Endpoint {
        ip: ip.parse().unwrap(),
        port: 8080,
        is_local: local,
    }
}

fn service(name: &str, cip: &str, eps: Vec<Endpoint>) -> ServicePort {
    let local = eps.iter().copied().filter(|e| e.is_local).collect();
    ServicePort {
        name: spn(name),
        family: IpFamily::of(&cip.parse().unwrap()),
        cluster_ip: Some(cip.parse().unwrap()),
        port: 80,
        node_port: None,
        external_ips: vec![],
        load_balancer_ips: vec![],
        source_ranges: vec![],
        affinity: None,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        health_check_node_port: None,
        endpoints: Endpoints {
            any: !eps.is_empty(),
            serving: eps.clone(),
            cluster: eps,
            local,
        },
    }
}

fn state(services: Vec<ServicePort>) -> ProxyState {
    let node = NodeSettings {
        node_name: "node-a".into(),
        node_ips: vec!["192.168.0.2".parse().unwrap()],
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
        masquerade_bit: 14,
        ..NodeSettings::default()
    };
    let services: BTreeMap<_, _> = services
        .into_iter()
        .map(|s| {
            (
                ServicePortKey {
                    family: s.family,
                    name: s.name.clone(),
                },
                Arc::new(s),
            )
        })
        .collect();
    ProxyState {
        node: Arc::new(node),
        services,
    }
}

fn mode() -> NftablesMode<FakeNft> {
    NftablesMode::new(FakeNft::new(), vec![IpFamily::V4, IpFamily::V6])
}

fn sync(m: &mut NftablesMode<FakeNft>, s: &ProxyState) -> crate::NftPlan {
    let live = m.read_live().unwrap();
    let desired = m.render(s);
    let plan = m.plan(&live, &desired);
    m.apply(&plan).unwrap();
    plan
}

fn many(n: usize, eps: usize) -> Vec<ServicePort> {
    (0..n)
        .map(|i| {
            let cip = std::net::Ipv4Addr::from(
                u32::from(std::net::Ipv4Addr::new(10, 96, 0, 1)) + i as u32,
            );
            let list = (0..eps)
                .map(|j| {
                    let ip = std::net::Ipv4Addr::from(
                        u32::from(std::net::Ipv4Addr::new(10, 244, 0, 1)) + (i * eps + j) as u32,
                    );
                    ep(&ip.to_string(), false)
                })
                .collect();
            service(&format!("s{i}"), &cip.to_string(), list)
        })
        .collect()
}

#[test]
fn apply_then_read_back_equals_render_and_replans_empty() {
    let mut m = mode();
    let s = state(vec![
        service(
            "a",
            "10.96.0.10",
            vec![ep("10.244.1.1", false), ep("10.244.1.2", true)],
        ),
        service("b", "10.96.0.11", vec![]),
        service("c", "fd00:96::1", vec![ep("fd00:244::1", false)]),
    ]);
    assert!(!sync(&mut m, &s).is_empty());
    let live = m.read_live().unwrap();
    assert_eq!(live, m.render(&s));
    assert!(m.plan(&live, &m.render(&s)).is_empty());
}

#[test]
fn sets_and_chains_do_not_grow_with_services() {
    let m = mode();
    let small = m.render(&state(many(10, 3)));
    let large = m.render(&state(many(2_000, 3)));
    let t_small = &small.families[&IpFamily::V4];
    let t_large = &large.families[&IpFamily::V4];
    assert_eq!(t_small.sets.len(), t_large.sets.len());
    assert_eq!(t_small.chains.len(), t_large.chains.len());
    assert_eq!(t_large.sets["endpoints"].elements.len(), 6_000);
}

#[test]
fn one_endpoint_change_is_a_handful_of_element_updates() {
    let mut m = mode();
    let mut services = many(1_000, 3);
    sync(&mut m, &state(services.clone()));
    services[500].endpoints.cluster[1] = ep("10.250.0.1", false);
    let p = sync(&mut m, &state(services.clone()));
    let fp = &p.families[&IpFamily::V4];
    assert!(fp.write_chains.is_empty() && fp.add_chains.is_empty() && fp.add_sets.is_empty());
    let changed: usize = fp.add_elements.values().map(Vec::len).sum::<usize>()
        + fp.delete_elements.values().map(Vec::len).sum::<usize>();
    // The endpoint element (delete + add) and the two hairpin elements.
    assert_eq!(changed, 4, "{}", p);
    // A fourth endpoint moves the service to pick-4.
    services[500]
        .endpoints
        .cluster
        .push(ep("10.250.0.2", false));
    let p = sync(&mut m, &state(services));
    let text = p.to_string();
    assert!(text.contains("goto pick-4"), "{text}");
}

#[test]
fn no_endpoints_reject_and_local_policy_drop() {
    let mut local_only = service("l", "10.96.0.12", vec![ep("10.244.1.9", false)]);
    local_only.internal_policy = TrafficPolicy::Local;
    let r = mode().render(&state(vec![service("b", "10.96.0.11", vec![]), local_only]));
    let t = &r.families[&IpFamily::V4];
    let no = &t.sets["no-endpoint-services"].elements;
    assert_eq!(
        no.get("10.96.0.11 . tcp . 80"),
        Some(&Some("goto reject-chain".into()))
    );
    assert_eq!(no.get("10.96.0.12 . tcp . 80"), Some(&Some("drop".into())));
    assert!(t.sets["service-ips"].elements.is_empty());
}

#[test]
fn etp_local_short_circuits_pods_and_node_to_cluster_endpoints() {
    let mut s = service(
        "e",
        "10.96.0.13",
        vec![ep("10.244.1.1", true), ep("10.244.2.1", false)],
    );
    s.node_port = Some(30080);
    s.external_policy = TrafficPolicy::Local;
    let r = mode().render(&state(vec![s]));
    let t = &r.families[&IpFamily::V4];
    assert_eq!(
        t.sets["service-nodeports"].elements.get("tcp . 30080"),
        Some(&Some("goto nodeport-pick-1".into()))
    );
    assert_eq!(
        t.sets["nodeports-short-circuit"]
            .elements
            .get("tcp . 30080"),
        Some(&Some("goto nodeport-pick-sc-2".into()))
    );
    assert!(
        t.sets["nodeport-masq-local-source"]
            .elements
            .contains_key("tcp . 30080")
    );
    assert!(!t.sets["nodeport-masq"].elements.contains_key("tcp . 30080"));
    assert_eq!(t.sets["nodeport-endpoints"].elements.len(), 3);
}

#[test]
fn affinity_uses_per_endpoint_timeout_sets() {
    let mut s = service(
        "a",
        "10.96.0.14",
        vec![ep("10.244.1.1", false), ep("10.244.1.2", false)],
    );
    s.affinity = Some(SessionAffinity {
        timeout: Duration::from_secs(600),
    });
    let mut m = mode();
    let st = state(vec![s]);
    sync(&mut m, &st);
    let t = m.kernel().table(IpFamily::V4).unwrap();
    let aff: Vec<_> = t
        .sets
        .keys()
        .filter(|k| k.starts_with("affinity-"))
        .collect();
    assert_eq!(aff.len(), 2);
    assert!(t.sets[aff[0].as_str()].signature.contains("timeout 600"));
    // Removing the service removes its chains and sets too.
    sync(&mut m, &state(vec![]));
    let t = m.kernel().table(IpFamily::V4).unwrap();
    assert!(!t.sets.keys().any(|k| k.starts_with("affinity-")));
    assert!(
        !t.chains
            .keys()
            .any(|k| k.starts_with("affinity-") || k.starts_with("endpoint-"))
    );
}

#[test]
fn firewall_elements_for_source_ranges() {
    let mut s = service("lb", "10.96.0.15", vec![ep("10.244.1.1", false)]);
    s.load_balancer_ips = vec!["198.51.100.7".parse().unwrap()];
    s.source_ranges = vec![
        "203.0.113.0/24".parse().unwrap(),
        "192.168.0.0/24".parse().unwrap(),
    ];
    let r = mode().render(&state(vec![s]));
    let t = &r.families[&IpFamily::V4];
    let allow = &t.sets["firewall-allow"].elements;
    assert!(allow.contains_key("198.51.100.7 . tcp . 80 . 203.0.113.0/24"));
    // The node (192.168.0.2) is inside a range: the LB IP itself is an allowed source.
    assert!(allow.contains_key("198.51.100.7 . tcp . 80 . 198.51.100.7"));
    assert!(
        t.sets["firewall-ips"]
            .elements
            .contains_key("198.51.100.7 . tcp . 80")
    );
}

#[test]
fn cleanup_deletes_only_our_tables_and_failed_apply_changes_nothing() {
    let mut m = mode();
    sync(&mut m, &state(many(5, 2)));
    let before = m.read_live().unwrap();
    m.kernel.fail_next = Some("busy".into());
    let p = m.plan(&before, &m.render(&state(many(6, 2))));
    assert!(m.apply(&p).is_err());
    assert_eq!(m.read_live().unwrap(), before);
    m.cleanup().unwrap();
    assert!(m.kernel().table(IpFamily::V4).is_none());
    assert!(m.kernel().table(IpFamily::V6).is_none());
}

#[test]
fn script_is_one_transaction_in_dependency_order() {
    let s = state(vec![service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false)],
    )]);
    let m = mode();
    let p = plan::plan(&crate::NftRuleset::default(), &m.render(&s));
    let text = p.script();
    let pos = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("{needle} missing:\n{text}"))
    };
    assert!(pos("add table ip kproxy") < pos("add map ip kproxy service-ips"));
    assert!(pos("add chain ip kproxy pick-1") < pos("add element ip kproxy service-ips"));
    assert!(pos("add map ip kproxy endpoints") < pos("add rule ip kproxy pick-1"));
    assert!(text.contains("# ns/a:p"), "{text}");
}
