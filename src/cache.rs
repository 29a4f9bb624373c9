//! The last-seen Services, EndpointSlices and Node, as the sources reported them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::Node;

use crate::source::slim::{Service, Slice};
use crate::source::{Change, Update};

/// `namespace/name` of an object. Shared strings, as in [`kproxy_contract::ServicePortName`],
/// which takes them from here: a key is held by the cache's maps and by every service port
/// built from the object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Namespace (empty for cluster-scoped objects).
    pub namespace: Arc<str>,
    /// Name.
    pub name: Arc<str>,
}

impl ObjectKey {
    /// The key of a namespaced object.
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of a Service.
    pub fn of_service(svc: &Service) -> Self {
        Self::named(&svc.metadata.namespace, &svc.metadata.name)
    }

    /// The key of an EndpointSlice.
    pub fn of_slice(slice: &Slice) -> Self {
        Self::named(&slice.metadata.namespace, &slice.metadata.name)
    }

    fn named(namespace: &Option<String>, name: &Option<String>) -> Self {
        Self::new(
            namespace.as_deref().unwrap_or_default(),
            name.as_deref().unwrap_or_default(),
        )
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// What an update touched.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Touched {
    /// Services whose Service object or EndpointSlices changed.
    pub services: BTreeSet<ObjectKey>,
    /// Something node-wide changed (the Node object, or a whole kind was reset).
    pub everything: bool,
    /// Service objects added, changed or removed (for the change counters).
    pub service_changes: usize,
    /// EndpointSlice objects added, changed or removed.
    pub endpoint_changes: usize,
    /// `endpoints.kubernetes.io/last-change-trigger-time` of changed EndpointSlices, when later
    /// than kproxy's start: what network-programming latency is measured from.
    pub trigger_times: Vec<SystemTime>,
}

impl Touched {
    /// Merges another set of touched objects into this one.
    pub fn merge(&mut self, other: Touched) {
        self.services.extend(other.services);
        self.everything |= other.everything;
        self.service_changes += other.service_changes;
        self.endpoint_changes += other.endpoint_changes;
        self.trigger_times.extend(other.trigger_times);
    }

    /// Whether nothing was touched.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && !self.everything
    }
}

/// The annotation the EndpointSlice controller stamps with the time of the change that caused
/// the slice's last update.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The objects kproxy knows, indexed the way the desired-state builder reads them.
#[derive(Debug, Default)]
pub struct ClusterCache {
    /// Trigger times before this are not measured (upstream's tracker start time): the initial
    /// list carries changes made long before kproxy ran.
    measure_after: Option<SystemTime>,
    services: BTreeMap<ObjectKey, Arc<Service>>,
    slices: BTreeMap<ObjectKey, Arc<Slice>>,
    /// Service key → keys of its EndpointSlices (through the `kubernetes.io/service-name` label).
    slices_by_service: BTreeMap<ObjectKey, SliceKeys>,
    node: Option<Arc<Node>>,
    services_synced: bool,
    slices_synced: bool,
    /// Whether the Node watch has reported at least once (the Node listed, present or not).
    node_listed: bool,
}

impl ClusterCache {
    /// A cache that records trigger times later than `start`.
    pub fn measuring_after(start: SystemTime) -> Self {
        Self {
            measure_after: Some(start),
            ..Self::default()
        }
    }

    fn trigger_time(&self, slice: &Slice) -> Option<SystemTime> {
        let after = self.measure_after?;
        let text = slice.metadata.trigger_time.as_deref()?;
        let t = humantime::parse_rfc3339_weak(text.trim()).ok()?;
        (t > after).then_some(t)
    }

    /// Applies one update and says what it touched.
    pub fn apply(&mut self, update: Update) -> Touched {
        match update {
            Update::Services(change) => self.apply_services(change),
            Update::EndpointSlices(change) => self.apply_slices(change),
            Update::Node(change) => {
                let node = match change {
                    Change::Reset(nodes) => nodes.into_iter().next(),
                    Change::Apply(node) => Some(node),
                    Change::Delete(_) => None,
                };
                // A relist (or a manifests reload) repeats an unchanged Node: that must not turn
                // every following sync into a full rebuild.
                let changed = node.as_deref() != self.node.as_deref();
                self.node = node;
                self.node_listed = true;
                Touched {
                    everything: changed,
                    ..Touched::default()
                }
            }
            // The sync loop handles status before the cache; it touches no object.
            Update::Status(_) => Touched::default(),
        }
    }

    fn apply_services(&mut self, change: Change<Arc<Service>>) -> Touched {
        let mut touched = Touched::default();
        match change {
            Change::Reset(all) => {
                let new: BTreeMap<_, _> = all
                    .into_iter()
                    .map(|s| (ObjectKey::of_service(&s), s))
                    .collect();
                let changed = diff_keys(&self.services, &new);
                touched.service_changes += changed.len();
                touched.services.extend(changed);
                self.services = new;
                self.services_synced = true;
            }
            Change::Apply(svc) => {
                let key = ObjectKey::of_service(&svc);
                self.services.insert(key.clone(), svc);
                touched.services.insert(key);
                touched.service_changes += 1;
            }
            Change::Delete(svc) => {
                let key = ObjectKey::of_service(&svc);
                self.services.remove(&key);
                touched.services.insert(key);
                touched.service_changes += 1;
            }
        }
        touched
    }

