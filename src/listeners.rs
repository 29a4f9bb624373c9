//! kproxy's HTTP listeners (/healthz, /metrics, the health-check node ports), kept bound and
//! kept bounded.
//!
//! **Kept bound**, as upstream keeps its servers: a listener that cannot bind (its port still
//! held by the previous kproxy during a rolling update with surge, say) is retried every 5
//! seconds until it binds, and reported while it cannot: an error line at the first failure,
//! a warning every minute after, and the gauge `kproxy_unbound_listeners{listener}`. With
//! `--bind-address-hard-fail` the first failure of /healthz or /metrics stops kproxy instead
//! (exit status 1), so the pod restarts; health-check node ports always retry, as upstream's.
//!
//! **Kept bounded**: the health-check node ports answer anyone who can reach the node, and an
//! idle connection costs a file descriptor. Unbounded, 290 idle connections under a 300-file
//! limit left kproxy unable to accept /healthz or to start `iptables-restore` (EMFILE), so every
//! sync failed. So each connection must send its request header within [`HEADER_TIMEOUT`] (the
//! wait for a keep-alive connection's next request counts: hyper starts the timer whenever it
//! waits for a header), lives at most [`MAX_CONNECTION_AGE`], and each listener holds at most
//! [`Budget::per_listener`] connections; the health-check ports together hold at most
//! [`Budget::health_check_ports`]. A listener at its cap stops accepting: further connections
//! wait in the kernel's backlog, which costs kproxy nothing, and are served as others end.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;

use crate::stop::{StopHandle, StopReason};

/// Upstream's retry period.
pub const RETRY: Duration = Duration::from_secs(5);

/// How long a connection may take to send a request header, counted from when the server
/// starts waiting for one (the connection's start, or the end of its previous answer). A load
/// balancer's probe or a scrape sends its header at once.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest a connection lives: covers a client that never reads its answer (the header
/// timeout does not run while kproxy writes). A keep-alive client just reconnects.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// Kernel backlog of each listener: connections beyond the cap wait here.
const BACKLOG: u32 = 1024;

/// Which listener (the `listener` label of `kproxy_unbound_listeners`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `--healthz-bind-address`.
    Healthz,
    /// `--metrics-bind-address`.
    Metrics,
    /// A Service's `healthCheckNodePort`.
    HealthCheckNodePort,
    /// `--admin-socket`.
    Admin,
}

impl Kind {
    /// Every kind, so each is exported (as 0) before anything fails.
    pub const ALL: [Kind; 4] = [
        Kind::Healthz,
        Kind::Metrics,
        Kind::HealthCheckNodePort,
        Kind::Admin,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Healthz => "healthz",
            Kind::Metrics => "metrics",
            Kind::HealthCheckNodePort => "health_check_node_port",
            Kind::Admin => "admin",
        }
    }
}

/// How many connections kproxy's servers may hold at once, from its open-file limit: they must
/// never take the descriptors the syncs need (the `iptables-restore` and `nft` pipes, netlink
/// sockets) nor those of the other servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Per listening socket: an eighth of the limit, between 4 and 64 (a load balancer probes a
    /// node from a handful of places; Prometheus scrapes over one connection).
    pub per_listener: usize,
    /// All health-check node ports together: a quarter of the limit, between 8 and 1024 (one
    /// port per LoadBalancer Service with `externalTrafficPolicy: Local`, so there can be many).
    pub health_check_ports: usize,
}

impl Budget {
    /// The budget under an open-file limit of `limit`.
    pub fn for_open_files(limit: u64) -> Budget {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        Budget {
            per_listener: (limit / 8).clamp(4, 64),
            health_check_ports: (limit / 4).clamp(8, 1024),
        }
    }

    /// The budget under this process's soft open-file limit (1024 when it cannot be read).
    pub fn of_this_process() -> Budget {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        Budget::for_open_files(soft)
    }
}

/// The connection caps and timeouts a listener works under.
#[derive(Debug, Clone)]
pub struct Bounds {
    per_listener: usize,
    /// Shared by every listener this was cloned into.
    shared: Option<Arc<Semaphore>>,
    header_timeout: Duration,
    max_age: Duration,
}

impl Bounds {
    /// At most `per_listener` connections per listener.
    pub fn per_listener(per_listener: usize) -> Bounds {
        Bounds {
            per_listener: per_listener.max(1),
            shared: None,
            header_timeout: HEADER_TIMEOUT,
            max_age: MAX_CONNECTION_AGE,
        }
    }

