//! Table-driven tests for every rule, plus property tests over arbitrary input.

#![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]
#![allow(
    clippy::type_complexity,
    reason = "table-driven tests spell each row's shape inline"
)]

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_contract::{
    Endpoint, IpFamily, NodeSettings, Protocol, ProxyState, ServicePort, ServicePortKey,
    ServicePortName, SessionAffinity, TrafficPolicy,
};
use serde_json::{Value, json};

use super::*;
use crate::cache::ClusterCache;
use crate::source::{Change, Update};

const NODE: &str = "node-a";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A Service in `default` with this spec (and optional status).
fn svc(name: &str, spec: Value) -> Value {
    json!({"metadata": {"namespace": "default", "name": name}, "spec": spec})
}

fn with_status(mut svc: Value, status: Value) -> Value {
    svc["status"] = status;
    svc
}

/// A ClusterIP Service with one unnamed TCP port 80 and this ClusterIP.
fn simple_svc(name: &str, cluster_ip: &str) -> Value {
    svc(
        name,
        json!({"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": [{"port": 80}]}),
    )
}

/// An EndpointSlice of Service `service` with ports and endpoints.
fn slice(name: &str, service: &str, address_type: &str, ports: Value, endpoints: Value) -> Value {
    json!({
        "metadata": {"namespace": "default", "name": name,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type,
        "ports": ports,
        "endpoints": endpoints,
    })
}

/// An endpoint; `None` conditions are left out of the object.
fn ep(
    addr: &str,
    node: Option<&str>,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
) -> Value {
    let mut cond = serde_json::Map::new();
    for (k, v) in [
        ("ready", ready),
        ("serving", serving),
        ("terminating", terminating),
    ] {
        if let Some(v) = v {
            cond.insert(k.to_owned(), json!(v));
        }
    }
    let mut e = json!({"addresses": [addr], "conditions": cond});
    if let Some(node) = node {
        e["nodeName"] = json!(node);
    }
    e
}

fn ready(addr: &str, node: &str) -> Value {
    ep(addr, Some(node), Some(true), Some(true), Some(false))
}

fn terminating(addr: &str, node: &str, serving: bool) -> Value {
    ep(addr, Some(node), Some(false), Some(serving), Some(true))
}

/// A cache of these objects as the sources keep them (slimmed).
fn cache(services: Vec<Value>, slices: Vec<Value>) -> ClusterCache {
    cache_of(services, slices, crate::source::slim::service)
}

fn cache_of(
    services: Vec<Value>,
    slices: Vec<Value>,
    keep_service: fn(Service) -> Service,
) -> ClusterCache {
    let mut cache = ClusterCache::default();
    let services: Vec<Service> = services
        .into_iter()
        .map(|v| keep_service(serde_json::from_value(v).unwrap()))
        .collect();
    let slices: Vec<EndpointSlice> = slices
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    cache.apply(Update::Services(Change::Reset(services).shared()));
    cache.apply(Update::EndpointSlices(
        Change::Reset(slices)
            .map(crate::source::slim::slice)
            .shared(),
    ));
    cache
}

/// Adds what the API server sends and `source::slim` drops: managed fields, annotations, a
/// Service's conditions (and each endpoint's `targetRef`, `hostname` and deprecated topology,
/// which a `Slice` has no room for).
fn with_unread_fields(mut object: Value) -> Value {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "managedFields".into(),
            json!([{"manager": "kube-controller-manager", "operation": "Update"}]),
        );
        let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
        annotations["kubectl.kubernetes.io/last-applied-configuration"] = json!("{}");
    }
    if object.get("spec").is_some() {
        object["status"]["conditions"] = json!([{"type": "x", "status": "True",
            "lastTransitionTime": "2026-01-01T00:00:00Z", "reason": "r", "message": "m"}]);
    }
    if let Some(endpoints) = object.get_mut("endpoints").and_then(Value::as_array_mut) {
        for (i, e) in endpoints.iter_mut().enumerate() {
            e["targetRef"] = json!({"kind": "Pod", "namespace": "ns", "name": format!("pod-{i}")});
            e["hostname"] = json!(format!("host-{i}"));
            e["deprecatedTopology"] = json!({"kubernetes.io/hostname": "elsewhere"});
        }
    }
    object
}

/// Builds the state of these objects, and holds `source::slim` to dropping only unread fields:
/// the same objects with every dropped field filled in, kept whole, build the same state.
fn run(services: Vec<Value>, slices: Vec<Value>) -> Built {
    let built = build(&cache(services.clone(), slices.clone()), &ctx(None), None);
    let whole = cache_of(
        services.into_iter().map(with_unread_fields).collect(),
        slices.into_iter().map(with_unread_fields).collect(),
        std::convert::identity,
    );
    let from_whole = build(&whole, &ctx(None), None);
    assert_eq!(
        format!("{:?}", (&from_whole.state, &from_whole.skipped)),
        format!("{:?}", (&built.state, &built.skipped)),
        "a field source::slim drops changed the desired state"
    );
    built
}

fn ctx(zone: Option<&str>) -> BuildContext {
    BuildContext {
        node: Arc::new(NodeSettings {
            node_name: NODE.to_owned(),
            ..NodeSettings::default()
        }),
        node_zone: zone.map(str::to_owned),
        node_labels_known: true,
        admission: Arc::default(),
    }
}

fn key(family: IpFamily, name: &str, port: &str, protocol: Protocol) -> ServicePortKey {
    ServicePortKey {
        family,
        name: ServicePortName {
            namespace: "default".to_owned(),
            name: name.to_owned(),
            port: port.to_owned(),
            protocol,
        },
    }
}

fn v4(name: &str) -> ServicePortKey {
    key(IpFamily::V4, name, "", Protocol::Tcp)
}

fn get<'a>(built: &'a Built, k: &ServicePortKey) -> &'a ServicePort {
    built
        .state
        .services
        .get(k)
        .unwrap_or_else(|| panic!("no {k:?} in {:?}", built.state.services.keys()))
}

fn fields(built: &Built) -> Vec<String> {
    built
        .skipped
        .iter()
        .map(|s| format!("{} {}", s.kind, s.field))
        .collect()
}

fn eps(list: &[Endpoint]) -> Vec<String> {
    list.iter()
        .map(|e| {
            format!(
                "{}:{}{}",
                e.ip,
                e.port,
                if e.is_local { " local" } else { "" }
            )
        })
        .collect()
}

// ----- Services (docs/semantics.md, rules 1, 27, 28) -----

