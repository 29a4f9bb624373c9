//! `/healthz` and `/livez` with upstream's semantics (kube-proxy `healthcheck/proxy_health.go`).
//!
//! Healthy unless an update has been queued for longer than `2 × sync-period` without a
//! successful sync. `/healthz` additionally reports 503 while the Node is being deleted or
//! carries the cluster autoscaler's `ToBeDeletedByClusterAutoscaler` taint, so load balancers
//! drain the node (docs/semantics.md, rule 19); `/livez` ignores that, so the pod is not
//! restarted for it.
//!
//! kproxy's addition: `/healthz` also reports 503 once the object source has been unreadable
//! (a manifests directory that is missing or cannot be opened) for longer than the same timeout,
//! `2 × sync-period`: the rules are then as old as the last read and nothing new can reach them,
//! which is what the timeout means for a queued update. `/livez` ignores it: a restart cannot
//! make the directory readable (kproxy would refuse to start without it), while the running
//! process keeps the last good rules and picks the source up again by itself.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use k8s_openapi::api::core::v1::Node;

/// The taint the cluster autoscaler puts on nodes it is about to delete.
pub const AUTOSCALER_DELETE_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug, Default)]
struct Inner {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
    node_eligible: bool,
    source_unreadable_since: Option<SystemTime>,
}

/// Shared health state: the sync loop writes it, the HTTP server reads it.
#[derive(Debug, Clone)]
pub struct Health {
    inner: Arc<Mutex<Inner>>,
    timeout: Duration,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// One health verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// No update has waited too long.
    pub healthy: bool,
    /// The node is not being drained.
    pub node_eligible: bool,
    /// The source has not been unreadable for longer than the timeout.
    pub source_readable: bool,
    /// Last successful sync (now, when healthy, as upstream reports it).
    pub last_updated: SystemTime,
    /// When the verdict was taken.
    pub current_time: SystemTime,
}

impl Health {
    /// Health with upstream's timeout of `2 × sync_period`.
    pub fn new(sync_period: Duration) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                node_eligible: true,
                ..Inner::default()
            })),
            timeout: sync_period * 2,
            metrics: None,
        }
    }

    /// Counts answers in `kubeproxy_proxy_healthz_total` / `kubeproxy_proxy_livez_total`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn count(&self, livez: bool, ok: bool) {
        if let Some(m) = &self.metrics {
            let code = crate::metrics::CodeLabel {
                code: if ok { 200 } else { 503 },
            };
            let family = if livez { &m.livez } else { &m.healthz };
            family.get_or_create(&code).inc();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means a panic elsewhere; the data is plain timestamps.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An update was queued (the oldest pending one is what counts).
    pub fn queued(&self, now: SystemTime) {
        let mut g = self.lock();
        g.oldest_pending.get_or_insert(now);
    }

    /// A sync succeeded: everything queued so far is programmed.
    pub fn updated(&self, now: SystemTime) {
        let mut g = self.lock();
        g.last_updated = Some(now);
        g.oldest_pending = None;
    }

    /// The source cannot be read in full since `since`, or (`None`) can again.
    pub fn source_unreadable(&self, since: Option<SystemTime>) {
        self.lock().source_unreadable_since = since;
    }

    /// Records whether this node may receive traffic (see the module doc).
    pub fn set_node(&self, node: Option<&Node>) {
        let eligible = node.is_none_or(|n| {
            let deleting = n.metadata.deletion_timestamp.is_some();
            let tainted = n
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| t.iter().any(|t| t.key == AUTOSCALER_DELETE_TAINT));
            !deleting && !tainted
        });
        self.lock().node_eligible = eligible;
    }

    /// The current verdict.
    pub fn verdict(&self, now: SystemTime) -> Verdict {
        let g = self.lock();
        let stale = g
            .oldest_pending
            .is_some_and(|t| now.duration_since(t).unwrap_or_default() > self.timeout);
        let source_readable = g
            .source_unreadable_since
            .is_none_or(|t| now.duration_since(t).unwrap_or_default() <= self.timeout);
        Verdict {
            healthy: !stale,
            node_eligible: g.node_eligible,
            source_readable,
            last_updated: if stale {
                g.last_updated.unwrap_or(SystemTime::UNIX_EPOCH)
            } else {
                now
            },
            current_time: now,
        }
    }
}

fn body(v: &Verdict, with_node: bool) -> String {
    let mut obj = serde_json::json!({
        "lastUpdated": humantime::format_rfc3339_nanos(v.last_updated).to_string(),
        "currentTime": humantime::format_rfc3339_nanos(v.current_time).to_string(),
    });
    if with_node {
        obj["nodeEligible"] = serde_json::Value::Bool(v.node_eligible);
    }
    obj.to_string()
}

async fn healthz(State(h): State<Health>) -> impl IntoResponse {
    let v = h.verdict(SystemTime::now());
    let ok = v.healthy && v.node_eligible && v.source_readable;
    h.count(false, ok);
    respond(ok, body(&v, true))
}

async fn livez(State(h): State<Health>) -> impl IntoResponse {
    let v = h.verdict(SystemTime::now());
    h.count(true, v.healthy);
    respond(v.healthy, body(&v, false))
}

fn respond(ok: bool, body: String) -> impl IntoResponse {
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (
                header::HeaderName::from_static("x-content-type-options"),
                "nosniff",
            ),
        ],
        body,
    )
}

/// The router serving `/healthz` and `/livez`.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(health)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_after_two_sync_periods_of_pending_updates() {
        let h = Health::new(Duration::from_secs(30));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert!(h.verdict(t0).healthy, "healthy at startup");
        h.queued(t0);
        assert!(h.verdict(t0 + Duration::from_secs(60)).healthy);
        let v = h.verdict(t0 + Duration::from_secs(61));
        assert!(!v.healthy);
        h.updated(t0 + Duration::from_secs(62));
        assert!(h.verdict(t0 + Duration::from_secs(200)).healthy);
    }

    #[test]
    fn unreadable_source_fails_healthz_after_the_timeout_not_livez() {
        let h = Health::new(Duration::from_secs(30));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        h.source_unreadable(Some(t0));
        let v = h.verdict(t0 + Duration::from_secs(60));
        assert!(v.healthy && v.source_readable, "within the timeout");
        let v = h.verdict(t0 + Duration::from_secs(61));
        assert!(v.healthy, "/livez stays 200");
        assert!(!v.source_readable, "/healthz turns 503");
        h.source_unreadable(None);
        assert!(h.verdict(t0 + Duration::from_secs(62)).source_readable);
    }

    #[test]
    fn draining_node_is_not_eligible() {
        let h = Health::new(Duration::from_secs(30));
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n"},
            "spec": {"taints": [{"key": AUTOSCALER_DELETE_TAINT, "effect": "NoSchedule"}]}
        }))
        .expect("node");
        h.set_node(Some(&node));
        let v = h.verdict(SystemTime::now());
        assert!(v.healthy && !v.node_eligible);
        assert!(body(&v, true).contains("\"nodeEligible\":false"));
        assert!(!body(&v, false).contains("nodeEligible"));
    }
}
