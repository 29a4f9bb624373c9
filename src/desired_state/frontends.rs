//! Conflicting frontends (issue #20, item 12): two Services claiming the same address,
//! protocol and port (a ClusterIP, externalIP or LoadBalancer IP, including one Service's
//! externalIP on another's ClusterIP:port), or the same NodePort and protocol.
//!
//! The API server never allocates one ClusterIP or NodePort twice, but externalIPs and
//! LoadBalancer IPs are user-controlled and `--manifests` has no API server at all. Left in the
//! desired state, a conflict is resolved by each mode its own way (iptables: the first rule,
//! i.e. the Service that sorts first; nftables: the map element written last, the one that
//! sorts last), silently. Here it is resolved once, for every mode: the **older** Service keeps
//! the frontend (`metadata.creationTimestamp`; a Service without one counts as younger than any
//! with one; ties by namespace, then name), as the API server's allocation order would have it.
//! The younger one loses only the contested frontend (an externalIP or LoadBalancer IP on that
//! port, or its NodePort), or its whole service port when its own ClusterIP:port is the one
//! contested; each loss is reported once ([`Skipped`]) and counted.
//!
//! Every service port as its Service asks for it (the *candidate*) and every frontend's
//! claimants are kept in persistent maps ([`imbl`]: a clone is O(1)), so an incremental build
//! re-resolves only what the touched Services claimed or released, plus the Services whose
//! outcome changes because of that (a service port that appears or disappears changes what
//! younger claimants of its frontends get). The result is the same as a full build's: greedy
//! allocation in age order, where a service port that lost its ClusterIP claims nothing.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use crate::source::slim::Service;
use k8s_openapi::jiff::Timestamp;
use kproxy_contract::{IpFamily, Protocol, ServicePort, ServicePortKey, ServicePortName};

use super::parse;
use super::skipped::Skipped;
use crate::cache::{ClusterCache, ObjectKey};

/// A Service's age, which decides a conflict: older first, unknown (no creationTimestamp) last.
/// Ties are broken by namespace and name (the [`ServicePortKey`] order that follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct Age {
    unknown: bool,
    created: Option<Timestamp>,
}

impl Age {
    /// The age of `svc`.
    pub(crate) fn of(svc: &Service) -> Self {
        let created = svc.metadata.creation_timestamp.as_ref().map(|t| t.0);
        Self {
            unknown: created.is_none(),
            created,
        }
    }
}

/// One frontend that only one Service may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Frontend {
    /// `address . protocol . port`: a ClusterIP, externalIP or LoadBalancer IP.
    Address(IpAddr, Protocol, u16),
    /// A NodePort of one family (it is served on that family's node addresses).
    NodePort(IpFamily, Protocol, u16),
}

/// What kind of frontend a claim is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ClusterIp,
    ExternalIp,
    LoadBalancerIp,
    NodePort,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::ExternalIp => "externalIP",
            Self::LoadBalancerIp => "LoadBalancer IP",
            Self::NodePort => "NodePort",
        }
    }
}

/// Every frontend a service port claims, its ClusterIP first.
fn claims(sp: &ServicePort) -> impl Iterator<Item = (Frontend, Kind)> + '_ {
    let proto = sp.name.protocol;
    let address = move |ip: IpAddr, kind| (Frontend::Address(ip, proto, sp.port), kind);
    sp.cluster_ip
        .map(|ip| address(ip, Kind::ClusterIp))
        .into_iter()
        .chain(
            sp.external_ips
                .iter()
                .map(move |ip| address(*ip, Kind::ExternalIp)),
        )
        .chain(
            sp.load_balancer_ips
                .iter()
                .map(move |ip| address(*ip, Kind::LoadBalancerIp)),
        )
        .chain(
            sp.node_port
                .map(|np| (Frontend::NodePort(sp.family, proto, np), Kind::NodePort)),
        )
}

/// A service port as its Service asks for it, before conflicts are resolved.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    /// Its Service's age.
    pub age: Age,
    /// The service port with every frontend it asks for.
    pub port: Arc<ServicePort>,
}

/// A service port's key, shared by the index's entries.
type Key = Arc<ServicePortKey>;

/// Who claims a frontend: the claimants' ages and service ports, oldest first (usually one).
type Claimants = Vec<(Age, Key)>;

