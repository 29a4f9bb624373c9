//! Builders for [`ProxyState`]s in tests and benchmarks, so every mode's tests and the benchmark
//! harness describe scenarios the same way. Depends only on the contract and the tracer (a mode's tests use it
//! as a dev-dependency; it never depends on a mode).
#![allow(
    clippy::unwrap_used,
    reason = "builders of test fixtures panic on bad literals"
)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

pub mod conformance;
pub mod strategies;
pub mod trace_scenarios;

use kproxy_contract::{
    Endpoint, Endpoints, IpFamily, LocalTraffic, NodeSettings, Protocol, ProxyState, ServicePort,
    ServicePortKey, ServicePortName, TrafficPolicy,
};

/// `ns/NAME:p`, TCP.
pub fn spn(name: &str) -> ServicePortName {
    ServicePortName {
        namespace: "ns".into(),
        name: name.into(),
        port: "p".into(),
        protocol: Protocol::Tcp,
    }
}

/// An endpoint on port 8080.
pub fn ep(ip: &str, local: bool) -> Endpoint {
    Endpoint {
        ip: ip.parse().unwrap(),
        port: 8080,
        is_local: local,
    }
}

/// Changes an endpoint list in place (a copy when it is shared, as `cluster` and `serving`
/// usually are).
pub fn edit_list(list: &mut Arc<[Endpoint]>, f: impl FnOnce(&mut Vec<Endpoint>)) {
    let mut v = list.to_vec();
    f(&mut v);
    *list = v.into();
}

/// A ClusterIP service port `ns/NAME:p` on port 80 with the given endpoints (the local ones
/// also form the Local list).
pub fn service(name: &str, cluster_ip: &str, eps: Vec<Endpoint>) -> ServicePort {
    let cip: IpAddr = cluster_ip.parse().unwrap();
    let local: Vec<Endpoint> = eps.iter().copied().filter(|e| e.is_local).collect();
    ServicePort {
        name: spn(name),
        family: IpFamily::of(&cip),
        cluster_ip: Some(cip),
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
            serving: eps.clone().into(),
            cluster: eps.into(),
            local_ready: local.len(),
            local,
        },
    }
}

/// The node every test uses: `node-a`, 192.168.0.2, pods in 10.244.0.0/16 (the source-address
/// local-traffic detector), services in 10.96.0.0/12, masquerade bit 14.
pub fn node() -> NodeSettings {
    NodeSettings {
        node_name: "node-a".into(),
        node_ips: vec!["192.168.0.2".parse().unwrap()],
        local_traffic: LocalTraffic::SourceCidrs(vec!["10.244.0.0/16".parse().unwrap()]),
        service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
        masquerade_bit: 14,
        ..NodeSettings::default()
    }
}

/// A state holding `services` on [`node`].
pub fn state(services: Vec<ServicePort>) -> ProxyState {
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
        node: Arc::new(node()),
        services,
    }
}

fn v4(base: Ipv4Addr, offset: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base).wrapping_add(offset as u32))
}

/// `n` ClusterIP services (10.96.0.1 upward) with `eps` remote endpoints each (10.244.0.1
/// upward), named `s0`, `s1`, ...
pub fn many(n: usize, eps: usize) -> Vec<ServicePort> {
    (0..n)
        .map(|i| {
            let list = (0..eps)
                .map(|j| {
                    ep(
                        &v4(Ipv4Addr::new(10, 244, 0, 1), i * eps + j).to_string(),
                        false,
                    )
                })
                .collect();
            service(
                &format!("s{i}"),
                &v4(Ipv4Addr::new(10, 96, 0, 1), i).to_string(),
                list,
            )
        })
        .collect()
}

/// One sync against whatever the mode's kernel holds: read it back, render `s`, plan, apply.
/// Returns the plan that was applied. Panics on any error (tests only).
pub fn sync<M: kproxy_contract::Mode>(m: &mut M, s: &ProxyState) -> M::Plan {
    let live = m.read_live().unwrap();
    let desired = m.render_once(s);
    let plan = m.plan(&live, &desired);
    m.apply(&plan).unwrap();
    plan
}