    /// At most `per_listener` per listener and `total` across every listener using a clone.
    pub fn shared(per_listener: usize, total: usize) -> Bounds {
        Bounds {
            shared: Some(Arc::new(Semaphore::new(total.max(1)))),
            ..Bounds::per_listener(per_listener)
        }
    }

    /// Other timeouts (tests).
    #[cfg(test)]
    fn with_timeouts(self, header_timeout: Duration, max_age: Duration) -> Bounds {
        Bounds {
            header_timeout,
            max_age,
            ..self
        }
    }
}

/// Counts a listener in `kproxy_unbound_listeners` while it is not bound.
#[derive(Debug, Clone, Default)]
pub struct Unbound(Option<Gauge>);

impl Unbound {
    /// Reports to `gauge`.
    pub fn new(gauge: Gauge) -> Unbound {
        Unbound(Some(gauge))
    }

    /// Counts one unbound listener until the guard is dropped (the listener bound, or its task
    /// was aborted).
    pub fn guard(&self) -> UnboundGuard {
        if let Some(g) = &self.0 {
            g.inc();
        }
        UnboundGuard(self.0.clone())
    }
}

/// See [`Unbound::guard`].
#[derive(Debug)]
pub struct UnboundGuard(Option<Gauge>);

impl Drop for UnboundGuard {
    fn drop(&mut self) {
        if let Some(g) = &self.0 {
            g.dec();
        }
    }
}

/// Whether the `failures`-th failure in a row (0 is the first) is logged: the first, then
/// one a minute at the retry period.
pub fn log_failure(failures: u32) -> bool {
    failures.is_multiple_of(12)
}

/// Binds a listening TCP socket (`SO_REUSEADDR`, as every server sets it, and a deep backlog).
/// Must run inside the tokio runtime.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// [`bind_tcp`], except that the IPv6 wildcard falls back to `0.0.0.0` on a node without IPv6
/// (`[::]` takes IPv4 too where it exists).
pub fn bind_tcp_any_family(addr: SocketAddr) -> io::Result<TcpListener> {
    bind_tcp(addr).or_else(|err| match addr {
        SocketAddr::V6(v6) if v6.ip().is_unspecified() => {
            bind_tcp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port())))
        }
        _ => Err(err),
    })
}

/// One listener to keep bound.
pub struct Listener {
    /// How logs name it (`/healthz`, `health-check node port 32001`).
    pub what: String,
    /// Its kind (the metric label).
    pub kind: Kind,
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it serves.
    pub app: axum::Router,
    /// Its connection caps.
    pub bounds: Bounds,
    /// Where it is reported while unbound.
    pub unbound: Unbound,
    /// `--bind-address-hard-fail`: the first failure stops kproxy, with this name in the
    /// reason.
    pub hard_fail: Option<(StopHandle, &'static str)>,
}

/// Serves the /healthz or /metrics router `app` on `addr` in a background task until the task
/// is aborted (see the module documentation).
pub fn spawn(
    what: &'static str,
    kind: Kind,
    addr: SocketAddr,
    app: axum::Router,
    hard_fail: bool,
    stop: StopHandle,
    unbound: Unbound,
) -> tokio::task::JoinHandle<()> {
    let budget = Budget::of_this_process();
    supervise(
        Listener {
            what: what.to_string(),
            kind,
            addr,
            app,
            bounds: Bounds::per_listener(budget.per_listener),
            unbound,
            hard_fail: hard_fail.then_some((stop, what)),
        },
        bind_tcp,
    )
}

/// Keeps `listener` bound (binding with `bind`) and serves it, in a background task until the
/// task is aborted.
pub fn supervise(
    listener: Listener,
    bind: impl Fn(SocketAddr) -> io::Result<TcpListener> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Listener {
            what,
            kind,
            addr,
            app,
            bounds,
            unbound,
            mut hard_fail,
        } = listener;
        let mut failures: u32 = 0;
        let mut reported: Option<UnboundGuard> = None;
        loop {
            let error = match bind(addr) {
                Ok(socket) => {
                    reported = None;
                    if failures > 0 {
                        tracing::info!(what, %addr, "serving now");
                    } else {
                        tracing::debug!(what, %addr, "serving");
                    }
                    failures = 0;
                    serve(socket, &app, &bounds, &what).await;
                    "the server stopped".to_string()
                }
                Err(err) => err.to_string(),
            };
            if let Some((stop, name)) = hard_fail.take() {
                stop.stop(StopReason::ListenerFailed {
                    what: name,
                    addr,
                    error,
                });
                return;
            }
            if reported.is_none() {
                reported = Some(unbound.guard());
            }
            if failures == 0 {
                tracing::error!(what, listener = kind.label(), %addr, %error, "cannot serve; retrying every 5s");
            } else if log_failure(failures) {
                tracing::warn!(what, listener = kind.label(), %addr, %error, "still cannot serve; retrying every 5s");
            }
            failures = failures.saturating_add(1);
            tokio::time::sleep(RETRY).await;
        }
    })
}

