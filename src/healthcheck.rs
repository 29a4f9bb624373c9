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
//!
//! Each socket is kept bound by [`crate::listeners`]: during a rolling update with surge the
//! old kproxy still holds the port when the new one starts, and a port bound only once would
//! stay dead after the old one exits (cloud load balancers then take the node out of every
//! `externalTrafficPolicy: Local` service). A port that cannot bind is retried every 5 s and
//! counted in `kproxy_unbound_listeners{listener="health_check_node_port"}` meanwhile. The
//! ports answer anyone who reaches the node, so their connections are bounded: the header
//! timeout and age limit of every listener, a cap per socket and one across all the ports.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use kproxy_contract::{NodePortAddresses, ProxyState};

use crate::health::Health;
use crate::listeners::{Bounds, Budget, Kind, Listener, Unbound};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    namespace: Arc<str>,
    name: Arc<str>,
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
    /// The connection caps, one of them shared by every port.
    bounds: Bounds,
    /// Where unbound ports are counted.
    unbound: Unbound,
}

/// Where health-check ports listen for these NodePort addresses.
fn listen_addrs(addresses: &NodePortAddresses) -> Vec<IpAddr> {
    match addresses {
        NodePortAddresses::AllLocal => vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
        NodePortAddresses::Only(ips) => ips.clone(),
    }
}

impl HealthCheckServers {
    /// No servers yet; `health` decides `serviceProxyHealthy`.
    pub fn new(health: Health) -> Self {
        let budget = Budget::of_this_process();
        Self {
            table: Arc::default(),
            servers: BTreeMap::new(),
            health,
            bounds: Bounds::shared(budget.per_listener, budget.health_check_ports),
            unbound: Unbound::default(),
        }
    }

    /// Counts ports that cannot bind in `unbound`.
    pub fn with_unbound(mut self, unbound: Unbound) -> Self {
        self.unbound = unbound;
        self
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
            let app = Router::new().fallback(get(answer)).with_state((
                self.table.clone(),
                self.health.clone(),
                *port,
            ));
            let tasks = addrs
                .iter()
                .map(|ip| {
                    let listener = Listener {
                        what: format!("health-check node port {port}"),
                        kind: Kind::HealthCheckNodePort,
                        addr: SocketAddr::new(*ip, *port),
                        app: app.clone(),
                        bounds: self.bounds.clone(),
                        unbound: self.unbound.clone(),
                        hard_fail: None,
                    };
                    crate::listeners::supervise(listener, crate::listeners::bind_tcp_any_family)
                })
                .collect();
            tracing::info!(port, addresses = ?addrs, "health-check node port opened");
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

/// The health-check node ports follow the applied state's `healthCheckNodePort`s, as soon as
/// the kernel has it.
impl crate::sync::Follower for HealthCheckServers {
    fn on(&mut self, event: &crate::sync::Event<'_>) {
        if let crate::sync::Event::Applied { state } = event {
            self.update(state);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::time::Duration;

    use prometheus_client::metrics::gauge::Gauge;

    use super::*;
    use crate::listeners::RETRY;

    fn state_with_port(port: Option<u16>) -> ProxyState {
        let mut sp = kproxy_testkit::service(
            "lb",
            "10.96.0.50",
            vec![kproxy_testkit::ep("10.244.1.10", true)],
        );
        sp.health_check_node_port = port;
        let mut state = kproxy_testkit::state(vec![sp]);
        state.node = Arc::new(kproxy_contract::NodeSettings {
            node_port_addresses: NodePortAddresses::Only(vec![IpAddr::from([127, 0, 0, 1])]),
            ..(*state.node).clone()
        });
        state
    }

    /// The status line of `GET /` on `addr`, if anything answered.
    async fn ask(addr: SocketAddr) -> Option<String> {
        tokio::task::spawn_blocking(move || {
            let mut c =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
            c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            c.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
                .ok()?;
            let mut text = String::new();
            c.read_to_string(&mut text).ok()?;
            Some(text.lines().next()?.to_string())
        })
        .await
        .ok()?
    }

    /// A port held by another process (the old kproxy of a surge update) is served once it is
    /// free, and counted as unbound until then; a port no longer wanted stops being counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_port_held_by_another_process_is_served_once_free() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = holder.local_addr().expect("addr");
        let gauge = Gauge::default();
        let mut servers = HealthCheckServers::new(Health::new(Duration::from_secs(30)))
            .with_unbound(Unbound::new(gauge.clone()));
        servers.update(&state_with_port(Some(addr.port())));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(gauge.get(), 1, "an unbound port is reported");
        drop(holder);
        let deadline = tokio::time::Instant::now() + RETRY + Duration::from_secs(3);
        let answer = loop {
            if let Some(line) = ask(addr).await {
                break Some(line);
            }
            if tokio::time::Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let line = answer.expect("the freed port is served");
        assert!(line.starts_with("HTTP/1.1 "), "{line}");
        assert_eq!(gauge.get(), 0);

        // A port still held when its service goes away is no longer counted.
        let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let other = holder.local_addr().expect("addr");
        servers.update(&state_with_port(Some(other.port())));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(gauge.get(), 1);
        servers.update(&state_with_port(None));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(gauge.get(), 0);
        drop(holder);
    }
}
