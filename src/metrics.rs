//! `/metrics` in Prometheus (OpenMetrics) text, with upstream kube-proxy's metric names and
//! buckets so existing dashboards keep working, plus kproxy's own `kproxy_*` metrics.
//!
//! Upstream metrics not exported, and why:
//! * the `ip_family` label: kproxy syncs both families in one transaction per sync, so a sync's
//!   duration belongs to both; per-family object counts carry the label;
//! * `kubeproxy_sync_proxy_rules_iptables_last` and `..._iptables_partial_restore_failures_total`:
//!   every kproxy restore is partial (only changed chains), so these would duplicate
//!   `kproxy_objects_added_total` and the restore-failure counter;
//! * `kubeproxy_iptables_ct_state_invalid_dropped_packets_total` and
//!   `..._localhost_nodeports_accepted_packets_total`: they need nfacct objects in the kernel;
//! * the client-go and Go runtime families (kproxy is not Go); the process family is exported.

mod follow;
pub mod process;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use kproxy_contract::ModeName;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `code` label of the health counters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CodeLabel {
    /// HTTP status code.
    pub code: u16,
}

/// `traffic_policy` label of the no-local-endpoints gauge.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PolicyLabel {
    /// `internal` or `external`.
    pub traffic_policy: &'static str,
}

/// Labels of the per-table iptables rule gauge (upstream's names).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TableLabel {
    /// `nat` or `filter`.
    pub table: &'static str,
    /// `IPv4` or `IPv6`, as upstream spells it.
    pub ip_family: &'static str,
}

/// Labels of `kproxy_kernel_objects`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ObjectLabel {
    /// `IPv4` or `IPv6`.
    pub ip_family: &'static str,
    /// The table (or `ipvs`, `userspace`).
    pub table: &'static str,
    /// What is counted.
    pub kind: &'static str,
}

/// Labels of `kproxy_unbound_listeners`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ListenerLabel {
    /// `healthz`, `metrics`, `health_check_node_port` or `admin`.
    pub listener: &'static str,
}

/// Every metric kproxy exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    full_sync_duration: Histogram,
    partial_sync_duration: Histogram,
    apply_duration: Histogram,
    last_sync: Gauge<f64, AtomicU64>,
    last_queued: Gauge<f64, AtomicU64>,
    sync_failures: Counter,
    objects_added: Counter,
    objects_removed: Counter,
    service_ports: Gauge,
    skipped_objects: Gauge,
    frontend_conflicts: Gauge,
    conntrack_deleted: Counter,
    conntrack_duration: Histogram,
    network_programming: Histogram,
    endpoint_changes_pending: Gauge,
    endpoint_changes_total: Counter,
    service_changes_pending: Gauge,
    service_changes_total: Counter,
    source_removals_held: Counter,
    no_local_endpoints: Family<PolicyLabel, Gauge>,
    iptables_rules: Family<TableLabel, Gauge>,
    kernel_objects: Family<ObjectLabel, Gauge>,
    unbound_listeners: Family<ListenerLabel, Gauge>,
    process: process::ProcessMetrics,
    /// `/healthz` answers by status code.
    pub healthz: Family<CodeLabel, Counter>,
    /// `/livez` answers by status code.
    pub livez: Family<CodeLabel, Counter>,
}

