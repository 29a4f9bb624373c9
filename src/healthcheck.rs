//! Health-check node ports: for every LoadBalancer Service with externalTrafficPolicy=Local, an
//! HTTP server on its `healthCheckNodePort` that tells the cloud load balancer whether this node
//! has local ready endpoints (upstream `healthcheck/service_health.go`):
//! `{"service":{"namespace":…,"name":…},"localEndpoints":N,"serviceProxyHealthy":bool}` with the
//! header `X-Load-Balancing-Endpoint-Weight: N`, status 200 only when N > 0 and the proxy is
//! healthy. Servers follow the desired state after every sync: new ports open, gone ones close,
//! counts change in place.
//!
//! Like upstream, the servers listen on the NodePort addresses: with a `--nodeport-addresses`
//! list (or the nftables mode's primary IPs) one socket per address, otherwise one dual-stack
//! wildcard socket (`[::]`, or `0.0.0.0` where the node has no IPv6).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use kproxy_contract::{NodePortAddresses, ProxyState};

use crate::health::Health;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    namespace: String,
    name: String,
    local_endpoints: usize,
}

type Table = Arc<Mutex<BTreeMap<u16, Entry>>>;

/// One health-check port's listeners.
#[derive(Debug)]
struct Server {
    /// The addresses it was asked to listen on (a change rebinds).
    addrs: Vec<IpAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    fn stop(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The running health-check servers.
#[derive(Debug)]
pub struct HealthCheckServers {
    table: Table,
    servers: BTreeMap<u16, Server>,
    health: Health,
}

/// Where health-check ports listen for these NodePort addresses.
fn listen_addrs(addresses: &NodePortAddresses) -> Vec<IpAddr> {
    match addresses {
        NodePortAddresses::AllLocal => vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
        NodePortAddresses::Only(ips) => ips.clone(),
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
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
        let addrs = listen_addrs(&state.node.node_port_addresses);
        self.servers.retain(|port, server| {
            let keep = wanted.contains_key(port) && server.addrs == addrs;
            if !keep {
                server.stop();
                tracing::info!(port, "health-check node port closed");
            }
            keep
        });
        for port in wanted.keys() {
            if self.servers.contains_key(port) {
                continue;
            }
            let mut tasks = Vec::new();
            for ip in &addrs {
                let addr = SocketAddr::new(*ip, *port);
                // `[::]` takes IPv4 too (bindv6only=0); a node without IPv6 gets `0.0.0.0`.
                let bound = bind(addr).or_else(|err| match ip {
                    IpAddr::V6(v6) if v6.is_unspecified() => {
                        bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port)))
                    }
                    _ => Err(err),
                });
                match bound {
                    Ok(listener) => {
                        let app = Router::new().fallback(get(answer)).with_state((
                            self.table.clone(),
                            self.health.clone(),
                            *port,
                        ));
                        tasks.push(tokio::spawn(async move {
                            let _ = axum::serve(listener, app).await;
                        }));
                        tracing::info!(%addr, "health-check node port serving");
                    }
                    Err(err) => {
                        tracing::warn!(%addr, error = %err, "cannot serve a health-check node port")
                    }
                }
            }
            self.servers.insert(
                *port,
                Server {
                    addrs: addrs.clone(),
                    tasks,
                },
            );
        }
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.stop();
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