#[test]
fn which_services_are_programmed() {
    let cases: Vec<(&str, Value, usize, Vec<&str>)> = vec![
        ("plain", simple_svc("s", "10.0.0.1"), 1, vec![]),
        (
            "external name",
            svc(
                "s",
                json!({"type": "ExternalName", "externalName": "example.com", "ports": [{"port": 80}]}),
            ),
            0,
            vec![],
        ),
        (
            "headless",
            svc("s", json!({"clusterIP": "None", "ports": [{"port": 80}]})),
            0,
            vec![],
        ),
        (
            "headless clusterIPs",
            svc(
                "s",
                json!({"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 80}]}),
            ),
            0,
            vec![],
        ),
        (
            "no cluster ip",
            svc("s", json!({"ports": [{"port": 80}]})),
            0,
            vec!["Service spec.clusterIP"],
        ),
        (
            "no spec",
            json!({"metadata": {"namespace": "default", "name": "s"}}),
            0,
            vec!["Service spec"],
        ),
        (
            "name that is not a DNS label",
            svc(
                "odd\";name",
                json!({"clusterIP": "10.0.0.1", "ports": [{"port": 80}]}),
            ),
            0,
            vec!["Service metadata.name"],
        ),
        (
            "name longer than 63",
            svc(
                &"a".repeat(64),
                json!({"clusterIP": "10.0.0.1", "ports": [{"port": 80}]}),
            ),
            0,
            vec!["Service metadata.name"],
        ),
        (
            "name of 63 is fine",
            svc(
                &"a".repeat(63),
                json!({"clusterIP": "10.0.0.1", "ports": [{"port": 80}]}),
            ),
            1,
            vec![],
        ),
        (
            "namespace that is not a DNS label",
            json!({"metadata": {"namespace": "Bad NS", "name": "s"},
                   "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80}]}}),
            0,
            vec!["Service metadata.namespace"],
        ),
        (
            "bad port name and duplicate port number",
            svc(
                "s",
                json!({"clusterIP": "10.0.0.1", "ports": [
                    {"name": "a", "port": 80}, {"name": "b", "port": 80},
                    {"name": "c;\"", "port": 81}, {"name": "d", "port": 82}]}),
            ),
            2,
            vec!["Service spec.ports[1].port", "Service spec.ports[2].name"],
        ),
        (
            "no ports",
            svc("s", json!({"clusterIP": "10.0.0.1"})),
            0,
            vec![],
        ),
        (
            "other proxy",
            json!({"metadata": {"namespace": "default", "name": "s",
                                "labels": {"service.kubernetes.io/service-proxy-name": "x"}},
                   "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80}]}}),
            0,
            vec![],
        ),
        (
            "unknown type is ClusterIP",
            svc(
                "s",
                json!({"type": "Nodeport", "clusterIP": "10.0.0.1", "ports": [{"port": 80, "nodePort": 30000}]}),
            ),
            1,
            vec!["Service spec.type"],
        ),
    ];
    for (name, service, want, want_skipped) in cases {
        let built = run(vec![service], vec![]);
        assert_eq!(built.state.services.len(), want, "{name}");
        assert_eq!(fields(&built), want_skipped, "{name}");
        if let Some(sp) = built.state.services.values().next() {
            assert_eq!(sp.node_port, None, "{name}");
        }
    }
}

#[test]
fn one_service_port_per_family_and_port() {
    let dual = svc(
        "dual",
        json!({"clusterIP": "10.0.0.1", "clusterIPs": ["10.0.0.1", "fd00::1"],
               "ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}),
    );
    let v6_only = svc(
        "v6",
        json!({"clusterIP": "fd00::2", "clusterIPs": ["fd00::2"], "ports": [{"port": 80}]}),
    );
    let legacy = svc(
        "legacy",
        json!({"clusterIP": "10.0.0.3", "ports": [{"port": 80}]}),
    );
    let built = run(vec![dual, v6_only, legacy], vec![]);
    let keys: Vec<_> = built.state.services.keys().cloned().collect();
    assert_eq!(
        keys,
        vec![
            key(IpFamily::V4, "dual", "dns", Protocol::Udp),
            key(IpFamily::V4, "dual", "http", Protocol::Tcp),
            v4("legacy"),
            key(IpFamily::V6, "dual", "dns", Protocol::Udp),
            key(IpFamily::V6, "dual", "http", Protocol::Tcp),
            key(IpFamily::V6, "v6", "", Protocol::Tcp),
        ]
    );
    let sp = get(&built, &key(IpFamily::V6, "dual", "http", Protocol::Tcp));
    assert_eq!(sp.cluster_ip, Some(ip("fd00::1")));
    assert_eq!(sp.family, IpFamily::V6);
    assert_eq!(sp.port, 80);
    assert_eq!(get(&built, &v4("legacy")).cluster_ip, Some(ip("10.0.0.3")));
    assert!(built.skipped.is_empty());
}

#[test]
fn bad_cluster_ip_skips_only_that_family() {
    let cases: Vec<(&str, Value, Vec<IpFamily>, Vec<&str>)> = vec![
        (
            "second bad",
            json!(["10.0.0.1", "fd00::zz"]),
            vec![IpFamily::V4],
            vec!["Service spec.clusterIPs[1]"],
        ),
        (
            "first bad",
            json!(["bogus", "fd00::1"]),
            vec![IpFamily::V6],
            vec!["Service spec.clusterIPs[0]"],
        ),
        (
            "both bad",
            json!(["bogus", "x"]),
            vec![],
            vec!["Service spec.clusterIPs[0]", "Service spec.clusterIPs[1]"],
        ),
        (
            "same family twice",
            json!(["10.0.0.1", "10.0.0.2"]),
            vec![IpFamily::V4],
            vec!["Service spec.clusterIPs[1]"],
        ),
        (
            "leading zeros",
            json!(["010.000.000.001"]),
            vec![IpFamily::V4],
            vec![],
        ),
    ];
    for (name, ips, families, skipped) in cases {
        let built = run(
            vec![svc(
                "s",
                json!({"clusterIPs": ips, "ports": [{"port": 80}]}),
            )],
            vec![],
        );
        let got: Vec<_> = built.state.services.keys().map(|k| k.family).collect();
        assert_eq!(got, families, "{name}");
        assert_eq!(fields(&built), skipped, "{name}");
    }
    let built = run(
        vec![svc(
            "s",
            json!({"clusterIP": "010.0.0.1", "ports": [{"port": 80}]}),
        )],
        vec![],
    );
    assert_eq!(get(&built, &v4("s")).cluster_ip, Some(ip("10.0.0.1")));
}

#[test]
fn port_validation() {
    // (ports, expected (name, protocol, port, nodePort) list, expected skipped fields)
    type Want = Vec<(&'static str, Protocol, u16, Option<u16>)>;
    let cases: Vec<(&str, Value, Want, Vec<&str>)> = vec![
        (
            "default protocol",
            json!([{"port": 80}]),
            vec![("", Protocol::Tcp, 80, Some(30080))],
            vec![],
        ),
        (
            "zero port",
            json!([{"name": "a", "port": 0}, {"name": "b", "port": 81}]),
            vec![("b", Protocol::Tcp, 81, None)],
            vec!["Service spec.ports[0].port"],
        ),
        (
            "too big",
            json!([{"port": 65536}]),
            vec![],
            vec!["Service spec.ports[0].port"],
        ),
        (
            "negative",
            json!([{"port": -5}]),
            vec![],
            vec!["Service spec.ports[0].port"],
        ),
        (
            "unknown protocol",
            json!([{"port": 80, "protocol": "ICMP"}]),
            vec![],
            vec!["Service spec.ports[0].protocol"],
        ),
        (
            "sctp",
            json!([{"port": 80, "protocol": "SCTP"}]),
            vec![("", Protocol::Sctp, 80, None)],
            vec![],
        ),
        (
            "duplicate",
            json!([{"name": "a", "port": 80}, {"name": "a", "port": 81}]),
            vec![("a", Protocol::Tcp, 80, None)],
            vec!["Service spec.ports[1]"],
        ),
        (
            "same name other protocol",
            json!([{"name": "a", "port": 53}, {"name": "a", "port": 53, "protocol": "UDP"}]),
            vec![
                ("a", Protocol::Tcp, 53, None),
                ("a", Protocol::Udp, 53, None),
            ],
            vec![],
        ),
        (
            "bad node port",
            json!([{"port": 80, "nodePort": 70000}]),
            vec![("", Protocol::Tcp, 80, None)],
            vec!["Service spec.ports[0].nodePort"],
        ),
        (
            "zero node port",
            json!([{"port": 80, "nodePort": 0}]),
            vec![("", Protocol::Tcp, 80, None)],
            vec![],
        ),
    ];
    for (name, ports, want, skipped) in cases {
        // NodePort type so nodePort is read; "default protocol" gets an explicit nodePort.
        let mut ports = ports;
        if name == "default protocol" {
            ports[0]["nodePort"] = json!(30080);
        }
        let built = run(
            vec![svc(
                "s",
                json!({"type": "NodePort", "clusterIP": "10.0.0.1", "ports": ports}),
            )],
            vec![],
        );
        let mut got: Vec<_> = built
            .state
            .services
            .values()
            .map(|sp| {
                (
                    sp.name.port.as_str(),
                    sp.name.protocol,
                    sp.port,
                    sp.node_port,
                )
            })
            .collect();
        got.sort();
        assert_eq!(got, want, "{name}");
        assert_eq!(fields(&built), skipped, "{name}");
    }
}

#[test]
fn node_port_only_for_node_port_and_load_balancer() {
    for (ty, want) in [
        ("ClusterIP", None),
        ("NodePort", Some(30080)),
        ("LoadBalancer", Some(30080)),
    ] {
        let built = run(
            vec![svc(
                "s",
                json!({"type": ty, "clusterIP": "10.0.0.1", "ports": [{"port": 80, "nodePort": 30080}]}),
            )],
            vec![],
        );
        assert_eq!(get(&built, &v4("s")).node_port, want, "{ty}");
    }
}

#[test]
fn external_and_load_balancer_ips_per_family() {
    let service = with_status(
        svc(
            "s",
            json!({"type": "LoadBalancer", "clusterIPs": ["10.0.0.1", "fd00::1"],
                   "externalIPs": ["1.1.1.1", "bogus", "2001:db8::1", "1.1.1.1"],
                   "ports": [{"port": 80, "nodePort": 30080}]}),
        ),
        json!({"loadBalancer": {"ingress": [
            {"ip": "5.5.5.5"},
            {"ip": "6.6.6.6", "ipMode": "Proxy"},
            {"ip": "7.7.7.7", "ipMode": "VIP"},
            {"hostname": "lb.example.com"},
            {"ip": "2001:db8::5"},
            {"ip": "nope"},
            {"ip": "8.8.8.8", "ipMode": "Weird"},
        ]}}),
    );
    let built = run(vec![service], vec![]);
    let sp4 = get(&built, &v4("s"));
    assert_eq!(sp4.external_ips, vec![ip("1.1.1.1")]);
    assert_eq!(sp4.load_balancer_ips, vec![ip("5.5.5.5"), ip("7.7.7.7")]);
    let sp6 = get(&built, &key(IpFamily::V6, "s", "", Protocol::Tcp));
    assert_eq!(sp6.external_ips, vec![ip("2001:db8::1")]);
    assert_eq!(sp6.load_balancer_ips, vec![ip("2001:db8::5")]);
    assert_eq!(
        fields(&built),
        vec![
            "Service spec.externalIPs[1]",
            "Service status.loadBalancer.ingress[5].ip",
            "Service status.loadBalancer.ingress[6].ipMode",
        ]
    );
}

#[test]
fn source_ranges_trimmed_validated_and_split() {
    let built = run(
        vec![svc(
            "s",
            json!({"type": "LoadBalancer", "clusterIPs": ["10.0.0.1", "fd00::1"],
                   "loadBalancerSourceRanges": [" 10.1.2.3/8 ", "fd00::/64", "bogus", "1.2.3.4/40"],
                   "ports": [{"port": 80}]}),
        )],
        vec![],
    );
    assert_eq!(
        get(&built, &v4("s")).source_ranges,
        vec!["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]
    );
    assert_eq!(
        get(&built, &key(IpFamily::V6, "s", "", Protocol::Tcp)).source_ranges,
        vec!["fd00::/64".parse::<ipnet::IpNet>().unwrap()]
    );
    assert_eq!(
        fields(&built),
        vec![
            "Service spec.loadBalancerSourceRanges[2]",
            "Service spec.loadBalancerSourceRanges[3]"
        ]
    );
}

#[test]
fn session_affinity() {
    let secs = |s: u64| {
        Some(SessionAffinity {
            timeout: Duration::from_secs(s),
        })
    };
    let cases: Vec<(&str, Value, Option<SessionAffinity>, Vec<&str>)> = vec![
        ("unset", json!({}), None, vec![]),
        ("None", json!({"sessionAffinity": "None"}), None, vec![]),
        (
            "ClientIP default",
            json!({"sessionAffinity": "ClientIP"}),
            secs(10_800),
            vec![],
        ),
        (
            "ClientIP 60",
            json!({"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
            secs(60),
            vec![],
        ),
        (
            "ClientIP max",
            json!({"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86400}}}),
            secs(86_400),
            vec![],
        ),
        (
            "ClientIP 0",
            json!({"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}),
            secs(10_800),
            vec!["Service spec.sessionAffinityConfig.clientIP.timeoutSeconds"],
        ),
        (
            "ClientIP too long",
            json!({"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}}}),
            secs(10_800),
            vec!["Service spec.sessionAffinityConfig.clientIP.timeoutSeconds"],
        ),
        (
            "unknown",
            json!({"sessionAffinity": "Cookie"}),
            None,
            vec!["Service spec.sessionAffinity"],
        ),
    ];
    for (name, extra, want, skipped) in cases {
        let mut spec = json!({"clusterIP": "10.0.0.1", "ports": [{"port": 80}]});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        let built = run(vec![svc("s", spec)], vec![]);
        assert_eq!(get(&built, &v4("s")).affinity, want, "{name}");
        assert_eq!(fields(&built), skipped, "{name}");
    }
}

/// One row of `traffic_policies_and_health_check_port`.
struct PolicyCase {
    ty: &'static str,
    etp: Option<&'static str>,
    itp: Option<&'static str>,
    external_ips: bool,
    hc: Option<i32>,
    want: (TrafficPolicy, TrafficPolicy, Option<u16>),
}

const fn pc(
    ty: &'static str,
    etp: Option<&'static str>,
    itp: Option<&'static str>,
    external_ips: bool,
    hc: Option<i32>,
    want: (TrafficPolicy, TrafficPolicy, Option<u16>),
) -> PolicyCase {
    PolicyCase {
        ty,
        etp,
        itp,
        external_ips,
        hc,
        want,
    }
}

#[test]
fn traffic_policies_and_health_check_port() {
    use TrafficPolicy::{Cluster, Local};
    // want = (external policy, internal policy, health-check NodePort)
    let cases = [
        pc(
            "ClusterIP",
            Some("Local"),
            None,
            false,
            None,
            (Cluster, Cluster, None),
        ),
        pc(
            "ClusterIP",
            Some("Local"),
            None,
            true,
            None,
            (Local, Cluster, None),
        ),
        pc(
            "NodePort",
            Some("Local"),
            None,
            false,
            Some(32000),
            (Local, Cluster, None),
        ),
        pc(
            "LoadBalancer",
            Some("Local"),
            None,
            false,
            Some(32000),
            (Local, Cluster, Some(32000)),
        ),
        pc(
            "LoadBalancer",
            Some("Local"),
            None,
            false,
            None,
            (Local, Cluster, None),
        ),
        pc(
            "LoadBalancer",
            Some("Cluster"),
            None,
            false,
            Some(32000),
            (Cluster, Cluster, None),
        ),
        pc(
            "LoadBalancer",
            None,
            Some("Local"),
            false,
            None,
            (Cluster, Local, None),
        ),
        pc(
            "ClusterIP",
            None,
            Some("Local"),
            false,
            None,
            (Cluster, Local, None),
        ),
        pc(
            "ClusterIP",
            None,
            Some("Bogus"),
            false,
            None,
            (Cluster, Cluster, None),
        ),
    ];
    for PolicyCase {
        ty,
        etp,
        itp,
        external_ips: ext,
        hc,
        want,
    } in cases
    {
        let (want_e, want_i, want_hc) = want;
        let mut spec = json!({"type": ty, "clusterIP": "10.0.0.1", "ports": [{"port": 80}]});
        if let Some(etp) = etp {
            spec["externalTrafficPolicy"] = json!(etp);
        }
        if let Some(itp) = itp {
            spec["internalTrafficPolicy"] = json!(itp);
        }
        if ext {
            spec["externalIPs"] = json!(["1.1.1.1"]);
        }
        if let Some(hc) = hc {
            spec["healthCheckNodePort"] = json!(hc);
        }
        let built = run(vec![svc("s", spec)], vec![]);
        let sp = get(&built, &v4("s"));
        let case = format!("{ty} etp={etp:?} itp={itp:?} ext={ext}");
        assert_eq!(sp.external_policy, want_e, "{case}");
        assert_eq!(sp.internal_policy, want_i, "{case}");
        assert_eq!(sp.health_check_node_port, want_hc, "{case}");
    }
    let built = run(
        vec![svc(
            "s",
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                             "healthCheckNodePort": 99999, "clusterIP": "10.0.0.1", "ports": [{"port": 80}]}),
        )],
        vec![],
    );
    assert_eq!(get(&built, &v4("s")).health_check_node_port, None);
    assert_eq!(fields(&built), vec!["Service spec.healthCheckNodePort"]);
}

// ----- Endpoints (docs/semantics.md, rules 1-4, 17) -----

#[test]
fn endpoint_conditions() {
    // (ready, serving, terminating) -> in cluster list when alone, in fallback
    let cases: Vec<(Option<bool>, Option<bool>, Option<bool>, bool)> = vec![
        (None, None, None, true), // nil ready = ready
        (Some(true), None, None, true),
        (Some(false), None, None, false), // not ready, not terminating: unused
        (Some(false), Some(true), Some(true), true), // serving-terminating fallback
        (Some(false), None, Some(true), true), // nil serving = true (API default)
        (Some(false), Some(false), Some(true), false), // non-serving terminating: never
        (Some(true), Some(false), None, false), // inconsistent ready && !serving: not trusted
        (None, None, Some(true), true),   // ready && terminating: treated as terminating
    ];
    for (r, s, t, want) in cases {
        let built = run(
            vec![simple_svc("s", "10.0.0.1")],
            vec![slice(
                "s-1",
                "s",
                "IPv4",
                json!([{"name": "", "port": 8080}]),
                json!([ep("10.1.0.1", Some(NODE), r, s, t)]),
            )],
        );
        let sp = get(&built, &v4("s"));
        let case = format!("ready={r:?} serving={s:?} terminating={t:?}");
        assert_eq!(!sp.endpoints.cluster.is_empty(), want, "{case}");
        assert_eq!(!sp.endpoints.local.is_empty(), want, "{case}");
        assert_eq!(sp.endpoints.any, want, "{case}");
    }
}

#[test]
fn cluster_and_local_lists() {
    // (endpoints, cluster, local, any)
    let cases: Vec<(&str, Value, Vec<&str>, Vec<&str>, bool)> = vec![
        ("no slices", json!([]), vec![], vec![], false),
        (
            "ready everywhere",
            json!([ready("10.1.0.2", "node-b"), ready("10.1.0.1", NODE)]),
            vec!["10.1.0.1:8080 local", "10.1.0.2:8080"],
            vec!["10.1.0.1:8080 local"],
            true,
        ),
        (
            "ready remote, local only terminating",
            json!([
                ready("10.1.0.2", "node-b"),
                terminating("10.1.0.1", NODE, true)
            ]),
            vec!["10.1.0.2:8080"],
            vec!["10.1.0.1:8080 local"],
            true,
        ),
        (
            "no ready anywhere: serving-terminating",
            json!([
                terminating("10.1.0.2", "node-b", true),
                terminating("10.1.0.3", "node-b", false),
                ep(
                    "10.1.0.4",
                    Some("node-b"),
                    Some(false),
                    Some(false),
                    Some(false)
                )
            ]),
            vec!["10.1.0.2:8080"],
            vec![],
            true,
        ),
        (
            "local ready hides local terminating",
            json!([ready("10.1.0.1", NODE), terminating("10.1.0.5", NODE, true)]),
            vec!["10.1.0.1:8080 local"],
            vec!["10.1.0.1:8080 local"],
            true,
        ),
        (
            "only non-serving terminating",
            json!([terminating("10.1.0.1", NODE, false)]),
            vec![],
            vec![],
            false,
        ),
        (
            "no node name is remote",
            json!([ep("10.1.0.1", None, None, None, None)]),
            vec!["10.1.0.1:8080"],
            vec![],
            true,
        ),
    ];
    for (name, endpoints, cluster, local, any) in cases {
        let built = run(
            vec![simple_svc("s", "10.0.0.1")],
            vec![slice(
                "s-1",
                "s",
                "IPv4",
                json!([{"name": "", "port": 8080}]),
                endpoints,
            )],
        );
        let e = &get(&built, &v4("s")).endpoints;
        assert_eq!(eps(&e.cluster), cluster, "{name}");
        assert_eq!(eps(&e.local), local, "{name}");
        assert_eq!(e.any, any, "{name}");
    }
}

#[test]
fn local_needs_a_node_name() {
    let mut ctx = ctx(None);
    ctx.node = Arc::new(NodeSettings::default());
    let c = cache(
        vec![simple_svc("s", "10.0.0.1")],
        vec![slice(
            "s-1",
            "s",
            "IPv4",
            json!([{"port": 80}]),
            json!([ep("10.1.0.1", Some(""), None, None, None)]),
        )],
    );
    let built = build(&c, &ctx, None);
    let e = &get(&built, &v4("s")).endpoints;
    assert_eq!(eps(&e.cluster), vec!["10.1.0.1:80"]);
    assert!(e.local.is_empty());
}

#[test]
fn endpoints_match_port_name_and_protocol() {
    let service = svc(
        "s",
        json!({"clusterIP": "10.0.0.1", "ports": [
            {"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}),
    );
    let slices = vec![
        slice(
            "s-1",
            "s",
            "IPv4",
            json!([{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "TCP"}]),
            json!([ready("10.1.0.1", "node-b")]),
        ),
        slice(
            "s-2",
            "s",
            "IPv4",
            json!([{"name": "dns", "port": 5353, "protocol": "UDP"}, {"name": "other", "port": 9}]),
            json!([ready("10.1.0.2", "node-b")]),
        ),
        // The same port name on another number (a rollout): both numbers are endpoints.
        slice(
            "s-3",
            "s",
            "IPv4",
            json!([{"name": "http", "port": 8081}]),
            json!([ready("10.1.0.1", "node-b")]),
        ),
    ];
    let built = run(vec![service], slices);
    let http = get(&built, &key(IpFamily::V4, "s", "http", Protocol::Tcp));
    assert_eq!(
        eps(&http.endpoints.cluster),
        vec!["10.1.0.1:8080", "10.1.0.1:8081"]
    );
    let dns = get(&built, &key(IpFamily::V4, "s", "dns", Protocol::Udp));
    assert_eq!(eps(&dns.endpoints.cluster), vec!["10.1.0.2:5353"]);

    // Unnamed service port: a slice port with no name matches it.
    let built = run(
        vec![simple_svc("u", "10.0.0.2")],
        vec![slice(
            "u-1",
            "u",
            "IPv4",
            json!([{"port": 8080}]),
            json!([ready("10.1.0.3", "node-b")]),
        )],
    );
    assert_eq!(
        eps(&get(&built, &v4("u")).endpoints.cluster),
        vec!["10.1.0.3:8080"]
    );
}

#[test]
fn endpoints_filtered_by_family_and_validated() {
    let service = svc(
        "s",
        json!({"clusterIPs": ["10.0.0.1", "fd00::1"], "ports": [{"port": 80}]}),
    );
    let slices = vec![
        slice(
            "s-v4",
            "s",
            "IPv4",
            json!([{"port": 8080}]),
            json!([
                ready("10.1.0.1", "node-b"),
                ready("fd00::9", "node-b"),
                ready("not-an-ip", "node-b"),
                {"addresses": []},
                ready("010.1.0.2", "node-b"),
            ]),
        ),
        slice(
            "s-v6",
            "s",
            "IPv6",
            json!([{"port": 8080}]),
            json!([
                ready("fd01::1", "node-b"),
                ready("::ffff:10.9.9.9", "node-b")
            ]),
        ),
        slice(
            "s-fqdn",
            "s",
            "FQDN",
            json!([{"port": 8080}]),
            json!([ready("example.com", "node-b")]),
        ),
        slice("s-weird", "s", "IPv7", json!([{"port": 8080}]), json!([])),
        slice(
            "s-ports",
            "s",
            "IPv4",
            json!([{"port": 0}, {"port": 70000}, {"name": "x"}, {"port": 1, "protocol": "ICMP"}]),
            json!([]),
        ),
    ];
    let built = run(vec![service], slices);
    assert_eq!(
        eps(&get(&built, &v4("s")).endpoints.cluster),
        vec!["10.1.0.1:8080", "10.1.0.2:8080"]
    );
    let v6 = get(&built, &key(IpFamily::V6, "s", "", Protocol::Tcp));
    assert_eq!(eps(&v6.endpoints.cluster), vec!["fd01::1:8080"]);
    let mut got: Vec<String> = built
        .skipped
        .iter()
        .map(|s| format!("{} {}", s.object.name, s.field))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            "s-ports ports[0].port",
            "s-ports ports[1].port",
            "s-ports ports[2].port",
            "s-ports ports[3].protocol",
            "s-v4 endpoints[1].addresses[0]",
            "s-v4 endpoints[2].addresses[0]",
            "s-v4 endpoints[3].addresses",
            "s-v6 endpoints[1].addresses[0]",
            "s-weird addressType",
        ]
    );
    assert!(built.skipped.iter().all(|s| s.kind == "EndpointSlice"));
}

#[test]
fn duplicate_endpoints_across_slices() {
    let cases: Vec<(&str, Value, Value, Vec<&str>, Vec<&str>)> = vec![
        (
            "terminating then ready",
            json!([terminating("10.1.0.1", "node-b", true)]),
            json!([ready("10.1.0.1", "node-b")]),
            vec!["10.1.0.1:80"],
            vec![],
        ),
        (
            "ready then terminating",
            json!([ready("10.1.0.1", "node-b")]),
            json!([terminating("10.1.0.1", "node-b", true)]),
            vec!["10.1.0.1:80"],
            vec![],
        ),
        (
            "not ready then ready",
            json!([ep("10.1.0.1", Some(NODE), Some(false), Some(false), None)]),
            json!([ready("10.1.0.1", NODE)]),
            vec!["10.1.0.1:80 local"],
            vec!["10.1.0.1:80 local"],
        ),
        (
            "remote then local",
            json!([ready("10.1.0.1", "node-b")]),
            json!([ready("10.1.0.1", NODE)]),
            vec!["10.1.0.1:80 local"],
            vec!["10.1.0.1:80 local"],
        ),
    ];
    for (name, a, b, cluster, local) in cases {
        for (first, second) in [(&a, &b), (&b, &a)] {
            let built = run(
                vec![simple_svc("s", "10.0.0.1")],
                vec![
                    slice("s-1", "s", "IPv4", json!([{"port": 80}]), first.clone()),
                    slice("s-2", "s", "IPv4", json!([{"port": 80}]), second.clone()),
                ],
            );
            let e = &get(&built, &v4("s")).endpoints;
            assert_eq!(eps(&e.cluster), cluster, "{name}");
            assert_eq!(eps(&e.local), local, "{name}");
        }
    }
}

#[test]
fn ignored_slices() {
    let mut headless = slice(
        "s-1",
        "s",
        "IPv4",
        json!([{"port": 80}]),
        json!([ready("10.1.0.1", "node-b")]),
    );
    headless["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    let mut other = slice(
        "s-2",
        "s",
        "IPv4",
        json!([{"port": 80}]),
        json!([ready("10.1.0.2", "node-b")]),
    );
    other["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = json!("x");
    let built = run(vec![simple_svc("s", "10.0.0.1")], vec![headless, other]);
    assert!(!get(&built, &v4("s")).endpoints.any);
}

// ----- Topology (docs/semantics.md, rule 16) -----

fn hinted(addr: &str, node: &str, zones: &[&str], nodes: &[&str]) -> Value {
    let mut e = ready(addr, node);
    let mut hints = serde_json::Map::new();
    if !zones.is_empty() {
        hints.insert(
            "forZones".into(),
            json!(zones.iter().map(|z| json!({"name": z})).collect::<Vec<_>>()),
        );
    }
    if !nodes.is_empty() {
        hints.insert(
            "forNodes".into(),
            json!(nodes.iter().map(|n| json!({"name": n})).collect::<Vec<_>>()),
        );
    }
    e["hints"] = Value::Object(hints);
    e
}

#[test]
fn topology_hints() {
    // (case, endpoints, zone, labels known, cluster)
    let cases: Vec<(&str, Value, Option<&str>, bool, Vec<&str>)> = vec![
        (
            "zone hints match",
            json!([
                hinted("10.1.0.1", "n1", &["z1"], &[]),
                hinted("10.1.0.2", "n2", &["z2"], &[])
            ]),
            Some("z1"),
            true,
            vec!["10.1.0.1:80"],
        ),
        (
            "zone hints, no zone label",
            json!([
                hinted("10.1.0.1", "n1", &["z1"], &[]),
                hinted("10.1.0.2", "n2", &["z2"], &[])
            ]),
            None,
            true,
            vec!["10.1.0.1:80", "10.1.0.2:80"],
        ),
        (
            "zone hints, node not seen yet",
            json!([
                hinted("10.1.0.1", "n1", &["z1"], &[]),
                hinted("10.1.0.2", "n2", &["z2"], &[])
            ]),
            Some("z1"),
            false,
            vec!["10.1.0.1:80", "10.1.0.2:80"],
        ),
        (
            "zone hints, no match",
            json!([
                hinted("10.1.0.1", "n1", &["z1"], &[]),
                hinted("10.1.0.2", "n2", &["z2"], &[])
            ]),
            Some("z3"),
            true,
            vec!["10.1.0.1:80", "10.1.0.2:80"],
        ),
        (
            "one endpoint without zone hint",
            json!([
                hinted("10.1.0.1", "n1", &["z1"], &[]),
                ready("10.1.0.2", "n2")
            ]),
            Some("z1"),
            true,
            vec!["10.1.0.1:80", "10.1.0.2:80"],
        ),
        (
            "non-ready endpoint without hint is ignored",
            json!([
                hinted("10.1.0.1", "n1", &["z1"], &[]),
                hinted("10.1.0.2", "n2", &["z2"], &[]),
                terminating("10.1.0.3", "n3", true)
            ]),
            Some("z1"),
            true,
            vec!["10.1.0.1:80"],
        ),
        (
            "node hints match",
            json!([
                hinted("10.1.0.1", NODE, &["z1"], &[NODE]),
                hinted("10.1.0.2", "n2", &["z1"], &["n2"])
            ]),
            Some("z1"),
            true,
            vec!["10.1.0.1:80 local"],
        ),
        (
            "node hints, no match: zone",
            json!([
                hinted("10.1.0.1", "n1", &["z1"], &["n1"]),
                hinted("10.1.0.2", "n2", &["z2"], &["n2"])
            ]),
            Some("z1"),
            true,
            vec!["10.1.0.1:80"],
        ),
        (
            "node hints incomplete: zone",
            json!([
                hinted("10.1.0.1", "n1", &["z2"], &[NODE]),
                hinted("10.1.0.2", "n2", &["z1"], &[])
            ]),
            Some("z1"),
            true,
            vec!["10.1.0.2:80"],
        ),
        (
            "node hints without zone hints",
            json!([
                hinted("10.1.0.1", "n1", &[], &[NODE]),
                hinted("10.1.0.2", "n2", &[], &["n2"])
            ]),
            None,
            false,
            vec!["10.1.0.1:80"],
        ),
    ];
    for (name, endpoints, zone, known, cluster) in cases {
        let c = cache(
            vec![simple_svc("s", "10.0.0.1")],
            vec![slice("s-1", "s", "IPv4", json!([{"port": 80}]), endpoints)],
        );
        let mut ctx = ctx(zone);
        ctx.node_labels_known = known;
        let built = build(&c, &ctx, None);
        assert_eq!(
            eps(&get(&built, &v4("s")).endpoints.cluster),
            cluster,
            "{name}"
        );
    }
}

#[test]
fn topology_does_not_touch_local_or_fallback() {
    let c = cache(
        vec![simple_svc("s", "10.0.0.1")],
        vec![slice(
            "s-1",
            "s",
            "IPv4",
            json!([{"port": 80}]),
            json!([
                hinted("10.1.0.1", NODE, &["z2"], &[]),
                hinted("10.1.0.2", "n2", &["z1"], &[]),
            ]),
        )],
    );
    let built = build(&c, &ctx(Some("z1")), None);
    let e = &get(&built, &v4("s")).endpoints;
    assert_eq!(eps(&e.cluster), vec!["10.1.0.2:80"]);
    assert_eq!(eps(&e.local), vec!["10.1.0.1:80 local"]);

    let mut t1 = terminating("10.1.0.1", "n1", true);
    t1["hints"] = json!({"forZones": [{"name": "z2"}]});
    let c = cache(
        vec![simple_svc("s", "10.0.0.1")],
        vec![slice(
            "s-1",
            "s",
            "IPv4",
            json!([{"port": 80}]),
            json!([t1]),
        )],
    );
    let built = build(&c, &ctx(Some("z1")), None);
    assert_eq!(
        eps(&get(&built, &v4("s")).endpoints.cluster),
        vec!["10.1.0.1:80"]
    );
}

// ----- Snapshots -----

#[test]
fn reuses_previous_arcs_for_unchanged_ports() {
    let slices = vec![slice(
        "a-1",
        "a",
        "IPv4",
        json!([{"port": 80}]),
        json!([ready("10.1.0.1", "n1")]),
    )];
    let c = cache(
        vec![simple_svc("a", "10.0.0.1"), simple_svc("b", "10.0.0.2")],
        slices.clone(),
    );
    let first = build(&c, &ctx(None), None);
    let second = build(&c, &ctx(None), Some(&first.state));
    for (k, v) in &second.state.services {
        assert!(Arc::ptr_eq(v, &first.state.services[k]), "{k:?}");
    }
    let without = build(&c, &ctx(None), None);
    assert!(!Arc::ptr_eq(
        &without.state.services[&v4("a")],
        &first.state.services[&v4("a")]
    ));

    // Changing b's endpoints only: a keeps its Arc, b gets a new one.
    let mut slices2 = slices;
    slices2.push(slice(
        "b-1",
        "b",
        "IPv4",
        json!([{"port": 80}]),
        json!([ready("10.1.0.2", "n1")]),
    ));
    let c2 = cache(
        vec![simple_svc("a", "10.0.0.1"), simple_svc("b", "10.0.0.2")],
        slices2,
    );
    let third = build(&c2, &ctx(None), Some(&second.state));
    assert!(Arc::ptr_eq(
        &third.state.services[&v4("a")],
        &second.state.services[&v4("a")]
    ));
    assert!(!Arc::ptr_eq(
        &third.state.services[&v4("b")],
        &second.state.services[&v4("b")]
    ));
    assert!(third.state.services[&v4("b")].endpoints.any);
}

#[test]
fn state_carries_node_settings() {
    let ctx = ctx(None);
    let built = build(&ClusterCache::default(), &ctx, None);
    assert!(Arc::ptr_eq(&built.state.node, &ctx.node));
    assert!(built.state.services.is_empty());
}

#[test]
fn skipped_display() {
    let built = run(
        vec![svc(
            "web",
            json!({"clusterIP": "10.0.0.1", "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 0}]}),
        )],
        vec![],
    );
    assert_eq!(
        built
            .skipped
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec![
            "Service default/web: spec.ports[1].port: 0 is not a valid port (1-65535); port skipped"
        ]
    );
}

// ----- Properties -----

// ----- Hostile addresses (issue #20, items 10-11) -----

/// The node of the hostile-address tests: 192.168.0.2 and fd00::2, service CIDR 10.96.0.0/12.
fn hostile_node() -> NodeSettings {
    NodeSettings {
        node_name: NODE.to_owned(),
        node_ips: vec![ip("192.168.0.2"), ip("fd00::2")],
        service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
        ..NodeSettings::default()
    }
}

/// A build context for objects from `--manifests` (`manifests`) or the API, with
/// `--external-ip-cidrs` when given.
fn hostile_ctx(manifests: bool, external_ip_cidrs: Option<&[&str]>) -> BuildContext {
    BuildContext {
        node: Arc::new(hostile_node()),
        node_zone: None,
        node_labels_known: true,
        admission: Arc::new(Admission {
            manifests: manifests.then_some(ManifestChecks {
                node_port_range: crate::config::PortRange::DEFAULT_NODE_PORTS,
            }),
            external_ip_cidrs: external_ip_cidrs
                .map(|l| l.iter().map(|c| c.parse().unwrap()).collect()),
        }),
    }
}

/// Every report as `Kind ns/name field: reason`.
fn reports(built: &Built) -> Vec<String> {
    built.skipped.iter().map(ToString::to_string).collect()
}

fn reported(built: &Built, object: &str, field: &str, reason: &str) -> bool {
    built
        .skipped
        .iter()
        .any(|s| s.object.to_string() == object && s.field == field && s.reason.contains(reason))
}

#[test]
fn frontends_on_special_and_node_addresses_are_refused() {
    let services = vec![
        svc(
            "ext-on-node",
            json!({"clusterIP": "10.96.0.1", "externalIPs": ["192.168.0.2", "203.0.113.5"],
                   "ports": [{"port": 22}]}),
        ),
        simple_svc("cip-loopback", "127.0.0.1"),
        simple_svc("cip-node", "192.168.0.2"),
        svc(
            "wild",
            json!({"clusterIP": "10.96.0.3", "externalIPs": ["0.0.0.0", "255.255.255.255",
                   "224.0.0.1", "169.254.169.254", "127.0.0.53"], "ports": [{"port": 80}]}),
        ),
        with_status(
            svc(
                "lb-on-node",
                json!({"type": "LoadBalancer", "clusterIP": "10.96.0.4", "ports": [{"port": 22}]}),
            ),
            json!({"loadBalancer": {"ingress": [{"ip": "192.168.0.2"}, {"ip": "198.51.100.9"}]}}),
        ),
        svc(
            "dual",
            json!({"clusterIPs": ["10.96.0.5", "::1"], "ports": [{"port": 80}]}),
        ),
    ];
    let built = build(&cache(services, vec![]), &hostile_ctx(false, None), None);
    let all = reports(&built);
    for (object, field, reason) in [
        (
            "default/ext-on-node",
            "spec.externalIPs[0]",
            "address of this node",
        ),
        ("default/cip-loopback", "spec.clusterIPs[0]", "loopback"),
        (
            "default/cip-node",
            "spec.clusterIPs[0]",
            "address of this node",
        ),
        ("default/wild", "spec.externalIPs[0]", "unspecified"),
        ("default/wild", "spec.externalIPs[1]", "broadcast"),
        ("default/wild", "spec.externalIPs[2]", "multicast"),
        ("default/wild", "spec.externalIPs[3]", "link-local"),
        ("default/wild", "spec.externalIPs[4]", "loopback"),
        (
            "default/lb-on-node",
            "status.loadBalancer.ingress[0].ip",
            "--external-ip-cidrs",
        ),
        ("default/dual", "spec.clusterIPs[1]", "loopback"),
    ] {
        assert!(
            reported(&built, object, field, reason),
            "{object} {field}: {all:#?}"
        );
    }
    assert_eq!(all.len(), 10, "{all:#?}");
    // The rest of each Service keeps working.
    assert_eq!(
        get(&built, &v4("ext-on-node")).external_ips,
        vec![ip("203.0.113.5")]
    );
    assert!(get(&built, &v4("wild")).external_ips.is_empty());
    assert_eq!(
        get(&built, &v4("lb-on-node")).load_balancer_ips,
        vec![ip("198.51.100.9")]
    );
    assert!(built.state.services.contains_key(&v4("dual")));
    assert!(
        !built
            .state
            .services
            .contains_key(&key(IpFamily::V6, "dual", "", Protocol::Tcp))
    );
    for gone in ["cip-loopback", "cip-node"] {
        assert!(!built.state.services.contains_key(&v4(gone)), "{gone}");
    }
}

#[test]
fn external_ip_cidrs_allow_list_and_node_addresses() {
    let services = vec![svc(
        "ext",
        json!({"clusterIP": "10.96.0.1", "externalIPs": ["192.168.0.2", "203.0.113.5",
               "198.51.100.1", "fd00::2"], "ports": [{"port": 22}]}),
    )];
    let ctx = hostile_ctx(false, Some(&["192.168.0.2/32", "203.0.113.0/24"]));
    let built = build(&cache(services, vec![]), &ctx, None);
    // The node address inside the list is the operator's explicit choice.
    assert_eq!(
        get(&built, &v4("ext")).external_ips,
        vec![ip("192.168.0.2"), ip("203.0.113.5")]
    );
    assert!(reported(
        &built,
        "default/ext",
        "spec.externalIPs[2]",
        "outside --external-ip-cidrs"
    ));
    assert!(reported(
        &built,
        "default/ext",
        "spec.externalIPs[3]",
        "address of this node"
    ));
    assert_eq!(built.skipped.len(), 2, "{:#?}", reports(&built));
}

#[test]
fn manifests_are_checked_as_the_api_server_would() {
    let services = vec![
        simple_svc("outside", "10.200.0.1"),
        svc(
            "np",
            json!({"type": "NodePort", "clusterIP": "10.96.0.2", "ports": [
                {"name": "a", "port": 80, "nodePort": 2222},
                {"name": "b", "port": 81, "nodePort": 30080},
                {"name": "c", "port": 82, "nodePort": 30080},
                {"name": "d", "port": 83, "nodePort": 30080, "protocol": "UDP"}]}),
        ),
        svc(
            "hc",
            json!({"type": "LoadBalancer", "clusterIP": "10.96.0.3", "externalTrafficPolicy": "Local",
                   "healthCheckNodePort": 22, "ports": [{"port": 80, "nodePort": 30081}]}),
        ),
    ];
    let objects = cache(services, vec![]);
    let built = build(&objects, &hostile_ctx(true, None), None);
    assert!(reported(
        &built,
        "default/outside",
        "spec.clusterIPs[0]",
        "10.96.0.0/12"
    ));
    assert!(!built.state.services.contains_key(&v4("outside")));
    assert!(reported(
        &built,
        "default/np",
        "spec.ports[0].nodePort",
        "30000-32767"
    ));
    assert!(reported(
        &built,
        "default/np",
        "spec.ports[2].nodePort",
        "duplicates spec.ports[1]"
    ));
    assert!(reported(
        &built,
        "default/hc",
        "spec.healthCheckNodePort",
        "30000-32767"
    ));
    assert_eq!(built.skipped.len(), 4, "{:#?}", reports(&built));
    let np = |port: &str, proto| get(&built, &key(IpFamily::V4, "np", port, proto)).node_port;
    assert_eq!(np("a", Protocol::Tcp), None);
    assert_eq!(np("b", Protocol::Tcp), Some(30080));
    assert_eq!(np("c", Protocol::Tcp), None);
    // The same number with another protocol is another NodePort.
    assert_eq!(np("d", Protocol::Udp), Some(30080));
    assert_eq!(get(&built, &v4("hc")).health_check_node_port, None);
    // From the API: the API server checked its own ranges, which kproxy may not know.
    let built = build(&objects, &hostile_ctx(false, None), None);
    assert!(built.state.services.contains_key(&v4("outside")));
    assert_eq!(np_of(&built, "np", "a"), Some(2222));
    assert_eq!(get(&built, &v4("hc")).health_check_node_port, Some(22));
    // The duplicate NodePort is refused from any source.
    assert_eq!(built.skipped.len(), 1, "{:#?}", reports(&built));
}

fn np_of(built: &Built, name: &str, port: &str) -> Option<u16> {
    get(built, &key(IpFamily::V4, name, port, Protocol::Tcp)).node_port
}

#[test]
fn a_service_does_not_claim_one_frontend_twice() {
    let services = vec![with_status(
        svc(
            "self",
            json!({"type": "LoadBalancer", "clusterIP": "10.96.0.1",
                   "externalIPs": ["203.0.113.1", "10.96.0.1"], "ports": [{"port": 80}]}),
        ),
        json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}, {"ip": "10.96.0.1"},
               {"ip": "198.51.100.1"}]}}),
    )];
    let built = build(&cache(services, vec![]), &hostile_ctx(false, None), None);
    let sp = get(&built, &v4("self"));
    assert_eq!(sp.external_ips, vec![ip("203.0.113.1")]);
    assert_eq!(sp.load_balancer_ips, vec![ip("198.51.100.1")]);
    assert!(reported(
        &built,
        "default/self",
        "spec.externalIPs[1]",
        "own ClusterIP"
    ));
    assert!(reported(
        &built,
        "default/self",
        "status.loadBalancer.ingress[0].ip",
        "own externalIP"
    ));
    assert!(reported(
        &built,
        "default/self",
        "status.loadBalancer.ingress[1].ip",
        "own ClusterIP"
    ));
    assert_eq!(built.frontend_conflicts(), 0);
}

#[test]
fn endpoints_on_special_addresses_are_skipped() {
    let services = vec![simple_svc("web", "10.96.0.1")];
    let slices = vec![slice(
        "web-1",
        "web",
        "IPv4",
        json!([{"port": 8080}]),
        json!([
            ready("127.0.0.1", NODE),
            ready("169.254.169.254", NODE),
            ready("0.0.0.0", NODE),
            ready("224.0.0.5", NODE),
            ready("192.168.0.2", NODE),
            ready("10.244.0.5", NODE)
        ]),
    )];
    let built = build(&cache(services, slices), &hostile_ctx(false, None), None);
    for (i, reason) in [
        (0, "loopback"),
        (1, "link-local"),
        (2, "unspecified"),
        (3, "multicast"),
    ] {
        let field = format!("endpoints[{i}].addresses[0]");
        assert!(reported(&built, "default/web-1", &field, reason), "{field}");
    }
    // The node's own address is a fine endpoint (hostNetwork pods, the API server).
    assert_eq!(
        eps(&get(&built, &v4("web")).endpoints.cluster),
        vec!["10.244.0.5:8080 local", "192.168.0.2:8080 local"]
    );
}

// ----- Conflicting frontends (issue #20, item 12) -----

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

mod props {
    use proptest::prelude::*;

    use super::*;

    /// Conditions of one generated endpoint.
    #[derive(Debug, Clone)]
    struct Ep {
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
        node: Option<&'static str>,
        zone_hint: Option<&'static str>,
        node_hint: Option<&'static str>,
    }

    fn arb_ep() -> impl Strategy<Value = Ep> {
        let b = || proptest::option::of(any::<bool>());
        let node = || proptest::option::of(prop_oneof![Just(NODE), Just("node-b"), Just("node-c")]);
        let zone = proptest::option::of(prop_oneof![Just("z1"), Just("z2")]);
        (b(), b(), b(), node(), zone, node()).prop_map(
            |(ready, serving, terminating, node, zone_hint, node_hint)| Ep {
                ready,
                serving,
                terminating,
                node,
                zone_hint,
                node_hint,
            },
        )
    }

    /// Unique addresses per index, so each address appears once and its conditions are known.
    fn addr(family: IpFamily, i: usize) -> String {
        match family {
            IpFamily::V4 => format!("10.1.{}.{}", i / 256, i % 256),
            IpFamily::V6 => format!("fd00::{i:x}"),
        }
    }

    fn ep_json(family: IpFamily, i: usize, e: &Ep) -> Value {
        let mut v = ep(&addr(family, i), e.node, e.ready, e.serving, e.terminating);
        let mut hints = serde_json::Map::new();
        if let Some(z) = e.zone_hint {
            hints.insert("forZones".into(), json!([{"name": z}]));
        }
        if let Some(n) = e.node_hint {
            hints.insert("forNodes".into(), json!([{"name": n}]));
        }
        v["hints"] = Value::Object(hints);
        v
    }

    fn scenario(eps4: &[Ep], eps6: &[Ep]) -> ClusterCache {
        let services = vec![svc(
            "s",
            json!({"type": "LoadBalancer", "clusterIPs": ["10.0.0.1", "fd00:ffff::1"],
                            "externalIPs": ["1.1.1.1", "2001:db8::1"],
                            "ports": [{"name": "p", "port": 80, "nodePort": 30080}]}),
        )];
        let split = |family: IpFamily, eps: &[Ep]| -> Vec<Value> {
            // Two slices per family, to exercise merging.
            let (a, b) = eps.split_at(eps.len() / 2);
            let at = match family {
                IpFamily::V4 => "IPv4",
                IpFamily::V6 => "IPv6",
            };
            let offset = a.len();
            vec![
                slice(
                    &format!("s-{at}-a"),
                    "s",
                    at,
                    json!([{"name": "p", "port": 8080}]),
                    Value::Array(
                        a.iter()
                            .enumerate()
                            .map(|(i, e)| ep_json(family, i, e))
                            .collect(),
                    ),
                ),
                slice(
                    &format!("s-{at}-b"),
                    "s",
                    at,
                    json!([{"name": "p", "port": 8080}]),
                    Value::Array(
                        b.iter()
                            .enumerate()
                            .map(|(i, e)| ep_json(family, i + offset, e))
                            .collect(),
                    ),
                ),
            ]
        };
        let mut slices = split(IpFamily::V4, eps4);
        slices.extend(split(IpFamily::V6, eps6));
        cache(services, slices)
    }

    /// The generated conditions of the endpoint behind an address.
    fn lookup<'a>(eps: &'a [Ep], family: IpFamily, e: &Endpoint) -> &'a Ep {
        let i = (0..eps.len())
            .find(|i| ip(&addr(family, *i)) == e.ip)
            .unwrap();
        &eps[i]
    }

    fn check_state(state: &ProxyState, eps4: &[Ep], eps6: &[Ep]) -> Result<(), TestCaseError> {
        prop_assert_eq!(state.services.len(), 2);
        for (k, sp) in &state.services {
            prop_assert_eq!(k.family, sp.family);
            let eps = if sp.family == IpFamily::V4 {
                eps4
            } else {
                eps6
            };
            let addrs = sp
                .cluster_ip
                .iter()
                .chain(&sp.external_ips)
                .chain(&sp.load_balancer_ips);
            for a in addrs {
                prop_assert_eq!(IpFamily::of(a), sp.family);
            }
            for list in [&sp.endpoints.cluster, &sp.endpoints.local] {
                let mut sorted = list.clone();
                sorted.sort();
                prop_assert_eq!(&sorted, list);
                let mut terminating = 0;
                for e in list {
                    prop_assert_eq!(
                        IpFamily::of(&e.ip),
                        sp.family,
                        "endpoint of the other family"
                    );
                    let g = lookup(eps, sp.family, e);
                    prop_assert!(g.serving.unwrap_or(true), "non-serving endpoint selected");
                    prop_assert_eq!(e.is_local, g.node == Some(NODE));
                    if g.terminating.unwrap_or(false) {
                        terminating += 1;
                    }
                }
                prop_assert!(
                    terminating == 0 || terminating == list.len(),
                    "terminating mixed with ready"
                );
            }
            prop_assert!(sp.endpoints.local.iter().all(|e| e.is_local));
            prop_assert_eq!(sp.endpoints.any, !sp.endpoints.cluster.is_empty());
            // Anything usable anywhere shows up in the Cluster list.
            let usable = eps.iter().any(|g| {
                let serving = g.serving.unwrap_or(true);
                serving && (g.terminating.unwrap_or(false) || g.ready.unwrap_or(true))
            });
            prop_assert_eq!(sp.endpoints.any, usable);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn endpoint_lists_are_consistent(
            eps4 in proptest::collection::vec(arb_ep(), 0..12),
            eps6 in proptest::collection::vec(arb_ep(), 0..12),
            zone in proptest::option::of(prop_oneof![Just("z1"), Just("z2")]),
        ) {
            let c = scenario(&eps4, &eps6);
            let built = build(&c, &ctx(zone), None);
            prop_assert!(built.skipped.is_empty());
            check_state(&built.state, &eps4, &eps6)?;
        }

        #[test]
        fn previous_gives_pointer_equal_ports(
            eps4 in proptest::collection::vec(arb_ep(), 0..8),
            eps6 in proptest::collection::vec(arb_ep(), 0..8),
        ) {
            let c = scenario(&eps4, &eps6);
            let first = build(&c, &ctx(Some("z1")), None);
            let second = build(&c, &ctx(Some("z1")), Some(&first.state));
            prop_assert_eq!(first.state.services.len(), second.state.services.len());
            for (k, v) in &second.state.services {
                prop_assert!(Arc::ptr_eq(v, &first.state.services[k]));
            }
        }

        #[test]
        fn build_never_panics(
            cluster_ips in proptest::collection::vec(arb_ip_string(), 0..3),
            cluster_ip in arb_ip_string(),
            external_ips in proptest::collection::vec(arb_ip_string(), 0..3),
            ports in proptest::collection::vec((any::<i32>(), proptest::option::of(any::<i32>()), arb_protocol(), proptest::option::of("[a-c]")), 0..4),
            ty in prop_oneof![Just("ClusterIP"), Just("NodePort"), Just("LoadBalancer"), Just("ExternalName"), Just("x")],
            timeout in proptest::option::of(any::<i32>()),
            hc in proptest::option::of(any::<i32>()),
            lb in proptest::collection::vec((arb_ip_string(), proptest::option::of(prop_oneof![Just("VIP"), Just("Proxy"), Just("?")])), 0..3),
            ranges in proptest::collection::vec(".{0,20}", 0..3),
            address_type in prop_oneof![Just("IPv4"), Just("IPv6"), Just("FQDN"), Just("")],
            slice_ports in proptest::collection::vec((proptest::option::of(any::<i32>()), arb_protocol(), proptest::option::of("[a-c]")), 0..3),
            addresses in proptest::collection::vec((proptest::collection::vec(arb_ip_string(), 0..2), arb_ep()), 0..6),
        ) {
            let service = with_status(svc("s", json!({
                "type": ty, "clusterIP": cluster_ip, "clusterIPs": cluster_ips, "externalIPs": external_ips,
                "ports": ports.iter().map(|(p, np, proto, name)| json!({"port": p, "nodePort": np, "protocol": proto, "name": name})).collect::<Vec<_>>(),
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": timeout}},
                "externalTrafficPolicy": "Local", "healthCheckNodePort": hc,
                "loadBalancerSourceRanges": ranges,
            })), json!({"loadBalancer": {"ingress": lb.iter().map(|(ip, mode)| json!({"ip": ip, "ipMode": mode})).collect::<Vec<_>>()}}));
            let endpoints: Vec<Value> = addresses.iter().map(|(addrs, e)| {
                let mut v = ep("", e.node, e.ready, e.serving, e.terminating);
                v["addresses"] = json!(addrs);
                v
            }).collect();
            let s = slice("s-1", "s", address_type,
                Value::Array(slice_ports.iter().map(|(p, proto, name)| json!({"port": p, "protocol": proto, "name": name})).collect()),
                Value::Array(endpoints));
            let c = cache(vec![service], vec![s]);
            let built = build(&c, &ctx(Some("z1")), None);
            for sp in built.state.services.values() {
                prop_assert!(sp.port != 0);
                for e in sp.endpoints.cluster.iter().chain(&sp.endpoints.local) {
                    prop_assert_eq!(IpFamily::of(&e.ip), sp.family);
                    prop_assert!(e.port != 0);
                }
            }
            for s in &built.skipped {
                prop_assert!(!s.to_string().is_empty());
            }
        }
    }

    fn arb_ip_string() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("10.0.0.1".to_owned()),
            Just("fd00::1".to_owned()),
            Just("None".to_owned()),
            Just(String::new()),
            any::<std::net::Ipv4Addr>().prop_map(|a| a.to_string()),
            any::<std::net::Ipv6Addr>().prop_map(|a| a.to_string()),
            "[0-9.:a-f]{0,16}",
            ".{0,12}",
        ]
    }

    fn arb_protocol() -> impl Strategy<Value = Option<&'static str>> {
        proptest::option::of(prop_oneof![
            Just("TCP"),
            Just("UDP"),
            Just("SCTP"),
            Just("tcp"),
            Just("")
        ])
    }
}

/// An incremental build after any sequence of changes equals a full build of the same cache.
mod incremental {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Service i with this port (0 and 70000 are invalid: Skipped entries).
        ApplyService(u8, u32),
        DeleteService(u8),
        /// Slice of service i with these endpoint address suffixes.
        ApplySlice(u8, Vec<u8>),
        DeleteSlice(u8),
        /// A Service `n{ns}/h{i}` claiming frontends from small pools, hostile ones included,
        /// so that Services contest them.
        ApplyHostile(Hostile),
        DeleteHostile(u8, u8),
    }

    #[derive(Debug, Clone)]
    struct Hostile {
        i: u8,
        ns: u8,
        /// Index into three creation times; `None`: no timestamp.
        age: Option<u8>,
        cluster_ip: usize,
        /// (port, NodePort index) pairs.
        ports: Vec<(u16, Option<usize>)>,
        external_ips: Vec<usize>,
        lb_ips: Vec<usize>,
    }

    const CLUSTER_POOL: [&str; 6] = [
        "10.96.0.1",
        "10.96.0.2",
        "10.96.0.3",
        "127.0.0.1",
        "192.168.0.2",
        "10.200.0.1",
    ];
    const ADDRESS_POOL: [&str; 7] = [
        "10.96.0.1",
        "10.96.0.2",
        "203.0.113.1",
        "203.0.113.2",
        "192.168.0.2",
        "0.0.0.0",
        "10.96.0.3",
    ];
    const NODE_PORT_POOL: [u16; 3] = [30001, 30002, 2222];
    const TIMES: [&str; 3] = [
        "2020-01-01T00:00:00Z",
        "2022-01-01T00:00:00Z",
        "2024-01-01T00:00:00Z",
    ];

    fn hostile() -> impl Strategy<Value = Hostile> {
        (
            0u8..4,
            0u8..2,
            proptest::option::of(0u8..3),
            0..CLUSTER_POOL.len(),
            proptest::collection::vec(
                (
                    prop_oneof![Just(80u16), Just(443)],
                    proptest::option::of(0..NODE_PORT_POOL.len()),
                ),
                1..3,
            ),
            proptest::collection::vec(0..ADDRESS_POOL.len(), 0..3),
            proptest::collection::vec(0..ADDRESS_POOL.len(), 0..2),
        )
            .prop_map(
                |(i, ns, age, cluster_ip, ports, external_ips, lb_ips)| Hostile {
                    i,
                    ns,
                    age,
                    cluster_ip,
                    ports,
                    external_ips,
                    lb_ips,
                },
            )
    }

    fn hostile_json(h: &Hostile) -> Value {
        let ports: Vec<Value> = h
            .ports
            .iter()
            .enumerate()
            .map(|(j, (port, np))| {
                let mut p = json!({"name": format!("p{j}"), "port": port});
                if let Some(n) = np {
                    p["nodePort"] = json!(NODE_PORT_POOL[*n]);
                }
                p
            })
            .collect();
        let ty = if !h.lb_ips.is_empty() {
            "LoadBalancer"
        } else if h.ports.iter().any(|(_, np)| np.is_some()) {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let ext: Vec<&str> = h.external_ips.iter().map(|a| ADDRESS_POOL[*a]).collect();
        let ingress: Vec<Value> = h
            .lb_ips
            .iter()
            .map(|a| json!({"ip": ADDRESS_POOL[*a]}))
            .collect();
        let mut v = json!({
            "metadata": {"namespace": format!("n{}", h.ns), "name": format!("h{}", h.i)},
            "spec": {"type": ty, "clusterIP": CLUSTER_POOL[h.cluster_ip], "ports": ports,
                     "externalIPs": ext},
            "status": {"loadBalancer": {"ingress": ingress}},
        });
        if let Some(t) = h.age {
            v["metadata"]["creationTimestamp"] = json!(TIMES[usize::from(t)]);
        }
        v
    }

    fn op() -> impl Strategy<Value = Op> {
        let i = 0u8..4;
        prop_oneof![
            1 => (
                i.clone(),
                prop_oneof![Just(0u32), Just(80), Just(81), Just(70_000)]
            )
                .prop_map(|(i, p)| Op::ApplyService(i, p)),
            1 => i.clone().prop_map(Op::DeleteService),
            1 => (i.clone(), proptest::collection::vec(1u8..6, 0..4))
                .prop_map(|(i, e)| Op::ApplySlice(i, e)),
            1 => i.prop_map(Op::DeleteSlice),
            4 => hostile().prop_map(Op::ApplyHostile),
            1 => (0u8..4, 0u8..2).prop_map(|(i, ns)| Op::DeleteHostile(i, ns)),
        ]
    }

    fn update(op: &Op) -> Update {
        match op {
            Op::ApplyService(i, port) => Update::Services(
                Change::Apply(
                    serde_json::from_value(svc(
                        &format!("s{i}"),
                        json!({"clusterIP": format!("10.96.0.{i}"), "ports": [{"port": port}]}),
                    ))
                    .unwrap(),
                )
                .shared(),
            ),
            Op::DeleteService(i) => Update::Services(
                Change::Delete(
                    serde_json::from_value(simple_svc(&format!("s{i}"), "10.96.0.1")).unwrap(),
                )
                .shared(),
            ),
            Op::ApplySlice(i, eps) => {
                let endpoints: Vec<Value> = eps
                    .iter()
                    .map(|e| ready(&format!("10.244.{i}.{e}"), NODE))
                    .collect();
                Update::EndpointSlices(
                    Change::Apply(
                        serde_json::from_value(slice(
                            &format!("s{i}-x"),
                            &format!("s{i}"),
                            "IPv4",
                            json!([{"port": 8080}]),
                            json!(endpoints),
                        ))
                        .unwrap(),
                    )
                    .map(crate::source::slim::slice)
                    .shared(),
                )
            }
            Op::ApplyHostile(h) => Update::Services(
                Change::Apply(serde_json::from_value(hostile_json(h)).unwrap()).shared(),
            ),
            Op::DeleteHostile(i, ns) => Update::Services(
                Change::Delete(
                    serde_json::from_value(json!({
                        "metadata": {"namespace": format!("n{ns}"), "name": format!("h{i}")},
                    }))
                    .unwrap(),
                )
                .shared(),
            ),
            Op::DeleteSlice(i) => Update::EndpointSlices(
                Change::Delete(
                    serde_json::from_value(slice(
                        &format!("s{i}-x"),
                        &format!("s{i}"),
                        "IPv4",
                        json!([]),
                        json!([]),
                    ))
                    .unwrap(),
                )
                .map(crate::source::slim::slice)
                .shared(),
            ),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Any sequence of changes, contested and hostile frontends included: the incremental
        /// build equals a full one (state, reports, conflict count), with and without an
        /// `--external-ip-cidrs` list that admits the node's address.
        #[test]
        fn equals_a_full_build(
            ops in proptest::collection::vec(op(), 1..25),
            allow_list in any::<bool>(),
        ) {
            let mut cache = cache(vec![], vec![]);
            let c = if allow_list {
                hostile_ctx(true, Some(&["192.168.0.2/32", "203.0.113.0/24", "10.96.0.0/12"]))
            } else {
                hostile_ctx(true, None)
            };
            let mut prev = build(&cache, &c, None);
            for op in &ops {
                let touched = cache.apply(update(op));
                let inc = build_incremental(&cache, &c, &prev, &touched.services);
                let full = build(&cache, &c, None);
                prop_assert_eq!(&inc.state.services, &full.state.services, "after {:?}", op);
                let strings = |b: &Built| b.skipped.iter().map(ToString::to_string).collect::<Vec<_>>();
                prop_assert_eq!(strings(&inc), strings(&full), "after {:?}", op);
                prop_assert_eq!(inc.frontend_conflicts(), full.frontend_conflicts());
                // No frontend is left to two Services.
                let mut seen = BTreeSet::new();
                for sp in full.state.services.values() {
                    let svc = (sp.name.namespace.clone(), sp.name.name.clone());
                    let mut mine = BTreeSet::new();
                    let addrs = sp.cluster_ip.iter().chain(&sp.external_ips).chain(&sp.load_balancer_ips);
                    for a in addrs {
                        mine.insert(format!("{a} {} {}", sp.name.protocol, sp.port));
                    }
                    if let Some(np) = sp.node_port {
                        mine.insert(format!("np {:?} {} {np}", sp.family, sp.name.protocol));
                    }
                    for fe in mine {
                        prop_assert!(seen.insert((fe.clone(), svc.clone())) , "{fe}");
                        let owners = seen.iter().filter(|(f, _)| *f == fe).count();
                        prop_assert_eq!(owners, 1, "{} has two owners after {:?}", fe, op);
                    }
                }
                prev = inc;
            }
        }
    }
}
