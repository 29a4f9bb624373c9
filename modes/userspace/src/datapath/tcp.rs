//! TCP: accept, choose an endpoint, connect (trying the next endpoint when one fails), copy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::copy::copy;
use super::pick::candidates;
use super::{ListenerState, Shared};
use crate::model::ListenerKey;

/// Accepts until the task is aborted (listener closed). `_closed` is dropped with the task, which
/// tells [`super::DataPath`] the socket is gone.
pub(super) async fn serve(
    listener: TcpListener,
    state: Arc<ListenerState>,
    shared: Arc<Shared>,
    _closed: std::sync::mpsc::Sender<()>,
) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                tokio::spawn(handle(client, peer, state.clone(), shared.clone()));
            }
            Err(err) => {
                // Out of file descriptors and the like: the backlog holds the clients meanwhile.
                tracing::warn!(listener = %state.key, error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
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
        match tokio::time::timeout(opts.connect_timeout, TcpStream::connect(ep)).await {
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
        a.record(peer.ip(), ep, timeout, Instant::now());
    }
    let _ = client.set_nodelay(true);
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