    fn apply_slices(&mut self, change: Change<Arc<Slice>>) -> Touched {
        let mut touched = Touched::default();
        match change {
            Change::Reset(all) => {
                let new: BTreeMap<_, _> = all
                    .into_iter()
                    .map(|s| (ObjectKey::of_slice(&s), s))
                    .collect();
                for key in diff_keys(&self.slices, &new) {
                    let old = self.slices.get(&key).and_then(|s| service_of(s));
                    let cur = new.get(&key).and_then(|s| service_of(s));
                    touched.services.extend(old.into_iter().chain(cur));
                    touched.endpoint_changes += 1;
                    if let Some(t) = new.get(&key).and_then(|s| self.trigger_time(s)) {
                        touched.trigger_times.push(t);
                    }
                }
                self.slices = new;
                self.slices_by_service.clear();
                for (key, slice) in &self.slices {
                    if let Some(svc) = service_of(slice) {
                        self.slices_by_service
                            .entry(svc)
                            .or_default()
                            .insert(key.clone());
                    }
                }
                self.slices_synced = true;
            }
            Change::Apply(slice) => {
                let key = ObjectKey::of_slice(&slice);
                touched.endpoint_changes += 1;
                touched.trigger_times.extend(self.trigger_time(&slice));
                if let Some(old) = self.remove_slice(&key) {
                    touched.services.insert(old);
                }
                if let Some(svc) = service_of(&slice) {
                    self.slices_by_service
                        .entry(svc.clone())
                        .or_default()
                        .insert(key.clone());
                    touched.services.insert(svc);
                }
                self.slices.insert(key, slice);
            }
            Change::Delete(slice) => {
                touched.endpoint_changes += 1;
                if let Some(old) = self.remove_slice(&ObjectKey::of_slice(&slice)) {
                    touched.services.insert(old);
                }
            }
        }
        touched
    }

    /// Removes a slice; returns the service it belonged to.
    fn remove_slice(&mut self, key: &ObjectKey) -> Option<ObjectKey> {
        let old = self.slices.remove(key)?;
        let svc = service_of(&old)?;
        if let Some(set) = self.slices_by_service.get_mut(&svc) {
            set.remove(key);
            if set.is_empty() {
                self.slices_by_service.remove(&svc);
            }
        }
        Some(svc)
    }

    /// Whether both Services and EndpointSlices have been listed once (upstream's
    /// `isInitialized`): no rule is written before that.
    pub fn is_synced(&self) -> bool {
        self.services_synced && self.slices_synced
    }

    /// Whether the Node watch has reported at least once (whether or not the Node exists): the
    /// NodeCIDR local-traffic detector needs its `spec.podCIDRs` before the first sync.
    pub fn node_listed(&self) -> bool {
        self.node_listed
    }

    /// Every Service, by key.
    pub fn services(&self) -> impl Iterator<Item = (&ObjectKey, &Arc<Service>)> {
        self.services.iter()
    }

    /// One Service.
    pub fn service(&self, key: &ObjectKey) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    /// The EndpointSlices that belong to a Service.
    pub fn slices_for<'a>(
        &'a self,
        service: &ObjectKey,
    ) -> impl Iterator<Item = &'a Arc<Slice>> + 'a {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flat_map(SliceKeys::iter)
            .filter_map(|k| self.slices.get(k))
    }

    /// Every EndpointSlice.
    pub fn slices(&self) -> impl Iterator<Item = &Arc<Slice>> {
        self.slices.values()
    }

    /// This node's Node object, once seen.
    pub fn node(&self) -> Option<&Arc<Node>> {
        self.node.as_ref()
    }
}

/// The keys of one Service's EndpointSlices, sorted: a `Vec`, because nearly every Service has
/// one or two slices, and a `BTreeSet` allocates a node of eleven keys (528 bytes) for one.
#[derive(Debug, Default)]
struct SliceKeys(Vec<ObjectKey>);

impl SliceKeys {
    fn insert(&mut self, key: ObjectKey) {
        if let Err(at) = self.0.binary_search(&key) {
            self.0.insert(at, key);
        }
    }

    fn remove(&mut self, key: &ObjectKey) {
        if let Ok(at) = self.0.binary_search(key) {
            self.0.remove(at);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> std::slice::Iter<'_, ObjectKey> {
        self.0.iter()
    }
}

/// The Service an EndpointSlice belongs to, from its `kubernetes.io/service-name` label.
pub fn service_of(slice: &Slice) -> Option<ObjectKey> {
    let name = slice.service_name.as_deref()?;
    Some(ObjectKey::new(
        slice.metadata.namespace.as_deref().unwrap_or_default(),
        name,
    ))
}

/// Keys added, removed or whose object changed between two maps.
fn diff_keys<K: Ord + Clone, V: PartialEq>(
    old: &BTreeMap<K, Arc<V>>,
    new: &BTreeMap<K, Arc<V>>,
) -> Vec<K> {
    let mut out: Vec<K> = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    out.extend(
        new.iter()
            .filter(|(k, v)| old.get(*k).is_none_or(|o| o != *v))
            .map(|(k, _)| k.clone()),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unchanged_node_touches_nothing() {
        let node: Node =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "n"}})).expect("node");
        let mut cache = ClusterCache::default();
        assert!(
            cache
                .apply(Update::Node(Change::Reset(vec![node.clone()]).shared()))
                .everything
        );
        assert!(
            cache
                .apply(Update::Node(Change::Reset(vec![node.clone()]).shared()))
                .is_empty()
        );
        let mut relabelled = node;
        relabelled.metadata.labels =
            Some([("topology.kubernetes.io/zone".into(), "z".into())].into());
        assert!(
            cache
                .apply(Update::Node(Change::Apply(relabelled).shared()))
                .everything
        );
    }
}
