//! Choosing endpoints: round-robin per listener, ClientIP affinity per service port, and the
//! failover order (the chosen endpoint first, then the next ones in the table).

use kproxy_contract::clock::{Clock as _, SystemClock};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::model::Table;

/// ClientIP affinity of one service port: client address → (endpoint, last new connection).
/// Shared by every frontend of the service port, as the kernel modes share it. A mutex held for
/// one hash lookup per *new* connection, and only for services with affinity.
#[derive(Debug, Default)]
pub struct Affinity {
    pins: Mutex<HashMap<IpAddr, (SocketAddr, Instant)>>,
}

/// Past this many pins, recording one also drops the expired ones.
const PRUNE_AT: usize = 4096;

impl Affinity {
    /// The endpoint `client` is pinned to, if the pin is younger than `timeout`.
    pub fn lookup(&self, client: IpAddr, timeout: Duration, now: Instant) -> Option<SocketAddr> {
        let pins = self.pins.lock().ok()?;
        pins.get(&client)
            .filter(|(_, at)| now.duration_since(*at) < timeout)
            .map(|(ep, _)| *ep)
    }

    /// Pins `client` to `endpoint` from `now`.
    pub fn record(&self, client: IpAddr, endpoint: SocketAddr, timeout: Duration, now: Instant) {
        if let Ok(mut pins) = self.pins.lock() {
            if pins.len() >= PRUNE_AT {
                pins.retain(|_, (_, at)| now.duration_since(*at) < timeout);
            }
            pins.insert(client, (endpoint, now));
        }
    }
}

/// The endpoints to try for one new connection from `client`, in order: the pinned endpoint
/// (affinity) or the next one round-robin, then the following ones, at most `max` in all.
pub fn candidates(
    table: &Table,
    rr: &AtomicUsize,
    affinity: Option<&Affinity>,
    client: IpAddr,
    max: usize,
) -> Vec<SocketAddr> {
    let n = table.endpoints.len();
    if n == 0 {
        return Vec::new();
    }
    let pinned = match (affinity, table.affinity) {
        (Some(a), Some(timeout)) => a
            .lookup(client, timeout, SystemClock.now())
            .and_then(|ep| table.endpoints.iter().position(|e| *e == ep)),
        _ => None,
    };
    let start = pinned.unwrap_or_else(|| rr.fetch_add(1, Ordering::Relaxed) % n);
    (0..n.min(max.max(1)))
        .map(|i| table.endpoints[(start + i) % n])
        .collect()
}
