//! Endpoints (docs/semantics.md, rules 1-4, 17): the Cluster and Local endpoint lists of a
//! service port, from its EndpointSlices (`endpoints`).

use std::sync::Arc;

use kproxy_contract::{IpFamily, NodeSettings, Protocol};
use serde_json::{Value, json};

use super::*;
use crate::desired_state::build;

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
        // The Cluster and serving lists are one list when they are equal, two otherwise.
        assert_eq!(
            std::sync::Arc::ptr_eq(&e.cluster, &e.serving),
            e.cluster == e.serving,
            "{name}"
        );
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
