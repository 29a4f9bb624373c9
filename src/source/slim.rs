//! What the sources keep of each object: the fields kproxy reads, nothing else.
//!
//! Every node runs a kproxy, and every kproxy holds every Service and EndpointSlice of the
//! cluster, so a byte per object is paid nodes x objects times. The API server sends much that
//! a proxy never reads: `metadata.managedFields` (often the largest part of an object),
//! `kubectl`'s last-applied annotation, a Service's conditions, each endpoint's `targetRef`, and
//! a Node's image list, capacity and conditions. Both sources pass each object through here
//! before it is shared with the cache. EndpointSlices become a [`Slice`] of our own, which has
//! room for nothing else; Services and Nodes stay API objects with the unread fields emptied.
//!
//! A field is dropped only if no code reads it: a Slice's reader cannot read what is not there,
//! and the desired-state tests build every case from slimmed Services and from whole ones with
//! the dropped fields filled in, and require the same state.
//! Dropping the Node's conditions also means a kubelet status update that changes nothing
//! kproxy reads no longer looks like a Node change (which rebuilds every service).

use k8s_openapi::api::core::v1::{Node, NodeStatus, Service};
use k8s_openapi::api::discovery::v1::{
    EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{HEADLESS_LABEL, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL};
use crate::cache::TRIGGER_TIME_ANNOTATION;

/// Drops the metadata nobody reads: managed fields, and every annotation but `keep`.
fn metadata(meta: &mut ObjectMeta, keep: Option<&str>) {
    meta.managed_fields = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.retain(|k, _| Some(k.as_str()) == keep);
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
}

/// A Service as kproxy keeps it: its metadata without managed fields or annotations, its whole
/// spec, and of its status only the load balancer's ingress.
pub fn service(mut svc: Service) -> Service {
    metadata(&mut svc.metadata, None);
    if let Some(spec) = &mut svc.spec {
        fit(&mut spec.ports);
        fit(&mut spec.cluster_ips);
        fit(&mut spec.external_ips);
        fit(&mut spec.ip_families);
        fit(&mut spec.load_balancer_source_ranges);
    }
    if let Some(status) = &mut svc.status {
        status.conditions = None;
        if let Some(lb) = &mut status.load_balancer {
            fit(&mut lb.ingress);
        }
    }
    svc
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
/// A [`SliceEndpoint`] is 48.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Slice {
    /// Name, namespace, the trigger-time annotation; no labels (the three kproxy reads are the
    /// two fields below: a label map of one entry costs a 528-byte tree node per slice).
    pub metadata: ObjectMeta,
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

/// A [`Slice`] is an object of the API's EndpointSlice kind, so the generic object helpers
/// (name, namespace, labels) work on it.
impl k8s_openapi::Resource for Slice {
    const API_VERSION: &'static str = EndpointSlice::API_VERSION;
    const GROUP: &'static str = EndpointSlice::GROUP;
    const KIND: &'static str = EndpointSlice::KIND;
    const VERSION: &'static str = EndpointSlice::VERSION;
    const URL_PATH_SEGMENT: &'static str = EndpointSlice::URL_PATH_SEGMENT;
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for Slice {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The EndpointSlice as kproxy keeps it (see [`Slice`]).
pub fn slice(mut slice: EndpointSlice) -> Slice {
    metadata(&mut slice.metadata, Some(TRIGGER_TIME_ANNOTATION));
    let mut labels = slice.metadata.labels.take().unwrap_or_default();
    let not_proxied =
        labels.contains_key(HEADLESS_LABEL) || labels.contains_key(SERVICE_PROXY_NAME_LABEL);
    Slice {
        service_name: labels
            .remove(SERVICE_NAME_LABEL)
            .map(String::into_boxed_str),
        not_proxied,
        metadata: slice.metadata,
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
    metadata(&mut node.metadata, None);
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
        let svc: Service = json(serde_json::json!({
            "metadata": {"name": "a", "namespace": "ns", "labels": {"app": "a"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]},
                "conditions": [{"type": "x", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z", "reason": "r", "message": "m"}]}
        }));
        let slim = service(svc.clone());
        assert_eq!(slim.metadata.managed_fields, None);
        assert_eq!(slim.metadata.annotations, None);
        assert_eq!(slim.metadata.labels, svc.metadata.labels);
        assert_eq!(slim.spec, svc.spec);
        let status = slim.status.expect("status");
        assert_eq!(status.conditions, None);
        assert_eq!(
            status.load_balancer,
            svc.status.expect("status").load_balancer
        );

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
        let annotations = slim.metadata.annotations.clone().expect("kept");
        assert_eq!(
            annotations.keys().collect::<Vec<_>>(),
            [TRIGGER_TIME_ANNOTATION]
        );
        assert_eq!(slim.metadata.labels, None);
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
