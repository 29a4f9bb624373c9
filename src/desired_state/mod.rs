//! The desired state: the pure translation from Services, EndpointSlices and the Node to one
//! [`ProxyState`]. Every Kubernetes rule is decided here, so modes never see an API object.
//!
//! * [`service_ports`]: Service → frontends (ClusterIPs, ports, externalIPs, LB IPs, policies).
//! * [`endpoints`]: EndpointSlices → the Cluster and Local endpoint lists of a service port.
//! * [`topology`]: which ready endpoints topology hints keep.
//! * [`admission`]: the addresses a Service may not claim and an endpoint may not be (special
//!   addresses, the node's own, and with `--manifests` what the API server would refuse).
//! * [`frontends`]: conflicting frontends across Services, resolved once for every mode (the
//!   older Service wins).
//! * [`Skipped`]: the invalid input left out, for the caller to log once.
//!
//! The build is a full, deterministic recomputation from the cache (no change tracking as in
//! upstream's `ServiceChangeTracker`/`EndpointsChangeTracker`): simpler to get right, and the
//! `previous` snapshot restores sharing, so unchanged service ports stay pointer-equal.
//! [`build_incremental`] rebuilds only the touched Services and re-resolves only the frontends
//! they claim or release, with the same result (a property test holds it to a full build).

mod admission;
mod endpoints;
mod frontends;
mod parse;
mod service_ports;
mod skipped;
mod topology;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::source::slim::Service;
use kproxy_contract::{IpFamily, NodeSettings, ProxyState, ServicePort, ServicePortKey};

pub use admission::{Admission, ManifestChecks};
pub use service_ports::{DEFAULT_AFFINITY_TIMEOUT_SECS, MAX_AFFINITY_TIMEOUT_SECS};
pub use skipped::Skipped;

use crate::cache::{ClusterCache, ObjectKey};
use crate::source::SERVICE_PROXY_NAME_LABEL;
use crate::source::slim::Slice;
use frontends::{Age, Candidate, Frontends};

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
    /// Which addresses and ports Services may claim (from the configuration).
    pub admission: Arc<Admission>,
}

impl BuildContext {
    /// The context of a build for `config`, with this Node object (if seen) and these local
    /// addresses (they only select the NodePort addresses).
    pub fn new(
        config: &crate::config::Config,
        node: Option<&k8s_openapi::api::core::v1::Node>,
        local: &[std::net::IpAddr],
    ) -> Self {
        Self {
            node: Arc::new(crate::node::settings(config, node, local)),
            node_zone: crate::node::zone(node),
            node_labels_known: node.is_some(),
            admission: Arc::new(Admission::from_config(config)),
        }
    }

    fn guard(&self) -> admission::Guard<'_> {
        admission::Guard {
            admission: &self.admission,
            node: &self.node,
        }
    }
}

/// The result of one build.
#[derive(Debug, Clone, Default)]
pub struct Built {
    /// The desired state.
    pub state: ProxyState,
    /// Invalid input that was left out, in a stable order.
    pub skipped: Vec<Skipped>,
    /// The same, per Service (so an incremental build can keep the untouched ones'). Frontends
    /// lost to an older Service are not here (they change with other Services).
    pub skipped_by_service: BTreeMap<ObjectKey, Vec<Skipped>>,
    /// The admission rules this build applied.
    pub(crate) admission: Arc<Admission>,
    /// Every service port as asked for and every frontend's claimants, for the next
    /// incremental build.
    pub(crate) frontends: Frontends,
}

impl Built {
    /// How many frontends are withheld because an older Service holds them
    /// (`kproxy_frontend_conflicts`).
    pub fn frontend_conflicts(&self) -> usize {
        self.frontends.conflicts()
    }
}

/// `port`, or the previous build's equal port under the same key (pointer equality for the
/// modes' caches).
fn reuse(
    previous: Option<&ProxyState>,
    key: &ServicePortKey,
    port: Arc<ServicePort>,
) -> Arc<ServicePort> {
    match previous.and_then(|p| p.services.get(key)) {
        Some(old) if Arc::ptr_eq(old, &port) || **old == *port => Arc::clone(old),
        _ => port,
    }
}

