//! The desired state: the pure translation from Services, EndpointSlices and the Node to one
//! [`ProxyState`]. Every Kubernetes rule is decided here, so modes never see an API object.
//!
//! * [`service_ports`]: Service → frontends (ClusterIPs, ports, externalIPs, LB IPs, policies).
//! * [`endpoints`]: EndpointSlices → the Cluster and Local endpoint lists of a service port.
//! * [`topology`]: which ready endpoints topology hints keep.
//! * [`Skipped`]: the invalid input left out, for the caller to log once.
//!
//! The build is a full, deterministic recomputation from the cache (no change tracking as in
//! upstream's `ServiceChangeTracker`/`EndpointsChangeTracker`): simpler to get right, and the
//! `previous` snapshot restores sharing, so unchanged service ports stay pointer-equal.

mod endpoints;
mod parse;
mod service_ports;
mod skipped;
mod topology;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_contract::{IpFamily, NodeSettings, ProxyState, ServicePort, ServicePortKey};

pub use service_ports::{DEFAULT_AFFINITY_TIMEOUT_SECS, MAX_AFFINITY_TIMEOUT_SECS};
pub use skipped::Skipped;

use crate::cache::{ClusterCache, ObjectKey};
use crate::source::{HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL};

/// What the builder needs to know about this node.
#[derive(Debug, Clone, Default)]
pub struct BuildContext {
    /// Node-wide settings, computed by the caller (node name, node IPs, CIDRs ...).
    pub node: Arc<NodeSettings>,
    /// This node's `topology.kubernetes.io/zone` label.
    pub node_zone: Option<String>,
    /// `false` until the Node object was seen; zone hints are ignored until then (upstream starts
    /// with empty topology labels, which never match a zone hint).
    pub node_labels_known: bool,
}

/// The result of one build.
#[derive(Debug, Clone, Default)]
pub struct Built {
    /// The desired state.
    pub state: ProxyState,
    /// Invalid input that was left out, in a stable order.
    pub skipped: Vec<Skipped>,
    /// The same, per Service (so an incremental build can keep the untouched ones').
    pub skipped_by_service: BTreeMap<ObjectKey, Vec<Skipped>>,
}

/// Rebuilds only the Services in `touched`, reusing everything else from `previous`: the cost
/// of a sync after one change no longer grows with the number of services. Falls back to a full
/// [`build`] when node-wide settings changed. Equivalent to a full build (tested).
pub fn build_incremental(
    cache: &ClusterCache,
    ctx: &BuildContext,
    previous: &Built,
    touched: &BTreeSet<ObjectKey>,
) -> Built {
    if *previous.state.node != *ctx.node {
        return build(cache, ctx, Some(&previous.state));
    }
    let here = location(ctx);
    let is_touched = |k: &ServicePortKey| {
        touched.contains(&ObjectKey::new(
            k.name.namespace.clone(),
            k.name.name.clone(),
        ))
    };
    let mut services: BTreeMap<ServicePortKey, Arc<ServicePort>> = previous
        .state
        .services
        .iter()
        .filter(|(k, _)| !is_touched(k))
        .map(|(k, v)| (k.clone(), Arc::clone(v)))
        .collect();
    let mut skipped_by_service = previous.skipped_by_service.clone();
    for key in touched {
        skipped_by_service.remove(key);
        let Some(svc) = cache.service(key) else {
            continue;
        };
        let mut skipped = Vec::new();
        for port in service(cache, key, svc, here, &mut skipped) {
            let pkey = ServicePortKey {
                family: port.family,
                name: port.name.clone(),
            };
            let port = match previous.state.services.get(&pkey) {
                Some(old) if **old == port => Arc::clone(old),
                _ => Arc::new(port),
            };
            services.insert(pkey, port);
        }
        if !skipped.is_empty() {
            skipped_by_service.insert(key.clone(), skipped);
        }
    }
    Built {
        state: ProxyState {
            node: Arc::clone(&ctx.node),
            services,
        },
        skipped: skipped_by_service.values().flatten().cloned().collect(),
        skipped_by_service,
    }
}

fn location(ctx: &BuildContext) -> topology::Location<'_> {
    topology::Location {
        node: &ctx.node.node_name,
        zone: ctx
            .node_zone
            .as_deref()
            .filter(|z| ctx.node_labels_known && !z.is_empty()),
    }
}

/// Builds the desired state from the cache.
///
/// `previous`: a rebuilt service port equal to the one under the same key in `previous` reuses
/// its `Arc`, so a mode can skip unchanged services with `Arc::ptr_eq`.
pub fn build(cache: &ClusterCache, ctx: &BuildContext, previous: Option<&ProxyState>) -> Built {
    let mut skipped_by_service: BTreeMap<ObjectKey, Vec<Skipped>> = BTreeMap::new();
    let mut services = BTreeMap::new();
    let here = location(ctx);
    for (key, svc) in cache.services() {
        let mut skipped = Vec::new();
        let ports = service(cache, key, svc, here, &mut skipped);
        if !skipped.is_empty() {
            skipped_by_service.insert(key.clone(), skipped);
        }
        for port in ports {
            let key = ServicePortKey {
                family: port.family,
                name: port.name.clone(),
            };
            let port = match previous.and_then(|p| p.services.get(&key)) {
                Some(old) if **old == port => Arc::clone(old),
                _ => Arc::new(port),
            };
            services.insert(key, port);
        }
    }
    Built {
        state: ProxyState {
            node: Arc::clone(&ctx.node),
            services,
        },
        skipped: skipped_by_service.values().flatten().cloned().collect(),
        skipped_by_service,
    }
}

/// Every service port of one Service, both families.
fn service(
    cache: &ClusterCache,
    key: &ObjectKey,
    svc: &Service,
    here: topology::Location<'_>,
    skipped: &mut Vec<Skipped>,
) -> Vec<ServicePort> {
    // docs/semantics.md, rule 1: another proxy owns it. The API source already filters on
    // this label; manifests do not.
    if has_label(&svc.metadata.labels, SERVICE_PROXY_NAME_LABEL) {
        return Vec::new();
    }
    let Some(spec) = service_ports::parse(key, svc, skipped) else {
        return Vec::new();
    };
    if spec.ports.is_empty() {
        return Vec::new();
    }
    let slices: Vec<_> = cache
        .slices_for(key)
        .filter(|s| usable_slice(s))
        .filter_map(|s| endpoints::parse_slice(s, here.node, skipped))
        .collect();
    let mut out = Vec::with_capacity(spec.ports.len() * spec.cluster_ips.len());
    for family in IpFamily::ALL {
        for port in &spec.ports {
            let Some(mut sp) = spec.frontend(key, family, port) else {
                continue;
            };
            let candidates = endpoints::collect(&slices, family, &port.name, port.protocol);
            sp.endpoints = endpoints::categorize(&candidates, here);
            out.push(sp);
        }
    }
    out
}

/// docs/semantics.md, rule 1: slices of headless services, or owned by another proxy, are ignored.
fn usable_slice(slice: &EndpointSlice) -> bool {
    let labels = &slice.metadata.labels;
    !has_label(labels, HEADLESS_LABEL) && !has_label(labels, SERVICE_PROXY_NAME_LABEL)
}

fn has_label(labels: &Option<BTreeMap<String, String>>, label: &str) -> bool {
    labels.as_ref().is_some_and(|l| l.contains_key(label))
}
