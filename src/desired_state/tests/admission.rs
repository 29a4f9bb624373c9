//! Hostile addresses (issue #20, items 10-11): special addresses and the node's own refused as
//! frontends and endpoints, `--external-ip-cidrs`, and with `--manifests` what the API server
//! would have refused (`admission`).

use kproxy_contract::{IpFamily, Protocol};
use serde_json::json;

use super::*;
use crate::desired_state::{Built, build};

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
