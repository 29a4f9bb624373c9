//! Services (docs/semantics.md, rules 1, 27, 28): which Services are programmed, and the
//! frontends, ports and policies of their service ports (`service_ports`).

use std::time::Duration;

use kproxy_contract::{IpFamily, Protocol, SessionAffinity, TrafficPolicy};
use serde_json::{Value, json};

use super::*;
use crate::desired_state::{Built, build};

fn fields(built: &Built) -> Vec<String> {
    built
        .skipped
        .iter()
        .map(|s| format!("{} {}", s.kind, s.field))
        .collect()
}

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
            .map(|sp| (&*sp.name.port, sp.name.protocol, sp.port, sp.node_port))
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

// ----- A Service's own frontends, claimed twice (issue #20) -----

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
