//! Generated Kubernetes objects: the same N services x E endpoints as
//! `kproxy_testkit::many(n, e)` (ClusterIPs from 10.96.0.1, endpoints from 10.244.0.1, port 80
//! to 8080), as the JSON the API server would send. The modes bench writes them as a manifests
//! directory for the `kproxy` binary; the micro bench feeds them to the desired-state builder.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

pub(crate) const NODE_NAME: &str = "bench-node";

fn v4(base: Ipv4Addr, offset: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base).wrapping_add(offset as u32))
}

/// Service `ns/s{i}`: TCP port `p` (80 → 8080); the first service also has the UDP port `dns`
/// (53 → 5353), the modes bench's UDP probe.
pub(crate) fn service(i: usize) -> Value {
    let ip = v4(Ipv4Addr::new(10, 96, 0, 1), i).to_string();
    let mut ports = vec![json!({"name": "p", "port": 80, "targetPort": 8080, "protocol": "TCP"})];
    if i == 0 {
        ports.push(json!({"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}));
    }
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("s{i}"), "namespace": "ns"},
        "spec": {
            "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
            "ports": ports
        }
    })
}

/// The one EndpointSlice of `ns/s{i}`, with `e` ready endpoints; `first` shifts the endpoint
/// addresses (an "endpoint change" is the same slice with other addresses).
pub(crate) fn slice(i: usize, e: usize, first: usize) -> Value {
    let endpoints: Vec<Value> = (0..e)
        .map(|j| {
            let ip = v4(Ipv4Addr::new(10, 244, 0, 1), first + i * e + j).to_string();
            json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": "other-node"})
        })
        .collect();
    let mut ports = vec![json!({"name": "p", "port": 8080, "protocol": "TCP"})];
    if i == 0 {
        ports.push(json!({"name": "dns", "port": 5353, "protocol": "UDP"}));
    }
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("s{i}-1"), "namespace": "ns",
            "labels": {"kubernetes.io/service-name": format!("s{i}")}
        },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints
    })
}

/// This node.
pub(crate) fn node() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE_NAME},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}]}
    })
}
