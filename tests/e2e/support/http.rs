//! A minimal HTTP/1.1 GET from inside a namespace (healthz, metrics, health-check node ports).

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

use super::netns::Netns;

/// `GET path` on `addr` from inside `ns`: (status, headers and body), or `None` if nothing
/// answered.
pub(crate) fn get(ns: &Netns, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let path = path.to_string();
    ns.in_ns(move || -> Option<(u16, String)> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, text))
    })
}

/// The value of the metric sample `series` (the full name with labels, as printed) in a
/// Prometheus text exposition, if present.
pub(crate) fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
