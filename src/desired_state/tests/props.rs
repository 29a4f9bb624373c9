//! Properties over arbitrary input: the endpoint lists of any endpoint conditions and hints are
//! consistent, a rebuild reuses every port, and no Service or EndpointSlice makes a build panic.

use std::sync::Arc;

use kproxy_contract::{Endpoint, IpFamily, ProxyState};
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::cache::ClusterCache;
use crate::desired_state::build;

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
        for list in [&sp.endpoints.cluster[..], &sp.endpoints.local[..]] {
            let mut sorted = list.to_vec();
            sorted.sort();
            prop_assert_eq!(&sorted[..], list);
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
