//! Table-driven tests for every rule, plus property tests over arbitrary input.
//!
//! One file per module of `desired_state` it tests (`snapshot`: the build's snapshots, in
//! `desired_state/mod.rs`); this one holds the helpers they share.

#![allow(clippy::unwrap_used, reason = "tests: a panic is a test failure")]
#![allow(
    clippy::type_complexity,
    reason = "table-driven tests spell each row's shape inline"
)]

mod admission;
mod endpoints;
mod frontends;
mod incremental;
mod props;
mod service_ports;
mod skipped;
mod snapshot;
mod topology;

use std::net::IpAddr;
use std::sync::Arc;

use crate::source::slim::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_contract::{
    Endpoint, IpFamily, NodeSettings, Protocol, ServicePort, ServicePortKey, ServicePortName,
};
use serde_json::{Value, json};

use super::{Admission, BuildContext, Built, ManifestChecks, build};
use crate::cache::ClusterCache;
use crate::source::{Change, Update};

const NODE: &str = "node-a";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A Service in `default` with this spec (and optional status).
fn svc(name: &str, spec: Value) -> Value {
    json!({"metadata": {"namespace": "default", "name": name}, "spec": spec})
}

fn with_status(mut svc: Value, status: Value) -> Value {
    svc["status"] = status;
    svc
}

/// A ClusterIP Service with one unnamed TCP port 80 and this ClusterIP.
fn simple_svc(name: &str, cluster_ip: &str) -> Value {
    svc(
        name,
        json!({"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": [{"port": 80}]}),
    )
}

/// An EndpointSlice of Service `service` with ports and endpoints.
fn slice(name: &str, service: &str, address_type: &str, ports: Value, endpoints: Value) -> Value {
    json!({
        "metadata": {"namespace": "default", "name": name,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type,
        "ports": ports,
        "endpoints": endpoints,
    })
}

/// An endpoint; `None` conditions are left out of the object.
fn ep(
    addr: &str,
    node: Option<&str>,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
) -> Value {
    let mut cond = serde_json::Map::new();
    for (k, v) in [
        ("ready", ready),
        ("serving", serving),
        ("terminating", terminating),
    ] {
        if let Some(v) = v {
            cond.insert(k.to_owned(), json!(v));
        }
    }
    let mut e = json!({"addresses": [addr], "conditions": cond});
    if let Some(node) = node {
        e["nodeName"] = json!(node);
    }
    e
}

fn ready(addr: &str, node: &str) -> Value {
    ep(addr, Some(node), Some(true), Some(true), Some(false))
}

fn terminating(addr: &str, node: &str, serving: bool) -> Value {
    ep(addr, Some(node), Some(false), Some(serving), Some(true))
}

/// A cache of these objects as the sources keep them (slimmed: a Service or an EndpointSlice
/// is decoded as the API type and kept as ours).
fn cache(services: Vec<Value>, slices: Vec<Value>) -> ClusterCache {
    let mut cache = ClusterCache::default();
    let services: Vec<Service> = services
        .into_iter()
        .map(|v| crate::source::slim::service(serde_json::from_value(v).unwrap()))
        .collect();
    let slices: Vec<EndpointSlice> = slices
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    cache.apply(Update::Services(Change::Reset(services).shared()));
    cache.apply(Update::EndpointSlices(
        Change::Reset(slices)
            .map(crate::source::slim::slice)
            .shared(),
    ));
    cache
}

/// Adds what the API server sends and `source::slim` drops: managed fields, annotations, a
/// Service's conditions (and each endpoint's `targetRef`, `hostname` and deprecated topology,
/// which a `Slice` has no room for).
fn with_unread_fields(mut object: Value) -> Value {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "managedFields".into(),
            json!([{"manager": "kube-controller-manager", "operation": "Update"}]),
        );
        let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
        annotations["kubectl.kubernetes.io/last-applied-configuration"] = json!("{}");
    }
    if object.get("spec").is_some() {
        object["status"]["conditions"] = json!([{"type": "x", "status": "True",
            "lastTransitionTime": "2026-01-01T00:00:00Z", "reason": "r", "message": "m"}]);
    }
    if let Some(endpoints) = object.get_mut("endpoints").and_then(Value::as_array_mut) {
        for (i, e) in endpoints.iter_mut().enumerate() {
            e["targetRef"] = json!({"kind": "Pod", "namespace": "ns", "name": format!("pod-{i}")});
            e["hostname"] = json!(format!("host-{i}"));
            e["deprecatedTopology"] = json!({"kubernetes.io/hostname": "elsewhere"});
        }
    }
    object
}

