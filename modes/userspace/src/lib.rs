//! kproxy's userspace mode: no netfilter at all. Every service address (ClusterIP, externalIP,
//! LoadBalancer IP) is made local to the node by a `local` route on `lo`, and kproxy listens on
//! each service address and port itself, picking an endpoint per connection (TCP) or per client
//! flow (UDP) and copying the bytes (`splice(2)` for TCP).
//!
//! What it cannot do, by construction: endpoints see the node's address as the source of every
//! connection (no client-IP preservation, so `externalTrafficPolicy: Local` selects only local
//! endpoints but does not preserve the source); SCTP is not proxied (reported, not hidden);
//! proxied connections end when kproxy exits (on SIGTERM they may first finish, within the grace
//! period, while a successor already serves new ones).
//!
//! Layout: [`render`] (state → listeners and addresses), [`plan`] (diff, the dry-run text),
//! [`routes`] (the local routes), [`datapath`] (the sockets, on its own runtime).

pub mod datapath;
pub mod model;
pub mod plan;
pub mod render;
pub mod routes;
pub mod trace;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use kproxy_contract::{Cause, Mode, ModeError, ModeName, ObjectCount, ProxyState};

pub use datapath::{CopyMethod, DataPath, Handover, Options, Threads};
pub use model::UserspaceRules;
pub use plan::UserspacePlan;
pub use routes::{IpRoute, ROUTE_PROTO, RouteTable};

/// The userspace data plane.
#[derive(Debug)]
pub struct UserspaceMode<R: RouteTable = IpRoute> {
    routes: R,
    options: Options,
    /// Started by the first apply, so `--dry-run` and `--cleanup` start no threads.
    data: Option<DataPath>,
    /// Service ports reported as not served, as last applied.
    unsupported: BTreeMap<String, String>,
    /// The addresses our routes should make local: as last read, then as applied.
    expected: BTreeSet<IpAddr>,
    /// Service addresses that were already local through a route that is not ours (for
    /// example an externalIP that is the node's own address): local, but not ours to remove.
    foreign: BTreeSet<IpAddr>,
}

impl<R: RouteTable> UserspaceMode<R> {
    /// A mode managing addresses through `routes`.
    pub fn new(routes: R, options: Options) -> Self {
        Self {
            routes,
            options,
            data: None,
            unsupported: BTreeMap::new(),
            expected: BTreeSet::new(),
            foreign: BTreeSet::new(),
        }
    }

    /// The route seam (tests inspect the fake through it).
    pub fn routes(&self) -> &R {
        &self.routes
    }

    fn rejected(cause: std::io::Error, what: String) -> ModeError {
        ModeError::Rejected {
            mode: ModeName::Userspace,
            cause: Cause::Io {
                program: what,
                cause,
            },
        }
    }
}

impl<R: RouteTable> Mode for UserspaceMode<R> {
    type Rules = UserspaceRules;
    type Plan = UserspacePlan;
    /// A render is cheap (one listener per frontend): nothing is kept between renders.
    type Memo = ();
    /// Listeners bind the frontends the desired state names; nothing else is read.
    type Facts = ();

    fn name(&self) -> ModeName {
        ModeName::Userspace
    }

    fn observe(&self) {}

    fn render(&self, desired: &ProxyState, (): &(), (): &mut ()) -> UserspaceRules {
        render::render(desired)
    }

    /// The routes kproxy owns (from the kernel) and the listeners this process runs. Listeners
    /// are process state: a separate `--dry-run` process sees none of a running daemon's.
    fn read_live(&mut self) -> Result<UserspaceRules, ModeError> {
        let addresses = self.routes.list().map_err(|cause| ModeError::ReadLive {
            mode: ModeName::Userspace,
            cause,
        })?;
        self.expected = addresses.clone();
        Ok(UserspaceRules {
            addresses: addresses.union(&self.foreign).copied().collect(),
            listeners: self
                .data
                .as_ref()
                .map(DataPath::listeners)
                .unwrap_or_default(),
            unsupported: self.unsupported.clone(),
        })
    }