/// The frontend index kept between builds (see the module documentation).
#[derive(Debug, Clone, Default)]
pub(crate) struct Frontends {
    /// Every service port as asked for.
    candidates: imbl::OrdMap<Key, Candidate>,
    /// Every frontend's claimants. A B-tree rather than `imbl::HashMap`, whose trie nodes
    /// have room for 32 entries however few they hold: at 50,000 services the hash map's
    /// nodes were 15 MiB of the heap, and the process peaked 10 MiB higher (issue #17).
    claimants: imbl::OrdMap<Frontend, Claimants>,
    /// What each service port lost to an older Service, as reported.
    lost: imbl::OrdMap<ServicePortKey, Arc<Vec<Skipped>>>,
}

/// Whether `a` belongs to a strictly older Service than `b` (and not to the same one).
fn older(a: (&Age, &ServicePortKey), b: (&Age, &ServicePortKey)) -> bool {
    (a.0, a.1.family, &a.1.name.namespace, &a.1.name.name)
        < (b.0, b.1.family, &b.1.name.namespace, &b.1.name.name)
}

fn same_service(a: &ServicePortKey, b: &ServicePortKey) -> bool {
    a.name.namespace == b.name.namespace && a.name.name == b.name.name
}

/// The resolved ports, as the resolution reads and writes them.
pub(crate) type Resolved = std::collections::BTreeMap<ServicePortKey, Arc<ServicePort>>;

impl Frontends {
    /// Adds a candidate (replacing none: the caller removed the old one first).
    pub(crate) fn insert(&mut self, key: ServicePortKey, candidate: Candidate) {
        let key = Arc::new(key);
        for (fe, _) in claims(&candidate.port) {
            let entry = (candidate.age, Arc::clone(&key));
            let list = self.claimants.entry(fe).or_default();
            let at = list.partition_point(|e| *e < entry);
            list.insert(at, entry);
        }
        self.candidates.insert(key, candidate);
    }

    /// Removes a candidate; returns it.
    pub(crate) fn remove(&mut self, key: &ServicePortKey) -> Option<Candidate> {
        let candidate = self.candidates.remove(key)?;
        for (fe, _) in claims(&candidate.port) {
            if let Some(list) = self.claimants.get_mut(&fe) {
                list.retain(|(_, k)| **k != *key);
                if list.is_empty() {
                    self.claimants.remove(&fe);
                }
            }
        }
        self.lost.remove(key);
        Some(candidate)
    }

    /// The candidates of one Service (both families), in key order: a range per family.
    pub(crate) fn of_service(&self, svc: &ObjectKey) -> Vec<ServicePortKey> {
        let mut out = Vec::new();
        for family in IpFamily::ALL {
            let first = ServicePortKey {
                family,
                name: ServicePortName {
                    namespace: svc.namespace.clone(),
                    name: svc.name.clone(),
                    port: "".into(),
                    protocol: Protocol::Tcp,
                },
            };
            out.extend(
                self.candidates
                    .range(first..)
                    .map(|(k, _)| &**k)
                    .take_while(|k| {
                        k.family == family
                            && k.name.namespace == svc.namespace
                            && k.name.name == svc.name
                    })
                    .cloned(),
            );
        }
        out
    }

    /// Every candidate, oldest Service first (the order of a full resolution).
    fn in_age_order(&self) -> Vec<(Age, Key, Candidate)> {
        let mut all: Vec<(Age, Key, Candidate)> = self
            .candidates
            .iter()
            .map(|(k, c)| (c.age, Arc::clone(k), c.clone()))
            .collect();
        // Already in key order: a stable sort by age alone gives (age, key) order, and costs
        // next to nothing when most ages are equal (no string comparisons).
        all.sort_by_key(|e| e.0);
        all
    }

