//! TCP: accept, choose an endpoint, connect (trying the next endpoint when one fails), copy.

use kproxy_contract::clock::{Clock as _, SystemClock};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::copy::copy;
use super::pick::candidates;
use super::{ListenerState, Shared, Task};
use crate::model::ListenerKey;

/// Accepts until the listener is told to stop. Then takes every connection already in the
/// accept queue, so closing the socket resets none (the kernel would reset what is queued on a
/// closed listener), and closes it; connections already accepted carry on. `_task` is dropped
/// with the task, which tells [`super::DataPath`] the socket is gone.
pub(super) async fn serve(
    listener: std::net::TcpListener,
    state: Arc<ListenerState>,
    shared: Arc<Shared>,
    _task: Task,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(listener = %state.key, error = %err, "cannot register a listener");
            return;
        }
    };
    // From its first connection on, other workers take its waiting connections while this one
    // is busy (`steal.rs`). Not before: most listeners of a large cluster never see a
    // connection on a given node, and a registration costs kernel memory and a descriptor.
    let mut registration = None;
    let mut offered = false;
    if !state.is_stopped() {
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((client, peer)) => {
                        let live = Live::new(&shared);
                        tokio::spawn(handle(client, peer, state.clone(), shared.clone(), live));
                        if !offered {
                            offered = true;
                            registration = shared
                                .spare
                                .as_ref()
                                .and_then(|spare| spare.register(&listener, &state, &shared));
                        }
                    }
                    Err(err) => {
                        // Out of file descriptors and the like: the backlog holds the clients
                        // meanwhile.
                        tracing::warn!(listener = %state.key, error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                () = state.stopped() => break,
            }
        }
    }
    // No other worker accepts on it from here on.
    drop(registration);
    // Straight from the kernel's queue (tokio's readiness may not have seen the last arrivals).
    let mut taken = 0usize;
    while let Ok(took) = take_queued(socket2::SockRef::from(&listener), &state, &shared) {
        taken += usize::from(took);
    }
    drop(listener);
    if taken > 0 {
        tracing::debug!(listener = %state.key, taken, "took the queued connections before closing");
    }
}

/// Accepts one connection straight from `listener`'s kernel queue (whatever tokio's readiness
/// says) and spawns its handling on this thread's runtime: how a closing listener empties its
/// queue and how an idle worker takes a busy one's (`steal.rs`). `Err` when nothing is queued;
/// `Ok(false)` when the connection could not be set up (it is closed).
pub(super) fn take_queued(
    listener: socket2::SockRef<'_>,
    state: &Arc<ListenerState>,
    shared: &Arc<Shared>,
) -> std::io::Result<bool> {
    let (conn, peer) = listener.accept()?;
    // Live from the accept on (see `Live::new`).
    let live = Live::new(shared);
    let Some(peer) = peer.as_socket() else {
        return Ok(false);
    };
    let conn: std::net::TcpStream = conn.into();
    if conn.set_nonblocking(true).is_err() {
        return Ok(false);
    }
    let Ok(client) = TcpStream::from_std(conn) else {
        return Ok(false);
    };
    tokio::spawn(handle(client, peer, state.clone(), shared.clone(), live));
    Ok(true)
}

/// Counts a live proxied connection for as long as it lives.
struct Live(Arc<Shared>);

