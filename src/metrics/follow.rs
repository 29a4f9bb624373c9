//! The metrics follow the sync loop's events ([`crate::sync::Event`]): counters for changes and
//! failures, and after each applied sync its durations, the network programming latency, the
//! kernel object counts and the conntrack cleanup.

use std::sync::Arc;

use kproxy_contract::{ProxyState, TrafficPolicy};

use super::{Metrics, SyncObservation};
use crate::sync::{Event, Follower};

impl Follower for Arc<Metrics> {
    fn on(&mut self, event: &Event<'_>) {
        match event {
            Event::Queued { at } => self.queued(*at),
            Event::ChangesSeen {
                services,
                endpoints,
                pending_services,
                pending_endpoints,
            } => self.changes_seen(*services, *endpoints, *pending_services, *pending_endpoints),
            Event::SyncFailed => self.failed(),
            Event::RemovalHeld => self.source_removal_held(),
            Event::Applied { .. } => {}
            Event::Synced(outcome) => {
                let report = outcome.report;
                self.programmed(outcome.trigger_times, outcome.at);
                self.state(no_local_endpoints(&outcome.built.state), outcome.objects);
                self.synced(
                    SyncObservation {
                        full: report.full,
                        duration: report.duration,
                        apply: outcome.apply,
                        added: report.stats.added,
                        removed: report.stats.removed,
                        service_ports: report.service_ports,
                        skipped: report.skipped,
                        frontend_conflicts: outcome.built.frontend_conflicts(),
                    },
                    outcome.at,
                );
                if let Some(conntrack) = &report.conntrack {
                    self.conntrack_reconciled(conntrack);
                }
            }
        }
    }
}

/// Service ports with a Local policy that have endpoints, but none on this node (upstream's
/// no-local-endpoints gauge): (internal, external).
fn no_local_endpoints(state: &ProxyState) -> (usize, usize) {
    let mut n = (0, 0);
    for sp in state.services.values() {
        if !sp.endpoints.any || !sp.endpoints.local.is_empty() {
            continue;
        }
        if sp.internal_policy == TrafficPolicy::Local {
            n.0 += 1;
        }
        if sp.external_policy == TrafficPolicy::Local && sp.has_external_frontends() {
            n.1 += 1;
        }
    }
    n
}
