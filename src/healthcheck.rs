//! Health-check node ports: for every LoadBalancer Service with externalTrafficPolicy=Local, an
//! HTTP server on its `healthCheckNodePort` that tells the cloud load balancer whether this node
//! has local ready endpoints (upstream `healthcheck/service_health.go`):
//! `{"service":{"namespace":…,"name":…},"localEndpoints":N,"serviceProxyHealthy":bool}` with the
//! header `X-Load-Balancing-Endpoint-Weight: N`, status 200 only when N > 0 and the proxy is
//! healthy. Servers follow the desired state after every sync: new ports open, gone ones close,
//! counts change in place.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use kproxy_contract::ProxyState;

use crate::health::Health;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    namespace: String,
    name: String,
    local_endpoints: usize,
}

type Table = Arc<Mutex<BTreeMap<u16, Entry>>>;

/// The running health-check servers.
#[derive(Debug)]
pub struct HealthCheckServers {
    table: Table,
    servers: BTreeMap<u16, tokio::task::JoinHandle<()>>,
    health: Health,
}

impl HealthCheckServers {
    /// No servers yet; `health` decides `serviceProxyHealthy`.
    pub fn new(health: Health) -> Self {
        Self {
            table: Arc::default(),
            servers: BTreeMap::new(),
            health,
        }
    }

    /// Follows the desired state. Must run inside the tokio runtime.
    pub fn update(&mut self, state: &ProxyState) {
        let mut wanted: BTreeMap<u16, Entry> = BTreeMap::new();
        for sp in state.services.values() {
            let Some(port) = sp.health_check_node_port else {
                continue;
            };
            let entry = wanted.entry(port).or_insert_with(|| Entry {
                namespace: sp.name.namespace.clone(),
                name: sp.name.name.clone(),
                local_endpoints: 0,
            });
            // One server per Service: both families and every port report the same node.
            entry.local_endpoints = entry.local_endpoints.max(sp.endpoints.local_ready);
        }
        *self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = wanted.clone();
        self.servers.retain(|port, task| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
                tracing::info!(port, "health-check node port closed");
            }
            keep
        });
        for port in wanted.keys() {
            if self.servers.contains_key(port) {
                continue;
            }
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port));
            match std::net::TcpListener::bind(addr).and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            }) {
                Ok(listener) => {
                    let app = Router::new().fallback(get(answer)).with_state((
                        self.table.clone(),
                        self.health.clone(),
                        *port,
                    ));
                    self.servers.insert(
                        *port,
                        tokio::spawn(async move {
                            let _ = axum::serve(listener, app).await;
                        }),
                    );
                    tracing::info!(port, "health-check node port serving");
                }
                Err(err) => {
                    tracing::warn!(port, error = %err, "cannot serve a health-check node port")
                }
            }
        }
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for task in self.servers.values() {
            task.abort();
        }
    }
}

async fn answer(State((table, health, port)): State<(Table, Health, u16)>) -> impl IntoResponse {
    let entry = table
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&port)
        .cloned();
    let Some(e) = entry else {
        return (
            StatusCode::NOT_FOUND,
            [
                (header::CONTENT_TYPE, "text/plain".to_string()),
                (header_weight(), "0".to_string()),
            ],
            String::new(),
        );
    };
    let v = health.verdict(SystemTime::now());
    let healthy = v.healthy && v.node_eligible;
    let body = serde_json::json!({
        "service": {"namespace": e.namespace, "name": e.name},
        "localEndpoints": e.local_endpoints,
        "serviceProxyHealthy": healthy,
    });
    let code = if e.local_endpoints > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json".to_string()),
            (header_weight(), e.local_endpoints.to_string()),
        ],
        body.to_string(),
    )
}

fn header_weight() -> HeaderName {
    HeaderName::from_static("x-load-balancing-endpoint-weight")
}