    /// The oldest alive claimant of `fe` from a Service older than `me`, if any.
    fn holder<'a>(
        &'a self,
        fe: &Frontend,
        me: (&Age, &ServicePortKey),
        resolved: &Resolved,
    ) -> Option<&'a ServicePortKey> {
        self.claimants
            .get(fe)?
            .iter()
            .take_while(|(a, k)| older((a, k), me))
            .find(|(_, k)| !same_service(k, me.1) && resolved.contains_key(&**k))
            .map(|(_, k)| &**k)
    }

    /// Resolves one service port against the already resolved older ones: what it keeps
    /// (`None`: nothing, its ClusterIP:port is taken) and what it lost.
    fn resolve_one(
        &self,
        key: &ServicePortKey,
        candidate: &Candidate,
        resolved: &Resolved,
        cache: &ClusterCache,
    ) -> (Option<Arc<ServicePort>>, Vec<Skipped>) {
        let me = (&candidate.age, key);
        let sp = &candidate.port;
        let mut lost = Vec::new();
        let mut port: Option<ServicePort> = None;
        for (fe, kind) in claims(sp) {
            let Some(holder) = self.holder(&fe, me, resolved) else {
                continue;
            };
            lost.push(self.report(key, sp, fe, kind, holder, cache));
            if kind == Kind::ClusterIp {
                return (None, lost);
            }
            let p = port.get_or_insert_with(|| (**sp).clone());
            match (kind, fe) {
                (Kind::ExternalIp, Frontend::Address(ip, ..)) => {
                    p.external_ips.retain(|a| *a != ip);
                }
                (Kind::LoadBalancerIp, Frontend::Address(ip, ..)) => {
                    p.load_balancer_ips.retain(|a| *a != ip);
                }
                (Kind::NodePort, _) => p.node_port = None,
                _ => {}
            }
        }
        (Some(port.map_or_else(|| Arc::clone(sp), Arc::new)), lost)
    }

    /// The report of one lost frontend: the Service's field, the frontend and who holds it.
    fn report(
        &self,
        key: &ServicePortKey,
        sp: &ServicePort,
        fe: Frontend,
        kind: Kind,
        holder: &ServicePortKey,
        cache: &ClusterCache,
    ) -> Skipped {
        let object = ObjectKey::new(key.name.namespace.clone(), key.name.name.clone());
        let svc = cache.service(&object);
        let proto = key.name.protocol.as_str().to_uppercase();
        let held_as = self
            .candidates
            .get(holder)
            .and_then(|c| claims(&c.port).find(|(f, _)| *f == fe))
            .map_or("frontend", |(_, k)| k.as_str());
        let by = format!(
            "the older Service {}/{}",
            holder.name.namespace, holder.name.name
        );
        let (field, what, lost) = match fe {
            Frontend::Address(ip, _, port) => (
                field_of(svc.map(AsRef::as_ref), kind, ip, sp),
                format!("{ip}:{port}/{proto}"),
                match kind {
                    Kind::ClusterIp => "service port skipped",
                    _ => "address skipped for this port",
                },
            ),
            Frontend::NodePort(_, _, port) => (
                field_of(svc.map(AsRef::as_ref), kind, IpAddr::from([0, 0, 0, 0]), sp),
                format!("NodePort {port}/{proto}"),
                "NodePort skipped",
            ),
        };
        Skipped::service(
            &object,
            field,
            format!("{what} is already the {held_as} of {by}; {lost}"),
        )
    }

    /// Resolves every service port from scratch into `resolved`; `lost` is rebuilt. `reuse`
    /// may swap a resolved port for an equal one (the previous build's `Arc`).
    pub(crate) fn resolve_all(
        &mut self,
        resolved: &mut Resolved,
        reuse: impl Fn(&ServicePortKey, Arc<ServicePort>) -> Arc<ServicePort>,
        cache: &ClusterCache,
    ) {
        let mut all_lost = imbl::OrdMap::new();
        for (_, key, candidate) in self.in_age_order() {
            let (port, lost) = self.resolve_one(&key, &candidate, resolved, cache);
            if let Some(port) = port {
                let port = if Arc::ptr_eq(&port, &candidate.port) {
                    port
                } else {
                    reuse(&key, port)
                };
                resolved.insert((*key).clone(), port);
            }
            if !lost.is_empty() {
                all_lost.insert((*key).clone(), Arc::new(lost));
            }
        }
        self.lost = all_lost;
    }

    /// Re-resolves after the candidates of some Services were replaced: `seeds` are their
    /// service ports, old and new, and `released` the frontends of the old ones. Only the
    /// claimants of those frontends and of the new ones' are looked at, oldest first, and,
    /// when a service port appears or disappears, the younger claimants of its frontends in
    /// turn (a service port that keeps existing affects no one: younger claimants lose to any
    /// existing older claimant, whatever it holds).
    pub(crate) fn resolve_changed(
        &mut self,
        seeds: &BTreeSet<ServicePortKey>,
        released: &[Frontend],
        resolved: &mut Resolved,
        reuse: impl Fn(&ServicePortKey, Arc<ServicePort>) -> Arc<ServicePort>,
        cache: &ClusterCache,
    ) {
        let mut queue: BTreeSet<(Age, Key)> = BTreeSet::new();
        let enqueue_claimants = |queue: &mut BTreeSet<(Age, Key)>, fe: &Frontend| {
            if let Some(list) = self.claimants.get(fe) {
                queue.extend(list.iter().cloned());
            }
        };
        for fe in released {
            enqueue_claimants(&mut queue, fe);
        }
        for key in seeds {
            match self.candidates.get_key_value(key) {
                Some((k, c)) => {
                    queue.insert((c.age, Arc::clone(k)));
                    for (fe, _) in claims(&c.port) {
                        enqueue_claimants(&mut queue, &fe);
                    }
                }
                None => {
                    resolved.remove(key);
                    self.lost.remove(key);
                }
            }
        }
        while let Some((age, key)) = queue.pop_first() {
            let Some(candidate) = self.candidates.get(&key).cloned() else {
                continue;
            };
            let (port, lost) = self.resolve_one(&key, &candidate, resolved, cache);
            let was_alive = resolved.contains_key(&*key);
            let alive = port.is_some();
            match port {
                Some(p) => {
                    let p = reuse(&key, p);
                    resolved.insert((*key).clone(), p);
                }
                None => {
                    resolved.remove(&*key);
                }
            }
            if lost.is_empty() {
                self.lost.remove(&*key);
            } else {
                self.lost.insert((*key).clone(), Arc::new(lost));
            }
            if was_alive != alive || seeds.contains(&*key) {
                for (fe, _) in claims(&candidate.port) {
                    if let Some(list) = self.claimants.get(&fe) {
                        queue.extend(
                            list.iter()
                                .filter(|(a, k)| older((&age, &key), (a, k)))
                                .cloned(),
                        );
                    }
                }
            }
        }
    }

    /// What every service port lost, in key order.
    pub(crate) fn lost(&self) -> impl Iterator<Item = &Skipped> {
        self.lost.values().flat_map(|v| v.iter())
    }

    /// How many frontends are withheld because an older Service holds them.
    pub(crate) fn conflicts(&self) -> usize {
        self.lost.values().map(|v| v.len()).sum()
    }

    /// The frontends a candidate claims.
    pub(crate) fn frontends_of(candidate: &Candidate) -> Vec<Frontend> {
        claims(&candidate.port).map(|(f, _)| f).collect()
    }
}

