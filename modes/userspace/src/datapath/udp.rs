//! UDP: one socket bound to the service address (so replies leave from it), one flow per
//! client address with its own connected socket towards the chosen endpoint, expired when idle.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::task::AbortHandle;

use super::pick::candidates;
use super::{ListenerState, Shared};

/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

thread_local! {
    /// Receive buffer of the replies: one per worker thread, not one per flow.
    static REPLY_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
}

struct Flow {
    upstream: Arc<UdpSocket>,
    endpoint: SocketAddr,
    /// Milliseconds since the listener's epoch of the last datagram either way.
    last: Arc<AtomicU64>,
    replies: AbortHandle,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

fn millis(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Serves until aborted; dropping the task drops every flow.
pub(super) async fn serve(
    socket: UdpSocket,
    state: Arc<ListenerState>,
    shared: Arc<Shared>,
    _closed: std::sync::mpsc::Sender<()>,
) {
    let socket = Arc::new(socket);
    let epoch = Instant::now();
    let idle = shared.options.udp_idle_timeout;
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut sweep =
        tokio::time::interval((idle / 2).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let (n, client) = match r {
                    Ok(v) => v,
                    Err(err) => {
                        tracing::debug!(listener = %state.key, error = %err, "recv failed");
                        continue;
                    }
                };
                let stale = flows
                    .get(&client)
                    .is_none_or(|f| f.replies.is_finished());
                if stale {
                    flows.remove(&client);
                    match new_flow(&socket, &state, client, epoch) {
                        Some(flow) => {
                            flows.insert(client, flow);
                        }
                        None => continue,
                    }
                }
                let Some(flow) = flows.get(&client) else { continue };
                flow.last.store(millis(epoch), Ordering::Relaxed);
                if let Err(err) = flow.upstream.send(&buf[..n]).await {
                    // ICMP unreachable from an earlier datagram: the next one picks again.
                    tracing::debug!(listener = %state.key, endpoint = %flow.endpoint, error = %err, "send failed; dropping the flow");
                    flows.remove(&client);
                }
            }
            _ = sweep.tick() => {
                let now = millis(epoch);
                flows.retain(|_, f| {
                    now.saturating_sub(f.last.load(Ordering::Relaxed)) < idle_ms
                        && !f.replies.is_finished()
                        // A flow to an endpoint that is gone ends at once, as the kernel modes
                        // delete its conntrack entry: the next datagram picks a live endpoint.
                        && shared.keeps(&state.key, f.endpoint)
                });
            }
        }
    }
}

fn new_flow(
    listener: &Arc<UdpSocket>,
    state: &ListenerState,
    client: SocketAddr,
    epoch: Instant,
) -> Option<Flow> {
    let active = state.active.load();
    let table = &active.table;
    if !table.allows(client.ip()) {
        return None;
    }
    // UDP connects never fail, so failover happens across datagrams (an endpoint that answers
    // with ICMP unreachable ends its flow); one candidate is enough here.
    let endpoint =
        *candidates(table, &state.rr, active.affinity.as_deref(), client.ip(), 1).first()?;
    let upstream = match connect(endpoint) {
        Ok(s) => Arc::new(s),
        Err(err) => {
            tracing::debug!(listener = %state.key, %endpoint, error = %err, "cannot open a flow");
            return None;
        }
    };
    if let (Some(a), Some(timeout)) = (&active.affinity, table.affinity) {
        a.record(client.ip(), endpoint, timeout, Instant::now());
    }
    let last = Arc::new(AtomicU64::new(millis(epoch)));
    let replies = tokio::spawn(replies(
        upstream.clone(),
        listener.clone(),
        client,
        last.clone(),
        epoch,
    ))
    .abort_handle();
    Some(Flow {
        upstream,
        endpoint,
        last,
        replies,
    })
}

fn connect(endpoint: SocketAddr) -> io::Result<UdpSocket> {
    let any = match endpoint.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let socket = std::net::UdpSocket::bind(SocketAddr::new(any, 0))?;
    socket.connect(endpoint)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Endpoint → client, sent from the listener's socket (so from the service address).
async fn replies(
    upstream: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    last: Arc<AtomicU64>,
    epoch: Instant,
) {
    loop {
        if upstream.readable().await.is_err() {
            return;
        }
        let got = REPLY_BUF.with(|b| {
            let mut b = b.borrow_mut();
            upstream.try_recv(&mut b[..]).map(|n| b[..n].to_vec())
        });
        match got {
            Ok(data) => {
                last.store(millis(epoch), Ordering::Relaxed);
                let _ = listener.send_to(&data, client).await;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // Connection refused (ICMP port unreachable) and the like: the flow ends.
            Err(_) => return,
        }
    }
}