    fn plan(&self, live: &UserspaceRules, desired: &UserspaceRules) -> UserspacePlan {
        plan::plan(live, desired)
    }

    /// One of our routes gone (someone ran `ip route flush`): the next sync reads back and
    /// repairs. Costs two `ip` runs per sync period. (A listener whose port was taken retries
    /// its bind by itself.)
    fn drifted(&mut self) -> bool {
        match self.routes.list() {
            Ok(live) => !self.expected.is_subset(&live),
            Err(err) => {
                tracing::warn!(error = %err, "cannot list kproxy's routes; full resync");
                true
            }
        }
    }

    /// Routes first (so the listeners can bind), then listeners, then route removals. A
    /// listener that cannot be bound (the port is taken) is logged and left out, not fatal:
    /// one conflicting service must not stop every other from being served.
    fn apply(&mut self, plan: &UserspacePlan) -> Result<(), ModeError> {
        let foreign = self
            .routes
            .change(&plan.add_addresses, &[])
            .map_err(|cause| ModeError::Rejected {
                mode: ModeName::Userspace,
                cause,
            })?;
        for a in &foreign {
            tracing::info!(address = %a, "service address is already local (not through kproxy); leaving its route alone");
        }
        self.expected
            .extend(plan.add_addresses.iter().filter(|a| !foreign.contains(a)));
        self.foreign.extend(foreign);
        if !(plan.open.is_empty() && plan.update.is_empty() && plan.close.is_empty()) {
            if self.data.is_none() {
                let data = DataPath::new(self.options.clone())
                    .map_err(|e| Self::rejected(e, "the data-path runtime".into()))?;
                self.data = Some(data);
            }
            if let Some(data) = &mut self.data {
                for err in data.apply(&plan.close, &plan.update, &plan.open) {
                    tracing::error!(listener = %err.key, error = %err.error, "cannot listen; the frontend is not served until the port is free (retrying every 0.1-5 s)");
                }
            }
        }
        self.routes
            .change(&[], &plan.remove_addresses)
            .map_err(|cause| ModeError::Rejected {
                mode: ModeName::Userspace,
                cause,
            })?;
        for a in &plan.remove_addresses {
            self.expected.remove(a);
            self.foreign.remove(a);
        }
        if let Some(unsupported) = &plan.unsupported {
            for (what, why) in unsupported {
                if !self.unsupported.contains_key(what) {
                    tracing::warn!(service_port = %what, "not served: {why}");
                }
            }
            self.unsupported = unsupported.clone();
        }
        Ok(())
    }

    fn count_objects(&self, rules: &UserspaceRules) -> Vec<ObjectCount> {
        kproxy_contract::IpFamily::ALL
            .into_iter()
            .map(|family| ObjectCount {
                family,
                table: "userspace",
                kind: "listeners",
                count: rules
                    .listeners
                    .keys()
                    .filter(|k| kproxy_contract::IpFamily::of(&k.addr.ip()) == family)
                    .count(),
            })
            .collect()
    }

    /// SIGTERM: hands the listeners over to the kproxy that replaces this one (bound alongside
    /// through `SO_REUSEPORT`), waiting up to the grace period for it, then lets the established
    /// connections finish for up to the grace period. The routes stay, for the successor.
    fn stop(&self) {
        let Some(data) = &self.data else {
            return;
        };
        let grace = self.options.grace_period;
        tracing::info!(
            connections = data.connections(),
            ?grace,
            "handing the listeners over; established connections may finish within the grace period"
        );
        let h = data.handover(grace, grace);
        tracing::info!(
            handed_over = h.handed_over,
            without_successor = h.without_successor,
            listeners_open_for = ?h.listeners_open_for,
            drained_in = ?h.drained_in,
            connections_cut = h.connections_cut,
            "handover done"
        );
    }

    /// Closes every listener and removes every route kproxy owns.
    fn cleanup(&mut self) -> Result<(), ModeError> {
        let mut live = self.read_live()?;
        live.unsupported.clear();
        let plan = self.plan(&live, &UserspaceRules::default());
        self.apply(&plan)
    }
}

#[cfg(test)]
mod tests;