/// The field of `svc` a lost frontend came from, with its index where the object has it.
fn field_of(svc: Option<&Service>, kind: Kind, ip: IpAddr, sp: &ServicePort) -> String {
    let spec = svc.and_then(|s| s.spec.as_ref());
    let position = |list: Option<&[String]>| {
        list.unwrap_or_default()
            .iter()
            .position(|r| parse::ip(r) == Some(ip))
    };
    match kind {
        Kind::ClusterIp => match position(spec.and_then(|s| s.cluster_ips.as_deref())) {
            Some(i) => format!("spec.clusterIPs[{i}]"),
            None => "spec.clusterIP".into(),
        },
        Kind::ExternalIp => match position(spec.and_then(|s| s.external_ips.as_deref())) {
            Some(i) => format!("spec.externalIPs[{i}]"),
            None => "spec.externalIPs".into(),
        },
        Kind::LoadBalancerIp => {
            let ingress = svc
                .map(super::service_ports::ingress_ips)
                .unwrap_or_default();
            match position(Some(&ingress)) {
                Some(i) => format!("status.loadBalancer.ingress[{i}].ip"),
                None => "status.loadBalancer.ingress".into(),
            }
        }
        Kind::NodePort => {
            let i = spec
                .and_then(|s| s.ports.as_deref())
                .unwrap_or_default()
                .iter()
                .position(|p| {
                    p.name.as_deref().unwrap_or_default() == &*sp.name.port
                        && parse::protocol(p.protocol.as_deref()).ok() == Some(sp.name.protocol)
                });
            match i {
                Some(i) => format!("spec.ports[{i}].nodePort"),
                None => "spec.ports.nodePort".into(),
            }
        }
    }
}
