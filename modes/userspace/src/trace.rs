//! `kproxy trace` over [`UserspaceRules`]: which listener accepts the packet (an exact
//! `address:port` first, then a wildcard NodePort listener on a local address), what it allows
//! (loadBalancerSourceRanges: TCP reset, UDP datagram ignored) and which endpoints it picks
//! from (round robin: equal shares; the proxy connects from the node, so the endpoint never
//! sees the client's address).
//!
//! A refusal here is the kernel's answer to a port nobody listens on (TCP reset, ICMP port
//! unreachable); the listener table does not say why there is no listener, so refusals carry
//! rule 0 unless a listener itself refused (rule 13; both in `docs/semantics.md`).

use std::net::SocketAddr;

use kproxy_contract::{IpFamily, Protocol};
use kproxy_tracer::{Candidate, Env, FrontendKind, Hop, Packet, Trace, Verdict};

use crate::model::{Frontend, ListenerKey, Transport, UserspaceRules};
use crate::render::wildcard;

/// Traces `pkt` through the listener table.
pub fn trace(rules: &UserspaceRules, env: &Env, pkt: &Packet) -> Trace {
    let family = pkt.family();
    if IpFamily::of(&pkt.src) != family {
        return Trace::new(Verdict::Unknown {
            reason: "source and destination are of different families".into(),
        });
    }
    let local = env.is_local(&pkt.dst) || rules.addresses.contains(&pkt.dst);
    let transport = match pkt.proto {
        Protocol::Tcp => Transport::Tcp,
        Protocol::Udp => Transport::Udp,
        Protocol::Sctp => {
            let mut t = Trace::new(if rules.addresses.contains(&pkt.dst) {
                Verdict::Reject {
                    rule: 0,
                    reason: "the userspace mode does not proxy SCTP".into(),
                }
            } else {
                Verdict::NotService
            });
            t.path.push(Hop {
                depth: 0,
                object: "userspace listeners".into(),
                detail: "SCTP is not proxied".into(),
            });
            return t;
        }
    };
    let mut path = Vec::new();
    let exact = ListenerKey {
        transport,
        addr: SocketAddr::new(pkt.dst, pkt.dst_port),
    };
    let any = ListenerKey {
        transport,
        addr: SocketAddr::new(wildcard(family), pkt.dst_port),
    };
    let found = rules.listeners.get(&exact).map(|t| (exact, t)).or_else(|| {
        local
            .then(|| rules.listeners.get(&any).map(|t| (any, t)))
            .flatten()
    });
    let Some((key, table)) = found else {
        path.push(Hop {
            depth: 0,
            object: "userspace listeners".into(),
            detail: format!("no listener for {exact}"),
        });
        let verdict = if rules.addresses.contains(&pkt.dst) {
            Verdict::Reject {
                rule: 0,
                reason: format!(
                    "nothing listens on {exact} (a service address): the kernel refuses"
                ),
            }
        } else {
            Verdict::NotService
        };
        return Trace { verdict, path };
    };
    path.push(Hop {
        depth: 0,
        object: format!("userspace listener {key}"),
        detail: table.to_string(),
    });
    if !table.allows(pkt.src) {
        let reason = format!("{} is outside the listener's source ranges", pkt.src);
        let verdict = match transport {
            Transport::Tcp => Verdict::Reject { rule: 13, reason },
            Transport::Udp => Verdict::Drop { rule: 13, reason },
        };
        return Trace { verdict, path };
    }
    let n = table.endpoints.len() as f64;
    Trace {
        verdict: Verdict::Forward {
            service: Some(table.service.to_string()),
            frontend: Some(match table.frontend {
                Frontend::ClusterIp => FrontendKind::ClusterIp,
                Frontend::ExternalIp => FrontendKind::ExternalIp,
                Frontend::LoadBalancer => FrontendKind::LoadBalancer,
                Frontend::NodePort => FrontendKind::NodePort,
            }),
            candidates: table
                .endpoints
                .iter()
                .map(|ep| Candidate {
                    endpoint: *ep,
                    share: 1.0 / n,
                    weight: None,
                    masquerade: true,
                })
                .collect(),
            affinity: table.affinity.map(|d| d.as_secs()),
        },
        path,
    }
}

#[cfg(test)]
mod tests;

impl<R: crate::RouteTable> kproxy_tracer::Traceable for crate::UserspaceMode<R> {
    fn trace(&self, rules: &UserspaceRules, env: &Env, packet: &Packet) -> Trace {
        trace(rules, env, packet)
    }

    fn live_unavailable(&self) -> Option<&'static str> {
        Some("its listeners live inside the running daemon, not in the kernel")
    }
}
