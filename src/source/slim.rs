//! What the sources keep of each object: the fields kproxy reads, nothing else.
//!
//! Every node runs a kproxy, and every kproxy holds every Service and EndpointSlice of the
//! cluster, so a byte per object is paid nodes x objects times. The API server sends much that
//! a proxy never reads: `metadata.managedFields` (often the largest part of an object),
//! `kubectl`'s last-applied annotation, a Service's conditions, each endpoint's `targetRef`, and
//! a Node's image list, capacity and conditions. Both sources pass each object through here
//! before it is shared with the cache. Services and EndpointSlices become a [`Service`] and a
//! [`Slice`] of our own, which have room for nothing else; Nodes (one per kproxy) stay API
//! objects with the unread fields emptied.
//!
//! A field is dropped only if no code reads it: a Slice's reader cannot read what is not there,
//! and the desired-state tests build every case from slimmed Services and from whole ones with
//! the dropped fields filled in, and require the same state.
//! Dropping the Node's conditions also means a kubelet status update that changes nothing
//! kproxy reads no longer looks like a Node change (which rebuilds every service).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    LoadBalancerStatus, Node, NodeStatus, ServicePort, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{
    EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use super::{HEADLESS_LABEL, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL};
use crate::cache::TRIGGER_TIME_ANNOTATION;

/// Drops the metadata nobody reads: managed fields and annotations.
fn metadata(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
}

/// A Service as kproxy keeps it: its name, namespace, creation time and the one label kproxy
/// reads, the spec fields the builder reads, and of its status the load balancer's ingress.
///
/// Our own type rather than a slimmed `k8s_openapi` one: an API `Service` is 824 bytes of
/// optional fields whether they are set or not (360 of them an `ObjectMeta`, and a label map
/// costs a 528-byte tree node even for one label), this one 384. The field names are the API
/// type's, so the builder reads it the same way; the sources convert each object on arrival
/// ([`service`]), and deserializing one goes through the API type.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(from = "k8s_openapi::api::core::v1::Service")]
pub struct Service {
    /// What kproxy reads of `metadata`.
    pub metadata: ServiceMeta,
    /// What kproxy reads of `spec`.
    pub spec: Option<ServiceSpec>,
    /// What kproxy reads of `status`.
    pub status: Option<ServiceStatus>,
}

/// A [`Service`]'s metadata.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct ServiceMeta {
    /// `name`.
    pub name: Option<String>,
    /// `namespace`.
    pub namespace: Option<String>,
    /// `creationTimestamp`: the older Service keeps a contested frontend.
    pub creation_timestamp: Option<Time>,
    /// Of `labels`, only `service.kubernetes.io/service-proxy-name` (another proxy's Service).
    pub labels: Option<BTreeMap<String, String>>,
}

/// A [`Service`]'s spec: the fields the builder reads, as the API spells them.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct ServiceSpec {
    /// `type`.
    pub type_: Option<String>,
    /// `clusterIP`.
    pub cluster_ip: Option<String>,
    /// `clusterIPs`.
    pub cluster_ips: Option<Vec<String>>,
    /// `ipFamilies`.
    pub ip_families: Option<Vec<String>>,
    /// `ports`.
    pub ports: Option<Vec<ServicePort>>,
    /// `externalIPs`.
    pub external_ips: Option<Vec<String>>,
    /// `externalTrafficPolicy`.
    pub external_traffic_policy: Option<String>,
    /// `internalTrafficPolicy`.
    pub internal_traffic_policy: Option<String>,
    /// `healthCheckNodePort`.
    pub health_check_node_port: Option<i32>,
    /// `loadBalancerSourceRanges`.
    pub load_balancer_source_ranges: Option<Vec<String>>,
    /// `sessionAffinity`.
    pub session_affinity: Option<String>,
    /// `sessionAffinityConfig` (rare: boxed).
    pub session_affinity_config: Option<Box<SessionAffinityConfig>>,
}

