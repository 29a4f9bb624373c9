//! The data plane, client → node → endpoint in three namespaces (`common::topology`): the node
//! namespace holds the subject's rules (or, for the userspace mode, its listeners), the server
//! namespace holds the endpoints of the first and the last service (their addresses on its
//! loopback) with a greeting sink and a UDP echo, and the client talks to ClusterIPs.
//!
//! Each figure is paired with the same traffic sent straight to an endpoint address through a
//! second, identical set of namespaces whose node only routes (no rule, no proxy), in
//! alternating rounds.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use kproxy_contract::{Endpoint, Endpoints, IpFamily, Protocol, ProxyState, ServicePort};

use crate::common::{self, CLIENT, ECHO, SERVER, SINK, Servers, Topology};

/// How much traffic each figure takes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub(crate) connects: usize,
    /// Direct and subject alternate this many times (each figure's time split between them).
    pub(crate) rounds: usize,
    pub(crate) bulk: Duration,
    pub(crate) udp: Duration,
}

/// Data-plane figures through the subject and without a proxy.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Figures {
    pub(crate) first: (Duration, Duration),
    pub(crate) last: (Duration, Duration),
    pub(crate) direct: (Duration, Duration),
    /// Bytes per second, one TCP stream.
    pub(crate) bulk: f64,
    pub(crate) bulk_direct: f64,
    /// UDP round trips per second (4 clients).
    pub(crate) udp: f64,
    pub(crate) udp_direct: f64,
    /// Bulk streams through the subject that never got the endpoint's greeting.
    pub(crate) failed_streams: usize,
}

/// The port of the UDP probe: the first service also serves UDP 53 → 5353 on its ClusterIP.
pub(crate) const UDP_PORT: u16 = 53;

/// The UDP probe service port added to the first service (same ClusterIP, same endpoints).
pub(crate) fn udp_probe(first: &ServicePort) -> ServicePort {
    let mut udp = first.clone();
    udp.name.port = "dns".into();
    udp.name.protocol = Protocol::Udp;
    udp.port = UDP_PORT;
    let retarget = |list: &[Endpoint]| -> Vec<Endpoint> {
        list.iter().map(|e| Endpoint { port: ECHO, ..*e }).collect()
    };
    udp.endpoints = Endpoints {
        cluster: retarget(&first.endpoints.cluster).into(),
        local: retarget(&first.endpoints.local),
        serving: retarget(&first.endpoints.serving).into(),
        ..first.endpoints.clone()
    };
    udp
}

/// The first and the last TCP service port of the state.
fn first_last(s: &ProxyState) -> (&ServicePort, &ServicePort) {
    let tcp: Vec<&ServicePort> = s
        .family(IpFamily::V4)
        .filter(|sp| sp.name.protocol == Protocol::Tcp)
        .map(|sp| &**sp)
        .collect();
    (tcp[0], tcp[tcp.len() - 1])
}

/// One client → node → endpoint topology with its servers: the endpoints of the first and the
/// last service (addresses on the server's loopback), a greeting sink on all of them and a UDP
/// echo on the first service's.
pub(crate) struct Path {
    pub(crate) t: Topology,
    received: Arc<AtomicU64>,
    _servers: Servers,
}

fn path(prefix: &str, s: &ProxyState) -> Path {
    let t = common::topology(prefix);
    let (first, last) = first_last(s);
    let mut script = String::new();
    for ep in first
        .endpoints
        .cluster
        .iter()
        .chain(last.endpoints.cluster.iter())
    {
        script.push_str(&format!("address add {}/32 dev lo\n", ep.ip));
    }
    t.server.ip_batch(&script);
    // Endpoints live at 10.244.0.0 upward (up to 200,000 of them: past the /16).
    t.node.ip(&["route", "add", "10.244.0.0/14", "via", SERVER]);
    let received = Arc::new(AtomicU64::new(0));
    let udp_ips: Vec<IpAddr> = first.endpoints.cluster.iter().map(|e| e.ip).collect();
    let servers = common::servers(
        &t.server,
        IpAddr::from([0, 0, 0, 0]),
        &udp_ips,
        received.clone(),
    );
    Path {
        t,
        received,
        _servers: servers,
    }
}

/// The subject's path (the caller programs its node) and a baseline path that never gets a
/// rule: the direct figures are measured there, interleaved with the subject's in rounds, so a
/// burst of load elsewhere on the shared machine hits both alike.
pub(crate) fn prepare(s: &ProxyState) -> (Path, Path) {
    let subject = path("bench", s);
    let base = path("base", s);
    let ep = first_last(s).0.endpoints.cluster[0].ip;
    common::wait_ready(
        &base.t.client,
        client(),
        SocketAddr::new(ep, SINK),
        SocketAddr::new(ep, ECHO),
    );
    (subject, base)
}

fn client() -> IpAddr {
    CLIENT.parse().unwrap()
}

/// Rounds of: direct connects (baseline path) and connects to the first and the last service
/// (subject path); one-stream bulk both ways; UDP round trips both ways.
pub(crate) fn measure(subject: &Path, base: &Path, s: &ProxyState, load: Load) -> Figures {
    let (first, last) = first_last(s);
    let vip = |sp: &ServicePort| SocketAddr::new(sp.cluster_ip.unwrap(), sp.port);
    let echo = SocketAddr::new(first.cluster_ip.unwrap(), UDP_PORT);
    let ep = first.endpoints.cluster[0].ip;
    let (sink_direct, echo_direct) = (SocketAddr::new(ep, SINK), SocketAddr::new(ep, ECHO));
    let (sc, bc) = (&subject.t.client, &base.t.client);
    common::wait_ready(sc, client(), vip(first), echo);
    common::wait_ready(sc, client(), vip(last), echo);
    let rounds = load.rounds.max(1);
    let per = (load.connects / rounds).max(1);
    let (mut first_s, mut last_s, mut direct_s) = (Vec::new(), Vec::new(), Vec::new());
    let (mut bulk, mut bulk_direct, mut udp, mut udp_direct) = (0.0, 0.0, 0.0, 0.0);
    let mut failed = 0;
    for _ in 0..rounds {
        direct_s.extend(common::connect_latency(bc, sink_direct, per));
        first_s.extend(common::connect_latency(sc, vip(first), per));
        last_s.extend(common::connect_latency(sc, vip(last), per));
        let d = load.bulk / rounds as u32;
        bulk_direct += common::bulk(bc, sink_direct, 1, d, &base.received).bytes_per_s;
        let b = common::bulk(sc, vip(first), 1, d, &subject.received);
        bulk += b.bytes_per_s;
        failed += b.failed;
        udp_direct += common::udp_rate(bc, client(), echo_direct, 4, load.udp / rounds as u32);
        udp += common::udp_rate(sc, client(), echo, 4, load.udp / rounds as u32);
    }
    for v in [&mut first_s, &mut last_s, &mut direct_s] {
        v.sort();
    }
    let r = rounds as f64;
    Figures {
        first: common::p50_p99(&first_s),
        last: common::p50_p99(&last_s),
        direct: common::p50_p99(&direct_s),
        bulk: bulk / r,
        bulk_direct: bulk_direct / r,
        udp: udp / r,
        udp_direct: udp_direct / r,
        failed_streams: failed,
    }
}