/// The report list: per-Service findings in key order, then lost frontends in key order.
fn all_skipped(
    skipped_by_service: &BTreeMap<ObjectKey, Vec<Skipped>>,
    frontends: &Frontends,
) -> Vec<Skipped> {
    skipped_by_service
        .values()
        .flatten()
        .chain(frontends.lost())
        .cloned()
        .collect()
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
    if *previous.state.node != *ctx.node || *previous.admission != *ctx.admission {
        return build(cache, ctx, Some(&previous.state));
    }
    let here = location(ctx);
    let guard = ctx.guard();
    let prev = Some(&previous.state);
    // O(1) clones (persistent maps); the services map is copied as before.
    let mut frontends = previous.frontends.clone();
    let mut services = previous.state.services.clone();
    let mut skipped_by_service = previous.skipped_by_service.clone();
    let mut seeds: BTreeSet<ServicePortKey> = BTreeSet::new();
    let mut released = Vec::new();
    for key in touched {
        skipped_by_service.remove(key);
        for pkey in frontends.of_service(key) {
            if let Some(old) = frontends.remove(&pkey) {
                released.extend(Frontends::frontends_of(&old));
            }
            services.remove(&pkey);
            seeds.insert(pkey);
        }
        let Some(svc) = cache.service(key) else {
            continue;
        };
        let mut skipped = Vec::new();
        let age = Age::of(svc);
        for port in service(cache, key, svc, here, guard, &mut skipped) {
            let pkey = ServicePortKey {
                family: port.family,
                name: port.name.clone(),
            };
            let port = reuse(prev, &pkey, Arc::new(port));
            frontends.insert(pkey.clone(), Candidate { age, port });
            seeds.insert(pkey);
        }
        if !skipped.is_empty() {
            skipped_by_service.insert(key.clone(), skipped);
        }
    }
    frontends.resolve_changed(
        &seeds,
        &released,
        &mut services,
        |k, p| reuse(prev, k, p),
        cache,
    );
    Built {
        state: ProxyState {
            node: Arc::clone(&ctx.node),
            services,
        },
        skipped: all_skipped(&skipped_by_service, &frontends),
        skipped_by_service,
        admission: Arc::clone(&ctx.admission),
        frontends,
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
    let mut frontends = Frontends::default();
    let here = location(ctx);
    let guard = ctx.guard();
    for (key, svc) in cache.services() {
        let mut skipped = Vec::new();
        let ports = service(cache, key, svc, here, guard, &mut skipped);
        if !skipped.is_empty() {
            skipped_by_service.insert(key.clone(), skipped);
        }
        let age = Age::of(svc);
        for port in ports {
            let key = ServicePortKey {
                family: port.family,
                name: port.name.clone(),
            };
            let port = reuse(previous, &key, Arc::new(port));
            frontends.insert(key, Candidate { age, port });
        }
    }
    let mut services = BTreeMap::new();
    frontends.resolve_all(&mut services, |k, p| reuse(previous, k, p), cache);
    Built {
        state: ProxyState {
            node: Arc::clone(&ctx.node),
            services,
        },
        skipped: all_skipped(&skipped_by_service, &frontends),
        skipped_by_service,
        admission: Arc::clone(&ctx.admission),
        frontends,
    }
}

/// Every service port of one Service, both families.
fn service(
    cache: &ClusterCache,
    key: &ObjectKey,
    svc: &Service,
    here: topology::Location<'_>,
    guard: admission::Guard<'_>,
    skipped: &mut Vec<Skipped>,
) -> Vec<ServicePort> {
    // docs/semantics.md, rule 1: another proxy owns it. The API source already filters on
    // this label; manifests do not.
    if has_label(&svc.metadata.labels, SERVICE_PROXY_NAME_LABEL) {
        return Vec::new();
    }
    let Some(spec) = service_ports::parse(key, svc, guard, skipped) else {
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
fn usable_slice(slice: &Slice) -> bool {
    !slice.not_proxied
}

fn has_label(labels: &Option<BTreeMap<String, String>>, label: &str) -> bool {
    labels.as_ref().is_some_and(|l| l.contains_key(label))
}