/// Upstream's sync-duration buckets: 1 ms doubling, 15 buckets (up to about 16 s).
fn sync_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Upstream's network-programming buckets: 0.25 s and 0.5 s, every second to 59 s, every 5 s to
/// 115 s, every 30 s to 5 min.
fn programming_buckets() -> Histogram {
    let buckets = [0.25, 0.5]
        .into_iter()
        .chain((1..=59).map(f64::from))
        .chain((0..12).map(|i| 60.0 + 5.0 * f64::from(i)))
        .chain((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    Histogram::new(buckets)
}

/// One sync, as the metrics see it.
#[derive(Debug, Clone, Copy)]
pub struct SyncObservation {
    /// Whether the live state was read back.
    pub full: bool,
    /// Whole sync.
    pub duration: Duration,
    /// Kernel apply only.
    pub apply: Duration,
    /// Objects added and removed.
    pub added: usize,
    /// Objects removed.
    pub removed: usize,
    /// Service ports programmed.
    pub service_ports: usize,
    /// Invalid objects skipped.
    pub skipped: usize,
    /// Frontends withheld from a Service because an older one holds them.
    pub frontend_conflicts: usize,
}

impl Metrics {
    /// Registers everything; the failure counter is named for the mode as upstream names it.
    pub fn new(mode: ModeName) -> Self {
        let mut registry = Registry::default();
        let m = Self {
            sync_duration: sync_buckets(),
            full_sync_duration: sync_buckets(),
            partial_sync_duration: sync_buckets(),
            apply_duration: sync_buckets(),
            last_sync: Gauge::default(),
            last_queued: Gauge::default(),
            sync_failures: Counter::default(),
            objects_added: Counter::default(),
            objects_removed: Counter::default(),
            service_ports: Gauge::default(),
            skipped_objects: Gauge::default(),
            frontend_conflicts: Gauge::default(),
            conntrack_deleted: Counter::default(),
            conntrack_duration: sync_buckets(),
            network_programming: programming_buckets(),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            source_removals_held: Counter::default(),
            no_local_endpoints: Family::default(),
            iptables_rules: Family::default(),
            kernel_objects: Family::default(),
            unbound_listeners: Family::default(),
            process: process::ProcessMetrics::default(),
            healthz: Family::default(),
            livez: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            m.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.full_sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.partial_sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            m.last_sync.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            m.last_queued.clone(),
        );
        let failures = match mode {
            ModeName::Iptables => "kubeproxy_sync_proxy_rules_iptables_restore_failures",
            ModeName::Nftables => "kubeproxy_sync_proxy_rules_nftables_sync_failures",
            _ => "kproxy_sync_failures",
        };
        registry.register(
            failures,
            "Cumulative proxy rules sync failures",
            m.sync_failures.clone(),
        );
        // Counters gain `_total` in the exposition, as upstream's name has it.
        registry.register(
            "kubeproxy_conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            m.conntrack_deleted.clone(),
        );
        registry.register(
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
            m.conntrack_duration.clone(),
        );
        registry.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            m.healthz.clone(),
        );
        registry.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            m.livez.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            m.network_programming.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            m.endpoint_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            m.endpoint_changes_total.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            m.service_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.service_changes_total.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
        if mode == ModeName::Iptables {
            registry.register(
                "kubeproxy_sync_proxy_rules_iptables_total",
                "Total number of iptables rules owned by kube-proxy",
                m.iptables_rules.clone(),
            );
        }
        registry.register(
            "kproxy_kernel_objects",
            "Kernel objects kproxy owns after the last sync, by family, table and kind",
            m.kernel_objects.clone(),
        );
        registry.register(
            "kproxy_unbound_listeners",
            "Listeners that should be serving but cannot bind their address (retried every 5s)",
            m.unbound_listeners.clone(),
        );
        // Every kind is exported from the start, as 0 while all is well.
        for kind in crate::listeners::Kind::ALL {
            m.unbound_listeners(kind);
        }
        m.process.register(&mut registry);
        registry.register(
            "kproxy_apply_duration_seconds",
            "Time spent applying one plan to the kernel",
            m.apply_duration.clone(),
        );
        registry.register(
            "kproxy_objects_added",
            "Kernel objects (rules, elements) added",
            m.objects_added.clone(),
        );
        registry.register(
            "kproxy_objects_removed",
            "Kernel objects (rules, elements) removed",
            m.objects_removed.clone(),
        );
        registry.register(
            "kproxy_service_ports",
            "Service ports programmed (per family)",
            m.service_ports.clone(),
        );
        // Counters gain `_total` in the exposition.
        registry.register(
            "kproxy_source_removals_held",
            "Removals of most of a manifest file's (or the directory's) service ports and endpoints held back until confirmed",
            m.source_removals_held.clone(),
        );
        registry.register(
            "kproxy_skipped_objects",
            "Invalid Services and EndpointSlices left out",
            m.skipped_objects.clone(),
        );
        registry.register(
            "kproxy_frontend_conflicts",
            "Frontends (address:port or NodePort) withheld from a Service because an older \
             Service holds them",
            m.frontend_conflicts.clone(),
        );
        Self { registry, ..m }
    }

    /// A sync succeeded.
    pub fn synced(&self, o: SyncObservation, now: SystemTime) {
        let secs = o.duration.as_secs_f64();
        self.sync_duration.observe(secs);
        if o.full {
            self.full_sync_duration.observe(secs);
        } else {
            self.partial_sync_duration.observe(secs);
        }
        self.apply_duration.observe(o.apply.as_secs_f64());
        self.last_sync.set(unix(now));
        self.objects_added.inc_by(o.added as u64);
        self.objects_removed.inc_by(o.removed as u64);
        self.service_ports
            .set(i64::try_from(o.service_ports).unwrap_or(i64::MAX));
        self.skipped_objects
            .set(i64::try_from(o.skipped).unwrap_or(i64::MAX));
        self.frontend_conflicts
            .set(i64::try_from(o.frontend_conflicts).unwrap_or(i64::MAX));
    }

    /// The source held back a removal until it is confirmed (`kproxy_source_removals_held_total`).
    pub fn source_removal_held(&self) {
        self.source_removals_held.inc();
    }

    /// Services and EndpointSlices changed; `pending_*` are the totals not yet synced.
    pub fn changes_seen(
        &self,
        services: usize,
        endpoints: usize,
        pending_services: usize,
        pending_endpoints: usize,
    ) {
        self.service_changes_total.inc_by(services as u64);
        self.endpoint_changes_total.inc_by(endpoints as u64);
        self.service_changes_pending
            .set(i64::try_from(pending_services).unwrap_or(i64::MAX));
        self.endpoint_changes_pending
            .set(i64::try_from(pending_endpoints).unwrap_or(i64::MAX));
    }

    /// A sync applied changes whose EndpointSlices carried these trigger times.
    pub fn programmed(&self, trigger_times: &[SystemTime], now: SystemTime) {
        for t in trigger_times {
            // Clock skew between the control plane and the node can make this negative.
            let latency = now.duration_since(*t).unwrap_or_default();
            self.network_programming.observe(latency.as_secs_f64());
        }
        self.service_changes_pending.set(0);
        self.endpoint_changes_pending.set(0);
    }

    /// What the applied state holds: Local-policy services without local endpoints, and the
    /// kernel objects by family, table and kind.
    pub fn state(&self, no_local: (usize, usize), objects: &[kproxy_contract::ObjectCount]) {
        for (policy, n) in [("internal", no_local.0), ("external", no_local.1)] {
            self.no_local_endpoints
                .get_or_create(&PolicyLabel {
                    traffic_policy: policy,
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        for o in objects {
            let ip_family = match o.family {
                kproxy_contract::IpFamily::V4 => "IPv4",
                kproxy_contract::IpFamily::V6 => "IPv6",
            };
            let n = i64::try_from(o.count).unwrap_or(i64::MAX);
            self.kernel_objects
                .get_or_create(&ObjectLabel {
                    ip_family,
                    table: o.table,
                    kind: o.kind,
                })
                .set(n);
            if o.kind == "rules" && (o.table == "nat" || o.table == "filter") {
                self.iptables_rules
                    .get_or_create(&TableLabel {
                        table: o.table,
                        ip_family,
                    })
                    .set(n);
            }
        }
    }

    /// A conntrack cleanup ran (after a successful sync).
    pub fn conntrack_reconciled(&self, report: &crate::conntrack::CleanupReport) {
        self.conntrack_deleted.inc_by(report.deleted as u64);
        self.conntrack_duration
            .observe(report.duration.as_secs_f64());
    }

    /// The gauge counting unbound listeners of `kind` (see [`crate::listeners`]).
    pub fn unbound_listeners(&self, kind: crate::listeners::Kind) -> Gauge {
        self.unbound_listeners
            .get_or_create(&ListenerLabel {
                listener: kind.label(),
            })
            .clone()
    }

    /// A sync failed.
    pub fn failed(&self) {
        self.sync_failures.inc();
    }

    /// A change was queued for the next sync.
    pub fn queued(&self, now: SystemTime) {
        self.last_queued.set(unix(now));
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        self.process.refresh();
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

/// Binds and serves `/metrics` until the task is dropped.
/// The `/metrics` router (served by [`crate::listeners`]).
///
/// Next to `/metrics`, upstream's metrics server answers `/healthz` ("ok", the server is up),
/// `/proxyMode` (the mode's name, which runbooks curl to tell the mode of a node) and `/configz`
/// (the effective configuration under its API group, as JSON); kproxy answers the same.
pub fn router(m: Arc<Metrics>, mode: ModeName, configz: serde_json::Value) -> Router {
    let configz = Arc::new(serde_json::json!({ "kubeproxy.config.k8s.io": configz }));
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(m)
        .route("/healthz", get(|| async { "ok" }))
        .route("/proxyMode", get(move || async move { mode.as_str() }))
        .route(
            "/configz",
            get(move || {
                let body = configz.clone();
                async move { axum::Json((*body).clone()) }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_names_and_buckets() {
        let m = Metrics::new(ModeName::Iptables);
        m.synced(
            SyncObservation {
                full: true,
                duration: Duration::from_millis(3),
                apply: Duration::from_millis(1),
                added: 5,
                removed: 1,
                service_ports: 2,
                skipped: 3,
                frontend_conflicts: 1,
            },
            SystemTime::UNIX_EPOCH + Duration::from_secs(100),
        );
        m.failed();
        m.conntrack_reconciled(&crate::conntrack::CleanupReport {
            deleted: 3,
            duration: Duration::from_millis(2),
            ..Default::default()
        });
        m.healthz.get_or_create(&CodeLabel { code: 200 }).inc();
        let text = m.encode();
        for want in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.001\"} 0",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count 0",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds 100.0",
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total 1",
            "kubeproxy_proxy_healthz_total{code=\"200\"} 1",
            "kproxy_objects_added_total 5",
            "kproxy_skipped_objects 3",
            "kproxy_frontend_conflicts 1",
            "kubeproxy_conntrack_reconciler_deleted_entries_total 3",
            "kubeproxy_conntrack_reconciler_sync_duration_seconds_count 1",
            "kproxy_unbound_listeners{listener=\"health_check_node_port\"} 0",
            "kproxy_unbound_listeners{listener=\"admin\"} 0",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
