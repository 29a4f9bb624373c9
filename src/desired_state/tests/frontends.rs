//! Conflicting frontends (issue #20, item 12): the older Service keeps a frontend that two
//! Services claim (`frontends`).

use std::sync::Arc;

use kproxy_contract::{IpFamily, Protocol, ServicePortKey, ServicePortName};
use serde_json::{Value, json};

use super::*;
use crate::desired_state::build;

/// A Service `ns/name` created at `created` (an RFC 3339 time; `None`: no timestamp).
fn aged(ns: &str, name: &str, created: Option<&str>, spec: Value) -> Value {
    let mut v = json!({"metadata": {"namespace": ns, "name": name}, "spec": spec});
    if let Some(t) = created {
        v["metadata"]["creationTimestamp"] = json!(t);
    }
    v
}

const OLD: Option<&str> = Some("2020-01-01T00:00:00Z");
const NEW: Option<&str> = Some("2024-01-01T00:00:00Z");

fn in_ns(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortKey {
    ServicePortKey {
        family: IpFamily::V4,
        name: ServicePortName {
            namespace: ns.into(),
            name: name.into(),
            port: port.into(),
            protocol,
        },
    }
}

#[test]
fn the_older_service_keeps_a_contested_frontend_whichever_sorts_first() {
    for (old_ns, new_ns) in [("zzz", "aaa"), ("aaa", "zzz")] {
        let services = vec![
            aged(
                old_ns,
                "kubernetes",
                OLD,
                json!({"clusterIP": "10.96.0.1",
                "ports": [{"name": "https", "port": 443}]}),
            ),
            aged(
                new_ns,
                "evil",
                NEW,
                json!({"clusterIP": "10.96.0.9",
                "externalIPs": ["203.0.113.1", "10.96.0.1"],
                "ports": [{"name": "https", "port": 443}, {"name": "http", "port": 80}]}),
            ),
        ];
        let built = build(&cache(services, vec![]), &hostile_ctx(false, None), None);
        let evil = |port| get(&built, &in_ns(new_ns, "evil", port, Protocol::Tcp));
        assert_eq!(
            evil("https").external_ips,
            vec![ip("203.0.113.1")],
            "{old_ns}"
        );
        // Only the contested port loses the address.
        assert_eq!(
            evil("http").external_ips,
            vec![ip("203.0.113.1"), ip("10.96.0.1")]
        );
        let k = get(&built, &in_ns(old_ns, "kubernetes", "https", Protocol::Tcp));
        assert_eq!(k.cluster_ip, Some(ip("10.96.0.1")));
        assert_eq!(
            reports(&built),
            vec![format!(
                "Service {new_ns}/evil: spec.externalIPs[1]: 10.96.0.1:443/TCP is already the \
                 ClusterIP of the older Service {old_ns}/kubernetes; address skipped for this port"
            )]
        );
        assert_eq!(built.frontend_conflicts(), 1);
    }
}

#[test]
fn a_lost_cluster_ip_drops_the_port_and_releases_its_frontends() {
    // `b` (younger) has `a`'s ClusterIP:80: it loses that service port, so its externalIP on
    // port 80 is free for `c` (younger still); its port 81 lives on.
    let services = vec![
        aged(
            "ns",
            "a",
            OLD,
            json!({"clusterIP": "10.96.0.1", "ports": [{"name": "p", "port": 80}]}),
        ),
        aged(
            "ns",
            "b",
            Some("2021-01-01T00:00:00Z"),
            json!({"clusterIP": "10.96.0.1",
            "externalIPs": ["203.0.113.1"],
            "ports": [{"name": "p", "port": 80}, {"name": "q", "port": 81}]}),
        ),
        aged(
            "ns",
            "c",
            NEW,
            json!({"clusterIP": "10.96.0.3", "externalIPs": ["203.0.113.1"],
            "ports": [{"name": "p", "port": 80}]}),
        ),
    ];
    let built = build(&cache(services, vec![]), &hostile_ctx(false, None), None);
    let has = |name, port| {
        built
            .state
            .services
            .contains_key(&in_ns("ns", name, port, Protocol::Tcp))
    };
    assert!(has("a", "p") && !has("b", "p") && has("b", "q") && has("c", "p"));
    assert_eq!(
        get(&built, &in_ns("ns", "c", "p", Protocol::Tcp)).external_ips,
        vec![ip("203.0.113.1")]
    );
    assert_eq!(
        reports(&built),
        vec![
            "Service ns/b: spec.clusterIP: 10.96.0.1:80/TCP is already the ClusterIP of the \
              older Service ns/a; service port skipped"
        ]
    );
}

#[test]
fn node_port_and_shared_address_conflicts() {
    let services = vec![
        aged(
            "aaa",
            "np-new",
            NEW,
            json!({"type": "NodePort", "clusterIP": "10.96.0.1",
            "ports": [{"port": 80, "nodePort": 30090}]}),
        ),
        aged(
            "zzz",
            "np-old",
            OLD,
            json!({"type": "NodePort", "clusterIP": "10.96.0.2",
            "ports": [{"port": 80, "nodePort": 30090}]}),
        ),
        // Same number, other protocol: no conflict.
        aged(
            "aaa",
            "np-udp",
            NEW,
            json!({"type": "NodePort", "clusterIP": "10.96.0.3",
            "ports": [{"port": 53, "protocol": "UDP", "nodePort": 30090}]}),
        ),
        // No creationTimestamp: younger than any Service with one, even sorting first.
        aged(
            "aaa",
            "lb-unknown",
            None,
            json!({"type": "LoadBalancer", "clusterIP": "10.96.0.4",
            "ports": [{"port": 443, "nodePort": 30091}]}),
        ),
        aged(
            "zzz",
            "lb-new",
            NEW,
            json!({"type": "LoadBalancer", "clusterIP": "10.96.0.5",
            "ports": [{"port": 443, "nodePort": 30092}]}),
        ),
    ];
    let mut objects: Vec<Value> = services;
    for (i, name) in [(3, "lb-unknown"), (4, "lb-new")] {
        objects[i]["status"] = json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}});
        assert_eq!(objects[i]["metadata"]["name"], name);
    }
    let built = build(&cache(objects, vec![]), &hostile_ctx(false, None), None);
    let g = |ns, name, proto| get(&built, &in_ns(ns, name, "", proto));
    assert_eq!(g("zzz", "np-old", Protocol::Tcp).node_port, Some(30090));
    assert_eq!(g("aaa", "np-new", Protocol::Tcp).node_port, None);
    assert_eq!(g("aaa", "np-udp", Protocol::Udp).node_port, Some(30090));
    assert_eq!(
        g("zzz", "lb-new", Protocol::Tcp).load_balancer_ips,
        vec![ip("198.51.100.7")]
    );
    assert!(
        g("aaa", "lb-unknown", Protocol::Tcp)
            .load_balancer_ips
            .is_empty()
    );
    assert!(reported(
        &built,
        "aaa/np-new",
        "spec.ports[0].nodePort",
        "NodePort 30090/TCP is already the NodePort of the older Service zzz/np-old"
    ));
    assert!(reported(
        &built,
        "aaa/lb-unknown",
        "status.loadBalancer.ingress[0].ip",
        "198.51.100.7:443/TCP is already the LoadBalancer IP of the older Service zzz/lb-new"
    ));
    assert_eq!(built.frontend_conflicts(), 2);
}

#[test]
fn resolved_ports_are_reused_across_builds() {
    let services = vec![
        aged(
            "ns",
            "a",
            OLD,
            json!({"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}),
        ),
        aged(
            "ns",
            "b",
            NEW,
            json!({"clusterIP": "10.96.0.2", "externalIPs": ["10.96.0.1"],
            "ports": [{"port": 80}]}),
        ),
    ];
    let objects = cache(services, vec![]);
    let ctx = hostile_ctx(false, None);
    let first = build(&objects, &ctx, None);
    let second = build(&objects, &ctx, Some(&first.state));
    for (k, v) in &second.state.services {
        assert!(Arc::ptr_eq(v, &first.state.services[k]), "{k:?}");
    }
}
