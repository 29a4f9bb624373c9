//! What the first sync waits for, as a value that takes `now`, so the rules are tested without
//! a runtime.
//!
//! - Services and EndpointSlices listed (upstream's `isInitialized`): always, however long it
//!   takes. The first sync then happens even when the cluster has no services at all.
//! - With `--detect-local-mode=NodeCIDR`, the Node's list: always, because the local-traffic
//!   detector is made of its `spec.podCIDRs`.
//! - From the API source, this node's Node with at least one address, for at most
//!   [`FirstSync::node_wait`] from the start. The watchers are independent streams, so without
//!   this the first sync could run before the Node arrives, and program NodePorts without the
//!   node's primary addresses and topology hints without its zone, for one sync period.
//!   Upstream blocks until the Node has addresses (polling for up to five minutes, then it
//!   exits); kproxy waits a bounded time and then syncs without them, warned about, so a node
//!   whose Node is late or not readable (RBAC) still gets its services. What arrives later is
//!   synced as any change is. The manifests source sends its Node first, and a directory
//!   without one is final: it waits for nothing more.

use std::time::Duration;

use tokio::time::Instant;

/// How much the sources have said so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Listed {
    /// Services and EndpointSlices have both been listed once.
    pub services_and_slices: bool,
    /// The Node's list has arrived (empty or not).
    pub node: bool,
    /// This node's Node is known and has at least one address.
    pub node_address: bool,
}

/// Whether the first sync may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Not yet; look again on the next update, or at the deadline when there is one.
    Wait(Option<Instant>),
    /// Everything it waits for is there.
    Ready,
    /// The lists are there but the Node (with an address) did not come in time: sync without
    /// it.
    WithoutNode,
}

/// The first sync's conditions. See the module documentation.
#[derive(Debug, Clone, Copy)]
pub struct FirstSync {
    node_cidr: bool,
    node_wait: Duration,
    node_deadline: Instant,
}

impl FirstSync {
    /// Conditions for a loop that started at `started`; `node_wait` zero waits for no Node
    /// (the manifests source), `node_cidr` waits for the Node's list without a bound.
    pub fn new(started: Instant, node_wait: Duration, node_cidr: bool) -> Self {
        Self {
            node_cidr,
            node_wait,
            node_deadline: started + node_wait,
        }
    }

    /// How long the first sync waits for the Node at most.
    pub fn node_wait(&self) -> Duration {
        self.node_wait
    }

    /// Whether the first sync may run at `now`, given what was listed.
    pub fn gate(&self, listed: Listed, now: Instant) -> Gate {
        if !listed.services_and_slices || (self.node_cidr && !listed.node) {
            return Gate::Wait(None);
        }
        if self.node_wait.is_zero() || listed.node_address {
            Gate::Ready
        } else if now < self.node_deadline {
            Gate::Wait(Some(self.node_deadline))
        } else {
            Gate::WithoutNode
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn listed(services_and_slices: bool, node: bool, node_address: bool) -> Listed {
        Listed {
            services_and_slices,
            node,
            node_address,
        }
    }

    #[test]
    fn services_and_slices_are_always_awaited() {
        let t0 = Instant::now();
        for first in [
            FirstSync::new(t0, Duration::ZERO, false),
            FirstSync::new(t0, 30 * S, false),
            FirstSync::new(t0, 30 * S, true),
        ] {
            assert_eq!(
                first.gate(listed(false, true, true), t0 + 3600 * S),
                Gate::Wait(None),
                "{first:?}"
            );
        }
    }

    #[test]
    fn without_a_node_wait_the_lists_are_enough() {
        let t0 = Instant::now();
        let first = FirstSync::new(t0, Duration::ZERO, false);
        assert_eq!(first.gate(listed(true, false, false), t0), Gate::Ready);
    }

    #[test]
    fn the_node_is_awaited_until_it_has_an_address_or_the_wait_ends() {
        let t0 = Instant::now();
        let first = FirstSync::new(t0, 30 * S, false);
        let deadline = t0 + 30 * S;
        // Not listed yet, listed but absent, present without an address: all wait.
        for l in [listed(true, false, false), listed(true, true, false)] {
            assert_eq!(first.gate(l, t0 + S), Gate::Wait(Some(deadline)));
        }
        assert_eq!(first.gate(listed(true, true, true), t0 + S), Gate::Ready);
        assert_eq!(
            first.gate(
                listed(true, true, false),
                deadline - Duration::from_millis(1)
            ),
            Gate::Wait(Some(deadline))
        );
        assert_eq!(
            first.gate(listed(true, false, false), deadline),
            Gate::WithoutNode
        );
        assert_eq!(first.gate(listed(true, true, true), deadline), Gate::Ready);
    }

    #[test]
    fn node_cidr_detection_waits_for_the_nodes_list_without_a_bound() {
        let t0 = Instant::now();
        let first = FirstSync::new(t0, 30 * S, true);
        assert_eq!(
            first.gate(listed(true, false, false), t0 + 3600 * S),
            Gate::Wait(None)
        );
        // Listed without an address: the bounded wait for an address applies.
        assert_eq!(
            first.gate(listed(true, true, false), t0 + 3600 * S),
            Gate::WithoutNode
        );
        let no_wait = FirstSync::new(t0, Duration::ZERO, true);
        assert_eq!(no_wait.gate(listed(true, true, false), t0), Gate::Ready);
    }
}