/// Builds the state of these objects, and holds `source::slim` to dropping only unread fields:
/// the same objects with every dropped field filled in build the same state. (The kept types
/// have no room for the dropped fields, so the builder cannot read them; this checks that the
/// conversion keeps everything it does read.)
fn run(services: Vec<Value>, slices: Vec<Value>) -> Built {
    let built = build(&cache(services.clone(), slices.clone()), &ctx(None), None);
    let whole = cache(
        services.into_iter().map(with_unread_fields).collect(),
        slices.into_iter().map(with_unread_fields).collect(),
    );
    let from_whole = build(&whole, &ctx(None), None);
    assert_eq!(
        format!("{:?}", (&from_whole.state, &from_whole.skipped)),
        format!("{:?}", (&built.state, &built.skipped)),
        "a field source::slim drops changed the desired state"
    );
    built
}

fn ctx(zone: Option<&str>) -> BuildContext {
    BuildContext {
        node: Arc::new(NodeSettings {
            node_name: NODE.to_owned(),
            ..NodeSettings::default()
        }),
        node_zone: zone.map(str::to_owned),
        node_labels_known: true,
        admission: Arc::default(),
    }
}

fn key(family: IpFamily, name: &str, port: &str, protocol: Protocol) -> ServicePortKey {
    ServicePortKey {
        family,
        name: ServicePortName {
            namespace: "default".into(),
            name: name.into(),
            port: port.into(),
            protocol,
        },
    }
}

fn v4(name: &str) -> ServicePortKey {
    key(IpFamily::V4, name, "", Protocol::Tcp)
}

fn get<'a>(built: &'a Built, k: &ServicePortKey) -> &'a ServicePort {
    built
        .state
        .services
        .get(k)
        .unwrap_or_else(|| panic!("no {k:?} in {:?}", built.state.services.keys()))
}

fn eps(list: &[Endpoint]) -> Vec<String> {
    list.iter()
        .map(|e| {
            format!(
                "{}:{}{}",
                e.ip,
                e.port,
                if e.is_local { " local" } else { "" }
            )
        })
        .collect()
}

// ----- Issue #20 (hostile addresses, conflicting frontends): the node and the reports -----

/// The node of the hostile-address tests: 192.168.0.2 and fd00::2, service CIDR 10.96.0.0/12.
fn hostile_node() -> NodeSettings {
    NodeSettings {
        node_name: NODE.to_owned(),
        node_ips: vec![ip("192.168.0.2"), ip("fd00::2")],
        service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
        ..NodeSettings::default()
    }
}

/// A build context for objects from `--manifests` (`manifests`) or the API, with
/// `--external-ip-cidrs` when given.
fn hostile_ctx(manifests: bool, external_ip_cidrs: Option<&[&str]>) -> BuildContext {
    BuildContext {
        node: Arc::new(hostile_node()),
        node_zone: None,
        node_labels_known: true,
        admission: Arc::new(Admission {
            manifests: manifests.then_some(ManifestChecks {
                node_port_range: crate::config::PortRange::DEFAULT_NODE_PORTS,
            }),
            external_ip_cidrs: external_ip_cidrs
                .map(|l| l.iter().map(|c| c.parse().unwrap()).collect()),
        }),
    }
}

/// Every report as `Kind ns/name field: reason`.
fn reports(built: &Built) -> Vec<String> {
    built.skipped.iter().map(ToString::to_string).collect()
}

fn reported(built: &Built, object: &str, field: &str, reason: &str) -> bool {
    built
        .skipped
        .iter()
        .any(|s| s.object.to_string() == object && s.field == field && s.reason.contains(reason))
}
