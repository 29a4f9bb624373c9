//! An incremental build after any sequence of changes equals a full build of the same cache.

use std::collections::BTreeSet;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::desired_state::{Built, build, build_incremental};
use crate::source::{Change, Update};

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