impl Live {
    /// Counted from the accept on, so a handover that sees no live connection has none to cut.
    fn new(shared: &Arc<Shared>) -> Live {
        shared.connections.fetch_add(1, Ordering::Relaxed);
        Live(shared.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Ends a connection with an RST rather than a FIN, so the peer knows it failed.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    state: Arc<ListenerState>,
    shared: Arc<Shared>,
    _live: Live,
) {
    let active = state.active.load_full();
    let table = &active.table;
    if !table.allows(peer.ip()) {
        tracing::debug!(listener = %state.key, %peer, "client outside loadBalancerSourceRanges");
        reset(&client);
        return;
    }
    let opts = &shared.options;
    let mut upstream = None;
    for ep in candidates(
        table,
        &state.rr,
        active.affinity.as_deref(),
        peer.ip(),
        opts.max_attempts,
    ) {
        match tokio::time::timeout(opts.connect_timeout, connect(ep)).await {
            Ok(Ok(stream)) => {
                upstream = Some((stream, ep));
                break;
            }
            Ok(Err(err)) => {
                tracing::debug!(listener = %state.key, endpoint = %ep, error = %err, "connect failed; trying the next endpoint");
            }
            Err(_) => {
                tracing::debug!(listener = %state.key, endpoint = %ep, "connect timed out; trying the next endpoint");
            }
        }
    }
    let Some((mut upstream, ep)) = upstream else {
        tracing::debug!(listener = %state.key, %peer, "no endpoint accepted the connection");
        reset(&client);
        return;
    };
    if let (Some(a), Some(timeout)) = (&active.affinity, table.affinity) {
        a.record(peer.ip(), ep, timeout, SystemClock.now());
    }
    // The client's socket inherited TCP_NODELAY from the listener.
    let _ = upstream.set_nodelay(true);
    let mut generation = shared.generation.subscribe();
    let key = state.key;
    drop(active);
    let finished = tokio::select! {
        r = copy(opts.copy, &mut client, &mut upstream) => r.is_ok(),
        () = doomed(&shared, &mut generation, key, ep) => {
            tracing::info!(listener = %key, endpoint = %ep, %peer, "endpoint removed; closing its connection after the grace period");
            false
        }
    };
    if !finished {
        reset(&client);
        reset(&upstream);
    }
}

/// Connects to `ep`, as `TcpStream::connect` does, but without waiting for the reactor when
/// `connect(2)` has already finished the handshake. To an endpoint on this node (a local pod
/// behind a veth, or loopback) it usually has: the SYN and the SYN-ACK are processed in the
/// softirq that runs before the call returns, although it still says `EINPROGRESS` (not when the
/// kernel defers that work, e.g. with RPS). tokio would then park the task, poll epoll and wake
/// it again for a readiness that is already there; here `getpeername` tells at once, and a
/// refusal is read at once from `SO_ERROR`, so failover to the next endpoint goes on in the same
/// turn. Only a handshake still in flight (a remote endpoint, where it takes a round trip anyway)
/// waits for the socket to become writable.
///
/// The stream starts with no readiness in tokio (only its own `accept` marks a socket ready), so
/// the first message is sent with a plain `send(2)` ([`super::copy`]), not through tokio.
async fn connect(ep: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(ep), Type::STREAM.nonblocking(), None)?;
    match socket.connect(&ep.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EINPROGRESS as i32) => {}
        Err(e) => return Err(e),
    }
    let established = socket.peer_addr().is_ok();
    if !established && let Some(e) = socket.take_error()? {
        return Err(e);
    }
    let stream = TcpStream::from_std(socket.into())?;
    if !established {
        stream.writable().await?;
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    Ok(stream)
}

/// Resolves when the connection's endpoint has not been a serving endpoint of its listener for a
/// whole grace period. Re-checked after every applied update.
pub(super) async fn doomed(
    shared: &Shared,
    generation: &mut watch::Receiver<u64>,
    key: ListenerKey,
    ep: SocketAddr,
) {
    loop {
        if !shared.keeps(&key, ep) {
            tokio::time::sleep(shared.options.grace_period).await;
            if !shared.keeps(&key, ep) {
                return;
            }
        }
        if generation.changed().await.is_err() {
            // The data path is shutting down; the runtime drops this task.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    /// Polls `f` once, as a runtime would the first time.
    fn first_poll<F: Future>(f: F) -> Poll<F::Output> {
        pin!(f)
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
    }

    /// To an endpoint on this host the handshake is over when `connect(2)` returns, and a refusal
    /// is known then too: either way the connect completes on its first poll, without a turn
    /// through the reactor (tokio's own connect is still pending there).
    #[test]
    fn a_local_connect_or_refusal_completes_on_the_first_poll() {
        let rt = crate::datapath::tests::io_runtime();
        let _in = rt.enter();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ep = listener.local_addr().unwrap();
        for _ in 0..100 {
            let Poll::Ready(stream) = first_poll(super::connect(ep)) else {
                panic!("the connect to a local endpoint waited for the reactor");
            };
            assert_eq!(stream.unwrap().peer_addr().unwrap(), ep);
            drop(listener.accept().unwrap());
        }
        // A bound socket that does not listen holds its port, and connects to it are refused.
        let closed =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        closed
            .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let ep = closed.local_addr().unwrap().as_socket().unwrap();
        let Poll::Ready(refused) = first_poll(super::connect(ep)) else {
            panic!("the refused connect waited for the reactor");
        };
        assert_eq!(
            refused.unwrap_err().kind(),
            std::io::ErrorKind::ConnectionRefused
        );
    }
}