/// A [`Service`]'s status: the load balancer's ingress only.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct ServiceStatus {
    /// `loadBalancer`.
    pub load_balancer: Option<LoadBalancerStatus>,
}

/// The Service as kproxy keeps it (see [`Service`]).
pub fn service(svc: k8s_openapi::api::core::v1::Service) -> Service {
    let meta = svc.metadata;
    let labels = meta.labels.and_then(|mut all| {
        let kept: BTreeMap<String, String> = all
            .remove_entry(SERVICE_PROXY_NAME_LABEL)
            .into_iter()
            .collect();
        (!kept.is_empty()).then_some(kept)
    });
    Service {
        metadata: ServiceMeta {
            name: meta.name,
            namespace: meta.namespace,
            creation_timestamp: meta.creation_timestamp,
            labels,
        },
        spec: svc.spec.map(|spec| {
            let mut out = ServiceSpec {
                type_: spec.type_,
                cluster_ip: spec.cluster_ip,
                cluster_ips: spec.cluster_ips,
                ip_families: spec.ip_families,
                ports: spec.ports,
                external_ips: spec.external_ips,
                external_traffic_policy: spec.external_traffic_policy,
                internal_traffic_policy: spec.internal_traffic_policy,
                health_check_node_port: spec.health_check_node_port,
                load_balancer_source_ranges: spec.load_balancer_source_ranges,
                session_affinity: spec.session_affinity,
                session_affinity_config: spec.session_affinity_config.map(Box::new),
            };
            fit(&mut out.ports);
            fit(&mut out.cluster_ips);
            fit(&mut out.external_ips);
            fit(&mut out.ip_families);
            fit(&mut out.load_balancer_source_ranges);
            out
        }),
        status: svc.status.map(|status| ServiceStatus {
            load_balancer: status.load_balancer.map(|mut lb| {
                fit(&mut lb.ingress);
                lb
            }),
        }),
    }
}

impl From<k8s_openapi::api::core::v1::Service> for Service {
    fn from(svc: k8s_openapi::api::core::v1::Service) -> Service {
        service(svc)
    }
}

/// Gives back a list's spare capacity. serde fills a list of unknown length by pushing, so a
/// Service's one port sits in room for four (448 bytes instead of 112): 4.3 MiB at 10,000
/// Services from the API, and 3.1 MiB for the EndpointSlices' ports (heap profile, issue #17).
fn fit<T>(list: &mut Option<Vec<T>>) {
    if let Some(list) = list {
        list.shrink_to_fit();
    }
}

/// An EndpointSlice as kproxy keeps it: its metadata with only the trigger-time annotation
/// (network-programming latency is measured from it), its address type and ports, and per
/// endpoint only what the builder reads.
///
/// Our own type rather than a slimmed `k8s_openapi` one: an API `Endpoint` is 352 bytes of
/// optional fields (`targetRef` alone is seven optional strings) whether they are set or not,
/// and endpoints are the bulk of what a proxy holds (100,000 at 10,000 services of 10 pods).
/// A [`SliceEndpoint`] is 48. Likewise the metadata: an `ObjectMeta` is 360 bytes, and the
/// trigger-time annotation alone would cost a 528-byte tree node; a [`SliceMeta`] is 64.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Slice {
    /// Name, namespace, the trigger-time annotation; no labels (the three kproxy reads are the
    /// two fields below: a label map of one entry costs a 528-byte tree node per slice).
    pub metadata: SliceMeta,
    /// The `kubernetes.io/service-name` label: the Service this slice belongs to.
    pub service_name: Option<Box<str>>,
    /// The slice carries `service.kubernetes.io/headless` or
    /// `service.kubernetes.io/service-proxy-name`: it is not kproxy's to program.
    pub not_proxied: bool,
    /// `addressType`: IPv4, IPv6 or FQDN (validated by the builder).
    pub address_type: String,
    /// `ports`, as sent (validated by the builder).
    pub ports: Option<Vec<EndpointPort>>,
    /// `endpoints`.
    pub endpoints: Box<[SliceEndpoint]>,
}