/// Accepts connections on `socket` and serves `app` on each, within `bounds`. Returns only if
/// the caps' semaphores are closed (never).
async fn serve(socket: TcpListener, app: &axum::Router, bounds: &Bounds, what: &str) {
    let own = Arc::new(Semaphore::new(bounds.per_listener));
    let mut accept_failures: u32 = 0;
    loop {
        // Taken before accepting: at the cap, new connections wait in the kernel's backlog.
        let Ok(permit) = own.clone().acquire_owned().await else {
            return;
        };
        let shared = match &bounds.shared {
            Some(s) => match s.clone().acquire_owned().await {
                Ok(p) => Some(p),
                Err(_) => return,
            },
            None => None,
        };
        let stream = match socket.accept().await {
            Ok((stream, _)) => stream,
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                // Out of descriptors or memory: say so, and give the process a moment.
                if log_failure(accept_failures) {
                    tracing::warn!(what, error = %err, "cannot accept a connection");
                }
                accept_failures = accept_failures.saturating_add(1);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        accept_failures = 0;
        let app = app.clone();
        let (header_timeout, max_age) = (bounds.header_timeout, bounds.max_age);
        tokio::spawn(async move {
            let _permits = (permit, shared);
            serve_connection(stream, app, header_timeout, max_age).await;
        });
    }
}

/// An error of one connection, not of the listener (hyper's list).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// HTTP/1.1 on one connection, with the header timeout and the age limit.
async fn serve_connection(
    stream: TcpStream,
    app: axum::Router,
    header_timeout: Duration,
    max_age: Duration,
) {
    let _ = stream.set_nodelay(true);
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = tokio::time::sleep(max_age) => {
            // Finish the answer in flight, if any, then close; a client that does not read it
            // gets a second more.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods, reason = "these tests time real sockets")]
    use std::io::{Read as _, Write as _};

    use super::*;

    fn app() -> axum::Router {
        axum::Router::new().route("/x", axum::routing::get(|| async { "ok" }))
    }

    fn listener(addr: SocketAddr, bounds: Bounds, unbound: Unbound) -> Listener {
        Listener {
            what: "/x".into(),
            kind: Kind::Healthz,
            addr,
            app: app(),
            bounds,
            unbound,
            hard_fail: None,
        }
    }

    /// `GET /x` answered 200 within `timeout`.
    async fn get(addr: SocketAddr, timeout: Duration) -> bool {
        tokio::task::spawn_blocking(move || {
            let Ok(mut c) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
                return false;
            };
            let _ = c.set_read_timeout(Some(timeout));
            if c.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .is_err()
            {
                return false;
            }
            let mut text = String::new();
            let _ = c.read_to_string(&mut text);
            text.starts_with("HTTP/1.1 200")
        })
        .await
        .unwrap_or(false)
    }

    #[test]
    fn the_budget_follows_the_open_file_limit() {
        assert_eq!(
            Budget::for_open_files(300),
            Budget {
                per_listener: 37,
                health_check_ports: 75
            }
        );
        assert_eq!(
            Budget::for_open_files(1_048_576),
            Budget {
                per_listener: 64,
                health_check_ports: 1024
            }
        );
        assert_eq!(
            Budget::for_open_files(16),
            Budget {
                per_listener: 4,
                health_check_ports: 8
            }
        );
        // Under a 300-file limit /healthz, /metrics and every health-check port at their caps
        // leave more than half the descriptors to the rest of kproxy.
        let b = Budget::for_open_files(300);
        assert!(2 * b.per_listener + b.health_check_ports < 150);
    }

    #[test]
    fn failures_are_logged_once_a_minute() {
        let logged: Vec<u32> = (0..30).filter(|&n| log_failure(n)).collect();
        assert_eq!(logged, [0, 12, 24]);
    }

    /// A listener supervised on a port another socket holds (returned, with the port, the
    /// unbound gauge and the task), after its first bind attempts.
    async fn supervised_on_a_busy_port() -> (
        std::net::TcpListener,
        SocketAddr,
        Gauge,
        tokio::task::JoinHandle<()>,
    ) {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = holder.local_addr().expect("addr");
        let gauge = Gauge::default();
        let task = supervise(
            listener(addr, Bounds::per_listener(4), Unbound::new(gauge.clone())),
            bind_tcp,
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        (holder, addr, gauge, task)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_port_is_retried_until_it_is_free_and_reported_meanwhile() {
        let (holder, addr, gauge, task) = supervised_on_a_busy_port().await;
        assert_eq!(gauge.get(), 1, "reported while unbound");
        drop(holder);
        // Bound within one retry period of the port coming free.
        let deadline = tokio::time::Instant::now() + RETRY + Duration::from_secs(3);
        let served = loop {
            if get(addr, Duration::from_secs(1)).await {
                break true;
            }
            if tokio::time::Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(served, "never bound {addr}");
        assert_eq!(gauge.get(), 0, "no longer reported once bound");
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_aborted_listener_is_no_longer_reported() {
        let (_holder, _, gauge, task) = supervised_on_a_busy_port().await;
        assert_eq!(gauge.get(), 1);
        task.abort();
        let _ = task.await;
        assert_eq!(gauge.get(), 0);
    }

    #[tokio::test]
    async fn hard_fail_stops_the_daemon() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = holder.local_addr().expect("addr");
        let (stop, mut stopped) = crate::stop::channel();
        let _task = spawn(
            "/x",
            Kind::Healthz,
            addr,
            app(),
            true,
            stop,
            Unbound::default(),
        );
        let reason = tokio::time::timeout(Duration::from_secs(5), stopped.recv())
            .await
            .expect("in time")
            .expect("a reason");
        assert!(
            matches!(reason, StopReason::ListenerFailed { what: "/x", .. }),
            "{reason:?}"
        );
        drop(holder);
    }

    /// At its cap a listener holds no more connections; the next one is served as soon as one
    /// of them ends. A shared cap spans listeners.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_are_capped_per_listener_and_in_total() {
        let bounds = Bounds::shared(3, 4);
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = probe.local_addr().expect("addr");
            drop(probe);
            tasks.push(supervise(
                listener(addr, bounds.clone(), Unbound::default()),
                bind_tcp,
            ));
            addrs.push(addr);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(get(addrs[0], Duration::from_secs(1)).await);
        // Three idle connections fill the first listener's cap.
        let idle: Vec<std::net::TcpStream> = (0..3)
            .map(|_| std::net::TcpStream::connect(addrs[0]).expect("connect"))
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !get(addrs[0], Duration::from_millis(500)).await,
            "served beyond the per-listener cap"
        );
        // The second listener has one of the four shared permits left.
        let other = std::net::TcpStream::connect(addrs[1]).expect("connect");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !get(addrs[1], Duration::from_millis(500)).await,
            "served beyond the shared cap"
        );
        drop(other);
        assert!(get(addrs[1], Duration::from_secs(2)).await);
        drop(idle);
        assert!(get(addrs[0], Duration::from_secs(2)).await);
        for t in tasks {
            t.abort();
        }
    }

    /// An idle connection is closed after the header timeout, a keep-alive connection idle
    /// after its answer too, and a header sent byte by byte as well.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_and_old_connections_are_closed() {
        let header = Duration::from_millis(300);
        let age = Duration::from_millis(1500);
        let socket = bind_tcp("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = socket.local_addr().expect("addr");
        let bounds = Bounds::per_listener(4).with_timeouts(header, age);
        let server = tokio::spawn(async move {
            serve(socket, &app(), &bounds, "/x").await;
        });
        let closed_after = |request: &'static [u8]| async move {
            tokio::task::spawn_blocking(move || {
                let mut c = std::net::TcpStream::connect(addr).expect("connect");
                c.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                let started = std::time::Instant::now();
                c.write_all(request).expect("write");
                let mut text = Vec::new();
                let _ = c.read_to_end(&mut text);
                (
                    started.elapsed(),
                    String::from_utf8_lossy(&text).into_owned(),
                )
            })
            .await
            .expect("join")
        };
        // Nothing sent.
        let (t, _) = closed_after(b"").await;
        assert!(t >= header && t < header * 3, "idle: closed after {t:?}");
        // One keep-alive request, answered, then silence.
        let (t, text) = closed_after(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            t >= header && t < header * 3,
            "keep-alive: closed after {t:?}"
        );
        // A header trickling in, a byte every 50 ms: cut at the header timeout, well before
        // the age limit.
        let slow = tokio::task::spawn_blocking(move || {
            let mut c = std::net::TcpStream::connect(addr).expect("connect");
            let started = std::time::Instant::now();
            let _ = c.write_all(b"GET /x HTTP/1.1\r\nX-Pad: ");
            for _ in 0..60 {
                if c.write_all(b"a").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            started.elapsed()
        });
        let t = slow.await.expect("join");
        assert!(
            t < age - Duration::from_millis(200),
            "slow header accepted for {t:?}"
        );
        server.abort();
    }
}
