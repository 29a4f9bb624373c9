//! /healthz, /livez and /metrics of a running kproxy, scraped inside its network namespace.

use std::time::Duration;

use crate::support::http;
use crate::support::kproxy::{KproxyProcess, wait_until};
use crate::support::manifests::{Manifests, Port};
use crate::support::netns::Netns;
use crate::support::require_root;
use crate::support::topology::NODE_IP;

const HTTP: Port = Port::tcp("http", 80, 8080);

/// `GET path` on 127.0.0.1:port inside `ns`: (status, headers and body).
fn get(ns: &Netns, port: u16, path: &str) -> Option<(u16, String)> {
    http::get(ns, std::net::SocketAddr::from(([127, 0, 0, 1], port)), path)
}

#[test]
fn health_and_metrics_endpoints() {
    if !require_root("health_and_metrics_endpoints") {
        return;
    }
    let node = Netns::new("node");
    let manifests = Manifests::new();
    manifests.node("node-a", &[NODE_IP]);
    manifests.service("web", &["10.96.0.10"], &[HTTP]);
    manifests.endpoint_slice("web", "web-v4", &["10.244.1.10"], &[HTTP]);
    let mut kproxy = KproxyProcess::start(
        &node,
        &[
            "--manifests",
            &manifests.arg(),
            "--hostname-override",
            "node-a",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--healthz-bind-address",
            "127.0.0.1:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
            "--iptables-backend",
            "nft",
        ],
    );
    let synced = wait_until(Duration::from_secs(10), || {
        get(&node, 10249, "/metrics").is_some_and(|(_, body)| {
            body.lines().any(|l| {
                l.starts_with("kubeproxy_sync_proxy_rules_last_timestamp_seconds ")
                    && !l.ends_with(" 0.0")
            })
        })
    });
    if !synced {
        kproxy.assert_running();
        panic!("no successful sync reported on /metrics");
    }

    let (code, text) = get(&node, 10256, "/healthz").expect("healthz answers");
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("application/json"), "{text}");
    for field in [
        "\"lastUpdated\"",
        "\"currentTime\"",
        "\"nodeEligible\":true",
    ] {
        assert!(text.contains(field), "healthz body lacks {field}: {text}");
    }
    let (code, text) = get(&node, 10256, "/livez").expect("livez answers");
    assert_eq!(code, 200, "{text}");
    assert!(!text.contains("nodeEligible"), "{text}");

    let (code, text) = get(&node, 10249, "/metrics").expect("metrics answer");
    assert_eq!(code, 200);
    for want in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.001\"}",
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total 0",
        "kubeproxy_proxy_healthz_total{code=\"200\"} 1",
        "kubeproxy_proxy_livez_total{code=\"200\"} 1",
        "kproxy_service_ports 1",
    ] {
        assert!(text.contains(want), "/metrics lacks {want:?}:\n{text}");
    }

    // The Node is being drained: /healthz says 503 so load balancers move away; /livez stays 200.
    manifests.write(
        "node-node-a",
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nspec:\n  taints:\n  - key: ToBeDeletedByClusterAutoscaler\n    effect: NoSchedule\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 10.0.1.1\n",
    );
    let drained = wait_until(Duration::from_secs(10), || {
        get(&node, 10256, "/healthz").is_some_and(|(code, _)| code == 503)
    });
    assert!(drained, "healthz did not report the draining node");
    let (code, _) = get(&node, 10256, "/livez").expect("livez answers");
    assert_eq!(code, 200);
    kproxy.assert_running();
}