/// A [`Slice`]'s metadata.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct SliceMeta {
    /// `name`.
    pub name: Option<String>,
    /// `namespace`.
    pub namespace: Option<String>,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` annotation, as written:
    /// network-programming latency is measured from it.
    pub trigger_time: Option<Box<str>>,
}

/// One endpoint of a [`Slice`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SliceEndpoint {
    /// `addresses[0]`: upstream uses only the first (the others are the same pod's).
    pub address: Option<Box<str>>,
    /// `conditions`.
    pub conditions: Option<EndpointConditions>,
    /// `nodeName`.
    pub node_name: Option<Box<str>>,
    /// `hints` (rare: only with topology-aware routing).
    pub hints: Option<Box<EndpointHints>>,
}

/// The EndpointSlice as kproxy keeps it (see [`Slice`]).
pub fn slice(mut slice: EndpointSlice) -> Slice {
    let mut labels = slice.metadata.labels.take().unwrap_or_default();
    let not_proxied =
        labels.contains_key(HEADLESS_LABEL) || labels.contains_key(SERVICE_PROXY_NAME_LABEL);
    Slice {
        service_name: labels
            .remove(SERVICE_NAME_LABEL)
            .map(String::into_boxed_str),
        not_proxied,
        metadata: SliceMeta {
            name: slice.metadata.name,
            namespace: slice.metadata.namespace,
            trigger_time: slice
                .metadata
                .annotations
                .and_then(|mut a| a.remove(TRIGGER_TIME_ANNOTATION))
                .map(String::into_boxed_str),
        },
        address_type: slice.address_type,
        ports: {
            let mut ports = slice.ports;
            fit(&mut ports);
            ports
        },
        endpoints: slice
            .endpoints
            .into_iter()
            .map(|e| SliceEndpoint {
                address: e.addresses.into_iter().next().map(String::into_boxed_str),
                conditions: e.conditions,
                node_name: e.node_name.map(String::into_boxed_str),
                hints: e.hints.map(Box::new),
            })
            .collect(),
    }
}

/// The Node as kproxy keeps it: metadata without managed fields or annotations, its spec
/// (pod CIDRs, taints), and of its status only the addresses.
pub fn node(mut node: Node) -> Node {
    metadata(&mut node.metadata);
    node.status = node.status.map(|status| NodeStatus {
        addresses: status.addresses,
        ..NodeStatus::default()
    });
    node
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
        serde_json::from_value(value).expect("valid object")
    }

    #[test]
    fn unread_fields_are_dropped_and_read_ones_kept() {
        let svc: k8s_openapi::api::core::v1::Service = json(serde_json::json!({
            "metadata": {"name": "a", "namespace": "ns", "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"app": "a", SERVICE_PROXY_NAME_LABEL: "other"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                "ipFamilies": ["IPv4"], "ports": [{"name": "http", "port": 80, "nodePort": 30080}],
                "externalIPs": ["192.0.2.9"], "externalTrafficPolicy": "Local",
                "internalTrafficPolicy": "Cluster", "healthCheckNodePort": 32000,
                "loadBalancerSourceRanges": ["10.0.0.0/8"], "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                "selector": {"app": "a"}, "allocateLoadBalancerNodePorts": true},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]},
                "conditions": [{"type": "x", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z", "reason": "r", "message": "m"}]}
        }));
        let slim = service(svc.clone());
        let (meta, spec) = (&svc.metadata, svc.spec.as_ref().expect("spec"));
        assert_eq!(
            (&slim.metadata.name, &slim.metadata.namespace),
            (&meta.name, &meta.namespace)
        );
        assert_eq!(slim.metadata.creation_timestamp, meta.creation_timestamp);
        assert_eq!(
            slim.metadata
                .labels
                .as_ref()
                .map(|l| l.keys().map(String::as_str).collect::<Vec<_>>()),
            Some(vec![SERVICE_PROXY_NAME_LABEL]),
            "only the label kproxy reads"
        );
        let kept = slim.spec.as_ref().expect("spec");
        assert_eq!(kept.type_, spec.type_);
        assert_eq!(
            (&kept.cluster_ip, &kept.cluster_ips),
            (&spec.cluster_ip, &spec.cluster_ips)
        );
        assert_eq!(kept.ip_families, spec.ip_families);
        assert_eq!(kept.ports, spec.ports);
        assert_eq!(kept.external_ips, spec.external_ips);
        assert_eq!(kept.external_traffic_policy, spec.external_traffic_policy);
        assert_eq!(kept.internal_traffic_policy, spec.internal_traffic_policy);
        assert_eq!(kept.health_check_node_port, spec.health_check_node_port);
        assert_eq!(
            kept.load_balancer_source_ranges,
            spec.load_balancer_source_ranges
        );
        assert_eq!(kept.session_affinity, spec.session_affinity);
        assert_eq!(
            kept.session_affinity_config.as_deref(),
            spec.session_affinity_config.as_ref()
        );
        assert_eq!(
            slim.status.as_ref().expect("status").load_balancer,
            svc.status.clone().expect("status").load_balancer
        );
        // Deserializing ours goes through the API type.
        let again: Service = json(serde_json::to_value(&svc).expect("json"));
        assert_eq!(again, slim);
        assert_eq!(std::mem::size_of::<Service>(), 384);

        let s: EndpointSlice = json(serde_json::json!({
            "metadata": {"name": "a-1", "namespace": "ns",
                "labels": {"kubernetes.io/service-name": "a"},
                "annotations": {TRIGGER_TIME_ANNOTATION: "2026-01-01T00:00:00Z", "other": "x"}},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true},
                "nodeName": "n", "zone": "z", "hints": {"forZones": [{"name": "z"}]},
                "hostname": "h", "targetRef": {"kind": "Pod", "name": "p"},
                "deprecatedTopology": {"k": "v"}}]
        }));
        let slim = slice(s.clone());
        assert_eq!(
            slim.metadata.trigger_time.as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
        assert_eq!(
            (
                slim.metadata.name.as_deref(),
                slim.metadata.namespace.as_deref()
            ),
            (Some("a-1"), Some("ns"))
        );
        assert_eq!(std::mem::size_of::<SliceMeta>(), 64);
        assert_eq!(slim.service_name.as_deref(), Some("a"));
        assert!(!slim.not_proxied);
        let (e, full) = (&slim.endpoints[0], &s.endpoints[0]);
        assert_eq!(e.address.as_deref(), Some("10.0.0.1"));
        assert_eq!(e.conditions, full.conditions);
        assert_eq!(e.node_name.as_deref(), Some("n"));
        assert_eq!(e.hints.as_deref(), full.hints.as_ref());
        assert_eq!(
            (&slim.ports, &slim.address_type),
            (&s.ports, &s.address_type)
        );
        assert_eq!(std::mem::size_of::<SliceEndpoint>(), 48);

        let n: Node = json(serde_json::json!({
            "metadata": {"name": "n", "labels": {"topology.kubernetes.io/zone": "z"},
                "annotations": {"node.alpha.kubernetes.io/ttl": "0"}},
            "spec": {"podCIDR": "10.244.0.0/24", "taints": [{"key": "k", "effect": "NoSchedule"}]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}],
                "images": [{"names": ["busybox"], "sizeBytes": 1}],
                "capacity": {"cpu": "2"}}
        }));
        let slim = node(n.clone());
        assert_eq!(slim.metadata.annotations, None);
        assert_eq!(slim.metadata.labels, n.metadata.labels);
        assert_eq!(slim.spec, n.spec);
        let status = slim.status.expect("status");
        assert_eq!(
            status.addresses,
            n.status.clone().expect("status").addresses
        );
        assert_eq!((status.images, status.capacity), (None, None));
    }
}
